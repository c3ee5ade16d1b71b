"""Evaluation on held-out sky: the figures a lens search is judged by, per version and for the ensemble.

The evaluation set is built from one split of a dataset (``holdout`` by default: sky cells no
training stamp came near, ``training.split``):

- positives: every held-out deflector with a simulated lens injected (fixed seed, so every
  version and every later ``lensscan evaluate`` sees the very same lenses; lenses failing the
  detectability cuts are left out), and the split's known lenses (``known_lens`` pool);
- negatives: the same deflectors without a lens (so "red galaxy" alone does not score), the
  split's non-lenses, and look-alikes painted on a seeded share of the deflectors.

Stamps are normalised by the scan's own ``scanner.normalise.normalise``. Metrics are the
scanner's numpy functions (``scanner.metrics``): precision at recall 0.5 / 0.8 / 0.9, AUROC,
recall at zero false positives (TPR0), average precision and precision in the top N. The
ensemble scores each stamp by the mean of its versions' scores, as the scan does.

Example
-------
>>> s = build_eval_set("ds", spec, EvaluationConfig())          # doctest: +SKIP
>>> lens_metrics(score_stamps(model, s.x), s.label, EvaluationConfig())  # doctest: +SKIP
{'n_stamps': 412, 'n_lenses': 96, 'precision_at_recall_0.5': 0.98, ...}
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from scanner.config import InputSpec
from scanner.metrics import (auroc, average_precision, precision_at_recall, precision_at_top,
                             precision_recall, recall_at_zero_false_positives)
from scanner.models import lens_probability
from scanner.normalise import normalise
from training.dataset import DatasetError, StampSet, open_dataset, read_pool
from training.inject import InjectionConfig, inject_lenses
from training.lookalikes import LookalikeConfig, paint_lookalikes

logger = logging.getLogger(__name__)

#: ``kind`` of each evaluation stamp, and whether it is a lens.
EVAL_KINDS = {"lens": 1, "known_lens": 1, "deflector": 0, "non_lens": 0, "lookalike": 0}


@dataclass(frozen=True)
class EvaluationConfig:
    """Which stamps make the evaluation set and which figures are reported.

    Parameters
    ----------
    split : str
        Dataset split to evaluate on: ``holdout`` (sky no training stamp came near) or ``train``.
    seed : int
        Seeds the injected lenses and look-alikes: one seed, one evaluation set.
    lookalike_rate : float
        Look-alike negatives per held-out deflector (painted on a seeded subset; 0 for none).
    max_stamps_per_pool : int
        At most this many stamps of each pool (a seeded subset), bounding memory on a real survey.
    recalls : tuple of float
        Recalls at which precision is reported.
    top_n : tuple of int
        Sizes of the top of the ranked list whose precision is reported.
    batch_size : int
        Stamps per forward pass when scoring.
    inject : bool
        Inject lenses into the split's deflectors. False: the positives are the split's known
        lenses alone, e.g. a survey whose lenses another simulator made (or real ones), which is
        how generalisation from our own injections is measured.
    """

    split: str = "holdout"
    seed: int = 20240611
    lookalike_rate: float = 0.2
    max_stamps_per_pool: int = 20000
    recalls: tuple[float, ...] = (0.5, 0.8, 0.9)
    top_n: tuple[int, ...] = (10, 50, 100)
    batch_size: int = 256
    inject: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "recalls", tuple(float(r) for r in self.recalls))
        object.__setattr__(self, "top_n", tuple(int(n) for n in self.top_n))
        if self.split not in ("train", "holdout"):
            raise ValueError(f"EvaluationConfig.split={self.split!r}: expected 'holdout' or 'train'")
        if not 0 <= self.lookalike_rate <= 1:
            raise ValueError(f"EvaluationConfig.lookalike_rate={self.lookalike_rate}: expected 0..1")
        if any(not 0 < r <= 1 for r in self.recalls) or any(n < 1 for n in self.top_n):
            raise ValueError("EvaluationConfig: recalls must lie in (0, 1] and top_n be >= 1")
        if self.max_stamps_per_pool < 1 or self.batch_size < 1:
            raise ValueError("EvaluationConfig: max_stamps_per_pool and batch_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["recalls"], d["top_n"] = list(self.recalls), list(self.top_n)
        return d


@dataclass
class EvalSet:
    """Normalised stamps ``x`` (N, C, S, S) float32 with ``label`` (N,) 1 = lens, ``objid`` of
    the host stamp and ``kind`` (see :data:`EVAL_KINDS`); an injected lens and its bare deflector
    share an objid."""

    x: np.ndarray
    label: np.ndarray
    objid: np.ndarray
    kind: np.ndarray

    def __len__(self) -> int:
        return len(self.label)


def _subset(pool: StampSet, limit: int, rng: np.random.Generator) -> StampSet:
    if len(pool) <= limit:
        return pool
    return pool.take(np.sort(rng.choice(len(pool), size=limit, replace=False)))


def build_eval_set(data: str, spec: InputSpec, config: EvaluationConfig,
                   injection: InjectionConfig, lookalikes: LookalikeConfig,
                   chunk: int = 256) -> EvalSet:
    """Return the evaluation set of dataset ``data`` (see the module docstring), on the CPU.

    The same arguments give the same stamps, bit for bit: pools are read in objid order and every
    draw comes from ``config.seed``.

    Raises
    ------
    DatasetError
        The dataset's bands or stamp size differ from ``spec``, or the split holds no deflector
        and no known lens (nothing to measure recall on).
    """
    info = open_dataset(data)
    if tuple(info["bands"]) != tuple(spec.bands) or \
            int(info["input_spec"]["stamp_size_pix"]) != spec.stamp_size_pix:
        raise DatasetError(f"{data}: the dataset has bands {info['bands']} at "
                           f"{info['input_spec']['stamp_size_pix']} px; the models want "
                           f"{list(spec.bands)} at {spec.stamp_size_pix} px")
    rng = np.random.default_rng(config.seed)
    pools = {name: _subset(read_pool(data, name, config.split), config.max_stamps_per_pool, rng)
             for name in ("deflector", "non_lens", "known_lens")}
    deflectors = pools["deflector"]
    if not config.inject and len(pools["known_lens"]) == 0:
        raise DatasetError(f"{data}: split {config.split!r} has no known lenses to measure recall "
                           f"on without injection; build the dataset with --truth, or inject")
    if len(deflectors) == 0 and len(pools["known_lens"]) == 0:
        raise DatasetError(f"{data}: split {config.split!r} has no deflectors and no known lenses, "
                           f"so there is nothing to measure recall on; build the dataset with a "
                           f"larger --holdout-fraction or looser deflector cuts")
    generator = torch.Generator().manual_seed(config.seed)
    raws: list[np.ndarray] = []
    objids: list[np.ndarray] = []
    kinds: list[np.ndarray] = []

    def add(raw: np.ndarray, ids: np.ndarray, kind: str) -> None:
        raws.append(raw)
        objids.append(np.asarray(ids, np.int64))
        kinds.append(np.full(len(ids), kind))

    deflector_ids = deflectors.rows["objid"].to_numpy()
    for start in range(0, len(deflectors) if config.inject else 0, chunk):
        index = np.arange(start, min(start + chunk, len(deflectors)))
        part = torch.from_numpy(deflectors.stamps[index])
        lensed, params = inject_lenses(part, deflectors.meta[torch.from_numpy(index)], injection,
                                       generator)
        ok = params["passed_cuts"].numpy()
        add(lensed.numpy()[ok], deflector_ids[index][ok], "lens")
    n_look = int(round(config.lookalike_rate * len(deflectors)))
    if n_look:
        hosts = np.sort(rng.choice(len(deflectors), size=n_look, replace=False))
        for start in range(0, n_look, chunk):
            index = hosts[start:start + chunk]
            painted, _ = paint_lookalikes(torch.from_numpy(deflectors.stamps[index]),
                                          deflectors.meta[torch.from_numpy(index)], lookalikes,
                                          generator)
            add(painted.numpy(), deflector_ids[index], "lookalike")
    for name, kind in (("deflector", "deflector"), ("non_lens", "non_lens"),
                       ("known_lens", "known_lens")):
        pool = pools[name]
        if len(pool):
            add(pool.stamps, pool.rows["objid"].to_numpy(), kind)
    raw = np.concatenate(raws) if raws else np.zeros((0, spec.n_channels, spec.stamp_size_pix,
                                                      spec.stamp_size_pix), np.float32)
    kind = np.concatenate(kinds)
    label = np.array([EVAL_KINDS[k] for k in kind], dtype=np.int8)
    x = np.concatenate([normalise(raw[s:s + chunk], spec) for s in range(0, len(raw), chunk)]) \
        if len(raw) else raw
    logger.info("evaluation set of %s (%s): %d stamps, %d lenses", data, config.split, len(label),
                int(label.sum()))
    return EvalSet(x=x, label=label, objid=np.concatenate(objids), kind=kind)


def score_stamps(model: nn.Module, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Return lens probabilities (N,) float32 of normalised stamps ``x`` under ``model``, on the CPU.

    Scored the way ``scanner.registry.Ensemble.predict`` scores on the CPU (eval mode,
    ``inference_mode``, float32, channels-last), so an exported version reproduces these scores.
    The model is not modified.
    """
    net = copy.deepcopy(model).to("cpu", memory_format=torch.channels_last).eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(x), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(x[start:start + batch_size]))
            batch = batch.contiguous(memory_format=torch.channels_last)
            out.append(lens_probability(net(batch).float()).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros(0, np.float32)


def _finite(value: float) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def lens_metrics(scores: np.ndarray, labels: np.ndarray, config: EvaluationConfig
                 ) -> dict[str, Any]:
    """Return the evaluation figures of ranking ``labels`` by ``scores``, JSON-ready.

    Keys: ``n_stamps``, ``n_lenses``, ``precision_at_recall_<r>`` for each of ``config.recalls``,
    ``auroc``, ``tpr0`` (recall at zero false positives), ``average_precision`` and
    ``precision_top_<n>`` for each of ``config.top_n``. Undefined figures (no lenses, say) are
    None, never NaN, so ``model.json`` stays strict JSON.
    """
    scores = np.asarray(scores, dtype=np.float32)
    labels = np.asarray(labels).astype(bool)
    out: dict[str, Any] = {"n_stamps": int(labels.size), "n_lenses": int(labels.sum())}
    for r in config.recalls:
        out[f"precision_at_recall_{r:g}"] = _finite(precision_at_recall(scores, labels, r))
    out["auroc"] = _finite(auroc(scores, labels))
    out["tpr0"] = _finite(recall_at_zero_false_positives(scores, labels))
    out["average_precision"] = _finite(average_precision(scores, labels))
    for n in config.top_n:
        out[f"precision_top_{n}"] = _finite(precision_at_top(scores, labels, n)) if labels.size else None
    return out


def write_predictions(path: str | Path, eval_set: EvalSet, scores: dict[str, np.ndarray]) -> Path:
    """Write ``objid, label, kind`` and one float32 column per entry of ``scores`` as Parquet.

    Written to a temporary name and renamed, so a half-written file never looks complete.
    """
    path = Path(path)
    columns = {"objid": pa.array(eval_set.objid, pa.int64()),
               "label": pa.array(eval_set.label, pa.int8()),
               "kind": pa.array(eval_set.kind.astype(str), pa.string())}
    columns.update({name: pa.array(np.asarray(s, np.float32), pa.float32())
                    for name, s in scores.items()})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(columns), tmp)
    tmp.replace(path)
    return path


