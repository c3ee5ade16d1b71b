"""Specification of the mock survey: determinism, WCS, injected lenses, layouts and storage."""

from __future__ import annotations

import dataclasses
import io
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd
import pytest
from astropy.io import fits
from astropy.wcs import WCS

from scanner.mock_survey import MockSurvey, MockSurveyConfig, make_mock_survey

SMALL = MockSurveyConfig(n_tiles=2, size_pix=320, n_lenses=3, seed=7, overlap_pix=48)

HEADER_KEYS = ("CTYPE1", "CTYPE2", "CRVAL1", "CRVAL2", "CRPIX1", "CRPIX2", "CD1_1", "CD1_2",
               "CD2_1", "CD2_2", "RADESYS", "BAND", "EXTNAME", "MAGZERO", "SEEING", "SKYLEVEL",
               "SKYSIG", "GAIN", "PIXSCALE")


def read_band(survey: MockSurvey, tile: str, band: str) -> fits.ImageHDU:
    """Return one band of one tile as an in-memory HDU, whatever the layout."""
    url = survey.tile_url(tile, band)
    with fsspec.open(url, "rb") as f:
        hdul = fits.open(io.BytesIO(f.read()))
    if "{band}" in survey.tile_pattern:
        hdu = next(h for h in hdul if h.data is not None)
    else:
        hdu = hdul[band]
    return fits.ImageHDU(data=np.asarray(hdu.data), header=hdu.header)


def read_table(url: str) -> pd.DataFrame:
    with fsspec.open(url, "rb") as f:
        return pd.read_parquet(io.BytesIO(f.read()))


def pixel_position(header: fits.Header, ra: float, dec: float) -> tuple[float, float]:
    x, y = WCS(header).wcs_world2pix(ra, dec, 0)
    return float(x), float(y)


def on_tile(x: float, y: float, size: int) -> bool:
    return -0.5 <= x < size - 0.5 and -0.5 <= y < size - 0.5


def memory_root() -> str:
    return f"memory://mock-survey-test-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def survey(tmp_path_factory: pytest.TempPathFactory) -> MockSurvey:
    return make_mock_survey(str(tmp_path_factory.mktemp("mock") / "survey"), SMALL)


@pytest.fixture(scope="module")
def truth(survey: MockSurvey) -> pd.DataFrame:
    return read_table(survey.truth_url)


@pytest.fixture(scope="module")
def catalog(survey: MockSurvey) -> pd.DataFrame:
    return read_table(survey.catalog_url)


def read_bytes(url: str) -> bytes:
    with fsspec.open(url, "rb") as f:
        return f.read()


def test_same_seed_gives_identical_files_and_another_seed_does_not() -> None:
    config = MockSurveyConfig(n_tiles=1, size_pix=256, n_lenses=1, seed=11, layout="mef",
                              compress=True)
    first = make_mock_survey(memory_root(), config)
    again = make_mock_survey(memory_root(), config)
    other = make_mock_survey(memory_root(), dataclasses.replace(config, seed=12))
    assert read_bytes(first.tile_url("tile000")) == read_bytes(again.tile_url("tile000"))
    for band in config.bands:
        a, b, c = (read_band(s, "tile000", band).data for s in (first, again, other))
        assert a.dtype.kind == "f" and a.dtype.itemsize == 4
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)
    pd.testing.assert_frame_equal(read_table(first.catalog_url), read_table(again.catalog_url))
    pd.testing.assert_frame_equal(read_table(first.truth_url), read_table(again.truth_url))
    assert not read_table(first.catalog_url).equals(read_table(other.catalog_url))


def test_writes_to_memory_filesystem() -> None:
    config = MockSurveyConfig(n_tiles=2, size_pix=192, n_lenses=0, bands=("r",), seed=1)
    root = memory_root()
    survey = make_mock_survey(root, config)
    fs, path = fsspec.core.url_to_fs(survey.tiles_url)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) == [
        "tile000_r.fits", "tile001_r.fits"]
    assert survey.root == root
    assert survey.catalog_url == f"{root}/catalog.parquet"
    assert set(read_table(survey.catalog_url).columns) == {"objid", "ra", "dec"}


