"""``python -m bench.ensemble``: one latent trunk with k heads against a VAE decode + k teacher towers (issue 32).

    python -m bench.ensemble [--ensemble reno flow_grpo] [--px 512 1024] [--space sdxl sd3 flux1]
                             [--measure] [--tiny] [--out DIR]

What a reward step costs (forward, then the gradient to the latents, weights frozen, batch 1) when an ensemble
of pixel reward models scores a latent, two ways. Latent side: one Latent-ViT-B-8-512 trunk (fastlclip's
model config; its patch conv widened to the space's channels, 16 for SD3 and FLUX.1; at 1024 px the tower runs
over the whole 128x128 grid, 257 tokens, its positional table resampled) without its CLIP projection, then one
bias-free linear head per teacher, trunk width (768) -> that teacher's embed dim. Decode side: the space's VAE
decode (fastlclip's shipped diffusers config), the image mapped to [0, 1] (``x / 2 + 0.5``, clamped), resized
to 224 px (bicubic, antialiased: ``Resize(224, BICUBIC)`` on a square image) and normalised, then each
teacher's image tower. Ensembles (each file read at the commit named in ``ENSEMBLES``):

- ``reno``: ReNO's default (ExplainableML/ReNO ``arguments.py``): HPSv2.1 (open_clip ViT-H-14), ImageReward
  (BLIP ViT-L/16 image tower), CLIP (laion ViT-H-14 via transformers), PickScore (CLIP ViT-H-14 via
  transformers); aesthetic off. One preprocessing for all (``training/trainer.py``).
- ``flow_grpo``: DiffusionNFT's ``sd3_multi_reward`` (pickscore, hpsv2, clipscore, weight 1 each) in
  flow_grpo's scorers: PickScore (ViT-H-14), HPSv2.1 (ViT-H-14), clipscore = openai/clip-vit-large-patch14
  (ViT-L/14). Each scorer preprocesses for itself (one resize each). flow_grpo scores under ``no_grad``
  (RL needs the forward only): read its ``GFLOP fwd`` column; the backward columns are what a gradient
  through the same ensemble (ReNO-style) costs.

Counts (no GPU, no weights: every module built on the meta device, ``bench.flops``' counting): FLOP =
``torch.utils.flop_counter`` over matmuls, convolutions and attention (elementwise ops, norms and the resize's
resampling, under 0.1 GFLOP here, are not counted), forward and forward + backward to the latents; weights =
bf16 bytes of every parameter a side reads, once per pass (forward, backward: twice a step); activations kept =
the bf16 bytes autograd saves in the forward for the backward (``Work.saved_bytes``: each storage once, weights
excluded), summed over a side's components, all alive when the forward ends: an estimate of the step's peak
activation memory, and a lower bound (transient buffers and the backward's gradients come on top). Ratios are
decode side / latent side. Left out on both sides: text towers (once per prompt), the loss arithmetic, and
ImageReward's BERT that cross-attends the 197 image tokens (it runs on the decode side only, so leaving it out
favours the decode side).

``--measure``: both sides built with random weights on this machine's device (CUDA: bf16, else the CPU in
float32), each timed in turn in this one run: two warm-up steps, then ``bench.reward.time_ms`` (CUDA events,
median of trials; on the CPU, the wall-clock median of 3 steps); on CUDA the step's peak memory
(``torch.cuda.max_memory_allocated`` over the side's steps less what was allocated before them: the weights of
every module built so far, both sides', which the run keeps for its later rows). The loss is the sum of the side's
outputs (a stand-in for the cosines: their cost is nothing next to the towers). At full size on a CPU a
decode-side step takes minutes (tens of TFLOP); ``--tiny`` swaps in tiny stand-ins (same code path, numbers mean
nothing).
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import fastlclip
from fastlclip.model import LatentViT
from fastlclip.model_configs import VisionConfig
from fastlclip.vaes import LatentSpace, latent_space

from . import tiny as tiny_configs
from .cli import Parser, writable_dir
from .flops import BF16_BYTES, Work, _count
from .profiles import default_out
from .spaces import px_value
from .provenance import run_record
from .report import cpu_device, fmt, table, write_json

TRUNK = "Latent-ViT-B-8-512"
PIXEL_SIZE = 224  # every teacher's input side
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
TINY_PIXEL_SIZE = 32
TINY_TRUNK = dict(image_size=128, patch_size=2, width=32, layers=2, heads=2, mlp_ratio=4.0, latent_factor=8)
SPACES = [v for v in fastlclip.list_vaes() if fastlclip.get_vae_config(v)["_class_name"] == "AutoencoderKL"]
DEFAULT_SPACES = ["sdxl", "sd3", "flux1"]
DEFAULT_PX = [512, 1024]
GB = 1e9


@dataclass(frozen=True)
class Teacher:
    key: str
    label: str
    what: str
    tower: str  # "ViT-H-14" / "ViT-L-14" (open_clip's architecture), "blip-vit-l16"
    embed_dim: int  # the head's output width


TEACHERS = {t.key: t for t in (
    Teacher("hpsv2.1", "HPSv2.1", "open_clip ViT-H-14 with hpsv2's HPS_v2.1_compressed.pt", "ViT-H-14", 1024),
    Teacher("pickscore", "PickScore", "transformers CLIPModel yuvalkirstain/PickScore_v1 (CLIP ViT-H-14; counted as "
            "open_clip's ViT-H-14, the same architecture)", "ViT-H-14", 1024),
    Teacher("clip-h14", "CLIP ViT-H/14", "transformers CLIPModel laion/CLIP-ViT-H-14-laion2B-s32B-b79K (counted as "
            "open_clip's ViT-H-14)", "ViT-H-14", 1024),
    Teacher("imagereward", "ImageReward", "BLIP ViT-L/16 image tower at 224 px (197 tokens, width 1024, 24 layers; "
            "its head here maps to the 1024-wide image tokens the BERT reads); the BERT scorer is left out",
            "blip-vit-l16", 1024),
    Teacher("clip-l14", "CLIP ViT-L/14", "transformers CLIPModel openai/clip-vit-large-patch14 (counted as "
            "open_clip's ViT-L-14)", "ViT-L-14", 768),
)}


@dataclass(frozen=True)
class Ensemble:
    key: str
    teachers: tuple[str, ...]
    weights: tuple[float, ...]
    shared_preprocess: bool  # one resize for every teacher (ReNO), or one per teacher (flow_grpo's scorers)
    source: str


ENSEMBLES = {e.key: e for e in (
    Ensemble("reno", ("hpsv2.1", "imagereward", "clip-h14", "pickscore"), (5.0, 1.0, 0.01, 0.05), True,
             "ExplainableML/ReNO bd6f6ac: arguments.py (HPS 5.0, ImageReward 1.0, CLIP 0.01, PickScore 0.05 on; "
             "aesthetic off), rewards/utils.py, rewards/{hps,imagereward,clip,pickscore}.py, training/trainer.py "
             "(one clip_img_transform(224) for all)"),
    Ensemble("flow_grpo", ("pickscore", "hpsv2.1", "clip-l14"), (1.0, 1.0, 1.0), False,
             "pkuhxy/DiffusionNFT 619456a config/nft.py sd3_multi_reward (pickscore 1, hpsv2 1, clipscore 1; SD3.5-M, "
             "512 px); d8c606d flow_grpo/rewards.py multi_score; yifan123/flow_grpo 94e23ee flow_grpo/hpsv2_scorer.py "
             "(ViT-H-14, v2.1), pickscore_scorer.py (ViT-H-14); clip_scorer.py: openai/clip-vit-large-patch14 (read in "
             "zhtmike/flow_grpo 19d5169's copy: the stored snapshot of yifan123/flow_grpo lacks the file)"),
)}

LEFT_OUT = ("text towers (run once per prompt, not per step)", "the reward losses' arithmetic (cosines, weights)",
            "ImageReward's BERT with cross-attention over the 197 image tokens (decode side only: leaving it out "
            "favours the decode side)", "flow_grpo's uint8 / PIL round trip before its scorers (not differentiable)")


# -- the modules: one builder for the counts (meta) and the measurement (a real device) --------------------
class Trunk(nn.Module):
    """The Latent-CLIP image tower up to ``ln_post`` of the class token (no CLIP projection: the heads replace it),
    reading diffusion-space latents of ``space`` (``z / scaling_factor + shift_factor`` folded into its patch conv)."""

    def __init__(self, vision: VisionConfig, space: LatentSpace):
        super().__init__()
        self.tower = LatentViT(vision, embed_dim=1)
        self.tower.register_parameter("proj", None)
        self.scale, self.shift = 1.0 / space.scaling_factor, space.shift_factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.tower.transformer(self.tower.embed(z, self.scale, self.shift), causal=False)
        return self.tower.ln_post(x[:, 0])


class Heads(nn.Module):
    """One bias-free linear map per teacher, trunk width -> that teacher's embed dim; outputs concatenated."""

    def __init__(self, width: int, dims: dict[str, int]):
        super().__init__()
        self.heads = nn.ModuleDict({k.replace(".", "_"): nn.Linear(width, d, bias=False) for k, d in dims.items()})

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return torch.cat([h(pooled) for h in self.heads.values()], dim=-1)


