"""``python -m bench.reward``: one reward step and forward throughput, fastlclip backends against baselines.

    python -m bench.reward [--models ...] [--backends eager triton graph compile] [--baselines ...]
                           [--compile-modes ...] [--reward-batches 1 4 16] [--forward-batches 64 256]
                           [--gpu auto|h100|...] [--out FILE] [--quick]
    python -m bench.reward --full-size [--models ...] [--baselines ...] [--warmup 1] [--repeats 3]
                           [--threads N] [--out FILE]
    python -m bench.reward --counts [--space ...] [--px 512 1024] [--out FILE]

Tasks: a reward step (``loss = reward(latents, prompt)``, then the gradient to the latents) at batch 1,
4, 16, and a forward pass (image features, no grad) at batch 64 and 256, in bf16 on SDXL 64x64 latents.
Systems, per Latent-CLIP model: fastlclip with each backend (text features cached, NaN check off; "graph
+ check_finite" keeps it on, at batch 1; "compile" in ``fastlclip.runtime.DEFAULT_COMPILE_MODE``);
fastlclip ``compile`` in the other torch.compile modes (batch-1 reward step); the reference, open_clip's
ViT with a 4-channel ``conv1`` (the authors' fork), eager and through ``torch.compile``, holding the same
weights. Then decode-then-CLIP as ReNO computes it: SDXL VAE decode + open_clip ViT-B/32, ViT-L/14,
ViT-H/14 (``fastlclip.PixelCLIPReward``, no gradient checkpointing), and what a user would pick instead of
Latent-CLIP: the tiny autoencoder TAESD-XL (``diffusers.AutoencoderTiny``, taesdxl's config) decode + CLIP
ViT-B/32 and ViT-H/14 (baselines ``taesd-ViT-B-32``, ``taesd-ViT-H-14``).

Times are medians over trials of back-to-back calls between CUDA events (as a loop that never waits for
the GPU runs them), after warm-up; "setup" is the first calls (capture, compile). Ratios are speedups
against the reference eager model of the same run. % weight floor (batch-1 reward step): the time to
read the system's bf16 weights twice (forward and backward) at the profile's memory bandwidth, as a
percentage of the measured time. % bf16 peak (forward rows): FLOPs (torch.utils.flop_counter, per image, times the batch) per
second over the profile's bf16 dense peak. Peak VRAM: torch.cuda.max_memory_allocated over the row,
with only that system's weights resident (graph and compile rows also hold their earlier rows' graphs,
as a process that used those shapes would). Every fastlclip and compiled system's batch-1 reward step is
checked against the reference (loss, gradient cosine). Random weights: timings only. A table goes to
stdout last, JSON to ``profiles/results/<gpu>/reward.json``. Without CUDA: a CPU smoke check on tiny configs.

A full run compiles about a dozen graphs per model, each slow to compile (max-autotune the slowest). To
fit a time limit, split it with ``--models``, ``--backends``, ``--baselines``, ``--compile-modes`` and ``--out``:
each run times its own reference eager rows, so its ratios stand on their own.

``--full-size`` (CPU only): the real sizes with random weights, timed side by side in one run on the CPU in
float32: the batch-1 reward step (forward, then the gradient to one 1x4x64x64 latent, 512 px) of
Latent-ViT-B/8 (fastlclip eager), of SDXL VAE decode + CLIP ViT-B/32 and of TAESD-XL decode + CLIP ViT-B/32
(``--models`` and ``--baselines`` choose others). Each system runs in a fresh Python process (one after
another, never two at once), which builds it, runs ``--warmup`` untimed steps and ``--repeats`` timed ones
(wall clock each; the median is reported) and reads its peak resident memory (Linux ``VmHWM``, reset just
before the steps, so the peak is the steps' own; else ``ru_maxrss``, the process's whole life). Ratios are to
the first Latent-CLIP row of the same run. The CPU (``/proc/cpuinfo``), its usable cores and torch's thread
count (and the load average, at the start and after each row) are recorded with the command and the date in
``profiles/results/cpu/reward.json``. About 3 to 4 minutes on a 2-core machine with the defaults (1 warm-up + 3
timed steps; 3 min 15 s on 2026-12-07, most of it the SDXL VAE row).

``--counts``: no run, only counts on the meta device (``bench/spaces.py``): the batch-1 reward step, forward +
backward to the latents, of decode + CLIP ViT-B/32 (224 px; the resize not counted) against the Latent-ViT-B/8
tower on the same latents, for every latent space (``--space``; default all: sdxl, sd15, sd3, flux1, qwen-image,
flux2, sana, dcae-f32c32-in, dcae-f32c32-mix) at ``--px`` (default 512 and 1024): GFLOP, weight, traffic and
kept-activation bytes and their ratios; the tower's patch is 64 px / the VAE's factor (8, or 2 on DC-AE's 32x),
so 65 tokens at 512 px in every space. Writes ``--out`` (default ``profiles/results/counts/reward_spaces.json``)
and the same name with ``.md``.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import json
import logging
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import fastlclip
from fastlclip import runtime

from . import flops, rewards as bench_rewards, spaces, tiny
from .cli import Parser, non_negative_int, positive_int, writable_file
from .provenance import run_record
from .report import cpu_device, fmt, table as table_text, write_json
from .profiles import PROFILES_DIR, Profile, load_profiles, results_folder, select

MODELS = {"Latent-ViT-B-8-512": "Latent-ViT-B/8", "Latent-ViT-B-4-512-plus": "Latent-ViT-B/4-plus"}
BACKENDS = runtime.BACKENDS
PIXEL_CLIPS = {"ViT-B-32": "pixel-b32", "ViT-L-14": "pixel-l14", "ViT-H-14": "pixel-h14",
               "taesd-ViT-B-32": "taesd-b32", "taesd-ViT-H-14": "taesd-h14"}  # baseline name -> bench.rewards key
BASELINES = ("reference-compile", *PIXEL_CLIPS)
PROMPT = "a photo of a red dog and a green cat"
DTYPE = torch.bfloat16  # on CUDA; the CPU smoke check runs float32
REFERENCE = "reference eager"
CHECK_MIN_COS = 0.999  # gradient cosine to the reference, batch-1 reward step
CHECK_MAX_LOSS_DIFF = 0.1  # |loss - reference loss|; the loss is 100 - ~14.3 * cosine
RANDOM_WEIGHTS = "Random weights (shipped configs, no checkpoint): the timings are real, the scores are meaningless."


@dataclass
class System:
    """Something to time: ``reward(latents) -> loss`` and ``features(latents) -> (B, D)``."""

    group: str  # the Latent-CLIP model, or "decode-then-CLIP"
    name: str
    reward: Callable[[torch.Tensor], torch.Tensor]
    features: Callable[[torch.Tensor], torch.Tensor]
    forward_flops: int | None = None  # per image
    weight_bytes: int | None = None  # bf16 weights read by one forward pass


@dataclass
class Row:
    group: str
    system: str
    task: str  # "reward" (forward + backward to the latents) or "forward" (no grad)
    batch: int
    ms: float | None = None
    setup_s: float | None = None
    peak_vram_gib: float | None = None
    status: str = "ok"
    images_per_s: float | None = None
    speedup_vs_reference: float | None = None
    relative_to: str | None = None
    pct_weight_floor: float | None = None
    pct_bf16_peak: float | None = None
    forward_flops_per_image: int | None = None
    weight_bytes: int | None = None
    extra: dict = field(default_factory=dict)


def dtype_for(device: torch.device) -> torch.dtype:
    return DTYPE if device.type == "cuda" else torch.float32


# -- timing -------------------------------------------------------------------------------------------
def time_ms(fn: Callable[[], object], device: torch.device, quick: bool) -> float:
    """Median ms per call (see the module docstring); wall clock on CPU."""
    if device.type != "cuda":
        times = []
        for _ in range(3 if quick else 5):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)
    with torch.cuda.device(device):  # the events and the synchronisation are the device's the work runs on
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end), 1e-3)
    steps = max(1, min(50, round((20 if quick else 50) / estimate)))
    trials = 3 if quick or estimate > 200 else 7
    return runtime.time_cuda(fn, trials=trials, steps=steps, warmup=1, device=device)


def latents_for(batch: int, size: int, device, requires_grad: bool, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed + batch)
    x = torch.randn(batch, 4, size, size, generator=g).to(device=device, dtype=dtype_for(device))
    return x.requires_grad_(requires_grad)


def run_system(system: System, tasks: list[tuple[str, int]], size: int, device: torch.device, quick: bool,
               progress) -> list[Row]:
    rows = []
    for task, batch in tasks:
        row = Row(system.group, system.name, task, batch, forward_flops_per_image=system.forward_flops,
                  weight_bytes=system.weight_bytes)
        progress(f"{system.group} | {system.name} | {task} b{batch}")
        try:
            x = latents_for(batch, size, device, requires_grad=task == "reward")
            if task == "reward":
                def fn(x=x):
                    return torch.autograd.grad(system.reward(x), x)
            else:
                def fn(x=x):
                    with torch.no_grad():
                        return system.features(x)
            _free(device)
            t0 = time.perf_counter()
            fn()
            fn()
            _sync(device)
            row.setup_s = time.perf_counter() - t0
            row.ms = time_ms(fn, device, quick)
            row.images_per_s = batch / row.ms * 1e3
            if device.type == "cuda":
                row.peak_vram_gib = torch.cuda.max_memory_allocated(device) / 2**30
        except torch.cuda.OutOfMemoryError:
            row.status = "OOM"
            progress("  OOM")
        except Exception as e:  # noqa: BLE001 - one failing row must not lose the run; the error is the result
            row.status = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            progress(f"  {row.status}")
        rows.append(row)
        _free(device)
    return rows


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def reward_step(system: System, size: int, device) -> tuple[float, torch.Tensor]:
    """Loss and latent gradient of a batch-1 reward step (the shape the benchmark times, so nothing new compiles)."""
    x = latents_for(1, size, device, requires_grad=True, seed=1)
    loss = system.reward(x)
    return loss.item(), torch.autograd.grad(loss, x)[0]


def check(system: System, reference: tuple[float, torch.Tensor], size: int, device) -> dict:
    """``system``'s batch-1 reward step against the reference eager model's."""
    try:
        loss, grad = reward_step(system, size, device)
    except Exception as e:  # noqa: BLE001 - reported as the check's result
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    diff = abs(loss - reference[0])
    cos = F.cosine_similarity(grad.float().flatten(), reference[1].float().flatten(), dim=0).item()
    return {"loss_abs_diff": diff, "cos_grad": cos, "ok": diff <= CHECK_MAX_LOSS_DIFF and cos >= CHECK_MIN_COS}


# -- systems ------------------------------------------------------------------------------------------
def reference_tower(model: fastlclip.LatentCLIP) -> torch.nn.Module:
    """open_clip's VisionTransformer with a 4-channel patch conv (the authors' fork), with ``model``'s weights."""
    from open_clip.transformer import VisionTransformer

    v = model.cfg.vision
    tower = VisionTransformer(image_size=v.latent_size, patch_size=v.patch_size, width=v.width, layers=v.layers,
                              heads=v.heads, mlp_ratio=v.mlp_ratio, output_dim=model.cfg.embed_dim)
    tower.conv1 = torch.nn.Conv2d(v.latent_channels, v.width, v.patch_size, stride=v.patch_size, bias=False)
    tower.load_state_dict(model.visual.latent_vit.state_dict())
    return tower.to(device=model.device, dtype=model.dtype).eval().requires_grad_(False)


