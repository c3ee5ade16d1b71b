"""The inspection report of a finished scan: ``report.html``, a gallery to grade candidates by eye.

The page holds the top-N candidates as colour stamps with their scores, a score histogram, and,
given truth labels, the precision-recall curve, the precision in the top N and the recall in the
top 1%; then the scan's provenance (models and their content hashes, tiles, objects scored and
failed, a failures summary). It is one self-contained file: images are inlined, there is no
network access, and it opens offline from disk or from a bucket.

Stamps are re-cut here for just the top N (the scan does not keep stamps), through the same
:func:`scanner.cutouts.cut_stamps` the scan used, reading each tile with candidates once. Colour
follows Lupton et al. (2004): an asinh stretch of the summed bands that keeps colour in saturated
cores. Each band is measured in units of its own sky noise, so colours compare signal-to-noise
between bands and the stretch is the same in noise units for every stamp: faint blue arcs show
next to red deflectors whatever the survey's calibration.

The gallery renders one page of cards at a time from a JSON blob (thumbnails are small JPEGs), so a
report of thousands of candidates stays light. The person inspecting grades candidates (A, B, C or
not a lens; buttons or keys); grades persist in the browser's ``localStorage`` under the scan's
identity, and *Export grades.csv* downloads ``objid, ra, dec, tile, score, grade``. The page exposes
``window.lensscanGradesCSV()``, which returns that CSV text.

Example
-------
>>> url = write_report("lensscan-demo-scan", truth="demo-survey/truth.parquet", top_n=200)
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import html
import io
import json
import logging
import math
import re
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from scanner import __version__, layout, storage
from scanner.cutouts import cut_stamps, describe_flags
from scanner.metrics import (PRCurve, average_precision, precision_at_top, precision_recall,
                             recall_in_top_fraction, top_count)
from scanner.normalise import sky_level_and_noise
from scanner.layout import candidates_dir, read_candidates, read_failures
from scanner.plan import Plan, load_plan
from scanner.tiles import TileError, read_pixels

logger = logging.getLogger(__name__)

GRADES = ("A", "B", "C", "not_lens")
PAGE_SIZE = 50
TOP_FRACTION = 0.01
JPEG_QUALITY = 85

#: Lupton stretch: the asinh turns from linear to logarithmic near ``LUPTON_STRETCH_SIGMA / Q``
#: sky-noise units, so the noise is dim, 3-10 sigma arcs are clearly visible and cores saturate
#: only hundreds of sigma up.
LUPTON_STRETCH_SIGMA = 5.0
LUPTON_Q = 8.0

#: Colour of stamp pixels with no data (outside the tile or masked in every band).
MISSING_RGB = (70, 70, 70)

#: Effective wavelengths (nm) that order bands from blue to red for the colour stamps.
BAND_WAVELENGTH_NM: dict[str, float] = {
    "u": 355.0, "g": 475.0, "r": 622.0, "i": 763.0, "z": 905.0, "y": 1000.0,
    "Y": 1020.0, "J": 1250.0, "H": 1650.0, "K": 2200.0, "Ks": 2150.0,
}

#: How many failure rows the provenance section lists verbatim.
FAILURE_EXAMPLES = 10


class ReportError(ValueError):
    """The report cannot be written; the message says which input is wrong and what to do."""


@dataclass
class ScanOutput:
    """What the report reads from a finished scan's output directory."""

    out: str
    scan: dict[str, Any]
    metadata: dict[str, Any]
    plan: Plan
    scan_key: str


@dataclass
class TruthSummary:
    """Ranking quality against truth labels, over every scored object."""

    n_truth_lenses: int
    n_lenses_scored: int
    n_lenses_failed: int  # lenses of the catalog in failures/: counted as missed by every recall
    n_scored: int
    n_scored_without_truth: int
    n_top: int
    precision_top_n: float
    n_top_fraction: int
    recall_top_fraction: float
    average_precision: float
    curve: PRCurve
    lens_scores: np.ndarray
    is_lens_top: np.ndarray


# --------------------------------------------------------------------------------------------
# Reading the scan


def _read_scan(out: str) -> ScanOutput:
    """The scan's summary, catalog metadata, plan and identity; refuse an unfinished scan."""
    scan_url = layout.scan_file(out)
    if not storage.exists(scan_url):
        raise ReportError(f"{out} holds no scan.json: it is not a finished lensscan scan; finish it "
                          f"with 'lensscan scan ... --out {out} --resume' first")
    scan = json.loads(storage.read_bytes(scan_url))
    plan = load_plan(out)
    if plan is None:
        raise ReportError(f"{out}/_plan/plan.json is missing: the report re-cuts stamps from the "
                          f"tiles the plan lists; re-run the scan with --overwrite")
    identity_url = layout.identity_file(out)
    identity = storage.read_bytes(identity_url) if storage.exists(identity_url) else out.encode()
    return ScanOutput(out, scan, _catalog_metadata(out), plan,
                      hashlib.sha256(identity).hexdigest()[:16])


def _candidates_dataset(out: str) -> pads.Dataset | None:
    fs, path = storage.filesystem(candidates_dir(out))
    if not fs.exists(path):
        return None
    return pads.dataset(path, filesystem=fs, format="parquet", exclude_invalid_files=False)


