"""Measuring the scan: stage rates on the same stamps, memory of every process, the machine.

Shared by ``benchmarks/`` scripts so that every figure in the project comes from one measuring
code. Rates are medians over repeats after a warm-up; spreads are reported, never hidden.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from scanner.config import InputSpec
from scanner.cutouts import make_stamps
from scanner.plan import read_all_headers
from scanner.tiles import Tile, discover_tiles, read_pixels


@dataclass
class Rate:
    """Items per second over repeats: median, spread and the raw figures."""

    items: int
    seconds: list[float] = field(default_factory=list)

    @property
    def per_s(self) -> float:
        return self.items / statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median of the per-repeat rates: how noisy the machine was."""
        rates = [self.items / s for s in self.seconds]
        return (max(rates) - min(rates)) / statistics.median(rates) if len(rates) > 1 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"items": self.items, "per_s": self.per_s, "spread": self.spread,
                "seconds": self.seconds}


def timed(fn: Callable[[], int], repeats: int = 3, warmup: int = 1) -> Rate:
    """Run ``fn`` (which returns how many items it processed) ``warmup`` + ``repeats`` times."""
    for _ in range(warmup):
        fn()
    n = 0
    secs = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = fn()
        secs.append(time.perf_counter() - t)
    return Rate(n, secs)


def machine() -> dict[str, Any]:
    """CPU model, core count, GPUs and library versions, for every saved figure."""
    import pyarrow
    import ray
    import torch

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    from scanner import __version__

    return {"cpu": cpu, "cores": os.cpu_count(), "gpus": gpus, "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__, "numpy": np.__version__,
            "pyarrow": pyarrow.__version__, "lensscan": __version__, "platform": platform.platform()}


def tiles_with_pixels(tiles_url: str, pattern: str, bands: Sequence[str]) -> list[Tile]:
    return [t for t in read_all_headers(discover_tiles(tiles_url, bands, pattern)) if t.shape]


def cut_rate(tiles: list[Tile], positions: dict[str, tuple[np.ndarray, np.ndarray]], spec: InputSpec,
             repeats: int = 3) -> Rate:
    """Stamps/s of read + cut + normalise in this process (one core), tile files read each time."""
    def run() -> int:
        n = 0
        for tile in tiles:
            x, y = positions[tile.name]
            stamps, _ = make_stamps(read_pixels(tile, spec.bands), x, y, spec)
            n += len(stamps)
        return n

    return timed(run, repeats)


def model_rate(ensemble, stamps: np.ndarray, batch_size: int, repeats: int = 3) -> Rate:
    """Stamps/s of the ensemble's forward alone, on stamps already in memory, at ``batch_size``."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(stamps, dtype=np.float32))

    def run() -> int:
        for i in range(0, len(x), batch_size):
            ensemble.predict(x[i:i + batch_size].to(ensemble.device))
        if ensemble.device.type == "cuda":
            torch.cuda.synchronize()
        return len(x)

    return timed(run, repeats)


class MemorySampler:
    """Samples the RSS of this process and every Ray worker process on this machine.

    Ray workers are separate processes; their peak RSS, not the driver's, is what grows if a
    stage holds more than one tile at a time.
    """

    def __init__(self, interval_s: float = 0.1):
        import psutil

        self.psutil = psutil
        self.interval_s = interval_s
        self.peak_worker_mb = 0.0
        self.peak_driver_mb = 0.0
        self.peak_total_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = self.psutil.Process()
        while not self._stop.is_set():
            total = 0.0
            for p in self.psutil.process_iter(["name", "cmdline", "memory_info"]):
                try:
                    cmd = " ".join(p.info["cmdline"] or [])
                    rss = p.info["memory_info"].rss / 2**20
                except (self.psutil.Error, AttributeError, TypeError):
                    continue
                if "ray::" in cmd or "default_worker.py" in cmd:
                    self.peak_worker_mb = max(self.peak_worker_mb, rss)
                    total += rss
                elif p.pid == me.pid:
                    self.peak_driver_mb = max(self.peak_driver_mb, rss)
                    total += rss
            self.peak_total_mb = max(self.peak_total_mb, total)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "MemorySampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def to_dict(self) -> dict[str, float]:
        return {"peak_worker_rss_mb": self.peak_worker_mb, "peak_driver_rss_mb": self.peak_driver_mb,
                "peak_total_rss_mb": self.peak_total_mb}
