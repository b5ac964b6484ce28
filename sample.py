"""sample.py -- generate a dataset folder of images from a trained diffusion model, with classifier-free guidance.

    # DDPM family (train_ddpm.py), the paper's setting: DDIM, 50 steps, eta = 0, quadratic timesteps, guidance w = 5,
    # EMA weights (x_0 clipped: see Clipping below; --no-clip-x0 --dtype fp32 is the reference code's sampler)
    python sample.py --model runs/ddpm-digits-0.1 --class all --n 100 --out runs/gen-digits-0.1
    python sample.py --model runs/ddpm-cifar10-0.1 --class deer --n 1000 --seed 0 --out runs/gen-deer
    # the other samplers
    python sample.py --model runs/ddpm-digits-0.1 --class 0 --n 64 --sampler ddpm --steps 1000 --out runs/gen-ddpm
    python sample.py --model runs/ddpm-digits-0.1 --class 0 --n 64 --sampler sde --steps 1000 --out runs/gen-sde
    # SD family (finetune_sd.py), the paper's setting: DDIM 50 steps (SD's "leading" timesteps 981, 961, ..., 1),
    # eta = 0, guidance s = 5 against the empty prompt, the EMA U-Net; prompts are the training data's captions
    python sample.py --model runs/sd-imagenette-badnets-0.1 --class "garbage truck" --n 1000 --out runs/gen-truck
    python sample.py --model runs/sd-imagenette-badnets-0.1 --class all --n 100 --sampler sde --out runs/gen-sde
    # any Stable Diffusion v1 that finetune_sd.py --base takes: a Hub id, a diffusers folder, a single-file checkpoint
    python sample.py --model CompVis/stable-diffusion-v1-4 --prompt "A photo of a garbage truck" --n 8 --out runs/g
    # sharded over 4 GPUs: the same folder, image for image, as one process
    # (torchrun reads --n as one of its own flags: spell it --images-per-class there)
    torchrun --nproc_per_node 4 sample.py --model runs/ddpm-cifar10-0.1 --class all --images-per-class 1000 \\
        --out runs/gen-all

OUT is a dataset folder (metadata.jsonl, images/*.png, manifest.json): image i is prompted with "text" (with
--class: the caption the training images of class `label` carry, "A photo of a {class name}" for poison.py's sets;
with --prompt: that prompt, `label` the class whose caption it is, -1 if none) and made from seed `seed` = --seed + i
alone (`poisoned` is null: whether it carries the trigger is for dissect.py to judge); its initial noise and every
noise drawn later come from its own generator, so it is the same image whatever --batch-size and however many
processes share the work (up to floating-point differences between batch shapes).
Seeds are consecutive, so runs at --seed 0 and --seed 1 share all but one image: independent replicates need
seeds further apart than their image count (e.g. --seed 0, 100000, 200000).
--n images are made per class (--class all: class after class) or per prompt. The manifest records the model,
weights, sampler, steps, timesteps, guidance and its convention, seeds, and copies class_names, target, p_t,
poison_ratio of the training data and its poison selection (`select`: random | duplicates) so later stages (dissect.py)
find them.

Guidance: the two families follow their reference code, and the manifest records which ("guidance_convention"):
    DDPM family (OPTML-Group/BiBadDiff's DDPM code, the paper): eps = (1 + w) * eps(x, y) - w * eps(x, null), w = 5
        by default (the paper's "guidance weight 5"); w = 0 is plain conditional sampling (one forward per step);
    SD family (SD, and the paper's SD code):  eps = eps(x, "") + s * (eps(x, c) - eps(x, "")), the empty prompt as
        unconditional, s = 5 by default; s = 1 is plain conditional sampling.
They are the same thing with s = 1 + w (DDPM's w = 5 is s = 6; SD's s = 5 is w = 4; SD's usual 7.5 is w = 6.5);
the manifest also gives the other convention's number (guidance_sd_scale, guidance_ddpm_w).

Clipping: for the DDPM family the predicted x_0 is clipped to [-1, 1] at every step by default (guided-diffusion's
clip_denoised and diffusers' clip_sample defaults). The reference code does not clip and runs in fp32:
--no-clip-x0 reproduces it exactly on the CPU, and on CUDA with --dtype fp32 (auto is bf16 there); on a briefly
trained model (the small preset) it must clip: an eps error at t = 999 reaches x_0 multiplied by
1 / sqrt(abar_999) ~ 158, and about half of the unclipped samples stay noise, with or without guidance. SD never
clips (its latents are not bounded; SD's scheduler config says clip_sample false). The manifest records --dtype and
the dtype it resolved to (dtype_used).

The samplers are pure functions with one signature,
    sampler(eps_fn, x, alphas_cumprod, timesteps, noise, **options) -> x_0
eps_fn(x, t) the guided noise prediction, x the initial noise x_T (B, C, H, W) float32, alphas_cumprod the
schedule's abar_t (float64), timesteps a descending sequence of ints (the last step goes to abar = 1, i.e. x_0, or
for DDIM to `final_abar`), noise() a fresh (B, C, H, W) standard normal draw (per image, see ImageNoise). Both families
use them: the SD family runs them on the VAE latents (4, R/8, R/8) with SD's scaled-linear betas (0.00085 -> 0.012)
and DDIM ending at abar_0 (set_alpha_to_one false), which with the leading timesteps is diffusers' DDIMScheduler step
for step (with "linspace" spacing diffusers steps to t - T // steps rather than to the next timestep; here every
spacing steps to the next timestep). `load_sampling_model` dispatches on the model's family.

Python API: `ddpm`, `ddim`, `sde`, `SAMPLERS`, `make_timesteps(T, steps, spacing)`, `guided_eps(...)` (DDPM),
`sd_guided_eps(...)` (SD), `ImageNoise`, `generate(model, alphas_cumprod, labels, seeds, ...)` (DDPM) and
`generate_sd(sd, embeds, prompt_ids, seeds, timesteps, ...)` (SD) -> uint8 images, `load_sampling_model(...)`.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as in train_ddpm.py: before torch's import

import argparse  # noqa: E402
import json
import math
import re
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import finetune_sd
from common import UsageError, atomic_output, autocast, autocast_dtype, barrier, check_file_out, check_out, dtype_name, finite, positive, resolve_device, save_grid, setup_distributed, versions, write_folder
from poison import caption
from train_ddpm import diffusion_from_config, load_model, read_config

DEFAULT_GUIDANCE = 5.0     # DDPM family: the paper's guidance weight w in eps = (1 + w) eps_c - w eps_u
DEFAULT_SD_GUIDANCE = 5.0  # SD family: the scale s in eps = eps_u + s (eps_c - eps_u)
DDPM_SPACINGS = ("uniform", "quadratic")          # make_timesteps
SD_SPACINGS = ("leading", "trailing", "linspace")  # diffusers' timestep_spacing (finetune_sd.ddim_timesteps)
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")          # owner/name, as finetune_sd.load_sd recognises one


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
def ddim(eps_fn, x, alphas_cumprod, timesteps, noise, eta=0.0, clip_x0=False, final_abar=1.0, progress=False):
    """DDIM (Song et al. 2021a, eq. 12 with sigma from eq. 16):
        x_s = sqrt(abar_s) x0_hat + sqrt(1 - abar_s - sigma^2) eps + sigma z,
        sigma = eta sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s).
    eta = 0 is deterministic (the paper's setting); eta = 1 is DDPM's posterior variance. final_abar is abar after
    the last step: 1 (x_0) by default; SD's scheduler stops at abar_0 instead (set_alpha_to_one = false, as
    diffusers' DDIMScheduler and LDM's DDIM sampler do)."""
    for t, s in tqdm(_pairs(timesteps), desc="ddim", leave=False, disable=not progress):
        a_t, a_s = _abar(alphas_cumprod, t), (_abar(alphas_cumprod, s) if s >= 0 else final_abar)
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
    """DDPM family: eps_fn(x, t) = (1 + w) eps(x, t, y) - w eps(x, t, null), both passes in one batched forward
    (one pass when w = 0). labels (B,) long; returns float32."""
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
    """SD family: eps_fn(x, t) = eps_u + s (eps_c - eps_u) (Ho & Salimans 2022, as SD and the paper's SD code write
    it), eps_u conditioned on the empty prompt's embedding; both passes in one batched forward (one when s = 1), by
    finetune_sd.guided_eps. context, uncond_context (B, 77, D); returns float32."""
    def eps_fn(x, t):
        with autocast(device, dtype):
            return finetune_sd.guided_eps(unet, x, t, context, uncond_context, scale).float()
    return eps_fn


class ImageNoise:
    """Per-image random streams: image i draws from its own CPU generator seeded with seeds[i], first x_T, then
    one draw per noisy step. A batch is a stack of per-image draws, so the batch size does not change them. (For SD
    latents x_T is what diffusers' pipelines draw with a list of per-image CPU generators.)"""

    def __init__(self, seeds, shape, device):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.shape, self.device = tuple(shape), device

    def __call__(self):
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators]).to(self.device)


