"""The generalisation suite's surveys: made by a simulator that training never uses.

Every survey here is drawn by this file's own code, apart from ``scanner.mock_survey`` (which makes
the training and demo surveys) and from ``training.inject`` / ``training.lookalikes`` (caustics
injections and painted look-alikes). What differs, on purpose:

- **PSFs**: a Kolmogorov core with a broad Moffat wing, a double Gaussian, or a Moffat whose beta
  training's mock never uses; each band's seeing is drawn per tile from the survey's range.
- **Noise**: sky noise that is white or correlated between neighbouring pixels, as in resampled
  coadds, plus the objects' own photon noise; another zero point, depth and sky per survey.
- **Pixel scale** a little off the models' 0.26" (within the scan's 1% tolerance).
- **Stars** with diffraction spikes; the brightest saturate, with a flat top and a bleed trail.
- **Lenses**: a power-law (EPL, slope 1.8-2.2) deflector with shear, ray-traced by lenstronomy,
  lensing sources made of GalSim random knots on a faint Sersic body: clumpy, irregular sources
  unlike training's Sersic-plus-clumps.
- **Look-alikes** of nine families (``LOOKALIKE_FAMILIES``): blue companions, star-forming rings,
  spirals, edge-on disks, star-galaxy blends, clumpy irregulars and blue pairs (kinds training may
  show in its own rendering), and two that training never shows: mergers with curved tidal tails
  and red arcs beside a cluster member (``HELD_OUT_FAMILIES``).

Surveys have a ``role``: ``validation`` surveys are where recipes are compared; ``test`` surveys are
scored once per candidate ensemble and reported. Seeds are this file's own (1000s and up), never a
seed of training's mock surveys. Nothing in ``training/`` imports this file.

Rendering: each object's pre-PSF light is drawn once per component with GalSim (pixel-integrated)
and added to each band with its colour; the scene is convolved with the band's PSF in one FFT;
stars are drawn with the PSF directly; then noise, then saturation.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import fsspec
import galsim
import numpy as np
import pandas as pd
import scipy.ndimage
import scipy.signal
from astropy.io import fits
from astropy.wcs import WCS
from lenstronomy.LensModel.lens_model import LensModel

logger = logging.getLogger(__name__)

BANDS = ("g", "r", "i")

#: Look-alike families, as ``kind`` in the truth table.
LOOKALIKE_FAMILIES = ("companion", "ring", "spiral", "edge_on", "star_blend", "clumpy",
                      "blue_pair", "merger", "red_arc")
#: Families no part of training draws: how the suite measures look-alikes never seen.
HELD_OUT_FAMILIES = ("merger", "red_arc")

_GSPARAMS = galsim.GSParams(folding_threshold=1e-2, maxk_threshold=2e-3)
_SUPERSAMPLE = 4  # ray-tracing grid, per pixel side


@dataclass(frozen=True)
class SuiteSurvey:
    """One survey of the suite: its role, its simulator settings and its population.

    Seeing ranges are r-band FWHM in arcsec; g is 8% worse and i 5% better.
    """

    name: str
    role: str  # "validation" or "test"
    seed: int
    psf: str  # "kolmogorov_wings", "double_gaussian" or "moffat"
    psf_beta: float = 2.5  # Moffat beta (the "moffat" PSF, and the wing of "kolmogorov_wings")
    wing_fraction: float = 0.1  # flux in the broad component of the two-component PSFs
    seeing_range_arcsec: tuple[float, float] = (0.8, 1.1)
    pixel_scale_arcsec: float = 0.26
    noise_correlation_pix: float = 0.0  # Gaussian sigma of the sky noise's pixel correlation
    depth_r_5sigma: float = 24.8
    magzero: float = 30.0
    star_density_per_arcmin2: float = 2.0
    n_tiles: int = 6
    size_pix: int = 2048
    n_lenses: int = 48
    n_per_family: int = 14

    def __post_init__(self) -> None:
        if self.role not in ("validation", "test"):
            raise ValueError(f"SuiteSurvey {self.name}: role must be validation or test")
        if self.psf not in ("kolmogorov_wings", "double_gaussian", "moffat"):
            raise ValueError(f"SuiteSurvey {self.name}: unknown psf {self.psf!r}")
        object.__setattr__(self, "seeing_range_arcsec", tuple(self.seeing_range_arcsec))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


#: The suite. Validation surveys choose recipes; test surveys are only reported.
SUITE: tuple[SuiteSurvey, ...] = (
    SuiteSurvey("val-moffat45-correlated", "validation", 1101, "moffat", psf_beta=4.5,
                seeing_range_arcsec=(0.85, 1.05), noise_correlation_pix=0.7, depth_r_5sigma=24.9),
    SuiteSurvey("val-kolmogorov-sharp", "validation", 1202, "kolmogorov_wings", wing_fraction=0.05,
                psf_beta=3.0, seeing_range_arcsec=(0.6, 0.8), pixel_scale_arcsec=0.2590,
                depth_r_5sigma=25.2, magzero=28.5),
    SuiteSurvey("test-kolmogorov-wings", "test", 2101, "kolmogorov_wings", wing_fraction=0.12,
                psf_beta=2.2, seeing_range_arcsec=(0.7, 1.0), pixel_scale_arcsec=0.2577,
                depth_r_5sigma=25.0, magzero=31.0),
    SuiteSurvey("test-coadd-bad-seeing", "test", 2202, "moffat", psf_beta=2.5,
                seeing_range_arcsec=(1.05, 1.4), noise_correlation_pix=0.9, depth_r_5sigma=24.5,
                magzero=27.5),
    SuiteSurvey("test-double-gaussian-crowded", "test", 2303, "double_gaussian", wing_fraction=0.15,
                seeing_range_arcsec=(0.8, 1.1), pixel_scale_arcsec=0.2622, noise_correlation_pix=0.5,
                depth_r_5sigma=24.7, star_density_per_arcmin2=8.0),
)


def suite_survey(name: str) -> SuiteSurvey:
    """The suite's survey called ``name``."""
    for s in SUITE:
        if s.name == name:
            return s
    raise KeyError(f"no suite survey {name!r}; known: {[s.name for s in SUITE]}")


