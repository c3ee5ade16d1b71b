"""Model-only sweep of an ensemble on one device: stamps/s by batch size, precision, memory layout,
fused forward, CUDA graphs, torch.compile and host-to-device copy.

    python benchmarks/bench_model.py --json model-gpu.json      # on the GPU: about 170 s
    python benchmarks/bench_model.py --device cpu               # tiny sizes: checks the code runs
    python benchmarks/bench_model.py --help

``lensscan bench``'s model-only figure is one point of this sweep: the scan's own forward
(``Ensemble.predict``: bfloat16 autocast, channels-last, batch 256) on stamps already in memory.
This script asks what else the same networks could do on the same device, variant by variant, in
order of how much the answer matters, and stops starting new variants once ``--budget-s`` is
spent (it says which it skipped):

1. ``predict``: the scan's path, stamps already on the device as float16 (what the cut stage
   sends), for every batch size: the baseline of every other row (float32 on the CPU, where
   ``predict`` does not autocast).
2. ``h2d``: the same with the host-to-device copy included (on the first 8,192 stamps), stamps
   arriving as float16 numpy and scores going back to numpy each batch, as the scan's scorer
   does: ``scorer`` is its exact path (each float16 batch pinned, copied, widened on the device),
   ``fp32-pageable`` the scorer's path before the first GPU run showed it was the bottleneck
   (float32 conversion on the CPU, pageable copy), ``fp16-pageable`` copies the float16 stamps
   and converts on the device, ``fp16-pinned`` copies from memory pinned once (an upper bound).
3. ``fused``: the versions as one network, ``grouped`` (each convolution of the versions becomes
   one grouped convolution; ResNetV2 only), and ``cuda-graph``: the forward captured once as a
   CUDA graph and replayed (no per-kernel launch cost), of the versions in turn and of ``grouped``.
4. ``compile``: ``torch.compile`` (mode ``default``) of the versions in turn and of ``grouped``.
5. ``precision``: the versions in turn (as ``predict`` runs them) in float32 (TF32 as PyTorch's
   defaults allow), with float16 weights and with bfloat16 weights; ``grouped`` with float16
   weights.
6. ``fused`` ``vmap``: ``torch.func.stack_module_state`` and ``vmap`` over the versions.
7. ``layout``: every precision with channels-last off (NCHW).
8. ``cudnn-benchmark``: ``predict`` with ``torch.backends.cudnn.benchmark`` on.
9. ``compile`` with mode ``max-autotune-no-cudagraphs`` (minutes to compile: last).

Groups 1-3 and 5 run at every ``--batch-sizes``; the others, slower or less telling, at
``--focus-batch-sizes`` (1024 and 4096 on a GPU).

A figure is the median of ``--repeats`` passes over ``--stamps`` stamps after one untimed pass
(which also compiles, captures or autotunes; its time is saved as ``first_pass_s``), timed with
CUDA events around each pass (``time.perf_counter`` on the CPU), with the spread
``(max - min) / median``. Every variant's scores on 64 stamps are compared with a float32
reference, ``predict`` without autocast (TF32 where PyTorch's defaults allow it), as
``max_abs_diff``: a fused or compiled variant that is fast but wrong shows it. A variant that
fails is recorded with its error, and the sweep goes on. Stamps are random normal values: the
networks do the same work on any values. On the CPU, torch runs one thread (``--threads``), as a
scoring actor holding one CPU does.

Prints a table and saves JSON (machine, torch and GPU, parameters, every variant), rewritten after
each variant so that a run stopped from outside keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from scanner.bench import Rate, machine
from scanner.models import ResNetV2, lens_probability
from scanner.registry import Ensemble, default_models_dir, load_ensemble

logger = logging.getLogger("bench_model")

RESULTS = Path(__file__).parent / "results"

GPU_BATCH_SIZES = (256, 1024, 4096, 8192)
CPU_BATCH_SIZES = (32, 64)
GPU_STAMPS = 2**15  # a multiple of every batch size: no ragged last batch to recompile for
CPU_STAMPS = 128
PRECISIONS = ("fp32", "bf16-autocast", "fp16-weights", "bf16-weights")
#: A compile variant starts only with at least this many seconds of the budget left: compiling
#: four networks takes tens of seconds in mode default and minutes with max-autotune.
COMPILE_RESERVE_S = {"default": 40.0, "max-autotune-no-cudagraphs": 75.0}
REFERENCE_STAMPS = 64
#: Host-to-device variants pass over this many stamps (a multiple of every batch size up to it).
H2D_STAMPS = 2**13
GROUPS = ("predict", "h2d", "precision", "fused", "compile", "layout", "cudnn-benchmark")


@dataclass
class Variant:
    """One point of the sweep: how the forward is built, fed and timed."""

    group: str
    forward: str  # predict | loop | grouped | vmap
    batch_size: int
    precision: str = "bf16-autocast"
    channels_last: bool = True
    h2d: str = "none"  # none | scorer | fp32-pageable | fp16-pageable | fp16-pinned
    graph: bool = False
    compile_mode: str | None = None
    cudnn_benchmark: bool = False

    @property
    def name(self) -> str:
        parts = [self.forward, self.precision, "NHWC" if self.channels_last else "NCHW"]
        if self.h2d != "none":
            parts.append(f"h2d:{self.h2d}")
        if self.graph:
            parts.append("cuda-graph")
        if self.compile_mode:
            parts.append(f"compile:{self.compile_mode}")
        if self.cudnn_benchmark:
            parts.append("cudnn.benchmark")
        return " ".join(parts)


@dataclass
class Outcome:
    """What one variant gave: a rate, or why there is none."""

    variant: Variant
    status: str = "ok"  # ok | failed | skipped
    reason: str = ""
    rate: Rate | None = None
    wall_seconds: list[float] = field(default_factory=list)
    first_pass_s: float | None = None
    max_abs_diff: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = {"name": self.variant.name, **asdict(self.variant), "status": self.status}
        if self.reason:
            d["reason"] = self.reason
        if self.rate is not None:
            d.update(stamps_per_s=self.rate.per_s, spread=self.rate.spread, stamps=self.rate.items,
                     seconds=self.rate.seconds, wall_seconds=self.wall_seconds)
        if self.first_pass_s is not None:
            d["first_pass_s"] = self.first_pass_s
        if self.max_abs_diff is not None:
            d["max_abs_diff"] = self.max_abs_diff
        return d


# --------------------------------------------------------------------------------------------
# Forwards: each maps a float16 NCHW batch on the device to (N, versions) float32 probabilities.


def _autocast(device: torch.device, precision: str,
              cache_enabled: bool = True) -> contextlib.AbstractContextManager:
    if precision != "bf16-autocast":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache_enabled)


def _input_dtype(precision: str) -> torch.dtype:
    return {"fp16-weights": torch.float16, "bf16-weights": torch.bfloat16}.get(precision, torch.float32)


def _cast_models(models: Sequence[nn.Module], precision: str, channels_last: bool) -> list[nn.Module]:
    """Copies of ``models`` in the weights' dtype of ``precision`` (float32 unless it says weights)
    and memory format (cuDNN runs channels-last when the input or the weights are)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return [copy.deepcopy(m).to(dtype=_input_dtype(precision), memory_format=memory_format) for m in models]


