"""CUDA-graph and ``torch.compile`` runtimes for the image tower and the reward step; backend selection.

Backends (``fastlclip.load(..., backend=...)`` or ``model.set_backend(...)``):

- ``"eager"`` / ``"triton"``: no runtime; the model's own forward (PyTorch ops / the fused kernels).
- ``"graph"``: :class:`GraphRuntime`. The image tower's forward, and the whole reward step (tower, cosine,
  loss; forward and backward to the latents), replay as CUDA graphs with the Triton kernels inside.
- ``"compile"``: :class:`CompiledRuntime`, the same through ``torch.compile`` (``fullgraph=True``,
  ``dynamic=False``) of the PyTorch ops, from which Inductor writes its own kernels (fastlclip's Triton
  kernels are autograd Functions Dynamo cannot trace: they would split the graph at every block).
- ``"auto"``: the fastest of those on this GPU, timed once per (GPU, model, dtype, versions) and
  remembered in ``~/.cache/fastlclip/backends.json``; ``"eager"`` off CUDA.

Contract of the graph and compile runtimes:

- Static shapes: a batch is zero-padded up to its bucket (:data:`BUCKETS`) and the result sliced; a
  batch over the largest bucket runs in chunks. Each (kind, bucket, dtype, space scale) is captured or
  compiled once, on first use; ``runtime.stats`` counts captures, compiles and replays.
- Outputs and gradients are fresh tensors, never views of graph memory: the next replay cannot
  overwrite them. A backward whose forward state was replayed over in between (two forwards, then both
  backwards; ``retain_graph``) re-runs its forward first, so it is correct, only slower (``recomputes``).
- The image tower's weights are constants: ``apply`` freezes them (``requires_grad_(False)``); if they
  require grad again while grad mode is on, calls run uncaptured, with a warning. Replacing the weight
  tensors (``model.to(...)``) drops the graphs; they are re-captured on the next call.
- Input checks run before the graph, in ``LatentCLIP.latent_scale``; its NaN check synchronises with
  the device: ``model.check_finite = False`` skips it.
- Off CUDA, ``"graph"`` and ``"compile"`` fall back to ``"eager"`` with a warning. (Inductor can compile
  for CPU, but slowly, and no part of this project is tuned for it; construct :class:`CompiledRuntime`
  and :func:`install` it to try.)
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import statistics
import sys
import types
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .model import BACKENDS, LatentCLIP
from .rewards import _at_least_fp32

logger = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
# Expected winner for the batch-1 reward step (launch-bound): bench.reward compares the modes on a GPU.
DEFAULT_COMPILE_MODE = "reduce-overhead"


class BackendFallbackWarning(UserWarning):
    """A requested backend cannot run here (or for this call) and a slower, equivalent path runs instead."""


def _warn(message: str) -> None:
    """A BackendFallbackWarning attributed to the first caller outside fastlclip."""
    package = os.path.dirname(os.path.abspath(__file__))
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, BackendFallbackWarning, stacklevel=level + 1)


# -- static shapes ------------------------------------------------------------------------------------
def bucket_for(batch: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket holding ``batch``; the largest one for batches over it (they run in chunks)."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return next((b for b in buckets if b >= batch), buckets[-1])


def chunks(batch: int, largest: int) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges of at most ``largest`` rows covering ``batch``."""
    return [(s, min(s + largest, batch)) for s in range(0, batch, largest)]


