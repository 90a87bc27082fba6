"""Diffusion-LM's requests, its `Method` and its small engine (bundle in, RequestOutput out)."""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from dglm.engine.api import GenerationParams, RequestOutput, Sample, finite_in, int_in
from dglm.engine.methods.base import Conditioning, Method, MethodBatch
from dglm.engine.methods.diffusion_lm.bundle import SAMPLING_KEYS, load_bundle
from dglm.engine.methods.diffusion_lm.lattice import beam_search, slots_from_candidates
from dglm.engine.methods.diffusion_lm.model import DiffusionLMNetwork, LatentClassifier
from dglm.engine.methods.diffusion_lm.sampling import (
    SAMPLERS,
    ClassifierGuidance,
    ClassifierTerm,
    Layout,
    Rounder,
    sample_sequence,
)
from dglm.engine.methods.diffusion_lm.vocab import (
    BOS,
    EOS,
    FIRST_WORD,
    PAD,
    UNK,
    Vocab,
    detokenize,
    words,
)
from dglm.engine.probes import Control

logger = logging.getLogger(__name__)

INFILL_MARK = "___"
DEFAULT_INFILL_WORDS = 4  # the gap's words when an infill request gives no length
MAX_STEPS = 10_000
MAX_GUIDANCE_STEPS = 100
MAX_CANDIDATES = 256
# how a sample is made of its candidates (DiffusionLMParams): pick the best one ("lm", "mbr"), or
# the best path through their word lattice ("lattice", lattice.py)
SELECTS = ("lm", "mbr", "lattice")
MAX_BEAM = 64
# candidate c of sample j draws from seed + j + c·stride: torch's CPU generator keeps only the low
# 32 bits of a seed, so the stride must live there; with j < 1024 and c < 256, j + c·2²⁰ < 2²⁸
# gives every (sample, candidate) of a request its own low bits
CANDIDATE_SEED_STRIDE = 1 << 20
DEFAULT_SCORER = "smollm2"  # the causal LM of select="lm": the engine's decoder


