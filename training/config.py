"""The typed training configuration: one object the CLI fills and a config file can replace.

``TrainConfig`` holds everything a training run depends on: the method and its
hyper-parameters, the architecture, the schedule, the data stream (injection, look-alikes,
augmentations), the evaluation set and where it runs. It is written into every exported
version's ``model.json`` and into ``<out>/<name>/train.json``, so a model always says how it was
made, and a re-run of the same command can tell whether it may resume.

A config file (JSON, TOML or YAML) holds the same fields, nested sections for the nested
dataclasses; unknown keys are refused with the known ones listed::

    # train.toml
    data = "demo-set"
    out = "registry"
    method = "fixmatch"
    epochs = 20
    [method_params]
    threshold = 0.9
    [model_params]
    depth = 11
    width = 16
    stem_stride = 2
    [stream]
    batch_size = 64
    [stream.augment]
    gamma = false

Example
-------
>>> config = TrainConfig(data="ds", out="registry", method="pi_model", epochs=2)
>>> TrainConfig.from_dict(config.to_dict()) == config
True
"""

from __future__ import annotations

import dataclasses
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from training.augment import AugmentConfig
from training.evaluate import EvaluationConfig
from training.methods import build_method
from training.stream import StreamConfig

#: The unlabelled "weak" view (FixMatch, MixMatch, VAT, pseudo-labels): geometry only.
WEAK_AUGMENT = dataclasses.replace(AugmentConfig.none(), rot90=True, flip=True, translate=True)

#: Fields a re-run may change and still resume: how long and where it runs, not what it learns.
#: The training split's pools a run reads (``max_pool_stamps`` may limit each).
TRAIN_POOLS = ("deflector", "non_lens", "unlabelled")

RESUMABLE_FIELDS = ("epochs", "versions", "workers", "gpu", "cpus_per_worker", "max_failures",
                    "address")


def default_model_params() -> dict[str, Any]:
    """Return the default architecture parameters: ResNetV2-11, width 16, stem stride 2."""
    return {"depth": 11, "width": 16, "stem_stride": 2}


def _default_stream() -> StreamConfig:
    return StreamConfig(batch_size=64, augment=AugmentConfig.none())


