"""Decode against a latent tower for every latent space, counted on the meta device (issue 33): the tables of
``python -m bench.reno_cost --counts`` (the decode alone: what a latent reward removes from a ReNO iteration) and
``python -m bench.reward --counts`` (the reward step: decode + CLIP ViT-B/32 against the latent tower).

Spaces: every registered VAE whose latents a Latent-CLIP reads (``fastlclip.vaes.LATENT_CLASSES``): sdxl, sd15,
sd3, flux1 (AutoencoderKL), qwen-image (AutoencoderKLQwenImage, 16 channels, 8x), flux2 (AutoencoderKLFlux2, 32
channels, 8x; the pipeline's grid is 128 channels at half the side), sana, dcae-f32c32-in, dcae-f32c32-mix
(AutoencoderDC, 32 channels, 32x: a 16x16 latent at 512 px).

Decode: ``bench.flops.decode_work`` on the space's shipped diffusers config, as its pipeline decodes (Qwen-Image's
VAE on one frame; FLUX.2 from the packed tokens: unpack, batch-norm denormalisation, unpatchify, decode).
Latent tower: Latent-ViT-B-8-512, the config ``bench.reno_cost`` and ``bench.reward`` count, with its patch conv
widened to the space's channels, ``latent_factor`` the VAE's and its patch chosen so one patch covers 64x64
image pixels, as B/8's 8x8 patch does on an 8x latent (``bench.flops.space_tower_config``): patch 8 on the 8x
spaces, patch 2 on DC-AE's 32x, so every space's tower reads 64 tokens + the class token at 512 px and 256 + 1 at
1024 px (the whole grid, as ``resize="interpolate"`` runs it).

Counts: ``bench.flops``' (FLOP from ``torch.utils.flop_counter``: matmuls, convolutions, attention; elementwise
ops and norms not counted), forward and forward + backward to the latents (weights frozen), batch 1, bf16 bytes.
"""

from __future__ import annotations

import argparse
from typing import Any

import fastlclip
from fastlclip import vaes

from . import flops
from .report import fmt, table

TOWER = "Latent-ViT-B-8-512"
PIXEL_CLIP = "ViT-B-32"  # the decode-then-CLIP reward bench.reward and bench.reno_cost take as the baseline
SPACES = [v for v in fastlclip.list_vaes() if fastlclip.get_vae_config(v)["_class_name"] in vaes.LATENT_CLASSES]
DEFAULT_PX = [512, 1024]
GB = 1e9
RATIO_KEYS = ("total_flops", "weight_bytes", "traffic_bytes", "saved_bytes")

DEFINITIONS = {
    "flops": "torch.utils.flop_counter on the meta device (matmuls, convolutions, attention; elementwise ops, norms, "
             "FLUX.2's batch-norm denormalisation and the resize not counted); fwd: the forward, fwd+bwd: forward + "
             "backward to the latents, weights frozen. Qwen-Image's causal 3-D convolutions run their 3x3x3 kernels "
             "over the frame and two frames of zero padding, as diffusers runs them on one image: counted as run.",
    "weight_bytes": "bf16 bytes of every parameter the side reads, once per pass (the decode path: post_quant_conv "
                    "where there is one, and the decoder).",
    "traffic_bytes": "bench.flops.Work.traffic_bytes, forward + backward: weights read once per pass, every leaf "
                     "module's bf16 output written and read once, and its gradient likewise (a lower bound).",
    "saved_bytes": "bf16 bytes autograd saves in the forward for the backward (each storage once, weights excluded): "
                   "the activations held when the forward ends, a lower bound of the step's peak activation memory.",
    "tower": "Latent-ViT-B-8-512 with its patch conv widened to the space's channels and latent_factor the VAE's; "
             "patch = 64 px / the VAE factor (8 on 8x spaces, 2 on 32x DC-AE), so 64 + 1 tokens at 512 px, 256 + 1 "
             "at 1024 px, in every space.",
    "ratio": "x = the decode side / the latent tower, per metric.",
}


