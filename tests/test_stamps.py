"""Tiles to normalised stamps: layouts, WCS positions, edges, NaN, normalisation."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from astropy.io import fits

from scanner.config import InputSpec
from scanner.cutouts import FLAG_EDGE, FLAG_MASKED, cut_stamps, make_stamps
from scanner.footprints import FootprintIndex
from scanner.normalise import normalise
from scanner.tiles import describe_layout, discover_tiles, read_headers, read_pixels
from tests.fits_helpers import noisy_tile, tan_wcs, write_tile

BANDS = ("g", "r", "i")


def _tile(tmp_path, layout="per_band", compress=False, size=128):
    data = noisy_tile(size)
    write_tile(tmp_path, "t0", data, tan_wcs(150.0, 2.0, size), BANDS, layout, compress)
    pattern = {("per_band", False): "{tile}_{band}.fits", ("per_band", True): "{tile}_{band}.fits.fz",
               ("mef", False): "{tile}.fits", ("mef", True): "{tile}.fits.fz"}[(layout, compress)]
    return data, pattern


@pytest.mark.parametrize("layout,compress", [("per_band", False), ("mef", False),
                                             ("per_band", True), ("mef", True)])
def test_both_layouts_and_fz_give_the_same_stamps(tmp_path, layout, compress):
    data, pattern = _tile(tmp_path / layout, layout, compress)
    (tile,) = discover_tiles(str(tmp_path / layout), BANDS, pattern)
    read_headers(tile)
    assert tile.error is None and tile.shape == (128, 128)
    pixels = read_pixels(tile, BANDS)
    x, y = np.array([10.0, 64.0, 127.0]), np.array([64.0, 64.0, 3.0])
    spec = InputSpec(stamp_size_pix=32)
    stamps, _ = make_stamps(pixels, x, y, spec)
    expected, _ = make_stamps(data, x, y, spec)
    # Rice quantisation loses a little precision; uncompressed must be exact.
    tol = 0.05 if compress else 0.0
    np.testing.assert_allclose(stamps, expected, atol=tol)


def test_memory_url_reads_tiles(tmp_path):
    import fsspec

    data, pattern = _tile(tmp_path)
    fs = fsspec.filesystem("memory")
    for p in tmp_path.glob("*.fits"):
        fs.pipe(f"/tiles-mem/{p.name}", p.read_bytes())
    (tile,) = discover_tiles("memory://tiles-mem", BANDS, pattern)
    read_headers(tile)
    np.testing.assert_array_equal(read_pixels(tile, BANDS), data)


def test_band_order_follows_the_request_not_the_files(tmp_path):
    data, pattern = _tile(tmp_path)
    (tile,) = discover_tiles(str(tmp_path), ("i", "g", "r"), pattern)
    read_headers(tile)
    np.testing.assert_array_equal(read_pixels(tile, ("i", "g", "r")), data[[2, 0, 1]])


def test_stamp_is_centred_on_the_wcs_position(tmp_path):
    size = 96
    wcs = tan_wcs(30.0, -10.0, size)
    data = np.zeros((1, size, size), np.float32)
    data[0, 40, 70] = 100.0  # a point source at x=70, y=40
    ra, dec = wcs.pixel_to_world_values(70, 40)
    x, y = wcs.world_to_pixel_values(ra, dec)
    s = cut_stamps(data, np.atleast_1d(x), np.atleast_1d(y), 16)
    assert s.pixels[0, 0, 8, 8] == 100.0
    assert s.flags[0] == 0


def test_edge_objects_are_padded_and_flagged():
    data = np.ones((2, 50, 50), np.float32)
    s = cut_stamps(data, np.array([1.0, 25.0, 49.0]), np.array([25.0, 25.0, 48.0]), 16)
    assert s.flags[0] & FLAG_EDGE and not s.flags[1] & FLAG_EDGE and s.flags[2] & FLAG_EDGE
    assert not (s.flags & FLAG_MASKED).any()
    assert np.isnan(s.pixels[0, :, :, :7]).all() and (s.pixels[0, :, :, 7:] == 1).all()
    assert s.missing_fraction[1] == 0 and 0.4 < s.missing_fraction[0] < 0.5
    normed = normalise(s.pixels, InputSpec(bands=("a", "b"), stamp_size_pix=16))
    assert np.isfinite(normed).all()


def test_nan_pixels_are_filled_and_their_fraction_recorded():
    data = np.random.default_rng(1).normal(size=(3, 64, 64)).astype(np.float32)
    data[:, 30:34, 30:34] = np.nan
    s = cut_stamps(data, np.array([32.0]), np.array([32.0]), 32)
    assert s.flags[0] == FLAG_MASKED
    assert s.missing_fraction[0] == pytest.approx(16 / 1024)
    normed = normalise(s.pixels, InputSpec(stamp_size_pix=32))
    assert np.isfinite(normed).all() and (normed[0, :, 14:18, 14:18] == 0).all()


def test_normalisation_is_batched_sky_subtracted_and_does_not_touch_its_input():
    rng = np.random.default_rng(2)
    raw = (rng.normal(100.0, 5.0, (8, 3, 32, 32))).astype(np.float32)
    raw.setflags(write=False)  # Ray may hand read-only batches
    out = normalise(raw, InputSpec(stamp_size_pix=32))
    assert out.dtype == np.float32 and out.shape == raw.shape
    assert abs(float(np.median(out))) < 0.05  # sky at zero
    # noise of 1 sigma maps to asinh(1/3): about 0.33
    assert 0.25 < float(out.std()) < 0.4
    # one stamp normalised alone equals the same stamp in the batch
    np.testing.assert_allclose(normalise(raw[3:4], InputSpec(stamp_size_pix=32)), out[3:4], rtol=1e-6)


def test_overlapping_tiles_give_each_object_one_tile(tmp_path):
    size = 100
    # Two tiles offset by 80 px along x: a 20 px overlap.
    step = 80 * 0.26 / 3600
    w0, w1 = tan_wcs(150.0, 0.0, size), tan_wcs(150.0 - step, 0.0, size)  # RA grows to the left
    write_tile(tmp_path, "a", noisy_tile(size, 1), w0, ("r",))
    write_tile(tmp_path, "b", noisy_tile(size, 1, 1), w1, ("r",))
    tiles = [read_headers(t) for t in discover_tiles(str(tmp_path), ("r",))]
    index = FootprintIndex(tiles)
    xs = np.array([10.0, 85.0, 95.0, 99.0, 150.0])  # in tile-a pixel coordinates
    ra, dec = w0.pixel_to_world_values(xs, np.full(5, 50.0))
    ra = np.append(ra, 10.0)
    dec = np.append(dec, 0.0)
    m = index.match(ra, dec)
    names = [index.tiles[i].name if i >= 0 else None for i in m.tile_index]
    # Object at x=85 is 14 px inside a, 5 inside b -> a; x=95 is 4 inside a, 15 inside b -> b.
    assert names == ["a", "a", "b", "b", "b", None]
    np.testing.assert_allclose(m.x[2], 15.0, atol=1e-6)


def test_tile_without_celestial_wcs_is_reported(tmp_path):
    fits.PrimaryHDU(np.zeros((20, 20), np.float32)).writeto(tmp_path / "x_r.fits")
    (tile,) = discover_tiles(str(tmp_path), ("r",))
    read_headers(tile)
    assert tile.shape is None and "no celestial WCS" in tile.error and "x_r.fits" in tile.error


def test_missing_band_names_the_tile_and_band(tmp_path):
    write_tile(tmp_path, "t0", noisy_tile(32, 2), tan_wcs(1, 1, 32), ("g", "r"))
    write_tile(tmp_path, "t1", noisy_tile(32, 3), tan_wcs(2, 1, 32), BANDS)
    t0, t1 = discover_tiles(str(tmp_path), BANDS)
    read_headers(t0), read_headers(t1)
    assert "lacks band(s) i" in t0.error and t0.shape == (32, 32)
    assert t1.error is None


def test_bands_no_tile_has_are_refused_with_the_bands_found(tmp_path):
    write_tile(tmp_path, "t0", noisy_tile(32, 3), tan_wcs(1, 1, 32), BANDS)
    with pytest.raises(ValueError, match="no tile .* has band.*z.*g,i,r"):
        discover_tiles(str(tmp_path), ("g", "r", "z"))


def test_file_url_and_plain_path_find_the_same_tiles(tmp_path):
    _tile(tmp_path)
    (a,) = discover_tiles(str(tmp_path), BANDS)
    (b,) = discover_tiles(f"file://{tmp_path}", BANDS)
    read_headers(a), read_headers(b)
    np.testing.assert_array_equal(read_pixels(a, BANDS), read_pixels(b, BANDS))


def _gzip(paths) -> None:
    for p in paths:
        p.with_name(p.name + ".gz").write_bytes(gzip.compress(p.read_bytes()))
        p.unlink()


def test_multi_extension_fz_tiles_are_found_without_a_pattern(tmp_path):
    data = {name: noisy_tile(64, 3, k) for k, name in enumerate(("t0", "t1"))}
    for k, (name, d) in enumerate(data.items()):
        write_tile(tmp_path, name, d, tan_wcs(150.0 + k, 2.0, 64), BANDS, "mef", compress=True)
    tiles = [read_headers(t) for t in discover_tiles(str(tmp_path), BANDS)]
    assert [(t.name, t.pattern, t.error) for t in tiles] == [("t0", "{tile}.fits.fz", None),
                                                              ("t1", "{tile}.fits.fz", None)]
    for t in tiles:
        np.testing.assert_allclose(read_pixels(t, BANDS), data[t.name], atol=0.05)


def test_mixed_layouts_and_gzip_are_found_and_described(tmp_path):
    data = {name: noisy_tile(64, 4, k) for k, name in enumerate(("a", "b", "c", "d"))}
    write_tile(tmp_path, "a", data["a"], tan_wcs(150, 2, 64), (*BANDS, "z"))  # z: not scanned
    write_tile(tmp_path, "b", data["b"][:3], tan_wcs(151, 2, 64), BANDS, "mef")
    _gzip(write_tile(tmp_path, "c", data["c"][:3], tan_wcs(152, 2, 64), BANDS))
    write_tile(tmp_path, "d", data["d"][:3], tan_wcs(153, 2, 64), BANDS, "mef", compress=True)
    write_tile(tmp_path, "e", data["d"][3:], tan_wcs(154, 2, 64), ("z",))  # has none of g,r,i
    tiles = [read_headers(t) for t in discover_tiles(str(tmp_path), BANDS)]
    assert {t.name: t.pattern for t in tiles} == {
        "a": "{tile}_{band}.fits", "b": "{tile}.fits", "c": "{tile}_{band}.fits.gz",
        "d": "{tile}.fits.fz", "e": "{tile}_{band}.fits"}
    assert describe_layout(tiles).startswith("5 tiles: 2 as {tile}_{band}.fits, ")
    for t in tiles[:4]:
        assert t.error is None
        np.testing.assert_allclose(read_pixels(t, BANDS), data[t.name][:3],
                                   atol=0.05 if t.name == "d" else 0)
    assert "lacks band(s) g,r,i" in tiles[4].error


def test_gzipped_tiles_on_remote_storage_read(tmp_path):
    import fsspec

    data = noisy_tile(64, 3)
    _gzip(write_tile(tmp_path / "pb", "t0", data, tan_wcs(150, 2, 64), BANDS))
    _gzip(write_tile(tmp_path / "mef", "t1", data, tan_wcs(151, 2, 64), BANDS, "mef"))
    fs = fsspec.filesystem("memory")
    for p in tmp_path.rglob("*.gz"):
        fs.pipe(f"/gz-tiles/{p.name}", p.read_bytes())
    tiles = [read_headers(t) for t in discover_tiles("memory://gz-tiles", BANDS)]
    assert [t.pattern for t in tiles] == ["{tile}_{band}.fits.gz", "{tile}.fits.gz"]
    for t in tiles:
        assert t.error is None and t.shape == (64, 64)
        np.testing.assert_array_equal(read_pixels(t, BANDS), data)


def test_ambiguous_tile_files_are_refused_naming_them(tmp_path):
    write_tile(tmp_path / "twice", "t0", noisy_tile(32, 3), tan_wcs(1, 1, 32), BANDS)
    write_tile(tmp_path / "twice", "t0", noisy_tile(32, 3), tan_wcs(1, 1, 32), BANDS, compress=True)
    with pytest.raises(ValueError, match="tile t0 is both .*t0_g.fits and .*t0_g.fits.fz.*--tile-pattern"):
        discover_tiles(str(tmp_path / "twice"), BANDS)
    write_tile(tmp_path / "both", "t0", noisy_tile(32, 3), tan_wcs(1, 1, 32), BANDS)
    write_tile(tmp_path / "both", "t0", noisy_tile(32, 3), tan_wcs(1, 1, 32), BANDS, "mef")
    with pytest.raises(ValueError, match="tile t0 is both .*--tile-pattern"):
        discover_tiles(str(tmp_path / "both"), BANDS)


def test_truncated_file_is_caught_when_headers_are_read(tmp_path):
    paths = write_tile(tmp_path, "t0", noisy_tile(64, 3), tan_wcs(1, 1, 64), BANDS)
    paths[1].write_bytes(paths[1].read_bytes()[:4000])
    (tile,) = discover_tiles(str(tmp_path), BANDS)
    read_headers(tile)
    assert tile.shape == (64, 64) and "t0_r.fits: truncated" in tile.error


def test_overlap_objects_go_to_a_healthy_tile_before_a_broken_one(tmp_path):
    size = 100
    step = 80 * 0.26 / 3600  # b is 80 px to the right of a: a 20 px overlap
    w0, w1 = tan_wcs(150.0, 0.0, size), tan_wcs(150.0 - step, 0.0, size)
    write_tile(tmp_path, "a", noisy_tile(size, 2), w0, ("g", "r"))
    write_tile(tmp_path, "b", noisy_tile(size, 1, 1), w1, ("g",))  # lacks r
    tiles = [read_headers(t) for t in discover_tiles(str(tmp_path), ("g", "r"))]
    assert tiles[1].error and tiles[1].shape
    index = FootprintIndex(tiles)
    ra, dec = w0.pixel_to_world_values(np.array([95.0, 150.0]), np.array([50.0, 50.0]))
    m = index.match(ra, dec)
    # x=95 lies deeper in b (15 px) than in a (4 px), but b cannot be cut; x=150 is on b alone.
    assert [index.tiles[i].name for i in m.tile_index] == ["a", "b"]
