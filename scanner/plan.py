"""The scan's first stage: tiles, headers and the catalog matched to tile footprints.

The catalog is streamed in batches; each batch's objects are written to small per-tile Parquet
files under ``<out>/_plan/objects/<tile>/``, so no machine ever holds the whole catalog and the
cut stage reads just its tile's objects. Objects that fall on no tile, or carry unusable
coordinates, go straight to the failures table, as do tiles that cannot be scanned.
``_plan/plan.json`` is written last and marks the plan complete, so ``--resume`` reuses it.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from astropy.wcs.utils import proj_plane_pixel_scales
from tqdm.auto import tqdm

from scanner import layout, storage
from scanner.catalog import invalid_coordinates, iter_catalog, table_to_bytes
from scanner.footprints import FootprintIndex
# training.dataset writes its own failure rows with these, next to the plan's.
from scanner.layout import failure_table, failures_dir, objects_dir  # noqa: F401
from scanner.tiles import Tile, discover_tiles, read_headers

logger = logging.getLogger(__name__)

PLAN_OBJECT_SCHEMA = pa.schema([
    ("objid", pa.int64()), ("ra", pa.float64()), ("dec", pa.float64()),
    ("x", pa.float64()), ("y", pa.float64()), ("row", pa.int64()),
])


INVALID_COORDINATES = "invalid coordinates: ra must be in [0, 360) and dec in [-90, 90] degrees, not NaN"


class IdSet:
    """The objids seen so far, as sorted int64 arrays (8 bytes an object, not a Python set).

    Duplicate objids would silently overwrite each other downstream (a pitfall peers hit), so the
    plan sends every repeat to the failures table instead.
    """

    def __init__(self) -> None:
        self._sorted = np.zeros(0, dtype=np.int64)

    def add(self, ids: np.ndarray) -> np.ndarray:
        """Add ``ids``; return a mask of those already seen (earlier batches or earlier in ``ids``)."""
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted, ids)
        pos[pos == len(self._sorted)] = 0
        dup = (self._sorted[pos] == ids) if len(self._sorted) else np.zeros(len(ids), bool)
        order = np.argsort(ids, kind="stable")
        repeat = np.zeros(len(ids), dtype=bool)
        repeat[order[1:]] = ids[order[1:]] == ids[order[:-1]]
        self._sorted = np.union1d(self._sorted, ids)
        return dup | repeat


@dataclass
class Plan:
    """What the scan will do: the tiles, how many objects each holds, and what failed up front."""

    tiles: list[Tile]
    objects_per_tile: dict[str, int]
    n_catalog: int
    n_failed_plan: int
    catalog: str
    bands: tuple[str, ...]
    catalog_has_tile: bool = False

    def to_json(self) -> str:
        d = {
            "tiles": [t.to_dict() for t in self.tiles],
            "objects_per_tile": self.objects_per_tile, "n_catalog": self.n_catalog,
            "n_failed_plan": self.n_failed_plan, "catalog": self.catalog,
            "bands": list(self.bands), "catalog_has_tile": self.catalog_has_tile,
        }
        return json.dumps(d)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        d = json.loads(text)
        tiles = [Tile.from_dict(t) for t in d["tiles"]]
        return cls(tiles, d["objects_per_tile"], d["n_catalog"], d["n_failed_plan"], d["catalog"],
                   tuple(d["bands"]), d["catalog_has_tile"])

    def tile(self, name: str) -> Tile:
        return next(t for t in self.tiles if t.name == name)


def read_all_headers(tiles: list[Tile], threads: int = 16) -> list[Tile]:
    """Read every tile's headers concurrently (I/O bound: many small reads on cloud storage)."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(tqdm(pool.map(read_headers, tiles), total=len(tiles), desc="headers",
                         unit="tile", leave=False, disable=len(tiles) < 50))


def check_pixel_scale(tiles: list[Tile], pixel_scale_arcsec: float, tolerance: float = 0.01) -> None:
    """Refuse tiles whose pixel scale differs from the models': their lenses would look the wrong
    size to the models, silently."""
    for t in tiles:
        if t.shape is None:
            continue
        scales = proj_plane_pixel_scales(t.wcs(next(iter(t.headers)))) * 3600.0
        scale = float(np.sqrt(scales[0] * scales[1]))
        if abs(scale / pixel_scale_arcsec - 1) > tolerance:
            raise ValueError(f"tile {t.name} has {scale:.4f} arcsec/pixel but the models expect "
                             f"{pixel_scale_arcsec} arcsec/pixel; resample the tiles or use models "
                             f"trained at this pixel scale")


def read_tiles(tiles_url: str, pattern: str | None, bands: Sequence[str],
               pixel_scale_arcsec: float | None = None) -> list[Tile]:
    """Return the survey's tiles with their headers read; refuse a survey that cannot be scanned.

    ``pattern=None`` discovers the layout (:func:`scanner.tiles.discover_tiles`). Tiles at another
    pixel scale than ``pixel_scale_arcsec`` are refused, as is a survey with no readable tile;
    other broken tiles are kept with their ``error`` (their objects become failure rows).
    """
    tiles = read_all_headers(discover_tiles(tiles_url, bands, pattern))
    if pixel_scale_arcsec is not None:
        check_pixel_scale(tiles, pixel_scale_arcsec)
    for t in tiles:
        if t.error:
            logger.warning("%s", t.error)
    if not any(t.shape is not None for t in tiles):
        first = next((t.error for t in tiles if t.error), "")
        raise FileNotFoundError(f"none of the {len(tiles)} tiles under {tiles_url} could be read: "
                                f"{first}")
    return tiles


