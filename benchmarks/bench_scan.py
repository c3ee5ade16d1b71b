"""Scan stage rates on the same stamps, in one run: cut-only (FITS and .fits.fz), model-only,
end-to-end, their ratio, and peak memory against survey size.

    python benchmarks/bench_scan.py                 # defaults: 4 tiles of 2048 px, memory 4 vs 16 tiles
    python benchmarks/bench_scan.py --help

Prints a table and saves JSON (machine, versions, parameters, figures) to benchmarks/results/.
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

import numpy as np

from scanner.bench import MemorySampler, cut_rate, machine, model_rate, tiles_with_pixels
from scanner.config import ScanConfig
from scanner.mock_survey import MockSurveyConfig, make_mock_survey, open_mock_survey
from scanner.plan import make_plan, read_tile_objects
from scanner.pipeline import run_scan
from scanner.registry import default_models_dir, load_ensemble

RESULTS = Path(__file__).parent / "results"


def survey(root: Path, n_tiles: int, size: int, compress: bool, seed: int):
    url = str(root / f"survey-{n_tiles}x{size}-{'fz' if compress else 'fits'}-{seed}")
    return open_mock_survey(url) or make_mock_survey(url, MockSurveyConfig(
        n_tiles=n_tiles, size_pix=size, n_lenses=4, seed=seed, compress=compress))


def positions(s, bands, scratch: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = str(scratch / f"plan-{Path(s.root).name}")
    plan = make_plan(s.tiles_url, s.tile_pattern, bands, s.catalog_url, out)
    return {t.name: (read_tile_objects(out, t.name)["x"].to_numpy(),
                     read_tile_objects(out, t.name)["y"].to_numpy()) for t in plan.tiles if t.shape}


def naive_rate(tiles, pos, ens, limit: int) -> tuple[float, int]:
    """The original research code's way: astropy Cutout2D per object and band, one stamp per
    forward pass, one model after another. Timed on the first ``limit`` objects."""
    import torch
    from astropy.nddata import Cutout2D

    from scanner.normalise import normalise
    from scanner.tiles import read_pixels

    spec = ens.input_spec
    n = 0
    t = time.perf_counter()
    for tile in tiles:
        pixels = read_pixels(tile, spec.bands)
        wcs = tile.wcs(spec.bands[0])
        for x, y in zip(*pos[tile.name]):
            bands = [Cutout2D(pixels[c], (x, y), spec.stamp_size_pix, wcs=wcs, mode="partial",
                              fill_value=np.nan).data for c in range(len(spec.bands))]
            stamp = torch.from_numpy(normalise(np.stack(bands)[None], spec))
            with torch.no_grad():
                for version in ens.versions:
                    torch.softmax(version.model(stamp), dim=1)
            n += 1
            if n >= limit:
                return n / (time.perf_counter() - t), n
    return n / (time.perf_counter() - t), n


def scan(s, models: str, out: Path, batch_size: int) -> tuple[float, int, dict, float]:
    cfg = ScanConfig(tiles=s.tiles_url, catalog=s.catalog_url, out=str(out), model_dirs=(models,),
                     tile_pattern=s.tile_pattern, batch_size=batch_size, overwrite=True, report_top_n=0)
    with MemorySampler() as mem:
        t = time.perf_counter()
        result = run_scan(cfg)
        secs = time.perf_counter() - t
    return secs, result.n_scored + result.n_failed, mem.to_dict(), result.steady_stamps_per_s


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", type=int, default=4, help="tiles for the stage figures")
    ap.add_argument("--size", type=int, default=2048, help="tile side (pixels)")
    ap.add_argument("--memory-tiles", default="4,16", help="survey sizes (tiles of 1024 px) for peak memory")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--naive-stamps", type=int, default=300, help="stamps timed in the naive loop")
    ap.add_argument("--models", default=str(default_models_dir()))
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs for the local Ray cluster")
    ap.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "lensscan-bench"),
                    help="where mock surveys are generated once")
    ap.add_argument("--json", default=str(RESULTS / "scan.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import ray
    import torch

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    ens = load_ensemble([args.models])
    spec = ens.input_spec
    plain = survey(cache, args.tiles, args.size, False, 11)
    packed = survey(cache, args.tiles, args.size, True, 11)
    pos = positions(plain, spec.bands, cache)

    torch.set_num_threads(1)
    cut_plain = cut_rate(tiles_with_pixels(plain.tiles_url, plain.tile_pattern, spec.bands), pos, spec)
    cut_fz = cut_rate(tiles_with_pixels(packed.tiles_url, packed.tile_pattern, spec.bands), pos, spec)

    from scanner.cutouts import make_stamps
    from scanner.tiles import read_pixels

    stamps = np.concatenate([make_stamps(read_pixels(t, spec.bands), *pos[t.name], spec)[0]
                             for t in tiles_with_pixels(plain.tiles_url, plain.tile_pattern, spec.bands)])
    stamps = stamps.astype(np.float16).astype(np.float32)

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    n_actors = max(1, args.cpus // 2)  # the scan's default pool on CPUs, one CPU (thread) each
    model_1 = model_rate(ens, stamps, args.batch_size)
    naive, n_naive = naive_rate(tiles_with_pixels(plain.tiles_url, plain.tile_pattern, spec.bands), pos,
                                ens, args.naive_stamps)
    scan_s, n_scan, mem, steady = scan(plain, args.models, cache / "scan-out", args.batch_size)
    e2e = n_scan / scan_s
    model_pool = model_1.per_s * n_actors

    memory = []
    for n in [int(v) for v in args.memory_tiles.split(",") if v]:
        s = survey(cache, n, 1024, False, 12)
        secs, n_obj, m, _ = scan(s, args.models, cache / f"mem-out-{n}", args.batch_size)
        memory.append({"tiles": n, "objects": n_obj, "seconds": secs, **m})

    result = {
        "benchmark": "scan", "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "parameters": {"tiles": args.tiles, "size_pix": args.size, "batch_size": args.batch_size,
                       "ray_cpus": args.cpus, "scoring_actors": n_actors, "torch_threads_per_actor": 1,
                       "models": [m["path"] for m in ens.describe()], "stamp_size_pix": spec.stamp_size_pix,
                       "bands": list(spec.bands), "stamps": int(len(stamps))},
        "cut_fits_per_core": cut_plain.to_dict(), "cut_fz_per_core": cut_fz.to_dict(),
        "model_only_per_actor": model_1.to_dict(), "model_only_pool_per_s": model_pool,
        "naive_loop_per_s": naive, "naive_loop_stamps": n_naive,
        "ratio_ours_over_naive": e2e / naive,
        "end_to_end_per_s": e2e, "end_to_end_seconds": scan_s, "end_to_end_steady_per_s": steady,
        "ratio_end_to_end_over_model_only": e2e / model_pool,
        "ratio_steady_over_model_only": steady / model_pool, "memory": memory,
    }
    if len(memory) >= 2:
        result["memory_ratio_largest_over_smallest"] = (memory[-1]["peak_worker_rss_mb"]
                                                        / memory[0]["peak_worker_rss_mb"])
    ray.shutdown()

    rows = [("cut-only, FITS (stamps/s per core)", cut_plain.per_s, cut_plain.spread),
            ("cut-only, .fits.fz (stamps/s per core)", cut_fz.per_s, cut_fz.spread),
            (f"model-only, 1 actor ({len(ens)} versions, batch {args.batch_size})", model_1.per_s, model_1.spread),
            (f"model-only, pool of {n_actors}", model_pool, float("nan")),
            ("end-to-end scan, wall incl. start-up (stamps/s)", e2e, float("nan")),
            ("end-to-end scan, steady (first to last shard)", steady, float("nan")),
            ("end-to-end / model-only (wall)", e2e / model_pool, float("nan")),
            ("end-to-end / model-only (steady)", steady / model_pool, float("nan")),
            (f"naive loop (Cutout2D, 1 stamp/forward; {n_naive} stamps)", naive, float("nan")),
            ("ours (end-to-end, wall) / naive", e2e / naive, float("nan"))]
    print(f"\n{'figure':58s} {'value':>10s} {'spread':>7s}")
    for name, v, sp in rows:
        print(f"{name:58s} {v:10.2f} {sp:7.2f}")
    for m in memory:
        print(f"peak worker RSS, {m['tiles']:3d} tiles ({m['objects']} objects): "
              f"{m['peak_worker_rss_mb']:.0f} MiB (driver {m['peak_driver_rss_mb']:.0f} MiB)")
    if "memory_ratio_largest_over_smallest" in result:
        print(f"memory ratio {memory[-1]['tiles']}/{memory[0]['tiles']} tiles: "
              f"{result['memory_ratio_largest_over_smallest']:.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
