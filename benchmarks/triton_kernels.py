"""Benchmark of castle_kernels/ against PyTorch, on Stable Diffusion v1 shapes.

    python benchmarks/triton_kernels.py                 # GPU: SD-v1 shapes in bf16; CPU: --quick shapes
    python benchmarks/triton_kernels.py --quick         # small shapes (automatic on the CPU)
    python benchmarks/triton_kernels.py --dtype fp16 --iters 100
    python benchmarks/triton_kernels.py --compile-only  # no GPU needed: compile every kernel config for
                                                 # sm_90 (H100) and report shared memory per block

GroupNorm(32 groups) + SiLU: ours (impl="triton") against native F.group_norm + F.silu in the same
dtype; GB/s counts the bytes a fused kernel must move (forward: read x, write y; forward+backward:
that plus read x and dy, write dx) and is compared with a plain copy (read + write) of the same
tensor. Goals on a GPU: >= 1.5x PyTorch and >= 70% of copy bandwidth (forward).
Attention: ours against scaled_dot_product_attention with its fastest backend (each backend is
tried, the best is kept); TFLOP/s counts 4 B H Lq Lk D for the forward and 2.5x that for the
backward, on the real head dim D (not the padded one). Goal: at least SDPA's speed at D 40/80/160.
On the CPU the Triton path exists only under the interpreter, which is far too slow to time, so
"ours" is then the PyTorch reference the dispatcher falls back to (group_norm_reference: fp32
statistics; attention_reference: SDPA), which shows the benchmark runs, not the kernels' speed.
"""

import argparse
import importlib
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from castle_kernels.attention import attention  # noqa: E402
from castle_kernels.group_norm import group_norm  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
GROUPS = 32
# SD v1 U-Net GroupNorms: (channels, height, width) at each resolution of a 512 x 512 image.
GN_SHAPES = [(320, 64, 64), (640, 32, 32), (1280, 16, 16), (1280, 8, 8)]
GN_BATCHES = [1, 16]
GN_SHAPES_QUICK = [(320, 16, 16), (640, 8, 8), (1280, 4, 4)]
GN_BATCHES_QUICK = [1, 4]
# SD v1 attention: (query tokens, key tokens, head dim), 8 heads, batch 2 (guidance pair).
ATTN_SHAPES = [
    (4096, 4096, 40), (4096, 77, 40),
    (1024, 1024, 80), (1024, 77, 80),
    (256, 256, 160), (256, 77, 160),
    (64, 64, 160), (64, 77, 160),
]
ATTN_SHAPES_QUICK = [(256, 256, 40), (256, 77, 40), (64, 64, 80), (64, 77, 80), (16, 16, 160), (16, 77, 160)]
HEADS = 8


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"CPU: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores visible)"
    except OSError:
        pass
    return f"CPU: {platform.processor() or platform.machine()}"


def bench(fn, device, warmup, iters):
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize()
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def fwd_bwd(fn, inputs, grad):
    def run():
        out = fn(*inputs)
        torch.autograd.grad(out, inputs, grad)

    return run