# --------------------------------------------------------------------------------------------
# Bands, PSFs, noise


_SEEING_FACTOR = {"g": 1.08, "r": 1.0, "i": 0.95}
_SKY_MAG = {"g": 22.0, "r": 21.0, "i": 20.2}
_DEPTH_OFFSET = {"g": 0.3, "r": 0.0, "i": -0.5}


def _flux(mag: float | np.ndarray, magzero: float) -> Any:
    return 10.0 ** (-0.4 * (np.asarray(mag) - magzero))


def psf_profile(survey: SuiteSurvey, seeing: float, g1: float, g2: float) -> galsim.GSObject:
    """The survey's PSF at ``seeing`` FWHM (arcsec), unit flux, slightly elliptical."""
    if survey.psf == "moffat":
        profile = galsim.Moffat(beta=survey.psf_beta, fwhm=seeing, gsparams=_GSPARAMS)
    elif survey.psf == "kolmogorov_wings":
        core = galsim.Kolmogorov(fwhm=seeing, gsparams=_GSPARAMS)
        wing = galsim.Moffat(beta=survey.psf_beta, fwhm=2.5 * seeing, gsparams=_GSPARAMS)
        profile = galsim.Add([core * (1 - survey.wing_fraction), wing * survey.wing_fraction])
    else:
        core = galsim.Gaussian(fwhm=seeing, gsparams=_GSPARAMS)
        wing = galsim.Gaussian(fwhm=3.0 * seeing, gsparams=_GSPARAMS)
        profile = galsim.Add([core * (1 - survey.wing_fraction), wing * survey.wing_fraction])
    return profile.shear(g1=g1, g2=g2)


def _psf_kernel(profile: galsim.GSObject, scale: float, half: int) -> np.ndarray:
    image = galsim.ImageD(2 * half + 1, 2 * half + 1, scale=scale)
    profile.drawImage(image=image, method="no_pixel")
    return image.array / image.array.sum()


def correlated_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float,
                     correlation_pix: float) -> np.ndarray:
    """Gaussian noise of rms ``sigma`` per pixel, correlated over ``correlation_pix`` (0: white)."""
    white = rng.standard_normal(shape)
    if correlation_pix <= 0:
        return sigma * white
    half = max(1, int(math.ceil(3 * correlation_pix)))
    r = np.arange(-half, half + 1)
    k1 = np.exp(-r**2 / (2 * correlation_pix**2))
    kernel = np.outer(k1, k1)
    kernel /= math.sqrt(np.sum(kernel**2))  # unit output variance
    return sigma * scipy.signal.fftconvolve(white, kernel, mode="same")


# --------------------------------------------------------------------------------------------
# Objects: each a list of pre-PSF components (GalSim profile at unit flux, offset, band fluxes)


@dataclass
class _Component:
    profile: galsim.GSObject | None  # unit-flux pre-PSF light (None: an image, below)
    dx_arcsec: float
    dy_arcsec: float
    mags: dict[str, float]
    image: np.ndarray | None = None  # a pre-PSF pixel image centred on the object (lensed arcs)


@dataclass
class _Object:
    kind: str
    x: float  # pixel position of the catalogued centre (0-based)
    y: float
    components: list[_Component] = field(default_factory=list)
    stars: list[tuple[float, float, dict[str, float]]] = field(default_factory=list)  # dx, dy, mags
    catalogued: bool = True
    mag_r: float = float("nan")
    theta_e_arcsec: float = float("nan")


