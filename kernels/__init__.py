"""Fused Triton kernels for Latent-CLIP, with autograd and PyTorch fallbacks.

- :func:`patch_embed`: latents * scale -> patchify conv -> class token -> + pos -> ln_pre, one kernel.
- :func:`attention` / :func:`attention_packed`: FlashAttention-2 style forward and backward on strided
  q/k/v views (e.g. of a packed ``in_proj`` output), causal or not, any sequence length.

The ``*_torch`` functions are the unfused PyTorch references, used as fallback where
:func:`kernels_available` is False. Set ``TRITON_INTERPRET=1`` *before* importing this package to run
the kernels on CPU tensors through Triton's interpreter (Triton reads it when kernels are decorated).
"""

from ._launch import kernels_available
from .flash_attention import attention, attention_packed, attention_torch
from .fused_patch_embed import patch_embed, patch_embed_torch

__all__ = [
    "attention",
    "attention_packed",
    "attention_torch",
    "kernels_available",
    "patch_embed",
    "patch_embed_torch",
]
