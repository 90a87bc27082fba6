"""Latency percentiles, the timed call, and peak memory of one call."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

PERCENTILES = (50, 90, 99)


def summarize(samples_ms: list[float]) -> dict[str, float]:
    """p50 / p90 / p99 (numpy.percentile, linear interpolation), mean, min, max and n."""
    if not samples_ms:
        raise ValueError("summarize needs at least one sample")
    x = np.asarray(samples_ms, dtype=np.float64)
    out = {
        f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(x, PERCENTILES), strict=True)
    }
    out.update(mean=float(x.mean()), min=float(x.min()), max=float(x.max()), n=int(x.size))
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of one call, in MiB: `start()` before it, `stop()` → (peak, growth) after.

    method (recorded with every row):
    - "cuda_max_allocated": torch.cuda.max_memory_allocated after reset_peak_memory_stats;
      growth = peak − allocated at start.
    - "rss_hwm": Linux peak RSS (VmHWM in /proc/self/status), reset per call by writing "5" to
      /proc/self/clear_refs; growth = peak − RSS at start.
    - "rss_sampled": RSS sampled every 2 ms by a thread (psutil), when the reset is refused.
    - "none": none of these is available; (None, None).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            self.method = "cuda_max_allocated"
        elif _reset_hwm():
            self.method = "rss_hwm"
        else:
            try:
                import psutil

                self._proc = psutil.Process()
                self.method = "rss_sampled"
            except ImportError:
                self.method = "none"
        self._start = 0
        self._peak = 0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.method == "cuda_max_allocated":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        elif self.method == "rss_hwm":
            _reset_hwm()
            self._start = _status_kib("VmRSS") * 1024
        elif self.method == "rss_sampled":
            self._start = self._peak = self._proc.memory_info().rss
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self._peak = max(self._peak, self._proc.memory_info().rss)

    def stop(self) -> tuple[float | None, float | None]:
        if self.method == "cuda_max_allocated":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == "rss_hwm":
            peak = _status_kib("VmHWM") * 1024
        elif self.method == "rss_sampled":
            self._stop.set()
            self._thread.join()
            peak = max(self._peak, self._proc.memory_info().rss)
        else:
            return None, None
        mib = 1024.0 * 1024.0
        return peak / mib, max(peak - self._start, 0) / mib


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kib("VmHWM") > 0
    except OSError:
        return False


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def timed(fn: Callable[[], object], device: torch.device, meter: PeakMemory | None = None):
    """(result, wall seconds, peak MiB, growth MiB) of one call, the device synchronised around it."""
    sync(device)
    if meter is not None:
        meter.start()
    t = time.perf_counter()
    out = fn()
    sync(device)
    seconds = time.perf_counter() - t
    peak, growth = meter.stop() if meter is not None else (None, None)
    return out, seconds, peak, growth
