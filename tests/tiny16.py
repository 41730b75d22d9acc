"""Tiny 16-channel fixtures with FLUX.1's latent constants: a Latent-CLIP config, an AutoencoderKL and an
AutoencoderTiny (random weights), for the tests of every latent consumer on a 16-channel space."""

import copy
import warnings

import torch

import fastlclip

FLUX_SCALING, FLUX_SHIFT = 0.3611, 0.1159  # black-forest-labs/FLUX.1-dev vae/config.json, typed here
LATENT = 8  # 8x8 latents (64 px), patch 2 -> 16 tokens + class token

TINY16 = {
    "embed_dim": 32,
    "vae": "flux1",
    "vision_cfg": {"image_size": 64, "layers": 1, "width": 64, "head_width": 32, "patch_size": 2},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def config(noise_aware: bool = False) -> dict:
    cfg = copy.deepcopy(TINY16)
    if noise_aware:
        cfg["vision_cfg"]["noise_aware"] = True
    return cfg


def model(noise_aware: bool = False, seed: int = 0, **kw) -> fastlclip.LatentCLIP:
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*weights are random")
        return fastlclip.load(config(noise_aware), **kw)


def latents(batch: int = 2, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 16, LATENT, LATENT, generator=g, dtype=dtype)


def flux_kl(seed: int = 0):
    """A two-level 16-channel AutoencoderKL with FLUX's scaling and shift and no quant convs (as FLUX's)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         norm_num_groups=8, latent_channels=16, sample_size=32, scaling_factor=FLUX_SCALING,
                         shift_factor=FLUX_SHIFT, use_quant_conv=False, use_post_quant_conv=False).eval()


def flux_tiny(seed: int = 0):
    """A 16-channel AutoencoderTiny (taef1's layout, narrow): decodes diffusion latents as they are."""
    from diffusers import AutoencoderTiny

    torch.manual_seed(seed)
    return AutoencoderTiny(latent_channels=16, encoder_block_out_channels=(8, 8, 8, 8),
                           decoder_block_out_channels=(8, 8, 8, 8)).eval()
