"""Observing conditions drawn around each stamp's header: the PSF painted light is blurred by and
the zero point it is counted through.

A header describes a band's PSF by one seeing value (and perhaps a Moffat index), but the surveys
a model will scan blur their images with other PSF shapes (Moffat cores of other indices, double
Gaussians, extended wings, a little ellipticity), with seeing that wanders across a tile, and have
zero points good to a few hundredths of a magnitude. A model trained on light blurred by exactly
the header's Moffat learns that one shape and trips on the next survey. So every stamp and band of
injected lenses and look-alikes gets its own PSF and zero point, drawn here, the same way for
both, so nothing about the conditions tells a lens from a look-alike.

Per stamp: the PSF family (Moffat, or a double Gaussian with probability
``double_gaussian_fraction``), whether it has a wing, and the ellipticity. Per stamp and band: the
seeing (the header's times a uniform factor), the Moffat index or double-Gaussian shape, the
wing's flux share and width, and the zero-point offset. Kernels are sampled at pixel centres and
sum to 1, like ``training.render.moffat_kernels`` (which ``ConditionsConfig.header()`` reproduces).

Example
-------
>>> import torch
>>> from training.bands import BandMeta
>>> meta = BandMeta.constant(4, ("g", "r", "i"), psf_fwhm_arcsec=1.0)
>>> observed, kernels = draw_conditions(meta, ConditionsConfig(), 64, torch.Generator().manual_seed(0))
>>> kernels.shape[:2], bool(torch.allclose(kernels.sum(dim=(-2, -1)), torch.ones(4, 3)))
(torch.Size([4, 3]), True)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch

from training.bands import BandMeta

_RANGES = ("psf_beta", "double_gaussian_width_ratio", "double_gaussian_core_flux", "wing_flux",
           "wing_fwhm_ratio", "wing_beta", "psf_ellipticity")


@dataclass(frozen=True)
class ConditionsConfig:
    """How far painted light's PSF and zero point stray from the header's; ranges are uniform.

    Parameters
    ----------
    seeing_scatter : float
        Each band's FWHM is the header's times a factor uniform in ``[1 - s, 1 + s]``; 0.2: seeing
        varies by about that much across a survey and within a night.
    psf_beta : (float, float) or None
        Moffat index of the core, per stamp and band; (2, 6) spans wide-winged (2) to nearly
        Gaussian (6) seeing PSFs. None keeps the header's ``PSFBETA``.
    double_gaussian_fraction : float
        Share of stamps whose core is a double Gaussian instead of a Moffat.
    double_gaussian_width_ratio : (float, float)
        Outer Gaussian's sigma over the inner one's.
    double_gaussian_core_flux : (float, float)
        Inner Gaussian's share of the double Gaussian's flux.
    wing_fraction : float
        Share of stamps whose PSF has a broad faint wing (scattered light) besides its core.
    wing_flux : (float, float)
        The wing's share of the PSF's flux, per band: a few to ~10 per cent.
    wing_fwhm_ratio : (float, float)
        The wing's FWHM over the core's.
    wing_beta : (float, float)
        The wing's Moffat index: low, so its light falls off as a power law.
    psf_ellipticity : (float, float)
        ``1 - b/a`` of the PSF, per stamp (shared by its bands, as the optics are), at a random
        angle; area-preserving, so the FWHM is the geometric mean of the axes'.
    zero_point_scatter_mag : float
        Gaussian sigma (mag) of each band's zero-point error: painted counts are
        ``10**(-0.4 (mag - magzero - dz))``; 0.03 mag shifts colours as calibration does.
    max_kernel_half_pix : int
        Kernels are at most ``2 * this + 1`` pixels wide (and no wider than the stamp), their
        outer 40% in radius tapered to zero; light beyond is folded into the rest by
        normalisation. Bounds the FFT's cost.
    """

    seeing_scatter: float = 0.2
    psf_beta: tuple[float, float] | None = (2.0, 6.0)
    double_gaussian_fraction: float = 0.25
    double_gaussian_width_ratio: tuple[float, float] = (1.5, 3.0)
    double_gaussian_core_flux: tuple[float, float] = (0.6, 0.9)
    wing_fraction: float = 0.5
    wing_flux: tuple[float, float] = (0.02, 0.10)
    wing_fwhm_ratio: tuple[float, float] = (2.5, 5.0)
    wing_beta: tuple[float, float] = (1.5, 2.5)
    psf_ellipticity: tuple[float, float] = (0.0, 0.08)
    zero_point_scatter_mag: float = 0.03
    max_kernel_half_pix: int = 24

    def __post_init__(self) -> None:
        for name in _RANGES:
            value = getattr(self, name)
            if value is None:
                continue
            lo, hi = (float(v) for v in value)
            object.__setattr__(self, name, (lo, hi))
            if not 0 <= lo <= hi:
                raise ValueError(f"ConditionsConfig.{name}={value}: expected 0 <= low <= high")
        if self.psf_beta is not None and self.psf_beta[0] <= 1.0:
            raise ValueError(f"ConditionsConfig.psf_beta={self.psf_beta}: a Moffat index must be "
                             f"> 1 (below, the profile holds infinite flux)")
        if not 0 <= self.seeing_scatter < 1:
            raise ValueError(f"ConditionsConfig.seeing_scatter={self.seeing_scatter}: expected in "
                             f"[0, 1)")
        for name in ("double_gaussian_fraction", "wing_fraction"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"ConditionsConfig.{name}={getattr(self, name)}: a share in "
                                 f"[0, 1]")
        if self.wing_flux[1] >= 1 or self.double_gaussian_core_flux[1] > 1 \
                or self.psf_ellipticity[1] >= 1:
            raise ValueError("ConditionsConfig: wing_flux and psf_ellipticity must stay below 1, "
                             "double_gaussian_core_flux at most 1")
        if self.double_gaussian_width_ratio[0] < 1 or self.wing_fwhm_ratio[0] < 1:
            raise ValueError("ConditionsConfig: double_gaussian_width_ratio and wing_fwhm_ratio "
                             "are >= 1 (the outer component is the broader)")
        if self.zero_point_scatter_mag < 0 or self.max_kernel_half_pix < 1:
            raise ValueError("ConditionsConfig: zero_point_scatter_mag >= 0, "
                             "max_kernel_half_pix >= 1")

    @classmethod
    def header(cls) -> "ConditionsConfig":
        """No variation: the header's seeing, Moffat index and zero point, a round PSF."""
        return cls(seeing_scatter=0.0, psf_beta=None, double_gaussian_fraction=0.0,
                   wing_fraction=0.0, psf_ellipticity=(0.0, 0.0), zero_point_scatter_mag=0.0)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def coerce(cls, value: "ConditionsConfig | dict[str, Any]", where: str) -> "ConditionsConfig":
        """``value`` as a config: a nested table of a parsed config file becomes one."""
        if isinstance(value, cls):
            return value
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in value.items()})


