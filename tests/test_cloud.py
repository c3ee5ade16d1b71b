"""Cloud storage end to end against a real S3-compatible server (moto's server mode) on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

import pandas as pd
import pytest

from scanner.pipeline import ScanRefused, read_candidates, read_failures, run_scan
from scanner.storage import read_bytes
from tests.conftest import assert_every_catalog_row_once, scan_config

BUCKET = "survey"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    """moto_server on a free local port, with the standard AWS_* variables pointing at it."""
    exe = shutil.which("moto_server")
    if exe is None:
        pytest.skip("moto[server] is not installed (pip install '.[test]')")
    port = _free_port()
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.1)
    env = {"AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield f"http://127.0.0.1:{port}"
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def s3_survey(s3_server, tiny_survey):
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    fs.put(tiny_survey.tiles_url, f"{BUCKET}/tiles", recursive=True)
    fs.put(tiny_survey.catalog_url, f"{BUCKET}/catalog.parquet")
    return type(tiny_survey)(root=f"s3://{BUCKET}", tiles_url=f"s3://{BUCKET}/tiles",
                             catalog_url=f"s3://{BUCKET}/catalog.parquet", truth_url=tiny_survey.truth_url,
                             tile_pattern=tiny_survey.tile_pattern, tiles=tiny_survey.tiles,
                             bands=tiny_survey.bands, config=tiny_survey.config)


def test_a_scan_from_and_to_s3_equals_the_local_scan(ray_cluster, s3_survey, default_models, tiny_scan):
    out = f"s3://{BUCKET}/scans/first"
    result = run_scan(scan_config(s3_survey, default_models, out, write_csv=True))
    _, reference = tiny_scan
    a = read_candidates(out).to_pandas().sort_values("objid").reset_index(drop=True)
    b = read_candidates(str(reference)).to_pandas().sort_values("objid").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)
    fa = read_failures(out).to_pandas().sort_values(["objid", "tile"]).reset_index(drop=True)
    fb = read_failures(str(reference)).to_pandas().sort_values(["objid", "tile"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(fa, fb)
    assert result.n_scored == len(a)
    for name in ("scan.json", "candidates.csv", "report.html"):
        assert len(read_bytes(f"{out}/{name}")) > 0
    assert_every_catalog_row_once(out, pd.read_parquet(s3_survey.catalog_url))


def test_resume_on_s3_rescans_nothing_that_was_finished(ray_cluster, s3_survey, default_models):
    out = f"s3://{BUCKET}/scans/resumed"
    first = run_scan(scan_config(s3_survey, default_models, out, report_top_n=0))
    again = run_scan(scan_config(s3_survey, default_models, out, resume=True, report_top_n=0))
    assert again.n_scored == first.n_scored and again.stamps_per_s == 0


def test_overwrite_on_s3_never_deletes_the_survey_or_objects_that_are_not_a_scan(s3_survey,
                                                                                  default_models):
    """Runs last in this file: the code it guards against would empty the bucket."""
    import s3fs

    fs = s3fs.S3FileSystem()
    fs.invalidate_cache()
    fs.pipe(f"{BUCKET}/notes/draft.txt", b"mine")
    held = sorted(fs.find(BUCKET))
    for out, refusal in [(f"s3://{BUCKET}", "is or contains the scan's input --tiles"),
                         (f"s3://{BUCKET}/tiles", "is or contains the scan's input --tiles"),
                         (f"s3://{BUCKET}/notes", "not a lensscan scan")]:
        with pytest.raises(ScanRefused, match=refusal):
            run_scan(scan_config(s3_survey, default_models, out, overwrite=True))
        fs.invalidate_cache()
        assert sorted(fs.find(BUCKET)) == held
