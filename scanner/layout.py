"""The layout of a scan's output directory: every path under ``--out``, and its table readers.

One home for the names, so the plan, the writers, ``--resume``, ``--overwrite`` and the report
agree on them. The tables sit where every Parquet reader finds them: pandas, pyarrow, DuckDB and
Spark skip files and folders whose names start with ``_`` or ``.``, so no table lives there; only
lensscan's own bookkeeping does::

    <out>/
      candidates.parquet/<tile>/part-<hash>.parquet  scored objects, one folder per tile
      failures/plan/part-<batch>.parquet             objects the plan could not place on a tile
      failures/plan/tiles.parquet                    tiles that cannot be scanned, and why
      failures/cut/<tile>/part-<hash>.parquet        objects of a tile that could not be cut
      candidates.csv, scan.json, report.html
      _scan_identity.json                            what the scan is: refuses a mismatched --resume
      _manifest/<tile>.json                          tiles whose objects are all written
      _plan/plan.json, _plan/objects/<tile>/part-<batch>.parquet

``pandas.read_parquet(out + "/candidates.parquet")`` and ``pandas.read_parquet(out + "/failures")``
together hold every catalog row exactly once (failure rows of whole tiles have no ``objid``).
"""

from __future__ import annotations

import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from scanner import storage

CANDIDATES = "candidates.parquet"
FAILURES = "failures"
CANDIDATES_CSV = "candidates.csv"
SCAN_JSON = "scan.json"
REPORT = "report.html"
IDENTITY = "_scan_identity.json"
MANIFEST = "_manifest"
PLAN = "_plan"

#: Everything a scan writes at the top of ``--out``: what ``--overwrite`` removes, and nothing else
#: (interrupted atomic writes leave ``.tmp-*`` files, also the scan's own).
OWN_ENTRIES = (CANDIDATES, FAILURES, CANDIDATES_CSV, SCAN_JSON, REPORT, IDENTITY, MANIFEST, PLAN)
TEMPORARY_PREFIX = ".tmp-"

FAILURE_SCHEMA = pa.schema([
    ("objid", pa.int64()),
    ("ra", pa.float64()),
    ("dec", pa.float64()),
    ("tile", pa.string()),
    ("row", pa.int64()),
    ("stage", pa.string()),
    ("reason", pa.string()),
])


def candidates_dir(out: str) -> str:
    return storage.join(out, CANDIDATES)


def candidates_shard(out: str, tile: str, name: str) -> str:
    return storage.join(out, CANDIDATES, tile, name + ".parquet")


def failures_dir(out: str) -> str:
    return storage.join(out, FAILURES)


def plan_failures_shard(out: str, batch: int) -> str:
    """Objects of catalog batch ``batch`` that the plan could not place on any tile."""
    return storage.join(out, FAILURES, "plan", f"part-{batch:06d}.parquet")


def tile_failures_file(out: str) -> str:
    """One row per tile that cannot be scanned (no objid)."""
    return storage.join(out, FAILURES, "plan", "tiles.parquet")


def cut_failures_dir(out: str, tile: str) -> str:
    return storage.join(out, FAILURES, "cut", tile)


def cut_failures_shard(out: str, tile: str, name: str) -> str:
    return storage.join(cut_failures_dir(out, tile), name + ".parquet")


def tile_shard_dirs(out: str, tile: str) -> tuple[str, str]:
    """The folders holding one tile's shards: what an unfinished tile's re-run clears first."""
    return storage.join(out, CANDIDATES, tile), cut_failures_dir(out, tile)


def manifest_dir(out: str) -> str:
    return storage.join(out, MANIFEST)


def manifest_entry(out: str, tile: str) -> str:
    return storage.join(out, MANIFEST, f"{tile}.json")


def plan_dir(out: str) -> str:
    return storage.join(out, PLAN)


def plan_file(out: str) -> str:
    return storage.join(out, PLAN, "plan.json")


def objects_dir(out: str, tile: str) -> str:
    return storage.join(out, PLAN, "objects", tile)


