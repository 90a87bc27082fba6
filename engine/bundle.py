"""Bundle directories: config.json + safetensors, never pickle.

    <bundle>/config.json                 BundleConfig (below), with the encoder/decoder references
    <bundle>/score_network.safetensors   ScoreNetwork state dict
    <bundle>/prompt_generator.safetensors
    <bundle>/probes.safetensors          all probes, labels and metrics in the header metadata
                                         (required, possibly with no probes)
    <bundle>/student.safetensors         optional: the distilled few-step student (`dglm train
                                         distill`), used by the "consistency" sampler
    <bundle>/decoder_lora.safetensors    optional: low-rank adapters for the decoder (`dglm train
                                         steering`), merged into its weights at load
    <bundle>/value_networks.safetensors  optional: RE-Control's value networks, one per probe
                                         (`dglm train value`, `dglm bundle add-value-network`)
    <bundle>/steering_vectors.safetensors optional: CAA's steering vectors, one per probe (`dglm
                                         train steering-vector`, `dglm bundle add-steering-vector`)

Encoder and decoder are references (a name or a path; relative paths resolve against the bundle).
"""

from __future__ import annotations

import json
import logging
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import TypeVar

import torch
from dglm.engine.api import MAX_CFG_SCALE, MAX_NO_REPEAT_NGRAM, finite_in, int_in
from dglm.engine.decoding.guidance import DEFAULT_PLAUSIBILITY, check_prompt_guidance
from dglm.engine.diffusion.sampler import SamplerConfig
from dglm.engine.diffusion.score_network import ScoreNetConfig
from dglm.engine.methods.caa import (
    SteeringVector,
    SteeringVectorConfig,
    load_steering_vectors,
)
from dglm.engine.methods.re_control import ValueNetConfig, ValueNetwork
from dglm.engine.models import load_decoder
from dglm.engine.models.lora import LoraConfig, merge_lora
from dglm.engine.models.quant import quantize_decoder
from dglm.engine.probes import Probe, check_control_scale, check_implied_controls, load_probes
from dglm.engine.prompt.generator import PromptGeneratorConfig
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

FORMAT = "dglm-bundle"
VERSION = 1
SCORE_NET_FILE = "score_network.safetensors"
PROMPT_GEN_FILE = "prompt_generator.safetensors"
PROBES_FILE = "probes.safetensors"
STUDENT_FILE = "student.safetensors"
LORA_FILE = "decoder_lora.safetensors"
VALUE_NETS_FILE = "value_networks.safetensors"  # RE-Control: "<probe>.<param>" per network
STEERING_VECTORS_FILE = "steering_vectors.safetensors"  # CAA: a (labels, L, H) tensor per probe
BUNDLES_DIR = Path(__file__).resolve().parent / "bundles"
T = TypeVar("T")


# the fields holding a config of their own (a JSON object in config.json); those that may be null
NESTED: dict[str, type] = {
    "score_network": ScoreNetConfig,
    "prompt_generator": PromptGeneratorConfig,
    "sampler": SamplerConfig,
    "student": ScoreNetConfig,
    "decoder_lora": LoraConfig,
}
OPTIONAL = ("student", "decoder_lora")