def _work(work) -> dict:
    return {"forward_flops": work.forward_flops, "weight_bytes": work.weight_bytes} if work is not None else {}


def reference_system(group: str, name: str, tower, txt: torch.Tensor, logit_scale: float, work) -> System:
    """The reference reward: the tower on diffusion latents / 0.13025, ReNO's CLIP loss."""
    scale = 1.0 / fastlclip.SDXL_SCALING_FACTOR

    def features(x):
        return tower(x * scale)

    def reward(x):
        img = F.normalize(features(x).float(), dim=-1)
        return 100.0 - logit_scale * (img @ txt).mean()

    return System(group, name, reward, features, **_work(work))


def fastlclip_system(group: str, name: str, model, work) -> System:
    reward = fastlclip.LatentCLIPReward(model)
    return System(group, name, lambda x: reward(x, PROMPT), lambda x: model.encode_latents(x, normalize=False),
                  **_work(work))


def latent_model_rows(model_name: str, args, device, progress) -> tuple[list[Row], dict]:
    """Reference (eager, compiled) and fastlclip rows for one Latent-CLIP model, one system resident at a time."""
    smoke = device.type != "cuda"
    group = "tiny Latent-CLIP" if smoke else MODELS.get(model_name, model_name)
    work = None if smoke else flops.latent_tower_work(model_name, False)
    model = bench_rewards.load_latent_clip(tiny.LATENT_CLIP if smoke else model_name, device=device,
                                           dtype=dtype_for(device), backend="eager")
    size = model.latent_size
    txt = fastlclip.LatentCLIPReward(model).text_features([PROMPT])[0]
    logit_scale = model.logit_scale.detach().exp().float().item()
    tasks = [("reward", b) for b in args.reward_batches] + [("forward", b) for b in args.forward_batches]
    rows, checks = [], {}

    ref = reference_tower(model)
    model.to("cpu")  # only the system being timed holds device memory
    ref_sys = reference_system(group, REFERENCE, ref, txt, logit_scale, work)
    reference = reward_step(ref_sys, size, device)
    rows += run_system(ref_sys, tasks, size, device, args.quick, progress)
    if "reference-compile" in args.baselines and not smoke:
        # open_clip's forward is one code object for every model and shape: a fresh cache per model, and room
        # for every shape of the run (Dynamo falls back to eager, silently, past its recompile limit).
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 4 * len(tasks) + 8)
        compiled = torch.compile(ref, dynamic=False)
        sys_ = reference_system(group, "reference + torch.compile", compiled, txt, logit_scale, work)
        checks[sys_.name] = check(sys_, reference, size, device)
        rows += run_system(sys_, tasks, size, device, args.quick, progress)
        del compiled, sys_
    del ref, ref_sys
    _free(device)

    model.to(device)
    variants = [(f"fastlclip {b}", b, {}, tasks) for b in args.backends]
    if "graph" in args.backends and 1 in args.reward_batches and not smoke:
        variants.append(("fastlclip graph + check_finite", "graph", {}, [("reward", 1)]))
    variants += [(f"fastlclip compile mode={m}", "compile", {"mode": m}, [("reward", 1)]) for m in args.compile_modes
                 if not smoke and not (m == runtime.DEFAULT_COMPILE_MODE and "compile" in args.backends)]
    for name, backend, options, var_tasks in variants:
        model.set_backend(backend, **options)
        model.check_finite = name.endswith("check_finite")
        sys_ = fastlclip_system(group, name, model, work)
        checks[name] = check(sys_, reference, size, device)
        rows += run_system(sys_, var_tasks, size, device, args.quick, progress)
        if model.runtime is not None:
            for row in rows[-len(var_tasks):]:
                row.extra["runtime_stats"] = vars(model.runtime.stats).copy()
        model.set_backend("eager")
        del sys_
        _free(device)
    model.check_finite = False
    del model
    _free(device)
    return rows, checks


