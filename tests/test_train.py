"""Training: methods, their shared pieces, metrics, config, checkpoints, and Ray Train end to end.

The end-to-end tests train every method with 2 workers on the session's local Ray cluster, on a
dataset cut from the tiny mock survey, with a width-4 ResNetV2 for 2 epochs of a few steps: they
check behaviour (the loss falls, exports load in the scanner and score as the trained network,
resume continues from the saved step, model.json figures are those of the saved predictions),
not accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from scanner.cli import main as lensscan
from scanner.config import InputSpec
from scanner.metrics import auroc, precision_at_recall, recall_at_zero_false_positives
from scanner.models import build_model
from scanner.registry import load_ensemble
from training.augment import AugmentConfig, augment
from training.checkpoint import load_training_state, read_state, save_training_state
from training.config import WEAK_AUGMENT, TrainConfig
from training.dataset import open_dataset
from training.evaluate import EvaluationConfig, build_eval_set, lens_metrics, score_stamps
from training.export import exported_network
from training.inject import InjectionConfig
from training.lookalikes import LookalikeConfig
from training.loop import TrainingRefused, attach_teacher, optimisation_step, train
from training.methods import (METHODS, LabelledBatch, UnlabelledBatch, build_method,
                              hyper_parameters)
from training.methods.common import ema_copy, ema_update, linear_ramp_up, mixup, sharpen
from training.stream import StreamConfig

# Ray Train's controller polls its workers every 2 s; at 0.1 s each tiny run below ends ~5 s sooner.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")


@pytest.fixture
def one_thread():
    """One torch thread: on a shared 2-core machine, two spinning threads run 10-100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# Methods on fixed batches, without Ray


