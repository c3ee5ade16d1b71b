"""Bad input: every case ends in a clear one-line refusal or a failures row, never a lost object.

One survey holds most of the problems at once (truncated, non-FITS, WCS-less, all-NaN and
band-less tiles, broken tiles overlapping a good one, tile names that cannot be folder names;
objects off the tiles, on edges, with bad coordinates or repeated ids) and the formats a survey
archive may use (scaled 16-bit integers, gzip), found without a tile pattern, and is scanned once;
the refusals are checked one by one.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from astropy.io import fits

from scanner.catalog import CatalogError, iter_catalog
from scanner.config import InputSpec, ScanConfig
from scanner.cutouts import FLAG_EDGE
from scanner.pipeline import EXIT_FAILURES, ScanRefused, read_candidates, read_failures, run_scan
from scanner.registry import RegistryError, load_ensemble, write_untrained_ensemble
from scanner.storage import with_retries
from tests.conftest import assert_every_catalog_row_once
from tests.fits_helpers import noisy_tile, tan_wcs, write_scaled_tile, write_tile

BANDS = ("g", "r", "i")
SIZE = 160
SPEC = InputSpec(stamp_size_pix=32)


@pytest.fixture(scope="module")
def small_models(tmp_path_factory):
    """A one-version ensemble for 32 px stamps: keeps these scans quick."""
    root = tmp_path_factory.mktemp("models")
    write_untrained_ensemble(root, name="small", n_versions=1, input_spec=SPEC,
                             params={"depth": 11, "width": 4, "stem_stride": 2})
    return str(root / "small")


def _centres(k: int) -> tuple[float, float]:
    return 150.0 + 0.02 * k, 2.0


def _objects(wcs, n, rng, margin=20):
    xy = rng.uniform(margin, SIZE - margin, (n, 2))
    ra, dec = wcs.pixel_to_world_values(xy[:, 0], xy[:, 1])
    return list(zip(ra, dec))


@pytest.fixture(scope="module")
def bad_survey(tmp_path_factory):
    """Tiles with one problem each, and a catalog with row-level problems; returns paths + rows."""
    root = tmp_path_factory.mktemp("bad-survey")
    tiles = root / "tiles"
    rng = np.random.default_rng(0)
    names = ["good", "trunc", "junk", "nowcs", "nanband", "noband"]
    rows, kinds = [], []
    for k, name in enumerate(names):
        wcs = tan_wcs(*_centres(k), SIZE)
        data = noisy_tile(SIZE, 3, k)
        bands = BANDS if name != "noband" else ("g", "r")
        if name == "nanband":
            data[1] = np.nan
        paths = write_tile(tiles, name, data[: len(bands)], wcs, bands)
        if name == "trunc":
            raw = paths[1].read_bytes()
            paths[1].write_bytes(raw[: len(raw) // 2])
        if name == "junk":
            paths[2].write_text("this is not a FITS file\n")
        if name == "nowcs":
            for p in paths:
                with fits.open(p, mode="update") as h:
                    for key in ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CD1_1", "CD2_2", "CD1_2", "CD2_1"):
                        h[0].header.remove(key, ignore_missing=True)
        for ra, dec in _objects(wcs, 5, rng):
            rows.append((ra, dec))
            kinds.append(name)
        if name == "good":
            for x, y in [(2.0, 80.0), (80.0, SIZE - 3.0)]:  # a few pixels from the edge
                ra, dec = wcs.pixel_to_world_values(x, y)
                rows.append((float(ra), float(dec)))
                kinds.append("edge")
    good = tan_wcs(*_centres(0), SIZE)
    _archive_formats(tiles, rng, rows, kinds)
    _broken_tiles_over(good, tiles, rows, kinds)
    _unusable_tile_names(tiles, rng, rows, kinds)
    for ra, dec, kind in [(10.0, 10.0, "off"), (np.nan, 2.0, "nan"), (400.0, 2.0, "range"),
                          (150.0, 95.0, "range")]:
        rows.append((ra, dec))
        kinds.append(kind)
    cat = pd.DataFrame(rows, columns=["ra", "dec"])
    cat.insert(0, "objid", np.arange(1, len(cat) + 1, dtype=np.int64))
    cat["kind"] = kinds
    dup = cat[cat["kind"] == "good"].iloc[[0]].assign(kind="duplicate")
    cat = pd.concat([cat, dup], ignore_index=True)
    cat[["objid", "ra", "dec"]].to_parquet(root / "catalog.parquet")
    return root, cat


def _archive_formats(tiles: Path, rng, rows: list, kinds: list) -> None:
    """The same image three ways: float32 ('twin'), 16-bit integers with BSCALE/BZERO ('scaled')
    and gzipped float32 ('gzipped'), with objects at the same pixels of each."""
    xy = rng.uniform(20, SIZE - 20, (5, 2))
    twin = noisy_tile(SIZE, 3, 6)
    twin = (np.round((twin - 20.0) / 0.005) * 0.005 + 20.0).astype(np.float32)  # exactly scalable
    for k, name in [(6, "twin"), (7, "scaled"), (8, "gzipped")]:
        wcs = tan_wcs(*_centres(k), SIZE)
        if name == "scaled":
            write_scaled_tile(tiles, name, twin, wcs, BANDS, bscale=0.005, bzero=20.0)
        else:
            for path in write_tile(tiles, name, twin, wcs, BANDS):
                if name == "gzipped":
                    path.with_name(path.name + ".gz").write_bytes(gzip.compress(path.read_bytes()))
                    path.unlink()
        ra, dec = wcs.pixel_to_world_values(xy[:, 0], xy[:, 1])
        rows.extend(zip(ra, dec))
        kinds.extend([name] * len(xy))


def _broken_tiles_over(good, tiles: Path, rows: list, kinds: list) -> None:
    """A truncated tile and a band-less tile, each overlapping 'good', with an object in each
    overlap that lies deeper inside the broken tile than inside 'good'."""
    for name, (dx, dy) in [("ovtrunc", (60, 0)), ("ovnoband", (0, 60))]:
        centre = good.pixel_to_world_values((SIZE - 1) / 2 + dx, (SIZE - 1) / 2 + dy)
        bands = BANDS if name == "ovtrunc" else ("g", "r")
        paths = write_tile(tiles, name, noisy_tile(SIZE, 3, 9)[: len(bands)],
                           tan_wcs(float(centre[0]), float(centre[1]), SIZE), bands)
        if name == "ovtrunc":
            raw = paths[2].read_bytes()
            paths[2].write_bytes(raw[: len(raw) // 2])
        ra, dec = good.pixel_to_world_values((SIZE - 1) / 2 + 0.75 * dx, (SIZE - 1) / 2 + 0.75 * dy)
        rows.append((float(ra), float(dec)))
        kinds.append("overlap")


def _unusable_tile_names(tiles: Path, rng, rows: list, kinds: list) -> None:
    """Tiles named '_plan' and '..': names that would hide rows from Parquet readers or write
    outside the output's folders."""
    for k, name in [(9, "_plan"), (10, "..")]:
        wcs = tan_wcs(*_centres(k), SIZE)
        write_tile(tiles, name, noisy_tile(SIZE, 3, k), wcs, BANDS)
        for ra, dec in _objects(wcs, 3, rng):
            rows.append((ra, dec))
            kinds.append("badname")


