"""Diffusion-LM training: the denoiser with its word embeddings end to end, and the noise-aware
attribute classifiers that guide it (dglm.engine.methods.diffusion_lm).

Text: "sources:rotten_tomatoes,headlines,fortunes" (the offline sources read directly, split
into sentences), a directory of `dglm data pairs` output (each pair's prefix + continuation, split
into sentences) or a plain text file (one sentence per line); train/eval by `data.split_of`.
A sentence becomes [BOS] words [EOS] [PAD]… of the model's length L; sentences longer than L − 2
words or with more than `max_unk` unknown words are dropped.

The loss (the paper's end-to-end objective, as its code computes it), per batch of word ids w:

    x_emb = E[w];  x0 = x_emb + σ_1·ξ0              a draw of q(x0 | w), σ_1 = σ(t = 1/T)
    t ~ U{1..T}/T;  z_t = α_t·x0 + σ_t·ε
    mse   = ‖f(z_t, t) − x0‖²   (‖f − x_emb‖² where t = 1/T: the embedding term L_emb)
    nll   = −log p(w | x0),  p ∝ exp(−‖x0 − E_v‖²)  the rounding term L_round
    prior = ‖α_T·x0‖²                               the prior term (≈ 0 with the sqrt schedule)
    loss  = mean(mse) + mean(nll) + mean(prior)

With the "interpolate" head (model module doc) the denoiser's word scores s(z_t, t) are trained by
cross-entropy in place of the MSE, which is still logged for its x̂0:

    ce    = −log softmax(s(z_t, t))[w]
    loss  = mean(ce) + mean(nll) + mean(prior)

Gradients reach E through x0 (inputs and targets) and the rounding term. Held out (EMA weights,
fixed noise): the loss and its parts, the rounding error of x0 (share of positions whose nearest
embedding is not w: are the embeddings decodable?) and the token error of the rounded prediction
f(z_t, t) at t = 0.25, 0.5 and 0.75 (how much the denoiser recovers), over every position and over
the words alone (`eval_x0_word_err_t*`: PAD, BOS and EOS fill most of a short sentence's row and
are easy, so the first hides how well words are recovered).
"""

from __future__ import annotations

import logging
import re
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from dglm.engine.methods.diffusion_lm.bundle import save_bundle
from dglm.engine.methods.diffusion_lm.model import (
    DiffusionLMNetwork,
    LatentClassifier,
)
from dglm.engine.methods.diffusion_lm.vocab import BOS, EOS, FIRST_WORD, PAD, UNK, Vocab, words
from dglm.engine.training.data import PAIRS_FILE, SOURCES, documents, read_pairs, split_of
from dglm.engine.training.loop import Progress, Run, TrainConfig
from dglm.kernels.nearest_embedding import nearest_embedding

logger = logging.getLogger(__name__)