def test_catalog_has_unique_ids_matching_truth(catalog: pd.DataFrame, truth: pd.DataFrame) -> None:
    assert catalog["objid"].dtype == np.int64
    assert catalog["objid"].is_unique
    assert catalog["ra"].dtype == np.float64 and catalog["dec"].dtype == np.float64
    assert set(catalog["objid"]) == set(truth["objid"])
    assert set(truth["kind"]) == {"galaxy", "star", "lens"}
    assert (truth["is_lens"] == (truth["kind"] == "lens")).all()
    assert truth["is_lens"].sum() == SMALL.n_lenses


def test_every_catalogued_object_lies_on_a_tile(survey: MockSurvey, catalog: pd.DataFrame) -> None:
    headers = [read_band(survey, t, "r").header for t in survey.tiles]
    covered = np.zeros(len(catalog), bool)
    for header in headers:
        x, y = WCS(header).wcs_world2pix(catalog["ra"], catalog["dec"], 0)
        covered |= (x >= -0.5) & (x < SMALL.size_pix - 0.5) & (y >= -0.5) & (y < SMALL.size_pix - 0.5)
    assert covered.all()


def test_catalog_positions_land_on_the_objects_light(survey: MockSurvey, truth: pd.DataFrame) -> None:
    bright = truth[truth["mag_r"] < 21.5]
    assert len(bright) >= 5
    checked: set[int] = set()
    for tile in survey.tiles:
        hdu = read_band(survey, tile, "r")
        sigma = hdu.header["SKYSIG"]
        for obj in bright.itertuples():
            x, y = pixel_position(hdu.header, obj.ra, obj.dec)
            if not (4 <= x < SMALL.size_pix - 5 and 4 <= y < SMALL.size_pix - 5):
                continue
            ix, iy = int(round(x)), int(round(y))
            compact = obj.half_light_radius_arcsec < 1.0
            assert hdu.data[iy, ix] > (10 if compact else 3) * sigma, obj
            checked.add(obj.objid)
            box = hdu.data[iy - 3:iy + 4, ix - 3:ix + 4]
            peak_y, peak_x = np.unravel_index(np.argmax(box), box.shape)
            separation = np.hypot((truth.ra - obj.ra) * np.cos(np.radians(obj.dec)),
                                  truth.dec - obj.dec) * 3600
            blended = ((separation < 3.0) & (truth.mag_r < obj.mag_r + 1)
                       & (truth.objid != obj.objid)).any()
            # Big low-surface-brightness disks have noise-dominated peaks; lenses have arcs.
            if compact and not blended and obj.kind != "lens":
                assert np.hypot(peak_x - 3 + ix - x, peak_y - 3 + iy - y) < 1.5, obj
    assert len(checked) >= 0.8 * len(bright)


def test_lenses_have_truth_and_non_lenses_have_nan(truth: pd.DataFrame) -> None:
    lens_columns = ["theta_e_arcsec", "q_lens", "phi_lens", "gamma1", "gamma2", "source_re_arcsec",
                    "source_x_arcsec", "source_y_arcsec"] + [f"source_mag_{b}" for b in SMALL.bands]
    lenses, others = truth[truth.is_lens], truth[~truth.is_lens]
    assert lenses[lens_columns].notna().all().all()
    assert others[lens_columns].isna().all().all()
    lo, hi = SMALL.einstein_radius_range_arcsec
    assert lenses["theta_e_arcsec"].between(lo, hi).all()
    # Deflectors are red ellipticals; their sources are bluer.
    assert (lenses["mag_g"] - lenses["mag_r"] > lenses["source_mag_g"] - lenses["source_mag_r"]).all()


