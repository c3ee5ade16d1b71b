"""Object catalogs (Parquet or CSV), read as a stream of batches, never whole.

Required columns: ``objid`` (integer), ``ra``, ``dec`` (degrees, ICRS); an optional ``tile``
column assigns objects to tiles and skips footprint matching.
"""

from __future__ import annotations

import csv
import io
import logging
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from scanner import storage

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("objid", "ra", "dec")
# Common spellings in survey catalogs, mapped to ours so users need not rename columns.
ALIASES = {
    "objid": ("objid", "object_id", "objectid", "id", "source_id", "coadd_object_id"),
    "ra": ("ra", "ra_deg", "raj2000", "alpha_j2000", "ra_icrs"),
    "dec": ("dec", "dec_deg", "dej2000", "decj2000", "delta_j2000", "dec_icrs"),
    "tile": ("tile", "tilename", "tile_name"),
}


class CatalogError(ValueError):
    """A catalog that cannot be read; the message names the file and what to change."""


def _column_map(names: list[str], url: str) -> dict[str, str]:
    lower = {n.lower().strip(): n for n in names}
    mapping = {}
    for ours, spellings in ALIASES.items():
        for s in spellings:
            if s in lower:
                mapping[ours] = lower[s]
                break
    missing = [c for c in REQUIRED_COLUMNS if c not in mapping]
    if missing:
        raise CatalogError(
            f"{url}: catalog lacks column(s) {', '.join(missing)}; it needs objid, ra, dec "
            f"(degrees, ICRS) and optionally tile; found columns {names[:12]}")
    return mapping


def _sniff_csv(url: str) -> pacsv.ParseOptions:
    """Guess the delimiter from the first kilobytes, so ';', tab and '|' catalogs read too."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb") as f:
        head = f.read(65536).decode("utf-8", errors="replace")
    lines = [ln for ln in head.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        return pacsv.ParseOptions()
    try:
        dialect = csv.Sniffer().sniff("\n".join(lines[:20]), delimiters=",;\t| ")
        return pacsv.ParseOptions(delimiter=dialect.delimiter)
    except csv.Error:
        return pacsv.ParseOptions()


def _comment_lines(url: str) -> int:
    """Number of leading '#' comment lines (e.g. an IPAC-like preamble) to skip before the header."""
    fs, path = storage.filesystem(url)
    n = 0
    with fs.open(path, "rb") as f:
        for raw in f:
            line = raw.decode("utf-8", errors="replace")
            if line.lstrip().startswith("#") or not line.strip():
                n += 1
            else:
                break
    return n


def iter_catalog(url: str, batch_rows: int = 1_000_000) -> Iterator[pa.Table]:
    """Yield the catalog as tables of at most ``batch_rows`` rows with columns renamed to ours.

    Each table has ``objid`` (int64), ``ra``, ``dec`` (float64), ``row`` (the 0-based row number
    in the file, for error messages) and ``tile`` (string) when the catalog has it.
    """
    if not storage.exists(url):
        raise CatalogError(f"{url}: catalog not found; check --catalog")
    fs, path = storage.filesystem(url)
    lower = url.lower()
    try:
        if lower.endswith((".csv", ".csv.gz", ".txt", ".tsv")):
            parse = _sniff_csv(url)
            skip = _comment_lines(url)
            f = fs.open(path, "rb")
            reader = pacsv.open_csv(
                f, read_options=pacsv.ReadOptions(skip_rows=skip, block_size=1 << 24),
                parse_options=parse,
                convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
            batches: Iterator[pa.RecordBatch] = iter(reader)
        else:
            pf = pq.ParquetFile(fs.open(path, "rb"))
            batches = pf.iter_batches(batch_size=batch_rows)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CatalogError(f"{url}: cannot read catalog ({exc}); give Parquet or CSV with a header "
                           f"row") from exc

    mapping: dict[str, str] | None = None
    row0 = 0
    pending: list[pa.RecordBatch] = []
    pending_rows = 0
    for batch in batches:
        if mapping is None:
            mapping = _column_map(batch.schema.names, url)
        pending.append(batch)
        pending_rows += batch.num_rows
        if pending_rows >= batch_rows:
            table = pa.Table.from_batches(pending)
            yield _normalise_columns(table, mapping, row0, url)
            row0 += table.num_rows
            pending, pending_rows = [], 0
    if mapping is None:
        raise CatalogError(f"{url}: catalog is empty (no header or rows); nothing to scan")
    if pending:
        table = pa.Table.from_batches(pending)
        yield _normalise_columns(table, mapping, row0, url)


def _normalise_columns(table: pa.Table, mapping: dict[str, str], row0: int, url: str) -> pa.Table:
    cols = {}
    try:
        cols["objid"] = table[mapping["objid"]].cast(pa.int64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise CatalogError(f"{url}: column {mapping['objid']!r} (objid) must hold integers near "
                           f"row {row0}: {exc}") from exc
    for c in ("ra", "dec"):
        try:
            cols[c] = table[mapping[c]].cast(pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise CatalogError(f"{url}: column {mapping[c]!r} ({c}) must be numeric degrees near "
                               f"row {row0}: {exc}") from exc
    cols["row"] = pa.array(np.arange(row0, row0 + table.num_rows, dtype=np.int64))
    if "tile" in mapping:
        cols["tile"] = table[mapping["tile"]].cast(pa.string())
    return pa.table(cols)


def invalid_coordinates(ra: np.ndarray, dec: np.ndarray) -> np.ndarray:
    """Mask of rows whose coordinates are NaN or outside 0 <= ra < 360, -90 <= dec <= 90."""
    with np.errstate(invalid="ignore"):
        return ~(np.isfinite(ra) & np.isfinite(dec) & (ra >= 0) & (ra < 360) & (np.abs(dec) <= 90))


def read_table(url: str) -> pa.Table:
    """The whole catalog as one table: for small catalogs (tests, truth tables) only."""
    return pa.concat_tables(list(iter_catalog(url)))


def table_to_bytes(table: pa.Table, metadata: dict[bytes, bytes] | None = None) -> bytes:
    """Serialise a table to Parquet bytes (optionally with file-level metadata)."""
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    return buf.getvalue()
