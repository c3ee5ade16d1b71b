"""Look-alike negatives: real deflector stamps with blue structure that is not lensed.

A classifier trained only on "arcs around red galaxies" against "red galaxies" learns that any blue
light near a red galaxy means a lens. The searches of the best surveys found they had to show their
models the look-alikes that fool people too; the original research code had none. Three kinds are
painted into real deflector stamps, with the same PSF, photon noise and zero points as the lenses:

- ``companion``: an unlensed blue galaxy at an arc-like separation, often elongated tangentially
  like an arc, but single: no counter-image, no curvature around the deflector.
- ``ring``: a blue star-forming ring (collisional or resonance ring) with knots; its ellipticity and
  width follow the disk, not a lens potential.
- ``spiral``: blue logarithmic spiral arms around the red bulge.

The mock survey draws only bulge + disk galaxies and cannot make rings or spirals, so they are
painted here. Each look-alike is labelled a non-lens; ``training.stream`` mixes them in at a chosen
rate.

Example
-------
>>> import torch
>>> from training.bands import BandMeta
>>> raw = torch.zeros(6, 3, 64, 64)
>>> meta = BandMeta.constant(6, ("g", "r", "i"), sky_sigma=1.0, gain=10.0)
>>> stamps, params = paint_lookalikes(raw, meta, LookalikeConfig(), torch.Generator().manual_seed(0))
>>> sorted(set(LOOKALIKE_KINDS[k] for k in params["kind"].tolist())) <= list(LOOKALIKE_KINDS)
True
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from training.bands import BandMeta, magnitude_to_counts, sed_magnitudes
from training.render import (chunks, convolve, detection_snr, draw_until_accepted,
                             integrate_pixels,
                             moffat_kernels, photon_noise, psf_half_pix, sersic_unit_flux,
                             stamp_grid, uniform)

#: Look-alike kinds, in the order of their integer codes in ``params["kind"]``.
LOOKALIKE_KINDS = ("companion", "ring", "spiral")

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LookalikeConfig:
    """Which look-alikes to paint and how; ranges are drawn uniformly.

    Parameters
    ----------
    kind_weights : (float, float, float)
        Relative rates of ``companion``, ``ring`` and ``spiral``; 0 switches a kind off.
    reference_band : str
        Band that ``magnitude`` refers to.
    companion_magnitude, ring_magnitude, spiral_magnitude : (float, float)
        AB magnitude of the painted light in ``reference_band``: companions as bright as magnified
        arcs, so brightness does not tell them apart; rings and spiral arms brighter, as they
        spread their light over a larger area (and a spiral disk rivals its bulge).
    sed_slope : (float, float)
        ``f_nu ~ lambda^slope`` as for lensed sources: as blue as arcs, so colour does not either.
    separation_arcsec : (float, float)
        Companion distance from the deflector: the Einstein radii of injected lenses.
    companion_half_light_radius_arcsec, companion_sersic_index, companion_axis_ratio
        Companion shape; axis ratios down to 0.2 make arc-like slivers.
    tangential_fraction : float
        Share of companions whose long axis is tangential to the deflector, like an arc.
    ring_radius_arcsec : (float, float)
        Ring semi-major axis: Einstein-ring sizes.
    ring_width_fraction : (float, float)
        Ring Gaussian width as a fraction of its radius.
    ring_axis_ratio : (float, float)
        Ring inclination (axis ratio).
    ring_knots : int
        Star-forming knots on each ring, 0 to ``ring_knots``.
    spiral_scale_radius_arcsec : (float, float)
        Exponential scale length of the spiral arms.
    spiral_pitch_deg : (float, float)
        Pitch angle of the logarithmic arms (10-30 degrees for Sa-Sc spirals).
    spiral_axis_ratio : (float, float)
        Disk inclination (axis ratio).
    min_snr : float
        Look-alikes fainter than this detection S/N (``training.render.detection_snr``) are
        redrawn: the same cut as injected arcs, so visibility does not tell them apart.
    max_draws : int
        Redraws per stamp; one that never passes keeps its last draw (``passed_cuts`` False).
    supersample : int
        Sub-pixels per pixel side.
    """

    kind_weights: tuple[float, float, float] = (0.5, 0.25, 0.25)
    reference_band: str = "r"
    companion_magnitude: tuple[float, float] = (20.0, 23.0)
    ring_magnitude: tuple[float, float] = (19.0, 21.5)
    spiral_magnitude: tuple[float, float] = (18.5, 21.0)
    sed_slope: tuple[float, float] = (-0.5, 2.0)
    separation_arcsec: tuple[float, float] = (0.8, 3.5)
    companion_half_light_radius_arcsec: tuple[float, float] = (0.15, 0.6)
    companion_sersic_index: tuple[float, float] = (0.5, 2.0)
    companion_axis_ratio: tuple[float, float] = (0.2, 0.8)
    tangential_fraction: float = 0.5
    ring_radius_arcsec: tuple[float, float] = (0.8, 3.0)
    ring_width_fraction: tuple[float, float] = (0.1, 0.3)
    ring_axis_ratio: tuple[float, float] = (0.5, 1.0)
    ring_knots: int = 5
    spiral_scale_radius_arcsec: tuple[float, float] = (0.6, 1.8)
    spiral_pitch_deg: tuple[float, float] = (10.0, 30.0)
    spiral_axis_ratio: tuple[float, float] = (0.4, 1.0)
    min_snr: float = 20.0
    max_draws: int = 10
    supersample: int = 3

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            value = getattr(self, f.name)
            if isinstance(value, tuple) and f.name != "kind_weights" and not value[0] <= value[1]:
                raise ValueError(f"LookalikeConfig.{f.name}={value}: expected low <= high")
        if len(self.kind_weights) != len(LOOKALIKE_KINDS) or min(self.kind_weights) < 0 \
                or sum(self.kind_weights) <= 0:
            raise ValueError(f"LookalikeConfig.kind_weights={self.kind_weights}: give "
                             f"{len(LOOKALIKE_KINDS)} non-negative weights for {LOOKALIKE_KINDS}, "
                             f"not all zero")
        if self.max_draws < 1 or self.supersample < 1 or self.ring_knots < 0:
            raise ValueError("LookalikeConfig.max_draws and supersample must be >= 1, "
                             "ring_knots >= 0")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def draw_lookalike_params(n: int, config: LookalikeConfig, generator: torch.Generator | None,
                          device: torch.device) -> Params:
    """Random look-alike parameters for ``n`` stamps; every kind's parameters are drawn for all."""
    c = config

    def u(r: tuple[float, float]) -> torch.Tensor:
        return uniform(r[0], r[1], n, generator, device)

    weights = torch.tensor(c.kind_weights, dtype=torch.float32, device=device)
    kind = torch.multinomial(weights, n, replacement=True, generator=generator)
    position_angle = u((0.0, 2 * math.pi))
    tangential = torch.rand(n, generator=generator, device=device) < c.tangential_fraction
    k = max(c.ring_knots, 1)
    knots = torch.randint(0, c.ring_knots + 1, (n,), generator=generator, device=device)
    return {
        "kind": kind,
        "magnitude": torch.stack([u(c.companion_magnitude), u(c.ring_magnitude),
                                  u(c.spiral_magnitude)]).gather(0, kind[None]).squeeze(0),
        "sed_slope": u(c.sed_slope),
        "position_angle": position_angle,
        "separation_arcsec": u(c.separation_arcsec),
        "half_light_radius_arcsec": u(c.companion_half_light_radius_arcsec),
        "sersic_index": u(c.companion_sersic_index),
        "axis_ratio": u(c.companion_axis_ratio),
        "angle": torch.where(tangential, position_angle + math.pi / 2, u((0.0, math.pi))),
        "ring_radius_arcsec": u(c.ring_radius_arcsec),
        "ring_width_fraction": u(c.ring_width_fraction),
        "disk_axis_ratio": torch.where(kind == 1, u(c.ring_axis_ratio), u(c.spiral_axis_ratio)),
        "disk_angle": u((0.0, math.pi)),
        "knot_angles": 2 * math.pi * torch.rand(n, k, generator=generator, device=device),
        "knot_active": torch.arange(k, device=device)[None, :] < knots[:, None],
        "spiral_scale_radius_arcsec": u(c.spiral_scale_radius_arcsec),
        "spiral_pitch_deg": u(c.spiral_pitch_deg),
        "spiral_phase": u((0.0, 2 * math.pi)),
    }


