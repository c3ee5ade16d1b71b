"""A picture for a person: deflector stamps before and after injection, and look-alikes, in colour.

Colour images are Lupton et al. (2004) asinh composites (``astropy.visualization.make_lupton_rgb``)
of each band in units of its sky noise, reddest band in red, so faint blue arcs and bright red
deflectors both show, the way astronomers inspect candidates.
"""

from __future__ import annotations

import io
import logging
from typing import Sequence

import numpy as np
import torch

from scanner import storage
from training.bands import band_wavelengths_nm
from training.dataset import DatasetError, StampSet, iter_pool
from training.inject import InjectionConfig, inject_lenses
from training.lookalikes import LOOKALIKE_KINDS, LookalikeConfig, paint_lookalikes

logger = logging.getLogger(__name__)


def colour_composite(raw: np.ndarray, bands: Sequence[str], magzero: np.ndarray,
                     sky_sigma: np.ndarray, stretch: float = 15.0, q: float = 6.0) -> np.ndarray:
    """Lupton asinh RGB images (N, S, S, 3) uint8 of raw stamps (N, C, S, S).

    Bands are put on one AB flux scale through their zero points and weighted by
    ``lambda_mid / lambda``, so that grey is a typical star-forming galaxy (``f_nu ~ lambda``):
    early-type deflectors look red, lensed sources blue. All are divided by the middle band's sky
    noise; the reddest band goes to red, the bluest to blue, the middle one to green.
    """
    from astropy.visualization import make_lupton_rgb

    c = raw.shape[1]
    wavelength = np.array(band_wavelengths_nm(bands))
    to_ab = 10.0 ** (-0.4 * (magzero - magzero[:, c // 2:c // 2 + 1]))  # (N, C)
    to_ab = to_ab * (wavelength[c // 2] / wavelength)[None, :]
    noise = sky_sigma[:, c // 2] * to_ab[:, c // 2]
    scaled = np.nan_to_num(raw * (to_ab / noise[:, None])[..., None, None], nan=0.0)
    index = [c - 1, c // 2, 0]
    return np.stack([make_lupton_rgb(s[index[0]], s[index[1]], s[index[2]], minimum=-1.0,
                                     stretch=stretch, Q=q) for s in scaled])


def injection_grid(deflectors: StampSet, n: int, seed: int, injection: InjectionConfig,
                   lookalikes: LookalikeConfig) -> tuple[np.ndarray, list[list[str]]]:
    """Three rows of RGB stamps: deflectors, the same with a lens, the same with a look-alike.

    Returns the images (3, n, S, S, 3) and a caption per image.
    """
    if len(deflectors) == 0:
        raise DatasetError("the deflector pool is empty: nothing to inject into; loosen the "
                           "deflector cuts or use a larger survey")
    rng = np.random.default_rng(seed)
    index = rng.choice(len(deflectors), size=min(n, len(deflectors)), replace=False)
    raw = torch.from_numpy(deflectors.stamps[index])
    meta = deflectors.meta[torch.from_numpy(index)]
    generator = torch.Generator().manual_seed(seed)
    lensed, lens = inject_lenses(raw, meta, injection, generator)
    painted, look = paint_lookalikes(raw, meta, lookalikes, generator)
    magzero, sky = meta.magzero.numpy(), meta.sky_sigma.numpy()
    rows = [colour_composite(x.numpy(), meta.bands, magzero, sky) for x in (raw, lensed, painted)]
    ids = deflectors.rows["objid"].to_numpy()[index]
    captions = [
        [f"objid {i}" for i in ids],
        [f"θE {t:.1f}\"  S/N {s:.0f}" for t, s in zip(lens["einstein_radius_arcsec"].tolist(),
                                                      lens["arc_snr"].tolist())],
        [LOOKALIKE_KINDS[k] for k in look["kind"].tolist()],
    ]
    return np.stack(rows), captions


def show_injections(dataset: str, out_png: str, n: int = 8, seed: int = 0, split: str = "train",
                    injection: InjectionConfig | None = None,
                    lookalikes: LookalikeConfig | None = None) -> str:
    """Write a PNG grid of ``n`` deflectors before and after injection and with look-alikes.

    ``dataset`` is a dataset built by ``lensscan build-dataset``; returns ``out_png``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # The first shards' deflectors are enough for a picture; a survey's whole pool may not fit.
    first = next(iter_pool(dataset, "deflector", split, batch_rows=max(256, 8 * n)), None)
    if first is None:
        raise DatasetError(f"{dataset}: no {split} deflectors to show; loosen the deflector cuts "
                           f"(--deflector-max-mag, --deflector-colour) or use a larger survey")
    images, captions = injection_grid(first, n, seed, injection or InjectionConfig(),
                                      lookalikes or LookalikeConfig())
    n_rows, n_cols = images.shape[:2]
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(1.6 * n_cols, 1.75 * n_rows),
                             squeeze=False)
    labels = ["deflector", "+ injected lens", "+ look-alike\n(negative)"]
    for r in range(n_rows):
        for c in range(n_cols):
            ax = axes[r, c]
            ax.imshow(images[r, c], origin="lower", interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(captions[r][c], fontsize=7, pad=2)
        axes[r, 0].set_ylabel(labels[r], fontsize=8)
    fig.tight_layout(pad=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes_atomic(out_png, buffer.getvalue())
    logger.info("wrote %s (%d deflectors)", out_png, n_cols)
    return out_png
