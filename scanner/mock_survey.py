"""A mock ground-based imaging survey with injected strong lenses, deterministic by seed.

The mock stands in for a real survey (DLS/DES-like: 0.26"/pix, ~1" seeing, 5-sigma point-source
depth ~25 mag) wherever the product needs one: the default ensemble is trained on it, the tests
scan it and the demo runs on it. It writes exactly what a real survey hands the scanner: FITS tiles
with a celestial TAN WCS and photometric header keys, an object catalog, and (unlike a real survey)
the truth.

Galaxies (bulge + disk) and stars are drawn with GalSim on small postage stamps and added into the
tiles; strong lenses are bright red ellipticals (drawn like the other galaxies) with a lensed blue
Sersic source (plus compact star-forming clumps) painted around them by lenstronomy (SIE +
external shear). Sky-subtracted images carry the sky's Poisson noise (Gaussian approximation) at a
realistic depth. Every random number comes from a numpy Generator seeded from
``MockSurveyConfig.seed`` and a fixed key, so one seed always gives byte-identical pixels.

Example
-------
>>> from scanner.mock_survey import MockSurveyConfig, make_mock_survey
>>> survey = make_mock_survey("memory://demo", MockSurveyConfig(n_tiles=1, size_pix=256, n_lenses=1))
>>> survey.tiles, survey.tile_pattern
(('tile000',), '{tile}_{band}.fits')
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import fsspec
import galsim
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.signal
import scipy.special
from astropy.io import fits
from astropy.wcs import WCS
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.LightModel.light_model import LightModel
from lenstronomy.Util import param_util
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

#: The band every magnitude range refers to; colours are offsets from it. It is always modelled,
#: even when not among the bands written, so a catalog does not depend on which bands you ask for.
REFERENCE_BAND = "r"

#: Key under which the generating config is stored in the Parquet files' metadata.
PARQUET_METADATA_KEY = b"lensscan.mock_survey"

LAYOUTS = ("per_band", "mef")


@dataclass(frozen=True)
class _BandModel:
    """Observing conditions and colours of one band (colours are m_band - m_r)."""

    index: int  # stable integer for seeding, so a band's noise does not depend on the band list
    seeing_fwhm_arcsec: float
    sky_mag_per_arcsec2: float  # dark-sky surface brightness
    depth_5sigma_mag: float  # PSF-optimal 5-sigma point-source depth of the coadd
    elliptical_colour: float  # old, red stellar population (bulges, ellipticals, deflectors)
    disk_colour: float  # star-forming disks
    source_colour: float  # lensed high-redshift star-forming sources: bluer than deflectors
    star_colour: tuple[float, float, float]  # c0 + c1 t + c4 t^4, t from 0 (F star) to 1 (M dwarf)


_BAND_MODELS: dict[str, _BandModel] = {
    "u": _BandModel(0, 1.10, 22.9, 24.6, 2.90, 1.30, 0.45, (1.10, 3.00, 0.00)),
    "g": _BandModel(1, 1.00, 22.1, 25.3, 1.25, 0.50, 0.20, (0.30, 1.20, 0.00)),
    "r": _BandModel(2, 0.90, 21.1, 25.0, 0.00, 0.00, 0.00, (0.00, 0.00, 0.00)),
    "i": _BandModel(3, 0.85, 20.3, 24.5, -0.45, -0.25, -0.10, (-0.10, -0.35, -1.20)),
    "z": _BandModel(4, 0.85, 19.2, 23.8, -0.80, -0.40, -0.15, (-0.13, -0.55, -1.80)),
    "y": _BandModel(5, 0.80, 18.3, 22.8, -1.00, -0.50, -0.20, (-0.15, -0.65, -2.10)),
}
_ALL_BANDS = tuple(_BAND_MODELS)

#: Moffat index of every PSF; ground-based seeing-limited PSFs have beta ~ 3-4.5.
PSF_MOFFAT_BETA = 3.5

# Loosened from GalSim's defaults (folding 5e-3, maxk 1e-3): the truncated wings are far below the
# sky noise, and it halves the FFT sizes, which is most of a tile's render time.
_GSPARAMS = galsim.GSParams(folding_threshold=1e-2, maxk_threshold=2e-3)

# Lensed sources are ray-traced on a grid this many times finer than the pixels, so arcs thinner
# than a pixel are integrated, not sampled.
_LENS_SUPERSAMPLING = 5

# Per-tile seeing varies by this factor at most around the band's typical seeing.
_MIN_SEEING_FACTOR, _MAX_SEEING_FACTOR = 0.85, 1.2

# Lensed sources: half-light radii (arcsec) and how far from the deflector, in units of theta_E;
# inside ~0.6 theta_E the source is multiply imaged: arcs or rings, not a weak distortion.
_SOURCE_RE_RANGE_ARCSEC = (0.1, 0.4)
_MAX_SOURCE_OFFSET_THETA_E = 0.6

# Stamp half-sizes (pixels) bound the cost of one object and how far its light reaches.
_MIN_STAMP_HALF_PIX = 8
_MAX_STAMP_HALF_PIX = 64


@dataclass(frozen=True)
class MockSurveyConfig:
    """How to build a mock survey; every field has a documented, realistic default.

    Parameters
    ----------
    n_tiles : int
        Number of tiles, laid out row by row on a near-square grid centred on
        (``ra0_deg``, ``dec0_deg``).
    size_pix : int
        Tiles are ``size_pix`` x ``size_pix`` pixels.
    bands : tuple of str
        Bands to write, from ``u g r i z y``.
    pixel_scale_arcsec : float
        Pixel scale (arcsec/pixel).
    n_lenses : int
        Number of strong lenses injected at catalogued positions.
    seed : int
        Seed of every random draw: one seed gives byte-identical pixels and catalogs.
    layout : {"per_band", "mef"}
        ``per_band``: ``tiles/{tile}_{band}.fits``; ``mef``: ``tiles/{tile}.fits`` with one image
        HDU per band, ``EXTNAME`` = band.
    compress : bool
        Rice tile-compress the images (``RICE_1``, subtractive dither seeded from the data, so the
        bytes are reproducible); file names end ``.fits.fz``.
    overlap_pix : int
        Adjacent tiles overlap by this many pixels.
    galaxy_density_per_arcmin2 : float
        Galaxies per arcmin^2 with r in ``galaxy_mag_range``; 30 matches deep ground-based counts
        to r ~ 25 and keeps a 1024^2 three-band tile to about a second of rendering.
    star_density_per_arcmin2 : float
        Stars per arcmin^2 with r in ``star_mag_range`` (high Galactic latitude, like COSMOS).
    ra0_deg, dec0_deg : float
        Survey centre (ICRS, degrees).
    galaxy_mag_range : tuple of float
        r-band magnitude range of galaxies; counts rise as 10^(0.3 m) across it.
    star_mag_range : tuple of float
        r-band magnitude range of stars; counts rise as 10^(0.12 m) across it.
    einstein_radius_range_arcsec : tuple of float
        Einstein radii of the lenses, drawn uniformly.
    source_mag_range : tuple of float
        Unlensed r-band magnitude of the lensed sources, drawn uniformly.
    magzero : float
        AB zero point of every image: mag = magzero - 2.5 log10(counts).
    paint_lensed_sources : bool
        False draws the deflectors without their lensed sources and changes nothing else: the
        same survey with the lensing signal removed (a matched set of hard negatives, and a
        control for tests).
    """

    n_tiles: int = 4
    size_pix: int = 1024
    bands: tuple[str, ...] = ("g", "r", "i")
    pixel_scale_arcsec: float = 0.26
    n_lenses: int = 20
    seed: int = 0
    layout: str = "per_band"
    compress: bool = False
    overlap_pix: int = 64
    galaxy_density_per_arcmin2: float = 30.0
    star_density_per_arcmin2: float = 1.5
    ra0_deg: float = 150.0
    dec0_deg: float = 2.0
    galaxy_mag_range: tuple[float, float] = (18.0, 25.0)
    star_mag_range: tuple[float, float] = (16.0, 24.0)
    einstein_radius_range_arcsec: tuple[float, float] = (0.8, 2.5)
    source_mag_range: tuple[float, float] = (21.5, 23.5)
    magzero: float = 30.0
    paint_lensed_sources: bool = True

    def __post_init__(self) -> None:
        for name in ("bands", "galaxy_mag_range", "star_mag_range",
                     "einstein_radius_range_arcsec", "source_mag_range"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        unknown = [b for b in self.bands if b not in _BAND_MODELS]
        if not self.bands or unknown:
            raise ValueError(
                f"MockSurveyConfig.bands={self.bands}: unknown or no bands {unknown}; "
                f"choose from {list(_ALL_BANDS)}"
            )
        if len(set(self.bands)) != len(self.bands):
            raise ValueError(f"MockSurveyConfig.bands={self.bands} repeats a band")
        if self.layout not in LAYOUTS:
            raise ValueError(f"MockSurveyConfig.layout={self.layout!r}: expected one of {LAYOUTS}")
        if self.n_tiles < 1:
            raise ValueError(f"MockSurveyConfig.n_tiles={self.n_tiles}: need at least 1 tile")
        if self.size_pix < 64:
            raise ValueError(f"MockSurveyConfig.size_pix={self.size_pix}: tiles need >= 64 pixels")
        if not 0 <= self.overlap_pix < self.size_pix // 2:
            raise ValueError(
                f"MockSurveyConfig.overlap_pix={self.overlap_pix}: expected 0 <= overlap_pix < "
                f"size_pix / 2 = {self.size_pix // 2}"
            )
        if self.n_lenses < 0:
            raise ValueError(f"MockSurveyConfig.n_lenses={self.n_lenses}: expected >= 0")
        if self.pixel_scale_arcsec <= 0:
            raise ValueError(
                f"MockSurveyConfig.pixel_scale_arcsec={self.pixel_scale_arcsec}: expected > 0"
            )
        if self.galaxy_density_per_arcmin2 < 0 or self.star_density_per_arcmin2 < 0:
            raise ValueError("MockSurveyConfig densities must be >= 0")
        if not -90.0 < self.dec0_deg < 90.0:
            raise ValueError(f"MockSurveyConfig.dec0_deg={self.dec0_deg}: expected -90 < dec < 90")
        for name in ("galaxy_mag_range", "star_mag_range", "einstein_radius_range_arcsec",
                     "source_mag_range"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise ValueError(f"MockSurveyConfig.{name}=({lo}, {hi}): expected low < high")
        if self.einstein_radius_range_arcsec[0] <= 0:
            raise ValueError("MockSurveyConfig.einstein_radius_range_arcsec must be > 0")

    @property
    def tile_pattern(self) -> str:
        """File-name pattern of the tiles, e.g. ``{tile}_{band}.fits``."""
        base = "{tile}_{band}.fits" if self.layout == "per_band" else "{tile}.fits"
        return base + ".fz" if self.compress else base

    def to_dict(self) -> dict[str, Any]:
        """Return the config as JSON-friendly types (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class MockSurvey:
    """What ``make_mock_survey`` wrote, as URLs in the scheme it was given."""

    root: str
    tiles_url: str
    catalog_url: str
    truth_url: str
    tile_pattern: str
    tiles: tuple[str, ...]
    bands: tuple[str, ...]
    config: MockSurveyConfig = field(default_factory=MockSurveyConfig)

    def tile_url(self, tile: str, band: str | None = None) -> str:
        """Return the URL of one tile's file (``band`` is needed for the per-band layout)."""
        if "{band}" in self.tile_pattern and band is None:
            raise ValueError(f"tile_url({tile!r}): the per-band layout needs a band, one of {self.bands}")
        return f"{self.tiles_url}/{self.tile_pattern.format(tile=tile, band=band)}"


# --------------------------------------------------------------------------------------------
# Geometry


def _rng(seed: int, *key: int) -> np.random.Generator:
    """Return the generator for one named stream (catalog, one tile's conditions, one noise field).

    Keying streams instead of drawing them in sequence keeps each independent of the others, so
    e.g. the catalog is the same whichever bands or how many tiles are rendered.
    """
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


def tile_names(n_tiles: int) -> tuple[str, ...]:
    """Return the tile names ``tile000``, ``tile001``, ..."""
    return tuple(f"tile{k:03d}" for k in range(n_tiles))


def _grid_shape(n_tiles: int) -> tuple[int, int]:
    n_cols = math.ceil(math.sqrt(n_tiles))
    return math.ceil(n_tiles / n_cols), n_cols


def _cd_matrix_deg(pixel_scale_arcsec: float) -> np.ndarray:
    # North up, East left: the usual orientation of survey coadds.
    s = pixel_scale_arcsec / 3600.0
    return np.array([[-s, 0.0], [0.0, s]])


def tile_wcs(config: MockSurveyConfig, tile_index: int) -> WCS:
    """Return the TAN WCS of one tile.

    Tile centres sit on a grid in the survey's tangent plane, ``size_pix - overlap_pix`` pixels
    apart, so adjacent tiles overlap by ``overlap_pix``; each tile is projected about its own
    centre, as survey coadd tiles are.
    """
    n_rows, n_cols = _grid_shape(config.n_tiles)
    step = config.size_pix - config.overlap_pix
    row, col = divmod(tile_index, n_cols)
    survey = WCS(naxis=2)
    survey.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    survey.wcs.crval = [config.ra0_deg, config.dec0_deg]
    survey.wcs.crpix = [1.0, 1.0]
    survey.wcs.cd = _cd_matrix_deg(config.pixel_scale_arcsec)
    survey.wcs.radesys = "ICRS"
    x_centre = (col - (n_cols - 1) / 2) * step
    y_centre = (row - (n_rows - 1) / 2) * step
    ra_c, dec_c = survey.wcs_pix2world([[x_centre, y_centre]], 0)[0]
    return WCS(_wcs_header(config, float(ra_c), float(dec_c)))


def _wcs_header(config: MockSurveyConfig, ra_c: float, dec_c: float) -> fits.Header:
    cd = _cd_matrix_deg(config.pixel_scale_arcsec)
    centre = (config.size_pix + 1) / 2.0  # FITS pixels are 1-based
    h = fits.Header()
    h["WCSAXES"] = 2
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CUNIT1"], h["CUNIT2"] = "deg", "deg"
    h["CRVAL1"], h["CRVAL2"] = ra_c, dec_c
    h["CRPIX1"], h["CRPIX2"] = centre, centre
    h["CD1_1"], h["CD1_2"] = cd[0, 0], cd[0, 1]
    h["CD2_1"], h["CD2_2"] = cd[1, 0], cd[1, 1]
    h["RADESYS"] = "ICRS"
    return h


def _inside(wcs: WCS, ra: np.ndarray, dec: np.ndarray, size_pix: int, margin_pix: float = 0.0
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (inside, x, y): which positions fall on the tile (0-based pixel edges -0.5..N-0.5)."""
    x, y = wcs.wcs_world2pix(ra, dec, 0)
    lo, hi = -0.5 - margin_pix, size_pix - 0.5 + margin_pix
    return (x >= lo) & (x < hi) & (y >= lo) & (y < hi), x, y


# --------------------------------------------------------------------------------------------
# Catalog


def _power_law_mags(rng: np.random.Generator, n: int, lo: float, hi: float, slope: float) -> np.ndarray:
    """Draw magnitudes with dN/dm proportional to 10^(slope m) on [lo, hi] (inverse CDF)."""
    a, b = 10 ** (slope * lo), 10 ** (slope * hi)
    return np.log10(a + rng.uniform(size=n) * (b - a)) / slope


def _flux(mag: np.ndarray | float, magzero: float) -> np.ndarray:
    return 10 ** (-0.4 * (np.asarray(mag) - magzero))


def _combined_half_light_radius(bulge_fraction: np.ndarray, hlr_bulge: np.ndarray,
                                hlr_disk: np.ndarray) -> np.ndarray:
    """Return the half-light radius of de Vaucouleurs bulge + exponential disk (circularised).

    The combined radius lies between the components', so a bisection on that bracket converges.
    """
    b4 = 7.669249443  # de Vaucouleurs: half the light inside r_e
    exp_scale = hlr_disk / 1.678346990
    lo = np.minimum(hlr_bulge, hlr_disk)
    hi = np.maximum(hlr_bulge, hlr_disk)

    def enclosed(r: np.ndarray) -> np.ndarray:
        bulge = scipy.special.gammainc(8.0, b4 * (r / hlr_bulge) ** 0.25)
        x = r / exp_scale
        disk = 1.0 - (1.0 + x) * np.exp(-x)
        return bulge_fraction * bulge + (1.0 - bulge_fraction) * disk

    for _ in range(40):
        mid = 0.5 * (lo + hi)
        low_side = enclosed(mid) < 0.5
        lo = np.where(low_side, mid, lo)
        hi = np.where(low_side, hi, mid)
    return 0.5 * (lo + hi)


def _positions_in_survey(rng: np.random.Generator, config: MockSurveyConfig, wcses: list[WCS],
                         density_per_arcmin2: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw uniform positions over the union of tiles; return (ra, dec, owning tile index).

    Each tile draws over its whole area and drops what falls on a lower-numbered tile, so the
    density is uniform and an object in an overlap is drawn once.
    """
    area = (config.size_pix * config.pixel_scale_arcsec / 60.0) ** 2
    ras, decs, owners = [], [], []
    for k, wcs in enumerate(wcses):
        n = rng.poisson(density_per_arcmin2 * area)
        x, y = rng.uniform(-0.5, config.size_pix - 0.5, size=(2, n))
        ra, dec = wcs.wcs_pix2world(x, y, 0)
        keep = np.ones(n, bool)
        for earlier in wcses[:k]:
            keep &= ~_inside(earlier, ra, dec, config.size_pix)[0]
        ras.append(ra[keep])
        decs.append(dec[keep])
        owners.append(np.full(int(keep.sum()), k))
    return np.concatenate(ras), np.concatenate(decs), np.concatenate(owners)


def _lens_stamp_half_pix(theta_e: float, beta: float, source_re: float, pixel_scale: float) -> int:
    """Half-size of the stamp that holds a lensed source before PSF convolution."""
    return int(math.ceil((theta_e + beta + 4.0 * source_re + 0.5) / pixel_scale))


def _psf_kernel_half_pix(seeing_fwhm: float, pixel_scale: float) -> int:
    # 3 FWHM holds > 99.5% of a beta=3.5 Moffat's light.
    return int(math.ceil(3.0 * seeing_fwhm / pixel_scale))


def _lens_reach_pix(theta_e: float, beta: float, source_re: float, pixel_scale: float) -> int:
    """Return how far (pixels) a lens's PSF-convolved arcs can reach from its centre in any band."""
    worst_seeing = _MAX_SEEING_FACTOR * max(m.seeing_fwhm_arcsec for m in _BAND_MODELS.values())
    return (_lens_stamp_half_pix(theta_e, beta, source_re, pixel_scale)
            + _psf_kernel_half_pix(worst_seeing, pixel_scale))


def _draw_catalog(config: MockSurveyConfig, wcses: list[WCS]
                  ) -> tuple[pd.DataFrame, list[dict[str, np.ndarray]]]:
    """Return one row per object (galaxies, stars, lenses) with every property rendering needs.

    The second item holds each lens's source clumps, indexed by the catalog's ``lens_index``.
    """
    rng = _rng(config.seed, 0)
    zp = config.magzero

    # Galaxies.
    g_ra, g_dec, g_tile = _positions_in_survey(rng, config, wcses, config.galaxy_density_per_arcmin2)
    n_gal = len(g_ra)
    g_mag = _power_law_mags(rng, n_gal, *config.galaxy_mag_range, slope=0.3)
    # Early types are a larger share of bright galaxies than of faint ones.
    early_fraction = np.clip(0.35 - 0.2 * (g_mag - 18.0) / 7.0, 0.1, 0.35)
    early = rng.uniform(size=n_gal) < early_fraction
    bulge_fraction = np.where(early, rng.uniform(0.7, 1.0, n_gal), 0.35 * rng.uniform(size=n_gal) ** 2)
    # Size-magnitude relation with 0.15 dex scatter; early types are more compact.
    hlr_disk = np.clip(0.9 * 10 ** (-0.12 * (g_mag - 21.0) + rng.normal(0, 0.15, n_gal)), 0.12, 4.0)
    hlr_bulge = np.where(
        early,
        np.clip(0.7 * 10 ** (-0.12 * (g_mag - 21.0) + rng.normal(0, 0.15, n_gal)), 0.1, 4.0),
        np.clip(0.35 * hlr_disk * 10 ** rng.normal(0, 0.1, n_gal), 0.08, 2.0),
    )
    # Disks look flattened by inclination; bulges are rounder; they share a position angle.
    q_disk = rng.uniform(0.2, 1.0, n_gal)
    q_bulge = np.where(early, rng.uniform(0.5, 1.0, n_gal), rng.uniform(0.7, 1.0, n_gal))
    beta_disk = rng.uniform(0, np.pi, n_gal)
    beta_bulge = beta_disk + rng.normal(0, 0.1, n_gal)
    red_scale = np.clip(1.0 + 0.1 * rng.normal(size=n_gal), 0.7, 1.3)
    blue_scale = np.clip(1.0 + 0.2 * rng.normal(size=n_gal), 0.3, 1.7)
    colour_jitter = rng.normal(0, 0.03, (n_gal, len(_ALL_BANDS)))

    # Stars: colour t runs from F stars (0) to M dwarfs (1).
    s_ra, s_dec, s_tile = _positions_in_survey(rng, config, wcses, config.star_density_per_arcmin2)
    n_star = len(s_ra)
    s_mag = _power_law_mags(rng, n_star, *config.star_mag_range, slope=0.12)
    s_t = rng.uniform(size=n_star)
    s_jitter = rng.normal(0, 0.02, (n_star, len(_ALL_BANDS)))

    lenses = _draw_lenses(rng, config, wcses)
    n_lens = len(lenses["ra"])

    rows: dict[str, Any] = {
        "ra": np.concatenate([g_ra, s_ra, lenses["ra"]]),
        "dec": np.concatenate([g_dec, s_dec, lenses["dec"]]),
        "tile": np.concatenate([g_tile, s_tile, lenses["tile"]]).astype(np.int64),
        "kind": np.array(["galaxy"] * n_gal + ["star"] * n_star + ["lens"] * n_lens, dtype=object),
        "hlr_bulge": np.concatenate([hlr_bulge, np.zeros(n_star), lenses["hlr"]]),
        "hlr_disk": np.concatenate([hlr_disk, np.zeros(n_star), lenses["hlr"]]),
        "q_bulge": np.concatenate([q_bulge, np.ones(n_star), lenses["q_light"]]),
        "q_disk": np.concatenate([q_disk, np.ones(n_star), lenses["q_light"]]),
        "beta_bulge": np.concatenate([beta_bulge, np.zeros(n_star), lenses["phi_light"]]),
        "beta_disk": np.concatenate([beta_disk, np.zeros(n_star), lenses["phi_light"]]),
    }
    total_r = _flux(np.concatenate([g_mag, s_mag, lenses["mag_r"]]), zp)
    bt = np.concatenate([bulge_fraction, np.zeros(n_star), np.ones(n_lens)])
    star_mask = np.concatenate([np.zeros(n_gal, bool), np.ones(n_star, bool), np.zeros(n_lens, bool)])
    for b, model in _BAND_MODELS.items():
        j = model.index
        bulge_off = np.concatenate([model.elliptical_colour * red_scale + colour_jitter[:, j],
                                    np.zeros(n_star),
                                    model.elliptical_colour * lenses["red_scale"]])
        disk_off = np.concatenate([model.disk_colour * blue_scale + colour_jitter[:, j],
                                   np.zeros(n_star), np.zeros(n_lens)])
        c0, c1, c4 = model.star_colour
        star_off = np.concatenate([np.zeros(n_gal), c0 + c1 * s_t + c4 * s_t**4 + s_jitter[:, j],
                                   np.zeros(n_lens)])
        rows[f"flux_bulge_{b}"] = np.where(star_mask, 0.0, total_r * bt * 10 ** (-0.4 * bulge_off))
        rows[f"flux_disk_{b}"] = np.where(star_mask, 0.0, total_r * (1 - bt) * 10 ** (-0.4 * disk_off))
        rows[f"flux_star_{b}"] = np.where(star_mask, total_r * 10 ** (-0.4 * star_off), 0.0)
        rows[f"mag_{b}"] = zp - 2.5 * np.log10(
            rows[f"flux_bulge_{b}"] + rows[f"flux_disk_{b}"] + rows[f"flux_star_{b}"]
        )
    hlr = _combined_half_light_radius(bt, np.maximum(rows["hlr_bulge"], 1e-3),
                                      np.maximum(rows["hlr_disk"], 1e-3))
    rows["half_light_radius_arcsec"] = np.where(star_mask, 0.0, hlr)
    for name in _LENS_TRUTH_COLUMNS:
        rows[name] = np.concatenate([np.full(n_gal + n_star, np.nan), lenses[name]])
    rows["source_n_clumps"] = np.concatenate([np.zeros(n_gal + n_star, np.int64),
                                              lenses["source_n_clumps"]])
    for b in _ALL_BANDS:
        for part in ("main", "clumps"):
            name = f"source_flux_{part}_{b}"
            rows[name] = np.concatenate([np.zeros(n_gal + n_star), lenses[name]])
    rows["lens_index"] = np.concatenate([np.full(n_gal + n_star, -1), np.arange(n_lens)])

    catalog = pd.DataFrame(rows)
    # Shuffle before numbering so an objid says nothing about what the object is.
    catalog = catalog.iloc[rng.permutation(len(catalog))].reset_index(drop=True)
    catalog.insert(0, "objid", np.arange(1, len(catalog) + 1, dtype=np.int64))
    return catalog, lenses["clumps"]


_LENS_TRUTH_COLUMNS = (
    "theta_e_arcsec", "q_lens", "phi_lens", "gamma1", "gamma2",
    *(f"source_mag_{b}" for b in _ALL_BANDS),
    "source_re_arcsec", "source_n_sersic", "source_q", "source_phi",
    "source_x_arcsec", "source_y_arcsec", "source_magnification",
)


def _draw_lenses(rng: np.random.Generator, config: MockSurveyConfig, wcses: list[WCS]) -> dict[str, Any]:
    """Draw the deflectors (bright red ellipticals), their SIE + shear mass and lensed sources.

    Angles are radians counter-clockwise from the tile's +x pixel axis (West); offsets are arcsec
    along the pixel axes (+x West, +y North), the frame the lens is painted in.
    """
    k = config.n_lenses
    s = config.pixel_scale_arcsec
    theta_e = rng.uniform(*config.einstein_radius_range_arcsec, k)
    # Bigger Einstein radii need more massive, hence brighter and larger, deflectors.
    lo, hi = config.einstein_radius_range_arcsec
    mag_r = 20.3 - 1.6 * (theta_e - lo) / max(hi - lo, 1e-6) + rng.normal(0, 0.3, k)
    hlr = np.clip(1.0 * (theta_e / 1.0) ** 0.5 * 10 ** rng.normal(0, 0.08, k), 0.5, 3.0)
    q_lens = rng.uniform(0.6, 0.95, k)
    phi_lens = rng.uniform(0, np.pi, k)
    # Light roughly traces mass: nearly the same shape and orientation.
    q_light = np.clip(q_lens + rng.normal(0, 0.05, k), 0.5, 1.0)
    phi_light = phi_lens + rng.normal(0, np.radians(8), k)
    gamma = rng.uniform(0, 0.08, k)
    gamma_angle = rng.uniform(0, np.pi, k)
    red_scale = np.clip(1.05 + 0.05 * rng.normal(size=k), 0.9, 1.2)

    source_mag_r = rng.uniform(*config.source_mag_range, k)
    source_re = rng.uniform(*_SOURCE_RE_RANGE_ARCSEC, k)
    source_n = rng.uniform(0.7, 1.5, k)
    source_q = rng.uniform(0.5, 1.0, k)
    source_phi = rng.uniform(0, np.pi, k)
    beta = _MAX_SOURCE_OFFSET_THETA_E * theta_e * np.sqrt(rng.uniform(size=k))
    beta_angle = rng.uniform(0, 2 * np.pi, k)
    source_x, source_y = beta * np.cos(beta_angle), beta * np.sin(beta_angle)
    source_blue = np.clip(1.0 + 0.2 * rng.normal(size=k), 0.5, 1.5)

    # Compact star-forming clumps: bluer than the host, within about one source radius of it.
    n_clumps = rng.integers(0, 3, k)
    clumps = []
    for i in range(k):
        m = int(n_clumps[i])
        clumps.append({
            "x": source_x[i] + rng.normal(0, source_re[i], m),
            "y": source_y[i] + rng.normal(0, source_re[i], m),
            "re": rng.uniform(0.05, 0.1, m),
            "fraction": rng.uniform(0.05, 0.15, m),
        })

    # Place each lens fully inside one tile, spread over the tiles, apart from the other lenses.
    half = [_lens_reach_pix(theta_e[i], beta[i], source_re[i], s) for i in range(k)]
    home = rng.permutation(np.arange(k) % config.n_tiles) if k else np.zeros(0, int)
    ra, dec = np.zeros(k), np.zeros(k)
    placed_x, placed_y, placed_tile = [], [], []
    for i in range(k):
        margin = half[i]
        if 2 * margin + 1 >= config.size_pix:
            raise ValueError(
                f"size_pix={config.size_pix} is too small to hold a lens with theta_E="
                f"{theta_e[i]:.2f}\" (needs > {2 * margin + 1} pixels); use larger tiles or a "
                "smaller einstein_radius_range_arcsec"
            )
        for _ in range(1000):
            x, y = rng.uniform(margin, config.size_pix - 1 - margin, 2)
            if all(t != home[i] or math.hypot(x - px, y - py) > 2 * margin
                   for px, py, t in zip(placed_x, placed_y, placed_tile)):
                break
        else:
            raise ValueError(
                f"could not place {k} lenses apart from each other on {config.n_tiles} tiles of "
                f"{config.size_pix} pixels; lower n_lenses or enlarge the survey"
            )
        placed_x.append(x)
        placed_y.append(y)
        placed_tile.append(home[i])
        ra[i], dec[i] = wcses[home[i]].wcs_pix2world([[x, y]], 0)[0]
    out: dict[str, Any] = {
        # A lens's tile is the one that holds all of its arcs, not just its centre.
        "ra": ra, "dec": dec, "tile": home.astype(np.int64), "mag_r": mag_r, "hlr": hlr,
        "q_light": q_light, "phi_light": phi_light, "red_scale": red_scale,
        "theta_e_arcsec": theta_e, "q_lens": q_lens, "phi_lens": phi_lens,
        "gamma1": gamma * np.cos(2 * gamma_angle), "gamma2": gamma * np.sin(2 * gamma_angle),
        "source_re_arcsec": source_re, "source_n_sersic": source_n, "source_q": source_q,
        "source_phi": source_phi, "source_x_arcsec": source_x, "source_y_arcsec": source_y,
        "source_n_clumps": n_clumps.astype(np.int64), "clumps": clumps,
    }
    for b, model in _BAND_MODELS.items():
        main = _flux(source_mag_r, config.magzero) * 10 ** (-0.4 * model.source_colour * source_blue)
        clump_flux = np.array([c["fraction"].sum() for c in clumps]) * _flux(source_mag_r, config.magzero)
        # Clumps have half the host's colour offsets: bluer than it on both sides of r.
        clump_flux = clump_flux * 10 ** (-0.4 * 0.5 * model.source_colour * source_blue)
        out[f"source_mag_{b}"] = config.magzero - 2.5 * np.log10(main + clump_flux)
        out[f"source_flux_main_{b}"] = main
        out[f"source_flux_clumps_{b}"] = clump_flux
    out["source_magnification"] = np.array([
        _source_magnification(out, i, s) for i in range(k)
    ])
    return out


def _lens_kwargs(lens: dict[str, Any] | pd.Series, centre_x: float, centre_y: float
                 ) -> list[dict[str, float]]:
    """Return lenstronomy's SIE + SHEAR keyword arguments for a lens centred at (x, y) arcsec."""
    e1, e2 = param_util.phi_q2_ellipticity(float(lens["phi_lens"]), float(lens["q_lens"]))
    return [
        {"theta_E": float(lens["theta_e_arcsec"]), "e1": e1, "e2": e2,
         "center_x": centre_x, "center_y": centre_y},
        {"gamma1": float(lens["gamma1"]), "gamma2": float(lens["gamma2"]),
         "ra_0": centre_x, "dec_0": centre_y},
    ]


_LENS_MODEL = LensModel(["SIE", "SHEAR"])
_SERSIC_ELLIPSE = LightModel(["SERSIC_ELLIPSE"])
_SERSIC = LightModel(["SERSIC"])


def _unit_flux(model: LightModel, kwargs: dict[str, float]) -> dict[str, float]:
    """Return ``kwargs`` with the amplitude that gives an unlensed total flux of 1."""
    kw = dict(kwargs, amp=1.0)
    return dict(kw, amp=1.0 / model.total_flux([kw])[0])


def _lensed_source_images(lens: dict[str, Any] | pd.Series, clumps: dict[str, np.ndarray],
                          dx_pix: float, dy_pix: float, half_pix: int, pixel_scale: float
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Return the lensed main source and clumps, each for unit unlensed flux, before the PSF.

    The stamp has ``2 half_pix + 1`` pixels a side; the deflector sits ``(dx_pix, dy_pix)`` from
    its central pixel. Rays are shot through a supersampled grid and averaged into pixels, so the
    images are pixel-integrated (flux per pixel).
    """
    ss = _LENS_SUPERSAMPLING
    n = 2 * half_pix + 1
    axis = ((np.arange(n * ss) + 0.5) / ss - 0.5 - half_pix) * pixel_scale
    x, y = np.meshgrid(axis, axis)
    cx, cy = dx_pix * pixel_scale, dy_pix * pixel_scale
    beta_x, beta_y = _LENS_MODEL.ray_shooting(x.ravel(), y.ravel(), _lens_kwargs(lens, cx, cy))
    e1, e2 = param_util.phi_q2_ellipticity(float(lens["source_phi"]), float(lens["source_q"]))
    main_kw = _unit_flux(_SERSIC_ELLIPSE, {
        "R_sersic": float(lens["source_re_arcsec"]), "n_sersic": float(lens["source_n_sersic"]),
        "e1": e1, "e2": e2,
        "center_x": cx + float(lens["source_x_arcsec"]),
        "center_y": cy + float(lens["source_y_arcsec"]),
    })
    main = _SERSIC_ELLIPSE.surface_brightness(beta_x, beta_y, [main_kw])
    clump_sb = np.zeros_like(main)
    total_fraction = float(np.sum(clumps["fraction"]))
    for cxs, cys, re, frac in zip(clumps["x"], clumps["y"], clumps["re"], clumps["fraction"]):
        kw = _unit_flux(_SERSIC, {"R_sersic": float(re), "n_sersic": 1.0,
                                  "center_x": cx + float(cxs), "center_y": cy + float(cys)})
        clump_sb += (frac / total_fraction) * _SERSIC.surface_brightness(beta_x, beta_y, [kw])

    def to_pixels(sb: np.ndarray) -> np.ndarray:
        return sb.reshape(n, ss, n, ss).mean(axis=(1, 3)) * pixel_scale**2

    return to_pixels(main), to_pixels(clump_sb)


def _source_magnification(lenses: dict[str, Any], i: int, pixel_scale: float) -> float:
    """Return the total magnification of lens ``i``'s main source component."""
    lens = {name: lenses[name][i] for name in _LENS_TRUTH_COLUMNS if name in lenses}
    beta = math.hypot(lens["source_x_arcsec"], lens["source_y_arcsec"])
    half = _lens_stamp_half_pix(lens["theta_e_arcsec"], beta, lens["source_re_arcsec"], pixel_scale)
    empty = {"x": np.zeros(0), "y": np.zeros(0), "re": np.zeros(0), "fraction": np.zeros(0)}
    main, _ = _lensed_source_images(lens, empty, 0.0, 0.0, half, pixel_scale)
    return float(main.sum())


# --------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class _Conditions:
    """Observing conditions of one band of one tile."""

    seeing_fwhm_arcsec: float
    psf_g1: float
    psf_g2: float
    sky_counts_per_pix: float
    gain: float
    depth_5sigma_mag: float

    @property
    def sky_sigma(self) -> float:
        return math.sqrt(self.sky_counts_per_pix / self.gain)


def _tile_conditions(config: MockSurveyConfig, tile_index: int) -> dict[str, _Conditions]:
    """Return each band's seeing, PSF shape, sky and gain for one tile (drawn for all bands)."""
    rng = _rng(config.seed, 1, tile_index)
    s = config.pixel_scale_arcsec
    out = {}
    for b, model in _BAND_MODELS.items():
        seeing = model.seeing_fwhm_arcsec * float(
            np.clip(np.exp(rng.normal(0, 0.06)), _MIN_SEEING_FACTOR, _MAX_SEEING_FACTOR))
        g1, g2 = rng.normal(0, 0.015, 2)
        sky_mu = model.sky_mag_per_arcsec2 + rng.normal(0, 0.05)
        depth = model.depth_5sigma_mag + rng.normal(0, 0.1)
        sky = float(_flux(sky_mu, config.magzero)) * s**2
        # The gain is what makes the sky's Poisson noise reach the depth: a 5-sigma point source
        # measured with the PSF's noise-equivalent area.
        kernel = _psf_kernel(seeing, float(g1), float(g2), s)
        nea_pix = 1.0 / float(np.sum(kernel**2))
        sigma_flux = float(_flux(depth, config.magzero)) / 5.0
        gain = sky * nea_pix / sigma_flux**2
        out[b] = _Conditions(seeing, float(g1), float(g2), sky, gain, float(depth))
    return out


def _psf(seeing: float, g1: float, g2: float) -> galsim.GSObject:
    return galsim.Moffat(beta=PSF_MOFFAT_BETA, fwhm=seeing, gsparams=_GSPARAMS).shear(g1=g1, g2=g2)


def _psf_kernel(seeing: float, g1: float, g2: float, pixel_scale: float) -> np.ndarray:
    """Return the PSF sampled at pixel centres, summing to 1, for convolving pixel-integrated images."""
    half = _psf_kernel_half_pix(seeing, pixel_scale)
    image = galsim.ImageD(2 * half + 1, 2 * half + 1, scale=pixel_scale)
    _psf(seeing, g1, g2).drawImage(image=image, method="no_pixel")
    return image.array / image.array.sum()


def _add_stamp(tile: np.ndarray, stamp: np.ndarray, ix: int, iy: int) -> None:
    """Add a (2h+1)-square stamp centred on pixel (ix, iy) into the tile, clipped to its bounds."""
    h = stamp.shape[0] // 2
    n_y, n_x = tile.shape
    y0, x0 = iy - h, ix - h
    ty0, ty1 = max(y0, 0), min(y0 + stamp.shape[0], n_y)
    tx0, tx1 = max(x0, 0), min(x0 + stamp.shape[1], n_x)
    if ty0 < ty1 and tx0 < tx1:
        tile[ty0:ty1, tx0:tx1] += stamp[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0]


def _object_half_pix(row: pd.Series, seeing: float, pixel_scale: float) -> int:
    if row.kind == "star":
        # Brighter stars need bigger stamps before their Moffat wings drop below the noise.
        reach = (3.0 + 1.5 * max(0.0, 21.0 - row.mag_r)) * seeing
    else:
        reach = 5.0 * max(row.hlr_bulge, row.hlr_disk) + 2.0 * seeing
    return int(np.clip(math.ceil(reach / pixel_scale), _MIN_STAMP_HALF_PIX, _MAX_STAMP_HALF_PIX))


def _galaxy_profile(row: Any, band: str) -> galsim.GSObject | None:
    """Return the pre-PSF bulge + disk light of one catalog row in one band (None if dark)."""
    parts = []
    fb, fd = getattr(row, f"flux_bulge_{band}"), getattr(row, f"flux_disk_{band}")
    if fb > 0:
        parts.append(galsim.DeVaucouleurs(half_light_radius=row.hlr_bulge, flux=fb, gsparams=_GSPARAMS)
                     .shear(q=row.q_bulge, beta=row.beta_bulge * galsim.radians))
    if fd > 0:
        parts.append(galsim.Exponential(half_light_radius=row.hlr_disk, flux=fd, gsparams=_GSPARAMS)
                     .shear(q=row.q_disk, beta=row.beta_disk * galsim.radians))
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else galsim.Add(parts)


def _render_tile(config: MockSurveyConfig, tile_index: int, catalog: pd.DataFrame,
                clumps: list[dict[str, np.ndarray]]) -> dict[str, tuple[np.ndarray, fits.Header]]:
    """Return each band's float32 image and header for one tile.

    Parameters
    ----------
    config : MockSurveyConfig
        The survey being built.
    tile_index : int
        Which tile (0-based, row by row).
    catalog : pandas.DataFrame
        The full internal catalog from the same config (every object whose light can reach the
        tile is drawn, whichever tile owns it).
    clumps : list of dict
        Each lens's source clumps, indexed by the catalog's ``lens_index``.

    Returns
    -------
    dict
        ``band -> (image, header)``; images are sky-subtracted counts with the sky's noise.
    """
    s = config.pixel_scale_arcsec
    n = config.size_pix
    wcs = tile_wcs(config, tile_index)
    # Objects owned by neighbouring tiles still spill light (and arcs) onto this one.
    hi = config.einstein_radius_range_arcsec[1]
    reach = max(_MAX_STAMP_HALF_PIX,
                _lens_reach_pix(hi, _MAX_SOURCE_OFFSET_THETA_E * hi, _SOURCE_RE_RANGE_ARCSEC[1], s))
    near, x, y = _inside(wcs, catalog["ra"].to_numpy(), catalog["dec"].to_numpy(), n,
                         margin_pix=reach)
    objects = catalog[near]
    x, y = x[near], y[near]
    conditions = _tile_conditions(config, tile_index)
    ix, iy = np.rint(x).astype(int), np.rint(y).astype(int)
    dx, dy = x - ix, y - iy

    lensed: dict[int, tuple[np.ndarray, np.ndarray, int]] = {}
    if config.paint_lensed_sources:
        for pos, row in enumerate(objects.itertuples(index=False)):
            if row.kind == "lens":
                beta = math.hypot(row.source_x_arcsec, row.source_y_arcsec)
                half = _lens_stamp_half_pix(row.theta_e_arcsec, beta, row.source_re_arcsec, s)
                main, clump = _lensed_source_images(
                    pd.Series(row._asdict()), clumps[row.lens_index], dx[pos], dy[pos], half, s
                )
                lensed[pos] = (main, clump, half)

    out = {}
    for band in config.bands:
        cond = conditions[band]
        psf = _psf(cond.seeing_fwhm_arcsec, cond.psf_g1, cond.psf_g2)
        model = np.zeros((n, n), dtype=np.float64)
        for pos, row in enumerate(objects.itertuples(index=False)):
            if row.kind == "star":
                profile = psf.withFlux(getattr(row, f"flux_star_{band}"))
            else:
                galaxy = _galaxy_profile(row, band)
                if galaxy is None:
                    continue
                profile = galsim.Convolve(galaxy, psf)
            half = _object_half_pix(row, cond.seeing_fwhm_arcsec, s)
            stamp = galsim.ImageD(2 * half + 1, 2 * half + 1, scale=s)
            profile.drawImage(image=stamp, offset=(dx[pos], dy[pos]))
            _add_stamp(model, stamp.array, ix[pos], iy[pos])
        if lensed:
            kernel = _psf_kernel(cond.seeing_fwhm_arcsec, cond.psf_g1, cond.psf_g2, s)
            k_half = kernel.shape[0] // 2
            for pos, (main, clump, half) in lensed.items():
                row = objects.iloc[pos]
                image = (row[f"source_flux_main_{band}"] * main
                         + row[f"source_flux_clumps_{band}"] * clump)
                # Pad by the kernel so light the PSF spreads past the source stamp is kept.
                image = np.pad(image, k_half)
                _add_stamp(model, scipy.signal.fftconvolve(image, kernel, mode="same"), ix[pos], iy[pos])
        noise_rng = _rng(config.seed, 2, tile_index, _BAND_MODELS[band].index)
        # Sky-subtracted coadd: the sky is gone but its Poisson noise (and the objects') remains.
        variance = (cond.sky_counts_per_pix + np.maximum(model, 0.0)) / cond.gain
        image = (model + noise_rng.standard_normal((n, n)) * np.sqrt(variance)).astype(np.float32)
        out[band] = (image, _band_header(config, tile_index, wcs, band, cond))
    return out


def _band_header(config: MockSurveyConfig, tile_index: int, wcs: WCS, band: str,
                 cond: _Conditions) -> fits.Header:
    h = _wcs_header(config, float(wcs.wcs.crval[0]), float(wcs.wcs.crval[1]))
    h["EXTNAME"] = (band, "band")
    h["BAND"] = (band, "photometric band")
    h["TILENAME"] = (tile_names(config.n_tiles)[tile_index], "tile name")
    h["BUNIT"] = ("adu", "counts (see MAGZERO)")
    h["MAGZERO"] = (config.magzero, "AB: mag = MAGZERO - 2.5 log10(counts)")
    h["SEEING"] = (round(cond.seeing_fwhm_arcsec, 4), "[arcsec] PSF FWHM (Moffat)")
    h["PSFBETA"] = (PSF_MOFFAT_BETA, "Moffat beta of the PSF")
    h["SKYSUB"] = (True, "sky subtracted; SKYLEVEL set the noise")
    h["SKYLEVEL"] = (round(cond.sky_counts_per_pix, 4), "[adu/pix] sky level before subtraction")
    h["SKYSIG"] = (round(cond.sky_sigma, 5), "[adu] rms sky noise per pixel")
    h["GAIN"] = (round(cond.gain, 5), "[e-/adu] effective gain of the coadd")
    h["DEPTH"] = (round(cond.depth_5sigma_mag, 4), "5-sigma point-source depth (AB)")
    h["PIXSCALE"] = (config.pixel_scale_arcsec, "[arcsec/pix] pixel scale")
    h["ORIGIN"] = ("lensscan.mock_survey", "simulated image")
    h["MOCKSEED"] = (config.seed, "seed of the mock survey")
    return h


# --------------------------------------------------------------------------------------------
# Writing


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


def _write_bytes(url: str, payload: bytes) -> None:
    # Whole-buffer writes: object stores take no seeks, and astropy's writer wants them.
    with fsspec.open(url, "wb") as f:
        f.write(payload)


def _fits_bytes(hdus: list[fits.hdu.base.ExtensionHDU | fits.PrimaryHDU]) -> bytes:
    buffer = io.BytesIO()
    fits.HDUList(hdus).writeto(buffer)
    return buffer.getvalue()


def _image_hdu(data: np.ndarray, header: fits.Header, compress: bool, primary: bool) -> Any:
    # EXTNAME comes from the header, not ``name=``: astropy upper-cases names given that way, and
    # the band's own spelling is what the input contract promises.
    if compress:
        # Subtractive dither seeded from the data's checksum: fpack's recommended quantisation,
        # and unlike the clock seed it keeps the bytes reproducible.
        return fits.CompImageHDU(data=data, header=header, compression_type="RICE_1",
                                 quantize_method=1, dither_seed=-1)
    if primary:
        return fits.PrimaryHDU(data=data, header=header)
    return fits.ImageHDU(data=data, header=header)


def _write_tile(survey: MockSurvey, config: MockSurveyConfig, tile: str,
                bands: dict[str, tuple[np.ndarray, fits.Header]]) -> None:
    if config.layout == "per_band":
        for band, (data, header) in bands.items():
            hdus = [_image_hdu(data, header, config.compress, primary=True)]
            if config.compress:
                hdus.insert(0, fits.PrimaryHDU())
            _write_bytes(survey.tile_url(tile, band), _fits_bytes(hdus))
        return
    primary = fits.PrimaryHDU()
    primary.header["TILENAME"] = (tile, "tile name")
    primary.header["BANDS"] = (",".join(config.bands), "one image HDU per band (EXTNAME)")
    primary.header["ORIGIN"] = ("lensscan.mock_survey", "simulated image")
    hdus = [primary] + [_image_hdu(d, h, config.compress, primary=False) for d, h in bands.values()]
    _write_bytes(survey.tile_url(tile), _fits_bytes(hdus))


def _write_parquet(url: str, frame: pd.DataFrame, config: MockSurveyConfig) -> None:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    metadata = dict(table.schema.metadata or {})
    metadata[PARQUET_METADATA_KEY] = json.dumps(config.to_dict()).encode()
    table = table.replace_schema_metadata(metadata)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    _write_bytes(url, buffer.getvalue())


def _truth_table(catalog: pd.DataFrame, config: MockSurveyConfig) -> pd.DataFrame:
    names = tile_names(config.n_tiles)
    truth = pd.DataFrame({
        "objid": catalog["objid"].to_numpy(np.int64),
        "is_lens": (catalog["kind"] == "lens").to_numpy(bool),
        "kind": catalog["kind"].astype(str),
        "tile": [names[t] for t in catalog["tile"]],
        "ra": catalog["ra"].to_numpy(np.float64),
        "dec": catalog["dec"].to_numpy(np.float64),
    })
    for b in config.bands:
        truth[f"mag_{b}"] = catalog[f"mag_{b}"].to_numpy(np.float64)
    truth["half_light_radius_arcsec"] = catalog["half_light_radius_arcsec"].to_numpy(np.float64)
    for name in ("theta_e_arcsec", "q_lens", "phi_lens", "gamma1", "gamma2"):
        truth[name] = catalog[name].to_numpy(np.float64)
    for b in config.bands:
        truth[f"source_mag_{b}"] = catalog[f"source_mag_{b}"].to_numpy(np.float64)
    for name in ("source_re_arcsec", "source_n_sersic", "source_q", "source_phi",
                 "source_x_arcsec", "source_y_arcsec", "source_magnification"):
        truth[name] = catalog[name].to_numpy(np.float64)
    truth["source_n_clumps"] = catalog["source_n_clumps"].to_numpy(np.int64)
    return truth


def make_mock_survey(out: str, config: MockSurveyConfig | None = None) -> MockSurvey:
    """Write a mock survey's tiles, catalog and truth under ``out``; return what was written.

    Parameters
    ----------
    out : str
        Local directory or fsspec URL (``memory://x``, ``s3://bucket/prefix``, ...). Existing
        files of the same names are overwritten.
    config : MockSurveyConfig, optional
        What to build; defaults to ``MockSurveyConfig()`` (4 tiles of 1024^2 in g, r, i with 20
        lenses).

    Returns
    -------
    MockSurvey
        URLs of ``tiles/``, ``catalog.parquet`` (``objid, ra, dec``) and ``truth.parquet``, the
        tile pattern, tile names and bands. ``survey.json`` next to them records the same and the
        config; both Parquet files carry the config in their metadata.

    Notes
    -----
    Truth angles (``phi_lens``, ``source_phi``) are radians counter-clockwise from the tile's +x
    pixel axis (West); ``source_x/y_arcsec`` are offsets from the deflector along +x (West) and +y
    (North); ``gamma1, gamma2`` are in the same frame. ``source_mag_<band>`` is unlensed;
    ``source_magnification`` is the main Sersic component's total magnification.
    ``half_light_radius_arcsec`` is the intrinsic (pre-PSF) circularised r-band half-light radius.

    Examples
    --------
    >>> survey = make_mock_survey("memory://mock", MockSurveyConfig(n_tiles=2, size_pix=256, n_lenses=2))
    >>> survey.tile_url("tile000", "g")
    'memory://mock/tiles/tile000_g.fits'
    """
    config = config or MockSurveyConfig()
    started = time.perf_counter()
    root = out.rstrip("/") if "://" in out else os.path.abspath(out)
    survey = MockSurvey(
        root=root,
        tiles_url=_join(root, "tiles"),
        catalog_url=_join(root, "catalog.parquet"),
        truth_url=_join(root, "truth.parquet"),
        tile_pattern=config.tile_pattern,
        tiles=tile_names(config.n_tiles),
        bands=config.bands,
        config=config,
    )
    fs, tiles_path = fsspec.core.url_to_fs(survey.tiles_url)
    fs.makedirs(tiles_path, exist_ok=True)

    wcses = [tile_wcs(config, k) for k in range(config.n_tiles)]
    catalog, clumps = _draw_catalog(config, wcses)
    counts = catalog["kind"].value_counts().to_dict()
    logger.info("mock survey %s: %d tiles of %d^2 pix in %s; %d galaxies, %d stars, %d lenses",
                root, config.n_tiles, config.size_pix, ",".join(config.bands),
                counts.get("galaxy", 0), counts.get("star", 0), counts.get("lens", 0))

    for k, tile in enumerate(tqdm(survey.tiles, desc="mock tiles", unit="tile", disable=None)):
        _write_tile(survey, config, tile, _render_tile(config, k, catalog, clumps))

    _write_parquet(survey.catalog_url, catalog[["objid", "ra", "dec"]], config)
    _write_parquet(survey.truth_url, _truth_table(catalog, config), config)
    description = {
        "tiles_url": survey.tiles_url, "catalog_url": survey.catalog_url,
        "truth_url": survey.truth_url, "tile_pattern": survey.tile_pattern,
        "tiles": list(survey.tiles), "bands": list(survey.bands), "config": config.to_dict(),
    }
    _write_bytes(_join(root, "survey.json"), json.dumps(description, indent=2).encode())
    logger.info("mock survey %s written in %.1f s", root, time.perf_counter() - started)
    return survey


def open_mock_survey(out: str) -> MockSurvey | None:
    """Return the survey an earlier ``make_mock_survey(out, ...)`` finished, or None.

    ``survey.json`` is written last, so its presence means every tile and table is complete.
    """
    root = out.rstrip("/") if "://" in out else os.path.abspath(out)
    fs, path = fsspec.core.url_to_fs(_join(root, "survey.json"))
    if not fs.exists(path):
        return None
    d = json.loads(fs.cat_file(path))
    cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in d["config"].items()}
    return MockSurvey(root=root, tiles_url=d["tiles_url"], catalog_url=d["catalog_url"],
                      truth_url=d["truth_url"], tile_pattern=d["tile_pattern"], tiles=tuple(d["tiles"]),
                      bands=tuple(d["bands"]), config=MockSurveyConfig(**cfg))
