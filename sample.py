"""Generate a dataset folder from a DDPM (train_ddpm.py) or Stable Diffusion, with classifier-free guidance.

    python sample.py --model runs/ddpm-digits --n 100 --out runs/gen-digits
    python sample.py --model runs/sd-imagenette --class "garbage truck" --sampler sde --out runs/gen-truck
    python sample.py --model CompVis/stable-diffusion-v1-4 --prompt "A photo of a cat" --n 8 --out runs/g
    torchrun --nproc_per_node 4 sample.py --model runs/ddpm-cifar10 --images-per-class 1000 --out runs/gen

OUT: metadata.jsonl, images/*.png, manifest.json; image i from seed --seed + i alone. Defaults are the paper's:
DDIM, 50 steps, EMA weights, guidance 5 (DDPM's w = SD's s - 1).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in train_ddpm.py: before torch's import

import argparse  # noqa: E402
import json
import math
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import finetune_sd
from common import (HelpFormatter, UsageError, atomic_output, autocast, autocast_dtype, barrier, check_file_out,
                    check_memory, check_out, cli, dtype_name, finite, positive, resolve_device, save_grid,
                    setup_distributed, versions, write_folder)
from poison import caption
from train_ddpm import diffusion_from_config, load_model, read_config

DEFAULT_GUIDANCE = 5.0     # DDPM family: the paper's w in eps = (1 + w) eps_c - w eps_u
DEFAULT_SD_GUIDANCE = 5.0  # SD family: s in eps = eps_u + s (eps_c - eps_u)
DDPM_SPACINGS = ("uniform", "quadratic")          # make_timesteps
SD_SPACINGS = ("leading", "trailing", "linspace")  # diffusers' timestep_spacing (finetune_sd.ddim_timesteps)


# Samplers: sampler(eps_fn, x, alphas_cumprod, timesteps, noise, **options) -> x_0 (float32, unclipped) --------------
# eps_fn(x, t) is the guided noise prediction, x the initial noise x_T (B, C, H, W), alphas_cumprod abar_t in float64,
# timesteps descending ints (the last step goes to abar = 1, x_0), noise() a fresh (B, C, H, W) draw (ImageNoise).

def make_timesteps(T, steps, spacing="uniform"):
    """`steps` descending timesteps in [0, T - 1]; quadratic: the reference code's (DDIM Sec. D.2)."""
    if not 1 <= steps <= T:
        raise UsageError(f"--steps {steps} is outside [1, {T}]")
    if spacing == "uniform":
        ts = np.floor(np.linspace(0, T - 1, steps)).astype(np.int64) if steps > 1 else np.array([T - 1])
    elif spacing == "quadratic":
        if steps < 2:
            raise UsageError("quadratic spacing needs --steps 2 or more")
        ts = (np.linspace(0, np.sqrt(T), steps - 1) ** 2).astype(np.int64)
        ts = np.concatenate([[0], ts])
        ts[-1] = T - 1
    else:
        raise UsageError(f"unknown --spacing {spacing!r}: choose uniform or quadratic")
    return [int(t) for t in ts[::-1]]


def _abar(alphas_cumprod, t):
    return float(alphas_cumprod[t]) if t >= 0 else 1.0  # t = -1: x_0 itself


def _pairs(timesteps):  # (t, s) for each step, the last to s = -1 (x_0)
    return list(zip(timesteps, [*timesteps[1:], -1]))


def _x0_from_eps(x, eps, a_t, clip):
    """x0_hat (DDPM eq. 15), clipped or not, and the eps it implies."""
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    if clip:
        x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    return x0, eps


@torch.no_grad()
def ddpm(eps_fn, x, alphas_cumprod, timesteps, noise, clip_x0=False, progress=False):
    """Ancestral sampling with the posterior variance beta-tilde (Ho et al. 2020, eqs. 6-7, Algorithm 2)."""
    for t, s in tqdm(_pairs(timesteps), desc="ddpm", leave=False, disable=not progress):
        a_t, a_s = _abar(alphas_cumprod, t), _abar(alphas_cumprod, s)
        x0, _ = _x0_from_eps(x, eps_fn(x, t), a_t, clip_x0)
        alpha, beta = a_t / a_s, 1 - a_t / a_s  # the mean of q(x_s | x_t, x0_hat) (eq. 7), then its variance
        x = (math.sqrt(a_s) * beta / (1 - a_t)) * x0 + (math.sqrt(alpha) * (1 - a_s) / (1 - a_t)) * x
        var = beta * (1 - a_s) / (1 - a_t)
        if s >= 0 and var > 0:
            x = x + math.sqrt(var) * noise()
    return x


