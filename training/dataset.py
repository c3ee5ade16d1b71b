"""The training-set builder: survey stamps in pools, split by sky region, as sharded Parquet.

``lensscan build-dataset`` cuts a raw stamp around every catalog object with the scanner's own
code (``scanner.plan.make_plan`` streams the catalog onto the tiles, ``scanner.tiles.read_pixels``
reads each tile once, ``scanner.cutouts.cut_stamps`` cuts), measures each stamp's photometry
(``training.measure``) and sorts it into one pool:

- ``deflector``: bright, red, resolved galaxies (``DeflectorCuts``) on clean stamps: where lenses
  are injected, and, un-injected, negatives that stop a model equating "red galaxy" with "lens";
- ``non_lens``: a random ``non_lens_fraction`` of the other objects, labelled negatives (strong
  lenses are ~1 in 10^3-10^4 galaxies, so a random survey object is a non-lens);
- ``unlabelled``: everything else, for semi-supervised methods;
- ``known_lens``: objects the ``--truth`` table marks as lenses: never a negative or unlabelled,
  labelled positive (``label`` 1) for whoever wants to train or evaluate on them.

Each object is also in a sky-region split (``training.split``): ``train`` or ``holdout``;
training objects within one stamp width of held-out sky are left out (counted as ``guard``).

Stamps are stored raw (counts, float32, NaN where missing) with each band's zero point, seeing,
Moffat index, sky noise, gain and the pixel scale, because injection paints counts into raw
stamps and only then normalises them with ``scanner.normalise`` (float16 is not safe: bright
cores exceed its 65504 maximum). Layout under ``--out``::

    dataset.json                                   # config, input spec, counts: written last
    stamps/split=<split>/pool=<pool>/<tile>-<k>.parquet
    failures/                                      # objects that got no stamp, with the reason
    _plan/                                         # the scanner's plan of objects per tile

Example
-------
>>> from training.dataset import DatasetConfig, build_dataset, read_pool   # doctest: +SKIP
>>> build_dataset(DatasetConfig(tiles="survey/tiles", catalog="survey/catalog.parquet",
...                             out="ds", truth="survey/truth.parquet"))   # doctest: +SKIP
>>> deflectors = read_pool("ds", "deflector", split="train")   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import posixpath
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from scanner import __version__, storage
from scanner.catalog import table_to_bytes
from scanner.config import InputSpec
from scanner.cutouts import cut_stamps
from scanner.plan import failure_table, failures_dir, make_plan, read_tile_objects
from scanner.tiles import Tile, TileError, read_pixels
from training.bands import (DEFAULT_SEEING_FWHM_ARCSEC, BandMeta, HeaderConditions,
                            read_header_conditions)
from training.measure import DeflectorCuts, is_deflector, measure_stamps
from training.psf import measure_seeing_fwhm
from training.split import SkySplit, assign_split, unit_hash

logger = logging.getLogger(__name__)

POOLS = ("deflector", "non_lens", "unlabelled", "known_lens")
LABELS = {"deflector": 0, "non_lens": 0, "unlabelled": -1, "known_lens": 1}
METADATA_KEY = b"lensscan.dataset"
_PER_BAND = ("magzero", "psf_fwhm_arcsec", "psf_beta", "sky_sigma", "gain")
# Keys mixing objids into the pool hash, so pool and sky-cell draws stay independent.
_POOL_HASH_KEY = 0x5EED


class DatasetError(ValueError):
    """A dataset that cannot be built or read; the message names the input and the fix."""


@dataclass(frozen=True)
class DatasetConfig:
    """Everything ``build_dataset`` needs; written into ``dataset.json``.

    Parameters
    ----------
    tiles, catalog, out : str
        Tile directory URL, object catalog URL (Parquet or CSV: objid, ra, dec), output URL.
    bands : tuple of str
        Bands in channel order.
    tile_pattern : str
        Tile file names, as for ``lensscan scan``.
    truth : str, optional
        Parquet or CSV with ``objid`` and ``is_lens``: known lenses go to the ``known_lens`` pool
        and never become negatives.
    stamp_size_pix, pixel_scale_arcsec : int, float
        The model input spec's stamp size and pixel scale; tiles of another scale are refused.
    deflector_cuts : DeflectorCuts
        What makes a deflector.
    holdout_fraction, split_cell_deg : float
        The sky-region split (``training.split.SkySplit``); its guard band is one stamp width.
    non_lens_fraction : float
        Share of non-deflector objects labelled non-lens; the rest are unlabelled.
    max_missing_fraction : float
        Stamps with more of their pixels outside the tile or masked go to ``failures/``.
    shard_rows : int
        Rows per Parquet shard (2048 stamps of 64x64x3 float32 ~ 100 MB uncompressed).
    default_magzero : float, optional
        Zero point for tiles whose headers lack ``MAGZERO``; without it such tiles are refused.
    seed : int
        Seeds the split and the non-lens/unlabelled draw: one seed, one dataset.
    overwrite : bool
        Replace a dataset already in ``out``.
    """

    tiles: str
    catalog: str
    out: str
    bands: tuple[str, ...] = ("g", "r", "i")
    tile_pattern: str = "{tile}_{band}.fits"
    truth: str | None = None
    stamp_size_pix: int = 64
    pixel_scale_arcsec: float = 0.26
    deflector_cuts: DeflectorCuts = field(default_factory=DeflectorCuts)
    holdout_fraction: float = 0.2
    split_cell_deg: float = 0.25
    non_lens_fraction: float = 0.5
    max_missing_fraction: float = 0.5
    shard_rows: int = 2048
    default_magzero: float | None = None
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "bands", tuple(self.bands))
        self.input_spec  # validates bands and stamp size
        self.sky_split  # validates the split
        self.deflector_cuts.check_bands(self.bands)
        if not 0 <= self.non_lens_fraction <= 1:
            raise DatasetError(f"non_lens_fraction={self.non_lens_fraction}: expected 0..1")
        if not 0 <= self.max_missing_fraction < 1:
            raise DatasetError(f"max_missing_fraction={self.max_missing_fraction}: expected 0..1")
        if self.shard_rows < 1:
            raise DatasetError(f"shard_rows={self.shard_rows}: expected >= 1")

    @property
    def input_spec(self) -> InputSpec:
        return InputSpec(bands=self.bands, stamp_size_pix=self.stamp_size_pix,
                         pixel_scale_arcsec=self.pixel_scale_arcsec)

    @property
    def sky_split(self) -> SkySplit:
        return SkySplit(holdout_fraction=self.holdout_fraction, cell_deg=self.split_cell_deg,
                        guard_arcsec=self.stamp_size_pix * self.pixel_scale_arcsec, seed=self.seed)

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["bands"] = list(self.bands)
        d["deflector_cuts"] = self.deflector_cuts.to_dict()
        return d


@dataclass
class DatasetSummary:
    """What a build wrote: rows per split and pool, objects left out and why."""

    out: str
    counts: dict[str, dict[str, int]]
    n_guard: int
    n_failed: int
    seconds: float

    def __str__(self) -> str:
        lines = [f"dataset {self.out}: {self.seconds:.1f} s"]
        for split, pools in self.counts.items():
            lines.append(f"  {split:8s} " + "  ".join(f"{p}={n}" for p, n in pools.items()))
        lines.append(f"  left out: {self.n_guard} within one stamp of held-out sky (guard), "
                     f"{self.n_failed} without a usable stamp (see failures/)")
        return "\n".join(lines)


@dataclass
class StampSet:
    """Raw stamps of one pool (or a batch of it), their band metadata and their catalog rows."""

    stamps: np.ndarray  # (N, C, S, S) float32 raw counts, NaN where missing
    meta: BandMeta
    rows: pa.Table  # objid, ra, dec, tile, x, y, flags, label, measurements, ...

    def __len__(self) -> int:
        return len(self.stamps)

    def take(self, index: np.ndarray) -> "StampSet":
        """The stamps at ``index`` (integer positions), in that order."""
        index = np.asarray(index, dtype=np.int64)
        return StampSet(self.stamps[index], self.meta[index], self.rows.take(pa.array(index)))


# --------------------------------------------------------------------------------------------
# Inputs


def read_known_lenses(url: str, batch_rows: int = 1_000_000) -> np.ndarray:
    """Objids (sorted) the truth table marks ``is_lens``; reads just those two columns."""
    if not storage.exists(url):
        raise DatasetError(f"{url}: truth table not found; check --truth")
    fs, path = storage.filesystem(url)
    lenses = []
    if url.lower().endswith((".csv", ".csv.gz", ".txt")):
        import pyarrow.csv as pacsv

        with fs.open(path, "rb") as f:
            table = pacsv.read_csv(f)
        batches: Iterator[pa.RecordBatch] = iter(table.to_batches(batch_rows))
    else:
        pf = pq.ParquetFile(fs.open(path, "rb"))
        missing = {"objid", "is_lens"} - set(pf.schema_arrow.names)
        if missing:
            raise DatasetError(f"{url}: truth table lacks column(s) {sorted(missing)}; it needs "
                               f"objid and is_lens")
        batches = pf.iter_batches(batch_size=batch_rows, columns=["objid", "is_lens"])
    for batch in batches:
        names = batch.schema.names
        if "objid" not in names or "is_lens" not in names:
            raise DatasetError(f"{url}: truth table lacks objid or is_lens; found {names[:10]}")
        is_lens = batch.column(names.index("is_lens")).cast(pa.bool_()).fill_null(False)
        lenses.append(np.asarray(pc.filter(batch.column(names.index("objid")), is_lens)
                                 .cast(pa.int64())))
    return np.unique(np.concatenate(lenses)) if lenses else np.zeros(0, np.int64)


def tile_band_conditions(tile: Tile, pixels: np.ndarray, config: DatasetConfig
                         ) -> list[HeaderConditions]:
    """Each band's conditions from its header, with the seeing measured where the header lacks it.

    Raises :class:`DatasetError` for a pixel scale other than the input spec's, or a missing
    zero point without ``default_magzero``.
    """
    out = []
    for c, band in enumerate(config.bands):
        where = f"tile {tile.name} band {band}"
        cond = read_header_conditions(tile.headers[band], where)
        if abs(cond.pixel_scale_arcsec / config.pixel_scale_arcsec - 1) > 0.01:
            raise DatasetError(f"{where}: pixel scale {cond.pixel_scale_arcsec:.4f}\" differs from "
                               f"--pixel-scale {config.pixel_scale_arcsec}\"; resample the tiles or "
                               f"build for their scale")
        if not math.isfinite(cond.magzero):
            if config.default_magzero is None:
                raise DatasetError(f"{where}: header has no MAGZERO; pass --magzero (the AB zero "
                                   f"point: mag = MAGZERO - 2.5 log10(counts))")
            cond = dataclasses.replace(cond, magzero=config.default_magzero)
        if not math.isfinite(cond.psf_fwhm_arcsec):
            fwhm, n_stars = measure_seeing_fwhm(pixels[c], cond.pixel_scale_arcsec, cond.psf_beta)
            if math.isfinite(fwhm):
                logger.info("%s: no SEEING in header; measured %.2f\" FWHM from %d stars", where,
                            fwhm, n_stars)
            else:
                fwhm = DEFAULT_SEEING_FWHM_ARCSEC
                logger.warning("%s: no SEEING in header and too few stars to measure it; assuming "
                               "%.2f\" FWHM (add a SEEING keyword)", where, fwhm)
            cond = dataclasses.replace(cond, psf_fwhm_arcsec=fwhm)
        if not math.isfinite(cond.gain):
            logger.warning("%s: no GAIN in header; injected light will get no photon noise of its "
                           "own (add a GAIN keyword, electrons per count)", where)
            cond = dataclasses.replace(cond, gain=math.inf)
        out.append(cond)
    return out


# --------------------------------------------------------------------------------------------
# Writing


def stamps_dir(out: str) -> str:
    return storage.join(out, "stamps")


def _schema(bands: Sequence[str], input_spec: dict[str, Any]) -> pa.Schema:
    """Columns of every shard; the bands and input spec ride in the schema metadata."""
    c, s = len(bands), int(input_spec["stamp_size_pix"])
    per_band = pa.list_(pa.float32(), c)
    fields = [("objid", pa.int64()), ("ra", pa.float64()), ("dec", pa.float64()),
              ("tile", pa.string()), ("x", pa.float64()), ("y", pa.float64()),
              ("flags", pa.int32()), ("missing_fraction", pa.float32()), ("label", pa.int8())]
    fields += [(f"mag_{b}", pa.float32()) for b in bands]
    fields += [(f"aper_mag_{b}", pa.float32()) for b in bands]
    fields += [("half_light_radius_arcsec", pa.float32()), ("size_arcsec", pa.float32()),
               ("centroid_offset_arcsec", pa.float32())]
    fields += [(name, per_band) for name in _PER_BAND]
    fields += [("pixel_scale_arcsec", pa.float32()), ("centre_offset_pix", pa.list_(pa.float32(), 2)),
               ("stamp", pa.fixed_shape_tensor(pa.float32(), (c, s, s)))]
    meta = {"bands": list(bands), "input_spec": input_spec,
            "stamp_units": "counts, sky-subtracted, NaN where missing"}
    return pa.schema(fields, metadata={METADATA_KEY: json.dumps(meta).encode()})


def _fixed_list(values: np.ndarray, width: int) -> pa.FixedSizeListArray:
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).ravel())
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _rows_table(schema: pa.Schema, cols: dict[str, np.ndarray], stamps: np.ndarray) -> pa.Table:
    arrays = []
    for f in schema:
        if f.name == "stamp":
            n = len(stamps)
            storage_array = _fixed_list(stamps.reshape(n, -1), int(np.prod(stamps.shape[1:])))
            arrays.append(pa.ExtensionArray.from_storage(f.type, storage_array))
        elif pa.types.is_fixed_size_list(f.type):
            arrays.append(_fixed_list(cols[f.name], f.type.list_size))
        else:
            arrays.append(pa.array(cols[f.name], type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def _write_failures(out: str, tile: str, objects: pa.Table, rows: np.ndarray, reasons: Any) -> None:
    if len(rows) == 0:
        return
    sel = pa.array(rows)
    t = failure_table(objects["objid"].take(sel), objects["ra"].take(sel), objects["dec"].take(sel),
                      tile, objects["row"].take(sel), "build-dataset", reasons)
    storage.write_bytes_atomic(storage.join(failures_dir(out), tile, "part-0.parquet"),
                               table_to_bytes(t))


_OWN_ENTRIES = ("dataset.json", "stamps", "failures", "_plan")


def _prepare_output(config: DatasetConfig) -> None:
    """Refuse to clobber a finished dataset or someone else's files; clear an unfinished build."""
    fs, root = storage.filesystem(config.out)
    if not fs.exists(root):
        return
    entries = {posixpath.basename(p.rstrip("/")) for p in fs.ls(root, detail=False)}
    if "dataset.json" in entries and not config.overwrite:
        raise DatasetError(f"{config.out} already holds a dataset; pass --overwrite to replace it, "
                           f"or choose another --out")
    foreign = sorted(entries - set(_OWN_ENTRIES))
    if foreign and not config.overwrite:
        raise DatasetError(f"{config.out} holds other files ({', '.join(foreign[:3])}); choose an "
                           f"empty or new --out (--overwrite replaces only the dataset's own entries)")
    for sub in _OWN_ENTRIES:
        path = storage.join(root, sub)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def build_tile(tile: Tile, config: DatasetConfig, known_lenses: np.ndarray,
               schema: pa.Schema) -> tuple[dict[tuple[str, str], int], int, int]:
    """Cut, measure, pool, split and write one tile's objects.

    Returns rows written per (split, pool), objects left out by the guard band, and objects that
    failed (unreadable tile or a stamp too incomplete), which go to ``failures/``.
    """
    out = config.out
    objects = read_tile_objects(out, tile.name)
    n = objects.num_rows
    counts: dict[tuple[str, str], int] = {}
    if n == 0:
        return counts, 0, 0
    all_rows = np.arange(n)
    try:
        if tile.error:
            raise TileError(tile.error)
        pixels = read_pixels(tile, config.bands)
        conditions = tile_band_conditions(tile, pixels, config)
    except TileError as exc:
        _write_failures(out, tile.name, objects, all_rows, str(exc))
        return counts, 0, n
    x = objects["x"].to_numpy()
    y = objects["y"].to_numpy()
    stamps = cut_stamps(pixels, x, y, config.stamp_size_pix)
    del pixels
    too_empty = stamps.missing_fraction > config.max_missing_fraction
    _write_failures(out, tile.name, objects, all_rows[too_empty], [
        f"stamp is {100 * m:.0f}% outside the tile or masked (limit "
        f"{100 * config.max_missing_fraction:.0f}%)" for m in stamps.missing_fraction[too_empty]])
    keep = ~too_empty
    m = int(keep.sum())
    raw = stamps.pixels[keep]
    cols: dict[str, np.ndarray] = {name: objects[name].to_numpy()[keep]
                                   for name in ("objid", "ra", "dec", "x", "y")}
    cols["tile"] = np.full(m, tile.name, dtype=object)
    cols["flags"] = stamps.flags[keep]
    cols["missing_fraction"] = stamps.missing_fraction[keep]
    for name in _PER_BAND:
        cols[name] = np.tile(np.array([getattr(cd, name) for cd in conditions], np.float32), (m, 1))
    cols["pixel_scale_arcsec"] = np.full(m, conditions[0].pixel_scale_arcsec, np.float32)
    cols["centre_offset_pix"] = np.stack([cols["x"] - np.rint(cols["x"]),
                                          cols["y"] - np.rint(cols["y"])], axis=1).astype(np.float32)
    measured = measure_stamps(raw, config.bands, cols["magzero"], cols["psf_fwhm_arcsec"],
                              cols["psf_beta"], cols["pixel_scale_arcsec"], config.deflector_cuts)
    header_sky = cols["sky_sigma"]
    cols["sky_sigma"] = np.where(np.isfinite(header_sky), header_sky, measured.pop("sky_sigma"))
    cols.update(measured)

    known = np.isin(cols["objid"], known_lenses)
    deflector = is_deflector(measured, config.deflector_cuts) & (cols["flags"] == 0) & ~known
    labelled = unit_hash(config.seed, np.full(m, _POOL_HASH_KEY), cols["objid"]) < config.non_lens_fraction
    pool = np.where(known, "known_lens", np.where(deflector, "deflector",
                                                  np.where(labelled, "non_lens", "unlabelled")))
    cols["label"] = np.array([LABELS[p] for p in pool], dtype=np.int8)
    split = assign_split(cols["ra"], cols["dec"], config.sky_split)
    n_guard = int((split == "guard").sum())
    for split_name in ("train", "holdout"):
        for pool_name in POOLS:
            sel = np.flatnonzero((split == split_name) & (pool == pool_name))
            if sel.size == 0:
                continue
            counts[(split_name, pool_name)] = int(sel.size)
            for k, start in enumerate(range(0, sel.size, config.shard_rows)):
                part = sel[start:start + config.shard_rows]
                table = _rows_table(schema, {c: v[part] for c, v in cols.items()}, raw[part])
                url = storage.join(stamps_dir(out), f"split={split_name}", f"pool={pool_name}",
                                   f"{tile.name}-{k:04d}.parquet")
                storage.write_bytes_atomic(url, table_to_bytes(table))
    return counts, n_guard, int(too_empty.sum())


