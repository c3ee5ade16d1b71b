"""The README's first command: `lensscan scan` with no arguments, on a fresh cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd


def test_scan_without_arguments_scans_the_demo_survey_and_says_where(tmp_path):
    env = {**os.environ, "LENSSCAN_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "scanner.cli", "scan"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "lensscan-demo-scan"
    assert "scored" in done.stdout and "report.html" in done.stdout
    scan = json.loads((out / "scan.json").read_text())
    catalog = pd.read_parquet(next((tmp_path / "cache").glob("demo-survey-*")) / "catalog.parquet")
    assert scan["n_scored"] + scan["n_failed"] == len(catalog) > 1000
    assert (out / "report.html").stat().st_size > 10_000