@torch.no_grad()
def ddim(eps_fn, x, alphas_cumprod, timesteps, noise, eta=0.0, clip_x0=False, final_abar=1.0, progress=False):
    """DDIM (Song et al. 2021a, eq. 12, sigma from eq. 16); final_abar: abar after the last step (SD: abar_0)."""
    for t, s in tqdm(_pairs(timesteps), desc="ddim", leave=False, disable=not progress):
        a_t, a_s = _abar(alphas_cumprod, t), (_abar(alphas_cumprod, s) if s >= 0 else final_abar)
        x0, eps = _x0_from_eps(x, eps_fn(x, t), a_t, clip_x0)
        sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s))  # eta 1: DDPM's variance, eta 0: deterministic
        x = math.sqrt(a_s) * x0 + math.sqrt(max(0.0, 1 - a_s - sigma ** 2)) * eps
        if sigma > 0:
            x = x + sigma * noise()
    return x


@torch.no_grad()
def sde(eps_fn, x, alphas_cumprod, timesteps, noise, clip_x0=False, progress=False):
    """Euler-Maruyama on the reverse VP-SDE (Song et al. 2021b, eqs. 6 and 11); the last step returns the mean."""
    for t, s in tqdm(_pairs(timesteps), desc="sde", leave=False, disable=not progress):
        a_t = _abar(alphas_cumprod, t)
        beta = 1 - a_t / _abar(alphas_cumprod, t - 1)
        dt = t - s  # beta(t) dt = (t - s) beta_t on the discrete grid
        _, eps = _x0_from_eps(x, eps_fn(x, t), a_t, clip_x0)
        score = -eps / math.sqrt(1 - a_t)
        x = x + dt * beta * (0.5 * x + score)
        if s >= 0 and dt > 0:
            x = x + math.sqrt(dt * beta) * noise()
    return x


SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "sde": sde}


# Guidance, per-image noise, generation ------------------------------------------------------------------------------

def guided_eps(model, labels, null_label, guidance, device, dtype=None):
    """DDPM: eps_fn(x, t) = (1 + w) eps(x, t, y) - w eps(x, t, null), both in one batched forward."""
    null = torch.full_like(labels, null_label)

    def eps_fn(x, t):
        with autocast(device, dtype):
            if guidance == 0:
                return model(x, torch.full((len(x),), t, device=device), labels).float()
            e = model(torch.cat([x, x]), torch.full((2 * len(x),), t, device=device), torch.cat([labels, null]))
        e_c, e_u = e.float().chunk(2)
        return e_c + guidance * (e_c - e_u)
    return eps_fn


def sd_guided_eps(unet, context, uncond_context, scale, device, dtype=None):
    """SD: eps_fn(x, t) = eps_u + s (eps_c - eps_u), eps_u for the empty prompt, in one batched forward."""
    def eps_fn(x, t):
        with autocast(device, dtype):
            return finetune_sd.guided_eps(unet, x, t, context, uncond_context, scale).float()
    return eps_fn


class ImageNoise:
    """Image i draws all its noise from its own generator, seeded with seeds[i]."""

    def __init__(self, seeds, shape, device):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = tuple(shape), device

    def __call__(self):
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


def to_uint8(x):
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)  # [-1, 1] -> uint8


def in_batches(seeds, shape, batch_size, device, run, image_shape, progress=False):
    """uint8 images from run(batch slice, x_T, noise)."""
    out = [torch.zeros((0, *image_shape), dtype=torch.uint8)]
    for b in tqdm(range(0, len(seeds), batch_size), desc="sample", disable=not progress, leave=False):
        batch = slice(b, b + batch_size)
        noise = ImageNoise(seeds[batch], shape, device)
        out.append(run(batch, noise(), noise).cpu())
    return torch.cat(out)


def sampler_options(sampler, eta, clip_x0, final_abar=1.0):
    return {"eta": eta, "clip_x0": clip_x0, "final_abar": final_abar} if sampler == "ddim" else {"clip_x0": clip_x0}