def pad_batch(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` zero-padded along dim 0 to ``rows`` (``x`` itself when it has them); differentiable."""
    if x.shape[0] == rows:
        return x
    if x.shape[0] > rows:
        raise ValueError(f"cannot pad {x.shape[0]} rows down to {rows}")
    return torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def _check_buckets(buckets) -> tuple[int, ...]:
    out = tuple(sorted(set(buckets)))
    if not out or any(not isinstance(b, int) or b < 1 for b in out):
        raise ValueError(f"buckets must be positive ints, got {buckets!r}")
    return out


# -- the reward head, shared by every runtime path ----------------------------------------------------
def reward_head(feats: torch.Tensor, txt: torch.Tensor, weights: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
    """``100 - logit_scale.exp() * sum_i weights_i * cos(feats_i, txt_i)``: LatentCLIPReward's loss.

    ``txt`` holds normalised text features (rows of padding are zero), ``weights`` is 1/B on the B real
    rows and 0 on padding, so the sum is the batch mean.
    """
    img = F.normalize(_at_least_fp32(feats), dim=-1)
    scale = _at_least_fp32(logit_scale.detach().exp())
    return 100.0 - scale * ((img * txt).sum(dim=-1) * weights).sum()


class _TextSlot:
    """Padded text features and batch weights for one bucket, refilled only when they change: in place
    (static buffers of a CUDA graph) or, with ``inplace=False``, into new tensors (autograd may hold the old)."""

    def __init__(self, rows: int, dim: int, device: torch.device, inplace: bool):
        self.inplace = inplace
        with torch.inference_mode(False):  # buffers outlive the call: never inference tensors
            self.txt = torch.zeros(rows, dim, device=device)
            self.weights = torch.zeros(rows, device=device)
        self._source = None  # (txt, its version, rows, total) last loaded; holding txt keeps its id unique
        self._dirty = 0  # rows [0, _dirty) may be non-zero

    def load(self, txt: torch.Tensor, rows: int, total: int) -> None:
        """``txt``: (D,) for one prompt, or (rows, D); ``total``: the whole batch (the mean's divisor)."""
        src = self._source
        if src is not None and src[0] is txt and src[1:] == (txt._version, rows, total):
            return
        if not self.inplace:
            with torch.inference_mode(False):
                self.txt, self.weights, self._dirty = torch.zeros_like(self.txt), torch.zeros_like(self.weights), 0
        with torch.no_grad():
            self.txt[:rows].copy_(txt.expand(rows, -1) if txt.ndim == 1 else txt)
            self.weights[:rows].fill_(1.0 / total)
            if rows < self._dirty:
                self.txt[rows:self._dirty].zero_()
                self.weights[rows:self._dirty].zero_()
        self._dirty = rows
        # An inference tensor has no version counter: it can change unseen, so it is reloaded every call.
        self._source = None if txt.is_inference() else (txt, txt._version, rows, total)


@dataclass
class Stats:
    """Counters for tests and benchmarks."""

    captures: int = 0  # CUDA-graph captures (graph backend)
    compiles: int = 0  # graphs compiled by torch.compile (compile backend), first compiles and recompiles
    replays: int = 0  # forward and backward graph replays
    recomputes: int = 0  # forwards replayed again because a backward found its state overwritten
    uncaptured: int = 0  # calls run without graphs (weights requiring grad)
    invalidations: int = 0  # times the graphs were dropped because the weight tensors changed


# -- runtimes -----------------------------------------------------------------------------------------
class _Runtime:
    """Bucketing, chunking and the uncaptured path shared by the graph and compile runtimes."""

    backend = ""
    fused = False

    def __init__(self, model: LatentCLIP, buckets):
        self.model = model
        self.tower = model.visual.latent_vit
        self.buckets = _check_buckets(buckets)
        self.stats = Stats()
        self._params = list(self.tower.parameters())
        self._warned_grad = False

    def __getstate__(self):
        raise TypeError(f"a model with backend {self.backend!r} cannot be copied or pickled (its graphs are tied to "
                        "its memory): call model.set_backend('eager') first, then set the backend on the copy")

    def encode(self, latents: torch.Tensor, scale: float) -> torch.Tensor:
        """Image-tower features (B, D) of validated latents (``LatentCLIP.encode_latents`` calls this)."""
        if self._weights_need_grad():
            return self._uncaptured(latents, scale)
        self._begin_call()
        parts = [self._run_tower(latents[s:e], scale) for s, e in chunks(latents.shape[0], self.buckets[-1])]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def reward_loss(self, latents: torch.Tensor, scale: float, txt: torch.Tensor,
                    logit_scale: torch.Tensor) -> torch.Tensor:
        """LatentCLIPReward's loss for validated latents; ``txt``: normalised fp32 (D,) or (B, D)."""
        b = latents.shape[0]
        if self._weights_need_grad():
            feats = self._uncaptured(latents, scale)
            rows = txt.expand(b, -1) if txt.ndim == 1 else txt
            return reward_head(feats, rows, torch.full((b,), 1.0 / b, device=latents.device), logit_scale)
        self._begin_call()
        spans = chunks(b, self.buckets[-1])
        losses = [self._run_reward(latents[s:e], scale, txt if txt.ndim == 1 else txt[s:e], b, logit_scale, s)
                  for s, e in spans]
        # Each chunk's loss is 100 - (its share of the mean); the total counts the 100 once.
        return losses[0] if len(losses) == 1 else sum(losses) - 100.0 * (len(losses) - 1)

    def _begin_call(self) -> None:
        """Called once per top-level call, before its chunks."""

    def _run_tower(self, x, scale):
        raise NotImplementedError

    def _run_reward(self, x, scale, txt, total, logit_scale, start):
        raise NotImplementedError

    def _tower_fn(self, scale: float, fused: bool) -> Callable[[torch.Tensor], torch.Tensor]:
        tower, dtype = self.tower, self.model.dtype

        def tower_fn(x):
            return tower(x if fused else x.to(dtype), scale=scale, fused=fused)

        return tower_fn

    def _uncaptured(self, latents, scale):
        self.stats.uncaptured += 1
        return self._tower_fn(scale, self.fused)(latents)

    def _weights_need_grad(self) -> bool:
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in self._params):
            return False
        if not self._warned_grad:
            self._warned_grad = True
            _warn(f"backend {self.backend!r} treats the image tower's weights as constants, but they require "
                  "grad: running uncaptured (freeze them with model.visual.requires_grad_(False), or use the "
                  "'triton' backend to train them)")
        return True


# -- graph --------------------------------------------------------------------------------------------
class _CudaGraphStep:
    """``fn(*inputs)`` over static input buffers as a forward CUDA graph and, with ``need_grad``, a
    backward graph from ``grad_out`` to ``inputs[0]``. Replays overwrite ``out`` and ``grad_in``."""

    def __init__(self, fn, inputs: list[torch.Tensor], need_grad: bool, warmup: int = 3):
        x = inputs[0].requires_grad_(need_grad)
        # Warm up (cuBLAS workspaces, Triton autotuning) on the stream that captures, off the default
        # stream, as torch.cuda.make_graphed_callables does.
        stream = torch.cuda.Stream(device=x.device)
        torch.cuda.synchronize(x.device)
        with torch.cuda.stream(stream), torch.inference_mode(False):
            for _ in range(warmup):
                with torch.set_grad_enabled(need_grad):
                    out = fn(*inputs)
                if need_grad:
                    torch.autograd.grad(out, x, torch.ones_like(out))
        torch.cuda.synchronize(x.device)
        del out
        pool = torch.cuda.graph_pool_handle()
        self.forward_graph = torch.cuda.CUDAGraph()
        self.grad_out = self.grad_in = self.backward_graph = None
        with torch.inference_mode(False):
            with torch.set_grad_enabled(need_grad), torch.cuda.graph(self.forward_graph, pool=pool, stream=stream):
                out = fn(*inputs)
            if need_grad:
                self.grad_out = torch.zeros_like(out)
                self.backward_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.backward_graph, pool=pool, stream=stream):
                    (self.grad_in,) = torch.autograd.grad(out, x, self.grad_out)
        self.out = out.detach()

    def replay_forward(self) -> None:
        self.forward_graph.replay()

    def replay_backward(self) -> None:
        self.backward_graph.replay()


class _EagerStep:
    """:class:`_CudaGraphStep`'s interface and memory semantics, re-running ``fn`` eagerly into the same
    static buffers: lets the runtime's bookkeeping be tested without a GPU."""

    def __init__(self, fn, inputs: list[torch.Tensor], need_grad: bool):
        self.fn, self.inputs, self.need_grad = fn, inputs, need_grad
        inputs[0].requires_grad_(need_grad)
        self._run()
        self.out = self._live.detach().clone()
        self.grad_out = torch.zeros_like(self.out) if need_grad else None
        self.grad_in = torch.zeros_like(inputs[0]) if need_grad else None

    def _run(self):
        with torch.inference_mode(False), torch.set_grad_enabled(self.need_grad):
            self._live = self.fn(*self.inputs)

    def replay_forward(self) -> None:
        self._run()
        with torch.no_grad():
            self.out.copy_(self._live)

    def replay_backward(self) -> None:
        with torch.inference_mode(False), torch.enable_grad():
            (g,) = torch.autograd.grad(self._live, self.inputs[0], self.grad_out, retain_graph=True)
        with torch.no_grad():
            self.grad_in.copy_(g)


class _Entry:
    """One captured shape: its step, static latents (and text slot), and a generation counter that tells
    a backward whether the static state still holds its forward."""

    def __init__(self, step, x: torch.Tensor, slot: _TextSlot | None, stats: Stats):
        self.step, self.x, self.slot, self.stats = step, x, slot, stats
        self.generation = 0
        self._dirty = 0  # rows [0, _dirty) of the static latents may be non-zero (they start zeroed)

    def load(self, x: torch.Tensor, txt=None, total=None) -> None:
        n = x.shape[0]
        with torch.no_grad():
            self.x[:n].copy_(x)
            if n < self._dirty:
                self.x[n:self._dirty].zero_()
        self._dirty = n
        if self.slot is not None:
            self.slot.load(txt, n, total)

    def forward(self) -> None:
        self.step.replay_forward()
        self.generation += 1
        self.stats.replays += 1

    def backward(self) -> None:
        self.step.replay_backward()
        self.generation += 1  # the backward may reuse the forward's buffers: its state is spent
        self.stats.replays += 1

    def ensure_forward_of(self, ctx, *load_args) -> None:
        if self.generation != ctx.generation:
            self.load(*load_args)
            self.forward()
            self.stats.recomputes += 1


class _ReplayTower(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entry: _Entry, x):
        entry.load(x)
        entry.forward()
        ctx.entry, ctx.generation = entry, entry.generation
        ctx.save_for_backward(x)
        return entry.step.out[:x.shape[0]].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        entry, n = ctx.entry, x.shape[0]
        entry.ensure_forward_of(ctx, x)
        go = entry.step.grad_out
        go[:n].copy_(grad)
        go[n:].zero_()
        entry.backward()
        return None, entry.step.grad_in[:n].clone()


class _ReplayReward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entry: _Entry, x, txt, total: int):
        entry.load(x, txt, total)
        entry.forward()
        ctx.entry, ctx.generation, ctx.total = entry, entry.generation, total
        ctx.save_for_backward(x, txt)
        return entry.step.out.clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, txt = ctx.saved_tensors
        entry = ctx.entry
        entry.ensure_forward_of(ctx, x, txt, ctx.total)
        entry.backward()  # captured with d loss = 1: scale by the incoming gradient (a fresh tensor)
        return None, entry.step.grad_in[:x.shape[0]] * grad, None, None


class GraphRuntime(_Runtime):
    """CUDA graphs of the image tower and of the reward step, captured lazily per static shape.

    Args:
        model: a LatentCLIP on a CUDA device.
        buckets: the batch sizes captured (see :func:`bucket_for`).
        fused: use the Triton kernels inside the graphs; default: where ``kernels_available``.
        emulate: re-run eagerly into the static buffers instead of capturing: tests the bookkeeping
            (padding, chunking, copies, recomputation) without a GPU. Never faster than eager.
    """

    backend = "graph"

    def __init__(self, model: LatentCLIP, buckets=BUCKETS, *, fused: bool | None = None, emulate: bool = False):
        if not emulate and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {model.device}")
        super().__init__(model, buckets)
        if fused is None:
            from .kernels import kernels_available

            fused = kernels_available(model.device)
        self.fused = fused
        self.emulate = emulate
        self._entries: dict[tuple, _Entry] = {}
        self._fingerprint = self._weights_fingerprint()

    def reset(self) -> None:
        """Drop every captured graph (they are re-captured on use)."""
        self._entries.clear()
        self._params = list(self.tower.parameters())
        self._fingerprint = self._weights_fingerprint()

    def _weights_fingerprint(self):
        w, p = self.tower.conv1.weight, self.tower.proj
        return w.data_ptr(), p.data_ptr(), p.dtype, p.device, self.model.logit_scale.data_ptr()

    def _entry(self, kind: str, x: torch.Tensor, scale: float, need_grad: bool) -> _Entry:
        if self._weights_fingerprint() != self._fingerprint:
            self.reset()
            self.stats.invalidations += 1
        bucket = bucket_for(x.shape[0], self.buckets)
        key = (kind, bucket, x.dtype, scale, need_grad)
        entry = self._entries.get(key)
        if entry is None:
            entry = self._entries[key] = self._capture(kind, bucket, x, scale, need_grad)
            self.stats.captures += 1
        return entry

    def _capture(self, kind, bucket, x, scale, need_grad) -> _Entry:
        # Static buffers outlive this call: made outside inference_mode even when the call is under it, or a
        # later call outside it could not write into them.
        with torch.inference_mode(False):
            return self._capture_static(kind, bucket, x, scale, need_grad)

    def _capture_static(self, kind, bucket, x, scale, need_grad) -> _Entry:
        static_x = torch.zeros((bucket, *x.shape[1:]), dtype=x.dtype, device=x.device)
        tower_fn = self._tower_fn(scale, self.fused)
        slot = None
        if kind == "tower":
            fn, inputs = tower_fn, [static_x]
        else:
            slot = _TextSlot(bucket, self.model.cfg.embed_dim, x.device, inplace=True)
            logit_scale = self.model.logit_scale

            def fn(x, txt, weights):
                return reward_head(tower_fn(x), txt, weights, logit_scale)

            inputs = [static_x, slot.txt, slot.weights]
        step = (_EagerStep if self.emulate else _CudaGraphStep)(fn, inputs, need_grad)
        if kind == "reward" and need_grad:
            step.grad_out.fill_(1.0)
        return _Entry(step, static_x, slot, self.stats)

    def _run_tower(self, x, scale):
        need_grad = torch.is_grad_enabled() and x.requires_grad
        entry = self._entry("tower", x, scale, need_grad)
        if need_grad:
            return _ReplayTower.apply(entry, x)
        entry.load(x)
        entry.forward()
        return entry.step.out[:x.shape[0]].clone()

    def _run_reward(self, x, scale, txt, total, logit_scale, start):
        need_grad = torch.is_grad_enabled() and x.requires_grad
        entry = self._entry("reward", x, scale, need_grad)
        if need_grad:
            return _ReplayReward.apply(entry, x, txt, total)
        entry.load(x, txt, total)
        entry.forward()
        return entry.step.out.clone()


# -- compile ------------------------------------------------------------------------------------------
def _fresh_function(fn: types.FunctionType) -> types.FunctionType:
    """A copy of ``fn`` with its own code object: torch.compile keeps its cache (and its recompile
    limit) per code object, so every compiled shape gets a cache of its own."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class _CloneGrad(torch.autograd.Function):
    """Identity whose backward copies the gradient out of CUDA-graph memory (``reduce-overhead``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


def _dynamo_graph_count() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class CompiledRuntime(_Runtime):
    """``torch.compile`` of the image tower and of the reward step, one compiled function per static shape.

    Args:
        model: a LatentCLIP (CUDA for the point of it; ``compiler="aot_eager"`` runs anywhere).
        buckets: the batch sizes compiled (see :func:`bucket_for`).
        mode: an Inductor mode (:data:`COMPILE_MODES`); ignored for other compilers.
        compiler: ``torch.compile``'s ``backend``.
    """

    backend = "compile"

    def __init__(self, model: LatentCLIP, buckets=BUCKETS, *, mode: str = DEFAULT_COMPILE_MODE,
                 compiler: str = "inductor"):
        if compiler == "inductor" and mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}; choose one of {COMPILE_MODES}")
        super().__init__(model, buckets)
        self.mode, self.compiler = mode, compiler
        self.cudagraphs = compiler == "inductor" and mode == "reduce-overhead"
        self._fns: dict[tuple, Callable] = {}
        self._slots: dict[tuple, _TextSlot] = {}

    def _compiled(self, kind: str, bucket: int, scale: float, dtype: torch.dtype) -> Callable:
        key = (kind, bucket, dtype, scale, self.model.dtype)
        fn = self._fns.get(key)
        if fn is None:
            tower_fn = self._tower_fn(scale, fused=False)
            if kind == "tower":
                base = tower_fn
            else:
                logit_scale = self.model.logit_scale

                def base(x, txt, weights):
                    return reward_head(tower_fn(x), txt, weights, logit_scale)

            options = {"mode": self.mode} if self.compiler == "inductor" else {}
            fn = self._fns[key] = torch.compile(_fresh_function(base), backend=self.compiler, fullgraph=True,
                                                dynamic=False, **options)
        return fn

    def _begin_call(self) -> None:
        if self.cudagraphs:  # a new step: outputs of earlier calls are cloned, so none is still read
            torch.compiler.cudagraph_mark_step_begin()

    def _call(self, fn, *args):
        if self.cudagraphs:
            if args[0].requires_grad:
                args = (_CloneGrad.apply(args[0]), *args[1:])
        before = _dynamo_graph_count()
        out = fn(*args)
        self.stats.compiles += _dynamo_graph_count() - before
        return out.clone() if self.cudagraphs else out

    def _run_tower(self, x, scale):
        bucket = bucket_for(x.shape[0], self.buckets)
        fn = self._compiled("tower", bucket, scale, x.dtype)
        return self._call(fn, pad_batch(x, bucket))[:x.shape[0]]

    def _run_reward(self, x, scale, txt, total, logit_scale, start):
        bucket = bucket_for(x.shape[0], self.buckets)
        fn = self._compiled("reward", bucket, scale, x.dtype)
        slot = self._slots.get((bucket, start))
        if slot is None:
            slot = self._slots[bucket, start] = _TextSlot(bucket, self.model.cfg.embed_dim, x.device, inplace=False)
        slot.load(txt, x.shape[0], total)
        return self._call(fn, pad_batch(x, bucket), slot.txt, slot.weights)


# -- selection ----------------------------------------------------------------------------------------
def install(model: LatentCLIP, runtime: _Runtime | None) -> LatentCLIP:
    """Make ``runtime`` (or none: eager) run ``model``'s image tower; freezes the tower's weights."""
    if runtime is not None:
        if runtime.model is not model:
            raise ValueError("this runtime was built for another model")
        model.visual.latent_vit.requires_grad_(False)
    model.runtime = runtime
    model.backend = runtime.backend if runtime is not None else "eager"
    return model


def apply(model: LatentCLIP, backend: str, **options) -> LatentCLIP:
    """Set ``model``'s backend (``LatentCLIP.set_backend`` and ``fastlclip.load`` call this).

    ``options`` go to the runtime's constructor (``buckets``; ``mode`` for ``"compile"``; ``cache_path``,
    ``refresh`` for ``"auto"``, see :func:`choose_backend`).
    """
    choices = (*BACKENDS, "auto")
    if backend not in choices:
        raise ValueError(f"unknown backend {backend!r}; choose one of {choices}")
    on_cuda = model.device.type == "cuda"
    if backend == "auto":
        auto = {k: options.pop(k) for k in ("cache_path", "refresh") if k in options}
        if options:
            raise TypeError(f"backend 'auto' takes only cache_path and refresh, got {sorted(options)}")
        if not on_cuda:
            _warn(f"backend='auto' on {model.device}: using 'eager' (the 'graph' and 'compile' backends need a CUDA "
                  "device)")
            backend = "eager"
        else:
            backend = choose_backend(model, **auto)
    if backend in ("eager", "triton"):
        if options:
            raise TypeError(f"backend {backend!r} takes no options, got {sorted(options)}")
        if backend == "triton":
            from . import kernels

            if not kernels.kernels_available(model.device):
                warnings.warn(
                    f"backend='triton' on {model.device}: the Triton kernels need a CUDA device, or TRITON_INTERPRET=1 "
                    "set before importing fastlclip to run on CPU; the model runs the equivalent PyTorch paths",
                    RuntimeWarning, stacklevel=3,
                )
        install(model, None)
        model.backend = backend
        return model
    if not on_cuda:
        what = "CUDA graphs need" if backend == "graph" else "the 'compile' backend is built for"
        _warn(f"backend={backend!r}: {what} a CUDA device (the model is on {model.device}): using the eager backend")
        return install(model, None)
    runtime = GraphRuntime(model, **options) if backend == "graph" else CompiledRuntime(model, **options)
    return install(model, runtime)


def default_cache_path() -> Path:
    """``$FASTLCLIP_CACHE_DIR/backends.json``, else ``~/.cache/fastlclip/backends.json``."""
    root = os.environ.get("FASTLCLIP_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fastlclip"
    return Path(root) / "backends.json"


def cache_key(device_name: str, model_name: str, dtype: torch.dtype) -> str:
    """What a timing depends on: GPU, model, dtype, and the torch and Triton versions."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    dtype_name = str(dtype).removeprefix("torch.")
    return f"{device_name} | {model_name} | {dtype_name} | torch {torch.__version__} | triton {triton_version}"


def read_cache(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as e:
        warnings.warn(f"ignoring the unreadable backend cache {path}: {e}", stacklevel=2)
        return {}
    return data if isinstance(data, dict) else {}


def write_cache(path: Path, key: str, entry: dict) -> None:
    """Add ``key: entry`` to the JSON cache at ``path`` (atomically replaced)."""
    path = Path(path)
    data = read_cache(path)
    data[key] = entry
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def choose_backend(model: LatentCLIP, *, cache_path: Path | None = None, refresh: bool = False) -> str:
    """The fastest backend for ``model``'s reward step at batch 1 on its GPU: cached, else timed once
    (every backend, ``"compile"`` included, so the first call can take minutes) and cached."""
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    key = cache_key(torch.cuda.get_device_name(model.device), f"{model.cfg.name} {model.cfg.vision}", model.dtype)
    hit = read_cache(path).get(key)
    if not refresh and isinstance(hit, dict) and hit.get("backend") in BACKENDS:
        return hit["backend"]
    logger.warning("fastlclip: timing the backends for %s once (cached in %s)", key, path)
    times, failures = time_backends(model)
    if not times:
        raise RuntimeError(f"no backend ran for {key}: {failures}")
    best = min(times, key=times.get)
    write_cache(path, key, {"backend": best, "reward_step_ms": times, "failed": failures,
                            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    return best


def time_backends(model: LatentCLIP, backends=BACKENDS, *, trials: int = 5, steps: int = 20) -> tuple[dict, dict]:
    """Median ms of one batch-1 reward step (forward + backward to the latents) per backend, CUDA events
    over back-to-back steps; failures by backend. Leaves the model on ``"eager"`` with its weights'
    ``requires_grad`` and its train/eval mode as they were."""
    from .kernels import kernels_available
    from .rewards import LatentCLIPReward

    flags = [p.requires_grad for p in model.parameters()]
    modes = [m.training for m in model.modules()]
    check_finite = model.check_finite
    times, failures = {}, {}
    try:
        model.check_finite = False
        reward = LatentCLIPReward(model)
        v = model.cfg.vision
        latents = torch.randn(1, v.latent_channels, v.latent_size, v.latent_size, device=model.device,
                              dtype=model.dtype, requires_grad=True)

        def step():
            torch.autograd.grad(reward(latents, "a photo of a cat"), latents)

        for backend in backends:
            if backend == "triton" and not kernels_available(model.device):
                continue
            try:
                apply(model, backend)
                times[backend] = time_cuda(step, trials=trials, steps=steps, device=model.device)
            except Exception as e:  # noqa: BLE001 - a backend that fails is ruled out; the reason is kept
                failures[backend] = f"{type(e).__name__}: {e}"
            finally:
                install(model, None)
                torch.cuda.empty_cache()
    finally:
        model.check_finite = check_finite
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        for m, training in zip(model.modules(), modes):  # LatentCLIPReward put it in eval mode
            m.training = training
    return times, failures


def time_cuda(fn: Callable[[], object], *, trials: int = 5, steps: int = 20, warmup: int = 3,
              device: torch.device | str | int | None = None) -> float:
    """Median over ``trials`` of the mean ms per call of ``steps`` back-to-back calls (CUDA events, one
    synchronisation at the end: calls pipeline as they do in a loop that never waits for the GPU).

    ``device``: the CUDA device ``fn`` runs on (its events and synchronisation are that device's); None:
    the current device. Pass the model's (``model.device``) when it may not be the current one.
    """
    with torch.cuda.device(device):
        for _ in range(warmup):
            fn()
        events = []
        for _ in range(trials):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) / steps for s, e in events)


__all__ = [
    "BUCKETS", "COMPILE_MODES", "DEFAULT_COMPILE_MODE", "BackendFallbackWarning", "CompiledRuntime", "GraphRuntime",
    "Stats", "apply", "bucket_for", "choose_backend", "chunks", "install", "pad_batch", "reward_head", "time_backends",
    "time_cuda",
]