class VersionsInTurn(nn.Module):
    """The ensemble's forward as ``Ensemble.predict`` runs it: each version in turn on the batch."""

    def __init__(self, models: Sequence[nn.Module], device: torch.device, precision: str,
                 channels_last: bool, cache_enabled: bool = True) -> None:
        super().__init__()
        self.versions = nn.ModuleList(models)
        self.device, self.precision, self.cache_enabled = device, precision, cache_enabled
        self.dtype = _input_dtype(precision)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, stamps: torch.Tensor) -> torch.Tensor:
        x = stamps.to(self.dtype).contiguous(memory_format=self.memory_format)
        with _autocast(self.device, self.precision, self.cache_enabled):
            return torch.stack([lens_probability(m(x).float()) for m in self.versions], dim=1)


class GroupedLinear(nn.Module):
    """Each version's linear head applied to its own block of the concatenated features."""

    def __init__(self, heads: Sequence[nn.Linear]) -> None:
        super().__init__()
        self.versions = len(heads)
        self.weight = nn.Parameter(torch.stack([h.weight.detach() for h in heads]), requires_grad=False)
        self.bias = nn.Parameter(torch.stack([h.bias.detach() for h in heads]), requires_grad=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = features.reshape(features.shape[0], self.versions, -1)
        return torch.einsum("nvf,vkf->nvk", f, self.weight) + self.bias


def fuse_resnetv2(models: Sequence[nn.Module]) -> nn.Module:
    """One network computing every version at once: (N, C, H, W) -> (N, versions, 2) logits.

    The versions' channels sit side by side: the stem's convolutions are concatenated (they all
    read the same stamp), every later convolution becomes a grouped one with one group per version,
    batch norms are concatenated, and the heads are applied per version. Exact up to rounding.

    Raises
    ------
    ValueError
        The versions are not all ResNetV2 of one shape.
    """
    first = models[0]
    if not all(isinstance(m, ResNetV2) for m in models):
        raise ValueError("grouped fusion is written for ResNetV2 versions only")
    shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in models]
    if any(s != shapes[0] for s in shapes[1:]):
        raise ValueError("grouped fusion needs versions of one architecture and size")
    v = len(models)
    fused = copy.deepcopy(first)
    for name, module in list(first.named_modules()):
        parts = [m.get_submodule(name) for m in models]
        if isinstance(module, nn.Conv2d):
            shared_input = name == "stem"
            conv = nn.Conv2d(module.in_channels * (1 if shared_input else v), module.out_channels * v,
                             module.kernel_size, stride=module.stride, padding=module.padding,
                             groups=1 if shared_input else v, bias=module.bias is not None)
            conv.weight.data = torch.cat([p.weight.detach() for p in parts])
            if module.bias is not None:
                conv.bias.data = torch.cat([p.bias.detach() for p in parts])
            new: nn.Module = conv
        elif isinstance(module, nn.BatchNorm2d):
            bn = nn.BatchNorm2d(module.num_features * v, eps=module.eps)
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(bn, attr).data = torch.cat([getattr(p, attr).detach() for p in parts])
            new = bn
        elif isinstance(module, nn.Linear) and name == "head":
            new = GroupedLinear(parts)
        else:
            continue
        parent_name, _, attr = name.rpartition(".")
        setattr(fused.get_submodule(parent_name) if parent_name else fused, attr, new)
    return fused.eval().requires_grad_(False)


