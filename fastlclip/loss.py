"""The CLIP reward loss, in one place: every reward, the safety guidance and the captured / compiled
reward steps of ``fastlclip.runtime`` compute it with these functions.

ReNO's CLIP form: ``100 - logit_scale.exp() * cos(image, text)``, averaged over the batch; lower is
better. Features and the scale are upcast to at least float32 first, so a bf16 model's loss and its
gradient are not rounded to bf16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32, or in its own dtype when wider (float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def normalized(feats: torch.Tensor) -> torch.Tensor:
    """Unit-length rows of ``feats``, upcast to at least float32."""
    return F.normalize(at_least_fp32(feats), dim=-1)


def cosine(feats: torch.Tensor, txt: torch.Tensor) -> torch.Tensor:
    """(B,) cosine of raw image features ``feats`` (B, D) to normalised text features ``txt`` ((D,) or (B, D))."""
    return (normalized(feats) * txt).sum(dim=-1)


def logit_scale_exp(logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's temperature ``logit_scale.exp()``, detached (the weights are frozen), at least float32."""
    return at_least_fp32(logit_scale.detach().exp())


def clip_loss(cos: torch.Tensor, logit_scale: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """``100 - logit_scale.exp() * mean(cos)``; with ``weights`` (1/B on the B real rows, 0 on padding, as
    the runtimes' static batches have) the weighted sum replaces the mean. ``logit_scale`` gets no gradient."""
    return 100.0 - logit_scale_exp(logit_scale) * (cos.mean() if weights is None else (cos * weights).sum())
