"""Fused GroupNorm (+ optional SiLU): Triton forward and backward, a PyTorch reference, a dispatcher.

    y = act((x - mean[n, g]) * rstd[n, g] * weight[c] + bias[c]),   act in {None, "silu"}

Shapes: x (N, C, *spatial) with any number of spatial dims (NCHW for the U-Nets), C divisible by
num_groups; weight and bias (C,) or None. A group is (C / num_groups) channels x all spatial positions
of one sample. Memory layouts: contiguous, and channels-last (torch.channels_last) for 4-D input;
anything else is made contiguous first. The output has the layout of the input. NCHW is the fast
layout: channels-last is read in place but only BLOCK_C (<= cpg) channels are contiguous.
Dtypes: x in float32 / float16 / bfloat16; weight and bias in any float dtype. Statistics (mean,
rstd) and every reduction are float32; the output has x's dtype, dweight / dbias weight's dtype.
Statistics are two-pass per block, merged with Chan et al.'s parallel formula -- never
E[x^2] - E[x]^2, which cancels catastrophically for |mean| >> std.

Hardware: the Triton path targets NVIDIA GPUs (written for H100; nothing Hopper-specific). On the
CPU it runs under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported), which
is how the tests reach it. Without triton installed (e.g. macOS), the reference path still works.

Work split (why two launches): one program per (sample, group) is only 32 programs at batch 1,
a few percent of an H100. The launcher splits each group's spatial range into chunks so that there
are ~4 programs per SM; then
  forward  1. _gn_fwd_stats_kernel   per (sample, group, chunk): partial (mean, M2)
           2. _gn_fwd_apply_kernel   per (sample, group, chunk): merge the partials, normalise
  backward 1. _gn_bwd_sums_kernel    per (sample, group, chunk): per-channel partial sums of
                                     dz * xhat and dz (dz = gradient before the affine map's output)
           2. _gn_bwd_dx_kernel      per (sample, group, chunk): merge, dx
           dweight / dbias = those partial sums reduced over samples and chunks (tiny torch sums).
When a whole group fits in one tile and there are already enough groups, the "apply" / "dx" kernel
does everything in one program from registers (one read of x instead of two).
The apply / dx kernels walk the groups in reverse order of the first kernel, so the tail that the
first kernel read last is still in L2 when the second reads it.

Limits: the reduction runs in float32, so groups of more than ~2^24 elements lose count precision;
the Triton path needs num_groups dividing C and a float32/float16/bfloat16 x, else the dispatcher
uses the reference (or raises ValueError when Triton is forced).

torch.compile: the launchers are registered with torch.library.triton_op and launch through
wrap_triton, so Dynamo traces the autograd.Function without graph breaks and Inductor sees the
kernels. Under the interpreter, wrap_triton hands back the plain interpreted kernel, which cannot
run on FakeTensors; the launcher then skips the launch (only shapes matter while tracing).

Dispatch: group_norm(..., impl=None|"triton"|"torch"); impl=None reads KERNELS_IMPL
(auto|triton|torch, default auto). auto = Triton for CUDA tensors when supported, else reference.
"""

import os