@pytest.fixture(scope="module")
def bad_scan(ray_cluster, bad_survey, small_models):
    root, cat = bad_survey
    out = root / "out"
    result = run_scan(ScanConfig(tiles=str(root / "tiles"), catalog=str(root / "catalog.parquet"),
                                 out=str(out), model_dirs=(small_models,), batch_size=32))
    return result, read_candidates(str(out)).to_pandas(), read_failures(str(out)).to_pandas(), cat


def _reasons(failures: pd.DataFrame, cat: pd.DataFrame, kind: str) -> list[str]:
    ids = cat.loc[cat["kind"] == kind, "objid"]
    return failures.loc[failures["objid"].isin(ids), "reason"].tolist()


def test_every_catalog_row_is_scored_or_failed_exactly_once(bad_scan):
    result, cand, fail, cat = bad_scan
    assert_every_catalog_row_once(result.out, cat)
    obj_fail = fail.dropna(subset=["row"])
    assert len(cand) + len(obj_fail) == len(cat)
    assert not set(cand["objid"]) & set(obj_fail.loc[~obj_fail["reason"].str.startswith("duplicate"), "objid"])
    assert result.exit_code == EXIT_FAILURES
    assert (fail["reason"].str.len() > 10).all() and not fail["reason"].str.contains("\n").any()