class Decoder(nn.Module):
    """A diffusers ``AutoencoderKL``'s decode path (``post_quant_conv`` where it has one, ``decoder``) on
    diffusion-space latents, as its pipelines call it: ``decode(z / scaling_factor + shift_factor)``."""

    def __init__(self, vae: nn.Module, space: LatentSpace):
        super().__init__()
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.decoder = vae.decoder
        self.space = space

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        raw = self.space.to_vae(z)
        if self.post_quant_conv is not None:
            raw = self.post_quant_conv(raw)
        return self.decoder(raw)


class ToUnit(nn.Module):
    """The decoded image in [-1, 1] -> [0, 1], clamped (ReNO's ``decode_latents_tensors``)."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return (img / 2 + 0.5).clamp(0, 1)


class Preprocess(nn.Module):
    """A teacher's preprocessing of a square image: bicubic antialiased resize to ``size`` (the centre crop is
    then a no-op), OpenAI mean/std."""

    def __init__(self, size: int):
        super().__init__()
        self.size = size
        self.register_buffer("mean", torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(OPENAI_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        img = F.interpolate(img, size=(self.size, self.size), mode="bicubic", antialias=True, align_corners=False)
        return (img - self.mean.to(img.dtype)) / self.std.to(img.dtype)


class LatentSide(nn.Module):
    def __init__(self, trunk: Trunk, heads: Heads):
        super().__init__()
        self.trunk, self.heads = trunk, heads

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.heads(self.trunk(z))


class DecodeSide(nn.Module):
    """Decode, to [0, 1], then per teacher its preprocessing (``preprocess`` has one entry, shared, or one per
    tower) and its tower; the towers' outputs concatenated."""

    def __init__(self, decoder: Decoder, preprocess: list[Preprocess], towers: dict[str, nn.Module]):
        super().__init__()
        self.decoder, self.to_unit = decoder, ToUnit()
        self.preprocess = nn.ModuleList(preprocess)
        self.towers = nn.ModuleDict({k.replace(".", "_"): t for k, t in towers.items()})

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        img = self.to_unit(self.decoder(z))
        shared = self.preprocess[0](img) if len(self.preprocess) == 1 else None
        outs = [tower(shared if shared is not None else self.preprocess[i](img))
                for i, tower in enumerate(self.towers.values())]
        return torch.cat(outs, dim=-1)


