"""Hard-negative mining: the highest-scoring survey stamps, never a known lens, fed back as
negatives, the same after a resume (the end-to-end resume on Ray Train is in test_train.py)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from scanner.config import InputSpec
from scanner.normalise import normalise
from training.augment import AugmentConfig
from training.bands import BandMeta
from training.dataset import StampSet
from training.hard_negatives import HardNegativeMiner
from training.inject import InjectionConfig
from training.lookalikes import LookalikeConfig
from training.stream import KIND_HARD_NEGATIVE, LensTrainingStream, StreamConfig

SPEC = InputSpec(bands=("g", "r", "i"), stamp_size_pix=24, pixel_scale_arcsec=0.26)
S = SPEC.stamp_size_pix


class Brightness(nn.Module):
    """A 'model' whose lens logit is the mean central brightness: scores order by brightness."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        centre = x[:, :, S // 2 - 2:S // 2 + 2, S // 2 - 2:S // 2 + 2].mean(dim=(1, 2, 3))
        return torch.stack([torch.zeros_like(centre), centre], dim=1)


def _stamps(brightness: np.ndarray, objid_start: int) -> StampSet:
    """Raw stamps: sky noise plus a central source of the given brightness (in sky sigmas)."""
    rng = np.random.default_rng(objid_start)
    n = len(brightness)
    yy, xx = np.mgrid[:S, :S] - S // 2
    source = np.exp(-(xx**2 + yy**2) / (2 * 1.5**2))
    raw = rng.normal(0, 1, (n, 3, S, S)) + brightness[:, None, None, None] * source
    meta = BandMeta.constant(n, SPEC.bands, sky_sigma=1.0, gain=1e4)
    return StampSet(raw.astype(np.float32), meta,
                    pa.table({"objid": np.arange(objid_start, objid_start + n)}))


def _miner(known=(), pool_size=40, keep=5):
    unlabelled = _stamps(np.linspace(0, 30, 30), 1000)
    negatives = _stamps(np.linspace(0, 60, 20)[::-1].copy(), 2000)
    x = torch.from_numpy(normalise(unlabelled.stamps, SPEC))
    miner = HardNegativeMiner(x, unlabelled.rows["objid"].to_numpy(), negatives, SPEC, known,
                              pool_size=pool_size, keep=keep)
    return miner, negatives


def test_mining_keeps_the_highest_scoring_stamps_of_the_sample():
    miner, _ = _miner(pool_size=50, keep=5)  # every candidate scored
    chosen, scores = miner.mine(Brightness(), [0, 0, 1])
    _, objids = miner.stamps(chosen)
    # The brightest five: the negatives' 60, 57, ... (objids 2000-2004).
    assert sorted(objids.tolist()) == [2000, 2001, 2002, 2003, 2004]
    x, _ = miner.stamps(np.arange(len(miner)))
    all_scores = torch.softmax(Brightness()(x), dim=1)[:, 1].numpy()
    assert scores.min() >= np.sort(all_scores)[-5] - 1e-6


def test_known_lenses_are_never_mined():
    miner, _ = _miner(known=[2000, 2001, 1029], pool_size=50, keep=5)
    assert len(miner) == 47
    _, objids = miner.stamps(miner.mine(Brightness(), [0, 0, 1])[0])
    assert not {2000, 2001, 1029} & set(objids.tolist())
    assert sorted(objids.tolist()) == [2002, 2003, 2004, 2005, 2006]


def test_mining_a_sample_is_deterministic_by_seed():
    miner, _ = _miner(pool_size=12, keep=4)
    a, _ = miner.mine(Brightness(), [3, 1, 2])
    b, _ = miner.mine(Brightness(), [3, 1, 2])
    c, _ = miner.mine(Brightness(), [3, 1, 3])
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_a_resumed_stream_feeds_back_the_same_hard_negatives():
    """The checkpoint's keys, read by a fresh miner over the same pools, give the same stamps,
    and the stream's batches are the same as the uninterrupted run's."""
    miner, negatives = _miner(pool_size=30, keep=6)
    chosen, _ = miner.mine(Brightness(), [0, 0, 1])
    keys = miner.keys(chosen)
    resumed, _ = _miner(pool_size=30, keep=6)
    np.testing.assert_array_equal(resumed.from_keys(keys), chosen)

    cheap = {"supersample": 1, "max_draws": 1}
    config = StreamConfig(batch_size=16, positive_fraction=0.25, hard_negative_fraction=0.5,
                          injection=InjectionConfig(min_arc_snr=0.0, min_magnification=0.0, **cheap),
                          lookalikes=LookalikeConfig(min_snr=0.0, **cheap),
                          augment=AugmentConfig.none())
    batches = []
    for m, c in ((miner, chosen), (resumed, resumed.from_keys(keys))):
        stream = LensTrainingStream(negatives, negatives, SPEC, config)
        stream.use_hard_negatives(*m.stamps(c))
        batches.append(next(iter(stream.epoch(2))))
    first, second = batches
    assert torch.equal(first["x"], second["x"]) and torch.equal(first["objid"], second["objid"])
    hard = first["kind"] == KIND_HARD_NEGATIVE
    assert int(hard.sum()) == round(12 * 0.5)
    assert (first["label"][hard] == 0).all()
    assert set(first["objid"][hard].tolist()) <= set(miner.stamps(chosen)[1].tolist())


def test_a_stream_without_mined_stamps_draws_as_before():
    _, negatives = _miner()
    config = StreamConfig(batch_size=16, injection=InjectionConfig(supersample=1, max_draws=1),
                          lookalikes=LookalikeConfig(supersample=1, max_draws=1),
                          augment=AugmentConfig.none())
    batch = next(iter(LensTrainingStream(negatives, negatives, SPEC, config).epoch(0)))
    assert not (batch["kind"] == KIND_HARD_NEGATIVE).any()


@pytest.mark.parametrize("keep,pool", [(0, 10), (11, 10)])
def test_bad_mining_settings_are_refused(keep, pool):
    from training.config import TrainConfig

    with pytest.raises(ValueError, match="hard_negative_keep"):
        TrainConfig(data="d", out="o", hard_negative_keep=keep, hard_negative_pool_size=pool)
    with pytest.raises(ValueError, match="hard_negative_start_epoch"):
        TrainConfig(data="d", out="o", hard_negative_start_epoch=1)
