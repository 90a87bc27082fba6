"""What `dglm eval` runs: its configuration and presets, and the list of settings (plain decoding,
unguided DGLM, probe-guided DGLM over guidance scales, a re-noising sweep, the FUDGE baseline with
the same probe, RE-Control, CAA with the bundle's steering vector) made from it and a bundle's
probes."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from dglm.engine.api import DEFAULT_TEMPERATURE, DEFAULT_TOP_P, MAX_RE_CONTROL_STEP
from dglm.engine.bundle import BundleConfig
from dglm.engine.evaluation.prefixes import DEFAULT_SOURCES, PREFIX_SPLITS
from dglm.engine.probes import Control, Probe, with_implied

RENOISE_SWEEP = (1.0, 0.95, 0.9, 0.5, 0.0)  # the reference's Table 2 sweep of alpha²
# the guidance scale of a control given without one when a bundle sets none; a bundle's own
# (BundleConfig.control_scale) is what `dglm eval` judges as "the default"
DEFAULT_SCALE = BundleConfig.control_scale
# labels a toxicity probe may give its non-toxic class; else a binary probe's y=0 label
_LOW_TOXICITY_LABELS = ("non_toxic", "non-toxic", "nontoxic", "clean", "safe", "low", "neutral")


# the fields that choose settings: a test run takes them from the "test" preset (the bundle's
# defaults), never from the command line, so nothing can be tuned on test
SWEEPS = (  # those that hold a sequence
    "prefixes",
    "guidance_scales",
    "renoise_alpha2s",
    "fudge_strengths",
    "re_control_step_sizes",
    "re_control_plausibilities",
    "re_control_scales",
    "caa_layer_sets",
    "caa_multipliers",
)
SWEEP_FIELDS = (*SWEEPS, "seed", "no_repeat_ngram_size", "caa_vector")


@dataclass(frozen=True)
class EvalConfig:
    # "dev" (every choice is made here) or "test" (run once per shipped bundle, what the README
    # quotes): disjoint held-out prefix splits, see evaluation.prefixes
    split: str = "dev"
    num_prefixes: int = 64  # held-out prefixes
    num_samples: int = 2  # continuations per prefix and setting
    max_new_tokens: int = 20  # the reference's length for guided tasks
    min_prefix_tokens: int = 16  # prefixes are 16-32 decoder tokens of a held-out text
    max_prefix_tokens: int = 32
    sources: tuple[str, ...] = DEFAULT_SOURCES  # offline sources of held-out texts
    prefixes: tuple[str, ...] = ()  # explicit prefixes instead of held-out texts (tests)
    # DGLM probe sweep; run_eval adds the bundle's control_scale when it is missing
    guidance_scales: tuple[float, ...] = (10.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
    renoise_alpha2s: tuple[float, ...] = RENOISE_SWEEP  # proposal-fidelity sweep (unguided)
    fudge_top_k: int = 50  # FUDGE candidates per step
    fudge_strengths: tuple[float, ...] = (1.0, 3.0)  # FUDGE λ on log p(target | text)
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P  # nucleus sampling for every method
    # every method's (plain decoding's too) n-gram ban; None: the bundle's no_repeat_ngram_size
    no_repeat_ngram_size: int | None = None
    batch_size: int = 16  # prompts per generation call (every method alike)
    seed: int = 0
    gemma: bool = False  # also judge fluency under Gemma-3-270M (the presets do; needs the extra)
    # RE-Control rows (alone on the released decoder, and with DGLM at the default scale) for every
    # probe the bundle has a value network for, at the value network's default steps / step size
    re_control: bool = True
    # extra DGLM + RE-Control rows at these step sizes α (the value network's n): a sweep of the
    # combined control's edit strength next to its default (ValueNetConfig.step_size_with_dglm)
    re_control_step_sizes: tuple[float, ...] = ()
    # extra rows at these plausibility masks β around the edit (RE-Control alone, and DGLM +
    # RE-Control at the default and every extra step size): see methods.re_control.PlausibleEdit
    re_control_plausibilities: tuple[float, ...] = ()
    # extra DGLM + RE-Control rows with DGLM at these guidance scales (the value network's α and β
    # for a combined control): the composition across guidance strengths, each compared in a paired
    # test with DGLM alone at the same scale when `guidance_scales` holds it
    re_control_scales: tuple[float, ...] = ()
    # CAA rows (plain decoding of the released decoder with a steering vector, methods.caa) for
    # every probe with a steering vector, at the vector's default blocks and multiplier
    caa: bool = True
    # dev sweep: CAA rows at each of these block sets × multipliers instead (empty: the vector's)
    caa_layer_sets: tuple[tuple[int, ...], ...] = ()
    caa_multipliers: tuple[float, ...] = ()
    # a `dglm train steering-vector` file to use instead of the bundle's vectors (dev: choosing
    # the defaults of a vector before it goes into the bundle)
    caa_vector: str | None = None
    # run only the settings whose names contain one of these strings (empty: all)
    only: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.split not in PREFIX_SPLITS:
            raise ValueError(f"split must be one of {PREFIX_SPLITS}, got {self.split!r}")
        for name in ("num_prefixes", "num_samples", "max_new_tokens", "fudge_top_k", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer ≥ 1, got {v!r}")
        if self.num_samples >= 1000:
            raise ValueError(f"num_samples must be < 1000, got {self.num_samples}")
        if not 1 <= self.min_prefix_tokens <= self.max_prefix_tokens:
            raise ValueError(
                f"need 1 ≤ min_prefix_tokens ≤ max_prefix_tokens, got {self.min_prefix_tokens}, "
                f"{self.max_prefix_tokens}"
            )
        for name in ("sources", "only", *SWEEPS):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if any(not isinstance(p, str) or not p.strip() for p in self.prefixes):
            raise ValueError("prefixes must be non-empty strings")
        for name in ("guidance_scales", "re_control_scales"):
            if any(not (math.isfinite(s) and s > 0) for s in getattr(self, name)):
                raise ValueError(f"{name} must be finite and > 0, got {getattr(self, name)}")
        if any(not 0.0 <= a <= 1.0 for a in self.renoise_alpha2s):
            raise ValueError(f"renoise_alpha2s must lie in [0, 1], got {self.renoise_alpha2s}")
        if any(not (math.isfinite(a) and 0 < a <= MAX_RE_CONTROL_STEP)
               for a in self.re_control_step_sizes):  # fmt: skip
            raise ValueError(
                f"re_control_step_sizes must be finite and in (0, {MAX_RE_CONTROL_STEP:g}], got "
                f"{self.re_control_step_sizes}"
            )
        if any(not (isinstance(b, int | float) and 0 <= b < 1)
               for b in self.re_control_plausibilities):  # fmt: skip
            raise ValueError(
                f"re_control_plausibilities must be numbers in [0, 1), got "
                f"{self.re_control_plausibilities}"
            )
        sets = tuple(tuple(int(x) for x in s) for s in self.caa_layer_sets)
        if any(not s or min(s) < 0 for s in sets):
            raise ValueError(f"caa_layer_sets must hold non-empty sets of blocks ≥ 0, got {sets}")
        object.__setattr__(self, "caa_layer_sets", sets)
        if any(not math.isfinite(m) for m in self.caa_multipliers):
            raise ValueError(f"caa_multipliers must be finite, got {self.caa_multipliers}")
        if any(not isinstance(o, str) or not o for o in self.only):
            raise ValueError(f"only must hold non-empty strings, got {self.only}")
        if any(not (math.isfinite(s) and s >= 0) for s in self.fudge_strengths):
            raise ValueError(f"fudge_strengths must be finite and ≥ 0, got {self.fudge_strengths}")
        n = self.no_repeat_ngram_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
            raise ValueError(f"no_repeat_ngram_size must be an integer ≥ 0 or None, got {n!r}")
        if not 0 < self.top_p <= 1 or not self.temperature >= 0:
            raise ValueError(
                f"need 0 < top_p ≤ 1 and temperature ≥ 0, got {self.top_p}, {self.temperature}"
            )


PRESETS = {
    # dev: 200 prefixes × 2 samples, 400 continuations per cell
    "full": EvalConfig(num_prefixes=200, num_samples=2, gemma=True),
    # < 20 minutes on CPU for MiniLM + SmolLM2-135M at one torch thread. From the 16-prefix run
    # (245 s; ≈ 0.62 s per DGLM or plain continuation, 2.2-3.0 s per FUDGE one at top-k 20, batches
    # of 16) and Gemma scoring (≈ 0.25 s per continuation): 17 runs (plain, unguided, 4 scales × 3
    # controls, α² = 0, 2 FUDGE) of 32 continuations ≈ 32 × (15 × 0.62 + 2 × 2.6) ≈ 465 s of
    # generation, ≈ 190 s of scoring, ≈ 75 s of loading (+ 75 s the first time Gemma is
    # dequantised): about 12-14 minutes.
    "quick": EvalConfig(
        num_prefixes=32,
        num_samples=1,
        guidance_scales=(DEFAULT_SCALE, 300.0, 1000.0, 3000.0),
        renoise_alpha2s=(0.95, 0.0),
        fudge_top_k=20,
        fudge_strengths=(1.0,),
        gemma=True,
    ),
    # the run the README quotes: test prefixes, n = 400 per cell, the bundle's defaults only
    # (run_eval adds its control_scale), plain decoding with and without DGLM's truncation; no
    # sweep, no FUDGE row until a λ is chosen on dev
    "test": EvalConfig(
        split="test",
        num_prefixes=200,
        num_samples=2,
        guidance_scales=(),
        renoise_alpha2s=(),
        fudge_strengths=(),
        gemma=True,
    ),
}


def check_test_config(config: EvalConfig) -> None:
    """ValueError unless a test-split config chooses its settings exactly as the "test" preset
    does (every field of SWEEP_FIELDS), so nothing can be tuned on test."""
    if config.split != "test":
        return
    preset = PRESETS["test"]
    changed = [f for f in SWEEP_FIELDS if getattr(config, f) != getattr(preset, f)]
    if changed:
        raise ValueError(
            f"split 'test' runs the bundle's defaults only; {', '.join(changed)} choose settings "
            "and are for the dev split (`dglm eval --split dev`)"
        )


@dataclass(frozen=True)
class Setting:
    name: str  # unique, e.g. "dglm sentiment=positive:20"
    # "decoder" (plain decoding) | "dglm" | "fudge" | "re-control" (alone) | "dglm+re-control"
    # | "caa" (alone: plain decoding with a steering vector)
    method: str
    # "unguided" | "sentiment" | "toxicity" | "fidelity" | "composition" (controls of two probes,
    # each through its own method: `composition_settings`)
    group: str
    controls: tuple[Control, ...] = ()
    renoise_alpha2: float | None = None  # dglm only
    probe: str | None = None
    target: str | None = None
    scale: float | None = None  # DGLM guidance scale, or FUDGE λ
    re_control_step_size: float | None = None  # dglm+re-control: α (None: the value network's)
    re_control_plausibility: float | None = None  # β of the edit's mask (None: the network's)
    # plain decoding only: keep tokens with p ≥ min_p · max p (DGLM's plausibility mask)
    min_p: float | None = None
    caa_layers: tuple[int, ...] | None = None  # caa: the blocks (None: the vector's default)
    caa_multiplier: float | None = None  # caa: m (None: the vector's default)
    # the controls the bundle implies for `controls` go along (BundleConfig.implied_controls), as
    # in every request that does not turn them off; False: exactly `controls`
    implied_controls: bool = True

    def effective_controls(self, implied: dict[str, tuple[str, ...]]) -> tuple[Control, ...]:
        """What the setting's requests steer with, given the bundle's implied_controls."""
        return with_implied(self.controls, implied) if self.implied_controls else self.controls


def without_implied(settings: list[Setting], implied: dict[str, tuple[str, ...]]) -> list[Setting]:
    """A twin with implied_controls off, named "<name> without implied", of each setting the
    bundle's implied controls change: what they buy, measured on the same prefixes and seeds."""
    return [
        replace(s, name=f"{s.name} without implied", implied_controls=False)
        for s in settings
        if s.effective_controls(implied) != s.controls
    ]