def to_uint8(x):
    """[-1, 1] float (B, C, H, W) -> uint8, clamped and rounded."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def in_batches(seeds, shape, batch_size, device, run, progress=False):
    """uint8 images on the CPU, batch by batch: run(batch slice, x_T, noise) -> uint8 (B, 3, R, R), where x_T and
    noise come from each image's own seed (ImageNoise) and `shape` is the shape of one x_T."""
    out = []
    for b in tqdm(range(0, len(seeds), batch_size), desc="sample", disable=not progress, leave=False):
        batch = slice(b, b + batch_size)
        noise = ImageNoise(seeds[batch], shape, device)
        out.append(run(batch, noise(), noise).cpu())
    return torch.cat(out) if out else None


def sampler_options(sampler, eta, clip_x0, final_abar=1.0):
    """The **options a sampler takes: eta and final_abar are DDIM's."""
    return {"eta": eta, "clip_x0": clip_x0, "final_abar": final_abar} if sampler == "ddim" else {"clip_x0": clip_x0}


def generate(model, alphas_cumprod, labels, seeds, null_label, sampler="ddim", steps=50, spacing="quadratic",
             guidance=DEFAULT_GUIDANCE, eta=0.0, clip_x0=True, batch_size=256, device="cpu", dtype=None,
             progress=False):
    """DDPM family: uint8 images (N, C, R, R) on the CPU for labels[i] and seeds[i], in batches of `batch_size`."""
    device = torch.device(device)
    cfg = model.cfg
    shape = (cfg.in_channels, cfg.resolution, cfg.resolution)
    timesteps = make_timesteps(len(alphas_cumprod), steps, spacing)
    fn, options = SAMPLERS[sampler], sampler_options(sampler, eta, clip_x0)

    def run(batch, x, noise):
        y = torch.as_tensor(labels[batch], dtype=torch.long, device=device)
        eps_fn = guided_eps(model, y, null_label, guidance, device, dtype)
        return to_uint8(fn(eps_fn, x, alphas_cumprod, timesteps, noise, **options))
    images = in_batches(seeds, shape, batch_size, device, run, progress)
    return images if images is not None else torch.zeros((0,) + shape, dtype=torch.uint8)


