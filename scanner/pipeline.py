"""The scan on Ray Data: plan -> read and cut -> score -> write, streaming end to end.

The only module that wires Ray. Each tile is one read-and-cut task (memory bounded by a tile), the
scorer is an actor pool that loads the ensemble once per actor, and the writer emits atomic shards
plus a small summary per shard; the driver only sees those summaries, and marks a tile finished in
the manifest once all its objects are written. ``--resume`` then re-runs exactly the unfinished
tiles, after removing whatever partial shards they left.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from scanner import __version__, layout, storage
from scanner.catalog import iter_catalog
from scanner.config import PRECISIONS, ScanConfig
from scanner.console import quiet_ray_notices, without_ray_noise
from scanner.layout import read_candidates, read_failures  # noqa: F401 - users import them from here
from scanner.plan import Plan, load_plan, make_plan, read_tiles
from scanner.registry import Ensemble, load_ensemble
from scanner.stages import EnsembleScorer, ShardWriter, cut_tile
from scanner.tiles import describe_layout

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURES = 3
EXIT_REFUSED = 2


class ScanRefused(RuntimeError):
    """The scan cannot start; the message says why and what to do."""


@dataclass
class ScanResult:
    """Where a scan wrote its output and what it did."""

    out: str
    n_catalog: int
    n_scored: int
    n_failed: int
    seconds: float
    stamps_per_s: float
    models: list[dict[str, Any]] = field(default_factory=list)
    nodes: dict[str, list[str]] = field(default_factory=dict)  # Ray node ids that cut / scored
    # Rate from the first batch scored to the last: without the fixed start-up (planning,
    # workers, model loads) that a long scan amortises.
    steady_stamps_per_s: float = math.nan
    tile_layout: str = ""  # how the tiles were found, e.g. '9 tiles: 9 as {tile}_{band}.fits'

    @property
    def exit_code(self) -> int:
        return EXIT_OK if self.n_failed == 0 else EXIT_FAILURES

    def summary(self) -> str:
        return (f"scanned {self.n_catalog} objects: {self.n_scored} scored, {self.n_failed} failed, "
                f"{self.stamps_per_s:.0f} stamps/s -> {self.out}")


def root_cause(exc: BaseException) -> BaseException:
    """The innermost error behind Ray's wrappers (a task error wraps the stage's own exception)."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = getattr(exc, "cause", None) or exc.__cause__
        if not isinstance(inner, BaseException):
            break
        exc = inner
    return exc


def precision_used(config: ScanConfig) -> str:
    """The precision the scoring actors run: ``auto`` resolved for the device they get
    (``scanner.registry.autocast_dtype``), so a resume on another device is a different scan."""
    if config.precision != "auto":
        return config.precision
    return "bfloat16" if config.num_gpus_per_actor > 0 else "float32"


def _identity(config: ScanConfig, ensemble: Ensemble, bands: tuple[str, ...]) -> dict[str, Any]:
    """What makes two runs the same scan: inputs, bands, the exact model weights and everything
    that changes a score or a failure (precision, test-time augmentation, the missing-pixel
    limit)."""
    return {"tiles": config.tiles, "tile_pattern": config.tile_pattern, "catalog": config.catalog,
            "bands": list(bands), "models": [m["content_hash"] for m in ensemble.describe()],
            "input_spec": ensemble.input_spec.to_dict(), "precision": precision_used(config),
            "max_missing_fraction": config.max_missing_fraction, "tta": config.tta}


def resolve_bands(config: ScanConfig, ensemble: Ensemble) -> tuple[str, ...]:
    """The survey bands mapped, in order, to the model's channels; refuse a reordering.

    A band the models know must feed the channel it fed in training: ``--bands r,g,z`` against
    models of g,r,i would score swapped channels, silently. Survey bands the models do not know
    (z for i) map by position, with a warning.
    """
    model_bands = ensemble.input_spec.bands
    bands = tuple(config.bands) if config.bands else model_bands
    if len(bands) != len(model_bands):
        raise ScanRefused(f"--bands {','.join(bands)} gives {len(bands)} bands but the models take "
                          f"{len(model_bands)} ({','.join(model_bands)}); give one survey band per "
                          f"model channel, in the model's order")
    moved = [b for k, b in enumerate(bands) if b in model_bands and model_bands.index(b) != k]
    if moved:
        others = iter(b for b in bands if b not in model_bands)
        fixed = [m if m in bands else next(others) for m in model_bands]
        raise ScanRefused(f"--bands {','.join(bands)} reorders the models' bands "
                          f"{','.join(model_bands)} (band(s) {','.join(moved)} would feed another "
                          f"channel than in training); channels must come in the order the models "
                          f"were trained on: --bands {','.join(fixed)}")
    if bands != model_bands:
        logger.warning("mapping survey bands %s to model channels %s by position", bands, model_bands)
    return bands


