"""How well an ensemble finds lenses in surveys it never saw: the generalisation benchmark.

    python benchmarks/bench_science.py                       # the built-in ensemble, test surveys
    python benchmarks/bench_science.py --split validation --models registry/candidate --label cand
    python benchmarks/bench_science.py --help

Each survey of ``benchmarks/science_suite.py`` (drawn once into ``--work``, about a minute each) is
scored by the scan's own stages (plan, cut, normalise, ensemble) in this process, and its ranking
is compared with the truth:
recall in the top 1% and 0.1% of ranks, precision in the top 50, AUROC of lenses against the
look-alike families and against everything, and what fills the top 1%. Objects the scan could not
score count as ranked last. Choose recipes on ``--split validation``; run ``--split test`` once per
candidate ensemble and report it. Prints a Markdown table and saves JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import science_suite  # noqa: E402  (a script beside this one, not an installed module)
from scanner import metrics  # noqa: E402

logger = logging.getLogger("bench_science")

#: Figures of the table: key -> column title.
COLUMNS = {"recall_top_1pct": "lenses in top 1%", "recall_top_0.1pct": "in top 0.1%",
           "precision_top_50": "precision top 50", "auroc_vs_lookalikes": "AUROC vs look-alikes",
           "auroc_vs_held_out": "AUROC vs held-out families", "auroc_vs_all": "AUROC vs all"}
#: The issue's targets, for the "how far" line.
TARGETS = {"recall_top_1pct": 0.90, "precision_top_50": 0.80, "auroc_vs_lookalikes": 0.95}


def default_work_dir() -> Path:
    cache = os.environ.get("LENSSCAN_CACHE") or os.path.join(Path.home(), ".cache", "lensscan")
    return Path(cache) / "science-suite"


def ranking_figures(scores: pd.DataFrame, truth: pd.DataFrame) -> dict[str, Any]:
    """The benchmark's figures for one scan: ``scores`` (objid, score) against ``truth``.

    Catalog objects without a score (in the scan's failures) rank below every scored object.
    """
    merged = truth.merge(scores[["objid", "score"]], on="objid", how="left")
    n_unscored = int(merged["score"].isna().sum())
    s = merged["score"].fillna(-1.0).to_numpy(np.float64)
    lens = merged["is_lens"].to_numpy(bool)
    look = merged["is_lookalike"].to_numpy(bool)
    held = merged["held_out_family"].to_numpy(bool)
    n_top = metrics.top_count(len(merged), 0.01)
    top = np.argsort(-s, kind="stable")[:n_top]
    threshold = s[top[-1]]
    families = {}
    for kind, group in merged.groupby("kind"):
        gs = group["score"].fillna(-1.0).to_numpy()
        families[kind] = {"n": int(len(group)), "median_score": float(np.median(gs)),
                          "in_top_1pct": int(np.sum(gs >= threshold))}
    return {
        "n_objects": int(len(merged)), "n_lenses": int(lens.sum()), "n_unscored": n_unscored,
        "top_1pct_slots": int(n_top),
        "recall_top_1pct": metrics.recall_in_top_fraction(s, lens, 0.01),
        "recall_top_0.1pct": metrics.recall_in_top_fraction(s, lens, 0.001),
        "precision_top_50": metrics.precision_at_top(s, lens, 50),
        "auroc_vs_lookalikes": metrics.auroc(s[lens | look], lens[lens | look]),
        "auroc_vs_held_out": metrics.auroc(s[lens | held], lens[lens | held]),
        "auroc_vs_all": metrics.auroc(s, lens),
        "top_1pct_kinds": merged.iloc[top]["kind"].value_counts().to_dict(),
        "families": families,
    }


def score_survey(description: dict[str, Any], plan_dir: Path, ensemble: Any, tta: bool,
                 batch_size: int = 256) -> pd.DataFrame:
    """Score every catalogued object of one suite survey; return ``objid, score``.

    The scan's own plan, cutter, normaliser, float16 hand-over and ensemble, run in this process
    rather than on Ray: the same scores as ``lensscan scan``, without its start-up or a dependence
    on the machine's load. Objects the plan or the cut fails are left out (ranked last).
    """
    import torch

    from scanner.config import ScanConfig
    from scanner.cutouts import make_stamps
    from scanner.normalise import to_float16
    from scanner.plan import make_plan, read_tile_objects
    from scanner.tiles import read_pixels

    spec = ensemble.input_spec
    plan = make_plan(description["tiles_url"], description["tile_pattern"], spec.bands,
                     description["catalog_url"], str(plan_dir), pixel_scale_arcsec=spec.pixel_scale_arcsec)
    frames = []
    for tile in plan.tiles:
        if not plan.objects_per_tile.get(tile.name):
            continue
        objects = read_tile_objects(str(plan_dir), tile.name).to_pandas()
        normed, raw = make_stamps(read_pixels(tile, spec.bands), objects["x"].to_numpy(),
                                  objects["y"].to_numpy(), spec)
        x = torch.from_numpy(to_float16(normed))
        scores = torch.cat([ensemble.predict(x[i:i + batch_size], tta=tta)
                            for i in range(0, len(x), batch_size)]).mean(dim=1).numpy()
        keep = raw.missing_fraction <= ScanConfig.max_missing_fraction  # the scan's default
        frames.append(pd.DataFrame({"objid": objects["objid"].to_numpy()[keep], "score": scores[keep]}))
    return pd.concat(frames, ignore_index=True)


def save_rows(path: Path, earlier: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` to ``path``, keeping earlier rows of other (ensemble, survey) pairs."""
    new = {(r["label"], r["survey"]) for r in rows}
    keep = [r for r in earlier if (r["label"], r["survey"]) not in new]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"rows": keep + rows}, indent=1, default=float))
    tmp.replace(path)


