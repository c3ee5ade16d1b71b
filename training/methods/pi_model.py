"""Pi-model (Laine & Aila 2017): predictions for two random augmentations of a stamp should agree.

The consistency term is the mean squared difference of the two views' class probabilities, both
views taking gradients as in the paper, weighted by ``lambda_u`` times a linear ramp-up (the
network's early predictions are noise and must not be taught to each other).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from training.methods.common import linear_ramp_up

if TYPE_CHECKING:
    from training.methods import LabelledBatch, UnlabelledBatch


@dataclass
class PiModel:
    """Cross-entropy plus ``lambda_u`` x ramp x ``MSE(softmax(f(strong(u))), softmax(f(strong'(u))))``.

    Parameters
    ----------
    lambda_u : float
        Weight of the consistency term after the ramp-up (20, Oliver et al. 2018's tuned value).
    ramp_up_steps : int
        Optimiser steps over which the weight rises linearly from 0 to ``lambda_u``.
    """

    name: ClassVar[str] = "pi_model"
    uses_unlabelled: ClassVar[bool] = True
    ema_decay: ClassVar[None] = None
    lambda_u: float = 20.0
    ramp_up_steps: int = 2000
    teacher: nn.Module | None = field(default=None, init=False, repr=False)

    def loss(self, model: nn.Module, labelled: LabelledBatch, unlabelled: UnlabelledBatch | None,
             step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert unlabelled is not None
        n, m = len(labelled.x), len(unlabelled.x)
        x = torch.cat([labelled.x, unlabelled.strong(unlabelled.x), unlabelled.strong(unlabelled.x)])
        logits = model(x)
        loss_labelled = F.cross_entropy(logits[:n], labelled.label)
        p1 = torch.softmax(logits[n:n + m], dim=1)
        p2 = torch.softmax(logits[n + m:], dim=1)
        loss_unlabelled = F.mse_loss(p1, p2)
        weight = self.lambda_u * linear_ramp_up(step, self.ramp_up_steps)
        loss = loss_labelled + weight * loss_unlabelled
        return loss, {"loss_labelled": loss_labelled.detach(),
                      "loss_unlabelled": loss_unlabelled.detach(),
                      "weight_unlabelled": torch.tensor(weight)}