def _ring_stamps(n: int, generator: torch.Generator, size: int = 32):
    """Noise stamps, every other one with a blue ring around the centre (a toy Einstein ring)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    radius = ((xx - size / 2) ** 2 + (yy - size / 2) ** 2).sqrt()
    ring = torch.exp(-0.5 * ((radius - 8) / 1.2) ** 2)
    label = torch.arange(n) % 2
    colour = torch.tensor([1.5, 1.0, 0.5])[None, :, None, None]
    x = 0.3 * torch.randn(n, 3, size, size, generator=generator)
    return x + label[:, None, None, None] * ring * colour, label


def _labelled_loss(net: torch.nn.Module, x: torch.Tensor, label: torch.Tensor) -> float:
    net.eval()
    with torch.no_grad():
        loss = float(F.cross_entropy(net(x), label))
    net.train()
    return loss


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_lowers_the_labelled_loss_of_the_network_it_exports(name, one_thread):
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = build_model("resnetv2", {"depth": 11, "width": 4, "stem_stride": 2}, 3)
    defaults = build_method(name)
    # Ramp the unlabelled terms up within the 30 steps, so they take part at full weight.
    method = build_method(name, {"ramp_up_steps": 30} if hasattr(defaults, "ramp_up_steps") else {})
    attach_teacher(method, net, "cpu")
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    x, label = _ring_stamps(32, generator)
    x_unlabelled, _ = _ring_stamps(32, generator)
    exported = method.teacher if method.teacher is not None else net
    before = _labelled_loss(exported, x, label)
    for step in range(30):
        unlabelled = UnlabelledBatch(x_unlabelled, weak=lambda v: augment(v, WEAK_AUGMENT, generator),
                                     strong=lambda v: augment(v, AugmentConfig(), generator))
        logs = optimisation_step(net, method, optimizer, LabelledBatch(x, label),
                                 unlabelled if method.uses_unlabelled else None, step)
        assert all(math.isfinite(v) for v in logs.values()) and "loss_labelled" in logs
    assert _labelled_loss(exported, x, label) < 0.95 * before


def test_methods_keep_the_published_defaults():
    assert hyper_parameters(build_method("mixmatch")) == {
        "temperature": 0.5, "k": 2, "alpha": 0.75, "lambda_u": 100.0, "ramp_up_steps": 16384,
        "ema_decay": 0.999}
    assert hyper_parameters(build_method("fixmatch")) == {"threshold": 0.95, "lambda_u": 1.0,
                                                          "ema_decay": 0.999}
    assert build_method("mean_teacher").ema_decay == 0.999
    assert (build_method("vat").xi, build_method("vat").epsilon) == (1e-6, 6.0)
    without_average = ("supervised", "pi_model", "vat", "pseudo_label")
    assert {build_method(n).ema_decay for n in without_average} == {None}


def test_unknown_methods_and_hyper_parameters_are_refused():
    with pytest.raises(ValueError, match="methods: supervised, pi_model"):
        build_method("simclr")
    with pytest.raises(ValueError, match=r"no hyper-parameter\(s\) \['tau'\].*'threshold'"):
        build_method("fixmatch", {"tau": 0.9})
    with pytest.raises(ValueError, match="must be an integer"):
        build_method("mixmatch", {"k": 2.5})
    assert build_method("mixmatch", {"k": 3.0}).k == 3


def test_linear_ramp_up_rises_from_zero_to_one_and_stays():
    assert [linear_ramp_up(s, 4) for s in (0, 1, 2, 4, 100)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    assert linear_ramp_up(0, 0) == 1.0


def test_ema_starts_as_the_running_mean_of_the_weights_and_keeps_the_decay_later():
    student = torch.nn.Linear(1, 1, bias=False)
    student.weight.data.fill_(0.0)
    teacher = ema_copy(student)
    assert not teacher.weight.requires_grad
    for step, weight in ((1, 3.0), (2, 6.0)):
        student.weight.data.fill_(weight)
        ema_update(teacher, student, decay=0.999, step=step)
    assert float(teacher.weight) == pytest.approx((0.0 + 3.0 + 6.0) / 3)
    teacher.weight.data.fill_(0.0)
    student.weight.data.fill_(1.0)
    ema_update(teacher, student, decay=0.9, step=10**6)
    assert float(teacher.weight) == pytest.approx(0.1)


def test_sharpen_lowers_entropy_and_keeps_the_most_likely_class():
    p = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    sharp = sharpen(p, 0.5)
    assert torch.allclose(sharp.sum(dim=1), torch.ones(2))
    assert (sharp.argmax(dim=1) == p.argmax(dim=1)).all()
    assert (sharp.max(dim=1).values > p.max(dim=1).values).all()
    assert torch.allclose(sharp[0], torch.tensor([0.36, 0.16]) / 0.52)


def test_mixup_keeps_each_stamp_closer_to_itself_than_to_its_partner():
    torch.manual_seed(1)
    x = torch.eye(6).reshape(6, 1, 2, 3)
    y = torch.nn.functional.one_hot(torch.arange(6) % 2, 2).float()
    mixed_x, mixed_y = mixup(x, y, alpha=0.75)
    own = mixed_x.reshape(6, 6).diagonal()
    assert (own >= 0.5).all() and torch.allclose(mixed_y.sum(dim=1), torch.ones(6))


# --------------------------------------------------------------------------------------------
# Metrics


def test_auroc_is_the_share_of_lens_non_lens_pairs_ranked_right_ties_half():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 5, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.3
    pairs = scores[labels][:, None] - scores[~labels][None, :]
    expected = ((pairs > 0).sum() + 0.5 * (pairs == 0).sum()) / pairs.size
    assert auroc(scores, labels) == pytest.approx(expected)
    assert math.isnan(auroc(scores, np.zeros(60, bool)))


def test_tpr0_and_precision_at_recall_on_a_ranked_list():
    scores = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    labels = np.array([1, 1, 0, 1, 1, 0, 0])
    assert recall_at_zero_false_positives(scores, labels) == 0.5
    assert precision_at_recall(scores, labels, 0.5) == 1.0
    assert precision_at_recall(scores, labels, 0.75) == 0.75
    assert precision_at_recall(scores, labels, 1.0) == 0.8
    tied = np.array([0.9, 0.9, 0.1])
    assert recall_at_zero_false_positives(tied, np.array([1, 0, 1])) == 0.0


def test_lens_metrics_are_strict_json_when_undefined():
    metrics = lens_metrics(np.array([0.2, 0.1]), np.array([0, 0]), EvaluationConfig(top_n=(1,)))
    assert metrics["auroc"] is None and metrics["precision_at_recall_0.9"] is None
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics


# --------------------------------------------------------------------------------------------
# Configuration


TOML = """
data = "ds"
out = "registry"
method = "fixmatch"
epochs = 3
versions = 2
[method_params]
threshold = 0.9
[model_params]
depth = 11
width = 8
stem_stride = 2
[stream]
batch_size = 32
[stream.injection]
einstein_radius_arcsec = [1.0, 2.0]
"""


def test_a_config_file_and_the_flags_fill_the_same_config(tmp_path):
    from training.cli import train_config_from_args
    from scanner.cli import build_parser

    (tmp_path / "train.toml").write_text(TOML)
    from_file = TrainConfig.from_file(tmp_path / "train.toml")
    assert from_file.stream.injection.einstein_radius_arcsec == (1.0, 2.0)
    assert from_file.stream.augment == AugmentConfig.none()  # off unless asked for
    args = build_parser().parse_args([
        "train", "--data", "ds", "--out", "registry", "--method", "fixmatch", "--epochs", "3",
        "--versions", "2", "--param", "threshold=0.9", "--width", "8", "--batch-size", "32"])
    from_flags = train_config_from_args(args)
    assert from_flags == dataclasses.replace(from_file, stream=dataclasses.replace(
        from_file.stream, injection=InjectionConfig()))
    (tmp_path / "train.json").write_text(json.dumps(from_file.to_dict()))
    assert TrainConfig.from_file(tmp_path / "train.json") == from_file
    yaml = pytest.importorskip("yaml")
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(from_file.to_dict()))
    assert TrainConfig.from_file(tmp_path / "train.yaml") == from_file
    args = build_parser().parse_args(["train", "--config", str(tmp_path / "train.toml"),
                                      "--epochs", "5", "--augment"])
    overridden = train_config_from_args(args)
    assert overridden.epochs == 5 and overridden.stream.augment == AugmentConfig()
    assert overridden.method_params == {"threshold": 0.9}


def test_config_files_with_unknown_settings_are_refused(tmp_path):
    (tmp_path / "bad.toml").write_text(TOML.replace("batch_size = 32", "batchsize = 32"))
    with pytest.raises(ValueError, match=r"train config.stream: unknown setting\(s\) \['batchsize'\]"):
        TrainConfig.from_file(tmp_path / "bad.toml")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        TrainConfig.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="unknown method"):
        TrainConfig(data="ds", out="o", method="simclr")


# --------------------------------------------------------------------------------------------
# Checkpoints


def test_a_checkpoint_restores_weights_teacher_and_optimiser_without_pickle(tmp_path, one_thread):
    torch.manual_seed(0)
    net = build_model("resnetv2", {"depth": 11, "width": 4, "stem_stride": 2}, 3)
    method = build_method("mean_teacher")
    attach_teacher(method, net, "cpu")
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    x, label = _ring_stamps(8, torch.Generator().manual_seed(0))
    for step in range(2):
        unlabelled = UnlabelledBatch(x, weak=lambda v: v, strong=lambda v: v + 0.01)
        optimisation_step(net, method, optimizer, LabelledBatch(x, label), unlabelled, step)
    save_training_state(tmp_path, net, method.teacher, optimizer, {"epoch": 1, "step": 2,
                                                                   "history": [], "resumes": []})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.safetensors", "optimizer.safetensors", "state.json", "teacher.safetensors"]
    torch.manual_seed(1)
    other = build_model("resnetv2", {"depth": 11, "width": 4, "stem_stride": 2}, 3)
    other_method = build_method("mean_teacher")
    attach_teacher(other_method, other, "cpu")
    other_optimizer = torch.optim.AdamW(other.parameters(), lr=1e-3)
    state = load_training_state(tmp_path, other, other_method.teacher, other_optimizer)
    assert state["step"] == 2 and read_state(tmp_path)["epoch"] == 1
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)
    for a, b in zip(method.teacher.state_dict().values(), other_method.teacher.state_dict().values()):
        assert torch.equal(a, b)
    saved, loaded = optimizer.state_dict(), other_optimizer.state_dict()
    assert saved["param_groups"] == loaded["param_groups"]
    for pid, entries in saved["state"].items():
        for key, value in entries.items():
            assert torch.equal(value, loaded["state"][pid][key])


# --------------------------------------------------------------------------------------------
# End to end on Ray Train, 2 workers


@pytest.fixture(scope="module")
def dataset(train_dataset):
    return train_dataset


def _config(data: str, out: Path, method: str, **kw) -> TrainConfig:
    """Tiny: width 4, 2 epochs of 8 steps of 16 labelled + 16 unlabelled stamps per worker.

    The methods keep their published hyper-parameters, so their unlabelled terms are still
    ramping up: these runs check the distributed plumbing; the objectives at full weight are
    checked on fixed batches above.
    """
    cheap = {"supersample": 1, "max_draws": 3}
    stream = StreamConfig(batch_size=16, injection=InjectionConfig(**cheap),
                          lookalikes=LookalikeConfig(**cheap), augment=AugmentConfig.none())
    kw = {"name": method, "method": method, "epochs": 2,
          "model_params": {"depth": 11, "width": 4, "stem_stride": 2}, "steps_per_epoch": 8,
          "unlabelled_batch_size": 16, "learning_rate": 5e-3, "workers": 2, "stream": stream,
          "evaluation": EvaluationConfig(top_n=(10, 20)), **kw}
    return TrainConfig(data=data, out=str(out), **kw)


def _eval_set(config: TrainConfig):
    spec = InputSpec.from_dict(open_dataset(config.data)["input_spec"])
    return spec, build_eval_set(config.data, spec, config.evaluation, config.stream.injection,
                                config.stream.lookalikes)


def _latest_checkpoint(config: TrainConfig, version: int) -> Path:
    run = Path(config.out) / config.name / "_checkpoints" / f"run-{version}"
    return max((p for p in run.glob("checkpoint_*") if p.is_dir()), key=lambda p: read_state(p)["step"])


def _check_exported(version_dir: Path, config: TrainConfig) -> dict:
    """The export loads in the scanner, scores as the trained network, and its figures are those
    of its saved predictions; returns model.json."""
    meta = json.loads((version_dir / "model.json").read_text())
    training = meta["training"]
    history = training["history"]
    assert [h["epoch"] for h in history] == list(range(1, config.epochs + 1))
    assert history[-1]["loss_labelled"] < history[0]["loss_labelled"], history
    assert all(h["stamps_per_s_per_worker"] > 0 for h in history)
    assert training["method"] == config.method and training["gan"] is None
    assert training["method_params"] == hyper_parameters(build_method(config.method,
                                                                      config.method_params))
    assert training["data"]["url"] == config.data and training["data"]["counts"]
    predictions = pd.read_parquet(version_dir / "predictions.parquet")
    assert meta["metrics"] == lens_metrics(predictions["score"].to_numpy(),
                                           predictions["label"].to_numpy(), config.evaluation)
    spec, eval_set = _eval_set(config)
    np.testing.assert_array_equal(predictions["objid"].to_numpy(), eval_set.objid)
    scanner_scores = load_ensemble(version_dir).predict(torch.from_numpy(eval_set.x))[:, 0].numpy()
    np.testing.assert_allclose(scanner_scores, predictions["score"].to_numpy(), atol=1e-6)
    trained = exported_network(_latest_checkpoint(config, meta["version"]), config, spec)
    np.testing.assert_allclose(score_stamps(trained, eval_set.x), scanner_scores, atol=1e-6)
    return meta


# supervised, mean_teacher (below), vat and pseudo_label (tests/test_ablate.py) run here too.
@pytest.mark.parametrize("method", ["pi_model", "mixmatch", "fixmatch"])
def test_a_method_trains_on_two_workers_and_exports_what_the_scanner_scores(
        method, dataset, ray_cluster, tmp_path, one_thread):
    config = _config(dataset, tmp_path / "registry", method)
    [version_dir] = train(config)
    meta = _check_exported(version_dir, config)
    assert meta["training"]["workers"] == 2
    assert meta["training"]["exported_weights"] == (
        "teacher (EMA)" if build_method(method).ema_decay is not None else "model")


def test_an_interrupted_run_resumes_from_its_last_checkpoint(dataset, ray_cluster, tmp_path,
                                                            one_thread):
    """Mean Teacher (weights, teacher and optimiser in the checkpoint): 1 epoch, then the same
    command asking for 2 continues at epoch 1 from the saved step, with the hard negatives the
    first epoch mined (never a known lens)."""
    first = _config(dataset, tmp_path / "registry", "mean_teacher", epochs=1,
                    hard_negative_start_epoch=2, hard_negative_pool_size=64, hard_negative_keep=8)
    [version_dir] = train(first)
    saved_step = json.loads((version_dir / "model.json").read_text())["training"]["steps"]
    assert saved_step == 8
    mined = read_state(_latest_checkpoint(first, 1))["hard_negatives"]
    assert len(mined) == 2 * 8  # each worker's keep
    known = pd.read_parquet(Path(dataset) / "stamps" / "split=train" / "pool=known_lens",
                            columns=["objid"])["objid"].tolist()
    assert not {objid for _, objid in mined} & set(known)
    second = dataclasses.replace(first, epochs=2)
    assert train(second) == [version_dir]
    meta = _check_exported(version_dir, second)
    training = meta["training"]
    assert training["resumes"] == [{"epoch": 1, "step": saved_step}]
    assert training["history"][1]["start_step"] == saved_step
    assert training["history"][0]["hard_negatives"] == 0
    assert training["history"][1]["hard_negatives"] == 8
    assert training["steps"] == 2 * saved_step and training["epochs"] == 2
    with pytest.raises(TrainingRefused, match=r"other settings \(learning_rate\)"):
        train(dataclasses.replace(second, learning_rate=1e-2))


def test_versions_are_independent_runs_whose_ensemble_is_evaluated(dataset, ray_cluster, tmp_path,
                                                                  one_thread, tiny_scan, tiny_survey):
    """``lensscan train --config`` with 2 versions and a report's grades, then ``lensscan
    evaluate`` on the registry."""
    from tests.test_grades import write_grades

    write_grades(tmp_path / "grades.csv", tiny_scan, tiny_survey)
    config = _config(dataset, tmp_path / "registry", "supervised", versions=2,
                     grades=str(tmp_path / "grades.csv"), grades_scan=str(tiny_scan[1]))
    config_file = tmp_path / "train.json"
    config_file.write_text(json.dumps(config.to_dict()))
    assert lensscan(["train", "--config", str(config_file)]) == 0
    model_dir = Path(config.out) / config.name
    metas = [_check_exported(model_dir / f"version-{k}", config) for k in (1, 2)]
    assert [m["training"]["seed"] for m in metas] == [0, 1]
    assert metas[0]["content_hash"] != metas[1]["content_hash"]
    assert metas[0]["training"]["grades"]["url"] == str(tmp_path / "grades.csv")
    [graded] = (model_dir / "_grades").glob("graded-*")
    assert json.loads((graded / "dataset.json").read_text())["counts"]["train"]["known_lens"] == 2
    record = json.loads((model_dir / "evaluation.json").read_text())
    scores = [pd.read_parquet(model_dir / f"version-{k}" / "predictions.parquet")["score"].to_numpy()
              for k in (1, 2)]
    labels = pd.read_parquet(model_dir / "version-1" / "predictions.parquet")["label"].to_numpy()
    mean = np.mean(np.stack(scores), axis=0).astype(np.float32)
    assert record["metrics"]["ensemble"] == lens_metrics(mean, labels, config.evaluation)
    assert record["metrics"]["v1"] == metas[0]["metrics"]
    assert (model_dir / "pr_curve.png").read_bytes()[:4] == b"\x89PNG"

    out = tmp_path / "evaluation"
    assert lensscan(["evaluate", "--models", str(model_dir), "--data", dataset,
                     "--out", str(out)]) == 0
    evaluated = json.loads((out / "evaluation.json").read_text())["metrics"]
    assert evaluated[f"{config.name}_v1"] == pytest.approx(metas[0]["metrics"])
    assert evaluated["ensemble"] == pytest.approx(record["metrics"]["ensemble"])
    assert (out / "pr_curve.png").is_file()
