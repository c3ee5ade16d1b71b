"""Supervised training: cross-entropy on labelled stamps, the baseline every method is measured against."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from training.methods import LabelledBatch, UnlabelledBatch


@dataclass
class Supervised:
    """Cross-entropy on the labelled batch; unlabelled stamps are never drawn."""

    name: ClassVar[str] = "supervised"
    uses_unlabelled: ClassVar[bool] = False
    ema_decay: ClassVar[None] = None
    teacher: nn.Module | None = field(default=None, init=False, repr=False)

    def loss(self, model: nn.Module, labelled: LabelledBatch, unlabelled: UnlabelledBatch | None,
             step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = F.cross_entropy(model(labelled.x), labelled.label)
        return loss, {"loss_labelled": loss.detach()}