def low_toxicity_target(probe: Probe) -> str:
    """The label of a toxicity probe that means "not toxic"."""
    for label in probe.labels:
        if label.lower() in _LOW_TOXICITY_LABELS:
            return label
    if probe.rows == 1:
        return probe.labels[0]  # binary probes label y=1 as the property (toxic)
    raise ValueError(
        f"toxicity probe labels {list(probe.labels)} name no non-toxic class; "
        f"use one of {list(_LOW_TOXICITY_LABELS)}"
    )


def re_control_settings(
    probe: str,
    target: str,
    group: str,
    default_scale: float,
    default_alpha2: float,
    step_sizes: tuple[float, ...] = (),
    plausibilities: tuple[float, ...] = (),
    scales: tuple[float, ...] = (),
) -> list[Setting]:
    """RE-Control alone and DGLM + RE-Control (the control acting both ways, DGLM at the bundle's
    default scale) for one probe target; the latter again at each of `step_sizes`, and both
    again at each plausibility β of `plausibilities`, at the default and every step size; and
    DGLM + RE-Control again with DGLM at each other guidance scale of `scales`."""
    both = (Control(probe, target, default_scale, method="both"),)
    alone = (Control(probe, target, method="re-control"),)
    name = f"dglm+re-control {probe}={target}:{default_scale:g}"

    def combined(a: float | None, b: float | None) -> Setting:
        suffix = ("" if a is None else f" α={a:g}") + ("" if b is None else f" β={b:g}")
        return Setting(
            name + suffix, "dglm+re-control", group, both, default_alpha2, probe, target,
            default_scale, None if a is None else float(a), None if b is None else float(b),
        )  # fmt: skip

    def by_itself(a: float | None, b: float) -> Setting:
        suffix = ("" if a is None else f" α={a:g}") + f" β={b:g}"
        return Setting(
            f"re-control {probe}={target}{suffix}", "re-control", group, alone, None, probe,
            target, None, None if a is None else float(a), float(b),
        )  # fmt: skip

    extra = [combined(a, None) for a in step_sizes]
    for s in dict.fromkeys(scales):
        if s != default_scale:
            name_s = f"dglm+re-control {probe}={target}:{s:g}"
            both_s = (Control(probe, target, s, method="both"),)
            extra.append(Setting(name_s, "dglm+re-control", group, both_s, default_alpha2,
                                 probe, target, float(s)))  # fmt: skip
    for b in plausibilities:
        extra += [by_itself(a, b) for a in (None, *step_sizes)]
        extra += [combined(a, b) for a in (None, *step_sizes)]
    return [
        Setting(
            f"re-control {probe}={target}",
            "re-control",
            group,
            (Control(probe, target, method="re-control"),),
            None,
            probe,
            target,
        ),
        Setting(
            f"dglm+re-control {probe}={target}:{default_scale:g}",
            "dglm+re-control",
            group,
            (Control(probe, target, default_scale, method="both"),),
            default_alpha2,
            probe,
            target,
            default_scale,
        ),
        *extra,
    ]


