"""``lensscan bench``: measure the scan's stages on your own hardware and project a survey scan.

The figures come from :mod:`scanner.bench`, the same measuring code as ``benchmarks/``; this
module only reads the command line, prints the table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from typing import Any

from scanner.bench import STAGES, StageFigures
from scanner.config import PRECISIONS

logger = logging.getLogger(__name__)

DEFAULT_STAMPS = 4096


def _stages(text: str) -> tuple[str, ...]:
    stages = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in stages if s not in STAGES]
    if not stages or unknown:
        raise argparse.ArgumentTypeError(f"--stages {text!r}: give a comma-separated subset of "
                                         f"{','.join(STAGES)}")
    return stages


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a number >= 0")
    return value


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lensscan bench`` to the ``lensscan`` command."""
    p = subparsers.add_parser(
        "bench", help="measure cut-only, model-only and end-to-end scan rates on this Ray cluster "
        "and project a survey scan's time and cost",
        description="Measure each stage of the scan on the same stamps, on the Ray cluster it is "
        "pointed at (a local one by default): cut-only, model-only (the ensemble's forward) and the "
        "end-to-end scan, with medians and spreads over repeats after a warm-up. Prints a table and "
        "writes the figures with the machine description as JSON. With --objects, projects the wall "
        "time and cost of a survey scan.")
    p.add_argument("--models", nargs="+", help="model registry dirs, as for scan (default: the "
                   "built-in ensemble)")
    p.add_argument("--stages", type=_stages, default=STAGES, help="stages to measure, a subset of "
                   "cut,model,scan (default: all)")
    p.add_argument("--stamps", type=_positive_int, default=DEFAULT_STAMPS, help="about how many "
                   "stamps the mock survey holds (default: %(default)s; on GPUs give ~10^5 per GPU "
                   "so the scan's steady part lasts tens of seconds)")
    p.add_argument("--batch-size", type=_positive_int, default=256, help="stamps per model forward, "
                   "as for scan (default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="the models' forward "
                   "precision, as for scan (default: %(default)s)")
    p.add_argument("--repeats", type=_positive_int, default=3, help="timed repeats per stage after "
                   "the warm-up; the median is reported with the spread (default: %(default)s)")
    p.add_argument("--address", help="Ray cluster address (auto, ray://host:10001); default: a "
                   "local cluster")
    p.add_argument("--gpus-per-actor", type=_non_negative, help="GPUs per scoring actor, as the "
                   "scan's --num-gpus-per-actor (default: 1 when the cluster has GPUs, else 0)")
    p.add_argument("--tiles", help="measure on your own tiles (a sample: a few tiles) instead of a "
                   "mock survey; needs --catalog")
    p.add_argument("--catalog", help="catalog of the objects on --tiles (objid, ra, dec)")
    p.add_argument("--tile-pattern", help="file names of --tiles, as for scan (default: discover "
                   "per-band and multi-extension tiles)")
    p.add_argument("--bands", help="survey bands of --tiles in the models' channel order")
    p.add_argument("--compress", action="store_true", help="write the mock survey's tiles "
                   "Rice-compressed (.fits.fz), as many surveys ship them")
    p.add_argument("--work-dir", help="where the mock survey is generated once and the scan writes; "
                   "on a multi-node cluster, storage every node sees (s3://...) "
                   "(default: $LENSSCAN_CACHE/bench, i.e. ~/.cache/lensscan/bench)")
    p.add_argument("--objects", type=float, help="project a scan of this many objects, e.g. 2e10")
    p.add_argument("--gpus", type=_non_negative, help="GPUs to project on (default: those the scan "
                   "used here; without GPUs the projection is per CPU node like the measured ones)")
    p.add_argument("--gpu-hour-price", type=_non_negative, help="price of one GPU-hour, for the "
                   "projected cost")
    p.add_argument("--json", default="lensscan-bench.json", help="where to write the figures "
                   "(default: %(default)s)")
    p.set_defaults(func=cmd_bench)


