"""Survey tiles: find them, read their headers (footprints) and, once per tile, their pixels.

Two band layouts (DESIGN.md input contract): one file per band per tile, named by a pattern such as
``{tile}_{band}.fits``, or one multi-extension file per tile (pattern ``{tile}.fits``) whose image
HDUs carry ``EXTNAME`` = band. Either may be Rice tile-compressed (``.fits.fz``) or gzipped
(``.fits.gz``); without a pattern both layouts are discovered, also mixed in one folder.
"""

from __future__ import annotations

import gzip
import io
import logging
import posixpath
import re
import warnings
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
from astropy.io import fits
from astropy.wcs import WCS, FITSFixedWarning

from scanner import storage
from scanner.layout import tile_name_problem

logger = logging.getLogger(__name__)

# Survey headers often carry non-standard but harmless keywords that astropy 'fixes' noisily.
warnings.filterwarnings("ignore", category=FITSFixedWarning)
# Truncated files become tile failures naming the file (_check_complete); astropy's own warning
# would only repeat it without saying which tile pays.
warnings.filterwarnings("ignore", message="File may have been truncated")


class TileError(RuntimeError):
    """A tile that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class BandSource:
    """Where one band of one tile lives: a file URL and the HDU inside it."""

    url: str
    hdu: int | str


@dataclass
class Tile:
    """One survey tile: its bands' sources and, once headers are read, its geometry."""

    name: str
    sources: dict[str, BandSource]
    shape: tuple[int, int] | None = None  # (ny, nx)
    headers: dict[str, str] = field(default_factory=dict)  # band -> header text (WCS source)
    error: str | None = None  # why the tile cannot be scanned; its objects become failure rows
    pattern: str | None = None  # the file-name pattern it was found by, e.g. '{tile}.fits.fz'

    def to_dict(self) -> dict:
        return {"name": self.name, "shape": self.shape, "error": self.error, "headers": self.headers,
                "sources": {b: {"url": s.url, "hdu": s.hdu} for b, s in self.sources.items()},
                "pattern": self.pattern}

    @classmethod
    def from_dict(cls, d: dict) -> "Tile":
        return cls(d["name"], {b: BandSource(**s) for b, s in d["sources"].items()},
                   tuple(d["shape"]) if d["shape"] else None, dict(d["headers"]), d["error"],
                   d.get("pattern"))

    def wcs(self, band: str) -> WCS:
        return WCS(fits.Header.fromstring(self.headers[band]), naxis=2)


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Regex that parses a file name made by ``pattern`` into its ``tile`` and ``band`` parts."""
    parts = re.split(r"(\{tile\}|\{band\})", pattern)
    rx = ""
    for p in parts:
        if p == "{tile}":
            rx += r"(?P<tile>.+?)"
        elif p == "{band}":
            rx += r"(?P<band>[^_./]+)"
        else:
            rx += re.escape(p)
    return re.compile(rx + r"$")


def _glob_of(pattern: str) -> str:
    return pattern.replace("{tile}", "*").replace("{band}", "*")


def discover_tiles(tiles_url: str, bands: Sequence[str], pattern: str | None = None) -> list[Tile]:
    """List the tiles under ``tiles_url`` with each band's source.

    With ``{band}`` in ``pattern`` each band is its own file; without it each file is a
    multi-extension tile whose image HDUs are found by ``EXTNAME`` when headers are read.
    ``pattern=None`` discovers both layouts (:func:`_discover`). A tile missing a requested band
    is kept with ``error`` set, so its objects are reported.
    """
    fs, root = storage.filesystem(tiles_url)
    if pattern is None:
        found, patterns = _discover(fs, root, tiles_url, bands)
    else:
        found, patterns = _match_pattern(fs, root, tiles_url, bands, pattern)
    tiles = []
    for name, sources in sorted(found.items()):
        tile = Tile(name, sources, pattern=patterns[name])
        missing = [b for b in bands if b not in sources]
        if missing:
            tile.error = (f"tile {name} lacks band(s) {','.join(missing)} "
                          f"(no file matching {patterns[name].replace('{tile}', name)})")
        tiles.append(tile)
    return tiles


def _list_files(fs, root: str, tiles_url: str, glob: str) -> list[str]:
    try:
        return sorted(storage.with_retries(lambda: fs.glob(posixpath.join(root, glob)),
                                           f"list {tiles_url}"))
    except FileNotFoundError:
        return []


Found = tuple[dict[str, dict[str, BandSource]], dict[str, str]]


def _match_pattern(fs, root: str, tiles_url: str, bands: Sequence[str], pattern: str) -> Found:
    """Tiles named by an explicit ``--tile-pattern``."""
    if "{tile}" not in pattern:
        raise ValueError(f"tile pattern {pattern!r} lacks '{{tile}}'; e.g. '{{tile}}_{{band}}.fits'")
    paths = _list_files(fs, root, tiles_url, _glob_of(pattern))
    rx = _pattern_regex(pattern)
    per_band = "{band}" in pattern
    found: dict[str, dict[str, BandSource]] = {}
    for path in paths:
        m = rx.match(posixpath.basename(path))
        if not m:
            continue
        url = storage.full_url(fs, path)
        name = m.group("tile")
        if per_band:
            band = m.group("band")
            if band in bands:
                found.setdefault(name, {})[band] = BandSource(url, -1)
            else:
                found.setdefault(name, {})
        else:
            found[name] = {b: BandSource(url, b) for b in bands}
    if not found:
        raise FileNotFoundError(
            f"no tiles match {posixpath.join(tiles_url, pattern)!r}: check --tiles and --tile-pattern")
    if per_band:
        present = {b for sources in found.values() for b in sources}
        absent = [b for b in bands if b not in present]
        if absent:
            names = sorted({m.group("band") for m in map(rx.match, map(posixpath.basename, paths)) if m})
            _refuse_absent_bands(tiles_url, absent, names)
    return found, {name: pattern for name in found}


#: File names lensscan recognises as tiles when no ``--tile-pattern`` is given.
TILE_FILE = re.compile(r"^(?P<stem>.+)(?P<ext>\.fits(?:\.fz|\.gz)?)$")
PER_BAND_STEM = re.compile(r"^(?P<tile>.+)_(?P<band>[^_./]+)$")


def _discover(fs, root: str, tiles_url: str, bands: Sequence[str]) -> Found:
    """Tiles in both layouts, each plain, ``.fits.fz`` or ``.fits.gz``, mixed if need be.

    A file ``<tile>_<band>.fits*`` is one band of a per-band tile when some file of that tile is a
    requested band (its other bands, say ``z`` in a g,r,i scan, are then left alone); any other
    ``<name>.fits*`` is a multi-extension tile named ``<name>``. A tile found by two patterns (two
    layouts, or ``.fits`` and ``.fits.fz`` copies) is ambiguous: refused, pointing at
    ``--tile-pattern``.
    """
    files = [(path, m) for path in _list_files(fs, root, tiles_url, "*.fits*")
             if (m := TILE_FILE.match(posixpath.basename(path)))]
    if not files:
        raise FileNotFoundError(
            f"no FITS tiles under {tiles_url}: looked for {{tile}}_{{band}}.fits (a file per band) "
            f"and {{tile}}.fits (multi-extension), each also .fits.fz or .fits.gz; check --tiles, "
            f"or give --tile-pattern when the files are named otherwise")
    per_band_stems: dict[str, list[tuple[str, str, str]]] = {}
    for path, m in files:
        pb = PER_BAND_STEM.match(m.group("stem"))
        if pb:
            per_band_stems.setdefault(pb.group("tile"), []).append((pb.group("band"), path, m.group("ext")))
    per_band_tiles = {name for name, entries in per_band_stems.items()
                      if any(band in bands for band, _, _ in entries)}
    # The survey's other bands (z in a g,r,i scan) mark a tile lacking every requested band.
    survey_bands = {band for name in per_band_tiles for band, _, _ in per_band_stems[name]}
    per_band_tiles |= {name for name, entries in per_band_stems.items()
                       if any(band in survey_bands for band, _, _ in entries)}
    found: dict[str, dict[str, BandSource]] = {}
    patterns: dict[str, str] = {}
    first_file: dict[str, str] = {}
    all_bands: set[str] = set()

    def claim(name: str, path: str, pattern: str) -> None:
        if name in patterns and patterns[name] != pattern:
            raise ValueError(f"tile {name} is both {first_file[name]} and {path} ({patterns[name]} "
                             f"and {pattern}); keep one layout and one kind of file per tile, or "
                             f"choose one with --tile-pattern")
        patterns[name] = pattern
        first_file.setdefault(name, path)

    for path, m in files:
        url = storage.full_url(fs, path)
        pb = PER_BAND_STEM.match(m.group("stem"))
        if pb and pb.group("tile") in per_band_tiles:
            name, band = pb.group("tile"), pb.group("band")
            claim(name, path, "{tile}_{band}" + m.group("ext"))
            all_bands.add(band)
            sources = found.setdefault(name, {})
            if band in bands:
                sources[band] = BandSource(url, -1)
        else:
            name = m.group("stem")
            claim(name, path, "{tile}" + m.group("ext"))
            found[name] = {b: BandSource(url, b) for b in bands}
    if per_band_tiles and len(per_band_tiles) == len(found):
        # Only per-band files: a requested band that no file has is a wrong --bands.
        present = {b for sources in found.values() for b in sources}
        absent = [b for b in bands if b not in present]
        if absent:
            _refuse_absent_bands(tiles_url, absent, sorted(all_bands))
    return found, patterns


def _refuse_absent_bands(tiles_url: str, absent: Sequence[str], present: Sequence[str]) -> None:
    raise ValueError(f"no tile under {tiles_url} has band(s) {','.join(absent)}; the files have "
                     f"bands {','.join(present)}: check --bands")


def describe_layout(tiles: Sequence[Tile]) -> str:
    """How the tiles were found, e.g. '9 tiles: 6 as {tile}_{band}.fits, 3 as {tile}.fits.fz'."""
    counts: dict[str, int] = {}
    for t in tiles:
        counts[t.pattern or "?"] = counts.get(t.pattern or "?", 0) + 1
    parts = [f"{n} as {p}" for p, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return f"{len(tiles)} tile{'s' if len(tiles) != 1 else ''}: " + ", ".join(parts)


GZIP_MAGIC = b"\x1f\x8b"


def _is_local(url: str) -> bool:
    return storage.protocol_of(storage.filesystem(url)[0]) in ("file", "local")


def _open_hdul(url: str, headers_only: bool = False, memmap: bool = True) -> fits.HDUList:
    """Open a FITS file: memory-mapped when local; on remote storage, either a seekable stream
    that fetches only the header blocks (for footprints) or the whole object in one request
    (for pixels, which are read once per tile). Gzipped files (``.fits.gz``) are decompressed as
    they are read. ``memmap=False`` for scaled-integer images, which astropy cannot memory-map."""
    fs, path = storage.filesystem(url)
    if storage.protocol_of(fs) in ("file", "local"):
        return fits.open(path, memmap=memmap, lazy_load_hdus=True)  # astropy reads gzip itself
    if headers_only:
        stream = fs.open(path, "rb", block_size=2880 * 32)
        gzipped = stream.read(2) == GZIP_MAGIC
        stream.seek(0)
        return fits.open(gzip.GzipFile(fileobj=stream) if gzipped else stream, lazy_load_hdus=True)
    data = storage.read_bytes(url)
    if data[:2] == GZIP_MAGIC:
        data = gzip.decompress(data)
    return fits.open(io.BytesIO(data), lazy_load_hdus=True)


def _is_scaled(hdu) -> bool:
    """Whether the image is stored as scaled integers (BSCALE/BZERO/BLANK), as archives often do."""
    return (not isinstance(hdu, fits.CompImageHDU)
            and any(k in hdu.header for k in ("BSCALE", "BZERO", "BLANK")))


def _check_complete(hdu, url: str, idx: int) -> None:
    """Refuse an HDU whose data the file does not hold (a truncated download or copy), so the
    tile fails when its headers are read and its objects can go to an overlapping tile."""
    info = hdu.fileinfo()
    handle = info.get("file") if info else None
    size = getattr(handle, "size", 0)
    if handle is None or getattr(handle, "compression", None) or not size:
        return
    end = info["datLoc"] + info["datSpan"]
    # The last HDU may lack the padding to a whole 2880-byte block and still hold all its data.
    if size < end - 2879:
        raise TileError(f"{url}: truncated: the file has {size} bytes but the data of HDU {idx} end "
                        f"at byte {end}; fetch or write the file again")


def _image_hdu_index(hdul: fits.HDUList, want: int | str, url: str) -> int:
    """Index of the image HDU: by EXTNAME for multi-extension tiles, else the first 2-D image."""
    for i, hdu in enumerate(hdul):
        if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)):
            continue
        hdr = hdu.header
        if hdr.get("NAXIS", 0) != 2:
            continue
        if isinstance(want, str):
            # astropy upper-cases EXTNAME given as name=; survey files may use either case.
            if str(hdr.get("EXTNAME", "")).strip().lower() == want.lower():
                return i
        else:
            return i
    if isinstance(want, str):
        names = [str(h.header.get("EXTNAME", "")) for h in hdul]
        raise TileError(f"{url}: no image HDU with EXTNAME={want!r} (found {names}); "
                        f"check --bands against the file's extensions")
    raise TileError(f"{url}: no 2-D image HDU; is this a survey image?")


def _check_celestial(header: fits.Header, url: str) -> None:
    wcs = WCS(header, naxis=2)
    if not wcs.has_celestial or not wcs.wcs.ctype[0]:
        raise TileError(f"{url}: header has no celestial WCS (CTYPE1/2, CRVAL, CRPIX, CD); "
                        f"tiles must be astrometrically calibrated")


# Header cards worth keeping beyond the WCS: photometry and PSF for injection, identity for errors.
KEPT_CARDS = ("NAXIS1", "NAXIS2", "BAND", "FILTER", "EXTNAME", "MAGZERO", "MAGZPT", "ZP", "SEEING",
              "FWHM", "PSFBETA", "SKYLEVEL", "SKYSIG", "GAIN", "EXPTIME", "PIXSCALE", "TILENAME")


def compact_header(hdr: fits.Header) -> str:
    """The header cards the scan and training use (WCS, photometry, PSF), as text.

    Full survey headers run to many kilobytes each; the plan keeps one per band per tile, so it
    keeps only these to stay small for surveys of 10^5 tiles.
    """
    out = WCS(hdr, naxis=2).to_header(relax=True)
    for key in KEPT_CARDS:
        if key in hdr:
            out[key] = hdr[key]
    return out.tostring()


def _read_band_header(tile: Tile, band: str, hduls: dict[str, fits.HDUList]) -> fits.Header:
    src = tile.sources[band]
    try:
        hdul = hduls.get(src.url)
        if hdul is None:
            hdul = storage.with_retries(lambda: _open_hdul(src.url, headers_only=True), f"open {src.url}")
            hduls[src.url] = hdul
        idx = _image_hdu_index(hdul, src.hdu, src.url)
        hdr = hdul[idx].header
        _check_complete(hdul[idx], src.url, idx)
    except TileError:
        raise
    except Exception as exc:  # noqa: BLE001 - any unreadable file costs its tile, not the scan
        raise TileError(f"{src.url}: cannot read FITS header ({type(exc).__name__}: {exc}); is it a "
                        f"complete FITS file?") from exc
    tile.sources[band] = BandSource(src.url, idx)
    return hdr


def read_headers(tile: Tile) -> Tile:
    """Fill ``tile.shape`` and per-band WCS headers, reading headers only; errors go to ``tile.error``.

    A tile with one bad or missing band still gets its footprint from the bands that read, so
    the objects on it are reported as failures of that tile, with its reason, rather than as
    objects off every tile.
    """
    problem = tile_name_problem(tile.name)
    if problem:
        files = ", ".join(sorted({s.url for s in tile.sources.values()})) or "its files"
        tile.error = (f"tile name {tile.name!r} ({files}) {problem}; tile names become folder names "
                      f"in the output: rename the file(s)")
        return tile
    hduls: dict[str, fits.HDUList] = {}
    errors = [tile.error] if tile.error else []
    shape = None
    for band in list(tile.sources):
        try:
            hdr = _read_band_header(tile, band, hduls)
            _check_celestial(hdr, tile.sources[band].url)
            band_shape = (int(hdr["NAXIS2"]), int(hdr["NAXIS1"]))
            if shape is not None and band_shape != shape:
                raise TileError(f"tile {tile.name}: band {band} is {band_shape} pixels, other bands "
                                f"{shape}; bands of one tile must share the pixel grid")
            shape = band_shape
            tile.headers[band] = compact_header(hdr)
        except TileError as exc:
            errors.append(str(exc))
    for hdul in hduls.values():
        hdul.close()
    if tile.headers:
        first = next(iter(tile.headers))
        ref = tile.wcs(first)
        for band in tile.headers:
            other = tile.wcs(band)
            if not (np.allclose(ref.wcs.crval, other.wcs.crval, atol=1e-9)
                    and np.allclose(ref.wcs.crpix, other.wcs.crpix, atol=1e-6)
                    and np.allclose(ref.pixel_scale_matrix, other.pixel_scale_matrix, rtol=1e-9)):
                errors.append(f"tile {tile.name}: band {band} WCS differs from band {first}; bands "
                              f"of one tile must share the pixel grid (resample to a common grid)")
        tile.shape = shape
    tile.error = errors[0] if errors else None
    return tile


def read_pixels(tile: Tile, bands: Sequence[str]) -> np.ndarray:
    """Return the tile's pixels as a float32 array (n_bands, ny, nx), bands in the given order.

    Raises :class:`TileError` naming the file for truncated, non-FITS or all-NaN data.
    """
    out = None
    by_url: dict[str, fits.HDUList] = {}
    unmapped: set[str] = set()  # local files reopened without memory-mapping
    try:
        for c, band in enumerate(bands):
            src = tile.sources[band]
            hdul = by_url.get(src.url)
            if hdul is None:
                hdul = storage.with_retries(lambda: _open_hdul(src.url), f"open {src.url}")
                by_url[src.url] = hdul
            idx = src.hdu if isinstance(src.hdu, int) and src.hdu >= 0 else _image_hdu_index(hdul, src.hdu, src.url)
            if _is_scaled(hdul[idx]) and src.url not in unmapped and _is_local(src.url):
                hdul.close()
                hdul = by_url[src.url] = _open_hdul(src.url, memmap=False)
                unmapped.add(src.url)
            try:
                data = hdul[idx].data
            except Exception as exc:  # noqa: BLE001
                raise TileError(f"{src.url}: cannot read the pixel data of HDU {idx} "
                                f"({type(exc).__name__}: {exc})") from exc
            if data is None or data.ndim != 2:
                raise TileError(f"{src.url}: HDU {idx} holds no 2-D image")
            if out is None:
                out = np.empty((len(bands),) + data.shape, dtype=np.float32)
            if data.shape != out.shape[1:]:
                raise TileError(f"tile {tile.name}: band {band} shape {data.shape} differs from "
                                f"{out.shape[1:]}")
            out[c] = data
            if not np.isfinite(out[c]).any():
                raise TileError(f"{src.url}: band {band} of tile {tile.name} is all NaN/inf")
    finally:
        for hdul in by_url.values():
            hdul.close()
    assert out is not None
    return out


def tile_footprint(tile: Tile) -> tuple[np.ndarray, float]:
    """Unit vector of the tile centre and the angular radius (radians) enclosing its corners."""
    assert tile.shape is not None
    ny, nx = tile.shape
    wcs = tile.wcs(next(iter(tile.headers)))
    xs = np.array([-0.5, nx - 0.5, nx - 0.5, -0.5, (nx - 1) / 2])
    ys = np.array([-0.5, -0.5, ny - 0.5, ny - 0.5, (ny - 1) / 2])
    ra, dec = wcs.pixel_to_world_values(xs, ys)
    vec = radec_to_unit(np.asarray(ra), np.asarray(dec))
    centre = vec[-1]
    radius = float(np.max(np.arccos(np.clip(vec[:4] @ centre, -1.0, 1.0))))
    return centre, radius


def radec_to_unit(ra_deg: np.ndarray, dec_deg: np.ndarray) -> np.ndarray:
    """Unit vectors (N, 3) on the sphere for ICRS coordinates in degrees."""
    ra = np.radians(ra_deg)
    dec = np.radians(dec_deg)
    cd = np.cos(dec)
    return np.stack([cd * np.cos(ra), cd * np.sin(ra), np.sin(dec)], axis=-1)


def usable(tiles: Iterable[Tile]) -> list[Tile]:
    return [t for t in tiles if t.shape is not None]
