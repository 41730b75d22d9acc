"""The fused patch-embedding kernel against a float64 reference (CPU interpreter, or CUDA if present)."""

# tests/conftest.py sets TRITON_INTERPRET=1 where no GPU is visible, before anything imports Triton.
import warnings

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed: the kernel tests need it")

from conftest import compile_kernels_for_gpu, compile_report_for_gpu, kernel_device
from fastlclip.kernels import fused_patch_embed as patch_embed_module, launch  # noqa: E402
from fastlclip.kernels.fused_patch_embed import patch_embed, patch_embed_torch  # noqa: E402

DEVICE = kernel_device()

# Max abs error allowed, relative to max(1, |reference|).
TOL = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}
WGRAD_PTRS = dict(dy_ptr="fp32", dlnw_ptr="fp32", dlnb_ptr="fp32")
PARAM_NAMES = ("conv_weight", "class_embedding", "pos_embedding", "ln_weight", "ln_bias")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN, so a tile the kernel fails to write shows up."""
    monkeypatch.setattr(launch, "POISON", True)


def reference(latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias, scale=1.0, eps=1e-5):
    """float64 patchify-as-reshape + matmul + class token + pos + LayerNorm (no conv2d)."""
    batch, channels, h, w = latents.shape
    width, _, patch, _ = conv_weight.shape
    gh, gw = h // patch, w // patch
    x = latents[:, :, :gh * patch, :gw * patch].double() * scale
    patches = x.reshape(batch, channels, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)
    y = patches @ conv_weight.double().reshape(width, -1).T
    y = torch.cat([class_embedding.double().expand(batch, 1, -1), y], 1) + pos_embedding.double()
    mean, var = y.mean(-1, keepdim=True), y.var(-1, unbiased=False, keepdim=True)
    return (y - mean) / torch.sqrt(var + eps) * ln_weight.double() + ln_bias.double()


def make_inputs(batch, channels, h, w, patch, width, seed, layout="contiguous"):
    """float64 latents in the requested layout plus float64 weights (random, never zeros)."""
    torch.manual_seed(seed)
    if layout == "sliced":  # a non-contiguous window of a bigger tensor
        latents = torch.randn(batch, channels + 1, h + 3, w + 5, dtype=torch.float64)[:, 1:, 2:h + 2, 1:w + 1]
    else:
        latents = torch.randn(batch, channels, h, w, dtype=torch.float64)
        if layout == "channels_last":
            latents = latents.contiguous(memory_format=torch.channels_last)
    n_tokens = 1 + (h // patch) * (w // patch)
    params = (torch.randn(width, channels, patch, patch, dtype=torch.float64) / patch,
              torch.randn(width, dtype=torch.float64),
              torch.randn(n_tokens, width, dtype=torch.float64),
              1 + 0.5 * torch.randn(width, dtype=torch.float64),
              0.5 * torch.randn(width, dtype=torch.float64))
    return latents.to(DEVICE), [p.to(DEVICE) for p in params]


def assert_close(got, want, dtype, what):
    assert torch.isfinite(got).all(), f"{what}: non-finite values (an unwritten tile?)"
    err = (got.double() - want).abs().max().item() / max(1.0, want.abs().max().item())
    assert err < TOL[dtype], f"{what}: relative max error {err:.3g} >= {TOL[dtype]}"


def check(latents64, params64, latent_dtype, weight_dtype, scale, params_grad=(), latent_grad=True):
    """Fused forward + latent (and optionally weight) gradients against float64."""
    latents = latents64.to(latent_dtype).requires_grad_(latent_grad)  # .to keeps the stride layout
    params = [p.to(weight_dtype).requires_grad_(name in params_grad) for name, p in zip(PARAM_NAMES, params64)]
    out = patch_embed(latents, *params, scale=scale)
    lat64 = latents.detach().double().requires_grad_(latent_grad)
    p64 = [p.detach().double().requires_grad_(p.requires_grad) for p in params]
    want = reference(lat64, *p64, scale=scale)
    assert out.shape == want.shape and out.dtype == weight_dtype
    assert_close(out, want, weight_dtype, "tokens")
    grad = torch.randn(want.shape, dtype=torch.float64, device=DEVICE)
    out.backward(grad.to(weight_dtype))
    want.backward(grad)
    if latent_grad:
        assert latents.grad.dtype == latent_dtype and latents.grad.shape == latents.shape
        assert_close(latents.grad, lat64.grad, weight_dtype, "d_latents")
    for name, p, ref in zip(PARAM_NAMES, params, p64):
        if name in params_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, f"{name}: missing gradient"
            assert p.grad.dtype == p.dtype and p.grad.shape == p.shape
            assert_close(p.grad, ref.grad, weight_dtype, f"d_{name}")
        else:
            assert p.grad is None
    return latents


@pytest.mark.parametrize("shape, layout, latent_dtype, weight_dtype, scale", [
    ((3, 4, 24, 40, 8, 48), "channels_last", torch.float32, torch.float32, 0.7),  # 3x5 grid, 16 tokens
    ((3, 4, 24, 40, 4, 40), "sliced", torch.float32, torch.float32, 1 / 0.13025),  # 6x10 grid, width not 2^n
    ((3, 4, 24, 40, 8, 48), "contiguous", torch.float16, torch.float16, 1.0),
    ((2, 4, 16, 24, 4, 32), "channels_last", torch.float32, torch.float16, 0.5),
    ((2, 4, 16, 16, 8, 32), "contiguous", torch.bfloat16, torch.bfloat16, 2.0),
    ((2, 3, 13, 20, 3, 24), "sliced", torch.float32, torch.float32, 1.0),  # K = 27, ragged edges
    ((1, 4, 128, 128, 4, 32), "contiguous", torch.float32, torch.float32, 1 / 0.13025),  # B/4 at 1024 px: 1025 tokens
    ((1, 4, 144, 112, 8, 32), "channels_last", torch.float32, torch.float32, 1.0),  # B/8 at 1152x896 px: 18x14
])
def test_patch_embed_matches_float64(shape, layout, latent_dtype, weight_dtype, scale):
    latents64, params64 = make_inputs(*shape, seed=sum(shape), layout=layout)
    latents = check(latents64, params64, latent_dtype, weight_dtype, scale)
    if layout == "channels_last":
        assert latents.grad.is_contiguous(memory_format=torch.channels_last)
    if shape[2] % shape[4] or shape[3] % shape[4]:  # pixels past the last whole patch: zero gradient
        patch = shape[4]
        assert latents.grad[:, :, (shape[2] // patch) * patch:].abs().max() == 0
        assert latents.grad[:, :, :, (shape[3] // patch) * patch:].abs().max() == 0


@pytest.mark.parametrize("params_grad", [PARAM_NAMES, ("conv_weight",), ("ln_bias", "pos_embedding")])
def test_patch_embed_weight_gradients(params_grad):
    latents64, params64 = make_inputs(2, 4, 16, 24, 8, 32, seed=11, layout="channels_last")
    check(latents64, params64, torch.float32, torch.float32, 0.9, params_grad=params_grad)


@pytest.mark.parametrize("shape, layout, dtype, latent_grad", [
    ((3, 4, 64, 64, 8, 40), "sliced", torch.float32, True),  # 65 tokens, batch 3, width not 2^n
    ((3, 4, 64, 64, 8, 40), "channels_last", torch.float16, False),  # training: frozen latents
    ((3, 4, 64, 64, 4, 24), "sliced", torch.float32, False),  # 257 tokens
    ((3, 4, 66, 67, 4, 24), "channels_last", torch.float16, True),  # 257 tokens, ragged edges
])
def test_fused_weight_gradients_match_float64(monkeypatch, shape, layout, dtype, latent_grad):
    """Training: every weight's gradient comes from the fused backward (the PyTorch path is never run), at odd
    sizes, against float64."""
    def unfused(*args, **kwargs):
        raise AssertionError("the fused backward ran the PyTorch path")

    monkeypatch.setattr(patch_embed_module, "patch_embed_torch", unfused)
    latents64, params64 = make_inputs(*shape, seed=sum(shape), layout=layout)
    check(latents64, params64, dtype, dtype, 1 / 0.13025, params_grad=PARAM_NAMES, latent_grad=latent_grad)


def test_pytorch_path_weight_gradients_match_float64(monkeypatch):
    """Without usable Triton the PyTorch path gives the same gradients (65 tokens, batch 3, non-contiguous)."""
    monkeypatch.setattr(launch, "kernels_available", lambda device: False)
    monkeypatch.setattr(launch, "_WARNED", set())
    latents64, params64 = make_inputs(3, 4, 64, 64, 8, 40, seed=21, layout="sliced")
    with pytest.warns(RuntimeWarning, match="using the PyTorch path"):
        check(latents64, params64, torch.float32, torch.float32, 0.7, params_grad=PARAM_NAMES)


@pytest.mark.skipif(not launch.INTERPRET, reason="on a GPU the autotuner picks among these configs itself")
@pytest.mark.parametrize("config", sorted({(c["BLOCK_M"], c["BLOCK_K"])
                                           for c in patch_embed_module._FWD_CONFIGS + patch_embed_module._BWD_CONFIGS}))
def test_patch_embed_every_gpu_tile_shape(monkeypatch, config):
    """Each GPU candidate's block sizes give correct results (the GPU autotuner may pick any)."""
    blocks = dict(BLOCK_M=config[0], BLOCK_K=config[1])
    monkeypatch.setattr(patch_embed_module._fwd, "interpreter_config", blocks)
    monkeypatch.setattr(patch_embed_module._bwd, "interpreter_config", blocks)
    latents64, params64 = make_inputs(5, 4, 24, 40, 8, 48, seed=3, layout="sliced")
    check(latents64, params64, torch.float32, torch.float32, 0.7)