def pixel_rows(args, device, progress) -> list[Row]:
    """decode-then-CLIP rows: SDXL VAE or TAESD-XL decode + each open_clip model (ReNO's pixel CLIP reward)."""
    from diffusers import AutoencoderKL

    smoke = device.type != "cuda"
    if smoke:
        vae = AutoencoderKL(**tiny.VAE)
        size, clips = tiny.IMAGE_SIZE // 8, ["ViT-B-32", "taesd-ViT-B-32"]
    else:
        from fastlclip.model_configs import sdxl_vae_config

        vae = AutoencoderKL.from_config(sdxl_vae_config())
        size, clips = 64, [c for c in PIXEL_CLIPS if c in args.baselines]
    dtype = dtype_for(device)
    vae = vae.to(device=device, dtype=dtype).eval()
    vae_work = None if smoke else flops.vae_decode_work(False)
    tasks = [("reward", b) for b in args.reward_batches] + [("forward", b) for b in args.forward_batches]
    rows = []
    for clip_name in clips:
        spec = bench_rewards.REWARDS[PIXEL_CLIPS[clip_name]]
        reward = bench_rewards.build(spec, vae=vae, device=device, dtype=dtype, smoke=smoke)
        work = {}
        if not smoke:
            dec_work = vae_work if spec.decoder == "vae" else flops.decode_work(spec.decoder)
            clip_work = flops.open_clip_tower_work(spec.model, False)
            work = {"forward_flops": dec_work.forward_flops + clip_work.forward_flops,
                    "weight_bytes": dec_work.weight_bytes + clip_work.weight_bytes}
        decoder = "SDXL VAE" if spec.decoder == "vae" else "TAESD-XL"
        sys_ = System("decode-then-CLIP", f"{decoder} decode + CLIP {spec.model}", lambda x, r=reward: r(x, PROMPT),
                      lambda x, r=reward: r.model.encode_image(r.preprocess(r.decode(x)).to(dtype)), **work)
        rows += run_system(sys_, tasks, size, device, args.quick, progress)
        del reward, sys_
        _free(device)
    del vae
    _free(device)
    return rows