def bench_group_norm(args, device, dtype, ours_impl):
    shapes = [(b, *s) for b in (GN_BATCHES_QUICK if args.quick else GN_BATCHES) for s in (GN_SHAPES_QUICK if args.quick else GN_SHAPES)]
    print(f"\nGroupNorm({GROUPS}) + SiLU, {str(dtype).replace('torch.', '')}; ours = impl={ours_impl!r}, torch = native F.group_norm + F.silu")
    header = (f"{'shape (N, C, H, W)':>22} | {'copy GB/s':>9} | {'fwd ours':>9} {'torch':>9} {'speedup':>7} {'% copy':>6} "
              f"| {'fwd+bwd ours':>12} {'torch':>9} {'speedup':>7} | {'rel err':>8}")
    print(header)
    print("-" * len(header))
    rows = []
    for shape in shapes:
        N, C, H, W = shape
        gen = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        weight = (1 + 0.1 * torch.randn(C, device=device, generator=gen)).to(dtype).requires_grad_(True)
        bias = (0.1 * torch.randn(C, device=device, generator=gen)).to(dtype).requires_grad_(True)
        dy = torch.randn_like(x)
        nbytes = x.numel() * x.element_size()
        copy_out = torch.empty_like(x)
        t_copy = bench(lambda: copy_out.copy_(x), device, args.warmup, args.iters)

        def ours(x, weight, bias):
            return group_norm(x, weight, bias, GROUPS, 1e-5, "silu", impl=ours_impl)

        def native(x, weight, bias):
            return F.silu(F.group_norm(x, GROUPS, weight, bias, 1e-5))

        with torch.no_grad():
            err = rel_err(ours(x, weight, bias), native(x.float(), weight.float(), bias.float()))
            t_ours = bench(lambda: ours(x, weight, bias), device, args.warmup, args.iters)
            t_torch = bench(lambda: native(x, weight, bias), device, args.warmup, args.iters)
        inputs = (x, weight, bias)
        tb_ours = bench(fwd_bwd(ours, inputs, dy), device, args.warmup, args.iters)
        tb_torch = bench(fwd_bwd(native, inputs, dy), device, args.warmup, args.iters)
        copy_gbs = 2 * nbytes / t_copy / 1e9
        fwd_gbs = 2 * nbytes / t_ours / 1e9
        print(f"{str(shape):>22} | {copy_gbs:9.2f} | {fwd_gbs:5.2f}GB/s {2 * nbytes / t_torch / 1e9:5.2f}GB/s {t_torch / t_ours:6.2f}x "
              f"{100 * fwd_gbs / copy_gbs:5.0f}% | {5 * nbytes / tb_ours / 1e9:6.2f}GB/s {5 * nbytes / tb_torch / 1e9:5.2f}GB/s "
              f"{tb_torch / tb_ours:6.2f}x | {err:8.1e}")
        rows.append((t_torch / t_ours, fwd_gbs / copy_gbs))
    if device.type == "cuda" and ours_impl == "triton":
        worst_speedup = min(r[0] for r in rows)
        worst_copy = min(r[1] for r in rows)
        print(f"goal fwd >= 1.5x torch: worst {worst_speedup:.2f}x {'MET' if worst_speedup >= 1.5 else 'NOT MET'}; "
              f">= 70% of copy: worst {100 * worst_copy:.0f}% {'MET' if worst_copy >= 0.7 else 'NOT MET'}")


