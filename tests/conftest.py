"""Shared fixtures: one local Ray cluster and one tiny mock survey per test session."""

from __future__ import annotations

import os

import pytest

from scanner.mock_survey import MockSurveyConfig, make_mock_survey
from scanner.registry import default_models_dir

# Credentials for the local S3-compatible server of tests/test_cloud.py, set before any Ray worker
# starts: workers take credentials from their own environment (the scan forwards only endpoints).
for _key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
    os.environ.setdefault(_key, "testing")

TINY = MockSurveyConfig(n_tiles=6, size_pix=256, n_lenses=3, seed=7, overlap_pix=32)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs, started once; tests connect with address='auto'."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # address="local": always a fresh cluster, never one left running by another process.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_survey(tmp_path_factory):
    """Six overlapping 256 px g,r,i tiles with three injected lenses (a few hundred objects)."""
    return make_mock_survey(str(tmp_path_factory.mktemp("tiny-survey")), TINY)


@pytest.fixture(scope="session")
def default_models():
    return str(default_models_dir())


def assert_every_catalog_row_once(out, catalog: "pd.DataFrame") -> None:
    """``pandas.read_parquet`` of candidates and failures, as a user reads them without lensscan,
    hold every row of ``catalog`` (objid, and its 0-based ``row`` where failure rows give it)
    exactly once; failure rows of whole tiles carry no objid."""
    import pandas as pd

    from scanner.layout import FAILURE_SCHEMA
    from scanner.storage import exists

    cand = pd.read_parquet(f"{out}/candidates.parquet", columns=["objid"])
    failures = (pd.read_parquet(f"{out}/failures") if exists(f"{out}/failures")
                else FAILURE_SCHEMA.empty_table().to_pandas())
    object_rows = failures.dropna(subset=["row"])
    assert object_rows["row"].is_unique, "a catalog row failed twice"
    assert cand["objid"].is_unique, "an object was scored twice"
    assert len(cand) + len(object_rows) == len(catalog)
    failed_ids = set(object_rows["objid"].dropna().astype("int64"))
    assert set(cand["objid"]) | failed_ids == set(catalog["objid"])
    assert failures.loc[failures["row"].isna(), "objid"].isna().all()


def scan_config(survey, models: str, out, **kw):
    """The ScanConfig tests use for a mock survey (small batches: several per tile)."""
    from scanner.config import ScanConfig

    return ScanConfig(tiles=survey.tiles_url, catalog=survey.catalog_url, out=str(out),
                      model_dirs=(models,), tile_pattern=survey.tile_pattern, batch_size=64, **kw)


@pytest.fixture(scope="session")
def tiny_scan(ray_cluster, tiny_survey, default_models, tmp_path_factory):
    """The tiny survey scanned once on the single-node cluster: the reference result."""
    from scanner.pipeline import run_scan

    out = tmp_path_factory.mktemp("scan") / "out"
    return run_scan(scan_config(tiny_survey, default_models, out, write_csv=True)), out


@pytest.fixture(scope="session")
def train_dataset(tiny_survey, tmp_path_factory):
    """The tiny survey as a training dataset, with deflector cuts loose enough for its few galaxies."""
    from training.dataset import DatasetConfig, build_dataset
    from training.measure import DeflectorCuts

    loose = DeflectorCuts(magnitude_range=(15.0, 24.0), colour_cuts=(("g", "r", 0.0),),
                          min_size_arcsec=0.0)
    out = tmp_path_factory.mktemp("train-data") / "ds"
    build_dataset(DatasetConfig(tiles=tiny_survey.tiles_url, catalog=tiny_survey.catalog_url,
                                out=str(out), tile_pattern=tiny_survey.tile_pattern,
                                truth=tiny_survey.truth_url, split_cell_deg=0.012,
                                holdout_fraction=0.3, deflector_cuts=loose, seed=3))
    return str(out)