def _colours(rng: np.random.Generator, mag_r: float, red: bool) -> dict[str, float]:
    if red:
        gr, ri = rng.uniform(1.15, 1.7), rng.uniform(0.4, 0.65)
    else:
        gr, ri = rng.uniform(0.05, 0.6), rng.uniform(0.0, 0.35)
    return {"g": mag_r + gr, "r": mag_r, "i": mag_r - ri}


def _mixed_colours(rng: np.random.Generator, mag_r: float) -> dict[str, float]:
    gr = rng.uniform(0.3, 1.5)
    return {"g": mag_r + gr, "r": mag_r, "i": mag_r - rng.uniform(0.15, 0.5)}


def _red_galaxy(rng: np.random.Generator, mag_r: float, hlr: float | None = None) -> _Component:
    hlr = hlr if hlr is not None else rng.uniform(0.5, 1.6)
    prof = galsim.Sersic(n=rng.uniform(3.0, 5.5), half_light_radius=hlr, gsparams=_GSPARAMS)
    prof = prof.shear(q=rng.uniform(0.6, 1.0), beta=rng.uniform(0, math.pi) * galsim.radians)
    return _Component(prof, 0.0, 0.0, _colours(rng, mag_r, red=True))


def _knots_along(points_arcsec: np.ndarray, width_arcsec: float, rng: np.random.Generator
                 ) -> galsim.GSObject:
    """Unit-flux light along a curve: Gaussian blobs of varied brightness at the given points."""
    weights = rng.lognormal(0.0, 0.5, len(points_arcsec))
    weights /= weights.sum()
    blobs = [galsim.Gaussian(sigma=width_arcsec * rng.uniform(0.7, 1.3), flux=w, gsparams=_GSPARAMS)
             .shift(float(px), float(py)) for (px, py), w in zip(points_arcsec, weights)]
    return galsim.Add(blobs)


def _random_knots(rng: np.random.Generator, n: int, hlr_arcsec: float, knot_sigma_arcsec: float
                  ) -> galsim.GSObject:
    """Unit-flux star-forming knots scattered like a Gaussian of half-light radius ``hlr_arcsec``."""
    pts = rng.normal(0.0, hlr_arcsec / 1.1774, (n, 2))
    return _knots_along(pts, knot_sigma_arcsec, rng)


def _ellipse_points(radius: float, q: float, angle: float, n: int, start: float = 0.0,
                    span: float = 2 * math.pi) -> np.ndarray:
    t = start + np.linspace(0, span, n, endpoint=span < 2 * math.pi)
    x, y = radius * np.cos(t), radius * q * np.sin(t)
    c, s = math.cos(angle), math.sin(angle)
    return np.stack([c * x - s * y, s * x + c * y], axis=1)


def _ordinary_galaxy(rng: np.random.Generator, mag_r: float) -> list[_Component]:
    bulge_fraction = rng.uniform(0.0, 1.0)
    hlr_disk = float(np.clip(rng.lognormal(math.log(0.25 + 0.12 * (24 - mag_r)), 0.35), 0.15, 3.0))
    q = rng.uniform(0.25, 1.0)
    angle = rng.uniform(0, math.pi) * galsim.radians
    comps = []
    if bulge_fraction > 0.05:
        bulge = galsim.Sersic(n=rng.uniform(2.0, 4.5), half_light_radius=0.5 * hlr_disk,
                              gsparams=_GSPARAMS).shear(q=min(1.0, q + 0.3), beta=angle)
        comps.append(_Component(bulge, 0, 0, _colours(rng, mag_r - 2.5 * math.log10(bulge_fraction),
                                                      red=True)))
    if bulge_fraction < 0.95:
        disk = galsim.Sersic(n=rng.uniform(0.7, 1.3), half_light_radius=hlr_disk,
                             gsparams=_GSPARAMS).shear(q=q, beta=angle)
        comps.append(_Component(disk, 0, 0, _colours(
            rng, mag_r - 2.5 * math.log10(1 - bulge_fraction), red=False)))
    return comps