def moffat_alpha(fwhm: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Moffat scale ``alpha`` of profiles ``(1 + r^2/alpha^2)^-beta`` with FWHM ``fwhm``."""
    return fwhm / (2.0 * torch.sqrt(torch.pow(2.0, 1.0 / beta) - 1.0))


def double_gaussian_half_max_radius(core_flux: torch.Tensor, width_ratio: torch.Tensor,
                                    iterations: int = 24) -> torch.Tensor:
    """Half-maximum radius, in inner sigmas, of ``a G(1) + (1 - a) G(r)`` (2-D unit Gaussians).

    No closed form: bisection on the radial profile, which falls monotonically from the centre,
    between the inner Gaussian's half-maximum radius and the outer one's.
    """
    a, r = core_flux, width_ratio

    def profile(rho: torch.Tensor) -> torch.Tensor:
        return a * torch.exp(-0.5 * rho**2) + (1 - a) / r**2 * torch.exp(-0.5 * (rho / r) ** 2)

    half = 0.5 * profile(torch.zeros_like(a))
    lo = torch.full_like(a, math.sqrt(2 * math.log(2)))
    hi = lo * r
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        above = profile(mid) > half
        lo, hi = torch.where(above, mid, lo), torch.where(above, hi, mid)
    return 0.5 * (lo + hi)


def draw_conditions(meta: BandMeta, config: ConditionsConfig, size: int,
                    generator: torch.Generator | None) -> tuple[BandMeta, torch.Tensor]:
    """Observed conditions of ``meta``'s stamps and their PSF kernels (N, C, K, K), each summing to 1.

    The returned ``BandMeta`` holds the drawn seeing (``psf_fwhm_arcsec``), the core's Moffat index
    (``psf_beta``; NaN for a double Gaussian) and the zero point painted counts go through
    (``magzero``); sky noise, gain and pixel scale are the header's. ``size`` (the stamp side)
    bounds the kernels.
    """
    c = config
    device = meta.pixel_scale_arcsec.device
    n, nb = meta.magzero.shape

    def u(r: tuple[float, float], *shape: int) -> torch.Tensor:
        return r[0] + (r[1] - r[0]) * torch.rand(shape, generator=generator, device=device)

    fwhm = meta.psf_fwhm_arcsec * u((1 - c.seeing_scatter, 1 + c.seeing_scatter), n, nb)
    beta = meta.psf_beta.clone() if c.psf_beta is None else u(c.psf_beta, n, nb)
    double = torch.rand(n, generator=generator, device=device) < c.double_gaussian_fraction
    dg_ratio = u(c.double_gaussian_width_ratio, n, nb)
    dg_core = u(c.double_gaussian_core_flux, n, nb)
    has_wing = torch.rand(n, generator=generator, device=device) < c.wing_fraction
    wing_flux = u(c.wing_flux, n, nb) * has_wing[:, None]
    wing_fwhm = fwhm * u(c.wing_fwhm_ratio, n, nb)
    wing_beta = u(c.wing_beta, n, nb)
    ellipticity = u(c.psf_ellipticity, n)
    angle = u((0.0, math.pi), n)
    dz = c.zero_point_scatter_mag * torch.randn(n, nb, generator=generator, device=device)

    scale = meta.pixel_scale_arcsec[:, None]
    fwhm_pix, wing_fwhm_pix = fwhm / scale, wing_fwhm / scale
    # 5 FWHM holds all but a few per cent of a beta = 2 Moffat's light (the taper starts at 3).
    extent = torch.maximum(5.0 * fwhm_pix, torch.where(wing_flux > 0, 2.0 * wing_fwhm_pix,
                                                       torch.zeros_like(fwhm_pix)))
    worst = float(extent.max()) if n else 1.0
    half = max(1, min(int(math.ceil(worst)), size, c.max_kernel_half_pix))

    offsets = torch.arange(-half, half + 1, device=device, dtype=torch.float32)
    dx, dy = offsets[None, None, None, :], offsets[None, None, :, None]
    cos, sin = torch.cos(angle)[:, None, None, None], torch.sin(angle)[:, None, None, None]
    q = (1.0 - ellipticity)[:, None, None, None]
    along, across = dx * cos + dy * sin, -dx * sin + dy * cos
    r2 = along**2 * q + across**2 / q  # (N, 1, K, K), area-preserving: sqrt(q) * sqrt(1/q) = 1

    def b(t: torch.Tensor) -> torch.Tensor:
        return t[..., None, None]

    def unit(profile: torch.Tensor) -> torch.Tensor:
        return profile / profile.sum(dim=(-2, -1), keepdim=True)

    moffat_core = torch.pow(1.0 + r2 / b(moffat_alpha(fwhm_pix, beta)) ** 2, -b(beta))
    sigma_in = fwhm_pix / (2.0 * double_gaussian_half_max_radius(dg_core, dg_ratio))
    dg = (b(dg_core) / b(sigma_in) ** 2 * torch.exp(-0.5 * r2 / b(sigma_in) ** 2)
          + b(1 - dg_core) / b(sigma_in * dg_ratio) ** 2
          * torch.exp(-0.5 * r2 / b(sigma_in * dg_ratio) ** 2))
    core = unit(torch.where(double[:, None, None, None], dg, moffat_core))
    wing = unit(torch.pow(1.0 + r2 / b(moffat_alpha(wing_fwhm_pix, wing_beta)) ** 2, -b(wing_beta)))
    # A round, tapered edge: a square cut would show as a box around bright stars.
    radius = torch.sqrt(dx**2 + dy**2)
    taper = 0.5 * (1 + torch.cos(math.pi * ((radius - 0.6 * half) / (0.4 * half)).clamp(0.0, 1.0)))
    kernels = unit(taper * (b(1 - wing_flux) * core + b(wing_flux) * wing))
    observed = dataclasses.replace(
        meta, magzero=meta.magzero + dz, psf_fwhm_arcsec=fwhm,
        psf_beta=torch.where(double[:, None], torch.full_like(beta, math.nan), beta))
    return observed, kernels
