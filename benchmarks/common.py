"""What every benchmark records about where it ran."""

from __future__ import annotations

import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def git_commit() -> str:
    """Short HEAD, with "-dirty" when tracked files have uncommitted changes."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT, capture_output=True, text=True,
        )  # fmt: skip
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


def device_name(device: torch.device) -> str:
    """Folder name under benchmarks/results/: "cpu", "h100", "h200", ..."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device).lower()
        for short in ("h200", "h100", "a100", "l4", "a10g", "t4"):
            if short in name:
                return short
        return "".join(c if c.isalnum() else "-" for c in name)
    return "cpu"