def _refuse(message: str) -> int:
    print(f"lensscan bench: refused: {message}", file=sys.stderr)
    return 2


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``lensscan bench``: 0 when measured, 2 when refused, 1 when a measurement failed."""
    import ray

    from scanner import storage
    from scanner.bench import SurveySample, bench_survey, machine, measure_stages, project_survey
    from scanner.catalog import CatalogError
    from scanner.cli import cache_dir
    from scanner.pipeline import ScanRefused, root_cause
    from scanner.registry import RegistryError, default_models_dir, load_ensemble

    if (args.tiles is None) != (args.catalog is None):
        return _refuse("--tiles and --catalog go together: give both to measure on your own data, "
                       "or neither for a mock survey")
    if args.objects is not None and not args.objects > 0:
        return _refuse(f"--objects {args.objects:g}: give the number of objects to project, e.g. 2e10")
    if args.objects is None and (args.gpus is not None or args.gpu_hour_price is not None):
        return _refuse("--gpus and --gpu-hour-price shape a projection: give --objects too")
    # Progress lines of the measuring code, even without -v.
    bench_logger = logging.getLogger("scanner.bench")
    if bench_logger.getEffectiveLevel() > logging.INFO:
        bench_logger.setLevel(logging.INFO)

    models = list(args.models) if args.models else [str(default_models_dir())]
    work_dir = args.work_dir or str(cache_dir() / "bench")
    started_ray = not ray.is_initialized()
    try:
        ensemble = load_ensemble(models)
        spec = ensemble.input_spec
        if started_ray:
            ray.init(address=args.address, log_to_driver=False, configure_logging=False)
        n_nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        remote = (args.address or "").startswith("ray://") or n_nodes > 1
        if remote and "://" not in work_dir:
            logger.warning("--work-dir %s is a local path: workers on other machines cannot read the "
                           "survey or write the scan there; give storage every node sees (s3://...)",
                           work_dir)
        gpus_per_actor = args.gpus_per_actor
        if gpus_per_actor is None:
            gpus_per_actor = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
        # Refused before minutes of measuring, not after (project_survey says the same).
        if args.gpus and gpus_per_actor == 0:
            return _refuse(f"--gpus {args.gpus:g} but the scan would score on CPUs here: measure on a "
                           f"GPU cluster (--gpus-per-actor 1) to project GPUs")
        if args.gpus == 0 and gpus_per_actor > 0:
            return _refuse("--gpus 0 but the scan would score on GPUs here: give the GPUs to project "
                           "on, or --gpus-per-actor 0 to measure and project CPU nodes")
        if args.tiles is None:
            survey = bench_survey(work_dir, args.stamps, compress=args.compress, bands=spec.bands)
            sample = SurveySample.from_mock(survey)
        else:
            bands = tuple(b.strip() for b in args.bands.split(",") if b.strip()) if args.bands else None
            sample = SurveySample(args.tiles, args.tile_pattern, args.catalog, bands)
        figures = measure_stages(sample, models, work_dir, stages=args.stages, batch_size=args.batch_size,
                                 gpus_per_actor=gpus_per_actor, repeats=args.repeats,
                                 precision=args.precision)
        projection = (project_survey(figures, args.objects, args.gpus, args.gpu_hour_price)
                      if args.objects is not None else None)
        if projection and args.gpu_hour_price is not None and "cost" not in projection:
            logger.warning("--gpu-hour-price is not used: the scan scored on CPUs, so the projection "
                           "is in node-hours")
    except (ScanRefused, RegistryError, CatalogError, FileNotFoundError, ValueError) as exc:
        return _refuse(str(exc))
    except Exception as exc:  # noqa: BLE001 - one line for the user; the traceback is in -v logs
        cause = root_cause(exc)
        logger.debug("bench failed", exc_info=exc)
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        print(f"lensscan bench: failed: {type(cause).__name__}: {first}", file=sys.stderr)
        return 1
    finally:
        if started_ray and ray.is_initialized():
            ray.shutdown()

    report = bench_report(figures, projection, machine(), {
        "stamps_requested": args.stamps if args.tiles is None else None, "stamps": figures.stamps,
        "tiles": figures.tiles, "survey": {"tiles": sample.tiles_url, "tile_pattern": sample.tile_pattern,
                                           "catalog": sample.catalog_url, "mock": args.tiles is None},
        "models": models, "versions": len(ensemble), "input_spec": spec.to_dict(),
        "batch_size": args.batch_size, "repeats": args.repeats, "stages": list(args.stages),
        "precision": args.precision, "model_precision": figures.precision or None,
        "address": args.address, "work_dir": work_dir, **figures.layout.to_dict()})
    print(format_table(report))
    storage.write_bytes_atomic(args.json, json.dumps(report, indent=1).encode())
    print(f"saved {args.json}")
    return 0


def bench_report(figures: StageFigures, projection: dict[str, Any] | None, driver: dict[str, Any],
                 parameters: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: machine, parameters, stages, ratios, memory, bottleneck, projection."""
    lay = figures.layout
    described = dict(figures.worker_machine or driver)
    described["cluster"] = {"cpus": lay.cluster_cpus, "gpus": lay.cluster_gpus, "nodes": lay.nodes}
    described["driver"] = driver
    memory = ({**figures.memory, "where": "the cluster's workers on the driver's machine"}
              if figures.memory else {})
    return {"benchmark": "lensscan bench", "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "machine": described, "parameters": parameters, "stages": figures.stages(),
            "ratios": figures.ratios(), "memory": memory, "bottleneck": figures.bottleneck(),
            "projection": projection}


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    return f"{value:,.{digits}f}"