@dataclass(frozen=True)
class DiffusionLMParams:
    num_samples: int = 1  # sequences per request
    seed: int | None = None  # None: fresh randomness
    # words of the sentence (context included), ending with EOS at exactly this length; None: the
    # model chooses (any free position may round to EOS/PAD)
    length: int | None = None
    # fixed left and right context around a gap: ("the food", ". we left early .") or one string
    # with "___" where the gap is; the gap is `length` − context words (default 4)
    infill: tuple[str, str] | str | None = None
    controls: tuple[
        Control, ...
    ] = ()  # attribute classifiers of the bundle: Control(name, label, scale)
    sampler: str = "ddim"  # "ddim" (few steps) | "ddpm" (the reference path)
    num_inference_steps: int = 50
    clamp: bool = True  # the clamping trick at every step
    fluency: float = 0.01  # λ of the fluency term λ·‖x − μ‖²/σ (paper: 1e-4 to 0.1)
    guidance_steps: int = 3  # Adagrad steps per denoising step
    guidance_step_size: float = 0.1  # Adagrad's step size
    # each sample is the best of this many sampled candidates (1: no selection); Li et al. 2022
    # pick among samples by minimum Bayes risk ("mbr": the candidate whose words overlap the other
    # candidates' most); "lm": the candidate with the lowest per-token NLL under a causal LM (the
    # engine's decoder, SmolLM2), given the prompt; "lattice" (a known length only): the words of
    # the candidates at each free position form a lattice, and a beam search under the same LM
    # keeps the best path (lattice.py): Σ log p_LM + lattice_weight · Σ log(the word's share of the
    # candidates at its position), with `lattice_beam` hypotheses
    candidates: int = 1
    select: str = "lm"
    # (beam 8, weight 0.25: the best of beams 4/8 × weights 0/0.25/0.5/1 on 32 held-out infill
    # sentences with 16-32 candidates; TRAINING.md of the shipped bundle)
    lattice_beam: int = 8
    lattice_weight: float = 0.25

    def __post_init__(self) -> None:
        if isinstance(self.controls, Control):
            object.__setattr__(self, "controls", (self.controls,))
        object.__setattr__(self, "controls", tuple(self.controls))
        for c in self.controls:
            if not isinstance(c, Control):
                raise ValueError(f"controls must be Control objects, got {c!r}")
        int_in("num_samples", self.num_samples, 1, 1024)
        if self.seed is not None:
            int_in("seed", self.seed, 0, 2**62)
        if self.length is not None:
            int_in("length", self.length, 1, 1 << 16)
        if isinstance(self.infill, str):
            if self.infill.count(INFILL_MARK) != 1:
                raise ValueError(
                    f"infill must hold the gap mark {INFILL_MARK!r} exactly once, got {self.infill!r}"
                )
            left, _, right = self.infill.partition(INFILL_MARK)
            object.__setattr__(self, "infill", (left, right))
        if self.infill is not None:
            ok = isinstance(self.infill, tuple | list) and len(self.infill) == 2
            if not ok or not all(isinstance(s, str) for s in self.infill):
                raise ValueError(f"infill must be (left, right) strings, got {self.infill!r}")
            object.__setattr__(self, "infill", tuple(self.infill))
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}")
        int_in("num_inference_steps", self.num_inference_steps, 1, MAX_STEPS)
        if not isinstance(self.clamp, bool):
            raise ValueError(f"clamp must be a bool, got {self.clamp!r}")
        finite_in("fluency", self.fluency, 0.0, 1e6)
        int_in("guidance_steps", self.guidance_steps, 0, MAX_GUIDANCE_STEPS)
        finite_in("guidance_step_size", self.guidance_step_size, 0.0, 100.0)
        int_in("candidates", self.candidates, 1, MAX_CANDIDATES)
        if self.select not in SELECTS:
            raise ValueError(f"select must be one of {SELECTS}, got {self.select!r}")
        if self.select == "lattice" and self.length is None and self.infill is None:
            raise ValueError(
                'select="lattice" needs a known length (length or infill): the candidates\' '
                "words are aligned by position"
            )
        int_in("lattice_beam", self.lattice_beam, 1, MAX_BEAM)
        finite_in("lattice_weight", self.lattice_weight, 0.0, 1e6)

    @classmethod
    def from_generation_params(cls, p: GenerationParams, **defaults) -> DiffusionLMParams:
        """The shared request type's fields that apply: controls, num_samples, seed, sampler and
        num_inference_steps (None: `defaults`, then this class's); the decoder's fields are
        ignored."""
        kw = dict(defaults)
        kw.update(controls=p.controls, num_samples=p.num_samples, seed=p.seed)
        if p.sampler is not None:
            kw["sampler"] = p.sampler
        if p.num_inference_steps is not None:
            kw["num_inference_steps"] = p.num_inference_steps
        return cls(**kw)


@dataclass
class RowPlan:
    """One sequence to sample: fixed positions, surface words of the fixed ones, seed."""

    fixed: list[bool]
    ids: list[int]
    word_only: list[bool]
    surface: list[str | None]  # the request's own word at fixed positions
    first: int  # first position after the prompt: the sample's text starts here
    seed: int


def plan_row(vocab: Vocab, seq_len: int, prompt: str, p: DiffusionLMParams, seed: int) -> RowPlan:
    """The layout of one row: BOS, the prompt's words and infill's left context (fixed), the free
    gap (words only when its length is known), the right context (fixed), EOS then PADs (fixed,
    when the length is known). ValueError naming `length` / `infill` when it does not fit."""
    left = words(prompt)
    right: list[str] = []
    if p.infill is not None:
        left += words(p.infill[0])
        right = words(p.infill[1])
    context = len(left) + len(right)
    length = p.length
    if p.infill is not None and length is None:
        length = context + DEFAULT_INFILL_WORDS
    if length is not None:
        if length <= context:
            raise ValueError(
                f"length {length} leaves no word to generate after the {context} words of "
                "prompt and infill context"
            )
        if length + 2 > seq_len:
            raise ValueError(
                f"length must be ≤ {seq_len - 2} for this model (BOS + words + EOS in "
                f"{seq_len} positions), got {length}"
            )
    elif context + 2 > seq_len:
        raise ValueError(f"the prompt has {context} words, the model at most {seq_len - 2}")
    fixed, ids, word_only, surface = [True], [BOS], [False], [None]
    for w in left:
        fixed.append(True), ids.append(vocab.index.get(w, UNK)), word_only.append(False)
        surface.append(w)
    gap = (length - context) if length is not None else seq_len - 1 - len(left)
    for _ in range(gap):
        fixed.append(False), ids.append(PAD), word_only.append(length is not None)
        surface.append(None)
    for w in right:
        fixed.append(True), ids.append(vocab.index.get(w, UNK)), word_only.append(False)
        surface.append(w)
    if length is not None:
        tail = seq_len - len(fixed)
        fixed += [True] * tail
        ids += [EOS] + [PAD] * (tail - 1)
        word_only += [False] * tail
        surface += [None] * tail
    assert len(fixed) == seq_len, (len(fixed), seq_len)
    return RowPlan(fixed, ids, word_only, surface, 1 + len(words(prompt)), seed)


