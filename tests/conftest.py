"""Shared fixtures: one local Ray cluster and one tiny mock survey per test session."""

from __future__ import annotations

import os

import pytest

from scanner.mock_survey import MockSurveyConfig, make_mock_survey
from scanner.registry import default_models_dir

TINY = MockSurveyConfig(n_tiles=6, size_pix=256, n_lenses=3, seed=7, overlap_pix=32)


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 2 CPUs, started once; tests connect with address='auto'."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_survey(tmp_path_factory):
    """Six overlapping 256 px g,r,i tiles with three injected lenses (a few hundred objects)."""
    return make_mock_survey(str(tmp_path_factory.mktemp("tiny-survey")), TINY)


@pytest.fixture(scope="session")
def default_models():
    return str(default_models_dir())
