"""A WGAN-GP generator of lens stamps: extra positives for training, made from injected lenses.

The Deep Lens Survey work added GAN-generated lens images to its simulated positives. This is the
original recipe (Gulrajani et al. 2017, "Improved Training of Wasserstein GANs", the 64x64 ResNet
of its ``gan_64x64.py``): a residual upsampling generator from ``z`` (128 normal deviates) and a
residual critic without normalisation, trained with the Wasserstein loss and a gradient penalty
(lambda 10), Adam (lr 1e-4, betas (0, 0.9)), five critic steps per generator step.

The generator works in the *normalised* stamp space, the one ``scanner.normalise.normalise``
produces and the classifiers read (sky 0, noise ~ 1/3, asinh-stretched cores), so its samples can be
mixed into a training batch as they are. Its output is ``output_scale * tanh(h)``: bounded, and
``output_scale`` is measured on the training data (the largest |value| of freshly injected lenses,
times a margin) and stored in ``gan.json``.

Training runs under Ray Train (:func:`train_gan`): each worker streams fresh injected lenses from
the dataset's deflector pool with :class:`training.stream.LensTrainingStream` (so a real positive is
exactly what a classifier sees), reports metrics every ``report_every`` steps and checkpoints to
safetensors + JSON. The export is ``<out>/generator.safetensors`` and ``<out>/gan.json``
(architecture, input spec, output scale, training config, data provenance, quality metrics and the
weights' sha256). :class:`GeneratedLenses` loads an export and draws stamps reproducibly by seed.

Example
-------
>>> run = train_gan(GanConfig(steps=20_000), "demo-set", "gan-out")   # doctest: +SKIP
>>> lenses = GeneratedLenses("gan-out")                                 # doctest: +SKIP
>>> x = lenses.sample(64, torch.Generator().manual_seed(0))             # doctest: +SKIP
>>> x.shape                                                             # doctest: +SKIP
torch.Size([64, 3, 64, 64])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

from scanner import storage
from scanner.config import InputSpec
from scanner.registry import (PICKLE_SUFFIXES, RegistryError, _check_state_dict, _fsync_write,
                              _json_default, _lensscan_version, _sha256)
from training.augment import AugmentConfig
from training.checkpoint import optimizer_from_tensors, optimizer_to_tensors
from training.dataset import DatasetError, StampSet, open_dataset, read_pool
from training.inject import InjectionConfig
from training.stream import LensTrainingStream, StreamConfig

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
ARCHITECTURE = "wgan_gp_resnet"
WEIGHTS_FILE = "generator.safetensors"
META_FILE = "gan.json"
CRITIC_FILE = "critic.safetensors"
CHECKPOINT_STATE = "state.json"
RUN_NAME = "checkpoints"
REQUIRED_FIELDS = ("format_version", "architecture", "input_spec", "content_hash")

#: Augmentations of the real lenses the GAN learns from: only the sky's symmetries (a lens rotated
#: or mirrored is as likely as the original), which add variety without moving the distribution
#: away from the injected lenses the quality check compares against.
SYMMETRIES = dataclasses.replace(AugmentConfig.none(), rot90=True, flip=True)


class GanError(RegistryError):
    """A GAN export or training run that cannot be written or loaded; the message says what to do."""


@dataclass(frozen=True)
class GanConfig:
    """How the GAN is built and trained; written into ``gan.json``.

    Defaults are the original's (``gan_64x64.py`` of Gulrajani et al. 2017) except where noted.

    Parameters
    ----------
    z_dim : int
        Length of the generator's normal input vector (128).
    width : int
        Channels of the highest-resolution layers; lower resolutions have up to 8x more (64).
    lambda_gp : float
        Weight of the gradient penalty (10).
    lr, betas : float, (float, float)
        Adam learning rate and betas of both networks (1e-4, (0, 0.9)).
    n_critic : int
        Critic steps per generator step (5).
    batch_size : int
        Real and generated stamps per step, per worker (64).
    steps : int
        Generator steps (200,000 in the original).
    time_limit_s : float, optional
        Stop earlier, with an export, once a worker has run this long (a budget, not a recipe).
    output_margin : float
        ``output_scale`` is this times the largest |value| of ``scale_sample_stamps`` injected
        lenses, so the tanh need not saturate to reach the brightest cores.
    scale_sample_stamps : int
        Injected lenses drawn to measure ``output_scale``.
    report_every, checkpoint_every : int
        Generator steps between metric reports and between checkpoints (also one at the end).
    num_workers, use_gpu, cpus_per_worker : int, bool, int
        Ray Train scaling: data-parallel workers (gradients are averaged), a GPU each or not, CPUs
        each.
    seed : int
        Seeds the networks' initialisation, the lenses and the noise: one seed, one run.
    injection : InjectionConfig
        The simulated lens population the real positives are drawn from.
    """

    z_dim: int = 128
    width: int = 64
    lambda_gp: float = 10.0
    lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.9)
    n_critic: int = 5
    batch_size: int = 64
    steps: int = 200_000
    time_limit_s: float | None = None
    output_margin: float = 1.1
    scale_sample_stamps: int = 1024
    report_every: int = 100
    checkpoint_every: int = 1000
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: int = 1
    seed: int = 0
    injection: InjectionConfig = field(default_factory=InjectionConfig)

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        positive = ("z_dim", "width", "n_critic", "batch_size", "steps", "scale_sample_stamps",
                    "report_every", "checkpoint_every", "num_workers", "cpus_per_worker")
        bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"GanConfig: {', '.join(bad)}: expected >= 1")
        if self.lr <= 0 or self.lambda_gp < 0 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"GanConfig: lr={self.lr} must be > 0, lambda_gp={self.lambda_gp} "
                             f">= 0, betas={self.betas} in [0, 1)")
        if self.output_margin < 1:
            raise ValueError(f"GanConfig.output_margin={self.output_margin}: expected >= 1")
        if self.time_limit_s is not None and self.time_limit_s <= 0:
            raise ValueError(f"GanConfig.time_limit_s={self.time_limit_s}: expected > 0 or None")

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["betas"] = list(self.betas)
        d["injection"] = self.injection.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GanConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GanConfig fields {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if "injection" in d:
            d["injection"] = InjectionConfig.from_dict(d["injection"])
        return cls(**d)


# --------------------------------------------------------------------------------------------
# Networks


def _levels(stamp_size_pix: int) -> int:
    """Resolution doublings from 4x4 to the smallest power-of-two multiple of 4 >= the stamp."""
    return max(1, math.ceil(math.log2(stamp_size_pix / 4)))


class UpBlock(nn.Module):
    """Pre-activation residual block that doubles the resolution (BN-ReLU-up-conv, BN-ReLU-conv).

    The shortcut is nearest-neighbour upsampling and a 1x1 convolution, as in the original.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(torch.relu(self.bn1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(torch.relu(self.bn2(self.conv1(up))))
        return self.shortcut(F.interpolate(x, scale_factor=2, mode="nearest")) + h


class DownBlock(nn.Module):
    """Pre-activation residual block that halves the resolution (ReLU-conv, ReLU-conv-meanpool).

    No normalisation: the gradient penalty is per sample, and batch norm would couple the samples.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, 3, padding=1)
        self.conv2 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.conv1(torch.relu(x))))
        return self.shortcut(F.avg_pool2d(x, 2)) + F.avg_pool2d(h, 2)


class Generator(nn.Module):
    """Residual upsampling generator: ``z`` (N, z_dim) to normalised stamps (N, C, S, S).

    A linear layer makes a 4x4 map of ``8 width`` channels; each :class:`UpBlock` doubles the
    resolution (channels halving down to ``width``) up to the smallest power-of-two multiple of 4
    that covers the stamp, which is then centre-cropped to ``S``. A final BN-ReLU-conv3x3 gives the
    bands, and ``output_scale * tanh`` bounds them to the range measured on real stamps.

    Parameters
    ----------
    channels, stamp_size_pix
        Bands and stamp side of the input spec.
    output_scale
        Largest |value| the generator can produce (normalised units).
    z_dim, width
        Latent size and the width of the last block.
    """

    def __init__(self, channels: int, stamp_size_pix: int, output_scale: float, z_dim: int = 128,
                 width: int = 64) -> None:
        super().__init__()
        if output_scale <= 0 or not math.isfinite(output_scale):
            raise ValueError(f"Generator output_scale={output_scale}: expected a finite value > 0")
        self.channels, self.stamp_size_pix = channels, stamp_size_pix
        self.output_scale, self.z_dim, self.width = float(output_scale), z_dim, width
        n_up = _levels(stamp_size_pix)
        widths = [width * min(8, 2 ** (n_up - k)) for k in range(n_up + 1)]
        self._base_channels = widths[0]
        self.linear = nn.Linear(z_dim, widths[0] * 16)
        self.blocks = nn.Sequential(*[UpBlock(widths[k], widths[k + 1]) for k in range(n_up)])
        self.out_bn = nn.BatchNorm2d(widths[-1])
        self.out_conv = nn.Conv2d(widths[-1], channels, 3, padding=1)
        self._crop = (4 * 2**n_up - stamp_size_pix) // 2

    def params(self) -> dict[str, Any]:
        """The constructor's arguments: what ``gan.json`` rebuilds the network from."""
        return {"channels": self.channels, "stamp_size_pix": self.stamp_size_pix,
                "output_scale": self.output_scale, "z_dim": self.z_dim, "width": self.width}

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.linear(z).view(len(z), self._base_channels, 4, 4)
        h = self.out_conv(torch.relu(self.out_bn(self.blocks(h))))
        s, c = self.stamp_size_pix, self._crop
        return self.output_scale * torch.tanh(h[:, :, c:c + s, c:c + s])


class Critic(nn.Module):
    """Residual critic: stamps (N, C, S, S) to one unbounded score each, shape (N,).

    A 3x3 convolution to ``width`` channels, :class:`DownBlock` s halving the resolution (channels
    doubling up to ``8 width``) to about 4x4, then a linear layer on the flattened map.
    """

    def __init__(self, channels: int, stamp_size_pix: int, width: int = 64) -> None:
        super().__init__()
        n_down = _levels(stamp_size_pix)
        widths = [width * min(8, 2**k) for k in range(n_down + 1)]
        self.stem = nn.Conv2d(channels, widths[0], 3, padding=1)
        self.blocks = nn.Sequential(*[DownBlock(widths[k], widths[k + 1]) for k in range(n_down)])
        side = stamp_size_pix
        for _ in range(n_down):
            side //= 2
        self.linear = nn.Linear(widths[-1] * side * side, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.blocks(self.stem(x)).flatten(1)).squeeze(1)


# --------------------------------------------------------------------------------------------
# The training step, as plain functions


def all_reduce_gradients(module: nn.Module) -> None:
    """Average ``module``'s gradients over the data-parallel workers (nothing on a single one).

    Gradients are averaged by hand rather than through ``DistributedDataParallel``, which does
    not support the double backward of the gradient penalty.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    world = torch.distributed.get_world_size()
    if world == 1:
        return
    for p in module.parameters():
        if p.grad is not None:
            torch.distributed.all_reduce(p.grad)
            p.grad.div_(world)


def gradient_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     rng: torch.Generator | None = None) -> torch.Tensor:
    """Return the WGAN-GP penalty: mean of (|grad critic| - 1)^2 at random real-fake mixtures.

    The critic's gradient norm is pushed to 1 on straight lines between real and generated
    stamps, a soft version of the 1-Lipschitz constraint the Wasserstein distance needs. The
    graph is kept (``create_graph``) so the penalty itself can be minimised.
    """
    eps = torch.rand(len(real), 1, 1, 1, generator=rng, device=real.device, dtype=real.dtype)
    mixed = (eps * real + (1 - eps) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    # The epsilon keeps the norm's gradient finite where a gradient vanishes exactly.
    norm = (grad.flatten(1).pow(2).sum(1) + 1e-12).sqrt()
    return ((norm - 1) ** 2).mean()


def _noise(n: int, z_dim: int, device: torch.device, rng: torch.Generator | None) -> torch.Tensor:
    return torch.randn(n, z_dim, generator=rng, device=device)


def critic_step(generator: Generator, critic: nn.Module, optimizer: torch.optim.Optimizer,
                real: torch.Tensor, lambda_gp: float = 10.0,
                rng: torch.Generator | None = None) -> dict[str, float]:
    """One critic update on a batch of real stamps; returns the logged numbers.

    Loss ``mean D(fake) - mean D(real) + lambda_gp * GP``; ``wasserstein_estimate`` is
    ``mean D(real) - mean D(fake)``, the critic's estimate of the distance (it should fall as the
    generator improves).
    """
    with torch.no_grad():
        fake = generator(_noise(len(real), generator.z_dim, real.device, rng))
    critic.requires_grad_(True)
    optimizer.zero_grad(set_to_none=True)
    d_real, d_fake = critic(real).mean(), critic(fake).mean()
    penalty = gradient_penalty(critic, real, fake, rng)
    loss = d_fake - d_real + lambda_gp * penalty
    loss.backward()
    all_reduce_gradients(critic)
    optimizer.step()
    return {"critic_loss": loss.item(), "wasserstein_estimate": (d_real - d_fake).item(),
            "gradient_penalty": penalty.item()}


def generator_step(generator: Generator, critic: nn.Module, optimizer: torch.optim.Optimizer,
                   batch_size: int, rng: torch.Generator | None = None) -> dict[str, float]:
    """One generator update (loss ``-mean D(G(z))``); the critic is frozen meanwhile."""
    device = next(generator.parameters()).device
    critic.requires_grad_(False)
    try:
        optimizer.zero_grad(set_to_none=True)
        loss = -critic(generator(_noise(batch_size, generator.z_dim, device, rng))).mean()
        loss.backward()
        all_reduce_gradients(generator)
        optimizer.step()
    finally:
        critic.requires_grad_(True)
    return {"generator_loss": loss.item()}


def recalibrate_batchnorm(generator: Generator, batch_size: int, n_batches: int,
                          rng: torch.Generator | None = None) -> None:
    """Reset the generator's batch-norm running statistics to exact averages over fresh batches.

    Samples are drawn in eval mode (each stamp independent of its batch, so sampling is
    reproducible by seed); the running averages that mode uses then lag the last weights. Equal
    weighting of ``n_batches`` batches from the final weights removes that lag.
    """
    norms = [m for m in generator.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = generator.training
    generator.train()
    device = next(generator.parameters()).device
    with torch.no_grad():
        for _ in range(n_batches):
            generator(_noise(batch_size, generator.z_dim, device, rng))
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    generator.train(was_training)


# --------------------------------------------------------------------------------------------
# Real lenses


def derive_seed(*keys: int) -> int:
    """A 62-bit seed mixed from integer keys (seed, worker rank, purpose, ...)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)[0] >> 2)


