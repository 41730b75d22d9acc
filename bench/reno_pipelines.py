"""Running the ReNO pipelines that ``bench.reno_cost`` reports: each (pipeline, reward, backend) configuration
timed on CUDA (CUDA events, phase breakdown, peak VRAM, NVML energy), or run on tiny configs on the CPU.

Two pipelines, named in every table and JSON file:

``reno``: ReNO as its code actually runs, read from ExplainableML/ReNO (``main.py``, ``arguments.py``,
``training/trainer.py``, ``training/optim.py``, ``models/utils.py``, ``models/RewardStableDiffusionXL.py``,
``rewards/base_reward.py``, ``rewards/clip.py``, ``rewards/utils.py``) with its pinned environment
(``environment.yml``: diffusers 0.30.0, transformers 4.38.2). ``reno_optimize`` below mirrors it:

- Gradient checkpointing is *off in effect*. ``RewardStableDiffusionXL.__init__`` enables it on the UNet
  and the VAE and ``CLIPLoss`` on CLIP, but every model is put in ``eval()``, and diffusers 0.30 (UNet and
  VAE blocks) and transformers 4.38 (``CLIPEncoder``) checkpoint only ``if self.training and
  self.gradient_checkpointing``. Nothing is recomputed in backward. (diffusers 0.42, installed here,
  checkpoints whenever gradients are on, so turning it on here would *not* mirror ReNO: it stays off.)
- Every iteration re-encodes the prompt: ``LatentNoiseTrainer.train`` calls ``RewardStableDiffusionXL.apply``,
  which runs ``encode_prompt`` through both SDXL text encoders, resets the scheduler's timesteps,
  scales the input, runs the UNet and an ``EulerAncestralDiscreteScheduler.step`` with a freshly seeded
  ``torch.Generator("cuda")``; ``BaseRewardLoss.__call__`` runs CLIP's text tower on every call.
- Host synchronisations every iteration: ``loss.item()`` twice per reward, ``total_loss.item()`` twice,
  ``latent_norm.item()``, and ``latents.detach().cpu()`` whenever the best loss improves.
- fp16 everywhere (``--dtype float16``), the fp16-fix SDXL VAE (``madebyollin/sdxl-vae-fp16-fix``, same
  architecture as SDXL's; random weights here either way), the optimised noise an fp16
  ``nn.Parameter`` from ``torch.randn`` on CUDA.
- The update (``get_optimizer``, ``train``): SGD lr 5, momentum 0.9, Nesterov; loss = sum of weighted
  reward losses + ``reg_weight * (0.5 ||z||^2 - (d - 1) log ||z||)`` with the norm taken of the fp16 noise
  and cast to fp32; ``clip_grad_norm_(0.1)``; no step after the last iteration; the best iterate is
  the one with the lowest reward loss (without the regulariser), strictly lower than the best so far.
- The reward is swapped, as the Latent-CLIP paper did: decode-then-CLIP (ReNO's own CLIP reward is
  ViT-H-14; the paper compared with ViT-B/32), a tiny-autoencoder decode then CLIP, or Latent-CLIP.
  Kept different: open_clip models stand in for transformers' ``CLIPModel`` (same architectures), the
  reward loss is fastlclip's (upcast to fp32), and one CLIP reward runs at a time (ReNO's default sums four
  rewards: HPS, ImageReward, CLIP, PickScore).

``fast``: fastlclip's ``fastlclip.reno.optimize``: the prompt encoded once, no host synchronisation in
the loop, bf16, the fastest Latent-CLIP backend that agrees with eager, the UNet through
``torch.compile`` with ``--compile-unet``; gradient checkpointing only when running without it is out of
memory (the row says "+ckpt"). A separate low-memory pipeline is not offered: that fallback covers small
GPUs, and nothing measured yet shows a third pipeline would earn its place.
"""

from __future__ import annotations

import copy
import gc
import inspect
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from fastlclip import reno

from . import rewards as bench_rewards, sdxl_text, tiny
from .nvml import NvmlMonitor
from .report import NOT_MEASURED
from .timing import CudaPhaseTimer, PhaseLog, instrument_vae, median_breakdown

