"""MixMatch (Berthelot et al. 2019): guess labels, sharpen them, and mix everything up.

For each unlabelled stamp the model's predictions over ``k`` weak augmentations are averaged and
sharpened (temperature ``temperature``) into a guessed label; labelled and unlabelled stamps, with
their (guessed) labels, are then mixed pairwise with mixup (``Beta(alpha, alpha)``, the larger
share kept). Labelled stamps take cross-entropy, unlabelled ones a squared error weighted by
``lambda_u`` with a linear ramp-up. Evaluation and export use the EMA of the weights, as the paper.
One forward pass over the whole mixed batch replaces the paper's interleaving: BatchNorm then
sees one batch, which is what interleaving emulated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from training.methods.common import linear_ramp_up, mixup, sharpen, soft_cross_entropy, unwrap

if TYPE_CHECKING:
    from training.methods import LabelledBatch, UnlabelledBatch


@dataclass
class MixMatch:
    """MixMatch with the paper's defaults.

    Parameters
    ----------
    temperature : float
        Sharpening temperature T (0.5).
    k : int
        Augmentations averaged per guessed label K (2).
    alpha : float
        Mixup Beta parameter (0.75).
    lambda_u : float
        Weight of the unlabelled squared error after the ramp-up (100, the paper's CIFAR-10 code).
    ramp_up_steps : int
        Optimiser steps of the linear ramp-up of ``lambda_u`` (16384, the paper's code).
    ema_decay : float
        Decay of the evaluated and exported weight average (0.999).
    """

    name: ClassVar[str] = "mixmatch"
    uses_unlabelled: ClassVar[bool] = True
    temperature: float = 0.5
    k: int = 2
    alpha: float = 0.75
    lambda_u: float = 100.0
    ramp_up_steps: int = 16384
    ema_decay: float = 0.999
    teacher: nn.Module | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"mixmatch k={self.k}: expected >= 1 augmentations")

    def loss(self, model: nn.Module, labelled: LabelledBatch, unlabelled: UnlabelledBatch | None,
             step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert unlabelled is not None
        n_classes = 2
        views = [unlabelled.weak(unlabelled.x) for _ in range(self.k)]
        with torch.no_grad():
            net = unwrap(model)
            guess = torch.stack([torch.softmax(net(v), dim=1) for v in views]).mean(dim=0)
            guess = sharpen(guess, self.temperature)
        n = len(labelled.x)
        x = torch.cat([labelled.x, *views])
        y = torch.cat([F.one_hot(labelled.label, n_classes).float(), guess.repeat(self.k, 1)])
        mixed_x, mixed_y = mixup(x, y, self.alpha)
        logits = model(mixed_x)
        loss_labelled = soft_cross_entropy(logits[:n], mixed_y[:n])
        loss_unlabelled = F.mse_loss(torch.softmax(logits[n:], dim=1), mixed_y[n:])
        weight = self.lambda_u * linear_ramp_up(step, self.ramp_up_steps)
        loss = loss_labelled + weight * loss_unlabelled
        return loss, {"loss_labelled": loss_labelled.detach(),
                      "loss_unlabelled": loss_unlabelled.detach(),
                      "weight_unlabelled": torch.tensor(weight)}
