"""Training checkpoints as safetensors and JSON: weights, weight average, optimiser, progress.

A checkpoint directory holds ``model.safetensors`` (the trained network), ``teacher.safetensors``
(the method's weight average, when it keeps one), ``optimizer.safetensors`` (the optimiser's
per-parameter tensors) and ``state.json`` (epochs done, optimiser step, the per-epoch history,
the optimiser's hyper-parameters and non-tensor state). Nothing is pickled: a checkpoint can be
read without running code from it, like the registry's versions.

Example
-------
>>> save_training_state(d, model, teacher, optimizer, {"epoch": 1, "step": 40})  # doctest: +SKIP
>>> load_training_state(d, model, teacher, optimizer)["step"]                    # doctest: +SKIP
40
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

MODEL_FILE = "model.safetensors"
TEACHER_FILE = "teacher.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the run resuming from it; the message says why."""


def _weights(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in module.state_dict().items()}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer
                         ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser's state dict into tensors (``state.<param>.<key>``) and JSON-ready rest."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, entries in sd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], rest: dict[str, Any]
                           ) -> dict[str, Any]:
    """Rebuild the optimiser state dict that :func:`optimizer_to_tensors` split."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in rest["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    # JSON turned tuple settings (Adam's betas) into lists; the optimisers write tuples.
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in rest["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_training_state(directory: str | Path, model: nn.Module, teacher: nn.Module | None,
                        optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> Path:
    """Write a checkpoint of ``model``, ``teacher``, ``optimizer`` and ``state`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(_weights(model), str(directory / MODEL_FILE))
    if teacher is not None:
        safetensors.torch.save_file(_weights(teacher), str(directory / TEACHER_FILE))
    tensors, rest = optimizer_to_tensors(optimizer)
    safetensors.torch.save_file(tensors, str(directory / OPTIMIZER_FILE))
    (directory / STATE_FILE).write_text(json.dumps({**state, "optimizer": rest}, indent=1))
    return directory


def read_state(directory: str | Path) -> dict[str, Any]:
    """Return a checkpoint's ``state.json`` (epoch, step, history, ...)."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {STATE_FILE}; not a lensscan training checkpoint")
    return json.loads(path.read_text())


def read_weights(directory: str | Path, which: str) -> dict[str, torch.Tensor]:
    """Return the ``model`` or ``teacher`` weights of a checkpoint, on the CPU."""
    path = Path(directory) / {"model": MODEL_FILE, "teacher": TEACHER_FILE}[which]
    if not path.is_file():
        raise CheckpointError(f"{directory}: no {path.name} in the checkpoint")
    return safetensors.torch.load(path.read_bytes())


def load_training_state(directory: str | Path, model: nn.Module, teacher: nn.Module | None,
                        optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load a checkpoint into ``model``, ``teacher`` and ``optimizer``; return its state.

    Raises
    ------
    CheckpointError
        The checkpoint has a teacher and the method none, or the other way round.
    """
    directory = Path(directory)
    state = read_state(directory)
    model.load_state_dict(read_weights(directory, "model"))
    has_teacher = (directory / TEACHER_FILE).is_file()
    if (teacher is not None) != has_teacher:
        raise CheckpointError(f"{directory}: checkpoint {'has' if has_teacher else 'lacks'} a "
                              f"teacher, the method {'does not keep' if has_teacher else 'keeps'} "
                              f"one; resume with the method it was written by")
    if teacher is not None:
        teacher.load_state_dict(read_weights(directory, "teacher"))
    tensors = safetensors.torch.load((directory / OPTIMIZER_FILE).read_bytes())
    optimizer.load_state_dict(optimizer_from_tensors(tensors, state.pop("optimizer")))
    return state
