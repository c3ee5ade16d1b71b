"""Photometry measured on raw stamps, and the cuts that pick deflector galaxies with it.

Lensing galaxies are massive early-type galaxies: bright, red and resolved. The builder measures
each stamp's aperture magnitudes (through each band's zero point), colours and PSF-corrected size
in one vectorised pass over a tile's stamps, and selects deflectors by configurable cuts on them,
so the pool does not depend on a survey catalog's own (often missing) photometry columns.

Example
-------
>>> cuts = DeflectorCuts()
>>> cuts.colour_cuts
(('g', 'r', 1.0),)
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from scanner.normalise import sky_level_and_noise


@dataclass(frozen=True)
class DeflectorCuts:
    """Magnitude, colour and size cuts selecting massive red galaxies as deflectors.

    Parameters
    ----------
    magnitude_band : str
        Band of the magnitude cut.
    magnitude_range : (float, float)
        Accepted total AB magnitudes (within ``total_radius_arcsec``); (16, 21): the Einstein
        radii a ground-based survey resolves (> 0.8") need velocity dispersions above ~200 km/s,
        galaxies brighter than r ~ 21 at the redshifts (z ~ 0.2-0.7) where lensing is likely;
        brighter than 16 are mostly saturated stars and nearby giants.
    colour_cuts : tuple of (blue_band, red_band, minimum)
        Each requires ``m_blue - m_red >= minimum`` in ``aperture_radius_arcsec`` apertures;
        g - r >= 1.0 keeps the red sequence (early types at z ~ 0.2-0.7) and drops star-forming
        galaxies.
    min_size_arcsec : float
        Smallest PSF-corrected half-light radius: 0.4" rejects stars and compact objects.
    max_centroid_offset_arcsec : float
        Largest offset of the light's centroid (in the colour aperture) from the catalog
        position: a faint object beside a bright red galaxy would otherwise borrow its light.
    min_aperture_fraction : float
        Smallest share of the total (``total_radius_arcsec``) flux inside the colour aperture:
        an early-type galaxy keeps 0.45-0.75 of it there, a faint object whose "total" is a
        neighbour's light much less.
    aperture_radius_arcsec : float
        Colour aperture: small, so neighbours and the sky contribute little.
    total_radius_arcsec : float
        Aperture of total magnitudes and half-light radii.
    """

    magnitude_band: str = "r"
    magnitude_range: tuple[float, float] = (16.0, 21.0)
    colour_cuts: tuple[tuple[str, str, float], ...] = (("g", "r", 1.0),)
    min_size_arcsec: float = 0.4
    max_centroid_offset_arcsec: float = 0.4
    min_aperture_fraction: float = 0.3
    aperture_radius_arcsec: float = 1.5
    total_radius_arcsec: float = 4.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "magnitude_range", tuple(self.magnitude_range))
        object.__setattr__(self, "colour_cuts", tuple((str(b), str(r), float(m))
                                                      for b, r, m in self.colour_cuts))
        lo, hi = self.magnitude_range
        if not lo < hi:
            raise ValueError(f"DeflectorCuts.magnitude_range={self.magnitude_range}: expected low < high")
        if self.aperture_radius_arcsec <= 0 or self.total_radius_arcsec <= 0:
            raise ValueError("DeflectorCuts aperture radii must be > 0")

    def check_bands(self, bands: Sequence[str]) -> None:
        """Refuse cuts naming a band the dataset does not have, before any tile is read."""
        named = {self.magnitude_band} | {b for cut in self.colour_cuts for b in cut[:2]}
        missing = sorted(named - set(bands))
        if missing:
            raise ValueError(f"deflector cuts name band(s) {missing} not among --bands {list(bands)}; "
                             f"change --deflector-band / --deflector-colour")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["magnitude_range"] = list(self.magnitude_range)
        d["colour_cuts"] = [list(c) for c in self.colour_cuts]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DeflectorCuts":
        return cls(**{**d, "colour_cuts": tuple(tuple(c) for c in d["colour_cuts"])})


def moffat_half_light_radius(fwhm: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """Half-light radius of Moffat profiles of the given FWHM and index (same unit as FWHM)."""
    alpha = fwhm / (2.0 * np.sqrt(2.0 ** (1.0 / beta) - 1.0))
    return alpha * np.sqrt(2.0 ** (1.0 / (beta - 1.0)) - 1.0)


def measure_stamps(raw: np.ndarray, bands: Sequence[str], magzero: np.ndarray,
                   psf_fwhm_arcsec: np.ndarray, psf_beta: np.ndarray,
                   pixel_scale_arcsec: np.ndarray, cuts: DeflectorCuts) -> dict[str, np.ndarray]:
    """Magnitudes, aperture magnitudes and sizes of each stamp's central object.

    Parameters
    ----------
    raw : (N, C, S, S) raw stamps (counts), NaN where missing.
    bands : band names in channel order.
    magzero, psf_fwhm_arcsec, psf_beta : (N, C) per stamp and band.
    pixel_scale_arcsec : (N,).
    cuts : the apertures to measure in and the band of the size measurement.

    Returns
    -------
    dict
        ``mag_<band>`` (total, in ``total_radius_arcsec``), ``aper_mag_<band>`` (in
        ``aperture_radius_arcsec``), ``half_light_radius_arcsec`` (observed, in the magnitude
        band), ``size_arcsec`` (PSF-corrected in quadrature), ``centroid_offset_arcsec`` (of the
        magnitude band's light in the colour aperture) and ``sky_sigma`` (N, C) measured on the
        stamp frame; NaN where the flux is not positive.
    """
    n, c, s, _ = raw.shape
    out: dict[str, np.ndarray] = {}
    if n == 0:
        for b in bands:
            out[f"mag_{b}"] = out[f"aper_mag_{b}"] = np.zeros(0, np.float32)
        for name in ("half_light_radius_arcsec", "size_arcsec", "centroid_offset_arcsec"):
            out[name] = np.zeros(0, np.float32)
        out["sky_sigma"] = np.zeros((0, c), np.float32)
        return out
    sky, sky_sigma = sky_level_and_noise(raw)
    image = np.nan_to_num(raw - sky[..., None, None], nan=0.0)
    centre = s // 2
    yy, xx = np.mgrid[:s, :s]
    r_pix = np.hypot(xx - centre, yy - centre).astype(np.float32)
    r_arcsec = r_pix[None] * pixel_scale_arcsec[:, None, None]  # (N, S, S)
    total_mask = r_arcsec <= cuts.total_radius_arcsec
    aper_mask = r_arcsec <= cuts.aperture_radius_arcsec
    total = np.einsum("nchw,nhw->nc", image, total_mask.astype(np.float32))
    aper = np.einsum("nchw,nhw->nc", image, aper_mask.astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mag = np.where(total > 0, magzero - 2.5 * np.log10(total), np.nan)
        aper_mag = np.where(aper > 0, magzero - 2.5 * np.log10(aper), np.nan)
    for j, b in enumerate(bands):
        out[f"mag_{b}"] = mag[:, j].astype(np.float32)
        out[f"aper_mag_{b}"] = aper_mag[:, j].astype(np.float32)

    # Half-light radius: the radius where the growth curve in the total aperture reaches half.
    j = list(bands).index(cuts.magnitude_band) if cuts.magnitude_band in bands else 0
    order = np.argsort(r_pix.ravel(), kind="stable")
    radii = r_pix.ravel()[order]
    values = image[:, j].reshape(n, -1)[:, order] * total_mask.reshape(n, -1)[:, order]
    growth = np.cumsum(values, axis=1)
    reached = growth >= 0.5 * growth[:, -1:]
    hlr = radii[np.argmax(reached, axis=1)] * pixel_scale_arcsec
    hlr = np.where(total[:, j] > 0, hlr, np.nan)
    psf_hlr = moffat_half_light_radius(psf_fwhm_arcsec[:, j], psf_beta[:, j])
    out["half_light_radius_arcsec"] = hlr.astype(np.float32)
    out["size_arcsec"] = np.sqrt(np.clip(hlr**2 - psf_hlr**2, 0, None)).astype(np.float32)
    light = np.clip(image[:, j], 0, None) * aper_mask
    weight = light.sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (light * (xx - centre)).sum(axis=(1, 2)) / weight
        cy = (light * (yy - centre)).sum(axis=(1, 2)) / weight
    out["centroid_offset_arcsec"] = (np.hypot(cx, cy) * pixel_scale_arcsec).astype(np.float32)
    out["sky_sigma"] = sky_sigma.astype(np.float32)
    return out


def is_deflector(measured: dict[str, np.ndarray], cuts: DeflectorCuts) -> np.ndarray:
    """Mask of stamps passing every deflector cut (NaN measurements fail)."""
    mag = measured[f"mag_{cuts.magnitude_band}"]
    lo, hi = cuts.magnitude_range
    with np.errstate(invalid="ignore"):
        ok = (mag >= lo) & (mag <= hi) & (measured["size_arcsec"] >= cuts.min_size_arcsec)
        ok &= measured["centroid_offset_arcsec"] <= cuts.max_centroid_offset_arcsec
        aperture_fraction = 10 ** (-0.4 * (measured[f"aper_mag_{cuts.magnitude_band}"] - mag))
        ok &= aperture_fraction >= cuts.min_aperture_fraction
        for blue, red, minimum in cuts.colour_cuts:
            colour = measured[f"aper_mag_{blue}"] - measured[f"aper_mag_{red}"]
            ok &= colour >= minimum
    return ok & np.isfinite(mag)