def build_dataset(config: DatasetConfig) -> DatasetSummary:
    """Build the training set ``config`` describes; return what was written.

    The plan (tiles, headers, catalog matched to footprints) is the scanner's; each tile is then
    read once and its stamps written in shards, so memory is bounded by one tile.
    ``dataset.json`` is written last and marks the dataset complete.
    """
    started = time.perf_counter()
    _prepare_output(config)
    known = read_known_lenses(config.truth) if config.truth else np.zeros(0, np.int64)
    plan = make_plan(config.tiles, config.tile_pattern, config.bands, config.catalog, config.out)
    schema = _schema(config.bands, config.input_spec.to_dict())
    counts: dict[str, dict[str, int]] = {s: {p: 0 for p in POOLS} for s in ("train", "holdout")}
    n_guard = 0
    n_failed = plan.n_failed_plan
    tiles = [t for t in plan.tiles if plan.objects_per_tile.get(t.name, 0) > 0]
    for tile in tqdm(tiles, desc="build-dataset", unit="tile", disable=None):
        tile_counts, tile_guard, tile_failed = build_tile(tile, config, known, schema)
        for (split, pool), k in tile_counts.items():
            counts[split][pool] += k
        n_guard += tile_guard
        n_failed += tile_failed
    seconds = time.perf_counter() - started
    summary = DatasetSummary(config.out, counts, n_guard, n_failed, seconds)
    description = {"lensscan_version": __version__, "config": config.to_dict(),
                   "input_spec": config.input_spec.to_dict(), "bands": list(config.bands),
                   "sky_split": config.sky_split.to_dict(), "counts": counts,
                   "n_guard": n_guard, "n_failed": n_failed, "n_catalog": plan.n_catalog,
                   "n_known_lenses_in_truth": int(len(known)), "seconds": seconds}
    storage.write_bytes_atomic(storage.join(config.out, "dataset.json"),
                               json.dumps(description, indent=1).encode())
    logger.info("%s", summary)
    return summary


