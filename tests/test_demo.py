"""The README's first command: `lensscan scan` with no arguments, on a fresh cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd

from scanner.console import without_ray_noise

# Lines a newcomer's first scan printed, which were Ray's business, not the user's (issue 17).
RAY_NOISE = ("Token authentication is enabled", "core_worker.cc")


def test_scan_without_arguments_scans_the_demo_survey_and_says_where(tmp_path):
    env = {**os.environ, "LENSSCAN_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "scanner.cli", "scan"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "lensscan-demo-scan"
    assert not [line for line in done.stderr.splitlines() if any(n in line for n in RAY_NOISE)]
    assert "scored" in done.stdout and "report.html" in done.stdout
    assert "tiles:      9 tiles: 9 as {tile}_{band}.fits" in done.stdout
    scan = json.loads((out / "scan.json").read_text())
    catalog = pd.read_parquet(next((tmp_path / "cache").glob("demo-survey-*")) / "catalog.parquet")
    assert scan["n_scored"] + scan["n_failed"] == len(catalog) > 1000
    assert (out / "report.html").stat().st_size > 10_000

    # The demo replaces its own output on every run, never a folder the user names.
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "chapter1.tex").write_text("lenses")
    refused = subprocess.run([sys.executable, "-m", "scanner.cli", "scan", "--out", str(thesis)],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "not a lensscan scan" in refused.stderr
    assert (thesis / "chapter1.tex").read_text() == "lenses"


def test_ray_noise_is_filtered_from_stderr_and_everything_else_kept(capfd):
    noise = (b"[2026-12-07 23:10:42,429 E 3559 3559] core_worker.cc:2297: Actor with class name: "
             b"'MapWorker(MapBatches(EnsembleScorer))' and ID: '9c66' has constructor arguments in "
             b"the object store and max_restarts > 0. If the arguments in the object store go out "
             b"of scope or are lost, the actor restart will fail. See "
             b"https://github.com/ray-project/ray/issues/53727 for more details.\n")
    with without_ray_noise():
        os.write(2, b"\rscan:   0%|          | 0/5194 [00:00<?, ?obj/s]" + noise)
        os.write(2, b"WARNING a real warning\n")
        os.write(2, b"[2026-12-07 23:10:43,001 E 3559 3559] core_worker.cc:99: a real error\n")
    err = capfd.readouterr().err
    assert "constructor arguments" not in err
    assert "0/5194 [00:00<?, ?obj/s]" in err and "a real warning" in err and "a real error" in err
