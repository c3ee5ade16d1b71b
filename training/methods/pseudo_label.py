"""Pseudo-labelling (Lee 2013): confident predictions on unlabelled stamps become hard labels.

Unlabelled stamps whose predicted class probability reaches ``threshold`` are trained on as if
that class were their label (Oliver et al. 2018's thresholded variant); the term is weighted by
``lambda_u`` with a linear ramp-up, since early confident predictions are mostly wrong.
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
class PseudoLabel:
    """Cross-entropy plus ``lambda_u`` x ramp x cross-entropy on confident pseudo-labels.

    Parameters
    ----------
    threshold : float
        Smallest class probability that makes a pseudo-label (0.95).
    lambda_u : float
        Weight of the pseudo-label term after the ramp-up (1.0).
    ramp_up_steps : int
        Optimiser steps of the linear ramp-up.
    """

    name: ClassVar[str] = "pseudo_label"
    uses_unlabelled: ClassVar[bool] = True
    ema_decay: ClassVar[None] = None
    threshold: float = 0.95
    lambda_u: float = 1.0
    ramp_up_steps: int = 2000
    teacher: nn.Module | None = field(default=None, init=False, repr=False)

    def loss(self, model: nn.Module, labelled: LabelledBatch, unlabelled: UnlabelledBatch | None,
             step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert unlabelled is not None
        n = len(labelled.x)
        logits = model(torch.cat([labelled.x, unlabelled.weak(unlabelled.x)]))
        loss_labelled = F.cross_entropy(logits[:n], labelled.label)
        confidence, pseudo = torch.softmax(logits[n:].detach(), dim=1).max(dim=1)
        mask = (confidence >= self.threshold).float()
        loss_unlabelled = (F.cross_entropy(logits[n:], pseudo, reduction="none") * mask).mean()
        weight = self.lambda_u * linear_ramp_up(step, self.ramp_up_steps)
        loss = loss_labelled + weight * loss_unlabelled
        return loss, {"loss_labelled": loss_labelled.detach(),
                      "loss_unlabelled": loss_unlabelled.detach(),
                      "weight_unlabelled": torch.tensor(weight),
                      "mask_rate": mask.mean()}
