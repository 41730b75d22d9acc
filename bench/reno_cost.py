"""End-to-end ReNO cost per image: Latent-CLIP rewards against decode-then-CLIP (the SDXL VAE or the tiny
autoencoder TAESD-XL, then CLIP), in the ``reno`` pipeline (ReNO as its code runs) and the ``fast`` one.

    python -m bench.reno_cost [--gpu auto|a100|h100|h200|l4|rtx4090] [--weights DIR] [--iterations 50]
                              [--images N] [--rewards ...] [--pipelines reno fast] [--out DIR]
                              [--resolution 512|1024] [--preset NAME] [--unet-weights F] [--resize interpolate|pool]
    python -m bench.reno_cost --full-size [--rewards ...] [--warmup 1] [--repeats 2] [--threads N] [--out DIR]
    python -m bench.reno_cost --counts [--space ...] [--px 512 1024] [--out DIR]

The pipelines are described in ``bench/reno_pipelines.py``. Headline ratios, each with both rows' peak
VRAM: Latent-CLIP vs decode-then-CLIP ViT-B/32 inside ``reno`` (the paper: 11.59 s -> 9.11 s per image,
1.27x), ``fast`` Latent-CLIP vs ``reno`` decode-then-CLIP (what a ReNO user gains by switching), and
Latent-CLIP vs the tiny-decode-then-CLIP row a user could pick instead.

On CUDA it measures, after warm-up, with CUDA events (medians): seconds per image, a per-phase
breakdown of the iteration, peak VRAM (allocator and NVML), NVML energy, images per hour, dollars per
1000 images at the profile's price, and the saving against decode-then-CLIP ViT-B/32 in the same
pipeline. Without CUDA it runs the same pipelines on tiny configs as a smoke test and prints the floor
per iteration from FLOP and byte counts, and the decoders' floors at 512 and 1024 px. Writes JSON, Markdown and a PNG under ``--out/<gpu>/``.

``--resolution 1024`` runs SDXL's native size (128x128 latents) with a 1024 px one-step model
(``fastlclip.reno.ONE_STEP_PRESETS``; SDXL-Lightning's 1-step by default), the Latent-CLIP reward under
``--resize``; the floors then count the UNet, the decode and the latent tower at 1024 px, and the decode's
share of the decode-then-CLIP iteration floor is printed at 512 and 1024 px.

``--full-size`` (CPU only) measures ReNO iterations at the real sizes on the CPU instead of the smoke test:
the ``fast`` pipeline (``fastlclip.reno.optimize``, bfloat16) with the SDXL UNet and VAE built from the shipped
configs (random weights; random prompt embeddings, encoded once outside the loop, so no text encoder is built)
at 512 px, once per reward: Latent-ViT-B/8, SDXL VAE decode + CLIP ViT-B/32 and TAESD-XL decode + CLIP
ViT-B/32 by default (``--rewards``). Each reward runs in a fresh Python process, one after another: the generator
and reward built, then ``--warmup`` untimed iterations and ``--repeats`` timed ones (wall clock per phase: UNet
forward and backward, decode, reward; median per iteration), and the peak resident memory over the loop (as
``bench.reward --full-size``). Ratios are to the Latent-CLIP row of the same run. Seconds per image are NOT
reported: a 50-iteration image was not run; multiply by the iteration count for an estimate. Writes
``<out>/cpu/reno_cost.json`` with the CPU, its usable cores, torch's threads, the load average (at the start and
after each row), the command and the date. With the defaults (1 warm-up + 2 timed iterations, plus ReNO's last,
forward-only iteration) about 5 minutes on a quiet 2-core machine (4 min 35 s on 2026-12-07; 10 min 50 s that day
with other jobs on the cores): the SDXL UNet's forward and backward (about 11 s there) is in every iteration of
every row, and the UNet is built once per row (20 to 30 s). ``--repeats 1`` or fewer ``--rewards`` shorten it.

``--counts``: no run, only counts on the meta device (``bench/spaces.py``): the decode alone, forward + backward as
a ReNO iteration runs it, against the Latent-ViT-B/8 tower on the same latents, for every latent space
(``--space``; default all: sdxl, sd15, sd3, flux1, qwen-image, flux2, sana, dcae-f32c32-in, dcae-f32c32-mix) at
``--px`` (default 512 and 1024): GFLOP, weight, traffic and kept-activation bytes and their ratios; the tower's
patch is 64 px / the VAE's factor (8, or 2 on DC-AE's 32x), so 65 tokens at 512 px in every space. Writes
``<out>/counts/reno_cost_spaces.json`` and ``.md`` (a few seconds per space).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fastlclip import reno, runtime

from . import flops, rewards as bench_rewards, sdxl_text, spaces, tiny
from .cli import Parser, diffusers_folder, non_negative_int, positive_int, safetensors_file, text, writable_dir
from .profiles import PROFILES_DIR, Profile, Selection, load_profiles, results_folder, select
from .provenance import run_record
from .reno_pipelines import (DEFAULT_PRESETS, PIPELINES, RESOLUTIONS, optimizer_text, preset_for, resize_for,
                             run_measured, run_smoke)
from .report import NOT_MEASURED, cpu_device, fmt, plot_reno_cost, result_stem, table, write_json
from .timing import BREAKDOWN

PAPER_SAVING = "the paper reports 21% (Latent-ViT-B/8 9.11 s vs decode + CLIP ViT-B/32 11.59 s per image; GPU not stated)"
PAPER_RATIO = 11.59 / 9.11  # 1.27x, ReNO with the Latent-CLIP reward swapped in
TARGETS = {"latent_vs_pixel_b32": 2.0, "fast_vs_reno": 3.0, "vram_saving_pct": 30.0}
# (name, (numerator pipeline, reward), (denominator pipeline, reward)): ratio = numerator s/image / denominator's
HEADLINES = (
    ("Latent-ViT-B/8 vs decode + CLIP ViT-B/32 inside reno (the paper's comparison; paper: 1.27x)",
     ("reno", "pixel-b32"), ("reno", "latent-b8")),
    ("fast Latent-ViT-B/8 vs reno decode + CLIP ViT-B/32 (a ReNO user switching)", ("reno", "pixel-b32"), ("fast", "latent-b8")),
    ("fast Latent-ViT-B/8 vs reno decode + CLIP ViT-H/14 (ReNO's own CLIP reward)", ("reno", "pixel-h14"), ("fast", "latent-b8")),
    ("Latent-ViT-B/8 vs TAESD-XL decode + CLIP ViT-B/32 inside reno (the cheap alternative)", ("reno", "taesd-b32"), ("reno", "latent-b8")),
    ("Latent-ViT-B/8 vs TAESD-XL decode + CLIP ViT-B/32 inside fast", ("fast", "taesd-b32"), ("fast", "latent-b8")),
    ("TAESD-XL vs SDXL VAE decode, CLIP ViT-B/32, inside reno", ("reno", "pixel-b32"), ("reno", "taesd-b32")),
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="python -m bench.reno_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", default="auto", choices=["auto", *sorted(load_profiles())],
                   help="GPU profile for prices and floors; auto detects it from the device name")
    p.add_argument("--weights", type=diffusers_folder, help="local diffusers SDXL folder: SDXL-Turbo at 512, SDXL base with "
                   "--unet-weights at 1024 (default: random weights from the shipped configs)")
    p.add_argument("--resolution", type=int, choices=RESOLUTIONS,
                   help=f"image side in px (default 512); the one-step generator per resolution: {DEFAULT_PRESETS}")
    p.add_argument("--preset", choices=sorted(reno.ONE_STEP_PRESETS), help="one-step sampling (default: per --resolution)")
    p.add_argument("--unet-weights", type=safetensors_file, help="a one-step UNet's .safetensors loaded into --weights' unet/")
    p.add_argument("--resize", choices=["interpolate", "pool"],
                   help="Latent-CLIP's policy for latents larger than it was trained on (1024 px; default interpolate)")
    p.add_argument("--iterations", type=positive_int, help="ReNO iterations per image (default 50; 2 in the CPU smoke test)")
    p.add_argument("--images", type=positive_int, help="timed images per configuration (default 3; 1 in the CPU smoke test)")
    p.add_argument("--warmup", type=non_negative_int,
                   help="untimed warm-up iterations per configuration (CUDA: default 3; --full-size: default 1)")
    p.add_argument("--rewards", nargs="+", choices=list(bench_rewards.REWARDS),
                   help=f"default: all; with --full-size {' '.join(FULL_SIZE_REWARDS)}")
    p.add_argument("--pipelines", nargs="+", choices=list(PIPELINES), help="default: all; --full-size runs fast only")
    p.add_argument("--latent-backend", default="auto", choices=["auto", *runtime.BACKENDS],
                   help="fastlclip backend for the fast pipeline: auto (fastest that runs, measured) or a name")
    p.add_argument("--compile-unet", action="store_true", help="fast pipeline: run the UNet through torch.compile (CUDA)")
    p.add_argument("--prompt", type=text, default="A red dog and a green cat", help="prompt optimised for (ReNO's default)")
    p.add_argument("--out", type=Path, default=PROFILES_DIR / "results",
                   help="results root; files go to <out>/<gpu>/ (--full-size: <out>/cpu/)")
    p.add_argument("--full-size", action="store_true",
                   help="CPU only: time fast-pipeline ReNO iterations at the real sizes (random weights), one fresh "
                        "process per reward, with peak memory; see the module docstring")
    p.add_argument("--repeats", type=positive_int, help="--full-size: timed iterations per reward (default 2)")
    p.add_argument("--threads", type=positive_int,
                   help=f"--full-size: torch threads (default: torch's, {torch.get_num_threads()} here)")
    p.add_argument("--counts", action="store_true",
                   help="no run: count the decode against the latent tower per latent space on the meta device "
                        "(writes <out>/counts/reno_cost_spaces.*); see the module docstring")
    p.add_argument("--space", nargs="+", choices=spaces.SPACES, help="--counts: latent spaces (default: all)")
    p.add_argument("--px", nargs="+", type=spaces.px_value,
                   help=f"--counts: image sides (default: {' '.join(map(str, spaces.DEFAULT_PX))})")
    args = p.parse_args(argv)
    if why := writable_dir(args.out):
        p.error(f"--out: {why}")
    if args.counts:
        _check_counts(p, args)
        return args
    if args.space is not None or args.px is not None:
        p.error("--space and --px only with --counts")
    if args.full_size:
        _check_full_size(p, args)
    else:
        given = [f"--{k}" for k in ("repeats", "threads") if getattr(args, k) is not None]
        if given:
            p.error(f"{', '.join(given)} only with --full-size")
        args.warmup = 3 if args.warmup is None else args.warmup
        args.rewards = args.rewards or list(bench_rewards.REWARDS)
        args.pipelines = args.pipelines or list(PIPELINES)
        args.resolution = args.resolution or 512
    args.pipelines = [k for k in PIPELINES if k in args.pipelines]  # reno first: compiling is for fast only
    args.rewards = list(dict.fromkeys(args.rewards))
    return args


def _check_counts(p, args: argparse.Namespace) -> None:
    """``--counts`` runs nothing: every flag of a run is refused (one line, exit 2)."""
    given = [flag for flag, bad in (
        ("--full-size", args.full_size), ("--weights", args.weights is not None),
        ("--unet-weights", args.unet_weights is not None), ("--preset", args.preset is not None),
        ("--resize", args.resize is not None), ("--iterations", args.iterations is not None),
        ("--images", args.images is not None), ("--warmup", args.warmup is not None),
        ("--rewards", args.rewards is not None), ("--pipelines", args.pipelines is not None),
        ("--compile-unet", args.compile_unet), ("--gpu", args.gpu != "auto"), ("--resolution", args.resolution is not None),
        ("--latent-backend", args.latent_backend != "auto"), ("--repeats", args.repeats is not None),
        ("--threads", args.threads is not None)) if bad]
    if given:
        p.error(f"--counts only counts on the meta device (--space, --px, --out): {', '.join(given)} cannot apply; drop them")
    args.space = list(dict.fromkeys(args.space or spaces.SPACES))
    args.px = list(dict.fromkeys(args.px or spaces.DEFAULT_PX))


def counts_run(args, argv: list[str]) -> dict[str, Any]:
    """``--counts``: the decode alone against the latent tower, per space and image side (meta device)."""
    label = "decode"
    rows = spaces.space_rows(args.space, args.px, with_clip=False)
    report = spaces.report(rows, run_record("bench.reno_cost", argv),
                           "the space's VAE decode alone, forward + backward to the latents (what a ReNO iteration "
                           "with a decode-then-CLIP reward spends on it)")
    folder = args.out / "counts"
    path = write_json(folder / "reno_cost_spaces.json", report)
    (folder / "reno_cost_spaces.md").write_text(spaces.markdown(
        report, "bench.reno_cost --counts: the decode against the latent tower per latent space", label))
    print(f"The decode against {spaces.TOWER}'s tower per latent space, batch 1, counted on the meta device (no "
          "weights, nothing timed; GB = 1e9 bytes; x = decode / tower):")
    print(spaces.counts_table(rows, label))
    print(f"tower: {spaces.DEFINITIONS['tower']}")
    print(f"Wrote {path} and {folder / 'reno_cost_spaces.md'}")
    return report


FULL_SIZE_REWARDS = ["latent-b8", "pixel-b32", "taesd-b32"]
STAND_INS = False  # tests: tiny configs (bench.tiny) in place of the real sizes, same code path
FRESH_PROCESS = True  # tests: False runs each reward in this process


def _check_full_size(p, args: argparse.Namespace) -> None:
    """``--full-size``'s combinations: one line and exit 2 for any that cannot mean what it says."""
    given = [flag for flag, bad in (
        ("--weights", args.weights is not None), ("--unet-weights", args.unet_weights is not None),
        ("--preset", args.preset is not None), ("--resize", args.resize is not None),
        ("--iterations", args.iterations is not None), ("--images", args.images is not None),
        ("--compile-unet", args.compile_unet), ("--gpu", args.gpu != "auto"),
        ("--resolution 1024", args.resolution not in (None, 512)),
        ("--pipelines reno", args.pipelines is not None and "reno" in args.pipelines),
        ("--latent-backend", args.latent_backend not in ("auto", "eager"))) if bad]
    if given:
        p.error(f"--full-size times fast-pipeline iterations at 512 px with random weights on the CPU (eager, bfloat16; "
                f"--warmup and --repeats set the iterations): {', '.join(given)} cannot apply; drop them")
    if torch.cuda.is_available() and not STAND_INS:
        p.error("--full-size is the CPU measurement; with CUDA run without it (the CUDA run measures the real sizes)")
    args.pipelines, args.resolution = ["fast"], 512
    args.rewards = args.rewards or list(FULL_SIZE_REWARDS)
    args.warmup = 1 if args.warmup is None else args.warmup
    args.repeats = args.repeats or 2
    args.threads = args.threads or torch.get_num_threads()