class InjectedLenses:
    """Endless batches of exactly ``batch_size`` normalised stamps of freshly injected lenses.

    The positives of a :class:`~training.stream.LensTrainingStream` over the deflector pool, with
    look-alikes off and only the sky's symmetries as augmentation (:data:`SYMMETRIES`): exactly
    what a classifier is trained on as a lens, before its photometric augmentations. The stream
    also makes one plain negative per batch (it needs some), which is dropped.

    Parameters
    ----------
    deflectors : StampSet
        The dataset's deflector pool (raw stamps).
    spec : InputSpec
        The input spec of the dataset; normalisation follows it.
    injection : InjectionConfig
        The lens population.
    batch_size, seed : int
        Stamps per batch; with ``start_epoch``, seeds every lens.
    device : torch.device or str
        Where injection runs and the batches live.
    start_epoch : int
        First stream epoch (a resumed run starts after the epochs it has seen).
    """

    def __init__(self, deflectors: StampSet, spec: InputSpec, injection: InjectionConfig,
                 batch_size: int, seed: int, device: torch.device | str = "cpu",
                 start_epoch: int = 0) -> None:
        if 0 < len(deflectors) < batch_size:
            # Each injection call has a fixed cost, and a stream epoch makes one lens per host, so
            # a pool smaller than a batch is repeated: each copy of a host gets its own lens.
            repeat = math.ceil(batch_size / len(deflectors))
            deflectors = deflectors.take(np.tile(np.arange(len(deflectors)), repeat))
        config = StreamConfig(batch_size=batch_size + 1, positive_fraction=batch_size / (batch_size + 1),
                              lookalike_rate=0.0, seed=seed, injection=injection, augment=SYMMETRIES)
        self.stream = LensTrainingStream(deflectors, deflectors, spec, config, device)
        self.batch_size = batch_size
        self.epoch = start_epoch
        self._pending: list[torch.Tensor] = []
        self._batches: Iterator[dict[str, torch.Tensor]] = self.stream.epoch(self.epoch)

    def _next_positives(self) -> torch.Tensor:
        for _ in range(100):
            for batch in self._batches:
                positives = batch["x"][batch["label"] == 1]
                if len(positives):
                    return positives
            self.epoch += 1
            self._batches = self.stream.epoch(self.epoch)
        raise DatasetError("100 epochs of the deflector pool gave no lens that passes the "
                           "injection's cuts; loosen InjectionConfig's magnification/S/N cuts")

    def __iter__(self) -> "InjectedLenses":
        return self

    def __next__(self) -> torch.Tensor:
        have = sum(len(t) for t in self._pending)
        while have < self.batch_size:
            self._pending.append(self._next_positives())
            have += len(self._pending[-1])
        stamps = torch.cat(self._pending)
        rest = stamps[self.batch_size:]
        self._pending = [rest] if len(rest) else []
        return stamps[:self.batch_size]

    def take(self, n: int) -> torch.Tensor:
        """The next ``n`` stamps (N, C, S, S) in one tensor."""
        parts, have = [], 0
        while have < n:
            parts.append(next(self))
            have += len(parts[-1])
        return torch.cat(parts)[:n]


