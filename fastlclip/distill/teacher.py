"""The pixel CLIP being distilled: an open_clip ``CLIP``, its own preprocessing on tensors, and what a student
takes from it (the text tower, the image tower's transformer for ``init="teacher"``)."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
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
    check_teacher_config(config, f"teacher config {name!r}")
    with tempfile.TemporaryDirectory() as d:  # open_clip registers files by their stem
        with open(os.path.join(d, f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump(dict(config), f)
        open_clip.add_model_config(d)


def check_teacher_config(config: Mapping[str, Any], where: str) -> None:
    """Bounds on an open_clip ViT config's sizes, checked before anything is allocated: the limits fastlclip's
    own configs have (``fastlclip.model_configs.LIMITS``, at most ``MAX_PARAMS`` parameters). Keys left out
    take open_clip's defaults (ViT-B/16 vision, a 12-layer text tower)."""
    from ..model_configs import MAX_PARAMS, _int, _ratio

    v, t = config["vision_cfg"], config["text_cfg"]
    for key, sub in (("vision_cfg", v), ("text_cfg", t)):
        if not isinstance(sub, Mapping):
            raise ValueError(f"{where}: {key} must be a JSON object of settings, got {type(sub).__name__}")
    embed_dim = _int(config["embed_dim"], "embed_dim", where)
    size = v.get("image_size", 224)
    sizes = [size] if not isinstance(size, (list, tuple)) else list(size)
    if len(sizes) not in (1, 2):
        raise ValueError(f"{where}: vision_cfg.image_size must be an integer or [height, width], got {size!r}")
    sizes = [_int(x, "vision_cfg.image_size", where) for x in sizes]
    if not isinstance(v.get("layers", 12), int) or isinstance(v.get("layers", 12), bool):
        raise ValueError(f"{where}: vision_cfg.layers must be an integer (a ViT teacher), got {v.get('layers')!r}")
    layers = _int(v.get("layers", 12), "vision_cfg.layers", where)
    width = _int(v.get("width", 768), "vision_cfg.width", where)
    _int(v.get("head_width", 64), "vision_cfg.head_width", where)
    patch = _int(v.get("patch_size", 16), "vision_cfg.patch_size", where)
    if patch > min(sizes):
        raise ValueError(f"{where}: vision_cfg.patch_size {patch} is larger than the image ({size!r})")
    ratio = _ratio(v.get("mlp_ratio", 4.0), "vision_cfg.mlp_ratio", where)
    t_ctx = _int(t.get("context_length", 77), "text_cfg.context_length", where)
    t_vocab = _int(t.get("vocab_size", 49408), "text_cfg.vocab_size", where)
    t_width = _int(t.get("width", 512), "text_cfg.width", where)
    _int(t.get("heads", 8), "text_cfg.heads", where)
    t_layers = _int(t.get("layers", 12), "text_cfg.layers", where)
    t_ratio = _ratio(t.get("mlp_ratio", 4.0), "text_cfg.mlp_ratio", where)
    tokens = (sizes[0] // patch) * (sizes[-1] // patch) + 1
    params = (layers * (4 + 2 * ratio) * width**2 + tokens * width + 3 * patch**2 * width + width * embed_dim
              + t_layers * (4 + 2 * t_ratio) * t_width**2 + (t_vocab + t_ctx) * t_width + t_width * embed_dim)
    if params > MAX_PARAMS:
        raise ValueError(f"{where} describes a model of about {params / 1e9:.0f} billion parameters; fastlclip builds "
                         f"teachers of at most {MAX_PARAMS / 1e9:.0f} billion (ViT-L/14 has 0.43 billion): check "
                         "layers and width")


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
        try:
            model = open_clip.create_model(teacher, pretrained=None if pretrained is None else str(pretrained))
        except (RuntimeError, ValueError, KeyError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as e:
            if pretrained is None:
                raise
            first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
            raise ValueError(f"the teacher weights {pretrained} can't be loaded into the open_clip model {teacher!r} "
                             f"({type(e).__name__}: {first}): is the file complete, and are they weights of that "
                             "config? pass the config they were trained with (--teacher-config) or their own "
                             "weights") from None
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
