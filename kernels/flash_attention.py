"""FlashAttention-2 style attention on strided q/k/v, forward and backward.

q, k, v are (B, H, L, D) with any strides, typically views of a packed ``in_proj`` output, so no
copy is made. The forward writes (B, L, H, D) contiguous output plus the per-row logsumexp; the
backward runs a delta = rowsum(dO * O) preprocess, a dK/dV kernel and a dQ kernel. Any length L
(tiles are masked), causal or not; head dims 16, 32, 64, 128; fp16, bf16 or fp32 (fp32 accumulation).
"""

from __future__ import annotations

import math

import torch

from . import launch
from .launch import Launcher, dot, tl, triton

HEAD_DIMS = (16, 32, 64, 128)
_LOG2E = math.log2(math.e)
_KEY = ["L", "HEAD_DIM", "CAUSAL"]

_FWD_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
]
_BWD_DKDV_CONFIGS = [
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
    dict(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2),
]
_BWD_DQ_CONFIGS = [
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=3),
    dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
    dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=3),
]
_PREPROCESS_CONFIGS = [dict(BLOCK_M=64, num_warps=4, num_stages=1)]


@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
    qk_scale, L, H,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_ob, stride_oh, stride_ol, stride_od,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < L
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    q = tl.load(q_ptr + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd, mask=m_ok[:, None], other=0.0)

    # Online softmax in base 2: qk_scale = sm_scale * log2(e). Column 0 is valid for every row,
    # so the running max is finite after the first tile.
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum((tl.program_id(1) + 1) * BLOCK_M, L)
    else:
        hi = L
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < L
        kt = tl.load(k_ptr + offs_d[:, None] * stride_kd + cols[None, :] * stride_kl, mask=n_ok[None, :], other=0.0)
        s = dot(q, kt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION, UPCAST) * qk_scale
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + cols[:, None] * stride_vl + offs_d[None, :] * stride_vd, mask=n_ok[:, None], other=0.0)
        acc = dot(p.to(v.dtype), v, acc * alpha[:, None], PRECISION, UPCAST)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptr += b * stride_ob + h * stride_oh
    tl.store(o_ptr + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od, acc.to(o_ptr.dtype.element_ty),
             mask=m_ok[:, None])
    tl.store(lse_ptr + bh.to(tl.int64) * L + offs_m, m_i + tl.log2(l_i), mask=m_ok)


