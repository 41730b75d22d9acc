"""pytest-benchmark suite for the fused kernels on a CUDA GPU (bf16, model shapes, batch 8).

Each test first checks the fused result row by row against PyTorch in float64 (``assert_rows_close``, the
CPU kernel tests' bf16 tolerance), then times it; the
PyTorch baseline of each case is timed in the same group. A GPU CI gates regressions with
``pytest tests/gpu -m gpu --benchmark-compare-fail=median:10%``. TRITON_INTERPRET must be unset
(``make test`` sets it, and tests/conftest.py does where no GPU is visible): interpreted kernels are
skipped here. Each benchmark round is 20 back-to-back calls followed by one synchronize (``calls_per_round``).
"""

import pytest
import torch
import torch.nn.functional as F

from conftest import ROW_TOL, assert_rows_close, gpu_benchmark

pytest.importorskip("pytest_benchmark", reason="pytest-benchmark is not installed")

from fastlclip.kernels.flash_attention import attention_packed  # noqa: E402
from fastlclip.kernels.fused_patch_embed import patch_embed, patch_embed_torch  # noqa: E402

pytestmark = pytest.mark.gpu  # skipped without CUDA: see tests/gpu/conftest.py

BATCH = 8
DTYPE = torch.bfloat16
# (tokens L, heads, head dim, causal): ViT-B/8 (65) and ViT-B/4 (257) image towers, the text tower (77).
ATTENTION_CASES = {"L65": (65, 12, 64, False), "L257": (257, 12, 64, False), "L77-causal": (77, 8, 64, True)}


def assert_float64(got, want64, what):
    """``got`` (bf16) against the PyTorch path run in float64 on the same (bf16-rounded) inputs, row by row."""
    assert_rows_close(got, want64, what, ROW_TOL[DTYPE])


def f64(params):
    return tuple(p.double() for p in params)




def patch_inputs(patch, requires_grad):
    torch.manual_seed(0)
    latents = torch.randn(BATCH, 4, 64, 64, device="cuda", dtype=DTYPE, requires_grad=requires_grad)
    width, tokens = 768, 1 + (64 // patch) ** 2
    params = (torch.randn(width, 4, patch, patch, device="cuda", dtype=DTYPE) / patch,
              torch.randn(width, device="cuda", dtype=DTYPE),
              torch.randn(tokens, width, device="cuda", dtype=DTYPE),
              1 + 0.1 * torch.randn(width, device="cuda", dtype=DTYPE),
              0.1 * torch.randn(width, device="cuda", dtype=DTYPE))
    return latents, params


def attention_torch_packed(qkv, heads, causal):
    """SDPA (PyTorch's own backend choice) on the same packed views, (B, L, 3W) -> (B, L, W)."""
    batch, length, width3 = qkv.shape
    q, k, v = qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return out.transpose(1, 2).reshape(batch, length, width3 // 3)


PATCH_IMPLS = {"fused": patch_embed, "torch": patch_embed_torch}
ATTENTION_IMPLS = {"fused": lambda qkv, heads, causal: attention_packed(qkv, heads, causal=causal),
                   "torch": attention_torch_packed}


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("patch", [8, 4])
def test_patch_embed_fwd(benchmark, patch, impl):
    benchmark.group = f"patch_embed fwd p{patch} b{BATCH}"
    latents, params = patch_inputs(patch, requires_grad=False)
    with torch.no_grad():
        assert_float64(patch_embed(latents, *params, scale=0.5),
                       patch_embed_torch(latents.double(), *f64(params), scale=0.5), "tokens")
        fn = PATCH_IMPLS[impl]
        gpu_benchmark(benchmark, lambda: fn(latents, *params, scale=0.5))


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("patch", [8, 4])
def test_patch_embed_fwd_bwd(benchmark, patch, impl):
    benchmark.group = f"patch_embed fwd+bwd p{patch} b{BATCH}"
    latents, params = patch_inputs(patch, requires_grad=True)
    grad = torch.randn(BATCH, 1 + (64 // patch) ** 2, 768, device="cuda", dtype=DTYPE)
    (got,) = torch.autograd.grad(patch_embed(latents, *params, scale=0.5), latents, grad)
    latents64 = latents.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(patch_embed_torch(latents64, *f64(params), scale=0.5), latents64, grad.double())
    assert_float64(got, want, "d_latents")
    fn = PATCH_IMPLS[impl]
    gpu_benchmark(benchmark, lambda: torch.autograd.grad(fn(latents, *params, scale=0.5), latents, grad))


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_fwd(benchmark, case, impl):
    length, heads, dim, causal = ATTENTION_CASES[case]
    benchmark.group = f"attention fwd {case} b{BATCH}"
    torch.manual_seed(0)
    qkv = torch.randn(BATCH, length, 3 * heads * dim, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        assert_float64(attention_packed(qkv, heads, causal=causal), attention_torch_packed(qkv.double(), heads, causal),
                       "out")
        fn = ATTENTION_IMPLS[impl]
        gpu_benchmark(benchmark, lambda: fn(qkv, heads, causal))


@pytest.mark.parametrize("impl", ["fused", "torch"])
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_attention_fwd_bwd(benchmark, case, impl):
    length, heads, dim, causal = ATTENTION_CASES[case]
    benchmark.group = f"attention fwd+bwd {case} b{BATCH}"
    torch.manual_seed(0)
    qkv = torch.randn(BATCH, length, 3 * heads * dim, device="cuda", dtype=DTYPE, requires_grad=True)
    grad = torch.randn(BATCH, length, heads * dim, device="cuda", dtype=DTYPE)
    (got,) = torch.autograd.grad(attention_packed(qkv, heads, causal=causal), qkv, grad)
    qkv64 = qkv.detach().double().requires_grad_(True)
    (want,) = torch.autograd.grad(attention_torch_packed(qkv64, heads, causal), qkv64, grad.double())
    assert_float64(got, want, "d_qkv")
    fn = ATTENTION_IMPLS[impl]
    gpu_benchmark(benchmark, lambda: torch.autograd.grad(fn(qkv, heads, causal), qkv, grad))
