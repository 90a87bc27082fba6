"""Making bundles and probes from parts: networks from presets, probes from labelled text."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from dglm.engine import bundle as bundle_io
from dglm.engine.bundle import BundleConfig
from dglm.engine.diffusion.score_network import SCORE_NET_PRESETS, ScoreNetwork
from dglm.engine.encode.encoder import SentenceEncoder
from dglm.engine.models import load_decoder
from dglm.engine.probes import Probe, load_probes, save_probes, train_probe
from dglm.engine.prompt.generator import PROMPT_GENERATOR_PRESETS, PromptGenerator

logger = logging.getLogger(__name__)

SEED_SENTIMENT = Path(__file__).resolve().parent.parent / "assets" / "sentiment_seed.jsonl"


def read_labelled_jsonl(path: str | Path) -> tuple[list[str], list[str]]:
    """Lines of {"text": ..., "label": ...} → (texts, labels); errors name the line."""
    texts, labels = [], []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, label = row["text"], str(row["label"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(
                    f"{path}:{n}: expected a JSON object with 'text' and 'label' ({e})"
                ) from e
            if not isinstance(text, str) or not text.strip():
                raise ValueError(f"{path}:{n}: 'text' must be a non-empty string")
            texts.append(text)
            labels.append(label)
    if len(set(labels)) < 2:
        raise ValueError(
            f"{path}: a probe needs at least two distinct labels, found {sorted(set(labels))}"
        )
    return texts, labels


def probe_from_texts(
    name: str,
    encoder: SentenceEncoder,
    texts: list[str],
    labels: list[str],
    label_order: tuple[str, ...] | None = None,
    holdout: float = 0.2,
    seed: int = 0,
) -> Probe:
    """Train a logistic probe on the encoder's embeddings; records held-out accuracy.

    label_order fixes which label is y=1 for binary probes (the second one); default: sorted.
    """
    names = tuple(label_order) if label_order else tuple(sorted(set(labels)))
    missing = set(labels) - set(names)
    if missing:
        raise ValueError(f"labels {sorted(missing)} are not in label_order {list(names)}")
    y = torch.tensor([names.index(label) for label in labels])
    emb = encoder.embed(texts).cpu()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(texts), generator=g)
    n_test = int(round(len(texts) * holdout)) if len(texts) >= 10 else 0
    test, train = perm[:n_test], perm[n_test:]
    probe = train_probe(name, emb[train], y[train], names)
    metrics = {"train_size": len(train), "test_size": n_test}
    pred = torch.tensor([names.index(p) for p in probe.predict(emb)])
    metrics["train_accuracy"] = float((pred[train] == y[train]).float().mean())
    if n_test:
        metrics["test_accuracy"] = float((pred[test] == y[test]).float().mean())
    logger.info("probe %s: %s", name, metrics)
    return Probe(probe.name, probe.labels, probe.weight, probe.bias, metrics)


def create_bundle(
    out: str | Path,
    encoder: str = "all-MiniLM-L6-v2",
    decoder: str = "smollm2",
    score_net: str = "small",
    prompt_generator: str = "small",
    probes: list[Probe] | None = None,
    seed: int = 0,
    notes: str = "",
) -> BundleConfig:
    """A bundle with freshly initialised (untrained) networks sized for `encoder` and `decoder`."""
    for kind, name, presets in (
        ("score_net", score_net, SCORE_NET_PRESETS),
        ("prompt_generator", prompt_generator, PROMPT_GENERATOR_PRESETS),
    ):
        if name not in presets:
            raise ValueError(f"{kind} preset must be one of {sorted(presets)}, got {name!r}")
    enc = SentenceEncoder(encoder)
    dec, _ = load_decoder(decoder)
    sn_cfg = SCORE_NET_PRESETS[score_net]
    pg_cfg = PROMPT_GENERATOR_PRESETS[prompt_generator]
    sn_cfg = type(sn_cfg)(**{**sn_cfg.__dict__, "latent_dim": enc.dim})
    pg_cfg = type(pg_cfg)(
        **{**pg_cfg.__dict__, "latent_dim": enc.dim, "decoder_dim": dec.hidden_size}
    )
    config = BundleConfig(
        encoder, decoder, sn_cfg, pg_cfg, trained=False, notes=notes or "untrained networks"
    )
    torch.manual_seed(seed)
    out = Path(out)
    bundle_io.write_config(config, out)
    bundle_io.save_state(ScoreNetwork(sn_cfg), out / bundle_io.SCORE_NET_FILE)
    bundle_io.save_state(PromptGenerator(pg_cfg), out / bundle_io.PROMPT_GEN_FILE)
    save_probes(out / bundle_io.PROBES_FILE, list(probes or []))
    return config


def add_probe_to_bundle(bundle_dir: str | Path, probe: Probe) -> None:
    """Add or replace `probe` in a bundle's probes.safetensors (checks the latent width)."""
    bundle_dir = bundle_io.resolve_bundle_dir(bundle_dir)
    config = bundle_io.read_config(bundle_dir)
    if probe.dim != config.score_network.latent_dim:
        raise ValueError(
            f"probe {probe.name!r} is {probe.dim}-d but the bundle's latents are "
            f"{config.score_network.latent_dim}-d"
        )
    path = bundle_dir / bundle_io.PROBES_FILE
    existing = [p for p in (load_probes(path) if path.exists() else []) if p.name != probe.name]
    save_probes(path, [*existing, probe])