def _disk_frame(x: torch.Tensor, y: torch.Tensor, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Radius and azimuth in an inclined disk's own plane."""
    angle = p["disk_angle"][:, None, None]
    q = p["disk_axis_ratio"][:, None, None]
    u = x * torch.cos(angle) + y * torch.sin(angle)
    v = (-x * torch.sin(angle) + y * torch.cos(angle)) / q
    return torch.sqrt(u**2 + v**2), torch.atan2(v, u)


def _ring(x: torch.Tensor, y: torch.Tensor, p: Params) -> torch.Tensor:
    radius = p["ring_radius_arcsec"][:, None, None]
    width = radius * p["ring_width_fraction"][:, None, None]
    r, phi = _disk_frame(x, y, p)
    light = torch.exp(-0.5 * ((r - radius) / width) ** 2)
    for j in range(p["knot_angles"].shape[1]):  # knot slots, each a batched op
        dphi = torch.remainder(phi - p["knot_angles"][:, j, None, None] + math.pi, 2 * math.pi) - math.pi
        knot = torch.exp(-0.5 * ((r - radius) / width) ** 2 - 0.5 * (dphi * radius / width) ** 2)
        light = light + 3.0 * knot * p["knot_active"][:, j, None, None]
    return light


def _spiral(x: torch.Tensor, y: torch.Tensor, p: Params) -> torch.Tensor:
    scale = p["spiral_scale_radius_arcsec"][:, None, None]
    pitch = torch.deg2rad(p["spiral_pitch_deg"])[:, None, None]
    r, phi = _disk_frame(x, y, p)
    r = r.clamp(min=1e-3)
    # Two trailing logarithmic arms, sharpened, on a faint exponential disk with a central hole
    # where the deflector's bulge is.
    arm_phase = 2 * (phi - torch.log(r / scale) / torch.tan(pitch)) + p["spiral_phase"][:, None, None]
    arms = (0.5 * (1 + torch.cos(arm_phase))) ** 4 + 0.2
    return arms * torch.exp(-r / scale) * (1 - torch.exp(-(r / (0.7 * scale)) ** 2))


def lookalike_unit_images(params: Params, meta: BandMeta, size: int, supersample: int
                          ) -> torch.Tensor:
    """Look-alike light per pixel (N, S, S) before the PSF, each summing to 1."""
    x, y = stamp_grid(size, supersample, meta)
    n = len(meta)
    images = x.new_zeros(n, size, size)
    kind = params["kind"]
    for code, name in enumerate(LOOKALIKE_KINDS):  # one batched render per kind
        index = torch.nonzero(kind == code).squeeze(1)
        if index.numel() == 0:
            continue
        p = {k: v[index] for k, v in params.items()}
        xs, ys = x[index], y[index]
        if name == "companion":
            sep, pa = p["separation_arcsec"], p["position_angle"]
            sb = sersic_unit_flux(xs, ys, sep * torch.cos(pa), sep * torch.sin(pa), p["axis_ratio"],
                                  p["angle"], p["sersic_index"], p["half_light_radius_arcsec"])
        else:
            sb = _ring(xs, ys, p) if name == "ring" else _spiral(xs, ys, p)
        pixels = integrate_pixels(sb, supersample, meta.pixel_scale_arcsec[index])
        images[index] = pixels / pixels.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-30)
    return images


