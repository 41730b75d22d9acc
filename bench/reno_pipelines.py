"""Running the ReNO pipelines that ``bench.reno_cost`` reports: each (pipeline, reward, backend) configuration
timed on CUDA (CUDA events, phase breakdown, peak VRAM, NVML energy), or run on tiny configs on the CPU."""

from __future__ import annotations

import gc
import inspect
import math
import statistics
from typing import Any

import torch

from fastlclip import reno

from . import rewards as bench_rewards, tiny
from .nvml import NvmlMonitor
from .report import NOT_MEASURED
from .timing import CudaPhaseTimer, PhaseLog, instrument_vae, median_breakdown

PIPELINES = {
    "paper": "eager PyTorch, gradient checkpointing on the UNet, the VAE and the rewards (as ReNO)",
    "fast": "fastlclip's fastest Latent-CLIP backend, no gradient checkpointing (unless it runs out of memory), "
            "optionally the UNet through torch.compile",
}

def _variants(pipeline: str, spec, fast_backend: dict[str, str]) -> list[str]:
    """Latent-CLIP backends to run: eager in the paper pipeline; the fastest and eager in the fast one."""
    if spec.kind != "latent" or pipeline == "paper":
        return ["eager"]
    return list(dict.fromkeys([fast_backend[spec.key], "eager"]))


def _row(pipeline: str, spec, backend: str, checkpointing: bool) -> dict[str, Any]:
    return {"pipeline": pipeline, "reward": spec.key, "reward_label": spec.label, "kind": spec.kind,
            "backend": backend if spec.kind == "latent" else "open_clip eager", "gradient_checkpointing": checkpointing}


def _run_once(generator, reward, args, *, iterations: int, seed: int, checkpointing: bool, timer):
    handles = instrument_vae(reward.vae, timer) if getattr(reward, "vae", None) is not None and timer is not None else []
    try:
        return reno.optimize(generator, reward, args.prompt, iterations=iterations, seed=seed,
                             gradient_checkpointing=checkpointing, progress=False, timer=timer)
    finally:
        for h in handles:
            h.remove()


