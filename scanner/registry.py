"""The model registry: write, check and load model versions, and score stamps with an ensemble.

Layout: ``<registry>/<model-name>/version-<k>/`` holds ``model.safetensors`` (weights only) and
``model.json``: ``format_version`` (1), ``name``, ``version``, ``architecture`` (``name``, ``params``),
``input_spec``, ``training``, ``metrics``, ``content_hash`` (``sha256:<hex>`` of the safetensors
bytes), ``storage_dtype`` (``float32``/``float16``; loading always gives float32), ``created`` and
``lensscan_version``. Versions are immutable once written. Weights are only
ever read from safetensors: a pickle can run arbitrary code when loaded, and registries travel
between machines and people, so a version directory holding anything pickle-like is refused.

Example
-------
>>> ensemble = load_ensemble([default_models_dir()])
>>> ensemble.columns
['score_lensscan_default_v1', 'score_lensscan_default_v2', ...]
>>> probabilities = ensemble.predict(stamps)  # (N, n_versions), stamps normalised per input spec
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

import safetensors.torch
import torch
from torch import nn

from scanner.config import PRECISIONS, InputSpec
from scanner.models import build_model, lens_probability

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
REQUIRED_FIELDS = ("format_version", "name", "version", "architecture", "input_spec", "content_hash")
_VERSION_DIR = re.compile(r"^version-(\d+)$")


class RegistryError(ValueError):
    """A model version or ensemble that cannot be written or loaded; the message says what to do."""


def _lensscan_version() -> str:
    try:
        return importlib.metadata.version("lensscan")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json_default(value: Any) -> Any:
    # Metrics often arrive as numpy scalars or arrays, which json cannot write by itself.
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON-serialisable")


def _check_state_dict(state: dict[str, torch.Tensor], reference: nn.Module, source: str, what_to_do: str) -> None:
    expected = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} != {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    if wrong_shape:
        problems.append(f"wrong shapes {wrong_shape[:5]}{' ...' if len(wrong_shape) > 5 else ''}")
    if problems:
        raise RegistryError(f"{source}: weights do not match the architecture: {'; '.join(problems)}; {what_to_do}")


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_version(
    model: nn.Module,
    out_dir: str | Path,
    *,
    name: str,
    version: int,
    architecture: str,
    params: dict[str, Any],
    input_spec: InputSpec,
    training: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write a model version into a registry and return its directory ``out_dir/name/version-<k>``.

    The weights are checked against a fresh build of ``architecture`` with ``params`` first, so a
    version that is written can also be loaded. Both files are written into a hidden temporary
    directory beside the target and renamed into place, so a crash never leaves a half-written
    version that looks complete.

    Parameters
    ----------
    model
        The trained network; only its ``state_dict`` is stored.
    out_dir
        Registry root; created if missing.
    name, version
        Model name and version number ``k >= 1``.
    architecture, params
        What :func:`scanner.models.build_model` rebuilds the network from.
    input_spec
        Bands, stamp geometry and normalisation the model was trained on.
    training, metrics
        Free JSON-serialisable records (method, data, augmentations, GAN, seed; evaluation).
    dtype
        Storage dtype of floating-point weights: ``torch.float32`` or ``torch.float16`` (half the
        size; loading converts back to float32).
    overwrite
        Replace an existing version directory instead of refusing.

    Raises
    ------
    RegistryError
        Bad name/version/dtype, weights not matching the architecture, version already present,
        or records that are not JSON-serialisable.
    """
    if dtype not in (torch.float32, torch.float16):
        raise RegistryError(f"save_version dtype={dtype}: use torch.float32 or torch.float16")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RegistryError(f"save_version version={version!r}: use an integer >= 1")
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise RegistryError(f"save_version name={name!r}: use a non-empty name without path separators or leading dot")

    try:
        reference = build_model(architecture, params, input_spec.n_channels)
    except ValueError as err:
        raise RegistryError(f"save_version {name} v{version}: {err}") from None
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    _check_state_dict(
        state, reference, f"save_version {name} v{version}", "pass the architecture and params the model was built with"
    )
    state = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    weights = safetensors.torch.save(state, metadata={"format": "pt"})

    meta = {
        "format_version": FORMAT_VERSION,
        "name": name,
        "version": version,
        "architecture": {"name": architecture, "params": dict(params or {})},
        "input_spec": input_spec.to_dict(),
        "training": dict(training or {}),
        "metrics": dict(metrics or {}),
        "content_hash": _sha256(weights),
        "storage_dtype": str(dtype).removeprefix("torch."),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lensscan_version": _lensscan_version(),
    }
    try:
        meta_text = json.dumps(meta, indent=2, default=_json_default) + "\n"
    except (TypeError, ValueError) as err:
        raise RegistryError(
            f"save_version {name} v{version}: training/metrics must be JSON-serialisable: {err}"
        ) from None

    model_dir = Path(out_dir) / name
    target = model_dir / f"version-{version}"
    if target.exists() and not overwrite:
        raise RegistryError(
            f"{target} already exists: versions are immutable, pick a new version number "
            "or pass overwrite=True (--overwrite on the command line)"
        )
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".version-{version}.", dir=model_dir))
    try:
        _fsync_write(staging / WEIGHTS_FILE, weights)
        _fsync_write(staging / META_FILE, meta_text.encode())
        if target.exists():
            # Move the old version aside first: rename cannot replace a non-empty directory.
            retired = Path(tempfile.mkdtemp(prefix=f".retired-{version}.", dir=model_dir))
            os.rename(target, retired / target.name)
            os.rename(staging, target)
            shutil.rmtree(retired)
        else:
            os.rename(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "wrote model version %s v%d to %s (%d bytes of %s weights)",
        name, version, target, len(weights), meta["storage_dtype"],
    )
    return target