PIPELINES = {
    "reno": "ReNO as its code runs (diffusers 0.30 / transformers 4.38): fp16, eager, no checkpointing in effect, the "
            "prompt re-encoded by both SDXL text encoders and the reward's text tower every iteration, host syncs "
            "(.item(), .cpu()) every iteration",
    "fast": "fastlclip: prompt encoded once, no host syncs, bf16, the fastest Latent-CLIP backend, UNet compiled with "
            "--compile-unet; checkpointing only if out of memory without it",
}
DTYPES = {"reno": torch.float16, "fast": torch.bfloat16}
RESOLUTIONS = (512, 1024)
# The one-step generator per resolution (fastlclip.reno.ONE_STEP_PRESETS); --preset overrides it.
DEFAULT_PRESETS = {512: "sdxl-turbo", 1024: "sdxl-lightning-1step"}


def preset_for(args) -> str:
    return getattr(args, "preset", None) or DEFAULT_PRESETS[getattr(args, "resolution", 512)]


def resize_for(args) -> str:
    """Latent-CLIP's policy for a generator grid other than its trained one (``--resize``)."""
    return getattr(args, "resize", None) or "interpolate"


@dataclass
class RenoRun:
    """Outcome of ``reno_optimize``, kept as ReNO keeps it."""

    best_noise: torch.Tensor  # on the host: ReNO's ``best_latents = latents.detach().cpu()``
    best_latents: torch.Tensor  # the generator's output at the best iteration (ReNO keeps the decoded image)
    best_loss: float
    best_iteration: int
    losses: list[float]  # weighted reward loss per iteration, without the regulariser
    last_noise: torch.Tensor  # the parameter after the loop (not stepped after the last iteration)


def reno_scheduler(generator: reno.OneStepGenerator):
    """ReNO's scheduler for SDXL-Turbo (``EulerAncestral``, trailing spacing); for a 1024 px one-step preset,
    which ReNO does not ship, the preset's own scheduler, set anew every iteration as ReNO does its own."""
    from diffusers import EulerAncestralDiscreteScheduler

    if generator.preset.name == "sdxl-turbo":
        return EulerAncestralDiscreteScheduler.from_config(generator.scheduler.config, timestep_spacing="trailing")
    return copy.deepcopy(generator.scheduler)