def composition_settings(
    probes: dict[str, Probe],
    value_nets: tuple[str, ...],
    default_scale: float,
    default_alpha2: float,
) -> list[Setting]:
    """Two controls in one request, each through its own method: DGLM steers sentiment negative
    (its default scale) while RE-Control's toxicity value network holds the continuation to the
    probe's non-toxic label. Negative steering is where DGLM alone raises the toxic share (the
    default bundle: 11% vs plain decoding's 1%), so this is where the second control has work.
    Needs a sentiment probe with a "negative" label, a toxicity probe and its value network."""
    sentiment, toxicity = probes.get("sentiment"), probes.get("toxicity")
    if sentiment is None or toxicity is None or "toxicity" not in value_nets:
        return []
    if "negative" not in sentiment.labels:
        return []
    low = low_toxicity_target(toxicity)
    controls = (
        Control("sentiment", "negative", default_scale),
        Control("toxicity", low, method="re-control"),
    )
    name = f"dglm sentiment=negative:{default_scale:g} + re-control toxicity={low}"
    return [
        Setting(
            name,
            "dglm+re-control",
            "composition",
            controls,
            default_alpha2,
            "sentiment",
            "negative",
            default_scale,
        )
    ]


def build_settings(
    config: EvalConfig,
    probes: dict[str, Probe],
    default_alpha2: float,
    value_nets: tuple[str, ...] = (),
    default_scale: float = DEFAULT_SCALE,
    plausibility: float = 0.0,
    implied: dict[str, tuple[str, ...]] | None = None,
    steering_vectors: tuple[str, ...] = (),
):
    """(settings to run, skipped [{setting, reason}]); value_nets: the probes with a RE-Control
    value network; plausibility: the bundle's prompt-guidance mask α (> 0 adds plain decoding
    with the same truncation, "decoder min-p α"); implied: the bundle's implied_controls (each
    sentiment row at the default scale that they change gets a twin without them)."""
    settings = [
        Setting("decoder", "decoder", "unguided"),
        Setting("dglm unguided", "dglm", "unguided", renoise_alpha2=default_alpha2),
    ]
    if plausibility:  # plain decoding with the truncation DGLM's prompt guidance decodes with
        settings.insert(
            1, Setting(f"decoder min-p {plausibility:g}", "decoder", "unguided", min_p=plausibility)
        )
    skipped = []
    if "sentiment" in probes:
        for target in ("positive", "negative"):
            if target not in probes["sentiment"].labels:
                skipped.append(
                    {"setting": f"sentiment={target}", "reason": "not a sentiment probe label"}
                )
                continue
            for s in config.guidance_scales:
                settings.append(
                    Setting(
                        f"dglm sentiment={target}:{s:g}",
                        "dglm",
                        "sentiment",
                        (Control("sentiment", target, s),),
                        default_alpha2,
                        "sentiment",
                        target,
                        s,
                    )
                )
            if config.re_control and "sentiment" in value_nets:
                settings += re_control_settings(
                    "sentiment", target, "sentiment", default_scale, default_alpha2,
                    config.re_control_step_sizes, config.re_control_plausibilities,
                    config.re_control_scales,
                )  # fmt: skip
            for lam in config.fudge_strengths:
                settings.append(
                    Setting(
                        f"fudge sentiment={target} λ={lam:g}",
                        "fudge",
                        "sentiment",
                        probe="sentiment",
                        target=target,
                        scale=lam,
                    )
                )
    else:
        skipped.append({"setting": "sentiment", "reason": "the bundle has no 'sentiment' probe"})
    if "toxicity" in probes:
        low = low_toxicity_target(probes["toxicity"])
        for s in config.guidance_scales:
            settings.append(
                Setting(
                    f"dglm toxicity={low}:{s:g}",
                    "dglm",
                    "toxicity",
                    (Control("toxicity", low, s),),
                    default_alpha2,
                    "toxicity",
                    low,
                    s,
                )
            )
        if config.re_control and "toxicity" in value_nets:
            settings += re_control_settings(
                "toxicity", low, "toxicity", default_scale, default_alpha2,
                config.re_control_step_sizes, config.re_control_plausibilities,
            )  # fmt: skip
    else:
        skipped.append({"setting": "toxicity=low", "reason": "the bundle has no 'toxicity' probe"})
    if config.re_control:
        settings += composition_settings(probes, value_nets, default_scale, default_alpha2)
    if config.caa and "sentiment" in steering_vectors and "sentiment" in probes:
        labels = probes["sentiment"].labels
        settings += caa_settings(config, [t for t in ("positive", "negative") if t in labels])
    if implied:  # (CAA at the vector's defaults too, not its dev sweep)
        at_default = [
            s for s in settings
            if s.group == "sentiment" and s.method != "fudge" and s.scale in (None, default_scale)
            and (s.caa_layers, s.caa_multiplier) == (None, None)
        ]  # fmt: skip
        settings += without_implied(at_default, implied)
    for a2 in config.renoise_alpha2s:
        settings.append(
            Setting(f"dglm unguided α²={a2:g}", "dglm", "fidelity", renoise_alpha2=float(a2))
        )
    if config.only:
        settings = [s for s in settings if any(o in s.name for o in config.only)]
    return settings, skipped