def full_size_ratios(rows: list[dict[str, Any]]) -> None:
    """Each row's iteration time, reward time and peak memory as multiples of the first measured Latent-CLIP row's."""
    ref = next((r for r in rows if r.get("kind") == "latent" and isinstance(r.get("iteration_ms"), float)), None)
    for r in rows:
        ok = ref is not None and isinstance(r.get("iteration_ms"), float)
        r["relative_to"] = ref["system"] if ok else None
        r["iteration_time_vs_latent"] = r["iteration_ms"] / ref["iteration_ms"] if ok else None
        r["reward_time_vs_latent"] = r["reward_ms"] / ref["reward_ms"] if ok and ref["reward_ms"] else None
        r["peak_rss_vs_latent"] = r["peak_rss_gib"] / ref["peak_rss_gib"] if ok and ref.get("peak_rss_gib") else None


def full_size_table(rows: list[dict[str, Any]]) -> str:
    head = ["reward", "iteration ms (median)", "each ms", "x latent iteration", "reward part ms", "reward share",
            "UNet fwd+bwd ms", "peak RSS GiB", "over loop GiB", "status"]
    body = []
    for r in rows:
        b = r.get("breakdown_ms") or {}
        unet = b.get("unet_fwd", 0.0) + b.get("unet_bwd", 0.0) if b else None
        share = r.get("reward_share")
        body.append([r.get("system", r.get("reward")), fmt(r.get("iteration_ms"), ".0f"),
                     " ".join(f"{v:.0f}" for v in r.get("iteration_ms_each", [])) or "-",
                     fmt(r.get("iteration_time_vs_latent"), ".2f"), fmt(r.get("reward_ms"), ".0f"),
                     f"{100 * share:.0f}%" if isinstance(share, float) else "-", fmt(unet, ".0f"),
                     fmt(r.get("peak_rss_gib"), ".2f"), fmt(r.get("peak_rss_over_loop_gib"), ".2f"),
                     r.get("status", "ok")])
    return table(head, body, markdown=True)


