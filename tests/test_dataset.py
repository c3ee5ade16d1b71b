"""The training-set builder: pools, the sky-region split, band metadata, the stream and the CLI."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pandas as pd
import pytest
import torch
from astropy.coordinates import SkyCoord
from hypothesis import given, settings
from hypothesis import strategies as st

from scanner.cli import main as lensscan
from scanner.config import InputSpec
from scanner.cutouts import cut_stamps
from scanner.pipeline import read_failures
from scanner.tiles import discover_tiles, read_headers, read_pixels
from training.bands import read_header_conditions
from training.inject import InjectionConfig
from training.lookalikes import LookalikeConfig
from training.dataset import (POOLS, DatasetConfig, DatasetError, build_dataset, iter_pool,
                              open_dataset, read_pool)
from training.measure import DeflectorCuts, is_deflector, measure_stamps
from training.psf import measure_seeing_fwhm
from training.split import SkySplit, assign_split
from training.stream import KIND_LENS, KIND_LOOKALIKE, LensTrainingStream, StreamConfig
from tests.fits_helpers import tan_wcs, write_tile

STAMP_WIDTH_ARCSEC = 64 * 0.26
# The tiny survey has few bright red galaxies: loosen the cuts so the deflector pool is not empty.
LOOSE_CUTS = DeflectorCuts(magnitude_range=(16.0, 22.5), colour_cuts=(("g", "r", 0.5),),
                           min_size_arcsec=0.3)


def _config(survey, out, **kw) -> DatasetConfig:
    kw = {"truth": survey.truth_url, "split_cell_deg": 0.012, "holdout_fraction": 0.3,
          "deflector_cuts": LOOSE_CUTS, "seed": 3, **kw}
    return DatasetConfig(tiles=survey.tiles_url, catalog=survey.catalog_url, out=str(out),
                         tile_pattern=survey.tile_pattern, **kw)


@pytest.fixture(scope="module")
def built(tiny_survey, tmp_path_factory):
    out = tmp_path_factory.mktemp("dataset") / "ds"
    summary = build_dataset(_config(tiny_survey, out))
    return summary, str(out)


def _all_rows(url: str) -> pd.DataFrame:
    return pd.concat([read_pool(url, pool, split).rows.to_pandas().assign(pool=pool, split=split)
                      for pool in POOLS for split in ("train", "holdout")], ignore_index=True)


def test_every_object_is_in_one_pool_or_accounted_for(built, tiny_survey):
    summary, url = built
    rows = _all_rows(url)
    catalog = pd.read_parquet(tiny_survey.catalog_url)
    info = open_dataset(url)
    assert rows["objid"].is_unique
    assert len(rows) + info["n_guard"] + info["n_failed"] == len(catalog)
    assert len(read_failures(url)) == info["n_failed"]
    assert set(rows["objid"]) <= set(catalog["objid"])
    for split in ("train", "holdout"):
        assert (rows["split"] == split).sum() == sum(info["counts"][split].values()) > 0
    assert (rows["pool"] == "deflector").sum() > 0


def test_known_lenses_never_become_negatives_or_unlabelled(built, tiny_survey):
    _, url = built
    rows = _all_rows(url)
    truth = pd.read_parquet(tiny_survey.truth_url)
    lenses = set(truth.loc[truth["is_lens"], "objid"])
    assert set(rows.loc[rows["pool"] == "known_lens", "objid"]) <= lenses
    assert not lenses & set(rows.loc[rows["pool"] != "known_lens", "objid"])
    assert (rows.loc[rows["pool"] == "known_lens", "label"] == 1).all()
    assert (rows.loc[rows["pool"] == "unlabelled", "label"] == -1).all()
    assert (rows.loc[rows["pool"].isin(["deflector", "non_lens"]), "label"] == 0).all()


def _min_separation_arcsec(a: pd.DataFrame, b: pd.DataFrame) -> float:
    if len(a) == 0 or len(b) == 0:
        return np.inf
    ca = SkyCoord(a["ra"].to_numpy(), a["dec"].to_numpy(), unit="deg")
    cb = SkyCoord(b["ra"].to_numpy(), b["dec"].to_numpy(), unit="deg")
    return float(min(ca[i].separation(cb).arcsec.min() for i in range(len(ca))))


def test_no_held_out_stamp_lies_within_one_stamp_width_of_a_training_stamp(built):
    _, url = built
    rows = _all_rows(url)
    train, holdout = rows[rows["split"] == "train"], rows[rows["split"] == "holdout"]
    assert len(train) and len(holdout)
    assert _min_separation_arcsec(holdout, train) >= STAMP_WIDTH_ARCSEC


@settings(max_examples=40, deadline=None)
@given(ra0=st.floats(0, 360), dec0=st.floats(-89.9, 89.9), seed=st.integers(0, 1000),
       cell=st.floats(0.01, 0.05))
def test_split_guard_holds_anywhere_on_the_sky(ra0, dec0, seed, cell):
    """Random positions around any point, poles and RA = 0 included: no held-out object is
    within the guard distance of a training object."""
    rng = np.random.default_rng(seed)
    n = 300
    dec = np.clip(dec0 + rng.uniform(-2 * cell, 2 * cell, n), -90, 90)
    ra = np.mod(ra0 + rng.uniform(-2 * cell, 2 * cell, n) / max(np.cos(np.radians(dec0)), 0.05), 360)
    split = SkySplit(holdout_fraction=0.4, cell_deg=cell, guard_arcsec=STAMP_WIDTH_ARCSEC, seed=seed)
    which = assign_split(ra, dec, split)
    train, holdout = which == "train", which == "holdout"
    if train.any() and holdout.any():
        ct = SkyCoord(ra[train], dec[train], unit="deg")
        ch = SkyCoord(ra[holdout], dec[holdout], unit="deg")
        _, sep, _ = ch.match_to_catalog_sky(ct)
        assert sep.arcsec.min() >= STAMP_WIDTH_ARCSEC


def test_split_is_deterministic_by_seed():
    rng = np.random.default_rng(0)
    ra, dec = rng.uniform(150, 151, 2000), rng.uniform(2, 3, 2000)
    split = SkySplit(holdout_fraction=0.3, cell_deg=0.1, guard_arcsec=16.0, seed=4)
    first = assign_split(ra, dec, split)
    assert (first == assign_split(ra[::-1], dec[::-1], split)[::-1]).all()
    other = assign_split(ra, dec, dataclasses.replace(split, seed=5))
    assert (first != other).any()
    assert 0.15 < (first == "holdout").mean() < 0.45


def test_same_config_builds_the_same_dataset(built, tiny_survey, tmp_path):
    _, url = built
    build_dataset(_config(tiny_survey, tmp_path / "again"))
    a = _all_rows(url).sort_values("objid").reset_index(drop=True)
    b = _all_rows(str(tmp_path / "again")).sort_values("objid").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_stamps_are_the_scanners_raw_cut(built, tiny_survey):
    _, url = built
    pool = read_pool(url, "non_lens", "train")
    rows = pool.rows.to_pandas()
    tile_name = rows["tile"].iloc[0]
    tile = next(t for t in discover_tiles(tiny_survey.tiles_url, ("g", "r", "i"),
                                          tiny_survey.tile_pattern) if t.name == tile_name)
    read_headers(tile)
    here = np.flatnonzero(rows["tile"].to_numpy() == tile_name)
    expected = cut_stamps(read_pixels(tile, ("g", "r", "i")), rows["x"].to_numpy()[here],
                          rows["y"].to_numpy()[here], 64)
    np.testing.assert_array_equal(pool.stamps[here], expected.pixels)
    np.testing.assert_array_equal(rows["flags"].to_numpy()[here], expected.flags)


def test_band_metadata_comes_from_each_bands_header(built, tiny_survey):
    _, url = built
    pool = read_pool(url, "non_lens", "train")
    tile_name = pool.rows["tile"][0].as_py()
    tile = next(t for t in discover_tiles(tiny_survey.tiles_url, ("g", "r", "i"),
                                          tiny_survey.tile_pattern) if t.name == tile_name)
    read_headers(tile)
    for c, band in enumerate(("g", "r", "i")):
        header = read_header_conditions(tile.headers[band], band)
        assert float(pool.meta.psf_fwhm_arcsec[0, c]) == pytest.approx(header.psf_fwhm_arcsec, rel=1e-6)
        assert float(pool.meta.magzero[0, c]) == pytest.approx(header.magzero)
        assert float(pool.meta.sky_sigma[0, c]) == pytest.approx(header.sky_sigma, rel=1e-6)
        assert float(pool.meta.gain[0, c]) == pytest.approx(header.gain, rel=1e-6)
    assert float(pool.meta.pixel_scale_arcsec[0]) == pytest.approx(0.26, rel=1e-6)
    assert pool.meta.centre_offset_pix.abs().max() <= 0.5


def test_band_order_follows_the_request(built, tiny_survey, tmp_path):
    _, url = built
    reordered = tmp_path / "igr"
    build_dataset(_config(tiny_survey, reordered, bands=("i", "g", "r")))
    gri = read_pool(url, "non_lens", "train")
    igr = read_pool(str(reordered), "non_lens", "train")
    assert igr.meta.bands == ("i", "g", "r")
    assert gri.rows["objid"].to_pylist() == igr.rows["objid"].to_pylist()
    np.testing.assert_array_equal(igr.stamps, gri.stamps[:, [2, 0, 1]])
    torch.testing.assert_close(igr.meta.psf_fwhm_arcsec, gri.meta.psf_fwhm_arcsec[:, [2, 0, 1]])


def test_iter_pool_streams_the_same_stamps_as_read_pool(built):
    _, url = built
    whole = read_pool(url, "unlabelled", "train")
    parts = list(iter_pool(url, "unlabelled", "train", batch_rows=7))
    streamed = np.concatenate([p.rows["objid"].to_numpy() for p in parts])
    assert sorted(streamed) == sorted(whole.rows["objid"].to_numpy())
    assert all(len(p) <= 7 for p in parts)


def test_an_existing_dataset_is_not_overwritten_silently(built, tiny_survey):
    _, url = built
    with pytest.raises(DatasetError, match="--overwrite"):
        build_dataset(_config(tiny_survey, url))


def _moffat_tile(size: int, fwhm_pix: float, n_stars: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    alpha = fwhm_pix / (2 * np.sqrt(2 ** (1 / 3.5) - 1))
    image = rng.normal(0, 1.0, (size, size))
    positions = []
    for k in range(n_stars):
        x0, y0 = 20 + (k % 6) * 36 + rng.uniform(-3, 3), 20 + (k // 6) * 36 + rng.uniform(-3, 3)
        image += 400 * (1 + ((xx - x0) ** 2 + (yy - y0) ** 2) / alpha**2) ** -3.5
        positions.append((x0, y0))
    return image.astype(np.float32), np.array(positions)


def test_seeing_is_measured_from_stars_when_the_header_lacks_it():
    image, _ = _moffat_tile(224, fwhm_pix=4.0, n_stars=24, seed=1)
    fwhm, n_stars = measure_seeing_fwhm(image, pixel_scale_arcsec=0.26, beta=3.5)
    assert n_stars >= 3
    assert fwhm == pytest.approx(4.0 * 0.26, rel=0.1)


def test_tiles_without_photometric_keywords_are_refused_or_measured(tmp_path, caplog):
    """No MAGZERO: refused with the fix named. With --magzero: seeing measured from the stars,
    sky noise measured on the stamps, and a warning that arcs get no photon noise (no GAIN)."""
    size = 224
    image, positions = _moffat_tile(size, fwhm_pix=4.0, n_stars=24, seed=2)
    wcs = tan_wcs(150.0, 2.0, size)
    write_tile(tmp_path / "tiles", "t0", np.stack([image] * 3), wcs, ("g", "r", "i"))
    ra, dec = wcs.pixel_to_world_values(positions[:, 0], positions[:, 1])
    pd.DataFrame({"objid": np.arange(len(ra)), "ra": ra, "dec": dec}).to_csv(
        tmp_path / "cat.csv", index=False)
    config = DatasetConfig(tiles=str(tmp_path / "tiles"), catalog=str(tmp_path / "cat.csv"),
                           out=str(tmp_path / "ds"), holdout_fraction=0.0)
    with pytest.raises(DatasetError, match="--magzero"):
        build_dataset(config)
    with caplog.at_level(logging.WARNING):
        # The refused build left only its own entries: a re-run needs no --overwrite.
        build_dataset(dataclasses.replace(config, default_magzero=30.0))
    assert "GAIN" in caplog.text
    stamps = read_pool(str(tmp_path / "ds"), "non_lens").meta
    stamps = stamps if len(stamps) else read_pool(str(tmp_path / "ds"), "unlabelled").meta
    assert float(stamps.psf_fwhm_arcsec[0, 0]) == pytest.approx(4.0 * 0.26, rel=0.1)
    assert torch.isinf(stamps.gain).all() and (stamps.magzero == 30.0).all()
    # Measured on each stamp's frame, which neighbouring stars' wings inflate a little.
    assert float(stamps.sky_sigma[:, 0].median()) == pytest.approx(1.0, rel=0.4)


def test_measured_magnitudes_colours_and_sizes():
    """A round Gaussian galaxy of known counts per band: magnitudes through each zero point."""
    n, size = 4, 64
    yy, xx = np.mgrid[:size, :size] - size // 2
    sigma_pix = 3.0
    shape = np.exp(-0.5 * (xx**2 + yy**2) / sigma_pix**2)
    shape /= shape.sum()
    counts = np.array([2000.0, 6000.0, 9000.0])
    raw = np.broadcast_to(counts[:, None, None] * shape, (n, 3, size, size)).astype(np.float32)
    magzero = np.tile([30.0, 29.0, 28.0], (n, 1)).astype(np.float32)
    fwhm = np.full((n, 3), 0.5, np.float32)
    measured = measure_stamps(raw, ("g", "r", "i"), magzero, fwhm, np.full((n, 3), 3.5),
                              np.full(n, 0.26), DeflectorCuts())
    np.testing.assert_allclose(measured["mag_g"], 30 - 2.5 * np.log10(2000), atol=0.02)
    np.testing.assert_allclose(measured["mag_r"], 29 - 2.5 * np.log10(6000), atol=0.02)
    hlr = sigma_pix * np.sqrt(2 * np.log(2)) * 0.26
    np.testing.assert_allclose(measured["half_light_radius_arcsec"], hlr, rtol=0.15)
    assert (measured["centroid_offset_arcsec"] < 0.05).all()
    g_minus_r = measured["aper_mag_g"] - measured["aper_mag_r"]
    np.testing.assert_allclose(g_minus_r, (30 - 29) - 2.5 * np.log10(2000 / 6000), atol=0.02)
    assert is_deflector(measured, DeflectorCuts(colour_cuts=(("g", "r", 1.0),))).all()
    assert not is_deflector(measured, DeflectorCuts(colour_cuts=(("g", "r", 3.0),))).any()


def test_deflector_cuts_naming_missing_bands_are_refused(tiny_survey, tmp_path):
    with pytest.raises(ValueError, match="--deflector-colour"):
        _config(tiny_survey, tmp_path / "x", bands=("r", "i"))


def test_stream_sees_new_lenses_every_epoch_and_replays_an_epoch_exactly(built):
    _, url = built
    deflectors = read_pool(url, "deflector", "train")
    negatives = read_pool(url, "non_lens", "train").take(np.arange(8))
    deflectors = deflectors.take(np.arange(min(4, len(deflectors))))
    # Cheap renders: this is about the stream, the renders are tested in test_inject.py.
    config = StreamConfig(batch_size=8, lookalike_rate=0.5, seed=1,
                          injection=InjectionConfig(supersample=1, max_draws=2),
                          lookalikes=LookalikeConfig(supersample=1, max_draws=2))
    stream = LensTrainingStream(deflectors, negatives, InputSpec(), config)
    first, again, second = (list(stream.epoch(e)) for e in (0, 0, 1))
    assert len(first) == len(stream) >= 1
    for a, b in zip(first, again):
        assert torch.equal(a["x"], b["x"]) and torch.equal(a["label"], b["label"])
    lens_first = torch.cat([b["x"][b["kind"] == KIND_LENS] for b in first])
    lens_second = torch.cat([b["x"][b["kind"] == KIND_LENS] for b in second])
    assert len(lens_first) > 0 and not torch.equal(lens_first, lens_second)
    batch = first[0]
    assert batch["x"].shape[1:] == (3, 64, 64) and torch.isfinite(batch["x"]).all()
    assert set(batch["label"].tolist()) <= {0, 1}
    assert (batch["label"] == (batch["kind"] == KIND_LENS).long()).all()
    assert (batch["kind"] == KIND_LOOKALIKE).any() or config.lookalike_rate == 0


def test_cli_builds_a_dataset_and_draws_the_injection_grid(tiny_survey, tmp_path):
    out, png = tmp_path / "cli-ds", tmp_path / "grid.png"
    code = lensscan(["build-dataset", "--tiles", tiny_survey.tiles_url, "--catalog",
                     tiny_survey.catalog_url, "--truth", tiny_survey.truth_url, "--out", str(out),
                     "--tile-pattern", tiny_survey.tile_pattern, "--split-cell-deg", "0.012",
                     "--deflector-max-mag", "22.5", "--deflector-colour", "g-r>=0.5",
                     "--deflector-min-size", "0.3"])
    assert code == 0
    assert open_dataset(str(out))["config"]["deflector_cuts"]["colour_cuts"] == [["g", "r", 0.5]]
    assert lensscan(["show-injections", "--dataset", str(out), "--out", str(png), "-n", "3"]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 500_000
    assert lensscan(["build-dataset", "--tiles", tiny_survey.tiles_url, "--catalog",
                     tiny_survey.catalog_url, "--out", str(out)]) == 2
