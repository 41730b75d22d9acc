"""The pixel CLIP being distilled: an open_clip ``CLIP``, its own preprocessing on tensors, and what a student
takes from it (the text tower, the image tower's transformer for ``init="teacher"``)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .. import grids

# The parameters a Latent-CLIP's text side shares, by name and layout, with an open_clip CLIP.
TEXT_PREFIXES = ("token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection",
                 "logit_scale")
# What ``init="teacher"`` copies from the teacher's image tower (the patch embedding is the student's own).
COPIED = ("class_embedding", "ln_pre.", "transformer.", "ln_post.", "proj")


def register_teacher_config(name: str, config: Mapping[str, Any] | str | os.PathLike) -> None:
    """Register an open_clip model config (a dict or a JSON file) under ``name`` in open_clip's registry."""
    import open_clip

    from ..vaes import check_depth, read_json_file

    if not isinstance(config, Mapping):
        config = read_json_file(config, "teacher config")  # unreadable, bad JSON, nested too deep: ValueError
    else:
        check_depth(config, "teacher config")
    if not isinstance(config, Mapping) or not {"embed_dim", "vision_cfg", "text_cfg"} <= set(config):
        raise ValueError("a teacher config is an open_clip model config: a JSON object with embed_dim, vision_cfg "
                         "and text_cfg")
    with tempfile.TemporaryDirectory() as d:  # open_clip registers files by their stem
        with open(os.path.join(d, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(dict(config), f)
        open_clip.add_model_config(d)


def load_teacher(teacher, pretrained=None, config=None, device=None) -> nn.Module:
    """An open_clip ``CLIP`` in eval mode, frozen, on ``device`` (None: where it is): a module as it is, or a
    name (``config``, a dict or JSON file, registers it first)."""
    import open_clip

    if isinstance(teacher, nn.Module):
        model = teacher
    else:
        if config is not None:
            register_teacher_config(teacher, config)
        if teacher not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {teacher!r}: pass one of open_clip.list_models() or "
                             "--teacher-config JSON to register it")
        if pretrained is not None and not os.path.exists(str(pretrained)):
            raise FileNotFoundError(f"teacher weights not found: {pretrained}")
        model = open_clip.create_model(teacher, pretrained=None if pretrained is None else str(pretrained))
    check_teacher(model)
    if device is not None:
        model = model.to(device)
    return model.eval().requires_grad_(False)


def check_teacher(model: nn.Module) -> None:
    visual = getattr(model, "visual", None)
    if visual is None or not hasattr(visual, "conv1") or not hasattr(model, "token_embedding"):
        raise ValueError(f"the teacher must be an open_clip CLIP with a ViT image tower, got {type(model).__name__}")


def teacher_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    visual = model.visual
    cfg = getattr(visual, "preprocess_cfg", None) or {}
    mean = cfg.get("mean") or getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN
    std = cfg.get("std") or getattr(visual, "image_std", None) or OPENAI_DATASET_STD
    return tuple(mean), tuple(std)


def resize_crop(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]: the shorter side resized to ``size`` (bicubic, antialiased), centre-cropped."""
    h, w = images.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        images = F.interpolate(images, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (nh - size) // 2, (nw - size) // 2
        images = images[..., top:top + size, left:left + size]
    return images


def preprocess(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] (B, 3, H, W) -> the teacher's input: open_clip's default transform on tensors
    (bicubic resize of the shorter side to the tower's size, centre crop, its mean / std)."""
    size = model.visual.image_size
    x = resize_crop(((images.float() + 1) / 2).clamp(0, 1), size if isinstance(size, int) else size[0])
    mean, std = teacher_mean_std(model)
    mean = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def embed_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Normalised teacher embeddings (float32) of images in [-1, 1]."""
    dtype = next(model.parameters()).dtype
    return F.normalize(model.encode_image(preprocess(model, images).to(dtype)).float(), dim=-1)


def _gelu_only(module: nn.Module, what: str) -> None:
    from open_clip.transformer import QuickGELU

    if any(isinstance(m, QuickGELU) for m in module.modules()):
        raise ValueError(f"the teacher's {what} uses QuickGELU (OpenAI-style weights); fastlclip's towers use GELU, "
                         "so they can't carry it exactly: pick a teacher trained with GELU")


def text_config(model: nn.Module) -> dict[str, Any]:
    """The fastlclip ``text_cfg`` and ``embed_dim`` of the teacher's text tower, read from its modules."""
    _gelu_only(model.transformer, "text tower")
    blocks = model.transformer.resblocks
    width = model.token_embedding.embedding_dim
    return {
        "embed_dim": int(model.text_projection.shape[1]),
        "text_cfg": {"context_length": int(model.positional_embedding.shape[0]),
                     "vocab_size": int(model.token_embedding.num_embeddings), "width": int(width),
                     "heads": int(blocks[0].attn.num_heads), "layers": len(blocks),
                     "mlp_ratio": blocks[0].mlp.c_fc.out_features / width},
    }


def text_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The teacher's text tower and logit scale, under the names a ``LatentCLIP`` uses."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(TEXT_PREFIXES) and k != "attn_mask"}


def copy_image_tower(student_vit: nn.Module, model: nn.Module) -> None:
    """``init="teacher"``: the teacher's class token, ln_pre, transformer, ln_post and proj into the student's
    tower, its positional table resampled to the student's patch grid; the patch embedding stays the student's."""
    _gelu_only(model.visual.transformer, "image tower")
    src = model.visual.state_dict()
    own = student_vit.state_dict()
    picked = {k: v for k, v in src.items() if k.startswith(COPIED)}
    missing = sorted(k for k in own if k.startswith(COPIED) and k not in picked)
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in picked.items() if k in own and v.shape != own[k].shape]
    extra = sorted(k for k in picked if k not in own)
    if missing or bad or extra:
        detail = (f"missing {missing[:4]}" if missing else f"unexpected {extra[:4]}" if extra
                  else f"{bad[0][0]} is {bad[0][1]} in the teacher, {bad[0][2]} in the student")
        raise ValueError("init='teacher' needs the student's image tower to match the teacher's (width, layers, "
                         f"heads, MLP ratio, embed_dim): {detail}")
    grid = student_vit.cfg.grid
    pos = grids.resize_pos_embed(src["positional_embedding"].float(), (grid, grid))
    with torch.no_grad():
        for k, v in picked.items():
            own[k].copy_(v)
        student_vit.positional_embedding.copy_(pos)
