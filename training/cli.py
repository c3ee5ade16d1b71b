"""Training's ``lensscan`` subcommands: ``build-dataset`` and ``show-injections``.

The scanner's CLI finds :func:`register` through the ``lensscan.commands`` entry point, so the
scanner never imports training.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys

logger = logging.getLogger(__name__)

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


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``build-dataset`` and ``show-injections`` to the ``lensscan`` subcommands."""
    from training.measure import DeflectorCuts

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
