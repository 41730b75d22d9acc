"""``python -m bench.safety_eval``: latent-space safety guidance on an I2P-format prompt file, judged without decoding.

For each prompt, from the same seeded noise: SDXL-Turbo's one-step latents (the baseline) and ReNO with
``fastlclip.SafetyGuidance`` (``fastlclip.reno.optimize``). ``fastlclip.LatentSafetyChecker`` flags both;
the report gives flag rates per checker category and per prompt category. On a CUDA device it also times
the checker (latents/s) and the guidance (forward + backward, ms per ReNO iteration) with CUDA events.

Without ``--weights`` (a local SDXL-Turbo diffusers folder) and ``--latent-ckpt`` the models are random:
the run is a smoke test of the pipeline and its rates mean nothing. Without weights and without CUDA the
generator and Latent-CLIP are the tiny configs of ``bench.tiny``.

Even with real weights the rates are not I2P's metric (Q16 + NudeNet on decoded images; the paper's
0.32 -> 0.16): the checker's thresholds are uncalibrated zero-shot margins, and by default it is the same
Latent-CLIP the guidance optimised against (pass ``--checker-ckpt`` for an independent one).
"""

from __future__ import annotations

import argparse
import warnings
from typing import Callable

import torch
from tqdm.auto import tqdm

import fastlclip
from bench import tiny
from bench.cli import Parser, argument_errors, diffusers_folder, non_negative_float, positive_int, seed
from bench.report import fmt, table
from fastlclip import reno
from fastlclip.i2p import I2PPrompt, read_i2p
from fastlclip.runtime import time_cuda
from fastlclip.safety import DEFAULT_THRESHOLD, LatentSafetyChecker, SafetyGuidance

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _load_clip(name, ckpt, device, dtype, backend) -> fastlclip.LatentCLIP:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore" if ckpt is None else "default")  # random weights are announced in the banner
        model = fastlclip.load(name, ckpt, device=device, dtype=dtype, backend=backend)
    # The per-call NaN check is a host sync: it would stall every ReNO iteration and every timed call.
    model.check_finite = False
    return model


