"""The ``compile`` backend: ``torch.compile`` (``fullgraph=True``, ``dynamic=False``) of the image tower
and of the reward step, one compiled function per static shape. The PyTorch ops are compiled, from which
Inductor writes its own kernels (fastlclip's Triton kernels are autograd Functions Dynamo cannot trace:
they would split the graph at every block)."""

from __future__ import annotations

import types
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


class _CloneGrad(torch.autograd.Function):
    """Identity whose backward copies the gradient out of CUDA-graph memory (``reduce-overhead``)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


def _dynamo_graph_count() -> int:
    return counters["stats"]["unique_graphs"]


class CompiledRuntime(Runtime):
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
        self._slots: dict[tuple, TextSlot] = {}

    def _compiled(self, kind: str, bucket: int, grid: tuple[int, int], scale: float, dtype: torch.dtype) -> Callable:
        key = (kind, bucket, grid, dtype, scale, self.model.dtype)  # one compiled function per latent grid
        fn = self._fns.get(key)
        if fn is None:
            tower_fn = self._tower_fn(scale)
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
        fn = self._compiled("tower", bucket, tuple(x.shape[-2:]), scale, x.dtype)
        return self._call(fn, pad_batch(x, bucket))[:x.shape[0]]

    def _run_reward(self, x, scale, txt, total, logit_scale, start):
        bucket = bucket_for(x.shape[0], self.buckets)
        fn = self._compiled("reward", bucket, tuple(x.shape[-2:]), scale, x.dtype)
        slot = self._slots.get((bucket, start))
        if slot is None:
            slot = self._slots[bucket, start] = TextSlot(bucket, self.model.cfg.embed_dim, x.device, inplace=False)
        slot.load(txt, x.shape[0], total)
        return self._call(fn, pad_batch(x, bucket), slot.txt, slot.weights)