def _ngrams(ws: list[str], n: int) -> Counter:
    return Counter(tuple(ws[k : k + n]) for k in range(len(ws) - n + 1))


def overlap(a: str, b: str, max_n: int = 3) -> float:
    """How much of `a`'s word n-grams (n = 1..max_n) `b` shares: the mean over n of
    log((matches + 1) / (a's n-grams + 1)), ≤ 0 (a smoothed BLEU-style precision)."""
    wa, wb = words(a), words(b)
    total = 0.0
    for n in range(1, max_n + 1):
        na, nb = _ngrams(wa, n), _ngrams(wb, n)
        total += math.log((sum((na & nb).values()) + 1) / (sum(na.values()) + 1))
    return total / max_n


def mbr_index(texts: list[str]) -> int:
    """Minimum Bayes risk selection (Li et al. 2022): the index of the text with the highest
    summed `overlap` with the others (the first on ties)."""
    scores = [
        sum(overlap(t, u) for k, u in enumerate(texts) if k != j) for j, t in enumerate(texts)
    ]
    return max(range(len(texts)), key=scores.__getitem__)


class DiffusionLM(Method):
    """Diffusion-LM (Li et al. 2022) as a method: it has no decoder to condition, so it generates
    whole sequences itself (`generate`); `condition` refuses (use `DiffusionLMEngine`)."""

    name = "diffusion-lm"

    def __init__(
        self,
        net: DiffusionLMNetwork,
        vocab: Vocab,
        classifiers: dict[str, LatentClassifier] | None = None,
        defaults: dict | None = None,
        scorer: str = DEFAULT_SCORER,
    ) -> None:
        self.net, self.vocab = net.eval().requires_grad_(False), vocab
        self.classifiers = {
            k: v.eval().requires_grad_(False) for k, v in (classifiers or {}).items()
        }
        self.defaults = dict(defaults or {})
        self.rounder = Rounder(net.table())
        self.device = net.embed.weight.device
        self.scorer = scorer  # the causal LM of select="lm" (a decoder name or path)
        self._scorer = None  # (decoder, tokenizer), loaded on first use

    def to_params(self, p: GenerationParams | DiffusionLMParams) -> DiffusionLMParams:
        if isinstance(p, DiffusionLMParams):
            return p
        if isinstance(p, GenerationParams):
            return DiffusionLMParams.from_generation_params(p, **self.defaults)
        raise ValueError(f"params must be GenerationParams or DiffusionLMParams, got {p!r}")

    def validate(self, params: list) -> None:
        for p in params:
            p = self.to_params(p)
            for c in p.controls:
                self.label_index(c)

    def label_index(self, c: Control) -> int:
        if c.probe not in self.classifiers:
            raise ValueError(
                f"controls: no classifier {c.probe!r} in the bundle (has {sorted(self.classifiers)})"
            )
        labels = self.classifiers[c.probe].config.labels
        if isinstance(c.target, int) and not isinstance(c.target, bool):
            if not 0 <= c.target < len(labels):
                raise ValueError(
                    f"controls: {c.probe} target must be in [0, {len(labels)}), got {c.target}"
                )
            return c.target
        if c.target not in labels:
            raise ValueError(
                f"controls: {c.probe} target must be one of {labels}, got {c.target!r}"
            )
        return labels.index(c.target)

    def condition(self, batch: MethodBatch) -> Conditioning:
        raise ValueError(
            "Diffusion-LM has no decoder to condition: generate with DiffusionLMEngine"
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: list[str],
        params: GenerationParams | DiffusionLMParams | list,
    ) -> list[RequestOutput]:
        """One output per prompt, `num_samples` samples each. Requests in one call are sampled
        together only when they share sampler, steps and clamp (else group by group); each row
        draws its noise from its own seed (request seed + sample index)."""
        if not isinstance(prompts, list) or not prompts:
            raise ValueError('prompts must be a non-empty list of strings ("" for no prompt)')
        if not isinstance(params, list):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"params: {len(params)} for {len(prompts)} prompts")
        for i, pr in enumerate(prompts):
            if not isinstance(pr, str):
                raise ValueError(f"prompts[{i}] must be a string, got {pr!r}")
        ps = [self.to_params(p) for p in params]
        self.validate(ps)
        L = self.net.config.seq_len
        plans, owners = [], []  # owners[r] = (request, sample) of row r
        for i, (pr, p) in enumerate(zip(prompts, ps, strict=True)):
            base = p.seed if p.seed is not None else int(torch.randint(0, 2**62, ()).item())
            for j in range(p.num_samples):
                for c in range(p.candidates):
                    seed = base + j + c * CANDIDATE_SEED_STRIDE
                    plans.append(plan_row(self.vocab, L, pr, p, seed))
                    owners.append((i, j))
        outs = [RequestOutput(prompt=pr, samples=[]) for pr in prompts]
        groups: dict[tuple, list[int]] = {}
        for r, (i, _) in enumerate(owners):
            p = ps[i]
            groups.setdefault((p.sampler, p.num_inference_steps, p.clamp), []).append(r)
        samples: dict[int, Sample] = {}
        row_ids: dict[int, list[int]] = {}
        t0 = time.perf_counter()
        for (sampler, steps, clamp), rows in groups.items():
            ids = self._sample_rows(
                [plans[r] for r in rows], [ps[owners[r][0]] for r in rows], sampler, steps, clamp
            )
            for r, ids_r in zip(rows, ids.tolist(), strict=True):
                samples[r], row_ids[r] = self._sample(plans[r], ids_r), ids_r
        elapsed = time.perf_counter() - t0
        candidates: dict[tuple[int, int], list[int]] = {}
        for r, owner in enumerate(owners):
            candidates.setdefault(owner, []).append(r)
        t1 = time.perf_counter()
        chosen = self._select(prompts, ps, candidates, samples, plans, row_ids)
        selected = time.perf_counter() - t1
        for (i, _), sample in chosen.items():  # dicts keep insertion order: request, then sample
            outs[i].samples.append(sample)
        for i, o in enumerate(outs):
            o.timings = {"diffusion": elapsed}
            if ps[i].candidates > 1:
                o.timings["select"] = selected
        return outs

    def _select(
        self, prompts, ps, candidates: dict, samples: dict, plans: list, row_ids: dict
    ) -> dict[tuple[int, int], Sample]:
        """The sample of each (request, sample): its only candidate, the best by its request's
        `select` (ties: the first candidate), or the best path through the candidates' lattice."""
        chosen, by_lm = {}, []
        for owner, rows in candidates.items():
            p = ps[owner[0]]
            if len(rows) == 1:
                chosen[owner] = samples[rows[0]]
            elif p.select == "mbr":
                texts = [samples[r].text for r in rows]
                chosen[owner] = samples[rows[mbr_index(texts)]]
            elif p.select == "lattice":
                plan = plans[rows[0]]  # the candidates share the layout (only seeds differ)
                ids = self.lattice_ids(prompts[owner[0]], plan, [row_ids[r] for r in rows], p)
                chosen[owner] = self._sample(plan, ids)
            else:
                by_lm.append(owner)
        if by_lm:
            rows = [r for o in by_lm for r in candidates[o]]
            nll = self.lm_nll(
                [prompts[o[0]] for o in by_lm for _ in candidates[o]],
                [samples[r].text for r in rows],
            )
            k = 0
            for o in by_lm:
                n = len(candidates[o])
                part = nll[k : k + n]
                chosen[o] = samples[candidates[o][min(range(n), key=part.__getitem__)]]
                k += n
        return {o: chosen[o] for o in candidates}

    def scorer_lm(self):
        """(decoder, tokenizer) of the scorer LM (`self.scorer`), loaded on first use with the
        engine's default weights: int8 on CPU (where the kernel is built), as the decoder runs."""
        if self._scorer is None:
            from dglm.engine.models import load_decoder
            from dglm.engine.models.quant import resolve_quantize

            q = resolve_quantize("auto", self.device, torch.float32)
            self._scorer = load_decoder(self.scorer, device=self.device, quantize=q)
        return self._scorer

    def lattice_ids(
        self, prompt: str, plan: RowPlan, rows: list[list[int]], p: DiffusionLMParams
    ) -> list[int]:
        """The row's ids with every free position taken from the best path through the
        candidates' word lattice (`select="lattice"`, lattice.py); fixed positions unchanged."""
        dec, tok = self.scorer_lm()
        end = next(
            (q for q in range(plan.first, len(plan.ids)) if plan.fixed[q] and plan.ids[q] == EOS),
            len(plan.ids),
        )
        slots = slots_from_candidates(
            plan.fixed, plan.surface, plan.ids, rows, self.vocab.tokens, plan.first, end
        )
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        prompt_words = words(prompt)
        prefix = [start] + tok.encode(prompt, add_special_tokens=False)
        pieces: dict[tuple[str | None, str], list[int]] = {}

        def tokens_of(prev: str | None, word: str) -> list[int]:
            key = (prev, word)
            if key not in pieces:
                if prev is None:
                    text = word
                else:
                    head = detokenize([prev])
                    full = detokenize([prev, word])
                    text = full[len(head) :] if full.startswith(head) else " " + word
                pieces[key] = tok.encode(text, add_special_tokens=False)
            return pieces[key]

        first_prev = prompt_words[-1] if prompt_words else None
        path, _ = beam_search(
            dec, prefix, slots, lambda prev, w: tokens_of(prev or first_prev, w),
            p.lattice_beam, p.lattice_weight,
        )  # fmt: skip
        ids = list(plan.ids)
        for q, w in zip(range(plan.first, end), path, strict=True):
            ids[q] = w
        return ids

    def lm_nll(self, prompts: list[str], texts: list[str]) -> list[float]:
        """Per-token NLL of each text after its prompt under the scorer LM (select="lm"); inf for
        an empty text. The scorer (`self.scorer`, a decoder name or path) loads on first use."""
        from dglm.engine.evaluation.perplexity import continuation_nll

        dec, tok = self.scorer_lm()
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        keep = [k for k, t in enumerate(texts) if t.strip()]
        out = [math.inf] * len(texts)
        if not keep:
            return out
        prefix = [[start] + tok.encode(prompts[k], add_special_tokens=False) for k in keep]
        cont = [tok.encode(texts[k], add_special_tokens=False) for k in keep]
        nll, counts = continuation_nll(dec, prefix, cont, 16)
        for k, v, n in zip(keep, nll.tolist(), counts.tolist(), strict=True):
            out[k] = v / n if n else math.inf
        return out

    def _sample_rows(self, plans, ps, sampler: str, steps: int, clamp: bool) -> torch.Tensor:
        dev, L, d = self.device, self.net.config.seq_len, self.net.config.emb_dim
        layout = Layout(
            fixed=torch.tensor([p.fixed for p in plans], device=dev),
            ids=torch.tensor([p.ids for p in plans], device=dev),
            word_only=torch.tensor([p.word_only for p in plans], device=dev),
        )
        gens = [torch.Generator(device="cpu").manual_seed(p.seed) for p in plans]

        def noise(_: int) -> torch.Tensor:  # (B, L, d), row b from its own generator
            return torch.stack([torch.randn(L, d, generator=g) for g in gens]).to(dev)

        hook = self._guidance(ps)
        ids, _ = sample_sequence(
            self.net,
            noise(0),
            noise,
            self.net.schedule,
            sampler,
            steps,
            layout,
            self.rounder,
            clamp,
            hook,
        )
        return ids

    def _guidance(self, ps: list[DiffusionLMParams]) -> ClassifierGuidance | None:
        names = sorted({c.probe for p in ps for c in p.controls})
        if not names:
            return None
        b, dev = len(ps), self.device
        terms = []
        for name in names:
            target = torch.zeros(b, dtype=torch.long)
            scale = torch.zeros(b)
            for r, p in enumerate(ps):
                for c in p.controls:
                    if c.probe == name:
                        target[r] = self.label_index(c)
                        scale[r] += 1.0 if c.scale is None else c.scale
            terms.append(ClassifierTerm(self.classifiers[name], target.to(dev), scale.to(dev)))
        has = [bool(p.controls) for p in ps]
        return ClassifierGuidance(
            terms,
            torch.tensor([p.fluency for p in ps], device=dev),
            torch.tensor(
                [p.guidance_steps if h else 0 for p, h in zip(ps, has, strict=True)], device=dev
            ),
            torch.tensor([p.guidance_step_size for p in ps], device=dev),
        )

    def _sample(self, plan: RowPlan, ids: list[int]) -> Sample:
        toks, out_ids, finish = [], [], "length"
        for pos in range(plan.first, len(ids)):
            if ids[pos] in (EOS, PAD):
                finish = "stop"
                break
            out_ids.append(ids[pos])
            if plan.fixed[pos]:  # the request's own word, even where the vocabulary has UNK
                toks.append(plan.surface[pos])
            elif ids[pos] >= FIRST_WORD:  # a free position's BOS/UNK is not text
                toks.append(self.vocab.tokens[ids[pos]])
        text = detokenize(toks)
        if text and plan.first > 1:
            text = " " + text
        return Sample(text=text, token_ids=out_ids, finish_reason=finish, latent=None)