def test_patch_embed_torch_matches_reference():
    latents, params = make_inputs(2, 4, 24, 40, 8, 48, seed=5, layout="sliced")
    got = patch_embed_torch(latents, *params, scale=0.3, eps=1e-6)
    assert (got - reference(latents, *params, scale=0.3, eps=1e-6)).abs().max() < 1e-10


def test_patch_embed_rejects_bad_input():
    latents, (w, cls, pos, lnw, lnb) = make_inputs(1, 4, 16, 16, 8, 32, seed=0)
    with pytest.raises(ValueError, match=r"latents must be \(B, C, H, W\)"):
        patch_embed(latents[0], w, cls, pos, lnw, lnb)
    with pytest.raises(ValueError, match="3 channels but conv_weight expects 4"):
        patch_embed(latents[:, :3], w, cls, pos, lnw, lnb)
    with pytest.raises(ValueError, match="pos_embedding must have shape"):
        patch_embed(latents, w, cls, pos[:-1], lnw, lnb)
    with pytest.raises(ValueError, match="smaller than the 8x8 patch"):
        patch_embed(latents[..., :4, :4], w, cls, pos, lnw, lnb)
    with pytest.raises(ValueError, match="conv_weight is on meta"):
        patch_embed(latents, w.to("meta"), cls, pos, lnw, lnb)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        patch_embed(latents, w, cls, pos, lnw, lnb)  # float64 goes to patch_embed_torch only
    wide = patch_embed_module.MAX_WIDTH + 1
    vectors = [torch.randn(wide, device=DEVICE) for _ in range(3)]
    with pytest.raises(ValueError, match="exceeds the fused kernel's limit"):
        patch_embed(latents.float(), torch.randn(wide, 4, 8, 8, device=DEVICE), vectors[0],
                    torch.randn(5, wide, device=DEVICE), *vectors[1:])