def test_good_and_edge_objects_are_scored_and_edges_flagged(bad_scan):
    _, cand, _, cat = bad_scan
    good = cat.loc[cat["kind"].isin(["good", "edge"]), "objid"]
    assert set(good) <= set(cand["objid"])
    edge = cand[cand["objid"].isin(cat.loc[cat["kind"] == "edge", "objid"])]
    assert len(edge) == 2 and (edge["flags"] & FLAG_EDGE).all()


def test_objects_in_an_overlap_with_a_broken_tile_are_scored_on_the_good_tile(bad_scan):
    _, cand, _, cat = bad_scan
    overlap = cat.loc[cat["kind"] == "overlap", "objid"]
    scored = cand[cand["objid"].isin(overlap)]
    assert len(scored) == 2 and (scored["tile"] == "good").all()


def test_scaled_integer_and_gzipped_tiles_score_like_their_float32_twin(bad_scan):
    _, cand, fail, cat = bad_scan

    def scores(kind: str) -> np.ndarray:
        ids = cat.loc[cat["kind"] == kind, "objid"]  # the same pixel positions, in the same order
        assert not fail["objid"].isin(ids).any(), fail[fail["objid"].isin(ids)]["reason"].tolist()
        return cand.set_index("objid").loc[ids, "score"].to_numpy()

    twin = scores("twin")
    assert len(twin) == 5 and np.ptp(twin) > 1e-3  # the scores depend on the pixels
    np.testing.assert_allclose(scores("scaled"), twin, atol=1e-4)
    np.testing.assert_allclose(scores("gzipped"), twin, atol=1e-4)


def test_tiles_named_like_output_folders_are_listed_and_write_nothing_there(bad_scan):
    result, _, fail, cat = bad_scan
    tile_rows = fail[fail["objid"].isna()]
    for name in ("_plan", ".."):
        (reason,) = tile_rows.loc[tile_rows["tile"] == name, "reason"]
        assert f"tile name {name!r}" in reason and "rename" in reason
    assert all(r == "position is on no readable tile" for r in _reasons(fail, cat, "badname"))
    out = Path(result.out)
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".parquet")) == ["candidates.parquet"]
    assert not any(p.name.startswith(("_", ".")) for p in (out / "candidates.parquet").iterdir())


def test_truncated_tile_costs_its_objects_with_the_file_named(bad_scan):
    _, _, fail, cat = bad_scan
    reasons = _reasons(fail, cat, "trunc")
    assert len(reasons) == 5 and all("trunc_r.fits" in r for r in reasons)


def test_non_fits_file_costs_its_tile_with_the_file_named(bad_scan):
    _, _, fail, cat = bad_scan
    reasons = _reasons(fail, cat, "junk")
    assert len(reasons) == 5 and all("junk_i.fits" in r and "FITS" in r for r in reasons)