@dataclass(frozen=True)
class TrainConfig:
    """Everything one ``lensscan train`` run depends on.

    Parameters
    ----------
    data : str
        A dataset written by ``lensscan build-dataset`` (its ``train`` split trains, its
        ``holdout`` split evaluates).
    out : str
        Registry root (local directory); versions go to ``<out>/<name>/version-<k>/``.
    name : str
        Model name in the registry.
    method : str
        One of ``training.methods.METHODS``.
    method_params : dict
        Hyper-parameters overriding the method's published defaults.
    architecture, model_params
        What ``scanner.models.build_model`` builds (the papers' ResNetV2 by default, stem stride 2
        for 64-px stamps).
    epochs : int
        Epochs to train; a re-run asking for more continues from the last checkpoint.
    steps_per_epoch : int, optional
        Optimiser steps per epoch; by default one pass over the training deflectors, shared among
        the workers (every worker takes the same number of steps, as DDP requires).
    unlabelled_batch_size : int
        Unlabelled stamps per worker and step (FixMatch's mu times ``stream.batch_size``).
    learning_rate, weight_decay : float
        AdamW settings.
    versions : int
        Independent runs (seeds ``seed``, ``seed + 1``, ...), exported as ``version-1..N``.
    seed : int
        Seed of version 1.
    workers : int
        Ray Train workers (data-parallel, DDP); each takes ``cpus_per_worker`` CPUs and, with
        ``gpu``, one GPU.
    gpu : bool
        Train on GPUs (injection runs there too).
    cpus_per_worker : float
        CPUs reserved per worker.
    max_failures : int
        Worker-group failures (a worker or its node lost) Ray Train survives per version: it
        restarts the workers, which resume from the last checkpoint.
    stream : StreamConfig
        The labelled stream: labelled batch size per worker, positive fraction, look-alike rate,
        injection, look-alikes, and its augmentations (off unless ``--augment``). Its ``seed`` is
        replaced by each version's seed and worker rank.
    weak_augment, strong_augment : AugmentConfig
        The two views methods take of unlabelled stamps: geometry only, and the full set.
    evaluation : EvaluationConfig
        The held-out evaluation set and figures.
    max_pool_stamps : dict of str to int
        At most this many stamps of a training pool (``deflector``, ``non_lens``, ``unlabelled``),
        a seeded random subset: the scaling study's knob (how many hosts for simulated lenses, how
        many non-lenses). Empty: every stamp.
    grades, grades_scan : str, optional
        A ``grades.csv`` exported from a scan's report, and that scan's output directory (default:
        the directory holding the grades file): A/B grades become known-lens positives, "not a
        lens" hard negatives (``training.grades``).
    gan : str, optional
        A GAN directory (``lensscan gan train``) whose samples replace ``stream.gan_fraction`` of
        each batch's positives.
    hard_negative_start_epoch : int
        First epoch (counting from 1) whose batches hold mined hard negatives
        (``training.hard_negatives``): the epochs before it are warm-up, and from the end of the
        one before it on, every epoch ends by mining. Mining is on while
        ``stream.hard_negative_fraction > 0``; it ships the ``unlabelled`` pool to every worker.
    hard_negative_pool_size : int
        Stamps each worker scores per mining: a random sample of its unlabelled stamps and
        negatives (never a known lens). 1024 costs a few seconds per epoch on a CPU core.
    hard_negative_keep : int
        The highest-scoring this many of them become the next epoch's hard negatives.
    address : str, optional
        Ray cluster address; by default a local cluster (or the one already connected).
    """

    data: str
    out: str
    name: str = "lensscan"
    method: str = "supervised"
    method_params: dict[str, Any] = field(default_factory=dict)
    architecture: str = "resnetv2"
    model_params: dict[str, Any] = field(default_factory=default_model_params)
    epochs: int = 10
    steps_per_epoch: int | None = None
    unlabelled_batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    versions: int = 1
    seed: int = 0
    workers: int = 1
    gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 3
    stream: StreamConfig = field(default_factory=_default_stream)
    weak_augment: AugmentConfig = WEAK_AUGMENT
    strong_augment: AugmentConfig = field(default_factory=AugmentConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    max_pool_stamps: dict[str, int] = field(default_factory=dict)
    grades: str | None = None
    grades_scan: str | None = None
    gan: str | None = None
    hard_negative_start_epoch: int = 3
    hard_negative_pool_size: int = 1024
    hard_negative_keep: int = 128
    address: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "method_params", dict(self.method_params))
        object.__setattr__(self, "model_params", dict(self.model_params))
        object.__setattr__(self, "max_pool_stamps", {str(k): int(v) for k, v in
                                                     self.max_pool_stamps.items()})
        unknown = set(self.max_pool_stamps) - set(TRAIN_POOLS)
        if unknown or any(v < 1 for v in self.max_pool_stamps.values()):
            raise ValueError(f"TrainConfig.max_pool_stamps={self.max_pool_stamps}: limit the pools "
                             f"{list(TRAIN_POOLS)} to >= 1 stamps each")
        if self.max_failures < 0:
            raise ValueError(f"TrainConfig.max_failures={self.max_failures}: expected >= 0")
        for name in ("epochs", "versions", "workers", "unlabelled_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)}: expected >= 1")
        if self.hard_negative_start_epoch < 2:
            raise ValueError(f"TrainConfig.hard_negative_start_epoch="
                             f"{self.hard_negative_start_epoch}: expected >= 2 (a model must "
                             f"train an epoch before its scores mean anything)")
        if not 1 <= self.hard_negative_keep <= self.hard_negative_pool_size:
            raise ValueError(f"TrainConfig: expected 1 <= hard_negative_keep "
                             f"({self.hard_negative_keep}) <= hard_negative_pool_size "
                             f"({self.hard_negative_pool_size})")
        if self.steps_per_epoch is not None and self.steps_per_epoch < 1:
            raise ValueError(f"TrainConfig.steps_per_epoch={self.steps_per_epoch}: expected >= 1 "
                             f"or None (one pass over the deflectors)")
        if not self.learning_rate > 0 or self.weight_decay < 0 or not self.cpus_per_worker > 0:
            raise ValueError("TrainConfig: learning_rate and cpus_per_worker must be > 0, "
                             "weight_decay >= 0")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"TrainConfig.name={self.name!r}: a non-empty name without '/' or "
                             f"leading dot")
        if "://" in self.out:
            raise ValueError(f"TrainConfig.out={self.out!r}: the registry is a local directory "
                             f"(copy it to cloud storage afterwards)")
        build_method(self.method, self.method_params)  # refuses unknown methods and parameters
        if self.grades is not None and self.grades_scan is None:
            object.__setattr__(self, "grades_scan", self.grades.rsplit("/", 1)[0]
                               if "/" in self.grades else ".")
        if (self.gan is None) != (self.stream.gan_fraction == 0):
            raise ValueError("TrainConfig: give both a GAN directory (gan) and a share of GAN "
                             "positives (stream.gan_fraction > 0), or neither")

    @property
    def mines_hard_negatives(self) -> bool:
        """Whether the run mines hard negatives (``stream.hard_negative_fraction > 0``)."""
        return self.stream.hard_negative_fraction > 0

    def mines_after(self, epoch: int) -> bool:
        """Whether epoch ``epoch`` (counting from 1) ends by mining hard negatives for the next.

        The last epoch mines too: its checkpoint then holds what a run resumed with more epochs
        feeds back.
        """
        return self.mines_hard_negatives and epoch + 1 >= self.hard_negative_start_epoch

    def pool_counts(self, counts: dict[str, int]) -> dict[str, int]:
        """The dataset's train-split ``counts`` after ``max_pool_stamps``."""
        return {name: min(n, self.max_pool_stamps.get(name, n)) for name, n in counts.items()}

    def version_seed(self, version: int) -> int:
        """Return the seed of version ``version`` (1-based): ``seed + version - 1``."""
        return self.seed + version - 1

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-ready nested dicts (tuples as lists)."""
        return _jsonable(self)

    def fingerprint(self) -> dict[str, Any]:
        """Return the fields a resumed run must share with the run it continues."""
        d = self.to_dict()
        for name in RESUMABLE_FIELDS:
            d.pop(name)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Build from nested dicts (a parsed config file); unknown keys raise ValueError.

        A ``stream`` section without ``augment`` keeps training's default, augmentation off
        (``StreamConfig`` alone would switch it on).
        """
        d = dict(d)
        if isinstance(d.get("stream"), Mapping) and "augment" not in d["stream"]:
            d["stream"] = {**d["stream"], "augment": _default_stream().augment.to_dict()}
        return dataclass_from_dict(cls, d, "train config")

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> "TrainConfig":
        """Build from a JSON, TOML or YAML file, with ``overrides`` (top-level fields) on top."""
        return cls.from_dict({**read_config_file(path), **overrides})


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)
                if f.init}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def dataclass_from_dict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, recursing into dataclass-typed fields.

    Lists become tuples where the field's default is a tuple; a key the dataclass lacks raises
    ``ValueError`` naming ``where`` and the known keys.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a table of settings, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(fields)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        nested = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)),
                      None)
        if nested is not None and isinstance(value, Mapping):
            value = dataclass_from_dict(nested, value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise ValueError(f"{where}: {err}") from None


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Return the settings in a ``.json``, ``.toml`` or ``.yaml``/``.yml`` file as nested dicts."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        parse = json.loads
    elif suffix == ".toml":
        import tomllib

        parse = tomllib.loads
    elif suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"{path}: reading YAML needs PyYAML: pip install pyyaml "
                             f"(or write the config as TOML or JSON)") from None
        parse = yaml.safe_load
    else:
        raise ValueError(f"{path}: unknown config format {suffix!r}; use .toml, .json or .yaml")
    try:
        data = parse(path.read_text())
    except Exception as err:  # noqa: BLE001 - each parser raises its own error class
        raise ValueError(f"{path}: not valid {suffix[1:].upper()}: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table of settings at the top level")
    return data