# --------------------------------------------------------------------------------------------
# Reading


def open_dataset(url: str) -> dict[str, Any]:
    """The finished dataset's ``dataset.json``; refuses an unfinished or missing one."""
    path = storage.join(url, "dataset.json")
    if not storage.exists(path):
        raise DatasetError(f"{url}: no dataset.json; build the dataset with `lensscan build-dataset "
                           f"--out {url}` (an interrupted build has none)")
    return json.loads(storage.read_bytes(path))


def _stamp_set(table: pa.Table, bands: Sequence[str], size: int) -> StampSet:
    n, c = table.num_rows, len(bands)
    if n:
        # A writable copy: Arrow's buffers are read-only, and torch and injection need to write.
        stamps = np.array(table["stamp"].combine_chunks().storage.flatten(), dtype=np.float32)
        stamps = stamps.reshape(n, c, size, size)
    else:
        stamps = np.zeros((0, c, size, size), np.float32)

    def matrix(name: str, width: int) -> np.ndarray:
        if n == 0:
            return np.zeros((0, width), np.float32)
        return np.asarray(table[name].combine_chunks().flatten(), np.float32).reshape(n, width)

    arrays = {name: matrix(name, c) for name in _PER_BAND}
    arrays["pixel_scale_arcsec"] = np.asarray(table["pixel_scale_arcsec"], np.float32)
    arrays["centre_offset_pix"] = matrix("centre_offset_pix", 2)
    return StampSet(stamps, BandMeta.from_numpy(bands, arrays), table.drop_columns(["stamp"]))


