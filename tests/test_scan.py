"""The scan end to end on a local Ray cluster: accounting, scores, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from scanner.cutouts import make_stamps
from scanner.pipeline import ScanRefused, read_candidates, read_failures, run_scan
from scanner.registry import load_ensemble
from scanner.tiles import discover_tiles, read_headers, read_pixels
from tests.conftest import assert_every_catalog_row_once, scan_config


@pytest.fixture(scope="module")
def scanned(tiny_scan):
    return tiny_scan


def test_every_object_is_scored_or_failed_exactly_once(scanned, tiny_survey):
    result, out = scanned
    catalog = pd.read_parquet(tiny_survey.catalog_url)
    cand = read_candidates(str(out)).to_pandas()
    fail = read_failures(str(out)).to_pandas()
    seen = pd.concat([cand["objid"], fail["objid"].dropna().astype("int64")])
    assert seen.is_unique
    assert set(seen) == set(catalog["objid"])
    assert result.n_scored == len(cand) and result.n_failed == len(fail)
    assert result.n_scored + result.n_failed == len(catalog)
    assert (fail["reason"].str.len() > 0).all()
    assert_every_catalog_row_once(out, catalog)


def test_candidates_have_the_contract_columns_and_model_metadata(scanned, default_models):
    _, out = scanned
    ens = load_ensemble([default_models])
    cand = read_candidates(str(out)).to_pandas()
    for col in ["objid", "ra", "dec", "tile", "x", "y", "score", "score_std", "flags", *ens.columns]:
        assert col in cand.columns
    assert cand["score"].is_monotonic_decreasing
    shard = next((out / "candidates.parquet").rglob("*.parquet"))
    meta = json.loads(pq.read_schema(shard).metadata[b"lensscan"])
    assert [m["content_hash"] for m in meta["models"]] == [m["content_hash"] for m in ens.describe()]
    assert (out / "candidates.csv").exists()
    csv = pd.read_csv(out / "candidates.csv")
    assert len(csv) == len(cand) and csv["score"].is_monotonic_decreasing


def test_scores_equal_a_plain_torch_forward_and_ensemble_columns_are_mean_and_std(scanned, tiny_survey,
                                                                                  default_models):
    _, out = scanned
    ens = load_ensemble([default_models])
    cand = read_candidates(str(out)).to_pandas()
    tile_name = cand["tile"].iloc[0]
    rows = cand[cand["tile"] == tile_name]
    (tile,) = [t for t in discover_tiles(tiny_survey.tiles_url, ens.input_spec.bands,
                                         tiny_survey.tile_pattern) if t.name == tile_name]
    read_headers(tile)
    pixels = read_pixels(tile, ens.input_spec.bands)
    stamps, _ = make_stamps(pixels, rows["x"].to_numpy(), rows["y"].to_numpy(), ens.input_spec)
    x = torch.from_numpy(stamps.astype(np.float16).astype(np.float32))
    for version, col in zip(ens.versions, ens.columns):
        with torch.no_grad():
            p = torch.softmax(version.model(x), dim=1)[:, 1].numpy()
        np.testing.assert_allclose(rows[col].to_numpy(), p, atol=1e-5)
    per_version = cand[ens.columns].to_numpy()
    np.testing.assert_allclose(cand["score"], per_version.mean(axis=1), atol=1e-6)
    np.testing.assert_allclose(cand["score_std"], per_version.std(axis=1), atol=1e-6)


def test_tta_scan_scores_each_version_as_the_mean_over_rotations_and_flips(ray_cluster, tiny_survey,
                                                                            default_models, tmp_path):
    run_scan(scan_config(tiny_survey, default_models, tmp_path / "tta", tta=True, report_top_n=0))
    ens = load_ensemble([default_models])
    cand = read_candidates(str(tmp_path / "tta")).to_pandas()
    rows = cand[cand["tile"] == cand["tile"].iloc[0]]
    (tile,) = [t for t in discover_tiles(tiny_survey.tiles_url, ens.input_spec.bands,
                                         tiny_survey.tile_pattern) if t.name == rows["tile"].iloc[0]]
    read_headers(tile)
    stamps, _ = make_stamps(read_pixels(tile, ens.input_spec.bands), rows["x"].to_numpy(),
                            rows["y"].to_numpy(), ens.input_spec)
    expected = ens.predict(torch.from_numpy(stamps.astype(np.float16).astype(np.float32)), tta=True)
    np.testing.assert_allclose(rows[ens.columns].to_numpy(), expected.numpy(), atol=1e-5)


def test_a_second_scan_into_the_same_output_is_refused_without_resume(scanned, tiny_survey, default_models):
    _, out = scanned
    with pytest.raises(ScanRefused, match="--resume"):
        run_scan(scan_config(tiny_survey, default_models, out))


@pytest.mark.parametrize("change,differs", [({"precision": "bfloat16"}, "precision"),
                                            ({"num_gpus_per_actor": 1.0}, "precision"),
                                            ({"max_missing_fraction": 0.5}, "max_missing_fraction"),
                                            ({"tta": True}, "tta")])
def test_resume_refuses_another_precision_tta_or_missing_pixel_limit(scanned, tiny_survey, default_models,
                                                                  change, differs):
    """float32 scores resumed in bfloat16 (asked, or 'auto' on a GPU) would mix in one catalog."""
    _, out = scanned
    with pytest.raises(ScanRefused, match=f"differs in {differs}"):
        run_scan(scan_config(tiny_survey, default_models, out, resume=True, **change))


def _scan_cmd(survey, models, out, *extra):
    import ray

    # The session's cluster by its exact address: 'auto' is ambiguous when another cluster runs.
    address = ray.get_runtime_context().gcs_address
    return [sys.executable, "-m", "scanner.cli", "scan", "--tiles", survey.tiles_url, "--catalog",
            survey.catalog_url, "--tile-pattern", survey.tile_pattern, "--models", models,
            "--out", str(out), "--address", address, "--batch-size", "16", *extra]


def test_killed_scan_resumes_to_the_uninterrupted_result(scanned, tiny_survey, default_models, tmp_path):
    _, reference = scanned
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "killed.log"
    proc = subprocess.Popen(_scan_cmd(tiny_survey, default_models, out), env=env,
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))
    manifest = out / "_manifest"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.exists() and any(manifest.glob("*.json")):
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the scan ended before it could be interrupted: {log.read_text()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    n_tiles = len(tiny_survey.tiles)
    assert 0 < len(list(manifest.glob("*.json"))) < n_tiles
    assert not (out / "scan.json").exists()

    done = subprocess.run(_scan_cmd(tiny_survey, default_models, out, "--resume"), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 3), done.stderr[-2000:]
    a = read_candidates(str(out)).to_pandas().sort_values("objid").reset_index(drop=True)
    b = read_candidates(str(reference)).to_pandas().sort_values("objid").reset_index(drop=True)
    assert a["objid"].is_unique
    pd.testing.assert_frame_equal(a, b)
    fa = read_failures(str(out)).to_pandas().sort_values(["objid", "tile"]).reset_index(drop=True)
    fb = read_failures(str(reference)).to_pandas().sort_values(["objid", "tile"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(fa, fb)
