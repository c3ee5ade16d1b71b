"""Write a synthetic survey fast: FITS tiles and a Parquet catalog to measure scan rates on.

    python benchmarks/synthetic_survey.py --out /tmp/synth --tiles 30 --size 3072 --objects-per-tile 6700
    lensscan scan --tiles /tmp/synth/tiles --catalog /tmp/synth/catalog.parquet \\
        --tile-pattern '{tile}_{band}.fits' --out /tmp/synth-scan
    python benchmarks/synthetic_survey.py --help

The layout is the one ``lensscan scan`` reads and :mod:`scanner.mock_survey` writes: one float32
FITS file per tile and band, ``tiles/{tile}_{band}.fits``, with a celestial TAN WCS at 0.26"/pixel
(the default ensemble's input spec), the mock's photometric header keys, adjacent tiles overlapping
by 64 pixels, and ``catalog.parquet`` with ``objid, ra, dec``. Only numpy, astropy and pyarrow are
needed: no GalSim or lenstronomy, which the lent GPU machine lacks.

The content is deliberately cheap: Gaussian sky noise plus, at each catalogued object, one
elliptical Gaussian or exponential blob with a colour, drawn vectorised over a tile's objects. It
is not a realistic sky and holds no lenses; it is for rates only. A scan's rate does not depend on
what the pixels show: the cut, the normalisation and the networks do the same work on any values.
Scores on it mean nothing.

Objects are placed in each tile's own part of the survey (the central ``size - overlap`` pixels),
so the scan's plan puts each on the tile that drew it; the catalog rows are shuffled, as a survey's
catalog is not ordered by tile. One seed gives the same files whatever ``--workers``.

Prints the ``lensscan scan`` arguments and writes ``survey.json`` beside the tiles.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.io import fits
from astropy.wcs import WCS

logger = logging.getLogger("synthetic_survey")

TILE_PATTERN = "{tile}_{band}.fits"

#: Per band: rms sky noise (adu) and the blob's flux relative to r, a red-ish galaxy colour.
#: Magnitudes use the mock survey's zero point, 30 (AB).
BAND_NOISE_AND_COLOUR = {"u": (1.5, 0.3), "g": (2.0, 0.6), "r": (3.0, 1.0), "i": (4.0, 1.3),
                         "z": (5.0, 1.45), "y": (6.0, 1.55)}
MAGZERO = 30.0
#: Blobs are drawn in a square of this half-size (pixels): 3.5 sigma of the widest Gaussian.
BLOB_HALF_PIX = 12


@dataclass(frozen=True)
class SyntheticSurveyConfig:
    """What to write; every field has a default a GPU run uses (about 200,000 objects)."""

    n_tiles: int = 30
    size_pix: int = 3072
    objects_per_tile: int = 6700
    bands: tuple[str, ...] = ("g", "r", "i")
    pixel_scale_arcsec: float = 0.26
    overlap_pix: int = 64
    ra0_deg: float = 150.0
    dec0_deg: float = 2.0
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [b for b in self.bands if b not in BAND_NOISE_AND_COLOUR]
        if not self.bands or unknown:
            raise ValueError(f"bands {list(self.bands)}: unknown or none {unknown}; choose from "
                             f"{','.join(BAND_NOISE_AND_COLOUR)}")
        if self.n_tiles < 1 or self.objects_per_tile < 0:
            raise ValueError(f"--tiles {self.n_tiles} and --objects-per-tile {self.objects_per_tile}: "
                             f"need at least 1 tile and no negative count")
        if self.size_pix - self.overlap_pix < 2 * BLOB_HALF_PIX + 2:
            smallest = self.overlap_pix + 2 * BLOB_HALF_PIX + 2
            raise ValueError(f"--size {self.size_pix} leaves no room for objects once tiles overlap by "
                             f"{self.overlap_pix} pixels; give --size >= {smallest}")


def tile_names(n_tiles: int) -> list[str]:
    """``tile000``, ``tile001``, ... as the mock survey names them."""
    return [f"tile{k:03d}" for k in range(n_tiles)]


def tile_header(config: SyntheticSurveyConfig, tile_index: int) -> fits.Header:
    """The TAN WCS header of one tile: centres on a grid in the survey's tangent plane.

    The same geometry as :func:`scanner.mock_survey.tile_wcs` (which this script cannot import:
    that module imports GalSim): centres ``size - overlap`` pixels apart, each tile projected about
    its own centre, North up and East left.
    """
    n_cols = math.ceil(math.sqrt(config.n_tiles))
    n_rows = math.ceil(config.n_tiles / n_cols)
    row, col = divmod(tile_index, n_cols)
    step = config.size_pix - config.overlap_pix
    scale_deg = config.pixel_scale_arcsec / 3600.0
    survey = WCS(naxis=2)
    survey.wcs.ctype = ["RA---TAN", "DEC--TAN"]
    survey.wcs.crval = [config.ra0_deg, config.dec0_deg]
    survey.wcs.crpix = [1.0, 1.0]
    survey.wcs.cd = [[-scale_deg, 0.0], [0.0, scale_deg]]
    ra_c, dec_c = survey.wcs_pix2world([[(col - (n_cols - 1) / 2) * step,
                                         (row - (n_rows - 1) / 2) * step]], 0)[0]
    h = fits.Header()
    h["WCSAXES"] = 2
    h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    h["CUNIT1"], h["CUNIT2"] = "deg", "deg"
    h["CRVAL1"], h["CRVAL2"] = float(ra_c), float(dec_c)
    h["CRPIX1"] = h["CRPIX2"] = (config.size_pix + 1) / 2.0  # FITS pixels are 1-based
    h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = -scale_deg, 0.0, 0.0, scale_deg
    h["RADESYS"] = "ICRS"
    return h


def _blobs(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Shape and r-band flux of ``n`` blobs: half Gaussian, half exponential, mildly elliptical."""
    mag_r = rng.uniform(19.0, 25.0, n)
    return {"flux_r": 10 ** (0.4 * (MAGZERO - mag_r)),
            "scale_pix": rng.uniform(1.2, 3.5, n),
            "axis_ratio": rng.uniform(0.5, 1.0, n),
            "angle_rad": rng.uniform(0.0, np.pi, n),
            "exponential": rng.random(n) < 0.5,
            "colour_jitter": rng.lognormal(0.0, 0.2, (n, 1))}