def test_lensed_sources_add_flux_near_the_einstein_radius(
        tmp_path: Path, survey: MockSurvey, truth: pd.DataFrame) -> None:
    control = make_mock_survey(str(tmp_path / "control"),
                               dataclasses.replace(SMALL, paint_lensed_sources=False))
    band = "g"  # the bluest band: the source is brightest against the red deflector
    pix = SMALL.pixel_scale_arcsec
    lenses = truth[truth.is_lens]
    for tile in survey.tiles:
        with_source = read_band(survey, tile, band)
        diff = with_source.data.astype(np.float64) - read_band(control, tile, band).data
        yy, xx = np.indices(diff.shape)
        lens_regions = np.zeros(diff.shape, bool)
        for lens in lenses.itertuples():
            x, y = pixel_position(with_source.header, lens.ra, lens.dec)
            radius_arcsec = np.hypot(xx - x, yy - y) * pix
            near = radius_arcsec < 2.5 * lens.theta_e_arcsec + 4.0
            lens_regions |= near
            if lens.tile != tile:
                continue
            arc_flux = diff[near].sum()
            expected = lens.source_magnification * 10 ** (
                -0.4 * (lens.source_mag_g - with_source.header["MAGZERO"]))
            assert 0.6 * expected < arc_flux < 1.6 * expected, lens
            mean_radius = np.sum(diff[near] * radius_arcsec[near]) / arc_flux
            assert 0.5 * lens.theta_e_arcsec < mean_radius < 1.6 * lens.theta_e_arcsec, lens
            ring = near & (np.abs(radius_arcsec - lens.theta_e_arcsec) < 1.0)
            noise = with_source.header["SKYSIG"] * np.sqrt(ring.sum())
            assert diff[ring].sum() > 5 * noise, lens
        # Away from the lenses nothing changes beyond the faint wings of the arcs.
        assert np.abs(diff[~lens_regions]).max() < 0.05 * with_source.header["SKYSIG"]


def test_layouts_and_compression_give_the_same_pixels(tmp_path: Path) -> None:
    config = MockSurveyConfig(n_tiles=2, size_pix=256, n_lenses=1, seed=5, overlap_pix=32)
    surveys = {
        (layout, compress): make_mock_survey(
            str(tmp_path / f"{layout}-{compress}"),
            dataclasses.replace(config, layout=layout, compress=compress))
        for layout in ("per_band", "mef") for compress in (False, True)
    }
    assert surveys["per_band", False].tile_pattern == "{tile}_{band}.fits"
    assert surveys["per_band", True].tile_pattern == "{tile}_{band}.fits.fz"
    assert surveys["mef", False].tile_pattern == "{tile}.fits"
    assert surveys["mef", True].tile_pattern == "{tile}.fits.fz"
    assert (tmp_path / "mef-True" / "tiles" / "tile001.fits.fz").exists()
    assert (tmp_path / "per_band-True" / "tiles" / "tile001_i.fits.fz").exists()
    for tile in surveys["mef", False].tiles:
        for band in config.bands:
            reference = read_band(surveys["per_band", False], tile, band)
            assert np.array_equal(read_band(surveys["mef", False], tile, band).data, reference.data)
            for layout in ("per_band", "mef"):
                compressed = read_band(surveys[layout, True], tile, band)
                # Rice quantises to a small fraction of the noise.
                tolerance = 0.1 * reference.header["SKYSIG"]
                assert np.abs(compressed.data - reference.data).max() < tolerance
                for key in HEADER_KEYS:
                    assert compressed.header[key] == reference.header[key], key


