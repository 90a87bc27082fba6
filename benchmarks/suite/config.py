"""What the suite runs: presets, the prompt list, the methods, and where a slow baseline is skipped."""

from __future__ import annotations

from dataclasses import dataclass, replace

# Every method sees the same prompts: repeat r of a batch of B uses PROMPTS[(r·B + b) % 32].
PROMPTS = (
    "The movie was",
    "I went to the new restaurant downtown and",
    "The weather this weekend",
    "My neighbour's dog",
    "The meeting with the board of directors",
    "After reading the first chapter of the book, I",
    "The new phone arrived yesterday and",
    "Our trip to the mountains",
    "The concert last night",
    "When I opened the letter from the bank,",
    "The hotel room was",
    "Customer service at this company",
    "The city council voted on the new park plan, and",
    "Honestly, the second season of the show",
    "The food at this place",
    "My first day at the new job",
    "The train was late again, so",
    "The professor's lecture on climate change",
    "This laptop's battery",
    "The kids spent the afternoon",
    "The election results",
    "I tried the recipe my grandmother sent me, and",
    "The museum's new exhibition",
    "Traffic on the highway this morning",
    "The sequel to my favourite game",
    "Our team's performance this season",
    "The doctor told me that",
    "The old house at the end of the street",
    "The price of the tickets",
    "Reading the reviews before buying the camera, I",
    "The wedding was",
    "The software update",
)

# method → family; the order is the table's and the plots'
METHODS = {
    "hf_generate": "hf_generate",  # HF `generate` of the same decoder, no control
    "engine": "engine",  # the engine, uncontrolled
    "engine_1probe": "engine",  # sentiment=positive
    "engine_2probes": "engine",  # sentiment=positive + toxicity=<non-toxic>
    "reference_dglm": "reference_dglm",  # 250 fp32 DDPM steps, exact guidance, eager HF decoding
    "fudge": "fudge",  # token-level top-k reranking with the sentiment probe
    "re_control": "re_control",  # RE-Control alone: value-network edits of the hidden states
    "engine_re_control": "engine",  # DGLM + RE-Control, the sentiment control acting both ways
    "llama_cpp": "llama_cpp",  # llama.cpp on the same GGUF, no control (CPU; optional package)
}
SENTIMENT_TARGET = ("sentiment", "positive")  # the one-probe control of every controlled method


@dataclass(frozen=True)
class SuiteConfig:
    suite: str = "cpu"  # "cpu" | "gpu": device, dtype and the engine's fast paths
    quick: bool = False  # the short preset; results are written as suite_quick.*
    lengths: tuple[int, ...] = (16, 32, 64, 128)  # new tokens per row
    batches: tuple[int, ...] = (1, 8, 32)  # rows per call
    repeats: tuple[int, int] = (3, 2)  # timed repeats at batch 1, and at larger batches
    warmup: bool = True  # one untimed call per method and batch before its timed repeats
    methods: tuple[str, ...] = tuple(METHODS)  # which methods run
    # (method, max batch, max batch × length): beyond either the method is skipped (time)
    limits: tuple[tuple[str, int, int], ...] = ()
    temperature: float = 1.0  # sampling, the same for every method
    top_p: float = 0.95
    # guidance scale of each engine / reference-style control; None: the bundle's control_scale
    control_scale: float | None = None
    reference_steps: int = 250  # reference-style DGLM: DDPM steps with `exact` guidance
    fudge_top_k: int = 50  # FUDGE candidates scored per step
    fudge_strength: float = 1.0  # FUDGE λ on log p(target | text)
    seed: int = 0  # row b of repeat r uses seed + 1000·r + b

    def __post_init__(self) -> None:
        if self.suite not in ("cpu", "gpu"):
            raise ValueError(f"suite must be 'cpu' or 'gpu', got {self.suite!r}")
        for name in ("lengths", "batches", "methods", "limits"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        for name in ("lengths", "batches"):
            v = getattr(self, name)
            if not v or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                raise ValueError(f"{name} must be positive integers, got {v!r}")
        if len(self.repeats) != 2 or any(r < 1 for r in self.repeats):
            raise ValueError(f"repeats must be two integers ≥ 1, got {self.repeats!r}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"methods {unknown} unknown; choose from {list(METHODS)}")
        if not self.methods:
            raise ValueError("methods is empty: name at least one")
        if not 0 < self.top_p <= 1 or not self.temperature > 0:
            raise ValueError(
                f"need 0 < top_p ≤ 1 and temperature > 0, got {self.top_p}, {self.temperature}"
            )
        if self.reference_steps < 1 or self.fudge_top_k < 1:
            raise ValueError(
                f"reference_steps and fudge_top_k must be ≥ 1, got {self.reference_steps}, "
                f"{self.fudge_top_k}"
            )

    def repeats_for(self, batch: int) -> int:
        return self.repeats[0] if batch == 1 else self.repeats[1]

    def skip_reason(self, method: str, batch: int, length: int) -> str | None:
        """Why `method` does not run at (batch, length) under this preset, or None."""
        for name, max_batch, max_work in self.limits:
            if name != method:
                continue
            if batch > max_batch:
                return (
                    f"batch {batch} > {max_batch} for {method} on the {self.preset} preset (time)"
                )
            if batch * length > max_work:
                return (
                    f"batch × length = {batch * length} > {max_work} for {method} on the "
                    f"{self.preset} preset (time)"
                )
        return None

    @property
    def preset(self) -> str:
        return self.suite + ("-quick" if self.quick else "")

    @property
    def output_name(self) -> str:
        return "suite_quick" if self.quick else "suite"


# 2 shared CPU cores, one torch thread: --quick about 6 minutes; the full preset about 45 minutes
# with the slow baselines capped (reference-style DGLM up to batch 8 × 64 tokens, FUDGE up to
# batch 8 × 16 tokens, llama.cpp up to batch 8; each at batch 1 for every length).
PRESETS = {
    "cpu": SuiteConfig(
        # llama.cpp decodes prompts one at a time: batch 32 would add ~15 minutes and says nothing
        limits=(("reference_dglm", 8, 512), ("fudge", 8, 128), ("llama_cpp", 8, 1024)),
    ),
    "cpu-quick": SuiteConfig(
        quick=True,
        lengths=(16, 32),
        batches=(1, 8),
        limits=(("reference_dglm", 1, 1024), ("fudge", 1, 256)),
    ),
    "gpu": SuiteConfig(suite="gpu", repeats=(10, 5), limits=(("fudge", 32, 1024),)),
    "gpu-quick": SuiteConfig(
        suite="gpu", quick=True, lengths=(16, 32), batches=(1, 8), repeats=(5, 3)
    ),
}


def preset(suite: str, quick: bool, **overrides) -> SuiteConfig:
    """The named preset with the non-None `overrides` applied."""
    base = PRESETS[suite + ("-quick" if quick else "")]
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})
