"""The ``graph`` backend: the image tower's forward, and the whole reward step (tower, cosine, loss;
forward and backward to the latents), captured as CUDA graphs per static shape and replayed."""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ..kernels import launch
from ..model import LatentCLIP
from .common import BUCKETS, Runtime, Stats, TextSlot, bucket_for, reward_head


class _CudaGraphStep:
    """``fn(*inputs)`` over static input buffers as a forward CUDA graph and, with ``need_grad``, a
    backward graph from ``grad_out`` to ``inputs[0]``. Replays overwrite ``out`` and ``grad_in``."""

    def __init__(self, fn, inputs: list[torch.Tensor], need_grad: bool, pool, warmup: int = 3):
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
    static buffers: lets the runtime's bookkeeping be tested without a GPU. As a captured graph does, a
    replay runs under the autocast state of the capture, whatever the caller's is."""

    def __init__(self, fn, inputs: list[torch.Tensor], need_grad: bool, pool=None):
        self.fn, self.inputs, self.need_grad = fn, inputs, need_grad
        self.device_type = inputs[0].device.type
        self.autocast = autocast_state(self.device_type)
        inputs[0].requires_grad_(need_grad)
        self._run()
        self.out = self._live.detach().clone()
        self.grad_out = torch.zeros_like(self.out) if need_grad else None
        self.grad_in = torch.zeros_like(inputs[0]) if need_grad else None

    def _run(self):
        enabled, dtype = self.autocast or (False, None)
        with torch.inference_mode(False), torch.set_grad_enabled(self.need_grad), \
                torch.autocast(self.device_type, dtype=dtype, enabled=enabled):
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