def measure_output_scale(lenses: InjectedLenses, n_stamps: int, margin: float) -> float:
    """``margin`` times the largest |value| of ``n_stamps`` injected lenses: the generator's bound."""
    return float(margin * lenses.take(n_stamps).abs().max())


def display_reference(deflectors: StampSet) -> dict[str, Any]:
    """Median zero point and sky noise per band of the deflectors, for pictures of samples.

    Generated stamps are normalised, so have no zero point or sky noise of their own; colour
    composites and colours of them use the training data's typical values.
    """
    return {"bands": list(deflectors.meta.bands),
            "magzero": deflectors.meta.magzero.median(0).values.tolist(),
            "sky_sigma": deflectors.meta.sky_sigma.median(0).values.tolist()}


# --------------------------------------------------------------------------------------------
# Checkpoints: safetensors + JSON, never pickle


def _state_bytes(module: nn.Module) -> bytes:
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    return safetensors.torch.save(state, metadata={"format": "pt"})


def write_checkpoint(directory: Path, generator: Generator, critic: Critic,
                     optimisers: dict[str, torch.optim.Optimizer], state: dict[str, Any]) -> None:
    """Write both networks, the optimisers (by name) and the loop's state into ``directory``.

    Optimiser tensors go to ``<name>_optimizer.safetensors`` and their other settings into
    ``state.json``, split by ``training.checkpoint.optimizer_to_tensors``, as the classifier
    training's checkpoints are.
    """
    (directory / WEIGHTS_FILE).write_bytes(_state_bytes(generator))
    (directory / CRITIC_FILE).write_bytes(_state_bytes(critic))
    settings: dict[str, Any] = {}
    for name, optimiser in optimisers.items():
        tensors, settings[name] = optimizer_to_tensors(optimiser)
        (directory / f"{name}_optimizer.safetensors").write_bytes(safetensors.torch.save(tensors))
    (directory / CHECKPOINT_STATE).write_text(json.dumps(
        {**state, "optimizers": settings}, indent=1, default=_json_default))


