"""``python -m bench.video``: decoding a video clip against a Latent-CLIP tower run on its latent frames (issue 34).

    python -m bench.video [--clips wan2.1 ltx-video] [--measure] [--tiny] [--out DIR]

Clips (the video registry's VAEs, ``fastlclip.list_vaes(video=True)``, fastlclip's shipped diffusers configs):

- ``wan2.1``: 81 frames at 480x832 (H x W; diffusers' ``WanPipeline`` defaults: height 480, width 832,
  num_frames 81): latents (1, 16, 21, 60, 104) (8x spatial, 4x temporal, causal: 1 + 80 / 4 = 21 latent frames).
- ``ltx-video``: 121 frames at 512x768 (LTX-Video's README: "24 FPS videos at 768x512"; diffusers'
  ``LTXPipeline`` defaults to 512x704 and 161 frames): latents (1, 128, 16, 16, 24) (32x spatial, 8x temporal,
  causal: 1 + 120 / 8 = 16 latent frames).

Decode side: ``fastlclip.vaes.decode`` of the whole clip, the decoder of the shipped config as diffusers runs it
(Wan latent frame by latent frame through its causal cache; LTX-Video 0.9.0's decoder takes no timestep).
Latent side: Latent-ViT-B-8-512's tower on the space (``bench.flops.space_tower_config``: patch conv widened to the
space's channels, ``latent_factor`` the VAE's, patch = 64 px / the VAE factor: 8 for Wan, 2 for LTX-Video), run
once per latent frame with the frames folded into the batch, ``(T, C, h, w)``. Its patch conv floors the grid:
Wan's 60x104 latent frame gives 7x13 = 91 patches (the last 4 latent rows, 32 px, are not read), LTX-Video's
16x24 gives 8x12 = 96; each frame adds the class token.

Counts (no weights: both sides built on the meta device, ``bench.flops``' counter): FLOP (``torch.utils.
flop_counter``: matmuls, convolutions, attention; elementwise ops and norms not counted), forward and forward +
backward to the latents (weights frozen); weights (bf16 bytes, one pass); activations written in the forward (every
leaf module's bf16 output); activations kept for the backward (bf16 bytes autograd saves, each storage once: a
lower bound of a gradient step's peak activation memory). x = decode side / latent side. The Wan count takes
about a minute (its decoder loops over the 21 latent frames); ``--tiny`` counts the short clips of the same configs
instead (``SHORT_CLIPS``: Wan 2.1, 5 frames at 64x64; LTX-Video, 9 frames at 128x128; same code path, the numbers
say nothing of full clips).

``--measure``: both sides built with random weights on this machine's device and timed forward only (no gradient:
a video reward scores the decoded clip), after one warm-up call. CUDA: bfloat16, the full clips, ``bench.reward.
time_ms`` (CUDA events, median of trials), peak memory ``torch.cuda.max_memory_allocated`` over the calls less what
was allocated before them (the VAE's or tower's weights), an out-of-memory error reported as the side's status.
CPU: float32, the short clips (``SHORT_CLIPS``; a full Wan clip counts 275 TFLOP forward), counted too so each time
reads against its own FLOP; the wall-clock median of 2 calls; each side in a fresh process
(``bench.reward.in_fresh_process``), whose peak resident memory over the calls (``bench.reward.PeakRSS``: ``VmHWM``
reset before them) less its resident set before them is the side's peak activation memory.

Results: ``<out>/video.json`` and ``video.md`` (default ``profiles/results/counts/``; with ``--measure``
``profiles/results/<device>/``, a CPU ``cpu/``; ``--tiny`` ``cpu-smoke/``).
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fastlclip
from fastlclip import vaes

from . import flops
from .cli import Parser, writable_dir
from .profiles import default_out
from .provenance import run_record
from .report import cpu_device, fmt, table, write_json

TOWER = "Latent-ViT-B-8-512"
GB = 1e9


@dataclass(frozen=True)
class Clip:
    space: str
    frames: int
    height: int
    width: int
    source: str

    def latent_shape(self) -> tuple[int, int, int, int, int]:
        """``(1, C, T, h, w)``: T from the space's temporal rule, h and w the image's / the VAE factor."""
        cfg = fastlclip.get_vae_config(self.space)
        factor, temporal = vaes.vae_factor(cfg), vaes.vae_temporal(cfg)
        if self.height % factor or self.width % factor or (self.frames - 1) % temporal:
            raise ValueError(f"{self.space}: a {self.frames}-frame {self.height}x{self.width} clip does not fit its "
                             f"{factor}x spatial / {temporal}x causal temporal compression")
        return (1, vaes.vae_channels(cfg), 1 + (self.frames - 1) // temporal, self.height // factor,
                self.width // factor)


CLIPS = {c.space: c for c in (
    Clip("wan2.1", 81, 480, 832, "diffusers WanPipeline defaults (height 480, width 832, num_frames 81)"),
    Clip("ltx-video", 121, 512, 768, "121 frames at LTX-Video's 768x512 (Lightricks/LTX-Video README: '24 FPS videos "
         "at 768x512 resolution')"),
)}
SHORT_CLIPS = {c.space: c for c in (  # --tiny's counts and the CPU's measurement: short clips of the same configs
    Clip("wan2.1", 5, 64, 64, "short clip: 5 frames at 64x64 (latents 1x16x2x8x8)"),
    Clip("ltx-video", 9, 128, 128, "short clip: 9 frames at 128x128 (latents 1x128x2x4x4)"),
)}


# -- the two sides: one builder for the counts (meta) and the measurement (a real device) ------------------------
class DecodeSide(nn.Module):
    """A video VAE's decode path (``post_quant_conv`` where there is one, ``decoder``) on VAE-space latents
    ``(1, C, T, h, w)``, as its pipeline decodes (``fastlclip.vaes.decode``)."""

    def __init__(self, space: str):
        super().__init__()
        import diffusers

        cfg = fastlclip.get_vae_config(space)
        logging.disable(logging.WARNING)  # diffusers warns about config keys a class ignores: harmless
        try:
            self.vae = getattr(diffusers, cfg.pop("_class_name")).from_config(cfg)
        finally:
            logging.disable(logging.NOTSET)

    def decode_path(self) -> nn.Module:
        """The modules the decode runs (its weights; the encoder is built but never read)."""
        return nn.ModuleList([m for m in (getattr(self.vae, "post_quant_conv", None), self.vae.decoder) if m is not None])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return vaes.decode(self.vae, z)


class TowerSide(nn.Module):
    """The latent tower on each latent frame: ``(1, C, T, h, w)`` -> frames folded into the batch -> ``(T, embed)``."""

    def __init__(self, space: str):
        super().__init__()
        cfg = flops.space_tower_config(fastlclip.get_model_config(TOWER), space)
        self.tower = fastlclip.LatentCLIP(cfg).visual.latent_vit
        self.patch = cfg.vision.patch_size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.tower(z[0].transpose(0, 1))


def build(side: str, space: str) -> nn.Module:
    return (DecodeSide(space) if side == "decode" else TowerSide(space)).eval().requires_grad_(False)


def tower_tokens(space: str, shape: tuple[int, ...]) -> dict[str, int]:
    """The tower's batch (latent frames) and tokens per frame (patches + the class token) on latents ``shape``."""
    patch = flops.space_tower_config(fastlclip.get_model_config(TOWER), space).vision.patch_size
    _, _, t, h, w = shape
    return {"batch": t, "patch": patch, "patches": (h // patch) * (w // patch), "tokens_per_frame": (h // patch) * (w // patch) + 1,
            "unread_latent_rows": h % patch, "unread_latent_cols": w % patch}


@functools.lru_cache(maxsize=None)
def side_work(side: str, space: str, shape: tuple[int, ...]) -> flops.Work:
    with torch.device("meta"):
        module = build(side, space)
    z = flops._meta_input(*shape)
    label = f"{space} VAE decode" if side == "decode" else f"{TOWER} tower per latent frame ({space})"
    return flops._count(label, module.decode_path() if side == "decode" else module, lambda: module(z))


def work_dict(w: flops.Work) -> dict[str, Any]:
    return {"name": w.name, "forward_flops": w.forward_flops, "total_flops": w.total_flops,
            "params": w.weight_bytes // flops.BF16_BYTES, "weight_bytes": w.weight_bytes,
            "activation_bytes_forward": w.activation_bytes, "saved_bytes": w.saved_bytes}


RATIO_KEYS = ("forward_flops", "total_flops", "weight_bytes", "activation_bytes_forward", "saved_bytes")


def count_row(clip: Clip) -> dict[str, Any]:
    shape = clip.latent_shape()
    dec, lat = work_dict(side_work("decode", clip.space, shape)), work_dict(side_work("tower", clip.space, shape))
    return {"clip": asdict(clip), "latents": list(shape), "tower_input": tower_tokens(clip.space, shape),
            "decode": dec, "tower": lat, "decode_over_tower": {k: dec[k] / lat[k] if lat[k] else None for k in RATIO_KEYS}}


def _clip_text(c: dict) -> str:
    return f"{c['space']} {c['frames']} frames {c['height']}x{c['width']}"


def counts_table(rows: list[dict], markdown: bool = False) -> str:
    head = ["clip", "latents", "tower batch x tokens", "side", "TFLOP fwd", "TFLOP fwd+bwd", "weights MB",
            "act. written GB fwd", "act. kept GB", "x FLOP fwd", "x act. kept"]
    body = []
    for r in rows:
        t = r["tower_input"]
        for label, s in (("decode", r["decode"]), ("latent tower", r["tower"])):
            ratio = r["decode_over_tower"] if label == "decode" else None
            body.append([_clip_text(r["clip"]), "x".join(map(str, r["latents"])),
                         f"{t['batch']} x {t['tokens_per_frame']}", label, f"{s['forward_flops'] / 1e12:.3f}",
                         f"{s['total_flops'] / 1e12:.3f}", f"{s['weight_bytes'] / 1e6:.0f}",
                         f"{s['activation_bytes_forward'] / GB:.3f}", f"{s['saved_bytes'] / GB:.3f}",
                         fmt(ratio and ratio["forward_flops"], ".0f"), fmt(ratio and ratio["saved_bytes"], ".0f")])
    return table(head, body, markdown=markdown)


# -- measurement --------------------------------------------------------------------------------------------------
def measure_child(side: str, space: str, shape: list[int], threads: int) -> dict:
    """One side on the CPU, in its own process: build (float32, random weights), 1 warm-up + 2 timed forward calls
    (no gradient), the peak resident memory over the timed calls."""
    from .reward import PeakRSS, load_average

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    module = build(side, space)
    build_s = time.perf_counter() - t0
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        module(z)
        gc.collect()
        each = []
        with PeakRSS() as mem:
            for _ in range(2):
                t0 = time.perf_counter()
                module(z)
                each.append((time.perf_counter() - t0) * 1e3)
    return {"status": "ok", "ms": statistics.median(each), "ms_each": each, "build_s": build_s, "dtype": "float32",
            "peak_rss_gib": mem.peak_gib, "rss_before_gib": mem.before_gib,
            "peak_activation_gib": mem.peak_gib - mem.before_gib if mem.before_gib else None,
            "memory_method": mem.method, "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15_min_at_end": load_average()}


def measure_cuda(side: str, space: str, shape: list[int], device: torch.device) -> dict:
    from .reward import time_ms

    with torch.device(device):
        module = build(side, space).to(dtype=torch.bfloat16)
    z = torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(device=device, dtype=torch.bfloat16)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device)
    with torch.no_grad():
        module(z)
        ms = time_ms(lambda: module(z), device, quick=True)
    peak = torch.cuda.max_memory_allocated(device)
    return {"status": "ok", "ms": ms, "dtype": "bfloat16", "peak_allocated_gib": peak / 2**30,
            "weights_gib": resident / 2**30, "peak_activation_gib": (peak - resident) / 2**30}


