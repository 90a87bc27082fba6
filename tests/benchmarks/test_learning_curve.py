"""The learning curve on the tiny bundle: a two-step steering run with a snapshot per step gives
three points (the base bundle, then each snapshot), each a dev eval with the same rows."""

from __future__ import annotations

import json

import torch
from dglm.engine.evaluation.settings import EvalConfig
from dglm.engine.models.lora import LoraConfig
from dglm.engine.training import data as data_mod
from dglm.engine.training.loop import TrainConfig
from dglm.engine.training.recipes import LATENTS, PAIRS, train_steering_run
from dglm.engine.training.steering import SteerConfig
from safetensors.torch import save_file

from benchmarks.common import environment
from benchmarks.learning_curve import learning_curve, markdown, snapshots


def test_learning_curve_points(tmp_path, tiny_bundle):
    g = torch.Generator().manual_seed(5)
    for split, n in (("train", 24), ("eval", 8)):
        pairs = [data_mod.Pair(f"prefix {split} {i} abc", f" cont {i} xyz", "t") for i in range(n)]
        data_mod.write_jsonl(tmp_path / PAIRS.format(split=split), pairs)
        lat = {k: torch.randn(n, 384, generator=g).half() for k in ("prefix", "continuation")}
        save_file(lat, str(tmp_path / LATENTS.format(split=split)))
    small = TrainConfig(steps=2, batch_size=8, warmup=1, eval_every=2, save_every=2)
    joint = TrainConfig(steps=2, batch_size=8, warmup=1, eval_every=2, save_every=2, keep_every=1)
    steer = SteerConfig(shuffle_rows=4, autocast_bf16=False, skip_frequent=0)
    train_steering_run(
        tmp_path, tiny_bundle, tmp_path / "run", small, joint, LoraConfig(rank=2), steer
    )
    assert len(snapshots(tmp_path / "run")) == 2
    config = EvalConfig(prefixes=("The movie was", "I think the food"), num_samples=1,
                        max_new_tokens=3, guidance_scales=(), renoise_alpha2s=(),
                        fudge_strengths=(), batch_size=2)  # fmt: skip
    cache = tmp_path / "points"
    points = learning_curve(str(tiny_bundle), tmp_path / "run", config, 100, cache=cache)
    assert [(p["label"], p["step"], p["samples"]) for p in points] == [
        ("base", 0, 100),
        ("step-0000001", 1, 108),
        ("step-0000002", 2, 116),
    ]
    for p in points:
        names = set(p["rows"])
        assert {"decoder", "dglm sentiment=positive:10", "dglm sentiment=negative:10"} <= names
        assert 0 <= p["rows"]["decoder"]["repeat_trigram"] <= 1
    # the plain rows' text does not depend on the bundle's steering weights (their perplexity
    # judge may: released_decoder is the engine's own int8 decoder for a bundle without adapters)
    for key in ("vader_positive", "vader_negative", "repeat_trigram", "dist_3", "fused"):
        assert points[0]["rows"]["decoder"][key] == points[2]["rows"]["decoder"][key]
    md = markdown(points, environment(torch.device("cpu")), config)
    assert md.count("| step-0000002 | 116 |") == 2
    # each point is kept, and a second call reuses them (a changed cached value shows through)
    assert sorted(f.name for f in cache.iterdir()) == [
        "base.json",
        "step-0000001.json",
        "step-0000002.json",
    ]
    kept = json.loads((cache / "step-0000001.json").read_text())
    kept["rows"]["dglm sentiment=positive:10"]["dist_3"] = -1.0
    (cache / "step-0000001.json").write_text(json.dumps(kept))
    again = learning_curve(str(tiny_bundle), tmp_path / "run", config, 100, cache=cache)
    assert again[1]["rows"]["dglm sentiment=positive:10"]["dist_3"] == -1.0

    def as_json(rows: dict) -> str:  # NaN ≠ NaN, tuples come back as lists
        return json.dumps(rows, sort_keys=True)

    assert as_json(again[2]["rows"]) == as_json(points[2]["rows"])
