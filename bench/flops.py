"""Work per ReNO iteration counted on the meta device, and the time floor it implies on a GPU profile.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` running each component's forward and
backward to its input (parameters frozen, as in ReNO) on meta tensors at full size, so gradient
checkpointing's recomputation is counted where it is on. Bytes are the bf16 weights, read once per
forward or backward pass. The floor per component is max(FLOPs / peak, bytes / bandwidth), summed: a
lower bound from counts, never a measurement.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from .profiles import Profile

BF16_BYTES = 2


@dataclass(frozen=True)
class Work:
    """One component's work in one iteration: forward, and forward + backward (+ recomputation)."""

    name: str
    forward_flops: int
    total_flops: int
    weight_bytes: int  # one pass over the bf16 weights

    def seconds(self, profile: Profile, backward: bool = True) -> float:
        flops = self.total_flops if backward else self.forward_flops
        passes = 2 if backward else 1
        return max(flops / (profile.peak_bf16_tflops * 1e12), passes * self.weight_bytes / (profile.memory_bandwidth_tbs * 1e12))


def _count(name: str, module: nn.Module, run) -> Work:
    """Count ``run()`` (returns a tensor needing grad) forward, then with a backward from it."""
    module.requires_grad_(False)
    with FlopCounterMode(display=False) as counter:
        out = run()
        forward = counter.get_total_flops()
        out.backward(torch.ones_like(out))
        total = counter.get_total_flops()
    return Work(name, forward, total, BF16_BYTES * sum(p.numel() for p in module.parameters()))


def _meta_input(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta", requires_grad=True)


@functools.lru_cache(maxsize=None)
def unet_work(checkpointing: bool, latent: int = 64) -> Work:
    """The SDXL UNet (shipped config) on a ``latent`` x ``latent`` latent (64: 512 px, 128: 1024 px)."""
    from diffusers import UNet2DConditionModel

    from fastlclip.model_configs import sdxl_unet_config

    cfg = sdxl_unet_config()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg).eval()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    cond = dict(encoder_hidden_states=torch.empty(1, 77, cfg["cross_attention_dim"], device="meta"),
                added_cond_kwargs={"text_embeds": torch.empty(1, pooled, device="meta"),
                                   "time_ids": torch.empty(1, 6, device="meta")})
    t = torch.empty((), device="meta")
    return _count("UNet", unet, lambda: unet(_meta_input(1, 4, latent, latent), t, **cond, return_dict=False)[0])


@functools.lru_cache(maxsize=None)
def vae_decode_work(checkpointing: bool, latent: int = 64) -> Work:
    """The SDXL VAE decode (shipped config), a ``latent`` x ``latent`` latent to 8x the pixels (64 -> 512 px)."""
    from diffusers import AutoencoderKL

    from fastlclip.model_configs import sdxl_vae_config

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(sdxl_vae_config()).eval()
    if checkpointing:
        vae.enable_gradient_checkpointing()
    decoder = nn.ModuleList([vae.post_quant_conv, vae.decoder])  # the decode path's weights, not the encoder's
    return _count("VAE decode", decoder, lambda: vae.decode(_meta_input(1, 4, latent, latent), return_dict=False)[0])


@functools.lru_cache(maxsize=None)
def latent_tower_work(model_name: str, checkpointing: bool, latent: int | None = None) -> Work:
    """A Latent-CLIP image tower on its latent; checkpointing recomputes its whole forward (as the reward does).

    ``latent``: the generator's latent side when it is not the tower's trained one, counted under
    ``resize="interpolate"`` (the tower over the whole grid: 257 tokens for B/8 at 128x128); ``"pool"``
    costs what the trained grid costs (``latent=None``) plus a pooling too small to count."""
    import fastlclip

    with torch.device("meta"):
        model = fastlclip.LatentCLIP(fastlclip.get_model_config(model_name))
    tower = getattr(getattr(model, "visual", None), "latent_vit", None)
    if tower is None:
        raise AttributeError(f"{model_name}: expected the image tower at model.visual.latent_vit (the checkpoint layout)")
    tower.eval()
    size = model.latent_size if latent is None else latent
    if checkpointing:
        return _count(model_name, tower, lambda: checkpoint(tower, _meta_input(1, 4, size, size), use_reentrant=False))
    return _count(model_name, tower, lambda: tower(_meta_input(1, 4, size, size)))


@functools.lru_cache(maxsize=None)
def open_clip_tower_work(model_name: str, checkpointing: bool) -> Work:
    """An open_clip image tower at its input size; checkpointing is open_clip's per-block one."""
    import open_clip

    logging.disable(logging.WARNING)  # open_clip logs that no pretrained weights were loaded: intended
    try:
        with torch.device("meta"):
            model = open_clip.create_model(model_name, device="meta")
    finally:
        logging.disable(logging.NOTSET)
    model.eval().set_grad_checkpointing(checkpointing)
    h, w = model.visual.image_size if isinstance(model.visual.image_size, tuple) else (model.visual.image_size,) * 2
    return _count(model_name, model.visual, lambda: model.encode_image(_meta_input(1, 3, h, w)))


def iteration_work(reward_kind: str, model_name: str, checkpointing: bool, resolution: int = 512) -> list[Work]:
    """The components of one ReNO iteration with a latent or a decode-then-CLIP (pixel) reward, for a
    one-step generator at ``resolution`` px (512: SDXL-Turbo; 1024: SDXL's native size, 4x the latent
    and pixel area). The pixel reward's CLIP tower sees its own input size at any resolution; the latent
    tower is counted at the generator's grid (``latent_tower_work``)."""
    latent = resolution // 8
    if reward_kind == "latent":
        trained = fastlclip_latent_size(model_name)
        return [unet_work(checkpointing, latent),
                latent_tower_work(model_name, checkpointing, None if latent == trained else latent)]
    if reward_kind == "pixel":
        return [unet_work(checkpointing, latent), vae_decode_work(checkpointing, latent),
                open_clip_tower_work(model_name, checkpointing)]
    raise ValueError(f"reward kind must be 'latent' or 'pixel', got {reward_kind!r}")


def fastlclip_latent_size(model_name: str) -> int:
    import fastlclip

    return fastlclip.get_model_config(model_name).vision.latent_size


def decode_share(work: list[Work], profile: Profile) -> float:
    """The VAE decode's share of an iteration's floor (0 when the iteration has no decode)."""
    total = sum(w.seconds(profile) for w in work)
    return sum(w.seconds(profile) for w in work if w.name == "VAE decode") / total


@dataclass(frozen=True)
class Floor:
    per_iteration_s: float
    per_image_s: float  # (iterations - 1) full iterations + a last one without backward, as ReNO runs
    flops_per_iteration: int
    weight_bytes_per_iteration: int


def floor(work: list[Work], profile: Profile, iterations: int) -> Floor:
    per_iter = sum(w.seconds(profile) for w in work)
    last = sum(w.seconds(profile, backward=False) for w in work)
    return Floor(per_iter, (iterations - 1) * per_iter + last, sum(w.total_flops for w in work),
                 sum(2 * w.weight_bytes for w in work))