def latent_side_of(space: str, px: int, tiny: bool) -> int:
    """The latent grid's side for an image of ``px`` pixels (tiny stand-ins: ``px // 32``, so 512 px -> 16)."""
    return px // 32 if tiny else px // 8


def trunk_vision(space: str, tiny: bool) -> VisionConfig:
    channels = latent_space(space).channels
    if tiny:
        return VisionConfig(**TINY_TRUNK, latent_channels=channels)
    return replace(fastlclip.get_model_config(TRUNK).vision, latent_channels=channels)


def build_trunk(space: str, tiny: bool) -> Trunk:
    return Trunk(trunk_vision(space, tiny), latent_space(space)).eval()


def build_heads(teachers: tuple[str, ...], tiny: bool) -> Heads:
    width = TINY_TRUNK["width"] if tiny else fastlclip.get_model_config(TRUNK).vision.width
    return Heads(width, {k: TEACHERS[k].embed_dim for k in teachers}).eval()


def build_decoder(space: str, tiny: bool) -> Decoder:
    from diffusers import AutoencoderKL

    lat = latent_space(space)
    if tiny:
        vae = AutoencoderKL(**{**tiny_configs.VAE, "latent_channels": lat.channels})
    else:
        cfg = fastlclip.get_vae_config(space)
        cfg.pop("_class_name")
        vae = AutoencoderKL.from_config(cfg)
    return Decoder(vae, lat).eval()


