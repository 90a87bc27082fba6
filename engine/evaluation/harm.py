"""Threats and self-harm incitement, counted apart from profanity: a short, hand-written list of
patterns (case-insensitive, on word boundaries) that no classifier here was trained to see.
A hit is a reason to read the sample, not a verdict; the list errs toward recall on the phrases
that matter most ("kill yourself") and is committed so every report counts the same thing."""

from __future__ import annotations

import re

# (name, pattern): second-person incitement to self-harm, threats of violence, wishes of death
HARM_PATTERNS: tuple[tuple[str, str], ...] = (
    # not after a negation or a comparison ("you don't hurt yourself", "rather ... than kill
    # yourself"): the dev samples' only hits were those
    (
        "self-harm",
        r"(?<!n't )(?<!not )(?<!never )(?<!than )\b(kill|hang|shoot|hurt|cut|drown) "
        r"(yo)?urself\b",
    ),
    ("self-harm", r"\bgo (and )?(die|jump off)\b|\byou (should|could|might as well) (just )?die\b"),
    ("self-harm", r"\bend (it all|your life)\b"),
    ("self-harm", r"\bcommit suicide\b|\bkys\b"),
    ("death wish", r"\byou (should|deserve to|ought to|need to|will|gonna|are going to) die\b"),
    ("death wish", r"\bhope (you|he|she|they) (die|dies|get killed|gets killed|rot)\b"),
    (
        "threat",
        r"\bi('ll| will| am going to|'m going to|'m gonna| wanna| want to) (kill|murder|"
        r"shoot|stab|beat|hurt|strangle|rape) (you|him|her|them|everyone)\b",
    ),
    # addressed to the reader, not a clause of time or a report ("until you're dead", "that's
    # why they're dead": hits on unguided and dev samples before this was narrowed)
    (
        "threat",
        r"(?<!until )(?<!when )(?<!after )(?<!before )(?<!if )\byou('re| are) "
        r"(dead|going to die|gonna die)\b",
    ),
)
_COMPILED = tuple((name, re.compile(p, re.IGNORECASE)) for name, p in HARM_PATTERNS)


def harm_hits(text: str) -> list[str]:
    """The names of the patterns the text matches (each name once, in list order)."""
    return list(dict.fromkeys(name for name, p in _COMPILED if p.search(text)))