import torch
import torch.nn.functional as F
from torch.library import triton_op, wrap_triton

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU-only installs: keep the module importable, the reference path works
    import types

    HAS_TRITON = False
    triton = types.SimpleNamespace(jit=lambda fn: fn, cdiv=lambda a, b: -(-a // b))
    tl = types.SimpleNamespace(constexpr=None)


def _register_op(name):
    """torch.library.triton_op where the Triton path can run (a CUDA machine, or the interpreter). Elsewhere the
    launcher stays a plain function that the dispatcher never reaches: registering imports torch._inductor, which
    would cost every CPU process about 1.5 s."""
    if HAS_TRITON and (torch.cuda.is_available() or _is_interpreted(_gn_fwd_apply_kernel)):
        return triton_op(name, mutates_args={})
    return lambda fn: fn


IMPLS = ("triton", "torch")
ACTS = (None, "silu")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_TILE = 4096  # elements a program holds in registers per step (BLOCK_C * BLOCK_S)
PROGRAMS_PER_SM = 4  # target occupancy for splitting groups into chunks
MIN_CHUNK_S = 16  # spatial positions a chunk holds at least


# ----------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------
def group_norm_reference(x, weight, bias, num_groups, eps=1e-5, act=None):
    """GroupNorm(+SiLU) with statistics in float32 at least (float64 stays float64); returns x's dtype."""
    wide = torch.promote_types(x.dtype, torch.float32)
    y = F.group_norm(
        x.to(wide),
        num_groups,
        None if weight is None else weight.to(wide),
        None if bias is None else bias.to(wide),
        eps,
    )
    if act == "silu":
        y = F.silu(y)
    return y.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels. Every kernel sees x as (N, C, S) through (stride_n, stride_c, stride_s), so one
# kernel serves NCHW (stride_s = 1) and channels-last (stride_c = 1); Triton specialises stride 1
# and picks the coalesced axis. A program owns (sample n, group g, spatial chunk k) and walks its
# tile in [BLOCK_C channels x BLOCK_S positions] blocks.
# ----------------------------------------------------------------------------------------------
@triton.jit
def _gn_block_stats(x, mask, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    # Two-pass statistics of one block in registers: count, mean, M2 = sum (x - mean)^2.
    count = tl.sum(mask.to(tl.float32), axis=1)
    count = tl.sum(count, axis=0)
    mean = tl.sum(tl.sum(x, axis=1), axis=0) / count
    centred = tl.where(mask, x - mean, 0.0)
    m2 = tl.sum(tl.sum(centred * centred, axis=1), axis=0)
    return count, mean, m2


@triton.jit
def _gn_fwd_stats_kernel(
    X, MEAN_PART, M2_PART,  # x (N, C, S); partials (N * G, K) float32
    C, S, G, CPG, stride_n, stride_c, stride_s, CHUNK_S, K,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    x_base = X + n.to(tl.int64) * stride_n + (g * CPG).to(tl.int64) * stride_c
    s_start = pid_k * CHUNK_S
    s_end = tl.minimum(s_start + CHUNK_S, S)
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for c0 in range(0, CPG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        for s0 in range(s_start, s_end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = (offs_c < CPG)[:, None] & (offs_s < s_end)[None, :]
            ptrs = x_base + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
            x = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
            count_b, mean_b, m2_b = _gn_block_stats(x, mask, BLOCK_C, BLOCK_S)
            # Chan, Golub & LeVeque (1979): merge (count, mean, M2) of two disjoint sets.
            total = count + count_b
            delta = mean_b - mean
            mean += delta * (count_b / total)
            m2 += m2_b + delta * delta * (count * count_b / total)
            count = total
    tl.store(MEAN_PART + pid_ng * K + pid_k, mean)
    tl.store(M2_PART + pid_ng * K + pid_k, m2)


@triton.jit
def _gn_merge_stats(MEAN_PART, M2_PART, pid_ng, S, CPG, CHUNK_S, K, eps, BLOCK_K: tl.constexpr):
    # Merge the K chunk partials of one group (all K at once: the pairwise formula generalises to
    # mean = sum n_k mean_k / n,  M2 = sum M2_k + n_k (mean_k - mean)^2).
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    mean_k = tl.load(MEAN_PART + pid_ng * K + offs_k, mask=mask_k, other=0.0)
    m2_k = tl.load(M2_PART + pid_ng * K + offs_k, mask=mask_k, other=0.0)
    count_k = (tl.minimum(S - offs_k * CHUNK_S, CHUNK_S) * CPG).to(tl.float32)
    count_k = tl.where(mask_k, count_k, 0.0)
    count = tl.sum(count_k, axis=0)
    mean = tl.sum(count_k * mean_k, axis=0) / count
    delta = tl.where(mask_k, mean_k - mean, 0.0)
    m2 = tl.sum(m2_k + count_k * delta * delta, axis=0)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    return mean, rstd


@triton.jit
def _gn_affine_act(x, mean, rstd, w, b, ACT_SILU: tl.constexpr):
    z = (x - mean) * rstd * w + b
    if ACT_SILU:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def _gn_fwd_apply_kernel(
    X, Y, W, B, MEAN_PART, M2_PART, MEAN, RSTD,  # MEAN, RSTD (N * G,) float32, saved for backward
    C, S, G, CPG, stride_n, stride_c, stride_s, CHUNK_S, K, eps,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_SILU: tl.constexpr,
    ONE_PASS: tl.constexpr,  # the whole group is one [BLOCK_C, BLOCK_S] block and K == 1
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Reverse order of _gn_fwd_stats_kernel, to read x from L2 where it is still there.
    pid_ng = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_k = tl.num_programs(1) - 1 - tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    offset = n.to(tl.int64) * stride_n + (g * CPG).to(tl.int64) * stride_c
    x_base = X + offset
    y_base = Y + offset
    if ONE_PASS:
        offs_c = tl.arange(0, BLOCK_C)
        offs_s = tl.arange(0, BLOCK_S)
        mask = (offs_c < CPG)[:, None] & (offs_s < S)[None, :]
        ptrs = offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
        x = tl.load(x_base + ptrs, mask=mask, other=0.0).to(tl.float32)
        count, mean, m2 = _gn_block_stats(x, mask, BLOCK_C, BLOCK_S)
        rstd = 1.0 / tl.sqrt(m2 / count + eps)
        w = tl.full((BLOCK_C,), 1.0, tl.float32)
        b = tl.zeros((BLOCK_C,), tl.float32)
        if HAS_WEIGHT:
            w = tl.load(W + g * CPG + offs_c, mask=offs_c < CPG, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(B + g * CPG + offs_c, mask=offs_c < CPG, other=0.0).to(tl.float32)
        y = _gn_affine_act(x, mean, rstd, w[:, None], b[:, None], ACT_SILU)
        tl.store(y_base + ptrs, y.to(Y.dtype.element_ty), mask=mask)
    else:
        mean, rstd = _gn_merge_stats(MEAN_PART, M2_PART, pid_ng, S, CPG, CHUNK_S, K, eps, BLOCK_K)
        s_start = pid_k * CHUNK_S
        s_end = tl.minimum(s_start + CHUNK_S, S)
        for c0 in range(0, CPG, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < CPG
            w = tl.full((BLOCK_C,), 1.0, tl.float32)
            b = tl.zeros((BLOCK_C,), tl.float32)
            if HAS_WEIGHT:
                w = tl.load(W + g * CPG + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            if HAS_BIAS:
                b = tl.load(B + g * CPG + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            for s0 in range(s_start, s_end, BLOCK_S):
                offs_s = s0 + tl.arange(0, BLOCK_S)
                mask = mask_c[:, None] & (offs_s < s_end)[None, :]
                ptrs = offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
                x = tl.load(x_base + ptrs, mask=mask, other=0.0).to(tl.float32)
                y = _gn_affine_act(x, mean, rstd, w[:, None], b[:, None], ACT_SILU)
                tl.store(y_base + ptrs, y.to(Y.dtype.element_ty), mask=mask)
    if pid_k == 0:
        tl.store(MEAN + pid_ng, mean)
        tl.store(RSTD + pid_ng, rstd)


@triton.jit
def _gn_bwd_dz(x, dy, mean, rstd, w, b, ACT_SILU: tl.constexpr):
    # xhat and the gradient w.r.t. z = xhat * w + b (the pre-activation output).
    xhat = (x - mean) * rstd
    dz = dy
    if ACT_SILU:
        z = xhat * w + b
        sig = tl.sigmoid(z)
        dz = dy * sig * (1.0 + z * (1.0 - sig))
    return xhat, dz


@triton.jit
def _gn_bwd_sums_kernel(
    X, DY, W, B, MEAN, RSTD, SUM_DZ_XHAT, SUM_DZ,  # sums (N, K, C) float32
    C, S, G, CPG, stride_n, stride_c, stride_s, CHUNK_S, K,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_ng = tl.program_id(0)
    pid_k = tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    offset = n.to(tl.int64) * stride_n + (g * CPG).to(tl.int64) * stride_c
    mean = tl.load(MEAN + pid_ng)
    rstd = tl.load(RSTD + pid_ng)
    s_start = pid_k * CHUNK_S
    s_end = tl.minimum(s_start + CHUNK_S, S)
    for c0 in range(0, CPG, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask_c = offs_c < CPG
        w = tl.full((BLOCK_C,), 1.0, tl.float32)
        b = tl.zeros((BLOCK_C,), tl.float32)
        if HAS_WEIGHT:
            w = tl.load(W + g * CPG + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(B + g * CPG + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        acc_dz_xhat = tl.zeros((BLOCK_C,), tl.float32)
        acc_dz = tl.zeros((BLOCK_C,), tl.float32)
        for s0 in range(s_start, s_end, BLOCK_S):
            offs_s = s0 + tl.arange(0, BLOCK_S)
            mask = mask_c[:, None] & (offs_s < s_end)[None, :]
            ptrs = offset + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
            x = tl.load(X + ptrs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + ptrs, mask=mask, other=0.0).to(tl.float32)
            xhat, dz = _gn_bwd_dz(x, dy, mean, rstd, w[:, None], b[:, None], ACT_SILU)
            acc_dz_xhat += tl.sum(dz * xhat, axis=1)  # masked lanes have dy = 0, so dz = 0
            acc_dz += tl.sum(dz, axis=1)
        out = (n * K + pid_k) * C + g * CPG + offs_c
        tl.store(SUM_DZ_XHAT + out, acc_dz_xhat, mask=mask_c)
        tl.store(SUM_DZ + out, acc_dz, mask=mask_c)


@triton.jit
def _gn_bwd_dx_kernel(
    X, DY, DX, W, B, MEAN, RSTD, SUM_DZ_XHAT, SUM_DZ,
    C, S, G, CPG, stride_n, stride_c, stride_s, CHUNK_S, K,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, ACT_SILU: tl.constexpr,
    ONE_PASS: tl.constexpr,  # whole group in one block, K == 1: also write the sums here
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # With dxhat = dz * w and M = CPG * S elements in the group:
    #   dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
    # and sum(dxhat) = sum_c w_c sum_s dz, sum(dxhat xhat) = sum_c w_c sum_s dz xhat, so the
    # per-channel sums that give dweight / dbias also give the group means.
    pid_ng = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_k = tl.num_programs(1) - 1 - tl.program_id(1)
    n = pid_ng // G
    g = pid_ng % G
    offset = n.to(tl.int64) * stride_n + (g * CPG).to(tl.int64) * stride_c
    mean = tl.load(MEAN + pid_ng)
    rstd = tl.load(RSTD + pid_ng)
    inv_m = 1.0 / (CPG * S)  # not .to(): Triton may specialise CPG = S = 1 to constants
    if ONE_PASS:
        offs_c = tl.arange(0, BLOCK_C)
        offs_s = tl.arange(0, BLOCK_S)
        mask_c = offs_c < CPG
        mask = mask_c[:, None] & (offs_s < S)[None, :]
        ptrs = offset + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
        w = tl.full((BLOCK_C,), 1.0, tl.float32)
        b = tl.zeros((BLOCK_C,), tl.float32)
        if HAS_WEIGHT:
            w = tl.load(W + g * CPG + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        if HAS_BIAS:
            b = tl.load(B + g * CPG + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        x = tl.load(X + ptrs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + ptrs, mask=mask, other=0.0).to(tl.float32)
        xhat, dz = _gn_bwd_dz(x, dy, mean, rstd, w[:, None], b[:, None], ACT_SILU)
        sum_dz_xhat = tl.sum(dz * xhat, axis=1)
        sum_dz = tl.sum(dz, axis=1)
        out = n * C + g * CPG + offs_c
        tl.store(SUM_DZ_XHAT + out, sum_dz_xhat, mask=mask_c)
        tl.store(SUM_DZ + out, sum_dz, mask=mask_c)
        c1 = tl.sum(w * sum_dz_xhat, axis=0) * inv_m
        c2 = tl.sum(w * sum_dz, axis=0) * inv_m
        dx = rstd * (dz * w[:, None] - c2 - xhat * c1)
        tl.store(DX + ptrs, dx.to(DX.dtype.element_ty), mask=mask)
    else:
        # Group totals from the (K, CPG) partial sums of this sample.
        offs_k = tl.arange(0, BLOCK_K)
        c1 = 0.0
        c2 = 0.0
        for c0 in range(0, CPG, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < CPG
            w = tl.full((BLOCK_C,), 1.0, tl.float32)
            if HAS_WEIGHT:
                w = tl.load(W + g * CPG + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            idx = (n * K + offs_k[:, None]) * C + g * CPG + offs_c[None, :]
            mask_kc = (offs_k < K)[:, None] & mask_c[None, :]
            part_dz_xhat = tl.load(SUM_DZ_XHAT + idx, mask=mask_kc, other=0.0)
            part_dz = tl.load(SUM_DZ + idx, mask=mask_kc, other=0.0)
            c1 += tl.sum(w * tl.sum(part_dz_xhat, axis=0), axis=0)
            c2 += tl.sum(w * tl.sum(part_dz, axis=0), axis=0)
        c1 *= inv_m
        c2 *= inv_m
        s_start = pid_k * CHUNK_S
        s_end = tl.minimum(s_start + CHUNK_S, S)
        for c0 in range(0, CPG, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask_c = offs_c < CPG
            w = tl.full((BLOCK_C,), 1.0, tl.float32)
            b = tl.zeros((BLOCK_C,), tl.float32)
            if HAS_WEIGHT:
                w = tl.load(W + g * CPG + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            if HAS_BIAS:
                b = tl.load(B + g * CPG + offs_c, mask=mask_c, other=0.0).to(tl.float32)
            for s0 in range(s_start, s_end, BLOCK_S):
                offs_s = s0 + tl.arange(0, BLOCK_S)
                mask = mask_c[:, None] & (offs_s < s_end)[None, :]
                ptrs = offset + offs_c[:, None] * stride_c + offs_s[None, :] * stride_s
                x = tl.load(X + ptrs, mask=mask, other=0.0).to(tl.float32)
                dy = tl.load(DY + ptrs, mask=mask, other=0.0).to(tl.float32)
                xhat, dz = _gn_bwd_dz(x, dy, mean, rstd, w[:, None], b[:, None], ACT_SILU)
                dx = rstd * (dz * w[:, None] - c2 - xhat * c1)
                tl.store(DX + ptrs, dx.to(DX.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _is_interpreted(kernel):
    return type(kernel).__name__ == "InterpretedFunction"  # @triton.jit under TRITON_INTERPRET=1


def _launch(kernel, grid, *args, **meta):
    # wrap_triton makes the launch traceable by torch.compile. Under TRITON_INTERPRET=1 it returns
    # the interpreted kernel, which cannot run on FakeTensors; while tracing only shapes matter.
    if _is_interpreted(kernel) and any(isinstance(a, torch._subclasses.FakeTensor) for a in args):
        return
    wrap_triton(kernel)[grid](*args, **meta)


def _sm_count(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # interpreter: any split is only for coverage


def _as_ncs(x):
    """x (N, C, *spatial) -> (x in a supported layout, (stride_n, stride_c, stride_s), channels_last)."""
    N, C = x.shape[:2]
    S = x[0, 0].numel()
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x, (x.stride(0), 1, C), True
    x = x.contiguous()
    return x, (C * S, S, 1), False


def _bwd_dx_warps(block_c, block_s, one_pass):
    """The single-pass backward keeps a whole group's tile and its sums in registers: from 2048 elements it spills
    at 4 warps on sm_90 (ptxas -v), so it gets 8."""
    return 8 if one_pass and block_c * block_s >= 2048 else 4


def _config(N, G, cpg, S, device):
    """Tile (BLOCK_C, BLOCK_S) and the chunking of each group's spatial range (CHUNK_S, K).

    Returns (block_c, block_s, chunk_s, K, one_pass)."""
    target_programs = PROGRAMS_PER_SM * _sm_count(device)
    chunks_wanted = 1 if 2 * N * G >= target_programs else triton.cdiv(target_programs, N * G)
    pow2_s = triton.next_power_of_2(S)
    pow2_c = triton.next_power_of_2(cpg)
    chunk_s = max(triton.cdiv(S, chunks_wanted), MIN_CHUNK_S)
    if chunk_s >= S and pow2_c * pow2_s <= MAX_TILE:  # one program per group, in registers
        return pow2_c, pow2_s, S, 1, True
    block_s = min(triton.next_power_of_2(chunk_s), MAX_TILE)
    chunk_s = triton.cdiv(chunk_s, block_s) * block_s
    # Channels per block: a power of two, as large as the tile allows, but not one that pads
    # cpg by more than 25% (cpg = 10, 20, 40 in SD: 16 lanes for 10 channels wastes 37.5%).
    block_c = min(pow2_c, max(1, MAX_TILE // block_s))
    while block_c > 1 and triton.cdiv(cpg, block_c) * block_c > 1.25 * cpg:
        block_c //= 2
    return block_c, block_s, chunk_s, triton.cdiv(S, chunk_s), False


@_register_op("castle_kernels::group_norm_fwd")
def _group_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, (stride_n, stride_c, stride_s), _ = _as_ncs(x)
    N, C = x.shape[:2]
    S = x[0, 0].numel()
    G = num_groups
    cpg = C // G
    block_c, block_s, chunk_s, K, one_pass = _config(N, G, cpg, S, x.device)
    y = torch.empty_like(x)
    mean = torch.empty(N * G, device=x.device, dtype=torch.float32)
    rstd = torch.empty(N * G, device=x.device, dtype=torch.float32)
    mean_part = torch.empty(N * G * K, device=x.device, dtype=torch.float32)
    m2_part = torch.empty(N * G * K, device=x.device, dtype=torch.float32)
    dummy = mean  # stands in for an absent weight / bias pointer (never read)
    if not one_pass:
        _launch(
            _gn_fwd_stats_kernel, (N * G, K),
            x, mean_part, m2_part, C, S, G, cpg, stride_n, stride_c, stride_s, chunk_s, K,
            BLOCK_C=block_c, BLOCK_S=block_s,
        )
    _launch(
        _gn_fwd_apply_kernel, (N * G, K),
        x, y, dummy if weight is None else weight, dummy if bias is None else bias,
        mean_part, m2_part, mean, rstd,
        C, S, G, cpg, stride_n, stride_c, stride_s, chunk_s, K, eps,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT_SILU=silu, ONE_PASS=one_pass,
        BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_K=triton.next_power_of_2(K),
    )
    return y, mean.view(N, G), rstd.view(N, G)


@_register_op("castle_kernels::group_norm_bwd")
def _group_norm_bwd(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    num_groups: int,
    silu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x, (stride_n, stride_c, stride_s), channels_last = _as_ncs(x)
    dy = dy.contiguous(memory_format=torch.channels_last) if channels_last else dy.contiguous()
    N, C = x.shape[:2]
    S = x[0, 0].numel()
    G = num_groups
    cpg = C // G
    block_c, block_s, chunk_s, K, one_pass = _config(N, G, cpg, S, x.device)
    dx = torch.empty_like(x)
    sum_dz_xhat = torch.empty(N, K, C, device=x.device, dtype=torch.float32)
    sum_dz = torch.empty(N, K, C, device=x.device, dtype=torch.float32)
    dummy = mean
    args = (C, S, G, cpg, stride_n, stride_c, stride_s, chunk_s, K)
    flags = dict(HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ACT_SILU=silu)
    w = dummy if weight is None else weight
    b = dummy if bias is None else bias
    if not one_pass:
        _launch(
            _gn_bwd_sums_kernel, (N * G, K),
            x, dy, w, b, mean, rstd, sum_dz_xhat, sum_dz, *args,
            **flags, BLOCK_C=block_c, BLOCK_S=block_s,
        )
    _launch(
        _gn_bwd_dx_kernel, (N * G, K),
        x, dy, dx, w, b, mean, rstd, sum_dz_xhat, sum_dz, *args,
        **flags, ONE_PASS=one_pass, BLOCK_C=block_c, BLOCK_S=block_s, BLOCK_K=triton.next_power_of_2(K),
        num_warps=_bwd_dx_warps(block_c, block_s, one_pass),
    )
    dweight = sum_dz_xhat.sum(dim=(0, 1))
    dbias = sum_dz.sum(dim=(0, 1))
    return dx, dweight, dbias


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class _GroupNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, silu):
        y, mean, rstd = torch.ops.castle_kernels.group_norm_fwd(x, weight, bias, num_groups, eps, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups = num_groups
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dweight, dbias = torch.ops.castle_kernels.group_norm_bwd(
            dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.silu
        )
        dweight = None if weight is None else dweight.to(weight.dtype)
        dbias = None if bias is None else dbias.to(bias.dtype)
        return dx, dweight, dbias, None, None, None


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _check_inputs(x, weight, bias, num_groups, act, impl):
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"group_norm: x must be a tensor (N, C, *spatial), got shape {tuple(getattr(x, 'shape', ()))}")
    C = x.shape[1]
    if not isinstance(num_groups, int) or num_groups <= 0 or C % num_groups != 0:
        raise ValueError(f"group_norm: num_groups={num_groups} must be a positive divisor of C={C}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            raise ValueError(f"group_norm: {name} must have shape ({C},), got {tuple(t.shape)}")
    if act not in ACTS:
        raise ValueError(f"group_norm: act must be one of {ACTS}, got {act!r}")
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"group_norm: impl must be None, 'triton' or 'torch', got {impl!r}")


def _triton_usable(x):
    """Why the Triton path cannot take x, or None if it can."""
    if not HAS_TRITON:
        return "triton is not installed"
    if x.dtype not in SUPPORTED_DTYPES:
        return f"dtype {x.dtype} (supported: {SUPPORTED_DTYPES})"
    if x.numel() == 0:
        return "empty input"
    if x.device.type != "cuda" and not _is_interpreted(_gn_fwd_apply_kernel):
        return f"{x.device.type} tensors need TRITON_INTERPRET=1 (set before triton is imported)"
    return None


def _resolve_impl(impl):
    impl = impl or os.environ.get("KERNELS_IMPL", "auto") or "auto"
    if impl not in ("auto",) + IMPLS:
        raise ValueError(f"KERNELS_IMPL must be auto, triton or torch, got {impl!r}")
    return impl


def group_norm(x, weight, bias, num_groups, eps=1e-5, act=None, impl=None):
    """GroupNorm over (N, C, *spatial) with optional fused SiLU; float32 statistics, x's dtype out.

    impl: None (KERNELS_IMPL or auto: Triton on CUDA, reference elsewhere), "triton" or "torch".
    """
    _check_inputs(x, weight, bias, num_groups, act, impl)
    impl = _resolve_impl(impl)
    reason = _triton_usable(x) if impl != "torch" else "impl='torch'"
    if impl == "triton" and reason is not None:
        raise ValueError(f"group_norm: Triton implementation forced but unusable: {reason}")
    if impl == "auto" and (reason is not None or x.device.type != "cuda"):
        impl = "torch"
    if impl == "torch":
        return group_norm_reference(x, weight, bias, num_groups, eps, act)
    weight = None if weight is None else weight.contiguous()  # the kernels index them densely
    bias = None if bias is None else bias.contiguous()
    return _GroupNormFunction.apply(x, weight, bias, num_groups, float(eps), act == "silu")