def px_value(text: str) -> int:
    """An image side for the counts: a multiple of 64 (one tower patch) in [64, 4096]."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an image side in pixels, got {text!r}") from None
    if not 64 <= value <= 4096 or value % 64:
        raise argparse.ArgumentTypeError(f"must be a multiple of 64 in [64, 4096] (one tower patch covers 64 image px), "
                                         f"got {text}")
    return value


def work_dict(w: flops.Work) -> dict[str, Any]:
    return {"name": w.name, "forward_flops": w.forward_flops, "total_flops": w.total_flops,
            "params": w.weight_bytes // flops.BF16_BYTES, "weight_bytes": w.weight_bytes,
            "activation_bytes": w.activation_bytes, "traffic_bytes": w.traffic_bytes(), "saved_bytes": w.saved_bytes}


def _sum(name: str, works: list[flops.Work]) -> dict[str, Any]:
    parts = [work_dict(w) for w in works]
    out = {k: sum(p[k] for p in parts) for k in parts[0] if k != "name"}
    return {"name": name, **out, "parts": [p["name"] for p in parts]}


def tower_geometry(space: str, px: int) -> dict[str, int]:
    """The latent tower's input on ``space`` at ``px``: channels, grid side, patch and tokens (class token included)."""
    vision = flops.space_tower_config(fastlclip.get_model_config(TOWER), space).vision
    side = px // vision.latent_factor
    return {"channels": vision.latent_channels, "grid": side, "patch": vision.patch_size,
            "tokens": (side // vision.patch_size) ** 2 + 1}


def space_row(space: str, px: int, with_clip: bool) -> dict[str, Any]:
    """One space at ``px``: the decode side (the decode, plus CLIP ViT-B/32 at 224 px when ``with_clip``) against
    the latent tower, their counts and the ratios."""
    cfg = fastlclip.get_vae_config(space)
    factor = vaes.vae_factor(cfg)
    if px % factor:
        raise ValueError(f"{px} px is not a whole number of {space!r} latent px (factor {factor})")
    side = px // factor
    geometry = tower_geometry(space, px)
    works = [flops.decode_work(space, False, side)]
    if with_clip:
        works.append(flops.open_clip_tower_work(PIXEL_CLIP, False))
    decode = _sum(" + ".join(w.name for w in works), works)
    trained = fastlclip.get_model_config(TOWER).vision.image_size
    tower = _sum(f"{TOWER} tower ({space})", [flops.latent_tower_work(TOWER, False, None if px == trained else
                                                                      geometry["grid"], space)])
    channels = vaes.vae_channels(cfg)
    if cfg["_class_name"] in vaes.STATS_IN_WEIGHTS:
        p = cfg["patch_size"][0]
        decode_input = f"packed tokens 1x{(side // p) ** 2}x{channels * p * p} (grid {channels * p * p}x{side // p}x{side // p})"
    else:
        decode_input = f"1x{channels}x{side}x{side}" + (f" (decoded as one frame, 1x{channels}x1x{side}x{side})"
                                                         if cfg["_class_name"] == "AutoencoderKLQwenImage" else "")
    return {"space": space, "class": cfg["_class_name"], "px": px, "vae_factor": factor,
            "latent": [channels, side, side], "decode_input": decode_input, "tower_geometry": geometry,
            "decode": decode, "tower": tower,
            "decode_over_tower": {k: decode[k] / tower[k] if tower[k] else None for k in RATIO_KEYS}}


def space_rows(spaces: list[str], pxs: list[int], with_clip: bool) -> list[dict[str, Any]]:
    return [space_row(s, px, with_clip) for px in pxs for s in spaces]


def counts_table(rows: list[dict[str, Any]], decode_label: str, markdown: bool = False) -> str:
    head = ["space", "px", "latent", "tower patch / tokens", f"{decode_label} GFLOP fwd / fwd+bwd",
            "tower GFLOP fwd / fwd+bwd", "x FLOP", "weights MB (decode / tower)", "traffic GB (decode / tower)",
            "x traffic", "act. kept GB (decode / tower)", "x act. kept"]
    body = []
    for r in rows:
        d, t, x, g = r["decode"], r["tower"], r["decode_over_tower"], r["tower_geometry"]
        body.append([r["space"], r["px"], "x".join(map(str, r["latent"])), f"{g['patch']} / {g['tokens']}",
                     f"{d['forward_flops'] / 1e9:.0f} / {d['total_flops'] / 1e9:.0f}",
                     f"{t['forward_flops'] / 1e9:.1f} / {t['total_flops'] / 1e9:.1f}", fmt(x["total_flops"], ".0f"),
                     f"{d['weight_bytes'] / 1e6:.0f} / {t['weight_bytes'] / 1e6:.0f}",
                     f"{d['traffic_bytes'] / GB:.2f} / {t['traffic_bytes'] / GB:.3f}", fmt(x["traffic_bytes"], ".0f"),
                     f"{d['saved_bytes'] / GB:.2f} / {t['saved_bytes'] / GB:.3f}", fmt(x["saved_bytes"], ".0f")])
    return table(head, body, markdown=markdown)


def report(rows: list[dict[str, Any]], record: dict[str, Any], decode_side: str) -> dict[str, Any]:
    """The JSON record of a counts run (``record``: ``provenance.run_record``'s command, date and versions)."""
    return {**record, "complete": True, "counted_on": "meta device: no weights, nothing timed", "batch": 1,
            "decode_side": decode_side, "latent_side": f"{TOWER} tower per space (see definitions.tower)",
            "definitions": DEFINITIONS, "rows": rows}


def markdown(rep: dict[str, Any], title: str, decode_label: str) -> str:
    lines = [f"# {title}", "", f"`{rep['command']}` on {rep['date']} (counted on the meta device: no weights, nothing "
             "timed; GB = 1e9 bytes; x = decode side / latent tower).", "",
             counts_table(rep["rows"], decode_label, markdown=True), ""]
    lines += [f"- {k}: {v}" for k, v in DEFINITIONS.items()]
    lines += ["- decode inputs: " + "; ".join(dict.fromkeys(f"{r['space']} {r['decode_input']}" for r in rep["rows"]
                                                              if r["px"] == rep["rows"][0]["px"]))]
    return "\n".join(lines) + "\n"
