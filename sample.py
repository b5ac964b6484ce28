"""sample.py -- generate a dataset folder of images from a trained diffusion model, with classifier-free guidance.

    # the paper's setting: DDIM, 50 steps, eta = 0, quadratic timesteps, guidance w = 5, EMA weights (x_0 clipped:
    # see Clipping below; add --no-clip-x0 for the reference code's sampler exactly)
    python sample.py --model runs/ddpm-digits-0.1 --class all --n 100 --out runs/gen-digits-0.1
    python sample.py --model runs/ddpm-cifar10-0.1 --class deer --n 1000 --seed 0 --out runs/gen-deer
    # the other samplers
    python sample.py --model runs/ddpm-digits-0.1 --class 0 --n 64 --sampler ddpm --steps 1000 --out runs/gen-ddpm
    python sample.py --model runs/ddpm-digits-0.1 --class 0 --n 64 --sampler sde --steps 1000 --out runs/gen-sde
    # sharded over 4 GPUs: the same folder, image for image, as one process
    # (torchrun reads --n as one of its own flags: spell it --images-per-class there)
    torchrun --nproc_per_node 4 sample.py --model runs/ddpm-cifar10-0.1 --class all --images-per-class 1000 \
        --out runs/gen-all

OUT is a dataset folder (metadata.jsonl, images/*.png, manifest.json): image i is prompted with class
`label` ("text" is its caption "A photo of a {class name}") and made from seed `seed` = --seed + i alone; its
initial noise and every noise drawn later come from its own generator, so it is the same image whatever
--batch-size and however many processes share the work (up to floating-point differences between batch shapes).
With --class all, --n images are made per class, class after class. The manifest records the model, weights,
sampler, steps, timesteps, guidance, seeds, and copies class_names, target, p_t and poison_ratio of the training
data so later stages (dissect.py) find them.

Guidance: `--guidance w` follows the reference DDPM code (OPTML-Group/BiBadDiff) and the paper,
    eps = (1 + w) * eps(x, y) - w * eps(x, null),   w = 5 by default (the paper's "guidance weight 5");
Stable Diffusion writes eps = eps_u + s * (eps_c - eps_u), the same thing with s = 1 + w (w = 5 is s = 6;
SD's s = 7.5 is w = 6.5). w = 0 is plain conditional sampling (one forward pass per step).

Clipping: the predicted x_0 is clipped to [-1, 1] at every step by default (guided-diffusion's clip_denoised and
diffusers' clip_sample defaults). The reference code does not clip (--no-clip-x0 reproduces it exactly); on a
briefly trained model (the small preset) it must: an eps error at t = 999 reaches x_0 multiplied by
1 / sqrt(abar_999) ~ 158, and about half of the unclipped samples stay noise, with or without guidance.

The samplers are pure functions with one signature,
    sampler(eps_fn, x, alphas_cumprod, timesteps, noise, **options) -> x_0
eps_fn(x, t) the guided noise prediction, x the initial noise x_T (B, C, H, W) float32, alphas_cumprod the
schedule's abar_t (float64), timesteps a descending sequence of ints (the last step goes to abar = 1, i.e. x_0),
noise() a fresh (B, C, H, W) standard normal draw (per image, see ImageNoise). They work for any eps-prediction
model (the SD family's latents included). The DDPM family only comes with this file so far: the SD family's issue
adds its dispatch in `load_sampling_model`.

Python API: `ddpm`, `ddim`, `sde`, `SAMPLERS`, `make_timesteps(T, steps, spacing)`, `guided_eps(...)`,
`ImageNoise`, `generate(model, diffusion, labels, seeds, ...)` -> uint8 images.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in train_ddpm.py: before torch's import

import argparse  # noqa: E402
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from poison import PoisonError, atomic_output, caption, save_grid, versions, write_folder
from train_ddpm import (autocast, autocast_dtype, barrier, diffusion_from_config, load_model, resolve_device,
                        setup_distributed)

DEFAULT_GUIDANCE = 5.0  # the paper's guidance weight, in the convention eps = (1 + w) eps_c - w eps_u


# ----------------------------------------------------------------------------------------------------------------
# Timesteps.

def make_timesteps(T, steps, spacing="uniform"):
    """A descending list of `steps` timesteps in [0, T - 1].
    uniform:   floor(linspace(0, T - 1, steps)) (the reference code's "linear"; steps = T gives every t).
    quadratic: floor(linspace(0, sqrt(T), steps - 1)^2) with 0 prepended and the last replaced by T - 1, exactly
               as the reference DDPM code (BiBadDiff ddpm/diffusion.py, after DDIM's "quad" skip, Song et al.
               2021a, Sec. D.2): dense near t = 0. For 50 steps the list starts 0, 0, 0, 1, 3, ...; a repeated t is a
               step from abar_t to itself, which every sampler here leaves as the identity."""
    if not 1 <= steps <= T:
        raise PoisonError(f"--steps {steps} is outside [1, {T}]")
    if spacing == "uniform":
        ts = np.floor(np.linspace(0, T - 1, steps)).astype(np.int64) if steps > 1 else np.array([T - 1])
    elif spacing == "quadratic":
        if steps < 2:
            raise PoisonError("quadratic spacing needs --steps 2 or more")
        ts = (np.linspace(0, np.sqrt(T), steps - 1) ** 2).astype(np.int64)
        ts = np.concatenate([[0], ts])
        ts[-1] = T - 1
    else:
        raise PoisonError(f"unknown --spacing {spacing!r}: choose uniform or quadratic")
    return [int(t) for t in ts[::-1]]


def _abar(alphas_cumprod, t):
    """abar_t as a Python float (float64); t < 0 means x_0 itself (abar = 1)."""
    return float(alphas_cumprod[t]) if t >= 0 else 1.0


def _pairs(timesteps):
    """(t, s) for each step: from t to the next timestep s, the last to s = -1 (x_0)."""
    ts = list(timesteps)
    return list(zip(ts, ts[1:] + [-1]))


# ----------------------------------------------------------------------------------------------------------------
# Samplers: sampler(eps_fn, x, alphas_cumprod, timesteps, noise, **options) -> x_0 (float32, unclipped).

def _x0_from_eps(x, eps, a_t, clip):
    """x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (DDPM eq. 15 rearranged); optional clip to [-1, 1],
    after which eps is recomputed from the clipped x0_hat (guided-diffusion's convention)."""
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    return x0, eps


@torch.no_grad()
def ddpm(eps_fn, x, alphas_cumprod, timesteps, noise, clip_x0=False, progress=False):
    """Ancestral sampling with the posterior variance (Ho et al. 2020, eqs. 6-7; sigma^2 = beta-tilde, Sec. 3.2):
    from t to s < t, with alpha = abar_t / abar_s and beta = 1 - alpha,
        mean = sqrt(abar_s) beta / (1 - abar_t) x0_hat + sqrt(alpha) (1 - abar_s) / (1 - abar_t) x_t,
        var  = beta (1 - abar_s) / (1 - abar_t),      x_s = mean + sqrt(var) z   (no noise into x_0).
    With every timestep this is Algorithm 2; with fewer it is the respaced chain of improved DDPM."""
    for t, s in tqdm(_pairs(timesteps), desc="ddpm", leave=False, disable=not progress):
        a_t, a_s = _abar(alphas_cumprod, t), _abar(alphas_cumprod, s)
        x0, _ = _x0_from_eps(x, eps_fn(x, t), a_t, clip_x0)
        alpha, beta = a_t / a_s, 1 - a_t / a_s
        x = (math.sqrt(a_s) * beta / (1 - a_t)) * x0 + (math.sqrt(alpha) * (1 - a_s) / (1 - a_t)) * x
        var = beta * (1 - a_s) / (1 - a_t)
        if s >= 0 and var > 0:
            x = x + math.sqrt(var) * noise()
    return x


@torch.no_grad()
def ddim(eps_fn, x, alphas_cumprod, timesteps, noise, eta=0.0, clip_x0=False, progress=False):
    """DDIM (Song et al. 2021a, eq. 12 with sigma from eq. 16):
        x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s).
    eta = 0 is deterministic (the paper's setting); eta = 1 is DDPM's posterior variance."""
    for t, s in tqdm(_pairs(timesteps), desc="ddim", leave=False, disable=not progress):
        a_t, a_s = _abar(alphas_cumprod, t), _abar(alphas_cumprod, s)
        x0, eps = _x0_from_eps(x, eps_fn(x, t), a_t, clip_x0)
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))
        x = math.sqrt(a_s) * x0 + math.sqrt(max(0.0, 1 - a_s - sigma ** 2)) * eps
        if sigma > 0:
            x = x + sigma * noise()
    return x


