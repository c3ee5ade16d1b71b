"""Mean Teacher (Tarvainen & Valpola 2017): agree with an exponential moving average of yourself.

The teacher is an EMA of the student's weights (decay 0.999); the student's prediction for one
augmentation of an unlabelled stamp is pulled towards the teacher's for another. Averaged
weights make better targets than the Pi-model's noisy self, and the teacher is also the better
classifier, so it is what gets evaluated and exported.
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
class MeanTeacher:
    """Cross-entropy plus ``lambda_u`` x ramp x ``MSE(softmax(student(v1)), softmax(teacher(v2)))``.

    Parameters
    ----------
    lambda_u : float
        Consistency weight after the ramp-up (8, Oliver et al. 2018's tuned value).
    ramp_up_steps : int
        Optimiser steps of the linear ramp-up of that weight.
    ema_decay : float
        Teacher decay (0.999 as in the paper), warmed up as ``min(decay, 1 - 1/(step+1))``.
    """

    name: ClassVar[str] = "mean_teacher"
    uses_unlabelled: ClassVar[bool] = True
    lambda_u: float = 8.0
    ramp_up_steps: int = 2000
    ema_decay: float = 0.999
    teacher: nn.Module | None = field(default=None, init=False, repr=False)

    def loss(self, model: nn.Module, labelled: LabelledBatch, unlabelled: UnlabelledBatch | None,
             step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert unlabelled is not None and self.teacher is not None, "the loop attaches the teacher"
        n = len(labelled.x)
        logits = model(torch.cat([labelled.x, unlabelled.strong(unlabelled.x)]))
        with torch.no_grad():
            target = torch.softmax(self.teacher(unlabelled.strong(unlabelled.x)), dim=1)
        loss_labelled = F.cross_entropy(logits[:n], labelled.label)
        loss_unlabelled = F.mse_loss(torch.softmax(logits[n:], dim=1), target)
        weight = self.lambda_u * linear_ramp_up(step, self.ramp_up_steps)
        loss = loss_labelled + weight * loss_unlabelled
        return loss, {"loss_labelled": loss_labelled.detach(),
                      "loss_unlabelled": loss_unlabelled.detach(),
                      "weight_unlabelled": torch.tensor(weight)}
