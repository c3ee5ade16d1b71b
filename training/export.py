"""Export a trained run to the model registry: weights, provenance, held-out figures, predictions.

A version directory gets the scanner's ``model.safetensors`` and ``model.json`` (through
``scanner.registry.save_version``: architecture, input spec, content hash) with ``training``
holding the method and its hyper-parameters, the schedule, the stream (injection, look-alikes,
augmentations), GAN use, data provenance, the evaluation set, the per-epoch history and the
training throughput, and ``metrics`` the held-out figures. Beside them, ``predictions.parquet``
holds the held-out scores those figures were computed from (``objid, label, kind, score``), so
anyone can recompute them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from scanner.config import InputSpec
from scanner.models import build_model
from scanner.registry import save_version
from training.checkpoint import read_state, read_weights
from training.config import TrainConfig
from training.evaluate import EvalSet, lens_metrics, score_stamps, write_predictions
from training.methods import build_method, hyper_parameters

logger = logging.getLogger(__name__)


def exported_network(checkpoint: str | Path, config: TrainConfig, spec: InputSpec):
    """Return the network a checkpoint exports, in eval mode: the method's teacher when it keeps one.

    Mean Teacher, MixMatch and FixMatch evaluate and export their weight average, as their papers
    do; the other methods the trained network itself.
    """
    method = build_method(config.method, config.method_params)
    which = "teacher" if method.ema_decay is not None else "model"
    net = build_model(config.architecture, config.model_params, spec.n_channels)
    net.load_state_dict(read_weights(checkpoint, which))
    return net.eval()


def _gan_record(config: TrainConfig) -> dict[str, Any] | None:
    if config.gan is None:
        return None
    from training.gan import GeneratedLenses

    return {**GeneratedLenses(config.gan).describe(), "fraction": config.stream.gan_fraction}


def training_record(config: TrainConfig, version: int, dataset_info: dict[str, Any],
                    state: dict[str, Any]) -> dict[str, Any]:
    """Return the ``training`` section of a version's ``model.json``."""
    method = build_method(config.method, config.method_params)
    history = state["history"]
    throughput = [h["stamps_per_s_per_worker"] for h in history]
    return {
        "method": config.method,
        "method_params": hyper_parameters(method),
        "exported_weights": "teacher (EMA)" if method.ema_decay is not None else "model",
        "seed": config.version_seed(version),
        "epochs": state["epoch"],
        "steps": state["step"],
        "workers": config.workers,
        "gpu": config.gpu,
        "optimizer": {"name": "adamw", "learning_rate": config.learning_rate,
                      "weight_decay": config.weight_decay},
        "unlabelled_batch_size": config.unlabelled_batch_size if method.uses_unlabelled else None,
        "stream": config.stream.to_dict(),
        "augment": config.stream.augment.to_dict(),
        "unlabelled_augment": ({"weak": config.weak_augment.to_dict(),
                                "strong": config.strong_augment.to_dict()}
                               if method.uses_unlabelled else None),
        "gan": _gan_record(config),
        "grades": (None if config.grades is None else
                   {"url": config.grades, "scan": config.grades_scan,
                    "known_lens_fraction": config.stream.known_lens_fraction}),
        "data": {"url": config.data, "lensscan_version": dataset_info.get("lensscan_version"),
                 "counts": dataset_info.get("counts"), "sky_split": dataset_info.get("sky_split"),
                 "dataset_config": dataset_info.get("config")},
        "evaluation_set": {"evaluation": config.evaluation.to_dict(),
                           "injection": config.stream.injection.to_dict(),
                           "lookalikes": config.stream.lookalikes.to_dict()},
        "stamps_per_s_per_worker": sum(throughput) / len(throughput) if throughput else None,
        "history": history,
        "resumes": state["resumes"],
        "config": config.to_dict(),
    }


def export_version(checkpoint: str | Path, config: TrainConfig, version: int, spec: InputSpec,
                   dataset_info: dict[str, Any], eval_set: EvalSet) -> Path:
    """Evaluate a run's last checkpoint on ``eval_set`` and write it as ``version-<version>``.

    Returns the version directory. An existing directory of that version is replaced: it can
    only be an earlier export of the same run (``train`` refuses outputs of other runs).
    """
    state = read_state(checkpoint)
    net = exported_network(checkpoint, config, spec)
    scores = score_stamps(net, eval_set.x, config.evaluation.batch_size)
    metrics = lens_metrics(scores, eval_set.label, config.evaluation)
    path = save_version(net, config.out, name=config.name, version=version,
                        architecture=config.architecture, params=config.model_params,
                        input_spec=spec, training=training_record(config, version, dataset_info, state),
                        metrics=metrics, overwrite=True)
    write_predictions(path / "predictions.parquet", eval_set, {"score": scores})
    logger.info("exported %s (AUROC %s, TPR0 %s)", path, metrics["auroc"], metrics["tpr0"])
    return path


def copy_versions(model_dir: str | Path, out: str | Path, *, name: str | None = None,
                  dtype: torch.dtype = torch.float16, overwrite: bool = False) -> list[Path]:
    """Copy every version under ``model_dir`` into registry ``out`` (weights in ``dtype``).

    How the built-in ensemble ships: trained into a work registry, then copied with float16
    weights (half the size, scores within float16 rounding) and without checkpoints or
    predictions. ``model.json``'s training record and metrics travel unchanged, plus the source.
    """
    from scanner.registry import load_ensemble

    ensemble = load_ensemble([str(model_dir)])
    written = []
    for v in ensemble.versions:
        training = {**v.meta.get("training", {}), "copied_from": {"path": str(v.path),
                                                                   "content_hash": v.content_hash}}
        written.append(save_version(v.model, out, name=name or v.name, version=v.version,
                                    architecture=v.architecture, params=v.params,
                                    input_spec=v.input_spec, training=training,
                                    metrics=v.meta.get("metrics"), dtype=dtype, overwrite=overwrite))
    return written

