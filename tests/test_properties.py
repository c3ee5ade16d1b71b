"""Property-based tests (hypothesis) of catalog parsing, footprint matching and cut-out edges."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scanner.catalog import invalid_coordinates, iter_catalog
from scanner.cutouts import FLAG_EDGE, FLAG_MASKED, cut_stamps
from scanner.footprints import FootprintIndex
from scanner.tiles import Tile
from tests.fits_helpers import tan_wcs

coords = st.tuples(st.integers(0, 2**62), st.floats(-10, 370) | st.just(float("nan")),
                   st.floats(-100, 100) | st.just(float("nan")))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(coords, min_size=1, max_size=30, unique_by=lambda r: r[0]),
       sep=st.sampled_from([",", ";", "\t", "|"]),
       names=st.sampled_from([("objid", "ra", "dec"), ("ID", "RA", "DEC"),
                              ("source_id", "RAJ2000", "DEJ2000"), ("object_id", "ra_deg", "dec_deg")]),
       comments=st.integers(0, 3), fmt=st.sampled_from(["csv", "parquet"]))
def test_catalog_values_survive_any_delimiter_spelling_and_format(tmp_path_factory, rows, sep, names,
                                                                  comments, fmt):
    d = tmp_path_factory.mktemp("cat")
    df = pd.DataFrame(rows, columns=list(names))
    if fmt == "csv":
        path = d / "c.csv"
        text = "".join(f"# comment {i}\n" for i in range(comments)) + df.to_csv(sep=sep, index=False,
                                                                               float_format="%.17g")
        path.write_text(text)
    else:
        path = d / "c.parquet"
        df.to_parquet(path)
    tables = list(iter_catalog(str(path), batch_rows=7))
    got = pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    assert got["objid"].tolist() == df[names[0]].tolist()
    assert got["row"].tolist() == list(range(len(df)))
    np.testing.assert_array_equal(got["ra"].to_numpy(), df[names[1]].to_numpy())
    np.testing.assert_array_equal(got["dec"].to_numpy(), df[names[2]].to_numpy())
    bad = invalid_coordinates(got["ra"].to_numpy(), got["dec"].to_numpy())
    expect = ~((df[names[1]] >= 0) & (df[names[1]] < 360) & (df[names[2]].abs() <= 90)).to_numpy()
    np.testing.assert_array_equal(bad, expect)


def _reference_cut(tile: np.ndarray, x: float, y: float, size: int) -> np.ndarray:
    """Per-object padded slicing: slow and obviously right."""
    c, h, w = tile.shape
    half = size // 2
    padded = np.full((c, h + 2 * size, w + 2 * size), np.nan, np.float32)
    padded[:, size:size + h, size:size + w] = tile
    x0, y0 = int(np.rint(x)) - half + size, int(np.rint(y)) - half + size
    return padded[:, y0:y0 + size, x0:x0 + size]


@settings(max_examples=60, deadline=None)
@given(h=st.integers(8, 60), w=st.integers(8, 60), size=st.integers(4, 24),
       pts=st.lists(st.tuples(st.floats(-5, 65), st.floats(-5, 65)), min_size=1, max_size=12),
       holes=st.booleans())
def test_cut_stamps_match_padded_slicing_and_flag_edges(h, w, size, pts, holes):
    rng = np.random.default_rng(h * 1000 + w)
    tile = rng.normal(size=(2, h, w)).astype(np.float32)
    if holes:
        tile[:, h // 2, :] = np.nan
    x = np.array([p[0] for p in pts])
    y = np.array([p[1] for p in pts])
    x, y = np.clip(x, -size // 2 + 0.6, w - 1 + size // 2 - 0.6), np.clip(y, -size // 2 + 0.6, h - 1 + size // 2 - 0.6)
    s = cut_stamps(tile, x, y, size)
    for i in range(len(x)):
        ref = _reference_cut(tile, x[i], y[i], size)
        np.testing.assert_array_equal(s.pixels[i], ref)
        half = size // 2
        x0, y0 = int(np.rint(x[i])) - half, int(np.rint(y[i])) - half
        crosses = x0 < 0 or y0 < 0 or x0 + size > w or y0 + size > h
        assert bool(s.flags[i] & FLAG_EDGE) == crosses
        inside = ref[:, max(0, -y0):min(size, h - y0), max(0, -x0):min(size, w - x0)]
        assert bool(s.flags[i] & FLAG_MASKED) == bool(np.isnan(inside).any())
        assert np.isclose(s.missing_fraction[i], np.isnan(ref).mean())


@settings(max_examples=30, deadline=None)
@given(ra0=st.floats(0, 359.9), dec0=st.floats(-89, 89), size=st.integers(50, 400),
       px=st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=20))
def test_footprint_match_returns_the_pixel_positions_it_came_from(ra0, dec0, size, px):
    wcs = tan_wcs(ra0, dec0, size)
    hdr = wcs.to_header()
    hdr["NAXIS1"] = hdr["NAXIS2"] = size
    tile = Tile("t", {}, (size, size), {"r": hdr.tostring()})
    index = FootprintIndex([tile])
    # Anywhere on the tile's pixels, edges included: [-0.5, size - 0.5).
    fx = -0.49 + np.array([p[0] for p in px]) * (size - 0.02)
    fy = -0.49 + np.array([p[1] for p in px]) * (size - 0.02)
    ra, dec = wcs.pixel_to_world_values(fx, fy)
    m = index.match(np.asarray(ra), np.asarray(dec))
    assert (m.tile_index == 0).all()
    np.testing.assert_allclose(m.x, fx, atol=1e-6)
    np.testing.assert_allclose(m.y, fy, atol=1e-6)
