"""CUDA-graph and ``torch.compile`` runtimes for the image tower and the reward step; backend selection.

Backends (``fastlclip.load(..., backend=...)`` or ``model.set_backend(...)``):

- ``"eager"``: the plain model (``fastlclip.model``), PyTorch ops.
- ``"triton"``: the same model with the fused Triton kernels attached to its attention and patch embedding.
- ``"graph"``: :class:`GraphRuntime`. The image tower's forward, and the whole reward step (tower, cosine,
  loss; forward and backward to the latents), replay as CUDA graphs with the Triton kernels inside.
- ``"compile"``: :class:`CompiledRuntime`, the same through ``torch.compile`` (``fullgraph=True``,
  ``dynamic=False``) of the PyTorch ops, from which Inductor writes its own kernels.
- ``"auto"``: the fastest of those on this GPU, timed once per (GPU, model, dtype, versions) and
  remembered in ``~/.cache/fastlclip/backends.json``; ``"eager"`` off CUDA.

Modules: ``common`` (buckets, padding, the text slot, counters, kernel attachment, the reward step),
``graph``, ``compiled``, ``backends`` (attaching a concrete backend), ``timing`` (CUDA-event timing,
per-backend reward-step times), ``select`` (:func:`apply`, ``"auto"`` and its cache).

Contract of the graph and compile runtimes:

- Static shapes: a batch is zero-padded up to its bucket (:data:`BUCKETS`) and the result sliced; a
  batch over the largest bucket runs in chunks. Each (kind, bucket, latent grid, dtype, space scale) is
  captured or compiled once, on first use (a grid other than the trained one under ``resize="interpolate"``
  gets its own graphs; ``"pool"`` pools before the graph, which then sees the trained grid); ``runtime.stats`` counts captures, compiles and replays.
- Outputs and gradients are fresh tensors, never views of graph memory: the next replay cannot
  overwrite them. A backward whose forward state was replayed over in between (two forwards, then both
  backwards; ``retain_graph``) re-runs its forward first, so it is correct, only slower (``recomputes``).
- The image tower's weights are constants: installing a runtime freezes them (``requires_grad_(False)``);
  if they require grad again while grad mode is on, calls run uncaptured, with a warning. Replacing the
  weight tensors (``model.to(...)``) drops the graphs; they are re-captured on the next call.
- Input checks run before the graph, in ``LatentCLIP.prepare_latents``; its NaN check synchronises with
  the device: ``model.check_finite = False`` skips it.
- Off CUDA, ``"graph"`` and ``"compile"`` fall back to ``"eager"`` with a warning. (Inductor can compile
  for CPU, but slowly, and no part of this project is tuned for it; construct :class:`CompiledRuntime`
  and :func:`install` it to try.)
"""

from .backends import BACKENDS, activate, install
from .common import (BUCKETS, BackendFallbackWarning, Stats, bucket_for, chunks, pad_batch, reward_head, reward_loss,
                     runtime_of)
from .compiled import COMPILE_MODES, DEFAULT_COMPILE_MODE, CompiledRuntime
from .graph import GraphRuntime
from .select import apply, cache_key, choose_backend, default_cache_path, read_cache, write_cache
from .timing import time_backends, time_cuda

__all__ = [
    "BACKENDS", "BUCKETS", "COMPILE_MODES", "DEFAULT_COMPILE_MODE", "BackendFallbackWarning", "CompiledRuntime",
    "GraphRuntime", "Stats", "activate", "apply", "bucket_for", "cache_key", "choose_backend", "chunks",
    "default_cache_path", "install", "pad_batch", "read_cache", "reward_head", "reward_loss", "runtime_of", "time_backends",
    "time_cuda", "write_cache",
]
