"""Held-out prefixes: texts in the "eval" hash split of the offline sources whose training pairs are
held out too, cut to 16-32 decoder tokens, in a deterministic order."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator

from dglm.engine.training import data

logger = logging.getLogger(__name__)

DEFAULT_SOURCES = ("rotten_tomatoes", "speeches", "fortunes")


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _source_prefixes(
    name: str, tokenizer, min_tokens: int, max_tokens: int, min_continuation: int
) -> Iterator[str]:
    """Prefixes of one source's held-out texts, in SHA-1 order of the texts.

    A text is used only if it is in the "eval" split and so is every prefix/continuation pair
    `dglm data pairs` cuts from it (those are split by the hash of the pair, not of the text).
    A prefix is the first min(max_tokens, max(min_tokens, len/2)) tokens of a text with at least
    min_tokens + min_continuation tokens.
    """
    docs = sorted(
        (d for d in data.SOURCES[name]() if data.split_of(d.text) == "eval"),
        key=lambda d: _sha1(d.text),
    )
    for doc in docs:
        ids = tokenizer.encode(doc.text, add_special_tokens=False)
        if len(ids) < min_tokens + min_continuation:
            continue
        if any(
            data.split_of(p.prefix + p.continuation) != "eval"
            for p in data.make_pairs([doc], tokenizer)
        ):
            continue
        cut = min(max_tokens, max(min_tokens, len(ids) // 2))
        prefix = tokenizer.decode(ids[:cut], skip_special_tokens=True).strip()
        if prefix:
            yield prefix


def heldout_prefixes(
    tokenizer,
    n: int,
    sources: tuple[str, ...] = DEFAULT_SOURCES,
    min_tokens: int = 16,
    max_tokens: int = 32,
    min_continuation: int = 8,
) -> list[tuple[str, str]]:
    """n deterministic (source, prefix) pairs, round-robin over the sources' held-out texts.

    A source that cannot be read here (missing package or files) is skipped with a warning.
    """
    for s in sources:
        if s not in data.SOURCES:
            raise ValueError(f"unknown data source {s!r}; available: {sorted(data.SOURCES)}")
    streams = {}
    for s in sources:
        streams[s] = _source_prefixes(s, tokenizer, min_tokens, max_tokens, min_continuation)
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    while len(out) < n and streams:
        for s in list(streams):
            try:
                prefix = next(streams[s])
            except StopIteration:
                del streams[s]
                continue
            except RuntimeError as e:
                logger.warning("skipping source %s: %s", s, e)
                del streams[s]
                continue
            if prefix not in seen:
                seen.add(prefix)
                out.append((s, prefix))
            if len(out) == n:
                break
    if not out:
        raise RuntimeError(f"no held-out prefixes could be read from sources {list(sources)}")
    if len(out) < n:
        logger.warning("only %d held-out prefixes available (asked for %d)", len(out), n)
    return out
