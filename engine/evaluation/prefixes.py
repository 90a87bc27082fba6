"""Held-out prefixes: texts in the "eval" hash split of the offline sources whose training pairs are
held out too, cut to 16-32 decoder tokens, in a deterministic order.

Two disjoint prefix splits (`PREFIX_SPLITS`) serve the evaluation protocol: every choice (scales,
guidance, step sizes, masks, checkpoints) is made on "dev"; "test" is run once per shipped bundle
and is what the README quotes. A prefix is "dev" when it is one of the prefixes earlier
evaluations tuned on (`TUNED_PREFIXES_FILE`: their SHA-1s) or when the SHA-1 of
`SPLIT_SALT + prefix` falls below `DEV_FRACTION`; every other held-out prefix is "test". Both come
only from texts in the engine-wide "eval" split (`training.data.split_of`), which no training set
of a bundle reads: pairs for the prompt generator and the score network, the probes' labelled
sets, the value networks' rollouts (cut from `pairs_train`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

from dglm.engine.training import data

logger = logging.getLogger(__name__)

DEFAULT_SOURCES = ("rotten_tomatoes", "speeches", "fortunes")
PREFIX_SPLITS = ("dev", "test")
DEV_FRACTION = 1 / 3  # of the prefixes not tuned on before; the rest is test
SPLIT_SALT = "dglm-eval-prefix-split:"  # so the split is not the "eval"/"train" hash again
# SHA-1s of the 256 prefixes (SmolLM2's tokenizer, the default sources) that `dglm eval` used
# before the split existed: scales and step sizes were tuned on them, so they are dev for good
TUNED_PREFIXES_FILE = Path(__file__).resolve().parent.parent / "assets" / "eval_tuned_prefixes.txt"


def _sha1(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


@functools.cache
def tuned_prefixes() -> frozenset[str]:
    """The SHA-1s of the prefixes tuned on before the dev/test split (`TUNED_PREFIXES_FILE`)."""
    lines = TUNED_PREFIXES_FILE.read_text(encoding="utf-8").splitlines()
    return frozenset(x.strip() for x in lines if x.strip() and not x.startswith("#"))


def prefix_split(prefix: str) -> str:
    """ "dev" or "test" for a held-out prefix (see the module doc); a pure function of its text."""
    if _sha1(prefix) in tuned_prefixes():
        return "dev"
    h = int(_sha1(SPLIT_SALT + prefix)[:16], 16)
    return "dev" if h / 2**64 < DEV_FRACTION else "test"


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
    split: str | None = None,
) -> list[tuple[str, str]]:
    """n deterministic (source, prefix) pairs, round-robin over the sources' held-out texts; with
    `split` ("dev" | "test"), only the prefixes of that split (`prefix_split`).

    A source that cannot be read here (missing package or files) is skipped with a warning.
    """
    for s in sources:
        if s not in data.SOURCES:
            raise ValueError(f"unknown data source {s!r}; available: {sorted(data.SOURCES)}")
    if split is not None and split not in PREFIX_SPLITS:
        raise ValueError(f"split must be one of {PREFIX_SPLITS}, got {split!r}")
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
            if split is not None and prefix_split(prefix) != split:
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