class FusedVersions(nn.Module):
    """A fused network (grouped convolutions) as a forward giving (N, versions) probabilities."""

    def __init__(self, fused: nn.Module, device: torch.device, precision: str, channels_last: bool,
                 cache_enabled: bool = True) -> None:
        super().__init__()
        self.fused = fused
        self.device, self.precision, self.cache_enabled = device, precision, cache_enabled
        self.dtype = _input_dtype(precision)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, stamps: torch.Tensor) -> torch.Tensor:
        x = stamps.to(self.dtype).contiguous(memory_format=self.memory_format)
        with _autocast(self.device, self.precision, self.cache_enabled):
            logits = self.fused(x).float()
        return torch.softmax(logits, dim=-1)[..., 1]


class VmappedVersions(nn.Module):
    """The versions' weights stacked (``torch.func.stack_module_state``) and run with ``vmap``."""

    def __init__(self, models: Sequence[nn.Module], device: torch.device, precision: str,
                 channels_last: bool) -> None:
        super().__init__()
        from torch.func import functional_call, stack_module_state, vmap

        params, buffers = stack_module_state(list(models))
        self.params = {k: p.detach() for k, p in params.items()}
        self.buffers_ = buffers
        base = copy.deepcopy(models[0]).to("meta")

        def one(p: dict, b: dict, x: torch.Tensor) -> torch.Tensor:
            return functional_call(base, (p, b), (x,))

        self.batched = vmap(one, in_dims=(0, 0, None))
        self.device, self.precision = device, precision
        self.dtype = _input_dtype(precision)
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def forward(self, stamps: torch.Tensor) -> torch.Tensor:
        x = stamps.to(self.dtype).contiguous(memory_format=self.memory_format)
        with _autocast(self.device, self.precision):
            logits = self.batched(self.params, self.buffers_, x).float()  # (versions, N, 2)
        return torch.softmax(logits, dim=-1)[..., 1].T


