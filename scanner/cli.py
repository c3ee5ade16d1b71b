"""The ``lensscan`` command.

Scan-side commands live here; packages that build on the scanner (``training``) add theirs through
the ``lensscan.commands`` entry-point group, so the scanner never imports them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from importlib.metadata import entry_points
from pathlib import Path
from typing import Sequence

from scanner import __version__
from scanner.config import PRECISIONS

logger = logging.getLogger("lensscan")

#: Where ``lensscan scan`` without arguments writes (relative to the working directory).
DEMO_OUT = "lensscan-demo-scan"

#: The built-in demo survey: ~5,400 objects, 20 of them lenses (0.4%: rare, as in a real survey,
#: yet enough for a recall figure), so "recall in the top 1% of ranks" has room to mean something.
DEMO = {"n_tiles": 9, "size_pix": 1024, "n_lenses": 20, "seed": 2026}


def cache_dir() -> Path:
    """Where the demo survey is generated once and reused (``LENSSCAN_CACHE`` moves it)."""
    return Path(os.environ.get("LENSSCAN_CACHE", Path.home() / ".cache" / "lensscan"))


def _bands(text: str | None) -> tuple[str, ...] | None:
    return tuple(b.strip() for b in text.split(",") if b.strip()) if text else None


def demo_survey():
    """The built-in demo survey, generated on first use and cached."""
    from scanner.mock_survey import MockSurveyConfig, make_mock_survey, open_mock_survey

    key = "-".join(str(DEMO[k]) for k in ("seed", "n_tiles", "size_pix", "n_lenses"))
    root = cache_dir() / f"demo-survey-{key}"
    survey = open_mock_survey(str(root))
    if survey is None:
        logger.info("generating the demo survey in %s (once)", root)
        survey = make_mock_survey(str(root), MockSurveyConfig(**DEMO))
    return survey


def cmd_scan(args: argparse.Namespace) -> int:
    from scanner.config import ScanConfig
    from scanner.pipeline import ScanRefused, root_cause, run_scan
    from scanner.registry import RegistryError, default_models_dir

    tiles, catalog, pattern, out, truth = args.tiles, args.catalog, args.tile_pattern, args.out, args.truth
    resume, overwrite = args.resume, args.overwrite
    if tiles is None:
        if catalog is not None:
            print("lensscan scan: --catalog needs --tiles", file=sys.stderr)
            return 2
        survey = demo_survey()
        tiles, catalog = survey.tiles_url, survey.catalog_url  # its layout is discovered
        truth = truth or survey.truth_url
        if out is None:
            # The demo's own output is replaced on every run; an --out the user names is not.
            out = DEMO_OUT
            overwrite = overwrite or not resume
    if out is None:
        print("lensscan scan: give --out (where to write the catalogs)", file=sys.stderr)
        return 2
    models = tuple(args.models) if args.models else (str(default_models_dir()),)
    config = ScanConfig(tiles=tiles, catalog=catalog, out=out, model_dirs=models,
                        bands=_bands(args.bands), tile_pattern=pattern, batch_size=args.batch_size,
                        num_actors=args.num_actors, num_gpus_per_actor=args.num_gpus_per_actor,
                        write_csv=args.csv, resume=resume, overwrite=overwrite, address=args.address,
                        truth=truth, report_top_n=args.report_top, precision=args.precision, tta=args.tta)
    try:
        result = run_scan(config)
    except (ScanRefused, RegistryError, FileNotFoundError, ValueError) as exc:
        print(f"lensscan scan: refused: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - one line for the user; the traceback is in -v logs
        cause = root_cause(exc)
        logger.debug("scan failed", exc_info=exc)
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        print(f"lensscan scan: failed: {type(cause).__name__}: {first}; finished tiles are kept, fix "
              f"the cause and re-run the same command with --resume", file=sys.stderr)
        return 1
    print(result.summary())
    found = " (found without --tile-pattern)" if pattern is None else ""
    print(f"tiles:      {result.tile_layout}{found}")
    if truth:
        from scanner.report import ReportError, truth_line, truth_summary

        try:
            print(truth_line(truth_summary(out, truth, top_n=50)))
        except ReportError as exc:
            print(f"lensscan scan: no truth figures: {exc}", file=sys.stderr)
    print(f"candidates: {out}/candidates.parquet" + (f"  csv: {out}/candidates.csv" if args.csv else ""))
    if config.report_top_n > 0:
        print(f"report:     {out}/report.html (open it in a browser to inspect and grade)")
    if result.n_failed:
        print(f"failures:   {out}/failures (every object that could not be scored, with the reason)")
    return result.exit_code


def cmd_mock_survey(args: argparse.Namespace) -> int:
    from scanner.mock_survey import MockSurveyConfig, make_mock_survey

    config = MockSurveyConfig(n_tiles=args.tiles, size_pix=args.size, bands=_bands(args.bands),
                              pixel_scale_arcsec=args.pixel_scale, n_lenses=args.lenses, seed=args.seed,
                              layout=args.layout, compress=args.compress)
    survey = make_mock_survey(args.out, config)
    print(f"tiles:   {survey.tiles_url}/{survey.tile_pattern}\ncatalog: {survey.catalog_url}\n"
          f"truth:   {survey.truth_url}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lensscan", description="Scan imaging surveys for strong "
                                     "gravitational lenses, and train the classifiers that do it.")
    parser.add_argument("--version", action="version", version=f"lensscan {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("scan", help="score every catalog object on the survey's tiles (no arguments: "
                       "the built-in demo survey)")
    p.add_argument("--tiles", help="URL of the directory holding the FITS tiles (path, s3://, gs://)")
    p.add_argument("--catalog", help="object catalog, Parquet or CSV with objid, ra, dec [, tile]")
    p.add_argument("--tile-pattern",
                   help="tile file names: '{tile}_{band}.fits' (a file per band) or '{tile}.fits' "
                   "(multi-extension, EXTNAME=band); .fits.fz for Rice-compressed, .fits.gz for "
                   "gzipped (default: discover both layouts, each plain, .fits.fz or .fits.gz)")
    p.add_argument("--bands", help="survey bands in the models' channel order, e.g. g,r,i "
                   "(default: the models' bands)")
    p.add_argument("--models", nargs="+", help="model registry dirs (a registry, a model or a version "
                   "dir); default: the built-in ensemble")
    p.add_argument("--out", help="output directory URL (demo: ./lensscan-demo-scan)")
    p.add_argument("--csv", action="store_true", help="also write candidates.csv ranked by score")
    p.add_argument("--address", help="Ray cluster address (auto, ray://host:10001); default: a "
                   "local cluster")
    p.add_argument("--batch-size", type=int, default=256, help="stamps per model forward (default: "
                   "%(default)s)")
    p.add_argument("--num-actors", type=int, help="scoring actors (default: one per GPU, or one per "
                   "CPU)")
    p.add_argument("--num-gpus-per-actor", type=float, default=0.0, help="GPUs per scoring actor "
                   "(0: score on CPUs)")
    p.add_argument("--truth", help="truth table (objid, is_lens) for the report's PR curve; the demo "
                   "uses its own")
    p.add_argument("--report-top", type=int, default=200, help="candidates in report.html "
                   "(0: no report; default: %(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto", help="the models' forward "
                   "precision: auto is bfloat16 on GPUs and float32 on CPUs; bfloat16 on a CPU with "
                   "native bf16 (AVX512-BF16, AMX) scores about 2x faster, within about 0.01 "
                   "(default: %(default)s)")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: score the 8 "
                   "rotations and flips of every stamp and average (8x the scoring cost; more "
                   "lenses at the top of the list, docs/science.md)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted scan in --out")
    p.add_argument("--overwrite", action="store_true", help="replace the lensscan scan that --out "
                   "holds (never anything else: other files are refused)")
    p.set_defaults(func=cmd_scan)

    p = sub.add_parser("mock-survey", help="write a mock multi-band survey with injected lenses")
    p.add_argument("out", help="output directory URL")
    p.add_argument("--tiles", type=int, default=4, help="number of tiles (default: %(default)s)")
    p.add_argument("--size", type=int, default=1024, help="tile side in pixels (default: %(default)s)")
    p.add_argument("--bands", default="g,r,i", help="bands (default: %(default)s)")
    p.add_argument("--pixel-scale", type=float, default=0.26, help="arcsec/pixel (default: %(default)s)")
    p.add_argument("--lenses", type=int, default=20, help="strong lenses to inject (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--layout", choices=["per_band", "mef"], default="per_band",
                   help="a file per band, or one multi-extension file per tile")
    p.add_argument("--compress", action="store_true", help="Rice tile-compress (.fits.fz)")
    p.set_defaults(func=cmd_mock_survey)

    from scanner.bench_cli import add_bench_command
    from scanner.report import add_report_command

    add_report_command(sub)
    add_bench_command(sub)

    for ep in entry_points(group="lensscan.commands"):
        try:
            ep.load()(sub)
        except ImportError as exc:  # an optional extra that is not installed
            logger.warning("lensscan commands from %s are unavailable (%s); reinstall lensscan "
                           "(pip install .)", ep.value, exc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
