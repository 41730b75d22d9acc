"""``python -m bench.reward``: one reward step and forward throughput, fastlclip backends against baselines.

    python -m bench.reward [--models ...] [--backends eager triton graph compile] [--baselines ...]
                           [--compile-modes ...] [--reward-batches 1 4 16] [--forward-batches 64 256]
                           [--gpu auto|h100|...] [--out FILE] [--quick]

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
"""

from __future__ import annotations

import argparse
import gc
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

from . import flops, rewards as bench_rewards, tiny
from .cli import Parser, non_negative_int, positive_int, writable_file
from .provenance import run_record
from .report import fmt, table as table_text, write_json
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = Parser(prog="python -m bench.reward", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=fastlclip.list_models())
    p.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    p.add_argument("--baselines", nargs="*", default=list(BASELINES), choices=BASELINES,
                   help="besides the reference eager model, which is always timed (ratios need it)")
    p.add_argument("--compile-modes", nargs="*", default=list(runtime.COMPILE_MODES), choices=runtime.COMPILE_MODES,
                   help="fastlclip compile modes compared at the batch-1 reward step")
    p.add_argument("--reward-batches", nargs="+", type=positive_int, default=[1, 4, 16])
    p.add_argument("--forward-batches", nargs="+", type=positive_int, default=[64, 256])
    p.add_argument("--gpu", default="auto", choices=["auto", *sorted(load_profiles())],
                   help="GPU profile for the floors; auto detects it from the device name")
    p.add_argument("--out", type=Path, help="JSON file (default profiles/results/<gpu>/reward.json)")
    p.add_argument("--quick", action="store_true", help="fewer, shorter trials")
    p.add_argument("--fidelity-steps", type=non_negative_int, default=300,
                   help="distillation steps of the tiny-model TAESD gradient-fidelity check (CPU; 0 skips it)")
    args = p.parse_args(argv)
    if args.out is not None and (why := writable_file(args.out)):
        p.error(f"--out: {why}")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)

    def progress(msg):
        print(msg, file=sys.stderr, flush=True)

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


if __name__ == "__main__":
    sys.exit(main())
