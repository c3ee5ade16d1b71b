"""Training augmentations: batched tensor ops on normalised stamps, on the accelerator.

The original research code augmented with channel shuffle, JPEG compression, 90-degree rotations,
pad-and-crop translation, flips, brightness/saturation/hue jitter and gamma. Our stamps are FITS
counts normalised by ``scanner.normalise`` (not 8-bit JPEGs), so JPEG artefacts are replaced by
their equivalent for such data: a small PSF perturbation (Gaussian blur of random width) and extra
Gaussian noise. Every op is switchable and draws its own random strength per stamp, as tensors, in
one batched call (no per-stamp Python loop).

Gamma, and the original work's train-only quirk: the original applied gamma correction to training
images but never to the images it scored, so the scored images came from a distribution the model
had not trained on. This is **fixed**, not copied: gamma here is a random augmentation, ``gamma``
log-uniform in ``[1/gamma_max, gamma_max]``, centred on the identity, applied to each stamp's own
value range; the scan applies no gamma, and its untransformed stamps sit in the middle of what
the model saw in training.

Survey-to-survey differences the scan will meet are augmentations too: correlated pixel noise, as
resampled coadds have (white noise convolved with a small random kernel, rescaled to a drawn pixel
sigma), a per-band sky-level error, and a pixel-scale error of up to ~1% (a small resampling).
Together with the PSFs and zero points that ``training.conditions`` draws for painted light, they
keep the model from learning one survey's noise texture, sky subtraction and pixel grid.

Colour-changing ops (channel shuffle, hue) are off by default: colour is what tells a blue arc from
a red deflector, and the original set is one call away (``AugmentConfig.original()``).

Example
-------
>>> import torch
>>> x = torch.randn(8, 3, 64, 64)
>>> augment(x, AugmentConfig(), torch.Generator().manual_seed(0)).shape
torch.Size([8, 3, 64, 64])
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentConfig:
    """Which augmentations run and how strong they may be; each is drawn per stamp.

    Parameters
    ----------
    rot90 : bool
        Rotate by a random multiple of 90 degrees (the sky has no up).
    flip : bool
        Flip left-right and up-down, each with probability 1/2 (nor handedness).
    translate : bool
        Pad with sky (0) by ``max_shift_pix`` and crop back at a random offset.
    max_shift_pix : int
        Largest shift; 4 pixels (1") keeps the deflector near the centre, where the scan cuts it.
    pixel_scale : bool
        Resample each stamp (bicubic, about its centre) as if its pixels were a factor uniform in
        ``[1 - pixel_scale_jitter, 1 + pixel_scale_jitter]`` larger: a survey's pixel scale within
        the input spec's tolerance.
    pixel_scale_jitter : float
        Largest fractional pixel-scale error; 0.01.
    channel_shuffle : bool
        Permute the bands at random (original set; off by default: it destroys colour).
    noise : bool
        Add Gaussian noise of a random level (the FITS equivalent of JPEG artefacts).
    noise_sigma : (float, float)
        Range of that noise's sigma in normalised units (the sky noise is ~0.33 there).
    correlated_noise : bool
        Add correlated noise, as resampling makes in coadds: white noise convolved with a Gaussian
        kernel of random widths along the two axes, rescaled so its pixel sigma is the drawn one.
    correlated_noise_sigma : (float, float)
        Range of its pixel sigma (normalised units), drawn per stamp and band: the noise level
        scatters between bands and stamps as depth does.
    correlated_noise_kernel_pix : (float, float)
        Range of the kernel's Gaussian sigma along each axis (pixels): ~0.5 for a bilinear
        resampling, ~1 for a Lanczos-resampled, drizzled coadd.
    sky_offset : bool
        Add a per-band constant: a sky-subtraction error.
    sky_offset_sigma : float
        Its Gaussian sigma (normalised units, per stamp and band).
    blur : bool
        Convolve with a Gaussian of random width: a PSF perturbation, so the model does not
        learn one survey's seeing.
    blur_sigma_pix : (float, float)
        Range of that Gaussian's sigma in pixels.
    brightness : bool
        Add a random offset to every band.
    brightness_delta : float
        Largest offset (normalised units).
    saturation : bool
        Scale each band's difference from the band mean by a random factor.
    saturation_range : (float, float)
        Range of that factor.
    hue : bool
        Rotate 3-band colours about the grey axis (original set; off by default; 3 bands only).
    hue_max_deg : float
        Largest rotation.
    gamma : bool
        Random gamma, log-uniform in ``[1/gamma_max, gamma_max]``, on each stamp's value range.
    gamma_max : float
        Largest gamma (>= 1).
    """

    rot90: bool = True
    flip: bool = True
    translate: bool = True
    max_shift_pix: int = 4
    pixel_scale: bool = True
    pixel_scale_jitter: float = 0.01
    channel_shuffle: bool = False
    noise: bool = True
    noise_sigma: tuple[float, float] = (0.0, 0.1)
    correlated_noise: bool = True
    correlated_noise_sigma: tuple[float, float] = (0.0, 0.2)
    correlated_noise_kernel_pix: tuple[float, float] = (0.4, 1.2)
    sky_offset: bool = True
    sky_offset_sigma: float = 0.03
    blur: bool = True
    blur_sigma_pix: tuple[float, float] = (0.0, 0.6)
    brightness: bool = True
    brightness_delta: float = 0.1
    saturation: bool = True
    saturation_range: tuple[float, float] = (0.8, 1.25)
    hue: bool = False
    hue_max_deg: float = 10.0
    gamma: bool = True
    gamma_max: float = 1.25

    def __post_init__(self) -> None:
        for name in ("noise_sigma", "blur_sigma_pix", "saturation_range", "correlated_noise_sigma",
                     "correlated_noise_kernel_pix"):
            lo, hi = getattr(self, name)
            object.__setattr__(self, name, (float(lo), float(hi)))
            if not 0 <= lo <= hi:
                raise ValueError(f"AugmentConfig.{name}=({lo}, {hi}): expected 0 <= low <= high")
        if not 0 <= self.pixel_scale_jitter < 0.5 or self.sky_offset_sigma < 0:
            raise ValueError(f"AugmentConfig: pixel_scale_jitter={self.pixel_scale_jitter} must be "
                             f"in [0, 0.5), sky_offset_sigma={self.sky_offset_sigma} >= 0")
        if self.correlated_noise_kernel_pix[0] <= 0:
            raise ValueError(f"AugmentConfig.correlated_noise_kernel_pix="
                             f"{self.correlated_noise_kernel_pix}: widths must be > 0")
        if self.max_shift_pix < 0:
            raise ValueError(f"AugmentConfig.max_shift_pix={self.max_shift_pix}: expected >= 0")
        if self.gamma_max < 1:
            raise ValueError(f"AugmentConfig.gamma_max={self.gamma_max}: expected >= 1 "
                             f"(gamma is drawn from [1/gamma_max, gamma_max])")

    @classmethod
    def original(cls) -> "AugmentConfig":
        """The original research code's set, every op on (JPEG replaced by noise and blur)."""
        return cls(channel_shuffle=True, hue=True)

    @classmethod
    def none(cls) -> "AugmentConfig":
        """Every op off: ``augment`` returns its input unchanged."""
        return cls(**{f.name: False for f in dataclasses.fields(cls) if f.type in (bool, "bool")})

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _rand(n: int, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, generator=generator, device=x.device, dtype=x.dtype)


def _between(lo: float, hi: float, n: int, x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    return lo + (hi - lo) * _rand(n, x, g)


def _per_stamp(v: torch.Tensor) -> torch.Tensor:
    return v[:, None, None, None]


def random_rot90(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """Each stamp rotated by its own random multiple of 90 degrees (square stamps)."""
    k = torch.randint(0, 4, (x.shape[0],), generator=g, device=x.device)
    out = x.clone()
    for turns in (1, 2, 3):  # four cases, each a batched op over the stamps that drew it
        index = torch.nonzero(k == turns).squeeze(1)
        if index.numel():
            out[index] = torch.rot90(x[index], turns, dims=(2, 3))
    return out


def random_flip(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """Each stamp flipped left-right and up-down, each with probability 1/2."""
    lr = _per_stamp(_rand(x.shape[0], x, g) < 0.5)
    ud = _per_stamp(_rand(x.shape[0], x, g) < 0.5)
    x = torch.where(lr, x.flip(-1), x)
    return torch.where(ud, x.flip(-2), x)


def random_translate(x: torch.Tensor, max_shift: int, g: torch.Generator | None) -> torch.Tensor:
    """Pad with zeros (the sky, once normalised) and crop back at a random offset per stamp."""
    if max_shift == 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4)
    oy = torch.randint(0, 2 * max_shift + 1, (n,), generator=g, device=x.device)
    ox = torch.randint(0, 2 * max_shift + 1, (n,), generator=g, device=x.device)
    rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    out = padded.gather(2, rows.expand(n, c, h, padded.shape[-1]))
    return out.gather(3, cols.expand(n, c, h, w))


def random_pixel_scale(x: torch.Tensor, jitter: float, g: torch.Generator | None) -> torch.Tensor:
    """Each stamp resampled about its centre as if its pixels were ``1 + U(-jitter, jitter)`` larger.

    Larger pixels show a source smaller; what comes in from beyond the edge is sky (0).
    """
    n = x.shape[0]
    factor = _between(1 - jitter, 1 + jitter, n, x, g)
    theta = torch.zeros(n, 2, 3, device=x.device, dtype=x.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = factor
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="zeros", align_corners=False)


def correlated_noise(shape: torch.Size, sigma: torch.Tensor, kernel_pix: tuple[float, float],
                     g: torch.Generator | None, device: torch.device, dtype: torch.dtype
                     ) -> torch.Tensor:
    """Correlated Gaussian noise (N, C, H, W) of pixel sigma ``sigma`` (N, C).

    White noise on a frame ``half`` pixels wider, convolved with an axis-aligned Gaussian of random
    widths (``kernel_pix``, per stamp and band, each axis its own) and divided by the kernel's
    quadratic sum, so every pixel's variance is exactly ``sigma**2`` while neighbours correlate.
    """
    n, c, h, w = shape
    half = max(1, math.ceil(2 * kernel_pix[1]))
    offsets = torch.arange(-half, half + 1, device=device, dtype=dtype)
    width_x = _between(*kernel_pix, n * c, offsets, g)
    width_y = _between(*kernel_pix, n * c, offsets, g)
    kernel = (torch.exp(-0.5 * (offsets[None, None, :] / width_x[:, None, None]) ** 2)
              * torch.exp(-0.5 * (offsets[None, :, None] / width_y[:, None, None]) ** 2))
    kernel = kernel / torch.sqrt((kernel**2).sum(dim=(-2, -1), keepdim=True))
    white = torch.randn((1, n * c, h + 2 * half, w + 2 * half), generator=g, device=device,
                        dtype=dtype)
    field = F.conv2d(white, kernel[:, None], groups=n * c).reshape(n, c, h, w)
    return field * sigma[..., None, None]


def random_channel_shuffle(x: torch.Tensor, g: torch.Generator | None) -> torch.Tensor:
    """Each stamp's bands in a random order of its own."""
    order = torch.argsort(torch.rand(x.shape[:2], generator=g, device=x.device), dim=1)
    return x.gather(1, order[:, :, None, None].expand_as(x))


def random_blur(x: torch.Tensor, sigma_range: tuple[float, float], g: torch.Generator | None
                ) -> torch.Tensor:
    """Each stamp convolved with a Gaussian of random sigma (pixels), separable, zero-padded."""
    n, c, h, w = x.shape
    sigma = _between(*sigma_range, n, x, g).clamp(min=1e-3)
    half = max(1, math.ceil(3 * sigma_range[1]))
    offsets = torch.arange(-half, half + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (N*C, K)
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(flat, kernel[:, None, None, :], padding=(0, half), groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], padding=(half, 0), groups=n * c)
    return flat.reshape(n, c, h, w)


def random_hue(x: torch.Tensor, max_deg: float, g: torch.Generator | None) -> torch.Tensor:
    """3-band colours rotated about the grey axis (1, 1, 1) by a random angle per stamp."""
    if x.shape[1] != 3:
        raise ValueError(f"AugmentConfig.hue needs 3 bands, the stamps have {x.shape[1]}; "
                         f"switch hue off")
    theta = torch.deg2rad(_between(-max_deg, max_deg, x.shape[0], x, g))
    cos, sin = torch.cos(theta), torch.sin(theta)
    # Rodrigues' rotation about the unit grey axis k: R = cos I + sin [k]x + (1 - cos) k k^T.
    k = torch.full((3,), 1 / math.sqrt(3), device=x.device, dtype=x.dtype)
    cross = torch.tensor([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]],
                         device=x.device, dtype=x.dtype)
    eye = torch.eye(3, device=x.device, dtype=x.dtype)
    rot = (cos[:, None, None] * eye + sin[:, None, None] * cross
           + (1 - cos)[:, None, None] * torch.outer(k, k))
    return torch.einsum("nij,njhw->nihw", rot, x)


def random_gamma(x: torch.Tensor, gamma_max: float, g: torch.Generator | None) -> torch.Tensor:
    """Gamma (log-uniform in [1/gamma_max, gamma_max]) on each stamp's own min-max range."""
    n = x.shape[0]
    gamma = torch.exp(_between(-math.log(gamma_max), math.log(gamma_max), n, x, g))
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    span = (x.amax(dim=(1, 2, 3), keepdim=True) - lo).clamp(min=1e-12)
    return lo + span * ((x - lo) / span).clamp(0, 1) ** _per_stamp(gamma)


def augment(x: torch.Tensor, config: AugmentConfig, generator: torch.Generator | None = None
            ) -> torch.Tensor:
    """Augmented copy of normalised stamps ``x`` (N, C, S, S); never in place.

    Geometry first (rotation, flips, pixel scale, translation), then band order, PSF, noise
    (white, correlated) and sky level, then colour and gamma. ``generator`` must live on ``x``'s device; the same seed gives the same output.
    """
    if x.dim() != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"augment expects square stamps (N, C, S, S); got {tuple(x.shape)}")
    c = config
    n = x.shape[0]
    out = x.clone()
    if n == 0:
        return out
    if c.rot90:
        out = random_rot90(out, generator)
    if c.flip:
        out = random_flip(out, generator)
    if c.pixel_scale and c.pixel_scale_jitter > 0:
        out = random_pixel_scale(out, c.pixel_scale_jitter, generator)
    if c.translate:
        out = random_translate(out, c.max_shift_pix, generator)
    if c.channel_shuffle:
        out = random_channel_shuffle(out, generator)
    if c.blur:
        out = random_blur(out, c.blur_sigma_pix, generator)
    if c.noise:
        sigma = _per_stamp(_between(*c.noise_sigma, n, out, generator))
        noise = torch.randn(out.shape, generator=generator, device=out.device, dtype=out.dtype)
        out = out + sigma * noise
    if c.correlated_noise:
        sigma = _between(*c.correlated_noise_sigma, n * out.shape[1], out, generator)
        out = out + correlated_noise(out.shape, sigma.reshape(n, -1), c.correlated_noise_kernel_pix,
                                     generator, out.device, out.dtype)
    if c.sky_offset:
        out = out + c.sky_offset_sigma * torch.randn((n, out.shape[1], 1, 1), generator=generator,
                                                     device=out.device, dtype=out.dtype)
    if c.brightness:
        out = out + _per_stamp(_between(-c.brightness_delta, c.brightness_delta, n, out, generator))
    if c.saturation:
        mean = out.mean(dim=1, keepdim=True)
        out = mean + _per_stamp(_between(*c.saturation_range, n, out, generator)) * (out - mean)
    if c.hue:
        out = random_hue(out, c.hue_max_deg, generator)
    if c.gamma:
        out = random_gamma(out, c.gamma_max, generator)
    return out
