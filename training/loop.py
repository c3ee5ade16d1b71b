"""The one training loop, run by Ray Train's ``TorchTrainer`` on every worker, and ``train``.

``train(config)`` trains ``config.versions`` independent runs (seeds ``seed``, ``seed + 1``, ...),
each one ``TorchTrainer`` fit with ``config.workers`` data-parallel workers (DDP), then evaluates
each on the held-out sky and exports it to the registry (``training.export``), and finally
evaluates the ensemble of all versions.

Data path: the dataset's training pools are read by Ray Data (``ray.data.read_parquet``, once per
``train`` call, into the object store) and handed to the trainer as ``deflector``, ``negative``
(non-lenses and deflectors, un-injected) and ``unlabelled``; each worker takes its shard
(``ray.train.get_dataset_shard``), keeps it as raw stamps, and runs
``training.stream.LensTrainingStream`` on it: lenses are injected on the worker's own device, new
ones every epoch. Unlabelled stamps are normalised once by the scan's ``scanner.normalise`` and
drawn at random each step; methods view them through the weak and strong augmentations.

Hard negatives (``training.hard_negatives``): from ``hard_negative_start_epoch - 1`` on, every
epoch ends with each worker scoring a sample of its unlabelled stamps and negatives (never a known
lens: the driver hands every worker all known-lens objids) and feeding the highest-scoring back
into its stream as negatives for the next epoch. The mined stamps of all workers are recorded in
the checkpoint, so a resumed run continues with exactly them.

Checkpoints: after every epoch rank 0 writes weights, weight average, optimiser and progress as
safetensors + JSON (``training.checkpoint``) and reports them through ``ray.train.report``; Ray
Train keeps them under ``<out>/<name>/_checkpoints/run-<k>/``. Running the same command again
(after an interruption, or with more ``epochs``) finds them there (``RunConfig`` with the same
``storage_path`` and ``name``) and the loop continues from the last saved epoch and step.

Example
-------
>>> paths = train(TrainConfig(data="demo-set", out="registry", method="fixmatch",
...                           epochs=5, versions=4, workers=2))   # doctest: +SKIP
>>> [p.name for p in paths]                                       # doctest: +SKIP
['version-1', 'version-2', 'version-3', 'version-4']
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from scanner import storage
from scanner.config import InputSpec
from scanner.models import build_model
from scanner.normalise import normalise
from training.augment import augment
from training.bands import BandMeta
from training.checkpoint import load_training_state, save_training_state
from training.config import RESUMABLE_FIELDS, TrainConfig
from training.dataset import StampSet, open_dataset, stamps_dir
from training.evaluate import EvalSet, build_eval_set, ensemble_report
from training.hard_negatives import HardNegativeMiner
from training.methods import LabelledBatch, Method, UnlabelledBatch, build_method
from training.methods.common import ema_copy, ema_update
from training.stream import LensTrainingStream

logger = logging.getLogger(__name__)

# Ray Train V2 resumes a run from the checkpoints in its storage path; it is the default in recent
# Rays, and older ones in the supported range need it switched on before ray.train is imported.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

CHECKPOINTS_DIR = "_checkpoints"
TRAIN_RECORD = "train.json"
_PER_BAND = ("magzero", "psf_fwhm_arcsec", "psf_beta", "sky_sigma", "gain")
_NOT_ROWS = ("stamp", *_PER_BAND, "centre_offset_pix")


class TrainingRefused(ValueError):
    """A training run that cannot start; the message names the input and the fix."""


# --------------------------------------------------------------------------------------------
# On each worker


def shard_stamps(batches: Iterator[dict[str, np.ndarray]], bands: tuple[str, ...], size: int
                 ) -> StampSet:
    """Return the raw stamps of Ray Data numpy batches (a worker's shard of one pool) as a StampSet."""
    parts = [b for b in batches if len(b["objid"])]
    c = len(bands)
    if not parts:
        empty = {name: np.zeros((0, c), np.float32) for name in _PER_BAND}
        empty.update(pixel_scale_arcsec=np.zeros(0, np.float32),
                     centre_offset_pix=np.zeros((0, 2), np.float32))
        return StampSet(np.zeros((0, c, size, size), np.float32), BandMeta.from_numpy(bands, empty),
                        pa.table({"objid": pa.array([], pa.int64())}))

    def column(name: str) -> np.ndarray:
        return np.concatenate([np.stack(list(b[name])) if b[name].dtype == object else b[name]
                               for b in parts])

    stamps = np.ascontiguousarray(column("stamp"), dtype=np.float32).reshape(-1, c, size, size)
    arrays = {name: column(name) for name in (*_PER_BAND, "pixel_scale_arcsec", "centre_offset_pix")}
    rows = pa.table({name: np.concatenate([b[name] for b in parts]) for name in parts[0]
                     if name not in _NOT_ROWS})
    return StampSet(stamps.copy(), BandMeta.from_numpy(bands, arrays), rows)


def labelled_batches(stream: LensTrainingStream, epoch: int, steps: int
                     ) -> Iterator[dict[str, torch.Tensor]]:
    """Yield exactly ``steps`` labelled batches for ``epoch``, cycling the stream's epochs.

    A worker whose deflector shard is smaller than ``steps`` batches makes several passes over
    it, each with new lenses (stream epochs ``epoch * passes + p``), so that every worker takes
    the same number of steps.
    """
    passes = math.ceil(steps / max(len(stream), 1))
    batches = (batch for p in range(passes) for batch in stream.epoch(epoch * passes + p))
    return islice(batches, steps)


def attach_teacher(method: Method, net: torch.nn.Module, device: torch.device | str) -> None:
    """Give a method that keeps a weight average (``ema_decay`` set) its teacher: a copy of ``net``."""
    if method.ema_decay is not None:
        method.teacher = ema_copy(net).to(device)


def optimisation_step(model: torch.nn.Module, method: Method, optimizer: torch.optim.Optimizer,
                      labelled: LabelledBatch, unlabelled: UnlabelledBatch | None, step: int
                      ) -> dict[str, float]:
    """Take one optimiser step on the method's loss, update its teacher; return the logged numbers."""
    loss, logs = method.loss(model, labelled, unlabelled, step)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if method.teacher is not None:
        ema_update(method.teacher, model, method.ema_decay, step)
    return {"loss": float(loss.detach()), **{k: float(v) for k, v in logs.items()}}


def _worker_logger() -> None:
    # Ray workers start with the root logger at WARNING: give the epoch lines a handler.
    training_logger = logging.getLogger("training")
    if not training_logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        training_logger.addHandler(handler)
        training_logger.setLevel(logging.INFO)
        training_logger.propagate = False


def _test_fault(rank: int, epoch: int) -> None:
    """Test-only switch: with LENSSCAN_TEST_KILL_TRAIN_WORKER=<file>, the rank-1 worker starting
    epoch 2 creates the file and dies, as a worker on a lost node would (once per file). It
    first waits a few seconds: Ray Train's controller registers a reported checkpoint when it next
    polls the workers, and a worker lost before that costs the epoch, which this test is not about."""
    marker = os.environ.get("LENSSCAN_TEST_KILL_TRAIN_WORKER")
    if not marker or rank != 1 or epoch != 1:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.close(fd)
    time.sleep(5)
    os._exit(1)


def _epoch_line(entry: dict[str, Any], epochs: int, workers: int) -> str:
    losses = " ".join(f"{k} {v:.4f}" for k, v in entry.items()
                      if k.startswith(("loss", "weight_", "mask_")))
    return (f"[{entry['run']}] epoch {entry['epoch']}/{epochs} step {entry['step']} {losses} | "
            f"{entry['stamps_per_s_per_worker']:.0f} stamps/s per worker ({workers} workers) "
            f"{entry['seconds']:.1f} s")


def draw_unlabelled(pool: torch.Tensor, config: TrainConfig, draws: torch.Generator,
                    views: torch.Generator, device: torch.device) -> UnlabelledBatch:
    """Return a random unlabelled batch from ``pool`` (normalised, host memory), on ``device``.

    ``draws`` (CPU) picks the stamps; ``views`` (on the device) draws their augmentations.
    """
    index = torch.randint(0, len(pool), (config.unlabelled_batch_size,), generator=draws)
    return UnlabelledBatch(pool[index].to(device, non_blocking=True),
                           weak=lambda x: augment(x, config.weak_augment, views),
                           strong=lambda x: augment(x, config.strong_augment, views))


def _epoch_entry(sums: dict[str, float], n_stamps: int, seconds: float, steps: int, world: int,
                 device: torch.device) -> dict[str, float]:
    """Mean logged numbers over the epoch's steps and all workers, and stamps/s per worker."""
    keys = sorted(sums)
    totals = torch.tensor([sums[k] / steps for k in keys] + [n_stamps / seconds],
                          dtype=torch.float64, device=device)
    if world > 1:
        torch.distributed.all_reduce(totals)
    means = (totals / world).tolist()
    return {**dict(zip(keys, means[:-1])), "stamps_per_s_per_worker": means[-1]}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Train one version on this worker: the body every Ray Train worker runs.

    ``loop_config`` holds ``config`` (``TrainConfig.to_dict()``), ``version``, ``steps_per_epoch``,
    ``input_spec``, ``datasets`` (the names of the Ray Datasets given), ``known_lens_objids``
    (every known lens of the run, never mined as a negative) and ``run`` (a label for log lines).
    """
    import ray.train
    import ray.train.torch

    _worker_logger()
    config = TrainConfig.from_dict(loop_config["config"])
    spec = InputSpec.from_dict(loop_config["input_spec"])
    version, steps = loop_config["version"], loop_config["steps_per_epoch"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    seed = config.version_seed(version)

    def shard(name: str) -> StampSet:
        iterator = ray.train.get_dataset_shard(name)
        return shard_stamps(iterator.iter_batches(batch_size=None, batch_format="numpy"),
                            spec.bands, spec.stamp_size_pix)

    method = build_method(config.method, config.method_params)
    generated = None
    if config.gan is not None:
        from training.gan import GeneratedLenses

        generated = GeneratedLenses(config.gan, device)
        generated.check_input_spec(spec)
    known = shard("known_lens") if "known_lens" in loop_config["datasets"] else None
    stream = LensTrainingStream(shard("deflector"), shard("negative"), spec,
                                dataclasses.replace(config.stream, seed=seed * 1009 + rank), device,
                                generated=None if generated is None else generated.sample,
                                known_lenses=known)
    # Normalised once and kept in host memory (a shard can outgrow the accelerator's).
    unlabelled, unlabelled_ids = None, np.zeros(0, np.int64)
    if "unlabelled" in loop_config["datasets"] and (method.uses_unlabelled
                                                    or config.mines_hard_negatives):
        pool = shard("unlabelled")
        unlabelled, unlabelled_ids = (torch.from_numpy(normalise(pool.stamps, spec)),
                                      pool.rows["objid"].to_numpy())
        del pool
    miner = None
    if config.mines_hard_negatives:
        miner = HardNegativeMiner(unlabelled, unlabelled_ids, stream.negatives, spec,
                                  loop_config.get("known_lens_objids", []),
                                  config.hard_negative_pool_size, config.hard_negative_keep)
    if not method.uses_unlabelled:
        unlabelled = None  # the miner keeps what it needs

    torch.manual_seed(seed)  # the same initial weights on every worker
    net = build_model(config.architecture, config.model_params, spec.n_channels)
    attach_teacher(method, net, device)
    model = ray.train.torch.prepare_model(net)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  weight_decay=config.weight_decay)
    start_epoch, step, history, resumes, mined_keys = 0, 0, [], [], []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_training_state(directory, net, method.teacher, optimizer)
        start_epoch, step = state["epoch"], state["step"]
        history, resumes = state["history"], state["resumes"] + [{"epoch": state["epoch"],
                                                                   "step": state["step"]}]
        mined_keys = state.get("hard_negatives", [])
        if miner is not None and mined_keys:
            stream.use_hard_negatives(*miner.stamps(miner.from_keys(mined_keys)))
        if rank == 0:
            logger.info("[%s] resuming after epoch %d, step %d", loop_config["run"], start_epoch, step)

    for epoch in range(start_epoch, config.epochs):
        seeds = np.random.SeedSequence([seed, rank, epoch]).generate_state(3)
        torch.manual_seed(int(seeds[0]))  # the methods' own draws (mixup, VAT directions)
        draws = torch.Generator().manual_seed(int(seeds[1]))
        views = torch.Generator(device=device)
        views.manual_seed(int(seeds[2]))
        _test_fault(rank, epoch)
        model.train()
        sums: dict[str, float] = defaultdict(float)
        n_stamps, start_step, started = 0, step, time.perf_counter()
        for batch in labelled_batches(stream, epoch, steps):
            labelled = LabelledBatch(batch["x"], batch["label"])
            ub = None if unlabelled is None else draw_unlabelled(unlabelled, config, draws, views,
                                                                  device)
            for key, value in optimisation_step(model, method, optimizer, labelled, ub, step).items():
                sums[key] += value
            step += 1
            n_stamps += len(labelled.x) + (0 if ub is None else len(ub.x))
        seconds = time.perf_counter() - started
        entry = {"run": loop_config["run"], "epoch": epoch + 1, "start_step": start_step,
                 "step": step, **_epoch_entry(sums, n_stamps, seconds, step - start_step, world,
                                              device), "seconds": seconds,
                 "hard_negatives": len(stream.hard_ids) if stream.hard_x is not None else 0}
        if miner is not None and config.mines_after(epoch + 1):
            mined_keys, mined_score = mine_hard_negatives(miner, net, stream, [seed, rank, epoch],
                                                          world)
            if mined_score is not None:
                entry["hard_negative_mean_score"] = mined_score
        history.append(entry)
        if rank == 0:
            logger.info("%s", _epoch_line(entry, config.epochs, world))
        with tempfile.TemporaryDirectory(prefix="lensscan-ckpt-") as directory:
            saved = None
            if rank == 0:
                save_training_state(directory, net, method.teacher, optimizer, {
                    "epoch": epoch + 1, "step": step, "history": history, "resumes": resumes,
                    "hard_negatives": mined_keys, "fingerprint": config.fingerprint()})
                saved = ray.train.Checkpoint.from_directory(directory)
            ray.train.report({k: v for k, v in entry.items() if k != "run"}, checkpoint=saved)


def mine_hard_negatives(miner: HardNegativeMiner, net: torch.nn.Module, stream: LensTrainingStream,
                        seed: list[int], world: int) -> tuple[list[list[int]], float]:
    """Mine this worker's hard negatives into its stream; return every worker's keys and the
    mean score of this worker's.

    The keys (``[pool code, objid]``, sorted) are gathered from all workers so that rank 0's
    checkpoint can hand each worker of a resumed run its own.
    """
    chosen, scores = miner.mine(net, seed)
    stream.use_hard_negatives(*miner.stamps(chosen))
    keys = miner.keys(chosen)
    if world > 1:
        gathered: list[Any] = [None] * world
        torch.distributed.all_gather_object(gathered, keys)
        keys = sorted(k for part in gathered for k in part)
    return keys, float(scores.mean()) if len(scores) else None


# --------------------------------------------------------------------------------------------
# On the driver


def _pool_dir(data: str, pool: str) -> str:
    return storage.join(stamps_dir(data), "split=train", f"pool={pool}")


def _pool_dataset(data: str, pool: str, limit: int | None, seed: int):
    """One pool of a dataset's train split; with ``limit``, a random subset of that many stamps.

    The subset is the first ``limit`` stamps of a shuffle seeded by ``seed``, so every version of
    a run and every re-run sees the same stamps.
    """
    import ray.data

    ds = ray.data.read_parquet(_pool_dir(data, pool))
    return ds if limit is None else ds.random_shuffle(seed=seed).limit(limit)


def _ray_dataset(config: TrainConfig, pools: list[tuple[str, str]], counts: dict[str, dict[str, int]]):
    """The ``(dataset, pool)`` pairs' train-split stamps as one materialised Ray Dataset, or None.

    Pools of ``config.data`` keep within ``config.max_pool_stamps``. Materialised on the driver
    before the workers start: reading needs CPUs, which the workers would otherwise hold while
    waiting for their shards.
    """
    parts = [_pool_dataset(data, pool, config.max_pool_stamps.get(pool) if data == config.data
                           else None, config.seed)
             for data, pool in pools if counts[data].get(pool, 0) > 0]
    if not parts:
        return None
    return (parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])).materialize()


def training_datasets(config: TrainConfig, counts: dict[str, int], uses_unlabelled: bool,
                      graded: str | None) -> dict[str, Any]:
    """The Ray Datasets the workers shard: deflectors, negatives, known lenses, unlabelled.

    Negatives are the non-lenses and the un-injected deflectors; a graded dataset adds its
    "not a lens" objects to them and its A/B lenses to the dataset's own known lenses.
    """
    per_data = {config.data: counts}
    if graded is not None:
        per_data[graded] = open_dataset(graded)["counts"]["train"]
    extra = [] if graded is None else [(graded, "non_lens"), (graded, "deflector")]
    datasets = {"deflector": _ray_dataset(config, [(config.data, "deflector")], per_data),
                "negative": _ray_dataset(config, [(config.data, "non_lens"),
                                                  (config.data, "deflector"), *extra], per_data),
                "known_lens": _ray_dataset(config, [(d, "known_lens") for d in per_data], per_data)}
    if uses_unlabelled or config.mines_hard_negatives:
        datasets["unlabelled"] = _ray_dataset(config, [(config.data, "unlabelled")], per_data)
    return {name: ds for name, ds in datasets.items() if ds is not None}


def known_lens_objids(datasets: dict[str, Any]) -> list[int]:
    """Every known lens's objid in the training datasets (sorted): never mined as a negative."""
    if "known_lens" not in datasets:
        return []
    ids = datasets["known_lens"].select_columns(["objid"]).to_pandas()["objid"].to_numpy()
    return sorted({int(i) for i in ids})


def _check_counts(config: TrainConfig, counts: dict[str, int], uses_unlabelled: bool) -> None:
    n = config.workers
    needs = {"deflector": counts.get("deflector", 0),
             "non-lens and deflector": counts.get("non_lens", 0) + counts.get("deflector", 0)}
    if uses_unlabelled:
        needs["unlabelled"] = counts.get("unlabelled", 0)
    for what, have in needs.items():
        if have < n:
            raise TrainingRefused(f"{config.data}: the train split has {have} {what} stamps, fewer "
                                  f"than the {n} workers; use fewer --workers or a larger dataset "
                                  f"(looser deflector cuts, a larger survey)")


def steps_per_epoch(config: TrainConfig, n_deflectors: int) -> int:
    """Return the optimiser steps of one epoch: the config's, or one pass over the deflectors."""
    if config.steps_per_epoch is not None:
        return config.steps_per_epoch
    n_positive = max(1, round(config.stream.batch_size * config.stream.positive_fraction))
    return max(1, math.ceil(n_deflectors / (n_positive * config.workers)))


def _filled(recorded: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``recorded`` with the keys it lacks taken from ``defaults``, in nested tables too."""
    out = dict(recorded)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            out[key] = _filled(out[key], value)
    return out


def _prepare_model_dir(config: TrainConfig, overwrite: bool) -> Path:
    """Create ``<out>/<name>``, emptied with ``overwrite``; refuse one holding another run.

    A directory holding a run of the same settings (but for :data:`RESUMABLE_FIELDS`) is kept:
    that is how a re-run resumes.
    """
    model_dir = Path(config.out) / config.name
    record = model_dir / TRAIN_RECORD
    if overwrite and model_dir.exists():
        shutil.rmtree(model_dir)
    elif record.is_file():
        # A setting an earlier lensscan did not record yet counts as its default.
        before = _filled(json.loads(record.read_text()).get("fingerprint", {}),
                         TrainConfig(data=config.data, out=config.out).fingerprint())
        now = config.fingerprint()
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            raise TrainingRefused(
                f"{model_dir} holds a training run with other settings ({', '.join(changed)}); "
                f"a resumed run may change only {', '.join(RESUMABLE_FIELDS)}. Choose another "
                f"--out or --name, or pass --overwrite to replace it")
    elif model_dir.exists() and any(model_dir.iterdir()):
        raise TrainingRefused(f"{model_dir} exists and was not written by lensscan train; choose "
                              f"another --out or --name, or pass --overwrite to replace it")
    model_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"config": config.to_dict(), "fingerprint": config.fingerprint()},
                                 indent=1) + "\n")
    return model_dir


def _finished(version_dir: Path, config: TrainConfig) -> bool:
    meta_path = version_dir / "model.json"
    if not meta_path.is_file() or not (version_dir / "predictions.parquet").is_file():
        return False
    training = json.loads(meta_path.read_text()).get("training", {})
    return training.get("epochs") == config.epochs


def _ensure_ray(config: TrainConfig) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=config.address, configure_logging=False)
    # The epoch lines say what the user needs; Ray Data's per-dataset INFO lines do not.
    import ray.data

    for name in list(logging.root.manager.loggerDict):
        if name.startswith("ray.data"):
            logging.getLogger(name).setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False


def fit_version(config: TrainConfig, version: int, spec: InputSpec, datasets: dict[str, Any],
                n_steps: int, known_lenses: list[int] | None = None) -> Path:
    """Run (or resume) one version's ``TorchTrainer`` fit; return its last checkpoint's directory.

    The checkpoint lives under ``<out>/<name>/_checkpoints/run-<version>/``. ``known_lenses``
    (objids) are never mined as hard negatives.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    storage_path = (Path(config.out) / config.name / CHECKPOINTS_DIR).resolve()
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": config.to_dict(), "version": version, "run": f"v{version}",
                           "steps_per_epoch": n_steps, "input_spec": spec.to_dict(),
                           "datasets": sorted(datasets),
                           "known_lens_objids": list(known_lenses or [])},
        scaling_config=ScalingConfig(num_workers=config.workers, use_gpu=config.gpu,
                                     resources_per_worker={"CPU": config.cpus_per_worker}),
        run_config=RunConfig(name=f"run-{version}", storage_path=str(storage_path),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             failure_config=FailureConfig(max_failures=config.max_failures),
                             # The scan's non-secret storage settings, so workers reach the data.
                             worker_runtime_env={"env_vars": storage.worker_env()}),
        datasets=datasets)
    result = trainer.fit()
    if result.checkpoint is None:
        raise TrainingRefused(f"version {version}: training reported no checkpoint")
    return Path(result.checkpoint.path)