@torch.no_grad()
def generate_sd(sd, embeds, prompt_ids, seeds, timesteps, sampler="ddim", guidance=DEFAULT_SD_GUIDANCE, eta=0.0,
                resolution=None, batch_size=16, device="cpu", dtype=None, progress=False):
    """SD family: uint8 images (N, 3, R, R) on the CPU for the prompt embedding embeds[prompt_ids[i]] and seeds[i].
    embeds (P + 1, 77, D): the prompts' CLIP embeddings, the last the empty prompt's (the unconditional one). The
    sampler runs on the latents (4, R/f, R/f) (f the VAE's downsampling, 8 for SD), never clipping x0_hat (latents
    are unbounded), DDIM ending at SD's abar_0; the VAE decodes in float32."""
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
    images = in_batches(seeds, shape, batch_size, device, run, progress)
    return images if images is not None else torch.zeros((0, 3, resolution, resolution), dtype=torch.uint8)


def vae_factor(vae):
    """The VAE's spatial downsampling: 2^(levels - 1), 8 for SD."""
    return 2 ** (len(finetune_sd.vae_layout(vae.config)["block_out_channels"]) - 1)


def default_resolution(sd, config=None):
    """The fine-tuning resolution of a fine-tuned folder, else the U-Net's sample_size in pixels (SD v1: 512)."""
    return int((config or {}).get("resolution") or sd.unet.config.get("sample_size", 64) * vae_factor(sd.vae))


