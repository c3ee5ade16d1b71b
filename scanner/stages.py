"""The scan's stages after the plan, as plain callables: testable on a numpy batch without Ray.

read-and-cut (one tile per call, CPU) -> score (a class that loads the ensemble once) -> write
(atomic Parquet shards per tile). ``scanner.pipeline`` strings them together on Ray Data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from scanner import layout, storage
from scanner.catalog import table_to_bytes
from scanner.config import InputSpec
from scanner.cutouts import make_stamps
from scanner.layout import failure_table
from scanner.normalise import to_float16
from scanner.plan import read_tile_objects
from scanner.tiles import Tile, TileError, read_pixels

logger = logging.getLogger(__name__)

Batch = dict[str, np.ndarray]

# Columns every batch carries from the cut to the write; ``stamp`` is dropped by the scorer.
ROW_COLUMNS = ("objid", "ra", "dec", "tile", "x", "y", "row", "flags", "missing_fraction", "failure",
               "cut_node")


def node_id() -> str:
    """The Ray node this stage runs on ('' outside Ray), so a scan can report how it spread."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - only a statistic
        return ""


def _empty_batch(spec: InputSpec) -> Batch:
    s, c = spec.stamp_size_pix, spec.n_channels
    return {"objid": np.zeros(0, np.int64), "ra": np.zeros(0), "dec": np.zeros(0),
            "tile": np.zeros(0, dtype=object), "x": np.zeros(0), "y": np.zeros(0),
            "row": np.zeros(0, np.int64), "flags": np.zeros(0, np.int32),
            "missing_fraction": np.zeros(0, np.float32), "failure": np.zeros(0, dtype=object),
            "stamp": np.zeros((0, c, s, s), np.float16)}


def cut_tile(tile_json: str, out: str, spec: InputSpec, bands: Sequence[str],
             max_missing_fraction: float, chunk_rows: int = 2048) -> Iterator[Batch]:
    """Yield batches of normalised float16 stamps for every planned object of one tile.

    The tile's pixels are read once; a tile that cannot be read yields its objects with a
    ``failure`` reason (and blank stamps) instead of raising, so the scan accounts for each one.
    """
    plan_tile = Tile.from_dict(json.loads(tile_json))
    objects = read_tile_objects(out, plan_tile.name)
    n = objects.num_rows
    if n == 0:
        return
    cols = {c: objects[c].to_numpy() for c in ("objid", "ra", "dec", "x", "y", "row")}
    node = node_id()
    error = plan_tile.error
    pixels = None
    if error is None:
        try:
            pixels = read_pixels(plan_tile, bands)
        except TileError as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad file costs one tile, never the scan
            error = f"tile {plan_tile.name}: cannot read pixels ({type(exc).__name__}: {exc})"
    for start in range(0, n, chunk_rows):
        sl = slice(start, min(start + chunk_rows, n))
        m = sl.stop - sl.start
        batch: Batch = {k: v[sl] for k, v in cols.items()}
        batch["tile"] = np.full(m, plan_tile.name, dtype=object)
        batch["cut_node"] = np.full(m, node, dtype=object)
        if pixels is None:
            s, c = spec.stamp_size_pix, spec.n_channels
            batch["stamp"] = np.zeros((m, c, s, s), np.float16)
            batch["flags"] = np.zeros(m, np.int32)
            batch["missing_fraction"] = np.ones(m, np.float32)
            batch["failure"] = np.full(m, error, dtype=object)
        else:
            normed, raw = make_stamps(pixels, batch["x"], batch["y"], spec)
            batch["stamp"] = to_float16(normed)
            batch["flags"] = raw.flags
            batch["missing_fraction"] = raw.missing_fraction
            too_empty = raw.missing_fraction > max_missing_fraction
            batch["failure"] = np.where(
                too_empty, np.char.add(np.char.add("stamp is ", np.char.mod(
                    "%.0f", 100 * raw.missing_fraction)), "% outside the tile or masked"),
                "").astype(object)
        yield batch