def _lookalike(kind: str, rng: np.random.Generator) -> _Object:
    """One look-alike of ``kind`` at the origin (positions are set by the caller)."""
    obj = _Object(kind, 0.0, 0.0)
    if kind == "companion":
        mag = rng.uniform(18.5, 21.0)
        obj.components.append(_red_galaxy(rng, mag))
        sep, phi = rng.uniform(1.2, 3.2), rng.uniform(0, 2 * math.pi)
        comp = galsim.Sersic(n=rng.uniform(0.6, 1.5), half_light_radius=rng.uniform(0.15, 0.5),
                             gsparams=_GSPARAMS)
        # Often stretched tangentially, like an arc.
        comp = comp.shear(q=rng.uniform(0.25, 0.8), beta=(phi + math.pi / 2) * galsim.radians)
        obj.components.append(_Component(comp, sep * math.cos(phi), sep * math.sin(phi),
                                         _colours(rng, rng.uniform(20.0, 22.5), red=False)))
    elif kind == "ring":
        mag = rng.uniform(18.5, 21.0)
        obj.components.append(_red_galaxy(rng, mag, hlr=rng.uniform(0.3, 0.8)))
        radius, q, angle = rng.uniform(1.0, 2.6), rng.uniform(0.55, 1.0), rng.uniform(0, math.pi)
        pts = _ellipse_points(radius, q, angle, int(rng.integers(14, 30)))
        ring = _knots_along(pts, rng.uniform(0.12, 0.3), rng)
        obj.components.append(_Component(ring, 0, 0, _colours(rng, rng.uniform(19.8, 22.0), red=False)))
    elif kind == "spiral":
        mag = rng.uniform(18.0, 20.5)
        obj.components.append(_red_galaxy(rng, mag + 0.8, hlr=rng.uniform(0.3, 0.7)))
        pitch, r0, q, angle = rng.uniform(0.2, 0.45), rng.uniform(0.4, 0.8), rng.uniform(0.5, 1.0), \
            rng.uniform(0, math.pi)
        arms = []
        for arm in range(int(rng.integers(2, 4))):
            t = np.linspace(0, rng.uniform(2.5, 4.5), 18)
            r = r0 * np.exp(pitch * t)
            th = t + arm * 2 * math.pi / 2.0
            x, y = r * np.cos(th), q * r * np.sin(th)
            c, s = math.cos(angle), math.sin(angle)
            arms.append(np.stack([c * x - s * y, s * x + c * y], axis=1))
        light = _knots_along(np.concatenate(arms), rng.uniform(0.12, 0.25), rng)
        obj.components.append(_Component(light, 0, 0, _colours(rng, mag + 0.3, red=False)))
    elif kind == "edge_on":
        mag = rng.uniform(18.0, 21.0)
        disk = galsim.InclinedExponential(inclination=rng.uniform(80, 89.5) * galsim.degrees,
                                          half_light_radius=rng.uniform(0.8, 2.4),
                                          scale_h_over_r=rng.uniform(0.06, 0.15), gsparams=_GSPARAMS)
        disk = disk.rotate(rng.uniform(0, math.pi) * galsim.radians)
        obj.components.append(_Component(disk, 0, 0, _mixed_colours(rng, mag)))
    elif kind == "star_blend":
        mag = rng.uniform(18.5, 21.5)
        obj.components.extend(_ordinary_galaxy(rng, mag) if rng.random() < 0.5
                              else [_red_galaxy(rng, mag)])
        sep, phi = rng.uniform(0.8, 2.5), rng.uniform(0, 2 * math.pi)
        star_r = rng.uniform(18.0, 22.5)
        t = rng.uniform(0, 1)
        obj.stars.append((sep * math.cos(phi), sep * math.sin(phi),
                          {"g": star_r + 0.3 + 1.2 * t, "r": star_r, "i": star_r - 0.1 - 0.8 * t}))
    elif kind == "clumpy":
        mag = rng.uniform(19.0, 21.5)
        knots = _random_knots(rng, int(rng.integers(8, 40)), rng.uniform(0.5, 1.5),
                              rng.uniform(0.08, 0.2))
        body = galsim.Exponential(half_light_radius=rng.uniform(0.4, 1.0), gsparams=_GSPARAMS)
        f = rng.uniform(0.5, 0.85)
        obj.components.append(_Component(knots, 0, 0, _colours(rng, mag - 2.5 * math.log10(f), red=False)))
        obj.components.append(_Component(body, 0, 0, _colours(rng, mag - 2.5 * math.log10(1 - f), red=False)))
    elif kind == "blue_pair":
        n = int(rng.integers(2, 4))
        phi0 = rng.uniform(0, 2 * math.pi)
        for k in range(n):
            sep = 0.0 if k == 0 else rng.uniform(1.2, 3.0)
            phi = phi0 + k * rng.uniform(0.6, 2.0)
            g = galsim.Sersic(n=rng.uniform(0.6, 1.5), half_light_radius=rng.uniform(0.15, 0.45),
                              gsparams=_GSPARAMS).shear(q=rng.uniform(0.3, 0.9),
                                                        beta=rng.uniform(0, math.pi) * galsim.radians)
            obj.components.append(_Component(g, sep * math.cos(phi), sep * math.sin(phi),
                                             _colours(rng, rng.uniform(20.0, 22.5), red=False)))
    elif kind == "merger":
        mag = rng.uniform(18.5, 20.5)
        obj.components.extend(_ordinary_galaxy(rng, mag))
        sep, phi = rng.uniform(0.8, 2.2), rng.uniform(0, 2 * math.pi)
        second = _ordinary_galaxy(rng, mag + rng.uniform(0.2, 1.5))
        for c in second:
            c.dx_arcsec, c.dy_arcsec = sep * math.cos(phi), sep * math.sin(phi)
        obj.components.extend(second)
        for side in (0, 1):  # two curved tidal tails, winding away from the pair
            t = np.linspace(0, rng.uniform(1.2, 2.4), 16)
            r = rng.uniform(1.0, 1.8) * np.exp(0.35 * t)
            th = phi + side * math.pi + (1 if rng.random() < 0.5 else -1) * t
            pts = np.stack([r * np.cos(th), r * np.sin(th)], axis=1)
            tail = _knots_along(pts, rng.uniform(0.2, 0.4), rng)
            obj.components.append(_Component(tail, 0, 0, _mixed_colours(rng, mag + rng.uniform(1.5, 2.8))))
    elif kind == "red_arc":
        mag = rng.uniform(18.0, 20.0)
        obj.components.append(_red_galaxy(rng, mag))
        radius, start = rng.uniform(1.5, 3.2), rng.uniform(0, 2 * math.pi)
        pts = _ellipse_points(radius, 1.0, 0.0, 16, start=start, span=rng.uniform(0.6, 1.6))
        arc = _knots_along(pts, rng.uniform(0.12, 0.25), rng)
        obj.components.append(_Component(arc, 0, 0, _colours(rng, rng.uniform(20.0, 22.0), red=True)))
    else:
        raise ValueError(kind)
    obj.mag_r = float(-2.5 * math.log10(sum(10 ** (-0.4 * c.mags["r"]) for c in obj.components)))
    return obj


