"""The Triton attention kernels against a float64 reference (CPU interpreter, or CUDA if present)."""

# tests/conftest.py sets TRITON_INTERPRET=1 where no GPU is visible, before anything imports Triton.
import math
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: the kernel tests need it")

from conftest import compile_kernels_for_gpu, kernel_device
from fastlclip.kernels import flash_attention as attention_module, launch  # noqa: E402
from fastlclip.kernels.flash_attention import attention, attention_packed, attention_torch  # noqa: E402
from fastlclip.kernels.launch import kernels_available  # noqa: E402

DEVICE = kernel_device()

# Max abs error allowed, relative to max(1, |reference|): fp32 accumulates like the reference.
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN, so a tile the kernel fails to write shows up."""
    monkeypatch.setattr(launch, "POISON", True)


def reference(q, k, v, causal, sm_scale=None):
    """float64 softmax attention, (B, H, L, D) -> (B, L, H, D)."""
    q, k, v = q.double(), k.double(), v.double()
    s = q @ k.transpose(-1, -2) * (sm_scale or 1 / math.sqrt(q.shape[-1]))
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), -math.inf)
    return (s.softmax(-1) @ v).transpose(1, 2)


def packed_qkv(batch, length, heads, dim, dtype, seed):
    torch.manual_seed(seed)
    return torch.randn(batch, length, 3 * heads * dim, dtype=torch.float64).to(device=DEVICE, dtype=dtype)


def split(qkv, heads):
    return qkv.unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def assert_close(got, want, dtype, what):
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an unwritten tile?)"
    err = (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert err < TOL[dtype], f"{what}: relative max error {err:.3g} >= {TOL[dtype]}"


def check_against_reference(q, k, v, causal, dtype, sm_scale=None):
    """Forward and backward of attention(q, k, v) against float64, for leaf tensors q, k, v."""
    out = attention(q, k, v, causal=causal, sm_scale=sm_scale)
    batch, heads, length, dim = q.shape
    assert out.shape == (batch, length, heads, dim) and out.is_contiguous() and out.dtype == dtype
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = reference(q64, k64, v64, causal, sm_scale)
    assert_close(out, want, dtype, "out")
    grad = torch.randn(want.shape, dtype=torch.float64, device=DEVICE)
    out.backward(grad.to(dtype))
    want.backward(grad)
    for name, got, ref in (("dq", q.grad, q64.grad), ("dk", k.grad, k64.grad), ("dv", v.grad, v64.grad)):
        assert got.dtype == dtype and got.shape == q.shape
        assert_close(got, ref, dtype, name)


@pytest.mark.parametrize("batch, heads, length, dim, dtype, causal", [
    (3, 5, 65, 32, torch.float32, False),
    (3, 5, 77, 32, torch.float32, True),
    (3, 5, 17, 32, torch.float32, True),
    (3, 5, 65, 32, torch.float16, False),
    (3, 5, 77, 32, torch.float16, True),
    (2, 3, 65, 64, torch.float32, False),
    (1, 2, 33, 128, torch.float16, True),
    (1, 2, 19, 16, torch.bfloat16, False),
    (1, 2, 257, 16, torch.float32, False),  # B/8 at 128x128 latents (SDXL 1024 px): 16x16 patches + class
    (1, 1, 1025, 16, torch.float32, False),  # B/4 at 128x128: 32x32 patches + class (one head: interpreter time)
    (1, 2, 253, 16, torch.float16, False),  # B/8 at 144x112 (1152x896 px): 18x14 patches + class
])
def test_attention_packed_views_match_float64(batch, heads, length, dim, dtype, causal):
    qkv = packed_qkv(batch, length, heads, dim, dtype, seed=length + dim)
    q, k, v = (t.detach().requires_grad_() for t in split(qkv, heads))  # strided views, no copy
    assert not q.is_contiguous()
    check_against_reference(q, k, v, causal, dtype)


def test_attention_other_layouts_and_scale():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 65, 32, device=DEVICE, requires_grad=True)  # contiguous (B, H, L, D)
    k = torch.randn(2, 3, 32, 65, device=DEVICE).transpose(-1, -2).requires_grad_()  # stride_d != 1
    v = torch.randn(65, 2, 3, 32, device=DEVICE).permute(1, 2, 0, 3).requires_grad_()
    check_against_reference(q, k, v, causal=False, dtype=torch.float32, sm_scale=0.3)


def test_attention_packed_equals_split():
    heads = 3
    qkv = packed_qkv(2, 77, heads, 32, torch.float32, seed=7).requires_grad_()
    out = attention_packed(qkv, heads, causal=True)
    assert out.shape == (2, 77, heads * 32)
    qkv2 = qkv.detach().clone().requires_grad_()
    want = attention(*split(qkv2, heads), causal=True).reshape(2, 77, heads * 32)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    grad = torch.randn_like(out)
    out.backward(grad)
    want.backward(grad)
    assert torch.isfinite(qkv.grad).all()
    torch.testing.assert_close(qkv.grad, qkv2.grad, rtol=0, atol=0)


@pytest.mark.skipif(not launch.INTERPRET, reason="on a GPU the autotuner picks among these configs itself")
@pytest.mark.parametrize("index", range(max(len(attention_module._FWD_CONFIGS), len(attention_module._BWD_DKDV_CONFIGS),
                                            len(attention_module._BWD_DQ_CONFIGS))))
def test_attention_every_gpu_tile_shape(monkeypatch, index):
    """Each GPU candidate's block sizes give correct results (the GPU autotuner may pick any)."""
    for launcher, configs in ((attention_module._fwd, attention_module._FWD_CONFIGS),
                              (attention_module._bwd_dkdv, attention_module._BWD_DKDV_CONFIGS),
                              (attention_module._bwd_dq, attention_module._BWD_DQ_CONFIGS)):
        blocks = {k: v for k, v in configs[index % len(configs)].items() if k.startswith("BLOCK")}
        monkeypatch.setattr(launcher, "interpreter_config", blocks)
    for causal in (False, True):
        qkv = packed_qkv(1, 150, 1, 32, torch.float32, seed=index)
        q, k, v = (t.detach().requires_grad_() for t in split(qkv, 1))
        check_against_reference(q, k, v, causal, torch.float32)