def train(config: TrainConfig, *, overwrite: bool = False) -> list[Path]:
    """Train, evaluate and export ``config.versions`` versions; return their directories.

    Versions already exported with ``config.epochs`` epochs are kept as they are, so re-running
    an interrupted command trains only what is missing, each version resuming from its last
    checkpoint. ``overwrite`` discards what ``<out>/<name>`` holds and trains from scratch.
    The ensemble's figures and PR curve go to ``<out>/<name>/evaluation.json`` and
    ``pr_curve.png``.

    Raises
    ------
    TrainingRefused, training.dataset.DatasetError
        A dataset with too few stamps for the workers, or an output holding another run.
    """
    from training.export import export_version

    info = open_dataset(config.data)
    spec = InputSpec.from_dict(info["input_spec"])
    counts = config.pool_counts(info["counts"]["train"])
    method = build_method(config.method, config.method_params)
    _check_counts(config, counts, method.uses_unlabelled)
    if config.gan is not None:
        from training.gan import GeneratedLenses

        # The workers open the GAN from their own directories.
        config = dataclasses.replace(config, gan=storage.absolute(config.gan))
        GeneratedLenses(config.gan).check_input_spec(spec)  # refused here, not on every worker
    model_dir = _prepare_model_dir(config, overwrite)
    eval_set: EvalSet = build_eval_set(config.data, spec, config.evaluation,
                                       config.stream.injection, config.stream.lookalikes)
    graded = None
    if config.grades is not None:
        from training.grades import build_graded_dataset

        graded = build_graded_dataset(config.grades, config.grades_scan, str(model_dir / "_grades"))
    _ensure_ray(config)
    datasets = training_datasets(config, counts, method.uses_unlabelled, graded)
    n_steps = steps_per_epoch(config, counts["deflector"])
    known_lenses = known_lens_objids(datasets) if config.mines_hard_negatives else []
    logger.info("training %d version(s) of %s with %s: %d epochs of %d steps on %d worker(s)",
                config.versions, config.name, config.method, config.epochs, n_steps, config.workers)
    paths, scores = [], {}
    for version in tqdm(range(1, config.versions + 1), desc="versions", unit="version",
                        disable=None):
        version_dir = model_dir / f"version-{version}"
        if not _finished(version_dir, config):
            checkpoint = fit_version(config, version, spec, datasets, n_steps, known_lenses)
            export_version(checkpoint, config, version, spec, info, eval_set)
        else:
            logger.info("%s is complete; kept", version_dir)
        paths.append(version_dir)
        scores[f"v{version}"] = _saved_scores(version_dir)
    report = ensemble_report(eval_set, scores, config.evaluation, model_dir,
                             {"data": config.data, "method": config.method})
    logger.info("held-out figures of %d version(s) in %s", len(paths), report.json_path)
    return paths


def _saved_scores(version_dir: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    return pq.read_table(version_dir / "predictions.parquet", columns=["score"])["score"].to_numpy()


__all__ = ["TrainingRefused", "attach_teacher", "draw_unlabelled", "fit_version",
           "known_lens_objids", "labelled_batches", "mine_hard_negatives", "optimisation_step",
           "shard_stamps", "steps_per_epoch", "train", "train_loop_per_worker"]