def _lensed_source(rng: np.random.Generator, pixel_scale: float
                   ) -> tuple[np.ndarray, float, float]:
    """A lensed source's pre-PSF pixel image for unit unlensed flux (so it sums to the
    magnification), its Einstein radius (arcsec) and its magnification."""
    theta_e = rng.uniform(0.9, 2.6)
    q = rng.uniform(0.6, 0.95)
    phi = rng.uniform(0, math.pi)
    e1, e2 = (1 - q) / (1 + q) * math.cos(2 * phi), (1 - q) / (1 + q) * math.sin(2 * phi)
    shear = rng.uniform(0, 0.08)
    sphi = rng.uniform(0, math.pi)
    kwargs = [{"theta_E": theta_e, "gamma": rng.uniform(1.8, 2.2), "e1": e1, "e2": e2,
               "center_x": 0.0, "center_y": 0.0},
              {"gamma1": shear * math.cos(2 * sphi), "gamma2": shear * math.sin(2 * sphi)}]
    model = LensModel(["EPL", "SHEAR"])
    # The source: random knots on a faint Sersic body, drawn on a fine grid.
    fine = pixel_scale / _SUPERSAMPLE
    src_half = int(math.ceil(1.2 / fine))
    hlr = rng.uniform(0.12, 0.35)
    body = galsim.Sersic(n=rng.uniform(0.5, 1.5), half_light_radius=hlr, gsparams=_GSPARAMS)
    body = body.shear(q=rng.uniform(0.4, 1.0), beta=rng.uniform(0, math.pi) * galsim.radians)
    knots = _random_knots(rng, int(rng.integers(4, 20)), hlr * rng.uniform(1.0, 1.8),
                          rng.uniform(0.03, 0.08))
    fk = rng.uniform(0.3, 0.7)
    source = galsim.Add([body * (1 - fk), knots * fk])
    img = galsim.ImageD(2 * src_half + 1, 2 * src_half + 1, scale=fine)
    source.drawImage(image=img, method="no_pixel")
    src = img.array / img.array.sum() / fine**2  # surface brightness, unit flux
    beta_max = 0.5 * theta_e
    half = int(math.ceil((theta_e * 1.6 + 1.5) / pixel_scale))
    n = 2 * half + 1
    coords = (np.arange(n * _SUPERSAMPLE) + 0.5) / _SUPERSAMPLE * pixel_scale - (half + 0.5) * pixel_scale
    xx, yy = np.meshgrid(coords, coords)
    bx, by = model.ray_shooting(xx.ravel(), yy.ravel(), kwargs)
    for _ in range(20):
        r = beta_max * math.sqrt(rng.uniform(0, 1))
        a = rng.uniform(0, 2 * math.pi)
        sx, sy = r * math.cos(a), r * math.sin(a)
        # Source-plane positions to fine source-image pixels (row = y, column = x).
        col = (bx - sx) / fine + src_half
        row = (by - sy) / fine + src_half
        sb = scipy.ndimage.map_coordinates(src, [row, col], order=1, mode="constant", cval=0.0)
        sb = sb.reshape(n * _SUPERSAMPLE, n * _SUPERSAMPLE)
        pix = sb.reshape(n, _SUPERSAMPLE, n, _SUPERSAMPLE).mean(axis=(1, 3)) * pixel_scale**2
        mu = float(pix.sum())
        if mu >= 3.0:
            break
    return pix, theta_e, mu


