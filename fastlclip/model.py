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

import dataclasses
import math
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import grids, inputs, vaes
from .grids import MODEL_DEFAULT
from .model_configs import ModelConfig, VisionConfig
from .vaes import LatentSpace


class PackedAttention(nn.Module):
    """Multi-head self-attention with open_clip's packed ``in_proj`` layout.

    ``attention_fn``: None runs PyTorch's SDPA; a fast path sets a function
    ``(qkv (B, L, 3 * width), heads, causal=...) -> (B, L, width)`` such as ``fastlclip.kernels.flash_attention.attention_packed``.
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
    ``fastlclip.kernels.fused_patch_embed.patch_embed``'s signature, which reads the latents in their own dtype.

    Any grid of whole patches runs: at a grid other than the trained one the positional table is
    resampled to it (:meth:`pos_embed_for`). Which grids reach the tower is the caller's policy
    (``LatentCLIP.encode_latents``'s ``resize``).

    A noise-aware tower (``cfg.noise_aware``) adds ``noise_embed(noise_level)`` (:class:`NoiseEmbedding`)
    to every token after ln_pre: it scores intermediate latents ``(1 - s) x + s eps`` of a rectified flow.
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
        self.noise_embed = NoiseEmbedding(w) if cfg.noise_aware else None
        self.patch_embed_fn = None
        self._pos_cache: dict[tuple, tuple] = {}

    def pos_embed_for(self, grid: tuple[int, int]) -> torch.Tensor:
        """The ``(1 + rows*cols, width)`` positional table for a ``(rows, cols)`` patch grid.

        The trained grid gets the parameter itself. Another grid gets
        :func:`fastlclip.grids.resize_pos_embed` of it, cached per (grid, dtype, device). A cache entry
        is stamped with the parameter's storage and version counter and keeps a copy of the table it was
        resampled from, so it is recomputed after the weights change: an optimizer step,
        ``load_state_dict``, ``.to(...)``, and writes through ``.data``, which bypass the version counter
        (the copy is compared with the table on every hit: one small read from the device). Nothing is
        cached while the table needs a gradient (the parameter requires grad and grad mode is on: the table's autograd
        graph must be fresh per call), while ``torch.compile`` traces, or while a CUDA graph captures (the
        graph then recomputes the table on every replay and sees in-place weight updates).
        """
        pos = self.positional_embedding
        g = self.cfg.grid
        if tuple(grid) == (g, g):
            return pos
        if ((torch.is_grad_enabled() and pos.requires_grad) or torch.compiler.is_compiling()
                or (pos.is_cuda and torch.cuda.is_current_stream_capturing())):
            return grids.resize_pos_embed(pos, grid)
        key = (tuple(grid), pos.dtype, pos.device)
        stamp = (pos.data_ptr(), pos._version)
        hit = self._pos_cache.get(key)
        if hit is not None and hit[0] == stamp and torch.equal(hit[1], pos):
            return hit[2]
        # Outside inference mode even under it: the table is kept for later calls, which may need autograd.
        with torch.inference_mode(False), torch.no_grad():
            source, table = pos.detach().clone(), grids.resize_pos_embed(pos, grid)
        self._pos_cache = {k: v for k, v in self._pos_cache.items() if v[0] == stamp and torch.equal(v[1], pos)}
        self._pos_cache[key] = (stamp, source, table)
        return table

    def embed(self, latents: torch.Tensor, scale: float, shift: float = 0.0,
              noise_level: torch.Tensor | None = None) -> torch.Tensor:
        """Latent -> (B, 1 + N, width) tokens after ln_pre (plus the noise embedding of a noise-aware
        tower); N = (H // P) * (W // P). The conv reads ``latents * scale + shift``."""
        p = self.cfg.patch_size
        pos = self.pos_embed_for((latents.shape[-2] // p, latents.shape[-1] // p))
        if self.patch_embed_fn is not None:
            if shift:  # conv1 has no bias: conv1(x + shift) = conv1(x) + shift * (its weight summed per output)
                rows = (shift * self.conv1.weight.sum((1, 2, 3))).to(pos.dtype)
                pos = torch.cat([pos[:1], pos[1:] + rows])
            args = (self.conv1.weight, self.class_embedding, pos, self.ln_pre.weight, self.ln_pre.bias)
            x = self.patch_embed_fn(latents, *args, scale=scale, eps=self.ln_pre.eps)
        else:
            latents = latents.to(self.conv1.weight.dtype)
            if scale != 1.0:
                latents = latents * scale
            x = self.conv1(latents + shift if shift else latents).flatten(2).transpose(1, 2)
            cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
            x = self.ln_pre(torch.cat([cls, x], dim=1) + pos.to(x.dtype))
        if self.noise_embed is not None:
            if noise_level is None:
                noise_level = x.new_zeros(x.shape[0])
            x = x + self.noise_embed(noise_level)[:, None].to(x.dtype)
        return x

    def forward(self, latents: torch.Tensor, scale: float = 1.0, shift: float = 0.0,
                noise_level: torch.Tensor | None = None) -> torch.Tensor:
        """Image features (B, embed_dim) of ``latents * scale + shift`` (cast to the weights' dtype) at the
        noise level ``noise_level`` ((B,) in [0, 1]; None: clean) when the tower is noise-aware."""
        x = self.transformer(self.embed(latents, scale, shift, noise_level), causal=False)
        return self.ln_post(x[:, 0]) @ self.proj


class NoiseEmbedding(nn.Module):
    """A noise level ``s`` in [0, 1] -> sinusoidal features of ``1000 s`` -> MLP -> (B, width).

    The last layer starts at zero, so a fresh noise-aware tower computes what the plain one does.
    """

    def __init__(self, width: int, features: int = 256):
        super().__init__()
        self.features = features
        self.mlp = nn.Sequential(nn.Linear(features, width), nn.SiLU(), nn.Linear(width, width))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        weight = self.mlp[0].weight
        dtype = torch.promote_types(weight.dtype, torch.float32)  # the features in float32 at least
        half = self.features // 2
        freqs = torch.exp(torch.arange(half, device=s.device, dtype=dtype) * (-math.log(10000.0) / half))
        angles = 1000.0 * s.to(dtype)[:, None] * freqs
        feats = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
        return self.mlp(feats.to(weight.dtype))


class LatentVisual(nn.Module):
    """The vision side: ``latent_vit`` plus, when the checkpoint carries one, the frozen VAE encoder."""

    def __init__(self, cfg: ModelConfig, with_vae: bool):
        super().__init__()
        self.latent_vit = LatentViT(cfg.vision, cfg.embed_dim)
        if with_vae:
            from diffusers.models.autoencoders.vae import Encoder

            v = cfg.vae
            if v.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
                raise ValueError(f"model {cfg.name!r}: a checkpoint carries VAE encoder weights for an AutoencoderKL "
                                 f"only, its VAE {cfg.vae_name!r} is a {v.get('_class_name')}; pass vae= to "
                                 "encode_images instead")
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
            quant = v.get("use_quant_conv", True)  # SD3 and FLUX VAEs have none
            self.vae_quant_conv = nn.Conv2d(2 * v["latent_channels"], 2 * v["latent_channels"], 1) if quant else None
        else:
            self.vae_encoder = self.vae_quant_conv = None


class LatentCLIP(nn.Module):
    """Latent-CLIP: an image tower on a VAE's latents (``cfg.vae_name``, SDXL's by default) and open_clip's
    text tower.

    Call ``fastlclip.load`` rather than this constructor: it resolves configs and loads checkpoints.
    """

    def __init__(self, cfg: ModelConfig, *, with_vae: bool = False):
        super().__init__()
        self.cfg = cfg
        self.backend = "eager"  # the fast path attached from outside (fastlclip.runtime.apply); "eager": none
        self.check_finite = True
        self.resize = None  # the latent-grid policy when encode_latents gets none: None, "interpolate", "pool"
        self._space = None  # the latent space, read from the config once
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

    @property
    def latent_space(self) -> LatentSpace:
        """The latent space of the model's VAE (``cfg.vae_name``): channels, scaling and shift factors, per-channel
        statistics, patch and packing (FLUX.2's statistics from ``cfg.vae_stats``)."""
        space = self._space
        if space is None:
            space = dataclasses.replace(vaes.latent_space(self.cfg.vae, stats=self.cfg.vae_stats),
                                        name=self.cfg.vae_name)
            self._space = space
        return space

    @property
    def video(self) -> bool:
        """Whether the model's VAE is a video VAE: ``encode_latents`` takes clips ``(B, C, T, h, w)``."""
        return self.cfg.vae.get("_class_name") in vaes.VIDEO_CLASSES

    @property
    def noise_aware(self) -> bool:
        """Whether the image tower takes a noise level (``encode_latents(..., noise_level=)``)."""
        return self.cfg.vision.noise_aware

    # -- image side -----------------------------------------------------------------------------
    def encode_latents(self, latents: torch.Tensor, *, space: str = "diffusion", normalize: bool = True,
                       resize=MODEL_DEFAULT, noise_level=None, height: int | None = None,
                       width: int | None = None, frames: int | None = None) -> torch.Tensor:
        """Embed latents of the model's VAE (``model.latent_space``: SDXL's unless its config names another).

        ``space="diffusion"``: latents as the pipeline's denoiser produces them, converted here with the VAE's
        constants as diffusers' pipelines do before decoding (``LatentSpace.to_vae``: ``z / scaling_factor +
        shift_factor``; per channel for Qwen-Image and FLUX.2): the grid ``(B, C, h, w)`` (FLUX.2: 128 channels
        at half the VAE latent's side) or, for the packed spaces, the pipeline's tokens ``(B, L, D)`` with the
        VAE latent ``height`` / ``width`` (omitted: a square latent).
        ``space="vae"``: what the VAE encodes to (``fastlclip.vaes.encode``), ``(B, C, H, W)``.
        ``resize``: the policy for a grid other than the trained one (``fastlclip.grids``): ``None``
        refuses it, ``"interpolate"`` resamples the positional embeddings to it, ``"pool"`` area-pools
        the latents to the trained grid; by default ``self.resize`` (``fastlclip.load(..., resize=...)``).
        ``noise_level``: None (clean), a float or a (B,) tensor in [0, 1], the ``s`` of intermediate latents
        ``(1 - s) x + s eps`` (diffusion space); a model that is not noise-aware refuses non-zero levels.
        Latents are cast to the model's dtype; gradients flow back to them.

        A video space (``fastlclip.list_vaes(video=True)``): clips ``(B, C, T, h, w)`` (LTX-Video: or its
        pipeline's tokens ``(B, T h w, 128)`` with ``frames`` and the latent ``height`` / ``width``) give one
        embedding per latent frame, ``(B, T, D)``: the frames are folded into the batch, one tower forward.
        ``frames``: the clip's video frame count F, when known: T must be ``LatentSpace.latent_frames(F)``.
        ``noise_level``: one per clip, shared by its frames.
        """
        b = latents.shape[0] if isinstance(latents, torch.Tensor) and latents.ndim else None
        latents, scale, shift, noise = self.prepare_latents(latents, space, resize, noise_level, height, width,
                                                            frames)
        feats = self.visual.latent_vit(latents, scale=scale, shift=shift, noise_level=noise)
        if self.video:
            feats = feats.unflatten(0, (b, feats.shape[0] // b))
        return F.normalize(feats, dim=-1) if normalize else feats

    def resize_policy(self, resize=MODEL_DEFAULT) -> str | None:
        """``resize`` checked, or the model's default (``self.resize``) when it is not given."""
        resize = self.resize if resize is MODEL_DEFAULT else resize
        grids.check_resize(resize)
        return resize

    def prepare_latents(self, latents: torch.Tensor, space: str, resize=MODEL_DEFAULT, noise_level=None,
                        height: int | None = None, width: int | None = None, frames: int | None = None
                        ) -> tuple[torch.Tensor, float, float, torch.Tensor | None]:
        """Validate latents (and a noise level) for the image tower and apply the grid policy:
        ``(latents for the tower, scale, shift, noise)``: the tower reads ``latents * scale + shift`` (VAE
        space) at ``noise`` ((B,) float32 or wider on the model's device, or None: clean). With ``"pool"`` the
        latents come back pooled to the trained grid; otherwise as they are (the tower resamples its
        positions to their grid).

        The NaN/Inf checks (``check_finite``, on by default) synchronise with the device; set
        ``model.check_finite = False`` in loops that must not wait for the GPU.

        A video space's clips come back with their frames folded into the batch, ``(B * T, C, h, w)`` clip by
        clip, each frame at its clip's noise level (:meth:`encode_latents`).
        """
        inputs.check_space(space)
        if self.video:
            latents, space, noise_level = self._fold_video(latents, space, noise_level, height, width, frames)
        elif isinstance(latents, torch.Tensor) and latents.ndim == 5:
            raise ValueError(f"the {self.cfg.vae_name!r} latent space is an image space: got 5-D latents "
                             f"{tuple(latents.shape)} (B, C, T, h, w); score a clip with a model on a video space "
                             f"(fastlclip.list_vaes(video=True)), or one frame of a video latent at a time: latents[:, :, t]")
        resize = self.resize_policy(resize)
        v = self.cfg.vision
        converted = False
        ls = self.latent_space if space == "diffusion" else None
        if ls is not None and (ls.per_channel or (ls.pack and getattr(latents, "ndim", 4) == 3)):
            latents, converted = self._diffusion_to_vae(latents, height, width), True
        inputs.check_latents(latents, channels=v.latent_channels, size=v.latent_size, patch=v.patch_size,
                             resize=resize, check_finite=self.check_finite, vae=self.cfg.vae_name)
        self._check_device(latents, "latents")
        noise = inputs.check_noise_level(noise_level, latents.shape[0], noise_aware=self.noise_aware,
                                         model=self.cfg.name, check_values=self.check_finite)
        if noise is not None:
            noise = noise.to(self.device)
        if resize == "pool":
            latents = grids.pool_latents(latents, v.latent_size)
        if space == "vae" or converted:
            return latents, 1.0, 0.0, noise
        ls = self.latent_space
        return latents, 1.0 / ls.scaling_factor, ls.shift_factor, noise

    def _fold_video(self, latents: torch.Tensor, space: str, noise_level, height: int | None, width: int | None,
                    frames: int | None) -> tuple[torch.Tensor, str, torch.Tensor | None]:
        """A video space's clips -> ``(frames folded into the batch, their space, noise per frame)``: the grid
        ``(B, C, T, h, w)`` or packed tokens checked (the errors name the space), T checked against ``frames``,
        diffusion latents of a per-channel space converted to VAE space (float32 or wider) on every frame."""
        ls = self.latent_space
        inputs.check_float_tensor(latents)
        if latents.ndim not in (3, 5) or latents.shape[0] == 0:
            raise ValueError(f"the {self.cfg.vae_name!r} latent space is a video space: latents are clips (B, "
                             f"{ls.channels}, T, h, w)" + (" or its packed tokens (B, T h w, D)" if ls.pack else "")
                             + f" with B > 0, got shape {tuple(latents.shape)}"
                             + ("; one frame is latents[:, :, None]" if latents.ndim == 4 else ""))
        t = ls.latent_frames(frames) if frames is not None else None
        grid = ls.grid(latents, height, width, latent_frames=t)
        if t is not None and grid.shape[2] != t:
            raise ValueError(f"latent space {self.cfg.vae_name!r}: {frames} frames are {t} latent frames "
                             f"(1 + (F - 1) / {ls.temporal}), got T = {grid.shape[2]}")
        b, t = grid.shape[0], grid.shape[2]
        if space == "diffusion" and ls.per_channel:
            grid, space = ls.to_vae(grid.to(torch.promote_types(grid.dtype, torch.float32))), "vae"
        noise = inputs.check_noise_level(noise_level, b, noise_aware=self.noise_aware, model=self.cfg.name,
                                         check_values=self.check_finite)
        folded = grid.transpose(1, 2).reshape(b * t, grid.shape[1], *grid.shape[3:])
        return folded, space, None if noise is None else noise.repeat_interleave(t)

    def _diffusion_to_vae(self, latents: torch.Tensor, height: int | None, width: int | None) -> torch.Tensor:
        """A per-channel / packed space's diffusion latents (the grid or the pipeline's tokens) -> VAE space, in
        float32 or wider; the shape checks name the space."""
        inputs.check_float_tensor(latents)
        if latents.ndim not in (3, 4) or latents.shape[0] == 0:
            ls = self.latent_space
            packed = f" or its packed tokens (B, L, {ls.diffusion_channels * ls.pack ** 2})" if ls.pack else ""
            raise ValueError(f"latents of the {self.cfg.vae_name!r} latent space are its diffusion grid (B, "
                             f"{ls.diffusion_channels}, h, w){packed} with B > 0, got shape {tuple(latents.shape)}"
                             + (": one frame of a video latent? take latents[:, :, 0]" if latents.ndim == 5 else ""))
        ls = self.latent_space
        grid = ls.grid(latents, height, width)
        return ls.to_vae(grid.to(torch.promote_types(grid.dtype, torch.float32)))

    def encode_images(self, pixels: torch.Tensor, *, vae=None, sample: bool = False, normalize: bool = True,
                      resize=MODEL_DEFAULT) -> torch.Tensor:
        """Embed RGB images in [0, 1] (B, 3, H, W): VAE encoder -> latent -> image tower.

        Uses the VAE encoder weights stored in the checkpoint; pass ``vae`` (the model's diffusers VAE,
        ``fastlclip.vaes.build_vae``; encoded as :func:`fastlclip.vaes.encode` does) when the checkpoint has none. ``sample=False`` takes the posterior mean, ``True`` a sample.
        ``resize``: the latent-grid policy, as in :meth:`encode_latents`.
        """
        if self.video:
            raise ValueError(f"model {self.cfg.name!r} reads clips of the {self.cfg.vae_name!r} video space: encode a "
                             "video (B, 3, F, H, W) in [-1, 1] with fastlclip.vaes.encode(vae, video), then "
                             "encode_latents(raw, space='vae')")
        inputs.check_pixels(pixels)
        px = self.latent_size * self.cfg.vision.latent_factor
        if tuple(pixels.shape[-2:]) != (px, px) and self.resize_policy(resize) is None:
            raise ValueError(f"images are {pixels.shape[-2]}x{pixels.shape[-1]} px, this model expects {px}x{px} "
                             f"(its {self.latent_size}x{self.latent_size} latents); resize or centre-crop first, "
                             "or pass resize='interpolate' or resize='pool' (see encode_latents)")
        self._check_device(pixels, "pixels")
        x = pixels * 2 - 1
        if vae is not None:
            raw = vaes.encode(vae, x, sample=sample)
            return self.encode_latents(raw, space="vae", normalize=normalize, resize=resize)
        if self.visual.vae_encoder is not None:
            x = x.to(self.dtype)
            moments = self.visual.vae_encoder(x)
            if self.visual.vae_quant_conv is not None:
                moments = self.visual.vae_quant_conv(moments)
            mean, logvar = moments.chunk(2, dim=1)
            std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
        else:
            raise ValueError(
                f"this model has no VAE encoder weights (its checkpoint carried none): pass vae=AutoencoderKL (the "
                f"{self.cfg.vae_name} VAE, fastlclip.vaes.build_vae(folder)) or encode the images to latents yourself"
            )
        latents = mean + std * torch.randn_like(std) if sample else mean
        return self.encode_latents(latents, space="vae", normalize=normalize, resize=resize)

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
    def forward(self, latents: torch.Tensor | None = None, texts=None, *, space: str = "diffusion",
                resize=MODEL_DEFAULT, noise_level=None):
        """As open_clip: ``(image_features, text_features, logit_scale.exp())``, features normalised.

        Logits are ``logit_scale * image_features @ text_features.T``.
        """
        img = (self.encode_latents(latents, space=space, resize=resize, noise_level=noise_level)
               if latents is not None else None)
        txt = self.encode_text(texts) if texts is not None else None
        return img, txt, self.logit_scale.exp()

    def _check_device(self, x: torch.Tensor, what: str) -> None:
        if x.device != self.device:
            raise ValueError(f"{what} are on {x.device} but the model is on {self.device}; move one with .to(...)")
