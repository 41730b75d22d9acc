"""Work per ReNO iteration counted on the meta device, and the time floor it implies on a GPU profile.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` running each component's forward and
backward to its input (parameters frozen, as in ReNO) on meta tensors at full size, so gradient
checkpointing's recomputation is counted where it is on. Bytes are the bf16 weights, read once per
forward or backward pass, plus the bf16 outputs of every leaf module, written and read once forward and
their gradients likewise backward (what a decoder at full pixel resolution cannot avoid, however few
its weights). The floor per component is max(FLOPs / peak, bytes / bandwidth), summed: a lower bound
from counts, never a measurement. ``Work.saved_bytes``: what autograd keeps from the forward for the
backward (``torch.autograd.graph.saved_tensors_hooks``; each storage once, the module's weights left out,
bf16 for floating tensors): the activations a reward step holds when its forward ends.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

import fastlclip
from fastlclip import vaes
from fastlclip.reno import checkpoint_diffusers

from .profiles import Profile

BF16_BYTES = 2


@dataclass(frozen=True)
class Work:
    """One component's work in one iteration: forward, and forward + backward (+ recomputation)."""

    name: str
    forward_flops: int
    total_flops: int
    weight_bytes: int  # one pass over the bf16 weights
    forward_only: bool = False  # no backward through it (the text encoders): one pass even in a full iteration
    activation_bytes: int = 0  # bf16 outputs of its leaf modules in one forward (what it must write at least)
    saved_bytes: int = 0  # bf16 bytes autograd saves in the forward for the backward (weights excluded)

    @property
    def passes(self) -> int:
        return 1 if self.forward_only else 2

    def traffic_bytes(self, backward: bool = True) -> int:
        """Weights read once per pass; each activation written and read once forward, and its gradient likewise
        backward (a lower bound: fused kernels cannot avoid writing what the next layer reads)."""
        passes = self.passes if backward else 1
        return passes * (self.weight_bytes + 2 * self.activation_bytes)

    def seconds(self, profile: Profile, backward: bool = True) -> float:
        flops = self.total_flops if backward else self.forward_flops
        return max(flops / (profile.peak_bf16_tflops * 1e12), self.traffic_bytes(backward) / (profile.memory_bandwidth_tbs * 1e12))


def _count(name: str, module: nn.Module, run) -> Work:
    """Count ``run()`` (returns a tensor needing grad) forward, then with a backward from it."""
    module.requires_grad_(False)
    written = [0]

    def hook(mod, args, output):
        if isinstance(output, torch.Tensor):
            written[0] += BF16_BYTES * output.numel()

    handles = [m.register_forward_hook(hook) for m in module.modules() if not any(True for _ in m.children())]
    saved = _SavedBytes(module)
    try:
        with FlopCounterMode(display=False) as counter:
            with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
                out = run()
            forward, activations = counter.get_total_flops(), written[0]
            out.backward(torch.ones_like(out))
            total = counter.get_total_flops()
    finally:
        for h in handles:
            h.remove()
    return Work(name, forward, total, BF16_BYTES * sum(p.numel() for p in module.parameters()), activation_bytes=activations,
                saved_bytes=saved.bytes)


class _SavedBytes:
    """Pack hook summing the tensors autograd saves for the backward: each storage once (views of one storage
    share it), the module's parameters left out, floating tensors at bf16 size, others at their own."""

    def __init__(self, module: nn.Module):
        self.weights = {p.untyped_storage()._cdata for p in module.parameters()}
        self.seen: set[int] = set()
        self.keep: list[torch.Tensor] = []  # alive until counted, so no storage id is reused
        self.bytes = 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.weights and key not in self.seen:
            self.seen.add(key)
            self.keep.append(t)
            size = storage.nbytes()
            self.bytes += size // t.element_size() * BF16_BYTES if t.is_floating_point() else size
        return t

    @staticmethod
    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t