def make_plan(tiles_url: str, pattern: str | None, bands: Sequence[str], catalog_url: str, out: str,
              batch_rows: int = 1_000_000, pixel_scale_arcsec: float | None = None,
              tiles: list[Tile] | None = None) -> Plan:
    """Discover tiles, read their headers and stream the catalog into per-tile object lists.

    ``tiles``: the result of :func:`read_tiles` when the caller has it already (the scan reads
    the tiles before it touches its output). With ``pixel_scale_arcsec``, tiles at another pixel
    scale are refused before any work.
    """
    if tiles is None:
        tiles = read_tiles(tiles_url, pattern, bands, pixel_scale_arcsec)
    index = FootprintIndex(tiles)
    broken = [t for t in tiles if t.error]
    counts: dict[str, int] = {t.name: 0 for t in tiles}
    n_total = n_failed = 0
    has_tile = False
    if broken:
        storage.write_bytes_atomic(layout.tile_failures_file(out), table_to_bytes(
            failure_table([None] * len(broken), None, None, [t.name for t in broken], None, "plan",
                          [t.error for t in broken])))
    seen = IdSet()
    bar = tqdm(desc="plan", unit="obj", leave=False)
    for k, batch in enumerate(iter_catalog(catalog_url, batch_rows)):
        ra = batch["ra"].to_numpy(zero_copy_only=False)
        dec = batch["dec"].to_numpy(zero_copy_only=False)
        objid = batch["objid"].fill_null(-1).to_numpy()
        has_tile = "tile" in batch.column_names
        reasons = np.full(batch.num_rows, "", dtype=object)
        reasons[invalid_coordinates(ra, dec)] = INVALID_COORDINATES
        has_id = ~batch["objid"].is_null().to_numpy(zero_copy_only=False)
        reasons[~has_id] = "objid is missing"
        repeated = np.zeros(batch.num_rows, dtype=bool)
        repeated[has_id] = seen.add(objid[has_id])
        reasons[(reasons == "") & repeated] = "duplicate objid: an earlier catalog row has it"
        usable = reasons == ""
        if has_tile:
            match = index.on_named_tile(batch["tile"].to_numpy(zero_copy_only=False), ra, dec)
        else:
            match = index.match(np.where(usable, ra, np.nan), np.where(usable, dec, np.nan))
        reasons[usable & (match.tile_index < 0)] = ("the catalog's tile does not cover this position"
                                                     if has_tile else "position is on no readable tile")
        failed = reasons != ""
        if failed.any():
            f = batch.filter(pa.array(failed))
            storage.write_bytes_atomic(
                layout.plan_failures_shard(out, k),
                table_to_bytes(failure_table(f["objid"], f["ra"], f["dec"],
                                             f["tile"] if has_tile else None, f["row"], "plan",
                                             reasons[failed].tolist())))
        n_failed += int(failed.sum())
        for i in np.unique(match.tile_index[~failed]):
            sel = np.flatnonzero((match.tile_index == i) & ~failed)
            name = index.tiles[int(i)].name
            t = pa.table({"objid": batch["objid"].take(sel), "ra": pa.array(ra[sel]),
                          "dec": pa.array(dec[sel]), "x": pa.array(match.x[sel]),
                          "y": pa.array(match.y[sel]), "row": batch["row"].take(sel)},
                         schema=PLAN_OBJECT_SCHEMA)
            storage.write_bytes_atomic(layout.objects_shard(out, name, k), table_to_bytes(t))
            counts[name] += len(sel)
        n_total += batch.num_rows
        bar.update(batch.num_rows)
    bar.close()
    plan = Plan(tiles, counts, n_total, n_failed, catalog_url, tuple(bands), has_tile)
    storage.write_bytes_atomic(layout.plan_file(out), plan.to_json().encode())
    logger.info("plan: %d objects on %d tiles (%d cannot be scanned), %d failed before cutting",
                n_total, len(tiles), len(broken), n_failed)
    return plan


def load_plan(out: str) -> Plan | None:
    """The finished plan of an earlier run of this scan, or None."""
    url = layout.plan_file(out)
    return Plan.from_json(storage.read_bytes(url).decode()) if storage.exists(url) else None


def read_tile_objects(out: str, tile: str) -> pa.Table:
    """All planned objects of one tile."""
    fs, path = storage.filesystem(objects_dir(out, tile))
    files = sorted(storage.with_retries(lambda: fs.glob(path + "/part-*.parquet"), f"list {path}"))
    tables = [pq.read_table(fs.open(p, "rb")) for p in files]
    return pa.concat_tables(tables) if tables else PLAN_OBJECT_SCHEMA.empty_table()