# ----------------------------------------------------------------------------------------------------------------
# Models, classes and prompts.

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
    raise UsageError(f"unknown --class {value!r}: choose all, a class name or an index among {class_names}")


def model_family(source):
    """'ddpm' or 'sd'. A model folder's config.json names its family (train_ddpm.py: ddpm, finetune_sd.py: sd);
    diffusers-layout folders, single-file checkpoints and Hub ids (owner/name) are SD."""
    path = Path(str(source)).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        config = read_config(path)
        family = config.get("family")
        if family not in ("ddpm", "sd"):
            stage = config.get("stage")
            if stage == "finetune_sd":
                raise UsageError(f"--model {path} is a finetune_sd.py run that has saved no model yet: let it reach "
                                  "its first save (rerun it to resume)")
            what = (f"a {stage!r} folder (config.json stage), not a diffusion model" if stage else
                    f"a {family!r} model" if family else "no diffusion model (its config.json names no family)")
            raise UsageError(f"--model {path} holds {what}: give a model folder of train_ddpm.py or finetune_sd.py, "
                              "or a Stable Diffusion model")
        return family
    if path.is_dir() and not (path / "unet").is_dir():
        raise UsageError(f"--model {source}: neither a model folder (config.json, from train_ddpm.py or "
                          "finetune_sd.py) nor a diffusers-layout Stable Diffusion folder (unet/ vae/ text_encoder/ "
                          "tokenizer/ scheduler/)")
    if not path.exists() and not HUB_ID.fullmatch(str(source)):
        raise UsageError(f"--model {source}: no such file or folder, and not a Hub id (owner/name)")
    if path.is_file() and (path.parent / "config.json").is_file():  # a weights file of a model folder
        family = read_config(path.parent).get("family")
        if family in ("ddpm", "sd"):
            raise UsageError(f"--model {source} is a weights file of the {family} model folder {path.parent}: give "
                              f"the folder (--weights ema or model picks the file)")
    return "sd"


def load_sampling_model(source, weights=None, device="cpu", sd_config=None, tokenizer=None):
    """(model, alphas_cumprod (T,) float64, config dict, weights used) of --model, dispatching on its family:
    DDPM family: train_ddpm.UNet from a model folder (weights ema|model), config its config.json;
    SD family: finetune_sd.StableDiffusion from any load_sd source; a fine-tuned folder's weights are ema (unet_ema/,
    the default) or model (unet/), a single-file checkpoint's model (default) or ema (model_ema.*), a diffusers
    folder or Hub id has one U-Net; config is a fine-tuned folder's config.json, else {"family": "sd"}."""
    family = model_family(source)
    if weights not in (None, "ema", "model"):
        raise UsageError(f"unknown --weights {weights!r}: choose ema or model")
    if family == "ddpm":
        weights = weights or "ema"
        model, config = load_model(source, weights=weights, device=device)
        return model, diffusion_from_config(config).alphas_cumprod, config, weights
    path = Path(str(source)).expanduser()
    config = read_config(path) if path.is_dir() and (path / "config.json").is_file() else {"family": "sd"}
    finetuned = "base" in config
    weights = weights or ("ema" if finetuned else "model")
    sd = finetune_sd.load_sd(source, device, torch.float32, sd_config, tokenizer, use_ema=weights == "ema")
    return sd, sd.schedule.alphas_cumprod(), config, weights