def caa_settings(config: EvalConfig, targets: list[str]) -> list[Setting]:
    """CAA on the sentiment targets: at the steering vector's default blocks and multiplier, or
    (dev) at every block set × multiplier of the config's sweep."""
    sets = config.caa_layer_sets or (None,)
    mults = config.caa_multipliers or (None,)
    out = []
    for target in targets:
        control = (Control("sentiment", target, method="caa"),)
        for layers in sets:
            for m in mults:
                suffix = ("" if layers is None else " L=" + "+".join(map(str, layers))) + (
                    "" if m is None else f" m={m:g}"
                )
                out.append(Setting(
                    f"caa sentiment={target}{suffix}", "caa", "sentiment", control,
                    probe="sentiment", target=target, caa_layers=layers,
                    caa_multiplier=None if m is None else float(m),
                ))  # fmt: skip
    return out


def target_rate(setting: Setting, m: dict) -> float | None:
    """The share of a setting's continuations that meet its target by the independent judge
    (VADER for sentiment, alt-profanity-check for toxicity); None for an unsteered setting."""
    if setting.group in ("sentiment", "composition"):  # a composition: its sentiment target
        return m["vader_" + setting.target]
    if setting.group == "toxicity":
        return 1.0 - m["toxicity_frac"]
    return None
