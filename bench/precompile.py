"""Compile the Triton kernels a benchmark will launch, in parallel, before it runs.

    python -m bench.precompile [--jobs N] [--batch 1 8 64 256] [--lengths 65 257 77] [--dtype bf16] [--list]

Autotuning compiles every launch config of every kernel one after another in the benchmark's own process
(several seconds of CPU each at width 768). Here each job is one case (a fused op at one shape: attention at
each ``--lengths`` as ``bench.kernels`` runs it, patch embedding at patch 8 and 4 for each ``--batch``, and
the Latent-ViT-B/8 reward's own shapes at batch 1) run forward and backward with every kernel forced to its
i-th launch config that fits the GPU (``fastlclip.kernels.launch.FORCE_CONFIG``); ``--jobs`` processes run
the jobs. Triton keeps each compiled kernel in its on-disk cache, where the benchmark's autotuner then finds
it. A job that fails is reported and the rest go on; exit status 1 if any failed. ``--list`` prints the jobs
and exits (no CUDA needed).
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import sys
import time

from bench.cli import Parser, positive_int

DTYPES = ("bf16", "fp16", "fp32")
HEAD_DIM = 64
TEXT_LENGTH = 77  # causal, 8 heads (width 512); other lengths: the ViT-B image tower, 12 heads (width 768)
VISION_WIDTH = 768
LATENT_SIDE = 64
CONFIGS_PER_CASE = 7  # the most configs any launcher of these ops has (fastlclip.kernels)


def cases(batches: list[int], lengths: list[int], dtype: str) -> list[tuple]:
    """(op, shape, dtype) cases: bench.kernels' shapes, then the B/8 reward's (batch 1, fp32 latents)."""
    out = []
    for length in lengths:
        causal = length == TEXT_LENGTH
        out.append(("attention", (1, length, 8 if causal else VISION_WIDTH // HEAD_DIM, causal), dtype))
    for batch in batches:
        for patch in (8, 4):
            out.append(("patch_embed", (batch, patch, dtype), dtype))
    out.append(("attention", (1, 65, VISION_WIDTH // HEAD_DIM, False), dtype))
    out.append(("patch_embed", (1, 8, "fp32"), dtype))
    return list(dict.fromkeys(out))


def run_case(case: tuple, index: int) -> tuple[tuple, int, float, str | None]:
    """Runs ``case`` forward and backward with every launcher forced to config ``index``; returns the seconds taken
    and the error, if any (in a worker process)."""
    import torch

    from fastlclip.kernels import launch
    from fastlclip.kernels.flash_attention import attention_packed
    from fastlclip.kernels.fused_patch_embed import patch_embed

    t0 = time.perf_counter()
    launch.FORCE_CONFIG = index
    op, shape, dtype = case
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    try:
        if op == "attention":
            batch, length, heads, causal = shape
            qkv = torch.randn(batch, length, 3 * heads * HEAD_DIM, device="cuda", dtype=dt, requires_grad=True)
            out = attention_packed(qkv, heads, causal=causal)
            torch.autograd.grad(out, qkv, torch.ones_like(out))
        else:
            batch, patch, latent_dtype = shape
            ldt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[latent_dtype]
            tokens = 1 + (LATENT_SIDE // patch) ** 2
            latents = torch.randn(batch, 4, LATENT_SIDE, LATENT_SIDE, device="cuda", dtype=ldt, requires_grad=True)
            vector = [torch.randn(VISION_WIDTH, device="cuda", dtype=dt) for _ in range(3)]
            params = (torch.randn(VISION_WIDTH, 4, patch, patch, device="cuda", dtype=dt), vector[0],
                      torch.randn(tokens, VISION_WIDTH, device="cuda", dtype=dt), vector[1], vector[2])
            out = patch_embed(latents, *params, scale=0.5)
            torch.autograd.grad(out, latents, torch.ones_like(out))
        torch.cuda.synchronize()
        error = None
    except Exception as e:  # noqa: BLE001 - reported; the other jobs go on
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
    finally:
        launch.FORCE_CONFIG = None
    return case, index, time.perf_counter() - t0, error


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m bench.precompile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=positive_int, default=os.cpu_count() or 1, help="processes (default: CPUs)")
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[65, 257, 77])
    parser.add_argument("--dtype", choices=DTYPES, default="bf16")
    parser.add_argument("--list", action="store_true", help="print the jobs and exit")
    args = parser.parse_args(argv)
    jobs = [(case, i) for case in cases(args.batch, args.lengths, args.dtype) for i in range(CONFIGS_PER_CASE)]
    if args.list:
        for case, i in jobs:
            print(f"{case[0]} {case[1]} {case[2]} config {i}")
        print(f"{len(jobs)} jobs")
        return 0
    import torch

    if not torch.cuda.is_available():
        sys.stderr.write("python -m bench.precompile: error: no CUDA device: it compiles for the GPU it runs on\n")
        return 1
    workers = min(args.jobs, len(jobs))
    print(f"bench.precompile: {len(jobs)} jobs on {workers} processes", flush=True)
    t0 = time.perf_counter()
    failed = 0
    context = multiprocessing.get_context("spawn")  # CUDA in forked children is not allowed
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        for case, index, seconds, error in pool.map(run_case, *zip(*jobs)):
            failed += error is not None
            print(f"  {case[0]} {case[1]} {case[2]} config {index}: {seconds:.1f} s"
                  + (f" FAILED {error}" if error else ""), flush=True)
    print(f"bench.precompile: {len(jobs) - failed} of {len(jobs)} jobs compiled in {time.perf_counter() - t0:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