def full_size_run(args, argv: list[str]) -> dict[str, Any]:
    """``--full-size``: each reward in its own fresh process, one after another; the JSON rewritten after each
    (``complete`` false until the end), so a run stopped early keeps its finished rows."""
    from .reward import in_fresh_process

    stand_ins = STAND_INS
    device = cpu_device(args.threads)
    out = args.out / "cpu" / "reno_cost.json"
    print(f"--full-size on {device['name']}, torch threads {args.threads}: fast-pipeline ReNO iterations, "
          + ("TINY STAND-INS (bench.tiny configs), not the real sizes" if stand_ins else
             "SDXL UNet and VAE from the shipped configs, the rewards at their real sizes")
          + f"; random weights, bfloat16, {tiny.IMAGE_SIZE if stand_ins else 512} px; {args.warmup} warm-up + "
          f"{args.repeats} timed iterations per reward, "
          + ("each reward in a fresh process." if FRESH_PROCESS else "all in this process."), flush=True)
    rows: list[dict[str, Any]] = []

    def save(complete: bool) -> Path:
        full_size_ratios(rows)
        return write_json(out, {
            **run_record("bench.reno_cost", argv), "complete": complete,
            "mode": "cpu-full-size (tiny stand-ins)" if stand_ins else "cpu-full-size", "device": device,
            "weights": "random weights (UNet, VAE, Latent-CLIP and open_clip built from configs, no checkpoint): "
                       "the timings are real, the images and scores are noise",
            "settings": {"pipeline": "fast", "dtype": "bfloat16", "backend": "eager", "resolution": "512x512",
                         "warmup_iterations": args.warmup, "timed_iterations": args.repeats,
                         "torch_threads": args.threads, "prompt": args.prompt, "rewards": args.rewards,
                         "optimizer": optimizer_text(), "fresh_process_per_reward": FRESH_PROCESS},
            "seconds_per_image": f"{NOT_MEASURED}: per-iteration figures only (no 50-iteration image was run)",
            "definitions": next(par for par in __doc__.split("\n\n") if par.startswith("``--full-size``")),
            "results": rows})

    for key in args.rewards:
        spec = bench_rewards.REWARDS[key]
        label = f"SDXL VAE {spec.label}" if spec.decoder == "vae" else spec.label
        tqdm.write(f"{label}: building and running {args.warmup + args.repeats + 1} iterations"
                   + (" in a fresh process ..." if FRESH_PROCESS else " ..."))
        row = in_fresh_process("bench.reno_pipelines:iteration_child",
                               {"key": key, "stand_ins": stand_ins, "warmup": args.warmup, "repeats": args.repeats,
                                "threads": args.threads, "prompt": args.prompt}, fresh=FRESH_PROCESS)
        row.setdefault("reward", key)
        row.setdefault("system", label)
        row.setdefault("kind", bench_rewards.REWARDS[key].kind)
        rows.append(row)
        tqdm.write(f"  {row['status']}" + (f": median {row['iteration_ms']:.0f} ms per iteration"
                                           if row.get("iteration_ms") is not None else ""))
        save(complete=False)
    path = save(complete=True)
    print(full_size_table(rows))
    print(f"Wrote {path}. Random weights: the timings are real, the images and scores are noise.")
    return json.loads(path.read_text())


