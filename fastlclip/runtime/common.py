"""What the CUDA-graph and compiled runtimes share: static-shape buckets, padding, the text slot, counters,
the uncaptured path, kernel attachment, and the reward step through whichever runtime a model carries."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..kernels import flash_attention, fused_patch_embed
from ..grids import MODEL_DEFAULT
from ..loss import clip_loss, cosine
from ..model import LatentCLIP, LatentViT, PackedAttention

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# Latent dtypes the graphs and compiled functions take as they are; others (float64) are cast to the model's.
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class BackendFallbackWarning(UserWarning):
    """A requested backend cannot run here (or for this call) and a slower, equivalent path runs instead."""


def warn(message: str) -> None:
    """A BackendFallbackWarning attributed to the first caller outside fastlclip."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def check_buckets(buckets) -> tuple[int, ...]:
    out = tuple(sorted(set(buckets)))
    if not out or any(not isinstance(b, int) or b < 1 for b in out):
        raise ValueError(f"buckets must be positive ints, got {buckets!r}")
    return out


# -- fast paths on the plain model --------------------------------------------------------------------
def use_kernels(module: nn.Module, on: bool) -> None:
    """Attach (or detach) the fused Triton attention and patch embedding to every block of ``module``."""
    for m in module.modules():
        if isinstance(m, PackedAttention):
            m.attention_fn = flash_attention.attention_packed if on else None
        elif isinstance(m, LatentViT):
            m.patch_embed_fn = fused_patch_embed.patch_embed if on else None


def runtime_of(model: LatentCLIP) -> "Runtime | None":
    """The graph / compiled runtime running ``model``'s image tower, or None (eager and triton backends)."""
    return getattr(model, "runtime", None)


def reward_loss(model: LatentCLIP, latents: torch.Tensor, space: str, txt: torch.Tensor,
                resize=MODEL_DEFAULT, noise_level=None) -> torch.Tensor:
    """``LatentCLIPReward``'s loss: the image tower, the cosine to normalised text features ``txt`` ((D,)
    or (B, D), float32) and :func:`fastlclip.loss.clip_loss`; one captured or compiled graph when the
    model carries a runtime. ``resize``: the latent-grid policy (``LatentCLIP.encode_latents``); a pooled
    batch enters the graph at the trained grid, an interpolated one at its own (its own graph).
    ``noise_level``: as in ``encode_latents`` (a runtime runs such calls uncaptured, see :meth:`Runtime.encode`)."""
    latents, scale, shift, noise = model.prepare_latents(latents, space, resize, noise_level)
    runtime = runtime_of(model)
    if runtime is not None:
        return runtime.reward_loss(latents, scale, shift, txt, model.logit_scale, noise)
    feats = model.visual.latent_vit(latents, scale=scale, shift=shift, noise_level=noise)
    return clip_loss(cosine(feats, txt), model.logit_scale)


def reward_head(feats: torch.Tensor, txt: torch.Tensor, weights: torch.Tensor,
                logit_scale: torch.Tensor) -> torch.Tensor:
    """The loss of a static batch: ``txt`` holds normalised text features (rows of padding are zero),
    ``weights`` is 1/B on the B real rows and 0 on padding, so the weighted sum is the batch mean."""
    return clip_loss(cosine(feats, txt), logit_scale, weights)


class TextSlot:
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


class Runtime:
    """Bucketing, chunking and the uncaptured path shared by the graph and compile runtimes.

    Installed on a model (``fastlclip.runtime.install``), :meth:`encode` replaces the image tower's
    ``forward``; the tower's own forward (with the Triton kernels attached when ``fused``) is what the
    runtime captures or compiles.
    """

    backend = ""
    fused = False

    def __init__(self, model: LatentCLIP, buckets):
        self.model = model
        self.tower = model.visual.latent_vit
        self.buckets = check_buckets(buckets)
        self.stats = Stats()
        self._params = list(self.tower.parameters())
        self._warned_grad = False
        self._warned_noise = False

    def __getstate__(self):
        raise TypeError(f"a model with backend {self.backend!r} cannot be copied or pickled (its graphs are tied to "
                        "its memory): call model.set_backend('eager') first, then set the backend on the copy")

    def encode(self, latents: torch.Tensor, scale: float = 1.0, shift: float = 0.0,
               noise_level: torch.Tensor | None = None) -> torch.Tensor:
        """Image-tower features (B, D) of validated latents (the installed tower's ``forward``).

        A noise level (a per-sample input no graph holds) runs the tower's own forward uncaptured, with
        the Triton kernels when the runtime uses them, warned once; None (clean latents) is captured."""
        latents = self._as_input(latents)
        if noise_level is not None or self._weights_need_grad():
            return self._uncaptured(latents, scale, shift, noise_level)
        self._begin_call()
        parts = [self._run_tower(latents[s:e], scale, shift) for s, e in chunks(latents.shape[0], self.buckets[-1])]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def reward_loss(self, latents: torch.Tensor, scale: float, shift: float, txt: torch.Tensor,
                    logit_scale: torch.Tensor, noise_level: torch.Tensor | None = None) -> torch.Tensor:
        """LatentCLIPReward's loss for validated latents; ``txt``: normalised fp32 (D,) or (B, D)."""
        latents = self._as_input(latents)
        b = latents.shape[0]
        if noise_level is not None or self._weights_need_grad():
            return clip_loss(cosine(self._uncaptured(latents, scale, shift, noise_level), txt), logit_scale)
        self._begin_call()
        spans = chunks(b, self.buckets[-1])
        losses = [self._run_reward(latents[s:e], scale, shift, txt if txt.ndim == 1 else txt[s:e], b, logit_scale, s)
                  for s, e in spans]
        # Each chunk's loss is 100 - (its share of the mean); the total counts the 100 once.
        return losses[0] if len(losses) == 1 else sum(losses) - 100.0 * (len(losses) - 1)

    def _as_input(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents in a dtype the static buffers and kernels take (float64 -> the model's dtype, differentiably)."""
        return latents if latents.dtype in INPUT_DTYPES else latents.to(self.model.dtype)

    def _begin_call(self) -> None:
        """Called once per top-level call, before its chunks."""

    def _run_tower(self, x, scale, shift):
        raise NotImplementedError

    def _run_reward(self, x, scale, shift, txt, total, logit_scale, start):
        raise NotImplementedError

    def _tower_fn(self, scale: float, shift: float = 0.0) -> Callable[..., torch.Tensor]:
        """The tower's own forward (not the installed :meth:`encode`) at a fixed latent scale and shift."""
        tower, forward = self.tower, type(self.tower).forward

        def tower_fn(x, noise_level=None):
            return forward(tower, x, scale, shift, noise_level)

        return tower_fn

    def _uncaptured(self, latents, scale, shift=0.0, noise_level=None):
        self.stats.uncaptured += 1
        if noise_level is not None and not self._warned_noise:
            self._warned_noise = True
            warn(f"backend {self.backend!r} captures clean-latent calls only: calls with a noise_level run the image "
                 "tower uncaptured" + (" (with the Triton kernels)" if self.fused else ""))
        return self._tower_fn(scale, shift)(latents, noise_level)

    def _weights_need_grad(self) -> bool:
        if not torch.is_grad_enabled() or not any(p.requires_grad for p in self._params):
            return False
        if not self._warned_grad:
            self._warned_grad = True
            warn(f"backend {self.backend!r} treats the image tower's weights as constants, but they require "
                 "grad: running uncaptured (freeze them with model.visual.requires_grad_(False), or use the "
                 "'triton' backend to train them)")
        return True
