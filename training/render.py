"""Batched image-plane rendering shared by lens injection and look-alike negatives.

Everything here works on a whole batch of stamps at once, as tensor ops on whatever device the
stamps live on (no per-stamp Python loop): a supersampled arcsec grid per stamp, unit-flux Sersic
light (caustics' Sersic profile, so injection and the lensing library agree on conventions),
integration into pixels, per-stamp-and-band Moffat PSF convolution by FFT, the injected light's
photon noise and its detection S/N.

Coordinates: arcsec, x along stamp columns, y along rows, measured from the deflector's catalog
position (the stamp's central pixel plus ``BandMeta.centre_offset_pix``). Angles are radians
counter-clockwise from +x, the frame caustics and lenstronomy use.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from training.bands import BandMeta

try:
    from caustics import func as caustics_func
except ImportError as exc:  # the optional [train] extra
    raise ImportError("lens injection needs caustics: pip install 'lensscan[train]'") from exc


#: Rays rendered at once. Elementwise ray tracing is memory-bound: on a CPU a chunk that stays in
#: cache renders 3-4x faster than one big batch (measured: 64 px stamps, 8 per chunk, 430/s
#: against 110/s for 256); a GPU wants big chunks to fill its cores.
RAYS_PER_CHUNK = {"cpu": 2**19, "other": 2**25}


def chunks(n: int, rays_per_stamp: int, device: torch.device) -> list[slice]:
    """Slices of ``n`` stamps, each holding at most the device's ``RAYS_PER_CHUNK`` rays."""
    budget = RAYS_PER_CHUNK["cpu" if device.type == "cpu" else "other"]
    step = max(1, budget // max(rays_per_stamp, 1))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def uniform(low: float, high: float, n: int, generator: torch.Generator | None,
            device: torch.device) -> torch.Tensor:
    """``n`` float32 draws, uniform on [low, high)."""
    return low + (high - low) * torch.rand(n, generator=generator, device=device)


def stamp_grid(size: int, supersample: int, meta: BandMeta) -> tuple[torch.Tensor, torch.Tensor]:
    """Arcsec coordinates (N, size*ss, size*ss) of sub-pixel centres, relative to the deflector.

    Pixel ``j`` covers ``[j - 0.5, j + 0.5]``; its ``ss`` sub-pixels sit at ``j + (k + 0.5)/ss - 0.5``.
    The stamp's central pixel (index ``size // 2``, where ``scanner.cutouts`` puts the object) is
    the origin before the deflector's sub-pixel offset is removed.
    """
    device = meta.pixel_scale_arcsec.device
    sub = (torch.arange(size * supersample, device=device, dtype=torch.float32) + 0.5) / supersample
    axis = sub - 0.5 - size // 2
    scale = meta.pixel_scale_arcsec[:, None, None]
    x = (axis[None, None, :] - meta.centre_offset_pix[:, 0, None, None]) * scale
    y = (axis[None, :, None] - meta.centre_offset_pix[:, 1, None, None]) * scale
    return x.expand(-1, size * supersample, -1), y.expand(-1, -1, size * supersample)


def sersic_unit_flux(x: torch.Tensor, y: torch.Tensor, centre_x: torch.Tensor,
                     centre_y: torch.Tensor, axis_ratio: torch.Tensor, angle: torch.Tensor,
                     sersic_index: torch.Tensor, half_light_radius_arcsec: torch.Tensor
                     ) -> torch.Tensor:
    """Surface brightness (per arcsec^2) of elliptical Sersic profiles with total flux 1.

    Parameters are (N,) tensors broadcast over the (N, H, W) coordinates. The half-light radius
    is circularised (the geometric mean of the axes, lenstronomy's ``R_sersic``); caustics takes
    the major-axis radius, so it is divided by ``sqrt(q)`` here. The amplitude comes from the
    analytic total flux ``2 pi n q Re^2 e^k k^(-2n) Gamma(2n)`` with caustics' ``k(n)``.
    """
    def b(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *([1] * (x.dim() - 1)))

    n, q = b(sersic_index), b(axis_ratio)
    re_major = b(half_light_radius_arcsec) / torch.sqrt(q)
    k = caustics_func.k_sersic(n)
    log_total = (math.log(2 * math.pi) + torch.log(n) + torch.log(q) + 2 * torch.log(re_major)
                 + k - 2 * n * torch.log(k) + torch.lgamma(2 * n))
    return caustics_func.brightness_sersic(b(centre_x), b(centre_y), q, b(angle), n, re_major,
                                           torch.exp(-log_total), x, y, k)