def capture_graph(forward: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor
                  ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``forward`` captured as a CUDA graph for batches shaped like ``example``; replays on call.

    The returned function's output is overwritten by the next call: copy it out before then.
    """
    static_in = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # cuDNN and cuBLAS pick their kernels before capture, not during it
            forward(static_in)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward(static_in)

    def replay(batch: torch.Tensor) -> torch.Tensor:
        static_in.copy_(batch)
        graph.replay()
        return static_out

    return replay


# --------------------------------------------------------------------------------------------
# Timing


@dataclass
class Workload:
    """The stamps every variant scores: on the device, in host memory, and pinned."""

    device: torch.device
    on_device: torch.Tensor  # (N, C, S, S) float16
    host: np.ndarray  # the same values, float16 numpy, as the cut stage hands them over
    pinned: torch.Tensor | None  # the same, page-locked (CUDA only)
    scores: torch.Tensor  # (N, versions) float32, written by every pass

    @classmethod
    def random(cls, n: int, shape: Sequence[int], versions: int, device: torch.device) -> "Workload":
        gen = torch.Generator().manual_seed(0)
        host = torch.randn(n, *shape, generator=gen).to(torch.float16)
        pinned = host.pin_memory() if device.type == "cuda" else None
        return cls(device, host.to(device), host.numpy(), pinned,
                   torch.empty(n, versions, device=device))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_passes(run_pass: Callable[[], int], device: torch.device, repeats: int) -> tuple[Rate, list[float]]:
    """Rate of ``run_pass`` (returns stamps done) over ``repeats`` passes, and each pass's wall time.

    On CUDA each pass lies between two events on the current stream (recorded after the device
    finished earlier work), so asynchronous work is counted to its end; on the CPU the wall time.
    """
    seconds, wall = [], []
    n = 0
    for _ in range(repeats):
        _synchronize(device)
        t = time.perf_counter()
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            n = run_pass()
            end.record()
            end.synchronize()
            seconds.append(start.elapsed_time(end) / 1e3)
        else:
            n = run_pass()
            seconds.append(time.perf_counter() - t)
        wall.append(time.perf_counter() - t)
    return Rate(n, seconds), wall


class Sweep:
    """Runs variants within a time budget, keeps their outcomes and writes them as JSON."""

    def __init__(self, ensemble: Ensemble, work: Workload, repeats: int, budget_s: float,
                 json_path: str | None, header: dict[str, Any], started: float | None = None,
                 compile_backend: str = "inductor") -> None:
        self.ensemble, self.work, self.repeats = ensemble, work, repeats
        self.compile_backend = compile_backend
        self.device = work.device
        self.budget_s, self.json_path, self.header = budget_s, json_path, header
        # The budget counts from ``started`` (the process's start in main): loading and CUDA's
        # initialisation spend it too.
        self.started = time.perf_counter() if started is None else started
        self.outcomes: list[Outcome] = []
        self.models = [v.model for v in ensemble.versions]  # on the device, as Ensemble.to put them
        self._fused: nn.Module | None = None
        self._fuse_error: str | None = None
        with torch.inference_mode():
            self.reference = ensemble.predict(work.on_device[:REFERENCE_STAMPS], autocast=False).float()

    @property
    def remaining_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def fused(self) -> nn.Module:
        """The grouped-convolution network of the versions, built once (float32, on the device)."""
        if self._fuse_error:
            raise ValueError(self._fuse_error)
        if self._fused is None:
            try:
                cpu_models = [copy.deepcopy(m).to("cpu", memory_format=torch.contiguous_format)
                              for m in self.models]
                self._fused = fuse_resnetv2(cpu_models).to(self.device)
            except ValueError as exc:
                self._fuse_error = str(exc)
                raise
        return self._fused

    def build(self, v: Variant) -> Callable[[torch.Tensor], torch.Tensor]:
        """The forward of ``v``: float16 NCHW stamps on the device -> (N, versions) float32."""
        device, ens = self.device, self.ensemble
        if v.forward == "predict":
            return ens.predict
        graph = v.graph
        if v.forward == "loop":
            models = _cast_models(self.models, v.precision, v.channels_last)
            module: nn.Module = VersionsInTurn(models, device, v.precision, v.channels_last,
                                               cache_enabled=not graph)
        elif v.forward == "grouped":
            memory_format = torch.channels_last if v.channels_last else torch.contiguous_format
            fused = copy.deepcopy(self.fused()).to(_input_dtype(v.precision), memory_format=memory_format)
            module = FusedVersions(fused, device, v.precision, v.channels_last, cache_enabled=not graph)
        elif v.forward == "vmap":
            module = VmappedVersions(_cast_models(self.models, v.precision, v.channels_last), device,
                                     v.precision, v.channels_last)
        else:
            raise ValueError(f"unknown forward {v.forward!r}")
        forward: Callable[[torch.Tensor], torch.Tensor] = module
        if v.compile_mode:
            kwargs: dict[str, Any] = {"backend": self.compile_backend, "dynamic": False}
            if self.compile_backend == "inductor":
                kwargs["mode"] = v.compile_mode
            forward = torch.compile(module, **kwargs)
        if graph:
            example = self.work.on_device[:v.batch_size]
            with torch.inference_mode():
                forward = capture_graph(forward, example)
        return forward

    def _pass(self, v: Variant, forward: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], int]:
        """One pass over the workload's stamps with ``forward``, fed as ``v.h2d`` says."""
        work, b, n = self.work, v.batch_size, len(self.work.host)
        if v.h2d != "none":
            # The copy, not the GPU, sets these rates: a shorter pass measures them as well.
            n = max(b, min(n, H2D_STAMPS))
        device = self.device

        def resident() -> int:
            with torch.inference_mode():
                for i in range(0, n, b):
                    work.scores[i:i + b].copy_(forward(work.on_device[i:i + b]))
            return n

        def scorer() -> int:  # stages.EnsembleScorer.__call__'s own steps
            out = []
            with torch.inference_mode():
                for i in range(0, n, b):
                    x = torch.from_numpy(np.ascontiguousarray(work.host[i:i + b]))
                    if device.type == "cuda":
                        x = x.pin_memory()
                    out.append(forward(x.to(device, non_blocking=True)).float().cpu().numpy())
            return n

        def fp32_pageable() -> int:  # the scorer before the first GPU measurement
            out = []
            with torch.inference_mode():
                for i in range(0, n, b):
                    x = torch.from_numpy(np.ascontiguousarray(work.host[i:i + b], dtype=np.float32))
                    out.append(forward(x.to(device, non_blocking=True)).float().cpu().numpy())
            return n

        def fp16_copy(source: Callable[[int], torch.Tensor]) -> Callable[[], int]:
            def run() -> int:
                out = []
                with torch.inference_mode():
                    for i in range(0, n, b):
                        x = source(i).to(device, non_blocking=True)
                        out.append(forward(x).float().cpu().numpy())
                return n
            return run

        if v.h2d == "none":
            return resident
        if v.h2d == "scorer":
            return scorer
        if v.h2d == "fp32-pageable":
            return fp32_pageable
        if v.h2d == "fp16-pageable":
            return fp16_copy(lambda i: torch.from_numpy(work.host[i:i + b]))
        if v.h2d == "fp16-pinned":
            return fp16_copy(lambda i: work.pinned[i:i + b])
        raise ValueError(f"unknown h2d {v.h2d!r}")

    def run(self, v: Variant, min_remaining_s: float = 0.0) -> Outcome:
        """Measure ``v`` unless the budget is spent; never raises for the variant's own failure."""
        outcome = Outcome(v)
        if self.remaining_s <= min_remaining_s:
            outcome.status = "skipped"
            outcome.reason = (f"budget: {max(self.remaining_s, 0):.0f} s of {self.budget_s:.0f} s left, "
                              f"{min_remaining_s:.0f} s needed")
            return self._keep(outcome)
        if v.graph and self.device.type != "cuda":
            outcome.status, outcome.reason = "skipped", "CUDA graphs need a CUDA device"
            return self._keep(outcome)
        if v.h2d != "none" and self.device.type != "cuda":
            outcome.status, outcome.reason = "skipped", "no host-to-device copy without a CUDA device"
            return self._keep(outcome)
        previous_benchmark = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = v.cudnn_benchmark
        forward = run_pass = None
        try:
            t = time.perf_counter()
            forward = self.build(v)
            with torch.inference_mode():
                probe = forward(self.work.on_device[:v.batch_size])[:REFERENCE_STAMPS].float().clone()
            run_pass = self._pass(v, forward)
            run_pass()  # warm-up: the whole pass, so every shape is compiled, captured and tuned
            _synchronize(self.device)
            outcome.first_pass_s = time.perf_counter() - t
            outcome.max_abs_diff = float((probe - self.reference[:len(probe)]).abs().max())
            outcome.rate, outcome.wall_seconds = time_passes(run_pass, self.device, self.repeats)
        except Exception as exc:  # noqa: BLE001 - a variant that fails is a finding, not the end
            outcome.status = "failed"
            first_line = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
            outcome.reason = f"{type(exc).__name__}: {first_line}"
            logger.debug("variant %s failed", v.name, exc_info=exc)
        finally:
            torch.backends.cudnn.benchmark = previous_benchmark
            forward = run_pass = None  # frees this variant's copies of the weights and its graph
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        return self._keep(outcome)

    def _keep(self, outcome: Outcome) -> Outcome:
        self.outcomes.append(outcome)
        v = outcome.variant
        if outcome.status == "ok":
            logger.info("%-10s batch %5d  %-48s %12.0f stamps/s  spread %.2f  first pass %.1f s  "
                        "max|diff| %.1e", v.group, v.batch_size, v.name, outcome.rate.per_s,
                        outcome.rate.spread, outcome.first_pass_s, outcome.max_abs_diff)
        else:
            logger.info("%-10s batch %5d  %-48s %s: %s", v.group, v.batch_size, v.name, outcome.status,
                        outcome.reason)
        self.save()
        return outcome

    def document(self) -> dict[str, Any]:
        skipped = [o.variant.name + f" (batch {o.variant.batch_size})" for o in self.outcomes
                   if o.status == "skipped" and o.reason.startswith("budget")]
        return {**self.header, "elapsed_s": time.perf_counter() - self.started,
                "budget_skipped": skipped, "variants": [o.to_dict() for o in self.outcomes]}

    def save(self) -> None:
        if not self.json_path:
            return
        path = Path(self.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.document(), indent=1))
        os.replace(tmp, path)


