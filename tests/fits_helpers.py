"""Small real FITS tiles for tests, written with astropy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS


def tan_wcs(ra0: float, dec0: float, size: int, pixel_scale_arcsec: float = 0.26) -> WCS:
    w = WCS(naxis=2)
    w.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    w.wcs.crval = [ra0, dec0]
    w.wcs.crpix = [(size + 1) / 2, (size + 1) / 2]
    s = pixel_scale_arcsec / 3600
    w.wcs.cd = [[-s, 0], [0, s]]
    w.wcs.radesys = "ICRS"
    return w


def write_tile(directory: Path, name: str, data: np.ndarray, wcs: WCS, bands: tuple[str, ...],
               layout: str = "per_band", compress: bool = False) -> list[Path]:
    """Write a (C, H, W) tile in one of the two band layouts; return the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    hdr = wcs.to_header()
    suffix = ".fits.fz" if compress else ".fits"
    paths = []

    def image_hdu(c: int, band: str, primary: bool):
        h = hdr.copy()
        h["EXTNAME"] = band
        h["BAND"] = band
        if compress:
            return fits.CompImageHDU(data[c].astype(np.float32), header=h, compression_type="RICE_1",
                                     quantize_level=64)
        cls = fits.PrimaryHDU if primary else fits.ImageHDU
        return cls(data[c].astype(np.float32), header=h)

    if layout == "per_band":
        for c, band in enumerate(bands):
            hdus = [fits.PrimaryHDU(), image_hdu(c, band, False)] if compress else [image_hdu(c, band, True)]
            p = directory / f"{name}_{band}{suffix}"
            fits.HDUList(hdus).writeto(p, overwrite=True)
            paths.append(p)
    else:
        hdus = [fits.PrimaryHDU()] + [image_hdu(c, b, False) for c, b in enumerate(bands)]
        p = directory / f"{name}{suffix}"
        fits.HDUList(hdus).writeto(p, overwrite=True)
        paths.append(p)
    return paths


def noisy_tile(size: int, n_bands: int = 3, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.normal(0, 1, (n_bands, size, size)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    for _ in range(10):
        x0, y0 = rng.uniform(5, size - 5, 2)
        data += (50 * np.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / 8.0)).astype(np.float32)
    return data


def write_scaled_tile(directory: Path, name: str, data: np.ndarray, wcs: WCS, bands: tuple[str, ...],
                      bscale: float, bzero: float) -> list[Path]:
    """Write a (C, H, W) tile a file per band as BITPIX=16 integers with BSCALE/BZERO, as survey
    archives often store images; return the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for c, band in enumerate(bands):
        hdu = fits.PrimaryHDU(data[c].astype(np.float32), header=wcs.to_header())
        hdu.header["BAND"] = band
        hdu.scale("int16", bscale=bscale, bzero=bzero)
        p = directory / f"{name}_{band}.fits"
        hdu.writeto(p, overwrite=True)
        paths.append(p)
    return paths
