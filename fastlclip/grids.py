"""Latent grids other than the trained one: the two resize policies, in plain PyTorch.

A Latent-CLIP image tower is trained on one square latent grid (64x64 for the 512 px configs). SDXL
generates at 1024 px (128x128 latents) and at other aspect ratios (1152x896 px -> 144x112 latents,
1344x768 -> 168x96, ...). ``LatentCLIP.encode_latents(..., resize=...)`` takes one of:

- ``"interpolate"``: the latents are read at their own size; the positional embeddings are resampled to
  their patch grid as open_clip's ``resize_pos_embed`` does (:func:`resize_pos_embed`). Every latent
  pixel is seen; the tower runs over more tokens (B/8 at 128x128: 257 instead of 65, about 4x the cost).
- ``"pool"``: the latents are centre-cropped to a square and area-pooled to the trained grid
  (:func:`pool_latents`); the tower costs what it costs at the trained size.
- ``None``: refuse any grid but the trained one (the default, the behaviour before policies existed).

At the trained grid both policies are exact no-ops. Neither has been validated against the official
weights at sizes they were not trained on (see the README, "Latent sizes").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

RESIZE_POLICIES = (None, "interpolate", "pool")


class _ModelDefault:
    """The ``resize`` argument's default: the model's own policy (``model.resize``)."""

    def __repr__(self) -> str:
        return "<model.resize>"


MODEL_DEFAULT = _ModelDefault()


def check_resize(resize) -> None:
    if resize not in RESIZE_POLICIES:
        raise ValueError(f"resize must be None, 'interpolate' or 'pool', got {resize!r}")


def resize_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A ``(1 + g*g, width)`` positional table (class token first, a square g x g grid) resampled to
    ``grid = (rows, cols)`` patches: ``(1 + rows*cols, width)``.

    As open_clip's ``resize_pos_embed`` (``open_clip/model.py``): the class token is kept as it is; the grid part is reshaped to
    ``(1, width, g, g)`` and resampled with ``F.interpolate(mode="bicubic", antialias=True,
    align_corners=False)``. The arithmetic runs in float32 at least (bf16/fp16 tables are upcast, the
    result cast back). Differentiable w.r.t. ``pos``.
    """
    cls, img = pos[:1], pos[1:]
    g = math.isqrt(img.shape[0])
    if g * g != img.shape[0]:
        raise ValueError(f"positional table of {pos.shape[0]} rows is not a class token plus a square grid")
    rows, cols = grid
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in (rows, cols)):
        raise ValueError(f"grid must be two positive integers (rows, cols) of patches, got {tuple(grid)!r}")
    if (rows, cols) == (g, g):
        return pos
    x = img.to(torch.promote_types(img.dtype, torch.float32)).reshape(1, g, g, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(rows, cols), mode="bicubic", antialias=True, align_corners=False)
    x = x.permute(0, 2, 3, 1).reshape(rows * cols, -1).to(pos.dtype)
    return torch.cat([cls, x])


def pool_latents(latents: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, H, W)`` latents -> ``(B, C, size, size)``: centre-crop to a square, then area-pool.

    Aspect: a non-square grid is centre-cropped to its short side first (``min(H, W)``, the crop's
    offset rounded down), then pooled to ``size`` x ``size``, so content keeps its aspect and the ends of
    the long side are dropped. This is what CLIP's own preprocessing (open_clip's ``Resize`` of the
    short side + ``CenterCrop``, and ``PixelCLIPReward.preprocess``) does to a non-square image, which is
    how Latent-CLIP's training images reached their 512 px squares. Pooling both sides independently
    would squash the content instead, a distortion the model never saw in training.

    Pooling is ``F.adaptive_avg_pool2d`` (area interpolation): for an integer factor (128 -> 64) the
    plain mean of each k x k block; otherwise overlapping area windows (112 -> 64). A grid smaller than
    ``size`` is upsampled by repetition. At ``size`` x ``size`` the latents are returned as they are.
    Differentiable w.r.t. ``latents``.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be a positive integer (the trained latent grid's side), got {size!r}")
    h, w = latents.shape[-2:]
    if min(h, w) == 0:
        raise ValueError(f"latents have an empty {h}x{w} grid; nothing to pool")
    if (h, w) == (size, size):
        return latents
    s = min(h, w)
    top, left = (h - s) // 2, (w - s) // 2
    x = latents[..., top:top + s, left:left + s]
    return x if s == size else F.adaptive_avg_pool2d(x, size)