# -- derived figures ------------------------------------------------------------------------------------
def _price(row: dict[str, Any], profile: Profile | None) -> Any:
    if not isinstance(row.get("seconds_per_image"), float):
        return row.get("usd_per_1000_images", NOT_MEASURED)
    if profile is None:
        return "no profile for this GPU: unpriced"
    if profile.price_per_hour_usd is None:
        return "price: not sourced"
    return profile.price_per_hour_usd * row["seconds_per_image"] / 3.6


def add_savings(rows: list[dict[str, Any]], profile: Profile | None) -> None:
    """Dollars per 1000 images and % saved against decode + CLIP ViT-B/32 in the same pipeline."""
    for row in rows:
        row["usd_per_1000_images"] = _price(row, profile)
        base = next((r for r in rows if r["pipeline"] == row["pipeline"] and r["reward"] == bench_rewards.BASELINE), None)
        s, b = row.get("seconds_per_image"), base and base.get("seconds_per_image")
        if isinstance(s, float) and isinstance(b, float):
            row["saved_vs_pixel_b32_pct"] = 100 * (1 - s / b)
        else:
            row["saved_vs_pixel_b32_pct"] = NOT_MEASURED


def _fastest(rows, pipeline: str, reward: str) -> dict[str, Any] | None:
    cands = [r for r in rows if r["pipeline"] == pipeline and r["reward"] == reward and isinstance(r.get("seconds_per_image"), float)]
    return min(cands, key=lambda r: r["seconds_per_image"]) if cands else None