def read_checkpoint(directory: Path, generator: Generator, critic: Critic,
                    optimisers: dict[str, torch.optim.Optimizer]) -> dict[str, Any]:
    """Load a :func:`write_checkpoint` directory into the networks and optimisers; return its state."""
    generator.load_state_dict(safetensors.torch.load((directory / WEIGHTS_FILE).read_bytes()))
    critic.load_state_dict(safetensors.torch.load((directory / CRITIC_FILE).read_bytes()))
    state = json.loads((directory / CHECKPOINT_STATE).read_text())
    for name, optimiser in optimisers.items():
        tensors = safetensors.torch.load((directory / f"{name}_optimizer.safetensors").read_bytes())
        optimiser.load_state_dict(optimizer_from_tensors(tensors, state["optimizers"][name]))
    return state


# --------------------------------------------------------------------------------------------
# The Ray Train job


def _any_worker(flag: bool, device: torch.device) -> bool:
    """True on every worker if ``flag`` is true on any: workers stop at the same step."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([float(flag)], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())
    return flag


def _max_over_workers(value: float, device: torch.device) -> float:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([value], device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return float(t.item())
    return value


def _broadcast_parameters(*modules: nn.Module) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for module in modules:
            for tensor in module.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)


def _train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's per-worker function: build, (resume,) train, report and checkpoint."""
    import ray.train
    import ray.train.torch

    started = time.monotonic()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    config: GanConfig = loop_config["config"]
    data_url: str = loop_config["data_url"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    spec = InputSpec.from_dict(open_dataset(data_url)["input_spec"])
    deflectors = read_pool(data_url, "deflector", "train")

    torch.manual_seed(config.seed)
    resume = ray.train.get_checkpoint()
    state: dict[str, Any] = {}
    if resume is not None:
        with resume.as_directory() as directory:
            state = json.loads((Path(directory) / CHECKPOINT_STATE).read_text())
        made_with = {k: state["generator_params"][k] for k in ("z_dim", "width")}
        if made_with != {"z_dim": config.z_dim, "width": config.width}:
            raise GanError(f"the checkpoints to resume from were made with {made_with}, not "
                           f"z_dim={config.z_dim}, width={config.width}: use the same settings "
                           f"or another --out")
        output_scale = float(state["output_scale"])
    else:
        probe = InjectedLenses(deflectors, spec, config.injection, config.batch_size,
                               derive_seed(config.seed, rank, 1), device)
        output_scale = _max_over_workers(
            measure_output_scale(probe, config.scale_sample_stamps, config.output_margin), device)
        logger.info("output scale %.3f (%.2f x the largest |value| of %d injected lenses)",
                    output_scale, config.output_margin, config.scale_sample_stamps)
    generator = Generator(spec.n_channels, spec.stamp_size_pix, output_scale, config.z_dim,
                          config.width).to(device)
    critic = Critic(spec.n_channels, spec.stamp_size_pix, config.width).to(device)
    optimisers = {
        "generator": torch.optim.Adam(generator.parameters(), lr=config.lr, betas=config.betas),
        "critic": torch.optim.Adam(critic.parameters(), lr=config.lr, betas=config.betas),
    }
    if resume is not None:
        with resume.as_directory() as directory:
            state = read_checkpoint(Path(directory), generator, critic, optimisers)
        logger.info("resumed at step %d", state["step"])
    else:
        _broadcast_parameters(generator, critic)
    step = int(state.get("step", 0))
    lenses = InjectedLenses(deflectors, spec, config.injection, config.batch_size,
                            derive_seed(config.seed, rank, 0), device,
                            start_epoch=int(state.get("epoch", -1)) + 1)
    rng = torch.Generator(device=device)
    rng.manual_seed(derive_seed(config.seed, rank, 2, step))
    display = state.get("display") or display_reference(deflectors)

    totals: dict[str, float] = {}
    n_in_interval, interval_start = 0, time.monotonic()
    done = step >= config.steps
    while not done:
        generator.train()
        for _ in range(config.n_critic):
            logged = critic_step(generator, critic, optimisers["critic"], next(lenses),
                                 config.lambda_gp, rng)
        logged.update(generator_step(generator, critic, optimisers["generator"],
                                     config.batch_size, rng))
        step += 1
        n_in_interval += 1
        for key, value in logged.items():
            totals[key] = totals.get(key, 0.0) + value
        out_of_time = (config.time_limit_s is not None
                       and time.monotonic() - started > config.time_limit_s)
        done = step >= config.steps or _any_worker(out_of_time, device)
        if not (step % config.report_every == 0 or step % config.checkpoint_every == 0 or done):
            continue
        seconds = time.monotonic() - interval_start
        metrics = {k: v / n_in_interval for k, v in totals.items()}
        metrics.update(step=step, seconds=time.monotonic() - started,
                       generator_steps_per_s=n_in_interval / seconds,
                       real_stamps_per_s=n_in_interval * config.n_critic * config.batch_size / seconds,
                       stopped_by_time_limit=bool(done and step < config.steps))
        logger.info("step %d: critic %.3f  W %.3f  GP %.3f  G %.3f  (%.2f steps/s)", step,
                    metrics["critic_loss"], metrics["wasserstein_estimate"],
                    metrics["gradient_penalty"], metrics["generator_loss"],
                    metrics["generator_steps_per_s"])
        totals, n_in_interval, interval_start = {}, 0, time.monotonic()
        if rank == 0 and (step % config.checkpoint_every == 0 or done):
            if done:
                recalibrate_batchnorm(generator, config.batch_size, 32, rng)
            with tempfile.TemporaryDirectory() as directory:
                write_checkpoint(Path(directory), generator, critic, optimisers, {
                    "step": step, "epoch": lenses.epoch, "output_scale": output_scale,
                    "generator_params": generator.params(), "display": display,
                    "n_deflectors": len(deflectors), "metrics": metrics,
                    "device": str(device), "config": config.to_dict()})
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)