def test_tile_without_celestial_wcs_is_listed_and_its_objects_are_off_every_tile(bad_scan):
    _, _, fail, cat = bad_scan
    tile_rows = fail[fail["objid"].isna()]
    assert any("nowcs" in r and "celestial WCS" in r for r in tile_rows["reason"])
    assert all("no readable tile" in r for r in _reasons(fail, cat, "nowcs"))


def test_all_nan_band_costs_its_tile(bad_scan):
    _, _, fail, cat = bad_scan
    assert all("all NaN" in r and "nanband_r.fits" in r for r in _reasons(fail, cat, "nanband"))


def test_missing_band_costs_its_tile_with_the_band_named(bad_scan):
    _, _, fail, cat = bad_scan
    reasons = _reasons(fail, cat, "noband")
    assert len(reasons) == 5 and all("lacks band(s) i" in r for r in reasons)


def test_objects_off_every_tile_are_reported(bad_scan):
    _, _, fail, cat = bad_scan
    assert _reasons(fail, cat, "off") == ["position is on no readable tile"]


def test_nan_and_out_of_range_coordinates_are_reported(bad_scan):
    _, _, fail, cat = bad_scan
    reasons = _reasons(fail, cat, "nan") + _reasons(fail, cat, "range")
    assert len(reasons) == 3 and all(r.startswith("invalid coordinates") for r in reasons)


def test_duplicate_objids_are_scored_once_and_the_repeat_reported(bad_scan):
    _, cand, fail, cat = bad_scan
    dup_id = cat.loc[cat["kind"] == "duplicate", "objid"].iloc[0]
    assert (cand["objid"] == dup_id).sum() == 1
    rows = fail[fail["objid"] == dup_id]
    assert len(rows) == 1 and rows["reason"].iloc[0].startswith("duplicate objid")
    assert rows["row"].iloc[0] == len(cat) - 1


def _refusal(tmp_path, **kw) -> str:
    with pytest.raises((ScanRefused, CatalogError, RegistryError, FileNotFoundError, ValueError)) as e:
        run_scan(ScanConfig(**{"out": str(tmp_path / "out"), **kw}))
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_empty_catalog_is_refused(tmp_path, bad_survey, small_models):
    root, _ = bad_survey
    pd.DataFrame({"objid": pd.Series([], dtype="int64"), "ra": pd.Series([], dtype="float64"),
                  "dec": pd.Series([], dtype="float64")}).to_parquet(tmp_path / "c.parquet")
    msg = _refusal(tmp_path, tiles=str(root / "tiles"), catalog=str(tmp_path / "c.parquet"),
                   model_dirs=(small_models,))
    assert "empty" in msg and "c.parquet" in msg


def test_catalog_without_required_columns_names_them(tmp_path, bad_survey, small_models):
    root, _ = bad_survey
    pd.DataFrame({"id_x": [1], "alpha": [150.0], "dec": [2.0]}).to_csv(tmp_path / "c.csv", index=False)
    msg = _refusal(tmp_path, tiles=str(root / "tiles"), catalog=str(tmp_path / "c.csv"),
                   model_dirs=(small_models,))
    assert "objid, ra" in msg and "c.csv" in msg and "found columns" in msg


@pytest.mark.parametrize("text", [
    "objid;ra;dec\n1;150.0;2.0\n2;150.1;2.1\n",
    "# survey export 2026\n# columns in degrees\nID\tRA\tDEC\n1\t150.0\t2.0\n2\t150.1\t2.1\n",
    "OBJID | RAJ2000 | DEJ2000\n1 | 150.0 | 2.0\n2 | 150.1 | 2.1\n",
])
def test_csv_with_other_delimiters_comments_and_column_spellings_reads(tmp_path, text):
    p = tmp_path / "c.csv"
    p.write_text(text)
    (t,) = list(iter_catalog(str(p)))
    assert t["objid"].to_pylist() == [1, 2] and t["ra"].to_pylist() == [150.0, 150.1]