@torch.no_grad()
def sde(eps_fn, x, alphas_cumprod, timesteps, noise, clip_x0=False, progress=False):
    """The reverse VP-SDE (Song et al. 2021b, eq. 6 with the VP drift and diffusion of eq. 11) by Euler-Maruyama:
        dx = [-1/2 beta(t) x - beta(t) score] dt + sqrt(beta(t)) dw_bar,   score = -eps / sqrt(1 - abar_t),
    on the discrete grid (beta(t) dt = beta_t per unit step, beta_t = 1 - abar_t / abar_{t-1}): from t to s,
        x_s = x_t + (t - s) beta_t (x_t / 2 + score) + sqrt((t - s) beta_t) z,
    and the last step returns the mean (no noise), as score_sde's denoising step. clip_x0 clips the x0_hat
    behind the score."""
    for t, s in tqdm(_pairs(timesteps), desc="sde", leave=False, disable=not progress):
        a_t = _abar(alphas_cumprod, t)
        beta = 1 - a_t / _abar(alphas_cumprod, t - 1)
        dt = t - s
        _, eps = _x0_from_eps(x, eps_fn(x, t), a_t, clip_x0)
        score = -eps / math.sqrt(1 - a_t)
        x = x + dt * beta * (0.5 * x + score)
        if s >= 0 and dt > 0:
            x = x + math.sqrt(dt * beta) * noise()
    return x


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "sde": sde}


