"""Stamp normalisation, named in each model's input spec and vectorised over a batch.

``asinh_robust``: per stamp and band, subtract the sky level and divide by the sky noise, both
measured robustly (median and MAD) on the stamp's outer frame, where sky dominates; then an asinh
stretch with a softening of ``softening_sigma`` noise units: linear near the noise, logarithmic for
bright cores, so faint arcs and bright deflectors both stay in a useful range. Missing (NaN) pixels
become 0, the sky level. The result depends only on the raw stamp, so training can normalise
injected stamps with the very same function.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np

from scanner.config import InputSpec

_MAD_TO_SIGMA = 1.4826


def _frame_mask(size: int) -> np.ndarray:
    width = max(2, size // 16)
    m = np.zeros((size, size), dtype=bool)
    m[:width, :] = m[-width:, :] = m[:, :width] = m[:, -width:] = True
    return m


def sky_level_and_noise(stamps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median and robust sigma (N, C) of each stamp band's outer frame, ignoring NaN."""
    n, c, s, _ = stamps.shape
    frame = stamps[:, :, _frame_mask(s)]  # (N, C, F) copy, about 1/4 of the stamp
    has_nan = np.isnan(frame).any(axis=(1, 2))
    med = np.empty((n, c), dtype=np.float32)
    mad = np.empty((n, c), dtype=np.float32)
    clean = ~has_nan
    if clean.any():
        f = frame[clean]
        m = np.median(f, axis=2)
        med[clean] = m
        mad[clean] = np.median(np.abs(f - m[..., None]), axis=2)
    if has_nan.any():
        # An all-NaN frame warns and gives NaN; it is replaced by the fallback below.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            f = frame[has_nan]
            m = np.nanmedian(f, axis=2)
            med[has_nan] = m
            mad[has_nan] = np.nanmedian(np.abs(f - m[..., None]), axis=2)
    sigma = _MAD_TO_SIGMA * mad
    # A frame that is all NaN or noise-free gives no scale; fall back to 1 count so values stay finite.
    bad = ~np.isfinite(sigma) | (sigma <= 0)
    sigma[bad] = 1.0
    med[~np.isfinite(med)] = 0.0
    return med, sigma


def asinh_robust(stamps: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Sky-subtracted, noise-scaled, asinh-stretched copy of ``stamps`` (N, C, S, S) float32."""
    med, sigma = sky_level_and_noise(stamps)
    scaled = (stamps - med[..., None, None]) / (spec.softening_sigma * sigma[..., None, None])
    out = np.arcsinh(scaled, dtype=np.float32)
    np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return out


NORMALISATIONS: dict[str, Callable[[np.ndarray, InputSpec], np.ndarray]] = {
    "asinh_robust": asinh_robust,
}


def normalise(stamps: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Normalise raw stamps (N, C, S, S) as ``spec.normalisation`` says; never in place.

    Ray may hand read-only batches to a stage, so this always returns a new array.
    """
    try:
        fn = NORMALISATIONS[spec.normalisation]
    except KeyError:
        raise ValueError(f"unknown normalisation {spec.normalisation!r}; known: "
                         f"{sorted(NORMALISATIONS)}") from None
    return fn(np.asarray(stamps, dtype=np.float32), spec)
