"""Tiny distillation world for the tests: a 16-channel AutoencoderKL with FLUX's layout whose scaling / shift are
measured on its own latents, a tiny open_clip teacher with its shared direction removed, and latent shards."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

IMAGE = 32  # pixels; the latent is 16 x 8 x 8
LOW = 1  # images: LOW x LOW random colours upsampled (1: flat colours), so the teacher is a smooth, learnable function
VAE_CFG = {"in_channels": 3, "out_channels": 3, "latent_channels": 16, "layers_per_block": 1, "norm_num_groups": 8,
           "block_out_channels": [8, 8, 8], "act_fn": "silu",
           "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
           "use_quant_conv": False, "use_post_quant_conv": False}
TEACHER_CFG = {"embed_dim": 32,
               "vision_cfg": {"image_size": IMAGE, "patch_size": 8, "width": 64, "layers": 1, "head_width": 32},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
# The student: 8x8 latents of 16 channels, patch 2 (16 tokens), the teacher's embed_dim.
STUDENT = {"embed_dim": 32,
           "vision_cfg": {"image_size": 64, "latent_factor": 8, "latent_n_channels": 16, "patch_size": 2,
                          "width": 64, "layers": 2, "head_width": 32},
           "text_cfg": {"width": 32, "heads": 2, "layers": 1}}


def images(n: int, seed: int) -> torch.Tensor:
    """Random images in [-1, 1]: LOW x LOW random colours, upsampled."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, LOW, LOW, generator=g) * 2 - 1
    return F.interpolate(low, size=(IMAGE, IMAGE), mode="bilinear", align_corners=False)


def make_vae(n: int = 64):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(**VAE_CFG).eval()
    with torch.no_grad():
        raw = vae.encode(images(n, 1)).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / raw.std()), shift_factor=float(raw.mean()))
    return vae


def make_teacher(vae, n: int = 128):
    """The tiny teacher with the direction all its embeddings share projected out of ``visual.proj``."""
    import open_clip

    from fastlclip.distill.teacher import preprocess

    torch.manual_seed(0)
    teacher = open_clip.model.CLIP(**TEACHER_CFG).eval()
    with torch.no_grad():
        decoded = vae.decode(vae.encode(images(n, 1)).latent_dist.mean).sample
        feats = teacher.encode_image(preprocess(teacher, decoded))
        m = F.normalize(feats.mean(0), dim=0)
        teacher.visual.proj.copy_(teacher.visual.proj - torch.outer(teacher.visual.proj @ m, m))
    return teacher


def write_shards(vae, folder: Path, n: int, per_shard: int, seed: int = 2, prompt_of=None) -> list[Path]:
    """``latent.npy`` WebDataset shards of raw VAE latents (posterior means); with ``prompt_of``, sample ``i``
    also has the ``txt`` member ``prompt_of(i)`` (none where it returns None)."""
    folder.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        raw = vae.encode(images(n, seed)).latent_dist.mean
    paths = []
    for s in range(0, n, per_shard):
        path = folder / f"{s // per_shard:05d}.tar"
        with tarfile.open(path, "w") as tf:
            for i in range(s, min(n, s + per_shard)):
                buf = io.BytesIO()
                np.save(buf, raw[i].numpy())
                members = {"latent.npy": buf.getvalue()}
                prompt = prompt_of(i) if prompt_of is not None else None
                if prompt is not None:
                    members["txt"] = prompt.encode()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{i:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def save_teacher(teacher, folder: Path) -> tuple[Path, Path]:
    """The teacher as open_clip files: its config JSON and its weights."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg, weights = folder / "tiny-teacher.json", folder / "tiny-teacher.pt"
    cfg.write_text(json.dumps(TEACHER_CFG))
    torch.save(teacher.state_dict(), weights)
    return cfg, weights
