"""Tests of castle_kernels/: Triton GroupNorm(+SiLU) and flash attention against float64 PyTorch.

On the CPU the Triton kernels run through Triton's interpreter, which must be switched on before
triton is first imported; this module does that for itself. (If another module of the same pytest
run imports triton first without TRITON_INTERPRET=1, the Triton tests here skip with that reason.)
Sizes are small (the interpreter is slow) but keep the awkward properties: channels per group
not a power of two, batch 1 with groups split into chunks, spatial and token counts that are not
multiples of the block, head dims 40 / 80 / 160, key length 77.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib  # noqa: E402
import zlib  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from helpers import rel_err  # noqa: E402
from castle_kernels.attention import attention  # noqa: E402
from castle_kernels.group_norm import group_norm  # noqa: E402

# The package re-exports the functions under the module names, so fetch the modules explicitly.
gn_module = importlib.import_module("castle_kernels.group_norm")
attn_module = importlib.import_module("castle_kernels.attention")

# Relative error ||got - ref|| / ||ref|| against float64, per input dtype (bf16 has 8 mantissa bits).
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

triton_runs_here = pytest.mark.skipif(
    not (gn_module.HAS_TRITON and (torch.cuda.is_available() or gn_module._is_interpreted(gn_module._gn_fwd_apply_kernel))),
    reason="needs triton with a GPU or TRITON_INTERPRET=1 set before triton was first imported",
)


def stable_seed(*case):
    return zlib.crc32(repr(case).encode())  # a different stream per case, the same on every run


def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# GroupNorm
# ----------------------------------------------------------------------------------------------
def group_norm_float64(x, weight, bias, num_groups, eps, act, dy):
    """Float64 reference: outputs and the gradients of (output * dy).sum()."""
    x = x.detach().double().requires_grad_(True)
    weight = None if weight is None else weight.detach().double().requires_grad_(True)
    bias = None if bias is None else bias.detach().double().requires_grad_(True)
    y = F.group_norm(x, num_groups, weight, bias, eps)
    if act == "silu":
        y = F.silu(y)
    y.backward(dy.double())
    return y, x.grad, None if weight is None else weight.grad, None if bias is None else bias.grad


GN_CASES = [
    # (shape, groups, act, dtype, channels_last, affine, max_tile)
    pytest.param((1, 30, 9, 11), 3, "silu", torch.float32, False, True, 64, id="batch1-cpg10-split-fp32"),
    pytest.param((1, 30, 9, 11), 3, "silu", torch.bfloat16, False, True, 64, id="batch1-cpg10-split-bf16"),
    pytest.param((1, 30, 9, 11), 3, None, torch.float16, False, True, 64, id="batch1-cpg10-split-fp16"),
    pytest.param((2, 40, 5, 5), 2, None, torch.float32, False, True, None, id="cpg20-one-pass-fp32"),
    pytest.param((2, 40, 5, 5), 2, "silu", torch.bfloat16, False, True, None, id="cpg20-one-pass-bf16"),
    pytest.param((2, 30, 5, 6), 3, "silu", torch.bfloat16, True, True, 64, id="channels-last-split-bf16"),
    pytest.param((2, 30, 5, 6), 3, "silu", torch.float32, True, False, None, id="channels-last-no-affine-fp32"),
    pytest.param((3, 12, 7), 4, "silu", torch.float32, False, True, None, id="3d-input-cpg3"),
    pytest.param((1, 320, 8, 8), 32, "silu", torch.bfloat16, False, True, None, id="sd-320ch-8x8-batch1"),
]


@triton_runs_here
@pytest.mark.parametrize("shape, groups, act, dtype, channels_last, affine, max_tile", GN_CASES)
def test_group_norm_triton_matches_float64(monkeypatch, shape, groups, act, dtype, channels_last, affine, max_tile):
    if max_tile is not None:  # small tiles and a high program target, as on a GPU with 132 SMs:
        monkeypatch.setattr(gn_module, "MAX_TILE", max_tile)  # several blocks per program,
        monkeypatch.setattr(gn_module, "PROGRAMS_PER_SM", 16)  # several chunks per group
    gen = torch.Generator().manual_seed(stable_seed(shape, groups, act, dtype))
    C = shape[1]
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    weight = (torch.randn(C, generator=gen) * 0.5 + 1) if affine else None
    bias = torch.randn(C, generator=gen) * 0.5 if affine else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x, dy = x.to(device()), dy.to(device())
    weight = None if weight is None else weight.to(device()).requires_grad_(True)
    bias = None if bias is None else bias.to(device()).requires_grad_(True)
    x.requires_grad_(True)

    if max_tile is not None:
        *_, chunks, one_pass = gn_module._config(shape[0], groups, C // groups, x[0, 0].numel(), x.device)
        assert chunks > 1 and not one_pass, "this case is meant to exercise the split reduction"

    y = group_norm(x, weight, bias, groups, 1e-5, act, impl="triton")
    y.backward(dy)
    y_ref, dx_ref, dw_ref, db_ref = group_norm_float64(x, weight, bias, groups, 1e-5, act, dy)

    assert y.dtype == dtype and y.shape == x.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert x.grad.is_contiguous(memory_format=torch.channels_last)
    tol = TOL[dtype]
    assert rel_err(y, y_ref) < tol
    assert rel_err(x.grad, dx_ref) < tol
    if affine:
        assert weight.grad.dtype == weight.dtype and bias.grad.dtype == bias.dtype
        assert rel_err(weight.grad, dw_ref) < tol
        assert rel_err(bias.grad, db_ref) < tol


@triton_runs_here
def test_group_norm_statistics_survive_large_mean(monkeypatch):
    # |mean| / std = 1e4: E[x^2] - E[x]^2 in fp32 would lose every digit of the variance.
    monkeypatch.setattr(gn_module, "MAX_TILE", 64)
    gen = torch.Generator().manual_seed(1)
    x = (1e4 + torch.randn(1, 20, 6, 7, generator=gen, dtype=torch.float64)).float().to(device())
    y = group_norm(x, None, None, 2, 1e-5, None, impl="triton")
    y_ref = F.group_norm(x.double(), 2, None, None, 1e-5)
    assert rel_err(y, y_ref) < 1e-3


def test_group_norm_reference_keeps_dtype_and_fp32_statistics():
    gen = torch.Generator().manual_seed(2)
    x = (100 + torch.randn(2, 8, 4, 4, generator=gen)).bfloat16()
    y = gn_module.group_norm_reference(x, None, None, 4, 1e-5, "silu")
    assert y.dtype == torch.bfloat16
    y_ref = F.silu(F.group_norm(x.double(), 4, None, None, 1e-5))
    assert rel_err(y, y_ref) < TOL[torch.bfloat16]
    # float64 stays float64 throughout (no detour through float32)
    x64 = torch.randn(2, 8, 4, 4, generator=gen, dtype=torch.float64) * 3 + 1
    w64 = torch.rand(8, generator=gen, dtype=torch.float64)
    y64 = gn_module.group_norm_reference(x64, w64, None, 4, 1e-5, "silu")
    assert y64.dtype == torch.float64 and rel_err(y64, F.silu(F.group_norm(x64, 4, w64, None, 1e-5))) < 1e-13


def _spy_on(monkeypatch, module, function_name):
    calls = []
    original = getattr(module, function_name).apply

    def apply(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(getattr(module, function_name), "apply", apply)
    return calls


def test_group_norm_dispatch(monkeypatch):
    x = torch.randn(2, 8, 3, 3)
    calls = _spy_on(monkeypatch, gn_module, "_GroupNormFunction")
    monkeypatch.delenv("KERNELS_IMPL", raising=False)
    y = group_norm(x, None, None, 4)  # auto on CPU: the reference
    assert not calls
    torch.testing.assert_close(y, gn_module.group_norm_reference(x, None, None, 4))
    monkeypatch.setenv("KERNELS_IMPL", "torch")
    group_norm(x, None, None, 4)
    assert not calls
    if not gn_module._is_interpreted(gn_module._gn_fwd_apply_kernel):
        pytest.skip("the Triton half needs TRITON_INTERPRET=1 before triton was first imported")
    monkeypatch.setenv("KERNELS_IMPL", "triton")
    group_norm(x, None, None, 4)
    assert len(calls) == 1
    group_norm(x, None, None, 4, impl="torch")  # the argument beats the environment
    assert len(calls) == 1
    monkeypatch.setenv("KERNELS_IMPL", "torch")
    group_norm(x, None, None, 4, impl="triton")
    assert len(calls) == 2


def test_group_norm_rejects_bad_input():
    x = torch.randn(2, 6, 4, 4)
    with pytest.raises(ValueError, match="x must be"):
        group_norm(torch.randn(6), None, None, 2)
    with pytest.raises(ValueError, match="divisor"):
        group_norm(x, None, None, 4)  # 6 channels, 4 groups
    with pytest.raises(ValueError, match="weight"):
        group_norm(x, torch.ones(5), None, 2)
    with pytest.raises(ValueError, match="act"):
        group_norm(x, None, None, 2, act="relu")
    with pytest.raises(ValueError, match="impl"):
        group_norm(x, None, None, 2, impl="cuda")
    with pytest.raises(ValueError, match="forced"):
        group_norm(x.double(), None, None, 2, impl="triton")  # float64 has no Triton path


# ----------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------
def attention_float64(q, k, v, dout):
    q, k, v = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    out = scores.softmax(dim=-1) @ v
    out.backward(dout.double())
    return out, q.grad, k.grad, v.grad


ATTN_CASES = [
    # (B, H, Lq, Lk, D, dtype, layout)
    pytest.param(1, 2, 100, 77, 40, torch.bfloat16, "bhld", id="D40-cross77-bf16"),
    pytest.param(1, 2, 100, 77, 40, torch.float32, "bhld", id="D40-cross77-fp32"),
    pytest.param(2, 1, 70, 70, 80, torch.bfloat16, "blhd", id="D80-self70-bf16-transposed-view"),
    pytest.param(1, 2, 70, 70, 80, torch.float16, "bhld", id="D80-self70-fp16"),
    pytest.param(1, 1, 70, 77, 160, torch.bfloat16, "bhld", id="D160-cross77-bf16"),
    pytest.param(1, 1, 90, 90, 160, torch.float32, "blhd", id="D160-self90-fp32-transposed-view"),
    pytest.param(1, 1, 150, 33, 64, torch.float16, "bhld", id="D64-q150-k33-fp16"),
    pytest.param(2, 1, 20, 9, 8, torch.float32, "bhld", id="D8-tiny"),
]


@triton_runs_here
@pytest.mark.parametrize("B, H, Lq, Lk, D, dtype, layout", ATTN_CASES)
def test_attention_triton_matches_float64(B, H, Lq, Lk, D, dtype, layout):
    check_attention(B, H, Lq, Lk, D, dtype, layout)


@triton_runs_here
@pytest.mark.parametrize("dtype, layout", [(torch.float16, "bhld"), (torch.float32, "blhd")])
def test_attention_triton_peaked_softmax(dtype, layout):
    """Logits 8 times larger (softmax nearly one-hot, scores up to ~30): the online softmax's running max at work."""
    check_attention(1, 2, 40, 50, 32, dtype, layout, scale=8.0)


