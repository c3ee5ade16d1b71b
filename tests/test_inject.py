"""Lens injection and look-alikes: agreement with lenstronomy, flux, band order, determinism."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from lenstronomy.LensModel.lens_model import LensModel
from lenstronomy.LightModel.light_model import LightModel
from lenstronomy.Util import param_util
from scipy.signal import fftconvolve

from training.bands import BandMeta, sed_magnitudes
from training.conditions import ConditionsConfig, draw_conditions
from training.inject import InjectionConfig, inject_lenses, lensed_unit_images
from training.lookalikes import LOOKALIKE_KINDS, LookalikeConfig, paint_lookalikes
from training.render import moffat_kernels

BANDS = ("g", "r", "i")
SIZE = 64
SCALE = 0.26

# One fixed SIE + shear + Sersic configuration for the cross-check.
LENS = {"einstein_radius_arcsec": 1.6, "axis_ratio": 0.7, "angle": 0.6, "shear_gamma1": 0.03,
        "shear_gamma2": -0.04, "source_x_arcsec": 0.15, "source_y_arcsec": -0.1,
        "source_half_light_radius_arcsec": 0.3, "source_sersic_index": 1.2,
        "source_axis_ratio": 0.6, "source_angle": 1.1}


def _params(values: dict[str, float]) -> dict[str, torch.Tensor]:
    p = {k: torch.tensor([v], dtype=torch.float32) for k, v in values.items()}
    for key in ("clump_flux_fraction", "clump_x_arcsec", "clump_y_arcsec",
                "clump_half_light_radius_arcsec"):
        p[key] = torch.zeros(1, 0)
    return p


def _lenstronomy_image(values: dict[str, float], supersample: int) -> np.ndarray:
    """The same lens ray-traced by lenstronomy, unit unlensed flux, pixel-integrated."""
    lens_model, light_model = LensModel(["SIE", "SHEAR"]), LightModel(["SERSIC_ELLIPSE"])
    e1, e2 = param_util.phi_q2_ellipticity(values["angle"], values["axis_ratio"])
    se1, se2 = param_util.phi_q2_ellipticity(values["source_angle"], values["source_axis_ratio"])
    kw_lens = [{"theta_E": values["einstein_radius_arcsec"], "e1": e1, "e2": e2,
                "center_x": 0.0, "center_y": 0.0},
               {"gamma1": values["shear_gamma1"], "gamma2": values["shear_gamma2"],
                "ra_0": 0.0, "dec_0": 0.0}]
    kw_source = {"amp": 1.0, "R_sersic": values["source_half_light_radius_arcsec"],
                 "n_sersic": values["source_sersic_index"], "e1": se1, "e2": se2,
                 "center_x": values["source_x_arcsec"], "center_y": values["source_y_arcsec"]}
    kw_source["amp"] = 1.0 / light_model.total_flux([kw_source])[0]
    axis = ((np.arange(SIZE * supersample) + 0.5) / supersample - 0.5 - SIZE // 2) * SCALE
    x, y = np.meshgrid(axis, axis)
    bx, by = lens_model.ray_shooting(x.ravel(), y.ravel(), kw_lens)
    sb = light_model.surface_brightness(bx, by, [kw_source]).reshape(x.shape)
    return sb.reshape(SIZE, supersample, SIZE, supersample).mean(axis=(1, 3)) * SCALE**2


@pytest.fixture(scope="module")
def reference_image() -> np.ndarray:
    return _lenstronomy_image(LENS, supersample=8)


@pytest.mark.parametrize("supersample,tolerance", [(5, 0.005), (3, 0.01)])
def test_caustics_image_agrees_with_lenstronomy(reference_image, supersample, tolerance):
    """Stated tolerance: after a 0.9" PSF, every pixel within 0.5% (5x5 rays per pixel) or 1%
    (the default 3x3) of the arcs' peak; the unlensed-flux normalisations agree within 0.5%
    (caustics' Sersic k(n) is Ciotti & Bertin's, lenstronomy's a linear fit)."""
    meta = BandMeta.constant(1, ("r",), psf_fwhm_arcsec=0.9, pixel_scale_arcsec=SCALE)
    ours, _ = lensed_unit_images(_params(LENS), meta, SIZE, supersample)
    ours = ours[0].double().numpy()
    kernel = moffat_kernels(meta, 12)[0, 0].double().numpy()
    ours_psf = fftconvolve(ours, kernel, mode="same")
    ref_psf = fftconvolve(reference_image, kernel, mode="same")
    assert np.abs(ours_psf - ref_psf).max() < tolerance * ref_psf.max()
    assert ours.sum() == pytest.approx(reference_image.sum(), rel=0.005)


def test_einstein_ring_radius_matches_the_analytic_value():
    """A source on the axis of a round SIE forms a ring at the Einstein radius."""
    theta_e = 2.0
    values = dict(LENS, einstein_radius_arcsec=theta_e, axis_ratio=0.999, shear_gamma1=0.0,
                  shear_gamma2=0.0, source_x_arcsec=0.0, source_y_arcsec=0.0,
                  source_half_light_radius_arcsec=0.1, source_axis_ratio=1.0)
    meta = BandMeta.constant(1, ("r",), pixel_scale_arcsec=SCALE)
    image, magnification = lensed_unit_images(_params(values), meta, SIZE, 5)
    yy, xx = np.mgrid[:SIZE, :SIZE] - SIZE // 2
    radius = np.hypot(xx, yy) * SCALE
    bins = np.arange(0.5, 6, SCALE)
    profile = [image[0].numpy()[(radius >= a) & (radius < a + SCALE)].mean() for a in bins]
    peak = bins[int(np.argmax(profile))] + SCALE / 2
    assert abs(peak - theta_e) <= SCALE
    # An on-axis source is magnified roughly 2 theta_E / r_source: strongly.
    assert float(image.sum()) > 10


def _meta(n: int, magzero=(30.0, 29.0, 28.5), bands=BANDS) -> BandMeta:
    meta = BandMeta.constant(n, bands, sky_sigma=2.0, gain=20.0, psf_fwhm_arcsec=1.0)
    meta.magzero = torch.tensor(magzero, dtype=torch.float32).repeat(n, 1)
    return meta


def test_injected_flux_in_each_band_is_the_requested_magnitude_through_its_zero_point():
    """Without lensing (a negligible Einstein radius) each band receives exactly the counts the
    source's magnitude gives through that band's own zero point."""
    n, size = 8, 96  # a big stamp: an n = 2 Sersic puts 1% of its light beyond 8"
    config = InjectionConfig(einstein_radius_arcsec=(1e-4, 1e-4), source_offset_theta_e=0.0,
                             min_magnification=0.0, min_arc_snr=0.0, supersample=4,
                             source_half_light_radius_arcsec=(0.3, 0.6), max_clumps=0)
    meta = _meta(n)
    _, params = inject_lenses(torch.zeros(n, 3, size, size), meta, config,
                              torch.Generator().manual_seed(1))
    # Through the drawn zero point, which strays from the header's by calibration-sized errors.
    expected = 10 ** (-0.4 * (params["source_mag"] - params["magzero"]))
    injected = params["arcs"].sum(dim=(-2, -1))
    torch.testing.assert_close(injected, expected, rtol=0.01, atol=0.0)
    assert (params["magzero"] - meta.magzero).abs().max() < 0.2
    # The reference band's magnitude is the one requested; the others follow the SED.
    r = BANDS.index(config.reference_band)
    torch.testing.assert_close(params["source_mag"][:, r], params["source_magnitude"])
    sed = sed_magnitudes(params["source_magnitude"], params["source_sed_slope"], BANDS, "r")
    torch.testing.assert_close(params["source_mag"], sed)


def test_lensed_flux_is_the_magnification_times_the_requested_flux():
    n = 16
    config = InjectionConfig(max_clumps=0, min_magnification=0.0, min_arc_snr=0.0)
    meta = _meta(n)
    _, params = inject_lenses(torch.zeros(n, 3, SIZE, SIZE), meta, config,
                              torch.Generator().manual_seed(2))
    requested = 10 ** (-0.4 * (params["source_mag"] - params["magzero"]))
    injected = params["arcs"].sum(dim=(-2, -1))
    # The PSF conserves flux; what leaves the stamp edge is well under 1%.
    torch.testing.assert_close(injected, params["magnification"][:, None] * requested, rtol=0.01,
                               atol=0.0)
    assert (params["magnification"] > 1).all()


def test_same_seed_gives_the_same_lenses_and_another_seed_other_lenses():
    raw = torch.randn(8, 3, SIZE, SIZE)
    meta = _meta(8)
    a, pa_ = inject_lenses(raw, meta, InjectionConfig(), torch.Generator().manual_seed(5))
    b, pb = inject_lenses(raw, meta, InjectionConfig(), torch.Generator().manual_seed(5))
    c, _ = inject_lenses(raw, meta, InjectionConfig(), torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert all(torch.equal(pa_[k], pb[k]) for k in pa_)
    assert not torch.equal(a, c)


def test_band_order_follows_the_metadata():
    """The same draws with the bands listed in reverse give the same arcs, channels reversed
    (with the header's conditions: drawn ones are drawn in channel order)."""
    n = 6
    config = InjectionConfig(min_arc_snr=0.0, min_magnification=0.0,
                             conditions=ConditionsConfig.header())
    meta = _meta(n)
    reverse = _meta(n, magzero=(28.5, 29.0, 30.0), bands=BANDS[::-1])
    raw = torch.randn(n, 3, SIZE, SIZE)
    _, forward_params = inject_lenses(raw, meta, config, torch.Generator().manual_seed(3))
    _, reverse_params = inject_lenses(raw.flip(1), reverse, config, torch.Generator().manual_seed(3))
    torch.testing.assert_close(reverse_params["arcs"], forward_params["arcs"].flip(1),
                               rtol=1e-4, atol=1e-3)
    # Sources are bluer than red deflectors: brighter (in AB) in g than in i, never redder.
    g_minus_i = forward_params["source_mag"][:, 0] - forward_params["source_mag"][:, 2]
    assert (g_minus_i < 1.0).all()


def test_sources_are_bluer_than_any_deflector_the_default_cuts_select():
    n = 256
    _, params = inject_lenses(torch.zeros(n, 3, 16, 16), _meta(n),
                              InjectionConfig(min_arc_snr=0.0, min_magnification=0.0, max_draws=1,
                                              supersample=1),
                              torch.Generator().manual_seed(4))
    g_minus_r = params["source_mag"][:, 0] - params["source_mag"][:, 1]
    assert float(g_minus_r.max()) < 1.0  # the default deflector cut is g - r >= 1.0


def test_accepted_lenses_pass_the_magnification_and_snr_cuts():
    n = 12
    config = InjectionConfig(min_magnification=4.0, min_arc_snr=30.0, supersample=2)
    _, params = inject_lenses(torch.zeros(n, 3, 48, 48), _meta(n), config,
                              torch.Generator().manual_seed(7))
    ok = params["passed_cuts"]
    assert ok.float().mean() > 0.8
    assert (params["magnification"][ok] >= 4.0).all() and (params["arc_snr"][ok] >= 30.0).all()
    assert (params["draws"] >= 1).all() and (params["draws"] <= config.max_draws).all()


def test_missing_pixels_stay_missing_and_the_rest_is_finite():
    raw = torch.zeros(2, 3, SIZE, SIZE)
    raw[0, :, :5, :] = float("nan")
    lensed, _ = inject_lenses(raw, _meta(2), InjectionConfig(), torch.Generator().manual_seed(0))
    assert torch.isnan(lensed[0, :, :5]).all()
    assert torch.isfinite(lensed[0, :, 5:]).all() and torch.isfinite(lensed[1]).all()


def test_mass_follows_the_light_of_an_elongated_deflector():
    n = 8
    yy, xx = torch.meshgrid(torch.arange(SIZE) - SIZE // 2, torch.arange(SIZE) - SIZE // 2,
                            indexing="ij")
    angle = 0.5
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    galaxy = 500 * torch.exp(-0.5 * ((u / 6.0) ** 2 + (v / 2.5) ** 2))
    raw = galaxy.expand(n, 3, SIZE, SIZE).clone()
    _, params = inject_lenses(raw, _meta(n), InjectionConfig(misalignment_sigma_deg=5.0, max_draws=1,
                                                             supersample=1),
                              torch.Generator().manual_seed(0))
    offset = torch.remainder(params["angle"] - angle + math.pi / 2, math.pi) - math.pi / 2
    assert float(offset.abs().max()) < math.radians(20)


def test_bad_inputs_get_one_line_errors_naming_the_fix():
    with pytest.raises(ValueError, match="reference_band"):
        inject_lenses(torch.zeros(1, 2, 16, 16), BandMeta.constant(1, ("g", "i")),
                      InjectionConfig())
    with pytest.raises(ValueError, match=r"expected \(N, 3, S, S\)"):
        inject_lenses(torch.zeros(1, 2, 16, 16), _meta(1), InjectionConfig())
    with pytest.raises(ValueError, match="einstein_radius_arcsec"):
        InjectionConfig(einstein_radius_arcsec=(2.0, 1.0))


def test_lookalikes_are_labelled_kinds_with_the_requested_flux():
    n = 24
    meta = _meta(n)
    painted, params = paint_lookalikes(torch.zeros(n, 3, SIZE, SIZE), meta, LookalikeConfig(),
                                       torch.Generator().manual_seed(0))
    assert set(params["kind"].tolist()) <= set(range(len(LOOKALIKE_KINDS)))
    requested = 10 ** (-0.4 * (sed_magnitudes(params["magnitude"], params["sed_slope"], BANDS, "r")
                               - params["magzero"]))
    # Saturated stars lose their clipped charge and gain spikes; every other kind keeps its flux.
    kept = params["kind"] != LOOKALIKE_KINDS.index("saturated_star")
    torch.testing.assert_close(params["light"].sum(dim=(-2, -1))[kept], requested[kept], rtol=0.03,
                               atol=0.0)
    assert params["passed_cuts"].all() and torch.isfinite(painted).all()


@pytest.mark.parametrize("kind", LOOKALIKE_KINDS)
def test_each_lookalike_kind_can_be_chosen_alone(kind):
    weights = tuple(1.0 if k == kind else 0.0 for k in LOOKALIKE_KINDS)
    _, params = paint_lookalikes(torch.zeros(4, 3, SIZE, SIZE), _meta(4),
                                 LookalikeConfig(kind_weights=weights), torch.Generator().manual_seed(0))
    assert (params["kind"] == LOOKALIKE_KINDS.index(kind)).all()


def test_lookalikes_are_deterministic_by_seed():
    raw = torch.randn(6, 3, SIZE, SIZE)
    a, _ = paint_lookalikes(raw, _meta(6), LookalikeConfig(), torch.Generator().manual_seed(9))
    b, _ = paint_lookalikes(raw, _meta(6), LookalikeConfig(), torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


# --------------------------------------------------------------------------------------------
# New look-alike kinds: where their light is and what colour


def _paint_one(kind: str, n: int = 4, **settings):
    weights = tuple(1.0 if k == kind else 0.0 for k in LOOKALIKE_KINDS)
    meta = _meta(n, magzero=(30.0, 30.0, 30.0))
    config = LookalikeConfig(kind_weights=weights, **settings)
    return paint_lookalikes(torch.zeros(n, 3, SIZE, SIZE), meta, config,
                            torch.Generator().manual_seed(11))


def _light_centre_arcsec(light: torch.Tensor) -> torch.Tensor:
    """Flux-weighted distance (N,) of the band-summed light from the stamp's central pixel."""
    total = light.sum(dim=1)
    yy, xx = torch.meshgrid(torch.arange(SIZE) - SIZE // 2, torch.arange(SIZE) - SIZE // 2,
                            indexing="ij")
    flux = total.sum(dim=(-2, -1))
    mx, my = (total * xx).sum(dim=(-2, -1)) / flux, (total * yy).sum(dim=(-2, -1)) / flux
    return torch.hypot(mx, my) * SCALE


BLUE = {"sed_slope": (-1.0, -1.0)}
RED = {"star_sed_slope": (4.0, 4.0), "edge_on_sed_slope": (4.0, 4.0)}


@pytest.mark.parametrize("kind,settings,max_centre_arcsec,min_centre_arcsec,blue", [
    ("edge_on", RED, 0.6, 0.0, False),
    ("edge_on", {"edge_on_sed_slope": (-1.0, -1.0)}, 0.6, 0.0, True),
    ("clumpy", BLUE, 1.5, 0.0, True),
    ("blue_pair", BLUE, 4.0, 0.5, True),
    ("star", RED, 1.1, 0.0, False),
    ("star_blend", {"star_sed_slope": (-1.0, -1.0)}, 3.6, 0.7, True),
    ("saturated_star", RED, 1.6, 0.0, False),
])
def test_new_lookalike_kinds_paint_finite_light_where_and_as_blue_as_drawn(
        kind, settings, max_centre_arcsec, min_centre_arcsec, blue):
    painted, params = _paint_one(kind, **settings)
    assert (params["kind"] == LOOKALIKE_KINDS.index(kind)).all()
    light = params["light"]
    assert torch.isfinite(painted).all() and (light.sum(dim=(-2, -1)) > 0).all()
    centre = _light_centre_arcsec(light)
    assert ((centre <= max_centre_arcsec) & (centre >= min_centre_arcsec)).all(), centre
    g, i = light[:, 0].sum(dim=(-2, -1)), light[:, 2].sum(dim=(-2, -1))
    assert ((g > i) if blue else (g < i)).all()


def test_blue_pair_members_sit_on_one_side_of_the_deflector():
    _, params = _paint_one("blue_pair", n=16)
    angles = torch.atan2(params["member_y_arcsec"], params["member_x_arcsec"])
    spread = torch.remainder(angles - angles[:, :1] + math.pi, 2 * math.pi) - math.pi
    assert (spread.abs() <= math.radians(2 * LookalikeConfig().blue_pair_spread_deg) + 1e-5).all()


def test_saturated_stars_are_flat_at_the_level_with_a_vertical_bleed_trail():
    painted, params = _paint_one("saturated_star", n=3)
    level = params["saturation_level"]
    assert torch.isfinite(level).all()
    for stamp, lvl in zip(painted, level):
        for band, value in zip(stamp, lvl):
            flat = band == value
            rows, cols = torch.nonzero(flat, as_tuple=True)
            assert flat.sum() >= 5 and band.max() == value  # a clipped, flat top
            # The trail runs along columns: taller than wide.
            assert int(rows.max() - rows.min()) > int(cols.max() - cols.min())


def test_stars_and_blends_have_the_psf_shape_of_a_point_source():
    """A star's light is the drawn PSF: as compact as the seeing (nothing like an arc)."""
    _, params = _paint_one("star", n=6, star_offset_arcsec=(0.0, 0.0))
    light = params["light"][:, 1]
    peak_share = light.amax(dim=(-2, -1)) / light.sum(dim=(-2, -1))
    # A 1" Moffat on 0.26" pixels puts a few per cent of its flux in its peak pixel.
    assert ((peak_share > 0.01) & (peak_share < 0.15)).all()


# --------------------------------------------------------------------------------------------
# Drawn observing conditions


def _fwhm_pix(kernel: torch.Tensor) -> float:
    """FWHM (pixels) of a round kernel: where its central row falls to half, interpolated."""
    half = kernel.shape[-1] // 2
    row = kernel[half, half:].double()
    j = int(torch.nonzero(row < 0.5 * row[0])[0])
    return 2 * (j - 1 + float((row[j - 1] - 0.5 * row[0]) / (row[j - 1] - row[j])))


def test_drawn_psfs_sum_to_one_and_their_fwhm_is_the_drawn_seeing():
    n = 24
    meta = BandMeta.constant(n, BANDS, psf_fwhm_arcsec=1.2, pixel_scale_arcsec=0.1)
    config = ConditionsConfig(wing_fraction=0.0, psf_ellipticity=(0.0, 0.0))
    observed, kernels = draw_conditions(meta, config, 96, torch.Generator().manual_seed(4))
    torch.testing.assert_close(kernels.sum(dim=(-2, -1)), torch.ones(n, 3))
    ratio = observed.psf_fwhm_arcsec / meta.psf_fwhm_arcsec
    assert ratio.min() >= 0.8 - 1e-6 and ratio.max() <= 1.2 + 1e-6 and ratio.std() > 0.05
    for k, fwhm in zip(kernels.reshape(-1, *kernels.shape[-2:]), observed.psf_fwhm_arcsec.reshape(-1)):
        assert _fwhm_pix(k) == pytest.approx(float(fwhm) / 0.1, rel=0.02)
    # Both families appear, Moffat indices within the drawn range.
    beta = observed.psf_beta
    assert beta.isnan().any() and (~beta.isnan()).any()
    assert beta[~beta.isnan()].min() >= 2.0 and beta[~beta.isnan()].max() <= 6.0


def _far_light(kernels: torch.Tensor, radius_pix: float) -> float:
    """Mean share of the kernels' light beyond ``radius_pix`` of their centre."""
    half = kernels.shape[-1] // 2
    axis = torch.arange(-half, half + 1.0)
    far = torch.hypot(axis[None, :], axis[:, None]) > radius_pix
    return float(kernels[..., far].sum(dim=-1).mean())


def test_psf_wings_hold_their_share_of_light_far_from_the_core():
    n = 8
    meta = BandMeta.constant(n, BANDS, psf_fwhm_arcsec=1.0, pixel_scale_arcsec=0.2)
    plain = ConditionsConfig(wing_fraction=0.0, psf_beta=(4.0, 4.0), double_gaussian_fraction=0.0,
                             seeing_scatter=0.0, psf_ellipticity=(0.0, 0.0))
    winged = dataclasses.replace(plain, wing_fraction=1.0, wing_flux=(0.1, 0.1))
    _, core = draw_conditions(meta, plain, 64, torch.Generator().manual_seed(0))
    _, wing = draw_conditions(meta, winged, 64, torch.Generator().manual_seed(0))
    torch.testing.assert_close(wing.sum(dim=(-2, -1)), torch.ones(n, 3))
    # Beyond 2 FWHM a beta = 4 Moffat has ~1% of its light; a 10% wing puts several per cent there.
    assert _far_light(core, 10.0) < 0.015
    assert _far_light(wing, 10.0) > 0.04


def test_header_conditions_reproduce_the_header_moffat():
    meta = BandMeta.constant(3, BANDS, psf_fwhm_arcsec=1.0)
    observed, kernels = draw_conditions(meta, ConditionsConfig.header(), 64,
                                        torch.Generator().manual_seed(0))
    half = kernels.shape[-1] // 2
    reference = moffat_kernels(meta, half)
    # Equal but for the round taper of the outermost pixels (< 1% of the light).
    assert (kernels - reference).abs().sum(dim=(-2, -1)).max() < 0.02
    torch.testing.assert_close(observed.magzero, meta.magzero)


def test_zero_points_are_jittered_by_the_configured_scatter():
    meta = BandMeta.constant(2000, BANDS)
    observed, _ = draw_conditions(meta, ConditionsConfig(zero_point_scatter_mag=0.05), 16,
                                  torch.Generator().manual_seed(0))
    assert float((observed.magzero - meta.magzero).std()) == pytest.approx(0.05, rel=0.1)
