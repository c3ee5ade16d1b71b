"""Training methods: each turns a labelled batch and an unlabelled batch into a loss.

One file per method, each a small dataclass whose fields are its hyper-parameters (with the
published defaults) and whose one :meth:`Method.loss` is the paper's objective. The training loop
(``training.loop``), the weight average, checkpoints and logging exist once and serve them all, so
adding a method is one new file plus a line in :data:`METHODS`, and comparing methods is one flag
(``lensscan train --method NAME``).

==============  =========================================================================
name            method
==============  =========================================================================
supervised      cross-entropy on labelled stamps only
pi_model        Laine & Aila (2017): consistency between two augmentations
mean_teacher    Tarvainen & Valpola (2017): consistency with an EMA teacher (exported)
vat             Miyato et al. (2018): virtual adversarial training
mixmatch        Berthelot et al. (2019): guessed, sharpened labels and mixup (EMA exported)
pseudo_label    Lee (2013): confident predictions as hard labels
fixmatch        Sohn et al. (2020): weak-view pseudo-labels for strong views (EMA exported)
==============  =========================================================================

Example
-------
>>> method = build_method("fixmatch", {"threshold": 0.9})
>>> method.threshold, method.uses_unlabelled
(0.9, True)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from training.methods.fixmatch import FixMatch
from training.methods.mean_teacher import MeanTeacher
from training.methods.mixmatch import MixMatch
from training.methods.pi_model import PiModel
from training.methods.pseudo_label import PseudoLabel
from training.methods.supervised import Supervised
from training.methods.vat import VAT

Augmenter = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LabelledBatch:
    """Normalised (and, as configured, augmented) stamps ``x`` (N, C, S, S), ``label`` (N,) 1 = lens."""

    x: torch.Tensor
    label: torch.Tensor


@dataclass
class UnlabelledBatch:
    """Normalised, un-augmented unlabelled stamps ``x`` and the two ways to view them.

    ``weak(x)`` draws flips, 90-degree rotations and small shifts; ``strong(x)`` the full
    augmentation set (PSF blur, noise, brightness, saturation, gamma on top). Each call draws
    anew, so two calls give two views.
    """

    x: torch.Tensor
    weak: Augmenter
    strong: Augmenter


@runtime_checkable
class Method(Protocol):
    """What the training loop asks of a method.

    Attributes
    ----------
    name : str
        The ``--method`` name.
    uses_unlabelled : bool
        False: the loop passes ``unlabelled=None`` and never draws unlabelled stamps.
    ema_decay : float or None
        When set, the loop keeps ``teacher``, an exponential moving average of the model's
        weights (``training.methods.common.ema_update``), updates it after every optimiser step,
        and evaluates and exports it instead of the model.
    teacher : nn.Module or None
        That average (never wrapped in DDP); None for methods without one.
    """

    name: ClassVar[str]
    uses_unlabelled: ClassVar[bool]
    ema_decay: float | None
    teacher: nn.Module | None

    def loss(self, model: nn.Module, labelled: LabelledBatch, unlabelled: UnlabelledBatch | None,
             step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return the loss to minimise at ``step`` and detached scalars to log (``loss_labelled``, ...)."""
        ...


METHODS: dict[str, type] = {cls.name: cls for cls in (
    Supervised, PiModel, MeanTeacher, VAT, MixMatch, PseudoLabel, FixMatch)}
"""``--method`` names and their classes."""


def hyper_parameters(method: Method) -> dict[str, Any]:
    """Return the method's hyper-parameters (its dataclass fields) as a JSON-ready dict."""
    return {f.name: getattr(method, f.name) for f in dataclasses.fields(method) if f.init}


def build_method(name: str, params: dict[str, Any] | None = None) -> Method:
    """Return the method called ``name`` with ``params`` overriding its default hyper-parameters.

    Raises
    ------
    ValueError
        An unknown method name or hyper-parameter, or a value the method refuses.
    """
    try:
        cls = METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS)}") from None
    params = dict(params or {})
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise ValueError(f"method {name!r} has no hyper-parameter(s) {unknown}; it has "
                         f"{sorted(known) or 'none'}")
    for key, value in params.items():
        default = known[key].default
        if isinstance(default, bool) or default is None:
            continue
        if isinstance(default, (int, float)) and not isinstance(value, (int, float)):
            raise ValueError(f"method {name!r}: {key}={value!r} is not a number")
        if isinstance(default, int) and isinstance(value, float):
            if not value.is_integer():
                raise ValueError(f"method {name!r}: {key}={value!r} must be an integer")
            params[key] = int(value)
        elif isinstance(default, float):
            params[key] = float(value)
    return cls(**params)


__all__ = ["METHODS", "LabelledBatch", "Method", "UnlabelledBatch", "build_method",
           "hyper_parameters"]
