"""``lensscan ablate``: the papers' ablation grid and scaling study, on Ray, into one table.

The grid is methods x {augmentation off, on} x {GAN off, on}, each cell trained ``versions`` times
(independent seeds) with the one training loop (:func:`training.loop.train`); the scaling study
trains one method on growing numbers of deflector hosts for simulated lenses and of non-lenses
(``TrainConfig.max_pool_stamps``). Every cell is then scored on a *test* dataset without injection:
its positives are the test survey's known lenses, made by another simulator than training's
injections, so a cell that learnt our simulator's artefacts is punished rather than rewarded.

Trials run as Ray tasks, ``max_concurrent`` at a time (each trial's Ray Train workers take their
own CPUs or GPUs, so the cluster's resources bound the parallelism too). Outputs in ``out``:
``registry/<cell>/version-<k>`` (the trained models), ``eval/<cell>/`` (test-set figures),
``results.csv`` (one row per cell and version, plus the cell's ensemble), ``results.md`` (mean and
spread over versions) and ``pr_curves.png`` (each cell's ensemble on the test set).

Example
-------
>>> run_ablation(AblationConfig.from_file("configs/ablation-small.toml"))   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping

import pandas as pd

from training.config import TRAIN_POOLS, TrainConfig, dataclass_from_dict, read_config_file

logger = logging.getLogger(__name__)

#: Figures of the table, in ``lens_metrics`` keys, and their column titles.
FIGURES = {"precision_at_recall_0.5": "P@R0.5", "precision_at_recall_0.8": "P@R0.8",
           "precision_at_recall_0.9": "P@R0.9", "auroc": "AUROC", "tpr0": "TPR0"}


@dataclass(frozen=True)
class AblationConfig:
    """One ablation: the grid, the scaling study, and what every trial shares.

    Parameters
    ----------
    data : str
        Training dataset (``lensscan build-dataset``).
    test : str
        Test dataset with known lenses from another simulator (``build-dataset --truth`` on a
        mock survey, or real lenses); scored without injection.
    out : str
        Output directory (local).
    train : dict
        ``TrainConfig`` settings every trial shares (epochs, steps, width, workers, ...).
    method_params : dict of str to dict
        Hyper-parameters per method (e.g. a ramp-up shortened to the run's length), on top of
        the published defaults.
    methods, augment, gan : tuple
        The grid's axes. ``gan`` True needs ``gan_dir``.
    gan_dir : str, optional
        A trained GAN (``lensscan gan train``) for the GAN-on cells.
    gan_fraction : float
        Share of each batch's positives the GAN replaces in GAN-on cells.
    versions : int
        Independent trainings per cell; the table gives their mean and spread.
    scaling_method : str
        Method of the scaling study's cells (augmentation on, no GAN).
    scaling_deflectors, scaling_non_lens : tuple of int
        Numbers of deflector hosts (simulated lenses) and of non-lenses to train on, each varied
        with the other pool whole. Empty: no scaling study.
    max_concurrent : int
        Trials run at once.
    """

    data: str
    test: str
    out: str
    train: dict[str, Any] = field(default_factory=dict)
    method_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    methods: tuple[str, ...] = ("supervised", "pi_model")
    augment: tuple[bool, ...] = (False, True)
    gan: tuple[bool, ...] = (False,)
    gan_dir: str | None = None
    gan_fraction: float = 0.25
    versions: int = 2
    scaling_method: str = "supervised"
    scaling_deflectors: tuple[int, ...] = ()
    scaling_non_lens: tuple[int, ...] = ()
    max_concurrent: int = 1

    def __post_init__(self) -> None:
        from scanner import storage

        # Trials run in Ray tasks, in other directories: local paths are made absolute.
        for name in ("data", "test", "out", "gan_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, storage.absolute(getattr(self, name)))
        for name in ("methods", "augment", "gan", "scaling_deflectors", "scaling_non_lens"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not self.methods or not self.augment or not self.gan:
            raise ValueError("AblationConfig: methods, augment and gan need at least one value each")
        if True in self.gan and self.gan_dir is None:
            raise ValueError("AblationConfig: gan includes true but gan_dir is not set; train one "
                             "with 'lensscan gan train' and give its directory")
        if self.versions < 1 or self.max_concurrent < 1:
            raise ValueError("AblationConfig: versions and max_concurrent must be >= 1")
        reserved = {"data", "out", "name", "method", "method_params", "versions", "gan",
                    "max_pool_stamps"}
        if reserved & set(self.train):
            raise ValueError(f"AblationConfig.train sets {sorted(reserved & set(self.train))}, which "
                             f"the ablation sets per cell; remove them")
        for cell in self.cells():  # refuses bad methods and train settings before anything runs
            self.train_config(cell)

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "AblationConfig":
        """Read a TOML, JSON or YAML ablation config; ``overrides`` replace top-level fields."""
        return dataclass_from_dict(cls, {**read_config_file(path), **overrides}, "ablation config")

    def cells(self) -> list["Cell"]:
        """Every cell of the grid, then of the scaling study, in a fixed order."""
        grid = [Cell(m, a, g) for m in self.methods for a in self.augment for g in self.gan]
        scaling = [Cell(self.scaling_method, True, False, {"deflector": n})
                   for n in self.scaling_deflectors]
        scaling += [Cell(self.scaling_method, True, False, {"non_lens": n})
                    for n in self.scaling_non_lens]
        return grid + scaling

    def train_config(self, cell: "Cell") -> TrainConfig:
        """The ``TrainConfig`` of one cell: the shared settings plus the cell's axes."""
        from training.augment import AugmentConfig

        d = json.loads(json.dumps(self.train))  # a deep copy of plain data
        stream = dict(d.get("stream", {}))
        stream["augment"] = (AugmentConfig() if cell.augment else AugmentConfig.none()).to_dict()
        stream["gan_fraction"] = self.gan_fraction if cell.gan else 0.0
        d.update(data=self.data, out=str(Path(self.out) / "registry"), name=cell.name,
                 method=cell.method, method_params=self.method_params.get(cell.method, {}),
                 versions=self.versions, stream=stream,
                 gan=self.gan_dir if cell.gan else None, max_pool_stamps=cell.pools)
        return TrainConfig.from_dict(d)


@dataclass(frozen=True)
class Cell:
    """One trial setting: method, augmentation, GAN, and pool limits (scaling study)."""

    method: str
    augment: bool
    gan: bool
    pools: Mapping[str, int] = field(default_factory=dict)

    @property
    def name(self) -> str:
        parts = [self.method, "aug" if self.augment else "noaug", "gan" if self.gan else "nogan"]
        parts += [f"{pool}{n}" for pool, n in sorted(self.pools.items())]
        return "-".join(parts)

    def describe(self) -> dict[str, Any]:
        return {"cell": self.name, "method": self.method, "augment": self.augment, "gan": self.gan,
                **{f"max_{pool}": self.pools.get(pool) for pool in TRAIN_POOLS if pool != "unlabelled"}}


def _train_and_test(config: TrainConfig, test: str, eval_dir: str) -> dict[str, Any]:
    """Train one cell (all its versions), then score it on the test set; return the figures."""
    from training.evaluate import evaluate_models
    from training.loop import train

    paths = train(config)
    report = evaluate_models([str(p) for p in paths], test, eval_dir, split="holdout", inject=False)
    return {"metrics": report.metrics, "n_stamps": report.n_stamps, "n_lenses": report.n_lenses}


def _run_trials(config: AblationConfig, cells: list[Cell]) -> Iterator[tuple[Cell, dict[str, Any]]]:
    """Yield (cell, figures) as trials finish, at most ``max_concurrent`` at a time on Ray."""
    import ray

    from training.loop import _ensure_ray

    jobs = [(cell, config.train_config(cell)) for cell in cells]
    if config.max_concurrent == 1:
        for cell, tc in jobs:
            yield cell, _train_and_test(tc, config.test, str(Path(config.out) / "eval" / cell.name))
        return
    _ensure_ray(jobs[0][1])
    # num_cpus=0: the trial's own Ray Train workers hold its CPUs (and GPUs).
    remote = ray.remote(num_cpus=0, max_retries=0)(_train_and_test)
    pending: dict[Any, Cell] = {}
    queue = list(jobs)
    while queue or pending:
        while queue and len(pending) < config.max_concurrent:
            cell, tc = queue.pop(0)
            eval_dir = str(Path(config.out) / "eval" / cell.name)
            pending[remote.remote(tc, config.test, eval_dir)] = cell
        [done], _ = ray.wait(list(pending), num_returns=1)
        yield pending.pop(done), ray.get(done)


def _rows(cell: Cell, figures: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per version of the cell and one for its ensemble (mean score of the versions)."""
    rows = []
    for model, metrics in figures["metrics"].items():
        version = "ensemble" if model == "ensemble" else model.rsplit("_v", 1)[-1]
        rows.append({**cell.describe(), "version": version, "n_test_stamps": figures["n_stamps"],
                     "n_test_lenses": figures["n_lenses"],
                     **{key: metrics.get(key) for key in FIGURES}})
    if not any(r["version"] == "ensemble" for r in rows):  # one version: it is the ensemble
        rows.append({**rows[0], "version": "ensemble"})
    return rows


def summarise(results: pd.DataFrame) -> pd.DataFrame:
    """Per cell: mean and standard deviation over versions, and the ensemble's figure."""
    # Undefined figures (None in the CSV rows) become NaN, so means skip nothing silently.
    results = results.assign(**{k: pd.to_numeric(results[k], errors="coerce") for k in FIGURES})
    versions = results[results["version"] != "ensemble"]
    ensemble = results[results["version"] == "ensemble"].set_index("cell")
    out = []
    for cell, group in versions.groupby("cell", sort=False):
        row = {k: group.iloc[0][k] for k in ("cell", "method", "augment", "gan", "max_deflector",
                                            "max_non_lens")}
        row["versions"] = len(group)
        for key in FIGURES:
            row[f"{key}_mean"] = float(group[key].mean())
            row[f"{key}_std"] = float(group[key].std(ddof=0))
            row[f"{key}_ensemble"] = float(ensemble.loc[cell, key])
        out.append(row)
    return pd.DataFrame(out)


def _fmt(mean: float, std: float) -> str:
    return "n/a" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def markdown_table(summary: pd.DataFrame, n_lenses: int, n_stamps: int) -> str:
    """The results as a Markdown table: mean ± standard deviation over versions, per figure."""
    head = ["cell", "versions", *FIGURES.values(), "ensemble P@R0.8"]
    lines = [f"Test set: {n_stamps} stamps, {n_lenses} known lenses (scored without injection). "
             f"Each figure: mean ± standard deviation over the cell's versions.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in summary.iterrows():
        cells = [str(r["cell"]), str(r["versions"])]
        cells += [_fmt(r[f"{k}_mean"], r[f"{k}_std"]) for k in FIGURES]
        ens = r["precision_at_recall_0.8_ensemble"]
        cells.append("n/a" if math.isnan(ens) else f"{ens:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pr_figure(config: AblationConfig, cells: list[Cell], path: Path) -> Path:
    """Every cell's ensemble PR curve on the test set, in one figure (the papers' Figure)."""
    from training.evaluate import pr_curve_png

    curves = {}
    for cell in cells:
        predictions = pd.read_parquet(Path(config.out) / "eval" / cell.name / "predictions.parquet")
        column = "score_ensemble" if "score_ensemble" in predictions else \
            next(c for c in predictions.columns if c.startswith("score_"))
        curves[cell.name] = (predictions[column].to_numpy(), predictions["label"].to_numpy())
    return pr_curve_png(curves, path, title="test-set precision-recall, each cell's ensemble")


def run_ablation(config: AblationConfig) -> pd.DataFrame:
    """Train and test every cell; write results.csv, results.md, pr_curves.png; return the summary.

    A cell whose versions are already exported is not retrained (``train`` keeps finished
    versions), so an interrupted ablation re-run continues where it stopped.
    """
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    cells = config.cells()
    logger.info("ablation: %d cells x %d versions, %d at a time", len(cells), config.versions,
                config.max_concurrent)
    rows, n_lenses, n_stamps = [], 0, 0
    from tqdm.auto import tqdm

    for cell, figures in tqdm(_run_trials(config, cells), total=len(cells), desc="cells",
                              unit="cell", disable=None):
        rows += _rows(cell, figures)
        n_lenses, n_stamps = figures["n_lenses"], figures["n_stamps"]
        logger.info("cell %s: P@R0.8 %s", cell.name,
                    figures["metrics"].get("ensemble", next(iter(figures["metrics"].values())))
                    ["precision_at_recall_0.8"])
    order = {c.name: i for i, c in enumerate(cells)}
    results = pd.DataFrame(rows).sort_values("cell", key=lambda s: s.map(order), kind="stable")
    results.to_csv(out / "results.csv", index=False)
    summary = summarise(results)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "results.md").write_text(markdown_table(summary, n_lenses, n_stamps))
    pr_figure(config, cells, out / "pr_curves.png")
    return summary


__all__ = ["AblationConfig", "Cell", "markdown_table", "run_ablation", "summarise"]
