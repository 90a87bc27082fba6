"""Diffusion-LM's word-level vocabulary: lowercase words and punctuation, the N most frequent of
the training sentences, plus PAD, BOS, EOS and UNK.

Why word-level and not the decoder's subword tokenizer: every position of a Diffusion-LM sequence
is rounded to one token by nearest embedding, so (a) a small vocabulary keeps the rounding (and
the clamping at every step) one small matmul, where 49k subwords would dominate the step;
(b) a position is a word, so length control and infilling are exact in words, the unit a user
asks for; (c) the paper uses word-level vocabularies (821 words for E2E, 11k for ROCStories), and
its embeddings are learned from scratch anyway (nothing is gained from the decoder's ids). The
cost: out-of-vocabulary words become UNK; training keeps only sentences with few of them.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
FIRST_WORD = len(SPECIALS)  # ids below are special; rounding of a free word position skips them

_TOKEN = re.compile(r"[^\W_]+(?:'[^\W_]+)?|[^\w\s]")
_NO_SPACE_BEFORE = re.compile(r" ([.,!?;:%)\]}]|'s\b|n't\b)")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")


def words(text: str) -> list[str]:
    """Lowercase words (with one inner apostrophe: "don't") and single punctuation marks."""
    return _TOKEN.findall(text.lower())


def detokenize(tokens: Iterable[str]) -> str:
    """Words joined by spaces, without the space before closing punctuation or after opening."""
    text = " ".join(tokens)
    return _NO_SPACE_AFTER.sub(r"\1", _NO_SPACE_BEFORE.sub(r"\1", text))


class Vocab:
    """Word ↔ id; ids 0..3 are PAD, BOS, EOS, UNK, words follow by falling frequency."""

    def __init__(self, tokens: list[str]) -> None:
        if list(tokens[:FIRST_WORD]) != list(SPECIALS):
            raise ValueError(f"a vocabulary starts with the special tokens {SPECIALS}")
        if len(set(tokens)) != len(tokens):
            raise ValueError("a vocabulary's tokens must be distinct")
        self.tokens = list(tokens)
        self.index = {w: i for i, w in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def build(cls, texts: Iterable[str], size: int) -> Vocab:
        """The `size` − 4 most frequent words of `texts` (ties: alphabetical) after the specials."""
        if size <= FIRST_WORD:
            raise ValueError(f"vocab size must be > {FIRST_WORD}, got {size!r}")
        counts = Counter(w for t in texts for w in words(t))
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: size - FIRST_WORD]
        return cls(list(SPECIALS) + [w for w, _ in top])

    def encode(self, text: str) -> list[int]:
        """The word ids of `text` (no BOS/EOS), UNK for unknown words."""
        return [self.index.get(w, UNK) for w in words(text)]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the word ids, stopping at the first EOS or PAD; BOS and UNK are dropped."""
        out = []
        for i in ids:
            if i in (EOS, PAD):
                break
            if i >= FIRST_WORD:
                out.append(self.tokens[i])
        return detokenize(out)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.tokens, ensure_ascii=False), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        try:
            tokens = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(
                f"{path}: not a readable vocabulary (a JSON list of tokens): {e}"
            ) from e
        if not isinstance(tokens, list) or not all(isinstance(t, str) for t in tokens):
            raise ValueError(f"{path}: a vocabulary is a JSON list of strings")
        return cls(tokens)