def autocast_state(device_type: str) -> tuple[bool, torch.dtype] | None:
    """``(True, dtype)`` inside ``torch.autocast`` for ``device_type``, else None: part of a graph's key, since
    a capture freezes the dtypes autocast chose."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return True, torch.get_autocast_dtype(device_type)


class _Clock:
    """Counts replays across all of a runtime's graphs. They share one memory pool, so any replay may
    overwrite the activations another graph's pending backward needs: a backward checks that no replay
    happened since its forward, else recomputes that forward."""

    def __init__(self):
        self.now = 0

    def tick(self) -> int:
        self.now += 1
        return self.now


class _Entry:
    """One captured shape: its step, static latents (and text slot), and the clock time of its last forward."""

    def __init__(self, step, x: torch.Tensor, slot: TextSlot | None, stats: Stats, clock: _Clock):
        self.step, self.x, self.slot, self.stats, self.clock = step, x, slot, stats, clock
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
        self.generation = self.clock.tick()
        self.stats.replays += 1

    def backward(self) -> None:
        self.step.replay_backward()
        self.clock.tick()  # the backward may reuse the forward's buffers: its state is spent
        self.stats.replays += 1

    def ensure_forward_of(self, ctx, *load_args) -> None:
        if self.clock.now != ctx.generation:
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


class GraphRuntime(Runtime):
    """CUDA graphs of the image tower and of the reward step, captured lazily per static shape.

    Args:
        model: a LatentCLIP on a CUDA device.
        buckets: the batch sizes captured (see :func:`bucket_for`).
        fused: use the Triton kernels inside the graphs; default: where ``kernels_available``.
        emulate: re-run eagerly into the static buffers instead of capturing: tests the bookkeeping
            (padding, chunking, copies, recomputation) without a GPU. Never faster than eager.
        max_entries: captured shapes kept at most; the least recently used is dropped beyond it.

    Memory: every graph allocates from one pool shared by the runtime, so intermediate activations are
    reused across shapes; the pool grows to about the largest entry's peak (for a reward step with
    gradients: the image tower's activations for the backward, ~23 GiB for B-4-512 at batch 256 in fp32,
    ~1/8 of that for B-8-512, half in bf16) plus, per entry, its static latents, output and latent
    gradient. A backward after another graph's replay re-runs its own forward first (``recomputes``).
    """

    backend = "graph"

    def __init__(self, model: LatentCLIP, buckets=BUCKETS, *, fused: bool | None = None, emulate: bool = False,
                 max_entries: int = 8):
        if not emulate and model.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {model.device}")
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        super().__init__(model, buckets)
        self.fused = launch.kernels_available(model.device) if fused is None else fused
        self.emulate, self.max_entries = emulate, max_entries
        self._entries: dict[tuple, _Entry] = {}  # in order of use, least recent first
        self._clock = _Clock()
        self._pool = None if emulate else torch.cuda.graph_pool_handle()
        self._fingerprint = self._weights_fingerprint()

    def reset(self) -> None:
        """Drop every captured graph (they are re-captured on use)."""
        self._entries.clear()
        self._params = list(self.tower.parameters())
        self._fingerprint = self._weights_fingerprint()

    def _weights_fingerprint(self):
        """Where every weight the graphs read lives: replacing any of them (``model.to``, a new module,
        ``param.data = ...``) changes it. In-place updates keep it, and graphs see them, as eager does."""
        params = [*self.tower.parameters(), self.model.logit_scale]
        return tuple((p.data_ptr(), p.dtype, p.device) for p in params)

    def _check_weights(self) -> None:
        """Drop the graphs when a weight tensor was replaced (see :meth:`_weights_fingerprint`)."""
        if self._weights_fingerprint() != self._fingerprint:
            self.reset()
            self.stats.invalidations += 1

    def _weights_need_grad(self) -> bool:
        # Checked first: a replacing nn.Parameter requires grad, and the call that meets it must run uncaptured.
        self._check_weights()
        return super()._weights_need_grad()

    def _entry(self, kind: str, x: torch.Tensor, scale: float, shift: float, need_grad: bool) -> _Entry:
        self._check_weights()
        bucket = bucket_for(x.shape[0], self.buckets)
        key = (kind, bucket, tuple(x.shape[1:]), x.dtype, scale, shift, need_grad, autocast_state(x.device.type))
        entry = self._entries.pop(key, None)
        if entry is None:
            entry = self._capture(kind, bucket, x, scale, shift, need_grad)
            self.stats.captures += 1
            while len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]
        self._entries[key] = entry  # most recent last
        return entry

    def _capture(self, kind, bucket, x, scale, shift, need_grad) -> _Entry:
        # Static buffers outlive this call: made outside inference_mode even when the call is under it, or a
        # later call outside it could not write into them.
        with torch.inference_mode(False):
            return self._capture_static(kind, bucket, x, scale, shift, need_grad)

    def _capture_static(self, kind, bucket, x, scale, shift, need_grad) -> _Entry:
        static_x = torch.zeros((bucket, *x.shape[1:]), dtype=x.dtype, device=x.device)
        tower_fn = self._tower_fn(scale, shift)
        slot = None
        if kind == "tower":
            fn, inputs = tower_fn, [static_x]
        else:
            slot = TextSlot(bucket, self.model.cfg.embed_dim, x.device, inplace=True)
            logit_scale = self.model.logit_scale

            def fn(x, txt, weights):
                return reward_head(tower_fn(x), txt, weights, logit_scale)

            inputs = [static_x, slot.txt, slot.weights]
        step = (_EagerStep if self.emulate else _CudaGraphStep)(fn, inputs, need_grad, self._pool)
        if kind == "reward" and need_grad:
            step.grad_out.fill_(1.0)
        return _Entry(step, static_x, slot, self.stats, self._clock)

    def _run_tower(self, x, scale, shift):
        need_grad = torch.is_grad_enabled() and x.requires_grad
        entry = self._entry("tower", x, scale, shift, need_grad)
        if need_grad:
            return _ReplayTower.apply(entry, x)
        entry.load(x)
        entry.forward()
        return entry.step.out[:x.shape[0]].clone()

    def _run_reward(self, x, scale, shift, txt, total, logit_scale, start):
        need_grad = torch.is_grad_enabled() and x.requires_grad
        entry = self._entry("reward", x, scale, shift, need_grad)
        if need_grad:
            return _ReplayReward.apply(entry, x, txt, total)
        entry.load(x, txt, total)
        entry.forward()
        return entry.step.out.clone()