def evaluate_targets(rows: list[dict[str, Any]], device_name: str | None) -> list[dict[str, Any]]:
    """The issue's targets, from measured rows only (they are stated for an H100/H200)."""
    out = []
    base = bench_rewards.BASELINE
    for pipeline in PIPELINES:
        b = _fastest(rows, pipeline, base)
        for key in (k for k, s in bench_rewards.REWARDS.items() if s.kind == "latent"):
            r = _fastest(rows, pipeline, key)
            if b and r:
                ratio = b["seconds_per_image"] / r["seconds_per_image"]
                out.append({"target": f"{pipeline}: {key} cheaper per image than {base}", "value": f"{ratio:.2f}x",
                            "required": f">= {TARGETS['latent_vs_pixel_b32']:g}x", "met": ratio >= TARGETS["latent_vs_pixel_b32"]})
                saving = 100 * (1 - r["peak_allocated_gib"] / b["peak_allocated_gib"])
                out.append({"target": f"{pipeline}: {key} peak VRAM (allocated) lower than {base}", "value": f"{saving:.1f}%",
                            "required": f">= {TARGETS['vram_saving_pct']:g}%", "met": saving >= TARGETS["vram_saving_pct"]})
    for key in bench_rewards.REWARDS:
        p, f = _fastest(rows, "reno", key), _fastest(rows, "fast", key)
        if p and f:
            ratio = p["seconds_per_image"] / f["seconds_per_image"]
            out.append({"target": f"{key}: fast pipeline cheaper per image than reno", "value": f"{ratio:.2f}x",
                        "required": f">= {TARGETS['fast_vs_reno']:g}x", "met": ratio >= TARGETS["fast_vs_reno"]})
    for t in out:
        t["measured_on"] = device_name
    return out


def compute_floors(args, selection: Selection, iterations: int, progress) -> dict[str, Any]:
    """Floor per iteration and per image for each (pipeline, reward) on each profile in the selection."""
    out: dict[str, Any] = {}
    if not selection.floor:
        return out
    keys = [(p, k) for p in args.pipelines for k in args.rewards]
    work = {}
    for pipeline, key in progress(keys, desc="counting FLOPs (meta device)", unit="config"):
        spec = bench_rewards.REWARDS[key]
        work[pipeline, key] = flops.iteration_work(spec.kind, spec.model, checkpointing=False, decoder=spec.decoder,
                                                   text_every_iteration=pipeline == "reno" and sdxl_text.available(),
                                                   resolution=args.resolution)
    for profile in selection.floor:
        entries = []
        for (pipeline, key), components in work.items():
            f = flops.floor(components, profile, iterations)
            entries.append({"pipeline": pipeline, "reward": key, "floor_ms_per_iteration": 1000 * f.per_iteration_s,
                            "floor_s_per_image": f.per_image_s, "gflop_per_iteration": f.flops_per_iteration / 1e9,
                            "weight_gb_per_iteration": f.weight_bytes_per_iteration / 1e9,
                            "traffic_gb_per_iteration": f.traffic_bytes_per_iteration / 1e9,
                            "components_gflop": {w.name: w.total_flops / 1e9 for w in components},
                            "decode_share": flops.decode_share(components, profile)})
        out[profile.name] = entries
    return out


def decode_shares(selection: Selection) -> list[dict[str, Any]]:
    """The decode's share of the decode-then-CLIP ViT-B/32 iteration floor (fast pipeline) per decoder,
    resolution and floor profile: the part of the iteration a latent reward removes."""
    rows = []
    for key in ("pixel-b32", "taesd-b32"):
        spec = bench_rewards.REWARDS[key]
        for resolution in RESOLUTIONS:
            work = flops.iteration_work(spec.kind, spec.model, checkpointing=False, decoder=spec.decoder,
                                        resolution=resolution)
            decode = next(w for w in work if w.name in flops.DECODE_NAMES)
            for profile in selection.floor:
                rows.append({"profile": profile.name, "resolution": resolution, "reward": key,
                             "decode_tflop_per_iteration": decode.total_flops / 1e12,
                             "decode_floor_ms": 1000 * decode.seconds(profile),
                             "iteration_floor_ms": 1000 * sum(w.seconds(profile) for w in work),
                             "decode_share": flops.decode_share(work, profile)})
    return rows


def decode_share_table(rows: list[dict[str, Any]]) -> str:
    headers = ["profile", "reward", "px", "decode TFLOP/iter", "decode FLOOR ms", "iteration FLOOR ms", "decode share"]
    body = [[r["profile"], bench_rewards.REWARDS[r["reward"]].label, r["resolution"],
             fmt(r["decode_tflop_per_iteration"], ".2f"), fmt(r["decode_floor_ms"], ".2f"),
             fmt(r["iteration_floor_ms"], ".2f"), f"{100 * r['decode_share']:.0f}%"] for r in rows]
    return table(headers, body, markdown=True)


def headline_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The named ratios (``HEADLINES``) from the fastest measured row of each side, with both rows' peak VRAM."""
    out = []
    for name, (p_num, r_num), (p_den, r_den) in HEADLINES:
        num, den = _fastest(rows, p_num, r_num), _fastest(rows, p_den, r_den)
        entry = {"ratio": name, "slower": f"{p_num} {r_num}", "faster": f"{p_den} {r_den}"}
        if num and den:
            entry.update(value=num["seconds_per_image"] / den["seconds_per_image"],
                         seconds_per_image=(num["seconds_per_image"], den["seconds_per_image"]),
                         peak_allocated_gib=(num["peak_allocated_gib"], den["peak_allocated_gib"]))
        else:
            entry["value"] = NOT_MEASURED
        out.append(entry)
    return out


DECODER_SIDES = {512: 64, 1024: 128}