def test_attention_rejects_bad_input():
    q = torch.randn(2, 3, 17, 32, device=DEVICE)
    with pytest.raises(ValueError, match=r"q must be \(B, H, L, D\)"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="one shape"):
        attention(q, q[:, :, :16], q)
    with pytest.raises(TypeError, match="one dtype"):
        attention(q, q.half(), q)
    with pytest.raises(ValueError, match="one device"):
        attention(q, q.to("meta"), q)
    with pytest.raises(ValueError, match="head dims"):
        attention(*(torch.randn(1, 1, 8, 48, device=DEVICE),) * 3)
    with pytest.raises(TypeError, match="floating point"):
        attention(*(torch.ones(1, 1, 8, 32, dtype=torch.int32, device=DEVICE),) * 3)
    with pytest.raises(ValueError, match="3 \\* num_heads"):
        attention_packed(torch.randn(2, 17, 100, device=DEVICE), 3)


def test_kernels_available():
    assert kernels_available(DEVICE)
    assert kernels_available(torch.empty(1, device=DEVICE))
    assert not kernels_available("meta")


def test_fallback_warns_once_and_matches(monkeypatch):
    monkeypatch.setattr(launch, "kernels_available", lambda device: False)
    monkeypatch.setattr(launch, "_WARNED", set())
    qkv = packed_qkv(2, 17, 3, 32, torch.float32, seed=3)
    q, k, v = split(qkv, 3)
    want = reference(q, k, v, causal=True)
    with pytest.warns(RuntimeWarning, match="attention: .*using the PyTorch path"):
        out = attention(q, k, v, causal=True)
    assert (out.double() - want).abs().max() < 1e-5
    with pytest.warns(RuntimeWarning, match="attention_packed: .*using the PyTorch path"):
        packed = attention_packed(qkv, 3, causal=True)
    assert (packed.double() - want.flatten(2)).abs().max() < 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attention(q, k, v)  # warned already: silent


def test_attention_torch_matches_reference():
    qkv = packed_qkv(2, 65, 3, 16, torch.float64, seed=4)
    q, k, v = split(qkv, 3)
    for causal in (False, True):
        assert (attention_torch(q, k, v, causal=causal) - reference(q, k, v, causal)).abs().max() < 1e-12



@pytest.mark.skipif(not launch.INTERPRET, reason="on a GPU the other tests compile the kernels for real")
def test_kernels_compile_for_gpu():
    """Triton's real compiler (sm_90, bf16, causal) accepts the kernels: the interpreter checks less."""
    blocks = dict(HEAD_DIM=64, CAUSAL=True, BLOCK_M=64, BLOCK_N=32, PRECISION="tf32", UPCAST=False)
    io = dict(q_ptr="bf16", k_ptr="bf16", v_ptr="bf16", do_ptr="bf16", lse_ptr="fp32", delta_ptr="fp32")
    cases = [
        ("_attn_fwd_kernel", dict(io, o_ptr="bf16"), ("qk_scale",), blocks),
        ("_attn_bwd_preprocess_kernel", dict(o_ptr="bf16", do_ptr="bf16", delta_ptr="fp32"), (),
         dict(HEAD_DIM=64, BLOCK_M=64)),
        ("_attn_bwd_dkdv_kernel", dict(io, dk_ptr="bf16", dv_ptr="bf16"), ("sm_scale", "qk_scale"), blocks),
        ("_attn_bwd_dq_kernel", dict(io, dq_ptr="bf16"), ("sm_scale", "qk_scale"), blocks),
    ]
    options = dict(num_warps=4, num_stages=2)
    compile_kernels_for_gpu("fastlclip.kernels.flash_attention", [(*case, options) for case in cases], arch=90)


