"""Tiny video autoencoders of the registered video spaces (issue 34) and tiny Latent-CLIP configs reading them,
shared by the video tests. Each VAE is its diffusers class built from a small config (no downloads, a few
channels, seeded weights); ``SPACES`` maps a tiny VAE to the registered space whose layout it copies.

- ``wan2.1``: AutoencoderKLWan, 3 levels (x4 spatial, x4 temporal: ``temperal_downsample`` [True, True]),
  z_dim 16 with the class's (= Wan 2.1's) per-channel statistics.
- ``wan2.2-ti2v``: AutoencoderKLWan with the TI2V layout: ``patch_size`` 2 inside the VAE (12 = 3 x 2 x 2 pixel
  channels), ``is_residual``, 8 latent channels with non-trivial statistics (x8 spatial, x4 temporal).
- ``hunyuanvideo``: AutoencoderKLHunyuanVideo, 3 blocks (x4, x4), 4 channels, the class's scaling 0.476986.
- ``hunyuanvideo-1.5``: AutoencoderKLHunyuanVideo15, 3 blocks (x4, x4), 4 channels, scaling 1.03682.
- ``ltx-video``: AutoencoderKLLTXVideo, 3 levels and patch 1 (x8 spatial, x8 temporal, as LTX's 8x), 8 channels,
  scaling 0.7 (published: 1.0; not 1 here, so dropping it changes every value), non-trivial ``latents_mean`` / ``latents_std`` buffers (applying none changes every value).
"""

from __future__ import annotations


import diffusers
import torch

import fastlclip
from fastlclip import vaes
import tiny_spaces
from tiny_spaces import load, vae_config

SPACES = ("wan2.1", "wan2.2-ti2v", "hunyuanvideo", "hunyuanvideo-1.5", "ltx-video")
CAUSAL_DECODERS = ("wan2.1", "wan2.2-ti2v", "hunyuanvideo-1.5")  # measured: tests/test_video_spaces.py


def tiny_vae(space: str, seed: int = 0) -> torch.nn.Module:
    """A tiny VAE of ``space``'s class and layout, its weights seeded."""
    torch.manual_seed(seed)
    if space == "wan2.1":
        vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 2, 2], num_res_blocks=1,
                                         temperal_downsample=[True, True], scale_factor_spatial=4)
    elif space == "wan2.2-ti2v":
        g = torch.Generator().manual_seed(seed + 1)
        vae = diffusers.AutoencoderKLWan(
            base_dim=8, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=1,
            temperal_downsample=[True, True], is_residual=True, in_channels=12, out_channels=12, patch_size=2,
            scale_factor_spatial=8, latents_mean=(torch.randn(8, generator=g) * 0.3).tolist(),
            latents_std=(torch.rand(8, generator=g) + 0.4).tolist())
    elif space == "hunyuanvideo":
        vae = diffusers.AutoencoderKLHunyuanVideo(
            block_out_channels=(8, 8, 16), latent_channels=4, layers_per_block=1, norm_num_groups=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 3, up_block_types=("HunyuanVideoUpBlock3D",) * 3,
            spatial_compression_ratio=4, temporal_compression_ratio=4)
    elif space == "hunyuanvideo-1.5":
        vae = diffusers.AutoencoderKLHunyuanVideo15(block_out_channels=(8, 16, 16), latent_channels=4,
                                                    layers_per_block=1, spatial_compression_ratio=4,
                                                    temporal_compression_ratio=4)
    elif space == "ltx-video":
        vae = diffusers.AutoencoderKLLTXVideo(
            latent_channels=8, block_out_channels=(8, 16, 16), decoder_block_out_channels=(8, 16, 16),
            down_block_types=("LTXVideoDownBlock3D",) * 3, layers_per_block=(1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1), spatio_temporal_scaling=(True, True, True),
            decoder_spatio_temporal_scaling=(True, True, True), decoder_inject_noise=(False,) * 4,
            downsample_type=("conv",) * 3, upsample_residual=(False,) * 3, upsample_factor=(1,) * 3, patch_size=1,
            patch_size_t=1, scaling_factor=0.7)
        g = torch.Generator().manual_seed(seed + 1)
        vae.latents_mean.copy_(torch.randn(8, generator=g))
        vae.latents_std.copy_(torch.rand(8, generator=g) * 2 + 0.25)
    else:
        raise ValueError(f"no tiny video VAE for {space!r}; one of {SPACES}")
    return vae.eval()


def model_config(vae: torch.nn.Module, name: str, side: int = 4, patch_size: int = 2, width: int = 32,
                 embed_dim: int = 16, noise_aware: bool = False) -> dict:
    """A tiny Latent-CLIP config reading one latent frame (``side x side``) of ``vae``'s clips (its embedded
    config under ``name``; LTX-Video's statistics as ``vae_stats``): tiny_spaces' config at that size."""
    return tiny_spaces.model_config(vae, name, image_size=side * vaes.vae_factor(vae), patch_size=patch_size,
                                    width=width, embed_dim=embed_dim, noise_aware=noise_aware)


def model(vae: torch.nn.Module, name: str, seed: int = 0, **kw) -> fastlclip.LatentCLIP:
    """A random tiny Latent-CLIP on ``vae``'s space (float32, eval)."""
    return load(model_config(vae, name, **kw), seed)


def clips(vae: torch.nn.Module, batch: int = 2, frames: int = 3, side: int = 4, seed: int = 0,
          dtype=torch.float64) -> torch.Tensor:
    """Random diffusion-space clips ``(B, C, T, side, side)`` of ``vae``'s space."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vaes.vae_channels(vae), frames, side, side, generator=g).to(dtype)
