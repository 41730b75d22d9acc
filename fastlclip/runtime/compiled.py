"""The ``compile`` backend: ``torch.compile`` (``fullgraph=True``, ``dynamic=False``) of the image tower
and of the reward step, one compiled function per static shape. The PyTorch ops are compiled, from which
Inductor writes its own kernels (fastlclip's Triton kernels are autograd Functions Dynamo cannot trace:
they would split the graph at every block)."""

from __future__ import annotations

import types
import weakref
from typing import Callable

import torch
from torch._dynamo.utils import counters

from ..model import LatentCLIP
from .common import BUCKETS, Runtime, TextSlot, bucket_for, pad_batch, reward_head

COMPILE_MODES = ("default", "max-autotune-no-cudagraphs", "reduce-overhead")
# Expected winner for the batch-1 reward step (launch-bound): bench.reward compares the modes on a GPU.
DEFAULT_COMPILE_MODE = "reduce-overhead"


def _fresh_function(fn: types.FunctionType) -> types.FunctionType:
    """A copy of ``fn`` with its own code object: torch.compile keeps its cache (and its recompile
    limit) per code object, so every compiled shape gets a cache of its own."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class _PendingBackward(torch.autograd.Function):
    """Identity on the latents of a ``reduce-overhead`` call: holds the call in ``pending`` (a WeakSet)
    until its backward has run or its graph is dropped, and copies the gradient out of CUDA-graph memory."""

    @staticmethod
    def forward(ctx, x, pending: weakref.WeakSet):
        ctx.pending = pending
        pending.add(ctx)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.pending.discard(ctx)
        return grad.clone(), None


def _dynamo_graph_count() -> int:
    return counters["stats"]["unique_graphs"]


class CompiledRuntime(Runtime):
    """``torch.compile`` of the image tower and of the reward step, one compiled function per static shape.

    Args:
        model: a LatentCLIP (CUDA for the point of it; ``compiler="aot_eager"`` runs anywhere).
        buckets: the batch sizes compiled (see :func:`bucket_for`).
        mode: an Inductor mode (:data:`COMPILE_MODES`); ignored for other compilers.
        compiler: ``torch.compile``'s ``backend``.

    ``reduce-overhead`` replays Inductor's own CUDA graphs (cudagraph trees). Outputs and gradients are
    copied out of their memory, and a new step (``torch.compiler.cudagraph_mark_step_begin``) is marked
    only when no earlier call's backward is pending: two forwards then their backwards, or an
    ``encode_latents`` between a reward's forward and backward, keep the earlier forward's activations,
    as the graph runtime's contract says.
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
        self._slots: dict[tuple, TextSlot] = {}
        self._pending: weakref.WeakSet = weakref.WeakSet()  # reduce-overhead calls whose backward has not run

    def _compiled(self, kind: str, bucket: int, grid: tuple[int, int], scale: float, shift: float,
                  dtype: torch.dtype) -> Callable:
        key = (kind, bucket, grid, dtype, scale, shift, self.model.dtype)  # one compiled function per latent grid
        fn = self._fns.get(key)
        if fn is None:
            tower_fn = self._tower_fn(scale, shift)
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
        # A new step may reuse every earlier step's graph memory: only once no backward still needs it.
        # (Outputs of earlier calls are copies, so none is read from graph memory.)
        if self.cudagraphs and not self._pending:
            torch.compiler.cudagraph_mark_step_begin()

    def _call(self, fn, *args):
        if self.cudagraphs and torch.is_grad_enabled() and args[0].requires_grad:
            args = (_PendingBackward.apply(args[0], self._pending), *args[1:])
        before = _dynamo_graph_count()
        out = fn(*args)
        self.stats.compiles += _dynamo_graph_count() - before
        return out.clone() if self.cudagraphs else out

    def _run_tower(self, x, scale, shift):
        bucket = bucket_for(x.shape[0], self.buckets)
        fn = self._compiled("tower", bucket, tuple(x.shape[-2:]), scale, shift, x.dtype)
        return self._call(fn, pad_batch(x, bucket).contiguous())[:x.shape[0]]  # one layout: Dynamo guards on strides

    def _run_reward(self, x, scale, shift, txt, total, logit_scale, start):
        bucket = bucket_for(x.shape[0], self.buckets)
        fn = self._compiled("reward", bucket, tuple(x.shape[-2:]), scale, shift, x.dtype)
        slot = self._slots.get((bucket, start))
        if slot is None:
            slot = self._slots[bucket, start] = TextSlot(bucket, self.model.cfg.embed_dim, x.device, inplace=False)
        slot.load(txt, x.shape[0], total)
        return self._call(fn, pad_batch(x, bucket).contiguous(), slot.txt, slot.weights)
