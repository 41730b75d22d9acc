"""SDXL's two text encoders with random weights, so the ``reno`` pipeline pays for the prompt encoding that ReNO
runs every iteration even when no SDXL-Turbo weights are at hand.

ReNO's ``RewardStableDiffusionXL.apply`` (models/RewardStableDiffusionXL.py in ExplainableML/ReNO) calls
diffusers' ``StableDiffusionXLPipeline.encode_prompt`` on every call, that is every iteration: the prompt
goes through ``text_encoder`` (CLIP ViT-L/14's text tower, ``CLIPTextModel``) and ``text_encoder_2``
(OpenCLIP bigG's, ``CLIPTextModelWithProjection``); the UNet gets both penultimate hidden states
concatenated (77 x 2048) and the second encoder's projected pooled output (1280). ``TextEncoders`` does the
same with ``transformers`` models built from SDXL's text-encoder configs (the values of
stabilityai/sdxl-turbo's ``text_encoder/config.json`` and ``text_encoder_2/config.json``), random weights,
and open_clip's tokenizer for both (the same BPE; SDXL's second tokenizer pads with ``!``, not 0, which
changes no cost). Timing is faithful; the embeddings are meaningless.
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from fastlclip import inputs
from fastlclip.reno import OneStepGenerator

# SDXL's text encoders (stabilityai/sdxl-turbo text_encoder/ and text_encoder_2/ config.json).
TEXT_ENCODER = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                "hidden_act": "quick_gelu", "projection_dim": 768, "vocab_size": 49408, "max_position_embeddings": 77}
TEXT_ENCODER_2 = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
                  "hidden_act": "gelu", "projection_dim": 1280, "vocab_size": 49408, "max_position_embeddings": 77}
# Tiny stand-ins for bench.tiny's UNet: 16 + 16 = cross_attention_dim 32, pooled 16.
TINY_TEXT_ENCODER = {"hidden_size": 16, "intermediate_size": 32, "num_attention_heads": 2, "num_hidden_layers": 2,
                     "hidden_act": "quick_gelu", "projection_dim": 16, "vocab_size": 49408, "max_position_embeddings": 77}
TINY_TEXT_ENCODER_2 = {**TINY_TEXT_ENCODER, "hidden_act": "gelu"}


def available() -> bool:
    return importlib.util.find_spec("transformers") is not None


class TextEncoders(nn.Module):
    """``encode(prompt) -> (prompt_embeds (1, 77, d1 + d2), pooled (1, d2))`` as SDXL's ``encode_prompt``."""

    def __init__(self, config_1: dict, config_2: dict, *, device, dtype, seed: int = 0):
        super().__init__()
        if not available():
            raise ImportError("the reno pipeline runs SDXL's text encoders every iteration, as ReNO does; they need the "
                              "'transformers' package: pip install transformers")
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        torch.manual_seed(seed)
        with torch.device(device):
            self.text_encoder = CLIPTextModel(CLIPTextConfig(**config_1))
            self.text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config_2))
        self.to(dtype=dtype).eval().requires_grad_(False)

    @classmethod
    def sdxl(cls, *, device, dtype) -> "TextEncoders":
        return cls(TEXT_ENCODER, TEXT_ENCODER_2, device=device, dtype=dtype)

    @classmethod
    def tiny(cls, *, device="cpu", dtype=torch.float32) -> "TextEncoders":
        return cls(TINY_TEXT_ENCODER, TINY_TEXT_ENCODER_2, device=device, dtype=dtype)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids = inputs.tokenize([prompt], 77).to(self.device)  # a host-to-device copy per call, as in the pipeline
        hidden, pooled = [], None
        for encoder in (self.text_encoder, self.text_encoder_2):
            out = encoder(ids, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = out[0]  # the second encoder's projected pooled output is the one kept
        return torch.cat(hidden, dim=-1), pooled


def generator_with_text_encoders(unet, vae, text: TextEncoders, *, height: int, width: int,
                                 preset: str = "sdxl-turbo") -> OneStepGenerator:
    """A random-weights ``OneStepGenerator`` whose ``encode_prompt`` runs ``text`` (random weights throughout)."""
    gen = OneStepGenerator(unet, vae=vae, height=height, width=width, prompt_encoder=text.encode, random_weights=True,
                           preset=preset)
    gen.text_encoders = text  # keeps them alive with the generator
    return gen