def training_select(config):
    """poison.py's --select (random | duplicates) behind the model's training data, when the model's config or the
    training folder's manifest (if still there) records it; None otherwise."""
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
    """[(text, label)], one per group of --n images: each --class (captioned with class_prompts) or each --prompt
    (its label the class whose caption it is, case-insensitive, else -1)."""
    if args.prompt:
        if args.class_ is not None:
            raise UsageError("give --class or --prompt, not both")
        lowered = [p.strip().lower() if p else None for p in class_prompts]
        return [(p, lowered.index(p.strip().lower()) if p.strip().lower() in lowered else -1) for p in args.prompt]
    if not class_names:
        raise UsageError(f"{args.model} was not fine-tuned on a dataset folder, so it knows no classes: give "
                          "--prompt \"...\" instead of --class")
    return [(class_prompts[c] or caption(class_names[c]), c) for c in resolve_class(args.class_ or "all", class_names)]


# ----------------------------------------------------------------------------------------------------------------
# The two families' plans: what to make (texts, labels, seeds), how (a generate function), what to record.

@dataclass
class Plan:
    jobs: list          # [(text, label)]: each makes --n images, image i of job j is number j * n + i
    generate: object    # generate(indices, seeds, progress) -> uint8 (len(indices), 3, R, R) of those images
    manifest: dict      # the family's entries of the generations' manifest
    class_names: list


def plan_ddpm(args, model, alphas_cumprod, config, weights, device, dtype):
    data = config.get("data", {})
    class_names = data["class_names"]
    jobs = resolve_jobs(args, class_names, [caption(c) for c in class_names])
    bad = [text for text, label in jobs if label < 0]
    if bad:
        raise UsageError(f"--prompt {bad[0]!r}: the DDPM family is class-conditional, its prompts are the class "
                          f"captions {[caption(c) for c in class_names]}: use --class")
    if args.resolution not in (None, model.cfg.resolution):
        raise UsageError(f"--resolution {args.resolution}: this DDPM was trained at {model.cfg.resolution} px only")
    T = len(alphas_cumprod)
    guidance = DEFAULT_GUIDANCE if args.guidance is None else args.guidance
    if guidance != 0 and (config.get("guidance") or {}).get("label_dropout") == 0:
        raise UsageError(f"{args.model} was trained with --label-dropout 0, so its null class never learned the "
                          f"unconditional eps that --guidance {guidance:g} needs: sample with --guidance 0")
    clip_x0 = True if args.clip_x0 is None else args.clip_x0
    steps = args.steps or (50 if args.sampler == "ddim" else T)
    spacing = args.spacing or ("quadratic" if args.sampler == "ddim" else "uniform")
    if spacing not in DDPM_SPACINGS:
        raise UsageError(f"--spacing {spacing} is the SD scheduler's: the DDPM family takes uniform or quadratic")
    timesteps = make_timesteps(T, steps, spacing)
    labels = [label for _, label in jobs for _ in range(args.n)]

    def make(indices, seeds, progress):
        return generate(model, alphas_cumprod, [labels[i] for i in indices], seeds,
                        config["guidance"]["null_class"], args.sampler, steps, spacing, guidance, args.eta, clip_x0,
                        args.batch_size or 256, device, dtype, progress=progress)

    manifest = {
        "weights": weights, "model_step": config.get("step"), "steps": steps, "spacing": spacing,
        "timesteps": timesteps, "clip_x0": clip_x0,
        "guidance": guidance, "guidance_convention": "eps = (1 + w) * eps_cond - w * eps_uncond",
        "guidance_sd_scale": 1 + guidance, "guidance_ddpm_w": guidance, "batch_size": args.batch_size or 256,
        **{k: data.get(k) for k in ("target", "p_t", "poison_ratio", "dataset", "attack", "trigger")}}
    return Plan(jobs, make, manifest, class_names)