def _attention_block_float64(x, w_in, b_in, w_out, b_out, heads, causal):
    """float64 open_clip attention: packed in_proj, softmax attention, out_proj (no SDPA, no kernel)."""
    batch, length, width = x.shape
    q, k, v = split(x @ w_in.T + b_in, heads)
    return reference(q, k, v, causal).reshape(batch, length, width) @ w_out.T + b_out


@pytest.mark.parametrize("length, heads, dtype, causal, fused", [
    (65, 2, torch.float32, False, True),
    (257, 1, torch.float16, False, True),  # one head: interpreter time
    (77, 2, torch.float32, True, True),
    (65, 2, torch.float32, False, False),  # the PyTorch path (no usable Triton)
])
def test_attention_feeds_in_proj_weight_gradients(monkeypatch, length, heads, dtype, causal, fused):
    """Training: the kernel has no weights, so its q/k/v gradient must reach the packed in_proj's weight and bias
    (and out_proj's, and the input's) exactly as float64 autograd gives them; batch 3, non-contiguous input."""
    from fastlclip.model import PackedAttention

    if not fused:
        monkeypatch.setattr(launch, "kernels_available", lambda device: False)
        monkeypatch.setattr(launch, "_WARNED", set())
    width = 16 * heads
    torch.manual_seed(length)
    module = PackedAttention(width, heads).double()
    with torch.no_grad():
        module.in_proj_bias.normal_()
    module = module.to(DEVICE, dtype)
    module.attention_fn = attention_packed
    x64 = torch.randn(length, 3, width, dtype=torch.float64, device=DEVICE).transpose(0, 1)  # (B, L, W), strided
    x = x64.to(dtype).requires_grad_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = module(x, causal)
    params = dict(module.named_parameters())
    p64 = {name: p.detach().double().requires_grad_() for name, p in params.items()}
    xd = x.detach().double().requires_grad_()
    want = _attention_block_float64(xd, p64["in_proj_weight"], p64["in_proj_bias"], p64["out_proj.weight"],
                                    p64["out_proj.bias"], heads, causal)
    assert_close(out, want, dtype, "out")
    grad = torch.randn(want.shape, dtype=torch.float64, device=DEVICE)
    out.backward(grad.to(dtype))
    want.backward(grad)
    assert_close(x.grad, xd.grad, dtype, "d_x")
    for name, p in params.items():
        assert p.grad is not None and p.grad.dtype == dtype, name
        assert_close(p.grad, p64[name].grad, dtype, f"d_{name}")


def test_interpreter_numpy_problem_is_named():
    """Triton 3.6's interpreter fails with NumPy >= 2.4: importing the kernels under it warns with the fix."""
    problem = launch.interpreter_numpy_problem("3.6.0", "2.4.1")
    assert "fails with NumPy 2.4.1" in problem and "numpy<2.4" in problem
    assert launch.interpreter_numpy_problem("3.6.0", "2.3.5") is None
    assert launch.interpreter_numpy_problem("3.8.0", "2.4.6") is None


def test_config_pruning_keeps_the_towers_configs_and_drops_what_cannot_fit():
    """At head dim 64 in bf16 (every shipped tower) no config is pruned on sm_90; fp32 at head dim 128 (kernel
    tests) drops the largest backward tiles, which Triton 3.8's compiler for sm_90 gave 229,888 (dK/dV, 64x128) and
    229,376 (dQ, 128x64) bytes of shared memory and 56,384 / 37,488 bytes of spill stores; a kernel with nothing
    estimated to fit keeps its smallest config (attention has no unfused fallback)."""
    sm90, sm86 = 227 * 1024, 99 * 1024
    launchers = {"fwd": attention_module._fwd, "dkdv": attention_module._bwd_dkdv, "dq": attention_module._bwd_dq}

    def args(dtype, dim):
        return {"HEAD_DIM": dim, "q_ptr": torch.empty(0, dtype=dtype)}

    for name, launcher in launchers.items():
        assert launcher.fitting(args(torch.bfloat16, 64), sm90) == launcher.configs, name
    compiled = [("dkdv", dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2), 229888),
                ("dq", dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2), 229376)]
    for name, config, shared in compiled:
        launcher = launchers[name]
        assert config in launcher.configs and config not in launcher.fitting(args(torch.float32, 128), sm90)
        est_shared, _ = launcher.estimate(config, args(torch.float32, 128))
        assert shared <= est_shared <= 1.15 * shared
    for launcher in launchers.values():
        assert len(launcher.fitting(args(torch.float32, 128), sm86)) >= 1