def check_attention(B, H, Lq, Lk, D, dtype, layout, scale=1.0):
    gen = torch.Generator().manual_seed(stable_seed(B, H, Lq, Lk, D, dtype, layout))

    def make(L):
        t = (torch.randn(B, H, L, D, generator=gen, dtype=torch.float64) * scale ** 0.5).to(dtype)
        if layout == "blhd":  # what a U-Net passes: (B, L, H, D) storage seen as (B, H, L, D)
            t = t.transpose(1, 2).contiguous().transpose(1, 2)
        return t.to(device()).requires_grad_(True)

    q, k, v = make(Lq), make(Lk), make(Lk)
    dout = torch.randn(B, H, Lq, D, generator=gen, dtype=torch.float64).to(dtype).to(device())
    out = attention(q, k, v, impl="triton")
    out.backward(dout)
    out_ref, dq_ref, dk_ref, dv_ref = attention_float64(q, k, v, dout)

    assert out.dtype == dtype and out.shape == (B, H, Lq, D)
    tol = TOL[dtype]
    assert rel_err(out, out_ref) < tol
    assert rel_err(q.grad, dq_ref) < tol
    assert rel_err(k.grad, dk_ref) < tol
    assert rel_err(v.grad, dv_ref) < tol


def test_attention_dispatch(monkeypatch):
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    calls = _spy_on(monkeypatch, attn_module, "_AttentionFunction")
    monkeypatch.delenv("KERNELS_IMPL", raising=False)
    out = attention(q, k, v)  # auto on CPU: SDPA
    assert not calls
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))
    wide = torch.randn(1, 1, 4, 300)
    attention(wide, wide, wide)  # head dim beyond the kernels: SDPA, also when not forced
    with pytest.raises(ValueError, match="head dim"):
        attention(wide, wide, wide, impl="triton")
    if not attn_module._is_interpreted(attn_module._attn_fwd_kernel):
        pytest.skip("the Triton half needs TRITON_INTERPRET=1 before triton was first imported")
    monkeypatch.setenv("KERNELS_IMPL", "triton")
    attention(q, k, v)
    assert len(calls) == 1
    attention(q, k, v, impl="torch")
    assert len(calls) == 1
    monkeypatch.setenv("KERNELS_IMPL", "torch")
    attention(q, k, v, impl="triton")
    assert len(calls) == 2