@dataclass
class GanRun:
    """What :func:`train_gan` did: where the export is, how far it got and its last metrics."""

    out: Path
    steps: int
    seconds: float
    metrics: dict[str, Any]

    def __str__(self) -> str:
        m = self.metrics
        return (f"GAN {self.out}: {self.steps} generator steps in {self.seconds:.0f} s; last "
                f"interval: critic loss {m.get('critic_loss', math.nan):.3f}, Wasserstein estimate "
                f"{m.get('wasserstein_estimate', math.nan):.3f}, gradient penalty "
                f"{m.get('gradient_penalty', math.nan):.3f}")


def _dataset_provenance(data_url: str, info: dict[str, Any]) -> dict[str, Any]:
    text = storage.read_bytes(storage.join(data_url, "dataset.json"))
    return {"url": data_url, "dataset_json_sha256": hashlib.sha256(text).hexdigest(),
            "pool": "deflector", "split": "train",
            "n_deflectors": int(info["counts"]["train"]["deflector"]),
            "dataset_config": info.get("config", {})}


def _write_atomic(path: Path, data: bytes) -> None:
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _fsync_write(staging, data)
    os.replace(staging, path)


def save_generator(generator: Generator, out_dir: str | Path, *, input_spec: InputSpec,
                   display: dict[str, Any], training: dict[str, Any],
                   data: dict[str, Any]) -> dict[str, Any]:
    """Export ``generator`` to ``out_dir`` as ``generator.safetensors`` + ``gan.json``; return the JSON.

    ``gan.json`` holds the architecture and its parameters (output scale included), the input
    spec, the display reference (:func:`display_reference`), the training record, the data's
    provenance, an empty ``quality`` (``lensscan gan quality`` fills it) and the sha256 of the
    weights file. The weights are written first and ``gan.json`` last, each atomically, so a
    directory with ``gan.json`` is a complete export.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = _state_bytes(generator)
    meta = {
        "format_version": FORMAT_VERSION,
        "architecture": {"name": ARCHITECTURE, "params": generator.params()},
        "input_spec": input_spec.to_dict(),
        "output_scale": generator.output_scale,
        "display": display,
        "training": training,
        "data": data,
        "quality": {},
        "content_hash": _sha256(weights),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "lensscan_version": _lensscan_version(),
    }
    _write_atomic(out / WEIGHTS_FILE, weights)
    write_gan_meta(out, meta)
    logger.info("exported the GAN generator to %s (%d bytes)", out, len(weights))
    return meta


def export_gan(checkpoint_dir: Path, out_dir: Path, config: GanConfig, input_spec: InputSpec,
               data: dict[str, Any]) -> dict[str, Any]:
    """Export the generator of a final checkpoint with :func:`save_generator`; return ``gan.json``."""
    state = json.loads((checkpoint_dir / CHECKPOINT_STATE).read_text())
    generator = Generator(**state["generator_params"])
    generator.load_state_dict(safetensors.torch.load_file(checkpoint_dir / WEIGHTS_FILE))
    metrics = state["metrics"]
    training = {"config": config.to_dict(), "steps": state["step"], "seconds": metrics["seconds"],
                "device": state["device"], "stopped_by_time_limit": metrics["stopped_by_time_limit"],
                "final_metrics": metrics}
    return save_generator(generator, out_dir, input_spec=input_spec, display=state["display"],
                          training=training, data=data)


def write_gan_meta(gan_dir: str | Path, meta: dict[str, Any]) -> None:
    """(Re)write ``gan.json`` atomically, e.g. to record quality metrics after export."""
    text = json.dumps(meta, indent=2, default=_json_default) + "\n"
    _write_atomic(Path(gan_dir) / META_FILE, text.encode())


def train_gan(config: GanConfig, data_url: str, out_dir: str | Path) -> GanRun:
    """Train a WGAN-GP on injected lenses of the dataset at ``data_url``; export to ``out_dir``.

    Runs under Ray Train's ``TorchTrainer`` (``config.num_workers`` workers, a GPU each with
    ``config.use_gpu``) on the Ray cluster this process is connected to, or a local one. Ray's
    checkpoints go to ``<out_dir>/checkpoints/``; running the same command again on an
    unfinished ``out_dir`` resumes from the last one.

    Raises
    ------
    DatasetError
        No dataset at ``data_url``, or no training deflectors in it.
    GanError
        ``out_dir`` already holds an exported GAN.
    RuntimeError
        Training failed (the cause is chained).
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    data_url = storage.absolute(data_url)  # the workers open it, from their own directory
    info = open_dataset(data_url)
    if int(info["counts"]["train"]["deflector"]) == 0:
        raise DatasetError(f"{data_url}: the train split has no deflectors to inject lenses into; "
                           f"rebuild the dataset with looser deflector cuts")
    out = Path(out_dir).resolve()
    if (out / META_FILE).exists():
        raise GanError(f"{out} already holds an exported GAN ({META_FILE}); choose another --out "
                       f"or remove it")
    out.mkdir(parents=True, exist_ok=True)
    resources = {"CPU": config.cpus_per_worker, **({"GPU": 1} if config.use_gpu else {})}
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config={"config": config, "data_url": data_url},
        scaling_config=ScalingConfig(num_workers=config.num_workers, use_gpu=config.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(name=RUN_NAME, storage_path=str(out),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             # The scan's non-secret storage settings, so workers reach the data.
                             worker_runtime_env={"env_vars": storage.worker_env()}),
    )
    started = time.monotonic()
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray wraps the worker's error; say which run failed, keep the cause
        raise RuntimeError(f"GAN training on {data_url} into {out} failed: {exc}") from exc
    if result.checkpoint is None:
        raise RuntimeError(f"GAN training on {data_url} ended without a checkpoint; see the Ray log")
    with result.checkpoint.as_directory() as directory:
        meta = export_gan(Path(directory), out, config, InputSpec.from_dict(info["input_spec"]),
                          _dataset_provenance(data_url, info))
    load_generator(out)  # what was written can be read back
    run = GanRun(out, meta["training"]["steps"], time.monotonic() - started,
                 meta["training"]["final_metrics"])
    logger.info("%s", run)
    return run