def objects_shard(out: str, tile: str, batch: int) -> str:
    return storage.join(objects_dir(out, tile), f"part-{batch:06d}.parquet")


def identity_file(out: str) -> str:
    return storage.join(out, IDENTITY)


def scan_file(out: str) -> str:
    return storage.join(out, SCAN_JSON)


def csv_file(out: str) -> str:
    return storage.join(out, CANDIDATES_CSV)


def report_file(out: str) -> str:
    return storage.join(out, REPORT)


def entries(out: str) -> list[str]:
    """Names of what ``out`` holds at its top ([] when it does not exist or is empty)."""
    fs, path = storage.filesystem(out)
    if not storage.with_retries(lambda: fs.exists(path), f"stat {out}"):
        return []
    if not fs.isdir(path):
        return [posixpath.basename(path.rstrip("/"))]
    listing = storage.with_retries(lambda: fs.ls(path, detail=False), f"list {out}")
    return sorted(posixpath.basename(p.rstrip("/")) for p in listing if p.rstrip("/") != path.rstrip("/"))


def holds_scan(out: str) -> bool:
    """Whether ``out`` holds a lensscan scan (its identity file), finished or not."""
    return storage.exists(identity_file(out))


def remove_scan(out: str) -> None:
    """Remove what a scan wrote in ``out``, and nothing else; the identity last, so an
    interrupted removal still leaves a folder recognisable as a scan."""
    fs, path = storage.filesystem(out)
    own = [n for n in entries(out) if n in OWN_ENTRIES or n.startswith(TEMPORARY_PREFIX)]
    for name in sorted(own, key=lambda n: n == IDENTITY):
        target = posixpath.join(path, name)
        storage.with_retries(lambda: fs.rm(target, recursive=True), f"remove {out}/{name}")


def tile_name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a tile's folders in the output, or None when it can.

    Tile names become folder and file names (``candidates.parquet/<tile>/``): a name with a path
    separator or ``..`` would write outside them, one starting with ``_`` or ``.`` would hide its
    rows from Parquet readers, and ``=`` would read as a Hive partition column.
    """
    if not name or name.strip() != name or not name.isprintable():
        return "is empty, padded with spaces or holds control characters"
    if name[0] in "._":
        return "starts with '.' or '_' (Parquet readers skip such folders)"
    bad = sorted({c for c in name if c in "/\\="})
    if bad:
        return f"holds {' '.join(repr(c) for c in bad)} (path separators and '=' are not allowed)"
    return None


def failure_table(objid, ra, dec, tile, row, stage: str, reasons) -> pa.Table:
    """A failures-table chunk; scalars broadcast over the rows."""
    n = len(objid)

    def col(v, typ):
        if isinstance(v, (pa.Array, pa.ChunkedArray)):
            return v.cast(typ)
        if isinstance(v, (list, np.ndarray)):
            return pa.array(v, type=typ)
        return pa.array([v] * n, type=typ)

    return pa.table([col(objid, pa.int64()), col(ra, pa.float64()), col(dec, pa.float64()),
                     col(tile, pa.string()), col(row, pa.int64()), col(stage, pa.string()),
                     col(reasons, pa.string())], schema=FAILURE_SCHEMA)


def _dataset(url: str) -> pads.Dataset | None:
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        return None
    # pyarrow's default discovery: what pandas, DuckDB and Spark see is what lensscan reads.
    return pads.dataset(path, filesystem=fs, format="parquet")


def read_candidates(out: str, columns: list[str] | None = None) -> pa.Table:
    """The scan's candidates, sorted by ensemble score, highest first."""
    ds = _dataset(candidates_dir(out))
    if ds is None:
        return pa.table({})
    return ds.to_table(columns=columns).sort_by([("score", "descending")])


def read_failures(out: str) -> pa.Table:
    """The scan's failures table: every object or tile that could not be scored, with the reason."""
    ds = _dataset(failures_dir(out))
    return ds.to_table() if ds is not None else FAILURE_SCHEMA.empty_table()
