"""Grades from the inspection report as training examples: the active-learning step.

A person grades a scan's candidates in ``report.html`` (A, B, C or not a lens) and exports
``grades.csv`` (``objid, ra, dec, tile, score, grade``). ``lensscan train --grades grades.csv``
turns the graded objects into labelled stamps: A and B become known lenses (positives drawn into
every batch), "not a lens" becomes a hard negative (the look-alikes that fooled the models, the
most useful negatives there are), C (unsure) is left out. The stamps are cut from the scan's own
tiles with the dataset builder, so they are exactly what the scanner scored.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging

import pandas as pd

from scanner import storage
from training.dataset import DatasetConfig, DatasetError, build_dataset, open_dataset
from training.measure import DeflectorCuts

logger = logging.getLogger(__name__)

#: What each grade of the report teaches: a lens (True), not a lens (False); C is left out.
GRADE_LABELS = {"A": True, "B": True, "not_lens": False}
GRADES = ("A", "B", "C", "not_lens")


def read_grades(url: str) -> pd.DataFrame:
    """The graded objects of a report's ``grades.csv``: ``objid, ra, dec, is_lens`` (C dropped).

    Raises DatasetError naming the file and row for missing columns, unknown grades, objids or
    coordinates that are not numbers, and an objid graded twice with different labels.
    """
    try:
        frame = pd.read_csv(io.BytesIO(storage.read_bytes(url)), comment="#")
    except FileNotFoundError:
        raise DatasetError(f"--grades {url}: no such file") from None
    except (ValueError, OSError) as exc:
        raise DatasetError(f"--grades {url}: cannot read it as CSV ({exc})") from None
    missing = {"objid", "ra", "dec", "grade"} - set(frame.columns)
    if missing:
        raise DatasetError(f"--grades {url} lacks column(s) {sorted(missing)}; give the grades.csv "
                           f"the report's 'Export grades.csv' button writes")
    grade = frame["grade"].astype(str).str.strip()
    unknown = ~grade.isin(GRADES)
    if unknown.any():
        row = int(unknown.to_numpy().nonzero()[0][0])
        raise DatasetError(f"--grades {url} row {row + 2}: grade {frame['grade'].iloc[row]!r} is not "
                           f"one of {list(GRADES)}")
    numbers = frame[["objid", "ra", "dec"]].apply(pd.to_numeric, errors="coerce")
    bad = numbers.isna().any(axis=1)
    if bad.any():
        row = int(bad.to_numpy().nonzero()[0][0])
        raise DatasetError(f"--grades {url} row {row + 2}: objid, ra and dec must be numbers")
    graded = pd.DataFrame({"objid": numbers["objid"].astype("int64"), "ra": numbers["ra"],
                           "dec": numbers["dec"], "grade": grade})
    graded = graded[graded["grade"].isin(GRADE_LABELS)].drop_duplicates()
    graded["is_lens"] = graded["grade"].map(GRADE_LABELS).astype(bool)
    conflicting = graded.groupby("objid")["is_lens"].nunique()
    if (conflicting > 1).any():
        raise DatasetError(f"--grades {url}: objid {int(conflicting[conflicting > 1].index[0])} is "
                           f"graded both a lens and not a lens; keep one grade per object")
    return graded.drop_duplicates("objid").reset_index(drop=True)


def _scan_record(scan: str) -> dict:
    url = storage.join(scan, "scan.json")
    if not storage.exists(url):
        raise DatasetError(f"--grades-scan {scan} holds no scan.json: give the output directory of "
                           f"the scan whose report the grades come from")
    return json.loads(storage.read_bytes(url))


def build_graded_dataset(grades: str, scan: str, out: str) -> str | None:
    """Cut the graded objects' stamps from the scan's tiles into a dataset at ``out``; its URL.

    The dataset has one split (``train``): graded lenses in ``known_lens``, "not a lens" objects in
    ``deflector`` or ``non_lens`` (both are negatives to training). Rebuilt only when the grades
    or the scan change. None when no object has a usable grade.
    """
    graded = read_grades(grades)
    if graded.empty:
        logger.warning("--grades %s: no object graded A, B or not_lens; nothing to add", grades)
        return None
    record = _scan_record(scan)
    config, spec = record["config"], record["input_spec"]
    key = hashlib.sha256(graded.to_csv(index=False).encode() + json.dumps(config, sort_keys=True)
                         .encode()).hexdigest()[:16]
    target = storage.join(out, f"graded-{key}")
    try:
        open_dataset(target)
        return target
    except DatasetError:
        pass
    catalog, truth = storage.join(out, f"catalog-{key}.csv"), storage.join(out, f"truth-{key}.csv")
    storage.write_bytes_atomic(catalog, graded[["objid", "ra", "dec"]].to_csv(index=False).encode())
    storage.write_bytes_atomic(truth, graded[["objid", "is_lens"]].to_csv(index=False).encode())
    summary = build_dataset(DatasetConfig(
        tiles=config["tiles"], catalog=catalog, out=target, bands=tuple(spec["bands"]),
        tile_pattern=config["tile_pattern"], truth=truth, stamp_size_pix=spec["stamp_size_pix"],
        pixel_scale_arcsec=spec["pixel_scale_arcsec"], deflector_cuts=DeflectorCuts(),
        holdout_fraction=0.0, non_lens_fraction=1.0, overwrite=True))
    logger.info("graded examples from %s: %s", grades, summary.counts["train"])
    return target


__all__ = ["GRADE_LABELS", "build_graded_dataset", "read_grades"]
