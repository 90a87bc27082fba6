"""Where a result comes from: the one capture of commit, machine, device and versions that every
results file records (`dglm eval` and the benchmarks alike)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from collections.abc import Iterable
from pathlib import Path

import torch

# what every capture reports unless told otherwise (distribution names, as pip spells them)
PACKAGES = ("dglm-engine", "torch", "transformers", "numpy")


def package_version(package: str) -> str | None:
    """The installed version of a distribution, None when it is not installed."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def git(*args: str) -> str | None:
    """`git <args>` run in the checkout this package comes from: its stripped stdout, None when
    git or the checkout is missing."""
    try:
        return subprocess.run(
            ["git", *args],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def device_detail(device: str | torch.device) -> str:
    """The GPU's name on CUDA, else the CPU's model name (from /proc/cpuinfo where there is one)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average (None where the platform has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def capture(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    packages: Iterable[str] = PACKAGES,
) -> dict:
    """Device, machine, package versions (plus CUDA's on a CUDA device) and the git commit with
    whether tracked files had uncommitted changes (None: unknown)."""
    device = torch.device(device)
    env: dict = {"device": str(device), "device_name": device_detail(device)}
    if dtype is not None:
        env["dtype"] = str(dtype).replace("torch.", "")
    versions = {p: package_version(p) for p in packages}
    if device.type == "cuda":
        versions["cuda"] = torch.version.cuda
    status = git("status", "--porcelain", "--untracked-files=no")
    env.update(
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        platform=platform.platform(),
        python=platform.python_version(),
        versions=versions,
        commit=git("rev-parse", "HEAD"),
        dirty=bool(status) if status is not None else None,
    )
    return env


def commit_label(env: dict) -> str:
    """The capture's commit as a short label: "a7b9f42", "a7b9f42-dirty" or "unknown"."""
    if not env.get("commit"):
        return "unknown"
    return env["commit"][:7] + ("-dirty" if env.get("dirty") else "")


def summary_line(env: dict) -> str:
    """One markdown line for a results file: commit, versions, machine."""
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v is not None)
    return (
        f"commit `{commit_label(env)}`, {versions}, Python {env['python']}; {env['device_name']}, "
        f"{env['cpu_count']} cores, {env['torch_threads']} torch threads"
    )
