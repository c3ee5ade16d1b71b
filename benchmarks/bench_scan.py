"""Scan stage rates on the same stamps, in one run: cut-only (FITS and .fits.fz), model-only,
end-to-end, their ratio, a naive per-object loop, end-to-end by number of scoring actors, and peak
memory against survey size.

    python benchmarks/bench_scan.py                 # defaults: 4 tiles of 2048 px, memory 4 vs 16 tiles
    python benchmarks/bench_scan.py --help

Cut-only, model-only and end-to-end come from ``scanner.bench.measure_stages``, the code behind
``lensscan bench``; this script adds the .fits.fz cut, the naive loop, the scaling over actors
and memory against survey size. Prints a table and saves JSON (machine, versions, parameters, figures) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_naive import naive_rate  # this folder: the script's own directory is on sys.path
from scanner.bench import SurveySample, machine, measure_stages, planned_positions, scan_once
from scanner.config import PRECISIONS
from scanner.mock_survey import MockSurveyConfig, make_mock_survey, open_mock_survey
from scanner.registry import default_models_dir, load_ensemble

RESULTS = Path(__file__).parent / "results"


def survey(root: Path, n_tiles: int, size: int, compress: bool, seed: int):
    url = str(root / f"survey-{n_tiles}x{size}-{'fz' if compress else 'fits'}-{seed}")
    return open_mock_survey(url) or make_mock_survey(url, MockSurveyConfig(
        n_tiles=n_tiles, size_pix=size, n_lenses=4, seed=seed, compress=compress))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=4, help="tiles for the stage figures")
    ap.add_argument("--size", type=int, default=2048, help="tile side (pixels)")
    ap.add_argument("--memory-tiles", default="4,16", help="survey sizes (tiles of 1024 px) for peak memory")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per stage after a warm-up")
    ap.add_argument("--precision", choices=PRECISIONS, default="auto", help="the scan's forward "
                    "precision (the naive loop stays float32, as the research code ran)")
    ap.add_argument("--naive-stamps", type=int, default=300, help="stamps timed in the naive loop")
    ap.add_argument("--actors", default="1,2", help="scoring actor counts for the scaling figure: one "
                    "end-to-end scan each on the stage figures' survey")
    ap.add_argument("--models", default=str(default_models_dir()))
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for the local Ray cluster")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lensscan-bench"),
                    help="where mock surveys are generated once")
    ap.add_argument("--json", default=str(RESULTS / "scan.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("scanner.bench").setLevel(logging.INFO)

    import ray
    import torch

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    ens = load_ensemble([args.models])
    spec = ens.input_spec
    plain = SurveySample.from_mock(survey(cache, args.tiles, args.size, False, 11))
    packed = SurveySample.from_mock(survey(cache, args.tiles, args.size, True, 11))

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    stages = measure_stages(plain, [args.models], str(cache), batch_size=args.batch_size,
                            repeats=args.repeats, precision=args.precision)
    cut_fz = measure_stages(packed, [args.models], str(cache), stages=("cut",), repeats=args.repeats).cut

    torch.set_num_threads(1)  # the naive loop on one core, like one scoring actor
    tiles, pos = planned_positions(plain, spec.bands, str(cache))
    naive, n_naive = naive_rate(tiles, pos, ens, args.naive_stamps)

    scaling = []
    for n in [int(v) for v in args.actors.split(",") if v]:
        run = scan_once(plain, [args.models], str(cache / f"scaling-out-{n}"), args.batch_size,
                        precision=args.precision, num_actors=n)
        scaling.append({"actors": n, "stamps": run.stamps, "wall_per_s": run.stamps / run.seconds,
                        "steady_per_s": run.steady_per_s})
        logging.getLogger("scanner.bench").info("scaling: %d actor(s): %.0f/s steady, %.0f/s wall", n,
                                                run.steady_per_s, run.stamps / run.seconds)

    memory = []
    for n in [int(v) for v in args.memory_tiles.split(",") if v]:
        s = SurveySample.from_mock(survey(cache, n, 1024, False, 12))
        run = scan_once(s, [args.models], str(cache / f"mem-out-{n}"), args.batch_size,
                        precision=args.precision)
        memory.append({"tiles": n, "objects": run.stamps, "seconds": run.seconds, **run.memory})

    lay = stages.layout
    cut_plain, model_1 = stages.cut, stages.model
    model_pool = stages.model_pool_per_s
    e2e, steady = stages.scan_wall.per_s, stages.scan_steady.per_s
    result = {
        "benchmark": "scan", "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "parameters": {"tiles": args.tiles, "size_pix": args.size, "batch_size": args.batch_size,
                       "repeats": args.repeats, "ray_cpus": args.cpus, "scoring_actors": lay.actors,
                       "precision": stages.precision,
                       "torch_threads_per_actor": 1, "models": [m["path"] for m in ens.describe()],
                       "stamp_size_pix": spec.stamp_size_pix, "bands": list(spec.bands),
                       "stamps": stages.stamps},
        "cut_fits_per_core": cut_plain.to_dict(), "cut_fz_per_core": cut_fz.to_dict(),
        "model_only_per_actor": model_1.to_dict(), "model_only_pool_per_s": model_pool,
        "naive_loop_per_s": naive, "naive_loop_stamps": n_naive,
        "ratio_ours_over_naive": e2e / naive, "ratio_steady_over_naive": steady / naive,
        "end_to_end_per_s": e2e, "end_to_end_seconds": stages.scan_wall.seconds,
        "end_to_end_steady_per_s": steady, "end_to_end": stages.stages()["scan"],
        "ratio_end_to_end_over_model_only": e2e / model_pool,
        "ratio_steady_over_model_only": steady / model_pool, "memory": memory, "scaling": scaling,
        "bottleneck": stages.bottleneck(),
    }
    if len(memory) >= 2:
        result["memory_ratio_largest_over_smallest"] = (memory[-1]["peak_worker_rss_mb"]
                                                        / memory[0]["peak_worker_rss_mb"])
    ray.shutdown()

    rows = [("cut-only, FITS (stamps/s per core)", cut_plain.per_s, cut_plain.spread),
            ("cut-only, .fits.fz (stamps/s per core)", cut_fz.per_s, cut_fz.spread),
            (f"model-only, 1 actor ({len(ens)} versions, batch {args.batch_size})", model_1.per_s,
             model_1.spread),
            (f"model-only, pool of {lay.actors}", model_pool, model_1.spread),
            ("end-to-end scan, wall incl. start-up (stamps/s)", e2e, stages.scan_wall.spread),
            ("end-to-end scan, steady (first to last batch scored)", steady, stages.scan_steady.spread),
            ("end-to-end / model-only (wall)", e2e / model_pool, float("nan")),
            ("end-to-end / model-only (steady)", steady / model_pool, float("nan")),
            (f"naive loop (Cutout2D, 1 stamp/forward; {n_naive} stamps)", naive, float("nan")),
            ("ours (end-to-end, wall) / naive", e2e / naive, float("nan")),
            ("ours (end-to-end, steady) / naive", steady / naive, float("nan"))]
    print(f"\nforward precision of the scan: {stages.precision}; the naive loop: float32")
    print(f"\n{'figure':58s} {'value':>10s} {'spread':>7s}")
    for name, v, sp in rows:
        print(f"{name:58s} {v:10.2f} {sp:7.2f}")
    for s in scaling:
        print(f"end-to-end with {s['actors']} scoring actor(s): {s['steady_per_s']:.0f} stamps/s steady, "
              f"{s['wall_per_s']:.0f} wall ({s['steady_per_s'] / scaling[0]['steady_per_s']:.2f}x steady)")
    for m in memory:
        print(f"peak worker RSS, {m['tiles']:3d} tiles ({m['objects']} objects): "
              f"{m['peak_worker_rss_mb']:.0f} MiB (driver {m['peak_driver_rss_mb']:.0f} MiB)")
    if "memory_ratio_largest_over_smallest" in result:
        print(f"memory ratio {memory[-1]['tiles']}/{memory[0]['tiles']} tiles: "
              f"{result['memory_ratio_largest_over_smallest']:.2f}")
    print(f"bottleneck: {result['bottleneck']['stage']}; {result['bottleneck']['verdict']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