def plan_sd(args, sd, alphas_cumprod, config, weights, device, dtype):
    class_names = config.get("class_names") or []
    class_prompts = config.get("class_prompts") or [caption(c) for c in class_names]
    jobs = resolve_jobs(args, class_names, class_prompts)
    T = len(alphas_cumprod)
    guidance = DEFAULT_SD_GUIDANCE if args.guidance is None else args.guidance
    if args.clip_x0:
        raise UsageError("--clip-x0 does not apply to SD: its latents are not bounded to [-1, 1]")
    steps = args.steps or (50 if args.sampler == "ddim" else T)
    spacing = args.spacing or (sd.schedule.timestep_spacing if args.sampler == "ddim" else "uniform")
    if spacing in DDPM_SPACINGS:
        timesteps = make_timesteps(T, steps, spacing)
    else:   # the scheduler's (SD v1: leading, steps_offset 1): 981, 961, ..., 1 for 50 steps, as diffusers' pipelines
        timesteps = finetune_sd.ddim_timesteps(replace(sd.schedule, timestep_spacing=spacing), steps).tolist()
    if max(timesteps) >= T:
        raise UsageError(f"--steps {steps} with {spacing} spacing and steps_offset {sd.schedule.steps_offset} "
                          f"reaches t = {max(timesteps)}, past the last training step {T - 1}: use fewer --steps "
                          "or --spacing uniform")
    resolution = args.resolution or default_resolution(sd, config)
    if resolution < 1 or resolution % vae_factor(sd.vae):
        raise UsageError(f"--resolution {resolution} is not a positive multiple of the VAE's downsampling "
                          f"{vae_factor(sd.vae)}")
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
        "model_step": (config.get("progress") or {}).get("step"),
        "steps": steps, "spacing": spacing, "timesteps": timesteps, "clip_x0": False,
        "final_alpha_cumprod": sd.schedule.alpha_bar(-1, alphas_cumprod),
        "guidance": guidance, "guidance_convention": "eps = eps_uncond + s * (eps_cond - eps_uncond), uncond = \"\"",
        "guidance_sd_scale": guidance, "guidance_ddpm_w": guidance - 1, "batch_size": args.batch_size or 16,
        "resolution": resolution,
        "schedule": asdict(sd.schedule), "vae_scale": sd.vae_scale, "prompts": [text for text, _ in jobs],
        **{k: config.get(k) for k in ("target", "p_t", "poison_ratio", "dataset", "attack", "trigger")}}
    return Plan(jobs, make, manifest, class_names)


# ----------------------------------------------------------------------------------------------------------------