def build_tower(kind: str, tiny: bool, embed_dim: int) -> nn.Module:
    """A teacher's image tower (random weights): open_clip's ViT-H-14 / ViT-L-14 visual, or BLIP's ViT-L/16 as an
    open_clip ``VisionTransformer`` (no ln_pre, no projection: BLIP hands its tokens to the BERT)."""
    from open_clip.transformer import VisionTransformer

    if tiny:
        return VisionTransformer(image_size=TINY_PIXEL_SIZE, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=4.0,
                                 output_dim=embed_dim).eval()
    if kind == "blip-vit-l16":
        tower = VisionTransformer(image_size=PIXEL_SIZE, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4.0,
                                  no_ln_pre=True, output_dim=embed_dim)
        tower.proj = None
        return tower.eval()
    import open_clip

    logging.disable(logging.WARNING)  # open_clip logs that no pretrained weights were loaded: intended
    try:
        model = open_clip.create_model(kind, device=torch.get_default_device())
    finally:
        logging.disable(logging.NOTSET)
    return model.visual.eval()


# -- counts -------------------------------------------------------------------------------------------------
def _meta(*shape: int) -> torch.Tensor:
    return torch.empty(shape, device="meta", requires_grad=True)


@functools.lru_cache(maxsize=None)
def trunk_work(space: str, side: int, tiny: bool = False) -> Work:
    with torch.device("meta"):
        trunk = build_trunk(space, tiny)
    z = _meta(1, trunk.tower.cfg.latent_channels, side, side)
    return _count(f"{'tiny trunk' if tiny else TRUNK + ' trunk'} ({space}, {side}x{side})", trunk, lambda: trunk(z))


@functools.lru_cache(maxsize=None)
def heads_work(teachers: tuple[str, ...], tiny: bool = False) -> Work:
    with torch.device("meta"):
        heads = build_heads(teachers, tiny)
    width = next(iter(heads.heads.values())).in_features
    pooled = _meta(1, width)
    return _count(f"{len(teachers)} linear heads ({width} -> {'/'.join(str(TEACHERS[k].embed_dim) for k in teachers)})",
                  heads, lambda: heads(pooled))


@functools.lru_cache(maxsize=None)
def decoder_work(space: str, side: int, tiny: bool = False) -> Work:
    with torch.device("meta"):
        decoder = build_decoder(space, tiny)
    z = _meta(1, decoder.space.channels, side, side)
    return _count(f"{'tiny ' if tiny else ''}{space} VAE decode ({side}x{side} -> {side * 8} px)", decoder,
                  lambda: decoder(z))


@functools.lru_cache(maxsize=None)
def to_unit_work(px: int) -> Work:
    module = ToUnit()
    return _count(f"to [0, 1] ({px} px)", module, lambda: module(_meta(1, 3, px, px)))


@functools.lru_cache(maxsize=None)
def preprocess_work(px: int, size: int) -> Work:
    with torch.device("meta"):
        module = Preprocess(size)
    return _count(f"resize {px} -> {size} px + normalise", module, lambda: module(_meta(1, 3, px, px)))


@functools.lru_cache(maxsize=None)
def tower_work(kind: str, embed_dim: int, tiny: bool = False) -> Work:
    with torch.device("meta"):
        tower = build_tower(kind, tiny, embed_dim)
    size = TINY_PIXEL_SIZE if tiny else PIXEL_SIZE
    name = f"tiny tower -> {embed_dim} ({size} px)" if tiny else f"{kind} ({size} px)"
    return _count(name, tower, lambda: tower(_meta(1, 3, size, size)))


def side_parts(ensemble: Ensemble, space: str, px: int, tiny: bool) -> dict[str, list[tuple[str, Work]]]:
    """Each side's components as (role, Work) pairs; a Work appears once per time a step runs it."""
    side = latent_side_of(space, px, tiny)
    image = side * 8
    size = TINY_PIXEL_SIZE if tiny else PIXEL_SIZE
    latent = [("trunk", trunk_work(space, side, tiny)), ("heads", heads_work(ensemble.teachers, tiny))]
    decode = [("decode", decoder_work(space, side, tiny)), ("to [0, 1]", to_unit_work(image))]
    resizes = 1 if ensemble.shared_preprocess else len(ensemble.teachers)
    decode += [("preprocess", preprocess_work(image, size))] * resizes
    decode += [(TEACHERS[k].label, tower_work(TEACHERS[k].tower, TEACHERS[k].embed_dim, tiny)) for k in ensemble.teachers]
    return {"latent": latent, "decode": decode}


