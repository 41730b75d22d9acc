"""Tiny autoencoders of the 2025-26 latent spaces (issue 33) and tiny Latent-CLIP configs reading them, shared by
the consumers' tests. Each VAE is built from a small config of its diffusers class (no downloads); its space's
registered name is in ``SPACES``.

- ``qwen-image``: AutoencoderKLQwenImage, 2 levels (x2 spatial), z_dim 16, the class's per-channel statistics;
  packed 2x2 into 64-wide tokens.
- ``flux2``: AutoencoderKLFlux2, 2 levels (x2), 8 latent channels patchified 2x2 to 32, non-trivial batch-norm
  statistics (so applying none, or normalising before patchifying, changes every value).
- ``sana``: AutoencoderDC, 2 levels (x2), 8 channels, scaling 0.41407 (the registered SANA constant).
"""

from __future__ import annotations

import warnings

import diffusers
import torch

import fastlclip
from fastlclip import vaes

SPACES = ("qwen-image", "flux2", "sana")
SANA_SCALING = 0.41407  # mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers (docs/vaes.md), typed here


def tiny_vae(space: str, seed: int = 0) -> torch.nn.Module:
    """A tiny VAE of ``space``'s class, its weights seeded."""
    torch.manual_seed(seed)
    if space == "qwen-image":
        vae = diffusers.AutoencoderKLQwenImage(base_dim=8, dim_mult=[1, 2], num_res_blocks=1,
                                               temperal_downsample=[False])
    elif space == "flux2":
        vae = diffusers.AutoencoderKLFlux2(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                                           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=8,
                                           layers_per_block=1, norm_num_groups=4)
        g = torch.Generator().manual_seed(seed + 1)
        n = vae.bn.running_mean.numel()
        vae.bn.running_mean.copy_(torch.randn(n, generator=g) * 2)
        vae.bn.running_var.copy_(torch.rand(n, generator=g) * 4 + 0.25)
    elif space == "sana":
        vae = diffusers.AutoencoderDC(latent_channels=8, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
                                      encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16),
                                      encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
                                      encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
                                      scaling_factor=SANA_SCALING)
    else:
        raise ValueError(f"no tiny VAE for {space!r}; one of {SPACES}")
    return vae.eval()


def vae_config(vae: torch.nn.Module) -> dict:
    """The module's diffusers config as a JSON-able dict (for a model config's ``vae_cfg``)."""
    import json

    return {"_class_name": type(vae).__name__, **json.loads(json.dumps(dict(vae.config), default=list))}


def model_config(vae: torch.nn.Module, name: str, image_size: int = 32, patch_size: int = 2, width: int = 32,
                 embed_dim: int = 16, noise_aware: bool = False) -> dict:
    """A tiny Latent-CLIP config reading ``vae``'s latents (its embedded config under ``name``; FLUX.2's
    statistics as ``vae_stats``)."""
    cfg = {
        "embed_dim": embed_dim, "vae": name, "vae_cfg": vae_config(vae),
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": width, "layers": 2, "heads": 2,
                       "latent_factor": vaes.vae_factor(vae), "noise_aware": noise_aware},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    stats = vaes.weight_stats(vae)
    if stats is not None:
        cfg["vae_stats"] = stats
    return cfg


def model(vae: torch.nn.Module, name: str, seed: int = 0, **kw) -> fastlclip.LatentCLIP:
    """A random tiny Latent-CLIP on ``vae``'s space (float32, eval)."""
    return load(model_config(vae, name, **kw), seed)


def load(cfg: dict, seed: int = 0) -> fastlclip.LatentCLIP:
    """``fastlclip.load(cfg)`` with random weights from ``seed`` (float32, eval), its warning silenced."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fastlclip.load(cfg)


def diffusion_latents(vae: torch.nn.Module, name: str, batch: int = 2, side: int = 16, seed: int = 0,
                      dtype=torch.float32) -> torch.Tensor:
    """Random diffusion-space latents of the grid the pipeline holds for a ``side x side`` VAE latent."""
    space = vaes.latent_space(vae)
    g = torch.Generator().manual_seed(seed)
    h = side // space.patch
    return torch.randn(batch, space.diffusion_channels, h, h, generator=g).to(dtype)
