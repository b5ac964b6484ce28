"""benchmarks/ddpm.py -- training and sampling throughput of train_ddpm.py's U-Net, side by side with diffusers.

    python benchmarks/ddpm.py                      # CPU: the small preset at 16 px, fp32
    python benchmarks/ddpm.py --preset cifar10     # GPU (default there): the 35.7M CIFAR-10 model, bf16
    python benchmarks/ddpm.py --json out.json      # also write the numbers

Rows, all on the same random data, batch, dtype and optimizer (AdamW, fused on CUDA; gradient clipping; the
training step of train_ddpm.py: q_sample, eps-MSE, backward, step, EMA):
  ours eager, torch kernels      every GroupNorm / attention through the PyTorch reference (impl="torch")
  ours eager, Triton kernels     castle_kernels/ Triton GroupNorm+SiLU and flash attention (CUDA only)
  ours compiled                  the above under torch.compile (Triton kernels on CUDA, torch on the CPU)
  diffusers UNet2DModel          the peer baseline: the same channel layout, blocks, attention levels, heads,
                                 groups and class embedding (eager, and compiled on CUDA)
Training images/s = batch / median step time. Sampling images/s = images / time of sample.generate (DDIM,
--sample-steps steps, classifier-free guidance: 2 images per forward). Goal on one H100 (cifar10 preset, bf16):
>= 5000 training images/s and faster than diffusers.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import sample  # noqa: E402
import train_ddpm  # noqa: E402
from common import autocast, autocast_dtype, resolve_device  # noqa: E402


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DModel with our layout, called as ours is: (x, t, y) -> eps."""

    def __init__(self, cfg):
        super().__init__()
        from diffusers import UNet2DModel
        down, up, side = [], [], cfg.resolution
        for level in range(len(cfg.channel_mult)):
            down.append("AttnDownBlock2D" if side in cfg.attention_resolutions else "DownBlock2D")
            side //= 2 if level < len(cfg.channel_mult) - 1 else 1
        up = [b.replace("Down", "Up") for b in reversed(down)]
        self.cfg = cfg
        self.unet = UNet2DModel(
            sample_size=cfg.resolution, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
            block_out_channels=tuple(cfg.channels * m for m in cfg.channel_mult), layers_per_block=cfg.num_res_blocks,
            down_block_types=tuple(down), up_block_types=tuple(up), attention_head_dim=cfg.head_channels,
            norm_num_groups=cfg.norm_groups, norm_eps=cfg.norm_eps, dropout=cfg.dropout, flip_sin_to_cos=True,
            freq_shift=0, resnet_time_scale_shift="scale_shift" if cfg.scale_shift_norm else "default",
            num_class_embeds=cfg.num_classes + 1, attn_norm_num_groups=cfg.norm_groups)  # the middle's norm too

    def forward(self, x, t, y):
        return self.unet(x, t, class_labels=y).sample


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_training(model, cfg, device, dtype, batch, iters, warmup, compile_model):
    diffusion = train_ddpm.Diffusion()
    model = model.to(device).train()
    ema = [p.detach().clone() for p in model.parameters()]
    params = list(model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4, fused=device.type == "cuda")
    step_model = torch.compile(model) if compile_model else model
    R = cfg.resolution
    x0 = torch.rand(batch, 3, R, R, device=device) * 2 - 1
    y = torch.randint(0, cfg.num_classes + 1, (batch,), device=device)

    def step():
        t = torch.randint(0, 1000, (batch,), device=device)
        noise = torch.randn_like(x0)
        with autocast(device, dtype):
            loss = diffusion.loss(step_model, x0, y, t, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        torch._foreach_lerp_(ema, params, 1e-4)

    t0 = time.time()
    for _ in range(warmup):
        step()
    sync(device)
    warm = time.time() - t0
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return batch / statistics.median(times), warm


def time_sampling(model, device, dtype, n, steps, compile_model):
    model = model.to(device).eval()
    run = torch.compile(model) if compile_model else model
    run.cfg = model.cfg
    abar = train_ddpm.Diffusion().alphas_cumprod
    labels, seeds = [i % model.cfg.num_classes for i in range(n)], list(range(n))
    sample.generate(run, abar, labels[:min(n, 8)], seeds[:min(n, 8)], model.cfg.num_classes, "ddim", 2,
                    "uniform", 5.0, batch_size=n, device=device, dtype=dtype)  # warm-up (and compilation)
    sync(device)
    t0 = time.perf_counter()
    sample.generate(run, abar, labels, seeds, model.cfg.num_classes, "ddim", steps, "uniform", 5.0,
                    batch_size=n, device=device, dtype=dtype)
    sync(device)
    return n / (time.perf_counter() - t0)


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or "CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores visible, {torch.get_num_threads()} threads"


def main(args):
    device = resolve_device(args.device)
    preset = args.preset or ("cifar10" if device.type == "cuda" else "small")
    resolution = args.resolution or (32 if preset == "cifar10" else 16)
    dtype = autocast_dtype(args.dtype, device)
    batch = args.batch_size or (128 if device.type == "cpu" else 256)
    cfg = train_ddpm.unet_config(preset, resolution, 10)
    torch.manual_seed(0)
    print(f"device: {machine(device)}; torch {torch.__version__}")
    print(f"preset {preset} ({sum(p.numel() for p in train_ddpm.UNet(cfg).parameters()) / 1e6:.2f}M), "
          f"{resolution}px, batch {batch}, {args.dtype if dtype else 'fp32'}, sampling: DDIM {args.sample_steps} steps "
          f"x {args.sample_n} images, guidance (2 images per forward)")
    rows = []

    def ours(impl):
        model = train_ddpm.UNet(cfg)
        train_ddpm.set_kernel_impl(model, impl)
        return model

    cuda = device.type == "cuda"
    variants = [("ours eager, torch kernels", lambda: ours("torch"), False)]
    if cuda:
        variants.append(("ours eager, Triton kernels", lambda: ours("triton"), False))
    if cuda or args.cpu_compile:
        variants.append((f"ours compiled, {'Triton' if cuda else 'torch'} kernels",
                         lambda: ours("triton" if cuda else "torch"), True))
    variants.append(("diffusers UNet2DModel eager", lambda: DiffusersUNet(cfg), False))
    if cuda:
        variants.append(("diffusers UNet2DModel compiled", lambda: DiffusersUNet(cfg), True))
    if args.only:
        variants = [v for v in variants if args.only in v[0]]
    for name, make, compiled in variants:
        try:
            train_rate, warm = time_training(make(), cfg, device, dtype, batch, args.iters, args.warmup, compiled)
            sample_rate = time_sampling(make(), device, dtype, args.sample_n, args.sample_steps, compiled)
            rows.append({"variant": name, "train_images_per_s": round(train_rate, 1),
                         "sample_images_per_s": round(sample_rate, 2), "warmup_s": round(warm, 1)})
        except Exception as e:  # one failing variant (e.g. no Triton) must not hide the others
            rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:200]})
        r = rows[-1]
        if "error" in r:
            print(f"{name:34s} failed: {r['error']}", flush=True)
        else:
            print(f"{name:34s} train {r['train_images_per_s']:9.1f} img/s   "
                  f"sample {r['sample_images_per_s']:8.2f} img/s"
                  f"   (warm-up incl. compile {r['warmup_s']} s)", flush=True)
        if cuda:
            torch.cuda.empty_cache()
    fp32 = next((r for r in rows if r["variant"] == "ours eager, torch kernels" and "error" not in r), None)
    if not cuda and fp32 and dtype is None:  # how study.py samples on CPUs with AMX (sample.py --dtype bf16)
        rate = time_sampling(ours("torch").to(memory_format=torch.channels_last), device, torch.bfloat16,
                             args.sample_n, args.sample_steps, False)
        rows.append({"variant": "ours eager, bf16 channels-last", "sample_images_per_s": round(rate, 2),
                     "sample_vs_fp32": round(rate / fp32["sample_images_per_s"], 2)})
        print(f"{'ours eager, bf16 channels-last':34s} sample {rate:8.2f} img/s "
              f"({rows[-1]['sample_vs_fp32']:.2f}x fp32; sampling only)", flush=True)
    result = {"machine": machine(device), "preset": preset, "resolution": resolution, "batch": batch,
              "dtype": args.dtype if dtype else "fp32", "sample_steps": args.sample_steps, "rows": rows}
    if cuda and preset == "cifar10":
        ok = {r["variant"]: r["train_images_per_s"] for r in rows if "error" not in r}
        best_ours = max((v for k, v in ok.items() if k.startswith("ours")), default=0)
        best_peer = max((v for k, v in ok.items() if k.startswith("diffusers")), default=0)
        result["goal_5000_img_s"] = best_ours >= 5000
        result["goal_faster_than_diffusers"] = best_ours > best_peer
        print(f"goal >= 5000 train img/s: {'MET' if best_ours >= 5000 else 'NOT MET'} ({best_ours:.0f}); "
              f"faster than diffusers: {'MET' if best_ours > best_peer else 'NOT MET'} ({best_peer:.0f})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, help="default: cifar10 on CUDA, small on the CPU")
    p.add_argument("--resolution", type=int, default=None, help="default: 32 for cifar10, 16 for small")
    p.add_argument("--batch-size", type=int, default=None, help="training batch (default: 256 CUDA, 128 CPU)")
    p.add_argument("--iters", type=int, default=None, help="timed training steps (default: 50 CUDA, 8 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 10 CUDA, 2 CPU)")
    p.add_argument("--sample-n", type=int, default=None, help="images sampled (default: 1024 CUDA, 128 CPU)")
    p.add_argument("--sample-steps", type=int, default=50)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--cpu-compile", action="store_true", help="also time torch.compile on the CPU (minutes)")
    p.add_argument("--only", default=None, help="run the variants whose name contains this")
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args()
    cuda = resolve_device(a.device).type == "cuda"
    a.iters = a.iters or (50 if cuda else 8)
    a.warmup = a.warmup or (10 if cuda else 2)
    a.sample_n = a.sample_n or (1024 if cuda else 128)
    main(a)