class DiffusionLMEngine:
    """A Diffusion-LM bundle behind the engine's request/response types:

    engine = DiffusionLMEngine.from_pretrained("runs/dlm/bundle")
    outs = engine.generate(["", "the movie"], DiffusionLMParams(length=12, seed=0))
    """

    def __init__(self, method: DiffusionLM) -> None:
        self.method = method

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str = "cpu", scorer: str = DEFAULT_SCORER
    ) -> DiffusionLMEngine:
        """`scorer`: the causal LM that select="lm" ranks candidates by (loaded on first use)."""
        net, vocab, classifiers, sampling = load_bundle(path)
        net.to(device)
        for c in classifiers.values():
            c.to(device)
        return cls(DiffusionLM(net, vocab, classifiers, sampling, scorer))

    @property
    def vocab(self) -> Vocab:
        return self.method.vocab

    def default_params(self, **overrides) -> DiffusionLMParams:
        """The bundle's sampling defaults (config.json "sampling"), with `overrides`."""
        return DiffusionLMParams(**{**self.method.defaults, **overrides})

    def info(self) -> dict:
        """What `dglm info` prints for a Diffusion-LM bundle: the denoiser's shape and size, the
        longest request it takes, its classifiers and the bundle's sampling defaults."""
        m = self.method
        count = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731
        return {
            "method": "diffusion-lm",
            "device": str(m.device),
            "model": {**m.net.config.to_dict(), "parameters": count(m.net)},
            "max_words": m.net.config.seq_len - 2,  # BOS and EOS take two positions
            "classifiers": {
                name: {
                    "labels": list(c.config.labels),
                    "dim": c.config.dim,
                    "depth": c.config.depth,
                    "parameters": count(c),
                }
                for name, c in m.classifiers.items()
            },
            "sampling": {k: v for k, v in asdict(self.default_params()).items() if k != "controls"},
            "scorer": m.scorer,
        }

    def generate(
        self,
        prompts: list[str] | str,
        params: GenerationParams | DiffusionLMParams | list | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str):
            prompts = [prompts]
        if params is None:
            params = self.default_params()
        return self.method.generate(prompts, params)


__all__ = [
    "DEFAULT_INFILL_WORDS",
    "SELECTS",
    "INFILL_MARK",
    "SAMPLING_KEYS",
    "DiffusionLM",
    "DiffusionLMEngine",
    "DiffusionLMParams",
    "RowPlan",
    "plan_row",
]
