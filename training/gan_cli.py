"""``lensscan gan``: train the lens GAN, draw stamps from it, and measure its quality.

    lensscan gan train   --data DATASET --out GAN_DIR [--steps N] [--time-limit S] [--gpu]
    lensscan gan sample  --gan GAN_DIR --n 64 --out samples.png     (or .npy: normalised stamps)
    lensscan gan quality --gan GAN_DIR --data DATASET --out REPORT_DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def _refused(command: str, exc: Exception) -> int:
    print(f"lensscan gan {command}: refused: {exc}", file=sys.stderr)
    return 2


def cmd_gan_train(args: argparse.Namespace) -> int:
    from training.dataset import DatasetError
    from training.gan import GanConfig, GanError, train_gan

    try:
        config = GanConfig(steps=args.steps, batch_size=args.batch_size, width=args.width,
                           num_workers=args.workers, use_gpu=args.gpu,
                           cpus_per_worker=args.cpus_per_worker, time_limit_s=args.time_limit,
                           report_every=args.report_every, checkpoint_every=args.checkpoint_every,
                           seed=args.seed)
        run = train_gan(config, args.data, args.out)
    except (DatasetError, GanError, ValueError) as exc:
        return _refused("train", exc)
    except RuntimeError as exc:
        print(f"lensscan gan train: {exc}", file=sys.stderr)
        return 1
    print(run)
    return 0


def cmd_gan_sample(args: argparse.Namespace) -> int:
    import torch

    from training.gan import GanError, GeneratedLenses
    from training.gan_quality import sample_grid_png

    out = Path(args.out)
    if out.suffix not in (".png", ".npy"):
        print(f"lensscan gan sample: --out {out}: give a .png (a picture) or .npy (the normalised "
              f"stamps, float32 (N, C, S, S))", file=sys.stderr)
        return 2
    try:
        lenses = GeneratedLenses(args.gan)
    except GanError as exc:
        return _refused("sample", exc)
    stamps = lenses.sample(args.n, torch.Generator().manual_seed(args.seed)).numpy()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, stamps.astype(np.float32))
    else:
        out.write_bytes(sample_grid_png({f"GAN seed {args.seed}": stamps}, lenses.spec,
                                        lenses.meta["display"]))
    print(f"wrote {out} ({args.n} stamps of {lenses.spec.stamp_size_pix} px, bands "
          f"{','.join(lenses.spec.bands)})")
    return 0


def cmd_gan_quality(args: argparse.Namespace) -> int:
    from scanner.registry import RegistryError
    from training.dataset import DatasetError
    from training.gan_quality import QualityConfig, gan_quality

    try:
        config = QualityConfig(n_stamps=args.n, classifier=args.classifier, seed=args.seed)
        report = gan_quality(args.gan, args.data, args.out, config)
    except (DatasetError, RegistryError, ValueError) as exc:
        return _refused("quality", exc)
    fd = report["frechet_feature_distance"]
    print(f"Fréchet feature distance ({report['n_stamps']} stamps each, features of "
          f"{report['classifier']['name']} v{report['classifier']['version']}):\n"
          f"  GAN vs injected lenses          {fd['gan_vs_injected']:.4g}\n"
          f"  injected vs injected (2 seeds)  {fd['injected_vs_injected']:.4g}\n"
          f"  injected lenses vs negatives    {fd['injected_vs_negatives']:.4g}\n"
          f"wrote {args.out}/quality.json, quality.png, samples.png")
    return 0


def add_gan_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``gan train``, ``gan sample`` and ``gan quality`` to the ``lensscan`` subcommands."""
    from training.gan import GanConfig
    from training.gan_quality import QualityConfig

    defaults, quality = GanConfig(), QualityConfig()
    gan = subparsers.add_parser("gan", help="a WGAN-GP generator of lens stamps: train, sample, "
                                "measure")
    sub = gan.add_subparsers(dest="gan_command", metavar="GAN_COMMAND", required=True)

    p = sub.add_parser("train", help="train the GAN on freshly injected lenses of a dataset "
                       "(Ray Train); rerun on an unfinished --out to resume")
    p.add_argument("--data", required=True, help="a dataset written by build-dataset")
    p.add_argument("--out", required=True, help="directory for checkpoints and the export")
    p.add_argument("--steps", type=int, default=defaults.steps,
                   help="generator steps (default: %(default)s, as the original)")
    p.add_argument("--time-limit", type=float, help="stop, and export, after this many seconds")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size,
                   help="stamps per step and worker (default: %(default)s)")
    p.add_argument("--width", type=int, default=defaults.width,
                   help="channels of the full-resolution layers (default: %(default)s)")
    p.add_argument("--workers", type=int, default=defaults.num_workers,
                   help="data-parallel Ray Train workers (default: %(default)s)")
    p.add_argument("--gpu", action="store_true", help="a GPU per worker")
    p.add_argument("--cpus-per-worker", type=int, default=defaults.cpus_per_worker,
                   help="CPUs per worker (default: %(default)s)")
    p.add_argument("--report-every", type=int, default=defaults.report_every,
                   help="steps between metric reports (default: %(default)s)")
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                   help="steps between checkpoints (default: %(default)s)")
    p.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    p.set_defaults(func=cmd_gan_train)

    p = sub.add_parser("sample", help="draw stamps from a trained GAN: a picture or an array")
    p.add_argument("--gan", required=True, help="a directory written by gan train")
    p.add_argument("--n", type=int, default=32, help="stamps (default: %(default)s)")
    p.add_argument("--out", required=True, help="FILE.png (colour grid) or FILE.npy (normalised "
                   "stamps, float32 N x C x S x S)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same stamps (default: %(default)s)")
    p.set_defaults(func=cmd_gan_sample)

    p = sub.add_parser("quality", help="compare GAN stamps with injected lenses: sample grid, "
                       "photometry histograms, Fréchet distance of classifier features")
    p.add_argument("--gan", required=True, help="a directory written by gan train")
    p.add_argument("--data", required=True, help="the dataset the GAN was trained on")
    p.add_argument("--out", required=True, help="report directory")
    p.add_argument("--n", type=int, default=quality.n_stamps,
                   help="stamps per compared set (default: %(default)s)")
    p.add_argument("--classifier", help="model version dir for the features (default: the first "
                   "version of the built-in ensemble)")
    p.add_argument("--seed", type=int, default=quality.seed, help="default: %(default)s")
    p.set_defaults(func=cmd_gan_quality)
