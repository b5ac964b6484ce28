"""Flash attention (forward and backward) in Triton, a PyTorch reference, a dispatcher.

    out = softmax(q k^T / sqrt(D)) v          (no mask, no dropout, non-causal)

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D), out (B, H, Lq, D). Any strides with a unit stride
on D are read in place (e.g. the (B, L, H, D) -> transpose(1, 2) view a U-Net makes), other
layouts are copied. Lq, Lk need not be multiples of the block sizes (the tails are masked), and
D need not be a power of two: the kernels pad the head dimension to BLOCK_D =
next_power_of_2(max(D, 16)) with masked loads. Stable Diffusion v1 has 8 heads of D = 40, 80, 160,
query lengths 4096 / 1024 / 256 / 64 and key lengths equal to them or 77 (text tokens).
Dtypes: float16, bfloat16 (tensor cores, fp32 accumulation) and float32 (exact "ieee" dot
products, slow). Softmax statistics, the accumulator, the saved logsumexp and every gradient
accumulator are float32.

Hardware: written for NVIDIA GPUs (H100 in mind: block sizes are chosen so the D = 160 -> 256
padded tiles fit the 227 KB of shared memory a block may use). On the CPU it runs under Triton's
interpreter (TRITON_INTERPRET=1, set before triton is imported), which is how the tests reach it.
The interpreter (Triton 3.x) computes tl.dot on bfloat16 by multiplying the raw 16-bit patterns,
so on CPU tensors the kernels upcast bfloat16 dot operands to float32 (constexpr UPCAST_DOT; the
rounding of p and dS to bfloat16 is kept, so the numerics match the GPU path).

Limits: D <= MAX_HEAD_DIM = 256; beyond it (or for other dtypes, empty tensors, non-CUDA tensors in
auto mode) the dispatcher uses torch's scaled_dot_product_attention. D = 160 pays for its padding
to 256 (62% more dot-product work than the real head dimension).

Algorithm (Dao, "FlashAttention-2", 2023):
  forward   one program per (query block, batch*head): stream key/value blocks, online softmax in
            base 2 (scale folded into log2(e) / sqrt(D)), save lse = m + log2(l) per query row.
  backward  delta = rowsum(out * dout) (one small kernel); one kernel per key block for dk, dv
            (streams the query blocks) and one per query block for dq (streams the key blocks):
            no atomics, deterministic.

torch.compile: the launchers are registered with torch.library.triton_op and launch through
wrap_triton, so Dynamo traces the autograd.Function without graph breaks and Inductor sees the
kernels. Under the interpreter, wrap_triton hands back the plain interpreted kernel, which cannot
run on FakeTensors; the launcher then skips the launch (only shapes matter while tracing).

Dispatch: attention(q, k, v, impl=None|"triton"|"torch"); impl=None reads KERNELS_IMPL
(auto|triton|torch, default auto). auto = Triton for CUDA tensors when supported, else SDPA.
"""

import math
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
    triton = types.SimpleNamespace(jit=lambda fn: fn)
    tl = types.SimpleNamespace(constexpr=None)


def _register_op(name):
    """torch.library.triton_op where the Triton path can run (a CUDA machine, or the interpreter). Elsewhere the
    launcher stays a plain function that the dispatcher never reaches: registering imports torch._inductor, which
    would cost every CPU process about 1.5 s."""
    if HAS_TRITON and (torch.cuda.is_available() or _is_interpreted(_attn_fwd_kernel)):
        return triton_op(name, mutates_args={})
    return lambda fn: fn


IMPLS = ("triton", "torch")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------
# PyTorch reference
# ----------------------------------------------------------------------------------------------
def attention_reference(q, k, v):
    """softmax(q k^T / sqrt(D)) v through torch's SDPA (it picks its best backend)."""
    return F.scaled_dot_product_attention(q, k, v)


