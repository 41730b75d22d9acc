"""A video distillation world (issue 34): tests/tiny_video.py's tiny video VAEs, clips whose frames are flat colours
drifting from one random colour to another, latent-clip shards written in VAE or diffusion space, a tiny teacher
whose shared direction is removed on such frames, and a student config for one latent frame."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import distill_world as W
from corpus_shards import npy_bytes, write_tar

SIDE = 32  # pixels per frame: 8 x 8 latent frames at x4
LATENT_FRAMES = 3  # T: 9 frames on the causal 4x spaces
# The student: one 8x8 latent frame (at x4: 32 px) in 2x2 patches (16 tokens), the teacher's embed_dim.
STUDENT = {"embed_dim": 32,
           "vision_cfg": {"image_size": SIDE, "latent_factor": 4, "patch_size": 2, "width": 64, "layers": 2,
                          "head_width": 32},
           "text_cfg": {"width": 32, "heads": 2, "layers": 1}}


def videos(n: int, frames: int, seed: int) -> torch.Tensor:
    """``n`` clips ``(n, 3, frames, 32, 32)`` in [-1, 1]: flat colours moving linearly from a random start to a
    random end colour over the clip."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.rand(n, 3, generator=g) * 2 - 1, torch.rand(n, 3, generator=g) * 2 - 1
    w = torch.linspace(0, 1, frames).view(1, 1, frames)
    colours = a[:, :, None] * (1 - w) + b[:, :, None] * w  # (n, 3, F)
    return colours[..., None, None].expand(n, 3, frames, SIDE, SIDE).contiguous()


def make_teacher(n: int = 64):
    """distill_world's tiny teacher with the direction its embeddings of these frames share projected out."""
    import open_clip

    from fastlclip.distill.teacher import preprocess

    torch.manual_seed(0)
    teacher = open_clip.model.CLIP(**W.TEACHER_CFG).eval()
    with torch.no_grad():
        x = videos(n, 5, 1).transpose(1, 2).reshape(-1, 3, SIDE, SIDE)
        feats = teacher.encode_image(preprocess(teacher, x))
        m = F.normalize(feats.mean(0), dim=0)
        teacher.visual.proj.copy_(teacher.visual.proj - torch.outer(teacher.visual.proj @ m, m))
    return teacher


def encode_clips(vae, clips: torch.Tensor) -> torch.Tensor:
    """VAE latents of clips in [-1, 1] (the data, float32, as float64): the VAE's own
    ``encode(x).latent_dist.mode()``, clip by clip (HunyuanVideo 1.5's attention mask fails for a batch in
    diffusers 0.42.1)."""
    with torch.no_grad():
        return torch.cat([vae.encode(c.float()).latent_dist.mode() for c in clips.split(1)]).double()


def to_diffusion_reference(vae, raw: torch.Tensor) -> torch.Tensor:
    """What the pipeline's denoiser holds (float64), transcribed from diffusers: Wan (``pipeline_wan_i2v.py``
    ``prepare_latents``) ``(raw - latents_mean) / latents_std`` per channel; HunyuanVideo 1.5
    (``pipeline_hunyuan_video1_5.py``) ``raw * scaling_factor``."""
    cls = type(vae).__name__
    if cls == "AutoencoderKLWan":
        mean = torch.tensor(vae.config.latents_mean, dtype=torch.float64).view(1, -1, 1, 1, 1)
        std = torch.tensor(vae.config.latents_std, dtype=torch.float64).view(1, -1, 1, 1, 1)
        return (raw.double() - mean) / std
    if cls == "AutoencoderKLHunyuanVideo15":
        return raw.double() * vae.config.scaling_factor
    raise ValueError(f"no reference for {cls}")


def clip_shards(vae, folder: Path, n: int, per_shard: int, seed: int = 2, diffusion: bool = False,
                prompts: bool = False, latent_frames: int = LATENT_FRAMES) -> tuple[list[Path], torch.Tensor]:
    """``latent.npy`` shards of the latent clips (float32; ``diffusion``: in the pipeline's diffusion space) of
    ``videos(n, 9, seed)`` (9 frames: 3 latent frames at 4x temporal, 2 at 8x; ``latent_frames`` says which),
    clip ``i`` keyed ``{i:06d}`` (``prompts``: with a ``txt`` member); also returns their float64 VAE latents
    ``(n, C, T, h, w)``."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = encode_clips(vae, videos(n, 9, seed))
    assert raw.shape[2] == latent_frames, raw.shape
    stored = (to_diffusion_reference(vae, raw) if diffusion else raw).float().numpy()
    paths = []
    for s in range(0, n, per_shard):
        path = folder / f"{s // per_shard:05d}.tar"
        write_tar(path, [(f"{i:06d}", {"latent.npy": npy_bytes(np.ascontiguousarray(stored[i])),
                                       **({"txt": b"a red square"} if prompts else {})})
                         for i in range(s, min(n, s + per_shard))])
        paths.append(path)
    return paths, raw


def reference_targets(vae, teacher, raw: torch.Tensor, spans) -> torch.Tensor:
    """Per-latent-frame targets (float64), written out: the VAE's own ``decode(raw).sample`` of the whole clip, the
    teacher on every frame at its own 32 px with the OpenAI mean / std, normalised, averaged over each span,
    normalised."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    with torch.no_grad():
        vae = copy.deepcopy(vae).double()
        video = torch.cat([vae.decode(c).sample for c in raw.double().split(1)])  # (B, 3, F, H, W), clip by clip
        b, _, f, h, w = video.shape
        x = ((video.transpose(1, 2).reshape(b * f, 3, h, w) + 1) / 2).clamp(0, 1)
        mean = torch.tensor(OPENAI_DATASET_MEAN, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_DATASET_STD, dtype=torch.float64).view(1, 3, 1, 1)
        emb = F.normalize(copy.deepcopy(teacher).double().encode_image((x - mean) / std), dim=-1).view(b, f, -1)
    return F.normalize(torch.stack([emb[:, a:z].mean(1) for a, z in spans], 1), dim=-1)


def spans() -> list[tuple[int, int]]:
    """The frames each of ``LATENT_FRAMES`` latent frames covers on the causal 4x tiny spaces, written out:
    ``[0, 1)``, then four frames each."""
    return [(0, 1)] + [(1 + 4 * (t - 1), 1 + 4 * t) for t in range(1, LATENT_FRAMES)]