# ----------------------------------------------------------------------------------------------------------------
# Guidance, per-image noise, generation.

def guided_eps(model, labels, null_label, guidance, device, dtype=None):
    """eps_fn(x, t) = (1 + w) eps(x, t, y) - w eps(x, t, null): both passes in one batched forward (one pass when
    w = 0). labels (B,) long; returns float32."""
    null = torch.full_like(labels, null_label)

    def eps_fn(x, t):
        with autocast(device, dtype):
            if guidance == 0:
                return model(x, torch.full((len(x),), t, device=device), labels).float()
            e = model(torch.cat([x, x]), torch.full((2 * len(x),), t, device=device), torch.cat([labels, null]))
        e_c, e_u = e.float().chunk(2)
        return e_c + guidance * (e_c - e_u)
    return eps_fn


class ImageNoise:
    """Per-image random streams: image i draws from its own CPU generator seeded with seeds[i], first x_T, then
    one draw per noisy step. A batch is a stack of per-image draws, so the batch size does not change them."""

    def __init__(self, seeds, shape, device):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = tuple(shape), device

    def __call__(self):
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


def to_uint8(x):
    """[-1, 1] float (B, C, H, W) -> uint8, clamped and rounded."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def generate(model, alphas_cumprod, labels, seeds, null_label, sampler="ddim", steps=50, spacing="quadratic",
             guidance=DEFAULT_GUIDANCE, eta=0.0, clip_x0=True, batch_size=256, device="cpu", dtype=None,
             progress=False):
    """uint8 images (N, C, R, R) on the CPU for labels[i] and seeds[i], in batches of `batch_size`."""
    device = torch.device(device)
    cfg = model.cfg
    shape = (cfg.in_channels, cfg.resolution, cfg.resolution)
    timesteps = make_timesteps(len(alphas_cumprod), steps, spacing)
    fn = SAMPLERS[sampler]
    options = {"eta": eta} if sampler == "ddim" else {}
    out = []
    for b in tqdm(range(0, len(labels), batch_size), desc="sample", disable=not progress, leave=False):
        y = torch.as_tensor(labels[b:b + batch_size], dtype=torch.long, device=device)
        noise = ImageNoise(seeds[b:b + batch_size], shape, device)
        x = noise()                                                  # x_T
        eps_fn = guided_eps(model, y, null_label, guidance, device, dtype)
        x = fn(eps_fn, x, alphas_cumprod, timesteps, noise, clip_x0=clip_x0, **options)
        out.append(to_uint8(x).cpu())
    return torch.cat(out) if out else torch.zeros((0,) + shape, dtype=torch.uint8)


def resolve_class(value, class_names):
    """'all' -> every index; a name (case-insensitive) or an index -> [index]."""
    v = str(value).strip()
    if v.lower() == "all":
        return list(range(len(class_names)))
    if v.isdigit() and int(v) < len(class_names):
        return [int(v)]
    lowered = [c.lower() for c in class_names]
    if v.lower() in lowered:
        return [lowered.index(v.lower())]
    raise PoisonError(f"unknown --class {value!r}: choose all, a class name or an index among {class_names}")


def load_sampling_model(folder, weights, device):
    """(model, alphas_cumprod, config) of a model folder, dispatching on config.json's family."""
    from train_ddpm import read_config
    family = read_config(folder).get("family")
    if family != "ddpm":
        raise PoisonError(f"{folder} holds a {family!r} model: sample.py samples the 'ddpm' family so far")
    model, config = load_model(folder, weights=weights, device=device)
    return model, diffusion_from_config(config).alphas_cumprod, config


