"""The request and response types of every method: GenerationParams in, RequestOutput out."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
from dglm.engine.decoding.guidance import check_prompt_guidance
from dglm.engine.diffusion.sampler import GUIDANCE_MODES, MAX_INFERENCE_STEPS, SamplerConfig
from dglm.engine.diffusion.schedule import SAMPLERS
from dglm.engine.probes import Control

# The sampling defaults of the Python API, the CLI (`dglm generate`) and the evaluation: nucleus
# 0.95, temperature 1, 32 new tokens. The server keeps OpenAI's (top_p 1, max_tokens 16: see
# serve.schema); the low-level DecodeParams / FudgeParams default to top_p 1 (off), as HF's
# GenerationConfig.
DEFAULT_TOP_P = 0.95
DEFAULT_TEMPERATURE = 1.0
DEFAULT_MAX_NEW_TOKENS = 32
# the smallest positive temperature: logits / T must stay finite in fp32 (T = 1e-40 is subnormal
# and turns every score into ±inf); below it sampling is argmax anyway, so ask for 0 (greedy)
MIN_TEMPERATURE = 1e-4
MAX_TEMPERATURE = 100.0
MAX_CFG_SCALE = 100.0  # |w| of classifier-free guidance, a request's or a bundle's
# RE-Control's decode-time edit (dglm.engine.methods.re_control)
MAX_RE_CONTROL_STEPS = 1000
MAX_RE_CONTROL_STEP = 1e4
MAX_NO_REPEAT_NGRAM = 64
# |m| of contrastive activation addition's multiplier (dglm.engine.methods.caa)
MAX_CAA_MULTIPLIER = 1e3


@dataclass(frozen=True)
class GenerationParams:
    controls: tuple[Control, ...] = ()  # probe guidance, composed by summed loss
    num_samples: int = 1  # continuations per prompt
    seed: int | None = None  # None: fresh randomness
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = (
        DEFAULT_TEMPERATURE  # 0 = greedy, else in [MIN_TEMPERATURE, MAX_TEMPERATURE]
    )
    top_p: float = DEFAULT_TOP_P
    top_k: int = 0  # 0 = off
    # no token may repeat an n-gram of the continuation (HF's no_repeat_ngram_size); 0 = off,
    # None: the bundle's default
    no_repeat_ngram_size: int | None = None
    stop: tuple[str, ...] = ()  # stop strings (cut from the text); one string: one stop string
    ignore_eos: bool = False  # never end at EOS: exactly max_new_tokens (benchmarks)
    cfg_scale: float | None = None  # classifier-free guidance weight; None: the bundle's
    num_inference_steps: int | None = None  # None: the bundle's sampler setting
    sampler: str | None = None  # "ddpm" | "ddim" | "dpmpp-2m" | "consistency"; None: the bundle's
    guidance_mode: str | None = None  # "fast" | "exact"; None: the bundle's
    renoise_alpha2: float | None = None  # None: the bundle's (0.95 in the reference)
    # classifier-free guidance of the decoder by the soft prompt (dglm.engine.decoding.guidance):
    # 1 = off, > 1 follows the plan more strongly; None: the bundle's
    prompt_guidance: float | None = None
    # RE-Control (controls with method "re-control" / "both"): gradient steps n on the hidden
    # state per decoding step and their size α; None: the probe's value network's defaults
    re_control_steps: int | None = None
    re_control_step_size: float | None = None
    # β of the plausibility mask around the edit, in [0, 1): the edited scores kept on tokens the
    # unedited state gives ≥ β × its top probability (0 = off); None: the value network's
    re_control_plausibility: float | None = None
    # CAA (controls with method "caa", or the CAA method): the multiplier m of each control's
    # steering vector (m · v added after its blocks; negative steers away); None: the vector's
    caa_multiplier: float | None = None
    # add the controls the bundle implies for this request's controls (BundleConfig.
    # implied_controls, e.g. toxicity=low with sentiment=negative); False: exactly `controls`
    implied_controls: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.controls, Control):
            object.__setattr__(self, "controls", (self.controls,))
        object.__setattr__(self, "controls", tuple(self.controls))
        if isinstance(self.stop, str):  # one stop string, not its characters
            object.__setattr__(self, "stop", (self.stop,))
        if not isinstance(self.stop, list | tuple):
            raise ValueError(f"stop must be a string or a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", tuple(self.stop))
        for c in self.controls:  # each Control checked its own scale
            if not isinstance(c, Control):
                raise ValueError(f"controls must be Control objects, got {c!r}")
        int_in("num_samples", self.num_samples, 1, 1024)
        int_in("max_new_tokens", self.max_new_tokens, 1, 1 << 20)
        if self.seed is not None:
            int_in("seed", self.seed, 0, 2**62)
        if isinstance(self.temperature, bool) or self.temperature != 0:  # 0: greedy
            finite_in("temperature", self.temperature, MIN_TEMPERATURE, MAX_TEMPERATURE, "0 or ")
        finite_in("top_p", self.top_p, 1e-6, 1.0)
        int_in("top_k", self.top_k, 0, 1 << 30)
        if self.no_repeat_ngram_size is not None:
            int_in("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, MAX_NO_REPEAT_NGRAM)
        for i, s in enumerate(self.stop):
            if not isinstance(s, str) or not s:
                raise ValueError(f"stop[{i}] must be a non-empty string, got {s!r}")
            if not is_utf8(s):
                raise ValueError(f"stop[{i}] is not valid UTF-8 text, got {s!r}")
        if not isinstance(self.implied_controls, bool):
            raise ValueError(
                f"implied_controls must be True or False, got {self.implied_controls!r}"
            )
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {self.ignore_eos!r}")
        if self.num_inference_steps is not None:  # the sampler's own range: SamplerConfig
            int_in("num_inference_steps", self.num_inference_steps, 1, MAX_INFERENCE_STEPS)
        if self.sampler is not None and (
            not isinstance(self.sampler, str) or self.sampler not in SAMPLERS
        ):
            raise ValueError(f"sampler must be one of {SAMPLERS} or None, got {self.sampler!r}")
        mode = self.guidance_mode
        if mode is not None and (not isinstance(mode, str) or mode not in GUIDANCE_MODES):
            raise ValueError(f"guidance_mode must be one of {GUIDANCE_MODES} or None, got {mode!r}")
        if self.renoise_alpha2 is not None:
            finite_in("renoise_alpha2", self.renoise_alpha2, 0.0, 1.0)
        if self.cfg_scale is not None:
            finite_in("cfg_scale", self.cfg_scale, -MAX_CFG_SCALE, MAX_CFG_SCALE)
        if self.prompt_guidance is not None:
            check_prompt_guidance(self.prompt_guidance)
        if self.re_control_steps is not None:
            int_in("re_control_steps", self.re_control_steps, 0, MAX_RE_CONTROL_STEPS)
        if self.re_control_step_size is not None:
            finite_in("re_control_step_size", self.re_control_step_size, 0.0, MAX_RE_CONTROL_STEP)
        if self.caa_multiplier is not None:
            m = MAX_CAA_MULTIPLIER
            finite_in("caa_multiplier", self.caa_multiplier, -m, m)
        if self.re_control_plausibility is not None:
            b = self.re_control_plausibility
            if isinstance(b, bool) or not isinstance(b, int | float) or not 0 <= b < 1:
                raise ValueError(f"re_control_plausibility must be a number in [0, 1), got {b!r}")

    def sampler_config(self, base: SamplerConfig) -> SamplerConfig:
        """The bundle's sampler `base` with this request's overrides; ValueError naming the
        setting the sampler refuses (e.g. more steps than the distilled student runs)."""
        overrides = {
            k: getattr(self, k)
            for k in ("num_inference_steps", "sampler", "guidance_mode", "renoise_alpha2")
            if getattr(self, k) is not None
        }
        try:
            return replace(base, **overrides) if overrides else base
        except ValueError as e:
            inherited = [
                f"{k}={getattr(base, k)!r}"
                for k in ("sampler", "num_inference_steps")
                if getattr(self, k) is None
            ]
            if not inherited:
                raise
            raise ValueError(f"{e} ({' and '.join(inherited)}: the bundle's default)") from None


def check_prompts(prompts: object) -> None:
    """ValueError naming the prompt unless `prompts` is a non-empty list of non-blank UTF-8
    strings: the request checks that need no model (run them before loading one)."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"prompts[{i}] is empty ({prompt!r}): every prompt needs some text")
        if not is_utf8(prompt):
            raise ValueError(
                f"prompts[{i}] is not valid UTF-8 text (an unpaired surrogate, e.g. from "
                f"invalid bytes on a command line): {prompt!r}"
            )


def int_in(name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer in [{lo}, {hi}], got {value!r}")


def finite_in(name: str, value: object, lo: float, hi: float, alternative: str = "") -> None:
    """ValueError naming `name` unless lo ≤ value ≤ hi; `alternative` ("0 or ") is said first."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or not lo <= value <= hi
    ):
        raise ValueError(
            f"{name} must be {alternative}a finite number in [{lo:g}, {hi:g}], got {value!r}"
        )


def is_utf8(text: str) -> bool:
    """False for text UTF-8 cannot encode: unpaired surrogates, e.g. from invalid UTF-8 bytes in a
    command line (Python decodes those as U+DC80..U+DCFF)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


@dataclass
class Sample:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" | "length"
    # (d,) the sampled continuation latent x̂0 (before re-noising), fp32 CPU; None for a method
    # without one (FUDGE)
    latent: torch.Tensor | None


@dataclass
class RequestOutput:
    prompt: str
    samples: list[Sample]
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, for the batch

    @property
    def text(self) -> str:
        return self.samples[0].text
