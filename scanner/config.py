"""Typed configuration shared by the scan, the registry and training.

One place for every knob: the CLI fills these dataclasses, and they are written into every output
(catalog metadata, ``model.json``) so a result always says how it was made.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class InputSpec:
    """What a model expects to see: bands in channel order, stamp geometry and normalisation.

    Every version of one ensemble must share it; training cuts and normalises its stamps with it,
    so a model sees at scan time exactly what it saw in training.
    """

    bands: tuple[str, ...] = ("g", "r", "i")
    stamp_size_pix: int = 64
    pixel_scale_arcsec: float = 0.26
    normalisation: str = "asinh_robust"
    softening_sigma: float = 3.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "bands", tuple(self.bands))
        if not self.bands:
            raise ValueError("InputSpec.bands is empty: give at least one band, e.g. ('g', 'r', 'i')")
        if len(set(self.bands)) != len(self.bands):
            raise ValueError(f"InputSpec.bands {self.bands} repeats a band")
        if self.stamp_size_pix < 8:
            raise ValueError(f"InputSpec.stamp_size_pix={self.stamp_size_pix} is too small (>= 8)")

    @property
    def n_channels(self) -> int:
        return len(self.bands)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["bands"] = list(self.bands)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InputSpec":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown input-spec fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


PRECISIONS = ("auto", "float32", "bfloat16")
"""Forward precisions of the ensemble (``lensscan scan --precision``); see
``scanner.registry.autocast_dtype`` for what each means on a CPU and a GPU."""


@dataclass(frozen=True)
class ScanConfig:
    """Everything one scan needs; written into the output's ``scan.json`` and catalog metadata."""

    tiles: str
    catalog: str | None
    out: str
    model_dirs: tuple[str, ...]
    bands: tuple[str, ...] | None = None
    tile_pattern: str | None = None  # None: discover per-band and multi-extension tiles
    batch_size: int = 256
    num_actors: int | None = None
    num_gpus_per_actor: float = 0.0
    write_csv: bool = False
    resume: bool = False
    overwrite: bool = False
    address: str | None = None
    max_missing_fraction: float = 0.8
    truth: str | None = None  # optional objid,is_lens table: the report adds PR curve and precision
    report_top_n: int = 200  # candidates in report.html's gallery; 0 writes no report
    precision: str = "auto"  # forward precision, one of PRECISIONS: bf16 on GPUs by default
    tta: bool = False  # test-time augmentation: mean over the 8 rotations and flips (8x the forward)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_dirs"] = list(self.model_dirs)
        d["bands"] = list(self.bands) if self.bands else None
        return d
