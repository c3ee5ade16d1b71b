"""Look-alike negatives: real deflector stamps with structure that is not lensed.

A classifier trained only on "arcs around red galaxies" against "red galaxies" learns that any blue
light near a red galaxy means a lens. The searches of the best surveys found they had to show their
models the look-alikes that fool people too; the original research code had none. These kinds are
painted into real deflector stamps, with PSFs and zero points drawn as for the lenses
(``training.conditions``), photon noise and the same S/N cut:

- ``companion``: an unlensed blue galaxy at an arc-like separation, often elongated tangentially
  like an arc, but single: no counter-image, no curvature around the deflector.
- ``ring``: a blue star-forming ring (collisional or resonance ring) with knots; its ellipticity and
  width follow the disk, not a lens potential.
- ``spiral``: blue logarithmic spiral arms around the red bulge.
- ``edge_on``: a thin inclined exponential disk through the centre, red or blue, sometimes split by
  a dust lane: a long thin streak, as an arc seen edge-on would be.
- ``clumpy``: an irregular blue galaxy of star-forming knots on a faint diffuse body, centred on or
  near the stamp's centre.
- ``blue_pair``: two or three small blue galaxies at arc-like separations, on one side of the
  deflector and at their own radii and orientations: a group, not a lens's counter-images.
- ``star``: a point source (the stamp's PSF) near the centre, faint to bright.
- ``star_blend``: a point source at an arc-like separation: a star next to a galaxy.
- ``saturated_star``: a bright star near the centre, clipped flat at a saturation level, with the
  clipped charge bled into a vertical trail and four diffraction spikes.

The mock survey draws only bulge + disk galaxies and cannot make these, so they are painted here.
Mergers with tidal tails and red arcs of cluster members are deliberately absent: the benchmark
holds them out to measure how training generalises to look-alikes it never showed. Each
look-alike is labelled a non-lens; ``training.stream`` mixes them in at a chosen rate.

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
from dataclasses import dataclass, field
from typing import Any

import torch

from training.bands import BandMeta, magnitude_to_counts, sed_magnitudes
from training.conditions import ConditionsConfig, draw_conditions
from training.render import (chunks, convolve, detection_snr, draw_until_accepted,
                             gaussian_unit_flux, integrate_pixels, photon_noise, sersic_unit_flux,
                             stamp_grid, uniform)

#: Look-alike kinds, in the order of their integer codes in ``params["kind"]``.
LOOKALIKE_KINDS = ("companion", "ring", "spiral", "edge_on", "clumpy", "blue_pair", "star",
                   "star_blend", "saturated_star")
#: Kinds coloured like stars (``star_sed_slope``), and like edge-on disks; the rest like arcs.
_STAR_KINDS = ("star", "star_blend", "saturated_star")
#: Knot slots of a clumpy galaxy and member slots of a blue pair (or triple).
_MAX_CLUMPY_KNOTS = 8
_MAX_PAIR_MEMBERS = 3
#: A point source's size before the PSF: the pixel's own response, about a third of a pixel.
_POINT_SIGMA_PIX = 0.35

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LookalikeConfig:
    """Which look-alikes to paint and how; ranges are drawn uniformly.

    Parameters
    ----------
    kind_weights : tuple of float
        Relative rates of the kinds in :data:`LOOKALIKE_KINDS` (``companion``, ``ring``,
        ``spiral``, ``edge_on``, ``clumpy``, ``blue_pair``, ``star``, ``star_blend``,
        ``saturated_star``); 0 switches a kind off. The defaults keep the first three at 40%.
    reference_band : str
        Band that the magnitudes refer to.
    companion_magnitude, ring_magnitude, spiral_magnitude : (float, float)
        AB magnitude of the painted light in ``reference_band``: companions as bright as magnified
        arcs, so brightness does not tell them apart; rings and spiral arms brighter, as they
        spread their light over a larger area (and a spiral disk rivals its bulge).
    edge_on_magnitude, clumpy_magnitude, blue_pair_magnitude : (float, float)
        The same for edge-on disks (as bright as the deflector), clumpy irregulars, and a blue
        pair's members together.
    star_magnitude, star_blend_magnitude, saturated_star_magnitude : (float, float)
        Stars: faint to bright near the centre; next to the galaxy; bright enough to saturate.
    sed_slope : (float, float)
        ``f_nu ~ lambda^slope`` as for lensed sources: as blue as arcs, so colour does not tell
        companions, rings, spirals, clumpy galaxies and blue pairs from arcs either.
    edge_on_sed_slope : (float, float)
        Edge-on disks are red (dusty, old) or blue (star-forming): (-0.5, 5) spans both
        (slope 5 is g-r ~ 1.5).
    star_sed_slope : (float, float)
        Stars from blue (hot, slope -1: g-r ~ -0.3) to red (M dwarfs, slope 5).
    separation_arcsec : (float, float)
        Companion, blue-pair member and star-blend distance from the deflector: the Einstein radii
        of injected lenses.
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
    centre_offset_arcsec : (float, float)
        Distance of an edge-on disk's or clumpy galaxy's centre from the deflector's.
    edge_on_scale_radius_arcsec : (float, float)
        Exponential scale length of an edge-on disk.
    edge_on_axis_ratio : (float, float)
        Its apparent thickness (minor over major scale): 0.08-0.25 is edge-on.
    dust_lane_fraction : float
        Share of edge-on disks split by a dust lane along their major axis.
    dust_lane_depth : (float, float)
        Share of the disk's light the lane absorbs at its middle.
    clumpy_radius_arcsec : (float, float)
        Spread (Gaussian sigma) of a clumpy galaxy's knots, and its diffuse body's scale length.
    clumpy_knots : (int, int)
        Knots per clumpy galaxy, at most 8.
    clumpy_knot_half_light_radius_arcsec : (float, float)
        Knot sizes (circular Gaussians).
    clumpy_diffuse_fraction : (float, float)
        Share of a clumpy galaxy's light in its diffuse body.
    blue_pair_members : (int, int)
        Galaxies in a blue pair (2) or triple (3).
    blue_pair_spread_deg : float
        Members sit within this many degrees either side of one position angle: on one side of
        the deflector, never at a lens's opposite-side image positions.
    blue_pair_half_light_radius_arcsec : (float, float)
        Member sizes (Sersic, index 0.5-1.5, axis ratio 0.4-1, random orientation).
    star_offset_arcsec : (float, float)
        A ``star``'s or ``saturated_star``'s distance from the deflector.
    saturation_peak_ratio : (float, float)
        A saturated star's unclipped peak over the saturation level, per band: the larger, the
        wider its flat top and the longer its bleed trail.
    bleed_width_pix : (int, int)
        Width of the bleed trail (pixel columns); its length holds the clipped charge.
    spike_flux_fraction : (float, float)
        Share of the saturated star's flux in its four diffraction spikes.
    min_snr : float
        Look-alikes fainter than this detection S/N (``training.render.detection_snr``) are
        redrawn: the same cut as injected arcs, so visibility does not tell them apart.
    max_draws : int
        Redraws per stamp; one that never passes keeps its last draw (``passed_cuts`` False).
    supersample : int
        Sub-pixels per pixel side.
    conditions : ConditionsConfig
        The PSF and zero point each stamp and band is painted with, drawn around the header's as
        for injected lenses (``training.conditions``).
    """

    kind_weights: tuple[float, ...] = (0.2, 0.1, 0.1, 0.12, 0.1, 0.1, 0.1, 0.1, 0.08)
    reference_band: str = "r"
    companion_magnitude: tuple[float, float] = (20.0, 23.0)
    ring_magnitude: tuple[float, float] = (19.0, 21.5)
    spiral_magnitude: tuple[float, float] = (18.5, 21.0)
    edge_on_magnitude: tuple[float, float] = (18.0, 21.0)
    clumpy_magnitude: tuple[float, float] = (19.0, 22.0)
    blue_pair_magnitude: tuple[float, float] = (19.5, 22.5)
    star_magnitude: tuple[float, float] = (16.0, 22.0)
    star_blend_magnitude: tuple[float, float] = (17.0, 22.5)
    saturated_star_magnitude: tuple[float, float] = (12.0, 15.5)
    sed_slope: tuple[float, float] = (-0.5, 2.0)
    edge_on_sed_slope: tuple[float, float] = (-0.5, 5.0)
    star_sed_slope: tuple[float, float] = (-1.0, 5.0)
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
    centre_offset_arcsec: tuple[float, float] = (0.0, 0.4)
    edge_on_scale_radius_arcsec: tuple[float, float] = (0.4, 1.5)
    edge_on_axis_ratio: tuple[float, float] = (0.08, 0.25)
    dust_lane_fraction: float = 0.4
    dust_lane_depth: tuple[float, float] = (0.4, 0.9)
    clumpy_radius_arcsec: tuple[float, float] = (0.3, 1.2)
    clumpy_knots: tuple[int, int] = (3, 8)
    clumpy_knot_half_light_radius_arcsec: tuple[float, float] = (0.05, 0.25)
    clumpy_diffuse_fraction: tuple[float, float] = (0.2, 0.5)
    blue_pair_members: tuple[int, int] = (2, 3)
    blue_pair_spread_deg: float = 50.0
    blue_pair_half_light_radius_arcsec: tuple[float, float] = (0.1, 0.4)
    star_offset_arcsec: tuple[float, float] = (0.0, 1.0)
    saturation_peak_ratio: tuple[float, float] = (3.0, 30.0)
    bleed_width_pix: tuple[int, int] = (1, 3)
    spike_flux_fraction: tuple[float, float] = (0.005, 0.03)
    min_snr: float = 20.0
    max_draws: int = 10
    supersample: int = 3
    conditions: ConditionsConfig = field(default_factory=ConditionsConfig)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
            value = getattr(self, f.name)
            if isinstance(value, tuple) and f.name != "kind_weights" and not value[0] <= value[1]:
                raise ValueError(f"LookalikeConfig.{f.name}={value}: expected low <= high")
        object.__setattr__(self, "conditions",
                           ConditionsConfig.coerce(self.conditions, "LookalikeConfig.conditions"))
        if len(self.kind_weights) != len(LOOKALIKE_KINDS) or min(self.kind_weights) < 0 \
                or sum(self.kind_weights) <= 0:
            raise ValueError(f"LookalikeConfig.kind_weights={self.kind_weights}: give "
                             f"{len(LOOKALIKE_KINDS)} non-negative weights for {LOOKALIKE_KINDS}, "
                             f"not all zero")
        if self.max_draws < 1 or self.supersample < 1 or self.ring_knots < 0:
            raise ValueError("LookalikeConfig.max_draws and supersample must be >= 1, "
                             "ring_knots >= 0")
        if not 1 <= self.clumpy_knots[0] <= self.clumpy_knots[1] <= _MAX_CLUMPY_KNOTS \
                or not 1 <= self.blue_pair_members[0] <= self.blue_pair_members[1] <= _MAX_PAIR_MEMBERS:
            raise ValueError(f"LookalikeConfig: clumpy_knots={self.clumpy_knots} within 1.."
                             f"{_MAX_CLUMPY_KNOTS}, blue_pair_members={self.blue_pair_members} "
                             f"within 1..{_MAX_PAIR_MEMBERS}")
        if self.saturation_peak_ratio[0] < 1 or self.bleed_width_pix[0] < 1:
            raise ValueError("LookalikeConfig: saturation_peak_ratio >= 1 (the star must reach "
                             "the level), bleed_width_pix >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
        d["conditions"] = self.conditions.to_dict()
        return d


def _by_kind(kind: torch.Tensor, values: dict[str, torch.Tensor], default: torch.Tensor
             ) -> torch.Tensor:
    """Per stamp, ``values[name]`` where its kind is ``name``, else ``default``."""
    out = default
    for name, value in values.items():
        out = torch.where(kind == LOOKALIKE_KINDS.index(name), value, out)
    return out


def draw_lookalike_params(n: int, config: LookalikeConfig, generator: torch.Generator | None,
                          device: torch.device) -> Params:
    """Random look-alike parameters for ``n`` stamps; every kind's parameters are drawn for all."""
    c = config

    def u(r: tuple[float, float]) -> torch.Tensor:
        return uniform(r[0], r[1], n, generator, device)

    def slots(k: int, r: tuple[float, float]) -> torch.Tensor:
        return r[0] + (r[1] - r[0]) * torch.rand(n, k, generator=generator, device=device)

    def count(r: tuple[int, int]) -> torch.Tensor:
        return torch.randint(r[0], r[1] + 1, (n,), generator=generator, device=device)

    weights = torch.tensor(c.kind_weights, dtype=torch.float32, device=device)
    kind = torch.multinomial(weights, n, replacement=True, generator=generator)
    position_angle = u((0.0, 2 * math.pi))
    tangential = torch.rand(n, generator=generator, device=device) < c.tangential_fraction
    k = max(c.ring_knots, 1)
    knots = torch.randint(0, c.ring_knots + 1, (n,), generator=generator, device=device)
    magnitude = _by_kind(kind, {name: u(getattr(c, f"{name}_magnitude"))
                                for name in LOOKALIKE_KINDS}, u(c.companion_magnitude))
    sed_slope = _by_kind(kind, {"edge_on": u(c.edge_on_sed_slope),
                                **{name: u(c.star_sed_slope) for name in _STAR_KINDS}},
                         u(c.sed_slope))
    separation = u(c.separation_arcsec)
    # Where the look-alike is centred: its own offset for centred kinds, the separation for a
    # star next to the galaxy.
    offset = _by_kind(kind, {"star": u(c.star_offset_arcsec),
                             "saturated_star": u(c.star_offset_arcsec),
                             "star_blend": separation}, u(c.centre_offset_arcsec))
    offset_angle = u((0.0, 2 * math.pi))
    disk_axis_ratio = _by_kind(kind, {"ring": u(c.ring_axis_ratio), "spiral": u(c.spiral_axis_ratio),
                                      "edge_on": u(c.edge_on_axis_ratio)}, u(c.spiral_axis_ratio))
    has_lane = torch.rand(n, generator=generator, device=device) < c.dust_lane_fraction
    n_clumpy = count(c.clumpy_knots)
    clumpy_radius = u(c.clumpy_radius_arcsec)
    n_members = count(c.blue_pair_members)
    spread = math.radians(c.blue_pair_spread_deg)
    member_angle = position_angle[:, None] + slots(_MAX_PAIR_MEMBERS, (-spread, spread))
    member_radius = slots(_MAX_PAIR_MEMBERS, c.separation_arcsec)
    return {
        "kind": kind,
        "magnitude": magnitude,
        "sed_slope": sed_slope,
        "position_angle": position_angle,
        "separation_arcsec": separation,
        "half_light_radius_arcsec": u(c.companion_half_light_radius_arcsec),
        "sersic_index": u(c.companion_sersic_index),
        "axis_ratio": u(c.companion_axis_ratio),
        "angle": torch.where(tangential, position_angle + math.pi / 2, u((0.0, math.pi))),
        "ring_radius_arcsec": u(c.ring_radius_arcsec),
        "ring_width_fraction": u(c.ring_width_fraction),
        "disk_axis_ratio": disk_axis_ratio,
        "disk_angle": u((0.0, math.pi)),
        "knot_angles": 2 * math.pi * torch.rand(n, k, generator=generator, device=device),
        "knot_active": torch.arange(k, device=device)[None, :] < knots[:, None],
        "spiral_scale_radius_arcsec": u(c.spiral_scale_radius_arcsec),
        "spiral_pitch_deg": u(c.spiral_pitch_deg),
        "spiral_phase": u((0.0, 2 * math.pi)),
        "centre_x_arcsec": offset * torch.cos(offset_angle),
        "centre_y_arcsec": offset * torch.sin(offset_angle),
        "edge_on_scale_radius_arcsec": u(c.edge_on_scale_radius_arcsec),
        "dust_lane_depth": u(c.dust_lane_depth) * has_lane,
        "clumpy_radius_arcsec": clumpy_radius,
        "clumpy_diffuse_fraction": u(c.clumpy_diffuse_fraction),
        "clumpy_knot_dx": torch.randn(n, _MAX_CLUMPY_KNOTS, generator=generator, device=device)
                          * clumpy_radius[:, None],
        "clumpy_knot_dy": torch.randn(n, _MAX_CLUMPY_KNOTS, generator=generator, device=device)
                          * clumpy_radius[:, None],
        "clumpy_knot_radius_arcsec": slots(_MAX_CLUMPY_KNOTS, c.clumpy_knot_half_light_radius_arcsec),
        "clumpy_knot_weight": slots(_MAX_CLUMPY_KNOTS, (0.2, 1.0))
                              * (torch.arange(_MAX_CLUMPY_KNOTS, device=device)[None, :]
                                 < n_clumpy[:, None]),
        "member_x_arcsec": member_radius * torch.cos(member_angle),
        "member_y_arcsec": member_radius * torch.sin(member_angle),
        "member_half_light_radius_arcsec": slots(_MAX_PAIR_MEMBERS,
                                                 c.blue_pair_half_light_radius_arcsec),
        "member_sersic_index": slots(_MAX_PAIR_MEMBERS, (0.5, 1.5)),
        "member_axis_ratio": slots(_MAX_PAIR_MEMBERS, (0.4, 1.0)),
        "member_angle": slots(_MAX_PAIR_MEMBERS, (0.0, math.pi)),
        "member_weight": slots(_MAX_PAIR_MEMBERS, (0.4, 1.0))
                         * (torch.arange(_MAX_PAIR_MEMBERS, device=device)[None, :]
                            < n_members[:, None]),
        "saturation_peak_ratio": u(c.saturation_peak_ratio)[:, None],
        "bleed_width_pix": count(c.bleed_width_pix).to(torch.float32),
        "spike_flux_fraction": u(c.spike_flux_fraction),
        "spike_angle": u((0.0, math.pi / 2)),
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


def _centred(x: torch.Tensor, y: torch.Tensor, p: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinates about the look-alike's own centre."""
    return x - p["centre_x_arcsec"][:, None, None], y - p["centre_y_arcsec"][:, None, None]


def _edge_on(x: torch.Tensor, y: torch.Tensor, p: Params) -> torch.Tensor:
    x, y = _centred(x, y, p)
    angle = p["disk_angle"][:, None, None]
    q = p["disk_axis_ratio"][:, None, None]
    scale = p["edge_on_scale_radius_arcsec"][:, None, None]
    along = x * torch.cos(angle) + y * torch.sin(angle)
    across = -x * torch.sin(angle) + y * torch.cos(angle)
    disk = torch.exp(-torch.sqrt(along**2 + (across / q) ** 2) / scale)
    # A dust lane absorbs along the midplane, a third to a half of the disk's thickness wide.
    lane = p["dust_lane_depth"][:, None, None] * torch.exp(-0.5 * (across / (0.4 * q * scale)) ** 2)
    return disk * (1.0 - lane)


def _clumpy(x: torch.Tensor, y: torch.Tensor, p: Params) -> torch.Tensor:
    x, y = _centred(x, y, p)
    radius = p["clumpy_radius_arcsec"]
    weight = p["clumpy_knot_weight"]
    diffuse = p["clumpy_diffuse_fraction"]
    # Each component with unit flux, then weighted: the diffuse body an exponential disk.
    r = radius[:, None, None]
    light = diffuse[:, None, None] * torch.exp(-torch.sqrt(x**2 + y**2) / r) / (2 * math.pi * r**2)
    knot_share = (1 - diffuse) / weight.sum(dim=1).clamp(min=1e-12)
    for j in range(weight.shape[1]):  # knot slots, each a batched op
        knot = gaussian_unit_flux(x, y, p["clumpy_knot_dx"][:, j], p["clumpy_knot_dy"][:, j],
                                  p["clumpy_knot_radius_arcsec"][:, j])
        light = light + (knot_share * weight[:, j])[:, None, None] * knot
    return light


def _blue_pair(x: torch.Tensor, y: torch.Tensor, p: Params) -> torch.Tensor:
    weight = p["member_weight"]
    light = torch.zeros_like(x)
    for j in range(weight.shape[1]):  # member slots, each a batched op
        member = sersic_unit_flux(x, y, p["member_x_arcsec"][:, j], p["member_y_arcsec"][:, j],
                                  p["member_axis_ratio"][:, j], p["member_angle"][:, j],
                                  p["member_sersic_index"][:, j],
                                  p["member_half_light_radius_arcsec"][:, j])
        light = light + weight[:, j, None, None] * member
    return light


def _point(x: torch.Tensor, y: torch.Tensor, p: Params, pixel_scale_arcsec: torch.Tensor
           ) -> torch.Tensor:
    # A pixel-sized Gaussian: a point source as the detector records it, before the PSF.
    half_light = _POINT_SIGMA_PIX * math.sqrt(2 * math.log(2)) * pixel_scale_arcsec
    return gaussian_unit_flux(x, y, p["centre_x_arcsec"], p["centre_y_arcsec"], half_light)


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
        elif name in _STAR_KINDS:
            sb = _point(xs, ys, p, meta.pixel_scale_arcsec[index])
        else:
            sb = {"ring": _ring, "spiral": _spiral, "edge_on": _edge_on, "clumpy": _clumpy,
                  "blue_pair": _blue_pair}[name](xs, ys, p)
        pixels = integrate_pixels(sb, supersample, meta.pixel_scale_arcsec[index])
        images[index] = pixels / pixels.sum(dim=(-2, -1), keepdim=True).clamp(min=1e-30)
    return images


def saturate(light: torch.Tensor, p: Params, meta: BandMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """A bright star's light (N, C, S, S) with spikes, clipped at saturation and bled; and the level.

    Four diffraction spikes (a thin PSF-wide line along two perpendicular axes at
    ``spike_angle``, falling off as the inverse square of the distance) take
    ``spike_flux_fraction`` of the star's flux. The saturation level (N, C) is the peak over
    ``saturation_peak_ratio``; the charge above it bleeds up and down the star's pixel columns,
    ``bleed_width_pix`` wide, filling them to the level, as CCDs do.
    """
    n, _, size, _ = light.shape
    scale = meta.pixel_scale_arcsec[:, None, None, None]
    axis = torch.arange(size, device=light.device, dtype=light.dtype) - size // 2
    star_x = meta.centre_offset_pix[:, 0, None, None, None] + p["centre_x_arcsec"][:, None, None, None] / scale
    star_y = meta.centre_offset_pix[:, 1, None, None, None] + p["centre_y_arcsec"][:, None, None, None] / scale
    dx, dy = axis[None, None, None, :] - star_x, axis[None, None, :, None] - star_y
    angle = p["spike_angle"][:, None, None, None]
    along = dx * torch.cos(angle) + dy * torch.sin(angle)
    across = -dx * torch.sin(angle) + dy * torch.cos(angle)
    fwhm = (meta.psf_fwhm_arcsec / meta.pixel_scale_arcsec[:, None])[..., None, None]
    sigma = fwhm / 2.355
    spikes = (torch.exp(-0.5 * (across / sigma) ** 2) / (1 + along.abs() / fwhm) ** 2
              + torch.exp(-0.5 * (along / sigma) ** 2) / (1 + across.abs() / fwhm) ** 2)
    total = light.sum(dim=(-2, -1), keepdim=True)
    spikes = spikes / spikes.sum(dim=(-2, -1), keepdim=True) * total \
        * p["spike_flux_fraction"][:, None, None, None]
    light = light + spikes
    level = light.amax(dim=(-2, -1)) / p["saturation_peak_ratio"]
    lvl = level[..., None, None]
    excess = (light - lvl).clamp(min=0.0).sum(dim=(-2, -1), keepdim=True)
    width = p["bleed_width_pix"][:, None, None, None]
    length = excess / (lvl * width)
    trail = (dx.abs() < width / 2) & (dy.abs() < length / 2)
    clipped = torch.where(trail, lvl, light.clamp(max=lvl))
    return clipped, level


def paint_lookalikes(raw: torch.Tensor, meta: BandMeta, config: LookalikeConfig,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, Params]:
    """Raw stamps (N, C, S, S) with unlensed look-alike structure added: labelled non-lenses.

    Same contract as ``training.inject.inject_lenses``: raw counts in, raw counts out (normalise
    afterwards with ``scanner.normalise.normalise``). ``params`` holds ``kind`` (codes into
    :data:`LOOKALIKE_KINDS`), the drawn shapes, ``snr``, ``passed_cuts``, ``draws``, ``magzero``
    (N, C), the zero points the light went through, ``saturation_level`` (N, C; inf but for
    saturated stars, whose pixels at that level are exactly it, noise-free, in the output) and
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
    observed, kernels = draw_conditions(meta, config.conditions, size, generator)
    snr = raw.new_zeros(n)
    level = torch.full_like(meta.magzero, math.inf)
    saturated_code = LOOKALIKE_KINDS.index("saturated_star")

    def render(p: Params, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sub_meta = observed[index]
        unit = torch.cat([
            lookalike_unit_images({k: v[part] for k, v in p.items()}, sub_meta[part], size,
                                  config.supersample)
            for part in chunks(len(index), (size * config.supersample) ** 2, device)])
        mags = sed_magnitudes(p["magnitude"], p["sed_slope"], meta.bands, config.reference_band)
        counts = magnitude_to_counts(mags, sub_meta.magzero)
        light = convolve(counts[:, :, None, None] * unit[:, None], kernels[index])
        level[index] = math.inf
        bright = torch.nonzero(p["kind"] == saturated_code).squeeze(1)
        if bright.numel():
            clipped, bright_level = saturate(light[bright], {k: v[bright] for k, v in p.items()},
                                             sub_meta[bright])
            light[bright] = clipped
            level[index[bright]] = bright_level
        snr[index] = detection_snr(light, sub_meta)
        return light, snr[index] >= config.min_snr

    params, light, passed, draws = draw_until_accepted(
        n, device, config.max_draws,
        lambda index: draw_lookalike_params(index.numel(), config, generator, device), render)
    painted = raw + light + photon_noise(light, meta.gain, generator)
    # A saturated pixel reads the level whatever else fell on it: a flat, noise-free top.
    full = light >= level[..., None, None]
    painted = torch.where(full, level[..., None, None].expand_as(painted), painted)
    params.update({"snr": snr, "passed_cuts": passed, "draws": draws, "light": light,
                   "magzero": observed.magzero, "saturation_level": level})
    return painted, params