def totals(parts: list[tuple[str, Work]]) -> dict[str, Any]:
    works = [w for _, w in parts]
    return {
        "flops_forward": sum(w.forward_flops for w in works),
        "flops_forward_backward": sum(w.total_flops for w in works),
        "params": sum(w.weight_bytes for w in works) // BF16_BYTES,
        "weight_bytes_per_pass": sum(w.weight_bytes for w in works),
        "weight_bytes_forward_backward": sum(2 * w.weight_bytes for w in works),
        "traffic_bytes_forward_backward": sum(w.traffic_bytes() for w in works),
        "saved_activation_bytes": sum(w.saved_bytes for w in works),
        "components": [{"role": role, "name": w.name} for role, w in parts],
    }


RATIO_KEYS = ("flops_forward", "flops_forward_backward", "weight_bytes_per_pass", "traffic_bytes_forward_backward",
              "saved_activation_bytes")


def ratios(decode: dict, latent: dict) -> dict[str, float | None]:
    """Decode side / latent side, per metric (None where the latent side's is 0)."""
    return {k: decode[k] / latent[k] if latent[k] else None for k in RATIO_KEYS}


def count_rows(ensembles: list[str], pxs: list[int], spaces: list[str], tiny: bool) -> tuple[list[dict], dict]:
    rows, components = [], {}
    for e in ensembles:
        for px in pxs:
            for space in spaces:
                parts = side_parts(ENSEMBLES[e], space, px, tiny)
                for _, w in parts["latent"] + parts["decode"]:
                    components[w.name] = {**asdict(w), "params": w.weight_bytes // BF16_BYTES}
                lat, dec = totals(parts["latent"]), totals(parts["decode"])
                rows.append({"ensemble": e, "px": px, "space": space, "latent_side_grid": latent_side_of(space, px, tiny),
                             "latent": lat, "decode": dec, "decode_over_latent": ratios(dec, lat)})
    return rows, components


def side_labels(row: dict) -> tuple[str, str]:
    k = len(ENSEMBLES[row["ensemble"]].teachers)
    return f"trunk + {k} heads", f"{row['space']} decode + {k} towers"


def counts_table(rows: list[dict], markdown: bool = False) -> str:
    head = ["ensemble", "px", "space", "side", "GFLOP fwd", "GFLOP fwd+bwd", "weights GB/pass",
            "act. kept GB", "x FLOP fwd+bwd", "x weights", "x act. kept"]
    body = []
    for r in rows:
        lat_label, dec_label = side_labels(r)
        for label, s, ratio in ((lat_label, r["latent"], None), (dec_label, r["decode"], r["decode_over_latent"])):
            body.append([r["ensemble"], r["px"], r["space"], label, fmt(s["flops_forward"] / 1e9, ".1f"),
                         fmt(s["flops_forward_backward"] / 1e9, ".1f"), fmt(s["weight_bytes_per_pass"] / GB, ".3f"),
                         fmt(s["saved_activation_bytes"] / GB, ".3f"),
                         fmt(ratio and ratio["flops_forward_backward"], ".0f"),
                         fmt(ratio and ratio["weight_bytes_per_pass"], ".1f"),
                         fmt(ratio and ratio["saved_activation_bytes"], ".0f")])
    return table(head, body, markdown=markdown)


def components_table(components: dict, markdown: bool = False) -> str:
    head = ["component", "params M", "GFLOP fwd", "GFLOP fwd+bwd", "act. kept GB"]
    body = [[name, fmt(c["params"] / 1e6, ".1f"), fmt(c["forward_flops"] / 1e9, ".2f"), fmt(c["total_flops"] / 1e9, ".2f"),
             fmt(c["saved_bytes"] / GB, ".4f")] for name, c in components.items()]
    return table(head, body, markdown=markdown)


DEFINITIONS = {
    "flops": "torch.utils.flop_counter on the meta device: matmuls, convolutions, attention; elementwise ops, norms "
             "and resampling not counted. fwd: the forward; fwd+bwd: forward + backward to the latents (weights frozen).",
    "weight_bytes_per_pass": "bf16 bytes of every parameter of the side (read once per forward, once per backward).",
    "saved_activation_bytes": "bf16 bytes autograd saves in the forward for the backward (saved_tensors_hooks, each "
                              "storage once, weights excluded), summed over the side's components: the activations "
                              "held when the forward ends, an estimate (lower bound) of the step's peak activation "
                              "memory; transient buffers and the backward's gradients come on top.",
    "traffic_bytes_forward_backward": "bench.flops.Work.traffic_bytes: weights read once per pass plus every leaf "
                                      "module's bf16 output written and read once, forward and backward (lower bound).",
    "decode_over_latent": "decode side / latent side for each metric.",
}


# -- measurement ---------------------------------------------------------------------------------------------
def build_sides(ensemble: Ensemble, space: str, tiny: bool, device: torch.device, dtype: torch.dtype,
                cache: dict) -> tuple[nn.Module, nn.Module]:
    """Both sides on ``device`` (random weights; towers, decoders and trunks kept in ``cache`` across rows)."""
    def get(key, make):
        if key not in cache:
            with torch.device(device):
                cache[key] = make().to(dtype=dtype).requires_grad_(False)
        return cache[key]

    trunk = get(("trunk", space), lambda: build_trunk(space, tiny))
    heads = get(("heads", ensemble.teachers), lambda: build_heads(ensemble.teachers, tiny))
    decoder = get(("decoder", space), lambda: build_decoder(space, tiny))
    size = TINY_PIXEL_SIZE if tiny else PIXEL_SIZE
    pre = [Preprocess(size).to(device) for _ in range(1 if ensemble.shared_preprocess else len(ensemble.teachers))]
    towers = {k: get(("tower", k), lambda k=k: build_tower(TEACHERS[k].tower, tiny, TEACHERS[k].embed_dim))
              for k in ensemble.teachers}
    return LatentSide(trunk, heads).eval(), DecodeSide(decoder, pre, towers).eval()


def time_side(side: nn.Module, channels: int, grid: int, device: torch.device, dtype: torch.dtype) -> dict:
    from .reward import time_ms  # the repo's timing helper (CUDA events on CUDA, wall clock on the CPU)

    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn(1, channels, grid, grid, generator=g).to(device=device, dtype=dtype).requires_grad_(True)

    def step():
        return torch.autograd.grad(side(z).float().sum(), z)

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) if cuda else None
    step()
    step()
    ms = time_ms(step, device, quick=not cuda)
    out = {"ms": ms, "status": "ok"}
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        out["peak_allocated_gib"] = peak / 2**30
        out["resident_before_gib"] = resident / 2**30  # every module built so far (both sides' weights)
        out["step_peak_gib"] = (peak - resident) / 2**30  # the step's own: activations, gradients, workspaces
    return out