def integrate_pixels(surface_brightness: torch.Tensor, supersample: int,
                     pixel_scale_arcsec: torch.Tensor) -> torch.Tensor:
    """Flux per pixel (N, ..., S, S) from surface brightness sampled on the supersampled grid."""
    lead = surface_brightness.shape[:-2]
    h, w = surface_brightness.shape[-2:]
    pooled = F.avg_pool2d(surface_brightness.reshape(-1, 1, h, w), supersample)
    pooled = pooled.reshape(*lead, h // supersample, w // supersample)
    area = pixel_scale_arcsec.reshape(-1, *([1] * (pooled.dim() - 1))) ** 2
    return pooled * area


def moffat_kernels(meta: BandMeta, half_pix: int) -> torch.Tensor:
    """Moffat PSFs (N, C, K, K), K = 2 half_pix + 1, sampled at pixel centres and summing to 1.

    Sampling at pixel centres (not integrating over pixels) is right for images that are already
    pixel-integrated, and is how the mock survey paints its lenses.
    """
    device = meta.pixel_scale_arcsec.device
    offsets = torch.arange(-half_pix, half_pix + 1, device=device, dtype=torch.float32)
    r2_pix = offsets[None, :] ** 2 + offsets[:, None] ** 2
    beta = meta.psf_beta[..., None, None]
    alpha = meta.psf_fwhm_arcsec / (2.0 * torch.sqrt(torch.pow(2.0, 1.0 / meta.psf_beta) - 1.0))
    alpha_pix = (alpha / meta.pixel_scale_arcsec[:, None])[..., None, None]
    kernel = torch.pow(1.0 + r2_pix / alpha_pix**2, -beta)
    return kernel / kernel.sum(dim=(-2, -1), keepdim=True)


def psf_half_pix(meta: BandMeta, size: int) -> int:
    """Kernel half-width: 3 FWHM of the worst seeing (> 99.5% of a beta=3.5 Moffat's light)."""
    worst = float((meta.psf_fwhm_arcsec / meta.pixel_scale_arcsec[:, None]).max()) if len(meta) else 1.0
    return max(1, min(int(math.ceil(3.0 * worst)), size))


def convolve(images: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Each image (N, C, S, S) convolved with its own kernel (N, C, K, K), same size, by FFT.

    Zero padding to S + K - 1 makes the FFT's circular convolution a linear one, so light spread
    past the stamp edge is lost rather than wrapped onto the far side.
    """
    s, k = images.shape[-1], kernels.shape[-1]
    half = k // 2
    size = s + k - 1
    spectrum = torch.fft.rfft2(images, s=(size, size)) * torch.fft.rfft2(kernels, s=(size, size))
    full = torch.fft.irfft2(spectrum, s=(size, size))
    return full[..., half:half + s, half:half + s]


def photon_noise(light_counts: torch.Tensor, gain: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
    """Poisson noise (Gaussian approximation, as the mock survey's) of added light, in counts.

    ``gain`` (N, C) converts counts to electrons; coadd gains are large, so counts x gain is large
    wherever the light is visible and the Gaussian approximation holds.
    """
    variance = light_counts.clamp(min=0.0) / gain[..., None, None]
    noise = torch.randn(light_counts.shape, generator=generator, device=light_counts.device,
                        dtype=light_counts.dtype)
    return noise * torch.sqrt(variance)


def detection_snr(light_counts: torch.Tensor, meta: BandMeta) -> torch.Tensor:
    """Signal-to-noise (N,) of added light, over its pixels brighter than 1 sky sigma.

    Per band: the light summed over those pixels divided by the noise of the sum (sky plus the
    light's own photon noise), as in Collett (2015); bands combine in quadrature, as a classifier
    seeing every band would.
    """
    sky = meta.sky_sigma[..., None, None]
    mask = light_counts > sky
    signal = (light_counts * mask).sum(dim=(-2, -1))
    variance = ((sky**2 + light_counts.clamp(min=0.0) / meta.gain[..., None, None]) * mask
                ).sum(dim=(-2, -1))
    per_band = torch.where(variance > 0, signal / torch.sqrt(variance.clamp(min=1e-30)),
                           torch.zeros_like(signal))
    return torch.sqrt((per_band**2).sum(dim=-1))


def light_position_angle(raw: torch.Tensor, meta: BandMeta, window_arcsec: float = 1.0
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Position angle (N,) and axis ratio (N,) of each stamp's central light, from moments.

    Gaussian-weighted second moments of the noise-weighted band sum; missing pixels count as sky.
    The axis ratio is PSF-rounded, so only the angle is used to orient a deflector's mass.
    """
    size = raw.shape[-1]
    x, y = stamp_grid(size, 1, meta)
    weight = torch.exp(-(x**2 + y**2) / (2 * window_arcsec**2))
    # Negative (noise) pixels are dropped: they would make the moments of a faint stamp meaningless.
    light = torch.nan_to_num(raw / meta.sky_sigma[..., None, None], nan=0.0).clamp(min=0.0)
    light = light.sum(dim=1) * weight
    total = light.sum(dim=(-2, -1)).clamp(min=1e-12)
    mx = (light * x).sum(dim=(-2, -1)) / total
    my = (light * y).sum(dim=(-2, -1)) / total
    dx, dy = x - mx[:, None, None], y - my[:, None, None]
    qxx = (light * dx * dx).sum(dim=(-2, -1)) / total
    qyy = (light * dy * dy).sum(dim=(-2, -1)) / total
    qxy = (light * dx * dy).sum(dim=(-2, -1)) / total
    angle = 0.5 * torch.atan2(2 * qxy, qxx - qyy)
    spread = torch.sqrt((qxx - qyy) ** 2 + 4 * qxy**2)
    major = (qxx + qyy + spread).clamp(min=1e-12)
    minor = (qxx + qyy - spread).clamp(min=0.0)
    return angle, torch.sqrt(minor / major)


def gaussian_unit_flux(x: torch.Tensor, y: torch.Tensor, centre_x: torch.Tensor,
                       centre_y: torch.Tensor, half_light_radius_arcsec: torch.Tensor) -> torch.Tensor:
    """Surface brightness (per arcsec^2) of circular Gaussians with total flux 1.

    Compact clumps are unresolved once the PSF has blurred them, so their exact profile does not
    show; a Gaussian costs a third of a Sersic per ray.
    """
    def b(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, *([1] * (x.dim() - 1)))

    sigma2 = (b(half_light_radius_arcsec) / math.sqrt(2 * math.log(2))) ** 2
    r2 = (x - b(centre_x)) ** 2 + (y - b(centre_y)) ** 2
    return torch.exp(-0.5 * r2 / sigma2) / (2 * math.pi * sigma2)


def draw_until_accepted(n: int, device: torch.device, max_draws: int,
                        draw: Callable[[torch.Tensor], dict[str, torch.Tensor]],
                        render: Callable[[dict[str, torch.Tensor], torch.Tensor],
                                         tuple[torch.Tensor, torch.Tensor]],
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw parameters for ``n`` stamps, render them, and redraw the rejected ones.

    ``draw(index)`` returns parameters for the stamps ``index``; ``render(params, index)`` returns
    their images and an acceptance mask. Only the rejected stamps are redrawn and re-rendered, as
    one batch each round, up to ``max_draws`` rounds; a stamp that never passes keeps its last draw.

    Returns the parameters, images, acceptance mask (N,) and number of draws (N,).
    """
    index = torch.arange(n, device=device)
    params = draw(index)
    images: torch.Tensor | None = None
    passed = torch.zeros(n, dtype=torch.bool, device=device)
    draws = torch.zeros(n, dtype=torch.int64, device=device)
    todo = index
    for attempt in range(max_draws):
        sub_images, ok = render({k: v[todo] for k, v in params.items()}, todo)
        if images is None:
            images = sub_images.new_zeros((n, *sub_images.shape[1:]))
        images[todo] = sub_images
        passed[todo] = ok
        draws[todo] = attempt + 1
        todo = todo[~ok]
        if todo.numel() == 0 or attempt == max_draws - 1:
            break
        for key, value in draw(todo).items():
            params[key][todo] = value
    assert images is not None
    return params, images, passed, draws