def best_sdpa(device):
    """SDPA under each backend that accepts the inputs; returns a function timing the best."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH]
    if device.type != "cuda":
        backends = [None]  # the CPU picks its own (flash-attention CPU kernel or math)

    def run(make_fn, args, warmup, iters):
        best = (float("inf"), "none")
        for backend in backends:
            try:
                fn = make_fn(backend)
                t = bench(fn, device, warmup, iters)
            except RuntimeError:  # backend does not take this shape / dtype / hardware
                continue
            best = min(best, (t, "default" if backend is None else backend.name.lower()))
        return best

    return run, sdpa_kernel


def bench_attention(args, device, dtype, ours_impl):
    shapes = ATTN_SHAPES_QUICK if args.quick else ATTN_SHAPES
    batch = 1 if args.quick else 2
    print(f"\nAttention, batch {batch}, {HEADS} heads, {str(dtype).replace('torch.', '')}; ours = impl={ours_impl!r}, "
          "torch = SDPA (fastest backend)")
    header = (f"{'Lq, Lk, D':>16} | {'fwd ours':>12} {'SDPA':>12} {'ratio':>6} | {'fwd+bwd ours':>12} {'SDPA':>12} {'ratio':>6} "
              f"| {'SDPA backend fwd / fwd+bwd':>28} | {'rel err':>8}")
    print(header)
    print("-" * len(header))
    run_sdpa, sdpa_kernel = best_sdpa(device)
    ratios = []
    for Lq, Lk, D in shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(batch, HEADS, Lq, D, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        k = torch.randn(batch, HEADS, Lk, D, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        v = torch.randn(batch, HEADS, Lk, D, device=device, dtype=dtype, generator=gen).requires_grad_(True)
        dout = torch.randn_like(q)
        flops = 4 * batch * HEADS * Lq * Lk * D

        def ours(q, k, v):
            return attention(q, k, v, impl=ours_impl)

        def sdpa_under(backend, with_grad):
            def call(q, k, v):
                if backend is None:
                    return F.scaled_dot_product_attention(q, k, v)
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, v)

            if with_grad:
                return fwd_bwd(call, (q, k, v), dout)
            return lambda: call(q.detach(), k.detach(), v.detach())

        with torch.no_grad():
            err = rel_err(ours(q, k, v), F.scaled_dot_product_attention(q.float(), k.float(), v.float()))
            t_ours = bench(lambda: ours(q, k, v), device, args.warmup, args.iters)
        t_sdpa, name_fwd = run_sdpa(lambda b: sdpa_under(b, False), None, args.warmup, args.iters)
        tb_ours = bench(fwd_bwd(ours, (q, k, v), dout), device, args.warmup, args.iters)
        tb_sdpa, name_bwd = run_sdpa(lambda b: sdpa_under(b, True), None, args.warmup, args.iters)
        tf = lambda f, t: f / t / 1e12  # noqa: E731
        print(f"{f'{Lq}, {Lk}, {D}':>16} | {tf(flops, t_ours):7.3f}TF/s {tf(flops, t_sdpa):7.3f}TF/s {t_sdpa / t_ours:5.2f}x "
              f"| {tf(3.5 * flops, tb_ours):7.3f}TF/s {tf(3.5 * flops, tb_sdpa):7.3f}TF/s {tb_sdpa / tb_ours:5.2f}x "
              f"| {name_fwd + ' / ' + name_bwd:>28} | {err:8.1e}")
        ratios.append((D, t_sdpa / t_ours, tb_sdpa / tb_ours))
    if device.type == "cuda" and ours_impl == "triton":
        for D in sorted({r[0] for r in ratios}):
            worst = min(min(r[1], r[2]) for r in ratios if r[0] == D)
            print(f"goal >= SDPA at D={D}: worst ratio {worst:.2f}x {'MET' if worst >= 1.0 else 'NOT MET'}")


def compile_for_h100():
    """Ahead-of-time compile of every kernel configuration the launchers pick, for sm_90, with
    Triton's bundled ptxas: catches compile errors, shared-memory overflow and register spills (ptxas -v) without a
    GPU. (Uses triton.compile / ASTSource, an internal API that moves between Triton versions.)"""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attn = importlib.import_module("castle_kernels.attention")
    gn = importlib.import_module("castle_kernels.group_norm")
    smem_limit = 227 * 1024  # per block on H100 (opt-in)
    pointers = {"attention": {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ"}, "group_norm": {"X", "Y", "DY", "DX"}}
    fp32_pointers = {"attention": {"LSE", "DELTA"},
                     "group_norm": {"W", "B", "MEAN_PART", "M2_PART", "MEAN", "RSTD", "SUM_DZ_XHAT", "SUM_DZ"}}
    floats = {"qk_scale_log2", "sm_scale", "eps"}
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    failures = 0

    def build(fn, dtype, consts, num_warps, num_stages, label):
        nonlocal failures
        signature = {}
        for name in fn.arg_names:
            if name in consts:
                signature[name] = "constexpr"
            elif name in pointers[label.split()[0]]:
                signature[name] = "*" + dtype
            elif name in fp32_pointers[label.split()[0]]:
                signature[name] = "*fp32"
            else:
                signature[name] = "fp32" if name in floats else "i32"
        try:
            kernel = triton.compile(ASTSource(fn, signature, constexprs=consts), target=GPUTarget("cuda", 90, 32),
                                    options=dict(num_warps=num_warps, num_stages=num_stages))
            smem = kernel.metadata.shared
            with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:  # registers and spills, as ptxas reports them
                f.write(kernel.asm["ptx"])
                f.flush()
                report = subprocess.run([ptxas, "-v", "-arch=sm_90a", f.name, "-o", os.devnull], capture_output=True,
                                        text=True).stderr
            regs = re.search(r"Used (\d+) registers", report)
            spills = int((re.search(r"(\d+) bytes spill stores", report) or [0, 0])[1])
            failures += smem > smem_limit or spills > 0
            print(f"{label}: shared memory {smem / 1024:6.1f} KB{'  OVER THE LIMIT' if smem > smem_limit else ''}, "
                  f"{regs[1] if regs else '?'} registers{f', {spills} BYTES OF SPILL STORES' if spills else ''}")
        except Exception as e:  # report every failure, then the count
            failures += 1
            print(f"{label}: COMPILE FAILED {type(e).__name__}: {str(e).splitlines()[-1] if str(e) else ''}")

    unit_strides = {"stride_qd", "stride_kd", "stride_vd", "stride_od", "stride_dod", "stride_dkd", "stride_dqd"}
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        for D in (40, 64, 80, 128, 160, 256):
            block_d = attn._block_d(D)
            flags = dict(UPCAST_DOT=False, IEEE=dtype == torch.float32)
            f, b = attn._fwd_config(block_d, dtype), attn._bwd_config(block_d, dtype)
            jobs = [
                ("fwd", attn._attn_fwd_kernel, dict(BLOCK_M=f["BLOCK_M"], BLOCK_N=f["BLOCK_N"], **flags), f),
                ("dkdv", attn._attn_bwd_dkdv_kernel, dict(BLOCK_M=b["BLOCK_M"], BLOCK_N=b["BLOCK_N"], **flags), b),
                ("dq", attn._attn_bwd_dq_kernel, dict(BLOCK_M=b["BLOCK_N"], BLOCK_N=b["BLOCK_M"], **flags), b),
            ]
            for name, fn, consts, cfg in jobs:
                consts = dict(consts, BLOCK_D=block_d, **{s: 1 for s in unit_strides if s in fn.arg_names})
                blocks = ", ".join(f"{k}={v}" for k, v in consts.items() if k.startswith("BLOCK"))
                build(fn, dtype_name, consts, cfg["num_warps"], cfg["num_stages"],
                      f"attention {name:4s} {dtype_name} D={D:3d} ({blocks}, warps {cfg['num_warps']}, stages {cfg['num_stages']})")
    gn._sm_count = lambda device: 132  # H100 SXM
    for dtype_name in ("bf16", "fp32"):
        for N, C, H, W in [(1, 320, 64, 64), (16, 320, 64, 64), (1, 1280, 8, 8), (16, 1280, 8, 8), (4, 128, 4, 4)]:
            block_c, block_s, _, K, one_pass = gn._config(N, GROUPS, C // GROUPS, H * W, torch.device("cpu"))
            common = dict(BLOCK_C=block_c, BLOCK_S=block_s, stride_s=1)
            flags = dict(HAS_WEIGHT=True, HAS_BIAS=True, ACT_SILU=True)
            jobs = [("fwd_apply", gn._gn_fwd_apply_kernel, dict(flags, ONE_PASS=one_pass, BLOCK_K=triton.next_power_of_2(K))),
                    ("bwd_dx", gn._gn_bwd_dx_kernel, dict(flags, ONE_PASS=one_pass, BLOCK_K=triton.next_power_of_2(K)))]
            if not one_pass:
                jobs += [("fwd_stats", gn._gn_fwd_stats_kernel, {}), ("bwd_sums", gn._gn_bwd_sums_kernel, flags)]
            for name, fn, consts in jobs:
                warps = gn._bwd_dx_warps(block_c, block_s, one_pass) if name == "bwd_dx" else 4
                build(fn, dtype_name, dict(consts, **common), warps, 3,  # stages: Triton's default, as launched
                      f"group_norm {name:9s} {dtype_name} {(N, C, H, W)} (BLOCK_C={block_c}, BLOCK_S={block_s}, chunks={K})")
    print(f"{failures} failure(s)")
    return failures


def main(args):
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    if device.type == "cpu":
        args.quick = True
        torch.set_num_threads(1)  # steadier medians on a shared machine; these are smoke numbers
    dtype = DTYPES[args.dtype]
    gn_module = importlib.import_module("castle_kernels.group_norm")
    ours_impl = "triton" if device.type == "cuda" and gn_module.HAS_TRITON else "torch"
    print(f"device: {device_name(device)}" + ("" if device.type == "cuda" else ", 1 thread"))
    print(f"torch {torch.__version__}, triton {getattr(sys.modules.get('triton'), '__version__', 'not installed')}, "
          f"shapes: {'quick' if args.quick else 'SD v1'}, warmup {args.warmup}, iters {args.iters} (median)")
    if ours_impl == "torch":
        print("no GPU: 'ours' is the PyTorch reference path the dispatcher uses off-GPU; the Triton kernels are not timed")
    bench_group_norm(args, device, dtype, ours_impl)
    bench_attention(args, device, dtype, ours_impl)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes (always on the CPU)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto")
    parser.add_argument("--warmup", type=int, default=None, help="default: 10 on GPU, 2 on CPU")
    parser.add_argument("--iters", type=int, default=None, help="default: 50 on GPU, 20 on CPU")
    parser.add_argument("--compile-only", action="store_true", help="compile every kernel config for sm_90, no timing")
    args = parser.parse_args()
    if args.compile_only:
        sys.exit(1 if compile_for_h100() else 0)
    on_gpu = torch.cuda.is_available() and args.device != "cpu"
    args.warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 2)
    args.iters = args.iters if args.iters is not None else (50 if on_gpu else 20)
    main(args)