# -- derived columns ----------------------------------------------------------------------------------
def add_ratios(rows: list[Row], profile: Profile | None) -> None:
    """Speedups against the reference eager model, % weight floor, % bf16 peak (see the module docstring)."""
    refs = {(r.group, r.task, r.batch): r for r in rows if r.system == REFERENCE and r.ms}
    groups = [r.group for r in rows if r.system == REFERENCE]
    for r in rows:
        # A Latent-CLIP model against its own reference; decode-then-CLIP against the first model's.
        group = r.group if r.group in groups else (groups[0] if groups else None)
        ref = refs.get((group, r.task, r.batch))
        if r.ms and ref is not None:
            r.speedup_vs_reference, r.relative_to = ref.ms / r.ms, f"{ref.group} {REFERENCE}"
        if not r.ms or profile is None or r.weight_bytes is None:
            continue
        if r.task == "reward" and r.batch == 1:
            floor_ms = 2 * r.weight_bytes / (profile.memory_bandwidth_tbs * 1e12) * 1e3
            r.pct_weight_floor = 100 * floor_ms / r.ms
        if r.task == "forward":
            r.pct_bf16_peak = (100 * r.forward_flops_per_image * r.batch / (r.ms * 1e-3)
                               / (profile.peak_bf16_tflops * 1e12))


# -- output -------------------------------------------------------------------------------------------
def table(rows: list[Row], checks: dict) -> str:
    head = ["model", "system", "task", "batch", "ms", "img/s", "x vs ref", "% wt floor", "% bf16 peak", "VRAM GiB",
            "setup s", "status"]
    body = []
    for r in rows:
        chk = checks.get((r.group, r.system))
        status = r.status if chk is None or chk.get("ok") else f"{r.status}; CHECK FAILED"
        body.append([r.group, r.system, r.task, r.batch, fmt(r.ms, ".3f"), fmt(r.images_per_s, ".0f"),
                     fmt(r.speedup_vs_reference, ".2f"), fmt(r.pct_weight_floor, ".1f"), fmt(r.pct_bf16_peak, ".1f"),
                     fmt(r.peak_vram_gib, ".2f"), fmt(r.setup_s, ".1f"), status])
    return table_text(head, body)


def compile_mode_winner(rows: list[Row]) -> dict:
    """Fastest fastlclip compile mode at the batch-1 reward step, per model ("fastlclip compile" runs the default)."""
    out = {}
    for r in rows:
        m = re.fullmatch(r"fastlclip compile(?: mode=(.+))?", r.system)
        if m and r.task == "reward" and r.batch == 1 and r.ms and (r.group not in out or r.ms < out[r.group]["ms"]):
            out[r.group] = {"mode": m.group(1) or runtime.DEFAULT_COMPILE_MODE, "ms": r.ms}
    return out