FRESH_PROCESS = True  # tests: False runs each CPU side in this process


def measure_row(clip: Clip, device: torch.device, progress) -> dict:
    """Both sides of ``clip`` timed on ``device`` (see the module docstring); a failure is the side's status."""
    from .reward import in_fresh_process

    row = count_row(clip)
    measured = {}
    for side in ("decode", "tower"):
        progress(f"{_clip_text(row['clip'])}: {side} side")
        try:
            if device.type == "cuda":
                measured[side] = measure_cuda(side, clip.space, row["latents"], device)
            else:
                measured[side] = in_fresh_process("bench.video:measure_child",
                                                  {"side": side, "space": clip.space, "shape": row["latents"],
                                                   "threads": torch.get_num_threads()}, fresh=FRESH_PROCESS)
        except torch.cuda.OutOfMemoryError:
            measured[side] = {"status": f"OOM on {torch.cuda.get_device_name(device)}: the clip does not fit", "ms": None}
        except Exception as e:  # noqa: BLE001 - one failing side must not lose the run; the error is the result
            measured[side] = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}", "ms": None}
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dec, lat = measured["decode"].get("ms"), measured["tower"].get("ms")
    measured["decode_over_tower_time"] = dec / lat if dec and lat else None
    row["measured"] = measured
    return row


