"""The seeing of a tile band measured from its stars, for headers that do not give it.

Injected arcs must be blurred like the real sky, so a header without ``SEEING`` is not a reason to
guess. Bright isolated peaks are cut with the scanner's own cutter; each gets a Gaussian-weighted
second-moment size; the most compact sizes are the stars (galaxies are only bigger). The moment
size of a Moffat PSF depends on its FWHM in a way the window and pixelisation bend, so the same
measurement is made on Moffat models of known FWHM drawn on the same grid, and the stars' median
is read off that curve: no analytic approximation to be wrong.
"""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

from scanner.cutouts import cut_stamps
from scanner.normalise import sky_level_and_noise

logger = logging.getLogger(__name__)

_BOX_PIX = 21
_MIN_STARS = 3


def _moment_radius(stamps: np.ndarray, window_pix: float) -> np.ndarray:
    """Gaussian-weighted RMS radius (pixels) of each (N, S, S) stamp about its centroid."""
    s = stamps.shape[-1]
    yy, xx = np.mgrid[:s, :s].astype(np.float64) - s // 2
    weight = np.exp(-(xx**2 + yy**2) / (2 * window_pix**2))
    light = np.clip(stamps, 0, None) * weight
    total = light.sum(axis=(1, 2))
    total = np.where(total > 0, total, np.nan)
    mx = (light * xx).sum(axis=(1, 2)) / total
    my = (light * yy).sum(axis=(1, 2)) / total
    r2 = (xx - mx[:, None, None]) ** 2 + (yy - my[:, None, None]) ** 2
    return np.sqrt((light * r2).sum(axis=(1, 2)) / total)


def _moffat_stamp(fwhm_pix: np.ndarray, beta: float, offset: tuple[float, float] = (0.0, 0.0)
                  ) -> np.ndarray:
    s = _BOX_PIX
    yy, xx = np.mgrid[:s, :s].astype(np.float64) - s // 2
    alpha = fwhm_pix / (2 * np.sqrt(2 ** (1 / beta) - 1))
    r2 = (xx - offset[0]) ** 2 + (yy - offset[1]) ** 2
    return (1 + r2[None] / alpha[:, None, None] ** 2) ** (-beta)


def measure_seeing_fwhm(image: np.ndarray, pixel_scale_arcsec: float, beta: float,
                        snr_min: float = 30.0) -> tuple[float, int]:
    """Seeing FWHM (arcsec) of one band of a tile from its stars, and how many stars gave it.

    Returns ``(nan, n)`` when fewer than 3 star-like peaks are found: the caller falls back to a
    documented default and warns.
    """
    frame = image[None, None, :, :]
    _, sigma = sky_level_and_noise(frame)
    noise = float(sigma[0, 0])
    data = np.nan_to_num(image, nan=0.0)
    peaks = (data == ndimage.maximum_filter(data, size=_BOX_PIX)) & (data > snr_min * noise)
    y, x = np.nonzero(peaks)
    if len(x) < _MIN_STARS:
        return float("nan"), 0
    stamps = cut_stamps(image[None], x.astype(float), y.astype(float), _BOX_PIX)
    clean = stamps.flags == 0
    boxes = stamps.pixels[clean, 0]
    # An isolated source has its box's brightest pixel at the centre.
    centre = _BOX_PIX // 2
    isolated = boxes.reshape(len(boxes), -1).argmax(axis=1) == centre * _BOX_PIX + centre
    boxes = boxes[isolated]
    if len(boxes) < _MIN_STARS:
        return float("nan"), len(boxes)
    window = 3.0
    radius = _moment_radius(boxes, window)
    radius = radius[np.isfinite(radius)]
    smallest = np.sort(radius)[: max(_MIN_STARS, len(radius) // 5)]
    stars = smallest[smallest <= 1.15 * smallest[0]]
    if len(stars) < _MIN_STARS:
        stars = smallest[:_MIN_STARS]
    fwhm_grid = np.linspace(1.0, 12.0, 111)
    model = np.mean([_moment_radius(_moffat_stamp(fwhm_grid, beta, (dx, dy)), window)
                     for dx in (-0.25, 0.25) for dy in (-0.25, 0.25)], axis=0)
    fwhm_pix = float(np.interp(np.median(stars), model, fwhm_grid))
    return fwhm_pix * pixel_scale_arcsec, len(stars)