def markdown(rows: list[dict[str, Any]]) -> str:
    """One row per (ensemble, survey): the figures, then what fills the top 1%."""
    head = ["ensemble", "survey", "split", *COLUMNS.values(), "top 1% holds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(r["top_1pct_kinds"].items(), key=lambda kv: -kv[1]))
        cells = [r["label"], r["survey"], r["role"]] + [f"{r[k]:.3f}" for k in COLUMNS] + [kinds]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--split", choices=("validation", "test", "all"), default="test",
                   help="which surveys (default test; choose recipes on validation)")
    p.add_argument("--surveys", default="", help="comma-separated survey names (overrides --split)")
    p.add_argument("--models", action="append", default=[],
                   help="registry directory of the ensemble (repeatable; default: the built-in one)")
    p.add_argument("--label", default="built-in", help="the ensemble's name in the table")
    p.add_argument("--tta", action="store_true", help="score with test-time augmentation")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    p.add_argument("--work", type=Path, default=default_work_dir(),
                   help="where the surveys and scans are kept (default: %(default)s)")
    p.add_argument("--json", type=Path, default=Path(__file__).parent / "results" / "science.json",
                   help="results file; rows of other ensembles or surveys in it are kept")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("ray", "scanner"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    if args.surveys:
        surveys = [science_suite.suite_survey(n) for n in args.surveys.split(",")]
    else:
        surveys = [s for s in science_suite.SUITE if args.split in ("all", s.role)]
    from scanner.registry import default_models_dir, load_ensemble

    model_dirs = tuple(args.models) or (str(default_models_dir()),)
    ensemble = load_ensemble(model_dirs)
    torch.set_num_threads(args.threads or torch.get_num_threads())
    label = args.label + (" +TTA" if args.tta else "")

    previous = json.loads(args.json.read_text()) if args.json.exists() else {"rows": []}
    rows: list[dict[str, Any]] = []
    for survey in surveys:
        t0 = time.perf_counter()
        description = science_suite.make_suite_survey(survey, str(args.work / survey.name))
        t1 = time.perf_counter()
        scores = score_survey(description, args.work / "plans" / survey.name, ensemble, args.tta)
        t2 = time.perf_counter()
        figures = ranking_figures(scores, pd.read_parquet(description["truth_url"]))
        rows.append({"label": label, "models": list(model_dirs), "survey": survey.name,
                     "role": survey.role, "score_s": round(t2 - t1, 1), **figures})
        logger.info("%s on %s: %.0f%% of %d lenses in the top 1%%, precision@50 %.2f, AUROC vs "
                    "look-alikes %.3f (survey %.0f s, scoring %.0f s)", label, survey.name,
                    100 * figures["recall_top_1pct"], figures["n_lenses"], figures["precision_top_50"],
                    figures["auroc_vs_lookalikes"], t1 - t0, t2 - t1)
        save_rows(args.json, previous["rows"], rows)  # after each survey: a long run keeps its rows

    table = markdown(rows)
    print(table)
    for key, target in TARGETS.items():
        worst = min(r[key] for r in rows)
        print(f"{COLUMNS[key]}: worst {worst:.3f} against the target {target:.2f}"
              + ("" if worst >= target else f" ({target - worst:.3f} short)"))
    print(f"saved {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