def measure_rows(rows: list[dict], tiny: bool, device: torch.device, progress) -> None:
    """Adds ``measured`` (each side's step time, peak memory on CUDA, decode / latent time) to each row in place."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cache: dict = {}
    for r in rows:
        ens = ENSEMBLES[r["ensemble"]]
        channels = latent_space(r["space"]).channels
        lat_side, dec_side = build_sides(ens, r["space"], tiny, device, dtype, cache)
        measured = {}
        for name, module in (("latent", lat_side), ("decode", dec_side)):
            progress(f"{r['ensemble']} | {r['px']} px | {r['space']} | {name} side")
            try:
                measured[name] = time_side(module, channels, r["latent_side_grid"], device, dtype)
            except torch.cuda.OutOfMemoryError:
                measured[name] = {"ms": None, "status": "OOM"}
            except Exception as e:  # noqa: BLE001 - one failing row must not lose the run; the error is the result
                measured[name] = {"ms": None, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        lat_ms, dec_ms = measured["latent"].get("ms"), measured["decode"].get("ms")
        measured["decode_over_latent_time"] = dec_ms / lat_ms if lat_ms and dec_ms else None
        measured["dtype"] = str(dtype).removeprefix("torch.")
        r["measured"] = measured


def measured_table(rows: list[dict], markdown: bool = False) -> str:
    head = ["ensemble", "px", "space", "side", "reward step ms (median)", "step peak GiB", "x time", "status"]
    body = []
    for r in rows:
        m = r["measured"]
        for label, key in zip(side_labels(r), ("latent", "decode")):
            body.append([r["ensemble"], r["px"], r["space"], label, fmt(m[key].get("ms"), ".2f"),
                         fmt(m[key].get("step_peak_gib"), ".2f"),
                         fmt(m["decode_over_latent_time"] if key == "decode" else None, ".1f"), m[key]["status"]])
    return table(head, body, markdown=markdown)


# -- command line --------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="python -m bench.ensemble", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--ensemble", nargs="+", choices=list(ENSEMBLES), help=f"default: {' '.join(ENSEMBLES)}")
    p.add_argument("--px", nargs="+", type=px_value, help=f"image sides; default: {' '.join(map(str, DEFAULT_PX))}")
    p.add_argument("--space", nargs="+", choices=SPACES,
                   help=f"latent spaces (registered AutoencoderKL VAEs); default: {' '.join(DEFAULT_SPACES)}")
    p.add_argument("--measure", action="store_true", help="also time both sides' reward step on this machine's device "
                   "(random weights; at full size on a CPU, minutes per decode-side step)")
    p.add_argument("--tiny", action="store_true", help="tiny stand-in configs (same code path; the numbers mean nothing)")
    p.add_argument("--out", type=Path, help="folder for ensemble.json / ensemble.md (default: profiles/results/counts, "
                   "with --measure profiles/results/<device>, with --tiny profiles/results/cpu-smoke)")
    args = p.parse_args(argv)
    args.ensemble = list(dict.fromkeys(args.ensemble or ENSEMBLES))
    args.px = list(dict.fromkeys(args.px or DEFAULT_PX))
    args.space = list(dict.fromkeys(args.space or DEFAULT_SPACES))
    if args.out is not None and (why := writable_dir(args.out)):
        p.error(f"--out: {why}")
    return args


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)

    def progress(msg):
        print(msg, file=sys.stderr, flush=True)

    device = torch.device("cuda" if args.measure and torch.cuda.is_available() else "cpu")
    out_dir = args.out or default_out(args.tiny, args.measure, device)
    progress("counting on the meta device ...")
    rows, components = count_rows(args.ensemble, args.px, args.space, args.tiny)
    what = "TINY STAND-INS (numbers mean nothing)" if args.tiny else "real sizes, meta device (no weights)"
    report = {**run_record("bench.ensemble", argv), "complete": True, "tiny": args.tiny, "counted_on": what,
              "settings": {"ensembles": args.ensemble, "px": args.px, "spaces": args.space, "batch": 1,
                           "trunk": "tiny" if args.tiny else TRUNK, "pixel_size": TINY_PIXEL_SIZE if args.tiny else PIXEL_SIZE},
              "ensembles": {k: {**asdict(ENSEMBLES[k]), "teacher_details": [asdict(TEACHERS[t]) for t in ENSEMBLES[k].teachers]}
                            for k in args.ensemble},
              "definitions": DEFINITIONS, "left_out": list(LEFT_OUT), "components": components, "rows": rows,
              "device": None, "measured": False}
    if args.measure:
        report["device"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                            else cpu_device()["name"])
        report["measured"] = True
        progress(f"measuring on {report['device']} ({'tiny stand-ins' if args.tiny else 'real sizes, random weights'})")
        threads = torch.get_num_threads()
        if args.tiny and device.type == "cpu":
            torch.set_num_threads(1)  # tiny ops: threads only add contention on a shared machine
        try:
            measure_rows(rows, args.tiny, device, progress)
        finally:
            torch.set_num_threads(threads)
        report["torch_threads"] = 1 if args.tiny and device.type == "cpu" else threads
    print(f"Reward step, batch 1, one latent trunk + k heads vs decode + k teacher towers ({what}); "
          "GB = 1e9 bytes; x = decode side / latent side:")
    print(counts_table(rows))
    print()
    print(components_table(components))
    print()
    for k, v in DEFINITIONS.items():
        print(f"{k}: {v}")
    print("left out: " + "; ".join(LEFT_OUT))
    md = ["# bench.ensemble", "", f"`{report['command']}` ({report['date']}; {what})", "", counts_table(rows, markdown=True),
          "", components_table(components, markdown=True)]
    if args.measure:
        print()
        print(f"Measured on {report['device']} ({rows[0]['measured']['dtype'] if rows else '-'}, random weights):")
        print(measured_table(rows))
        md += ["", f"Measured on {report['device']}:", "", measured_table(rows, markdown=True)]
    out = write_json(out_dir / "ensemble.json", report)
    (out_dir / "ensemble.md").write_text("\n".join(md) + "\n")
    print(f"results: {out} and {out_dir / 'ensemble.md'}")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
