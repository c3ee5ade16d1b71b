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

#: Below this many seconds of steady flow the scan's steady rate is mostly its first and last shard.
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
    """Every tile under ``tiles_url`` whose headers could be read."""
    return [t for t in read_all_headers(discover_tiles(tiles_url, bands, pattern)) if t.shape]


Positions = dict[str, tuple[np.ndarray, np.ndarray]]


def cut_rate(tiles: list[Tile], positions: Positions, spec: InputSpec, repeats: int = 3) -> Rate:
    """Stamps/s of read + cut + normalise in this process (one core), tile files read each time.

    The warm-up cuts the first tile only: enough to import and fill caches, without reading the
    whole sample one extra time.
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
    """Samples the RSS of this process and every Ray worker process on this machine.

    Ray workers are separate processes; their peak RSS, not the driver's, is what grows if a
    stage holds more than one tile at a time. Only this machine's processes are seen: on a
    multi-node cluster, the workers of other nodes are not.
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


# --------------------------------------------------------------------------------------------
# What to measure on: a survey sample, mock or the user's own.


@dataclass(frozen=True)
class SurveySample:
    """Tiles and catalog to measure on: a mock survey written for the purpose, or the user's data.

    ``bands`` maps survey bands to the models' channels as the scan's ``--bands`` does (None: the
    models' own bands).
    """

    tiles_url: str
    tile_pattern: str
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
    ones, because the scan writes a shard per tile and batch, and its steady rate (first to last
    shard) needs several shards to mean anything. One lens per tile: the rate does not depend on
    lenses, and painting them is slow.
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
        return max(1.0, self.cluster_cpus - self.actors * self.cpus_per_actor)

    @property
    def gpus_used(self) -> float:
        return self.actors * self.gpus_per_actor

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "cut_cores": self.cut_cores, "gpus_used": self.gpus_used}