def decoder_floors(selection: Selection) -> dict[str, Any]:
    """Forward + backward floors of the decode alone (SDXL VAE, TAESD-XL) at 512 and 1024 px, next to the
    Latent-CLIP B/8 tower (512 px, and 1024 px under resize="interpolate"): where the time of a pixel reward goes.
    The 16-channel spaces at 1024 px: the SD3 and FLUX.1 VAE decodes and their tiny decoders, beside the B/8
    tower widened to 16 input channels (FLUX.1's latents)."""
    out: dict[str, Any] = {}
    comps = {}
    for px, side in DECODER_SIDES.items():
        comps[f"SDXL VAE decode {px} px"] = flops.decode_work("vae", False, side)
        comps[f"TAESD-XL decode {px} px"] = flops.decode_work("taesd", False, side)
    comps["Latent-ViT-B/8 tower 512 px"] = flops.latent_tower_work("Latent-ViT-B-8-512", False)
    comps["Latent-ViT-B/8 tower 1024 px (interpolate)"] = flops.latent_tower_work("Latent-ViT-B-8-512", False,
                                                                                 DECODER_SIDES[1024])
    side = DECODER_SIDES[1024]
    for vae in ("sd3", "flux1", "taesd3", "taef1"):
        comps[f"{flops.DECODER_LABELS[vae]} 1024 px"] = flops.decode_work(vae, False, side)
    comps["Latent-ViT-B/8 tower 1024 px, 16 channels (interpolate)"] = flops.latent_tower_work(
        "Latent-ViT-B-8-512", False, side, vae="flux1")
    comps["CLIP ViT-B/32 tower (224 px)"] = flops.open_clip_tower_work("ViT-B-32", False)
    comps["CLIP ViT-H/14 tower (224 px)"] = flops.open_clip_tower_work("ViT-H-14", False)
    for profile in selection.floor:
        out[profile.name] = [{"component": name, "gflop_fwd_bwd": w.total_flops / 1e9, "weight_mb": w.weight_bytes / 1e6,
                              "activation_gb_fwd": w.activation_bytes / 1e9, "traffic_gb_fwd_bwd": w.traffic_bytes() / 1e9,
                              "floor_ms_fwd_bwd": 1000 * w.seconds(profile),
                              "bound": "compute" if w.total_flops / (profile.peak_bf16_tflops * 1e12)
                              >= w.traffic_bytes() / (profile.memory_bandwidth_tbs * 1e12) else "memory"}
                             for name, w in comps.items()]
    return out


# -- output -------------------------------------------------------------------------------------------
def _backend(r: dict[str, Any]) -> str:
    return r["backend"] + (" +ckpt" if r["gradient_checkpointing"] and r["pipeline"] == "fast" else "")


def cost_table(rows: list[dict[str, Any]]) -> str:
    headers = ["pipeline", "reward", "backend", "s/image", "ms/iter", "peak alloc GiB", "NVML peak GiB", "J/image",
               "images/h", "$/1000 img", "saved vs B/32"]
    body = []
    for r in rows:
        get = lambda k, spec=".2f": fmt(r.get(k, r.get("error", NOT_MEASURED)), spec)  # noqa: E731
        saved = r.get("saved_vs_pixel_b32_pct", NOT_MEASURED)
        body.append([r["pipeline"], r["reward_label"], _backend(r), get("seconds_per_image"), get("iteration_ms_median", ".1f"),
                     get("peak_allocated_gib"), get("nvml_peak_used_gib"), get("energy_j_per_image", ".0f"),
                     get("images_per_hour", ".0f"), get("usd_per_1000_images", ".3f"),
                     f"{saved:.1f}%" if isinstance(saved, float) else saved])
    return table(headers, body, markdown=True)


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    headers = ["pipeline", "reward", "backend", *BREAKDOWN]  # "-": the phase does not occur (no VAE in a latent reward)
    def cell(r, phase):
        if not isinstance(r.get("breakdown_ms"), dict):
            return r.get("error", NOT_MEASURED)
        return fmt(r["breakdown_ms"][phase], ".2f") if phase in r["breakdown_ms"] else "-"

    body = [[r["pipeline"], r["reward_label"], _backend(r), *(cell(r, p) for p in BREAKDOWN)] for r in rows]
    return table(headers, body, markdown=True)


def smoke_table(rows: list[dict[str, Any]]) -> str:
    body = [[r["pipeline"], r["reward_label"], r["smoke"]] for r in rows]
    return table(["pipeline", "reward", "smoke test result"], body, markdown=True)


def floor_table(floors: dict[str, Any]) -> str:
    headers, body = ["profile", "pipeline", "reward", "GFLOP/iter", "weight GB/iter", "traffic GB/iter", "FLOOR ms/iter",
                     "FLOOR s/image", "decode share"], []
    for name, entries in floors.items():
        for e in entries:
            share = e.get("decode_share", 0.0)
            body.append([name, e["pipeline"], bench_rewards.REWARDS[e["reward"]].label, f"{e['gflop_per_iteration']:.0f}",
                         f"{e['weight_gb_per_iteration']:.2f}", f"{e['traffic_gb_per_iteration']:.2f}",
                         f"{e['floor_ms_per_iteration']:.2f}", f"{e['floor_s_per_image']:.3f}",
                         f"{100 * share:.0f}%" if share else "-"])
    return table(headers, body, markdown=True)


def decoder_floor_table(floors: dict[str, Any]) -> str:
    headers = ["profile", "component", "GFLOP fwd+bwd", "weights MB", "activations GB fwd", "traffic GB fwd+bwd",
               "FLOOR ms fwd+bwd", "bound"]
    body = [[name, e["component"], f"{e['gflop_fwd_bwd']:.1f}", f"{e['weight_mb']:.1f}", f"{e['activation_gb_fwd']:.3f}",
             f"{e['traffic_gb_fwd_bwd']:.2f}", f"{e['floor_ms_fwd_bwd']:.3f}", e["bound"]]
            for name, entries in floors.items() for e in entries]
    return table(headers, body, markdown=True)