def format_table(report: dict[str, Any]) -> str:
    """The report as the table ``lensscan bench`` prints."""
    m, p, stages = report["machine"], report["parameters"], report["stages"]
    spec = p["input_spec"]
    gpus = ", ".join(m["gpus"]) or "no GPU"
    lines = [
        f"lensscan bench: {p['versions']} model versions, {spec['stamp_size_pix']} px "
        f"{','.join(spec['bands'])} stamps, {p['stamps']} stamps on {p['tiles']} tiles, batch "
        f"{p['batch_size']}, {p.get('model_precision') or p.get('precision', 'auto')}, median of "
        f"{p['repeats']} repeat(s)",
        f"machine: {m['cpu']}, {m['cores']} cores, {gpus}; torch {m['torch']}, ray {m['ray']}",
        f"cluster: {m['cluster']['cpus']:g} CPUs, {m['cluster']['gpus']:g} GPUs, {m['cluster']['nodes']} "
        f"node(s); scan layout: {p['actors']} scoring actor(s) ({p['cpus_per_actor']:g} CPU, "
        f"{p['gpus_per_actor']:g} GPU each), {p['cut_cores']:g} cutting core(s)",
        "",
        f"{'stage':44s} {'stamps/s':>10s} {'spread':>7s} {'per core':>9s} {'per GPU':>9s}",
    ]

    def row(name: str, per_s: float, spread: float | None, per_core: float | None,
            per_gpu: float | None) -> None:
        lines.append(f"{name:44s} {_fmt(per_s):>10s} {_fmt(spread, 2):>7s} {_fmt(per_core):>9s} "
                     f"{_fmt(per_gpu):>9s}")

    if "cut" in stages:
        c = stages["cut"]
        row(f"cut-only ({c['cores']:g} cutting core(s))", c["per_s"], c["spread"], c["per_core"],
            c.get("per_gpu"))
    if "model" in stages:
        s = stages["model"]
        row("model-only, 1 actor", s["per_actor"], s["spread"], s.get("per_core"), s.get("per_gpu"))
        row(f"model-only, pool of {s['actors']} actor(s)", s["per_s"], s["spread"], None, None)
    if "scan" in stages:
        s = stages["scan"]
        cores = report["machine"]["cluster"]["cpus"]
        gpus_used = p["gpus_used"] or None
        row("end-to-end scan, steady (scoring span)", s["steady_per_s"], s["steady_spread"],
            s["steady_per_s"] / cores, s["steady_per_s"] / gpus_used if gpus_used else None)
        row("end-to-end scan, wall (incl. start-up)", s["wall_per_s"], s["wall_spread"],
            s["wall_per_s"] / cores, s["wall_per_s"] / gpus_used if gpus_used else None)
    r = report["ratios"]
    if r:
        lines.append(f"\nend-to-end / model-only: steady {r['scan_steady_over_model']:.2f}, "
                     f"wall {r['scan_wall_over_model']:.2f}")
    mem = report["memory"]
    if mem:
        lines.append(f"peak memory: {mem['peak_worker_rss_mb']:,.0f} MiB in the largest worker, "
                     f"{mem['peak_driver_rss_mb']:,.0f} MiB driver, {mem['peak_total_rss_mb']:,.0f} MiB "
                     f"in all ({mem['where']})")
    b = report["bottleneck"]
    if b:
        lines.append(f"bottleneck: {b['stage']} ({_fmt(b['per_s'])} stamps/s); {b['verdict']}")
    proj = report["projection"]
    if proj:
        where = (f"{proj['units']:g} GPU(s)" if proj["unit"] == "gpu"
                 else f"{proj['units']:g} CPU node(s) like this cluster's")
        text = (f"projection: {proj['objects']:.3g} objects on {where} at {_fmt(proj['rate_per_s'])} "
                f"stamps/s ({proj['rate_source']}): {proj['hours']:,.1f} h wall, "
                f"{proj['unit_hours']:,.1f} {'GPU' if proj['unit'] == 'gpu' else 'node'}-hours")
        if "core_hours" in proj:
            text += f", {proj['core_hours']:,.0f} core-hours"
        if "cost" in proj:
            text += f", cost {proj['cost']:,.2f} at {proj['gpu_hour_price']:g} per GPU-hour"
        if proj.get("bottleneck_stage"):
            text += f"; limited by the {proj['bottleneck_stage']} stage"
        lines.append(text)
    return "\n".join(lines)
