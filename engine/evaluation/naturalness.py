"""What a success rate can hide: repetition, a glued first token, drift from the prefix, a stock
vocabulary. Each measure is a pure function of texts (relevance aside, which needs a language
model), so it can be checked on hand-made examples.

- `repeats_trigram`: the continuation holds some word trigram twice ("worse is worse. worse is
  worse."); the share of such continuations is the row's repetition rate;
- `fused_boundary`: the first generated character glues onto the prefix's last word ("Yesterday
  afternoon I" + "iced" → "Iiced"): the prefix ends in a letter or digit and the continuation
  starts with one;
- `relevance`: per-token pointwise mutual information between a continuation and its own prefix
  under a judge LM, log p(c | own prefix) − log p(c | another prefix), the other prefix a fixed
  derangement of the row's (`shuffled_prefix_index`); positive when the text follows its prefix;
- `overrepresented_words`: the words a row uses far more than a reference row (plain decoding), by
  the log-odds ratio with an informative Dirichlet prior (Monroe, Colaresi & Quinn 2008), as
  z-scores.
"""

from __future__ import annotations

import math
import re
from collections import Counter

WORD = re.compile(r"[a-z0-9']+")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (letters, digits, apostrophes)."""
    return WORD.findall(text.lower())


def repeats_trigram(text: str) -> bool:
    """Whether some word trigram occurs at least twice in the text."""
    w = words(text)
    grams = Counter(zip(w, w[1:], w[2:], strict=False))
    return any(c > 1 for c in grams.values())


def fused_boundary(prefix: str, continuation: str) -> bool:
    """Whether the continuation's first character glues onto the prefix's last word (both
    alphanumeric, no space or punctuation between them)."""
    return (
        bool(prefix) and bool(continuation) and prefix[-1].isalnum() and continuation[0].isalnum()
    )


def shuffled_prefix_index(index: list[int], num_prefixes: int) -> list[int]:
    """For each row's prefix index, another prefix's: i → (i + ⌊P/2⌋) mod P, a derangement for
    P ≥ 2 that is the same for every setting of a run (so their relevances compare)."""
    if num_prefixes < 2:
        raise ValueError(f"relevance needs at least 2 prefixes, got {num_prefixes}")
    shift = num_prefixes // 2
    return [(i + shift) % num_prefixes for i in index]


def relevance(own_nll: list[float], other_nll: list[float], counts: list[int]) -> list[float]:
    """Per-row PMI in nats per token: (NLL given another prefix − NLL given its own) / tokens;
    rows without tokens are left out."""
    if not len(own_nll) == len(other_nll) == len(counts):
        raise ValueError("own_nll, other_nll and counts must have one entry per row")
    return [(o - s) / c for s, o, c in zip(own_nll, other_nll, counts, strict=True) if c > 0]


def overrepresented_words(
    texts: list[str], reference: list[str], top: int = 10, min_count: int = 3
) -> list[dict]:
    """The `top` words of `texts` most over-represented against `reference`: log-odds ratio with
    an informative Dirichlet prior (the pooled counts), as a z-score (Monroe et al. 2008, eq. 22),
    largest first; only words used ≥ min_count times in `texts`."""
    a = Counter(w for t in texts for w in words(t))
    b = Counter(w for t in reference for w in words(t))
    prior = a + b
    na, nb, n0 = sum(a.values()), sum(b.values()), sum(prior.values())
    if not na or not nb:
        return []
    out = []
    for w, ca in a.items():
        if ca < min_count:
            continue
        cb, a0 = b.get(w, 0), prior[w]
        la = math.log((ca + a0) / (na + n0 - ca - a0))
        lb = math.log((cb + a0) / (nb + n0 - cb - a0))
        var = 1 / (ca + a0) + 1 / (cb + a0)
        out.append({"word": w, "z": (la - lb) / math.sqrt(var), "count": ca, "reference": cb})
    out.sort(key=lambda x: -x["z"])
    return out[:top]