def test_fallback_warns_once_and_matches(monkeypatch):
    monkeypatch.setattr(launch, "kernels_available", lambda device: False)
    monkeypatch.setattr(launch, "_WARNED", set())
    latents, params = make_inputs(2, 4, 16, 24, 8, 32, seed=9)
    latents, params = latents.float(), [p.float() for p in params]
    with pytest.warns(RuntimeWarning, match="patch_embed: .*using the PyTorch path"):
        out = patch_embed(latents, *params, scale=0.5)
    assert (out.double() - reference(latents, *params, scale=0.5)).abs().max() < 1e-4
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_embed(latents, *params)  # warned already: silent



SM90_SHARED, SM86_SHARED = 227 * 1024, 99 * 1024
WIDTH_768 = 1024  # BLOCK_W: next_pow2(768)
# What Triton 3.8's compiler for sm_90 gave at width 768 (ptxas -v), for the configs shipped before and the
# candidates tried: (kernel, dtype, (BLOCK_M, BLOCK_K, num_warps, num_stages), spill store bytes, shared bytes).
# "bwd" is the reward's backward (latent gradient), "bwd_w" the training one (weight gradients only).
COMPILED_SM90 = [
    ("fwd", "bf16", (16, 16, 4, 1), 380, 33280), ("fwd", "bf16", (16, 32, 4, 2), 1068, 68608),
    ("fwd", "bf16", (16, 32, 8, 3), 0, 70656), ("fwd", "bf16", (16, 64, 8, 2), 460, 137216),
    ("fwd", "bf16", (32, 32, 8, 2), 504, 71680), ("fwd", "bf16", (32, 64, 8, 3), 1142, 151552),
    ("fwd", "bf16", (32, 32, 16, 2), 484, 71680), ("fwd", "bf16", (16, 16, 8, 1), 0, 33280),
    ("fwd", "bf16", (16, 16, 8, 2), 0, 34304), ("fwd", "bf16", (16, 32, 8, 2), 0, 68608),
    ("fwd", "bf16", (16, 16, 16, 2), 0, 34304), ("fwd", "bf16", (32, 16, 16, 2), 404, 35840),
    ("fwd", "bf16", (32, 32, 16, 3), 464, 75776),
    ("fwd", "fp32", (16, 16, 4, 1), 524, 66560), ("fwd", "fp32", (16, 32, 4, 2), 160, 135168),
    ("fwd", "fp32", (16, 32, 8, 3), 0, 268288), ("fwd", "fp32", (16, 64, 8, 2), 168, 270336),
    ("fwd", "fp32", (32, 32, 8, 2), 296, 139264), ("fwd", "fp32", (16, 16, 8, 1), 0, 66560),
    ("fwd", "fp32", (16, 16, 8, 2), 0, 67584),
    ("bwd", "bf16", (16, 16, 8, 1), 0, 65536), ("bwd", "bf16", (16, 16, 8, 2), 0, 65536),
    ("bwd", "bf16", (16, 32, 8, 3), 1184, 98304), ("bwd", "bf16", (16, 16, 16, 2), 76, 65536),
    ("bwd", "bf16", (32, 16, 16, 2), 1072, 98304), ("bwd", "bf16", (32, 32, 16, 3), 1384, 131072),
    ("bwd", "fp32", (16, 16, 8, 1), 0, 131072), ("bwd", "fp32", (16, 16, 8, 2), 0, 131072),
    ("bwd", "fp32", (16, 32, 8, 2), 132, 196608),
    ("bwd_w", "bf16", (16, 16, 8, 1), 0, 33280),
]