def generate(generator: reno.OneStepGenerator, guidance: SafetyGuidance, rows: list[I2PPrompt], *, iterations: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(baseline, guided) diffusion latents, (N, C, h, w) each; prompt i starts from the noise of seed ``seed + i``."""
    base, guided = [], []
    for i, row in enumerate(tqdm(rows, desc="prompts", unit="prompt")):
        noise = torch.randn(generator.latent_shape, generator=torch.Generator().manual_seed(seed + i))
        with torch.no_grad():
            base.append(generator(noise.to(generator.device), generator.encode_prompt(row.prompt)))
        result = reno.optimize(generator, guidance, row.prompt, iterations=iterations, noise=noise, progress=False)
        guided.append(result.best_latents)
    return torch.cat(base), torch.cat(guided)


def check(checker: LatentSafetyChecker, latents: torch.Tensor, batch: int) -> torch.Tensor:
    """(N, K) bool flags, ``batch`` latents per tower forward."""
    return torch.cat([checker(latents[i:i + batch]).flags for i in range(0, len(latents), batch)]).cpu()


def rate_tables(categories: list[str], rows: list[I2PPrompt], base: torch.Tensor,
                guided: torch.Tensor) -> tuple[list[tuple], list[tuple]]:
    """Flag rates (fractions) from (N, K) flags.

    Per checker category: ``(category, baseline, guided)`` plus ``"any"``. Per prompt category (a prompt
    counts in each of its categories, untagged ones under ``"(none)"``): ``(category, n, baseline, guided)``
    where a sample counts when any checker category flags it.
    """
    per_check = [(c, base[:, k].float().mean().item(), guided[:, k].float().mean().item()) for k, c in enumerate(categories)]
    per_check.append(("any", base.any(1).float().mean().item(), guided.any(1).float().mean().item()))
    tags = list(dict.fromkeys(t for r in rows for t in (r.categories or ("(none)",))))
    per_tag = []
    for tag in tags:
        idx = torch.tensor([i for i, r in enumerate(rows) if tag in (r.categories or ("(none)",))])
        per_tag.append((tag, len(idx), base[idx].any(1).float().mean().item(), guided[idx].any(1).float().mean().item()))
    return per_check, per_tag


def _median_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Median of 20 CUDA-event timings of ``fn`` on ``device`` after 3 warm-up calls (``fastlclip.runtime.time_cuda``)."""
    return time_cuda(fn, trials=20, steps=1, warmup=3, device=device)


def timings(checker: LatentSafetyChecker, guidance: SafetyGuidance, shape: tuple[int, ...], batch: int,
            prompt: str) -> dict[str, float]:
    """Checker throughput at ``batch`` and guidance cost at batch 1 (forward + backward to the latents), CUDA only."""
    device = guidance.model.device
    torch.manual_seed(0)
    latents = torch.randn(batch, *shape[1:], device=device)
    z = torch.randn(shape, device=device, requires_grad=True)
    prompt_only = fastlclip.LatentCLIPReward(guidance.model, space=guidance.space)

    def step(reward):
        return lambda: torch.autograd.grad(reward(z, prompt), z)

    checker_ms = _median_ms(lambda: checker(latents), device)
    return {"checker_latents_per_s": batch / checker_ms * 1e3, "guidance_ms": _median_ms(step(guidance), device),
            "prompt_reward_ms": _median_ms(step(prompt_only), device)}


def main(argv: list[str] | None = None) -> None:
    p = Parser(prog="python -m bench.safety_eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", required=True, help="I2P-format CSV (column 'prompt' required, 'categories' optional)")
    p.add_argument("--limit", type=positive_int, default=None, help="first N prompts only")
    p.add_argument("--weights", type=diffusers_folder, default=None, help="local SDXL-Turbo diffusers folder (default: random weights)")
    p.add_argument("--latent-ckpt", default=None, help="Latent-CLIP checkpoint for the guidance (default: random weights)")
    p.add_argument("--model", default="Latent-ViT-B-8-512", choices=fastlclip.list_models(), help="its config")
    p.add_argument("--checker-ckpt", default=None, help="Latent-CLIP checkpoint for the checker (default: the guidance's)")
    p.add_argument("--checker-model", default=None, choices=fastlclip.list_models(), help="its config (default: --model)")
    p.add_argument("--iterations", type=positive_int, default=50, help="ReNO iterations per prompt (ReNO's default 50)")
    p.add_argument("--safety-weight", type=non_negative_float, default=1.0, help="SafetyGuidance safety_weight")
    p.add_argument("--seed", type=seed, default=0, help="prompt i starts from the noise of seed + i")
    p.add_argument("--batch", type=positive_int, default=64, help="checker batch size (also the throughput benchmark's)")
    p.add_argument("--tiny", action=argparse.BooleanOptionalAction, default=None,
                   help="tiny random configs (default: on without --weights and without CUDA)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--backend", choices=["eager", "triton"], default=None,
                   help="Latent-CLIP backend (default: triton on CUDA, eager on CPU)")
    a = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    small = a.tiny if a.tiny is not None else (a.weights is None and device == "cpu")
    if small and (a.weights or a.latent_ckpt or a.checker_ckpt or a.checker_model):
        p.error("--tiny builds random tiny models; it cannot be combined with --weights, --latent-ckpt, --checker-ckpt "
                "or --checker-model")
    dtype = _DTYPES[a.dtype] if a.dtype else (torch.bfloat16 if device == "cuda" else torch.float32)
    backend = a.backend or ("triton" if device == "cuda" else "eager")
    if not small:  # SDXL-Turbo makes 512 px images: 64x64 latents
        for flag, name in (("--model", a.model), ("--checker-model", a.checker_model or a.model)):
            size = fastlclip.get_model_config(name).vision.latent_size
            if size != 64:
                p.error(f"{flag} {name} reads {size}x{size} latents, SDXL-Turbo makes 64x64 (512 px): pick a config for "
                        "512 px images, e.g. Latent-ViT-B-8-512")
    with argument_errors(p):  # the files the arguments name are read before any work
        rows = read_i2p(a.prompts, limit=a.limit)
        if a.seed + len(rows) > 2**64:
            p.error(f"--seed {a.seed}: prompt i uses seed + i, which must stay below 2**64 for {len(rows)} prompts")
        model = _load_clip(tiny.LATENT_CLIP if small else a.model, a.latent_ckpt, device, dtype, backend)
        checker_model = model
        if a.checker_ckpt or (a.checker_model and a.checker_model != a.model):
            checker_model = _load_clip(a.checker_model or a.model, a.checker_ckpt, device, dtype, backend)
        if a.weights:
            generator = reno.OneStepGenerator.from_pretrained(a.weights, device=device, dtype=dtype)
        elif small:
            generator = reno.OneStepGenerator.from_config(tiny.UNET, tiny.VAE, height=tiny.IMAGE_SIZE,
                                                          width=tiny.IMAGE_SIZE, device=device, dtype=dtype, with_vae=False)
        else:
            generator = reno.OneStepGenerator.from_config(device=device, dtype=dtype, with_vae=False)
    guidance = SafetyGuidance(model, safety_weight=a.safety_weight)
    checker = LatentSafetyChecker(checker_model)

    guidance_random = a.latent_ckpt is None
    checker_random = guidance_random if checker_model is model else a.checker_ckpt is None
    random_parts = [name for name, is_random in (("SDXL-Turbo", generator.random_weights), ("guidance Latent-CLIP", guidance_random),
                                                 ("checker Latent-CLIP", checker_random)) if is_random]
    where = f"{len(rows)} prompts from {a.prompts}, {a.iterations} ReNO iterations, on {device} ({dtype}, {backend} Latent-CLIP)"
    if random_parts:
        print(f"SMOKE TEST: random weights for {', '.join(random_parts)}" + (" (tiny configs)" if small else "")
              + f". {where}. The figures below only show that the pipeline runs; they are NOT results.")
    else:
        print(f"{where}. Flags come from Latent-CLIP with uncalibrated default thresholds (margin "
              f"{DEFAULT_THRESHOLD}), not I2P's Q16 + NudeNet; "
              + ("the checker is the guidance's own model." if checker_model is model else "the checker is a separate model."))

    base, guided = generate(generator, guidance, rows, iterations=a.iterations, seed=a.seed)
    per_check, per_tag = rate_tables(checker.categories, rows, check(checker, base, a.batch), check(checker, guided, a.batch))
    print(f"\nflag rate per checker category (N={len(rows)})")
    print(table(["category", "baseline", "guided"], [[name, fmt(b, ".3f"), fmt(g, ".3f")] for name, b, g in per_check]))
    print("\nflagged in any category, per prompt category")
    print(table(["prompt category", "n", "baseline", "guided"],
                [[name, n, fmt(b, ".3f"), fmt(g, ".3f")] for name, n, b, g in per_tag]))

    if device == "cuda":
        t = timings(checker, guidance, generator.latent_shape, a.batch, rows[0].prompt)
        print(f"\n{torch.cuda.get_device_name()}, {dtype}, {backend} Latent-CLIP, CUDA events, medians of 20 back-to-back calls after 3 warm-up calls:")
        print(f"checker: {t['checker_latents_per_s']:.0f} latents/s at batch {a.batch}")
        print(f"guidance forward + backward, batch 1: {t['guidance_ms']:.3f} ms/iteration "
              f"(prompt-only LatentCLIPReward: {t['prompt_reward_ms']:.3f} ms)")


if __name__ == "__main__":
    main()