def _refuse_inputs_in_output(config: ScanConfig) -> None:
    """Refuse an ``--out`` that is or holds one of the scan's own inputs: a scan writes into and
    clears its output, and must never touch the survey it reads."""
    inputs = [("--tiles", config.tiles), ("--catalog", config.catalog), ("--truth", config.truth),
              *(("--models", m) for m in config.model_dirs)]
    for flag, url in inputs:
        if url and storage.contains(config.out, url):
            raise ScanRefused(f"--out {config.out} is or contains the scan's input {flag} {url}; "
                              f"choose an --out outside every input (a new folder or prefix)")


def _output_action(config: ScanConfig, identity: dict[str, Any]) -> str:
    """What this run may do with ``--out``: 'new', 'resume' or 'overwrite'; refuse the rest.

    Touches nothing: the inputs are checked before anything is written or removed. Only an output
    holding a lensscan scan may be replaced, and only with ``--overwrite``.
    """
    held = layout.entries(config.out)
    if not held:
        return "new"
    if not layout.holds_scan(config.out):
        shown = ", ".join(held[:3]) + (", ..." if len(held) > 3 else "")
        raise ScanRefused(f"--out {config.out} already holds files that are not a lensscan scan "
                          f"({shown}); lensscan never deletes them, with or without --overwrite: "
                          f"choose a new or empty --out")
    if config.overwrite:
        return "overwrite"
    earlier = json.loads(storage.read_bytes(layout.identity_file(config.out)))
    if earlier != identity:
        diff = sorted(k for k in identity if earlier.get(k) != identity[k])
        raise ScanRefused(f"{config.out} holds a different scan (differs in {', '.join(diff)}); "
                          f"pass --overwrite to replace it or choose another --out")
    if not config.resume:
        raise ScanRefused(f"{config.out} already holds this scan; pass --resume to finish it "
                          f"or --overwrite to start again")
    return "resume"


def finished_tiles(out: str) -> dict[str, dict[str, Any]]:
    """Manifest entries of the tiles whose objects are all written."""
    fs, path = storage.filesystem(layout.manifest_dir(out))
    if not fs.exists(path):
        return {}
    done = {}
    for p in fs.glob(path + "/*.json"):
        entry = json.loads(fs.cat_file(p))
        done[entry["tile"]] = entry
    return done


def _remove_partial_shards(out: str, tiles: list[str]) -> None:
    """Delete shards an interrupted run left for tiles it did not finish."""
    for tile in tiles:
        for url in layout.tile_shard_dirs(out, tile):
            fs, path = storage.filesystem(url)
            if fs.exists(path):
                fs.rm(path, recursive=True)


def _ray_init(address: str | None) -> None:
    import ray

    quiet_ray_notices()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    # Our progress bar and summary say what the user needs; Ray Data's per-dataset INFO lines and
    # its note that its own progress bars are off do not.
    import ray.data  # noqa: F401 - configures Ray Data's loggers, which we then quieten

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)


# Without GPUs, every core scores: reading and cutting costs a few percent of a core per scoring
# actor (cut-only runs at 25-50x one actor's model-only rate, benchmarks/README.md), so the
# read-and-cut tasks hold a small share of the CPUs and the OS lends them the cycles. Leaving half
# the cores to cutting, as before, halved a CPU scan's rate.
CPU_SCAN_CUT_SHARE = 1 / 8  # of the cluster's CPUs, kept for read-and-cut tasks
MIN_CUT_TASK_CPUS = 0.25  # the least a read-and-cut task holds


@dataclass(frozen=True)
class ActorPool:
    """How a scan lays itself out on the cluster: scoring actors and what a read-and-cut task holds."""

    actors: int
    cpus_per_actor: float
    gpus_per_actor: float
    cut_task_cpus: float