# ----------------------------------------------------------------------------------------------
# Triton kernels. Tiles: rows of q / out ("m"), rows of k / v ("n"), head dim ("d", padded to
# BLOCK_D and masked). Scores are kept in base 2: s2 = (q . k) * log2(e) / sqrt(D), so
# softmax = exp2(s2 - max) and lse2 = max + log2(sum).
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, UPCAST_DOT: tl.constexpr, IEEE: tl.constexpr):
    if UPCAST_DOT:  # interpreter work-around for bfloat16, see the module docstring
        out = tl.dot(a.to(tl.float32), b.to(tl.float32))
    elif IEEE:  # float32 inputs: no silent TF32
        out = tl.dot(a, b, input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,  # LSE (B * H, Lq) float32, base 2
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, LQ, LK, D, qk_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_base = O + b * stride_ob + h * stride_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < LQ
    mask_d = offs_d < D
    q = tl.load(
        q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
    )
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)  # running max of s2
    l_i = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(s2 - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < LK
        k_t = tl.load(  # (BLOCK_D, BLOCK_N): k transposed by addressing
            k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
            mask=mask_n[None, :] & mask_d[:, None], other=0.0,
        )
        s = _dot(q, k_t, UPCAST_DOT, IEEE) * qk_scale_log2
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every key block has a real key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        )
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT, IEEE)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(
        o_base + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
        acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :],
    )
    tl.store(LSE + pid_bh.to(tl.int64) * LQ + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit
def _attn_bwd_delta_kernel(
    O, DO, DELTA,  # DELTA (B * H, Lq) float32: rowsum(out * dout)
    stride_ob, stride_oh, stride_om, stride_od,
    stride_dob, stride_doh, stride_dom, stride_dod,
    H, LQ, D,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < LQ)[:, None] & (offs_d < D)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * LQ + offs_m, tl.sum(o * do, axis=1), mask=offs_m < LQ)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # DK and DV share this layout
    H, LQ, LK, D, qk_scale_log2, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    # One key block; P^T and dS^T are built transposed ((BLOCK_N, BLOCK_M)) so that
    # dv = P^T dO and dk = scale * dS^T Q are plain products.
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    row_base = pid_bh.to(tl.int64) * LQ

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < LK
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_nd, other=0.0)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=mask_nd, other=0.0)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    for start_m in range(0, LQ, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < LQ
        q_t = tl.load(q_base + rows[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                      mask=mask_m[None, :] & mask_d[:, None], other=0.0)  # (BLOCK_D, BLOCK_M)
        lse = tl.load(LSE + row_base + rows, mask=mask_m, other=0.0)
        p_t = tl.exp2(_dot(k, q_t, UPCAST_DOT, IEEE) * qk_scale_log2 - lse[None, :])
        p_t = tl.where(mask_m[None, :], p_t, 0.0)
        do = tl.load(do_base + rows[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        dv += _dot(p_t.to(do.dtype), do, UPCAST_DOT, IEEE)
        delta = tl.load(DELTA + row_base + rows, mask=mask_m, other=0.0)
        dp_t = _dot(v, tl.trans(do), UPCAST_DOT, IEEE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += _dot(ds_t.to(q_t.dtype), tl.trans(q_t), UPCAST_DOT, IEEE)
    dk *= sm_scale
    out = b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd
    tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, LQ, LK, D, qk_scale_log2, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr, IEEE: tl.constexpr,
):
    # One query block: dq = scale * dS K with dS = P * (dO V^T - delta).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    row_base = pid_bh.to(tl.int64) * LQ

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < LQ
    mask_d = offs_d < D
    mask_md = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=mask_md, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dom + offs_d[None, :] * stride_dod,
                 mask=mask_md, other=0.0)
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start_n in range(0, LK, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < LK
        mask_dn = mask_d[:, None] & mask_n[None, :]
        k_t = tl.load(k_base + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=mask_dn, other=0.0)
        v_t = tl.load(v_base + cols[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=mask_dn, other=0.0)
        p = tl.exp2(_dot(q, k_t, UPCAST_DOT, IEEE) * qk_scale_log2 - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = _dot(do, v_t, UPCAST_DOT, IEEE)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(k_t.dtype), tl.trans(k_t), UPCAST_DOT, IEEE)
    dq *= sm_scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=mask_md)


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


def _block_d(head_dim):
    return triton.next_power_of_2(max(head_dim, 16))  # tl.dot needs every dimension >= 16


def _fwd_config(block_d, dtype):
    """Fixed tiles by padded head dim (register file: the fp32 accumulator is BLOCK_M x BLOCK_D;
    shared memory: q plus num_stages copies of the k and v tiles)."""
    wide = dtype == torch.float32  # fp32 tiles: no register spills on sm_90 (ptxas -v, benchmarks/RESULTS.md)
    if block_d <= 64:
        return dict(BLOCK_M=64 if wide else 128, BLOCK_N=32 if wide else 64, num_warps=8 if wide else 4, num_stages=3)
    if block_d <= 128:
        return dict(BLOCK_M=64 if wide else 128, BLOCK_N=32 if wide else 64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=32 if wide else 64, BLOCK_N=16 if wide else 32, num_warps=8, num_stages=2)


def _bwd_config(block_d, dtype):
    """Tiles of the dk/dv kernel (BLOCK_N resident keys, BLOCK_M streamed queries); the dq kernel
    uses the same pair with the roles swapped."""
    wide = dtype == torch.float32
    if block_d <= 64:
        return dict(BLOCK_M=32, BLOCK_N=32 if wide else 64, num_warps=4, num_stages=2)
    if block_d <= 128:
        return dict(BLOCK_M=32, BLOCK_N=32 if wide else 64, num_warps=8, num_stages=2)
    return dict(BLOCK_M=16 if wide else 32, BLOCK_N=32, num_warps=8, num_stages=1)


def _dot_flags(t):
    return dict(
        UPCAST_DOT=t.device.type != "cuda" and t.dtype == torch.bfloat16,
        IEEE=t.dtype == torch.float32,
    )


@_register_op("castle_kernels::attention_fwd")
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    out = torch.empty(B, H, LQ, D, device=q.device, dtype=q.dtype)
    lse = torch.empty(B * H, LQ, device=q.device, dtype=torch.float32)
    block_d = _block_d(D)
    cfg = _fwd_config(block_d, q.dtype)
    _launch(
        _attn_fwd_kernel, (triton.cdiv(LQ, cfg["BLOCK_M"]), B * H),
        q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        H, LQ, LK, D, LOG2E / math.sqrt(D),
        BLOCK_D=block_d, **_dot_flags(q), **cfg,
    )
    return out, lse


@_register_op("castle_kernels::attention_bwd")
def _attention_bwd(
    dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq = torch.empty(B, H, LQ, D, device=q.device, dtype=q.dtype)
    dk = torch.empty(B, H, LK, D, device=k.device, dtype=k.dtype)
    dv = torch.empty(B, H, LK, D, device=v.device, dtype=v.dtype)
    delta = torch.empty(B * H, LQ, device=q.device, dtype=torch.float32)
    block_d = _block_d(D)
    cfg = _bwd_config(block_d, q.dtype)
    sm_scale = 1.0 / math.sqrt(D)
    _launch(
        _attn_bwd_delta_kernel, (triton.cdiv(LQ, 64), B * H),
        out, dout, delta, *out.stride(), *dout.stride(), H, LQ, D,
        BLOCK_M=64, BLOCK_D=block_d,
    )
    common = (H, LQ, LK, D, sm_scale * LOG2E, sm_scale)
    meta = dict(BLOCK_D=block_d, **_dot_flags(q), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _launch(
        _attn_bwd_dkdv_kernel, (triton.cdiv(LK, cfg["BLOCK_N"]), B * H),
        q, k, v, dout, dk, dv, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dk.stride(), *common,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], **meta,
    )
    # dq: the query block is resident, so it takes the larger tile and streams the smaller one.
    _launch(
        _attn_bwd_dq_kernel, (triton.cdiv(LQ, cfg["BLOCK_N"]), B * H),
        q, k, v, dout, dq, lse, delta,
        *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *dq.stride(), *common,
        BLOCK_M=cfg["BLOCK_N"], BLOCK_N=cfg["BLOCK_M"], **meta,
    )
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------
# Autograd
# ----------------------------------------------------------------------------------------------
class _AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.ops.castle_kernels.attention_fwd(q, k, v)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        return torch.ops.castle_kernels.attention_bwd(dout, q, k, v, out, lse)


# ----------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, impl):
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"attention: {name} must be a 4-D tensor (B, H, L, D), got shape {tuple(getattr(t, 'shape', ()))}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} must agree in B, H and D")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if impl is not None and impl not in IMPLS:
        raise ValueError(f"attention: impl must be None, 'triton' or 'torch', got {impl!r}")


def _triton_usable(q, k):
    """Why the Triton path cannot take these inputs, or None if it can."""
    if not HAS_TRITON:
        return "triton is not installed"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (supported: {SUPPORTED_DTYPES})"
    if q.shape[3] > MAX_HEAD_DIM:
        return f"head dim {q.shape[3]} > {MAX_HEAD_DIM}"
    if q.numel() == 0 or k.numel() == 0:
        return "empty input"
    if q.device.type != "cuda" and not _is_interpreted(_attn_fwd_kernel):
        return f"{q.device.type} tensors need TRITON_INTERPRET=1 (set before triton is imported)"
    return None


def _resolve_impl(impl):
    impl = impl or os.environ.get("KERNELS_IMPL", "auto") or "auto"
    if impl not in ("auto",) + IMPLS:
        raise ValueError(f"KERNELS_IMPL must be auto, triton or torch, got {impl!r}")
    return impl


def attention(q, k, v, impl=None):
    """softmax(q k^T / sqrt(D)) v for q (B, H, Lq, D), k / v (B, H, Lk, D); no mask, no dropout.

    impl: None (KERNELS_IMPL or auto: Triton on CUDA, SDPA elsewhere), "triton" or "torch".
    """
    _check_inputs(q, k, v, impl)
    impl = _resolve_impl(impl)
    reason = _triton_usable(q, k) if impl != "torch" else "impl='torch'"
    if impl == "triton" and reason is not None:
        raise ValueError(f"attention: Triton implementation forced but unusable: {reason}")
    if impl == "auto" and (reason is not None or q.device.type != "cuda"):
        impl = "torch"
    if impl == "torch":
        return attention_reference(q, k, v)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    # torch.compile refuses an autograd.Function that gets one tensor twice (attention(x, x, x)).
    if k is q:
        k = k.view_as(k)
    if v is q or v is k:
        v = v.view_as(v)
    return _AttentionFunction.apply(q, k, v)
