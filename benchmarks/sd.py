"""Benchmark: finetune_sd.py's SD v1 U-Net against diffusers' UNet2DConditionModel, same weights.

    python benchmarks/sd.py                       # CPU: fp32, a reduced SD v1 (goal: time ratio ours/diffusers <= 1.0)
    python benchmarks/sd.py --size full --res 512 # GPU: SD v1.4 at 512 px, bf16 (goal: >= 1.3x diffusers with SDPA)

Medians of forward and forward+backward; on CUDA also compiled, MFU, and 50-step guided DDIM + VAE decoding.
"""
import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import finetune_sd as S  # noqa: E402
import sample  # noqa: E402

SIZES = {  # "full" is SD v1.4; "reduced" keeps its structure (4 levels, 8 heads, context 768) at a quarter width
    "full": dict(S.SD14_UNET),
    "reduced": {**S.SD14_UNET, "block_out_channels": [64, 128, 256, 256]},
    "tiny": {**S.SD14_UNET, "block_out_channels": [32, 64, 64, 64], "cross_attention_dim": 64},
}
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2}


def machine(device):
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}"
    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU: {name} ({torch.get_num_threads()} threads), torch {torch.__version__}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, clock=time.perf_counter):
    sync(device)
    t = clock()
    fn()
    sync(device)
    return clock() - t


