"""Virtual adversarial training (Miyato et al. 2018): be smooth in the most sensitive direction.

One power iteration finds the input perturbation of norm ``epsilon`` that changes the prediction
most (a finite difference of size ``xi`` along a random direction, then the gradient of the KL
divergence); the loss asks the prediction not to change under it. No labels and no augmentation
design are needed, which is why it suits data unlike natural images.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from training.methods.common import frozen_batchnorm_statistics, l2_normalise, unwrap

if TYPE_CHECKING:
    from training.methods import LabelledBatch, UnlabelledBatch


@dataclass
class VAT:
    """Cross-entropy plus ``lambda_u`` x ``KL(p(u) || p(u + r_adv))``, ``|r_adv| = epsilon``.

    Parameters
    ----------
    xi : float
        Finite-difference step of the power iteration (1e-6, as in the paper).
    epsilon : float
        L2 norm of the adversarial perturbation of a whole stamp, in normalised units (6.0, the
        paper's CIFAR-10 value; the sky noise is ~0.33 per pixel there, and 6 spread over
        64x64x3 pixels is ~0.05 per pixel).
    lambda_u : float
        Weight of the VAT term (0.3, Oliver et al. 2018).
    power_iterations : int
        Power iterations finding the adversarial direction (1, as in the paper).
    """

    name: ClassVar[str] = "vat"
    uses_unlabelled: ClassVar[bool] = True
    ema_decay: ClassVar[None] = None
    xi: float = 1e-6
    epsilon: float = 6.0
    lambda_u: float = 0.3
    power_iterations: int = 1
    teacher: nn.Module | None = field(default=None, init=False, repr=False)

    def adversarial_perturbation(self, net: nn.Module, x: torch.Tensor,
                                 p_clean: torch.Tensor) -> torch.Tensor:
        """Return the perturbation of norm ``epsilon`` per stamp that most changes ``net(x)``."""
        d = l2_normalise(torch.randn_like(x))
        with frozen_batchnorm_statistics(net):
            for _ in range(self.power_iterations):
                d = (self.xi * d).requires_grad_()
                log_p = F.log_softmax(net(x + d), dim=1)
                distance = F.kl_div(log_p, p_clean, reduction="batchmean")
                d = l2_normalise(torch.autograd.grad(distance, d)[0].detach())
        return self.epsilon * d

    def loss(self, model: nn.Module, labelled: LabelledBatch, unlabelled: UnlabelledBatch | None,
             step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        assert unlabelled is not None
        n = len(labelled.x)
        x_u = unlabelled.weak(unlabelled.x)
        net = unwrap(model)  # the power iteration must not enter DDP's gradient reduction
        with torch.no_grad(), frozen_batchnorm_statistics(net):
            p_clean = torch.softmax(net(x_u), dim=1)
        r_adv = self.adversarial_perturbation(net, x_u, p_clean)
        logits = model(torch.cat([labelled.x, x_u + r_adv]))
        loss_labelled = F.cross_entropy(logits[:n], labelled.label)
        loss_unlabelled = F.kl_div(F.log_softmax(logits[n:], dim=1), p_clean, reduction="batchmean")
        loss = loss_labelled + self.lambda_u * loss_unlabelled
        return loss, {"loss_labelled": loss_labelled.detach(),
                      "loss_unlabelled": loss_unlabelled.detach()}