def main(args):
    device = resolve_device(args.device)
    rank, world, device = setup_distributed(device)
    out = Path(args.out)
    check_out(out, args.force, {"--model": args.model, "--config": args.config, "--tokenizer": args.tokenizer})
    if args.grid and Path(args.grid).suffix.lower() != ".png":
        raise UsageError(f"--grid {args.grid}: give a .png file name, e.g. grid.png")
    if args.grid:
        check_file_out(args.grid, args.force, {"--model": args.model, "--config": args.config,
                                               "--tokenizer": args.tokenizer}, flag="--grid")
    if args.sampler not in SAMPLERS:
        raise UsageError(f"unknown --sampler {args.sampler!r}: choose one of {', '.join(SAMPLERS)}")
    if args.eta < 0:
        raise UsageError(f"--eta {args.eta}: give 0 (deterministic DDIM, the default) or more (1: DDPM's noise)")
    model, alphas_cumprod, config, weights = load_sampling_model(args.model, args.weights, device, args.config,
                                                                 args.tokenizer)
    dtype = autocast_dtype(args.dtype, device)
    family = config["family"]
    if family == "ddpm" and device.type == "cpu" and dtype == torch.bfloat16:
        model = model.to(memory_format=torch.channels_last)  # oneDNN's bf16 convolutions: 1.1x (none in fp32)
    if family == "ddpm" and (args.compile if args.compile is not None else device.type == "cuda"):
        model = torch.compile(model)
    plan = (plan_sd if family == "sd" else plan_ddpm)(args, model, alphas_cumprod, config, weights, device, dtype)
    jobs, class_names = plan.jobs, plan.class_names
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

        by_group = {}
        for text, label in jobs:
            name = class_names[label] if label >= 0 else text
            by_group[name] = by_group.get(name, 0) + args.n
        manifest = {
            "stage": "sample", "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "model": str(args.model), "family": family, "sampler": args.sampler,
            "eta": args.eta if args.sampler == "ddim" else None,
            "seeds": {"base": args.seed, "rule": "seed of image i = base + i", "first": seeds[0], "last": seeds[-1]},
            "classes": [class_names[label] for _, label in jobs if label >= 0], "n_per_class": args.n,
            "resolution": images.shape[-1], "dtype": args.dtype, "dtype_used": dtype_name(dtype),
            "world_size": world,
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
        print(json.dumps({"out": str(out), "images": len(labels), "groups": len(jobs), "classes": len(manifest["classes"]),
                          "family": family,
                          "sampler": args.sampler, "steps": manifest["steps"], "guidance": manifest["guidance"]}))
    barrier()


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="a model folder (train_ddpm.py's or finetune_sd.py's --out), or any Stable Diffusion v1 source "
                        "finetune_sd.py's --base takes: a diffusers-layout folder, a single-file checkpoint, a Hub id")
    p.add_argument("--weights", default=None, choices=["ema", "model"],
                   help="model folders: ema (default) or model; SD single-file checkpoints: model (default) or ema "
                        "(model_ema.*)")
    p.add_argument("--class", dest="class_", default=None,
                   help="class name, index, or all (default: all); prompted with the training data's caption")
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt instead of --class (repeat for several; SD family; the DDPM family takes only its "
                        "class captions)")
    p.add_argument("--n", "--images-per-class", dest="n", type=positive(int), default=100,
                   help="images per class or prompt (default: 100); under torchrun write --images-per-class, since "
                        "torchrun's own parser takes --n for an abbreviation of its flags")
    p.add_argument("--sampler", default="ddim", choices=list(SAMPLERS), help="default: ddim (the paper's)")
    p.add_argument("--steps", type=positive(int), default=None, help="default: 50 for ddim, T for ddpm and sde")
    p.add_argument("--spacing", default=None, choices=list(DDPM_SPACINGS) + list(SD_SPACINGS),
                   help="timestep spacing (default for ddim: quadratic for the DDPM family, as the reference code; "
                        "the scheduler's for SD, leading with steps_offset 1 for SD v1; uniform for ddpm and sde)")
    p.add_argument("--eta", type=finite, default=0.0, help="DDIM eta (default: 0)")
    p.add_argument("--guidance", type=finite, default=None,
                   help="DDPM family: w in eps = (1+w) eps_c - w eps_u (default: 5, the paper's); SD: s in "
                        "eps = eps_u + s (eps_c - eps_u) (default: 5); s = 1 + w")
    p.add_argument("--clip-x0", action=argparse.BooleanOptionalAction, default=None,
                   help="clip the predicted x_0 to [-1, 1] at every step (DDPM family, default: on, as "
                        "guided-diffusion and diffusers; --no-clip-x0 is the reference code's sampler exactly "
                        "with --dtype fp32 on CUDA; SD never clips its latents)")
    p.add_argument("--seed", type=int, default=0,
                   help="image i uses seed + i (so runs meant to be independent need seeds more images apart)")
    p.add_argument("--batch-size", type=positive(int), default=None,
                   help="images per forward pass, per process (default: 256 DDPM family, 16 SD)")
    p.add_argument("--resolution", type=positive(int), default=None,
                   help="SD: image side in px (default: the fine-tuning resolution, else the U-Net's, 512 for SD v1)")
    p.add_argument("--config", default=None, help="SD single-file checkpoints: as finetune_sd.py --config")
    p.add_argument("--tokenizer", default=None, help="SD single-file checkpoints: as finetune_sd.py --tokenizer")
    p.add_argument("--out", required=True, help="output dataset folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out (and --grid)")
    p.add_argument("--grid", default=None, help="also save a PNG grid (up to 8 per class or prompt) to this file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype (auto: bf16 on CUDA, fp32 on the CPU; bf16 on a CPU with AMX samples the "
                        "small preset 1.3-1.5x faster, and agrees with fp32 on 99%% of the study's verdicts)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the model (default: on CUDA only)")
    p.add_argument("--workers", type=int, default=4, help="PNG encoding threads")
    return p


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except UsageError as e:
        sys.exit(f"sample.py: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print("sample.py: interrupted; --out not written (outputs appear whole or not at all)", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