def _actor_pool(config: ScanConfig) -> ActorPool:
    """The scoring actors and read-and-cut tasks' CPUs, from the cluster and the config.

    With GPUs: one actor per ``num_gpus_per_actor`` GPUs with one CPU each, whole cores for
    cutting (the GPUs' feed). Without: one actor per CPU, leaving ``CPU_SCAN_CUT_SHARE`` of them
    to cutting; a cut task holds what is left, between ``MIN_CUT_TASK_CPUS`` and one CPU, so
    fewer actors (``num_actors``) give cutting whole cores rather than more concurrent tiles.
    """
    import ray

    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    if config.num_gpus_per_actor > 0 and gpus == 0:
        raise ScanRefused("--num-gpus-per-actor > 0 but the Ray cluster has no GPU; drop the flag to "
                          "score on CPUs")
    if config.num_gpus_per_actor > 0:
        n = config.num_actors or max(1, int(gpus // config.num_gpus_per_actor))
        return ActorPool(n, 1.0, config.num_gpus_per_actor, 1.0)
    cpus = float(res.get("CPU", 1))
    n = config.num_actors or max(1, int(cpus))
    for_cutting = max(MIN_CUT_TASK_CPUS, cpus * CPU_SCAN_CUT_SHARE)
    per_actor = min(1.0, max(cpus - for_cutting, MIN_CUT_TASK_CPUS) / n)
    return ActorPool(n, per_actor, 0.0, min(1.0, max(MIN_CUT_TASK_CPUS, cpus - n * per_actor)))


def _prepare(config: ScanConfig, bands: tuple[str, ...], pixel_scale_arcsec: float,
             identity: dict[str, Any]) -> Plan:
    """The scan's plan: the earlier run's on ``--resume``, else a new one, made only after every
    check of the inputs and the output has passed, so a refused scan (even with ``--overwrite``)
    leaves ``--out`` as it was."""
    _refuse_inputs_in_output(config)
    try:
        action = _output_action(config, identity)
        plan = load_plan(config.out) if action == "resume" else None
    except OSError as exc:
        raise ScanRefused(f"cannot use --out {config.out}: {exc}; choose a readable, writable "
                          f"location") from exc
    tiles = None
    if plan is None:
        if config.catalog is None:
            raise ScanRefused("no --catalog given; give the survey's object catalog (objid, ra, dec)")
        next(iter_catalog(config.catalog, batch_rows=1))  # a missing, empty or column-less catalog
        tiles = read_tiles(config.tiles, config.tile_pattern, bands, pixel_scale_arcsec)
    try:
        if action == "overwrite":
            layout.remove_scan(config.out)
        storage.write_bytes_atomic(layout.identity_file(config.out),
                                   json.dumps(identity, indent=1).encode())
    except OSError as exc:
        raise ScanRefused(f"cannot write to --out {config.out}: {exc}; choose a writable location") from exc
    if plan is None:
        plan = make_plan(config.tiles, config.tile_pattern, bands, config.catalog, config.out,
                         pixel_scale_arcsec=pixel_scale_arcsec, tiles=tiles)
    return plan


def run_scan(config: ScanConfig, ensemble: Ensemble | None = None) -> ScanResult:
    """Scan ``config.tiles`` for lenses and write catalogs to ``config.out``.

    Returns a :class:`ScanResult` (also written as ``scan.json``). Raises :class:`ScanRefused`
    before doing any work when the inputs or the output location are not usable.
    """
    t0 = time.perf_counter()
    if config.precision not in PRECISIONS:
        # The scoring actors would fail to start, three times each, with a worse message.
        raise ScanRefused(f"precision {config.precision!r} is not one of {', '.join(PRECISIONS)}")
    ensemble = ensemble or load_ensemble(list(config.model_dirs))
    bands = resolve_bands(config, ensemble)
    spec = ensemble.input_spec
    plan = _prepare(config, bands, spec.pixel_scale_arcsec, _identity(config, ensemble, bands))
    models = ensemble.describe()
    metadata = {"lensscan_version": __version__, "models": models, "bands": list(bands),
                "input_spec": spec.to_dict()}
    stats = StreamStats()
    n_cut = 0
    for attempt in range(1, MAX_ATTEMPTS + 1):
        done = finished_tiles(config.out)
        todo = [t for t in plan.tiles if plan.objects_per_tile.get(t.name, 0) > 0 and t.name not in done]
        if not todo:
            break
        _remove_partial_shards(config.out, [t.name for t in todo])
        n_todo = sum(plan.objects_per_tile[t.name] for t in todo)
        logger.info("%d tiles to scan (%d objects), %d already finished", len(todo), n_todo, len(done))
        _ray_init(config.address)
        try:
            with without_ray_noise(), warnings.catch_warnings():
                # A scan of fewer tiles than scoring actors is fine; Ray Data's hint that the pool
                # could have fewer actors is not the user's to act on.
                warnings.filterwarnings("ignore", message="The minimum number of concurrent actors")
                _consume(_stream(config, plan, todo, ensemble, bands, metadata), plan, config.out,
                         n_todo, stats)
            n_cut += n_todo
        except Exception as exc:
            cause = root_cause(exc)
            if attempt == MAX_ATTEMPTS or not _is_system_failure(cause):
                raise
            # Ray retries tasks and restarts actors, but some losses (an actor on a node that
            # vanished mid-stream) still end the stream. The manifest makes a re-run exact: it
            # redoes only unfinished tiles, after removing what they had written.
            logger.warning("scan stream failed (%s: %s); re-running unfinished tiles, attempt %d/%d",
                           type(cause).__name__, str(cause).splitlines()[0][:200], attempt + 1,
                           MAX_ATTEMPTS)
    return _finish(config, plan, models, spec.to_dict(), time.perf_counter() - t0, n_cut, stats)


MAX_ATTEMPTS = 3


def _is_system_failure(exc: BaseException) -> bool:
    """Failures of the cluster (lost actors, nodes, objects), not of our code or data."""
    import ray.exceptions as rex

    return isinstance(exc, (rex.RayActorError, rex.ObjectLostError, rex.NodeDiedError,
                            rex.WorkerCrashedError, rex.RaySystemError))


def _stream(config: ScanConfig, plan: Plan, todo: list, ensemble: Ensemble, bands: tuple[str, ...],
            metadata: dict[str, Any]):
    """The Ray Data stream of one attempt: read-and-cut -> score -> write, for ``todo`` tiles."""
    import ray
    from ray.data import ActorPoolStrategy, DataContext

    spec = ensemble.input_spec
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    # A model load that keeps failing is a bug to report, not something to retry forever.
    ctx.max_consecutive_actor_init_deaths = 3
    # Start streaming once the whole scoring pool is up (GPU nodes may take minutes to join an
    # autoscaling cluster); otherwise the first actor takes the early batches alone (ray#60124).
    # A pool the cluster can never host fails after this wait with Ray's clear timeout error.
    ctx.wait_for_min_actors_s = 900
    # A lost node surfaces inside a consuming actor task as an actor or object error, which
    # Ray treats as the task's own; both stages are pure or idempotent, so retry those.
    ctx.actor_task_retry_on_errors = [ray.exceptions.RayActorError, ray.exceptions.ObjectLostError]
    pool = _actor_pool(config)
    items = [{"tile": t.name, "tile_json": json.dumps(t.to_dict())} for t in todo]

    def cut(batch: dict[str, np.ndarray]):
        for tile_json in batch["tile_json"]:
            yield from cut_tile(str(tile_json), config.out, spec, bands,
                                config.max_missing_fraction, chunk_rows=config.batch_size * 4)

    runtime_env = {"env_vars": storage.worker_env()}
    # Retries, chosen rather than inherited: a cut or write task lost with its node (a system
    # failure) is re-run up to 3 times; a scoring actor that dies is restarted up to 3 times
    # and its in-flight batches re-sent. Both are safe because shard names are a hash of their
    # objids, so a re-run replaces a file instead of duplicating rows. Errors raised by our own
    # code are not retried: stages turn them into failure rows instead.
    with warnings.catch_warnings():
        # Retry and restart limits have no named map_batches parameter in Ray 2.60 yet; the
        # deprecation notice of the keyword form is Ray's to settle, not the user's to read.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*deprecated")
        return (ray.data.from_items(items, override_num_blocks=len(items))
                .map_batches(cut, batch_size=1, num_cpus=pool.cut_task_cpus, runtime_env=runtime_env,
                             max_retries=3)
                .map_batches(EnsembleScorer, batch_size=config.batch_size, num_cpus=pool.cpus_per_actor,
                             num_gpus=pool.gpus_per_actor,
                             fn_constructor_kwargs={"model_dirs": list(config.model_dirs),
                                                    "use_gpu": pool.gpus_per_actor > 0,
                                                    "precision": config.precision,
                                                    "tta": config.tta},
                             compute=ActorPoolStrategy(size=pool.actors, max_tasks_in_flight_per_actor=2),
                             runtime_env=runtime_env, max_restarts=3, max_task_retries=3)
                .map_batches(ShardWriter, batch_size=4 * config.batch_size, batch_format="pyarrow",
                             num_cpus=0, runtime_env=runtime_env, max_restarts=3, max_task_retries=3,
                             fn_constructor_kwargs={"out": config.out, "score_columns": ensemble.columns,
                                                    "metadata": metadata},
                             compute=ActorPoolStrategy(size=1)))


@dataclass
class StreamStats:
    """What the driver saw of the streams: where stages ran, and when scoring happened."""

    nodes: dict[str, set[str]] = field(default_factory=lambda: {"cut": set(), "score": set()})
    scored_from: float = math.inf  # wall clock (s) when the first batch began scoring
    scored_to: float = -math.inf  # ... and when the last one finished
    n_objects: int = 0

    @property
    def steady_rate(self) -> float:
        """Objects/s from the first batch scored to the last: the scan's rate without its fixed
        start-up (planning, workers, model loads), which a long scan amortises."""
        dt = self.scored_to - self.scored_from
        return self.n_objects / dt if dt > 0 else math.nan


def _consume(ds, plan: Plan, out: str, n_todo: int, stats: StreamStats) -> None:
    """Drive the stream; mark each tile finished once every one of its objects is written."""
    written: dict[str, dict[str, tuple[int, int]]] = {}
    bar = tqdm(total=n_todo, desc="scan", unit="obj", smoothing=0.1)
    for row in ds.iter_rows():
        tile, shard = str(row["tile"]), str(row["shard"])
        shards = written.setdefault(tile, {})
        n_rows = int(row["n_scored"]) + int(row["n_failed"])
        if shard not in shards:
            bar.update(n_rows)
            stats.n_objects += n_rows
            stats.scored_from = min(stats.scored_from, float(row["scored_from"]))
            stats.scored_to = max(stats.scored_to, float(row["scored_to"]))
        shards[shard] = (int(row["n_scored"]), int(row["n_failed"]))
        stats.nodes["cut"].update(n for n in str(row["cut_nodes"]).split(",") if n)
        stats.nodes["score"].update(n for n in str(row["score_nodes"]).split(",") if n)
        n_scored = sum(s for s, _ in shards.values())
        n_failed = sum(f for _, f in shards.values())
        if n_scored + n_failed == plan.objects_per_tile[tile]:
            entry = {"tile": tile, "n_objects": plan.objects_per_tile[tile], "n_scored": n_scored,
                     "n_failed": n_failed, "shards": sorted(shards)}
            storage.write_bytes_atomic(layout.manifest_entry(out, tile), json.dumps(entry).encode())
    bar.close()


def _finish(config: ScanConfig, plan: Plan, models: list[dict], input_spec: dict, seconds: float,
            n_cut: int, stats: StreamStats) -> ScanResult:
    done = finished_tiles(config.out)
    n_scored = sum(e["n_scored"] for e in done.values())
    n_failed = plan.n_failed_plan + sum(e["n_failed"] for e in done.values())
    unfinished = [t.name for t in plan.tiles
                  if plan.objects_per_tile.get(t.name, 0) > 0 and t.name not in done]
    if unfinished:
        raise RuntimeError(f"scan ended with {len(unfinished)} tile(s) unfinished ({unfinished[:5]}); "
                           f"re-run with --resume")
    nodes = {k: sorted(v) for k, v in stats.nodes.items()}
    result = ScanResult(config.out, plan.n_catalog, n_scored, n_failed, seconds,
                        n_cut / seconds if seconds > 0 else math.nan, models, nodes, stats.steady_rate,
                        describe_layout(plan.tiles))
    if config.write_csv:
        write_csv(config.out)
    report = {"lensscan_version": __version__, "config": config.to_dict(), "models": models,
              "bands": list(plan.bands), "input_spec": input_spec,
              "n_catalog": plan.n_catalog, "n_scored": n_scored, "n_failed": n_failed,
              "n_tiles": len(plan.tiles), "n_tiles_unreadable": sum(t.error is not None for t in plan.tiles),
              "tile_layout": result.tile_layout,
              "seconds_last_run": seconds, "stamps_per_s_last_run": result.stamps_per_s,
              "steady_stamps_per_s_last_run": result.steady_stamps_per_s,
              "nodes_last_run": nodes}
    storage.write_bytes_atomic(layout.scan_file(config.out), json.dumps(report, indent=1).encode())
    if config.report_top_n > 0:
        from scanner.report import write_report

        try:
            write_report(config.out, truth=config.truth, top_n=config.report_top_n)
        except Exception as exc:  # noqa: BLE001 - the catalogs are the product; the page is a view
            logger.warning("scan finished but report.html could not be written: %s", exc)
    return result


def write_csv(out: str) -> str:
    """Write ``candidates.csv`` ranked by score (for catalogs that fit in memory)."""
    import pyarrow.csv as pacsv

    table = read_candidates(out)
    url = layout.csv_file(out)
    sink = pa.BufferOutputStream()
    pacsv.write_csv(table, sink)
    storage.write_bytes_atomic(url, sink.getvalue().to_pybytes())
    return url

