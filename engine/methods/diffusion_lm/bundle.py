"""The Diffusion-LM bundle: a directory of its own, declaring its method.

config.json              {"format": "dglm-diffusion-lm", "version": 1, "method": "diffusion-lm",
                          "model": DiffusionLMConfig, "classifiers": [LatentClassifierConfig],
                          "sampling": {defaults of DiffusionLMParams' sampler fields}}
vocab.json               the word list (vocab.Vocab), ids in order
model.safetensors        the denoiser and its word embeddings (fp32)
classifiers.safetensors  attribute classifiers, "<name>.<param>" (absent without classifiers)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from dglm.engine.bundle import read_safetensors, resolve_bundle_dir
from dglm.engine.methods.diffusion_lm.model import (
    DiffusionLMConfig,
    DiffusionLMNetwork,
    LatentClassifier,
    LatentClassifierConfig,
)
from dglm.engine.methods.diffusion_lm.vocab import Vocab
from safetensors.torch import save_file

FORMAT = "dglm-diffusion-lm"
VERSION = 1
METHOD = "diffusion-lm"
MODEL_FILE = "model.safetensors"
CLASSIFIERS_FILE = "classifiers.safetensors"
VOCAB_FILE = "vocab.json"
SAMPLING_KEYS = (
    "sampler",
    "num_inference_steps",
    "fluency",
    "guidance_steps",
    "guidance_step_size",
    "candidates",
    "select",
    "lattice_beam",
    "lattice_weight",
)


def is_diffusion_lm_bundle(path: str | Path) -> bool:
    """Whether `path` (a directory or a shipped bundle's name) holds a config.json declaring
    method "diffusion-lm"."""
    try:
        data = json.loads((resolve_bundle_dir(path) / "config.json").read_text())
    except (OSError, ValueError):  # resolve_bundle_dir: ValueError when neither exists
        return False
    return isinstance(data, dict) and data.get("method") == METHOD


def _state(module: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {
        prefix + k: v.detach().to("cpu", torch.float32).contiguous()
        for k, v in module.state_dict().items()
    }


def save_bundle(
    out: str | Path,
    net: DiffusionLMNetwork,
    vocab: Vocab,
    classifiers: list[LatentClassifier] = (),
    sampling: dict | None = None,
) -> Path:
    """Write a bundle to `out` (created; files replaced) → out."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if len(vocab) != net.config.vocab_size:
        raise ValueError(f"vocab has {len(vocab)} tokens, the model {net.config.vocab_size}")
    names = [c.config.name for c in classifiers]
    if len(set(names)) != len(names):
        raise ValueError(f"classifier names must be distinct, got {names}")
    sampling = dict(sampling or {})
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"sampling: unknown keys {sorted(unknown)} (known: {SAMPLING_KEYS})")
    save_file(_state(net), str(out / MODEL_FILE))
    if classifiers:
        state = {}
        for c in classifiers:
            state.update(_state(c, c.config.name + "."))
        save_file(state, str(out / CLASSIFIERS_FILE))
    elif (out / CLASSIFIERS_FILE).exists():
        (out / CLASSIFIERS_FILE).unlink()
    vocab.save(out / VOCAB_FILE)
    config = {
        "format": FORMAT,
        "version": VERSION,
        "method": METHOD,
        "model": net.config.to_dict(),
        "classifiers": [c.config.to_dict() for c in classifiers],
        "sampling": sampling,
    }
    tmp = out / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(out / "config.json")
    return out


def _load_into(module: torch.nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    ref = module.state_dict()
    if set(state) != set(ref) or any(state[k].shape != ref[k].shape for k in ref):
        raise ValueError(f"{where}: the weights do not match the config")
    module.load_state_dict(state)


def load_bundle(
    path: str | Path,
) -> tuple[DiffusionLMNetwork, Vocab, dict[str, LatentClassifier], dict]:
    """(denoiser, vocab, classifiers by name, sampling defaults), fp32 CPU, eval mode; ValueError
    naming the file on a bad bundle. `path`: a directory or a shipped bundle's name."""
    path = resolve_bundle_dir(path)
    cfg_path = path / "config.json"
    try:
        data = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{cfg_path}: not a readable JSON file ({e})") from e
    if not isinstance(data, dict) or data.get("method") != METHOD:
        raise ValueError(f"{cfg_path}: not a Diffusion-LM bundle (method must be {METHOD!r})")
    if data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ValueError(f"{cfg_path}: expected format {FORMAT!r} version {VERSION}")
    try:
        config = DiffusionLMConfig.from_dict(data["model"])
        clf_configs = [LatentClassifierConfig.from_dict(c) for c in data.get("classifiers", [])]
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{cfg_path}: {e}") from e
    vocab = Vocab.load(path / VOCAB_FILE)
    if len(vocab) != config.vocab_size:
        raise ValueError(
            f"{path / VOCAB_FILE}: {len(vocab)} tokens, the model has {config.vocab_size}"
        )
    net = DiffusionLMNetwork(config)
    _load_into(net, read_safetensors(path / MODEL_FILE), str(path / MODEL_FILE))
    classifiers = {}
    if clf_configs:
        state = read_safetensors(path / CLASSIFIERS_FILE)
        for cc in clf_configs:
            clf = LatentClassifier(cc)
            prefix = cc.name + "."
            own = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            _load_into(clf, own, f"{path / CLASSIFIERS_FILE} ({cc.name})")
            classifiers[cc.name] = clf.eval()
    sampling = data.get("sampling", {})
    unknown = set(sampling) - set(SAMPLING_KEYS)
    if unknown:
        raise ValueError(f"{cfg_path}: sampling has unknown keys {sorted(unknown)}")
    return net.eval(), vocab, classifiers, sampling