def test_headers_carry_tan_wcs_and_photometric_keys(survey: MockSurvey) -> None:
    for tile in survey.tiles:
        headers = {band: read_band(survey, tile, band).header for band in survey.bands}
        for band, header in headers.items():
            for key in HEADER_KEYS:
                assert key in header, key
            assert header["CTYPE1"] == "RA---TAN" and header["CTYPE2"] == "DEC--TAN"
            assert header["RADESYS"] == "ICRS"
            assert header["BAND"] == band and header["EXTNAME"] == band
            assert header["PIXSCALE"] == SMALL.pixel_scale_arcsec
            assert 0.6 < header["SEEING"] < 1.5
            assert header["SKYSUB"] is True
            # The recorded sky and gain set the noise of the (sky-subtracted) image.
            data = read_band(survey, tile, band).data
            mad_sigma = 1.4826 * np.median(np.abs(data - np.median(data)))
            assert np.isclose(mad_sigma, np.sqrt(header["SKYLEVEL"] / header["GAIN"]), rtol=0.15)
            assert abs(np.median(data)) < 0.2 * mad_sigma
            assert WCS(header).wcs.compare(WCS(headers[survey.bands[0]]).wcs)
        # Redder bands see better, as on a real telescope.
        assert headers["g"]["SEEING"] > headers["i"]["SEEING"]


def test_adjacent_tiles_overlap_by_overlap_pix(survey: MockSurvey) -> None:
    left, right = (WCS(read_band(survey, t, "r").header) for t in survey.tiles)
    n, overlap = SMALL.size_pix, SMALL.overlap_pix
    rows = np.array([0.0, n / 2, n - 1.0])
    sky = right.pixel_to_world(np.zeros(3), rows)
    x, y = left.world_to_pixel(sky)
    # Pixel column 0 of one tile is column n - overlap of its neighbour (either side).
    assert np.allclose(np.abs(x - 0.0), n - overlap, atol=0.01)
    assert np.allclose(y, rows, atol=0.01)


def test_star_photometry_follows_the_zero_point() -> None:
    config = MockSurveyConfig(n_tiles=1, size_pix=256, n_lenses=0, bands=("r",), seed=3,
                              galaxy_density_per_arcmin2=0.0, star_density_per_arcmin2=8.0,
                              star_mag_range=(17.0, 21.0))
    survey = make_mock_survey(memory_root(), config)
    stars = read_table(survey.truth_url)
    hdu = read_band(survey, "tile000", "r")
    yy, xx = np.indices(hdu.data.shape)
    radius_pix = 4 * hdu.header["SEEING"] / config.pixel_scale_arcsec
    measured = 0
    for star in stars.itertuples():
        separation = np.hypot((stars.ra - star.ra) * np.cos(np.radians(star.dec)),
                              stars.dec - star.dec) * 3600
        x, y = pixel_position(hdu.header, star.ra, star.dec)
        inside = radius_pix + 1 < min(x, y, config.size_pix - 1 - x, config.size_pix - 1 - y)
        if (np.sort(separation)[1] < 10) or not inside:
            continue
        aperture = np.hypot(xx - x, yy - y) < radius_pix
        flux = hdu.data[aperture].sum()
        expected = 10 ** (-0.4 * (star.mag_r - hdu.header["MAGZERO"]))
        noise = np.sqrt(aperture.sum() * hdu.header["SKYSIG"] ** 2 + expected / hdu.header["GAIN"])
        # A 4-FWHM aperture holds all but ~0.1% of a beta=3.5 Moffat.
        assert abs(flux - expected) < 0.01 * expected + 4 * noise, star
        measured += 1
    assert measured >= 3


def test_galaxy_counts_rise_toward_faint_magnitudes(truth: pd.DataFrame) -> None:
    galaxies = truth[truth.kind == "galaxy"]
    bright = galaxies.mag_r.between(20, 22).sum()
    faint = galaxies.mag_r.between(23, 25).sum()
    assert faint > 3 * bright
    assert galaxies.half_light_radius_arcsec.between(0.05, 5).all()


@pytest.mark.parametrize("change, message", [
    ({"bands": ("g", "q")}, "bands"),
    ({"layout": "single"}, "layout"),
    ({"overlap_pix": 600}, "overlap_pix"),
    ({"n_tiles": 0}, "n_tiles"),
])
def test_invalid_config_names_the_parameter(change: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MockSurveyConfig(**change)


def test_too_many_lenses_for_the_area_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="n_lenses"):
        make_mock_survey(memory_root(), MockSurveyConfig(n_tiles=1, size_pix=128, overlap_pix=0, n_lenses=30))