# --------------------------------------------------------------------------------------------
# Loading and sampling


def read_gan_meta(gan_dir: str | Path) -> dict[str, Any]:
    """The checked ``gan.json`` of an exported GAN directory."""
    path = Path(gan_dir) / META_FILE
    if not path.is_file():
        raise GanError(f"{path} is missing: give a directory written by `lensscan gan train`")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise GanError(f"{path} is not valid JSON ({err}): re-export the GAN") from None
    missing = [f for f in REQUIRED_FIELDS if not isinstance(meta, dict) or f not in meta]
    if missing:
        raise GanError(f"{path} lacks required fields {missing}: re-export the GAN")
    if meta["format_version"] != FORMAT_VERSION:
        raise GanError(f"{path} has format_version={meta['format_version']!r}, this lensscan reads "
                       f"{FORMAT_VERSION}: upgrade lensscan or re-export")
    if meta["architecture"].get("name") != ARCHITECTURE:
        raise GanError(f"{path}: architecture {meta['architecture'].get('name')!r} is not "
                       f"{ARCHITECTURE!r}")
    return meta


def load_generator(gan_dir: str | Path) -> Generator:
    """Return the exported generator in ``gan_dir``, checked, in eval mode on the CPU.

    Refuses, like :func:`scanner.registry.load_version`, a directory holding pickle-like files
    (anywhere below it), weights whose sha256 differs from ``gan.json``'s ``content_hash``, and
    weights that do not fit the recorded architecture.
    """
    path = Path(gan_dir)
    if not path.is_dir():
        raise GanError(f"{path} is not a directory: give a directory written by `lensscan gan train`")
    pickled = sorted(str(p.relative_to(path)) for p in path.rglob("*")
                     if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickled:
        raise GanError(f"{path} holds pickle-like files {pickled}: weights are only loaded from "
                       f"{WEIGHTS_FILE} (pickles can run code when loaded); remove them")
    meta = read_gan_meta(path)
    try:
        generator = Generator(**meta["architecture"]["params"])
    except (TypeError, ValueError) as err:
        raise GanError(f"{path / META_FILE}: architecture params do not build a generator: {err}") from None
    weights_path = path / WEIGHTS_FILE
    if not weights_path.is_file():
        raise GanError(f"{weights_path} is missing: re-export the GAN")
    data = weights_path.read_bytes()
    content_hash = _sha256(data)
    if content_hash != meta["content_hash"]:
        raise GanError(f"{weights_path} has {content_hash[:19]}... but {META_FILE} records "
                       f"{str(meta['content_hash'])[:19]}...: the weights changed after export; "
                       f"re-export or restore the original file")
    try:
        state = safetensors.torch.load(data)
    except Exception as err:  # safetensors raises its own error type
        raise GanError(f"{weights_path} is not a readable safetensors file ({err})") from None
    try:
        _check_state_dict(state, generator, str(weights_path), "re-export the GAN")
    except RegistryError as err:
        raise GanError(str(err)) from None
    generator.load_state_dict(state)
    return generator.eval()


class GeneratedLenses:
    """Lens stamps from an exported GAN: normalised like the scan, reproducible by seed.

    The object a training stream draws extra positives from: :meth:`sample` takes the stream's
    own ``torch.Generator``, so a seeded epoch replays exactly.

    Parameters
    ----------
    gan_dir : str or Path
        A directory written by :func:`train_gan`.
    device : torch.device or str
        Where the generator runs and samples are returned.
    max_batch : int
        Largest forward pass; a larger ``n`` is generated in chunks (same noise, same stamps).

    Attributes
    ----------
    spec : InputSpec
        Bands, stamp size and normalisation of the samples; a stream must use the same.
    meta : dict
        The GAN's ``gan.json``.
    """

    def __init__(self, gan_dir: str | Path, device: torch.device | str = "cpu",
                 max_batch: int = 512) -> None:
        self.path = Path(gan_dir)
        self.network = load_generator(self.path)
        self.meta = read_gan_meta(self.path)
        self.spec = InputSpec.from_dict(self.meta["input_spec"])
        self.device = torch.device(device)
        self.network.to(self.device)
        self.max_batch = max_batch

    @property
    def content_hash(self) -> str:
        return str(self.meta["content_hash"])

    def describe(self) -> dict[str, Any]:
        """Provenance for a model trained with these samples: path, hash, steps, data."""
        return {"path": str(self.path), "content_hash": self.content_hash,
                "steps": self.meta.get("training", {}).get("steps"),
                "data": self.meta.get("data", {}).get("url")}

    def check_input_spec(self, spec: InputSpec) -> None:
        """Refuse to mix these samples into stamps of another input spec."""
        if spec != self.spec:
            raise GanError(f"the GAN in {self.path} makes {self.spec} stamps; the training stream "
                           f"uses {spec}: train a GAN on a dataset of the same input spec")

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Return ``n`` generated lens stamps (n, C, S, S), normalised, on :attr:`device`.

        The latent vectors come from ``generator`` (on any device), so the same seed gives the
        same stamps. The result carries no autograd history and may be fed to a model in
        training (``no_grad``, not ``inference_mode``, whose tensors autograd refuses to save).
        """
        if n < 0:
            raise ValueError(f"GeneratedLenses.sample n={n}: expected >= 0")
        z = torch.randn(n, self.network.z_dim, generator=generator, device=generator.device)
        z = z.to(self.device)
        out = []
        with torch.no_grad():
            for start in range(0, n, self.max_batch):
                out.append(self.network(z[start:start + self.max_batch]))
        if not out:
            return torch.zeros(0, self.spec.n_channels, self.spec.stamp_size_pix,
                               self.spec.stamp_size_pix, device=self.device)
        return torch.cat(out)