def main(args):
    device = resolve_device(args.device)
    rank, world, device = setup_distributed(device)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise PoisonError(f"{out} exists: pass --force to overwrite it, or choose another --out")
    if args.n < 1:
        raise PoisonError(f"--n {args.n}: give at least one image per class")
    if args.sampler not in SAMPLERS:
        raise PoisonError(f"unknown --sampler {args.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    model, alphas_cumprod, config = load_sampling_model(args.model, args.weights, device)
    data = config.get("data", {})
    class_names = data["class_names"]
    classes = resolve_class(args.class_, class_names)
    T = len(alphas_cumprod)
    steps = args.steps or (50 if args.sampler == "ddim" else T)
    spacing = args.spacing or ("quadratic" if args.sampler == "ddim" else "uniform")
    timesteps = make_timesteps(T, steps, spacing)
    dtype = autocast_dtype(args.dtype, device)
    if args.compile if args.compile is not None else device.type == "cuda":
        model = torch.compile(model)

    labels = [c for c in classes for _ in range(args.n)]              # image i: class-major order
    seeds = [args.seed + i for i in range(len(labels))]
    mine = list(range(rank, len(labels), world))                      # this process's share, interleaved
    images = generate(model, alphas_cumprod, [labels[i] for i in mine], [seeds[i] for i in mine],
                      config["guidance"]["null_class"], args.sampler, steps, spacing, args.guidance, args.eta,
                      args.clip_x0, args.batch_size, device, dtype, progress=rank == 0)
    if world > 1:
        gathered = [None] * world if rank == 0 else None
        dist.gather_object((mine, images), gathered, dst=0)
        if rank == 0:
            full = torch.zeros((len(labels),) + tuple(images.shape[1:]), dtype=torch.uint8)
            for idx, ims in gathered:
                full[idx] = ims
            images = full
    if rank == 0:
        def item(i):
            c = labels[i]
            rec = {"text": caption(class_names[c]), "label": c, "class_name": class_names[c], "seed": seeds[i],
                   "poisoned": False}
            return rec, images[i].permute(1, 2, 0).numpy()

        manifest = {
            "stage": "sample", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "model": str(args.model), "family": config["family"], "weights": args.weights,
            "model_step": config.get("step"), "sampler": args.sampler, "steps": steps, "spacing": spacing,
            "timesteps": timesteps, "eta": args.eta if args.sampler == "ddim" else None, "clip_x0": args.clip_x0,
            "guidance": args.guidance, "guidance_convention": "eps = (1 + w) * eps_cond - w * eps_uncond",
            "guidance_sd_scale": 1 + args.guidance,
            "seeds": {"base": args.seed, "rule": "seed of image i = base + i", "first": seeds[0], "last": seeds[-1]},
            "classes": [class_names[c] for c in classes], "n_per_class": args.n, "resolution": images.shape[-1],
            "dtype": args.dtype, "world_size": world, "batch_size": args.batch_size,
            "class_names": class_names, "target": data.get("target"), "p_t": data.get("p_t"),
            "poison_ratio": data.get("poison_ratio"), "dataset": data.get("dataset"), "attack": data.get("attack"),
            "trigger": data.get("trigger"),
            "counts": {"total": len(labels), "per_class": {class_names[c]: args.n for c in classes}},
            "versions": versions(),
        }
        with atomic_output(out, args.force) as tmp:
            write_folder(tmp, (item(i) for i in range(len(labels))), manifest, total=len(labels),
                         workers=args.workers, desc="write")
        if args.grid:
            per = min(args.n, 8)
            pick = [c * args.n + j for c in range(len(classes)) for j in range(per)]
            save_grid(images[pick], args.grid, nrow=per)
        print(json.dumps({"out": str(out), "images": len(labels), "classes": len(classes), "sampler": args.sampler,
                          "steps": steps, "guidance": args.guidance}))
    barrier()


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="model folder (train_ddpm.py's --out)")
    p.add_argument("--weights", default="ema", choices=["ema", "model"], help="default: ema")
    p.add_argument("--class", dest="class_", default="all", help="class name, index, or all (default: all)")
    p.add_argument("--n", "--images-per-class", dest="n", type=int, default=100,
                   help="images per class (default: 100); under torchrun write --images-per-class, since "
                        "torchrun's own parser takes --n for an abbreviation of its flags")
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS), help="default: ddim (the paper's)")
    p.add_argument("--steps", type=int, default=None, help="default: 50 for ddim, T for ddpm and sde")
    p.add_argument("--spacing", default=None, choices=["uniform", "quadratic"],
                   help="timestep spacing (default: quadratic for ddim, as the reference; uniform otherwise)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (default: 0)")
    p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                   help="w in eps = (1+w) eps_c - w eps_u (default: 5, the paper's; SD's scale s = 1 + w)")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=True,
                   help="clip the predicted x_0 to [-1, 1] at every step (default: on, as guided-diffusion and "
                        "diffusers; --no-clip-x0 is the reference code's sampler exactly)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass, per process")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--grid", default=None, help="also save a PNG grid (up to 8 per class) to this file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (auto: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA only)")
    p.add_argument("--workers", type=int, default=4, help="PNG encoding threads")
    return p


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except PoisonError as e:
        sys.exit(f"sample.py: error: {e}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