def _sanitise(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


@dataclass
class ModelVersion:
    """One loaded model version: its identity, input spec, metadata and network (in eval mode)."""

    name: str
    version: int
    path: Path
    architecture: str
    params: dict[str, Any]
    input_spec: InputSpec
    content_hash: str
    meta: dict[str, Any]
    model: nn.Module

    @property
    def column(self) -> str:
        """Score column name of this version in the candidate catalog, e.g. ``score_lensscan_default_v1``."""
        return f"score_{_sanitise(self.name)}_v{self.version}"


def _read_meta(meta_path: Path) -> dict[str, Any]:
    if not meta_path.is_file():
        raise RegistryError(f"{meta_path} is missing: a version directory needs model.json beside model.safetensors")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RegistryError(f"{meta_path} is not valid JSON ({err}): re-export the version") from None
    if not isinstance(meta, dict):
        raise RegistryError(f"{meta_path} must hold a JSON object, found {type(meta).__name__}: re-export the version")
    missing = [f for f in REQUIRED_FIELDS if f not in meta]
    if missing:
        raise RegistryError(f"{meta_path} lacks required fields {missing}: re-export the version with save_version")
    if meta["format_version"] != FORMAT_VERSION:
        raise RegistryError(
            f"{meta_path} has format_version={meta['format_version']!r}, this lensscan reads {FORMAT_VERSION}: "
            "upgrade lensscan or re-export"
        )
    arch = meta["architecture"]
    if not (isinstance(arch, dict) and isinstance(arch.get("name"), str) and isinstance(arch.get("params", {}), dict)):
        raise RegistryError(
            f"{meta_path}: 'architecture' must be {{\"name\": str, \"params\": {{...}}}}, found {arch!r}: "
            "re-export the version"
        )
    if not isinstance(meta["name"], str) or not meta["name"]:
        raise RegistryError(f"{meta_path}: 'name' must be a non-empty string, found {meta['name']!r}")
    if not isinstance(meta["version"], int) or isinstance(meta["version"], bool) or meta["version"] < 1:
        raise RegistryError(f"{meta_path}: 'version' must be an integer >= 1, found {meta['version']!r}")
    if not isinstance(meta["content_hash"], str) or not meta["content_hash"].startswith("sha256:"):
        raise RegistryError(f"{meta_path}: 'content_hash' must be 'sha256:<hex>', found {meta['content_hash']!r}")
    return meta


def load_version(path: str | Path) -> ModelVersion:
    """Return the model version stored in directory ``path``, checked and in eval mode on the CPU.

    Parameters
    ----------
    path
        A version directory holding ``model.json`` and ``model.safetensors``.

    Raises
    ------
    RegistryError
        Pickle-like files in the directory, missing or invalid ``model.json``, unknown
        architecture, unreadable safetensors, content hash mismatch, or weights that do not fit
        the architecture.
    """
    path = Path(path)
    if not path.is_dir():
        raise RegistryError(f"{path} is not a directory: give a model version directory (holding model.json)")
    pickled = sorted(p.name for p in path.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise RegistryError(
            f"{path} holds pickle-like files {pickled}: weights are only loaded from model.safetensors "
            "(pickles can run code when loaded); remove them or re-export the version"
        )
    meta_path = path / META_FILE
    meta = _read_meta(meta_path)
    try:
        input_spec = InputSpec.from_dict(meta["input_spec"])
    except (TypeError, ValueError) as err:
        raise RegistryError(f"{meta_path}: invalid input_spec: {err}") from None
    architecture = meta["architecture"]["name"]
    params = dict(meta["architecture"].get("params", {}))
    try:
        model = build_model(architecture, params, input_spec.n_channels)
    except ValueError as err:
        raise RegistryError(f"{meta_path}: {err}") from None

    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise RegistryError(f"{weights_path} is missing: re-export the version")
    data = weights_path.read_bytes()
    try:
        state = safetensors.torch.load(data)
    except Exception as err:  # safetensors raises its own SafetensorError, not a subclass of anything useful
        raise RegistryError(
            f"{weights_path} is not a readable safetensors file ({err}): re-export or re-download it"
        ) from None
    content_hash = _sha256(data)
    if content_hash != meta["content_hash"]:
        raise RegistryError(
            f"{weights_path} has {content_hash[:19]}... but {META_FILE} records {meta['content_hash'][:19]}...: "
            "the weights changed after export; re-export the version or restore the original file"
        )
    _check_state_dict(
        state, model, str(weights_path), "the file does not belong to this model.json; re-export the version"
    )
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    model.load_state_dict(state)
    model.eval()

    match = _VERSION_DIR.match(path.name)
    if match and int(match.group(1)) != meta["version"]:
        logger.warning("%s records version %d but its directory is named %s", meta_path, meta["version"], path.name)
    logger.info("loaded %s v%d (%s) from %s", meta["name"], meta["version"], architecture, path)
    return ModelVersion(
        name=meta["name"],
        version=meta["version"],
        path=path,
        architecture=architecture,
        params=params,
        input_spec=input_spec,
        content_hash=content_hash,
        meta=meta,
        model=model,
    )


def _version_dirs_in(model_dir: Path) -> list[Path]:
    return [p for p in model_dir.iterdir() if p.is_dir() and _VERSION_DIR.match(p.name) and (p / META_FILE).is_file()]


def resolve_version_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Return the version directories named by ``paths``, sorted by model name and version, without duplicates.

    Each path may be a version directory (holds ``model.json``), a model directory (holds
    ``version-<k>/``) or a registry root (holds model directories).

    Raises
    ------
    RegistryError
        A path that does not exist or holds no model version.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found: dict[Path, Path] = {}
    for raw in paths:
        path = Path(raw)
        if not path.is_dir():
            raise RegistryError(f"model path {path} is not a directory: give a registry, model or version directory")
        if (path / META_FILE).is_file():
            dirs = [path]
        else:
            dirs = _version_dirs_in(path)
            if not dirs:
                model_dirs = [m for m in path.iterdir() if m.is_dir() and not m.name.startswith(".")]
                dirs = [v for m in model_dirs for v in _version_dirs_in(m)]
        if not dirs:
            raise RegistryError(
                f"no model versions under {path}: expected <model-name>/version-<k>/model.json, "
                "version-<k>/model.json or model.json there"
            )
        for d in dirs:
            found.setdefault(d.resolve(), d)

    def order(d: Path) -> tuple[str, int, str]:
        match = _VERSION_DIR.match(d.name)
        return (d.parent.name, int(match.group(1)) if match else 0, str(d))

    return sorted(found.values(), key=order)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions oneDNN uses (AVX512-BF16, AMX): only then is a
    bfloat16 forward faster than float32 on the CPU (2.1-2.5x for the built-in ensemble on a
    Zen 4 core; several times slower where it is emulated)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without oneDNN
        return False


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype ``precision`` means on ``device``; ``None`` runs float32.

    ``auto``: bfloat16 on a GPU (float16 on GPUs without bfloat16), float32 on a CPU, so a CPU
    scan scores the same on every CPU. ``bfloat16``: also on the CPU, where it pays only with
    native instructions (:func:`cpu_has_native_bf16`); a warning says so otherwise. Reduced
    precision moves the scores by about 0.01 (benchmarks/README.md).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if precision == "auto":
        return None
    if device.type == "cpu" and not cpu_has_native_bf16():
        logger.warning("precision bfloat16 on a CPU without native bfloat16 instructions is slower "
                       "than float32; use --precision float32 here")
    return torch.bfloat16


class Ensemble:
    """A set of model versions sharing one input spec, scored together on each stamp batch.

    Parameters
    ----------
    versions
        Loaded versions; their input specs must be identical and their columns distinct.

    Attributes
    ----------
    versions : list[ModelVersion]
    input_spec : InputSpec
    columns : list[str]
        One score column per version, in ``versions`` order (the columns of :meth:`predict`).
    device : torch.device
        Where the networks live; a new ensemble is on the CPU, channels-last (see :meth:`to`).
    precision : str
        The forward's precision on that device: ``float32``, ``bfloat16`` or ``float16``.
    """

    def __init__(self, versions: Sequence[ModelVersion]) -> None:
        if not versions:
            raise RegistryError("an ensemble needs at least one model version")
        first = versions[0]
        for other in versions[1:]:
            if other.input_spec != first.input_spec:
                a, b = first.input_spec.to_dict(), other.input_spec.to_dict()
                diff = ", ".join(f"{k}: {a[k]!r} vs {b[k]!r}" for k in a if a[k] != b[k])
                raise RegistryError(
                    f"{first.name} v{first.version} ({first.path}) and {other.name} v{other.version} ({other.path}) "
                    f"have different input specs ({diff}): an ensemble needs one input spec, scan with them separately"
                )
        columns = [v.column for v in versions]
        duplicates = sorted({c for c in columns if columns.count(c) > 1})
        if duplicates:
            paths = [str(v.path) for v in versions if v.column in duplicates]
            raise RegistryError(
                f"versions {paths} give the same score columns {duplicates}: give each name/version once"
            )
        self.versions = list(versions)
        self.input_spec = first.input_spec
        self.columns = columns
        self._models = [v.model for v in self.versions]
        self.to("cpu")

    def __len__(self) -> int:
        return len(self.versions)

    def describe(self) -> list[dict[str, Any]]:
        """Return the provenance of each version: name, version, content_hash, path."""
        return [
            {"name": v.name, "version": v.version, "content_hash": v.content_hash, "path": str(v.path)}
            for v in self.versions
        ]

    def to(self, device: str | torch.device, *, channels_last: bool = True, precision: str = "auto") -> "Ensemble":
        """Move every version to ``device``, choose the forward's precision, and return the ensemble.

        Parameters
        ----------
        device
            Target device, e.g. ``"cuda"``, ``"cuda:1"`` or ``"cpu"``.
        channels_last
            Store weights and feed stamps channels-last (NHWC). The CUDA tensor-core kernels prefer
            it, and on the CPU oneDNN runs these small-channel convolutions about twice as fast
            in NHWC as in NCHW.
        precision
            One of :data:`PRECISIONS` (see :func:`autocast_dtype`); :attr:`precision` holds what
            it resolved to on ``device``.
        """
        self.device = torch.device(device)
        self._channels_last = channels_last
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        for model in self._models:
            model.to(self.device, memory_format=memory_format)
        self._autocast_dtype = autocast_dtype(precision, self.device)
        self.precision = str(self._autocast_dtype or torch.float32).removeprefix("torch.")
        return self

    def predict(self, stamps: torch.Tensor, *, autocast: bool = True, tta: bool = False) -> torch.Tensor:
        """Return lens probabilities, shape ``(N, n_versions)`` float32 on the ensemble's device.

        Every version scores the same batch in one pass under ``torch.inference_mode``.

        Parameters
        ----------
        stamps
            Normalised stamps ``(N, C, H, W)`` with ``C`` bands and ``H = W = stamp_size_pix`` of
            the input spec; moved to the ensemble's device if elsewhere.
        autocast
            Run the networks in the reduced precision :meth:`to` chose (bfloat16 on GPUs by
            default); ``False`` forces float32.
        tta
            Test-time augmentation: each version's probability is the mean over the stamp's 8
            rotations and flips (a lens is a lens in any orientation; 8x the forward's cost).
        """
        spec = self.input_spec
        if stamps.ndim != 4 or stamps.shape[1:] != (spec.n_channels, spec.stamp_size_pix, spec.stamp_size_pix):
            raise ValueError(
                f"stamps have shape {tuple(stamps.shape)}, the ensemble expects "
                f"(N, {spec.n_channels}, {spec.stamp_size_pix}, {spec.stamp_size_pix}) for bands {list(spec.bands)}"
            )
        reduced = autocast and self._autocast_dtype is not None
        with torch.inference_mode():
            x = stamps.to(self.device, dtype=torch.float32, non_blocking=True)
            n = x.shape[0]
            if tta:
                x = torch.cat(dihedral_views(x))
            if self._channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=self._autocast_dtype or torch.bfloat16, enabled=reduced):
                scores = [lens_probability(model(x).float()) for model in self._models]
            scores = torch.stack(scores, dim=1)
            return scores.view(-1, n, len(self._models)).mean(dim=0) if tta else scores


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 rotations and flips of a ``(N, C, H, W)`` batch, the identity first."""
    views = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return views + [v.flip(3) for v in views]


def load_ensemble(paths: Sequence[str | Path] | str | Path) -> Ensemble:
    """Return the ensemble of every version under ``paths`` (see :func:`resolve_version_dirs`), on the CPU.

    Raises
    ------
    RegistryError
        No versions found, any version unloadable, or versions with different input specs.
    """
    return Ensemble([load_version(d) for d in resolve_version_dirs(paths)])


def default_models_dir() -> Path:
    """Return the directory of the default ensemble shipped inside the package."""
    return Path(__file__).resolve().parent / "default_models"


UNTRAINED_NOTE = "placeholder until the trained default ensemble ships"


def write_untrained_ensemble(
    out_dir: str | Path,
    *,
    name: str = "lensscan-default",
    n_versions: int = 4,
    input_spec: InputSpec = InputSpec(),
    architecture: str = "resnetv2",
    params: dict[str, Any] | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> list[Path]:
    """Write ``n_versions`` randomly initialised versions (float16) and return their directories.

    Version ``k`` is initialised from seed ``seed + k - 1``, so the weights (and content hashes)
    are reproducible; the global torch random state is left untouched. The scores these give are
    meaningless: they exist so that a scan runs end to end before trained models are shipped.
    """
    params = {"depth": 11, "width": 16, "stem_stride": 2} if params is None else dict(params)
    written = []
    for k in range(1, n_versions + 1):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + k - 1)
            model = build_model(architecture, params, input_spec.n_channels)
        written.append(
            save_version(
                model,
                out_dir,
                name=name,
                version=k,
                architecture=architecture,
                params=params,
                input_spec=input_spec,
                training={"method": "untrained", "note": UNTRAINED_NOTE, "seed": seed + k - 1},
                dtype=torch.float16,
                overwrite=overwrite,
            )
        )
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry: ``python -m scanner.registry --write-untrained DIR``."""
    parser = argparse.ArgumentParser(prog="python -m scanner.registry", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--write-untrained", metavar="DIR", required=True, help="registry root to write the untrained ensemble into"
    )
    parser.add_argument("--name", default="lensscan-default", help="model name (default: %(default)s)")
    parser.add_argument("--n-versions", type=int, default=4, help="number of versions (default: %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of version 1; version k uses seed + k - 1 (default: %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace versions that already exist")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        dirs = write_untrained_ensemble(
            args.write_untrained, name=args.name, n_versions=args.n_versions, seed=args.seed, overwrite=args.overwrite
        )
    except RegistryError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for d in dirs:
        print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