def _lens(rng: np.random.Generator, pixel_scale: float) -> _Object:
    obj = _Object("lens", 0.0, 0.0)
    mag = rng.uniform(18.3, 21.0)
    pix, theta_e, mu = _lensed_source(rng, pixel_scale)
    obj.components.append(_red_galaxy(rng, mag, hlr=rng.uniform(0.5, 1.4)))
    # The arcs' total (magnified) r magnitude: visible, not trivial.
    lensed_r = rng.uniform(19.5, 21.8)
    mags = _colours(rng, lensed_r + 2.5 * math.log10(mu), red=False)
    obj.components.append(_Component(None, 0, 0, mags, image=pix))
    obj.mag_r = mag
    obj.theta_e_arcsec = theta_e
    return obj


# --------------------------------------------------------------------------------------------
# Tiles


def tile_wcs(survey: SuiteSurvey, k: int) -> WCS:
    """The TAN WCS of tile ``k`` (tiles are laid on a grid with gaps, so they never overlap)."""
    ncol = int(math.ceil(math.sqrt(survey.n_tiles)))
    row, col = divmod(k, ncol)
    step_deg = (survey.size_pix + 200) * survey.pixel_scale_arcsec / 3600.0  # tiles do not touch
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    dec0 = -20.0 + (survey.seed % 7)
    w.wcs.crval = [40.0 + (survey.seed % 50) + col * step_deg / math.cos(math.radians(dec0)),
                   dec0 + row * step_deg]
    w.wcs.crpix = [(survey.size_pix + 1) / 2.0] * 2
    s = survey.pixel_scale_arcsec / 3600.0
    w.wcs.cd = [[-s, 0.0], [0.0, s]]
    return w


def _tile_objects(survey: SuiteSurvey, k: int, rng: np.random.Generator,
                  specials: list[_Object]) -> list[_Object]:
    """Every object drawn in tile ``k``: field galaxies, stars, and this tile's lenses and look-alikes."""
    n = survey.size_pix
    s = survey.pixel_scale_arcsec
    area = (n * s / 60.0) ** 2
    objects: list[_Object] = []
    margin = 40
    # Field galaxies: counts rising as 10^(0.3 m); catalogued brighter than r = 24.
    n_gal = rng.poisson(40.0 * area)
    u = rng.uniform(0, 1, n_gal)
    lo, hi = 10 ** (0.3 * 18.0), 10 ** (0.3 * 25.5)
    mags = np.log10(lo + u * (hi - lo)) / 0.3
    for m in mags:
        obj = _Object("galaxy", rng.uniform(0, n), rng.uniform(0, n), _ordinary_galaxy(rng, float(m)),
                      catalogued=m < 24.0, mag_r=float(m))
        objects.append(obj)
    n_star = rng.poisson(survey.star_density_per_arcmin2 * area)
    u = rng.uniform(0, 1, n_star)
    lo, hi = 10 ** (0.15 * 14.5), 10 ** (0.15 * 23.5)
    for m in np.log10(lo + u * (hi - lo)) / 0.15:
        t = rng.uniform(0, 1)
        m = float(m)
        obj = _Object("star", rng.uniform(0, n), rng.uniform(0, n), mag_r=m)
        obj.stars.append((0.0, 0.0, {"g": m + 0.3 + 1.2 * t, "r": m, "i": m - 0.1 - 0.8 * t}))
        objects.append(obj)
    for obj in specials:
        obj.x, obj.y = rng.uniform(margin, n - margin), rng.uniform(margin, n - margin)
        objects.append(obj)
    return objects


def _draw(profile: galsim.GSObject, scale: float, dx: float, dy: float, half: int,
          oversample: int = 4) -> np.ndarray:
    """The profile integrated over pixels of a (2 half + 1)^2 stamp, offset (dx, dy) pixels.

    Drawn in real space on a finer grid and binned: GalSim's pixel convolution of an unconvolved
    Sersic asks for FFTs of many GB.
    """
    n = 2 * half + 1
    image = galsim.ImageD(n * oversample, n * oversample, scale=scale / oversample)
    profile.drawImage(image=image, method="no_pixel", offset=(dx * oversample, dy * oversample))
    return image.array.reshape(n, oversample, n, oversample).sum(axis=(1, 3))


def _add(tile: np.ndarray, stamp: np.ndarray, ix: int, iy: int) -> None:
    h = stamp.shape[0] // 2
    ny, nx = tile.shape
    y0, x0 = iy - h, ix - h
    ty0, ty1 = max(y0, 0), min(y0 + stamp.shape[0], ny)
    tx0, tx1 = max(x0, 0), min(x0 + stamp.shape[1], nx)
    if ty0 < ty1 and tx0 < tx1:
        tile[ty0:ty1, tx0:tx1] += stamp[ty0 - y0:ty1 - y0, tx0 - x0:tx1 - x0]