def nested_config(name: str, cls: type[T], value: object) -> T:
    """`value` as a `cls`: itself, or built from its dict form; ValueError naming the field
    `name` (e.g. "sampler: var_lambda must be ...") for a bad or unknown key."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object of {cls.__name__} fields, got {value!r}")
    names = {f.name for f in fields(cls)}
    if unknown := sorted(set(value) - names):
        raise ValueError(f"{name}: unknown keys {unknown} (known: {sorted(names)})")
    required = {
        f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
    }
    if missing := sorted(required - set(value)):
        raise ValueError(f"{name}: missing keys {missing}")
    try:
        return cls(**value)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None


@dataclass(frozen=True)
class BundleConfig:
    encoder: str  # sentence-transformers name or path (relative: to the bundle directory)
    decoder: str  # "smollm2", a Hugging Face name, or a path
    score_network: ScoreNetConfig
    prompt_generator: PromptGeneratorConfig
    sampler: SamplerConfig = field(default_factory=SamplerConfig)  # the bundle's default sampler
    cfg_scale: float = 1.0  # default classifier-free guidance weight w (1 = conditional only)
    trained: bool = True  # False for bundles made with untrained (random) networks
    notes: str = ""  # free text: how the bundle was made
    # The distilled student (a guidance-embedding ScoreNetwork), None when the bundle has none, and
    # the range of guidance weights w it was distilled for.
    student: ScoreNetConfig | None = None
    student_cfg_range: tuple[float, float] = (1.0, 1.0)
    # Low-rank adapters trained with the prompt generator (decoder_lora.safetensors), merged into
    # the decoder's weights at load; None: the decoder is used as released.
    decoder_lora: LoraConfig | None = None
    # guidance scale of a control given without one (Control.scale None): set per bundle, as the
    # scale at which its networks were measured to steer (`dglm eval`); in (0, MAX_CONTROL_SCALE]
    control_scale: float = 10.0
    # prompt guidance (dglm.engine.decoding.guidance) of a request given without one, and the
    # plausibility floor α of its token mask; 1.0: off (bundles from before it existed)
    prompt_guidance: float = 1.0
    prompt_plausibility: float = DEFAULT_PLAUSIBILITY
    # a request's no_repeat_ngram_size when it gives none (decoding.sampling.NoRepeatNGram: no
    # token may repeat an n-gram of the continuation); 0: off (bundles from before it existed)
    no_repeat_ngram_size: int = 0
    # RE-Control's value networks (value_networks.safetensors), one per probe they predict
    value_networks: tuple[ValueNetConfig, ...] = ()
    # CAA's steering vectors (steering_vectors.safetensors), one per probe they steer toward; each
    # config holds its default blocks and multiplier
    steering_vectors: tuple[SteeringVectorConfig, ...] = ()
    # controls a request gets with a control of one probe=target, unless it controls their probe
    # itself or sets GenerationParams.implied_controls=False (probes.with_implied), e.g.
    # {"sentiment=negative": ["toxicity=low@re-control"]}: negative opinion without abuse
    implied_controls: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        """Every field checked by type and range (config.json is edited by hand), naming it."""
        for name in ("encoder", "decoder"):
            ref = getattr(self, name)
            if not isinstance(ref, str) or not ref.strip():
                raise ValueError(f"{name} must be a model name or a path, got {ref!r}")
        for name, cls in NESTED.items():
            if getattr(self, name) is not None or name not in OPTIONAL:
                object.__setattr__(self, name, nested_config(name, cls, getattr(self, name)))
        nets = self.value_networks
        if isinstance(nets, str | dict) or not isinstance(nets, list | tuple):
            raise ValueError(f"value_networks must be a list of value networks, got {nets!r}")
        nets = tuple(
            nested_config(f"value_networks[{i}]", ValueNetConfig, v) for i, v in enumerate(nets)
        )
        object.__setattr__(self, "value_networks", nets)
        one_per_probe("value_networks", [v.probe for v in nets], "network")
        vecs = self.steering_vectors
        if isinstance(vecs, str | dict) or not isinstance(vecs, list | tuple):
            raise ValueError(f"steering_vectors must be a list of steering vectors, got {vecs!r}")
        vecs = tuple(
            nested_config(f"steering_vectors[{i}]", SteeringVectorConfig, v)
            for i, v in enumerate(vecs)
        )
        object.__setattr__(self, "steering_vectors", vecs)
        one_per_probe("steering_vectors", [v.probe for v in vecs], "vector")
        finite_in("cfg_scale", self.cfg_scale, -MAX_CFG_SCALE, MAX_CFG_SCALE)
        if not isinstance(self.trained, bool):
            raise ValueError(f"trained must be true or false, got {self.trained!r}")
        if not isinstance(self.notes, str):
            raise ValueError(f"notes must be a string, got {self.notes!r}")
        pair = self.student_cfg_range
        if isinstance(pair, str) or not isinstance(pair, list | tuple) or len(pair) != 2:
            raise ValueError(f"student_cfg_range must be [lo, hi], got {pair!r}")
        for x in pair:
            finite_in("student_cfg_range", x, -MAX_CFG_SCALE, MAX_CFG_SCALE)
        object.__setattr__(self, "student_cfg_range", tuple(pair))
        check_control_scale(self.control_scale, "control_scale", positive=True)
        check_prompt_guidance(self.prompt_guidance, self.prompt_plausibility)
        int_in("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, MAX_NO_REPEAT_NGRAM)
        object.__setattr__(self, "implied_controls", check_implied_controls(self.implied_controls))
        lo, hi = self.student_cfg_range
        if not lo <= hi:
            raise ValueError(f"student_cfg_range must be (lo, hi) with lo ≤ hi, got {(lo, hi)}")
        if self.student is not None:
            if not self.student.guidance_embedding:
                raise ValueError("the student network must have guidance_embedding=True")
            if self.student.latent_dim != self.score_network.latent_dim:
                raise ValueError(
                    f"student latent_dim {self.student.latent_dim} differs from the score "
                    f"network's {self.score_network.latent_dim}"
                )
        if self.sampler.sampler == "consistency" and self.student is None:
            raise ValueError(
                "the default sampler is 'consistency' but the bundle has no student; "
                "run `dglm train distill` and `dglm bundle add-student`"
            )
        if self.sampler.sampler == "consistency" and not lo <= self.cfg_scale <= hi:
            raise ValueError(
                f"cfg_scale {self.cfg_scale} is outside student_cfg_range [{lo}, {hi}], the "
                "guidance weights the default sampler's student was distilled for"
            )
        if self.score_network.latent_dim != self.prompt_generator.latent_dim:
            raise ValueError(
                "score_network.latent_dim and prompt_generator.latent_dim differ: "
                f"{self.score_network.latent_dim} vs {self.prompt_generator.latent_dim}"
            )

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> BundleConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a bundle config is a JSON object, got {type(data).__name__}")
        data = dict(data)
        if (fmt := data.pop("format", None)) != FORMAT:
            raise ValueError(f"format must be {FORMAT!r}, got {fmt!r}: not a {FORMAT} config.json")
        version = data.pop("version", None)
        if type(version) is not int or version != VERSION:
            raise ValueError(
                f"bundle format version {version} is not supported (expected {VERSION})"
            )
        names = {f.name for f in fields(cls)}
        required = {
            f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING
        }
        if missing := sorted(required - set(data)):
            raise ValueError(f"missing keys {missing}")
        if unknown := sorted(set(data) - names):
            raise ValueError(f"unknown keys {unknown}")
        return cls(**data)  # nested configs from their dicts in __post_init__


def one_per_probe(field_name: str, probes: list[str], what: str) -> None:
    """ValueError naming the entry of `field_name` whose probe an earlier entry has already."""
    for i, probe in enumerate(probes):
        if (first := probes.index(probe)) < i:
            raise ValueError(
                f"{field_name}[{i}]: probe {probe!r} already has a {what} "
                f"({field_name}[{first}]): one {what} per probe"
            )


def resolve_bundle_dir(name_or_path: str | Path) -> Path:
    """A bundle directory, or the name of one shipped with the package (e.g. "default")."""
    path = Path(name_or_path)
    if (path / "config.json").is_file():
        return path
    shipped = BUNDLES_DIR / str(name_or_path)
    if (shipped / "config.json").is_file():
        return shipped
    available = (
        sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "config.json").is_file())
        if BUNDLES_DIR.is_dir()
        else []
    )
    raise ValueError(
        f"no bundle at {str(name_or_path)!r}: expected a directory with config.json, or one of the "
        f"shipped bundles {available}"
    )


def resolve_reference(ref: str, bundle_dir: Path) -> str:
    """A relative path in config.json points inside the bundle; names pass through."""
    candidate = bundle_dir / ref
    if not Path(ref).is_absolute() and candidate.exists():
        return str(candidate)
    return ref


def read_config(bundle_dir: Path) -> BundleConfig:
    """The bundle's config.json; ValueError naming the file if it is missing, not JSON, or not a
    valid BundleConfig (a missing or unknown key, a bad value)."""
    path = bundle_dir / "config.json"
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    try:
        return BundleConfig.from_dict(data)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a bundle file; ValueError naming it if it is missing or not safetensors
    (e.g. truncated)."""
    if not path.is_file():
        raise ValueError(f"{path} is missing: the bundle is incomplete")
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from e