def test_bands_the_tiles_lack_are_refused(tmp_path, bad_survey, small_models):
    root, _ = bad_survey
    msg = _refusal(tmp_path, tiles=str(root / "tiles"), catalog=str(root / "catalog.parquet"),
                   model_dirs=(small_models,), bands=("g", "r", "z"))
    assert "band(s) z" in msg and "--bands" in msg


def test_tiles_at_another_pixel_scale_are_refused(tmp_path, small_models):
    write_tile(tmp_path / "t", "fine", noisy_tile(64, 3), tan_wcs(1, 1, 64, pixel_scale_arcsec=0.2), BANDS)
    pd.DataFrame({"objid": [1], "ra": [1.0], "dec": [1.0]}).to_parquet(tmp_path / "c.parquet")
    msg = _refusal(tmp_path, tiles=str(tmp_path / "t"), catalog=str(tmp_path / "c.parquet"),
                   model_dirs=(small_models,))
    assert "0.2000 arcsec/pixel" in msg and "0.26" in msg


def _earlier_scan(out: Path) -> list[Path]:
    """An output holding a (small, fake) earlier scan, and a note of the user's beside it."""
    out.mkdir()
    (out / "_scan_identity.json").write_text(json.dumps({"tiles": "elsewhere"}))
    (out / "scan.json").write_text("{}")
    (out / "candidates.parquet").mkdir()
    (out / "candidates.parquet" / "part-0.parquet").write_bytes(b"earlier shard")
    (out / "notes.txt").write_text("mine")
    return sorted(out.rglob("*"))


def _one_tile_survey(root: Path, pixel_scale_arcsec: float = 0.26) -> dict[str, str]:
    write_tile(root / "t", "t0", noisy_tile(64, 3), tan_wcs(1, 1, 64, pixel_scale_arcsec), BANDS)
    pd.DataFrame({"objid": [1], "ra": [1.0], "dec": [1.0]}).to_parquet(root / "c.parquet")
    return {"tiles": str(root / "t"), "catalog": str(root / "c.parquet")}


@pytest.mark.parametrize("problem", ["pixel scale", "catalog"])
def test_refused_inputs_leave_an_earlier_scan_in_place_even_with_overwrite(tmp_path, small_models,
                                                                           problem):
    inputs = _one_tile_survey(tmp_path, 0.2 if problem == "pixel scale" else 0.26)
    if problem == "catalog":
        inputs["catalog"] = str(tmp_path / "missing.parquet")
    held = _earlier_scan(tmp_path / "out")
    msg = _refusal(tmp_path, **inputs, model_dirs=(small_models,), overwrite=True)
    assert ("arcsec/pixel" if problem == "pixel scale" else "catalog not found") in msg
    assert sorted((tmp_path / "out").rglob("*")) == held


def test_overwrite_replaces_only_what_the_earlier_scan_wrote(tmp_path, small_models, ray_cluster):
    _earlier_scan(tmp_path / "out")
    result = run_scan(ScanConfig(**_one_tile_survey(tmp_path), out=str(tmp_path / "out"),
                                 model_dirs=(small_models,), overwrite=True, report_top_n=0))
    assert result.n_scored == 1 and (tmp_path / "out" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "out" / "candidates.parquet" / "part-0.parquet").exists()


def test_band_reordering_is_refused(tmp_path, bad_survey, small_models):
    root, _ = bad_survey
    msg = _refusal(tmp_path, tiles=str(root / "tiles"), catalog=str(root / "catalog.parquet"),
                   model_dirs=(small_models,), bands=("r", "g", "i"))
    assert "reorders" in msg and "--bands g,r,i" in msg


def test_band_reordering_is_refused_when_the_band_sets_differ(tmp_path, bad_survey, small_models):
    root, _ = bad_survey
    msg = _refusal(tmp_path, tiles=str(root / "tiles"), catalog=str(root / "catalog.parquet"),
                   model_dirs=(small_models,), bands=("r", "g", "z"))
    assert "reorders" in msg and "band(s) r,g" in msg and "--bands g,r,z" in msg


