"""Per-stamp band metadata that injection needs, read from the tiles' FITS headers.

A simulated source is painted in counts, so for each band of each stamp we need the zero point
(magnitudes to counts), the PSF (how the survey blurred that band), the sky noise and gain (how much
noise the arc's own photons add, and how detectable it is) and the pixel scale. Surveys write these
as header keywords; the mock survey writes ``MAGZERO``, ``SEEING``, ``PSFBETA``, ``SKYSIG``,
``GAIN`` and ``PIXSCALE``. What a header lacks is measured (seeing, sky noise) or falls back to a
documented default with a warning, never silently.

Example
-------
>>> meta = BandMeta.constant(2, ("g", "r", "i"), magzero=30.0, psf_fwhm_arcsec=1.0,
...                          sky_sigma=2.0, gain=10.0, pixel_scale_arcsec=0.26)
>>> meta.magzero.shape
torch.Size([2, 3])
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import torch
from astropy.io import fits
from astropy.wcs import WCS
from astropy.wcs.utils import proj_plane_pixel_scales

logger = logging.getLogger(__name__)

#: Effective wavelengths (nm) of the common optical bands; SED colours are computed from them.
BAND_WAVELENGTH_NM: dict[str, float] = {
    "u": 355.0, "g": 475.0, "r": 622.0, "i": 763.0, "z": 905.0, "y": 1000.0,
}

#: Moffat index assumed when a header gives the seeing but no ``PSFBETA``: ground-based
#: seeing-limited PSFs have beta ~ 3-4.5 (Trujillo et al. 2001).
DEFAULT_PSF_BETA = 3.5

#: FWHM (arcsec) assumed when a header has no ``SEEING`` and too few stars can be measured.
DEFAULT_SEEING_FWHM_ARCSEC = 1.0


def band_wavelengths_nm(bands: Sequence[str]) -> list[float]:
    """Effective wavelengths of ``bands``; a one-line error names an unknown band and the fix."""
    unknown = [b for b in bands if b not in BAND_WAVELENGTH_NM]
    if unknown:
        raise ValueError(f"no effective wavelength for band(s) {unknown}; known: "
                         f"{sorted(BAND_WAVELENGTH_NM)}; add yours to "
                         f"training.bands.BAND_WAVELENGTH_NM")
    return [BAND_WAVELENGTH_NM[b] for b in bands]


def magnitude_to_counts(mag: torch.Tensor, magzero: torch.Tensor) -> torch.Tensor:
    """Counts of a source of AB magnitude ``mag`` through zero point ``magzero``."""
    return torch.pow(10.0, -0.4 * (mag - magzero))


def sed_magnitudes(reference_mag: torch.Tensor, sed_slope: torch.Tensor, bands: Sequence[str],
                   reference_band: str) -> torch.Tensor:
    """Magnitudes (N, C) in ``bands`` of power-law SEDs ``f_nu ~ lambda^sed_slope``.

    A slope of 0 is flat in f_nu (zero colours, like a star-forming galaxy at z ~ 1-2); larger
    slopes are redder. ``reference_mag`` (N,) is the magnitude in ``reference_band``.
    """
    (lam_ref,) = band_wavelengths_nm([reference_band])
    lam = torch.tensor(band_wavelengths_nm(bands), dtype=reference_mag.dtype,
                       device=reference_mag.device)
    log_ratio = torch.log10(lam / lam_ref)
    return reference_mag[:, None] - 2.5 * sed_slope[:, None] * log_ratio[None, :]


@dataclass
class BandMeta:
    """Photometric metadata of each stamp's bands, in the stamps' channel order.

    Attributes
    ----------
    bands : tuple of str
        Band names in channel order.
    magzero : (N, C) tensor
        AB zero point: ``mag = magzero - 2.5 log10(counts)``.
    psf_fwhm_arcsec : (N, C) tensor
        Moffat PSF full width at half maximum.
    psf_beta : (N, C) tensor
        Moffat index of the PSF.
    sky_sigma : (N, C) tensor
        Sky noise per pixel (counts rms).
    gain : (N, C) tensor
        Electrons per count; ``inf`` adds no Poisson noise for injected light.
    pixel_scale_arcsec : (N,) tensor
        Pixel scale.
    centre_offset_pix : (N, 2) tensor
        The object's catalog position minus the stamp's central pixel, (x, y): stamps are cut on
        the nearest pixel, so a deflector sits up to half a pixel off centre.
    """

    bands: tuple[str, ...]
    magzero: torch.Tensor
    psf_fwhm_arcsec: torch.Tensor
    psf_beta: torch.Tensor
    sky_sigma: torch.Tensor
    gain: torch.Tensor
    pixel_scale_arcsec: torch.Tensor
    centre_offset_pix: torch.Tensor

    _PER_BAND = ("magzero", "psf_fwhm_arcsec", "psf_beta", "sky_sigma", "gain")

    def __post_init__(self) -> None:
        self.bands = tuple(self.bands)
        n, c = len(self.pixel_scale_arcsec), len(self.bands)
        for name in self._PER_BAND:
            if tuple(getattr(self, name).shape) != (n, c):
                raise ValueError(f"BandMeta.{name} has shape {tuple(getattr(self, name).shape)}; "
                                 f"expected ({n}, {c}): one value per stamp and band")
        if tuple(self.centre_offset_pix.shape) != (n, 2):
            raise ValueError(f"BandMeta.centre_offset_pix has shape "
                             f"{tuple(self.centre_offset_pix.shape)}; expected ({n}, 2)")

    def __len__(self) -> int:
        return len(self.pixel_scale_arcsec)

    def _tensors(self) -> dict[str, torch.Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "bands"}

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> "BandMeta":
        """A copy on ``device`` in ``dtype``."""
        return BandMeta(self.bands, **{k: v.to(device=device, dtype=dtype)
                                       for k, v in self._tensors().items()})

    def __getitem__(self, index: torch.Tensor | slice | np.ndarray) -> "BandMeta":
        if isinstance(index, np.ndarray):
            index = torch.from_numpy(index)
        if isinstance(index, torch.Tensor):
            index = index.to(self.pixel_scale_arcsec.device)
        return BandMeta(self.bands, **{k: v[index] for k, v in self._tensors().items()})

    @classmethod
    def cat(cls, metas: Sequence["BandMeta"]) -> "BandMeta":
        """The stamps of several metas, in order; all must share the band order."""
        bands = metas[0].bands
        for m in metas[1:]:
            if m.bands != bands:
                raise ValueError(f"cannot concatenate BandMeta of bands {m.bands} and {bands}")
        return cls(bands, **{k: torch.cat([m._tensors()[k] for m in metas])
                             for k in metas[0]._tensors()})

    @classmethod
    def constant(cls, n: int, bands: Sequence[str], *, magzero: float = 30.0,
                 psf_fwhm_arcsec: float = 1.0, psf_beta: float = DEFAULT_PSF_BETA,
                 sky_sigma: float = 1.0, gain: float = math.inf,
                 pixel_scale_arcsec: float = 0.26) -> "BandMeta":
        """``n`` stamps sharing one set of conditions (tests, benchmarks, a single tile)."""
        c = len(bands)

        def full(v: float) -> torch.Tensor:
            return torch.full((n, c), float(v))

        return cls(tuple(bands), full(magzero), full(psf_fwhm_arcsec), full(psf_beta),
                   full(sky_sigma), full(gain), torch.full((n,), float(pixel_scale_arcsec)),
                   torch.zeros(n, 2))

    def to_numpy(self) -> dict[str, np.ndarray]:
        """Float32 arrays by field name (the dataset's columns)."""
        return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in self._tensors().items()}

    @classmethod
    def from_numpy(cls, bands: Sequence[str], arrays: dict[str, np.ndarray]) -> "BandMeta":
        """Inverse of :meth:`to_numpy`."""
        names = [f.name for f in fields(cls) if f.name != "bands"]
        missing = [k for k in names if k not in arrays]
        if missing:
            raise ValueError(f"band metadata lacks {missing}; was the dataset built by "
                             f"`lensscan build-dataset`?")
        # A copy: Arrow hands out read-only buffers, which torch will not wrap.
        return cls(tuple(bands), **{k: torch.from_numpy(np.array(arrays[k], dtype=np.float32))
                                    for k in names})