def load_value_networks(config: BundleConfig, bundle_dir: Path) -> dict[str, ValueNetwork]:
    """The bundle's RE-Control value networks by probe (fp32), {} when it has none."""
    if not config.value_networks:
        return {}
    path = bundle_dir / VALUE_NETS_FILE
    state = read_safetensors(path)
    nets = {}
    for vc in config.value_networks:
        net = ValueNetwork(vc)
        prefix = vc.probe + "."
        own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        ref = net.state_dict()
        if set(own) != set(ref) or any(own[k].shape != ref[k].shape for k in ref):
            raise ValueError(
                f"{path}: the weights of value network {vc.probe!r} do not match its config "
                f"(hidden_dim={vc.hidden_dim}, depth={vc.depth})"
            )
        net.load_state_dict({k: v.float() for k, v in own.items()})
        nets[vc.probe] = net.eval()
    return nets


def load_bundle_steering_vectors(
    config: BundleConfig, bundle_dir: Path
) -> dict[str, SteeringVector]:
    """The bundle's CAA steering vectors by probe (fp32), {} when it has none; each with its
    config from config.json (its default blocks and multiplier), its tensor from the file."""
    if not config.steering_vectors:
        return {}
    path = bundle_dir / STEERING_VECTORS_FILE
    if not path.is_file():
        raise ValueError(f"{path} is missing: config.json names steering vectors")
    stored = load_steering_vectors(path)
    out = {}
    for vc in config.steering_vectors:
        if vc.probe not in stored:
            raise ValueError(f"{path} holds no steering vector for probe {vc.probe!r}")
        try:
            out[vc.probe] = SteeringVector(vc, stored[vc.probe].vectors)
        except ValueError as e:
            raise ValueError(f"{path}: {e} (config.json's steering_vectors entry)") from None
    return out