def pr_curve_png(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path,
                 title: str = "held-out precision-recall") -> Path:
    """Draw one precision-recall curve per ``name -> (scores, labels)`` into a PNG at ``path``.

    A curve named ``ensemble`` is drawn bold, the others thin; the lens fraction (a random
    ranking) is the dotted line.
    """
    from matplotlib.figure import Figure

    many = len(curves) > 5  # the legend goes beside the axes, and the curves get a colour cycle
    fig = Figure(figsize=(7.6 if many else 4.8, 3.6))
    ax = fig.subplots()
    if many:
        from matplotlib import colormaps

        ax.set_prop_cycle(color=colormaps["tab20"].colors[:len(curves)])
    fraction = None
    for name, (scores, labels) in curves.items():
        curve = precision_recall(scores, labels)
        if curve.n_positive == 0:
            continue
        bold = name == "ensemble"
        ax.step(np.r_[0.0, curve.recall], np.r_[1.0, curve.precision], where="post",
                lw=2.2 if bold else 1.0, color="black" if bold else None, label=name)
        fraction = curve.n_positive / len(scores)
    if fraction is not None:
        ax.axhline(fraction, color="grey", ls=":", lw=1, label="lens fraction")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=9)
    if many:
        ax.legend(fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    else:
        ax.legend(fontsize=7, frameon=False, loc="best")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    path = Path(path)
    path.write_bytes(buffer.getvalue())
    return path


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """Return a plain-text table: one row per model (version or ensemble), one column per figure."""
    if not rows:
        return "(no models)"
    keys = [k for k in next(iter(rows.values())) if k not in ("n_stamps", "n_lenses")]
    short = {k: k.replace("precision_at_recall_", "P@R").replace("precision_top_", "P@top")
             .replace("average_precision", "AP") for k in keys}
    width = max(len(name) for name in rows) + 2
    lines = [" " * width + " ".join(f"{short[k]:>9s}" for k in keys)]
    for name, metrics in rows.items():
        cells = ["      n/a" if metrics[k] is None else f"{metrics[k]:9.3f}" for k in keys]
        lines.append(f"{name:<{width}s}" + " ".join(cells))
    return "\n".join(lines)


@dataclass
class EvaluationReport:
    """Per-version and ensemble figures of one evaluation, and where they were written."""

    metrics: dict[str, dict[str, Any]]
    n_stamps: int
    n_lenses: int
    json_path: Path | None = None
    png_path: Path | None = None

    def __str__(self) -> str:
        return (f"{self.n_stamps} stamps, {self.n_lenses} lenses\n" + format_table(self.metrics))


def ensemble_report(eval_set: EvalSet, scores: dict[str, np.ndarray], config: EvaluationConfig,
                    out: str | Path | None, extra: dict[str, Any] | None = None) -> EvaluationReport:
    """Return (and with ``out``, write) the figures of each scored model and of their mean.

    ``scores`` maps a model label (e.g. ``v1``) to its scores over ``eval_set``. With more than
    one model an ``ensemble`` row (mean score) is added. ``out`` receives ``evaluation.json``,
    ``pr_curve.png`` and ``predictions.parquet``.
    """
    scores = dict(scores)
    if len(scores) > 1:
        scores["ensemble"] = np.mean(np.stack(list(scores.values())), axis=0).astype(np.float32)
    metrics = {name: lens_metrics(s, eval_set.label, config) for name, s in scores.items()}
    report = EvaluationReport(metrics, len(eval_set), int(eval_set.label.sum()))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        record = {"evaluation": config.to_dict(), "n_stamps": report.n_stamps,
                  "n_lenses": report.n_lenses, "metrics": metrics, **(extra or {})}
        report.json_path = out / "evaluation.json"
        report.json_path.write_text(json.dumps(record, indent=2) + "\n")
        report.png_path = pr_curve_png({n: (s, eval_set.label) for n, s in scores.items()},
                                       out / "pr_curve.png")
        write_predictions(out / "predictions.parquet", eval_set,
                          {f"score_{n}": s for n, s in scores.items()})
    return report


def _recorded_eval_setup(metas: Sequence[dict[str, Any]]
                         ) -> tuple[EvaluationConfig, InjectionConfig, LookalikeConfig]:
    """The evaluation set the versions were measured on at export, when they all agree."""
    from training.config import dataclass_from_dict

    recorded = [m.get("training", {}).get("evaluation_set") for m in metas]
    if recorded and all(r is not None and r == recorded[0] for r in recorded):
        r = recorded[0]
        return (dataclass_from_dict(EvaluationConfig, r["evaluation"], "evaluation"),
                dataclass_from_dict(InjectionConfig, r["injection"], "injection"),
                dataclass_from_dict(LookalikeConfig, r["lookalikes"], "lookalikes"))
    return EvaluationConfig(), InjectionConfig(), LookalikeConfig()


def evaluate_models(model_dirs: Sequence[str | Path], data: str, out: str | Path | None,
                    split: str | None = None, inject: bool | None = None) -> EvaluationReport:
    """Evaluate every version under ``model_dirs`` and their ensemble on a dataset's labelled stamps.

    The evaluation set is the one recorded in the versions' ``model.json`` (same seed, lenses and
    look-alikes as at export, so the figures are reproduced) when they all agree, else the
    defaults; ``split`` overrides its split and ``inject=False`` keeps only the known lenses as
    positives (a survey whose lenses another simulator made). Versions are scored by the scanner's own
    ``Ensemble.predict``.

    Raises
    ------
    scanner.registry.RegistryError
        No loadable versions, or versions with different input specs.
    DatasetError
        A dataset that does not match the models' input spec or has nothing to evaluate.
    """
    from scanner.registry import load_ensemble

    ensemble = load_ensemble(list(model_dirs))
    config, injection, lookalikes = _recorded_eval_setup([v.meta for v in ensemble.versions])
    if split is not None:
        config = dataclasses.replace(config, split=split)
    if inject is not None:
        config = dataclasses.replace(config, inject=inject)
    eval_set = build_eval_set(data, ensemble.input_spec, config, injection, lookalikes)
    columns = []
    for start in range(0, len(eval_set), config.batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(eval_set.x[start:start + config.batch_size]))
        columns.append(ensemble.predict(batch).cpu().numpy())
    predicted = np.concatenate(columns) if columns else np.zeros((0, len(ensemble)), np.float32)
    labels = [f"{v.name}_v{v.version}" for v in ensemble.versions]
    scores = {label: predicted[:, i] for i, label in enumerate(labels)}
    extra = {"data": data, "models": ensemble.describe()}
    return ensemble_report(eval_set, scores, config, out, extra)
