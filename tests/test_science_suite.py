"""The generalisation suite: its surveys are drawn apart from training and scored honestly."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


suite = _load("science_suite")
bench = _load("bench_science")


@pytest.fixture(scope="module")
def small_survey(tmp_path_factory):
    survey = dataclasses.replace(suite.suite_survey("test-double-gaussian-crowded"), n_tiles=1,
                                 size_pix=512, n_lenses=3, n_per_family=1)
    return suite.make_suite_survey(survey, str(tmp_path_factory.mktemp("suite")))


def test_held_out_families_are_never_drawn_by_training():
    from training.lookalikes import LOOKALIKE_KINDS

    assert set(suite.HELD_OUT_FAMILIES) <= set(suite.LOOKALIKE_FAMILIES)
    assert not set(suite.HELD_OUT_FAMILIES) & set(LOOKALIKE_KINDS)


def test_suite_keeps_validation_and_test_surveys_apart_with_their_own_seeds():
    roles = [s.role for s in suite.SUITE]
    assert roles.count("test") >= 3 and roles.count("validation") >= 1
    seeds = [s.seed for s in suite.SUITE]
    assert len(set(seeds)) == len(seeds) and min(seeds) >= 1000  # never a training mock's seed
    assert len({(s.psf, s.psf_beta, s.noise_correlation_pix) for s in suite.SUITE}) == len(suite.SUITE)


def test_suite_survey_holds_lenses_every_family_and_saturated_stars(small_survey):
    truth = pd.read_parquet(small_survey["truth_url"])
    kinds = set(truth["kind"])
    assert {"lens", "galaxy", "star"} <= kinds
    assert set(suite.LOOKALIKE_FAMILIES) <= kinds
    assert truth["objid"].is_unique
    assert truth.loc[truth["is_lens"], "theta_e_arcsec"].between(0.8, 2.7).all()


def test_suite_pixel_scale_is_off_the_models_but_within_the_scans_tolerance():
    from astropy.wcs.utils import proj_plane_pixel_scales

    scales = {s.pixel_scale_arcsec for s in suite.SUITE}
    assert len(scales) >= 3 and all(abs(s / 0.26 - 1) < 0.01 for s in scales)
    survey = suite.suite_survey("test-kolmogorov-wings")
    measured = proj_plane_pixel_scales(suite.tile_wcs(survey, 0)).mean() * 3600
    assert measured == pytest.approx(survey.pixel_scale_arcsec, rel=1e-6)


def test_saturated_stars_are_clipped_flat(small_survey):
    from astropy.io import fits

    path = f"{small_survey['tiles_url']}/{small_survey['tiles'][0]}_r.fits"
    with fits.open(path) as hdul:
        data, saturation = hdul[0].data, hdul[0].header["SATURATE"]
    assert np.isclose(data.max(), saturation, rtol=1e-3)
    assert (np.isclose(data, saturation, rtol=1e-4)).sum() > 3  # a flat top and a bleed trail


def test_ranking_figures_count_unscored_objects_as_missed():
    truth = pd.DataFrame({"objid": np.arange(1, 201), "kind": ["galaxy"] * 190 + ["lens"] * 5 + ["ring"] * 5})
    truth["is_lens"] = truth["kind"] == "lens"
    truth["is_lookalike"] = truth["kind"] == "ring"
    truth["held_out_family"] = False
    scores = pd.DataFrame({"objid": np.arange(1, 196), "score": np.linspace(0, 1, 195)})
    figures = bench.ranking_figures(scores, truth)  # lenses 191-194 rank top; 195 is scored; 196+ not
    assert figures["n_unscored"] == 5 and figures["top_1pct_slots"] == 2
    assert figures["recall_top_1pct"] == pytest.approx(2 / 5)
    assert figures["auroc_vs_lookalikes"] == pytest.approx(1.0)
    assert figures["top_1pct_kinds"] == {"lens": 2}


def test_test_time_augmentation_scores_every_orientation_alike(default_models):
    from scanner.registry import load_ensemble

    ensemble = load_ensemble(default_models)
    x = torch.randn(3, 3, 64, 64)
    turned = torch.rot90(x, 1, dims=(2, 3)).flip(3)
    assert torch.allclose(ensemble.predict(x, tta=True), ensemble.predict(turned, tta=True), atol=1e-5)
    assert not torch.allclose(ensemble.predict(x), ensemble.predict(turned), atol=1e-5)
