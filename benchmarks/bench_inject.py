"""Lens injection rate: injected 3-band stamps per second, by stamp size and batch size.

    python benchmarks/bench_inject.py                       # CPU: 64 and 100 px, batches 64, 256
    python benchmarks/bench_inject.py --device cuda --batch-sizes 256,1024,4096
    python benchmarks/bench_inject.py --help

Two figures per case: the default ``InjectionConfig`` (magnification and arc S/N cuts, failures
redrawn: what training gets) and one draw without cuts (the rendering alone: ray tracing,
Sersic + clumps, PSF convolution, noise). The deflectors are synthetic (a Gaussian galaxy in sky
noise) so the figures do not depend on a survey. The target is 5,000 lensed 3-band 100x100
stamps/s on one H100, so injection never starves training.

Prints a table and saves JSON (machine, versions, parameters, figures) to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

from scanner.bench import machine, timed
from training.bands import BandMeta
from training.inject import InjectionConfig, inject_lenses

RESULTS = Path(__file__).parent / "results"
BANDS = ("g", "r", "i")


def deflectors(n: int, size: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, BandMeta]:
    """Synthetic raw deflector stamps: an elongated Gaussian galaxy in sky noise, DLS-like bands."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size) - size // 2, torch.arange(size) - size // 2, indexing="ij")
    galaxy = torch.exp(-0.5 * ((xx / 5.0) ** 2 + (yy / 3.5) ** 2))
    flux = torch.tensor([3000.0, 9000.0, 14000.0])[:, None, None] * galaxy / galaxy.sum()
    raw = flux[None] + 2.5 * torch.randn(n, len(BANDS), size, size, generator=g)
    meta = BandMeta.constant(n, BANDS, magzero=30.0, psf_fwhm_arcsec=0.95, sky_sigma=2.5, gain=20.0)
    meta.psf_fwhm_arcsec = torch.tensor([1.0, 0.9, 0.85]).repeat(n, 1)
    return raw.to(device), meta.to(device)


def injection_rate(size: int, batch: int, config: InjectionConfig, device: torch.device,
                   repeats: int) -> tuple[dict, float]:
    raw, meta = deflectors(batch, size, device)
    generator = torch.Generator(device=device).manual_seed(0)
    accepted = []

    def run() -> int:
        _, params = inject_lenses(raw, meta, config, generator)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        accepted.append(float(params["passed_cuts"].float().mean()))
        return batch

    rate = timed(run, repeats=repeats, warmup=1)
    return rate.to_dict(), sum(accepted) / len(accepted)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="64,100", help="stamp sides in pixels (default: %(default)s)")
    ap.add_argument("--batch-sizes", default="64,256", help="stamps per call (default: %(default)s)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads "
                    "(default: all CPUs)")
    ap.add_argument("--supersample", type=int, default=InjectionConfig().supersample,
                    help="rays per pixel side (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up")
    ap.add_argument("--json", default=str(RESULTS / "inject.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = [int(v) for v in args.sizes.split(",") if v]
    batches = [int(v) for v in args.batch_sizes.split(",") if v]
    with_cuts = InjectionConfig(supersample=args.supersample)
    one_draw = InjectionConfig(supersample=args.supersample, min_magnification=0.0, min_arc_snr=0.0,
                               max_draws=1)

    cases = []
    print(f"\n{'stamp':>6s} {'batch':>6s} {'lenses/s (cuts)':>16s} {'spread':>7s} {'accepted':>9s} "
          f"{'lenses/s (1 draw)':>18s} {'spread':>7s}")
    for size in sizes:
        for batch in batches:
            cut_rate, accepted = injection_rate(size, batch, with_cuts, device, args.repeats)
            draw_rate, _ = injection_rate(size, batch, one_draw, device, args.repeats)
            cases.append({"stamp_size_pix": size, "batch_size": batch, "with_cuts": cut_rate,
                          "accepted_fraction": accepted, "single_draw": draw_rate})
            print(f"{size:6d} {batch:6d} {cut_rate['per_s']:16.1f} {cut_rate['spread']:7.2f} "
                  f"{accepted:9.2f} {draw_rate['per_s']:18.1f} {draw_rate['spread']:7.2f}")

    result = {
        "benchmark": "inject", "machine": machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "parameters": {"bands": list(BANDS), "torch_threads": args.threads,
                       "supersample": args.supersample, "repeats": args.repeats,
                       "injection_config": with_cuts.to_dict()},
        "cases": cases,
        "target": "5000 lensed 3-band 100x100 stamps/s on one H100",
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