FULL_SIZE_MODELS = ["Latent-ViT-B-8-512"]
FULL_SIZE_BASELINES = ["ViT-B-32", "taesd-ViT-B-32"]
LATENT_KEYS = {"Latent-ViT-B-8-512": "latent-b8", "Latent-ViT-B-4-512-plus": "latent-b4plus"}  # -> bench.rewards
# Arguments of the CUDA run that mean nothing on the CPU's --full-size run, and the reverse.
CUDA_ONLY = ("backends", "compile_modes", "reward_batches", "forward_batches", "gpu", "quick", "fidelity_steps")
FULL_SIZE_ONLY = ("warmup", "repeats", "threads")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="python -m bench.reward", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=fastlclip.list_models(),
                   help=f"default: {' '.join(MODELS)}; with --full-size {' '.join(FULL_SIZE_MODELS)}")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, help=f"default: {' '.join(BACKENDS)}")
    p.add_argument("--baselines", nargs="*", choices=BASELINES,
                   help="besides the reference eager model, which is always timed (ratios need it); default: all; "
                        f"with --full-size the decode-then-CLIP ones only, default {' '.join(FULL_SIZE_BASELINES)}")
    p.add_argument("--compile-modes", nargs="*", choices=runtime.COMPILE_MODES,
                   help="fastlclip compile modes compared at the batch-1 reward step; default: all")
    p.add_argument("--reward-batches", nargs="+", type=positive_int, help="default: 1 4 16")
    p.add_argument("--forward-batches", nargs="+", type=positive_int, help="default: 64 256")
    p.add_argument("--gpu", choices=["auto", *sorted(load_profiles())],
                   help="GPU profile for the floors; auto (default) detects it from the device name")
    p.add_argument("--out", type=Path, help="JSON file (default profiles/results/<gpu>/reward.json; with --full-size "
                   "profiles/results/cpu/reward.json)")
    p.add_argument("--quick", action="store_true", default=None, help="fewer, shorter trials")
    p.add_argument("--fidelity-steps", type=non_negative_int,
                   help="distillation steps of the tiny-model TAESD gradient-fidelity check (CPU; 0 skips it; default 300)")
    p.add_argument("--full-size", action="store_true",
                   help="CPU only: time the real model sizes (random weights) side by side, float32, batch 1, one "
                        "fresh process per system, with peak memory; see the module docstring")
    p.add_argument("--warmup", type=non_negative_int, help="--full-size: untimed steps per system (default 1)")
    p.add_argument("--repeats", type=positive_int, help="--full-size: timed steps per system (default 3)")
    p.add_argument("--threads", type=positive_int, help="--full-size: torch threads (default: torch's, "
                   f"{torch.get_num_threads()} here)")
    p.add_argument("--counts", action="store_true",
                   help="no run: count decode + CLIP ViT-B/32 against the latent tower per latent space on the meta "
                        "device; see the module docstring")
    p.add_argument("--space", nargs="+", choices=spaces.SPACES, help="--counts: latent spaces (default: all)")
    p.add_argument("--px", nargs="+", type=spaces.px_value,
                   help=f"--counts: image sides (default: {' '.join(map(str, spaces.DEFAULT_PX))})")
    args = p.parse_args(argv)
    if args.counts:
        given = [f"--{k.replace('_', '-')}" for k in (*CUDA_ONLY, *FULL_SIZE_ONLY, "models", "baselines")
                 if getattr(args, k) is not None] + ["--full-size"] * args.full_size
        if given:
            p.error(f"--counts only counts on the meta device (--space, --px, --out): {', '.join(given)} cannot apply; "
                    "drop them")
        args.space = list(dict.fromkeys(args.space or spaces.SPACES))
        args.px = list(dict.fromkeys(args.px or spaces.DEFAULT_PX))
        args.out = args.out or PROFILES_DIR / "results" / "counts" / "reward_spaces.json"
        if why := writable_file(args.out):
            p.error(f"--out: {why}")
        return args
    if args.space is not None or args.px is not None:
        p.error("--space and --px only with --counts")
    if args.full_size:
        _check_full_size(p, args)
    else:
        given = [f"--{k.replace('_', '-')}" for k in FULL_SIZE_ONLY if getattr(args, k) is not None]
        if given:
            p.error(f"{', '.join(given)} only with --full-size (the CUDA run times with CUDA events)")
        defaults = {"models": list(MODELS), "backends": list(BACKENDS), "baselines": list(BASELINES),
                    "compile_modes": list(runtime.COMPILE_MODES), "reward_batches": [1, 4, 16],
                    "forward_batches": [64, 256], "gpu": "auto", "quick": False, "fidelity_steps": 300}
        for k, v in defaults.items():
            if getattr(args, k) is None:
                setattr(args, k, v)
    if args.out is not None and (why := writable_file(args.out)):
        p.error(f"--out: {why}")
    return args


