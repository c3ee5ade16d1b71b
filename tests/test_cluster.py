"""Several nodes and faults: the scan spreads over nodes, survives a dying actor and a lost node,
and always gives the single-node catalog, every object exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from scanner.pipeline import read_candidates, read_failures
from tests.conftest import assert_every_catalog_row_once


@pytest.fixture(scope="module")
def scenarios(tiny_survey, default_models, train_dataset, tmp_path_factory):
    work = tmp_path_factory.mktemp("cluster")
    survey = work / "survey.json"
    survey.write_text(json.dumps({"tiles_url": tiny_survey.tiles_url, "catalog_url": tiny_survey.catalog_url,
                                  "tile_pattern": tiny_survey.tile_pattern,
                                  "train_dataset": train_dataset}))
    proc = subprocess.run([sys.executable, "-m", "tests.cluster_scenarios", str(survey), default_models,
                           str(work)], capture_output=True, text=True, timeout=900,
                          cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith('{"worker_nodes"')]
    return json.loads(line)


def _same_catalog(out: str, reference: Path, catalog_url: str) -> None:
    assert_every_catalog_row_once(out, pd.read_parquet(catalog_url))
    a = read_candidates(out).to_pandas().sort_values("objid").reset_index(drop=True)
    b = read_candidates(str(reference)).to_pandas().sort_values("objid").reset_index(drop=True)
    assert a["objid"].is_unique
    pd.testing.assert_frame_equal(a, b)
    fa = read_failures(out).to_pandas().sort_values(["objid", "tile"]).reset_index(drop=True)
    fb = read_failures(str(reference)).to_pandas().sort_values(["objid", "tile"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(fa, fb)


def test_cutting_and_scoring_spread_over_worker_nodes(scenarios, tiny_scan, tiny_survey):
    spread = scenarios["spread"]
    workers = set(scenarios["worker_nodes"])
    assert len(set(spread["nodes"]["score"])) >= 2 and set(spread["nodes"]["score"]) <= workers
    assert len(set(spread["nodes"]["cut"])) >= 2 and set(spread["nodes"]["cut"]) <= workers
    _same_catalog(spread["out"], tiny_scan[1], tiny_survey.catalog_url)


def test_a_scoring_actor_dying_mid_batch_loses_nothing(scenarios, tiny_scan, tiny_survey):
    run = scenarios["spread"]
    assert run["actor_died"]
    _same_catalog(run["out"], tiny_scan[1], tiny_survey.catalog_url)


def test_a_worker_node_lost_mid_scan_loses_nothing(scenarios, tiny_scan, tiny_survey):
    run = scenarios["node_loss"]
    assert run["node_removed_during_scan"]
    _same_catalog(run["out"], tiny_scan[1], tiny_survey.catalog_url)


def test_training_on_two_workers_resumes_after_losing_a_worker(scenarios):
    """Ray Train on the multi-node cluster: a training worker dies after the first epoch's
    checkpoint; the run resumes from it and exports the usual registry version."""
    from scanner.registry import load_ensemble

    run = scenarios["train"]
    assert run["worker_died"]
    version = Path(run["version_dir"])
    meta = json.loads((version / "model.json").read_text())
    training = meta["training"]
    assert training["workers"] == 2 and training["epochs"] == 3 and training["steps"] == 30
    assert [h["epoch"] for h in training["history"]] == [1, 2, 3]
    assert training["resumes"] == [{"epoch": 1, "step": 10}]
    assert meta["metrics"]["n_lenses"] > 0
    ensemble = load_ensemble([str(version)])  # the scanner loads it like any other version
    assert ensemble.versions[0].meta["content_hash"] == meta["content_hash"]