def test_attention_rejects_bad_input(monkeypatch):
    q = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="4-D"):
        attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="same shape"):
        attention(q, q, torch.randn(1, 2, 6, 8))
    with pytest.raises(ValueError, match="agree"):
        attention(q, torch.randn(1, 2, 5, 16), torch.randn(1, 2, 5, 16))
    with pytest.raises(ValueError, match="dtype"):
        attention(q, q.double(), q.double())
    with pytest.raises(ValueError, match="impl"):
        attention(q, q, q, impl="flash")
    monkeypatch.setenv("KERNELS_IMPL", "fast")
    with pytest.raises(ValueError, match="KERNELS_IMPL"):
        attention(q, q, q)


# ----------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------
def _block(x, weight, bias, q, k, v):
    h = group_norm(x, weight, bias, 4, 1e-5, "silu")  # impl from KERNELS_IMPL
    cross = attention(q, k, v, impl="triton")
    self_attention = attention(q, q, q, impl="triton")  # one tensor three times
    return h.float().square().mean() + cross.float().square().mean() + self_attention.float().square().mean()


def _compile_inputs(dev):
    gen = torch.Generator().manual_seed(3)
    tensors = [
        torch.randn(2, 12, 5, 5, generator=gen),
        torch.randn(12, generator=gen),
        torch.randn(12, generator=gen),
        torch.randn(1, 2, 20, 40, generator=gen),
        torch.randn(1, 2, 77, 40, generator=gen),
        torch.randn(1, 2, 77, 40, generator=gen),
    ]
    return [t.to(dev).requires_grad_(True) for t in tensors]


def _check_compiled(backend, dev):
    torch._dynamo.reset()
    inputs = _compile_inputs(dev)
    compiled = torch.compile(_block, backend=backend, fullgraph=True)  # fullgraph: no graph breaks
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    loss_eager = _block(*inputs)
    grads_eager = torch.autograd.grad(loss_eager, inputs)
    torch.testing.assert_close(loss, loss_eager, rtol=1e-4, atol=1e-6)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager, rtol=1e-4, atol=1e-6)


@triton_runs_here
def test_compile_traces_without_graph_breaks(monkeypatch):
    monkeypatch.setenv("KERNELS_IMPL", "triton")
    # Dynamo level (fake-tensor tracing of the autograd.Functions and the custom ops). On the CPU
    # the interpreter cannot run inside AOTAutograd/Inductor, which need a GPU (next test).
    _check_compiled("eager", device())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor with Triton kernels needs a GPU")
def test_compile_inductor_cuda(monkeypatch):
    monkeypatch.setenv("KERNELS_IMPL", "triton")
    _check_compiled("inductor", "cuda")