def headline_table(headlines: list[dict[str, Any]]) -> str:
    body = []
    for h in headlines:
        measured = isinstance(h["value"], float)
        body.append([h["ratio"], f"{h['value']:.2f}x" if measured else h["value"],
                     " / ".join(f"{v:.2f}" for v in h["seconds_per_image"]) if measured else "-",
                     " / ".join(f"{v:.2f}" for v in h["peak_allocated_gib"]) if measured else "-"])
    return table(["headline ratio", "speedup", "s/image (slower / faster)", "peak alloc GiB (slower / faster)"], body,
                 markdown=True)


def where_latent_clip_wins() -> str:
    """Plain statement, from the meta-device counts (not measurements), of where Latent-CLIP's saving comes from."""
    vae, vae1k, taesd = flops.decode_work("vae"), flops.decode_work("vae", side=128), flops.decode_work("taesd")
    unet, lat = flops.unet_work(False), flops.latent_tower_work("Latent-ViT-B-8-512", False)
    b32 = flops.open_clip_tower_work("ViT-B-32", False)
    t = 1e12
    return (
        "Where Latent-CLIP wins and where it does not (from FLOP/byte counts, NOT measurements; measured rows decide): "
        f"against the SDXL VAE decode it removes {vae.total_flops / t:.2f} TFLOP and {vae.traffic_bytes() / 1e9:.1f} GB "
        f"of traffic per iteration at 512 px ({vae1k.total_flops / t:.1f} TFLOP, {vae1k.traffic_bytes() / 1e9:.1f} GB at "
        f"1024 px), against the UNet's {unet.total_flops / t:.2f} TFLOP forward + backward. Against TAESD-XL the gap "
        f"is small: the tiny decoder has {taesd.weight_bytes / 2 / 1e6:.1f}M weights and {taesd.total_flops / t:.2f} TFLOP "
        f"forward + backward at 512 px but writes {taesd.activation_bytes / 1e9:.2f} GB of full-resolution activations "
        f"per forward (memory-bound), and its CLIP ViT-B/32 ({b32.total_flops / t:.3f} TFLOP) costs about what "
        f"Latent-ViT-B/8 does ({lat.total_flops / t:.3f} TFLOP); next to the UNet both are small, and the per-iteration "
        "floors above give the difference per GPU. Latent-CLIP also saves kernel launches: one ViT on 65 tokens instead of a 30-odd-layer decoder, a "
        "resize and a ViT. TAESD's gradient only approximates the VAE decode's (bench.reward reports the cosine).")