def _catalog_metadata(out: str) -> dict[str, Any]:
    """The ``lensscan`` metadata of the candidate shards (models, bands, input spec), or {}."""
    ds = _candidates_dataset(out)
    meta = (ds.schema.metadata or {}) if ds is not None else {}
    return json.loads(meta[b"lensscan"]) if b"lensscan" in meta else {}


def version_columns(names: Sequence[str]) -> list[str]:
    """The per-version score columns (``score_<model>_v<k>``) among ``names``, in their order."""
    return [n for n in names if re.fullmatch(r"score_.+_v\d+", n)]


def _ranked_scores(out: str) -> pa.Table:
    """``objid`` and ``score`` of every scored object, best first (ties by objid)."""
    table = read_candidates(out, columns=["objid", "score"])
    if table.num_rows == 0:
        return pa.table({"objid": pa.array([], pa.int64()), "score": pa.array([], pa.float32())})
    return table.sort_by([("score", "descending"), ("objid", "ascending")])


def _top_candidates(out: str, ranked: pa.Table, top_n: int) -> pd.DataFrame:
    """Every catalog column of the ``top_n`` best candidates, in rank order, read by objid."""
    ids = ranked["objid"].slice(0, top_n)
    ds = _candidates_dataset(out)
    if ds is None or len(ids) == 0:
        return pd.DataFrame()
    rows = ds.to_table(filter=pc.field("objid").isin(ids)).to_pandas()
    rank = pd.Series(np.arange(len(ids)), index=ids.to_numpy())
    rows["rank"] = rank.reindex(rows["objid"]).to_numpy() + 1
    return rows.sort_values("rank").reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# Colour stamps