def save_value_networks(nets: dict[str, ValueNetwork], path: Path) -> None:
    state = {
        f"{name}.{k}": v.detach().to("cpu", torch.float32).contiguous()
        for name, net in nets.items()
        for k, v in net.state_dict().items()
    }
    save_file(state, str(path))


def load_bundle_probes(bundle_dir: Path) -> list[Probe]:
    """The bundle's probes. probes.safetensors is required: every bundle writer saves it, with no
    probes if need be, so a missing one means an incomplete copy, not a bundle without probes."""
    path = bundle_dir / PROBES_FILE
    if not path.is_file():
        raise ValueError(
            f"{path} is missing: the bundle is incomplete (a bundle without probes still has "
            "one; write it with dglm.engine.probes.save_probes(path, []))"
        )
    return load_probes(path)


def save_state(module: torch.nn.Module, path: Path, dtype: torch.dtype = torch.float16) -> None:
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in module.state_dict().items()}
    save_file(state, str(path))


def load_state(module: torch.nn.Module, path: Path) -> None:
    state = read_safetensors(path)
    ref = module.state_dict()
    missing, unexpected = set(ref) - set(state), set(state) - set(ref)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not match the config (missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]})"
        )
    for k, v in state.items():
        if v.shape != ref[k].shape:
            raise ValueError(
                f"{path}: {k} has shape {tuple(v.shape)}, config expects {tuple(ref[k].shape)}"
            )
    module.load_state_dict({k: v.to(ref[k].dtype) for k, v in state.items()})


def load_bundle_decoder(
    config: BundleConfig,
    bundle_dir: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    quantize: str = "none",
):
    """(decoder, tokenizer) as the bundle uses it: the referenced decoder with the bundle's
    adapters merged into its weights (in fp32, then cast to `dtype`, or quantized: `quantize`,
    see models.quant)."""
    ref = resolve_reference(config.decoder, bundle_dir)
    if config.decoder_lora is None:
        return load_decoder(ref, device=device, dtype=dtype, quantize=quantize)
    path = bundle_dir / LORA_FILE
    if not path.is_file():
        raise ValueError(f"config.json names decoder adapters but {path.name} is missing")
    decoder, tokenizer = load_decoder(ref, device=device, dtype=torch.float32)
    merge_lora(decoder, config.decoder_lora, read_safetensors(path))
    if dtype != torch.float32:
        decoder.to(dtype)
        decoder.reset_buffers(device)  # RoPE tables from fp32, as load_decoder makes them
    logger.info("merged %s into the decoder (rank %d)", path.name, config.decoder_lora.rank)
    return quantize_decoder(decoder, quantize), tokenizer


def save_lora(state: dict[str, torch.Tensor], path: Path) -> None:
    """Adapter weights in fp16 (A and B are small; the merge runs in fp32)."""
    save_file(
        {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state.items()}, str(path)
    )


def write_config(config: BundleConfig, bundle_dir: Path) -> None:
    bundle_dir.mkdir(parents=True, exist_ok=True)
    with open(bundle_dir / "config.json", "w") as f:
        json.dump(config.to_dict(), f, indent=2)
        f.write("\n")
