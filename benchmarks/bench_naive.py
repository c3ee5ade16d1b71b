"""The research code's way of scoring a survey, timed: the baseline of the "ours / naive" ratio.

    python benchmarks/bench_naive.py --tiles DIR --catalog FILE [--device cuda] [--stamps 2000]

Per object: astropy ``Cutout2D`` of each band, the scan's normalisation, one stamp per forward
pass, one model version after another, the score copied back to the host (as a loop that writes
one score per object must). Tiles are read whole once each, as the scan does, so the loop is not
charged for reading. The rate is the naive one on the device given: on a GPU each stamp's forward
launches every kernel of every version for one stamp. Prints the rate and saves JSON (machine,
parameters, rate); ``benchmarks/bench_scan.py`` calls the same loop for its ratio on a CPU, and
``benchmarks/gpu_run.sh`` runs this script next to the GPU scan.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from scanner.bench import Positions, SurveySample, machine, planned_positions
from scanner.registry import Ensemble, default_models_dir, load_ensemble
from scanner.tiles import Tile

RESULTS = Path(__file__).parent / "results"


def naive_rate(tiles: Sequence[Tile], pos: Positions, ens: Ensemble, limit: int,
               device: str = "cpu") -> tuple[float, int]:
    """Stamps/s of the naive loop over the first ``limit`` objects of ``tiles`` (the count too).

    The first 10 stamps are a warm-up (CUDA context, cuDNN plans, first allocations), not timed.
    """
    from astropy.nddata import Cutout2D

    from scanner.normalise import normalise
    from scanner.tiles import read_pixels

    spec = ens.input_spec
    dev = torch.device(device)
    models = [v.model.to(dev).eval() for v in ens.versions]
    warmup, n, started = 10, 0, 0.0
    for tile in tiles:
        pixels = read_pixels(tile, spec.bands)
        wcs = tile.wcs(spec.bands[0])
        for x, y in zip(*pos[tile.name]):
            if n == warmup:
                started = time.perf_counter()
            bands = [Cutout2D(pixels[c], (x, y), spec.stamp_size_pix, wcs=wcs, mode="partial",
                              fill_value=np.nan).data for c in range(len(spec.bands))]
            stamp = torch.from_numpy(normalise(np.stack(bands)[None], spec)).to(dev)
            with torch.no_grad():
                for model in models:
                    float(torch.softmax(model(stamp), dim=1)[0, 1])
            n += 1
            if n >= limit + warmup:
                return (n - warmup) / (time.perf_counter() - started), n - warmup
    timed = n - warmup
    if timed <= 0:
        raise ValueError(f"only {n} objects on the tiles: too few to time the naive loop")
    return timed / (time.perf_counter() - started), timed


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiles", required=True, help="directory of the survey's FITS tiles")
    ap.add_argument("--catalog", required=True, help="the survey's catalog (objid, ra, dec)")
    ap.add_argument("--tile-pattern", default="{tile}_{band}.fits")
    ap.add_argument("--models", default=str(default_models_dir()))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--stamps", type=int, default=2000, help="stamps timed (after 10 of warm-up)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (one core, as the "
                    "research code on one worker)")
    ap.add_argument("--work-dir", default=str(Path(tempfile.gettempdir()) / "lensscan-bench-naive"),
                    help="where the plan matching catalog to tiles is written")
    ap.add_argument("--json", default=str(RESULTS / "naive.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    ens = load_ensemble([args.models])
    sample = SurveySample(args.tiles, args.tile_pattern, args.catalog)
    tiles, pos = planned_positions(sample, ens.input_spec.bands, args.work_dir)
    rate, n = naive_rate(tiles, pos, ens, args.stamps, args.device)
    result = {"benchmark": "naive loop", "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "parameters": {"device": args.device, "stamps": n, "threads": args.threads,
                             "models": [m["path"] for m in ens.describe()], "tiles": args.tiles,
                             "catalog": args.catalog},
              "naive_loop_per_s": rate}
    print(f"naive loop on {args.device}: {rate:,.1f} stamps/s over {n} stamps ({len(ens)} versions, "
          f"one stamp per forward, Cutout2D per band)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