def _check_full_size(p: Parser, args: argparse.Namespace) -> None:
    """``--full-size``'s combinations: one line and exit 2 for any that cannot mean what it says."""
    given = [f"--{k.replace('_', '-')}" for k in CUDA_ONLY if getattr(args, k) is not None]
    if given:
        p.error(f"--full-size times eager float32 batch-1 reward steps on the CPU: {', '.join(given)} belong to the "
                "CUDA run; drop them")
    if torch.cuda.is_available() and not STAND_INS:
        p.error("--full-size is the CPU measurement; with CUDA run without it (the CUDA run times the real sizes)")
    args.models = list(dict.fromkeys(args.models or FULL_SIZE_MODELS))
    unknown = [m for m in args.models if m not in LATENT_KEYS]
    if unknown:
        p.error(f"--full-size --models: {', '.join(unknown)} not timed here; choose from {', '.join(LATENT_KEYS)}")
    baselines = FULL_SIZE_BASELINES if args.baselines is None else args.baselines
    if "reference-compile" in baselines:
        p.error("--full-size --baselines: reference-compile is a CUDA baseline; choose from "
                f"{', '.join(PIXEL_CLIPS)}")
    args.baselines = list(dict.fromkeys(baselines))
    args.warmup = 1 if args.warmup is None else args.warmup
    args.repeats = 3 if args.repeats is None else args.repeats
    args.threads = args.threads or torch.get_num_threads()
    args.out = args.out or PROFILES_DIR / "results" / "cpu" / "reward.json"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)

    def progress(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.counts:
        counts_run(args, argv)
        return 0
    if args.full_size:
        full_size_run(args, argv, progress)
        return 0
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    device_name = torch.cuda.get_device_name() if cuda else None
    selection = select(args.gpu, device_name, load_profiles())
    logging.getLogger("open_clip").setLevel(logging.ERROR)
    if not cuda:
        print("No CUDA device: nothing is timed on a GPU. CPU smoke check of the benchmark's code paths "
              "(tiny configs, eager, float32, one thread, wall clock; numbers mean nothing):")
        args.reward_batches, args.forward_batches, args.backends, args.compile_modes = [1], [4], ["eager"], []
        args.models = args.models[:1]
    progress(selection.message)
    threads = torch.get_num_threads()
    if not cuda:
        torch.set_num_threads(1)  # tiny ops: threads only add contention on a shared machine
    try:
        return _run(args, argv, device, device_name, selection, progress)
    finally:
        torch.set_num_threads(threads)


def write_report(rows: list[Row], checks: dict, argv: list[str], device_name: str, selection,
                 out: Path | None, complete: bool = True, fidelity: dict | None = None) -> Path:
    """The JSON record of a run; ``out`` defaults to ``profiles/results/<gpu>/reward.json``. Written after
    each model too (``complete`` False), so a run stopped by a time limit keeps what it measured."""
    report = {
        **run_record("bench.reward", argv),
        "complete": complete,
        "device": device_name,
        "profile": vars(selection.measured) if selection.measured else None,
        "profile_note": selection.message,
        "weights": RANDOM_WEIGHTS,
        "dtype": "bfloat16",
        "definitions": "\n\n".join(__doc__.split("\n\n")[2:4]),
        "default_compile_mode": runtime.DEFAULT_COMPILE_MODE,
        "compile_mode_winner": compile_mode_winner(rows),
        "checks": [{"model": g, "system": s, **c} for (g, s), c in checks.items()],
        "rows": [asdict(r) for r in rows],
        "tiny_decoder_fidelity": fidelity or "not run",
    }
    out = out or PROFILES_DIR / "results" / results_folder(selection.measured, device_name) / "reward.json"
    return write_json(out, report)


def _run(args, argv, device, device_name, selection, progress) -> int:
    cuda = device.type == "cuda"
    rows, checks = [], {}

    def save(complete: bool) -> Path | None:
        add_ratios(rows, selection.measured)
        return write_report(rows, checks, argv, device_name, selection, args.out, complete) if cuda else None

    for model_name in args.models:
        r, c = latent_model_rows(model_name, args, device, progress)
        rows += r
        checks.update({(r[0].group, k): v for k, v in c.items()})
        save(complete=False)
    if not cuda or any(b in PIXEL_CLIPS for b in args.baselines):
        rows += pixel_rows(args, device, progress)
    fidelity = None
    if args.fidelity_steps:
        from .fidelity import tiny_fidelity

        progress("tiny-decoder gradient fidelity (tiny models, CPU)")
        fidelity = tiny_fidelity(steps=args.fidelity_steps)
    add_ratios(rows, selection.measured)
    out = write_report(rows, checks, argv, device_name, selection, args.out, True, fidelity) if cuda else None
    if fidelity:
        print(f"Tiny-decoder fidelity (tiny models, CPU; {fidelity['caveat']}): gradient cosine to the VAE decode's, "
              f"median over {fidelity['samples']} latents: untrained {fidelity['cosine_untrained_median']:.3f}, "
              f"distilled for {fidelity['distill_steps']} steps {fidelity['cosine_distilled_median']:.3f} "
              f"(min {fidelity['cosine_distilled_min']:.3f}); pixel MSE {fidelity['held_out_pixel_mse']:.4f} against "
              f"a pixel variance of {fidelity['held_out_pixel_var']:.4f}.")

    if cuda:
        print(f"Wrote {out}. {RANDOM_WEIGHTS}")
        for group, w in compile_mode_winner(rows).items():
            if w["mode"] != runtime.DEFAULT_COMPILE_MODE:
                print(f"Note: for {group} compile mode {w['mode']} beat the default {runtime.DEFAULT_COMPILE_MODE} "
                      "(fastlclip.runtime.DEFAULT_COMPILE_MODE).")
    else:
        print(f"No JSON written (nothing measured on a GPU). {RANDOM_WEIGHTS}")
    failed = [f"{g} / {s}" for (g, s), c in checks.items() if not c.get("ok")]
    if failed:
        print(f"CHECK FAILED (against the reference: gradient cosine < {CHECK_MIN_COS}, loss off by more than "
              f"{CHECK_MAX_LOSS_DIFF}, or an error; see the JSON): {failed}")
    elif checks:
        cos = min(c["cos_grad"] for c in checks.values())
        diff = max(c["loss_abs_diff"] for c in checks.values())
        print(f"Checks: the batch-1 reward step of {len(checks)} fastlclip/compiled systems matches the reference "
              f"eager model (gradient cosine >= {cos:.5f}, loss within {diff:.4f}).")
    print(table(rows, checks))
    return 0


def counts_run(args, argv: list[str]) -> dict:
    """``--counts``: decode + CLIP ViT-B/32 against the latent tower, per space and image side (meta device)."""
    label = f"decode + CLIP {spaces.PIXEL_CLIP}"
    rows = spaces.space_rows(args.space, args.px, with_clip=True)
    report = spaces.report(rows, run_record("bench.reward", argv),
                           f"the space's VAE decode, then CLIP {spaces.PIXEL_CLIP}'s image tower at 224 px (the resize "
                           "not counted), forward + backward to the latents: a decode-then-CLIP reward step")
    out = write_json(args.out, report)
    md = out.with_suffix(".md")
    md.write_text(spaces.markdown(report, "bench.reward --counts: a decode-then-CLIP reward step against the latent "
                                          "tower per latent space", label))
    print(f"The reward step (forward + backward to the latents, batch 1): {label} against {spaces.TOWER}'s tower per "
          "latent space, counted on the meta device (no weights, nothing timed; GB = 1e9 bytes; x = decode side / tower):")
    print(spaces.counts_table(rows, label))
    print(f"tower: {spaces.DEFINITIONS['tower']}")
    print(f"Wrote {out} and {md}")
    return report


# -- --full-size: the real sizes on the CPU -----------------------------------------------------------
STAND_INS = False  # tests: tiny configs (bench.tiny) in place of the real sizes, same code path
FRESH_PROCESS = True  # tests: False runs each system in this process (no fresh interpreter, memory not its own)
GIB = 2**30


def _status_kib(field_name: str) -> int | None:
    """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``); None where there is none (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakRSS:
    """Peak resident memory of this process over a block (torch's CPU allocations are not Python objects,
    so tracemalloc does not see them). On Linux the kernel's high-water mark ``VmHWM`` is reset at the start
    (``/proc/self/clear_refs``), so ``peak_gib`` is the block's own peak; elsewhere it is ``ru_maxrss``, the
    process's peak over its whole life (``method`` says which). ``before_gib``: resident memory at the start."""

    def __enter__(self):
        self.before_gib = (_status_kib("VmRSS") or 0) / 2**20 or None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM reset before the steps (Linux): the steps' own peak"
        except OSError:
            self.method = "ru_maxrss: the process's peak since it started, the build included"
        return self

    def __exit__(self, *exc):
        hwm = _status_kib("VmHWM") if self.method.startswith("VmHWM") else None
        if hwm is None:
            import resource

            hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
            if sys.platform == "darwin":
                hwm //= 1024  # bytes there
        self.peak_gib = hwm / 2**20
        return False


def cpu_step_times(fn: Callable[[], object], warmup: int, repeats: int) -> dict:
    """``warmup`` untimed calls, then ``repeats`` timed ones (wall clock each): their median, each, the warm-up's."""
    warm = []
    for _ in range(warmup):
        t0 = time.perf_counter()
        fn()
        warm.append((time.perf_counter() - t0) * 1e3)
    each = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        each.append((time.perf_counter() - t0) * 1e3)
    return {"ms": statistics.median(each), "ms_each": each, "warmup_ms_each": warm}


def _child_main(conn, target: str, kwargs: dict) -> None:
    """Entry of a fresh process: ``target`` ("module:function") called with ``kwargs``; its dict (or the error) sent back."""
    try:
        module, name = target.split(":")
        result = getattr(importlib.import_module(module), name)(**kwargs)
    except BaseException as e:  # noqa: BLE001 - reported as the row's result; the parent goes on
        result = {"status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    conn.send(result)
    conn.close()


def in_fresh_process(target: str, kwargs: dict, fresh: bool = True) -> dict:
    """``target(**kwargs)`` in a fresh Python process (multiprocessing spawn: nothing of this process's memory
    or threads carried over), waited for; with ``fresh=False`` in this process (tests)."""
    if not fresh:
        module, name = target.split(":")
        threads = torch.get_num_threads()
        try:
            return getattr(importlib.import_module(module), name)(**kwargs)
        finally:
            torch.set_num_threads(threads)  # the target may set its own
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(send, target, kwargs))
    proc.start()
    send.close()
    try:
        result = recv.recv()
    except EOFError:  # killed (the kernel's OOM killer, a signal) before it could answer
        result = None
    proc.join()
    if result is None:
        result = {"status": f"error: the process ended without a result (exit code {proc.exitcode}; "
                            f"{'killed by signal ' + str(-proc.exitcode) if (proc.exitcode or 0) < 0 else 'no answer'})"}
    return result


def _pixel_decoder(key: str, stand_ins: bool):
    """The SDXL VAE for a decode-then-CLIP row (from fastlclip's shipped config; tiny with ``stand_ins``), or
    None for TAESD-XL rows (``bench.rewards.build`` makes the AutoencoderTiny from taesdxl's config)."""
    from diffusers import AutoencoderKL

    from fastlclip.model_configs import sdxl_vae_config

    if bench_rewards.REWARDS[key].decoder != "vae":
        return None
    vae = AutoencoderKL(**tiny.VAE) if stand_ins else AutoencoderKL.from_config(sdxl_vae_config())
    return vae.eval().requires_grad_(False)


def full_size_label(key: str) -> str:
    """A row's name that says which decoder: ``SDXL VAE decode + CLIP ViT-B/32``, ``TAESD-XL decode + ...``."""
    spec = bench_rewards.REWARDS[key]
    return f"SDXL VAE {spec.label}" if spec.decoder == "vae" else spec.label


def reward_step_child(key: str, stand_ins: bool, warmup: int, repeats: int, threads: int) -> dict:
    """One ``--full-size`` row, in its own process: build ``bench.rewards.REWARDS[key]`` on the CPU (float32, random
    weights), then time its batch-1 reward step (loss, then the gradient to the latents) and read its peak memory."""
    torch.set_num_threads(threads)
    logging.getLogger("open_clip").setLevel(logging.ERROR)
    spec = bench_rewards.REWARDS[key]
    t0 = time.perf_counter()
    reward = bench_rewards.build(spec, vae=_pixel_decoder(key, stand_ins), device="cpu", dtype=torch.float32,
                                 smoke=stand_ins)
    build_s = time.perf_counter() - t0
    side = tiny.IMAGE_SIZE // 8 if stand_ins else 64
    x = latents_for(1, side, torch.device("cpu"), requires_grad=True)
    modules = [reward.model.visual] if spec.kind == "latent" else [reward.model.visual, reward.vae.decoder]
    params = sum(p.numel() for m in modules for p in m.parameters())
    gc.collect()
    with PeakRSS() as mem:
        times = cpu_step_times(lambda: torch.autograd.grad(reward(x, PROMPT), x), warmup, repeats)
    return {"reward": key, "system": full_size_label(key), "kind": spec.kind, "decoder": spec.decoder, "status": "ok",
            **times, "build_s": build_s, "latents": list(x.shape), "image_px": side * 8,
            "image_tower_and_decoder_params": params, "rss_before_steps_gib": mem.before_gib,
            "peak_rss_gib": mem.peak_gib,
            "peak_rss_over_steps_gib": mem.peak_gib - mem.before_gib if mem.before_gib else None,
            "memory_method": mem.method, "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15_min_at_end": load_average()}


def load_average() -> list[float] | None:
    """The machine's load average now (other jobs on shared cores slow a CPU measurement: said, not hidden)."""
    import os

    try:
        return list(os.getloadavg())
    except (OSError, AttributeError):
        return None


def full_size_ratios(rows: list[dict]) -> None:
    """Each row's time and peak memory as multiples of the first measured Latent-CLIP row's, in place."""
    ref = next((r for r in rows if r.get("kind") == "latent" and isinstance(r.get("ms"), float)), None)
    for r in rows:
        ok = ref is not None and isinstance(r.get("ms"), float)
        r["relative_to"] = ref["system"] if ok else None
        r["time_vs_latent"] = r["ms"] / ref["ms"] if ok else None
        r["peak_rss_vs_latent"] = r["peak_rss_gib"] / ref["peak_rss_gib"] if ok and ref.get("peak_rss_gib") else None


def full_size_table(rows: list[dict]) -> str:
    head = ["system", "reward step ms (median)", "each ms", "x latent time", "peak RSS GiB", "over steps GiB",
            "x latent peak", "status"]
    body = [[r.get("system", r.get("reward")), fmt(r.get("ms"), ".0f"),
             " ".join(f"{v:.0f}" for v in r.get("ms_each", [])) or "-", fmt(r.get("time_vs_latent"), ".2f"),
             fmt(r.get("peak_rss_gib"), ".2f"), fmt(r.get("peak_rss_over_steps_gib"), ".2f"),
             fmt(r.get("peak_rss_vs_latent"), ".2f"), r.get("status", "ok")] for r in rows]
    return table_text(head, body)


def full_size_run(args, argv: list[str], progress) -> dict:
    """``--full-size``: every system in its own fresh process, one after another; the JSON rewritten after each
    (``complete`` false until the end), so a run stopped early keeps its finished rows."""
    keys = [LATENT_KEYS[m] for m in args.models] + [PIXEL_CLIPS[b] for b in args.baselines]
    device = cpu_device(args.threads)
    stand_ins = STAND_INS
    what = ("TINY STAND-INS (bench.tiny configs), not the real sizes" if stand_ins else
            "the real sizes: Latent-ViT-B-8-512 (fastlclip.load), SDXL VAE (fastlclip's shipped diffusers config), "
            "TAESD-XL (diffusers AutoencoderTiny, taesdxl's config), open_clip towers built with pretrained=None")
    print(f"--full-size on {device['name']}, torch threads {args.threads}: {what}; random weights, float32, batch 1, "
          f"{args.warmup} warm-up + {args.repeats} timed reward steps per system, "
          + ("each system in a fresh process." if FRESH_PROCESS else "all in this process."))
    rows: list[dict] = []

    def save(complete: bool) -> Path:
        full_size_ratios(rows)
        report = {
            **run_record("bench.reward", argv), "complete": complete,
            "mode": "cpu-full-size (tiny stand-ins)" if stand_ins else "cpu-full-size",
            "device": device,
            "weights": RANDOM_WEIGHTS, "dtype": "float32", "backend": "eager",
            "settings": {"batch": 1, "latents": [1, 4, 64, 64] if not stand_ins else [1, 4, 8, 8],
                         "image_px": 64 * 8 if not stand_ins else tiny.IMAGE_SIZE, "warmup_steps": args.warmup,
                         "timed_steps": args.repeats, "torch_threads": args.threads, "prompt": PROMPT,
                         "fresh_process_per_system": FRESH_PROCESS},
            "definitions": next(par for par in __doc__.split("\n\n") if par.startswith("``--full-size``")),
            "rows": rows,
        }
        return write_json(args.out, report)

    for key in keys:
        progress(f"{full_size_label(key)}: building and timing"
                 + (" in a fresh process ..." if FRESH_PROCESS else " ..."))
        t0 = time.perf_counter()
        row = in_fresh_process("bench.reward:reward_step_child",
                               {"key": key, "stand_ins": stand_ins, "warmup": args.warmup, "repeats": args.repeats,
                                "threads": args.threads}, fresh=FRESH_PROCESS)
        row.setdefault("reward", key)
        row.setdefault("system", full_size_label(key))
        row.setdefault("kind", bench_rewards.REWARDS[key].kind)
        row["process_wall_s"] = time.perf_counter() - t0
        rows.append(row)
        progress(f"  {row['status']}" + (f": median {row['ms']:.0f} ms" if row.get("ms") is not None else ""))
        save(complete=False)
    out = save(complete=True)
    print(full_size_table(rows))
    print(f"Wrote {out}. {RANDOM_WEIGHTS}")
    return json.loads(out.read_text())


if __name__ == "__main__":
    sys.exit(main())
