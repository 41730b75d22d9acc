"""Fused Latent-CLIP patch embedding.

One kernel computes ``ln_pre(cat(class_embedding, conv1(latents * scale)) + positional_embedding)``
for a bias-free ``conv1`` with stride = kernel = P, reading the latents in any stride layout. The
backward recomputes the pre-norm activations and fuses LayerNorm backward, the transposed patch
projection and un-patchify into one kernel that writes the latent gradient.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from . import launch
from .launch import Launcher, dot, tl, triton

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_WIDTH = 2048  # one program holds a (BLOCK_M, next_pow2(width)) fp32 tile in registers

# Launch configs, kept by compiling candidates with Triton 3.8's compiler for sm_90 at width 768 (every shipped
# image tower) and reading ptxas's report: in bf16 every forward config and the first two backward ones (the
# reward's latent gradient and the training weight gradients) neither spill registers nor exceed sm_90's shared
# memory (tests/test_kernel_patch_embed.py compiles them again; its COMPILED_SM90 table has the fp32 figures).
# Candidates that spilled (BLOCK_M=32 or BLOCK_K=64 at 8 warps, any 4-warp config: a (BLOCK_M, 1024) fp32 tile is
# 128 registers a thread at 4 warps) are gone. On every GPU, ``_estimate`` prunes the configs that would not fit
# (at width 768: the third backward config, and in fp32 the forward's BLOCK_K=32 ones) before anything is compiled.
_FWD_CONFIGS = [
    dict(BLOCK_M=16, BLOCK_K=16, num_warps=8, num_stages=1),
    dict(BLOCK_M=16, BLOCK_K=16, num_warps=8, num_stages=2),
    dict(BLOCK_M=16, BLOCK_K=32, num_warps=8, num_stages=2),
    dict(BLOCK_M=16, BLOCK_K=32, num_warps=8, num_stages=3),
    dict(BLOCK_M=16, BLOCK_K=16, num_warps=16, num_stages=2),
]
# The backward holds about twice the forward's fp32 tiles (normalized tokens and their gradient).
_BWD_CONFIGS = [
    dict(BLOCK_M=16, BLOCK_K=16, num_warps=8, num_stages=1),
    dict(BLOCK_M=16, BLOCK_K=16, num_warps=8, num_stages=2),
    dict(BLOCK_M=16, BLOCK_K=32, num_warps=8, num_stages=2),  # narrower towers only: pruned at width 768
]
_INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_K=32)


@triton.jit
def _normalized_tokens(
    x_ptr, w_ptr, cls_ptr, pos_ptr, t, x_row, is_patch, cols, col_ok, scale, eps, K, WIDTH,
    stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wi, stride_wj,
    stride_cls, stride_pos_t, stride_pos_w,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """LayerNorm-normalized tokens ``xhat`` (fp32, zero outside ``col_ok``) and their ``rstd``.

    The pre-norm token is ``patch @ W^T + pos`` (``class_embedding + pos`` for ``t == 0``).
    """
    acc = tl.zeros((BLOCK_M, BLOCK_W), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        c = k // (P * P)
        i = (k // P) % P
        j = k % P
        x_col = c.to(tl.int64) * stride_xc + i.to(tl.int64) * stride_xh + j.to(tl.int64) * stride_xw
        x = tl.load(x_ptr + x_row[:, None] + x_col[None, :], mask=is_patch[:, None] & k_ok[None, :], other=0.0)
        x = (x.to(tl.float32) * scale).to(w_ptr.dtype.element_ty)
        w_col = c * stride_wc + i * stride_wi + j * stride_wj
        w = tl.load(w_ptr + w_col[:, None] + cols[None, :] * stride_wo,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = dot(x, w, acc, PRECISION, UPCAST)
    cls = tl.load(cls_ptr + cols * stride_cls, mask=col_ok, other=0.0).to(tl.float32)
    acc = tl.where((t == 0)[:, None], cls[None, :], acc)
    pos = tl.load(pos_ptr + t[:, None] * stride_pos_t + cols[None, :] * stride_pos_w,
                  mask=col_ok[None, :], other=0.0)
    y = acc + pos.to(tl.float32)
    mean = tl.sum(y, axis=1) / WIDTH
    yc = tl.where(col_ok[None, :], y - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(yc * yc, axis=1) / WIDTH + eps)
    return yc * rstd[:, None], rstd


@triton.jit
def _patch_embed_fwd_kernel(
    x_ptr, w_ptr, cls_ptr, pos_ptr, lnw_ptr, lnb_ptr, out_ptr,
    scale, eps, n_rows, n_tokens, grid_w, K, WIDTH,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_wo, stride_wc, stride_wi, stride_wj,
    stride_cls, stride_pos_t, stride_pos_w, stride_lnw, stride_lnb,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0)
    cols = tl.arange(0, BLOCK_W)
    col_ok = cols < WIDTH
    b = rows // n_tokens
    t = rows % n_tokens
    p = tl.maximum(t - 1, 0)
    x_row = (b.to(tl.int64) * stride_xb + (p // grid_w * P).to(tl.int64) * stride_xh
             + (p % grid_w * P).to(tl.int64) * stride_xw)
    xhat, rstd = _normalized_tokens(
        x_ptr, w_ptr, cls_ptr, pos_ptr, t, x_row, row_ok & (t > 0), cols, col_ok, scale, eps, K, WIDTH,
        stride_xc, stride_xh, stride_xw, stride_wo, stride_wc, stride_wi, stride_wj,
        stride_cls, stride_pos_t, stride_pos_w, P, BLOCK_M, BLOCK_K, BLOCK_W, PRECISION, UPCAST)
    lnw = tl.load(lnw_ptr + cols * stride_lnw, mask=col_ok, other=0.0).to(tl.float32)
    lnb = tl.load(lnb_ptr + cols * stride_lnb, mask=col_ok, other=0.0).to(tl.float32)
    out = xhat * lnw[None, :] + lnb[None, :]
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * WIDTH + cols[None, :], out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _patch_embed_bwd_kernel(
    x_ptr, w_ptr, cls_ptr, pos_ptr, lnw_ptr, dout_ptr, dx_ptr, dy_ptr, dlnw_ptr, dlnb_ptr,
    scale, eps, n_rows, n_tokens, grid_w, K, WIDTH,
    stride_xb, stride_xc, stride_xh, stride_xw,
    stride_dxb, stride_dxc, stride_dxh, stride_dxw,
    stride_wo, stride_wc, stride_wi, stride_wj,
    stride_cls, stride_pos_t, stride_pos_w, stride_lnw,
    stride_dob, stride_dot, stride_dow,
    P: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_W: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, LATENT_GRAD: tl.constexpr, WEIGHT_GRAD: tl.constexpr,
):
    # Rows enumerate every token (b, t); the class token (t == 0) has no latent gradient.
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = tl.where(row_ok, rows, 0)
    cols = tl.arange(0, BLOCK_W)
    col_ok = cols < WIDTH
    b = rows // n_tokens
    t = rows % n_tokens
    is_patch = row_ok & (t > 0)
    p = tl.maximum(t - 1, 0)
    gh = p // grid_w * P
    gw = p % grid_w * P
    x_row = b.to(tl.int64) * stride_xb + gh.to(tl.int64) * stride_xh + gw.to(tl.int64) * stride_xw
    xhat, rstd = _normalized_tokens(
        x_ptr, w_ptr, cls_ptr, pos_ptr, t, x_row, is_patch, cols, col_ok, scale, eps, K, WIDTH,
        stride_xc, stride_xh, stride_xw, stride_wo, stride_wc, stride_wi, stride_wj,
        stride_cls, stride_pos_t, stride_pos_w, P, BLOCK_M, BLOCK_K, BLOCK_W, PRECISION, UPCAST)
    # LayerNorm backward: dy = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dout * ln_weight.
    lnw = tl.load(lnw_ptr + cols * stride_lnw, mask=col_ok, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + b.to(tl.int64)[:, None] * stride_dob + t[:, None] * stride_dot
                   + cols[None, :] * stride_dow, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    if WEIGHT_GRAD:  # this block's share of the LayerNorm weight and bias gradients: one row of partial sums each
        tl.store(dlnw_ptr + tl.program_id(0) * WIDTH + cols, tl.sum(dout * xhat, axis=0), mask=col_ok)
        tl.store(dlnb_ptr + tl.program_id(0) * WIDTH + cols, tl.sum(dout, axis=0), mask=col_ok)
    g = dout * lnw[None, :]
    mean_g = tl.sum(g, axis=1) / WIDTH
    mean_gx = tl.sum(g * xhat, axis=1) / WIDTH
    dy = tl.where(col_ok[None, :], (g - mean_g[:, None] - xhat * mean_gx[:, None]) * rstd[:, None], 0.0)
    if WEIGHT_GRAD:  # dy (fp32, one row per token) feeds the conv, class and positional gradients
        tl.store(dy_ptr + rows.to(tl.int64)[:, None] * WIDTH + cols[None, :], dy,
                 mask=row_ok[:, None] & col_ok[None, :])
    if LATENT_GRAD:
        # d patch = dy @ W, scattered back to the latent pixels, times scale.
        dy = dy.to(w_ptr.dtype.element_ty)
        dx_row = b.to(tl.int64) * stride_dxb + gh.to(tl.int64) * stride_dxh + gw.to(tl.int64) * stride_dxw
        for k0 in range(0, K, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            c = k // (P * P)
            i = (k // P) % P
            j = k % P
            w = tl.load(w_ptr + cols[:, None] * stride_wo + (c * stride_wc + i * stride_wi + j * stride_wj)[None, :],
                        mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            dx = dot(dy, w, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), PRECISION, UPCAST) * scale
            dx_col = c.to(tl.int64) * stride_dxc + i.to(tl.int64) * stride_dxh + j.to(tl.int64) * stride_dxw
            tl.store(dx_ptr + dx_row[:, None] + dx_col[None, :], dx.to(dx_ptr.dtype.element_ty),
                     mask=is_patch[:, None] & k_ok[None, :])


def _estimate(backward: bool):
    """``(shared bytes, registers per thread)`` a config needs, estimated from its tiles (see ``launch.fits``).

    Registers: 64 for addresses and scalars, plus the fp32 (BLOCK_M, BLOCK_W) tiles a thread holds (one in the
    forward, two in the backward) and its share of the (BLOCK_K, BLOCK_W) weight tile, counted at 2 bytes an
    element in every dtype (fp32 ``ieee`` products stream it). Shared memory: the weight tile (pipelined over
    ``num_stages - 1`` buffers in fp32), the backward's (BLOCK_M, BLOCK_W) gradient operand, the latent tiles
    and 4 KiB of scratch. Calibrated on the compiled sizes at width 768 (tests/test_kernel_patch_embed.py): no
    config estimated to fit spilled or overflowed, every one estimated not to did.
    """
    def estimate(config: dict, args: dict) -> tuple[int, int]:
        bm, bk, bw = config["BLOCK_M"], config["BLOCK_K"], args["BLOCK_W"]
        stages, threads = config.get("num_stages", 2), 32 * config.get("num_warps", 4)
        elt = launch.element_size(args["w_ptr"])
        registers = 64 + ((2 if backward else 1) * bm * bw * 4 + bk * bw * 2) // (4 * threads)
        weight_buffers = max(1, stages - 1) if elt == 4 else 1
        shared = bk * bw * elt * weight_buffers + (bm * bw * elt if backward else 0) + bm * bk * elt * stages + 4096
        return shared, registers
    return estimate


# The forward has no unfused fallback: past width 1024 (nothing estimated to fit) it keeps its smallest config.
_fwd = Launcher(_patch_embed_fwd_kernel, _FWD_CONFIGS, ["K", "WIDTH"], _INTERPRETER_CONFIG, _estimate(False),
                keep_smallest=True)
_bwd = Launcher(_patch_embed_bwd_kernel, _BWD_CONFIGS, ["K", "WIDTH"], _INTERPRETER_CONFIG, _estimate(True))


def _check_inputs(latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias) -> None:
    if latents.ndim != 4:
        raise ValueError(f"latents must be (B, C, H, W), got shape {tuple(latents.shape)}")
    if conv_weight.ndim != 4 or conv_weight.shape[2] != conv_weight.shape[3]:
        raise ValueError(f"conv_weight must be (width, C, P, P), got shape {tuple(conv_weight.shape)}")
    width, channels, patch, _ = conv_weight.shape
    _, c, h, w = latents.shape
    if c != channels:
        raise ValueError(f"latents have {c} channels but conv_weight expects {channels}: "
                         "pass latents of the model's VAE (SDXL: 4 channels)")
    if h < patch or w < patch:
        raise ValueError(f"latents of {h}x{w} are smaller than the {patch}x{patch} patch")
    n_tokens = 1 + (h // patch) * (w // patch)
    expected = {"class_embedding": (width,), "pos_embedding": (n_tokens, width),
                "ln_weight": (width,), "ln_bias": (width,)}
    given = {"class_embedding": class_embedding, "pos_embedding": pos_embedding,
             "ln_weight": ln_weight, "ln_bias": ln_bias}
    for name, tensor in given.items():
        if tuple(tensor.shape) != expected[name]:
            hint = (f" (a {h // patch}x{w // patch} patch grid plus the class token: resize the latents to "
                    "the model's input size or interpolate the positional embedding)"
                    if name == "pos_embedding" else "")
            raise ValueError(f"{name} must have shape {expected[name]}, got {tuple(tensor.shape)}{hint}")
    for name, tensor in {"latents": latents, "conv_weight": conv_weight, **given}.items():
        if not tensor.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
        if tensor.device != latents.device:
            raise ValueError(f"{name} is on {tensor.device} but latents are on {latents.device}: "
                             "move the inputs to one device")


def patch_embed_torch(latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias, *,
                      scale=1.0, eps=1e-5):
    """Unfused PyTorch reference of :func:`patch_embed` (conv2d, cat, add, layer_norm)."""
    _check_inputs(latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias)
    dtype = conv_weight.dtype
    x = latents * scale if scale != 1.0 else latents
    x = F.conv2d(x.to(dtype), conv_weight, stride=conv_weight.shape[-1])
    x = x.flatten(2).transpose(1, 2)
    cls = class_embedding.to(dtype).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + pos_embedding.to(dtype)
    return F.layer_norm(x, (x.shape[-1],), ln_weight.to(dtype), ln_bias.to(dtype), eps)


def patch_embed(latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias, *,
                scale=1.0, eps=1e-5):
    """Latent-CLIP patch embedding, fused: ``ln_pre(cat(cls, conv1(latents * scale)) + pos)``.

    Args:
        latents: (B, C, H, W), fp32/fp16/bf16 read as they are (other float dtypes are cast to
            conv_weight's first), any strides (channels_last, sliced, ...).
        conv_weight: (width, C, P, P) bias-free patchify conv (stride = kernel = P); sets the
            output dtype (fp32/fp16/bf16). Rows/columns of pixels past a multiple of P are
            ignored, as ``conv2d`` does.
        class_embedding: (width,). pos_embedding: (1 + (H//P)*(W//P), width).
        ln_weight, ln_bias: (width,) of ``ln_pre``.
        scale: multiplies the latents first (e.g. ``1 / 0.13025`` for diffusion-space latents).
        eps: LayerNorm epsilon.

    Returns:
        (B, 1 + N, width) tokens in conv_weight's dtype, fp32 accumulation. Differentiable in every
        input: one fused backward kernel gives the latent gradient and, for weights that require grad
        (training), the pre-norm token gradient their gradients are reduced from. Without usable Triton (see
        :func:`~fastlclip.kernels.launch.kernels_available`) it warns once and runs :func:`patch_embed_torch`.
    """
    _check_inputs(latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias)
    if not launch.kernels_available(latents.device):
        launch.warn_fallback("patch_embed", latents.device)
        return patch_embed_torch(latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias,
                                 scale=scale, eps=eps)
    if conv_weight.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"conv_weight must be float32, float16 or bfloat16 for the Triton kernel, got "
                        f"{conv_weight.dtype}: cast it, or call patch_embed_torch")
    if latents.dtype not in _KERNEL_DTYPES:  # e.g. float64: cast as patch_embed_torch does (differentiable)
        latents = latents.to(conv_weight.dtype)
    if conv_weight.shape[0] > MAX_WIDTH:
        raise ValueError(f"width {conv_weight.shape[0]} exceeds the fused kernel's limit of {MAX_WIDTH}: "
                         "call patch_embed_torch")
    return _PatchEmbed.apply(latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias,
                             float(scale), float(eps))


class _PatchEmbed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias, scale, eps):
        ctx.save_for_backward(latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias)
        ctx.scale, ctx.eps = scale, eps
        return _forward(latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias, scale, eps)

    @staticmethod
    def backward(ctx, grad_out):
        grads = _backward(*ctx.saved_tensors, grad_out, ctx.scale, ctx.eps, ctx.needs_input_grad[:6])
        return *grads, None, None


def _meta(latents, conv_weight):
    batch, _, h, w = latents.shape
    width, channels, patch, _ = conv_weight.shape
    return dict(batch=batch, width=width, patch=patch, grid_w=w // patch,
                n_tokens=1 + (h // patch) * (w // patch), K=channels * patch * patch)


def _forward(latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias, scale, eps):
    m = _meta(latents, conv_weight)
    out = launch.empty((m["batch"], m["n_tokens"], m["width"]), conv_weight.dtype, latents.device)
    n_rows = m["batch"] * m["n_tokens"]
    _fwd(lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),), latents.device,
         latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias, out,
         scale, eps, n_rows, m["n_tokens"], m["grid_w"], m["K"], m["width"],
         *latents.stride(), *conv_weight.stride(), class_embedding.stride(0), *pos_embedding.stride(),
         ln_weight.stride(0), ln_bias.stride(0),
         P=m["patch"], BLOCK_W=max(16, triton.next_power_of_2(m["width"])), size_hint=n_rows,
         **launch.dot_args(conv_weight.dtype))
    return out


# (device, width, dtype) where no backward config fits: the gradients run unfused there.
_UNFUSED_BACKWARD: set[tuple] = set()


def _backward(latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias, grad_out, scale, eps, needs):
    """Gradients of ``(latents, *params)`` where ``needs`` (None elsewhere), from the fused kernel or, where no
    launch config fits the GPU, from autograd through :func:`patch_embed_torch` (warned once per GPU, width and
    dtype)."""
    inputs = (latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias)
    where = (latents.device, conv_weight.shape[0], conv_weight.dtype)
    if where not in _UNFUSED_BACKWARD:
        try:
            return _fused_backward(*inputs, grad_out, scale, eps, needs)
        except launch.NoConfigFits as e:
            _UNFUSED_BACKWARD.add(where)
            warnings.warn(f"fastlclip.kernels.patch_embed: {e}; the gradients for width {where[1]} in "
                          f"{where[2]} run unfused (PyTorch) on this GPU", RuntimeWarning, stacklevel=4)
    grads = iter(_torch_grads(inputs, needs, grad_out, scale, eps))
    return [next(grads).to(t.dtype) if need else None for t, need in zip(inputs, needs)]


def _fused_backward(latents, conv_weight, class_embedding, pos_embedding, ln_weight, ln_bias, grad_out, scale, eps,
                    needs):
    """One kernel recomputes the normalized tokens and writes the latent gradient and, when a weight needs one,
    the pre-norm token gradient ``dy`` (fp32) and per-block LayerNorm partial sums; the conv, class and positional
    gradients are reductions of ``dy`` (one small GEMM for the conv)."""
    m = _meta(latents, conv_weight)
    batch, width, patch, n_tokens = m["batch"], m["width"], m["patch"], m["n_tokens"]
    _, _, h, w = latents.shape
    latent_grad, weight_grad = needs[0], any(needs[1:])
    d_latents = None
    if latent_grad:
        if h % patch or w % patch:
            d_latents = torch.zeros_like(latents)  # pixels past the last whole patch get no gradient
        else:
            d_latents = launch.empty_like(latents)
    n_rows = batch * n_tokens
    dy = d_lnw = d_lnb = latents.new_empty(0, dtype=torch.float32)  # placeholders, unused without WEIGHT_GRAD
    if weight_grad:
        dy = launch.empty((n_rows, width), torch.float32, latents.device)
        # One row of LayerNorm partial sums per program: room for the most programs any config launches.
        most = triton.cdiv(n_rows, min(c["BLOCK_M"] for c in (*_bwd.configs, _bwd.interpreter_config)))
        d_lnw, d_lnb = (launch.empty((most, width), torch.float32, latents.device) for _ in range(2))
    dx = d_latents if d_latents is not None else latents
    used = _bwd(lambda meta: (triton.cdiv(n_rows, meta["BLOCK_M"]),), latents.device,
         latents, conv_weight, class_embedding, pos_embedding, ln_weight, grad_out, dx, dy, d_lnw, d_lnb,
         scale, eps, n_rows, n_tokens, m["grid_w"], m["K"], width,
         *latents.stride(), *dx.stride(), *conv_weight.stride(), class_embedding.stride(0),
         *pos_embedding.stride(), ln_weight.stride(0), *grad_out.stride(),
         P=patch, BLOCK_W=max(16, triton.next_power_of_2(width)), size_hint=n_rows,
         LATENT_GRAD=bool(latent_grad), WEIGHT_GRAD=weight_grad, **launch.dot_args(conv_weight.dtype))
    grads = [d_latents, None, None, None, None, None]
    if weight_grad:
        dy = dy.view(batch, n_tokens, width)
        if needs[1]:
            gh, gw = h // patch, w // patch
            x = latents[:, :, :gh * patch, :gw * patch].float() * scale
            patches = x.reshape(batch, -1, gh, patch, gw, patch).permute(0, 2, 4, 1, 3, 5).reshape(-1, m["K"])
            grads[1] = (dy[:, 1:].reshape(-1, width).T @ patches).view(conv_weight.shape).to(conv_weight.dtype)
        if needs[2]:
            grads[2] = dy[:, 0].sum(0).to(class_embedding.dtype)
        if needs[3]:
            grads[3] = dy.sum(0).to(pos_embedding.dtype)
        n_programs = triton.cdiv(n_rows, used["BLOCK_M"])  # rows past these hold no partial sums of this launch
        if needs[4]:
            grads[4] = d_lnw[:n_programs].sum(0).to(ln_weight.dtype)
        if needs[5]:
            grads[5] = d_lnb[:n_programs].sum(0).to(ln_bias.dtype)
    return grads


def _torch_grads(inputs, needs_grad, grad_out, scale, eps):
    """Gradients of ``(latents, *params)`` where ``needs_grad``, by autograd through :func:`patch_embed_torch`
    (where no kernel config fits the GPU)."""
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(need) for t, need in zip(inputs, needs_grad)]
        out = patch_embed_torch(*leaves, scale=scale, eps=eps)
        grads = iter(torch.autograd.grad(out, [t for t in leaves if t.requires_grad], grad_out))
    return [next(grads) for need in needs_grad if need]
