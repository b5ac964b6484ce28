"""classify.py's diffusion classifier: evaluations per second, batched against the per-class loop (whose errors
must agree), medians of --repeats runs after a warm-up. On CUDA: cifar10 preset, bf16, and compiled too.

    python benchmarks/diffusion_classifier.py [--preset cifar10] [--json out.json]
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import classify  # noqa: E402
from helpers import denoising_errors_loop  # noqa: E402  (the reference's loop, the tests' oracle)
import train_ddpm  # noqa: E402


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo")
    cpuinfo = cpuinfo.read_text() if cpuinfo.is_file() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")),
                 platform.processor() or platform.machine())
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()                                                              # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(args):
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    preset = args.preset or ("cifar10" if device.type == "cuda" else "small")
    resolution = args.resolution or (32 if preset == "cifar10" else 16)
    dtype = args.dtype if args.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    K = args.classes
    cfg = train_ddpm.unet_config(preset, resolution, K)
    torch.manual_seed(0)
    model = train_ddpm.UNet(cfg)
    for p in model.parameters():                                      # no zero-initialised layers: every input counts
        if not p.any():
            p.data.normal_(0, 0.05)
    model = model.to(device).eval().requires_grad_(False)
    diffusion = train_ddpm.Diffusion()
    B, P = args.images, args.timesteps
    x0 = torch.rand(B, 3, resolution, resolution, device=device) * 2 - 1
    noise = classify.draw_noise(range(B), P, (3, resolution, resolution)).to(device)
    timesteps = torch.tensor(classify.timestep_grid(diffusion.T, P), device=device)
    drops = classify.drop_counts(args.filters, 3 * resolution * resolution)
    stages = [(P, 1)]
    evaluations = B * K * P

    def loop():
        return denoising_errors_loop(model, x0, noise, diffusion.alphas_cumprod, timesteps, K, drops,
                                              amp_dtype=amp_dtype).mean(2).permute(2, 0, 1)

    def batched(net, pad):
        def run():
            return classify.classify_images(net, x0, noise, diffusion.alphas_cumprod, timesteps, stages, K, drops,
                                            batch_size=args.batch_size, amp_dtype=amp_dtype, pad=pad)[1]
        return run

    compile_model = args.compile if args.compile is not None else device.type == "cuda"
    variants = [("per-class loop", loop), ("batched", batched(model, False))]
    if compile_model:
        variants.append(("batched, compiled", batched(torch.compile(model), True)))
    settings = dict(device=device_name(device), preset=preset, resolution=resolution, classes=K, images=B, timesteps=P,
                    filters=args.filters, dtype=dtype, batch_size=args.batch_size, torch=torch.__version__)
    print(settings)
    rows, reference = [], None
    for name, fn in variants:
        seconds, scores = timed(fn, device, args.repeats)
        if reference is None:
            reference = scores
        diff = float((scores - reference).abs().max() / reference.abs().max())
        rows.append(dict(variant=name, seconds=seconds, evaluations_per_s=evaluations / seconds,
                         max_rel_diff_vs_loop=diff))
        print(f"  {name:20s} {evaluations / seconds:10.1f}/s ({seconds:.3f} s, vs loop {diff:.1e})", flush=True)
    speedup = rows[1]["evaluations_per_s"] / rows[0]["evaluations_per_s"]
    print(f"  batched / loop: {speedup:.2f}x")
    if args.json:
        results = dict(settings, rows=rows, speedup_batched_vs_loop=speedup)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default=None, choices=list(train_ddpm.PRESETS), help="cifar10 CUDA, small CPU")
    p.add_argument("--resolution", type=int, default=None, help="32 for cifar10, else 16")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images", type=int, default=None, help="64 CUDA, 8 CPU")
    p.add_argument("--timesteps", type=int, default=None, help="per class: 50 CUDA, 20 CPU")
    p.add_argument("--filters", type=lambda s: [float(v) for v in s.split(",")], default=[0.0, 1.0, 5.0, 10.0])
    p.add_argument("--batch-size", type=int, default=None, help="1024 CUDA, 256 CPU")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="also compiled (CUDA)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    return p


if __name__ == "__main__":
    args = build_parser().parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    args.images = args.images or (64 if cuda else 8)
    args.timesteps = args.timesteps or (50 if cuda else 20)
    args.batch_size = args.batch_size or (1024 if cuda else 256)
    main(args)