def _blob_stamps(x: np.ndarray, y: np.ndarray, blobs: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Unit-flux profiles of every blob on a (2h+1)^2 pixel square, and the squares' pixel indices.

    Returns ``(profiles (n, w, w) float32, (iy, ix) (n, w, w) int)`` with ``w = 2h + 1`` centred
    on the nearest pixel; the sub-pixel offset is kept in the profile.
    """
    h = BLOB_HALF_PIX
    offsets = np.arange(-h, h + 1)
    cx, cy = np.rint(x).astype(np.int64), np.rint(y).astype(np.int64)
    iy = cy[:, None, None] + offsets[None, :, None]
    ix = cx[:, None, None] + offsets[None, None, :]
    dx = (ix - x[:, None, None]).astype(np.float32)
    dy = (iy - y[:, None, None]).astype(np.float32)
    cos = np.cos(blobs["angle_rad"]).astype(np.float32)[:, None, None]
    sin = np.sin(blobs["angle_rad"]).astype(np.float32)[:, None, None]
    q = blobs["axis_ratio"].astype(np.float32)[:, None, None]
    s = blobs["scale_pix"].astype(np.float32)[:, None, None]
    u = (dx * cos + dy * sin) / s
    v = (dy * cos - dx * sin) / (s * q)
    r2 = u * u + v * v
    profile = np.where(blobs["exponential"][:, None, None], np.exp(-np.sqrt(r2)), np.exp(-0.5 * r2))
    profile /= profile.sum(axis=(1, 2), keepdims=True)
    return profile.astype(np.float32), np.broadcast_arrays(iy, ix)


def write_tile(config: SyntheticSurveyConfig, tile_index: int,
               tiles_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Draw and write one tile's bands; return its objects' (ra, dec) in degrees.

    Every random number comes from a generator keyed by (seed, tile), so a tile's pixels do not
    depend on how many workers drew the survey or in which order.
    """
    rng = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(tile_index,)))
    n, size = config.objects_per_tile, config.size_pix
    margin = config.overlap_pix / 2 + BLOB_HALF_PIX + 1
    x = rng.uniform(margin, size - 1 - margin, n)
    y = rng.uniform(margin, size - 1 - margin, n)
    blobs = _blobs(rng, n)
    profiles, (iy, ix) = _blob_stamps(x, y, blobs)
    flat_index = (iy * size + ix).ravel()
    header = tile_header(config, tile_index)
    name = tile_names(config.n_tiles)[tile_index]
    for band in config.bands:
        sky_sigma, colour = BAND_NOISE_AND_COLOUR[band]
        flux = (blobs["flux_r"][:, None] * colour * blobs["colour_jitter"]).astype(np.float32)
        image = rng.standard_normal((size, size), dtype=np.float32)
        image *= sky_sigma
        # bincount sums blobs that overlap, which fancy-index assignment would not.
        light = np.bincount(flat_index, weights=(profiles * flux[:, :, None]).ravel(), minlength=size * size)
        image += light.reshape(size, size).astype(np.float32)
        band_header = header.copy()
        band_header["EXTNAME"] = (band, "band")
        band_header["BAND"] = (band, "photometric band")
        band_header["TILENAME"] = (name, "tile name")
        band_header["BUNIT"] = ("adu", "counts (see MAGZERO)")
        band_header["MAGZERO"] = (MAGZERO, "AB: mag = MAGZERO - 2.5 log10(counts)")
        band_header["SEEING"] = (0.9, "[arcsec] nominal; blobs are not PSF-convolved")
        band_header["SKYSUB"] = (True, "sky subtracted")
        band_header["SKYSIG"] = (sky_sigma, "[adu] rms sky noise per pixel")
        band_header["GAIN"] = (1.0, "[e-/adu] nominal")
        band_header["PIXSCALE"] = (config.pixel_scale_arcsec, "[arcsec/pix] pixel scale")
        band_header["ORIGIN"] = ("benchmarks/synthetic_survey.py", "synthetic image, for rates only")
        path = os.path.join(tiles_dir, TILE_PATTERN.format(tile=name, band=band))
        fits.PrimaryHDU(data=image, header=band_header).writeto(path, overwrite=True)
    ra, dec = WCS(header).wcs_pix2world(x, y, 0)
    return ra, dec