class EnsembleScorer:
    """Scores stamps with every version of an ensemble; one instance per actor, models loaded once.

    Rows that already failed (``failure`` non-empty) are passed through with NaN scores.
    """

    def __init__(self, model_dirs: Sequence[str], use_gpu: bool = False, precision: str = "auto",
                 tta: bool = False):
        import torch

        from scanner.registry import load_ensemble

        self.torch = torch
        self.ensemble = load_ensemble(list(model_dirs))
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.ensemble.to(self.device, precision=precision)
        self.tta = tta
        logger.info("scoring on %s in %s", self.device, self.ensemble.precision)
        self.on_gpu = self.device.type == "cuda"
        self.columns = list(self.ensemble.columns)
        self.node = node_id()
        self._batches = 0

    def _test_fault(self) -> None:
        """Test-only switch: with LENSSCAN_TEST_KILL_SCORER=<file>, the first actor to reach its
        second batch creates the file and dies mid-batch, as a crashed GPU worker would."""
        marker = os.environ.get("LENSSCAN_TEST_KILL_SCORER")
        if marker and self._batches == 2:
            try:
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return
            os.close(fd)
            os._exit(1)

    def __call__(self, batch: Batch) -> Batch:
        started = time.time()
        self._batches += 1
        self._test_fault()
        out = {k: batch[k] for k in ROW_COLUMNS}
        out["score_node"] = np.full(len(out["objid"]), self.node, dtype=object)
        n = len(out["objid"])
        scores = np.full((n, len(self.columns)), np.nan, dtype=np.float32)
        ok = np.flatnonzero(np.asarray(batch["failure"]) == "")
        if ok.size:
            stamps = batch["stamp"] if ok.size == n else batch["stamp"][ok]
            # Float16 as cut, widened to float32 on the device: half the bytes to copy. On a GPU
            # the scan's old path (float32 on the CPU, pageable copy) ran at a fifth of the
            # ensemble's rate (benchmarks/README.md, "GPU").
            x = self.torch.from_numpy(np.ascontiguousarray(stamps))
            if self.on_gpu:
                x = x.pin_memory().to(self.device, non_blocking=True)
            scores[ok] = self.ensemble.predict(x, tta=self.tta).float().cpu().numpy()
        for j, col in enumerate(self.columns):
            out[col] = scores[:, j]
        out["score"] = scores.mean(axis=1) if scores.shape[1] else np.full(n, np.nan, np.float32)
        out["score_std"] = scores.std(axis=1) if scores.shape[1] else np.full(n, np.nan, np.float32)
        # Wall-clock span of this batch's scoring: the driver's steady-rate figure spans these.
        out["scored_from"] = np.full(n, started)
        out["scored_to"] = np.full(n, time.time())
        return out


def shard_name(objids: np.ndarray) -> str:
    """Deterministic shard name from its objids, so a retried write replaces, never duplicates."""
    return "part-" + hashlib.sha1(np.ascontiguousarray(objids, dtype=np.int64).tobytes()).hexdigest()[:20]


class ShardWriter:
    """Writes scored rows as atomic Parquet shards, per tile; failed rows go to the failures table."""

    def __init__(self, out: str, score_columns: Sequence[str], metadata: dict[str, Any]):
        self.out = out
        self.score_columns = list(score_columns)
        self.metadata = {b"lensscan": json.dumps(metadata).encode()}

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        tiles_col = batch["tile"].to_numpy(zero_copy_only=False)
        failure = batch["failure"].to_numpy(zero_copy_only=False)
        summary: dict[str, list] = {"tile": [], "shard": [], "n_scored": [], "n_failed": [],
                                    "cut_nodes": [], "score_nodes": [], "scored_from": [],
                                    "scored_to": []}
        scored_from = batch["scored_from"].to_numpy()
        scored_to = batch["scored_to"].to_numpy()
        cut_nodes = batch["cut_node"].to_numpy(zero_copy_only=False)
        score_nodes = batch["score_node"].to_numpy(zero_copy_only=False)
        for tile in np.unique(tiles_col):
            in_tile = tiles_col == tile
            ok = in_tile & (failure == "")
            bad = in_tile & (failure != "")
            name = shard_name(batch["objid"].to_numpy()[in_tile])
            if ok.any():
                t = batch.filter(pa.array(ok))
                cols = ["objid", "ra", "dec", "tile", "x", "y", "score", "score_std",
                        *self.score_columns, "flags", "missing_fraction"]
                t = t.select(cols).cast(pa.schema([
                    (c, pa.float32() if c in ("score", "score_std", *self.score_columns) else t.schema.field(c).type)
                    for c in cols]))
                storage.write_bytes_atomic(layout.candidates_shard(self.out, str(tile), name),
                                           table_to_bytes(t, self.metadata))
            if bad.any():
                t = batch.filter(pa.array(bad))
                storage.write_bytes_atomic(
                    layout.cut_failures_shard(self.out, str(tile), name),
                    table_to_bytes(failure_table(t["objid"], t["ra"], t["dec"], t["tile"], t["row"],
                                                 "cut", t["failure"])))
            summary["tile"].append(str(tile))
            summary["shard"].append(name)
            summary["n_scored"].append(int(ok.sum()))
            summary["n_failed"].append(int(bad.sum()))
            summary["cut_nodes"].append(",".join(sorted(set(cut_nodes[in_tile]))))
            summary["score_nodes"].append(",".join(sorted(set(score_nodes[in_tile]))))
            summary["scored_from"].append(float(scored_from[in_tile].min()))
            summary["scored_to"].append(float(scored_to[in_tile].max()))
        return {k: np.asarray(v) for k, v in summary.items()}