def test_unknown_precision_is_refused_before_start(tmp_path, bad_survey, small_models):
    root, _ = bad_survey
    msg = _refusal(tmp_path, tiles=str(root / "tiles"), catalog=str(root / "catalog.parquet"),
                   model_dirs=(small_models,), precision="half")
    assert msg == "precision 'half' is not one of auto, float32, bfloat16"


@pytest.mark.parametrize("what", ["tiles", "catalog", "models"])
def test_missing_urls_are_refused_naming_them(tmp_path, bad_survey, small_models, what):
    root, _ = bad_survey
    kw = {"tiles": str(root / "tiles"), "catalog": str(root / "catalog.parquet"),
          "model_dirs": (small_models,)}
    missing = str(tmp_path / "nowhere")
    kw[{"tiles": "tiles", "catalog": "catalog", "models": "model_dirs"}[what]] = (
        (missing,) if what == "models" else missing)
    assert "nowhere" in _refusal(tmp_path, **kw)


def test_transient_storage_errors_are_retried_then_reported():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("connection reset by peer")
        return "data"

    assert with_retries(flaky, "read x", base_delay_s=0.001) == "data" and len(calls) == 3

    def down():
        raise TimeoutError("read timed out")

    with pytest.raises(TimeoutError):
        with_retries(down, "read x", attempts=2, base_delay_s=0.001)
    permanent = []

    def missing():
        permanent.append(1)
        raise FileNotFoundError("x")

    with pytest.raises(FileNotFoundError):
        with_retries(missing, "read x", base_delay_s=0.001)
    assert len(permanent) == 1  # a missing file is not retried


def test_output_holding_another_scan_is_refused_unless_overwrite(tmp_path, bad_survey, small_models):
    root, _ = bad_survey
    out = tmp_path / "out"
    out.mkdir()
    (out / "_scan_identity.json").write_text(json.dumps({"tiles": "elsewhere"}))
    kw = dict(tiles=str(root / "tiles"), catalog=str(root / "catalog.parquet"), model_dirs=(small_models,))
    assert "different scan" in _refusal(tmp_path, **kw)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert "not a lensscan scan" in _refusal(tmp_path, out=str(tmp_path / "other"), **kw)


def test_overwrite_never_deletes_an_output_that_is_not_a_scan(tmp_path, bad_survey, small_models):
    root, _ = bad_survey
    thesis = tmp_path / "thesis"
    (thesis / "chapters").mkdir(parents=True)
    (thesis / "chapters" / "one.tex").write_text("lenses")
    msg = _refusal(tmp_path, out=str(thesis), tiles=str(root / "tiles"),
                   catalog=str(root / "catalog.parquet"), model_dirs=(small_models,), overwrite=True)
    assert "not a lensscan scan" in msg and "chapters" in msg and "pass --overwrite" not in msg
    assert (thesis / "chapters" / "one.tex").read_text() == "lenses"


@pytest.mark.parametrize("out", ["survey", "tiles", "catalog"])
def test_an_output_that_is_or_contains_the_inputs_is_refused(tmp_path, small_models, out):
    survey = tmp_path / "survey"
    write_tile(survey / "tiles", "t0", noisy_tile(64, 3), tan_wcs(1, 1, 64), BANDS)
    pd.DataFrame({"objid": [1], "ra": [1.0], "dec": [1.0]}).to_parquet(survey / "catalog.parquet")
    # Even when it looks like a scan: a stray identity file must not make the survey deletable.
    (survey / "_scan_identity.json").write_text("{}")
    (survey / "tiles" / "_scan_identity.json").write_text("{}")
    target = {"survey": survey, "tiles": survey / "tiles", "catalog": survey / "catalog.parquet"}[out]
    held = sorted(survey.rglob("*"))
    msg = _refusal(tmp_path, out=str(target), tiles=str(survey / "tiles"),
                   catalog=str(survey / "catalog.parquet"), model_dirs=(small_models,), overwrite=True)
    assert "is or contains the scan's input" in msg
    assert sorted(survey.rglob("*")) == held