def _measure(generator, reward, args, checkpointing: bool) -> dict[str, Any]:
    """Warm up, then time ``args.images`` images of ``args.iterations`` iterations on the generator's device."""
    device = generator.device
    if args.warmup:
        _run_once(generator, reward, args, iterations=args.warmup, seed=10_000, checkpointing=checkpointing, timer=None)
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    seconds, iterations = [], []
    with NvmlMonitor(device) as nvml:
        for image in range(args.images):
            timer = CudaPhaseTimer(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(torch.cuda.current_stream(device))
            _run_once(generator, reward, args, iterations=args.iterations, seed=image, checkpointing=checkpointing, timer=timer)
            end.record(torch.cuda.current_stream(device))
            torch.cuda.synchronize(device)
            seconds.append(start.elapsed_time(end) / 1000)
            iterations += timer.durations_ms()
    full = [it for it in iterations if "unet_bwd" in it] or iterations
    s = statistics.median(seconds)
    return {
        "seconds_per_image": s,
        "seconds_per_image_each": seconds,
        "iteration_ms_median": statistics.median(sum(it.values()) for it in full),
        "breakdown_ms": median_breakdown(iterations),
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "nvml_peak_used_gib": nvml.peak_used_bytes / 2**30 if nvml.peak_used_bytes is not None else NOT_MEASURED,
        "energy_j_per_image": nvml.energy_j / args.images if nvml.energy_j is not None else NOT_MEASURED,
        "nvml_note": nvml.unavailable or "whole-device readings: memory includes the CUDA context, the allocator's "
                                         "cache and other processes; energy is the device's counter over the timed images",
        "images_per_hour": 3600 / s,
    }


def _oom_reason(e: BaseException) -> str:
    """The first line of an out-of-memory error (torch's message goes on with allocator advice)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _measure_config(generator, reward, args, pipeline: str) -> tuple[dict[str, Any], bool]:
    """Measure; in the fast pipeline, fall back to checkpointing when running without it is out of memory.

    Out of memory with checkpointing (at once in the paper pipeline, or in the fast pipeline's retry) gives an
    error row, ``error`` saying what failed and ``error_detail`` why, instead of stopping the run.
    """
    checkpointing = pipeline == "paper"
    try:
        return _measure(generator, reward, args, checkpointing), checkpointing
    except torch.cuda.OutOfMemoryError as e:
        first = _oom_reason(e)  # the rest is freed outside the except block, where its traceback no longer holds it
    gc.collect()
    torch.cuda.empty_cache()
    if checkpointing:
        return {"error": "out of memory", "error_detail": first}, checkpointing
    try:
        result = _measure(generator, reward, args, True)
    except torch.cuda.OutOfMemoryError as e:
        second = _oom_reason(e)
    else:
        result["note"] = "out of memory without gradient checkpointing: measured with it"
        return result, True
    gc.collect()
    torch.cuda.empty_cache()
    return {"error": "out of memory, with gradient checkpointing too",
            "error_detail": f"without checkpointing: {first}; with it: {second}"}, True


RESOLUTIONS = (512, 1024)
# The one-step generator per resolution (fastlclip.reno.ONE_STEP_PRESETS); --preset overrides it.
DEFAULT_PRESETS = {512: "sdxl-turbo", 1024: "sdxl-lightning-1step"}


def preset_for(args) -> str:
    return getattr(args, "preset", None) or DEFAULT_PRESETS[getattr(args, "resolution", 512)]


def run_measured(args, progress) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    device, dtype = torch.device("cuda"), torch.bfloat16
    args.iterations, args.images = args.iterations or 50, args.images or 3
    size = getattr(args, "resolution", 512)
    if args.weights:
        generator = reno.OneStepGenerator.from_pretrained(args.weights, device=device, dtype=dtype, preset=preset_for(args),
                                                          height=size, width=size,
                                                          unet_weights=getattr(args, "unet_weights", None))
    else:
        generator = reno.OneStepGenerator.from_config(device=device, dtype=dtype, preset=preset_for(args),
                                                      height=size, width=size)
    resize = getattr(args, "resize", "interpolate")
    specs = [bench_rewards.REWARDS[k] for k in args.rewards]
    fast_backend, backend_reason = {}, {}
    if "fast" in args.pipelines:
        for spec in specs:
            if spec.kind == "latent":
                fast_backend[spec.key], backend_reason[spec.key] = bench_rewards.choose_latent_backend(
                    args.latent_backend, spec, device=device, dtype=dtype, latent_shape=generator.latent_shape,
                    prompt=args.prompt, resize=resize)
                progress.write(f"{spec.label}: {backend_reason[spec.key]}")
    configs = [(p, s, b) for p in args.pipelines for s in specs for b in _variants(p, s, fast_backend)]
    rows = []
    compiled = False
    for pipeline, spec, backend in progress(configs, desc="configurations", unit="config"):
        if pipeline == "fast" and args.compile_unet and not compiled:
            generator.compile()
            compiled = True
        try:
            reward = bench_rewards.build(spec, vae=generator.vae, device=device, dtype=dtype, backend=backend, resize=resize)
        except (ValueError, RuntimeError, ImportError) as e:  # e.g. a named --latent-backend that cannot run here
            reward, checkpointing = None, pipeline == "paper"
            result = {"error": f"backend {backend!r} failed to build", "error_detail": f"{type(e).__name__}: {e}"}
        else:
            result, checkpointing = _measure_config(generator, reward, args, pipeline)
        row = _row(pipeline, spec, backend, checkpointing)
        row["variant"] = ("paper-style" if pipeline == "paper" else
                          "fast, eager Latent-CLIP" if spec.kind == "latent" and backend != fast_backend[spec.key] else "fast")
        row["compiled_unet"] = compiled
        row.update(result)
        rows.append(row)
        progress.write(f"{pipeline:5s} {spec.label:24s} {row['backend']:16s} "
                       + (f"{row['seconds_per_image']:.2f} s/image" if "seconds_per_image" in row else row.get("error", "")))
        del reward
        gc.collect()
        torch.cuda.empty_cache()
    info = {"generator": _generator_text(generator, args), "latent_backend": backend_reason, "dtype": "bfloat16"}
    return rows, info


def run_smoke(args, progress) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The whole pipeline on tiny configs, on the CPU: checks it runs and that every phase is reached.
    ``--resolution 1024`` doubles the tiny image side (the tiny Latent-CLIP then sees twice its trained grid,
    as a 512 px Latent-CLIP does at 1024 px) and takes that resolution's one-step preset."""
    args.iterations, args.images = args.iterations or 2, args.images or 1
    size = tiny.IMAGE_SIZE * getattr(args, "resolution", 512) // 512
    generator = reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, height=size, width=size, preset=preset_for(args))
    rows = []
    configs = [(p, bench_rewards.REWARDS[k]) for p in args.pipelines for k in args.rewards]
    for pipeline, spec in progress(configs, desc="smoke (tiny configs)", unit="config"):
        checkpointing = pipeline == "paper"
        reward = bench_rewards.build(spec, vae=generator.vae, device="cpu", dtype=torch.float32, smoke=True,
                                     resize=getattr(args, "resize", "interpolate"))
        finite, phases = True, []
        for image in range(args.images):
            log = PhaseLog()
            result = _run_once(generator, reward, args, iterations=args.iterations, seed=image,
                               checkpointing=checkpointing, timer=log)
            finite &= all(math.isfinite(v) for v in result.losses)
            phases = log.iterations[0]
        row = _row(pipeline, spec, "eager", checkpointing)
        row["smoke"] = (f"ran {args.images} image(s) x {args.iterations} iterations; losses finite: "
                        f"{'yes' if finite else 'NO'}; phases: {' > '.join(phases)}")
        row.update({k: NOT_MEASURED for k in ("seconds_per_image", "breakdown_ms", "peak_allocated_gib", "nvml_peak_used_gib",
                                              "energy_j_per_image", "images_per_hour", "usd_per_1000_images")})
        rows.append(row)
    info = {"generator": f"tiny SDXL-style UNet and VAE (bench/tiny.py) at {size}x{size} px, {preset_for(args)} sampling, "
                         "random weights, random prompt embeddings; CPU, float32",
            "latent_backend": "eager (CPU)", "dtype": "float32"}
    return rows, info


def optimizer_text() -> str:
    """The optimiser settings the runs use: ``reno.optimize``'s defaults (``_run_once`` passes none of them)."""
    d = {k: p.default for k, p in inspect.signature(reno.optimize).parameters.items()}
    clip = "no grad-norm clip" if d["grad_clip"] is None else f"grad-norm clip {d['grad_clip']:g}"
    return (f"SGD lr {d['lr']:g}, {'Nesterov ' if d['nesterov'] else ''}momentum {d['momentum']:g}, {clip}, "
            f"norm regulariser {d['reg_weight']:g}")


def _generator_text(generator, args) -> str:
    what = f"{generator.preset.name} sampling at {generator.height}x{generator.width} px"
    if generator.random_weights:
        return (f"SDXL UNet and VAE with RANDOM WEIGHTS built from the shipped SDXL configs, {what}, random prompt "
                "embeddings: timing is faithful, images are noise")
    return f"weights from {args.weights}, {what} (SDXL text encoders for the prompt)"