@dataclass(frozen=True)
class HeaderConditions:
    """One band of one tile as its header describes it; NaN where the header is silent."""

    magzero: float
    psf_fwhm_arcsec: float
    psf_beta: float
    sky_sigma: float
    gain: float
    pixel_scale_arcsec: float


def _float_key(header: fits.Header, *keys: str) -> float:
    for key in keys:
        value = header.get(key)
        if value is not None:
            try:
                value = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(value) and value > 0:
                return value
    return math.nan


def read_header_conditions(header_text: str, where: str) -> HeaderConditions:
    """Zero point, seeing, PSF index, sky noise, gain and pixel scale of one band's header.

    ``where`` names the tile and band in messages. A missing ``MAGZERO`` stays NaN (the caller
    decides: a default zero point or an error); the pixel scale comes from the WCS.
    """
    header = fits.Header.fromstring(header_text)
    scale = float(np.mean(proj_plane_pixel_scales(WCS(header, naxis=2)))) * 3600.0
    # Only keywords the scanner keeps in a tile's header (scanner.tiles.KEPT_CARDS) can be here;
    # FWHM is not trusted: surveys write it in pixels or arcsec, so the stars are measured instead.
    beta = _float_key(header, "PSFBETA")
    seeing = _float_key(header, "SEEING")
    if not math.isfinite(beta):
        if math.isfinite(seeing):
            logger.debug("%s: no PSFBETA in header; assuming a Moffat beta of %s", where,
                         DEFAULT_PSF_BETA)
        beta = DEFAULT_PSF_BETA
    return HeaderConditions(
        magzero=_float_key(header, "MAGZERO", "MAGZPT", "ZP"),
        psf_fwhm_arcsec=seeing,
        psf_beta=beta,
        sky_sigma=_float_key(header, "SKYSIG"),
        gain=_float_key(header, "GAIN"),
        pixel_scale_arcsec=scale,
    )