@triton.jit
def _attn_bwd_preprocess_kernel(
    o_ptr, do_ptr, delta_ptr, L, H,
    stride_ob, stride_oh, stride_ol, stride_od,
    stride_dob, stride_doh, stride_dol, stride_dod,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """delta = rowsum(dO * O), one fp32 per query row."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < L
    o = tl.load(o_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od,
                mask=m_ok[:, None], other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol
                 + offs_d[None, :] * stride_dod, mask=m_ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(delta_ptr + bh.to(tl.int64) * L + offs_m, delta, mask=m_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
    sm_scale, qk_scale, L, H,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dkb, stride_dkh, stride_dkl, stride_dkd,
    stride_dvb, stride_dvh, stride_dvl, stride_dvd,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One BLOCK_N tile of keys/values; loops over query tiles (transposed: rows are keys)."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start_n = tl.program_id(1) * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    n_ok = offs_n < L
    q_ptr += b * stride_qb + h * stride_qh
    do_ptr += b * stride_dob + h * stride_doh
    lse_ptr += bh.to(tl.int64) * L
    delta_ptr += bh.to(tl.int64) * L
    k = tl.load(k_ptr + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kl + offs_d[None, :] * stride_kd,
                mask=n_ok[:, None], other=0.0)
    v = tl.load(v_ptr + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd,
                mask=n_ok[:, None], other=0.0)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), dtype=tl.float32)
    if CAUSAL:
        lo = start_n // BLOCK_M * BLOCK_M  # earlier query tiles see none of these keys
    else:
        lo = 0
    for start_m in range(lo, L, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < L
        qt = tl.load(q_ptr + offs_d[:, None] * stride_qd + offs_m[None, :] * stride_ql, mask=m_ok[None, :], other=0.0)
        lse = tl.load(lse_ptr + offs_m, mask=m_ok, other=0.0)
        pt = tl.exp2(dot(k, qt, tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), PRECISION, UPCAST) * qk_scale
                     - lse[None, :])
        valid = m_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[:, None] <= offs_m[None, :])
        pt = tl.where(valid, pt, 0.0)
        do = tl.load(do_ptr + offs_m[:, None] * stride_dol + offs_d[None, :] * stride_dod, mask=m_ok[:, None],
                     other=0.0)
        dv = dot(pt.to(do.dtype), do, dv, PRECISION, UPCAST)
        delta = tl.load(delta_ptr + offs_m, mask=m_ok, other=0.0)
        dpt = dot(v, tl.trans(do), tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32), PRECISION, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk = dot(dst.to(qt.dtype), tl.trans(qt), dk, PRECISION, UPCAST)

    dk_ptrs = dk_ptr + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkl + offs_d[None, :] * stride_dkd
    dv_ptrs = dv_ptr + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvl + offs_d[None, :] * stride_dvd
    tl.store(dk_ptrs, (dk * sm_scale).to(dk_ptr.dtype.element_ty), mask=n_ok[:, None])
    tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=n_ok[:, None])


@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
    sm_scale, qk_scale, L, H,
    stride_qb, stride_qh, stride_ql, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_vb, stride_vh, stride_vl, stride_vd,
    stride_dob, stride_doh, stride_dol, stride_dod,
    stride_dqb, stride_dqh, stride_dql, stride_dqd,
    HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    """One BLOCK_M tile of queries; loops over key/value tiles."""
    bh = tl.program_id(0)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    m_ok = offs_m < L
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + offs_d[None, :] * stride_qd,
                mask=m_ok[:, None], other=0.0)
    do = tl.load(do_ptr + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dol
                 + offs_d[None, :] * stride_dod, mask=m_ok[:, None], other=0.0)
    lse = tl.load(lse_ptr + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(delta_ptr + bh.to(tl.int64) * L + offs_m, mask=m_ok, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    if CAUSAL:
        hi = tl.minimum((tl.program_id(1) + 1) * BLOCK_M, L)
    else:
        hi = L
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < L
        kt = tl.load(k_ptr + offs_d[:, None] * stride_kd + cols[None, :] * stride_kl, mask=n_ok[None, :], other=0.0)
        vt = tl.load(v_ptr + offs_d[:, None] * stride_vd + cols[None, :] * stride_vl, mask=n_ok[None, :], other=0.0)
        p = tl.exp2(dot(q, kt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION, UPCAST) * qk_scale
                    - lse[:, None])
        valid = n_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= offs_m[:, None])
        p = tl.where(valid, p, 0.0)
        dp = dot(do, vt, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), PRECISION, UPCAST)
        ds = p * (dp - delta[:, None])
        dq = dot(ds.to(kt.dtype), tl.trans(kt), dq, PRECISION, UPCAST)

    dq_ptrs = dq_ptr + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dql + offs_d[None, :] * stride_dqd
    tl.store(dq_ptrs, (dq * sm_scale).to(dq_ptr.dtype.element_ty), mask=m_ok[:, None])


def _estimate(kernel: str):
    """``(shared bytes, registers per thread)`` a config of ``kernel`` needs, estimated from its tiles, so configs
    that cannot load (fp32 at head dim 128 needs about 230 KiB for the largest backward tiles, compiled for sm_90)
    or would spill are pruned before they are compiled.

    Shared memory: the tiles loaded in the loop, one buffer per stage, plus the tiles loaded once. Registers: 64
    for addresses and scalars plus the fp32 accumulators, the operand tiles and the fp32 score tiles a thread
    holds. Rough (within about 15% of the compiled shared memory checked), and never the only guard: the
    autotuner still skips a config that fails to compile or load, and a kernel keeps its smallest config when
    none is estimated to fit.
    """
    def estimate(config: dict, args: dict) -> tuple[int, int]:
        bm, bn, d = config["BLOCK_M"], config["BLOCK_N"], args["HEAD_DIM"]
        stages, threads = config.get("num_stages", 2), 32 * config.get("num_warps", 4)
        e = launch.element_size(args["q_ptr"])
        if kernel == "fwd":  # loop: k, v tiles; once: q; registers: acc, q, scores and probabilities
            shared, tiles = e * (stages * 2 * bn * d + bm * d), bm * d * 4 + bm * d * e + 2 * bm * bn * 4
        elif kernel == "dkdv":  # loop: q, dO tiles; once: k, v; registers: dk, dv, k, v, two (BN, BM) scores
            shared, tiles = e * (stages * 2 * bm * d + 2 * bn * d), 2 * bn * d * 4 + 2 * bn * d * e + 2 * bn * bm * 4
        else:  # dq: loop: k, v tiles; once: q, dO; registers: dq, q, dO, two (BM, BN) scores
            shared, tiles = e * (stages * 2 * bn * d + 2 * bm * d), bm * d * 4 + 2 * bm * d * e + 2 * bm * bn * 4
        return shared, 64 + tiles // (4 * threads)
    return estimate


# Interpreter configs use unequal BLOCK_M / BLOCK_N on purpose, so the tests exercise tile-edge logic.
_fwd = Launcher(_attn_fwd_kernel, _FWD_CONFIGS, _KEY, dict(BLOCK_M=32, BLOCK_N=16), _estimate("fwd"), keep_smallest=True)
_preprocess = Launcher(_attn_bwd_preprocess_kernel, _PREPROCESS_CONFIGS,
                       ["L", "HEAD_DIM"], dict(BLOCK_M=32))
_bwd_dkdv = Launcher(_attn_bwd_dkdv_kernel, _BWD_DKDV_CONFIGS, _KEY,
                     dict(BLOCK_M=16, BLOCK_N=32), _estimate("dkdv"), keep_smallest=True)
_bwd_dq = Launcher(_attn_bwd_dq_kernel, _BWD_DQ_CONFIGS, _KEY, dict(BLOCK_M=32, BLOCK_N=16), _estimate("dq"),
                   keep_smallest=True)


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.ndim != 4:
            raise ValueError(f"{name} must be (B, H, L, D), got shape {tuple(t.shape)}")
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"q, k, v must have one shape (B, H, L, D), got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}: cast them")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not q.is_floating_point():
        raise TypeError(f"q, k, v must be floating point, got {q.dtype}")


def _check_kernel_support(q) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"the attention kernel takes float16, bfloat16 or float32, got {q.dtype}: cast q, k, v, "
                        "or call attention_torch")
    if q.shape[-1] not in HEAD_DIMS:
        raise ValueError(f"the attention kernel supports head dims {HEAD_DIMS}, got {q.shape[-1]}: "
                         "call attention_torch")


def attention_torch(q, k, v, *, causal=False, sm_scale=None):
    """Math reference of :func:`attention`: any float dtype, computed in at least fp32; (B, L, H, D) out."""
    _check_qkv(q, k, v)
    scale = q.shape[-1] ** -0.5 if sm_scale is None else sm_scale
    acc = torch.promote_types(q.dtype, torch.float32)
    s = q.to(acc) @ k.to(acc).transpose(-1, -2) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    out = s.softmax(dim=-1) @ v.to(acc)
    return out.to(q.dtype).transpose(1, 2).contiguous()


def attention(q, k, v, *, causal=False, sm_scale=None):
    """``softmax(q @ k^T * sm_scale [+ causal mask]) @ v``, fused, with autograd.

    Args:
        q, k, v: (B, H, L, D), any strides (e.g. views of a packed in_proj output: not copied);
            fp16/bf16/fp32; D in 16, 32, 64, 128.
        causal: mask keys after the query (text tower).
        sm_scale: softmax scale, default ``1 / sqrt(D)``.

    Returns:
        (B, L, H, D) contiguous in q's dtype, so ``.reshape(B, L, H * D)`` is free. Without usable
        Triton (see :func:`~fastlclip.kernels.launch.kernels_available`) it warns once and runs
        :func:`attention_torch`.
    """
    _check_qkv(q, k, v)
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    if not launch.kernels_available(q.device):
        launch.warn_fallback("attention", q.device)
        return attention_torch(q, k, v, causal=causal, sm_scale=sm_scale)
    _check_kernel_support(q)
    return _Attention.apply(q, k, v, bool(causal), sm_scale)


def attention_packed(qkv, num_heads, *, causal=False, sm_scale=None):
    """:func:`attention` on the (B, L, 3W) output of a packed ``in_proj`` linear; returns (B, L, W).

    The q/k/v head views are strided views of ``qkv`` (no copy), laid out as
    ``nn.MultiheadAttention`` packs them: ``[q | k | v]``, each ``W = num_heads * D`` head-major. The
    backward writes dq, dk, dv straight into one (B, L, 3W) gradient.
    """
    if num_heads < 1 or qkv.ndim != 3 or qkv.shape[-1] % (3 * num_heads):
        raise ValueError(f"qkv must be (B, L, 3 * num_heads * D), got shape {tuple(qkv.shape)} "
                         f"with num_heads={num_heads}")
    batch, length, width3 = qkv.shape
    if not launch.kernels_available(qkv.device):
        launch.warn_fallback("attention_packed", qkv.device)
        return attention_torch(*_split_heads(qkv, num_heads), causal=causal, sm_scale=sm_scale).view(
            batch, length, width3 // 3)
    q = _split_heads(qkv, num_heads)[0]
    _check_kernel_support(q)
    sm_scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    return _AttentionPacked.apply(qkv, num_heads, bool(causal), sm_scale)


def _split_heads(qkv, num_heads):
    """(B, L, 3W) -> q, k, v views of shape (B, H, L, D)."""
    return qkv.unflatten(-1, (3, num_heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)


def _as_heads(x, num_heads):
    """(B, L, W) -> (B, H, L, D) view."""
    return x.unflatten(-1, (num_heads, -1)).transpose(1, 2)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, sm_scale):
        out, lse = _forward(q, k, v, causal, sm_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.sm_scale = causal, sm_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        batch, heads, length, dim = q.shape
        grads = [launch.empty((batch, length, heads, dim), q.dtype, q.device).transpose(1, 2) for _ in range(3)]
        _backward(q, k, v, out.transpose(1, 2), lse, grad_out.transpose(1, 2), *grads, ctx.causal, ctx.sm_scale)
        return *grads, None, None


class _AttentionPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv, num_heads, causal, sm_scale):
        out, lse = _forward(*_split_heads(qkv, num_heads), causal, sm_scale)
        out = out.flatten(2)
        ctx.save_for_backward(qkv, out, lse)
        ctx.num_heads, ctx.causal, ctx.sm_scale = num_heads, causal, sm_scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, out, lse = ctx.saved_tensors
        heads = ctx.num_heads
        grad_qkv = launch.empty(qkv.shape, qkv.dtype, qkv.device)
        _backward(*_split_heads(qkv, heads), _as_heads(out, heads), lse, _as_heads(grad_out, heads),
                  *_split_heads(grad_qkv, heads), ctx.causal, ctx.sm_scale)
        return grad_qkv, None, None, None


def _grid(batch, heads, length, block):
    return lambda meta: (batch * heads, triton.cdiv(length, meta[block]))


def _forward(q, k, v, causal, sm_scale):
    """Returns out (B, L, H, D) contiguous and the base-2 logsumexp (B * H, L) fp32."""
    batch, heads, length, dim = q.shape
    out = launch.empty((batch, length, heads, dim), q.dtype, q.device)
    lse = launch.empty((batch * heads, length), torch.float32, q.device)
    _fwd(_grid(batch, heads, length, "BLOCK_M"), q.device,
         q, k, v, out, lse, sm_scale * _LOG2E, length, heads,
         *q.stride(), *k.stride(), *v.stride(), *out.transpose(1, 2).stride(),
         HEAD_DIM=dim, CAUSAL=causal, size_hint=batch * heads, **launch.dot_args(q.dtype))
    return out, lse


def _backward(q, k, v, out, lse, grad_out, dq, dk, dv, causal, sm_scale):
    """Writes the gradients into dq, dk, dv; every tensor here is indexed as (B, H, L, D)."""
    batch, heads, length, dim = q.shape
    delta = launch.empty((batch * heads, length), torch.float32, q.device)
    _preprocess(_grid(batch, heads, length, "BLOCK_M"), q.device,
                out, grad_out, delta, length, heads, *out.stride(), *grad_out.stride(), HEAD_DIM=dim,
                size_hint=batch * heads)
    common = dict(HEAD_DIM=dim, CAUSAL=causal, size_hint=batch * heads, **launch.dot_args(q.dtype))
    _bwd_dkdv(_grid(batch, heads, length, "BLOCK_N"), q.device,
              q, k, v, grad_out, lse, delta, dk, dv, sm_scale, sm_scale * _LOG2E, length, heads,
              *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), **common)
    _bwd_dq(_grid(batch, heads, length, "BLOCK_M"), q.device,
            q, k, v, grad_out, lse, delta, dq, sm_scale, sm_scale * _LOG2E, length, heads,
            *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), **common)
