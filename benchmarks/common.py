"""What every benchmark shares: where its results go, what they record about where they ran (the
engine's one capture, `dglm.engine.evaluation.provenance`), the markdown header that says so, and
how the files are written. Under $DGLM_SHAPE_TWINS (random weights, the default models' shapes:
benchmarks/shape_twins.py) the capture and the header say so."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from dglm.engine.evaluation.provenance import capture, commit_label, summary_line
from dglm.engine.evaluation.report import write_json
from dglm.engine.models.loading import SHAPE_TWINS_ENV

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dglm-engine", "torch", "transformers", "numpy")  # versions every benchmark records
SHAPE_TWINS_NOTE = (
    f"models are random shape twins (${SHAPE_TWINS_ENV}): the default encoder's and decoder's "
    "shapes and tokenizers with random weights; speeds carry over, quality numbers mean nothing"
)


def device_name(device: torch.device) -> str:
    """Folder name under benchmarks/results/: "cpu", "h100", "h200", ..."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for short in ("h200", "h100", "a100", "l4", "a10g", "t4"):
            if short in name:
                return short
        return "".join(c if c.isalnum() else "-" for c in name)
    return "cpu"


def environment(device: torch.device, packages: Iterable[str] = PACKAGES) -> dict:
    """The provenance capture of a benchmark run on `device` (with "shape_twins" when the
    default models are random shape twins)."""
    env = capture(device, packages=packages)
    if os.environ.get(SHAPE_TWINS_ENV):
        env["shape_twins"] = SHAPE_TWINS_NOTE
    return env


def stamp(rows: list[dict], env: dict, device: torch.device) -> list[dict]:
    """Every measurement row with the results folder of its device, the versions and the commit it
    was measured with (one JSON row per measurement says where it comes from)."""
    where = {"device": device_name(device), "versions": env["versions"]}
    return [{**r, **where, "commit": commit_label(env)} for r in rows]


def header(title: str, env: dict, *details: str) -> list[str]:
    """The first lines of a results markdown file: the title, then commit, versions and machine
    (and any details, e.g. the load average), and a warning line when the models are shape twins."""
    twins = [f"**Warning: {env['shape_twins']}.**", ""] if env.get("shape_twins") else []
    return [f"# {title}", "", "; ".join([summary_line(env), *details]) + ".", "", *twins]


def write_results(out: Path, name: str, report, markdown: str) -> dict[str, Path]:
    """<out>/<name>.json (strict JSON) and <out>/<name>.md; `out` is created."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": write_json(out / f"{name}.json", report, indent=1),
        "markdown": out / f"{name}.md",
    }
    paths["markdown"].write_text(markdown)
    return paths
