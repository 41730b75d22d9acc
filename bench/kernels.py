"""Fused Triton kernels against PyTorch at the model's shapes.

    python -m bench.kernels [--batch 1 8 64 256] [--lengths 65 257 77] [--dtype bf16] [--out PATH]

Attention maps a packed in_proj output qkv (B, L, 3W) to (B, L, W), as the model uses it: L=77 is
the causal text tower (width 512, 8 heads), other lengths the ViT-B image tower (width 768, 12
heads); head dim 64. Compared: fastlclip's kernel, PyTorch SDPA with each backend forced (those that
cannot run are listed with the reason; SDPA's output transpose to (B, L, W) is included), and
xformers' memory_efficient_attention when importable. Patch embedding: 4x64x64 latents, patch 8
and 4, width 768, the fused kernel against patch_embed_torch (conv2d, cat, add, layer_norm).

Median of triton.testing.do_bench after warm-up (autotuning happens before timing), on random
inputs; forward, and forward + backward to the inputs (weights frozen). Attention FLOPs: forward
4*B*H*L*L*D (halved when causal), backward 2.5x forward. Patch-embedding bytes: everything read and
written once. Percentages are of the GPU's dense bf16 peak / memory bandwidth (profiles/*.json).
Writes JSON to --out (default profiles/results/<gpu>/kernels.json) after every case, so a run cut short
keeps what it measured (``complete`` says whether it finished), and prints a table last.
Without CUDA it prints a message and exits 0, after a small interpreter correctness check when
TRITON_INTERPRET=1 is set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.cli import Parser, positive_int, writable_file
from bench.profiles import PROFILES_DIR, detect, load_profiles, results_folder
from bench.provenance import run_record
from bench.report import fmt, table, write_json
from fastlclip import SDXL_SCALING_FACTOR
from fastlclip.kernels import launch
from fastlclip.kernels.flash_attention import attention_packed, attention_torch
from fastlclip.kernels.fused_patch_embed import patch_embed, patch_embed_torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
HEAD_DIM = 64
TEXT_LENGTH = 77  # causal, 8 heads (width 512); any other length: 12 heads (width 768), non-causal
VISION_WIDTH = 768
LATENT_SIDE = 64
LATENT_SCALE = 1 / SDXL_SCALING_FACTOR  # diffusion-space latents, as in reward use


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=positive_int, nargs="+", default=[1, 8, 64, 256])
    parser.add_argument("--lengths", type=positive_int, nargs="+", default=[65, 257, 77],
                        help="attention lengths; 77 is the causal text tower, others the image tower")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", type=Path, help="JSON path (default profiles/results/<gpu>/kernels.json)")
    args = parser.parse_args(argv)
    if args.out is not None and (why := writable_file(args.out)):
        parser.error(f"--out: {why}")

    if not torch.cuda.is_available():
        print("bench.kernels: no CUDA device, nothing to time (run it on a GPU machine).")
        if launch.INTERPRET:
            smoke_check()
        return 0

    device_name = torch.cuda.get_device_name()
    profile = detect(device_name, load_profiles())
    dtype = DTYPES[args.dtype]
    out = args.out or PROFILES_DIR / "results" / results_folder(profile, device_name) / "kernels.json"
    report = {
        **run_record("bench.kernels", sys.argv[1:] if argv is None else argv),
        "device": device_name,
        "profile": profile.name if profile else None,
        "peak_bf16_tflops": profile.peak_bf16_tflops if profile else "unknown",
        "memory_bandwidth_tbs": profile.memory_bandwidth_tbs if profile else "unknown",
        "dtype": args.dtype,
        "complete": False,
        "rows": [],
    }
    cases = [(bench_attention, batch, length) for batch in args.batch for length in args.lengths]
    cases += [(bench_patch_embed, batch, patch) for batch in args.batch for patch in (8, 4)]
    cases.sort(key=lambda case: case[1])  # batch by batch, as before
    rows = run_cases(cases, dtype, profile, report, out)
    report["complete"] = True
    write_json(out, report)
    v = report["versions"]
    print(f"{device_name} (profile {report['profile']}), torch {v['torch']}, triton {v['triton']}, "
          f"{args.dtype}; JSON: {out}")
    print_table(rows)
    return 0


def run_cases(cases, dtype, profile, report: dict, out: Path) -> list[dict]:
    """Runs each ``(bench function, batch, length or patch)`` and rewrites ``out`` after each with the rows so far
    (``report["rows"]``, ``complete`` false): a run killed later keeps every finished case."""
    rows = report["rows"]
    for i, (bench, batch, size) in enumerate(cases):
        new = bench(batch, size, dtype)
        for row in new:
            add_peaks(row, profile)
        rows += new
        report["note"] = f"{i + 1} of {len(cases)} cases measured"
        write_json(out, report)
    return rows


def do_bench(fn) -> float:
    """Median milliseconds of ``fn`` (run once first: compilation and autotuning stay out of the timing)."""
    import triton.testing

    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def timed_row(row: dict, forward, inputs: torch.Tensor, grad: torch.Tensor) -> list[dict]:
    """Rows for the forward and forward + backward of ``forward(inputs)``; failures are recorded, not raised."""
    out = []
    for pass_ in ("fwd", "fwd+bwd"):
        if pass_ == "fwd":
            def step():
                with torch.no_grad():
                    forward(inputs)
        else:
            def step():
                torch.autograd.grad(forward(inputs), inputs, grad)
        entry = dict(row, **{"pass": pass_})
        try:
            entry["ms"] = do_bench(step)
        except Exception as e:  # a backend that cannot run this case: say why and go on
            entry["ms"] = None
            entry["skipped"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            torch.cuda.empty_cache()
        out.append(entry)
    return out


def split_heads(qkv: torch.Tensor, heads: int):
    return qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def attention_impls(heads: int, causal: bool) -> dict:
    """name -> (B, L, 3W) -> (B, L, W) callable, or a string saying why it is unavailable."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def sdpa(backend):
        def run(qkv):
            batch, length, width3 = qkv.shape
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(*split_heads(qkv, heads), is_causal=causal)
            return out.transpose(1, 2).reshape(batch, length, width3 // 3)
        return run

    impls: dict = {"triton": lambda qkv: attention_packed(qkv, heads, causal=causal)}
    for name in SDPA_BACKENDS:
        backend = getattr(SDPBackend, name, None)
        impls[f"sdpa-{name.lower()}"] = sdpa(backend) if backend is not None else f"SDPBackend.{name} not in this torch"
    try:
        import xformers.ops as xops
    except ImportError as e:
        impls["xformers"] = f"not importable: {e}"
    else:
        def xformers(qkv):
            batch, length, width3 = qkv.shape
            q, k, v = qkv.unflatten(-1, (3, heads, -1)).unbind(2)  # (B, L, H, D) views
            bias = xops.LowerTriangularMask() if causal else None
            return xops.memory_efficient_attention(q, k, v, attn_bias=bias).reshape(batch, length, width3 // 3)
        impls["xformers"] = xformers
    return impls


def bench_attention(batch: int, length: int, dtype: torch.dtype) -> list[dict]:
    causal = length == TEXT_LENGTH
    heads = 8 if causal else VISION_WIDTH // HEAD_DIM
    width = heads * HEAD_DIM
    torch.manual_seed(0)
    qkv = torch.randn(batch, length, 3 * width, device="cuda", dtype=dtype, requires_grad=True)
    grad = torch.randn(batch, length, width, device="cuda", dtype=dtype)
    with torch.no_grad():
        want = attention_torch(*split_heads(qkv.float(), heads), causal=causal).flatten(2)
    fwd_flop = 4 * batch * heads * length * length * HEAD_DIM / (2 if causal else 1)
    rows = []
    for impl, fn in attention_impls(heads, causal).items():
        row = dict(kernel="attention", impl=impl, batch=batch, L=length, heads=heads, head_dim=HEAD_DIM,
                   causal=causal, dtype=str(dtype).removeprefix("torch."))
        if isinstance(fn, str):
            rows += [dict(row, **{"pass": p, "ms": None, "skipped": fn}) for p in ("fwd", "fwd+bwd")]
            continue
        entries = timed_row(row, fn, qkv, grad)
        if entries[0]["ms"]:  # it ran: check what it computes
            with torch.no_grad():
                cosine = F.cosine_similarity(fn(qkv).float().flatten(), want.flatten(), dim=0).item()
            for entry in entries:
                entry["cosine_vs_fp32"] = cosine
        for entry in entries:
            flop = fwd_flop * (3.5 if entry["pass"] == "fwd+bwd" else 1.0)
            entry["flop"] = flop
            if entry["ms"]:
                entry["tflops"] = flop / entry["ms"] / 1e9
            rows.append(entry)
    for pass_ in ("fwd", "fwd+bwd"):
        timed = [r for r in rows if r["pass"] == pass_ and r["ms"] and r["impl"].startswith("sdpa-")]
        if timed:
            best = min(timed, key=lambda r: r["ms"])
            for r in rows:
                if r["pass"] == pass_ and r["ms"]:
                    r["baseline"] = best["impl"]
                    r["speedup"] = best["ms"] / r["ms"]
    return rows


def bench_patch_embed(batch: int, patch: int, dtype: torch.dtype) -> list[dict]:
    torch.manual_seed(0)
    tokens = 1 + (LATENT_SIDE // patch) ** 2
    latents = torch.randn(batch, 4, LATENT_SIDE, LATENT_SIDE, device="cuda", dtype=dtype, requires_grad=True)
    params = (torch.randn(VISION_WIDTH, 4, patch, patch, device="cuda", dtype=dtype) / patch,
              torch.randn(VISION_WIDTH, device="cuda", dtype=dtype),
              torch.randn(tokens, VISION_WIDTH, device="cuda", dtype=dtype),
              1 + 0.1 * torch.randn(VISION_WIDTH, device="cuda", dtype=dtype),
              0.1 * torch.randn(VISION_WIDTH, device="cuda", dtype=dtype))
    grad = torch.randn(batch, tokens, VISION_WIDTH, device="cuda", dtype=dtype)
    size = torch.finfo(dtype).bits // 8
    latent_bytes = latents.numel() * size
    param_bytes = sum(p.numel() for p in params) * size
    token_bytes = grad.numel() * size
    fwd_bytes = latent_bytes + param_bytes + token_bytes
    bwd_bytes = 2 * latent_bytes + param_bytes + token_bytes  # reads latents, params, dtokens; writes dlatents
    with torch.no_grad():
        want = patch_embed_torch(latents.float(), *(p.float() for p in params), scale=LATENT_SCALE)
    rows = []
    for impl, fn in (("triton", patch_embed), ("torch", patch_embed_torch)):
        row = dict(kernel="patch_embed", impl=impl, batch=batch, patch=patch, tokens=tokens, width=VISION_WIDTH,
                   dtype=str(dtype).removeprefix("torch."))

        def forward(x, fn=fn):
            return fn(x, *params, scale=LATENT_SCALE)

        with torch.no_grad():
            got = forward(latents).float()
        row["cosine_vs_fp32"] = F.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
        for entry in timed_row(row, forward, latents, grad):
            entry["bytes"] = fwd_bytes + (bwd_bytes if entry["pass"] == "fwd+bwd" else 0)
            if entry["ms"]:
                entry["gbps"] = entry["bytes"] / entry["ms"] / 1e6
            rows.append(entry)
    for pass_ in ("fwd", "fwd+bwd"):
        base = next(r for r in rows if r["pass"] == pass_ and r["impl"] == "torch")
        for r in rows:
            if r["pass"] == pass_ and r["ms"] and base["ms"]:
                r["baseline"] = "torch"
                r["speedup"] = base["ms"] / r["ms"]
    return rows


def add_peaks(row: dict, profile) -> None:
    if profile is None:
        row["pct_peak"] = "unknown"
    elif "tflops" in row:
        row["pct_peak"] = 100 * row["tflops"] / profile.peak_bf16_tflops
    elif "gbps" in row:
        row["pct_peak"] = 100 * row["gbps"] / (1000 * profile.memory_bandwidth_tbs)


def print_table(rows: list[dict]) -> None:
    body = []
    for r in rows:
        shape = f"L{r['L']}{' causal' if r['causal'] else ''}" if r["kernel"] == "attention" else f"p{r['patch']}"
        rate = f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else f"{r['gbps']:.0f} GB/s" if "gbps" in r else "-"
        speedup = f"{r['speedup']:.2f}x" if "speedup" in r else "-"
        body.append([r["kernel"], r["pass"], r["impl"], r["batch"], shape, fmt(r["ms"] or None, ".4f"), rate,
                     fmt(r.get("pct_peak"), ".1f"), speedup, r.get("skipped", "")[:80]])
    print(table(["kernel", "pass", "impl", "batch", "shape", "ms", "rate", "%peak", "speedup", "note"], body))
    print("speedup: attention vs the fastest SDPA backend of the same pass; patch_embed vs patch_embed_torch")


def smoke_check() -> None:
    """Tiny fused-vs-PyTorch check under Triton's interpreter (CPU, fp32)."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 17, 3 * 2 * 32, requires_grad=True)
    for causal in (False, True):
        got = attention_packed(qkv, 2, causal=causal)
        want = attention_torch(*split_heads(qkv, 2), causal=causal).flatten(2)
        grad = torch.randn_like(got)
        err = (got - want).abs().max().item()
        derr = (torch.autograd.grad(got, qkv, grad)[0] - torch.autograd.grad(want, qkv, grad)[0]).abs().max().item()
        assert err < 1e-4 and derr < 1e-4, f"attention (causal={causal}): max error {err:.2e}, grad {derr:.2e}"
    latents = torch.randn(2, 4, 16, 24, requires_grad=True)
    params = (torch.randn(32, 4, 8, 8) / 8, torch.randn(32), torch.randn(7, 32), torch.randn(32), torch.randn(32))
    got, want = patch_embed(latents, *params, scale=0.5), patch_embed_torch(latents, *params, scale=0.5)
    grad = torch.randn_like(got)
    err = (got - want).abs().max().item()
    derr = (torch.autograd.grad(got, latents, grad)[0] - torch.autograd.grad(want, latents, grad)[0]).abs().max().item()
    assert err < 1e-4 and derr < 1e-4, f"patch_embed: max error {err:.2e}, grad {derr:.2e}"
    print("interpreter smoke check passed: attention (causal and not) and patch_embed match PyTorch, fwd and bwd")


if __name__ == "__main__":
    sys.exit(main())