KIND = "diffusion-lm"
CLASSIFIER_KIND = "diffusion-lm-classifier"
VOCAB_FILE = "vocab.json"
BUNDLE_DIR = "bundle"
EVAL_ROWS = 256  # held-out sentences per evaluation
EVAL_TIMES = (0.25, 0.5, 0.75)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`: split after . ! ? followed by a capital, digit or quote."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


SOURCES_PREFIX = "sources:"


def read_sentences(path: str | Path, split: str) -> list[str]:
    """The `split` ("train" | "eval") sentences of a pairs directory, a text file, or
    "sources:NAME,NAME" (the offline sources of training.data read directly, deduplicated, each
    sentence split by `split_of`: whole sentences, where pairs cut long documents mid-sentence);
    several of these joined by "+" are read in turn and concatenated (e.g. "sources:amazon_reviews
    +distilled.txt")."""
    if "+" in str(path):
        return [s for item in str(path).split("+") if item for s in read_sentences(item, split)]
    if str(path).startswith(SOURCES_PREFIX):
        names = [n for n in str(path)[len(SOURCES_PREFIX) :].split(",") if n]
        unknown = [n for n in names if n not in SOURCES]
        if not names or unknown:
            raise ValueError(f"DATA sources must be among {sorted(SOURCES)}, got {names}")
        return [
            s for d in documents(names) for s in split_sentences(d.text) if split_of(s) == split
        ]
    path = Path(path)
    if path.is_dir():
        pairs_path = path / PAIRS_FILE.format(split=split)
        if not pairs_path.is_file():
            raise FileNotFoundError(f"{pairs_path} is missing: make it with `dglm data pairs`")
        return [
            s for p in read_pairs(pairs_path) for s in split_sentences(p.prefix + p.continuation)
        ]
    if not path.is_file():
        raise FileNotFoundError(f"{path}: expected a `dglm data pairs` directory or a text file")
    lines = [x.strip() for x in path.read_text(encoding="utf-8").splitlines()]
    return [x for x in lines if x and split_of(x) == split]


def encode_sentences(
    sentences: list[str], vocab: Vocab, seq_len: int, max_unk: int = 1, truncate: bool = False
) -> tuple[torch.Tensor, list[int]]:
    """(ids (N, L) long: [BOS] words [EOS] [PAD]…, the indices of the kept sentences). Longer
    sentences are dropped (or cut to L − 2 words with `truncate`), as are those with more than
    `max_unk` unknown words or none at all."""
    rows, kept = [], []
    for i, s in enumerate(sentences):
        ids = vocab.encode(s)
        if truncate:
            ids = ids[: seq_len - 2]
        if not ids or len(ids) > seq_len - 2 or sum(x == UNK for x in ids) > max_unk:
            continue
        rows.append([BOS, *ids, EOS] + [PAD] * (seq_len - 2 - len(ids)))
        kept.append(i)
    if not rows:
        return torch.zeros(0, seq_len, dtype=torch.long), kept
    return torch.tensor(rows, dtype=torch.long), kept


def build_vocab(sentences: list[str], size: int, seq_len: int) -> Vocab:
    """The vocabulary of the sentences that fit the model's length."""
    return Vocab.build((s for s in sentences if len(words(s)) <= seq_len - 2), size)


class DiffusionLMLoss:
    """The training loss of the module docstring, with the schedule's table of alpha²(i/T)."""

    def __init__(self, net: DiffusionLMNetwork) -> None:
        c = net.config
        t = torch.arange(0, c.diffusion_steps + 1, dtype=torch.float64) / c.diffusion_steps
        self.alpha2 = net.schedule.alpha2(t).float()  # (T + 1,): index i ↔ t = i / T
        self.T = c.diffusion_steps

    def __call__(
        self,
        net: DiffusionLMNetwork,
        ids: torch.Tensor,  # (B, L)
        gen: torch.Generator,
        t_idx: torch.Tensor | None = None,  # (B,) in 1..T; None: drawn
    ) -> dict[str, torch.Tensor]:
        b, dev = ids.shape[0], ids.device
        if t_idx is None:
            t_idx = torch.randint(1, self.T + 1, (b,), generator=gen)
        a2 = self.alpha2[t_idx].to(dev)  # (B,)
        emb = net.embed_ids(ids)  # (B, L, d)
        xi0 = torch.randn(emb.shape, generator=gen).to(dev)
        eps = torch.randn(emb.shape, generator=gen).to(dev)
        sigma1 = (1 - self.alpha2[1]).sqrt()
        x0 = emb + sigma1 * xi0
        alpha, sigma = a2.sqrt()[:, None, None], (1 - a2).sqrt()[:, None, None]
        z = alpha * x0 + sigma * eps
        prev = None
        if net.config.self_condition:  # half the rows see their own first estimate (no grad)
            with torch.no_grad():
                first = net(z, a2).float()
            use = (torch.rand(b, generator=gen) < 0.5).to(dev)[:, None, None]
            prev = torch.where(use, first, torch.zeros_like(first))
        pred, scores = net.denoise(z, a2, prev)
        pred = pred.float()  # (B, L, d)
        target = torch.where((t_idx == 1).to(dev)[:, None, None], emb, x0)
        mse = (pred - target.float()).pow(2).mean(dim=(1, 2))  # (B,)
        nll = F.cross_entropy(net.logits(x0).flatten(0, 1), ids.flatten(), reduction="none")
        nll = nll.view(b, -1).mean(-1)  # (B,)
        prior = (self.alpha2[-1] * x0.float().pow(2)).mean(dim=(1, 2))
        out = {"mse": mse.mean(), "nll": nll.mean(), "prior": prior.mean(), "x0": x0, "pred": pred}
        if scores is None:  # "regress": the paper's objective
            out["loss"] = (mse + nll + prior).mean()
        else:  # "interpolate": cross-entropy of the word scores replaces the MSE
            ce = F.cross_entropy(scores.flatten(0, 1), ids.flatten(), reduction="none")
            ce = ce.view(b, -1).mean(-1)  # (B,)
            out["ce"] = ce.mean()
            out["loss"] = (ce + nll + prior).mean()
        return out


@torch.no_grad()
def evaluate_diffusion_lm(
    net: DiffusionLMNetwork, loss_fn: DiffusionLMLoss, held: torch.Tensor
) -> dict[str, float]:
    """Held-out loss, its parts, the rounding error and the prediction's token error (fixed seed)."""
    net.eval()
    dev = net.embed.weight.device
    ids = held[:EVAL_ROWS].to(dev)
    gen = torch.Generator().manual_seed(0)
    out = loss_fn(net, ids, gen)
    table = net.table().float()
    logs = {f"eval_{k}": float(out[k]) for k in ("loss", "mse", "nll", "prior", "ce") if k in out}
    word = ids >= FIRST_WORD  # the sentence's words (PAD, BOS, EOS are most of a short row)
    round_ids, _ = nearest_embedding(out["x0"], table)
    logs["eval_round_err"] = float((round_ids != ids).float().mean())
    for t in EVAL_TIMES:
        t_idx = torch.full((ids.shape[0],), max(1, round(t * loss_fn.T)), dtype=torch.long)
        o = loss_fn(net, ids, gen, t_idx)
        pred_ids, _ = nearest_embedding(o["pred"], table)
        wrong = pred_ids != ids
        logs[f"eval_x0_err_t{t}"] = float(wrong.float().mean())
        logs[f"eval_x0_word_err_t{t}"] = float(wrong[word].float().mean())
    return logs


def train_diffusion_lm(
    net: DiffusionLMNetwork,
    vocab: Vocab,
    train: torch.Tensor,  # (N, L) ids
    held: torch.Tensor,  # (M, L) ids
    out: str | Path,
    cfg: TrainConfig,
    device: str = "cpu",
    progress: Progress | None = None,
    autocast_bf16: bool = False,
) -> Path:
    """Train (resuming from <out>/checkpoint.pt) and write the EMA weights as a bundle to
    <out>/bundle → its path."""
    if len(vocab) != net.config.vocab_size:
        raise ValueError(f"vocab has {len(vocab)} tokens, the model {net.config.vocab_size}")
    if train.shape[0] == 0 or held.shape[0] == 0:
        raise ValueError(f"no usable sentences: {train.shape[0]} train, {held.shape[0]} held out")
    out = Path(out)
    run = Run(out, net, cfg, KIND, net.config.to_dict(), device)
    vocab.save(out / VOCAB_FILE)
    loss_fn = DiffusionLMLoss(net)
    dev = run.device
    train = train.to(dev)
    cast = torch.autocast(dev.type, dtype=torch.bfloat16) if autocast_bf16 else nullcontext()

    def evaluate() -> dict[str, float]:
        return evaluate_diffusion_lm(run.ema.model, loss_fn, held)

    for idx in run.batches(train.shape[0]):
        net.train()
        with cast:
            loss = loss_fn(net, train[idx.to(dev)], run.gen)["loss"]
        run.optimizer_step(loss)
        run.finish_step(loss, evaluate, progress)
    return save_bundle(out / BUNDLE_DIR, run.ema.model, vocab)


# ------------------------------------------------------------------------- attribute classifiers
def classifier_batch(
    table: torch.Tensor,  # (V, d) frozen word embeddings
    alpha2_table: torch.Tensor,  # (T + 1,)
    ids: torch.Tensor,  # (B, L)
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_t (B, L, d), alpha² (B,)): the sentences' embeddings, drawn from q(x0|w), noised to a
    random training time, as the classifier meets them during guidance."""
    b = ids.shape[0]
    t_idx = torch.randint(1, alpha2_table.shape[0], (b,), generator=gen)
    a2 = alpha2_table[t_idx].to(table.device)
    emb = table[ids]
    x0 = emb + (1 - alpha2_table[1]).sqrt() * torch.randn(emb.shape, generator=gen).to(emb.device)
    noise = torch.randn(emb.shape, generator=gen).to(emb.device)
    return a2.sqrt()[:, None, None] * x0 + (1 - a2).sqrt()[:, None, None] * noise, a2


def train_latent_classifier(
    clf: LatentClassifier,
    denoiser: DiffusionLMNetwork,
    train: tuple[torch.Tensor, torch.Tensor],  # ids (N, L), labels (N,)
    held: tuple[torch.Tensor, torch.Tensor],
    out: str | Path,
    cfg: TrainConfig,
    device: str = "cpu",
    progress: Progress | None = None,
) -> LatentClassifier:
    """Train a noise-aware classifier on the denoiser's (frozen) embedding space, resuming from
    <out>/checkpoint.pt → the EMA classifier (eval mode). Held out: cross-entropy and accuracy at
    random times and at t = 0.25 / 0.5 / 0.75."""
    if train[0].shape[0] == 0 or held[0].shape[0] == 0:
        raise ValueError(f"no usable texts: {train[0].shape[0]} train, {held[0].shape[0]} held out")
    run = Run(out, clf, cfg, CLASSIFIER_KIND, clf.config.to_dict(), device)
    dev = run.device
    table = denoiser.table().detach().float().to(dev)
    a2_table = DiffusionLMLoss(denoiser).alpha2
    ids, labels = train[0].to(dev), train[1].to(dev)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model = run.ema.model.eval()
        gen = torch.Generator().manual_seed(0)
        h_ids, h_lab = held[0][:EVAL_ROWS].to(dev), held[1][:EVAL_ROWS].to(dev)
        z, a2 = classifier_batch(table, a2_table, h_ids, gen)
        logits = model(z, a2)
        logs = {
            "eval_loss": float(F.cross_entropy(logits, h_lab)),
            "eval_acc": float((logits.argmax(-1) == h_lab).float().mean()),
        }
        for t in EVAL_TIMES:
            i = max(1, round(t * (a2_table.shape[0] - 1)))
            a2 = a2_table[i].expand(h_ids.shape[0]).to(dev)
            x0 = table[h_ids]
            zt = a2.sqrt()[:, None, None] * x0 + (1 - a2).sqrt()[:, None, None] * torch.randn(
                x0.shape, generator=gen
            ).to(dev)
            logs[f"eval_acc_t{t}"] = float((model(zt, a2).argmax(-1) == h_lab).float().mean())
        return logs

    for idx in run.batches(ids.shape[0]):
        clf.train()
        idx = idx.to(dev)
        z, a2 = classifier_batch(table, a2_table, ids[idx], run.gen)
        loss = F.cross_entropy(clf(z, a2), labels[idx])
        run.optimizer_step(loss)
        run.finish_step(loss, evaluate, progress)
    return run.ema.model.eval()


def labelled_sentences(
    texts: list[str], labels: list[str], label_order: tuple[str, ...], vocab: Vocab, seq_len: int
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train" | "eval": (ids (N, L), label indices (N,))}: each text cut to its first L − 2
    words, split by `split_of` (every 10th text when that leaves no held-out text); texts with
    more than a quarter unknown words are dropped."""
    split = [split_of(t) for t in texts]
    if "eval" not in split:
        split = ["eval" if i % 10 == 0 else "train" for i in range(len(texts))]
    out = {}
    for name in ("train", "eval"):
        chosen = [(t, lab) for t, lab, s in zip(texts, labels, split, strict=True) if s == name]
        rows, kept = [], []
        for t, lab in chosen:
            ids = vocab.encode(t)[: seq_len - 2]
            if ids and sum(x == UNK for x in ids) <= len(ids) // 4:
                rows.append([BOS, *ids, EOS] + [PAD] * (seq_len - 2 - len(ids)))
                kept.append(label_order.index(lab))
        out[name] = (
            torch.tensor(rows, dtype=torch.long).view(-1, seq_len),
            torch.tensor(kept, dtype=torch.long),
        )
    return out