def rgb_band_order(bands: Sequence[str]) -> tuple[int, int, int]:
    """Indices of the bands shown as red, green and blue: reddest, middle and bluest.

    Bands of unknown wavelength keep their given order, taken as blue to red. One band gives grey;
    two give red and blue with their mean as green (handled by :func:`colour_stamps`).

    Example
    -------
    >>> rgb_band_order(["g", "r", "i"])
    (2, 1, 0)
    """
    known = all(b in BAND_WAVELENGTH_NM for b in bands)
    order = sorted(range(len(bands)), key=lambda k: BAND_WAVELENGTH_NM[bands[k]] if known else k)
    return order[-1], order[len(order) // 2], order[0]


def colour_stamps(stamps: np.ndarray, bands: Sequence[str]) -> np.ndarray:
    """Return Lupton asinh RGB images (N, S, S, 3) uint8 of raw stamps (N, C, S, S), north up.

    Each band is sky-subtracted and divided by its sky noise (median and MAD of the stamp's outer
    frame, as in normalisation), so the stretch is fixed in noise units: faint arcs show at a few
    sigma while bright cores keep their colour. Pixels outside the tile or masked in every band
    are painted grey, so they are not mistaken for empty sky.
    """
    from astropy.visualization import make_lupton_rgb

    n, c, s, _ = stamps.shape
    level, noise = sky_level_and_noise(stamps)
    snr = np.nan_to_num((stamps - level[..., None, None]) / noise[..., None, None])
    blank = np.isnan(stamps).all(axis=1)
    red, green, blue = rgb_band_order(bands)
    out = np.empty((n, s, s, 3), np.uint8)
    for k in range(n):
        r, b = snr[k, red], snr[k, blue]
        g = snr[k, green] if c != 2 else 0.5 * (r + b)
        with np.errstate(divide="ignore", invalid="ignore"):  # blank sky pixels divide 0 by 0
            rgb = make_lupton_rgb(r, g, b, minimum=0.0, stretch=LUPTON_STRETCH_SIGMA, Q=LUPTON_Q)
        rgb[blank[k]] = MISSING_RGB
        # FITS row 0 is the bottom of the image; browsers draw row 0 at the top.
        out[k] = rgb[::-1]
    return out


def _jpeg_data_uri(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    # 4:2:0 chroma keeps arcs blue at this size and halves the bytes of 4:4:4 (noise is costly).
    Image.fromarray(rgb).save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=2)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode()


def _tile_thumbnails(plan: Plan, tile_name: str, rows: pd.DataFrame,
                     stamp_size: int) -> dict[int, str]:
    """Thumbnail data URIs of one tile's candidates by objid (one read of the tile's pixels)."""
    tile = plan.tile(tile_name)
    if tile.error is not None:
        raise TileError(tile.error)
    pixels = read_pixels(tile, plan.bands)
    stamps = cut_stamps(pixels, rows["x"].to_numpy(), rows["y"].to_numpy(), stamp_size)
    del pixels
    images = colour_stamps(stamps.pixels, plan.bands)
    return {int(objid): _jpeg_data_uri(img) for objid, img in zip(rows["objid"], images)}


def thumbnails(plan: Plan, top: pd.DataFrame, stamp_size: int,
               threads: int = 4) -> tuple[dict[int, str], dict[int, str]]:
    """Colour thumbnails of the candidates in ``top``, reading each of their tiles once.

    Returns the data URIs by objid and, for candidates whose tile cannot be read now, the reason.
    A few tiles are read concurrently (I/O bound on cloud storage); memory stays a few tiles.
    """
    images: dict[int, str] = {}
    missing: dict[int, str] = {}
    groups = list(top.groupby("tile", sort=False))

    def one(item: tuple[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict[int, str] | str]:
        name, rows = item
        try:
            return rows, _tile_thumbnails(plan, str(name), rows, stamp_size)
        except Exception as exc:  # noqa: BLE001 - a tile gone since the scan costs its stamps only
            reason = f"tile {name} cannot be read now ({type(exc).__name__}: {exc})"
            logger.warning("%s; its %d candidates are shown without a stamp", reason, len(rows))
            return rows, reason

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for rows, result in pool.map(one, groups):
            if isinstance(result, str):
                missing.update({int(o): result for o in rows["objid"]})
            else:
                images.update(result)
    return images, missing


# --------------------------------------------------------------------------------------------
# Truth and metrics


def _truth_columns(url: str, wanted: Sequence[str]) -> pd.DataFrame:
    """The columns of ``wanted`` that the Parquet or CSV table at ``url`` has."""
    fs, path = storage.filesystem(url)
    with fs.open(path, "rb", compression="infer") as f:
        if re.search(r"\.(csv|txt)(\.\w+)?$", path.lower()):
            return pd.read_csv(f, comment="#", usecols=lambda c: c in wanted)
        parquet = pq.ParquetFile(f)
        names = parquet.schema_arrow.names
        return parquet.read(columns=[c for c in wanted if c in names]).to_pandas()


def read_truth(url: str) -> pd.DataFrame:
    """The truth table's ``objid`` (int64) and ``is_lens`` (bool), from Parquet or CSV."""
    wanted = ("objid", "is_lens")
    try:
        frame = _truth_columns(url, wanted)
    except FileNotFoundError:
        raise ReportError(f"--truth {url}: no such file") from None
    except (ValueError, OSError, pa.ArrowInvalid) as exc:
        raise ReportError(f"--truth {url}: cannot read it as Parquet or CSV ({exc})") from None
    missing = set(wanted) - set(frame.columns)
    if missing:
        raise ReportError(f"--truth {url} lacks column(s) {sorted(missing)}; it needs objid and "
                          f"is_lens (true for lenses), e.g. a mock survey's truth.parquet")
    if frame["objid"].isna().any() or frame["is_lens"].isna().any():
        raise ReportError(f"--truth {url}: objid and is_lens must have no missing values")
    try:
        return pd.DataFrame({"objid": frame["objid"].astype(np.int64),
                             "is_lens": frame["is_lens"].astype(bool)})
    except (ValueError, TypeError) as exc:
        raise ReportError(f"--truth {url}: objid must be integers and is_lens booleans "
                          f"({exc})") from None


def summarise_truth(ranked: pa.Table, truth: pd.DataFrame, top_n: int,
                    failed_objids: np.ndarray | None = None) -> TruthSummary:
    """Ranking metrics of the scan against truth; scored objects absent from truth are non-lenses.

    Treating absent objects as non-lenses lets the truth be just a list of known lenses. Lenses
    among ``failed_objids`` (objects the scan could not score) count as missed: a search that
    fails on a lens has not found it.
    """
    objid = ranked["objid"].to_numpy()
    scores = ranked["score"].to_numpy().astype(np.float64)
    lenses = np.unique(truth.loc[truth["is_lens"], "objid"].to_numpy())
    labels = np.isin(objid, lenses)
    failed = np.zeros(0, np.int64) if failed_objids is None else np.asarray(failed_objids)
    n_missed = int(np.isin(lenses, np.setdiff1d(failed, objid)).sum())
    n_top = min(top_n, len(objid))
    return TruthSummary(
        n_truth_lenses=len(lenses),
        n_lenses_scored=int(labels.sum()),
        n_lenses_failed=n_missed,
        n_scored=len(objid),
        n_scored_without_truth=int((~np.isin(objid, truth["objid"].to_numpy())).sum()),
        n_top=n_top,
        precision_top_n=precision_at_top(scores, labels, n_top) if n_top else math.nan,
        n_top_fraction=top_count(len(objid), TOP_FRACTION) if len(objid) else 0,
        recall_top_fraction=recall_in_top_fraction(scores, labels, TOP_FRACTION, n_missed),
        average_precision=average_precision(scores, labels, n_missed),
        curve=precision_recall(scores, labels, n_missed),
        lens_scores=scores[labels],
        is_lens_top=labels[:n_top],
    )


def _failed_objids(out: str) -> np.ndarray:
    """Objids of the scan's failure rows (tile rows have none)."""
    objid = read_failures(out)["objid"]
    return objid.drop_null().to_numpy() if objid.null_count else objid.to_numpy()


def truth_summary(out: str, truth: str, top_n: int = 50) -> TruthSummary:
    """The finished scan in ``out`` ranked against the truth table at ``truth``."""
    return summarise_truth(_ranked_scores(out), read_truth(truth), top_n, _failed_objids(out))


def truth_line(summary: TruthSummary) -> str:
    """One line for a terminal: recall in the top 1% of ranks and precision in the top N.

    The lenses counted are those scored and those that failed (counted as missed).
    """
    n_lenses = summary.n_lenses_scored + summary.n_lenses_failed
    n_found = int(round(summary.recall_top_fraction * n_lenses)) if n_lenses else 0
    failed = (f", {summary.n_lenses_failed} of them failed (see failures/) and count as missed"
              if summary.n_lenses_failed else "")
    return (f"against truth: {n_found} of {n_lenses} lenses "
            f"({summary.recall_top_fraction:.0%}) in the top {TOP_FRACTION:.0%} of ranks "
            f"({summary.n_top_fraction} of {summary.n_scored}){failed}; precision in the top "
            f"{summary.n_top} {summary.precision_top_n:.2f}; average precision "
            f"{summary.average_precision:.2f}")


# --------------------------------------------------------------------------------------------
# Figures


def _png_data_uri(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def score_histogram(scores: np.ndarray, lens_scores: np.ndarray | None, top_threshold: float | None,
                    n_top: int) -> str:
    """PNG data URI of the histogram of every scored object's ensemble score (log counts)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.2))
    ax = fig.subplots()
    edges = np.histogram_bin_edges(scores, bins=50) if scores.size else np.linspace(0, 1, 51)
    ax.hist(scores, bins=edges, color="#4c72b0", label=f"scored objects ({scores.size})")
    if lens_scores is not None and lens_scores.size:
        ax.hist(lens_scores, bins=edges, color="#dd8452", label=f"true lenses ({lens_scores.size})")
    if top_threshold is not None:
        ax.axvline(top_threshold, color="k", ls="--", lw=1, label=f"score of candidate {n_top}")
    if scores.size:
        ax.set_yscale("log")
    ax.set_xlabel("ensemble score")
    ax.set_ylabel("objects")
    ax.legend(fontsize=8, frameon=False)
    return _png_data_uri(fig)


def pr_figure(truth: TruthSummary) -> str:
    """PNG data URI of the precision-recall curve, marking the gallery's top N."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2, 3.2))
    ax = fig.subplots()
    curve = truth.curve
    ax.step(np.r_[0.0, curve.recall], np.r_[1.0, curve.precision], where="post", color="#4c72b0")
    ax.axhline(truth.n_lenses_scored / max(truth.n_scored, 1), color="grey", ls=":", lw=1,
               label="lens fraction (random ranking)")
    n_lenses = truth.n_lenses_scored + truth.n_lenses_failed
    recall_top_n = truth.is_lens_top.sum() / n_lenses if n_lenses else 0.0
    ax.plot([recall_top_n], [truth.precision_top_n], "o", color="#dd8452",
            label=f"top {truth.n_top} (the gallery)")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, frameon=False, loc="upper right")
    return _png_data_uri(fig)


# --------------------------------------------------------------------------------------------
# The page


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _table(header: Sequence[str] | None, rows: Iterable[Sequence[Any]]) -> str:
    """An HTML table of escaped cells; ``header=None`` for a two-column list of facts."""
    head = ("<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr></thead>"
            if header else "")
    body = "".join("<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table>{head}<tbody>{body}</tbody></table>"


def _fmt(x: float, digits: int = 3) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def _scores_html(hist_uri: str, truth: TruthSummary | None, truth_url: str | None) -> str:
    """The score histogram and, with truth, the ranking metrics and the PR curve."""
    parts = [f'<img class="plot" alt="histogram of ensemble scores" src="{hist_uri}">']
    if truth is None:
        parts.append('<p class="note">No truth labels given: <code>lensscan report OUT --truth '
                      'truth.parquet</code> (objid, is_lens) adds the precision-recall curve, the '
                      'precision in the top N and the recall in the top 1%.</p>')
        return "\n".join(parts)
    rows = [
        (f"precision in the top {truth.n_top}",
         f"{_fmt(truth.precision_top_n)} ({int(truth.is_lens_top.sum())} lenses)"),
        (f"recall in the top 1% ({truth.n_top_fraction} objects)", _fmt(truth.recall_top_fraction)),
        ("average precision", _fmt(truth.average_precision)),
        ("true lenses scored", f"{truth.n_lenses_scored} of {truth.n_truth_lenses} in the truth "
                               f"table; {truth.n_lenses_failed} failed (in failures/) and count as "
                               f"missed in every recall; the rest are not in the catalog"),
        ("scored objects", truth.n_scored),
    ]
    parts.append(f'<img class="plot" alt="precision-recall curve" src="{pr_figure(truth)}">')
    parts.append(_table(("metric", "value"), rows))
    parts.append(f'<p class="note">Against <code>{_esc(truth_url)}</code>, over every scored '
                 f'object ranked by ensemble score; computed with numpy by '
                 f'<code>scanner.metrics</code>. Scored objects absent from the truth table count '
                 f'as non-lenses ({truth.n_scored_without_truth} such objects).</p>')
    return "\n".join(parts)


def _fold_numbers(reason: str) -> str:
    """A failure reason with its numbers replaced by '#', so like reasons count together."""
    return re.sub(r"\d+(\.\d+)?", "#", reason)


def _failures_html(out: str) -> str:
    """Failure counts by stage and reason, and the first few failure rows."""
    failures = read_failures(out)
    if failures.num_rows == 0:
        return "<p>No failures: every catalog object was scored.</p>"
    kinds = pd.DataFrame({"stage": failures["stage"].to_pylist(),
                          "reason": [_fold_numbers(r or "") for r in failures["reason"].to_pylist()]})
    counts = kinds.value_counts(["stage", "reason"]).reset_index(name="rows")
    columns = ("objid", "ra", "dec", "tile", "stage", "reason")
    examples = failures.select(list(columns)).slice(0, FAILURE_EXAMPLES).to_pylist()
    return (f"<p>{failures.num_rows} failure rows in <code>failures/</code>, by stage and reason "
            f"(numbers folded to #):</p>"
            + _table(("stage", "reason", "rows"), counts.itertuples(index=False))
            + f"<p>First {len(examples)} rows:</p>"
            + _table(columns, ([("" if r[c] is None else r[c]) for c in columns] for r in examples)))


def _provenance_html(scan: ScanOutput, columns: Sequence[str]) -> str:
    """Models with their content hashes, tiles, object counts, configuration and failures."""
    s = scan.scan
    config = s.get("config", {})
    models = s.get("models") or scan.metadata.get("models", [])
    # The scan writes one score column per version, in the order it lists the models.
    model_columns = list(columns) if len(columns) == len(models) else [""] * len(models)
    model_rows = [(m.get("name"), m.get("version"), col, m.get("content_hash"))
                  for m, col in zip(models, model_columns)]
    spec = scan.metadata.get("input_spec", {})
    facts = [
        ("scan output", scan.out),
        ("tiles", f"{s.get('n_tiles')} ({s.get('n_tiles_unreadable', 0)} cannot be scanned) from "
                  f"{config.get('tiles')} ({config.get('tile_pattern') or s.get('tile_layout')})"),
        ("catalog", f"{config.get('catalog')}: {s.get('n_catalog')} objects"),
        ("objects scored / failed", f"{s.get('n_scored')} / {s.get('n_failed')}"),
        ("survey bands (model channels)", ",".join(scan.plan.bands)),
        ("input spec", ", ".join(f"{k}={v}" for k, v in spec.items())),
        ("scanned with", f"lensscan {s.get('lensscan_version')}"),
        ("report by", f"lensscan {__version__}, "
                      f"{datetime.now(timezone.utc).isoformat(timespec='seconds')}"),
    ]
    return ("<h3>Scan</h3>" + _table(None, facts)
            + "<h3>Models</h3>" + _table(("model", "version", "score column", "content hash"),
                                         model_rows)
            + "<h3>Failures</h3>" + _failures_html(scan.out))


def _version_labels(columns: Sequence[str]) -> list[str]:
    """Short labels of the per-version columns: 'v1' when one model, else '<model>_v1'."""
    names = {re.sub(r"_v\d+$", "", c) for c in columns}
    return [c.rsplit("_", 1)[1] if len(names) == 1 else c.removeprefix("score_") for c in columns]


def _finite_or_none(x: float, digits: int) -> float | None:
    return round(float(x), digits) if np.isfinite(x) else None


def gallery_data(top: pd.DataFrame, columns: Sequence[str], images: dict[int, str],
                 missing: dict[int, str], is_lens: np.ndarray | None) -> list[dict[str, Any]]:
    """One JSON-ready record per candidate, in rank order; objids as strings (they may exceed 2^53)."""
    records = []
    for k, row in enumerate(top.itertuples(index=False)):
        objid = int(row.objid)
        rec = {"objid": str(objid), "rank": int(row.rank), "ra": float(row.ra),
               "dec": float(row.dec), "tile": str(row.tile), "x": round(float(row.x), 2),
               "y": round(float(row.y), 2), "score": _finite_or_none(row.score, 6),
               "score_std": _finite_or_none(row.score_std, 6),
               "versions": [_finite_or_none(getattr(row, c), 4) for c in columns],
               "flags": describe_flags(int(row.flags)) if row.flags else "",
               "img": images.get(objid), "why": missing.get(objid, "")}
        if is_lens is not None:
            rec["lens"] = bool(is_lens[k])
        records.append(rec)
    return records


def _json_for_script(data: dict[str, Any]) -> str:
    """``data`` as JSON that cannot end or alter the ``<script>`` element holding it: ``<``, ``>``
    and ``&`` are escaped, so no ``</script>`` or ``<!--`` from a tile name or catalog string
    reaches the HTML parser."""
    text = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fill(template: str, values: dict[str, str]) -> str:
    """``template`` with each ``{{name}}`` replaced by ``values[name]``, in one pass: a value that
    itself holds ``{{...}}`` (a tile name, say) is never filled in again."""
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], template)


def render_html(title: str, subtitle: str, data: dict[str, Any], scores_html: str,
                provenance_html: str) -> str:
    """The report page: static sections plus the gallery script reading ``data``."""
    truth_toggle = ('<label><input type="checkbox" id="show-truth"> show truth labels</label>'
                    if data["has_truth"] else "")
    return _fill(_PAGE, {"title": _esc(title), "subtitle": _esc(subtitle),
                         "truth_toggle": truth_toggle, "scores": scores_html,
                         "provenance": provenance_html, "style": _STYLE, "script": _SCRIPT,
                         "data": _json_for_script(data)})


def write_report(out: str, truth: str | None = None, top_n: int = 200) -> str:
    """Write ``report.html`` into the finished scan ``out`` and return its URL.

    Parameters
    ----------
    out : output directory URL of a finished scan (holding ``scan.json``).
    truth : optional truth table (Parquet or CSV with ``objid``, ``is_lens``): adds the PR curve,
        the precision in the top ``top_n`` and the recall in the top 1%.
    top_n : candidates in the gallery, best first.

    Raises
    ------
    ReportError
        ``out`` is not a finished scan, the truth table is unusable, or ``top_n < 1``.

    Example
    -------
    >>> write_report("lensscan-demo-scan", top_n=100)
    'lensscan-demo-scan/report.html'
    """
    if top_n < 1:
        raise ReportError(f"--top {top_n}: give the number of candidates to show (>= 1)")
    scan = _read_scan(out)
    ranked = _ranked_scores(out)
    top = _top_candidates(out, ranked, top_n)
    columns = version_columns(list(top.columns))
    stamp_size = int(scan.metadata.get("input_spec", {}).get("stamp_size_pix", 64))
    images, missing = thumbnails(scan.plan, top, stamp_size) if len(top) else ({}, {})
    summary = summarise_truth(ranked, read_truth(truth), top_n, _failed_objids(out)) if truth else None
    scores = ranked["score"].to_numpy().astype(np.float64)
    threshold = float(scores[len(top) - 1]) if len(top) else None
    hist = score_histogram(scores, summary.lens_scores if summary else None, threshold, len(top))
    data = {"scan_key": scan.scan_key, "page_size": PAGE_SIZE, "grades": list(GRADES),
            "thumb_px": min(160, max(96, 2 * stamp_size)), "has_truth": summary is not None,
            "version_labels": _version_labels(columns), "version_columns": list(columns),
            "candidates": gallery_data(top, columns, images, missing,
                                       summary.is_lens_top if summary else None)}
    subtitle = (f"Top {len(top)} of {len(ranked)} scored objects "
                f"({scan.scan.get('n_failed', 0)} failed), ranked by ensemble score")
    page = render_html(f"lensscan report: {out}", subtitle, data,
                       _scores_html(hist, summary, truth), _provenance_html(scan, columns))
    url = layout.report_file(out)
    storage.write_bytes_atomic(url, page.encode())
    logger.info("wrote %s (%d candidates, %.1f MB)", url, len(top), len(page) / 1e6)
    return url


# --------------------------------------------------------------------------------------------
# Command line


def add_report_command(subparsers: argparse._SubParsersAction) -> None:
    """Add ``lensscan report OUT [--truth URL] [--top N]`` to the ``lensscan`` command."""
    p = subparsers.add_parser("report", help="write report.html (gallery to grade the top "
                              "candidates, score histogram, PR curve with truth) for a finished scan")
    p.add_argument("out", help="output directory URL of a finished scan")
    p.add_argument("--truth", help="truth table, Parquet or CSV with objid and is_lens: adds the "
                   "precision-recall curve, precision in the top N and recall in the top 1%%")
    p.add_argument("--top", type=int, default=200, help="candidates in the gallery "
                   "(default: %(default)s)")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """Run ``lensscan report``; 0 when written, 2 when refused."""
    try:
        url = write_report(args.out, truth=args.truth, top_n=args.top)
    except ReportError as exc:
        print(f"lensscan report: refused: {exc}", file=sys.stderr)
        return 2
    print(f"report: {url}")
    return 0


# --------------------------------------------------------------------------------------------
# Page template: static sections are filled in by Python, the gallery is drawn by the script.

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}}</title>
<style>{{style}}</style>
</head>
<body>
<header>
<h1>{{title}}</h1>
<p class="sub">{{subtitle}}</p>
<nav><a href="#gallery">Gallery</a> <a href="#scores">Scores</a> <a href="#provenance">Provenance</a></nav>
</header>
<section id="gallery">
<div class="toolbar">
<button type="button" id="prev" title="previous page ([)">&#9664; Prev</button>
<span id="page-info"></span>
<button type="button" id="next" title="next page (])">Next &#9654;</button>
<label>per page <select id="page-size"><option>25</option><option>50</option><option>100</option><option>200</option></select></label>
{{truth_toggle}}
<span id="grade-counts"></span>
<button type="button" id="export" title="download grades.csv: objid, ra, dec, tile, score, grade">Export grades.csv</button>
</div>
<p class="help">Grade the selected card with <kbd>a</kbd> <kbd>b</kbd> <kbd>c</kbd> or <kbd>n</kbd> (not a lens),
<kbd>0</kbd> clears; <kbd>&rarr;</kbd>/<kbd>j</kbd> and <kbd>&larr;</kbd>/<kbd>k</kbd> move, <kbd>]</kbd> <kbd>[</kbd> turn pages.
Grades stay in this browser (<span id="storage-state">saved per scan</span>) until exported.
Stamps: Lupton asinh RGB of the bands, each in units of its sky noise, north up.</p>
<div id="cards" class="cards"></div>
</section>
<section id="scores">
<h2>Scores</h2>
{{scores}}
</section>
<section id="provenance">
<h2>Provenance</h2>
{{provenance}}
</section>
<script type="application/json" id="lensscan-data">{{data}}</script>
<script>{{script}}</script>
</body>
</html>
"""

_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 1.5em 2em; color: #222; background: #f4f4f2; }
header h1 { font-size: 1.3em; margin: .6em 0 0; word-break: break-all; }
.sub { margin: .2em 0; color: #555; }
nav a { margin-right: 1em; }
h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; margin-top: 1.5em; }
h3 { font-size: 1em; margin-bottom: .3em; }
.toolbar { position: sticky; top: 0; z-index: 2; background: #f4f4f2; padding: .5em 0;
           display: flex; flex-wrap: wrap; gap: .8em; align-items: center; }
.help { color: #555; font-size: .9em; margin: 0 0 .6em; }
kbd { border: 1px solid #bbb; border-radius: 3px; padding: 0 .3em; background: #fff; font-size: .9em; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(185px, 1fr)); gap: 10px; }
.card { background: #fff; border: 2px solid #ddd; border-radius: 6px; padding: 6px; font-size: 12px;
        cursor: pointer; outline: none; }
.card.current { border-color: #2a6fdb; box-shadow: 0 0 0 2px #2a6fdb55; }
.card img, .card .nostamp { display: block; margin: 0 auto 4px; background: #000; }
.card .nostamp { color: #ddd; font-size: 11px; padding: 4px; box-sizing: border-box; overflow: hidden; }
.card .rank { float: right; color: #888; }
.card .coords, .card .where { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.card .objid { font-weight: 600; }
.card .versions, .card .where { color: #666; }
.card .flags { color: #a0522d; font-weight: 600; }
.card .truth { display: none; font-weight: 600; }
body.show-truth .card .truth { display: inline; }
.card .truth.lens { color: #1b7f3b; }
.card .truth.nonlens { color: #999; }
.grades { display: flex; gap: 3px; margin-top: 4px; }
.grades button { flex: 1; padding: 2px 0; font-size: 12px; border: 1px solid #bbb; background: #f8f8f8;
                 border-radius: 3px; cursor: pointer; }
.grades button.on { background: #2a6fdb; color: #fff; border-color: #2a6fdb; }
.grades button.on[data-grade="not_lens"] { background: #777; border-color: #777; }
.card.graded { background: #eef4ff; }
img.plot { max-width: 100%; margin: .3em 1em .3em 0; vertical-align: top; }
table { border-collapse: collapse; margin: .3em 0 .8em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: left; vertical-align: top; }
th { background: #eaeae6; }
td { word-break: break-all; }
.note { color: #555; max-width: 60em; }
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var DATA = JSON.parse(document.getElementById("lensscan-data").textContent);
  var cands = DATA.candidates;
  var KEY = "lensscan-grades/" + DATA.scan_key;
  var LABELS = {A: "A", B: "B", C: "C", not_lens: "not a lens"};
  var SHORT = {A: "A", B: "B", C: "C", not_lens: "not"};
  var KEYS = {a: "A", b: "B", c: "C", n: "not_lens", x: "not_lens"};
  var state = {page: 0, pageSize: DATA.page_size, current: 0};
  var grades = load();

  function load() {
    try {
      return JSON.parse(window.localStorage.getItem(KEY) || "{}");
    } catch (e) {
      unsaved();
      return {};
    }
  }
  function unsaved() {
    document.getElementById("storage-state").textContent =
      "browser storage unavailable: grades last until the page is closed";
  }
  function save() {
    try {
      window.localStorage.setItem(KEY, JSON.stringify(grades));
    } catch (e) {
      unsaved();
    }
    counts();
  }
  function gradeOf(i) {
    var g = grades[cands[i].objid];
    return g ? g.grade : "";
  }
  function setGrade(i, grade) {
    var c = cands[i];
    if (grade) {
      grades[c.objid] = {grade: grade, ra: c.ra, dec: c.dec, tile: c.tile, score: c.score};
    } else {
      delete grades[c.objid];
    }
    save();
    var el = document.getElementById("card-" + i);
    if (el) { paintGrade(el, i); }
  }

  function csvField(v) {
    var s = v === null || v === undefined ? "" : String(v);
    return /[",\r\n]/.test(s) ? '"' + s.replace(/"/g, '""') + '"' : s;
  }
  // The CSV the Export button downloads: every graded candidate of this scan, best score first.
  window.lensscanGradesCSV = function () {
    var rows = Object.keys(grades).map(function (id) {
      var g = grades[id];
      return [id, g.ra, g.dec, g.tile, g.score, g.grade];
    });
    rows.sort(function (a, b) { return (b[4] - a[4]) || (a[0] < b[0] ? -1 : 1); });
    var lines = ["objid,ra,dec,tile,score,grade"];
    rows.forEach(function (r) { lines.push(r.map(csvField).join(",")); });
    return lines.join("\n") + "\n";
  };

  function node(tag, cls, text) {
    var el = document.createElement(tag);
    if (cls) { el.className = cls; }
    if (text !== undefined) { el.textContent = text; }
    return el;
  }
  function num(x, digits) { return x === null ? "n/a" : x.toFixed(digits); }
  function signed(x, digits) { return (x >= 0 ? "+" : "") + x.toFixed(digits); }

  function card(i) {
    var c = cands[i];
    var el = node("article", "card");
    el.id = "card-" + i;
    el.tabIndex = -1;
    el.dataset.index = i;
    el.dataset.objid = c.objid;
    if (c.img) {
      var img = new Image(DATA.thumb_px, DATA.thumb_px);
      img.alt = "colour stamp of object " + c.objid;
      img.src = c.img;
      el.appendChild(img);
    } else {
      var box = node("div", "nostamp", "no stamp: " + c.why);
      box.style.width = box.style.height = DATA.thumb_px + "px";
      el.appendChild(box);
    }
    el.appendChild(node("span", "rank", "#" + c.rank));
    var id = node("div", "objid", c.objid + " ");
    if (DATA.has_truth) {
      id.appendChild(node("span", "truth " + (c.lens ? "lens" : "nonlens"), c.lens ? "lens" : "non-lens"));
    }
    el.appendChild(id);
    el.appendChild(node("div", "coords", "RA " + c.ra.toFixed(5) + " Dec " + signed(c.dec, 5)));
    el.appendChild(node("div", "", "score " + num(c.score, 4) + " \u00b1 " + num(c.score_std, 4)));
    var v = node("div", "versions", c.versions.map(function (s, k) {
      return DATA.version_labels[k] + " " + num(s, 3);
    }).join(" \u00b7 "));
    v.title = DATA.version_columns.join(", ");
    el.appendChild(v);
    var where = node("div", "where", c.tile + " (" + c.x.toFixed(0) + ", " + c.y.toFixed(0) + ")");
    if (c.flags) {
      where.appendChild(document.createTextNode(" "));
      where.appendChild(node("span", "flags", c.flags));
    }
    el.appendChild(where);
    var row = node("div", "grades");
    DATA.grades.forEach(function (g) {
      var b = node("button", "", SHORT[g]);
      b.type = "button";
      b.dataset.grade = g;
      b.title = LABELS[g];
      b.addEventListener("click", function (ev) {
        ev.stopPropagation();
        select(i);
        setGrade(i, gradeOf(i) === g ? "" : g);
      });
      row.appendChild(b);
    });
    el.appendChild(row);
    el.addEventListener("click", function () { select(i); });
    paintGrade(el, i);
    return el;
  }
  function paintGrade(el, i) {
    var g = gradeOf(i);
    el.classList.toggle("graded", g !== "");
    el.querySelectorAll(".grades button").forEach(function (b) {
      b.classList.toggle("on", b.dataset.grade === g);
    });
  }

  function pages() { return Math.max(1, Math.ceil(cands.length / state.pageSize)); }
  function render() {
    var start = state.page * state.pageSize;
    var end = Math.min(cands.length, start + state.pageSize);
    var box = document.getElementById("cards");
    var frag = document.createDocumentFragment();
    for (var i = start; i < end; i++) { frag.appendChild(card(i)); }
    box.textContent = "";
    box.appendChild(frag);
    document.getElementById("page-info").textContent = cands.length
      ? "page " + (state.page + 1) + " of " + pages() + ": candidates " + (start + 1) + "\u2013" +
        end + " of " + cands.length
      : "no candidates";
    document.getElementById("prev").disabled = state.page === 0;
    document.getElementById("next").disabled = state.page >= pages() - 1;
    highlight();
  }
  function showPage(p) {
    p = Math.max(0, Math.min(pages() - 1, p));
    if (p !== state.page) {
      state.page = p;
      state.current = p * state.pageSize;
      render();
      window.scrollTo(0, document.getElementById("gallery").offsetTop);
    }
  }
  function highlight() {
    document.querySelectorAll(".card.current").forEach(function (el) { el.classList.remove("current"); });
    var el = document.getElementById("card-" + state.current);
    if (el) { el.classList.add("current"); }
    return el;
  }
  function select(i) {
    if (!cands.length) { return; }
    state.current = Math.max(0, Math.min(cands.length - 1, i));
    var p = Math.floor(state.current / state.pageSize);
    if (p !== state.page) { state.page = p; render(); }
    var el = highlight();
    if (el) { el.scrollIntoView({block: "nearest"}); }
  }

  function counts() {
    var n = {A: 0, B: 0, C: 0, not_lens: 0}, total = 0;
    Object.keys(grades).forEach(function (id) { n[grades[id].grade] += 1; total += 1; });
    document.getElementById("grade-counts").textContent = "graded " + total + ": " +
      DATA.grades.map(function (g) { return LABELS[g] + " " + n[g]; }).join(", ");
  }

  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey || /INPUT|SELECT|TEXTAREA/.test(ev.target.tagName)) { return; }
    var k = ev.key.length === 1 ? ev.key.toLowerCase() : ev.key;
    if (KEYS[k] && cands.length) {
      setGrade(state.current, KEYS[k]);
      select(state.current + 1);
    } else if ((k === "0" || k === "Backspace" || k === "Delete") && cands.length) {
      setGrade(state.current, "");
    } else if (k === "ArrowRight" || k === "j") {
      select(state.current + 1);
    } else if (k === "ArrowLeft" || k === "k") {
      select(state.current - 1);
    } else if (k === "]" || k === "PageDown") {
      showPage(state.page + 1);
    } else if (k === "[" || k === "PageUp") {
      showPage(state.page - 1);
    } else {
      return;
    }
    ev.preventDefault();
  });
  document.getElementById("prev").addEventListener("click", function () { showPage(state.page - 1); });
  document.getElementById("next").addEventListener("click", function () { showPage(state.page + 1); });
  var size = document.getElementById("page-size");
  size.value = String(state.pageSize);
  size.addEventListener("change", function () {
    state.pageSize = parseInt(size.value, 10);
    state.page = Math.floor(state.current / state.pageSize);
    render();
  });
  var truth = document.getElementById("show-truth");
  if (truth) {
    truth.addEventListener("change", function () { document.body.classList.toggle("show-truth", truth.checked); });
  }
  document.getElementById("export").addEventListener("click", function () {
    var a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([window.lensscanGradesCSV()], {type: "text/csv"}));
    a.download = "grades.csv";
    document.body.appendChild(a);
    a.click();
    a.remove();
    setTimeout(function () { URL.revokeObjectURL(a.href); }, 1000);
  });
  counts();
  render();
})();
"""
