"""Simulated strong lenses painted into real deflector stamps, batched on the accelerator.

Few real lenses are known, so positives are made by ray-tracing a simulated background source
through an SIE + external shear mass centred on a real survey galaxy and adding the lensed light to
that galaxy's raw stamp (counts, sky-subtracted, as ``scanner.cutouts.cut_stamps`` cut it). Only
then is the stamp normalised, by the scan's own ``scanner.normalise.normalise``, so an injected
stamp and a real one go through identical code.

The lensing is caustics' (``caustics.func``: the SIE and shear deflections, the Sersic profile):
its functional API broadcasts over a batch dimension, so one call ray-traces every stamp of a batch
on the GPU. Sources are a Sersic plus compact star-forming clumps with power-law SEDs bluer than
the red deflectors; each band's light is convolved with a PSF drawn around that band's header
(``training.conditions``: Moffat or double-Gaussian core, wing, ellipticity, seeing scatter), gets
its own photon noise and goes into counts through that band's zero point, jittered. Lenses failing the magnification or arc S/N
cut are redrawn (batched, only the failures) so the model is not taught invisible lenses.

Example
-------
>>> import torch
>>> from training.bands import BandMeta
>>> raw = torch.zeros(4, 3, 64, 64)
>>> meta = BandMeta.constant(4, ("g", "r", "i"), sky_sigma=1.0, gain=10.0)
>>> lensed, params = inject_lenses(raw, meta, InjectionConfig(), torch.Generator().manual_seed(0))
>>> lensed.shape, params["einstein_radius_arcsec"].shape
(torch.Size([4, 3, 64, 64]), torch.Size([4]))
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from training.bands import BandMeta, magnitude_to_counts, sed_magnitudes
from training.conditions import ConditionsConfig, draw_conditions
from training.render import (caustics_func, chunks, convolve, detection_snr, draw_until_accepted,
                             gaussian_unit_flux, integrate_pixels, light_position_angle,
                             photon_noise, sersic_unit_flux, stamp_grid, uniform)

logger = logging.getLogger(__name__)

#: SIE core radius (arcsec): keeps the deflection finite where a ray hits the centre exactly;
#: far below a pixel, so the images are those of a singular isothermal ellipsoid.
SIE_CORE_ARCSEC = 1e-4

Params = dict[str, torch.Tensor]


def _check_range(name: str, value: tuple[float, float], low: float = -math.inf,
                 high: float = math.inf) -> None:
    lo, hi = value
    if not (low <= lo <= hi <= high):
        raise ValueError(f"InjectionConfig.{name}={value}: expected {low} <= low <= high <= {high}")


@dataclass(frozen=True)
class InjectionConfig:
    """The simulated lens population, its sources and the detectability cuts.

    Ranges are drawn uniformly (``(low, high)``; equal ends fix a value). The defaults describe
    galaxy-scale lenses a ground-based survey (about 1" seeing, depth r ~ 25) can see.

    Parameters
    ----------
    einstein_radius_arcsec : (float, float)
        SIE Einstein radius; (0.8, 3.0): below ~0.8" ground-based seeing hides the arcs, above
        3" galaxy-scale lenses are rare.
    axis_ratio : (float, float)
        SIE mass axis ratio q (0.5, 0.95), as for early-type galaxies.
    align_mass_with_light : bool
        Orient the mass along the deflector's measured light (its Gaussian-weighted moments), as
        real lenses' mass follows their light; False draws the orientation uniformly.
    misalignment_sigma_deg : float
        Scatter (degrees, Gaussian) of mass orientation around the light's; 10 as observed.
    shear : (float, float)
        External shear magnitude (0, 0.1); its angle is uniform.
    reference_band : str
        Band that ``source_magnitude`` refers to; the other bands follow from the SED slope.
    source_magnitude : (float, float)
        Unlensed AB magnitude of the whole source (Sersic plus clumps) in ``reference_band``.
    source_half_light_radius_arcsec : (float, float)
        Circularised half-light radius of the source's Sersic component.
    source_sersic_index : (float, float)
        Sersic index n of the source; 0.5-2 for star-forming galaxies at z ~ 1-3.
    source_axis_ratio : (float, float)
        Axis ratio of the source's light.
    source_offset_theta_e : float
        Source positions are uniform over a disk of this radius times the Einstein radius, around
        the lens axis: inside it the source is strongly lensed into arcs, rings or multiple images.
    source_sed_slope : (float, float)
        SED power law ``f_nu ~ lambda^slope`` of the source: 0 is flat (zero colours); 2 gives
        g-r = 0.59, still bluer than any early-type deflector (g-r > 1).
    max_clumps : int
        Star-forming clumps per source, drawn from 0 to ``max_clumps``.
    clump_flux_fraction : (float, float)
        Share of the source's reference-band flux in each clump.
    clump_half_light_radius_arcsec : (float, float)
        Clump sizes: compact (unresolved after the PSF) like giant HII regions; circular
        Gaussians.
    clump_sed_offset : float
        Clump SED slope minus the source's: negative is bluer (young stars).
    min_magnification : float
        Lenses whose source's Sersic component is magnified less are redrawn; 3 with the disk
        above keeps strongly lensed configurations (Collett 2015's mu_tot > 3).
    min_arc_snr : float
        Lenses whose arcs have a lower detection S/N (``training.render.detection_snr``, bands
        in quadrature) are redrawn; 20, as Collett (2015) found needed to recognise arcs.
    max_draws : int
        Redraws per stamp before giving up; a stamp that never passes keeps its last draw and is
        marked ``passed_cuts = False`` in the returned parameters.
    supersample : int
        Rays per pixel side: 3 integrates arcs thinner than a pixel well enough once the PSF
        (> 3 pixels FWHM) has blurred them (the cross-check test compares with 5).
    conditions : ConditionsConfig
        The PSF (family, index, wing, ellipticity, seeing) and zero point each stamp and band's
        arcs are painted with, drawn around the header's (``training.conditions``); look-alikes
        draw theirs from the same defaults. ``ConditionsConfig.header()`` paints with the
        header's Moffat and zero point.
    """

    einstein_radius_arcsec: tuple[float, float] = (0.8, 3.0)
    axis_ratio: tuple[float, float] = (0.5, 0.95)
    align_mass_with_light: bool = True
    misalignment_sigma_deg: float = 10.0
    shear: tuple[float, float] = (0.0, 0.1)
    reference_band: str = "r"
    source_magnitude: tuple[float, float] = (21.0, 24.5)
    source_half_light_radius_arcsec: tuple[float, float] = (0.1, 0.6)
    source_sersic_index: tuple[float, float] = (0.5, 2.0)
    source_axis_ratio: tuple[float, float] = (0.4, 1.0)
    source_offset_theta_e: float = 0.8
    source_sed_slope: tuple[float, float] = (-0.5, 2.0)
    max_clumps: int = 3
    clump_flux_fraction: tuple[float, float] = (0.05, 0.2)
    clump_half_light_radius_arcsec: tuple[float, float] = (0.05, 0.15)
    clump_sed_offset: float = -1.0
    min_magnification: float = 3.0
    min_arc_snr: float = 20.0
    max_draws: int = 10
    supersample: int = 3
    conditions: ConditionsConfig = field(default_factory=ConditionsConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        object.__setattr__(self, "conditions",
                           ConditionsConfig.coerce(self.conditions, "InjectionConfig.conditions"))
        _check_range("einstein_radius_arcsec", self.einstein_radius_arcsec, 1e-6)
        _check_range("axis_ratio", self.axis_ratio, 0.05, 1.0)
        _check_range("shear", self.shear, 0.0, 0.5)
        _check_range("source_magnitude", self.source_magnitude)
        _check_range("source_half_light_radius_arcsec", self.source_half_light_radius_arcsec, 1e-3)
        _check_range("source_sersic_index", self.source_sersic_index, 0.3, 8.0)
        _check_range("source_axis_ratio", self.source_axis_ratio, 0.05, 1.0)
        _check_range("source_sed_slope", self.source_sed_slope)
        _check_range("clump_flux_fraction", self.clump_flux_fraction, 0.0, 1.0)
        _check_range("clump_half_light_radius_arcsec", self.clump_half_light_radius_arcsec, 1e-3)
        if self.max_clumps < 0 or self.max_clumps * self.clump_flux_fraction[1] >= 1.0:
            raise ValueError(f"InjectionConfig.max_clumps={self.max_clumps} with clump_flux_fraction"
                             f"={self.clump_flux_fraction}: clumps must leave the Sersic some flux")
        if self.source_offset_theta_e < 0:
            raise ValueError("InjectionConfig.source_offset_theta_e must be >= 0")
        if self.max_draws < 1 or self.supersample < 1:
            raise ValueError("InjectionConfig.max_draws and supersample must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        d["conditions"] = self.conditions.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InjectionConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown InjectionConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**d)


def draw_lens_params(n: int, config: InjectionConfig, generator: torch.Generator | None,
                     device: torch.device, light_angle: torch.Tensor | None = None) -> Params:
    """Random SIE + shear masses and clumpy Sersic sources for ``n`` stamps, as (N,) tensors.

    ``light_angle`` (N,) orients the masses when ``config.align_mass_with_light``. Clump tensors
    are (N, max_clumps); absent clumps have zero flux.
    """
    c = config

    def u(r: tuple[float, float]) -> torch.Tensor:
        return uniform(r[0], r[1], n, generator, device)

    def per_clump(r: tuple[float, float]) -> torch.Tensor:
        return r[0] + (r[1] - r[0]) * torch.rand(n, c.max_clumps, generator=generator, device=device)

    theta_e = u(c.einstein_radius_arcsec)
    angle = u((0.0, math.pi))
    if c.align_mass_with_light and light_angle is not None:
        scatter = torch.randn(n, generator=generator, device=device)
        aligned = light_angle + math.radians(c.misalignment_sigma_deg) * scatter
        # A stamp without measurable light (all noise) keeps a random orientation.
        angle = torch.where(torch.isfinite(aligned), aligned, angle)
    shear = u(c.shear)
    shear_angle = u((0.0, math.pi))
    offset = c.source_offset_theta_e * theta_e * torch.sqrt(u((0.0, 1.0)))
    offset_angle = u((0.0, 2 * math.pi))
    source_re = u(c.source_half_light_radius_arcsec)
    source_x = offset * torch.cos(offset_angle)
    source_y = offset * torch.sin(offset_angle)
    k = c.max_clumps
    n_clumps = torch.randint(0, k + 1, (n,), generator=generator, device=device)
    active = torch.arange(k, device=device)[None, :] < n_clumps[:, None]
    fraction = per_clump(c.clump_flux_fraction)
    # Clumps scatter about one source radius around its centre, as in star-forming galaxies.
    clump_dx = torch.randn(n, k, generator=generator, device=device) * source_re[:, None]
    clump_dy = torch.randn(n, k, generator=generator, device=device) * source_re[:, None]
    clump_re = per_clump(c.clump_half_light_radius_arcsec)
    return {
        "einstein_radius_arcsec": theta_e,
        "axis_ratio": u(c.axis_ratio),
        "angle": torch.remainder(angle, math.pi),
        "shear_gamma1": shear * torch.cos(2 * shear_angle),
        "shear_gamma2": shear * torch.sin(2 * shear_angle),
        "source_x_arcsec": source_x,
        "source_y_arcsec": source_y,
        "source_magnitude": u(c.source_magnitude),
        "source_half_light_radius_arcsec": source_re,
        "source_sersic_index": u(c.source_sersic_index),
        "source_axis_ratio": u(c.source_axis_ratio),
        "source_angle": u((0.0, math.pi)),
        "source_sed_slope": u(c.source_sed_slope),
        "clump_flux_fraction": fraction * active,
        "clump_x_arcsec": source_x[:, None] + clump_dx,
        "clump_y_arcsec": source_y[:, None] + clump_dy,
        "clump_half_light_radius_arcsec": clump_re,
    }


def ray_trace(params: Params, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Source-plane positions (N, H, W) of image-plane rays through the SIE + shear of each stamp."""
    def b(t: torch.Tensor) -> torch.Tensor:
        return t[:, None, None]

    zero = torch.zeros_like(b(params["einstein_radius_arcsec"]))
    ax, ay = caustics_func.reduced_deflection_angle_sie(
        zero, zero, b(params["axis_ratio"]), b(params["angle"]),
        b(params["einstein_radius_arcsec"]), x, y, SIE_CORE_ARCSEC)
    sx, sy = caustics_func.reduced_deflection_angle_external_shear(
        zero, zero, b(params["shear_gamma1"]), b(params["shear_gamma2"]), x, y)
    return x - ax - sx, y - ay - sy


def lensed_unit_images(params: Params, meta: BandMeta, size: int, supersample: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lensed light per pixel before the PSF, for unit unlensed flux of each component.

    Returns the Sersic component (N, S, S) and each clump (N, K, S, S); summing an image gives
    that component's magnification.
    """
    x, y = stamp_grid(size, supersample, meta)
    bx, by = ray_trace(params, x, y)
    main = sersic_unit_flux(bx, by, params["source_x_arcsec"], params["source_y_arcsec"],
                            params["source_axis_ratio"], params["source_angle"],
                            params["source_sersic_index"], params["source_half_light_radius_arcsec"])
    main = integrate_pixels(main, supersample, meta.pixel_scale_arcsec)
    n, k = params["clump_flux_fraction"].shape
    clumps = main.new_zeros(n, k, size, size)
    for j in range(k):  # a loop over clump slots; each step is one batched op over the stamps
        has = torch.nonzero(params["clump_flux_fraction"][:, j] > 0).squeeze(1)
        if has.numel() == 0:
            continue
        sb = gaussian_unit_flux(bx[has], by[has], params["clump_x_arcsec"][has, j],
                                params["clump_y_arcsec"][has, j],
                                params["clump_half_light_radius_arcsec"][has, j])
        clumps[has, j] = integrate_pixels(sb, supersample, meta.pixel_scale_arcsec[has])
    return main, clumps


def source_band_counts(params: Params, meta: BandMeta, reference_band: str, clump_sed_offset: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unlensed counts per band of the Sersic component (N, C) and of each clump (N, K, C)."""
    if reference_band not in meta.bands:
        raise ValueError(f"InjectionConfig.reference_band={reference_band!r} is not among the "
                         f"stamps' bands {meta.bands}; set it to one of them")
    fraction = params["clump_flux_fraction"]
    reference = params["source_magnitude"]
    main_mag = sed_magnitudes(reference, params["source_sed_slope"], meta.bands, reference_band)
    clump_mag = sed_magnitudes(reference, params["source_sed_slope"] + clump_sed_offset, meta.bands,
                               reference_band)
    main = magnitude_to_counts(main_mag, meta.magzero) * (1.0 - fraction.sum(dim=1))[:, None]
    clumps = magnitude_to_counts(clump_mag, meta.magzero)[:, None, :] * fraction[:, :, None]
    return main, clumps


def render_arcs(params: Params, meta: BandMeta, size: int, config: InjectionConfig,
                kernels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise-free lensed light (N, C, S, S) in counts, PSF-convolved, and the magnification (N,).

    ``kernels`` (N, C, K, K) are the stamps' PSFs (``training.conditions.draw_conditions``).
    Rendered in chunks of stamps sized for the device (``training.render.chunks``).
    """
    device = meta.pixel_scale_arcsec.device
    main_counts, clump_counts = source_band_counts(params, meta, config.reference_band,
                                                   config.clump_sed_offset)
    arcs, magnification = [], []
    for part in chunks(len(meta), (size * config.supersample) ** 2, device):
        sub = {k: v[part] for k, v in params.items()}
        sub_meta = meta[part]
        main_unit, clump_unit = lensed_unit_images(sub, sub_meta, size, config.supersample)
        light = main_counts[part, :, None, None] * main_unit[:, None]
        light = light + torch.einsum("nkc,nkhw->nchw", clump_counts[part], clump_unit)
        arcs.append(convolve(light, kernels[part]))
        magnification.append(main_unit.sum(dim=(-2, -1)))
    return torch.cat(arcs), torch.cat(magnification)


def inject_lenses(raw_deflectors: torch.Tensor, meta: BandMeta, config: InjectionConfig,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, Params]:
    """Raw stamps (N, C, S, S) with a simulated lensed source added around each deflector.

    Parameters
    ----------
    raw_deflectors : (N, C, S, S) tensor
        Raw stamps (counts, sky-subtracted) of deflector galaxies, bands in ``meta.bands`` order,
        as ``scanner.cutouts.cut_stamps`` cuts them; NaN (missing) pixels stay NaN.
    meta : BandMeta
        Each stamp's zero points, PSFs, noise, gain and pixel scale.
    config : InjectionConfig
        The lens and source population and the cuts.
    generator : torch.Generator, optional
        On the stamps' device; the same seed, stamps and config give the same lenses.

    Returns
    -------
    lensed : (N, C, S, S) tensor
        ``raw + arcs + photon noise of the arcs``, to be normalised with
        ``scanner.normalise.normalise`` like any stamp.
    params : dict of tensors
        The lens and source parameters (see :func:`draw_lens_params`) and ``magnification``
        (N,), ``arc_snr`` (N,), ``passed_cuts`` (N,) bool, ``draws`` (N,) int, ``magzero`` and
        ``psf_fwhm_arcsec`` (N, C), the drawn zero points and seeing the arcs were painted with
        (``training.conditions``), ``source_mag``
        (N, C) unlensed AB magnitudes per band, ``arc_mag`` (N, C) AB magnitudes of the injected
        light, and ``arcs`` (N, C, S, S), the noise-free injected light in counts.
    """
    if raw_deflectors.dim() != 4 or raw_deflectors.shape[1] != len(meta.bands):
        raise ValueError(f"raw_deflectors has shape {tuple(raw_deflectors.shape)}; expected "
                         f"(N, {len(meta.bands)}, S, S) for bands {meta.bands}")
    if raw_deflectors.shape[0] != len(meta):
        raise ValueError(f"{raw_deflectors.shape[0]} stamps but band metadata for {len(meta)}")
    device = raw_deflectors.device
    raw = raw_deflectors.to(torch.float32)
    meta = meta.to(device)
    n, _, size, _ = raw.shape
    light_angle = light_position_angle(raw, meta)[0] if config.align_mass_with_light else None
    observed, kernels = draw_conditions(meta, config.conditions, size, generator)
    magnification = raw.new_zeros(n)
    snr = raw.new_zeros(n)

    def draw(index: torch.Tensor) -> Params:
        angle = None if light_angle is None else light_angle[index]
        return draw_lens_params(index.numel(), config, generator, device, angle)

    def render(sub: Params, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sub_meta = observed[index]
        arcs, mu = render_arcs(sub, sub_meta, size, config, kernels[index])
        magnification[index] = mu
        snr[index] = detection_snr(arcs, sub_meta)
        return arcs, (mu >= config.min_magnification) & (snr[index] >= config.min_arc_snr)

    params, arcs, passed, draws = draw_until_accepted(n, device, config.max_draws, draw, render)
    if not passed.all():
        logger.debug("%d of %d lenses failed the cuts after %d draws", int((~passed).sum()), n,
                     config.max_draws)
    lensed = raw + arcs + photon_noise(arcs, meta.gain, generator)
    main_counts, clump_counts = source_band_counts(params, observed, config.reference_band,
                                                   config.clump_sed_offset)
    unlensed = main_counts + clump_counts.sum(dim=1)
    params.update({
        "magnification": magnification,
        "arc_snr": snr,
        "passed_cuts": passed,
        "draws": draws,
        "magzero": observed.magzero,
        "psf_fwhm_arcsec": observed.psf_fwhm_arcsec,
        "source_mag": observed.magzero - 2.5 * torch.log10(unlensed),
        "arc_mag": observed.magzero - 2.5 * torch.log10(arcs.sum(dim=(-2, -1)).clamp(min=1e-30)),
        "arcs": arcs,
    })
    return lensed, params