def one_step(generator: reno.OneStepGenerator, scheduler, noise: torch.Tensor, cond: reno.PromptConditioning,
             rng: torch.Generator) -> torch.Tensor:
    """``RewardStableDiffusionXL.apply`` without the decode: timesteps set anew, noise scaled by
    ``init_noise_sigma``, the scheduler's input scaling, the UNet, one scheduler step."""
    timesteps = generator.preset.timesteps
    if timesteps is None:
        scheduler.set_timesteps(1, device=noise.device)
    else:
        scheduler.set_timesteps(timesteps=list(timesteps), device=noise.device)
    t = scheduler.timesteps[0]
    latents = noise * scheduler.init_noise_sigma
    model_in = scheduler.scale_model_input(latents, t).to(generator.dtype)
    added = {"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.time_ids}
    eps = generator.unet(model_in, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added,
                         return_dict=False)[0]
    return scheduler.step(eps, t, latents, generator=rng, return_dict=False)[0]


def reno_optimize(generator: reno.OneStepGenerator, reward, prompt: str, *, iterations: int = 50, seed: int = 0,
                  noise: torch.Tensor | None = None, lr: float = 5.0, momentum: float = 0.9, nesterov: bool = True,
                  grad_clip: float = 0.1, reg_weight: float = 0.01, noise_dtype: torch.dtype = torch.float16,
                  timer=None) -> RenoRun:
    """One image of the ``reno`` pipeline: ReNO's ``LatentNoiseTrainer.train`` loop as it runs (module docstring).

    ``noise`` defaults to ``torch.randn`` in ``noise_dtype`` from a generator on the generator's device seeded
    with ``seed`` (ReNO draws on CUDA). ``reward(latents, prompt)`` gets the generator's latents; its
    ``.weighting`` multiplies its loss. Phases go to ``timer`` (``text_enc``, ``unet_fwd``, ``reward_fwd``,
    ``host_sync``, ``reward_bwd``, ``unet_bwd``, ``optimizer``).
    """
    device = generator.device
    mark = timer.phase if timer is not None else (lambda name: None)
    if noise is None:
        noise = torch.randn(generator.latent_shape, device=device, dtype=noise_dtype,
                            generator=torch.Generator(device).manual_seed(seed))
    latents_param = nn.Parameter(noise.detach().to(device=device, dtype=noise_dtype).clone())
    optimizer = torch.optim.SGD([latents_param], lr=lr, nesterov=nesterov, momentum=momentum)
    scheduler = reno_scheduler(generator)
    d = math.prod(latents_param.shape[1:])
    weighting = float(getattr(reward, "weighting", 1.0))
    best_loss, best_noise, best_latents, best_iteration, losses = math.inf, None, None, -1, []
    for i in range(iterations):
        optimizer.zero_grad()
        rng = torch.Generator(device).manual_seed(seed)  # ReNO seeds a new CUDA generator every iteration
        mark("text_enc")
        cond = generator.encode_prompt(prompt)  # both SDXL text encoders, every iteration
        cache = getattr(reward, "_text_cache", None)
        if cache is not None:  # ReNO's rewards encode the prompt on every call; fastlclip's would cache it
            cache.clear()
            reward.text_features([prompt])
        mark("unet_fwd")
        latents = one_step(generator, scheduler, latents_param, cond, rng)
        mark("reward_fwd")
        loss = reward(latents, prompt)
        mark("host_sync")
        loss.item()  # logged
        loss.item()  # stored in the rewards dict
        total = 0 + loss * weighting
        total.item()  # rewards["total"]
        total_value = total.item()  # log line and best-image rule
        norm = torch.linalg.vector_norm(latents_param).to(torch.float32)
        regularization = reg_weight * (0.5 * norm**2 - (d - 1) * torch.log(norm))
        norm.item()  # rewards["norm"]
        total = total + regularization.to(total.dtype)
        losses.append(total_value)
        if total_value < best_loss:
            best_loss, best_iteration = total_value, i
            best_latents = latents.detach()
            best_noise = latents_param.detach().to("cpu", copy=True)  # .cpu(): a copy from CUDA; on the CPU too
        if i != iterations - 1:
            if timer is not None and latents.requires_grad:
                latents.register_hook(lambda grad: mark("unet_bwd"))
            mark("reward_bwd")
            total.backward()
            mark("optimizer")
            torch.nn.utils.clip_grad_norm_(latents_param, grad_clip)
            optimizer.step()
        if timer is not None:
            timer.end_iteration()
    return RenoRun(best_noise, best_latents, best_loss, best_iteration, losses, latents_param.detach())


def _variants(pipeline: str, spec, fast_backend: dict[str, str]) -> list[str]:
    """Latent-CLIP backends to run: eager in the reno pipeline (ReNO is eager PyTorch); the fastest and eager in
    the fast one."""
    if spec.kind != "latent" or pipeline == "reno":
        return ["eager"]
    return list(dict.fromkeys([fast_backend[spec.key], "eager"]))


def _row(pipeline: str, spec, backend: str, checkpointing: bool) -> dict[str, Any]:
    return {"pipeline": pipeline, "reward": spec.key, "reward_label": spec.label, "kind": spec.kind,
            "decoder": spec.decoder, "dtype": str(DTYPES[pipeline]).removeprefix("torch."),
            "backend": backend if spec.kind == "latent" else "open_clip eager", "gradient_checkpointing": checkpointing}


def _run_once(pipeline: str, generator, reward, args, *, iterations: int, seed: int, checkpointing: bool, timer):
    handles = instrument_vae(reward.vae, timer) if getattr(reward, "vae", None) is not None and timer is not None else []
    try:
        if pipeline == "reno":
            return reno_optimize(generator, reward, args.prompt, iterations=iterations, seed=seed, timer=timer)
        return reno.optimize(generator, reward, args.prompt, iterations=iterations, seed=seed,
                             gradient_checkpointing=checkpointing, progress=False, timer=timer)
    finally:
        for h in handles:
            h.remove()


def _measure(pipeline: str, generator, reward, args, checkpointing: bool) -> dict[str, Any]:
    """Warm up, then time ``args.images`` images of ``args.iterations`` iterations on the generator's device."""
    device = generator.device
    if args.warmup:
        _run_once(pipeline, generator, reward, args, iterations=args.warmup, seed=10_000, checkpointing=checkpointing,
                  timer=None)
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
            _run_once(pipeline, generator, reward, args, iterations=args.iterations, seed=image,
                      checkpointing=checkpointing, timer=timer)
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

    Out of memory in the reno pipeline (which never checkpoints, as ReNO in effect does not), or in the fast
    pipeline's retry with checkpointing, gives an error row, ``error`` saying what failed and ``error_detail``
    why, instead of stopping the run.
    """
    try:
        return _measure(pipeline, generator, reward, args, False), False
    except torch.cuda.OutOfMemoryError as e:
        first = _oom_reason(e)  # the rest is freed outside the except block, where its traceback no longer holds it
    gc.collect()
    torch.cuda.empty_cache()
    if pipeline == "reno":
        return {"error": "out of memory", "error_detail": first}, False
    try:
        result = _measure(pipeline, generator, reward, args, True)
    except torch.cuda.OutOfMemoryError as e:
        second = _oom_reason(e)
    else:
        result["note"] = "out of memory without gradient checkpointing: measured with it"
        return result, True
    gc.collect()
    torch.cuda.empty_cache()
    return {"error": "out of memory, with gradient checkpointing too",
            "error_detail": f"without checkpointing: {first}; with it: {second}"}, True


def build_generator(args, *, device, dtype, smoke: bool = False) -> reno.OneStepGenerator:
    """The generator of one pipeline: SDXL-Turbo from ``--weights`` (its own text encoders), or random weights from
    the shipped configs with random SDXL text encoders (``bench.sdxl_text``); tiny configs when ``smoke``. Without
    ``transformers``, a smoke run falls back to random prompt embeddings (said in the row)."""
    preset, side = preset_for(args), getattr(args, "resolution", 512)
    if args.weights and not smoke:
        return reno.OneStepGenerator.from_pretrained(args.weights, device=device, dtype=dtype, preset=preset,
                                                     height=side, width=side,
                                                     unet_weights=getattr(args, "unet_weights", None))
    if smoke:  # --resolution 1024 doubles the tiny side: the tiny Latent-CLIP then sees twice its trained grid
        side = tiny.IMAGE_SIZE * side // 512
        base = reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, height=side, width=side, device=device,
                                                 dtype=dtype, preset=preset)
        if not sdxl_text.available():
            return base
        text = sdxl_text.TextEncoders.tiny(device=device, dtype=dtype)
    else:
        base = reno.OneStepGenerator.from_config(device=device, dtype=dtype, preset=preset, height=side, width=side)
        text = sdxl_text.TextEncoders.sdxl(device=device, dtype=dtype)
    return sdxl_text.generator_with_text_encoders(base.unet, base.vae, text, height=base.height, width=base.width,
                                                  preset=preset)


def run_measured(args, progress, on_row=None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Measures every (pipeline, reward, backend); ``on_row(rows)`` is called after each, with the rows so far."""
    device = torch.device("cuda")
    args.iterations, args.images = args.iterations or 50, args.images or 3
    specs = [bench_rewards.REWARDS[k] for k in args.rewards]
    rows, generators, backend_reason = [], {}, {}
    for pipeline in args.pipelines:  # one pipeline's models resident at a time: peak VRAM is that pipeline's own
        dtype = DTYPES[pipeline]
        generator = build_generator(args, device=device, dtype=dtype)
        generators[pipeline] = _generator_text(generator, args)
        fast_backend = {}
        if pipeline == "fast":
            for spec in specs:
                if spec.kind == "latent":
                    fast_backend[spec.key], backend_reason[spec.key] = bench_rewards.choose_latent_backend(
                        args.latent_backend, spec, device=device, dtype=dtype, latent_shape=generator.latent_shape,
                        prompt=args.prompt, resize=resize_for(args))
                    progress.write(f"{spec.label}: {backend_reason[spec.key]}")
        compiled = False
        for spec, backend in progress([(s, b) for s in specs for b in _variants(pipeline, s, fast_backend)],
                                      desc=f"{pipeline} configurations", unit="config"):
            if pipeline == "fast" and args.compile_unet and not compiled:
                generator.compile()
                compiled = True
            try:
                reward = bench_rewards.build(spec, vae=generator.vae, device=device, dtype=dtype, backend=backend,
                                             resize=resize_for(args))
            except (ValueError, RuntimeError, ImportError) as e:  # e.g. a named --latent-backend that cannot run here
                reward, checkpointing = None, False
                result = {"error": f"backend {backend!r} failed to build", "error_detail": f"{type(e).__name__}: {e}"}
            else:
                result, checkpointing = _measure_config(generator, reward, args, pipeline)
            row = _row(pipeline, spec, backend, checkpointing)
            row["variant"] = ("reno" if pipeline == "reno" else
                              "fast, eager Latent-CLIP" if spec.kind == "latent" and backend != fast_backend[spec.key]
                              else "fast")
            row["compiled_unet"] = compiled
            row.update(result)
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            progress.write(f"{pipeline:5s} {spec.label:34s} {row['backend']:16s} "
                           + (f"{row['seconds_per_image']:.2f} s/image" if "seconds_per_image" in row
                              else row.get("error", "")))
            del reward
            gc.collect()
            torch.cuda.empty_cache()
        del generator
        gc.collect()
        torch.cuda.empty_cache()
    info = {"generator": "; ".join(f"{p}: {t}" for p, t in generators.items()), "latent_backend": backend_reason,
            "dtype": {p: str(DTYPES[p]).removeprefix("torch.") for p in args.pipelines}}
    return rows, info


def run_smoke(args, progress, on_row=None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Both pipelines on tiny configs, on the CPU, float32 models (the reno pipeline's noise in fp16, as ReNO's):
    checks they run and that every phase is reached."""
    args.iterations, args.images = args.iterations or 2, args.images or 1
    generator = build_generator(args, device="cpu", dtype=torch.float32, smoke=True)
    rows = []
    configs = [(p, bench_rewards.REWARDS[k]) for p in args.pipelines for k in args.rewards]
    for pipeline, spec in progress(configs, desc="smoke (tiny configs)", unit="config"):
        reward = bench_rewards.build(spec, vae=generator.vae, device="cpu", dtype=torch.float32, smoke=True,
                                     resize=resize_for(args))
        finite, phases = True, []
        for image in range(args.images):
            log = PhaseLog()
            result = _run_once(pipeline, generator, reward, args, iterations=args.iterations, seed=image,
                               checkpointing=False, timer=log)
            finite &= all(math.isfinite(v) for v in result.losses)
            phases = log.iterations[0]
        row = _row(pipeline, spec, "eager", False)
        row["dtype"] = "float32 (CPU smoke)"
        row["smoke"] = (f"ran {args.images} image(s) x {args.iterations} iterations; losses finite: "
                        f"{'yes' if finite else 'NO'}; phases: {' > '.join(phases)}")
        row.update({k: NOT_MEASURED for k in ("seconds_per_image", "iteration_ms_median", "breakdown_ms",
                                              "peak_allocated_gib", "nvml_peak_used_gib", "energy_j_per_image",
                                              "images_per_hour", "usd_per_1000_images")})
        rows.append(row)
        if on_row is not None:
            on_row(rows)
    text = ("random tiny SDXL text encoders (bench/sdxl_text.py)" if not generator.random_prompt
            else "random prompt embeddings (transformers not installed)")
    info = {"generator": f"tiny SDXL-style UNet and VAE (bench/tiny.py) at {generator.height}x{generator.width} px, "
                         f"{generator.preset.name} sampling, random weights, {text}; CPU, float32",
            "latent_backend": "eager (CPU)", "dtype": "float32"}
    return rows, info


# -- --full-size on the CPU: fast-pipeline iterations at the real sizes -------------------------------
class CpuPhaseTimer(PhaseLog):
    """A ``fastlclip.reno.PhaseTimer`` on the CPU: ``time.perf_counter`` at each phase start (the CPU has done the
    work when a call returns); ``durations_ms`` attributes the gaps as ``CudaPhaseTimer`` does."""

    def __init__(self):
        super().__init__()
        self._marks: list[list[tuple[str | None, float]]] = [[]]

    def phase(self, name: str) -> None:
        super().phase(name)
        self._marks[-1].append((name, time.perf_counter()))

    def end_iteration(self) -> None:
        self._marks[-1].append((None, time.perf_counter()))
        super().end_iteration()
        self._marks.append([])

    def durations_ms(self) -> list[dict[str, float]]:
        out = []
        for marks in self._marks[:-1]:
            d: dict[str, float] = {}
            for (name, start), (_, end) in zip(marks, marks[1:]):
                d[name] = d.get(name, 0.0) + (end - start) * 1e3
            out.append(d)
        return out


REWARD_PHASES = ("vae_fwd", "reward_fwd", "reward_bwd", "vae_bwd")  # the reward's part of an iteration


def iteration_child(key: str, stand_ins: bool, warmup: int, repeats: int, threads: int, prompt: str) -> dict[str, Any]:
    """One ``bench.reno_cost --full-size`` row, in its own process: the ``fast`` pipeline's generator (SDXL UNet and
    VAE from the shipped configs, random weights, bfloat16, random prompt embeddings; tiny configs with
    ``stand_ins``) and the reward ``key``, then ``fastlclip.reno.optimize`` for ``warmup + repeats + 1`` iterations,
    each timed by phase on the wall clock: the first ``warmup`` untimed, the next ``repeats`` timed (the last
    iteration has no backward, as in ReNO, and is not counted). Peak memory over the loop as ``bench.reward``'s."""
    from .reward import PeakRSS, load_average

    torch.set_num_threads(threads)
    spec = bench_rewards.REWARDS[key]
    dtype = DTYPES["fast"]
    t0 = time.perf_counter()
    if stand_ins:
        generator = reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, height=tiny.IMAGE_SIZE,
                                                      width=tiny.IMAGE_SIZE, device="cpu", dtype=dtype)
    else:
        generator = reno.OneStepGenerator.from_config(device="cpu", dtype=dtype)
    generator.unet.requires_grad_(False)
    reward = bench_rewards.build(spec, vae=generator.vae, device="cpu", dtype=dtype, smoke=stand_ins)
    build_s = time.perf_counter() - t0
    timer = CpuPhaseTimer()
    handles = instrument_vae(reward.vae, timer) if getattr(reward, "vae", None) is not None else []
    gc.collect()
    try:
        with PeakRSS() as mem:
            reno.optimize(generator, reward, prompt, iterations=warmup + repeats + 1, seed=0, progress=False,
                          timer=timer)
    finally:
        for h in handles:
            h.remove()
    full = [it for it in timer.durations_ms() if "unet_bwd" in it]
    timed, warm = full[warmup:], full[:warmup]
    totals = [sum(it.values()) for it in timed]
    breakdown = median_breakdown(timed)
    reward_ms = [sum(it.get(p, 0.0) for p in REWARD_PHASES) for it in timed]
    return {"reward": key, "system": spec.label if spec.decoder != "vae" else f"SDXL VAE {spec.label}",
            "kind": spec.kind, "decoder": spec.decoder, "status": "ok", "pipeline": "fast", "dtype": "bfloat16",
            "iteration_ms": statistics.median(totals), "iteration_ms_each": totals,
            "warmup_iteration_ms_each": [sum(it.values()) for it in warm], "breakdown_ms": breakdown,
            "reward_ms": statistics.median(reward_ms), "reward_share": statistics.median(
                r / t for r, t in zip(reward_ms, totals)),
            "build_s": build_s, "latents": list(generator.latent_shape), "image_px": generator.height,
            "generator": f"{'tiny (bench.tiny) ' if stand_ins else 'SDXL '}UNet and VAE, random weights, "
                         f"{generator.preset.name} sampling, random prompt embeddings (encoded once, outside the loop)",
            "rss_before_loop_gib": mem.before_gib, "peak_rss_gib": mem.peak_gib,
            "peak_rss_over_loop_gib": mem.peak_gib - mem.before_gib if mem.before_gib else None,
            "memory_method": mem.method, "torch_threads": torch.get_num_threads(),
            "load_average_1_5_15_min_at_end": load_average()}


def optimizer_text() -> str:
    """The optimiser settings the fast pipeline runs: ``reno.optimize``'s defaults (``_run_once`` passes none of them);
    the reno pipeline's are ReNO's (``reno_optimize``'s defaults)."""
    d = {k: p.default for k, p in inspect.signature(reno.optimize).parameters.items()}
    clip = "no grad-norm clip" if d["grad_clip"] is None else f"grad-norm clip {d['grad_clip']:g}"
    return (f"SGD lr {d['lr']:g}, {'Nesterov ' if d['nesterov'] else ''}momentum {d['momentum']:g}, {clip}, "
            f"norm regulariser {d['reg_weight']:g}")


def _generator_text(generator, args) -> str:
    what = f"{generator.preset.name} sampling at {generator.height}x{generator.width} px"
    if generator.random_weights:
        return (f"SDXL UNet, VAE and both text encoders with RANDOM WEIGHTS built from SDXL's configs, {what}: timing "
                "is faithful, images are noise")
    return f"weights from {args.weights}, {what} (its own text encoders and VAE)"
