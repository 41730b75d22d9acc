"""Tiny stand-ins for the real models, with the real architectures' structure: the CPU smoke test's configs.

64x64-pixel images, 8x8x4 latents: an SDXL-style UNet (text_time conditioning), a 4-level VAE (factor 8),
a Latent-CLIP config in the authors' schema and an open_clip CLIP.
"""

from __future__ import annotations

IMAGE_SIZE = 64

UNET = {
    "sample_size": IMAGE_SIZE // 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "attention_head_dim": [2, 4],
    "transformer_layers_per_block": [1, 1],
    "cross_attention_dim": 32,
    "norm_num_groups": 8,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 16,  # six time ids + a 16-wide pooled text embedding
}

VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [8, 16, 16, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "sample_size": IMAGE_SIZE,
    "scaling_factor": 0.13025,
}

LATENT_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 2, "width": 64, "patch_size": 4, "heads": 2,
                   "latent_factor": 8, "latent_n_channels": 4},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def open_clip_model():
    """A tiny open_clip CLIP (32-px ViT image tower), random weights."""
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

    return CLIP(embed_dim=32,
                vision_cfg=CLIPVisionCfg(image_size=32, patch_size=8, width=64, layers=2, head_width=32),
                text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=2))