def _component_reach_pix(c: _Component, s: float) -> int:
    """Half-size of the stamp a component is drawn on: GalSim's own size for the profile."""
    off = math.hypot(c.dx_arcsec, c.dy_arcsec) / s
    return int(np.clip(c.profile.getGoodImageSize(s) // 2 + off, 8, 96))


def _spikes(half: int, flux: float, seeing_pix: float) -> np.ndarray:
    """Four diffraction spikes along the pixel axes carrying ``flux`` (a thin power-law cross)."""
    r = np.arange(-half, half + 1, dtype=np.float64)
    across = np.exp(-r**2 / (2 * (0.4 * seeing_pix) ** 2))
    along = (1 + np.abs(r) / seeing_pix) ** -1.5
    along[half] = 0.0
    cross = np.outer(across, along) + np.outer(along, across)
    return cross * (flux / cross.sum())


def render_tile(survey: SuiteSurvey, k: int, objects: list[_Object]
                ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, float]]]:
    """Each band's image (sky-subtracted counts, float32) and observing conditions for tile ``k``."""
    n, s = survey.size_pix, survey.pixel_scale_arcsec
    rng = np.random.default_rng([survey.seed, 7, k])
    seeing_r = rng.uniform(*survey.seeing_range_arcsec)
    scenes = {b: np.zeros((n, n)) for b in BANDS}
    for obj in objects:
        ix, iy = int(round(obj.x)), int(round(obj.y))
        fx, fy = obj.x - ix, obj.y - iy
        for c in obj.components:
            if c.image is not None:
                stamp = scipy.ndimage.shift(c.image, (fy, fx), order=1)
            else:
                half = _component_reach_pix(c, s)
                stamp = _draw(c.profile, s, fx + c.dx_arcsec / s, fy + c.dy_arcsec / s, half)
            for b in BANDS:
                _add(scenes[b], stamp * _flux(c.mags[b], survey.magzero), ix, iy)
    images, conditions = {}, {}
    saturation = float(_flux(rng.uniform(16.8, 17.6), survey.magzero)) * 0.08  # peak counts
    for bi, b in enumerate(BANDS):
        seeing = seeing_r * _SEEING_FACTOR[b] * rng.uniform(0.97, 1.03)
        g1, g2 = rng.normal(0, 0.02, 2)
        psf = psf_profile(survey, seeing, float(g1), float(g2))
        half = int(math.ceil(4 * seeing / s)) + (12 if survey.psf != "moffat" else 6)
        kernel = _psf_kernel(psf, s, half)
        model = scipy.signal.fftconvolve(scenes[b], kernel, mode="same")
        bleeds = []
        for obj in objects:
            for dx, dy, mags in obj.stars:
                flux = float(_flux(mags[b], survey.magzero))
                x, y = obj.x + dx / s, obj.y + dy / s
                ix, iy = int(round(x)), int(round(y))
                bright = mags[b] < 18.5
                h = int(np.clip(math.ceil((3 + 1.5 * max(0.0, 21 - mags[b])) * seeing / s), 8, 120))
                stamp = galsim.ImageD(2 * h + 1, 2 * h + 1, scale=s)
                stamp = psf.withFlux(flux).drawImage(image=stamp, offset=(x - ix, y - iy)).array
                if bright:
                    stamp += _spikes(h, 0.02 * flux, seeing / s)
                _add(model, stamp, ix, iy)
                if stamp.max() > saturation:
                    bleeds.append((ix, iy, float(np.clip(stamp - saturation, 0, None).sum())))
        sky = float(_flux(_SKY_MAG[b], survey.magzero)) * s**2
        nea = 1.0 / float(np.sum(kernel**2))
        sigma = float(_flux(survey.depth_r_5sigma + _DEPTH_OFFSET[b], survey.magzero)) / 5.0 / math.sqrt(nea)
        gain = sky / sigma**2
        noise_rng = np.random.default_rng([survey.seed, 11, k, bi])
        image = model + correlated_noise(noise_rng, (n, n), sigma, survey.noise_correlation_pix)
        image += noise_rng.standard_normal((n, n)) * np.sqrt(np.clip(model, 0, None) / gain)
        for ix, iy, excess in bleeds:  # charge overflowing saturated pixels runs along the column
            length = int(min(n // 4, excess / saturation / 2))
            x0, x1 = max(ix - 1, 0), min(ix + 2, n)
            image[max(iy - length, 0):min(iy + length + 1, n), x0:x1] = saturation
        np.minimum(image, saturation, out=image)
        images[b] = image.astype(np.float32)
        conditions[b] = {"seeing": seeing, "sigma": sigma, "gain": gain, "sky": sky,
                         "saturation": saturation}
    return images, conditions


def _header(survey: SuiteSurvey, wcs: WCS, tile: str, band: str, cond: dict[str, float]) -> fits.Header:
    h = wcs.to_header()
    h["EXTNAME"] = band
    h["BAND"] = band
    h["TILENAME"] = tile
    h["BUNIT"] = "adu"
    h["MAGZERO"] = (survey.magzero, "AB zero point")
    h["SEEING"] = (round(cond["seeing"], 4), "[arcsec] PSF FWHM")
    h["SKYSIG"] = (round(cond["sigma"], 5), "[adu] rms sky noise per pixel")
    h["GAIN"] = (round(cond["gain"], 5), "[e-/adu] effective gain")
    h["SATURATE"] = (round(cond["saturation"], 2), "[adu] saturation level")
    h["ORIGIN"] = ("lensscan science suite", survey.name)
    return h


def _write(url: str, payload: bytes) -> None:
    with fsspec.open(url, "wb") as f:
        f.write(payload)


def make_suite_survey(survey: SuiteSurvey, out: str) -> dict[str, Any]:
    """Write ``survey`` under ``out`` (tiles/, catalog.parquet, truth.parquet, survey.json).

    A finished survey (``survey.json`` present with the same settings) is not drawn again.
    Returns the description written to ``survey.json``.
    """
    root = out.rstrip("/") if "://" in out else os.path.abspath(out)
    fs, path = fsspec.core.url_to_fs(root + "/survey.json")
    if fs.exists(path):
        done = json.loads(fs.cat_file(path))
        if done.get("survey") == json.loads(json.dumps(survey.to_dict())):
            return done
    fs.makedirs(fsspec.core.url_to_fs(root + "/tiles")[1], exist_ok=True)
    rng = np.random.default_rng([survey.seed, 1])
    # Lenses and look-alikes, dealt round-robin to the tiles.
    specials: list[_Object] = [_lens(rng, survey.pixel_scale_arcsec) for _ in range(survey.n_lenses)]
    for family in LOOKALIKE_FAMILIES:
        specials += [_lookalike(family, rng) for _ in range(survey.n_per_family)]
    order = rng.permutation(len(specials))
    rows = []
    tiles = [f"s{survey.seed}t{k:02d}" for k in range(survey.n_tiles)]
    for k, tile in enumerate(tiles):
        tile_rng = np.random.default_rng([survey.seed, 3, k])
        mine = [specials[i] for i in order[k::survey.n_tiles]]
        objects = _tile_objects(survey, k, tile_rng, mine)
        images, conditions = render_tile(survey, k, objects)
        wcs = tile_wcs(survey, k)
        for b in BANDS:
            hdu = fits.PrimaryHDU(images[b], _header(survey, wcs, tile, b, conditions[b]))
            buffer = io.BytesIO()
            hdu.writeto(buffer)
            _write(f"{root}/tiles/{tile}_{b}.fits", buffer.getvalue())
        cat = [o for o in objects if o.catalogued and 8 <= o.x < survey.size_pix - 8
               and 8 <= o.y < survey.size_pix - 8]
        ra, dec = wcs.all_pix2world([o.x for o in cat], [o.y for o in cat], 0)
        for o, a, d in zip(cat, ra, dec):
            kind = o.kind
            if kind == "star" and o.stars[0][2]["r"] < 17.5:
                kind = "saturated_star"
            rows.append({"ra": float(a), "dec": float(d), "kind": kind, "tile": tile,
                         "mag_r": o.mag_r, "theta_e_arcsec": o.theta_e_arcsec})
        logger.info("suite %s: tile %s drawn (%d objects, %d catalogued)", survey.name, tile,
                    len(objects), len(cat))
    truth = pd.DataFrame(rows)
    truth.insert(0, "objid", np.random.default_rng([survey.seed, 5]).permutation(len(truth)) + 1)
    truth["is_lens"] = truth["kind"] == "lens"
    truth["is_lookalike"] = truth["kind"].isin(LOOKALIKE_FAMILIES)
    truth["held_out_family"] = truth["kind"].isin(HELD_OUT_FAMILIES)
    truth = truth.sort_values("objid").reset_index(drop=True)
    for name, frame in (("catalog", truth[["objid", "ra", "dec"]]), ("truth", truth)):
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        _write(f"{root}/{name}.parquet", buffer.getvalue())
    description = {"survey": survey.to_dict(), "tiles_url": f"{root}/tiles",
                   "tile_pattern": "{tile}_{band}.fits", "tiles": tiles, "bands": list(BANDS),
                   "catalog_url": f"{root}/catalog.parquet", "truth_url": f"{root}/truth.parquet",
                   "counts": truth["kind"].value_counts().to_dict()}
    _write(f"{root}/survey.json", json.dumps(description, indent=2).encode())
    return description