def write_survey(out: str, config: SyntheticSurveyConfig, workers: int = 1) -> dict:
    """Write ``out/tiles/{tile}_{band}.fits``, ``out/catalog.parquet`` and ``out/survey.json``.

    Returns the ``survey.json`` description: URLs, tile pattern, tiles, bands, config, objects.
    """
    started = time.perf_counter()
    root = os.path.abspath(out)
    tiles_dir = os.path.join(root, "tiles")
    os.makedirs(tiles_dir, exist_ok=True)
    indices = range(config.n_tiles)
    if workers > 1 and config.n_tiles > 1:
        with ProcessPoolExecutor(max_workers=min(workers, config.n_tiles)) as pool:
            positions = list(pool.map(write_tile, [config] * config.n_tiles, indices,
                                      [tiles_dir] * config.n_tiles))
    else:
        positions = [write_tile(config, k, tiles_dir) for k in indices]
    ra = np.concatenate([p[0] for p in positions])
    dec = np.concatenate([p[1] for p in positions])
    # Its own stream, after the tiles' (keyed 0 .. n_tiles - 1).
    shuffle = np.random.default_rng(np.random.SeedSequence(config.seed, spawn_key=(2**31,)))
    order = shuffle.permutation(len(ra))
    catalog = pa.table({"objid": pa.array(np.arange(1, len(ra) + 1, dtype=np.int64)),
                        "ra": pa.array(ra[order]), "dec": pa.array(dec[order])})
    catalog_path = os.path.join(root, "catalog.parquet")
    buffer = io.BytesIO()
    pq.write_table(catalog, buffer)
    Path(catalog_path).write_bytes(buffer.getvalue())
    description = {"tiles_url": tiles_dir, "catalog_url": catalog_path, "tile_pattern": TILE_PATTERN,
                   "tiles": tile_names(config.n_tiles), "bands": list(config.bands), "objects": len(ra),
                   "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
                   "seconds": time.perf_counter() - started, "workers": workers}
    # Written last: its presence says the survey is complete.
    Path(root, "survey.json").write_text(json.dumps(description, indent=1))
    return description


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = SyntheticSurveyConfig()
    ap.add_argument("--out", required=True, help="directory to write tiles/, catalog.parquet, survey.json")
    ap.add_argument("--tiles", type=int, default=defaults.n_tiles,
                    help="number of tiles (default: %(default)s)")
    ap.add_argument("--size", type=int, default=defaults.size_pix,
                    help="tile side in pixels (default: %(default)s)")
    ap.add_argument("--objects-per-tile", type=int, default=defaults.objects_per_tile,
                    help="catalogued objects per tile (default: %(default)s)")
    ap.add_argument("--bands", default=",".join(defaults.bands), help="bands (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=defaults.seed, help="random seed (default: %(default)s)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="processes drawing tiles side by side (default: the CPUs, %(default)s)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        config = SyntheticSurveyConfig(n_tiles=args.tiles, size_pix=args.size,
                                       objects_per_tile=args.objects_per_tile,
                                       bands=tuple(b.strip() for b in args.bands.split(",") if b.strip()),
                                       seed=args.seed)
    except ValueError as exc:
        print(f"synthetic_survey: refused: {exc}", file=sys.stderr)
        return 2
    d = write_survey(args.out, config, workers=max(1, args.workers))
    gib = config.n_tiles * len(config.bands) * config.size_pix**2 * 4 / 2**30
    logger.info("%d tiles of %d px in %s (%.2f GiB of FITS), %d objects, in %.1f s with %d worker(s)",
                config.n_tiles, config.size_pix, ",".join(config.bands), gib, d["objects"], d["seconds"],
                args.workers)
    print(f"--tiles {d['tiles_url']} --catalog {d['catalog_url']} --tile-pattern '{d['tile_pattern']}'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
