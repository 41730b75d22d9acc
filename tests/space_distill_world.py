"""A distillation world on each 2025-26 latent space (tests/tiny_spaces.py's tiny VAEs, x2 spatial): image shards,
diffusion-space latent shards written with the pipelines' own formulas (transcribed below), a tiny teacher whose
shared direction is removed on the images, and a student config for the 16x16 latents of 32 px images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import distill_world as W
from corpus_shards import npy_bytes, png_bytes, write_tar

IMAGE = W.IMAGE  # 32 px: 16 x 16 latents at x2
# The student: the 16x16 grid in 4x4 patches (16 tokens), the teacher's embed_dim; latent_factor 2 is the tiny
# VAEs' (distill.train sets it from the VAE anyway).
STUDENT = {"embed_dim": 32,
           "vision_cfg": {"image_size": IMAGE, "latent_factor": 2, "patch_size": 4, "width": 64, "layers": 2,
                          "head_width": 32},
           "text_cfg": {"width": 32, "heads": 2, "layers": 1}}


def uint8_images(n: int, seed: int) -> torch.Tensor:
    """distill_world's flat-colour images as the uint8 pixels a PNG holds, (n, 3, 32, 32)."""
    return ((W.images(n, seed) + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)


def make_teacher(n: int = 128):
    """distill_world's tiny teacher with the direction its embeddings of these images share projected out."""
    import open_clip

    from fastlclip.distill.teacher import preprocess

    torch.manual_seed(0)
    teacher = open_clip.model.CLIP(**W.TEACHER_CFG).eval()
    with torch.no_grad():
        feats = teacher.encode_image(preprocess(teacher, uint8_images(n, 1).float() / 255 * 2 - 1))
        m = F.normalize(feats.mean(0), dim=0)
        teacher.visual.proj.copy_(teacher.visual.proj - torch.outer(teacher.visual.proj @ m, m))
    return teacher


def image_shards(folder: Path, n: int, per_shard: int, seed: int = 2) -> list[Path]:
    """PNG WebDataset shards of ``uint8_images(n, seed)``, sample ``i`` keyed ``{i:06d}``."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = uint8_images(n, seed).permute(0, 2, 3, 1).numpy()
    paths = []
    for s in range(0, n, per_shard):
        path = folder / f"{s // per_shard:05d}.tar"
        write_tar(path, [(f"{i:06d}", {"png": png_bytes(np.ascontiguousarray(pixels[i]))})
                         for i in range(s, min(n, s + per_shard))])
        paths.append(path)
    return paths


def encode_reference(vae, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents of uint8 images, float64, as the pipelines encode: ``retrieve_latents(vae.encode(x),
    sample_mode="argmax")`` (the posterior mode; DC-AE: ``.latent``); Qwen-Image on one frame
    (``pipeline_qwenimage_img2img.py`` ``_encode_vae_image``)."""
    import copy

    vae = copy.deepcopy(vae).double()
    x = pixels.double() / 255 * 2 - 1
    qwen = type(vae).__name__ == "AutoencoderKLQwenImage"
    with torch.no_grad():
        out = vae.encode(x[:, :, None] if qwen else x)
        raw = out.latent_dist.mode() if hasattr(out, "latent_dist") else out.latent
    return raw[:, :, 0] if qwen else raw


def decode_reference(vae, raw: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], float64, as the pipelines decode (``vae.decode(z).sample``; Qwen-Image on one frame,
    ``pipeline_qwenimage.py``)."""
    import copy

    vae = copy.deepcopy(vae).double()
    qwen = type(vae).__name__ == "AutoencoderKLQwenImage"
    with torch.no_grad():
        out = vae.decode(raw.double()[:, :, None] if qwen else raw.double()).sample
    return out[:, :, 0] if qwen else out


def _stats(vae) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-channel mean and std the pipeline normalises with (float64, (1, C, 1, 1))."""
    if type(vae).__name__ == "AutoencoderKLQwenImage":
        mean, std = torch.tensor(vae.config.latents_mean), torch.tensor(vae.config.latents_std)
    else:  # FLUX.2: the batch norm's running statistics
        mean, std = vae.bn.running_mean, torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps)
    return mean.double().view(1, -1, 1, 1), std.double().view(1, -1, 1, 1)


def to_diffusion_reference(vae, raw: torch.Tensor, packed: bool = True) -> torch.Tensor:
    """What the pipeline's denoiser holds for VAE latents ``raw`` (float64), transcribed from diffusers:

    - Qwen-Image (``pipeline_qwenimage_img2img.py`` ``_encode_vae_image`` then ``_pack_latents``):
      ``(raw - latents_mean) / latents_std``, packed 2x2 into (B, (h/2)(w/2), 4C) tokens (``packed=False``: the
      grid before packing);
    - FLUX.2 (``pipeline_flux2.py`` ``_patchify_latents``, then ``(x - bn.running_mean) / sqrt(bn.running_var +
      batch_norm_eps)``): the (B, 4C, h/2, w/2) grid;
    - DC-AE (SANA, ``pipeline_sana.py``): ``raw * scaling_factor``.
    """
    cls = type(vae).__name__
    x = raw.double()
    if cls == "AutoencoderKLQwenImage":
        mean, std = _stats(vae)
        x = (x - mean) / std
        if not packed:
            return x
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b, (h // 2) * (w // 2), c * 4)
    if cls == "AutoencoderKLFlux2":
        b, c, h, w = x.shape
        x = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        mean, std = _stats(vae)
        return (x - mean) / std
    if cls == "AutoencoderDC":
        return x * vae.config.scaling_factor
    raise ValueError(f"no reference for {cls}")


def to_vae_reference(vae, z: torch.Tensor) -> torch.Tensor:
    """The pipelines' decode preparation of the diffusion grid ``z`` (float64): Qwen-Image ``z * latents_std +
    latents_mean`` (``pipeline_qwenimage.py``, after ``_unpack_latents``); FLUX.2 ``z * bn_std + bn_mean`` then
    ``_unpatchify_latents``; DC-AE ``z / scaling_factor``."""
    cls = type(vae).__name__
    x = z.double()
    if cls == "AutoencoderKLQwenImage":
        mean, std = _stats(vae)
        return x * std + mean
    if cls == "AutoencoderKLFlux2":
        mean, std = _stats(vae)
        x = x * std + mean
        b, c, h, w = x.shape
        return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
    if cls == "AutoencoderDC":
        return x / vae.config.scaling_factor
    raise ValueError(f"no reference for {cls}")


def latent_shards(vae, folder: Path, n: int, per_shard: int, seed: int = 2) -> tuple[list[Path], torch.Tensor]:
    """``latent.npy`` shards of the diffusion-space latents (``to_diffusion_reference``, float32) of
    ``uint8_images(n, seed)``; also returns their float64 VAE latents (``encode_reference``)."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = encode_reference(vae, uint8_images(n, seed))
    z = to_diffusion_reference(vae, raw).float().numpy()
    paths = []
    for s in range(0, n, per_shard):
        path = folder / f"{s // per_shard:05d}.tar"
        write_tar(path, [(f"{i:06d}", {"latent.npy": npy_bytes(z[i])}) for i in range(s, min(n, s + per_shard))])
        paths.append(path)
    return paths, raw