def _pool_dataset(url: str) -> pads.Dataset | None:
    fs, path = storage.filesystem(stamps_dir(url))
    if not fs.exists(path):
        return None
    return pads.dataset(path, filesystem=fs, format="parquet", partitioning="hive",
                        ignore_prefixes=["."])


def _pool_filter(pool: str, split: str) -> pc.Expression:
    if pool not in POOLS:
        raise DatasetError(f"unknown pool {pool!r}; pools: {POOLS}")
    if split not in ("train", "holdout"):
        raise DatasetError(f"unknown split {split!r}; splits: train, holdout")
    return (pc.field("pool") == pool) & (pc.field("split") == split)


def iter_pool(url: str, pool: str, split: str = "train", batch_rows: int = 4096
              ) -> Iterator[StampSet]:
    """Stream one pool of one split in batches of at most ``batch_rows`` stamps."""
    info = open_dataset(url)
    bands, size = info["bands"], info["input_spec"]["stamp_size_pix"]
    ds = _pool_dataset(url)
    if ds is None:
        return
    for batch in ds.to_batches(filter=_pool_filter(pool, split), batch_size=batch_rows):
        if batch.num_rows:
            yield _stamp_set(pa.Table.from_batches([batch]), bands, size)


def read_pool(url: str, pool: str, split: str = "train") -> StampSet:
    """One whole pool of one split, rows ordered by objid (for pools that fit in memory)."""
    info = open_dataset(url)
    bands, size = info["bands"], info["input_spec"]["stamp_size_pix"]
    ds = _pool_dataset(url)
    if ds is None:
        return _stamp_set(_schema(bands, info["input_spec"]).empty_table(), bands, size)
    table = ds.to_table(filter=_pool_filter(pool, split))
    table = table.take(pc.sort_indices(table, sort_keys=[("objid", "ascending")]))
    return _stamp_set(table, bands, size)
