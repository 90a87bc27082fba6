"""Diffusion-LM (Li et al. 2022, "Diffusion-LM Improves Controllable Text Generation") as a
method of the engine: continuous diffusion over a sequence of learned word embeddings, rounded
to words, controlled on the latent sequence.

Pieces (one module each): `vocab` (the word-level vocabulary, and why word-level), `model` (the
x0-prediction denoiser with its embeddings; the noise-aware attribute classifier; presets),
`sampling` (the reverse diffusion on the shared sqrt schedule with clamping, fixed positions and
classifier guidance), `bundle` (the standalone bundle format), `method` (requests, the `DiffusionLM`
method, `DiffusionLMEngine`). Training: dglm.engine.training.diffusion_lm. Rounding:
dglm.kernels.nearest_embedding.

Train (resumable; log.jsonl holds the held-out loss, rounding error and token errors; the EMA
weights land in RUN/bundle):

    dglm --threads 1 train diffusion-lm sources:rotten_tomatoes,headlines,fortunes \
        --out runs/dlm --preset cpu
    dglm train diffusion-lm data/pairs --out runs/dlm --preset cpu   # a `dglm data pairs` dir
    dglm train diffusion-lm sentences.txt --out runs/dlm --preset tiny  # one sentence per line
    dglm train diffusion-lm-classifier sentiment --bundle runs/dlm/bundle --out runs/dlm-sent

Distilled data (sequence-level knowledge distillation, Kim & Rush 2016: a model that predicts
every position at once averages the many modes of real text into function words; the decoder's
own lower-temperature sentences are nearer one mode each):

    dglm --threads 1 data distill --sources amazon_reviews --out runs/kd/part0.txt --part 0/2 &
    dglm --threads 1 data distill --sources amazon_reviews --out runs/kd/part1.txt --part 1/2
    dglm --threads 1 train diffusion-lm runs/kd/part0.txt+runs/kd/part1.txt --out runs/dlm-kd \
        --preset cpu-short-ce

DATA "sources:..." reads the offline sources directly (whole sentences; pairs cut long documents
mid-sentence). The classifier command trains on the denoiser's frozen embedding space
("sentiment": Rotten Tomatoes fresh/rotten, "seed-sentiment": the package's 60-line seed set,
"topic": fortunes by category, or a JSONL file of {"text", "label"}) and adds the classifier to
the bundle.

Presets (model.DIFFUSION_LM_PRESETS):
- "tiny": tests (seconds).
- "cpu": 5,000 words, d = 16, a 4 × 128 transformer, length 24 (≤ 22 words), 1.2M parameters.
  Corpus: sources:rotten_tomatoes,headlines,fortunes, the sentences with ≤ 1 unknown word:
  21,310 train / 1,030 held out of 51,468. Measured on one thread of this 2-core machine under
  a load of ~3: 0.31 s per step of batch 64 in fp32 (3.2 steps/s); bf16 autocast 0.50 s (no
  AMX here, so `--dtype auto` keeps fp32). The CLI default, 24,000 steps (~70 epochs), is
  ~2 hours (the paper trains far longer, on 50k-100k sentences). No CPU run so far has reached
  fluent text (README, Diffusion-LM: exact structure, word-salad content).
- "cpu-wide" / "cpu-wide-sc": d = 32, a 4 × 256 transformer (~3.4M parameters); "-sc" adds
  self-conditioning and word embeddings at norm √d.
- "cpu-wide-ce": "cpu-wide-sc" with the score-interpolation head (model module doc: word scores
  trained by cross-entropy, x̂0 their mean embedding); "cpu-short-ce": the same for sentences of
  ≤ 14 words over 2,000 words (sources:amazon_reviews); "cpu-long-ce": the same at 32 positions
  (≤ 30 words). What each run measured: README.
- "reference": the paper's ROCStories shape (12 × 768, d = 128, 11k words, length 64).

Sampling cost of the "cpu" shape, batch 1, one thread, same load (untrained weights: the cost
does not depend on them): DDIM 20 steps 0.07 s, with a 2 × 128 classifier's guidance (3 Adagrad
steps per step) 0.37 s; DDPM 200 steps 0.87 s, guided 3.5 s.

Generate:

    from dglm.engine.methods.diffusion_lm import Control, DiffusionLMEngine, DiffusionLMParams

    engine = DiffusionLMEngine.from_pretrained("runs/dlm/bundle")
    outs = engine.generate(
        ["", "the movie"],                       # a prompt is fixed left context ("" : none)
        DiffusionLMParams(length=12, seed=0),    # exactly 12 words, then EOS
    )
    engine.generate("", DiffusionLMParams(infill="the food ___ . we left early .", length=10))
    engine.generate("", DiffusionLMParams(controls=(Control("sentiment", "positive"),)))
    engine.generate("", DiffusionLMParams(sampler="ddpm", num_inference_steps=200))  # reference
    engine.generate("", DiffusionLMParams(length=10, candidates=16, select="lm"))  # best of 16

Selection (`candidates` > 1): each sample is the best of that many sampled candidates (candidate
c of sample j draws from seed + j + c·2²⁰). select="mbr" is the paper's minimum Bayes risk (the
candidate sharing most word n-grams with the others); select="lm" ranks by per-token perplexity
under a causal LM, the engine's decoder SmolLM2 by default (`DiffusionLMEngine.from_pretrained(...,
scorer=...)`), loaded on first use (int8 weights on CPU, as the engine decodes). The benchmark's
fluency judge (Gemma-3) is another model. select="lattice" (a known length: `length` or `infill`)
does not pick one candidate: the candidates' words at each free position form a lattice, and a
beam search under the same LM (`lattice_beam` hypotheses, scored Σ log p_LM + `lattice_weight` ·
Σ log of the word's share of the candidates at its position) keeps the best sentence through it
(lattice.py). Every word still comes from a candidate at that position; fixed words stay.

CLI (a bundle whose config.json declares "method": "diffusion-lm" is dispatched to this engine;
--control, --seed, -n, --steps and --sampler apply, the decoder's flags are ignored):

    dglm generate "" "the movie" --bundle runs/dlm/bundle --length 12 --seed 0
    dglm generate "" --bundle runs/dlm/bundle --infill "the food ___ . we left early ." --length 10
    dglm generate "" --bundle runs/dlm/bundle --control sentiment=positive --sampler ddpm --steps 200
    dglm generate "" --bundle runs/dlm/bundle --length 10 --candidates 16 --select lm

Outputs are the engine's `RequestOutput` / `Sample` (text after the prompt, word ids, "stop" when
an EOS ended it); `GenerationParams` are accepted too (controls, num_samples, seed, sampler,
num_inference_steps). Same seed → same output; each sample of a request uses seed + its index.

Control mechanisms:
- length n: positions 0 (BOS), n + 1 (EOS) and after (PAD) are fixed like infilling's context,
  and the n free positions round among words only (never PAD/EOS/BOS/UNK), so every sample has
  exactly n words.
- infilling: left and right context are fixed positions; at every step a fixed position's latent
  is reset to its clean embedding noised to that step's level, α_s·E[w] + σ_s·ξ, and x̂0 takes
  E[w] there; fixed tokens are output as given (they can never change).
- attributes: after each denoising step, `guidance_steps` Adagrad steps (size
  `guidance_step_size`) on z_s of the classifiers' cross-entropy (× each control's scale) plus
  the fluency term fluency·‖z_s − μ‖²/σ (the paper's λ). All three compose.
Bad values raise ValueError naming the field (length, infill, controls, sampler, ...).
"""

from dglm.engine.methods.diffusion_lm.method import (
    DiffusionLM,
    DiffusionLMEngine,
    DiffusionLMParams,
)
from dglm.engine.methods.diffusion_lm.model import (
    DIFFUSION_LM_PRESETS,
    DiffusionLMConfig,
    DiffusionLMNetwork,
    LatentClassifier,
    LatentClassifierConfig,
)
from dglm.engine.probes import Control

__all__ = [
    "DIFFUSION_LM_PRESETS",
    "Control",
    "DiffusionLM",
    "DiffusionLMConfig",
    "DiffusionLMEngine",
    "DiffusionLMNetwork",
    "DiffusionLMParams",
    "LatentClassifier",
    "LatentClassifierConfig",
]
