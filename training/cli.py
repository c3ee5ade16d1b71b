"""Training's ``lensscan`` subcommands: ``build-dataset``, ``show-injections``, ``train``, ``evaluate``, ``gan``.

The scanner's CLI finds :func:`register` through the ``lensscan.commands`` entry point, so the
scanner never imports training.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Share of positives a ``--gan`` replaces when ``--gan-fraction`` is not given.
DEFAULT_GAN_FRACTION = 0.25

_COLOUR_CUT = re.compile(r"^\s*(\w+)\s*-\s*(\w+)\s*>=\s*(-?[\d.]+)\s*$")


def _bands(text: str) -> tuple[str, ...]:
    return tuple(b.strip() for b in text.split(",") if b.strip())


def _colour_cut(text: str) -> tuple[str, str, float]:
    m = _COLOUR_CUT.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"colour cut {text!r}: write BLUE-RED>=MIN, e.g. 'g-r>=1.0'")
    return m.group(1), m.group(2), float(m.group(3))


def cmd_build_dataset(args: argparse.Namespace) -> int:
    from training.dataset import DatasetConfig, DatasetError, build_dataset
    from training.measure import DeflectorCuts

    tiles, catalog, truth, pattern = args.tiles, args.catalog, args.truth, args.tile_pattern
    if tiles is None:
        if catalog is not None:
            print("lensscan build-dataset: --catalog needs --tiles", file=sys.stderr)
            return 2
        from scanner.cli import demo_survey

        survey = demo_survey()
        tiles, catalog, pattern = survey.tiles_url, survey.catalog_url, survey.tile_pattern
        truth = truth or survey.truth_url
    elif catalog is None:
        print("lensscan build-dataset: give --catalog (objid, ra, dec) with --tiles", file=sys.stderr)
        return 2
    defaults = DeflectorCuts()
    try:
        cuts = DeflectorCuts(
            magnitude_band=args.deflector_band or defaults.magnitude_band,
            magnitude_range=(args.deflector_min_mag, args.deflector_max_mag),
            colour_cuts=tuple(args.deflector_colour) if args.deflector_colour else defaults.colour_cuts,
            min_size_arcsec=args.deflector_min_size)
        config = DatasetConfig(
            tiles=tiles, catalog=catalog, out=args.out, bands=_bands(args.bands),
            tile_pattern=pattern, truth=truth, stamp_size_pix=args.stamp_size,
            pixel_scale_arcsec=args.pixel_scale, deflector_cuts=cuts,
            holdout_fraction=args.holdout_fraction, split_cell_deg=args.split_cell_deg,
            non_lens_fraction=args.non_lens_fraction, shard_rows=args.shard_rows,
            default_magzero=args.magzero, seed=args.seed, overwrite=args.overwrite)
        summary = build_dataset(config)
    except (DatasetError, ValueError, FileNotFoundError) as exc:
        print(f"lensscan build-dataset: refused: {exc}", file=sys.stderr)
        return 2
    print(summary)
    return 0


def cmd_show_injections(args: argparse.Namespace) -> int:
    from training.dataset import DatasetError
    from training.show import show_injections

    try:
        path = show_injections(args.dataset, args.out, n=args.n, seed=args.seed, split=args.split)
    except (DatasetError, ValueError) as exc:
        print(f"lensscan show-injections: refused: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from scanner.registry import RegistryError
    from training.export import copy_versions

    try:
        paths = copy_versions(args.models, args.out, name=args.name, overwrite=args.overwrite,
                              dtype=torch.float32 if args.float32 else torch.float16)
    except RegistryError as exc:
        print(f"lensscan export: refused: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"exported {path}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from training.ablate import AblationConfig, run_ablation
    from training.dataset import DatasetError

    logging.getLogger("training").setLevel(logging.INFO)
    overrides = {k: v for k, v in (("out", args.out), ("max_concurrent", args.max_concurrent))
                 if v is not None}
    try:
        config = AblationConfig.from_file(args.config, **overrides)
        run_ablation(config)
    except (DatasetError, ValueError, FileNotFoundError) as exc:
        print(f"lensscan ablate: refused: {exc}", file=sys.stderr)
        return 2
    print((Path(config.out) / "results.md").read_text())
    print(f"wrote {config.out}/results.csv, results.md, summary.csv, pr_curves.png")
    return 0


def _method_param(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"method parameter {text!r}: write KEY=VALUE, e.g. "
                                         f"'threshold=0.9'")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def train_config_from_args(args: argparse.Namespace):
    """Return the ``TrainConfig`` of ``lensscan train``: the config file, then the flags given."""
    from training.augment import AugmentConfig
    from training.config import TrainConfig, default_model_params, read_config_file

    d: dict[str, Any] = read_config_file(args.config) if args.config else {}
    flags = {"data": args.data, "out": args.out, "name": args.name, "method": args.method,
             "versions": args.versions, "epochs": args.epochs,
             "steps_per_epoch": args.steps_per_epoch,
             "unlabelled_batch_size": args.unlabelled_batch_size, "learning_rate": args.lr,
             "seed": args.seed, "workers": args.workers, "gpu": args.gpu,
             "cpus_per_worker": args.cpus_per_worker, "address": args.address, "gan": args.gan,
             "grades": args.grades, "grades_scan": args.grades_scan}
    d.update({k: v for k, v in flags.items() if v is not None})
    if args.param:
        d["method_params"] = {**d.get("method_params", {}), **dict(args.param)}
    if args.width is not None:
        d["model_params"] = {**d.get("model_params", default_model_params()), "width": args.width}
    gan_fraction = args.gan_fraction
    if gan_fraction is None and args.gan is not None and "gan_fraction" not in d.get("stream", {}):
        gan_fraction = DEFAULT_GAN_FRACTION
    if args.batch_size is not None or args.augment or gan_fraction is not None:
        stream = dict(d.get("stream", {}))
        if args.batch_size is not None:
            stream["batch_size"] = args.batch_size
        if gan_fraction is not None:
            stream["gan_fraction"] = gan_fraction
        if args.augment:
            stream["augment"] = AugmentConfig().to_dict()
        d["stream"] = stream
    missing = [f"--{k}" for k in ("data", "out") if k not in d]
    if missing:
        raise ValueError(f"give {' and '.join(missing)} (or set them in --config)")
    return TrainConfig.from_dict(d)


def cmd_train(args: argparse.Namespace) -> int:
    from training.dataset import DatasetError
    from training.loop import train

    logging.getLogger("training").setLevel(logging.INFO)
    try:
        config = train_config_from_args(args)
    except ValueError as exc:
        print(f"lensscan train: refused: {exc}", file=sys.stderr)
        return 2
    print(f"training {config.versions} version(s) of {config.name} with {config.method} on "
          f"{config.workers} worker(s){' with GPUs' if config.gpu else ''}: {config.epochs} epochs, "
          f"data {config.data}, registry {config.out}", flush=True)
    try:
        paths = train(config, overwrite=args.overwrite)
    except (DatasetError, ValueError, FileNotFoundError) as exc:
        print(f"lensscan train: refused: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line for the user; the traceback is in -v logs
        logger.debug("training failed", exc_info=exc)
        first = (str(exc).strip().splitlines() or [""])[0]
        print(f"lensscan train: failed: {type(exc).__name__}: {first}; exported versions and "
              f"checkpoints are kept: fix the cause and re-run the same command to resume",
              file=sys.stderr)
        return 1
    model_dir = paths[0].parent
    print(_evaluation_table(model_dir))
    for path in paths:
        print(f"exported {path}")
    print(f"held-out figures: {model_dir}/evaluation.json  PR curve: {model_dir}/pr_curve.png")
    return 0


def _evaluation_table(directory) -> str:
    from training.evaluate import format_table

    record = json.loads((directory / "evaluation.json").read_text())
    return (f"held-out evaluation ({record['n_stamps']} stamps, {record['n_lenses']} lenses):\n"
            + format_table(record["metrics"]))


def cmd_evaluate(args: argparse.Namespace) -> int:
    from scanner.registry import RegistryError
    from training.dataset import DatasetError
    from training.evaluate import evaluate_models

    logging.getLogger("training").setLevel(logging.INFO)
    try:
        report = evaluate_models(args.models, args.data, args.out, split=args.split,
                                 inject=False if args.known_lenses_only else None)
    except (RegistryError, DatasetError, ValueError) as exc:
        print(f"lensscan evaluate: refused: {exc}", file=sys.stderr)
        return 2
    print(report)
    print(f"wrote {report.json_path}, {report.png_path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``build-dataset``, ``show-injections``, ``train``, ``evaluate`` and ``gan`` to ``lensscan``."""
    from training.measure import DeflectorCuts
    from training.methods import METHODS

    cuts = DeflectorCuts()
    p = subparsers.add_parser(
        "build-dataset", help="cut survey stamps into deflector / non-lens / unlabelled pools with "
        "a sky-region held-out split, as sharded Parquet (no --tiles: the demo survey)")
    p.add_argument("--tiles", help="URL of the directory holding the FITS tiles")
    p.add_argument("--catalog", help="object catalog, Parquet or CSV with objid, ra, dec [, tile]")
    p.add_argument("--truth", help="Parquet/CSV with objid, is_lens: known lenses never become "
                   "negatives (pool known_lens)")
    p.add_argument("--out", required=True, help="output directory URL")
    p.add_argument("--tile-pattern", default="{tile}_{band}.fits",
                   help="tile file names, as for scan (default: %(default)s)")
    p.add_argument("--bands", default="g,r,i", help="bands in channel order (default: %(default)s)")
    p.add_argument("--stamp-size", type=int, default=64, help="stamp side, pixels (default: %(default)s)")
    p.add_argument("--pixel-scale", type=float, default=0.26,
                   help="arcsec/pixel the tiles must have (default: %(default)s)")
    p.add_argument("--deflector-band", help=f"band of the deflector magnitude cut (default: "
                   f"{cuts.magnitude_band})")
    p.add_argument("--deflector-min-mag", type=float, default=cuts.magnitude_range[0],
                   help="brightest deflector, AB (default: %(default)s)")
    p.add_argument("--deflector-max-mag", type=float, default=cuts.magnitude_range[1],
                   help="faintest deflector, AB (default: %(default)s)")
    p.add_argument("--deflector-colour", type=_colour_cut, action="append",
                   help="colour cut BLUE-RED>=MIN, repeatable (default: " +
                   ", ".join(f"{b}-{r}>={v}" for b, r, v in cuts.colour_cuts) + ")")
    p.add_argument("--deflector-min-size", type=float, default=cuts.min_size_arcsec,
                   help="smallest PSF-corrected half-light radius, arcsec (default: %(default)s)")
    p.add_argument("--holdout-fraction", type=float, default=0.2,
                   help="share of sky cells held out (default: %(default)s)")
    p.add_argument("--split-cell-deg", type=float, default=0.25,
                   help="sky cell size of the split, degrees (default: %(default)s)")
    p.add_argument("--non-lens-fraction", type=float, default=0.5,
                   help="share of non-deflectors labelled non-lens; the rest are unlabelled "
                   "(default: %(default)s)")
    p.add_argument("--shard-rows", type=int, default=2048, help="stamps per Parquet shard "
                   "(default: %(default)s)")
    p.add_argument("--magzero", type=float, help="AB zero point for tiles whose headers lack MAGZERO")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and pools (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.set_defaults(func=cmd_build_dataset)

    p = subparsers.add_parser(
        "show-injections", help="write a PNG grid of deflector stamps before and after lens "
        "injection, and with look-alike negatives, in colour")
    p.add_argument("--dataset", required=True, help="a dataset written by build-dataset")
    p.add_argument("--out", default="injections.png", help="PNG path or URL (default: %(default)s)")
    p.add_argument("-n", type=int, default=8, help="deflectors to show (default: %(default)s)")
    p.add_argument("--split", choices=["train", "holdout"], default="train",
                   help="which split's deflectors (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="which deflectors and lenses (default: %(default)s)")
    p.set_defaults(func=cmd_show_injections)

    p = subparsers.add_parser(
        "train", help="train N versions of a lens classifier with a supervised or semi-supervised "
        "method on Ray Train, evaluate them on held-out sky and export them to a registry; "
        "re-running the same command resumes")
    p.add_argument("--config", help="TOML, JSON or YAML file of TrainConfig settings; flags given "
                   "as well override it")
    p.add_argument("--data", help="a dataset written by build-dataset")
    p.add_argument("--out", help="registry directory; versions go to OUT/NAME/version-K")
    p.add_argument("--name", help="model name in the registry (default: lensscan)")
    p.add_argument("--method", choices=list(METHODS), help="training method (default: supervised)")
    p.add_argument("--param", type=_method_param, action="append", metavar="KEY=VALUE",
                   help="method hyper-parameter, repeatable, e.g. --param threshold=0.9")
    p.add_argument("--augment", action="store_true", default=None,
                   help="augment labelled stamps (rotations, flips, shifts, PSF blur, noise, "
                   "brightness, saturation, gamma)")
    p.add_argument("--versions", type=int, help="independent runs, seeds SEED..SEED+N-1 (default: 1)")
    p.add_argument("--epochs", type=int, help="epochs (default: 10); more on a re-run continues")
    p.add_argument("--steps-per-epoch", type=int, help="optimiser steps per epoch (default: one "
                   "pass over the training deflectors)")
    p.add_argument("--batch-size", type=int, help="labelled stamps per worker and step (default: 64)")
    p.add_argument("--unlabelled-batch-size", type=int, help="unlabelled stamps per worker and step "
                   "(default: 64)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: 0.001)")
    p.add_argument("--width", type=int, help="ResNetV2 width (default: 16)")
    p.add_argument("--seed", type=int, help="seed of version 1 (default: 0)")
    p.add_argument("--workers", type=int, help="Ray Train workers, data-parallel (default: 1)")
    p.add_argument("--gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs reserved per worker (default: 1)")
    p.add_argument("--grades", help="grades.csv exported from a scan's report: A/B become known-lens "
                   "positives, not_lens hard negatives, C is left out")
    p.add_argument("--grades-scan", help="the scan the grades come from (default: the directory "
                   "holding --grades), whose tiles the graded stamps are cut from")
    p.add_argument("--gan", help="a GAN directory (lensscan gan train) whose samples replace "
                   "--gan-fraction of each batch's injected lenses")
    p.add_argument("--gan-fraction", type=float, help="share of each batch's positives drawn from "
                   "--gan (default with --gan: 0.25)")
    p.add_argument("--address", help="Ray cluster address (default: a local cluster)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard what OUT/NAME holds (versions, checkpoints) and train from scratch; "
                   "without it a re-run resumes, and a run of other settings is refused")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "evaluate", help="evaluate model versions and their ensemble on a dataset's labelled "
        "stamps: precision at recall 0.5/0.8/0.9, AUROC, TPR0, precision in the top N, PR curve")
    p.add_argument("--models", nargs="+", required=True, help="registry, model or version dirs")
    p.add_argument("--data", required=True, help="a dataset written by build-dataset")
    p.add_argument("--out", default="lensscan-evaluation",
                   help="where evaluation.json, pr_curve.png and predictions.parquet go "
                   "(default: %(default)s)")
    p.add_argument("--known-lenses-only", action="store_true", help="positives are the dataset's "
                   "known lenses alone, no injection: a test survey whose lenses another simulator "
                   "made (or real ones), to measure generalisation")
    p.add_argument("--split", choices=["holdout", "train"],
                   help="dataset split (default: the one the models were evaluated on, holdout)")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser(
        "export", help="copy trained model versions into another registry (e.g. the package's "
        "built-in one), with float16 weights by default and without checkpoints")
    p.add_argument("--models", required=True, help="a model directory of a registry (NAME with "
                   "version-K inside), or one version")
    p.add_argument("--out", required=True, help="registry root to copy into")
    p.add_argument("--name", help="model name in --out (default: the source's)")
    p.add_argument("--float32", action="store_true", help="keep float32 weights (default: float16)")
    p.add_argument("--overwrite", action="store_true", help="replace versions already in --out")
    p.set_defaults(func=cmd_export)

    p = subparsers.add_parser(
        "ablate", help="train the grid methods x augmentation x GAN (and a scaling study over "
        "simulated lenses and non-lenses) on Ray and tabulate each cell on a test survey")
    p.add_argument("--config", required=True, help="TOML, JSON or YAML ablation config, e.g. "
                   "configs/ablation-small.toml")
    p.add_argument("--out", help="output directory (overrides the config's)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (overrides the config's)")
    p.set_defaults(func=cmd_ablate)

    from training.gan_cli import add_gan_command

    add_gan_command(subparsers)
