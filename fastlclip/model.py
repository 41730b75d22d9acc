"""Latent-CLIP in plain PyTorch: the exact reference every fast path is checked against.

Fast paths attach from outside (``fastlclip.runtime``): a Triton attention function set on each
:class:`PackedAttention` (``attention_fn``), a fused patch embedding set on the :class:`LatentViT`
(``patch_embed_fn``), or the image tower's ``forward`` rebound to a CUDA-graph / compiled runtime. This
file imports neither the kernels nor the runtimes.

Parameter names follow the authors' open_clip fork, so an official state dict (``module.`` prefix
removed) loads as it is: the vision tower lives under ``visual.latent_vit.``, the optional frozen SDXL
VAE encoder under ``visual.vae_encoder.`` / ``visual.vae_quant_conv.``, the text tower at top level.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import inputs
from .model_configs import ModelConfig, VisionConfig


class PackedAttention(nn.Module):
    """Multi-head self-attention with open_clip's packed ``in_proj`` layout.

    ``attention_fn``: None runs PyTorch's SDPA; a fast path sets a function
    ``(qkv (B, L, 3 * width), heads, causal=...) -> (B, L, width)`` such as ``fastlclip.kernels.attention_packed``.
    """

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.attention_fn = None
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if self.attention_fn is not None:
            out = self.attention_fn(qkv, self.heads, causal=causal)
        else:
            q, k, v = qkv.view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(b, n, w)
        return self.out_proj(out)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float):
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.ln_1 = nn.LayerNorm(width)
        self.attn = PackedAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(
            OrderedDict(c_fc=nn.Linear(width, hidden), gelu=nn.GELU(), c_proj=nn.Linear(hidden, width))
        )

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.resblocks = nn.ModuleList(ResidualAttentionBlock(width, heads, mlp_ratio) for _ in range(layers))

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, causal)
        return x


class LatentViT(nn.Module):
    """ViT over a (B, C, H, W) latent: patch conv, class token, positions, ln_pre, blocks, ln_post, proj.

    ``patch_embed_fn``: None runs :meth:`embed`'s PyTorch ops; a fast path sets a function with
    ``fastlclip.kernels.patch_embed``'s signature, which reads the latents in their own dtype.
    """

    def __init__(self, cfg: VisionConfig, embed_dim: int):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        scale = w**-0.5
        self.conv1 = nn.Conv2d(cfg.latent_channels, w, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(w))
        self.positional_embedding = nn.Parameter(scale * torch.randn(cfg.num_tokens, w))
        self.ln_pre = nn.LayerNorm(w)
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_ratio)
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Parameter(scale * torch.randn(w, embed_dim))
        self.patch_embed_fn = None

    def embed(self, latents: torch.Tensor, scale: float) -> torch.Tensor:
        """Latent -> (B, 1 + N, width) tokens after ln_pre."""
        if self.patch_embed_fn is not None:
            args = (self.conv1.weight, self.class_embedding, self.positional_embedding, self.ln_pre.weight,
                    self.ln_pre.bias)
            return self.patch_embed_fn(latents, *args, scale=scale, eps=self.ln_pre.eps)
        latents = latents.to(self.conv1.weight.dtype)
        x = self.conv1(latents * scale if scale != 1.0 else latents).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def forward(self, latents: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """Image features (B, embed_dim) of latents times ``scale`` (cast to the weights' dtype)."""
        x = self.transformer(self.embed(latents, scale), causal=False)
        return self.ln_post(x[:, 0]) @ self.proj


class LatentVisual(nn.Module):
    """The vision side: ``latent_vit`` plus, when the checkpoint carries one, the frozen SDXL VAE encoder."""

    def __init__(self, cfg: ModelConfig, with_vae: bool):
        super().__init__()
        self.latent_vit = LatentViT(cfg.vision, cfg.embed_dim)
        if with_vae:
            from diffusers.models.autoencoders.vae import Encoder

            v = cfg.vae
            self.vae_encoder = Encoder(
                in_channels=v.get("in_channels", 3),
                out_channels=v["latent_channels"],
                down_block_types=tuple(v["down_block_types"]),
                block_out_channels=tuple(v["block_out_channels"]),
                layers_per_block=v["layers_per_block"],
                norm_num_groups=v.get("norm_num_groups", 32),
                act_fn=v.get("act_fn", "silu"),
                double_z=True,
            )
            self.vae_quant_conv = nn.Conv2d(2 * v["latent_channels"], 2 * v["latent_channels"], 1)
        else:
            self.vae_encoder = self.vae_quant_conv = None


class LatentCLIP(nn.Module):
    """Latent-CLIP: an image tower on SDXL VAE latents and open_clip's text tower.

    Call ``fastlclip.load`` rather than this constructor: it resolves configs and loads checkpoints.
    """

    def __init__(self, cfg: ModelConfig, *, with_vae: bool = False):
        super().__init__()
        self.cfg = cfg
        self.backend = "eager"  # the fast path attached from outside (fastlclip.runtime.apply); "eager": none
        self.check_finite = True
        self.visual = LatentVisual(cfg, with_vae)
        # The text tower is open_clip's, its parameters at the top level of the state dict.
        t = cfg.text
        self.token_embedding = nn.Embedding(t.vocab_size, t.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.positional_embedding = nn.Parameter(0.01 * torch.randn(t.context_length, t.width))
        self.transformer = Transformer(t.width, t.layers, t.heads, t.mlp_ratio)
        self.ln_final = nn.LayerNorm(t.width)
        self.text_projection = nn.Parameter(t.width**-0.5 * torch.randn(t.width, cfg.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    # -- properties -----------------------------------------------------------------------------
    @property
    def dtype(self) -> torch.dtype:
        return self.text_projection.dtype

    @property
    def device(self) -> torch.device:
        return self.text_projection.device

    @property
    def latent_size(self) -> int:
        return self.cfg.vision.latent_size

    # -- image side -----------------------------------------------------------------------------
    def encode_latents(self, latents: torch.Tensor, *, space: str = "diffusion", normalize: bool = True) -> torch.Tensor:
        """Embed SDXL VAE latents (B, 4, H, W).

        ``space="diffusion"``: latents as an SDXL pipeline or UNet produces them (divided by the VAE
        scaling factor 0.13025 here). ``space="vae"``: raw ``AutoencoderKL.encode(x).latent_dist`` samples.
        Latents are cast to the model's dtype; gradients flow back to them.
        """
        feats = self.visual.latent_vit(latents, scale=self.latent_scale(latents, space))
        return F.normalize(feats, dim=-1) if normalize else feats

    def latent_scale(self, latents: torch.Tensor, space: str) -> float:
        """Validate latents for the image tower; return the factor that maps them to VAE space.

        The NaN/Inf check (``check_finite``, on by default) synchronises with the device; set
        ``model.check_finite = False`` in loops that must not wait for the GPU.
        """
        inputs.check_space(space)
        v = self.cfg.vision
        inputs.check_latents(latents, channels=v.latent_channels, size=v.latent_size, patch=v.patch_size,
                             check_finite=self.check_finite)
        self._check_device(latents, "latents")
        return 1.0 / inputs.SDXL_SCALING_FACTOR if space == "diffusion" else 1.0

    def encode_images(self, pixels: torch.Tensor, *, vae=None, sample: bool = False, normalize: bool = True) -> torch.Tensor:
        """Embed RGB images in [0, 1] (B, 3, H, W): SDXL VAE encoder -> latent -> image tower.

        Uses the VAE encoder weights stored in the checkpoint; pass ``vae`` (a diffusers ``AutoencoderKL``)
        when the checkpoint has none. ``sample=False`` takes the posterior mean, ``True`` a sample.
        """
        inputs.check_pixels(pixels)
        px = self.latent_size * 8
        if tuple(pixels.shape[-2:]) != (px, px):
            raise ValueError(f"images are {pixels.shape[-2]}x{pixels.shape[-1]} px, this model expects {px}x{px} "
                             f"(its {self.latent_size}x{self.latent_size} latents); resize or centre-crop first")
        self._check_device(pixels, "pixels")
        x = pixels * 2 - 1
        if vae is not None:
            dist = vae.encode(x.to(vae.dtype)).latent_dist
            mean, std = dist.mean, dist.std
        elif self.visual.vae_encoder is not None:
            x = x.to(self.dtype)
            moments = self.visual.vae_quant_conv(self.visual.vae_encoder(x))
            mean, logvar = moments.chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        else:
            raise ValueError(
                "this model has no VAE encoder weights (its checkpoint carried none): pass vae=AutoencoderKL "
                "(the SDXL VAE, e.g. madebyollin/sdxl-vae-fp16-fix) or encode the images to latents yourself"
            )
        latents = mean + std * torch.randn_like(std) if sample else mean
        return self.encode_latents(latents, space="vae", normalize=normalize)

    # -- text side ------------------------------------------------------------------------------
    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        return inputs.tokenize(texts, self.cfg.text.context_length)

    def encode_text(self, texts: str | Sequence[str] | torch.Tensor, normalize: bool = True) -> torch.Tensor:
        """Embed prompts (strings, tokenised with open_clip's tokenizer) or (N, 77) token ids."""
        tokens = texts if isinstance(texts, torch.Tensor) else self.tokenize(texts)
        inputs.check_tokens(tokens, self.cfg.text.context_length, self.cfg.text.vocab_size)
        tokens = tokens.to(self.device)
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.ln_final(self.transformer(x, causal=True))
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    # -- both -----------------------------------------------------------------------------------
    def forward(self, latents: torch.Tensor | None = None, texts=None, *, space: str = "diffusion"):
        """As open_clip: ``(image_features, text_features, logit_scale.exp())``, features normalised.

        Logits are ``logit_scale * image_features @ text_features.T``.
        """
        img = self.encode_latents(latents, space=space) if latents is not None else None
        txt = self.encode_text(texts) if texts is not None else None
        return img, txt, self.logit_scale.exp()

    def _check_device(self, x: torch.Tensor, what: str) -> None:
        if x.device != self.device:
            raise ValueError(f"{what} are on {x.device} but the model is on {self.device}; move one with .to(...)")
