"""FixMatch (Sohn et al. 2020): the weak view's confident prediction labels the strong view.

Not in the original lens-finding work; it is the method behind ESA's AnomalyMatch. For each
unlabelled stamp, a weakly augmented view (flips, rotations, shifts) is predicted; where the
prediction reaches ``threshold`` it becomes the hard label of a strongly augmented view (PSF
blur, noise, brightness, saturation, gamma on top). No ramp-up: the threshold keeps early noise
out. Evaluation and export use the EMA of the weights, as the paper.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from training.methods import LabelledBatch, UnlabelledBatch


@dataclass
class FixMatch:
    """Cross-entropy plus ``lambda_u`` x masked cross-entropy of strong views on weak pseudo-labels.

    Parameters
    ----------
    threshold : float
        Confidence that makes a pseudo-label, tau (0.95).
    lambda_u : float
        Weight of the unlabelled term (1.0).
    ema_decay : float
        Decay of the evaluated and exported weight average (0.999).

    The paper's unlabelled-to-labelled ratio mu (7) is the training config's
    ``unlabelled_batch_size`` over ``batch_size``.
    """

    name: ClassVar[str] = "fixmatch"
    uses_unlabelled: ClassVar[bool] = True
    threshold: float = 0.95
    lambda_u: float = 1.0
    ema_decay: float = 0.999
    teacher: nn.Module | None = field(default=None, init=False, repr=False)

    def loss(self, model: nn.Module, labelled: LabelledBatch, unlabelled: UnlabelledBatch | None,
             step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert unlabelled is not None
        n, m = len(labelled.x), len(unlabelled.x)
        x = torch.cat([labelled.x, unlabelled.weak(unlabelled.x), unlabelled.strong(unlabelled.x)])
        logits = model(x)
        loss_labelled = F.cross_entropy(logits[:n], labelled.label)
        confidence, pseudo = torch.softmax(logits[n:n + m].detach(), dim=1).max(dim=1)
        mask = (confidence >= self.threshold).float()
        loss_unlabelled = (F.cross_entropy(logits[n + m:], pseudo, reduction="none") * mask).mean()
        loss = loss_labelled + self.lambda_u * loss_unlabelled
        return loss, {"loss_labelled": loss_labelled.detach(),
                      "loss_unlabelled": loss_unlabelled.detach(),
                      "mask_rate": mask.mean()}
