"""The labelled training stream: fresh lenses every epoch, normalised like the scan, augmented.

Each batch mixes positives (deflector stamps with a lens injected now, on the accelerator; with
a GAN, a ``gan_fraction`` share of generated lens stamps; with known lenses, the dataset's or
graded A/B in a report, a ``known_lens_fraction`` share of those), look-alike negatives
(deflector stamps with unlensed structure painted in, at ``lookalike_rate``), mined hard
negatives (survey stamps the model currently scores highest, ``training.hard_negatives``, a
``hard_negative_fraction`` share once the training loop has mined some) and plain negatives (the
dataset's ``deflector`` and ``non_lens`` stamps as they are). Raw stamps are injected first and
only then normalised by ``scanner.normalise.normalise`` (the scan's function: a host round trip,
as it is numpy), then augmented on the device. The generator is seeded from
(seed, epoch), so every epoch sees new lenses and any epoch can be replayed exactly.

Example
-------
>>> stream = LensTrainingStream(deflectors, negatives, spec, StreamConfig())  # doctest: +SKIP
>>> for batch in stream.epoch(0):                                            # doctest: +SKIP
...     loss = criterion(model(batch["x"]), batch["label"])
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from scanner.config import InputSpec
from scanner.normalise import normalise
from training.augment import AugmentConfig, augment
from training.bands import BandMeta
from training.dataset import StampSet
from training.inject import InjectionConfig, inject_lenses
from training.lookalikes import LookalikeConfig, paint_lookalikes

logger = logging.getLogger(__name__)

#: What each stamp of a batch is, in ``batch["kind"]``.
KIND_NEGATIVE, KIND_LENS, KIND_LOOKALIKE, KIND_GENERATED, KIND_KNOWN, KIND_HARD_NEGATIVE = range(6)
POSITIVE_KINDS = (KIND_LENS, KIND_GENERATED, KIND_KNOWN)

#: Draws ``n`` normalised lens stamps on the stream's device from a torch Generator
#: (:meth:`training.gan.GeneratedLenses.sample`).
Sampler = Callable[[int, torch.Generator], torch.Tensor]


@dataclass(frozen=True)
class StreamConfig:
    """How batches are composed.

    Parameters
    ----------
    batch_size : int
        Stamps per batch (before lenses that fail the cuts are dropped).
    positive_fraction : float
        Share of each batch that gets an injected lens; balanced classes by default.
    lookalike_rate : float
        Share of each batch's negatives (other than mined ones) that are look-alikes (0 switches
        them off); 0.45 makes them nearly half, so the many look-alike kinds are each seen often.
    hard_negative_fraction : float
        Share of each batch's negatives taken from the mined hard negatives, once the training
        loop has mined some (``TrainConfig.hard_negative_start_epoch``); 0 switches mining off.
    gan_fraction : float
        Share of each batch's positives drawn from a GAN instead of injected (used only when the
        stream is given a sampler; the papers' strongest recipe mixes both).
    known_lens_fraction : float
        Share of each batch's positives drawn (with replacement, then augmented) from known
        lenses, when the stream has any: few and precious, so they are shown every step.
    seed : int
        With the epoch number, seeds every draw.
    injection, lookalikes, augment
        The injection, look-alike and augmentation configs.
    """

    batch_size: int = 256
    positive_fraction: float = 0.5
    lookalike_rate: float = 0.45
    hard_negative_fraction: float = 0.25
    gan_fraction: float = 0.0
    known_lens_fraction: float = 0.25
    seed: int = 0
    injection: InjectionConfig = field(default_factory=InjectionConfig)
    lookalikes: LookalikeConfig = field(default_factory=LookalikeConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.batch_size < 2:
            raise ValueError(f"StreamConfig.batch_size={self.batch_size}: expected >= 2")
        if not 0 < self.positive_fraction < 1 or not 0 <= self.lookalike_rate <= 1 \
                or not 0 <= self.hard_negative_fraction < 1:
            raise ValueError("StreamConfig: positive_fraction must be in (0, 1), lookalike_rate "
                             "in [0, 1], hard_negative_fraction in [0, 1)")
        if not 0 <= self.gan_fraction < 1 or not 0 <= self.known_lens_fraction < 1 or \
                self.gan_fraction + self.known_lens_fraction >= 1:
            raise ValueError(f"StreamConfig: gan_fraction={self.gan_fraction} and "
                             f"known_lens_fraction={self.known_lens_fraction} must each be in "
                             f"[0, 1) and sum below 1 (some positives must stay injected)")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name in ("injection", "lookalikes", "augment"):
            d[name] = d[name].to_dict()
        return d


class LensTrainingStream:
    """Epochs of labelled batches built from a deflector pool and a negative pool.

    An epoch visits every deflector once as a positive (in a fresh order); negatives and
    look-alike hosts are drawn at random. Batches are dicts of ``x`` (N, C, S, S) normalised and
    augmented, ``label`` (N,) 1 for a lens, ``kind`` (N,) (:data:`KIND_NEGATIVE`, ...), and
    ``objid`` (N,) of the host stamp (-1 for a generated stamp).

    ``generated`` (a :data:`Sampler`, e.g. a GAN's) replaces ``config.gan_fraction`` of each
    batch's positives; its stamps are already normalised and are augmented with the rest.
    ``known_lenses`` (raw stamps of real or graded lenses) replace ``config.known_lens_fraction``.
    Mined hard negatives (:meth:`use_hard_negatives`; normalised, as scored) replace
    ``config.hard_negative_fraction`` of the negatives.
    """

    def __init__(self, deflectors: StampSet, negatives: StampSet, spec: InputSpec,
                 config: StreamConfig, device: torch.device | str = "cpu",
                 generated: Sampler | None = None, known_lenses: StampSet | None = None) -> None:
        if len(deflectors) == 0:
            raise ValueError("the deflector pool is empty: no stamps to inject lenses into; loosen "
                             "the deflector cuts or give a larger survey")
        if len(negatives) == 0:
            raise ValueError("the negative pool is empty; give non-lens stamps")
        for name, pool in (("deflectors", deflectors), ("negatives", negatives)):
            if pool.meta.bands != tuple(spec.bands) or pool.stamps.shape[-1] != spec.stamp_size_pix:
                raise ValueError(f"{name} are {pool.meta.bands} stamps of {pool.stamps.shape[-1]} "
                                 f"px; the input spec wants {spec.bands} at {spec.stamp_size_pix} px")
        self.deflectors, self.negatives = deflectors, negatives
        self.spec, self.config = spec, config
        self.device = torch.device(device)
        self._deflector_ids = deflectors.rows["objid"].to_numpy()
        self._negative_ids = negatives.rows["objid"].to_numpy()
        self.generated = generated
        self.known = known_lenses if known_lenses is not None and len(known_lenses) else None
        self._known_ids = None if self.known is None else self.known.rows["objid"].to_numpy()
        n_positive = max(1, round(config.batch_size * config.positive_fraction))
        self.n_generated = round(n_positive * config.gan_fraction) if generated is not None else 0
        self.n_known = (round(n_positive * config.known_lens_fraction) if self.known is not None
                        else 0)
        self.n_injected = max(1, n_positive - self.n_generated - self.n_known)
        self.n_positive = self.n_injected + self.n_generated + self.n_known
        self.hard_x: torch.Tensor | None = None
        self.hard_ids = np.zeros(0, np.int64)

    def use_hard_negatives(self, x: torch.Tensor, objids: np.ndarray) -> None:
        """Take ``config.hard_negative_fraction`` of later batches' negatives from these normalised
        stamps (K, C, S, S), drawn with replacement; none (K = 0) stops."""
        self.hard_x = x.to(self.device) if len(x) else None
        self.hard_ids = np.asarray(objids, np.int64)

    def __len__(self) -> int:
        return math.ceil(len(self.deflectors) / self.n_injected)

    def _raw(self, pool: StampSet, index: np.ndarray) -> tuple[torch.Tensor, BandMeta]:
        stamps = torch.from_numpy(pool.stamps[index]).to(self.device)
        return stamps, pool.meta[torch.from_numpy(index)].to(self.device)

    def epoch(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """The batches of one epoch; the same (seed, epoch) gives the same batches."""
        c = self.config
        rng = np.random.default_rng([c.seed, epoch])
        generator = torch.Generator(device=self.device)
        generator.manual_seed(int(rng.integers(2**62)))
        order = rng.permutation(len(self.deflectors))
        n_negative = c.batch_size - self.n_positive
        n_hard = 0 if self.hard_x is None else round(n_negative * c.hard_negative_fraction)
        for start in range(0, len(order), self.n_injected):
            positive = order[start:start + self.n_injected]
            n_look = int(rng.binomial(n_negative - n_hard, c.lookalike_rate))
            hosts = rng.integers(0, len(self.deflectors), n_look)
            plain = rng.integers(0, len(self.negatives), n_negative - n_hard - n_look)
            hard = rng.integers(0, len(self.hard_ids), n_hard) if n_hard else None
            parts, kinds, ids = [], [], []
            raw, meta = self._raw(self.deflectors, positive)
            lensed, params = inject_lenses(raw, meta, c.injection, generator)
            ok = params["passed_cuts"].cpu().numpy()
            parts.append(lensed[params["passed_cuts"]])
            kinds.append(np.full(int(ok.sum()), KIND_LENS))
            ids.append(self._deflector_ids[positive[ok]])
            if self.n_known:
                known = rng.integers(0, len(self.known), self.n_known)
                parts.append(self._raw(self.known, known)[0])
                kinds.append(np.full(self.n_known, KIND_KNOWN))
                ids.append(self._known_ids[known])
            if n_look:
                raw, meta = self._raw(self.deflectors, hosts)
                painted, _ = paint_lookalikes(raw, meta, c.lookalikes, generator)
                parts.append(painted)
                kinds.append(np.full(n_look, KIND_LOOKALIKE))
                ids.append(self._deflector_ids[hosts])
            if len(plain):
                parts.append(self._raw(self.negatives, plain)[0])
                kinds.append(np.full(len(plain), KIND_NEGATIVE))
                ids.append(self._negative_ids[plain])
            raw_batch = torch.cat(parts).cpu().numpy()
            x = torch.from_numpy(normalise(raw_batch, self.spec)).to(self.device)
            if hard is not None:
                x = torch.cat([x, self.hard_x[torch.from_numpy(hard).to(self.device)]])
                kinds.append(np.full(n_hard, KIND_HARD_NEGATIVE))
                ids.append(self.hard_ids[hard])
            if self.n_generated:
                x = torch.cat([x, self.generated(self.n_generated, generator).to(self.device)])
                kinds.append(np.full(self.n_generated, KIND_GENERATED))
                ids.append(np.full(self.n_generated, -1, np.int64))
            kind = torch.from_numpy(np.concatenate(kinds)).to(self.device)
            label = torch.isin(kind, torch.tensor(POSITIVE_KINDS, device=kind.device)).long()
            yield {"x": augment(x, c.augment, generator), "label": label,
                   "kind": kind, "objid": torch.from_numpy(np.concatenate(ids))}
