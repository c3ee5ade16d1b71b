"""Train / held-out split by region of sky, with a guard band so the two never share a patch.

Stamps that overlap share pixels (and neighbours, and the same PSF and noise), so a random split of
objects would leak: a held-out stamp could be half a training stamp. The sky is cut into cells of
about ``cell_deg`` x ``cell_deg``: declination bands of height ``cell_deg``, each split in right
ascension into as many equal cells as fit (an equal-area "igloo" grid, like HEALPix's rings, but
with cells bounded by meridians and parallels so distances to them are exact). Each cell is held
out with probability ``holdout_fraction``, decided by a hash of (seed, cell), so the split is
deterministic, independent of catalog order, and the same for every tile.

A training object closer than ``guard_arcsec`` (one stamp width) to a held-out cell is put in the
``guard`` split and left out, so no held-out stamp lies within one stamp width of a training stamp.
The test is conservative (a spherical cap's bounding box against the cell), never the other way.

Example
-------
>>> import numpy as np
>>> split = SkySplit(holdout_fraction=0.5, cell_deg=0.1, guard_arcsec=20.0, seed=2)
>>> assign_split(np.array([150.0, 150.05]), np.array([2.05, 2.05]), split).tolist()
['train', 'holdout']
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

SPLITS = ("train", "holdout", "guard")


@dataclass(frozen=True)
class SkySplit:
    """How the sky is split.

    Parameters
    ----------
    holdout_fraction : float
        Expected fraction of sky cells held out (0.2).
    cell_deg : float
        Cell size (degrees); 0.25 holds thousands of objects per cell in a deep survey, and the
        guard band costs training about ``4 * guard / cell * holdout_fraction`` of its objects.
    guard_arcsec : float
        Training objects closer than this to a held-out cell are dropped; the builder sets it to
        the stamp width (stamp size x pixel scale).
    seed : int
        Which cells are held out.
    """

    holdout_fraction: float = 0.2
    cell_deg: float = 0.25
    guard_arcsec: float = 16.64
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.holdout_fraction <= 1.0:
            raise ValueError(f"holdout fraction {self.holdout_fraction}: expected 0 <= f <= 1")
        if not 0 < self.cell_deg <= 90:
            raise ValueError(f"split cell size {self.cell_deg} deg: expected 0 < cell <= 90")
        if self.guard_arcsec < 0 or 2 * self.guard_arcsec / 3600.0 > self.cell_deg:
            raise ValueError(f"split cell size {self.cell_deg} deg is smaller than twice the guard "
                             f"band ({self.guard_arcsec}\" = one stamp width); use a cell of at "
                             f"least {2 * self.guard_arcsec / 3600.0:.4f} deg (--split-cell-deg)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _band_count(cell_deg: float) -> int:
    return int(np.ceil(180.0 / cell_deg))


def _ra_cells(band: np.ndarray, cell_deg: float) -> np.ndarray:
    """Number of RA cells in each declination band: equal area, at least one."""
    mid = np.clip(-90.0 + (band + 0.5) * cell_deg, -90.0, 90.0)
    return np.maximum(1, np.floor(360.0 * np.cos(np.radians(mid)) / cell_deg)).astype(np.int64)


def sky_cell(ra_deg: np.ndarray, dec_deg: np.ndarray, cell_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """(declination band, RA cell) of each position."""
    band = np.clip(np.floor((np.asarray(dec_deg) + 90.0) / cell_deg).astype(np.int64), 0,
                   _band_count(cell_deg) - 1)
    n_ra = _ra_cells(band, cell_deg)
    cell = np.floor(np.mod(ra_deg, 360.0) / (360.0 / n_ra)).astype(np.int64) % n_ra
    return band, cell


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def unit_hash(seed: int, *keys: np.ndarray) -> np.ndarray:
    """A deterministic uniform [0, 1) number per element of the integer ``keys`` arrays."""
    h = _splitmix64(np.full(np.broadcast(*keys).shape, seed, dtype=np.uint64))
    for key in keys:
        with np.errstate(over="ignore"):
            h = _splitmix64(h ^ np.asarray(key).astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def cell_is_holdout(band: np.ndarray, cell: np.ndarray, split: SkySplit) -> np.ndarray:
    """Whether each sky cell is held out."""
    return unit_hash(split.seed, band, cell) < split.holdout_fraction


def _near_holdout_cell(ra: np.ndarray, dec: np.ndarray, split: SkySplit) -> np.ndarray:
    """Whether a held-out cell comes within ``guard_arcsec`` of each position (conservatively)."""
    r = split.guard_arcsec / 3600.0
    h = split.cell_deg
    near = np.zeros(len(ra), dtype=bool)
    if r == 0 or len(ra) == 0:
        return near
    own_band = np.clip(np.floor((dec + 90.0) / h).astype(np.int64), 0, _band_count(h) - 1)
    reaches_pole = np.abs(dec) + r >= 90.0
    cos_dec = np.cos(np.radians(np.clip(np.abs(dec), 0, 89.999999)))
    # The RA half-width of a spherical cap of radius r centred at dec (exact for the cap).
    half_width = np.where(reaches_pole, 180.0,
                          np.degrees(np.arcsin(np.clip(np.sin(np.radians(r)) / cos_dec, 0, 1))))
    for d_band in (-1, 0, 1):
        band = own_band + d_band
        valid = (band >= 0) & (band < _band_count(h))
        lo_dec = -90.0 + band * h
        gap = np.where(d_band < 0, dec - (lo_dec + h), np.where(d_band > 0, lo_dec - dec, 0.0))
        touches = valid & (gap < r)
        if not touches.any():
            continue
        band_c = np.clip(band, 0, _band_count(h) - 1)
        n_ra = _ra_cells(band_c, h)
        width = 360.0 / n_ra
        first = np.floor((ra - half_width) / width).astype(np.int64)
        last = np.floor((ra + half_width) / width).astype(np.int64)
        span = np.minimum(last - first, n_ra - 1)
        for k in range(int(span[touches].max()) + 1):  # a few cells per band, each vectorised
            check = touches & (k <= span)
            cell = np.mod(first + k, n_ra)
            near |= check & cell_is_holdout(band_c, cell, split)
    return near


def assign_split(ra_deg: np.ndarray, dec_deg: np.ndarray, split: SkySplit) -> np.ndarray:
    """``'train'``, ``'holdout'`` or ``'guard'`` (a training object too close to held-out sky)."""
    ra = np.mod(np.asarray(ra_deg, dtype=np.float64), 360.0)
    dec = np.asarray(dec_deg, dtype=np.float64)
    band, cell = sky_cell(ra, dec, split.cell_deg)
    holdout = cell_is_holdout(band, cell, split)
    guard = ~holdout & _near_holdout_cell(ra, dec, split)
    return np.where(holdout, "holdout", np.where(guard, "guard", "train")).astype(object)