def measured_table(rows: list[dict], markdown: bool = False) -> str:
    head = ["clip", "latents", "side", "TFLOP fwd (counted)", "ms fwd (median)", "each ms", "peak activation GiB",
            "x time", "status"]
    body = []
    for r in rows:
        m = r["measured"]
        for side, label in (("decode", "decode"), ("tower", "latent tower")):
            s = m[side]
            body.append([_clip_text(r["clip"]), "x".join(map(str, r["latents"])), label,
                         f"{r[side]['forward_flops'] / 1e12:.3f}", fmt(s.get("ms"), ".1f"),
                         " ".join(f"{v:.0f}" for v in s.get("ms_each", [])) or "-", fmt(s.get("peak_activation_gib"), ".2f"),
                         fmt(m["decode_over_tower_time"] if side == "decode" else None, ".0f"), s["status"]])
    return table(head, body, markdown=markdown)


# -- command line ---------------------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="python -m bench.video", description=__doc__.split("\n\n")[0].replace("``", ""))
    p.add_argument("--clips", nargs="+", choices=list(CLIPS), help=f"default: {' '.join(CLIPS)}")
    p.add_argument("--measure", action="store_true",
                   help="also time both sides forward on this machine's device (CUDA: the full clips; CPU: the short "
                        "clips); see the module docstring")
    p.add_argument("--tiny", action="store_true", help="count the short clips instead of the full ones (a smoke run: "
                   "the numbers say nothing of full clips)")
    p.add_argument("--out", type=Path, help="folder for video.json / video.md (default: profiles/results/counts; "
                   "with --measure profiles/results/<device>; with --tiny profiles/results/cpu-smoke)")
    args = p.parse_args(argv)
    args.clips = list(dict.fromkeys(args.clips or CLIPS))
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
    clips = [(SHORT_CLIPS if args.tiny else CLIPS)[k] for k in args.clips]
    progress("counting on the meta device (Wan 2.1's full clip: about a minute) ...")
    rows = [count_row(c) for c in clips]
    what = "SHORT CLIPS (--tiny)" if args.tiny else "full clips"
    report = {**run_record("bench.video", argv), "complete": True, "counted_on": f"meta device, no weights ({what})",
              "tower": TOWER, "rows": rows, "device": None, "measured": None,
              "definitions": next(par for par in __doc__.split("\n\n") if par.startswith("Counts"))}
    md = ["# bench.video", "", f"`{report['command']}` on {report['date']} ({report['counted_on']}; GB = 1e9 bytes; "
          "x = decode / latent tower).", "", counts_table(rows, markdown=True), "",
          *(f"- {r['clip']['space']}: {r['clip']['source']}" for r in rows)]
    print(f"A clip's decode against {TOWER}'s tower on each latent frame ({report['counted_on']}):")
    print(counts_table(rows))
    if args.measure:
        cuda = device.type == "cuda"
        sizes = clips if cuda else [SHORT_CLIPS[k] for k in args.clips]
        report["device"] = torch.cuda.get_device_name(device) if cuda else cpu_device()
        name = report["device"] if cuda else report["device"]["name"]
        progress(f"measuring forward on {name} ({'bfloat16' if cuda else 'float32'}, random weights): "
                 + ", ".join(_clip_text(asdict(c)) for c in sizes))
        report["measured"] = [measure_row(c, device, progress) for c in sizes]
        print(f"\nMeasured forward (no gradient) on {name}, random weights:")
        print(measured_table(report["measured"]))
        md += ["", f"Measured forward (no gradient) on {name}, random weights "
               f"({'bfloat16' if cuda else 'float32'}; 1 warm-up + median of 2 calls):", "",
               measured_table(report["measured"], markdown=True), "",
               *(f"- {c.space}: {c.source}" for c in sizes if not cuda)]
    out = write_json(out_dir / "video.json", report)
    (out_dir / "video.md").write_text("\n".join(md) + "\n")
    print(f"results: {out} and {out_dir / 'video.md'}")
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)
