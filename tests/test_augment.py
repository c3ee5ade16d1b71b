"""Augmentations: switchable, per-stamp, batched, deterministic by seed, content-preserving."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from training.augment import (AugmentConfig, augment, random_channel_shuffle, random_flip,
                              random_rot90, random_translate)

N, C, S = 32, 3, 24


def _stamps(seed: int = 0) -> torch.Tensor:
    return torch.randn(N, C, S, S, generator=torch.Generator().manual_seed(seed))


def _only(op: str, **kw) -> AugmentConfig:
    """A config with every op off but ``op``."""
    return dataclasses.replace(AugmentConfig.none(), **{op: True}, **kw)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_everything_off_returns_an_equal_copy():
    x = _stamps()
    out = augment(x, AugmentConfig.none(), _gen())
    assert torch.equal(out, x) and out is not x


def test_same_seed_same_augmentation_other_seed_other():
    x = _stamps()
    config = AugmentConfig.original()
    a, b, c = augment(x, config, _gen(1)), augment(x, config, _gen(1)), augment(x, config, _gen(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_input_is_never_modified():
    x = _stamps()
    before = x.clone()
    augment(x, AugmentConfig.original(), _gen())
    assert torch.equal(x, before)


@pytest.mark.parametrize("op", ["rot90", "flip"])
def test_rotations_and_flips_move_pixels_without_changing_them(op):
    x = _stamps()
    out = augment(x, _only(op), _gen())
    assert torch.equal(out.flatten(1).sort(dim=1).values, x.flatten(1).sort(dim=1).values)


def test_each_stamp_draws_its_own_rotation():
    """One image repeated N times comes back in all four orientations: draws are per stamp."""
    x = _stamps()[:1].expand(N, C, S, S).clone()
    out = random_rot90(x, _gen())
    turns = {k for k in range(4) for i in range(N) if torch.equal(out[i], torch.rot90(x[0], k, (1, 2)))}
    assert turns == {0, 1, 2, 3}


def test_flips_are_per_stamp_and_exact():
    x = _stamps()[:1].expand(N, C, S, S).clone()
    out = random_flip(x, _gen())
    options = [x[0], x[0].flip(-1), x[0].flip(-2), x[0].flip(-1).flip(-2)]
    seen = {next(j for j, o in enumerate(options) if torch.equal(out[i], o)) for i in range(N)}
    assert seen == {0, 1, 2, 3}


def test_translation_shifts_a_point_by_at_most_the_maximum():
    x = torch.zeros(N, 1, S, S)
    x[:, 0, S // 2, S // 2] = 1.0
    out = random_translate(x, 3, _gen())
    assert torch.equal(out.sum(dim=(1, 2, 3)), torch.ones(N))
    pos = out[:, 0].flatten(1).argmax(dim=1)
    dy, dx = pos // S - S // 2, pos % S - S // 2
    assert dy.abs().max() <= 3 and dx.abs().max() <= 3 and len(set(zip(dy.tolist(), dx.tolist()))) > 5


def test_channel_shuffle_permutes_each_stamps_bands():
    x = torch.arange(C, dtype=torch.float32)[None, :, None, None].expand(N, C, S, S).clone()
    out = random_channel_shuffle(x, _gen())
    orders = {tuple(int(v) for v in out[i, :, 0, 0]) for i in range(N)}
    assert all(sorted(o) == list(range(C)) for o in orders) and len(orders) > 1


def test_gamma_keeps_each_stamps_range_and_is_centred_on_identity():
    x = _stamps()
    out = augment(x, _only("gamma"), _gen())
    torch.testing.assert_close(out.amin(dim=(1, 2, 3)), x.amin(dim=(1, 2, 3)))
    torch.testing.assert_close(out.amax(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3)))
    torch.testing.assert_close(augment(x, _only("gamma", gamma_max=1.0), _gen()), x)


def test_blur_conserves_flux_and_noise_adds_bounded_noise():
    x = torch.zeros(N, C, S, S)
    x[:, :, S // 2, S // 2] = 1.0
    blurred = augment(x, _only("blur", blur_sigma_pix=(0.5, 1.0)), _gen())
    torch.testing.assert_close(blurred.sum(dim=(2, 3)), torch.ones(N, C))
    assert (blurred[:, :, S // 2, S // 2] < 1).all()
    noisy = augment(torch.zeros(N, C, 64, 64), _only("noise", noise_sigma=(0.1, 0.2)), _gen())
    std = noisy.std(dim=(1, 2, 3))
    assert (std > 0.08).all() and (std < 0.22).all()


def test_colour_jitter_changes_colours_per_stamp():
    x = _stamps()
    for op in ("brightness", "saturation", "hue"):
        out = augment(x, _only(op), _gen())
        assert not torch.equal(out, x)
        assert len({round(float(v), 4) for v in (out - x).abs().mean(dim=(1, 2, 3))}) > N // 2


def test_hue_needs_three_bands():
    with pytest.raises(ValueError, match="hue needs 3 bands"):
        augment(torch.zeros(2, 4, S, S), _only("hue"), _gen())


def test_bad_config_is_refused_with_the_parameter_named():
    with pytest.raises(ValueError, match="gamma_max"):
        AugmentConfig(gamma_max=0.5)
    with pytest.raises(ValueError, match="noise_sigma"):
        AugmentConfig(noise_sigma=(0.3, 0.1))


def test_default_keeps_colour_and_the_original_set_switches_it_on():
    default, original = AugmentConfig(), AugmentConfig.original()
    assert not default.channel_shuffle and not default.hue
    assert original.channel_shuffle and original.hue and original.gamma and original.rot90


def test_correlated_noise_has_the_drawn_pixel_variance_and_correlates_neighbours():
    zeros = torch.zeros(64, C, 48, 48)
    out = augment(zeros, _only("correlated_noise", correlated_noise_sigma=(0.3, 0.3)), _gen(1))
    assert float(out.std()) == pytest.approx(0.3, rel=0.03)
    # Edge pixels as noisy as central ones: the noise is not thinned by padding.
    assert float(out[..., 0, :].std()) == pytest.approx(0.3, rel=0.08)
    neighbours = float((out[..., :, 1:] * out[..., :, :-1]).mean() / out.var())
    assert neighbours > 0.3
    white = augment(zeros, _only("noise", noise_sigma=(0.3, 0.3)), _gen(1))
    assert abs(float((white[..., :, 1:] * white[..., :, :-1]).mean() / white.var())) < 0.03


def test_correlated_noise_level_scatters_per_stamp_and_band():
    out = augment(torch.zeros(N, C, 32, 32), _only("correlated_noise"), _gen(2))
    sigma = out.std(dim=(-2, -1))
    assert sigma.max() <= 0.2 * 1.15 and float(sigma.std()) > 0.02


def test_pixel_scale_jitter_resizes_a_source_by_at_most_the_jitter():
    yy, xx = torch.meshgrid(torch.arange(S) - S // 2.0, torch.arange(S) - S // 2.0, indexing="ij")
    source = torch.exp(-(xx**2 + yy**2) / (2 * 3.0**2)).expand(N, C, S, S)
    out = augment(source, _only("pixel_scale", pixel_scale_jitter=0.05), _gen(3))

    def size(x):
        w = x.clamp(min=0)
        return torch.sqrt((w * (xx**2 + yy**2)).sum(dim=(-2, -1)) / w.sum(dim=(-2, -1)))

    ratio = size(out) / size(source)
    assert (ratio > 0.93).all() and (ratio < 1.07).all() and float(ratio.std()) > 0.005
    # No jitter: the resampling is the identity.
    same = augment(source, _only("pixel_scale", pixel_scale_jitter=0.0), _gen(3))
    torch.testing.assert_close(same, source)


def test_sky_offset_shifts_each_band_by_a_constant():
    x = _stamps()
    out = augment(x, _only("sky_offset", sky_offset_sigma=0.05), _gen(4))
    shift = out - x
    torch.testing.assert_close(shift, shift[..., :1, :1].expand_as(shift))
    assert float(shift[..., 0, 0].std()) == pytest.approx(0.05, rel=0.3)