def paint_lookalikes(raw: torch.Tensor, meta: BandMeta, config: LookalikeConfig,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, Params]:
    """Raw stamps (N, C, S, S) with unlensed look-alike structure added: labelled non-lenses.

    Same contract as ``training.inject.inject_lenses``: raw counts in, raw counts out (normalise
    afterwards with ``scanner.normalise.normalise``). ``params`` holds ``kind`` (codes into
    :data:`LOOKALIKE_KINDS`), the drawn shapes, ``snr``, ``passed_cuts``, ``draws`` and
    ``light`` (N, C, S, S), the noise-free painted light in counts.
    """
    if raw.dim() != 4 or raw.shape[1] != len(meta.bands) or raw.shape[0] != len(meta):
        raise ValueError(f"raw has shape {tuple(raw.shape)}; expected ({len(meta)}, "
                         f"{len(meta.bands)}, S, S) for bands {meta.bands}")
    if config.reference_band not in meta.bands:
        raise ValueError(f"LookalikeConfig.reference_band={config.reference_band!r} is not among "
                         f"the stamps' bands {meta.bands}; set it to one of them")
    device = raw.device
    raw = raw.to(torch.float32)
    meta = meta.to(device)
    n, _, size, _ = raw.shape
    snr = raw.new_zeros(n)

    def render(p: Params, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sub_meta = meta[index]
        unit = torch.cat([
            lookalike_unit_images({k: v[part] for k, v in p.items()}, sub_meta[part], size,
                                  config.supersample)
            for part in chunks(len(index), (size * config.supersample) ** 2, device)])
        mags = sed_magnitudes(p["magnitude"], p["sed_slope"], meta.bands, config.reference_band)
        counts = magnitude_to_counts(mags, sub_meta.magzero)
        light = convolve(counts[:, :, None, None] * unit[:, None],
                         moffat_kernels(sub_meta, psf_half_pix(sub_meta, size)))
        snr[index] = detection_snr(light, sub_meta)
        return light, snr[index] >= config.min_snr

    params, light, passed, draws = draw_until_accepted(
        n, device, config.max_draws,
        lambda index: draw_lookalike_params(index.numel(), config, generator, device), render)
    painted = raw + light + photon_noise(light, meta.gain, generator)
    params.update({"snr": snr, "passed_cuts": passed, "draws": draws, "light": light})
    return painted, params