def scoring_layout(gpus_per_actor: float = 0.0) -> ScoringLayout:
    """The scan's actor pool on the connected Ray cluster, as ``run_scan`` sizes it by default.

    Mirrors ``scanner.pipeline._actor_pool`` (one actor per ``gpus_per_actor`` GPUs, or half the
    CPUs without GPUs; one CPU per actor); ``tests/test_bench.py`` checks the two agree.
    """
    import ray

    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 1)), float(res.get("GPU", 0))
    nodes = sum(1 for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0)
    if gpus_per_actor > 0:
        if gpus == 0:
            raise ValueError("--gpus-per-actor > 0 but the Ray cluster has no GPU; give 0 to score on CPUs")
        actors = max(1, int(gpus // gpus_per_actor))
    else:
        actors = max(1, int(cpus) // 2)
    return ScoringLayout(actors, 1.0, gpus_per_actor, cpus, gpus, max(1, nodes))


# --------------------------------------------------------------------------------------------
# Measuring the stages


def _worker_env() -> dict[str, Any]:
    # The scan's own runtime_env, so these tasks reach the same storage and reuse its workers.
    return {"env_vars": storage.worker_env()}


def _model_probe(model_dirs: Sequence[str], use_gpu: bool, tiles: list[Tile], positions: Positions,
                 spec: InputSpec, batch_size: int, repeats: int) -> tuple[Rate, dict[str, Any]]:
    """Model-only rate in a Ray task holding one scoring actor's resources; also its machine."""
    from scanner.stages import EnsembleScorer

    # The scorer the scan's actors run: same model loading, device choice and .to() path.
    scorer = EnsembleScorer(model_dirs, use_gpu=use_gpu)
    stamps = scan_stamps(tiles, positions, spec, limit=MODEL_STAMPS_MAX)
    return model_rate(scorer.ensemble, stamps, batch_size, repeats), machine()


def _warmup_catalog(sample: SurveySample, n_objects: int, work_dir: str) -> str:
    """A catalog of the sample's first ``n_objects`` objects, for a short warm-up scan."""
    from scanner.catalog import iter_catalog, table_to_bytes

    first = next(iter_catalog(sample.catalog_url, n_objects))
    key = _key({"catalog": sample.catalog_url, "n": n_objects})
    url = storage.join(work_dir, f"warmup-catalog-{key}.parquet")
    storage.write_bytes_atomic(url, table_to_bytes(first.drop_columns(["row"])))
    return url


#: Shards written less than this apart come from one call of the scan's writer (a call writes its
#: shards back to back, in milliseconds on disk; the next call waits for the scorer to fill a batch).
BURST_GAP_S = 0.25


def _modified_s(info: dict[str, Any]) -> float:
    """A file's modification time (epoch seconds) from an fsspec listing, whatever the store."""
    for key in ("mtime", "LastModified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            from datetime import datetime

            value = datetime.fromisoformat(value.replace("Z", "+00:00"))
        return value.timestamp()
    raise ValueError(f"{info.get('name')}: the file system gives no modification time")


def shard_write_times(out: str) -> list[tuple[float, int]]:
    """(write time, rows) of every shard a scan wrote to ``out``, candidates and cut failures, in time order.

    The plan's own failures (``failures/_plan``, ``failures/_tiles``) are left out: they are written
    before any stamp is cut.
    """
    import pyarrow.parquet as pq

    from scanner.plan import failures_dir
    from scanner.stages import candidates_dir

    events = []
    for root in (candidates_dir(out), failures_dir(out)):
        fs, path = storage.filesystem(root)
        if not fs.exists(path):
            continue
        for name, info in fs.find(path, detail=True).items():
            rel = name[len(path):].lstrip("/")
            if not name.endswith(".parquet") or rel.startswith("_") or "/." in name:
                continue
            with fs.open(name, "rb") as f:
                events.append((_modified_s(info), pq.read_metadata(f).num_rows))
    return sorted(events)


def steady_rate_from_shards(events: Sequence[tuple[float, int]], gap_s: float = BURST_GAP_S) -> float:
    """Stamps/s once stamps flow, from shard write times on the writer's side; NaN if one burst.

    The first burst of shards (those written less than ``gap_s`` apart from the first) carries
    the start-up; the rate is the rows written after it over the time from its last shard to the
    scan's last shard. It is what ``ScanResult.steady_stamps_per_s`` means, timed where the shards
    are written rather than where the driver receives their summaries, which Ray Data can hand
    over in a bunch at the end of a short scan.
    """
    if not events:
        return math.nan
    k = 1
    while k < len(events) and events[k][0] - events[k - 1][0] < gap_s:
        k += 1
    if k == len(events):
        return math.nan
    t_end_first = events[k - 1][0]
    dt = events[-1][0] - t_end_first
    rows_after = sum(n for _, n in events[k:])
    return rows_after / dt if dt > 0 else math.nan


@dataclass
class ScanRun:
    """One end-to-end scan: wall seconds, steady rates and stamps cut."""

    seconds: float
    steady_per_s: float  # from shard write times
    steady_per_s_driver: float  # ScanResult.steady_stamps_per_s: when the driver saw the shards
    stamps: int
    memory: dict[str, float]


def scan_once(sample: SurveySample, model_dirs: Sequence[str], out: str, batch_size: int,
              gpus_per_actor: float = 0.0, catalog: str | None = None) -> ScanRun:
    """Run ``run_scan`` on ``sample`` into ``out`` (replaced), without a report; time and sample memory.

    ``stamps`` counts the objects the scan cut (scored or failed at the cut), which is what both
    the wall and the steady rate divide.
    """
    from scanner.pipeline import run_scan

    config = ScanConfig(tiles=sample.tiles_url, catalog=catalog or sample.catalog_url, out=out,
                        model_dirs=tuple(model_dirs), bands=sample.bands, tile_pattern=sample.tile_pattern,
                        batch_size=batch_size, num_gpus_per_actor=gpus_per_actor, overwrite=True,
                        report_top_n=0)
    with MemorySampler() as mem:
        t = time.perf_counter()
        result = run_scan(config)
        secs = time.perf_counter() - t
    events = shard_write_times(out)
    return ScanRun(secs, steady_rate_from_shards(events), result.steady_stamps_per_s,
                   sum(n for _, n in events), mem.to_dict())


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
    scan_steady_driver: list[float] = field(default_factory=list)  # ScanResult's, per repeat
    memory: dict[str, float] = field(default_factory=dict)
    worker_machine: dict[str, Any] = field(default_factory=dict)

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
                          "how": "read + cut + normalise in one Ray task holding 1 CPU, times the "
                                 "cores the scoring actors leave"}
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
                           "steady_per_s_driver": [v if math.isfinite(v) else None
                                                   for v in self.scan_steady_driver],
                           **self._per_unit(self.scan_steady.per_s),
                           "how": "run_scan end to end; steady: shards written after the first "
                                  "writer call, over the time to the last shard (file write times); "
                                  "steady_per_s_driver: ScanResult.steady_stamps_per_s per repeat; "
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
                   repeats: int = 3) -> StageFigures:
    """Measure cut-only, model-only and the end-to-end scan on the same stamps of ``sample``.

    Runs on the Ray cluster this process is connected to (call ``ray.init`` first). Cut-only and
    model-only run in Ray tasks holding what the scan's cut task and scoring actor hold, on the
    objects the scan's plan puts on each tile; the scan is ``run_scan`` itself, repeated
    ``repeats`` times after a warm-up scan of ``2 x batch_size`` objects. Intermediate files (plan,
    scan output) go under ``work_dir``, which every node must see on a multi-node cluster.

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
    # Tiles are read through the band names of the survey, mapped to the model's channels.
    survey_spec = dataclasses.replace(spec, bands=bands)

    if "cut" in stages:
        logger.info("cut-only: %d stamps from %d tiles, a short warm-up + %d repeats in a 1-CPU task",
                    n_stamps, len(tiles), repeats)
        task = ray.remote(cut_rate).options(num_cpus=1, runtime_env=_worker_env())
        figures.cut = ray.get(task.remote(tiles, positions, survey_spec, repeats))
        logger.info("cut-only: %.0f stamps/s per core (spread %.2f)", figures.cut.per_s, figures.cut.spread)

    if "model" in stages:
        logger.info("model-only: %d versions, batch %d, a warm-up + %d repeats with one scoring "
                    "actor's resources (%g CPU, %g GPU)", len(ensemble), batch_size, repeats,
                    layout.cpus_per_actor, layout.gpus_per_actor)
        task = ray.remote(_model_probe).options(num_cpus=layout.cpus_per_actor,
                                                num_gpus=layout.gpus_per_actor, runtime_env=_worker_env())
        figures.model, figures.worker_machine = ray.get(task.remote(
            list(model_dirs), layout.gpus_per_actor > 0, tiles, positions, survey_spec, batch_size, repeats))
        logger.info("model-only: %.0f stamps/s per actor, %.0f for the pool of %d (spread %.2f)",
                    figures.model.per_s, figures.model_pool_per_s, layout.actors, figures.model.spread)

    if "scan" in stages:
        out = storage.join(work_dir, "scan-out")
        warm_catalog = _warmup_catalog(sample, 2 * batch_size, work_dir)
        logger.info("scan: warm-up on %d objects (not timed)", 2 * batch_size)
        scan_once(sample, model_dirs, out, batch_size, layout.gpus_per_actor, catalog=warm_catalog)
        runs = []
        for k in range(repeats):
            logger.info("scan: repeat %d/%d on %d stamps", k + 1, repeats, n_stamps)
            runs.append(scan_once(sample, model_dirs, out, batch_size, layout.gpus_per_actor))
            logger.info("scan: %.0f stamps/s wall, %.0f steady", runs[-1].stamps / runs[-1].seconds,
                        runs[-1].steady_per_s)
            if runs[-1].stamps != n_stamps:
                raise RuntimeError(f"the scan wrote {runs[-1].stamps} rows but the plan cut {n_stamps}: "
                                   f"{out} was changed while the bench ran")
        fs, path = storage.filesystem(out)
        fs.rm(path, recursive=True)
        steady = [r.steady_per_s for r in runs if math.isfinite(r.steady_per_s)]
        if not steady:
            raise RuntimeError(f"the scan wrote all its shards in one burst, so it has no steady rate; "
                               f"raise the number of stamps (now {n_stamps}) or lower --batch-size "
                               f"(now {batch_size})")
        items = runs[0].stamps
        figures.scan_wall = Rate(items, [r.seconds for r in runs])
        figures.scan_steady = Rate.from_rates(items, steady)
        figures.scan_steady_driver = [r.steady_per_s_driver for r in runs]
        figures.memory = {k: max(r.memory[k] for r in runs) for k in runs[0].memory}
        steady_s = items / figures.scan_steady.per_s
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
