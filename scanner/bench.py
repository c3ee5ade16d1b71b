"""Measuring the scan: stage rates on the same stamps, memory of every process, the machine.

One measuring code for ``lensscan bench`` and the ``benchmarks/`` scripts, so every figure the
project quotes comes from the same functions. Rates are medians over repeats after a short
warm-up; spreads are reported, never hidden, because the machines people measure on are shared
and noisy, and two runs can only be compared with their spreads beside them.

Each stage is measured where and how the scan runs it: cutting in a Ray task holding one CPU (as a
read-and-cut task does), the ensemble's forward in a Ray task holding a scoring actor's CPUs and
GPUs and loading the models through the scan's own :class:`~scanner.stages.EnsembleScorer` (so a
GPU run takes the scan's device, channels-last and mixed-precision path), and end to end with
:func:`scanner.pipeline.run_scan` itself.

Example
-------
>>> import ray
>>> from scanner.bench import SurveySample, bench_survey, measure_stages
>>> ray.init()                                                           # doctest: +SKIP
>>> sample = SurveySample.from_mock(bench_survey("/tmp/lensscan-bench", n_stamps=2048))  # doctest: +SKIP
>>> figures = measure_stages(sample, ["registry/my-ensemble"], "/tmp/lensscan-bench")    # doctest: +SKIP
>>> figures.bottleneck()["stage"]                                        # doctest: +SKIP
'model'
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from scanner import storage
from scanner.config import InputSpec, ScanConfig
from scanner.cutouts import make_stamps
from scanner.plan import make_plan, read_all_headers, read_tile_objects
from scanner.tiles import Tile, discover_tiles, read_pixels

if TYPE_CHECKING:  # mock_survey pulls in GalSim and lenstronomy: imported only when a mock is made
    from scanner.mock_survey import MockSurvey, MockSurveyConfig

logger = logging.getLogger(__name__)

STAGES = ("cut", "model", "scan")

#: Relative noise assumed when repeats cannot show it (a single repeat has no spread). Repeated
#: rates on a shared 2-vCPU machine differ by 10% on a quiet minute and up to 90% on a busy one.
NOISE_FLOOR = 0.1

#: The model-only figure scores at most this many of the scan's stamps (float32 in the measuring
#: worker's memory: 2**15 stamps of 3 x 64 x 64 are 1.6 GB), enough for seconds of a GPU's time.
MODEL_STAMPS_MAX = 2**15

#: The cut-only figure cuts whole tiles, in the plan's order, until it has at least this many
#: stamps (every tile of a smaller sample). One core cuts about 2,000 stamps/s: cutting every tile
#: of a GPU-sized sample (2 x 10^5 stamps) would take 100 s per repeat, while the rate, per stamp
#: with each tile read once, is the same on a few tiles (8 s).
CUT_STAMPS_MIN = 2**14

#: Below this many seconds from the first batch scored to the last, the steady rate rests on a few batches.
MIN_STEADY_SECONDS = 10.0


@dataclass
class Rate:
    """Items per second over repeats: median, spread and the raw figures."""

    items: int
    seconds: list[float] = field(default_factory=list)

    @classmethod
    def from_rates(cls, items: int, rates: Sequence[float]) -> "Rate":
        """A Rate from per-repeat rates (each stored as the seconds ``items`` take at that rate)."""
        return cls(items, [items / r for r in rates])

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


def timed(fn: Callable[[], int], repeats: int = 3, warmup: int | Callable[[], object] = 1) -> Rate:
    """Return the rate of ``fn`` (which returns how many items it processed) over ``repeats`` runs.

    ``warmup`` runs first and is not timed: an int runs ``fn`` that many times, a callable runs
    once (a shorter warm-up, such as two batches instead of a whole pass, when a pass is long).
    """
    if callable(warmup):
        warmup()
    else:
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
    """CPU model, core count, GPUs and library versions, for every saved figure.

    ``ray`` is None where Ray is not installed (the model-only and injection scripts run without it).
    """
    import pyarrow
    import torch

    try:
        import ray
        ray_version = ray.__version__
    except ImportError:
        ray_version = None

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
            "torch": torch.__version__, "ray": ray_version, "numpy": np.__version__,
            "pyarrow": pyarrow.__version__, "lensscan": __version__, "platform": platform.platform()}


def tiles_with_pixels(tiles_url: str, pattern: str, bands: Sequence[str]) -> list[Tile]:
    """Every tile under ``tiles_url`` whose headers could be read."""
    return [t for t in read_all_headers(discover_tiles(tiles_url, bands, pattern)) if t.shape]


Positions = dict[str, tuple[np.ndarray, np.ndarray]]


def cut_sample(tiles: list[Tile], positions: Positions, min_stamps: int = CUT_STAMPS_MIN) -> list[Tile]:
    """The first tiles of ``tiles`` that hold at least ``min_stamps`` objects together (all if fewer).

    Whole tiles, never part of one: the scan reads every tile whole, so the read is part of the
    cost of each of the tile's stamps, and cutting part of a tile would spread it over fewer
    stamps than the scan does.
    """
    n = 0
    for k, tile in enumerate(tiles):
        n += len(positions[tile.name][0])
        if n >= min_stamps:
            return tiles[:k + 1]
    return list(tiles)


def cut_rate(tiles: list[Tile], positions: Positions, spec: InputSpec, repeats: int = 3) -> Rate:
    """Stamps/s of read + cut + normalise in this process (one core), tile files read each time.

    Every tile of ``tiles`` is read and cut in each repeat: pass :func:`cut_sample`'s tiles to
    bound the time. The warm-up cuts the first tile only: enough to import and fill caches,
    without reading the whole sample one extra time.
    """
    def cut(some: list[Tile]) -> int:
        n = 0
        for tile in some:
            x, y = positions[tile.name]
            stamps, _ = make_stamps(read_pixels(tile, spec.bands), x, y, spec)
            n += len(stamps)
        return n

    return timed(lambda: cut(tiles), repeats, warmup=lambda: cut(tiles[:1]))


def scan_stamps(tiles: list[Tile], positions: Positions, spec: InputSpec,
                limit: int | None = None) -> np.ndarray:
    """The normalised float16 stamps the scan's cut stage hands the scorer, in tile order.

    Float16 because that is what travels from the cut to the scorer: the model-only figure then
    scores exactly the values the scan scores. ``limit`` stops after that many stamps.
    """
    out = []
    n = 0
    for tile in tiles:
        if limit is not None and n >= limit:
            break
        x, y = positions[tile.name]
        normed, _ = make_stamps(read_pixels(tile, spec.bands), x, y, spec)
        out.append(normed.astype(np.float16))
        n += len(normed)
    s = spec.stamp_size_pix
    stamps = np.concatenate(out) if out else np.zeros((0, spec.n_channels, s, s), np.float16)
    return stamps[:limit] if limit is not None else stamps


def model_rate(ensemble, stamps: np.ndarray, batch_size: int, repeats: int = 3) -> Rate:
    """Stamps/s of the ensemble's forward alone, on stamps already in memory, at ``batch_size``.

    Batches go to the ensemble's device one at a time, as the scorer sends them. The warm-up is
    two batches: enough for lazy CUDA and oneDNN initialisation and cuDNN's kernel choice.
    """
    import torch

    x = torch.from_numpy(np.ascontiguousarray(stamps, dtype=np.float32))

    def forward(n_stamps: int) -> int:
        for i in range(0, n_stamps, batch_size):
            ensemble.predict(x[i:min(i + batch_size, n_stamps)].to(ensemble.device))
        if ensemble.device.type == "cuda":
            torch.cuda.synchronize()
        return n_stamps

    return timed(lambda: forward(len(x)), repeats, warmup=lambda: forward(min(len(x), 2 * batch_size)))


class MemorySampler:
    """Samples the RSS of this process and of the connected Ray cluster's workers on this machine.

    Ray workers are separate processes; their peak RSS, not the driver's, is what grows if a
    stage holds more than one tile at a time. Workers are found as children of the cluster's
    raylet, so another Ray cluster on a shared machine does not count; without a Ray connection,
    or when the raylet runs elsewhere (``ray://``), every Ray worker process on the machine counts.
    Only this machine's processes are seen: on a multi-node cluster, other nodes' workers are not.
    """

    def __init__(self, interval_s: float = 0.1):
        import psutil

        self.psutil = psutil
        self.interval_s = interval_s
        self.peak_worker_mb = 0.0
        self.peak_driver_mb = 0.0
        self.peak_total_mb = 0.0
        self._raylets = self._find_raylets()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _find_raylets(self) -> list:
        """The connected cluster's raylet processes that run on this machine (found by socket name)."""
        try:
            import ray

            if not ray.is_initialized():
                return []
            sockets = [n["RayletSocketName"] for n in ray.nodes()
                       if n.get("Alive") and n.get("RayletSocketName")]
        except Exception:  # noqa: BLE001 - without the cluster's view, fall back to every Ray worker
            return []
        raylets = []
        for p in self.psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if any(f"--raylet_socket_name={s}" in cmd for s in sockets):
                raylets.append(p)
        return raylets

    def _candidates(self) -> list:
        if not self._raylets:
            return list(self.psutil.process_iter())
        out = []
        for raylet in self._raylets:
            try:
                out.extend(raylet.children(recursive=True))
            except self.psutil.Error:
                continue
        return out

    def _run(self) -> None:
        me = self.psutil.Process()
        while not self._stop.is_set():
            total = me.memory_info().rss / 2**20
            self.peak_driver_mb = max(self.peak_driver_mb, total)
            for p in self._candidates():
                try:
                    cmd = " ".join(p.cmdline())
                    rss = p.memory_info().rss / 2**20
                except self.psutil.Error:
                    continue
                if p.pid != me.pid and ("ray::" in cmd or "default_worker.py" in cmd):
                    self.peak_worker_mb = max(self.peak_worker_mb, rss)
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


# --------------------------------------------------------------------------------------------
# What to measure on: a survey sample, mock or the user's own.


@dataclass(frozen=True)
class SurveySample:
    """Tiles and catalog to measure on: a mock survey written for the purpose, or the user's data.

    ``bands`` maps survey bands to the models' channels as the scan's ``--bands`` does (None: the
    models' own bands).
    """

    tiles_url: str
    tile_pattern: str | None  # None: discover the layout, as the scan does
    catalog_url: str
    bands: tuple[str, ...] | None = None

    @classmethod
    def from_mock(cls, survey: MockSurvey) -> "SurveySample":
        """The sample of a :class:`~scanner.mock_survey.MockSurvey`."""
        return cls(survey.tiles_url, survey.tile_pattern, survey.catalog_url)


def bench_survey_config(n_stamps: int, compress: bool = False, bands: Sequence[str] = ("g", "r", "i"),
                        seed: int = 11) -> MockSurveyConfig:
    """A mock survey config with about ``n_stamps`` catalogued objects in ``bands``, over >= 4 tiles.

    Tiles are 1024 px (the demo's) and as many as the count needs; below 4 such tiles, 4 smaller
    ones, so the scan runs several read-and-cut tasks side by side, as on a survey. One lens per
    tile: the rate does not depend on lenses, and painting them is slow.
    """
    from scanner.mock_survey import MockSurveyConfig

    base = MockSurveyConfig()
    density = base.galaxy_density_per_arcmin2 + base.star_density_per_arcmin2
    full_step_arcmin = (base.size_pix - base.overlap_pix) * base.pixel_scale_arcsec / 60.0
    per_full_tile = density * full_step_arcmin**2
    n_tiles = max(4, math.ceil(n_stamps / per_full_tile))
    step_arcmin = math.sqrt(n_stamps / n_tiles / density)
    size = round(step_arcmin * 60.0 / base.pixel_scale_arcsec) + base.overlap_pix
    size = min(base.size_pix, max(256, size))
    try:
        return MockSurveyConfig(n_tiles=n_tiles, size_pix=size, bands=tuple(bands), n_lenses=n_tiles,
                                seed=seed, compress=compress)
    except ValueError as exc:
        raise ValueError(f"cannot write a mock survey for the models' bands {list(bands)} ({exc}); "
                         f"measure on your own tiles with --tiles and --catalog") from exc


def _key(d: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:12]


def bench_survey(work_dir: str, n_stamps: int, compress: bool = False,
                 bands: Sequence[str] = ("g", "r", "i"), seed: int = 11) -> MockSurvey:
    """The mock survey of :func:`bench_survey_config`, generated once under ``work_dir``.

    Cached under a name keyed by the config, so a second run on the same ``--stamps`` reuses it
    and a different size never picks up a stale one.
    """
    from scanner.mock_survey import make_mock_survey, open_mock_survey

    config = bench_survey_config(n_stamps, compress, bands, seed)
    url = storage.join(work_dir, f"survey-{_key(config.to_dict())}")
    survey = open_mock_survey(url)
    if survey is None:
        logger.info("writing a mock survey of %d tiles of %d px for about %d stamps to %s (once)",
                    config.n_tiles, config.size_pix, n_stamps, url)
        survey = make_mock_survey(url, config)
    return survey


def planned_positions(sample: SurveySample, bands: Sequence[str], work_dir: str
                      ) -> tuple[list[Tile], Positions]:
    """The tiles with objects and each one's object pixel positions, from the scan's own plan.

    The plan is written under ``work_dir`` (keyed by the sample), never into a scan's output.
    """
    out = storage.join(work_dir, f"plan-{_key(dataclasses.asdict(sample) | {'bands': list(bands)})}")
    plan = make_plan(sample.tiles_url, sample.tile_pattern, bands, sample.catalog_url, out)
    tiles = [t for t in plan.tiles if t.shape and plan.objects_per_tile.get(t.name, 0) > 0]
    positions = {}
    for t in tiles:
        objects = read_tile_objects(out, t.name)
        positions[t.name] = (objects["x"].to_numpy(), objects["y"].to_numpy())
    return tiles, positions


# --------------------------------------------------------------------------------------------
# The scan's layout on the cluster


@dataclass(frozen=True)
class ScoringLayout:
    """How the scan lays itself out on the connected cluster: scoring actors and cutting cores."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    cluster_cpus: float
    cluster_gpus: float
    nodes: int

    @property
    def cut_cores(self) -> float:
        """CPUs left to read-and-cut tasks once every scoring actor holds its CPUs."""
        return max(0.0, self.cluster_cpus - self.actors * self.cpus_per_actor)

    @property
    def gpus_used(self) -> float:
        return self.actors * self.gpus_per_actor

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "cut_cores": self.cut_cores, "gpus_used": self.gpus_used}


def scoring_layout(gpus_per_actor: float = 0.0) -> ScoringLayout:
    """The scan's actor pool on the connected Ray cluster, as ``run_scan`` sizes it by default
    (``scanner.pipeline._actor_pool`` itself)."""
    import ray

    from scanner.pipeline import _actor_pool

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1)), float(res.get("GPU", 0))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
    if gpus_per_actor > 0 and gpus == 0:
        raise ValueError("--gpus-per-actor > 0 but the Ray cluster has no GPU; give 0 to score on CPUs")
    pool = _actor_pool(ScanConfig(tiles="", catalog=None, out="", model_dirs=(), num_gpus_per_actor=gpus_per_actor))
    return ScoringLayout(pool.actors, pool.cpus_per_actor, gpus_per_actor, cpus, gpus, max(1, nodes))


# --------------------------------------------------------------------------------------------
# Measuring the stages


def _worker_env() -> dict[str, Any]:
    # The scan's own runtime_env, so these tasks reach the same storage and reuse its workers.
    return {"env_vars": storage.worker_env()}


def _model_probe(model_dirs: Sequence[str], use_gpu: bool, tiles: list[Tile], positions: Positions,
                 spec: InputSpec, batch_size: int, repeats: int,
                 precision: str) -> tuple[Rate, dict[str, Any], str]:
    """Model-only rate in a Ray task holding one scoring actor's resources; also its machine and
    the precision the forward ran in."""
    from scanner.stages import EnsembleScorer

    # The scorer the scan's actors run: same model loading, device choice and .to() path.
    scorer = EnsembleScorer(model_dirs, use_gpu=use_gpu, precision=precision)
    stamps = scan_stamps(tiles, positions, spec, limit=MODEL_STAMPS_MAX)
    return model_rate(scorer.ensemble, stamps, batch_size, repeats), machine(), scorer.ensemble.precision


def _warmup_catalog(sample: SurveySample, n_objects: int, work_dir: str) -> str:
    """A catalog of the sample's first ``n_objects`` objects, for a short warm-up scan."""
    from scanner.catalog import iter_catalog, table_to_bytes

    first = next(iter_catalog(sample.catalog_url, n_objects))
    key = _key({"catalog": sample.catalog_url, "n": n_objects})
    url = storage.join(work_dir, f"warmup-catalog-{key}.parquet")
    storage.write_bytes_atomic(url, table_to_bytes(first.drop_columns(["row"])))
    return url


@dataclass
class ScanRun:
    """One end-to-end scan: wall seconds, steady rate, stamps cut and peak memory."""

    seconds: float
    steady_per_s: float  # ScanResult.steady_stamps_per_s: first batch scored to last
    stamps: int
    memory: dict[str, float]


def scan_once(sample: SurveySample, model_dirs: Sequence[str], out: str, batch_size: int,
              gpus_per_actor: float = 0.0, catalog: str | None = None, precision: str = "auto",
              num_actors: int | None = None) -> ScanRun:
    """Run ``run_scan`` on ``sample`` into ``out`` (replaced), without a report; time and sample memory.

    ``stamps`` counts the objects the scan cut (scored or failed at the cut), which is what both
    the wall and the steady rate divide.
    """
    from scanner.pipeline import run_scan

    config = ScanConfig(tiles=sample.tiles_url, catalog=catalog or sample.catalog_url, out=out,
                        model_dirs=tuple(model_dirs), bands=sample.bands, tile_pattern=sample.tile_pattern,
                        batch_size=batch_size, num_gpus_per_actor=gpus_per_actor, overwrite=True,
                        precision=precision, num_actors=num_actors, report_top_n=0)
    with MemorySampler() as mem:
        t = time.perf_counter()
        result = run_scan(config)
        secs = time.perf_counter() - t
    # ScanResult gives the objects cut only as a rate over its own seconds.
    n_cut = round(result.stamps_per_s * result.seconds)
    return ScanRun(secs, result.steady_stamps_per_s, n_cut, mem.to_dict())


@dataclass
class StageFigures:
    """What :func:`measure_stages` measured; stages not asked for are None."""

    layout: ScoringLayout
    stamps: int
    tiles: int
    batch_size: int
    repeats: int
    cut: Rate | None = None  # per core
    model: Rate | None = None  # per scoring actor
    scan_wall: Rate | None = None
    scan_steady: Rate | None = None
    memory: dict[str, float] = field(default_factory=dict)
    worker_machine: dict[str, Any] = field(default_factory=dict)
    precision: str = ""  # what the scorer's forward ran in (float32, bfloat16, float16)

    @property
    def cut_per_s(self) -> float:
        """Cut capacity of the cluster: one core's rate times the cores left to cutting."""
        return self.cut.per_s * self.layout.cut_cores

    @property
    def model_pool_per_s(self) -> float:
        """Scoring capacity: one actor's model-only rate times the scan's number of actors.

        An upper bound when actors share a GPU (``gpus_per_actor`` < 1): it assumes each gets a
        whole one.
        """
        return self.model.per_s * self.layout.actors

    def _per_unit(self, per_s: float) -> dict[str, float]:
        units = {"per_core": per_s / self.layout.cluster_cpus}
        if self.layout.gpus_used > 0:
            units["per_gpu"] = per_s / self.layout.gpus_used
        return units

    def stages(self) -> dict[str, dict[str, Any]]:
        """Per stage: ``per_s`` (stamps/s of the whole cluster as the scan lays it out), spread, units."""
        out: dict[str, dict[str, Any]] = {}
        lay = self.layout
        if self.cut is not None:
            out["cut"] = {"per_s": self.cut_per_s, "spread": self.cut.spread, "per_core": self.cut.per_s,
                          "cores": lay.cut_cores, "repeat_seconds": self.cut.seconds,
                          "stamps": self.cut.items,
                          "how": "read + cut + normalise in one Ray task holding 1 CPU, on whole "
                                 f"tiles until at least {CUT_STAMPS_MIN} stamps (every tile of a "
                                 "smaller sample), times the cores the scoring actors leave"}
            if lay.gpus_used > 0:
                out["cut"]["per_gpu"] = self.cut_per_s / lay.gpus_used
        if self.model is not None:
            per_actor = self.model.per_s
            out["model"] = {"per_s": self.model_pool_per_s, "spread": self.model.spread,
                            "per_actor": per_actor, "actors": lay.actors,
                            "repeat_seconds": self.model.seconds, "stamps": self.model.items,
                            "batch_size": self.batch_size,
                            "how": "the scan's EnsembleScorer ensemble, forward only on the scan's "
                                   "stamps in memory, in one Ray task holding one actor's resources, "
                                   "times the actors"}
            if lay.gpus_per_actor > 0:
                out["model"]["per_gpu"] = per_actor / lay.gpus_per_actor
            else:
                out["model"]["per_core"] = per_actor / lay.cpus_per_actor
        if self.scan_steady is not None:
            out["scan"] = {"per_s": self.scan_steady.per_s, "spread": self.scan_steady.spread,
                           "steady_per_s": self.scan_steady.per_s, "steady_spread": self.scan_steady.spread,
                           "wall_per_s": self.scan_wall.per_s, "wall_spread": self.scan_wall.spread,
                           "wall_seconds": self.scan_wall.seconds, "stamps": self.scan_wall.items,
                           **self._per_unit(self.scan_steady.per_s),
                           "how": "run_scan end to end; steady: ScanResult.steady_stamps_per_s, "
                                  "from the first batch scored to the last (the scorers' clock); "
                                  "wall: the whole call including start-up"}
        return out

    def ratios(self) -> dict[str, float]:
        """End-to-end over model-only, wall and steady (1 would mean the scan adds nothing)."""
        if self.model is None or self.scan_steady is None:
            return {}
        pool = self.model_pool_per_s
        return {"scan_wall_over_model": self.scan_wall.per_s / pool,
                "scan_steady_over_model": self.scan_steady.per_s / pool}

    def bottleneck(self) -> dict[str, Any]:
        """The stage that limits the rate: the slower of cut capacity and scoring capacity.

        Also whether the end-to-end steady rate is within noise of it. Noise is the larger of the
        two figures' spreads, at least :data:`NOISE_FLOOR`. Empty unless cut and model were measured.
        """
        if self.cut is None or self.model is None:
            return {}
        candidates = {"cut": (self.cut_per_s, self.cut.spread),
                      "model": (self.model_pool_per_s, self.model.spread)}
        stage = min(candidates, key=lambda k: candidates[k][0])
        per_s, spread = candidates[stage]
        out: dict[str, Any] = {"stage": stage, "per_s": per_s,
                               "stages_per_s": {k: v[0] for k, v in candidates.items()}}
        if self.scan_steady is None:
            out["verdict"] = f"{stage} is the slower stage (the end-to-end scan was not run)"
            return out
        steady = self.scan_steady.per_s
        ratio = steady / per_s
        noise = max(NOISE_FLOOR, spread, self.scan_steady.spread)
        within = abs(1.0 - ratio) <= noise
        if within:
            verdict = f"the scan runs at the {stage} stage's rate: {stage} limits it"
        elif ratio < 1:
            verdict = (f"the scan runs at {ratio:.0%} of the {stage} stage's rate: the rest is lost "
                       f"between stages (scheduling, transfers, writing, sharing cores), not in {stage}")
        else:
            verdict = (f"the scan runs faster than the {stage} stage measured alone: that figure is "
                       f"pessimistic here (noise, or cores shared differently)")
        out.update({"end_to_end_steady_per_s": steady, "end_to_end_over_stage": ratio, "noise": noise,
                    "end_to_end_within_noise": within, "verdict": verdict})
        return out


def measure_stages(sample: SurveySample, model_dirs: Sequence[str], work_dir: str, *,
                   stages: Sequence[str] = STAGES, batch_size: int = 256, gpus_per_actor: float = 0.0,
                   repeats: int = 3, precision: str = "auto") -> StageFigures:
    """Measure cut-only, model-only and the end-to-end scan on the same stamps of ``sample``.

    Runs on the Ray cluster this process is connected to (call ``ray.init`` first). Cut-only and
    model-only run in Ray tasks holding what the scan's cut task and scoring actor hold, on the
    objects the scan's plan puts on each tile: cut-only on the first whole tiles holding
    :data:`CUT_STAMPS_MIN` of them (:func:`cut_sample`), model-only on the first
    :data:`MODEL_STAMPS_MAX`; the scan is ``run_scan`` itself, on all of them, after a warm-up
    scan of ``2 x batch_size`` objects. The ``repeats`` go round the stages, each stage once per
    round. Intermediate files (plan, scan output) go under ``work_dir``, which every node must see
    on a multi-node cluster.

    Returns
    -------
    StageFigures
        Per-repeat rates with medians and spreads, the scan's layout on the cluster, peak memory.
    """
    import ray

    from scanner.pipeline import resolve_bands
    from scanner.registry import load_ensemble

    if not ray.is_initialized():
        raise RuntimeError("measure_stages needs a Ray connection: call ray.init(address=...) first")
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    # Ray Data's per-dataset INFO lines would bury the progress lines.
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ensemble = load_ensemble(list(model_dirs))
    spec = ensemble.input_spec
    probe = ScanConfig(tiles=sample.tiles_url, catalog=sample.catalog_url, out=work_dir,
                       model_dirs=tuple(model_dirs), bands=sample.bands)
    bands = resolve_bands(probe, ensemble)
    layout = scoring_layout(gpus_per_actor)
    logger.info("cluster: %g CPUs, %g GPUs on %d node(s); the scan would use %d scoring actor(s) "
                "(%g CPU, %g GPU each) and %g cutting cores", layout.cluster_cpus, layout.cluster_gpus,
                layout.nodes, layout.actors, layout.cpus_per_actor, layout.gpus_per_actor, layout.cut_cores)
    logger.info("plan: matching %s to its tiles", sample.catalog_url)
    tiles, positions = planned_positions(sample, bands, work_dir)
    n_stamps = sum(len(x) for x, _ in positions.values())
    if n_stamps == 0:
        raise ValueError(f"no catalog object of {sample.catalog_url} falls on a readable tile of "
                         f"{sample.tiles_url}; nothing to measure")
    figures = StageFigures(layout, n_stamps, len(tiles), batch_size, repeats)
    cut_tiles = cut_sample(tiles, positions, CUT_STAMPS_MIN)
    cut_positions = {t.name: positions[t.name] for t in cut_tiles}
    n_cut = sum(len(x) for x, _ in cut_positions.values())
    if "cut" in stages and len(cut_tiles) < len(tiles):
        logger.info("cut-only: %d of the %d tiles (%d of %d stamps), whole tiles in plan order",
                    len(cut_tiles), len(tiles), n_cut, n_stamps)
    # Tiles are read through the band names of the survey, mapped to the model's channels.
    survey_spec = dataclasses.replace(spec, bands=bands)

    # Repeats go round the stages (cut, model, scan, cut, ...) rather than one stage after the
    # other: on a shared machine the load changes by the minute, and interleaving lets each
    # change hit every stage alike, so the stages' medians can be compared with each other.
    cut_task = ray.remote(cut_rate).options(num_cpus=1, runtime_env=_worker_env())
    model_task = ray.remote(_model_probe).options(num_cpus=layout.cpus_per_actor,
                                                  num_gpus=layout.gpus_per_actor, runtime_env=_worker_env())
    out = storage.join(work_dir, "scan-out")
    if "scan" in stages:
        logger.info("scan: warm-up on %d objects (not timed)", 2 * batch_size)
        scan_once(sample, model_dirs, out, batch_size, layout.gpus_per_actor,
                  catalog=_warmup_catalog(sample, 2 * batch_size, work_dir), precision=precision)
    cut_seconds: list[float] = []
    model_seconds: list[float] = []
    model_items = 0
    runs: list[ScanRun] = []
    for k in range(repeats):
        done = []
        if "cut" in stages:
            # One Ray task holding 1 CPU, as a read-and-cut task, on whole tiles until
            # CUT_STAMPS_MIN stamps; its own warm-up is the first tile.
            rate = ray.get(cut_task.remote(cut_tiles, cut_positions, survey_spec, 1))
            cut_seconds += rate.seconds
            done.append(f"cut-only {rate.per_s:.0f}/s per core")
        if "model" in stages:
            # One Ray task holding a scoring actor's resources; its own warm-up is two batches.
            rate, figures.worker_machine, figures.precision = ray.get(model_task.remote(
                list(model_dirs), layout.gpus_per_actor > 0, tiles, positions, survey_spec, batch_size, 1,
                precision))
            model_seconds += rate.seconds
            model_items = rate.items
            done.append(f"model-only {rate.per_s:.0f}/s per actor")
        if "scan" in stages:
            runs.append(scan_once(sample, model_dirs, out, batch_size, layout.gpus_per_actor,
                                  precision=precision))
            if runs[-1].stamps != n_stamps:
                raise RuntimeError(f"the scan cut {runs[-1].stamps} objects but the plan has {n_stamps}: "
                                   f"{sample.catalog_url} or its tiles changed while the bench ran")
            done.append(f"scan {runs[-1].steady_per_s:.0f}/s steady, "
                        f"{runs[-1].stamps / runs[-1].seconds:.0f}/s wall")
        logger.info("repeat %d/%d on %d stamps: %s", k + 1, repeats, n_stamps, "; ".join(done))
    if cut_seconds:
        figures.cut = Rate(n_cut, cut_seconds)
    if model_seconds:
        figures.model = Rate(model_items, model_seconds)
    if runs:
        fs, path = storage.filesystem(out)
        fs.rm(path, recursive=True)
        steady = [r.steady_per_s for r in runs if math.isfinite(r.steady_per_s)]
        if not steady:
            raise RuntimeError(f"the scan scored no batch it could time, so it has no steady rate "
                               f"({n_stamps} stamps); raise the number of stamps")
        figures.scan_wall = Rate(n_stamps, [r.seconds for r in runs])
        figures.scan_steady = Rate.from_rates(n_stamps, steady)
        figures.memory = {k: max(r.memory[k] for r in runs) for k in runs[0].memory}
        steady_s = n_stamps / figures.scan_steady.per_s
        if steady_s < MIN_STEADY_SECONDS:
            logger.warning("the scan's steady part lasted %.1f s, under %.0f s: its rate is rough; "
                           "raise --stamps for a figure to plan with", steady_s, MIN_STEADY_SECONDS)
    return figures


# --------------------------------------------------------------------------------------------
# Survey projection


def project_survey(figures: StageFigures, objects: float, gpus: float | None = None,
                   gpu_hour_price: float | None = None) -> dict[str, Any]:
    """Wall time (and cost) of scanning ``objects`` objects at the measured rate.

    The rate is the end-to-end steady rate (start-up is minutes against the hours of a survey);
    without a scan figure, the slower stage's rate, an upper bound. With GPUs it is scaled per GPU
    and projected on ``gpus`` GPUs (default: those the scan used here), assuming the CPUs per GPU
    stay as here; without GPUs it is projected per CPU node like the measured ones.

    ``hours = objects / rate / 3600`` with ``rate`` the projected cluster's stamps/s, and
    ``cost = hours x gpus x gpu_hour_price``.
    """
    lay = figures.layout
    if figures.scan_steady is not None:
        measured, source = figures.scan_steady.per_s, "end-to-end steady scan rate"
    elif figures.bottleneck():
        measured, source = figures.bottleneck()["per_s"], "slower stage alone (an upper bound: no scan run)"
    else:
        raise ValueError("a projection needs the scan stage, or both the cut and model stages")
    if lay.gpus_used > 0:
        if gpus is not None and gpus <= 0:
            raise ValueError(f"--gpus {gpus:g} but the measured scan scored on GPUs: give the GPUs "
                             f"to project on, or measure with --gpus-per-actor 0 to project CPU nodes")
        unit, here = "gpu", lay.gpus_used
        units = float(gpus) if gpus is not None else here
    else:
        if gpus:
            raise ValueError(f"--gpus {gpus:g} but the measured scan used no GPU: measure on a GPU "
                             f"cluster (--gpus-per-actor 1) to project GPUs")
        unit, here = "node", float(lay.nodes)
        units = here
    per_unit = measured / here
    rate = per_unit * units
    hours = objects / rate / 3600.0
    out: dict[str, Any] = {"objects": objects, "rate_source": source, "unit": unit, "units": units,
                           "per_unit_per_s": per_unit, "rate_per_s": rate, "hours": hours,
                           "unit_hours": hours * units, "bottleneck_stage": figures.bottleneck().get("stage")}
    if unit == "node":
        out["core_hours"] = hours * lay.cluster_cpus
    if gpu_hour_price is not None and unit == "gpu":
        out["gpu_hour_price"] = gpu_hour_price
        out["cost"] = hours * units * gpu_hour_price
    return out