def error_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One line per configuration that failed: which, what, and why."""
    return [f"{r['pipeline']} {r['reward_label']} {_backend(r)}: {r['error']}"
            + (f" ({r['error_detail']})" if r.get("error_detail") else "") for r in rows if r.get("error")]


def _nvml_notes(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["nvml_note"] for r in rows if r.get("nvml_note")))


def _statements(report: dict[str, Any]) -> list[str]:
    s = [report["mode_text"], f"Generator: {report['weights']['generator']}.", f"Rewards: {report['weights']['rewards']}.",
         report["profile_selection"], "No quality figure is reported: the rewards carry random weights."]
    s += [f"{k}: {v}" for k, v in PIPELINES.items() if k in report["settings"]["pipelines"]]
    return s


def write_outputs(report: dict[str, Any], directory: Path) -> dict[str, Path]:
    stem = result_stem("reno_cost", report["settings"]["floor_resolution"])  # 1024 px never overwrites 512 px
    paths = {ext: directory / f"{stem}.{ext}" for ext in ("json", "md", "png")}
    write_json(paths["json"], report)
    md = [f"# ReNO cost per image: {report['device'] or 'no CUDA device (CPU smoke test)'}", "",
          f"`{report['command']}` on {report['date']}; torch {report['versions']['torch']}, diffusers "
          f"{report['versions']['diffusers']}, open_clip {report['versions']['open_clip']}.", ""]
    md += [f"- {line}" for line in _statements(report)] + [""]
    md += ["## Headline ratios", "", headline_table(report["headlines"]), ""]
    if report["mode"] == "measured":
        md += ["## Cost", "", cost_table(report["results"]), "", f"Saving vs decode + CLIP ViT-B/32: {PAPER_SAVING}.",
               *(f"Failed: {n}." for n in error_notes(report["results"])),
               *(f"NVML: {n}." for n in _nvml_notes(report["results"])), ""]
        md += ["## Per-iteration breakdown (ms, median over iterations with a backward pass; CUDA events)", "",
               breakdown_table(report["results"]), ""]
    else:
        md += ["## Smoke test (tiny configs, nothing timed)", "", smoke_table(report["results"]), "",
               f"Cost, breakdown, VRAM, energy: {NOT_MEASURED} (no CUDA device).", ""]
    if report["floors"]:
        md += ["## FLOOR from FLOP and byte counts (a lower bound, NOT a measurement)", "", floor_table(report["floors"]), ""]
    if report.get("decoder_floors"):
        md += ["## Decoders at 512 and 1024 px: FLOOR from FLOP and byte counts (NOT a measurement)", "",
               decoder_floor_table(report["decoder_floors"]), "", report["where_latent_clip_wins"], ""]
    if report.get("decode_shares"):
        md += ["## The decode's share of the decode + CLIP ViT-B/32 iteration FLOOR by resolution (NOT a measurement)",
               "", decode_share_table(report["decode_shares"]), ""]
    md += ["## Targets (stated for an H100/H200)", ""]
    md += [f"- {t['target']}: {t['value']} (needs {t['required']}): {'met' if t['met'] else 'NOT met'}" for t in report["targets"]] \
        if isinstance(report["targets"], list) and report["targets"] else [f"- {NOT_MEASURED}"]
    paths["md"].write_text("\n".join(md) + "\n")
    plot_reno_cost(report, paths["png"])
    return paths


def tiny_side(args) -> int:
    """The smoke run's image side: the tiny configs' 64 px, doubled at ``--resolution 1024``."""
    return tiny.IMAGE_SIZE * args.resolution // 512


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.counts:
        return counts_run(args, argv)
    if args.full_size:
        return full_size_run(args, argv)

    profiles = load_profiles()
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else None
    selection = select(args.gpu, device_name, profiles)
    print(selection.message)
    if cuda:
        mode = "Measured with CUDA events after warm-up (medians)."
    else:
        mode = ("CPU SMOKE TEST on tiny configs: checks the pipeline runs; nothing is timed. The floors below come from "
                "FLOP and byte counts of the full-size models: lower bounds, NOT measurements.")
        if args.weights:
            mode += f" --weights {args.weights} is not used: the smoke test runs tiny configs."

    floor_iterations = args.iterations or 50  # the floor is for the full-size models, whatever the smoke test runs
    folder = results_folder(selection.measured, device_name) if cuda else "cpu-smoke"
    partial = args.out / folder / "reno_cost.json"

    def save_partial(rows: list[dict[str, Any]]) -> None:
        """Each configuration's row as soon as it is measured: a run killed later keeps the finished ones."""
        write_json(partial, {**run_record("bench.reno_cost", argv), "device": device_name,
                             "mode": "measured" if cuda else "cpu-smoke", "complete": False,
                             "note": f"partial: {len(rows)} configuration(s) finished; the run had not ended",
                             "results": rows})

    rows, info = (run_measured if cuda else run_smoke)(args, tqdm, on_row=save_partial)
    add_savings(rows, selection.measured)
    floors = compute_floors(args, selection, floor_iterations, tqdm)
    dec_floors = decoder_floors(selection)
    shares = decode_shares(selection)
    headlines = headline_ratios(rows)
    random_generator = not (cuda and args.weights)
    report = {
        **run_record("bench.reno_cost", argv),
        "python": sys.executable,
        "device": device_name,
        "mode": "measured" if cuda else "cpu-smoke",
        "complete": True,
        "mode_text": mode,
        "weights": {"random": True, "generator": info["generator"],
                    "rewards": "random weights (Latent-CLIP and open_clip models built without checkpoints)",
                    "statement": "random weights" + ("" if random_generator else " (rewards only)")},
        "profile_selection": selection.message,
        "profile": vars(selection.measured) if selection.measured else None,
        "settings": {"iterations": args.iterations, "images": args.images, "warmup_iterations": args.warmup if cuda else 0,
                     "prompt": args.prompt, "pipelines": args.pipelines, "rewards": args.rewards, "dtype": info["dtype"],
                     "latent_backend_requested": args.latent_backend, "latent_backend": info["latent_backend"],
                     "compile_unet": bool(args.compile_unet and cuda),
                     "resolution": (f"{args.resolution}x{args.resolution}" if cuda else
                                    f"{tiny_side(args)}x{tiny_side(args)} (tiny; --resolution {args.resolution})"),
                     "floor_resolution": f"{args.resolution}x{args.resolution}", "one_step_preset": preset_for(args),
                     "latent_resize": resize_for(args),
                     "optimizer": optimizer_text()},
        "results": rows,
        "headlines": headlines,
        "floors": floors,
        "decoder_floors": dec_floors,
        "decode_shares": shares,
        "where_latent_clip_wins": where_latent_clip_wins(),
        "floor_iterations": floor_iterations,
        "floor_note": "FLOOR: lower bound max(FLOPs/peak bf16, weight bytes/bandwidth) per component, summed; NOT a measurement",
        "paper_saving": PAPER_SAVING,
        "targets": evaluate_targets(rows, device_name) if cuda else NOT_MEASURED,
    }
    paths = write_outputs(report, args.out / folder)

    print()
    for line in _statements(report):
        print(line)
    if cuda:
        print("\nCost")
        print(cost_table(rows))
        print(f"Saving vs decode + CLIP ViT-B/32: {PAPER_SAVING}.")
        for note in error_notes(rows):
            print(f"Failed: {note}.")
        for note in _nvml_notes(rows):
            print(f"NVML: {note}.")
        print("\nPer-iteration breakdown, ms (median over iterations with a backward pass, CUDA events)")
        print(breakdown_table(rows))
    else:
        print("\nSmoke test (tiny configs, nothing timed)")
        print(smoke_table(rows))
        print(f"Cost, breakdown, VRAM, energy: {NOT_MEASURED} (no CUDA device).")
    if floors:
        print(f"\nFLOOR per iteration and per image ({floor_iterations} iterations) from FLOP and weight-byte counts: "
              "a lower bound, NOT a measurement")
        print(floor_table(floors))
    if dec_floors:
        print("\nDecoders at 512 and 1024 px: FLOOR from FLOP and byte counts, NOT a measurement")
        print(decoder_floor_table(dec_floors))
        print(report["where_latent_clip_wins"])
    if shares:
        print("\nThe decode's share of the decode + CLIP ViT-B/32 iteration FLOOR (fast pipeline) by resolution: what a "
              "latent reward removes (counts, NOT a measurement)")
        print(decode_share_table(shares))
    if isinstance(report["targets"], list):
        print("\nTargets (stated for an H100/H200):")
        for t in report["targets"]:
            print(f"  {t['target']}: {t['value']} (needs {t['required']}): {'met' if t['met'] else 'NOT met'}")
    print("\nWrote " + ", ".join(str(p) for p in paths.values()))
    print("\nHeadline ratios (peak VRAM per row)")
    print(headline_table(headlines))
    return report


if __name__ == "__main__":
    main()
