"""Control success and perplexity of a set of continuations, from the evaluation harness.

Per continuation: VADER compound (`judges.vader_compound`), alt-profanity-check probability
(`judges.toxicity`), each control's probe probability p(target | text) on the MiniLM embedding
(`judges.probe_probability`), and the NLL of its tokens under the decoder given the prefix
(`perplexity.continuation_nll`, no soft prompt).

Success of a continuation for a set of controls: every control is met, each judged
- by an evaluator independent of the probes where there is one: sentiment=positive/negative by
  VADER (compound > 0.05 / < −0.05), toxicity=<non-toxic label> by alt-profanity-check
  (probability ≤ 0.5), toxicity=<toxic label> (> 0.5); any other probe by the probe itself;
- and, as `probe_success`, by the probes alone (p(target) > 0.5).
Uncontrolled methods are judged against the suite's sentiment control: their base rate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from dglm.engine.evaluation import judges, perplexity
from dglm.engine.probes import Control

logger = logging.getLogger(__name__)


@dataclass
class Judged:
    """Per-continuation judgements of one set of continuations."""

    success: list[bool | None]  # None when an evaluator is missing
    probe_success: list[bool]
    nll: list[float]  # summed over the continuation's tokens
    tokens: list[int]
    vader: list[float | None]
    toxicity: list[float | None]


class Judge:
    def __init__(self, decoder, encoder, probes: dict, low_toxicity: str | None) -> None:
        self.decoder, self.encoder, self.probes = decoder, encoder, probes
        self.low_toxicity = low_toxicity  # the toxicity probe's non-toxic label
        self.missing: set[str] = set()  # evaluators that could not be imported

    def judge(
        self, prefix_ids: list[list[int]], token_ids: list[list[int]], texts: list[str],
        controls: tuple[Control, ...],
    ) -> Judged:  # fmt: skip
        if not controls:
            raise ValueError("controls is empty: judge uncontrolled text against some control")
        n = len(texts)
        nll, counts = perplexity.continuation_nll(self.decoder, prefix_ids, token_ids)
        vader = self._try("vaderSentiment", lambda: judges.vader_compound(texts), n)
        tox = self._try(
            "alt-profanity-check",
            lambda: [judges.toxicity([t])["mean"] for t in texts],
            n,
        )
        emb = self.encoder.embed(list(texts)).float().cpu() if n else torch.zeros(0, 1)
        success: list[bool | None] = [True] * n
        probe_ok = [True] * n
        for c in controls:
            p = judges.probe_probability(self.probes[c.probe], c.target, emb).tolist()
            external = self._external(c, vader, tox)
            for i in range(n):
                probe_ok[i] = probe_ok[i] and p[i] > 0.5
                judged = external[i] if external is not None else p[i] > 0.5
                if success[i] is not None:
                    success[i] = None if judged is None else success[i] and judged
        return Judged(success, probe_ok, nll.tolist(), counts.tolist(), vader, tox)

    def _external(self, c: Control, vader: list, tox: list) -> list[bool | None] | None:
        target = self.probes[c.probe].labels[c.target] if isinstance(c.target, int) else c.target
        thr = judges.VADER_THRESHOLD
        if c.probe == "sentiment" and target == "positive":
            return [None if v is None else v > thr for v in vader]
        if c.probe == "sentiment" and target == "negative":
            return [None if v is None else v < -thr for v in vader]
        if c.probe == "toxicity":
            low = target == self.low_toxicity
            thr = judges.TOXIC_THRESHOLD
            return [None if t is None else (t <= thr if low else t > thr) for t in tox]
        return None

    def _try(self, name: str, fn, n: int) -> list:
        if name in self.missing:
            return [None] * n
        try:
            return list(fn())
        except RuntimeError as e:  # the harness's "pip install ..." message
            logger.warning("%s unavailable, its judgement is left out: %s", name, e)
            self.missing.add(name)
            return [None] * n


def aggregate(j: Judged) -> dict:
    """Rates over one set of continuations: n, success (k, rate), probe success, perplexity,
    VADER positive share, toxic share, mean tokens."""
    n = len(j.success)
    judged = [s for s in j.success if s is not None]
    k = sum(judged)
    pk = sum(j.probe_success)
    vader = [v for v in j.vader if v is not None]
    tox = [t for t in j.toxicity if t is not None]
    out = {
        "n": n,
        "success_k": k if judged else None,
        "success_n": len(judged),
        "success_rate": k / len(judged) if judged else None,
        "probe_success_k": pk,
        "probe_success_rate": pk / n if n else None,
        "perplexity": perplexity.perplexity(
            torch.tensor(j.nll, dtype=torch.float64), torch.tensor(j.tokens)
        ),
        "vader_positive": sum(v > judges.VADER_THRESHOLD for v in vader) / len(vader)
        if vader
        else None,
        "toxic_frac": sum(t > judges.TOXIC_THRESHOLD for t in tox) / len(tox) if tox else None,
        "mean_tokens": sum(j.tokens) / n if n else None,
    }
    return out