def test_unwritable_output_is_refused_before_start(tmp_path, bad_survey, small_models):
    root, _ = bad_survey
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if (ro / "probe").parent.stat().st_uid == 0 and _root_can_write(ro):
            pytest.skip("running as root: directory permissions do not stop root")
        msg = _refusal(tmp_path, out=str(ro / "out"), tiles=str(root / "tiles"),
                       catalog=str(root / "catalog.parquet"), model_dirs=(small_models,))
        assert "cannot write" in msg
    finally:
        ro.chmod(0o700)


def _root_can_write(d: Path) -> bool:
    try:
        (d / ".probe").write_text("x")
        (d / ".probe").unlink()
        return True
    except OSError:
        return False


def test_output_on_a_read_only_filesystem_is_refused(tmp_path, bad_survey, small_models):
    """/proc refuses writes even to root: the closest to a full or read-only disk we can make."""
    root, _ = bad_survey
    msg = _refusal(tmp_path, out="/proc/lensscan-out", tiles=str(root / "tiles"),
                   catalog=str(root / "catalog.parquet"), model_dirs=(small_models,))
    assert "cannot write" in msg and "/proc/lensscan-out" in msg


def test_ensemble_with_different_input_specs_is_refused(tmp_path, small_models):
    write_untrained_ensemble(tmp_path, name="big", n_versions=1, input_spec=InputSpec(stamp_size_pix=48),
                             params={"depth": 11, "width": 4})
    with pytest.raises(RegistryError, match="different input specs"):
        load_ensemble([small_models, str(tmp_path / "big")])


def test_corrupted_weights_and_pickles_are_refused(tmp_path, small_models):
    bad = tmp_path / "bad"
    shutil.copytree(small_models, bad)
    weights = next(bad.rglob("model.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RegistryError, match="safetensors"):
        load_ensemble([str(bad)])
    pick = tmp_path / "pick"
    shutil.copytree(small_models, pick)
    (next(pick.rglob("model.json")).parent / "model.pt").write_bytes(b"\x80\x04")
    with pytest.raises(RegistryError, match="pickle"):
        load_ensemble([str(pick)])


def test_model_json_with_unknown_architecture_or_missing_fields_is_refused(tmp_path, small_models):
    for change, match in [(lambda m: m["architecture"].update(name="resnet9000"), "resnet9000"),
                          (lambda m: m.pop("input_spec"), "input_spec")]:
        d = tmp_path / f"m{match}"
        shutil.copytree(small_models, d)
        meta_path = next(d.rglob("model.json"))
        meta = json.loads(meta_path.read_text())
        change(meta)
        meta_path.write_text(json.dumps(meta))
        with pytest.raises(RegistryError, match=match):
            load_ensemble([str(d)])


def test_cli_exit_codes_follow_the_contract(tmp_path, bad_survey, small_models, ray_cluster):
    import ray

    root, _ = bad_survey
    base = [sys.executable, "-m", "scanner.cli", "scan", "--tiles", str(root / "tiles"), "--models",
            small_models, "--address", ray.get_runtime_context().gcs_address]
    refused = subprocess.run([*base, "--catalog", str(tmp_path / "none.parquet"), "--out",
                              str(tmp_path / "o1")], capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    (line,) = [ln for ln in refused.stderr.splitlines() if "refused" in ln]
    assert "none.parquet" in line and "--catalog" in line
    with_failures = subprocess.run([*base, "--catalog", str(root / "catalog.parquet"), "--out",
                                    str(tmp_path / "o2")], capture_output=True, text=True, timeout=300)
    assert with_failures.returncode == 3, with_failures.stderr[-2000:]
    assert "failed" in with_failures.stdout
