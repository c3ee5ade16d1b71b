"""Hard-negative mining: the survey stamps the model currently scores highest, fed back as negatives.

The large lens searches found that look-alikes they had not thought of only show up once a model
scans the survey: its top-ranked objects are mostly not lenses (rings, spirals, stars, artefacts),
and teaching those as negatives is what makes the ranking clean. Each epoch, after a warm-up,
every training worker scores a random sample of its share of the dataset's ``unlabelled`` pool
and of its negatives (``non_lens`` and un-injected ``deflector`` stamps) with the current model,
keeps the highest-scoring ones, and the next epoch's batches (``training.stream``) take a share of
their negatives from them. Known lenses (the ``known_lens`` pool, graded A/B lenses) are never
candidates. Lenses are rare (~1 in 10^3-10^4 galaxies), so an unknown real lens among the mined
stamps is rare label noise, the price every search that mines this way pays.

The mined set is recorded by stamp (pool and ``objid``) in each checkpoint, so a resumed run
feeds back exactly what the uninterrupted run would have, whatever its number of workers.

Example
-------
>>> miner = HardNegativeMiner(unlabelled_x, unlabelled_ids, negatives, spec,
...                           known_lens_objids, pool_size=1024, keep=128)   # doctest: +SKIP
>>> chosen, scores = miner.mine(net, [seed, rank, epoch])                     # doctest: +SKIP
>>> x, objids = miner.stamps(chosen)                                          # doctest: +SKIP
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from torch import nn

from scanner.config import InputSpec
from scanner.normalise import normalise
from training.dataset import StampSet
from training.evaluate import score_stamps

#: Candidate pools, in the order of their codes in a mined set's keys.
MINED_POOLS = ("unlabelled", "negative")


class HardNegativeMiner:
    """One worker's mining candidates: its unlabelled stamps and its negatives, less known lenses.

    Parameters
    ----------
    unlabelled : (U, C, S, S) tensor or None
        The worker's unlabelled stamps, normalised (as the semi-supervised methods hold them).
    unlabelled_objids : (U,) array
        Their ``objid``.
    negatives : StampSet
        The worker's raw negative stamps (the stream's), normalised when sampled.
    spec : InputSpec
        Their normalisation.
    known_lens_objids : sequence of int
        Every known lens of the run (all workers'): never a candidate.
    pool_size : int
        Candidates scored per mining, drawn at random without replacement.
    keep : int
        The highest-scoring this many are kept.
    """

    def __init__(self, unlabelled: torch.Tensor | None, unlabelled_objids: np.ndarray,
                 negatives: StampSet, spec: InputSpec, known_lens_objids: Sequence[int],
                 pool_size: int, keep: int) -> None:
        self.unlabelled = unlabelled
        self.negatives, self.spec = negatives, spec
        self.pool_size, self.keep = pool_size, keep
        n_unlabelled = 0 if unlabelled is None else len(unlabelled)
        negative_ids = negatives.rows["objid"].to_numpy()
        self.pool = np.concatenate([np.zeros(n_unlabelled, np.int64),
                                    np.ones(len(negative_ids), np.int64)])
        self.objid = np.concatenate([np.asarray(unlabelled_objids, np.int64)[:n_unlabelled],
                                     negative_ids.astype(np.int64)])
        self.n_unlabelled = n_unlabelled
        known = np.asarray(list(known_lens_objids), np.int64)
        self.eligible = np.flatnonzero(~np.isin(self.objid, known))

    def __len__(self) -> int:
        """Stamps that may be mined."""
        return len(self.eligible)

    def stamps(self, chosen: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        """Normalised stamps (K, C, S, S) and ``objid`` (K,) of candidates ``chosen`` (indices)."""
        chosen = np.asarray(chosen, np.int64)
        from_unlabelled = chosen[chosen < self.n_unlabelled]
        from_negatives = chosen[chosen >= self.n_unlabelled] - self.n_unlabelled
        parts = []
        if len(from_unlabelled):
            parts.append(self.unlabelled[torch.from_numpy(from_unlabelled)])
        if len(from_negatives):
            raw = self.negatives.stamps[from_negatives]
            parts.append(torch.from_numpy(normalise(raw, self.spec)))
        size = self.spec.stamp_size_pix
        x = torch.cat(parts) if parts else torch.zeros(0, self.spec.n_channels, size, size)
        # Unlabelled first, then negatives: the order of ``chosen``, which is sorted.
        return x, self.objid[np.concatenate([from_unlabelled, from_negatives + self.n_unlabelled])]

    def mine(self, model: nn.Module, seed: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Score a random sample with ``model``; return the kept candidates (sorted) and scores.

        ``seed`` (e.g. ``[version seed, rank, epoch]``) picks the sample; ties in score go to the
        earlier candidate, so the choice is a function of the seed and the weights alone.
        """
        if len(self.eligible) == 0:
            return np.zeros(0, np.int64), np.zeros(0, np.float32)
        rng = np.random.default_rng([*seed, 0x4D494E45])
        sample = np.sort(rng.choice(self.eligible, size=min(self.pool_size, len(self.eligible)),
                                    replace=False))
        x, _ = self.stamps(sample)
        scores = score_stamps(model, x.numpy())
        top = np.argsort(-scores, kind="stable")[:self.keep]
        order = np.argsort(sample[top])
        return sample[top][order], scores[top][order]

    def keys(self, chosen: np.ndarray) -> list[list[int]]:
        """``[pool code, objid]`` of each chosen candidate: what a checkpoint records."""
        return [[int(self.pool[i]), int(self.objid[i])] for i in chosen]

    def from_keys(self, keys: Sequence[Sequence[int]]) -> np.ndarray:
        """The candidates (sorted indices) that ``keys`` name; keys of other workers' stamps are
        not in this worker's pools and are skipped."""
        if not len(keys):
            return np.zeros(0, np.int64)
        wanted = np.asarray(keys, np.int64).reshape(-1, 2)
        mine = self.pool[self.eligible] * (1 << 62) + self.objid[self.eligible]
        return self.eligible[np.isin(mine, wanted[:, 0] * (1 << 62) + wanted[:, 1])]


__all__ = ["MINED_POOLS", "HardNegativeMiner"]
