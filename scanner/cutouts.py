"""Stamp cutting: the one implementation both the scan and training use.

Stamps are S x S pixels centred on the pixel nearest each object's WCS position, bands stacked in
the model's order. Interior stamps are gathered in one vectorised step from a strided view of the
tile (no per-object Python loop); the few stamps that cross an edge are padded with NaN there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from scanner.config import InputSpec
from scanner.normalise import normalise

# Bit flags written into the catalog's ``flags`` column.
FLAG_EDGE = 1  # the stamp crosses the tile edge; the outside was padded
FLAG_MASKED = 2  # some pixels inside the stamp were NaN/inf (masked) and were filled
FLAG_NAMES = {FLAG_EDGE: "edge", FLAG_MASKED: "masked"}


def describe_flags(flags: int) -> str:
    """Human-readable names of the bits set in ``flags``, e.g. 'edge|masked'."""
    return "|".join(name for bit, name in FLAG_NAMES.items() if flags & bit) or "-"


@dataclass
class Stamps:
    """A batch of cut stamps and what was wrong with each."""

    pixels: np.ndarray  # (N, C, S, S) float32, NaN where outside the tile or masked
    flags: np.ndarray  # (N,) int32 bit flags
    missing_fraction: np.ndarray  # (N,) float32 fraction of stamp pixels padded or masked


def cut_stamps(tile_pixels: np.ndarray, x: np.ndarray, y: np.ndarray, size: int) -> Stamps:
    """Cut ``size`` x ``size`` stamps centred on 0-based pixel positions ``(x, y)``.

    Parameters
    ----------
    tile_pixels : (C, H, W) array of the tile's bands, in model channel order.
    x, y : pixel positions (0-based, pixel centres at integers), e.g. from ``WCS.world_to_pixel``.
    size : stamp side in pixels.

    Example
    -------
    >>> s = cut_stamps(np.ones((3, 100, 100), np.float32), np.array([50.2]), np.array([0.0]), 16)
    >>> s.pixels.shape, int(s.flags[0])
    ((1, 3, 16, 16), 1)
    """
    c, h, w = tile_pixels.shape
    n = len(x)
    half = size // 2
    x0 = np.rint(np.asarray(x, dtype=np.float64)).astype(np.int64) - half
    y0 = np.rint(np.asarray(y, dtype=np.float64)).astype(np.int64) - half
    out = np.empty((n, c, size, size), dtype=np.float32)
    flags = np.zeros(n, dtype=np.int32)
    if n == 0:
        return Stamps(out, flags, np.zeros(0, np.float32))

    inside = (x0 >= 0) & (y0 >= 0) & (x0 + size <= w) & (y0 + size <= h)
    if inside.any() and h >= size and w >= size:
        windows = sliding_window_view(tile_pixels, (size, size), axis=(1, 2))  # (C, H', W', S, S)
        idx = np.flatnonzero(inside)
        out[idx] = np.moveaxis(windows[:, y0[idx], x0[idx]], 0, 1)
    edge = np.flatnonzero(~inside)
    out[edge] = np.nan
    flags[edge] |= FLAG_EDGE
    for i in edge:
        ys, xs = max(y0[i], 0), max(x0[i], 0)
        ye, xe = min(y0[i] + size, h), min(x0[i] + size, w)
        if ye > ys and xe > xs:
            out[i, :, ys - y0[i]:ye - y0[i], xs - x0[i]:xe - x0[i]] = tile_pixels[:, ys:ye, xs:xe]

    # Any NaN or inf pixel makes a stamp's sum non-finite: one fast reduction finds the few
    # stamps whose pixels need counting (a huge finite sum only costs an exact count).
    missing = np.zeros(n, dtype=np.float32)
    suspect = np.flatnonzero(~np.isfinite(out.sum(axis=(1, 2, 3))))
    finite = np.isfinite(out[suspect])
    missing[suspect] = 1.0 - finite.mean(axis=(1, 2, 3), dtype=np.float32)
    on_edge = (flags[suspect] & FLAG_EDGE).astype(bool)
    flags[suspect[~on_edge & ~finite.all(axis=(1, 2, 3))]] |= FLAG_MASKED
    # An edge stamp may also hide masked pixels inside the tile: check just its in-tile part.
    for j in np.flatnonzero(on_edge):
        i = suspect[j]
        ys, xs = max(y0[i], 0) - y0[i], max(x0[i], 0) - x0[i]
        ye, xe = min(y0[i] + size, h) - y0[i], min(x0[i] + size, w) - x0[i]
        if ye > ys and xe > xs and not finite[j, :, ys:ye, xs:xe].all():
            flags[i] |= FLAG_MASKED
    return Stamps(out, flags, missing)


def make_stamps(tile_pixels: np.ndarray, x: np.ndarray, y: np.ndarray, spec: InputSpec) -> tuple[np.ndarray, Stamps]:
    """Cut and normalise stamps the way the model named by ``spec`` expects them.

    Returns the normalised (N, C, S, S) float32 array (missing pixels filled) and the raw cut.
    """
    stamps = cut_stamps(tile_pixels, x, y, spec.stamp_size_pix)
    return normalise(stamps.pixels, spec), stamps