def _meta_input(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta", requires_grad=True)


@functools.lru_cache(maxsize=None)
def unet_work(checkpointing: bool, side: int = 64) -> Work:
    """The SDXL UNet (shipped config) on a ``side`` x ``side`` latent (64: 512 px, 128: 1024 px)."""
    from diffusers import UNet2DConditionModel

    from fastlclip.model_configs import sdxl_unet_config

    cfg = sdxl_unet_config()
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(cfg).eval()
    if checkpointing:
        checkpoint_diffusers(unet, True)
    pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    cond = dict(encoder_hidden_states=torch.empty(1, 77, cfg["cross_attention_dim"], device="meta"),
                added_cond_kwargs={"text_embeds": torch.empty(1, pooled, device="meta"),
                                   "time_ids": torch.empty(1, 6, device="meta")})
    t = torch.empty((), device="meta")
    return _count("UNet", unet, lambda: unet(_meta_input(1, 4, side, side), t, **cond, return_dict=False)[0])


# Registered VAEs (fastlclip.vaes) -> the component name their decode is counted under.
DECODER_LABELS = {"sdxl": "VAE decode", "sd15": "SD1.5 VAE decode", "sd3": "SD3 VAE decode", "flux1": "FLUX.1 VAE decode",
                  "taesdxl": "TAESD-XL decode", "taesd3": "TAESD3 decode", "taef1": "TAEF1 decode",
                  "qwen-image": "Qwen-Image VAE decode", "flux2": "FLUX.2 VAE decode", "sana": "SANA DC-AE decode",
                  "dcae-f32c32-in": "DC-AE f32c32-in decode", "dcae-f32c32-mix": "DC-AE f32c32-mix decode"}
_DECODER_ALIASES = {"vae": "sdxl", "taesd": "taesdxl"}


@functools.lru_cache(maxsize=None)
def vae_decode_work(checkpointing: bool, side: int = 64, vae: str = "sdxl") -> Work:
    """A registered autoencoder's decode (its shipped config; SDXL's by default) on a ``side`` x ``side`` VAE latent
    (an 8x VAE: 64 at 512 px, 128 at 1024 px; DC-AE's 32x: 16 and 32): see :func:`decoder_work_of`."""
    return decoder_work_of(fastlclip.get_vae_config(vae), side, DECODER_LABELS[vae], checkpointing)


def decoder_work_of(cfg: dict, side: int, name: str, checkpointing: bool = False) -> Work:
    """The decode of a diffusers autoencoder config (``_class_name`` one of ``fastlclip.vaes.LATENT_CLASSES``) as its
    pipelines run it (``fastlclip.vaes.decode``: AutoencoderKLQwenImage on one frame, ``(B, C, 1, h, w)``), from
    a ``side`` x ``side`` VAE latent; FLUX.2 from the pipeline's packed tokens ``(B, (side/2)^2, 128)``: unpack,
    the batch-norm denormalisation (elementwise: no FLOP counted; the meta module's buffers, no real statistics
    needed), unpatchify, ``vae.decode``. Weights: the decode path's (``post_quant_conv`` where there is one,
    ``decoder``)."""
    import diffusers

    cfg = dict(cfg)
    cls = cfg.pop("_class_name", "AutoencoderKL")
    logging.disable(logging.WARNING)  # diffusers warns about config keys a class ignores (force_upcast): harmless
    try:
        with torch.device("meta"):
            vae = getattr(diffusers, cls).from_config(cfg).eval()
    finally:
        logging.disable(logging.NOTSET)
    if checkpointing:
        checkpoint_diffusers(vae, True)
    decoder = nn.ModuleList([m for m in (getattr(vae, "post_quant_conv", None), vae.decoder) if m is not None])
    channels = vaes.vae_channels(vae)
    if cls in vaes.STATS_IN_WEIGHTS:
        p = vae.config.patch_size[0]
        tokens = _meta_input(1, (side // p) ** 2, channels * p * p)
        return _count(name, decoder, lambda: vae.decode(flux2_unpack(vae, tokens, side), return_dict=False)[0])
    z = _meta_input(1, channels, side, side)
    return _count(name, decoder, lambda: vaes.decode(vae, z))


def flux2_unpack(vae: nn.Module, tokens: torch.Tensor, side: int) -> torch.Tensor:
    """``Flux2Pipeline``'s steps before ``vae.decode``: packed tokens -> grid, ``* sqrt(running_var + eps) +
    running_mean``, unpatchify -> the ``side`` x ``side`` VAE latent."""
    p = vae.config.patch_size[0]
    grid = vaes.unpack_tokens(tokens, side // p, side // p, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return vaes.unpatchify(grid * std + vae.bn.running_mean.view(1, -1, 1, 1), p)


@functools.lru_cache(maxsize=None)
def taesd_decode_work(side: int = 64, vae: str = "taesdxl") -> Work:
    """A tiny autoencoder's decode (``diffusers.AutoencoderTiny``: taesdxl by default, taesd3 / taef1 on 16
    channels), a ``side`` x ``side`` latent: few weights (its decoder), but every layer after the first
    upsampling runs at 2x, 4x, then 8x the latent size."""
    from diffusers import AutoencoderTiny

    cfg = fastlclip.get_vae_config(vae)
    cfg.pop("_class_name")
    with torch.device("meta"):
        taesd = AutoencoderTiny.from_config(cfg).eval()
    z = _meta_input(1, cfg["latent_channels"], side, side)
    return _count(DECODER_LABELS[vae], taesd.decoder, lambda: taesd.decode(z, return_dict=False)[0])


def decode_work(decoder: str, checkpointing: bool = False, side: int = 64) -> Work:
    """``decoder``: ``"vae"`` (SDXL's), ``"taesd"`` (taesdxl) or any registered VAE name (``fastlclip.list_vaes()``);
    ``side``: the VAE latent's side (the image's / ``fastlclip.vaes.vae_factor``)."""
    name = _DECODER_ALIASES.get(decoder, decoder)
    if name not in DECODER_LABELS:
        raise ValueError(f"decoder must be 'vae', 'taesd' or one of {list(DECODER_LABELS)}, got {decoder!r}")
    if fastlclip.get_vae_config(name)["_class_name"] == "AutoencoderTiny":
        return taesd_decode_work(side, name)
    return vae_decode_work(checkpointing, side, name)


TEXT_TOKENS = 77


def _text_work(name: str, params: int) -> Work:
    """A text tower run forward once on 77 tokens, no backward: 2 FLOPs per weight per token (its matmuls;
    attention over 77 tokens adds under 1%), and its weights read once."""
    flops = 2 * params * TEXT_TOKENS
    return Work(name, flops, flops, BF16_BYTES * params, forward_only=True)


@functools.lru_cache(maxsize=None)
def sdxl_text_work() -> Work:
    """SDXL's two text encoders (``bench.sdxl_text``'s configs), as ReNO runs them every iteration."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from .sdxl_text import TEXT_ENCODER, TEXT_ENCODER_2

    with torch.device("meta"):
        params = sum(p.numel() for p in CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER)).parameters())
        params += sum(p.numel() for p in CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_ENCODER_2)).parameters())
    return _text_work("SDXL text encoders", params)


@functools.lru_cache(maxsize=None)
def reward_text_work(kind: str, model_name: str) -> Work:
    """The reward's own text tower (everything outside the image tower), as ReNO's rewards run it every call."""
    with torch.device("meta"):
        if kind == "latent":
            model = fastlclip.LatentCLIP(fastlclip.get_model_config(model_name))
        else:
            import open_clip

            logging.disable(logging.WARNING)
            try:
                model = open_clip.create_model(model_name, device="meta")
            finally:
                logging.disable(logging.NOTSET)
    visual = sum(p.numel() for p in model.visual.parameters())
    return _text_work(f"{model_name} text", sum(p.numel() for p in model.parameters()) - visual)


def space_tower_config(cfg, vae: str):
    """Model config ``cfg``'s tower on a registered VAE's latents: its patch conv widened (or narrowed) to the VAE's
    channels, ``latent_factor`` the VAE's (``fastlclip.vaes.vae_factor``), and its patch resized so that one patch
    still covers ``patch_size * latent_factor`` image pixels (64 for B/8): patch 8 on an 8x VAE, 2 on DC-AE's 32x,
    so the token grid, hence the transformer's work, is the same for every space at a given image size (8x8 + 1
    tokens at 512 px). Everything else is ``cfg``'s."""
    factor = vaes.vae_factor(fastlclip.get_vae_config(vae))
    pixels = cfg.vision.patch_size * cfg.vision.latent_factor
    if pixels % factor:
        raise ValueError(f"{cfg.name}: a patch of {pixels} image px is not a whole number of {vae!r} latent px "
                         f"(factor {factor})")
    vision = {k: getattr(cfg.vision, k) for k in ("image_size", "width", "layers", "heads", "mlp_ratio")}
    return fastlclip.get_model_config({
        "embed_dim": cfg.embed_dim, "vae": vae,
        "vision_cfg": {**vision, "latent_factor": factor, "patch_size": pixels // factor},
        "text_cfg": {k: getattr(cfg.text, k) for k in ("context_length", "vocab_size", "width", "heads", "layers",
                                                        "mlp_ratio")}})


@functools.lru_cache(maxsize=None)
def latent_tower_work(model_name: str, checkpointing: bool, side: int | None = None, vae: str | None = None) -> Work:
    """A Latent-CLIP image tower on its latent; checkpointing recomputes its whole forward (as the reward does).

    ``side``: the generator's latent side when it is not the tower's trained one, counted under
    ``resize="interpolate"`` (the tower over the whole grid: 257 tokens for B/8 at 128x128); ``"pool"``
    costs what the trained grid costs (``side=None``) plus a pooling too small to count. ``vae``: the
    same tower on another registered VAE's latents (:func:`space_tower_config`)."""
    cfg = fastlclip.get_model_config(model_name)
    if vae is not None:
        cfg = space_tower_config(cfg, vae)
    with torch.device("meta"):
        model = fastlclip.LatentCLIP(cfg)
    tower = getattr(getattr(model, "visual", None), "latent_vit", None)
    if tower is None:
        raise AttributeError(f"{model_name}: expected the image tower at model.visual.latent_vit (the checkpoint layout)")
    tower.eval()
    size = model.latent_size if side is None else side
    z = _meta_input(1, cfg.vision.latent_channels, size, size)
    if checkpointing:
        return _count(model_name, tower, lambda: checkpoint(tower, z, use_reentrant=False))
    return _count(model_name, tower, lambda: tower(z))


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


def iteration_work(reward_kind: str, model_name: str, checkpointing: bool, decoder: str | None = "vae",
                   text_every_iteration: bool = False, resolution: int = 512) -> list[Work]:
    """The components of one ReNO iteration with a latent or a decode-then-CLIP (pixel) reward; ``decoder`` "vae"
    (SDXL's) or "taesd" (the tiny autoencoder) for a pixel reward; ``text_every_iteration`` adds SDXL's text
    encoders and the reward's text tower, as the reno pipeline runs them every iteration. ``resolution``: the
    one-step generator's image side (512: SDXL-Turbo; 1024: SDXL's native size, 4x the latent and pixel area);
    the pixel reward's CLIP tower sees its own input size at any resolution, the latent tower the generator's grid."""
    side = resolution // 8
    if reward_kind == "latent":
        trained = fastlclip.get_model_config(model_name).vision.latent_size
        work = [unet_work(checkpointing, side), latent_tower_work(model_name, checkpointing, None if side == trained else side)]
    elif reward_kind == "pixel":
        work = [unet_work(checkpointing, side), decode_work(decoder or "vae", checkpointing, side),
                open_clip_tower_work(model_name, checkpointing)]
    else:
        raise ValueError(f"reward kind must be 'latent' or 'pixel', got {reward_kind!r}")
    if text_every_iteration:
        work += [sdxl_text_work(), reward_text_work(reward_kind, model_name)]
    return work


DECODE_NAMES = tuple(DECODER_LABELS.values())


def decode_share(work: list[Work], profile: Profile) -> float:
    """The decode's share of an iteration's floor (0 when the iteration has no decode)."""
    total = sum(w.seconds(profile) for w in work)
    return sum(w.seconds(profile) for w in work if w.name in DECODE_NAMES) / total


@dataclass(frozen=True)
class Floor:
    per_iteration_s: float
    per_image_s: float  # (iterations - 1) full iterations + a last one without backward, as ReNO runs
    flops_per_iteration: int
    weight_bytes_per_iteration: int
    traffic_bytes_per_iteration: int = 0


def floor(work: list[Work], profile: Profile, iterations: int) -> Floor:
    per_iter = sum(w.seconds(profile) for w in work)
    last = sum(w.seconds(profile, backward=False) for w in work)
    return Floor(per_iter, (iterations - 1) * per_iter + last, sum(w.total_flops for w in work),
                 sum(w.passes * w.weight_bytes for w in work), sum(w.traffic_bytes() for w in work))