def plan_variants(batch_sizes: Sequence[int], compile_modes: Sequence[str],
                  focus_batch_sizes: Sequence[int]) -> Iterator[tuple[Variant, float]]:
    """Every variant of the sweep, most telling first, with the budget each needs left to start.

    The slower or less telling variants (compiling, vmap, NCHW, cudnn.benchmark) run at
    ``focus_batch_sizes`` only.
    """
    for b in batch_sizes:
        yield Variant("predict", "predict", b), 0.0
    for h2d in ("scorer", "fp32-pageable", "fp16-pageable", "fp16-pinned"):
        for b in batch_sizes:
            yield Variant("h2d", "predict", b, h2d=h2d), 0.0
    for b in batch_sizes:
        yield Variant("fused", "grouped", b), 0.0
    for b in batch_sizes:
        yield Variant("fused", "loop", b, graph=True), 0.0
        yield Variant("fused", "grouped", b, graph=True), 0.0
    first_mode, later_modes = (compile_modes[0], compile_modes[1:]) if compile_modes else (None, ())
    if first_mode:
        reserve = COMPILE_RESERVE_S.get(first_mode, 60.0)
        for b in focus_batch_sizes:
            yield Variant("compile", "loop", b, compile_mode=first_mode), reserve
        yield Variant("compile", "grouped", focus_batch_sizes[-1], compile_mode=first_mode), reserve
    for precision in ("fp32", "fp16-weights", "bf16-weights"):
        for b in batch_sizes:
            yield Variant("precision", "loop", b, precision=precision), 0.0
    for b in batch_sizes:
        yield Variant("fused", "grouped", b, precision="fp16-weights"), 0.0
    for b in focus_batch_sizes:
        yield Variant("fused", "vmap", b), 0.0
    for precision in PRECISIONS:
        for b in focus_batch_sizes:
            yield Variant("layout", "loop", b, precision=precision, channels_last=False), 0.0
    for b in focus_batch_sizes:
        yield Variant("cudnn-benchmark", "predict", b, cudnn_benchmark=True), 0.0
    for mode in later_modes:
        yield (Variant("compile", "loop", focus_batch_sizes[-1], compile_mode=mode),
               COMPILE_RESERVE_S.get(mode, 75.0))


