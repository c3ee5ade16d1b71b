"""The pieces semi-supervised methods share, as plain functions: ramp-up, EMA, sharpen, mixup.

Each exists once here and each method file composes them, so a method reads as its paper's loss
and nothing else (USB's shape without its base class).
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def linear_ramp_up(step: int, ramp_up_steps: int) -> float:
    """Return the weight ramp ``min(1, step / ramp_up_steps)``: 0 at the start, 1 after the ramp.

    Unlabelled losses start at zero weight because the model's own predictions, which they use
    as targets, are noise until the labelled loss has taught it something. ``ramp_up_steps`` 0
    switches the ramp off (weight 1 from the first step).
    """
    if ramp_up_steps < 0:
        raise ValueError(f"ramp_up_steps={ramp_up_steps}: expected >= 0")
    if ramp_up_steps == 0:
        return 1.0
    return min(1.0, max(0.0, step / ramp_up_steps))


def unwrap(model: nn.Module) -> nn.Module:
    """Return the network inside a DistributedDataParallel wrapper (or the model itself).

    Auxiliary passes that must not take part in DDP's gradient reduction (teacher targets,
    label guessing, VAT's power iteration) run on the bare network.
    """
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def ema_copy(model: nn.Module) -> nn.Module:
    """Return a copy of ``model`` for a weight average: same weights, no gradients."""
    teacher = copy.deepcopy(unwrap(model))
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float, step: int) -> None:
    """Move ``teacher`` towards ``student``: ``t = d t + (1 - d) s`` with ``d = min(decay, 1 - 1/(step+1))``.

    The decay warm-up is Tarvainen & Valpola's (Mean Teacher): early on the teacher is the plain
    running mean of the student's weights, so a short run does not keep the random initialisation.
    Floating-point buffers (BatchNorm statistics) are averaged the same way; integer buffers are
    copied.
    """
    if not 0 <= decay < 1:
        raise ValueError(f"ema decay={decay}: expected 0 <= decay < 1")
    d = min(decay, 1.0 - 1.0 / (step + 1))
    student = unwrap(student)
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(d).add_(s.detach(), alpha=1 - d)
    for t, s in zip(teacher.buffers(), student.buffers()):
        if t.is_floating_point():
            t.mul_(d).add_(s, alpha=1 - d)
        else:
            t.copy_(s)


def sharpen(probabilities: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return class probabilities (N, K) raised to ``1/temperature`` and renormalised (MixMatch).

    Lower temperatures push guessed labels towards one-hot, i.e. entropy minimisation.
    """
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: expected > 0")
    p = probabilities.clamp(min=1e-12) ** (1.0 / temperature)
    return p / p.sum(dim=1, keepdim=True)


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x, y)`` each mixed with a shuffled partner, ``lam x + (1 - lam) x'`` (MixMatch).

    One ``lam ~ Beta(alpha, alpha)`` for the batch, taken as ``max(lam, 1 - lam)`` so that every
    mixed stamp stays closer to its own original (MixMatch's change to mixup): the first rows
    remain "labelled" and the rest "unlabelled". ``y`` holds soft labels (N, K).
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha={alpha}: expected > 0")
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    lam = max(lam, 1.0 - lam)
    partner = torch.randperm(x.shape[0], device=x.device)
    return lam * x + (1 - lam) * x[partner], lam * y + (1 - lam) * y[partner]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Return the mean cross-entropy of ``logits`` (N, K) against soft targets (N, K)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def l2_normalise(d: torch.Tensor) -> torch.Tensor:
    """Return each stamp of ``d`` (N, ...) scaled to unit L2 norm."""
    norm = d.flatten(1).norm(dim=1).clamp(min=1e-12)
    return d / norm.view(-1, *([1] * (d.dim() - 1)))


@contextlib.contextmanager
def frozen_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """Within the block, BatchNorm layers normalise with batch statistics but do not record them.

    VAT's perturbed passes are not data the running statistics (used at scan time) should see.
    """
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.momentum))
            m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in saved:
            m.momentum = momentum