def generate(model, alphas_cumprod, labels, seeds, null_label, sampler="ddim", steps=50, spacing="quadratic",
             guidance=DEFAULT_GUIDANCE, eta=0.0, clip_x0=True, batch_size=256, device="cpu", dtype=None,
             progress=False):
    """DDPM: uint8 images (N, C, R, R) for labels[i] and seeds[i]."""
    device = torch.device(device)
    shape = (model.cfg.in_channels, model.cfg.resolution, model.cfg.resolution)
    timesteps = make_timesteps(len(alphas_cumprod), steps, spacing)
    fn, options = SAMPLERS[sampler], sampler_options(sampler, eta, clip_x0)

    def run(batch, x, noise):
        y = torch.as_tensor(labels[batch], dtype=torch.long, device=device)
        eps_fn = guided_eps(model, y, null_label, guidance, device, dtype)
        return to_uint8(fn(eps_fn, x, alphas_cumprod, timesteps, noise, **options))
    return in_batches(seeds, shape, batch_size, device, run, shape, progress)


@torch.no_grad()
def generate_sd(sd, embeds, prompt_ids, seeds, timesteps, sampler="ddim", guidance=DEFAULT_SD_GUIDANCE, eta=0.0,
                resolution=None, batch_size=16, device="cpu", dtype=None, progress=False):
    """SD: uint8 images (N, 3, R, R) for embeds[prompt_ids[i]] and seeds[i]; embeds[-1]: the empty prompt."""
    device = torch.device(device)
    f = vae_factor(sd.vae)
    resolution = resolution or default_resolution(sd)
    shape = (sd.unet.layout["in_channels"], resolution // f, resolution // f)
    ac = sd.schedule.alphas_cumprod()
    fn, options = SAMPLERS[sampler], sampler_options(sampler, eta, False, sd.schedule.alpha_bar(-1, ac))
    embeds = embeds.to(device)

    def run(batch, x, noise):
        ids = torch.as_tensor(prompt_ids[batch], dtype=torch.long, device=device)
        eps_fn = sd_guided_eps(sd.unet, embeds[ids], embeds[-1:].expand(len(ids), -1, -1), guidance, device, dtype)
        latents = fn(eps_fn, x, ac, timesteps, noise, **options)
        return (finetune_sd.decode_latents(sd.vae, latents.float()).clamp(0, 1) * 255).round().to(torch.uint8)
    return in_batches(seeds, shape, batch_size, device, run, (3, resolution, resolution), progress)


def vae_factor(vae):  # the VAE's downsampling: 8 for SD
    return 2 ** (len(finetune_sd.vae_layout(vae.config)["block_out_channels"]) - 1)


def default_resolution(sd, config=None):  # the fine-tuning resolution, else the U-Net's (SD v1: 512)
    return int((config or {}).get("resolution") or sd.unet.config.get("sample_size", 64) * vae_factor(sd.vae))


# Models, classes and prompts ----------------------------------------------------------------------------------------

def resolve_class(value, class_names):
    """'all' -> every index; a name (any case) or an index -> [index]."""
    v = str(value).strip()
    if v.lower() == "all":
        return list(range(len(class_names)))
    if v.isdigit() and int(v) < len(class_names):
        return [int(v)]
    lowered = [c.lower() for c in class_names]
    if v.lower() in lowered:
        return [lowered.index(v.lower())]
    raise UsageError(f"unknown --class {value!r}: choose all, a class name or an index among {class_names}")


def model_family(source):
    """'ddpm' or 'sd'."""
    path = Path(str(source)).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        config = read_config(path)
        family = config.get("family")
        if family not in ("ddpm", "sd"):
            stage = config.get("stage")
            if stage == "finetune_sd":
                raise UsageError(f"--model {path} is a finetune_sd.py run that has saved no model yet: rerun it")
            what = (f"a {stage!r} folder" if stage else f"a {family!r} model" if family else "no diffusion model")
            raise UsageError(f"--model {path} holds {what}: give a model folder of train_ddpm.py or finetune_sd.py")
        return family
    if path.is_dir() and not (path / "unet").is_dir():
        raise UsageError(f"--model {source}: neither a model folder nor a diffusers folder: give one")
    if not path.exists() and not finetune_sd.HUB_ID.fullmatch(str(source)):
        raise UsageError(f"--model {source}: no such file or folder, nor Hub id")
    if path.is_file() and (path.parent / "config.json").is_file():
        family = read_config(path.parent).get("family")
        if family in ("ddpm", "sd"):
            raise UsageError(f"--model {source} is a weights file of the {family} model folder {path.parent}: give "
                             "the folder")
    return "sd"


def load_sampling_model(source, weights=None, device="cpu", sd_config=None, tokenizer=None):
    """(model, alphas_cumprod (T,) float64, config, weights used)."""
    family = model_family(source)
    if family == "ddpm":
        weights = weights or "ema"
        model, config = load_model(source, weights=weights, device=device)
        return model, diffusion_from_config(config).alphas_cumprod, config, weights
    path = Path(str(source)).expanduser()
    config = read_config(path) if path.is_dir() and (path / "config.json").is_file() else {"family": "sd"}
    weights = weights or ("ema" if "base" in config else "model")
    sd = finetune_sd.load_sd(source, device, torch.float32, sd_config, tokenizer, use_ema=weights == "ema")
    return sd, sd.schedule.alphas_cumprod(), config, weights


def training_select(config):
    """poison.py's --select behind the training data, or None."""
    data = config.get("data")
    for d in (config, data if isinstance(data, dict) else {}, (config.get("training") or {}).get("poison") or {}):
        if d.get("select"):
            return d["select"]
    path = data.get("path") if isinstance(data, dict) else data
    try:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
    except (TypeError, OSError, ValueError):
        return None
    return (manifest.get("options") or {}).get("select") or manifest.get("select")


def resolve_jobs(args, class_names, class_prompts):
    """[(text, label)] per group of --n images (label -1: no class's caption)."""
    if args.prompt:
        if args.class_ is not None:
            raise UsageError("give --class or --prompt, not both")
        lowered = [p.strip().lower() if p else None for p in class_prompts]
        return [(p, lowered.index(p.strip().lower()) if p.strip().lower() in lowered else -1) for p in args.prompt]
    if not class_names:
        raise UsageError(f"{args.model} knows no classes: give --prompt \"...\" instead of --class")
    return [(class_prompts[c] or caption(class_names[c]), c) for c in resolve_class(args.class_ or "all", class_names)]


# The two families' plans: what to make, how, and what the manifest records ------------------------------------------

@dataclass
class Plan:
    jobs: list          # [(text, label)]: each makes --n images, image i of job j is number j * n + i
    generate: object    # generate(indices, seeds, progress) -> uint8 (len(indices), 3, R, R)
    manifest: dict      # the family's entries of the manifest
    class_names: list


def plan_ddpm(args, model, alphas_cumprod, config, weights, device, dtype):
    data = config.get("data", {})
    class_names = data["class_names"]
    jobs = resolve_jobs(args, class_names, [caption(c) for c in class_names])
    bad = [text for text, label in jobs if label < 0]
    if bad:
        raise UsageError(f"--prompt {bad[0]!r}: a DDPM knows its classes only: use --class")
    if args.resolution not in (None, model.cfg.resolution):
        raise UsageError(f"--resolution {args.resolution}: this DDPM makes {model.cfg.resolution} px; drop it")
    T = len(alphas_cumprod)
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    if guidance != 0 and (config.get("guidance") or {}).get("label_dropout") == 0:
        raise UsageError(f"{args.model} was trained with --label-dropout 0: sample with --guidance 0")
    clip_x0 = True if args.clip_x0 is None else args.clip_x0
    steps = args.steps or (50 if args.sampler == "ddim" else T)
    spacing = args.spacing or ("quadratic" if args.sampler == "ddim" else "uniform")
    if spacing not in DDPM_SPACINGS:
        raise UsageError(f"--spacing {spacing} is SD's: give uniform or quadratic")
    timesteps = make_timesteps(T, steps, spacing)
    labels = [label for _, label in jobs for _ in range(args.n)]

    def make(indices, seeds, progress):
        return generate(model, alphas_cumprod, [labels[i] for i in indices], seeds,
                        config["guidance"]["null_class"], args.sampler, steps, spacing, guidance, args.eta, clip_x0,
                        args.batch_size or 256, device, dtype, progress=progress)

    manifest = {
        "weights": weights, "model_step": config.get("step"), "steps": steps, "spacing": spacing,
        "timesteps": timesteps, "clip_x0": clip_x0, "guidance": guidance,
        "guidance_convention": "eps = (1 + w) * eps_cond - w * eps_uncond", "guidance_sd_scale": 1 + guidance,
        "guidance_ddpm_w": guidance, "batch_size": args.batch_size or 256,
        **{k: data.get(k) for k in ("target", "p_t", "poison_ratio", "dataset", "attack", "trigger")}}
    return Plan(jobs, make, manifest, class_names)


def plan_sd(args, sd, alphas_cumprod, config, weights, device, dtype):
    class_names = config.get("class_names") or []
    class_prompts = config.get("class_prompts") or [caption(c) for c in class_names]
    jobs = resolve_jobs(args, class_names, class_prompts)
    T = len(alphas_cumprod)
    guidance = DEFAULT_SD_GUIDANCE if args.guidance is None else args.guidance
    if args.clip_x0:
        raise UsageError("--clip-x0: SD's latents are not bounded to [-1, 1]; drop it")
    steps = args.steps or (50 if args.sampler == "ddim" else T)
    spacing = args.spacing or (sd.schedule.timestep_spacing if args.sampler == "ddim" else "uniform")
    if spacing in DDPM_SPACINGS:
        timesteps = make_timesteps(T, steps, spacing)
    else:  # the scheduler's (SD v1: leading, steps_offset 1): 981, 961, ..., 1 for 50 steps, as diffusers'
        timesteps = finetune_sd.ddim_timesteps(replace(sd.schedule, timestep_spacing=spacing), steps).tolist()
    if max(timesteps) >= T:
        raise UsageError(f"--steps {steps} reaches t = {max(timesteps)}, past the last training step: use fewer")
    resolution = args.resolution or default_resolution(sd, config)
    if resolution < 1 or resolution % vae_factor(sd.vae):
        raise UsageError(f"--resolution {resolution}: give a multiple of the VAE's downsampling")
    texts = sorted({text for text, _ in jobs})
    embeds = finetune_sd.encode_prompts(sd.text_encoder, sd.tokenizer, texts + [""]).float()
    prompt_ids = [texts.index(text) for text, _ in jobs for _ in range(args.n)]
    if args.compile if args.compile is not None else device.type == "cuda":
        sd.unet = torch.compile(sd.unet)

    def make(indices, seeds, progress):
        return generate_sd(sd, embeds, [prompt_ids[i] for i in indices], seeds, timesteps,
                           args.sampler, guidance, args.eta, resolution, args.batch_size or 16, device, dtype,
                           progress=progress)

    manifest = {
        "weights": weights, "base": sd.base, "load_notes": sd.notes,
        "model_step": (config.get("progress") or {}).get("step"), "steps": steps, "spacing": spacing,
        "timesteps": timesteps, "clip_x0": False, "final_alpha_cumprod": sd.schedule.alpha_bar(-1, alphas_cumprod),
        "guidance": guidance, "guidance_convention": "eps = eps_uncond + s * (eps_cond - eps_uncond), uncond = \"\"",
        "guidance_sd_scale": guidance, "guidance_ddpm_w": guidance - 1, "batch_size": args.batch_size or 16,
        "resolution": resolution, "schedule": asdict(sd.schedule), "vae_scale": sd.vae_scale,
        "prompts": [text for text, _ in jobs],
        **{k: config.get(k) for k in ("target", "p_t", "poison_ratio", "dataset", "attack", "trigger")}}
    return Plan(jobs, make, manifest, class_names)


# The command line ---------------------------------------------------------------------------------------------------

def main(args):
    device = resolve_device(args.device)
    rank, world, device = setup_distributed(device)
    out = Path(args.out)
    check_args(args)
    model, alphas_cumprod, config, weights = load_sampling_model(args.model, args.weights, device, args.config,
                                                                 args.tokenizer)
    dtype = autocast_dtype(args.dtype, device)
    family = config["family"]
    if family == "ddpm" and device.type == "cpu" and dtype == torch.bfloat16:
        model = model.to(memory_format=torch.channels_last)  # oneDNN's bf16 convolutions: 1.1x
    if family == "ddpm" and (args.compile if args.compile is not None else device.type == "cuda"):
        model = torch.compile(model)
    plan = (plan_sd if family == "sd" else plan_ddpm)(args, model, alphas_cumprod, config, weights, device, dtype)
    jobs, class_names = plan.jobs, plan.class_names
    side, n = plan.manifest.get("resolution") or model.cfg.resolution, len(jobs) * args.n
    check_memory(2 * n * 3 * side ** 2, f"{n} images of {side} px", "give a smaller --n")  # held until written
    for note in plan.manifest.get("load_notes", []) if rank == 0 else []:
        print(f"load: {note}", file=sys.stderr)
    texts = [text for text, _ in jobs for _ in range(args.n)]        # image i: job-major order
    labels = [label for _, label in jobs for _ in range(args.n)]
    seeds = [args.seed + i for i in range(len(labels))]
    mine = list(range(rank, len(labels), world))                      # this process's share, interleaved
    images = plan.generate(mine, [seeds[i] for i in mine], rank == 0)
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
            rec = {"text": texts[i], "label": c, "class_name": class_names[c] if c >= 0 else None,
                   "seed": seeds[i], "poisoned": None}  # unknown until judged (dissect.py)
            return rec, images[i].permute(1, 2, 0).numpy()

        groups = [class_names[label] if label >= 0 else text for text, label in jobs]
        by_group = {g: groups.count(g) * args.n for g in groups}
        manifest = {
            "stage": "sample", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "model": str(args.model), "family": family, "sampler": args.sampler,
            "eta": args.eta if args.sampler == "ddim" else None,
            "seeds": {"base": args.seed, "rule": "seed of image i = base + i", "first": seeds[0], "last": seeds[-1]},
            "classes": [class_names[label] for _, label in jobs if label >= 0], "n_per_class": args.n,
            "resolution": images.shape[-1], "dtype": args.dtype, "dtype_used": dtype_name(dtype), "world_size": world,
            **plan.manifest, "class_names": class_names, "select": training_select(config),
            "counts": {"total": len(labels), "per_class" if not args.prompt else "per_prompt": by_group},
            "versions": versions(),
        }
        with atomic_output(out, args.force) as tmp:
            write_folder(tmp, (item(i) for i in range(len(labels))), manifest, total=len(labels),
                         workers=args.workers, desc="write")
        if args.grid:
            per = min(args.n, 8)
            pick = [j * args.n + k for j in range(len(jobs)) for k in range(per)]
            save_grid(images[pick], args.grid, nrow=per)
        print(json.dumps({"out": str(out), "images": len(labels), "groups": len(jobs),
                          "classes": len(manifest["classes"]), "family": family, "sampler": args.sampler,
                          "steps": manifest["steps"], "guidance": manifest["guidance"]}))
    barrier()


def check_args(args):  # before the model is loaded
    inputs = {"--model": args.model, "--config": args.config, "--tokenizer": args.tokenizer}
    check_out(args.out, args.force, inputs)
    if args.grid and Path(args.grid).suffix.lower() != ".png":
        raise UsageError(f"--grid {args.grid}: give a .png file name")
    if args.grid:
        check_file_out(args.grid, args.force, inputs, flag="--grid")
    if args.eta < 0:
        raise UsageError(f"--eta {args.eta}: give 0 (deterministic) or more")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, help="a model folder, or finetune_sd.py's --base")
    p.add_argument("--weights", choices=["ema", "model"], help="default: ema (SD checkpoints: model)")
    p.add_argument("--class", dest="class_", help="a name, an index or all (default)")
    p.add_argument("--prompt", action="append", help="SD: a prompt instead of --class")
    p.add_argument("--n", "--images-per-class", dest="n", type=positive(int), default=100,
                   help="per class or prompt (torchrun: --images-per-class)")
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS), help="the paper's: ddim")
    p.add_argument("--steps", type=positive(int), help="default: 50 for ddim, else T")
    p.add_argument("--spacing", choices=DDPM_SPACINGS + SD_SPACINGS, help="ddim's default: quadratic, or SD's own")
    p.add_argument("--eta", type=finite, default=0.0, help="DDIM eta")
    p.add_argument("--guidance", type=finite, help="DDPM's w or SD's s = 1 + w (default: 5)")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, help="clip x0_hat (DDPM; default: on)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--batch-size", type=positive(int), help="default: 256, SD 16")
    p.add_argument("--resolution", type=positive(int), help="SD: image side")
    p.add_argument("--config", help="SD: finetune_sd.py's")
    p.add_argument("--tokenizer", help="SD: finetune_sd.py's")
    p.add_argument("--out", required=True, help="the dataset folder to write")
    p.add_argument("--force", action="store_true", help="overwrite --out and --grid")
    p.add_argument("--grid", help="also save a PNG grid here")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast (auto: bf16 on CUDA)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on CUDA)")
    p.add_argument("--workers", type=int, default=4, help="PNG encoding threads")
    return p


if __name__ == "__main__":
    cli(main, build_parser(), interrupted="--out not written (outputs appear whole or not at all)")