def format_table(outcomes: Sequence[Outcome]) -> str:
    """The sweep as a table; ``x predict`` compares with the scan's path at the same batch size."""
    base = {o.variant.batch_size: o.rate.per_s for o in outcomes
            if o.variant.group == "predict" and o.status == "ok"}
    lines = [(f"{'group':15s} {'batch':>6s} {'variant':52s} {'stamps/s':>12s} {'spread':>7s} "
              f"{'x predict':>9s} {'1st pass s':>10s} {'max|diff|':>9s}")]
    for o in outcomes:
        v = o.variant
        if o.status != "ok":
            lines.append(f"{v.group:15s} {v.batch_size:6d} {v.name:52s} {o.status}: {o.reason[:90]}")
            continue
        ratio = o.rate.per_s / base[v.batch_size] if v.batch_size in base else float("nan")
        lines.append(f"{v.group:15s} {v.batch_size:6d} {v.name:52s} {o.rate.per_s:12,.0f} "
                     f"{o.rate.spread:7.2f} {ratio:9.2f} {o.first_pass_s:10.1f} {o.max_abs_diff:9.1e}")
    ok = [o for o in outcomes if o.status == "ok"]
    if ok:
        best = max(ok, key=lambda o: o.rate.per_s)
        lines.append(f"\nfastest: {best.variant.name}, batch {best.variant.batch_size}: "
                     f"{best.rate.per_s:,.0f} stamps/s")
    return "\n".join(lines)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def device_description(device: torch.device) -> dict[str, Any]:
    """The accelerator and the numerics settings every figure depends on."""
    d: dict[str, Any] = {"device": str(device), "torch": torch.__version__,
                         "cudnn": (torch.backends.cudnn.version()
                                   if torch.backends.cudnn.is_available() else None),
                         "torch_threads": torch.get_num_threads(),
                         "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
                         "tf32_cudnn": torch.backends.cudnn.allow_tf32}
    try:
        import triton

        d["triton"] = triton.__version__
    except ImportError:
        d["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        d.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                 memory_gib=props.total_memory / 2**30, multiprocessors=props.multi_processor_count,
                 cuda=torch.version.cuda, bf16_supported=torch.cuda.is_bf16_supported())
    return d


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", help="model registry dirs (default: the built-in ensemble)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="torch device (default: %(default)s)")
    ap.add_argument("--stamps", type=int, help=f"stamps per pass, a multiple of every batch size "
                    f"(default: {GPU_STAMPS} on a GPU, {CPU_STAMPS} on the CPU)")
    ap.add_argument("--batch-sizes", type=_ints, help="batch sizes (default: "
                    f"{','.join(map(str, GPU_BATCH_SIZES))} on a GPU, "
                    f"{','.join(map(str, CPU_BATCH_SIZES))} on the CPU)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: 1 on the CPU, as a "
                    "scoring actor holding 1 CPU runs; torch's own default on a GPU)")
    ap.add_argument("--repeats", type=int, default=3, help="timed passes after the warm-up "
                    "(default: %(default)s)")
    ap.add_argument("--compile-modes", help="torch.compile modes, the first after the fused variants, "
                    "the others last (default: default,max-autotune-no-cudagraphs on a GPU, none on the CPU)")
    ap.add_argument("--focus-batch-sizes", type=_ints, help="batch sizes of the slower or less telling "
                    "variants: compile, vmap, NCHW, cudnn.benchmark (default: 1024,4096 on a GPU, the "
                    "largest batch size on the CPU)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend; 'eager' "
                    "checks the compile path quickly without generating code (default: %(default)s)")
    ap.add_argument("--groups", help=f"run only these groups, comma-separated, of {','.join(GROUPS)} "
                    "(default: all)")
    ap.add_argument("--budget-s", type=float, default=160.0, help="start no variant after this many "
                    "seconds; the rest are recorded as skipped (default: %(default)s)")
    ap.add_argument("--json", default=str(RESULTS / "model.json"), help="where to write the figures "
                    "(default: %(default)s)")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging (tracebacks of "
                    "failed variants)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if args.threads or not on_gpu:
        torch.set_num_threads(args.threads or 1)
    batch_sizes = args.batch_sizes or list(GPU_BATCH_SIZES if on_gpu else CPU_BATCH_SIZES)
    n_stamps = args.stamps or (GPU_STAMPS if on_gpu else CPU_STAMPS)
    ragged = [b for b in batch_sizes if n_stamps % b]
    if ragged:
        print(f"bench_model: refused: --stamps {n_stamps} is not a multiple of batch size(s) {ragged}: "
              f"a ragged last batch would be a new shape to tune or compile", file=sys.stderr)
        return 2
    if args.compile_modes is None:
        compile_modes = ["default", "max-autotune-no-cudagraphs"] if on_gpu else []
    else:
        compile_modes = [m.strip() for m in args.compile_modes.split(",") if m.strip()]
    focus_batch_sizes = args.focus_batch_sizes or ([1024, 4096] if on_gpu else [max(batch_sizes)])
    groups = [g.strip() for g in args.groups.split(",") if g.strip()] if args.groups else list(GROUPS)
    unknown = sorted(set(groups) - set(GROUPS))
    if unknown:
        print(f"bench_model: refused: unknown group(s) {unknown}; choose from {','.join(GROUPS)}",
              file=sys.stderr)
        return 2

    ensemble = load_ensemble(list(args.models) if args.models else [str(default_models_dir())]).to(device)
    spec = ensemble.input_spec
    shape = (spec.n_channels, spec.stamp_size_pix, spec.stamp_size_pix)
    work = Workload.random(n_stamps, shape, len(ensemble), device)
    header = {"benchmark": "model", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": machine(),
              "accelerator": device_description(device),
              "parameters": {"models": [v["path"] for v in ensemble.describe()], "versions": len(ensemble),
                             "architectures": sorted({v.architecture for v in ensemble.versions}),
                             "input_spec": spec.to_dict(), "stamps_per_pass": n_stamps,
                             "batch_sizes": batch_sizes, "repeats": args.repeats,
                             "compile_modes": compile_modes, "focus_batch_sizes": focus_batch_sizes,
                             "compile_backend": args.compile_backend, "budget_s": args.budget_s,
                             "groups": groups,
                             "timing": "median of repeats of one pass over the stamps after one "
                                       "untimed pass; CUDA events on a GPU, perf_counter on the CPU"}}
    logger.info("%d versions on %s, %d stamps per pass, batch sizes %s, budget %.0f s", len(ensemble),
                header["accelerator"].get("gpu", device), n_stamps, batch_sizes, args.budget_s)
    sweep = Sweep(ensemble, work, args.repeats, args.budget_s, args.json, header, started,
                  compile_backend=args.compile_backend)
    for variant, reserve in plan_variants(batch_sizes, compile_modes, focus_batch_sizes):
        if variant.group in groups:
            sweep.run(variant, reserve)
    doc = sweep.document()
    print(f"\nbench_model: {len(ensemble)} versions, {n_stamps} stamps per pass, median of {args.repeats}, "
          f"on {header['accelerator'].get('gpu', device)}; torch {torch.__version__}\n")
    print(format_table(sweep.outcomes))
    if doc["budget_skipped"]:
        print(f"\nbudget of {args.budget_s:.0f} s spent: {len(doc['budget_skipped'])} variant(s) skipped: "
              + "; ".join(doc["budget_skipped"]))
    sweep.save()
    if args.json:
        print(f"saved {args.json}")
    return 0 if any(o.status == "ok" for o in sweep.outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
