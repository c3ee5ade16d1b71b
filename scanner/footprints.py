"""Match catalog objects to tile footprints, one catalog batch at a time.

A k-d tree on the batch's unit vectors finds the objects near each tile centre; each tile's WCS
then decides which of them fall on its pixels. An object on several overlapping tiles goes to the
one where it lies farthest from an edge, so every object is cut exactly once, from its best tile;
a tile known to be broken (a band missing, a file truncated) keeps its footprint, so that objects
only it covers are reported with its reason, but any healthy tile covering an object wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from scanner.tiles import Tile, radec_to_unit, tile_footprint


@dataclass
class Match:
    """Per object of a batch: tile index (-1 when none), 0-based pixel position, and margin."""

    tile_index: np.ndarray  # (N,) int64
    x: np.ndarray  # (N,) float64
    y: np.ndarray  # (N,) float64


class FootprintIndex:
    """Tiles' footprints, ready to match batches of (ra, dec) against them."""

    def __init__(self, tiles: list[Tile]):
        self.tiles = [t for t in tiles if t.shape is not None]
        self._healthy = np.array([t.error is None for t in self.tiles], dtype=np.int8)
        self.index_of = {t.name: i for i, t in enumerate(self.tiles)}
        self._wcs = [t.wcs(next(iter(t.headers))) for t in self.tiles]
        fp = [tile_footprint(t) for t in self.tiles]
        self._centres = np.array([c for c, _ in fp]).reshape(-1, 3)
        self._radii = np.array([r for _, r in fp])

    def pixel_positions(self, i: int, ra: np.ndarray, dec: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """0-based pixel positions of (ra, dec) on tile ``i``."""
        x, y = self._wcs[i].world_to_pixel_values(ra, dec)
        return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)

    def _margin(self, i: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        ny, nx = self.tiles[i].shape  # type: ignore[misc]
        with np.errstate(invalid="ignore"):
            m = np.minimum(np.minimum(x + 0.5, nx - 0.5 - x), np.minimum(y + 0.5, ny - 0.5 - y))
        return np.where(np.isfinite(m), m, -np.inf)

    def match(self, ra: np.ndarray, dec: np.ndarray) -> Match:
        """Assign each (ra, dec) to the healthy tile where it lies farthest inside; to a broken
        tile only when no healthy one covers it; else -1."""
        n = len(ra)
        best = np.full(n, -1, dtype=np.int64)
        best_margin = np.full(n, -np.inf)
        best_healthy = np.full(n, -1, dtype=np.int8)
        bx = np.full(n, np.nan)
        by = np.full(n, np.nan)
        if n == 0 or not self.tiles:
            return Match(best, bx, by)
        ok = np.isfinite(ra) & np.isfinite(dec)
        rows = np.flatnonzero(ok)
        tree = cKDTree(radec_to_unit(ra[rows], dec[rows]))
        for i, (centre, radius) in enumerate(zip(self._centres, self._radii)):
            chord = 2.0 * np.sin(min(radius * 1.01, np.pi) / 2.0)
            near = rows[np.asarray(tree.query_ball_point(centre, chord), dtype=np.int64)]
            if near.size == 0:
                continue
            x, y = self.pixel_positions(i, ra[near], dec[near])
            margin = self._margin(i, x, y)
            healthy = self._healthy[i]
            better = (margin >= 0) & ((healthy > best_healthy[near])
                                      | ((healthy == best_healthy[near]) & (margin > best_margin[near])))
            sel = near[better]
            best[sel], best_margin[sel], best_healthy[sel] = i, margin[better], healthy
            bx[sel], by[sel] = x[better], y[better]
        return Match(best, bx, by)

    def on_named_tile(self, names: np.ndarray, ra: np.ndarray, dec: np.ndarray) -> Match:
        """Positions on the tile the catalog names for each object (-1 if unknown or outside)."""
        n = len(ra)
        idx = np.array([self.index_of.get(str(t), -1) for t in names], dtype=np.int64)
        bx = np.full(n, np.nan)
        by = np.full(n, np.nan)
        for i in np.unique(idx[idx >= 0]):
            sel = np.flatnonzero(idx == i)
            x, y = self.pixel_positions(int(i), ra[sel], dec[sel])
            outside = self._margin(int(i), x, y) < 0
            idx[sel[outside]] = -1
            bx[sel], by[sel] = x, y
        return Match(idx, bx, by)