def _config(blocks):
    return dict(zip(("BLOCK_M", "BLOCK_K", "num_warps", "num_stages"), blocks))


def _args(dtype):
    return {"BLOCK_W": WIDTH_768, "w_ptr": torch.empty(0, dtype={"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])}


@pytest.mark.parametrize("kernel, dtype, blocks, spill_bytes, shared", COMPILED_SM90)
def test_config_estimate_agrees_with_the_compiler(kernel, dtype, blocks, spill_bytes, shared):
    """The pruning estimate keeps a config exactly when the compiler neither spilled nor overflowed sm_90's shared
    memory with it, except for configs it prunes to be safe (none of which is shipped)."""
    launcher = patch_embed_module._fwd if kernel == "fwd" else patch_embed_module._bwd
    config = _config(blocks)
    est_shared, est_registers = launcher.estimate(config, _args(dtype))
    kept = launch.fits(est_shared, est_registers, config["num_warps"], SM90_SHARED)
    fine = spill_bytes == 0 and shared <= SM90_SHARED
    if kept:
        assert fine, f"kept a config that spilled {spill_bytes} bytes or needs {shared} bytes of shared memory"
    elif fine:
        assert (kernel, dtype, blocks) == ("fwd", "fp32", (16, 32, 8, 2)) or config not in launcher.configs
    assert est_shared >= shared - 4096  # shared memory is not underestimated


@pytest.mark.skipif(not launch.INTERPRET, reason="on a GPU the other tests compile the kernels for real")
def test_shipped_configs_neither_spill_nor_overflow_on_sm90():
    """Every shipped config that the estimate keeps at width 768 in bf16, compiled for sm_90 by Triton's compiler:
    ptxas reports no spill and it fits sm_90's shared memory; the reward's and the training backward both."""
    dtype = "bf16"
    params = dict(w_ptr=dtype, cls_ptr=dtype, pos_ptr=dtype, lnw_ptr=dtype)
    base = dict(P=8, BLOCK_W=WIDTH_768, PRECISION="tf32", UPCAST=False)
    fwd = patch_embed_module._fwd.fitting(_args(dtype), SM90_SHARED)
    bwd = patch_embed_module._bwd.fitting(_args(dtype), SM90_SHARED)
    assert fwd == patch_embed_module._FWD_CONFIGS and bwd == patch_embed_module._BWD_CONFIGS[:2]
    cases = []
    for c in fwd:
        blocks = dict(base, BLOCK_M=c["BLOCK_M"], BLOCK_K=c["BLOCK_K"])
        options = dict(num_warps=c["num_warps"], num_stages=c["num_stages"])
        cases.append(("_patch_embed_fwd_kernel", dict(params, x_ptr="fp32", lnb_ptr=dtype, out_ptr=dtype),
                      ("scale", "eps"), blocks, options))
    for c in bwd:
        blocks = dict(base, BLOCK_M=c["BLOCK_M"], BLOCK_K=c["BLOCK_K"])
        options = dict(num_warps=c["num_warps"], num_stages=c["num_stages"])
        for latent, weight in ((True, False), (False, True)):
            cases.append(("_patch_embed_bwd_kernel", dict(params, x_ptr="fp32", dout_ptr=dtype, dx_ptr="fp32",
                                                          **WGRAD_PTRS),
                          ("scale", "eps"), dict(blocks, LATENT_GRAD=latent, WEIGHT_GRAD=weight), options))
    reports = compile_report_for_gpu("fastlclip.kernels.fused_patch_embed", cases, arch=90)
    for case, report in zip(cases, reports):
        assert report["spill_stores"] == 0 and report["shared"] <= SM90_SHARED, (case[0], case[3], case[4], report)


@pytest.mark.skipif(not launch.INTERPRET, reason="on a GPU the other tests compile the kernels for real")
def test_shared_memory_per_architecture():
    """What the first (smallest) launch config needs at width 768 (every shipped image tower), by Triton's
    compiler for sm_86 (99 KiB per block: A10, L4, RTX 4090, L40S; sm_80 has 163 KiB, sm_90 227 KiB): the
    forward and the bf16 backward fit every one; the fp32 backward fits sm_80 and sm_90 only, so on sm_86/89 the
    estimate prunes every backward config and it takes the unfused fallback
    (test_backward_falls_back_where_no_config_fits)."""
    limits = {80: 163 * 1024, 86: SM86_SHARED, 90: SM90_SHARED}
    fwd_first, bwd_first = patch_embed_module._FWD_CONFIGS[0], patch_embed_module._BWD_CONFIGS[0]
    assert bwd_first == min(patch_embed_module._BWD_CONFIGS, key=lambda c: (c["BLOCK_M"] + c["BLOCK_K"] * c["num_stages"]))
    cases = []
    for dtype in ("fp32", "bf16"):
        params = dict(x_ptr="fp32", w_ptr=dtype, cls_ptr=dtype, pos_ptr=dtype, lnw_ptr=dtype)
        for name, first, ptrs, extra in (
                ("_patch_embed_fwd_kernel", fwd_first, dict(lnb_ptr=dtype, out_ptr=dtype), {}),
                ("_patch_embed_bwd_kernel", bwd_first, dict(dout_ptr=dtype, dx_ptr="fp32", **WGRAD_PTRS),
                 dict(LATENT_GRAD=True, WEIGHT_GRAD=False))):
            blocks = dict(P=8, BLOCK_M=first["BLOCK_M"], BLOCK_K=first["BLOCK_K"], BLOCK_W=WIDTH_768,
                          PRECISION="ieee" if dtype == "fp32" else "tf32", UPCAST=False, **extra)
            options = dict(num_warps=first["num_warps"], num_stages=first["num_stages"])
            cases.append((name, dict(params, **ptrs), ("scale", "eps"), blocks, options))
    fwd32, bwd32, fwd16, bwd16 = compile_kernels_for_gpu("fastlclip.kernels.fused_patch_embed", cases, arch=86)
    assert max(fwd32, fwd16, bwd16) <= limits[86]
    assert limits[86] < bwd32 <= limits[80] <= limits[90]
    assert patch_embed_module._bwd.fitting(_args("fp32"), limits[86]) == []
    assert patch_embed_module._bwd.fitting(_args("bf16"), limits[86]) != []
    assert patch_embed_module._fwd.fitting(_args("fp32"), limits[86]) != []


def test_backward_falls_back_where_no_config_fits(monkeypatch):
    calls = []

    def no_fit(*args, **kwargs):
        calls.append(1)
        raise launch.NoConfigFits("no launch config of _patch_embed_bwd_kernel fits Fake GPU: out of resources")

    monkeypatch.setattr(patch_embed_module, "_bwd", no_fit)
    monkeypatch.setattr(patch_embed_module, "_UNFUSED_BACKWARD", set())
    latents, params = make_inputs(2, 4, 16, 24, 8, 32, seed=4)
    latents, params = latents.float().requires_grad_(True), [p.float() for p in params]
    grad_out = torch.randn(2, 1 + 2 * 3, 32, dtype=torch.float64)
    want = torch.autograd.grad(reference(latents, *params, scale=0.5), latents, grad_out)[0]
    with pytest.warns(RuntimeWarning, match="gradients for width 32 in torch.float32 run unfused"):
        (got,) = torch.autograd.grad(patch_embed(latents, *params, scale=0.5), latents, grad_out.float())
    assert (got.double() - want).abs().max() < 1e-4 * max(1.0, want.abs().max().item())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.autograd.grad(patch_embed(latents, *params, scale=0.5), latents, grad_out.float())
    assert len(calls) == 1  # remembered: the kernel is not tried again on this device, width and dtype


@pytest.mark.skipif(launch.INTERPRET, reason="width 768 is slow under the interpreter; the CPU tests cover the fallback")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_width_768_backward_runs_on_this_gpu(dtype):
    """Every shipped tower's width and dtype: fused where a config fits this GPU, else unfused with a warning."""
    latents, params = make_inputs(2, 4, 64, 64, 8, 768, seed=5)
    latents = latents.to(DEVICE, torch.float32).requires_grad_(True)
    params = [p.to(DEVICE, dtype) for p in params]
    grad_out = torch.randn(2, 65, 768, device=DEVICE, dtype=torch.float64)
    want = torch.autograd.grad(reference(latents, *params), latents, grad_out)[0]
    (got,) = torch.autograd.grad(patch_embed(latents, *params), latents, grad_out.to(dtype))
    assert (got.double() - want).abs().max() < 50 * TOL[dtype] * max(1.0, want.abs().max().item())