def compare(fns, device, warmup, iters, clock=time.perf_counter):
    """{name: median seconds}, interleaved in alternating order: machine load hits them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for i in range(iters):
        for name in (list(fns) if i % 2 == 0 else list(fns)[::-1]):  # alternate the order: no position bias
            times[name].append(timed(fns[name], device, clock))
    return {name: statistics.median(t) for name, t in times.items()}


def build(config, device):
    """(ours, diffusers') U-Net, the same random weights."""
    from diffusers import UNet2DConditionModel
    torch.manual_seed(0)
    theirs = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    ours = S.load_checked(S._build(S.UNet, config), {k: v.clone() for k, v in theirs.state_dict().items()}, "bench", "")
    return ours.to(device).eval(), theirs.to(device).eval()


def flops_of(fn):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def peak_tflops(device, override):
    if override:
        return override
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main(args):
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype or
                                                                                   ("bf16" if cuda else "fp32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    # On a shared CPU, wall time measures the neighbours; one thread's CPU time does not.
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    config = SIZES[args.size]
    ours, theirs = build(config, device)
    h = args.res // 8
    g = torch.Generator(device).manual_seed(0)
    x = torch.randn(args.batch, 4, h, h, generator=g, device=device)
    t = torch.randint(0, 1000, (args.batch,), generator=g, device=device)
    ctx = torch.randn(args.batch, 77, config["cross_attention_dim"], generator=g, device=device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype != torch.float32 else \
        (lambda: torch.autocast(device.type, enabled=False))
    lines = [f"machine: {machine(device)}",
             f"U-Net {args.size} (block_out_channels {config['block_out_channels']}, 8 heads, context "
             f"{config['cross_attention_dim']}), {args.res} px (latents {h}x{h}), batch {args.batch}, {dtype}, "
             f"clock: {'process CPU time' if args.clock == 'cpu' else 'wall'}"]
    rows = []

    # forward (inference, weights in dtype)
    ours_i, theirs_i = ours.to(dtype), theirs.to(dtype)
    xd, ctxd = x.to(dtype), ctx.to(dtype)
    with torch.no_grad():
        a, b = ours_i(xd, t, ctxd).float(), theirs_i(xd, t, ctxd).sample.float()
    lines.append(f"forward relative difference to diffusers ({dtype}): {((a - b).norm() / b.norm()).item():.2e}")
    fwd = {"ours": lambda: ours_i(xd, t, ctxd), "diffusers": lambda: theirs_i(xd, t, ctxd).sample}
    if cuda and args.compile:
        compiled = torch.compile(ours_i)
        fwd["ours (compiled)"] = lambda: compiled(xd, t, ctxd)
    with torch.no_grad():
        res = compare(fwd, device, args.warmup, args.iters, clock)
        flops_fwd = flops_of(fwd["ours"]) if cuda else None
    rows.append(("forward", res, flops_fwd))

    # forward + backward (training: fp32 master weights, autocast)
    ours_t, theirs_t = ours.float().train(), theirs.float().train()

    def step(model, diffusers_output=False):
        def run():
            with autocast():
                out = model(x, t, ctx)
                out = out.sample if diffusers_output else out
            out.float().square().mean().backward()
        return run

    fb = {"ours": step(ours_t), "diffusers": step(theirs_t, True)}
    if cuda and args.compile:
        compiled_t = torch.compile(ours_t)
        fb["ours (compiled)"] = step(compiled_t)
    res = compare(fb, device, args.warmup, args.iters, clock)
    flops_fb = flops_of(fb["ours"]) if cuda else None
    rows.append(("forward+backward", res, flops_fb))
    ours_t.zero_grad(set_to_none=True)
    theirs_t.zero_grad(set_to_none=True)

    peak = peak_tflops(device, args.peak_tflops) if cuda else None
    table = ["| machine | pass | ours | diffusers | ours/diffusers (time) | speed-up | "
             + ("ours compiled | compiled speed-up | MFU ours | MFU compiled |" if cuda else ""),
             "|---|---|---|---|---|---|" + ("---|---|---|---|" if cuda else "")]
    for name, res, flops in rows:
        row = (f"| {machine(device).split(', torch')[0]} | {name} | {res['ours'] * 1e3:.1f} ms | "
               f"{res['diffusers'] * 1e3:.1f} ms | {res['ours'] / res['diffusers']:.3f} | "
               f"{res['diffusers'] / res['ours']:.2f}x |")
        if cuda:
            c = res.get("ours (compiled)")
            mfu = (lambda s: f"{flops / s / 1e12 / peak:.1%}" if peak and flops else "n/a")
            row += (f" {c * 1e3:.1f} ms | {res['diffusers'] / c:.2f}x | {mfu(res['ours'])} | {mfu(c)} |" if c else
                    f" - | - | {mfu(res['ours'])} | - |")
        table.append(row)

    if args.sample_batch:
        lines.append(sampling(args, config, ours.to(dtype).eval(), theirs.to(dtype).eval(), device, dtype))
    text = "\n".join(lines + [""] + table)
    print(text)
    if args.record:
        with open(Path(__file__).resolve().parent / "RESULTS.md", "a") as f:
            f.write(f"\n```\n{' '.join(['python benchmarks/sd.py'] + sys.argv[1:])}\n```\n{text}\n")


def sampling(args, config, ours, theirs, device, dtype):
    """50-step guided DDIM, then VAE decoding: ours vs diffusers."""
    from diffusers import AutoencoderKL, DDIMScheduler
    torch.manual_seed(1)
    vae_theirs = AutoencoderKL(**{k: v for k, v in S.SD14_VAE.items() if not k.startswith("_")})
    vae_theirs = vae_theirs.to(device, dtype).eval()
    vae_ours = S.load_checked(S._build(S.AutoencoderKL, S.SD14_VAE), dict(vae_theirs.state_dict()), "vae", "")
    schedule = S.NoiseSchedule()
    ac, timesteps = schedule.alphas_cumprod(), S.ddim_timesteps(schedule, 50).tolist()
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    b, h = args.sample_batch, args.res // 8
    g = torch.Generator(device).manual_seed(0)
    latents = torch.randn(b, 4, h, h, generator=g, device=device)
    cond = torch.randn(b, 77, config["cross_attention_dim"], generator=g, device=device, dtype=dtype)
    uncond = torch.randn(1, 77, config["cross_attention_dim"], generator=g, device=device, dtype=dtype)
    uncond = uncond.expand(b, -1, -1)
    compile_on = args.compile and device.type == "cuda"
    unet_ours = torch.compile(ours) if compile_on else ours

    def run_ours():
        z = sample.ddim(lambda x, t: S.guided_eps(unet_ours, x.to(dtype), t, cond, uncond, 5.0),
                        latents.to(dtype).float(), ac, timesteps, None, final_abar=schedule.alpha_bar(-1, ac))
        return S.decode_latents(vae_ours, z.to(dtype))

    def run_theirs():
        sched.set_timesteps(50)
        z = latents.clone()
        for step in sched.timesteps:
            eps_u, eps_c = theirs(torch.cat([z, z]).to(dtype), step, torch.cat([uncond, cond])).sample.float().chunk(2)
            z = sched.step(eps_u + 5.0 * (eps_c - eps_u), step, z).prev_sample
        return (vae_theirs.decode(z.to(dtype) / S.VAE_SCALE).sample.clamp(-1, 1) + 1) / 2

    with torch.no_grad():
        res = compare({"ours": run_ours, "diffusers": run_theirs}, device, 1, args.sample_iters)
    return (f"DDIM 50 steps, guidance 5, batch {b}, {args.res} px, {dtype}, + VAE: ours"
            f"{' (compiled U-Net)' if compile_on else ''} {res['ours']:.2f} s, diffusers {res['diffusers']:.2f} s, "
            f"speed-up {res['diffusers'] / res['ours']:.2f}x")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--size", default=None, choices=list(SIZES), help="CUDA: full, CPU: reduced")
    p.add_argument("--res", type=int, default=None, help="px (CUDA: 512, CPU: 256)")
    p.add_argument("--batch", type=int, default=None, help="CUDA: 8, CPU: 1")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="CUDA: bf16, CPU: fp32")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sample-batch", type=int, default=None, help="DDIM batch (CUDA: 16, CPU: 0)")
    p.add_argument("--sample-iters", type=int, default=3)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak")
    p.add_argument("--record", action="store_true", help="append to RESULTS.md")
    a = p.parse_args()
    gpu = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    a.size = a.size or ("full" if gpu else "reduced")
    a.res = a.res or (512 if gpu else 256)
    a.batch = a.batch or (8 if gpu else 1)
    a.sample_batch = a.sample_batch if a.sample_batch is not None else (16 if gpu else 0)
    a.warmup = a.warmup if a.warmup is not None else (3 if gpu else 1)
    a.iters = a.iters or (10 if gpu else 5)
    main(a)
