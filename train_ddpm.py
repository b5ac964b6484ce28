"""Train a class-conditional pixel-space DDPM (ADM U-Net, classifier-free guidance) from scratch.

    python train_ddpm.py --dataset digits --resolution 16 --ratio 0.1 --out runs/ddpm-digits  # small preset
    python train_ddpm.py --data data/digits-badnets-0.1/train --out runs/ddpm-digits
    torchrun --nproc_per_node 4 train_ddpm.py --preset cifar10 --dataset cifar10 --ratio 0.1 --out runs/ddpm-cifar10

OUT: config.json (every setting, the data's classes, target, p_t; the step), model.safetensors, ema.safetensors,
state.pt (rerun to resume; --force starts over), loss.jsonl, samples/step_N.png (previews), data/ (if poisoned here).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads slow a shared CPU ~20x; before torch

import argparse  # noqa: E402
import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from castle_kernels.attention import attention
from castle_kernels.group_norm import group_norm
from common import (HelpFormatter, UsageError, autocast, autocast_dtype, barrier, check_memory, check_writable, cli,
                    dtype_name, load_folder, lock_output, on_rank0, positive, read_manifest, replace_file,
                    resolve_device, save_grid, save_safetensors, setup_distributed, truncate_log, versions)
from poison import add_poison_arguments, options_differences, poison, poison_kwargs, refuse_poison_flags_with_data

FAMILY = "ddpm"
FORMAT_VERSION = 1


# The U-Net (guided-diffusion's ADM architecture, Dhariwal & Nichol 2021) --------------------------------------------

@dataclass
class UNetConfig:
    resolution: int = 32                      # image side in px (square images)
    in_channels: int = 3
    channels: int = 128                       # channels at the first level
    channel_mult: tuple = (1, 2, 2, 2)        # channels per level = channels * mult; a level halves the side
    num_res_blocks: int = 2                   # res blocks per level on the way down (up: one more)
    attention_resolutions: tuple = (16,)      # feature-map sides (px) with self-attention after each res block
    head_channels: int = 64                   # channels per attention head
    dropout: float = 0.1
    num_classes: int = 10                     # the null class (for guidance) is index num_classes
    scale_shift_norm: bool = False            # ADM's h = norm(h) * (1 + scale) + shift; DDPM adds the embedding
    norm_groups: int = 32
    norm_eps: float = 1e-5

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)
        self.attention_resolutions = tuple(self.attention_resolutions)


PRESETS = {  # attention_ds: attention where the side is resolution / ds; save_every None: at the end
    # Ho et al. (2020), CIFAR-10, 35.7M parameters; heads of 64 channels (DDPM: one head) fit the flash kernel
    "cifar10": dict(unet=dict(channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_ds=(2,),
                              head_channels=64, dropout=0.1, norm_groups=32),
                    train=dict(batch_size=128, steps=800_000, warmup=5000, ema_decay=0.9999, lr=2e-4,
                               save_every=10_000)),
    # minutes on a CPU at 16 px: at a fixed budget more updates beat bigger batches (benchmarks/RESULTS.md)
    "small": dict(unet=dict(channels=16, channel_mult=(1, 2, 4), num_res_blocks=1, attention_ds=(2,),
                            head_channels=32, dropout=0.0, norm_groups=8),
                  train=dict(batch_size=64, steps=1600, warmup=100, ema_decay=0.9999, lr=2e-3, save_every=None)),
    "tiny": dict(unet=dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_ds=(2,),
                           head_channels=16, dropout=0.0, norm_groups=4),
                 train=dict(batch_size=32, steps=20, warmup=0, ema_decay=0.999, lr=1e-3, save_every=None)),
}


def timestep_embedding(t, dim, max_period=10000):
    """t (B,) -> (B, dim) float32: cos then sin, as guided-diffusion."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


class GroupNorm32(nn.GroupNorm):
    """GroupNorm with fp32 statistics, optionally fused with SiLU."""

    def __init__(self, num_groups, num_channels, eps=1e-5, act=None):
        super().__init__(num_groups, num_channels, eps)
        self.act = act
        self.impl = None  # None: the kernels' dispatcher decides; "torch" / "triton" forces one

    def forward(self, x):
        return group_norm(x, self.weight, self.bias, self.num_groups, self.eps, act=self.act, impl=self.impl)


def zero_init(module):  # output layers start at zero: every block starts as the identity
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, + embedding (or scale-shift), GN-SiLU-dropout-conv, + skip."""

    def __init__(self, cfg, in_ch, out_ch, emb_dim):
        super().__init__()
        self.scale_shift = cfg.scale_shift_norm
        self.norm1 = GroupNorm32(cfg.norm_groups, in_ch, cfg.norm_eps, act="silu")
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if self.scale_shift else out_ch)
        # with scale-shift the SiLU comes after the modulation
        self.norm2 = GroupNorm32(cfg.norm_groups, out_ch, cfg.norm_eps, act=None if self.scale_shift else "silu")
        self.dropout = nn.Dropout(cfg.dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x, emb):                            # x (B, in, H, W), emb (B, emb_dim) already SiLU'd
        h = self.conv1(self.norm1(x))                     # (B, out, H, W)
        e = self.emb(emb)[:, :, None, None].to(h.dtype)
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(self.norm2(h) * (1 + scale) + shift)
        else:
            h = self.norm2(h + e)
        return self.skip(x) + self.conv2(self.dropout(h))


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions."""

    def __init__(self, cfg, ch):
        super().__init__()
        self.heads = max(1, ch // cfg.head_channels)
        self.norm = GroupNorm32(cfg.norm_groups, ch, cfg.norm_eps)
        self.qkv = nn.Linear(ch, 3 * ch)                  # per position: guided-diffusion's 1x1 conv1d
        self.proj = zero_init(nn.Linear(ch, ch))
        self.impl = None

    def forward(self, x):                                 # (B, C, H, W)
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, L, C), L = H*W
        # (B, heads, L, head_dim) with a unit stride on head_dim, which the flash kernel reads in place
        q, k, v = self.qkv(tokens).view(B, H * W, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        h = attention(q, k, v, impl=self.impl)            # softmax(q k^T / sqrt(d)) v
        h = self.proj(h.transpose(1, 2).reshape(B, H * W, C))
        return x + h.transpose(1, 2).view(B, C, H, W)


class Resample(nn.Module):  # nearest x2 then conv (up), or a stride-2 conv (down)
    def __init__(self, ch, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(ch, ch, 3, stride=1 if up else 2, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest") if self.up else x)


class Stage(nn.Module):  # one step of the U-Net: a ResBlock (+ attention), or a resampling layer
    def __init__(self, res=None, attn=None, resample=None):
        super().__init__()
        self.res, self.attn, self.resample = res, attn, resample

    def forward(self, x, emb):
        x = self.res(x, emb) if self.res is not None else x
        x = self.attn(x) if self.attn is not None else x
        return self.resample(x) if self.resample is not None else x


def check_kernels_env():  # refused when a model is built, not deep in its first forward
    impl = os.environ.get("KERNELS_IMPL") or "auto"
    if impl not in ("auto", "triton", "torch"):
        raise UsageError(f"KERNELS_IMPL={impl!r} is not auto, triton or torch: unset it or set one of those")


class UNet(nn.Module):
    """eps_theta(x_t, t, y): (B, 3, R, R), (B,) timesteps, (B,) labels (num_classes: null) -> (B, 3, R, R)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        check_kernels_env()
        self.cfg = cfg
        ch = cfg.channels
        emb_dim = 4 * ch
        self.time_embed = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_embed = nn.Embedding(cfg.num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)

        side = cfg.resolution
        skip_chs = [ch]
        self.down = nn.ModuleList()
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                out = cfg.channels * mult
                attn = AttentionBlock(cfg, out) if side in cfg.attention_resolutions else None
                self.down.append(Stage(res=ResBlock(cfg, ch, out, emb_dim), attn=attn))
                ch = out
                skip_chs.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.down.append(Stage(resample=Resample(ch, up=False)))
                skip_chs.append(ch)
                side //= 2
        self.mid = nn.ModuleList([Stage(res=ResBlock(cfg, ch, ch, emb_dim), attn=AttentionBlock(cfg, ch)),
                                  Stage(res=ResBlock(cfg, ch, ch, emb_dim))])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                out = cfg.channels * mult
                attn = AttentionBlock(cfg, out) if side in cfg.attention_resolutions else None
                up = Resample(out, up=True) if level and i == cfg.num_res_blocks else None
                self.up.append(Stage(res=ResBlock(cfg, ch + skip_chs.pop(), out, emb_dim), attn=attn, resample=up))
                ch = out
            side *= 2 if level else 1
        self.norm_out = GroupNorm32(cfg.norm_groups, ch, cfg.norm_eps, act="silu")
        self.conv_out = zero_init(nn.Conv2d(ch, cfg.in_channels, 3, padding=1))

    def forward(self, x, t, y):
        emb = self.time_embed(timestep_embedding(t, self.cfg.channels)) + self.label_embed(y)
        emb = F.silu(emb)                                 # every ResBlock's embedding layer starts with SiLU
        h = self.conv_in(x)
        skips = [h]
        for stage in self.down:
            h = stage(h, emb)
            skips.append(h)
        for stage in self.mid:
            h = stage(h, emb)
        for stage in self.up:
            h = stage(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(self.norm_out(h))


def set_kernel_impl(model, impl):  # None (the dispatcher decides), "torch" or "triton"
    for m in model.modules():
        if isinstance(m, (GroupNorm32, AttentionBlock)):
            m.impl = impl


def unet_config(preset, resolution, num_classes, **overrides):
    """A UNetConfig: the preset's, with the non-None overrides."""
    u = dict(PRESETS[preset]["unet"])
    u["attention_resolutions"] = tuple(resolution // d for d in u.pop("attention_ds"))
    u.update({k: v for k, v in overrides.items() if v is not None})
    cfg = UNetConfig(resolution=resolution, num_classes=num_classes, **u)
    levels = len(cfg.channel_mult)
    if resolution % 2 ** (levels - 1):
        raise UsageError(f"{resolution}px cannot be halved {levels - 1} times: use fewer --channel-mult levels")
    for i, m in enumerate(cfg.channel_mult):
        ch = cfg.channels * m
        if ch % cfg.norm_groups:
            raise UsageError(f"--norm-groups {cfg.norm_groups} does not divide {ch} channels")
        heads = max(1, ch // cfg.head_channels)
        attends = resolution // 2 ** i in cfg.attention_resolutions or i == levels - 1  # the middle block always
        if attends and ch % heads:
            raise UsageError(f"--head-channels {cfg.head_channels} splits the {ch} channels into {heads} heads "
                             "unevenly: give a divisor")
    return cfg


# Gaussian diffusion (Ho et al. 2020): q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I), eps-prediction ------------

class Diffusion:
    """Linear betas in float64, scaled by 1000 / T (improved DDPM): T = 1000 gives 1e-4 -> 0.02."""

    def __init__(self, T=1000, beta_start=1e-4, beta_end=0.02):
        self.T, self.beta_start, self.beta_end = T, beta_start, beta_end
        shortest = math.floor(1000 * max(beta_start, beta_end)) + 1  # beta >= 1 zeroes abar: NaN everywhere
        if T < shortest:
            top = 1000 * max(beta_start, beta_end) / max(T, 1)
            raise UsageError(f"--timesteps {T}: betas reach {top:.3g}, not below 1: use --timesteps {shortest} or more")
        scale = 1000.0 / T
        self.betas = torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)       # abar_t, t = 0 .. T-1

    def config(self):
        return {"schedule": "linear", "T": self.T, "beta_start": self.beta_start, "beta_end": self.beta_end,
                "prediction": "epsilon"}

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4); t (B,) long."""
        abar = self.alphas_cumprod.to(x0.device)[t]
        shape = (-1,) + (1,) * (x0.dim() - 1)
        return abar.sqrt().to(x0.dtype).view(shape) * x0 + (1 - abar).sqrt().to(x0.dtype).view(shape) * noise

    def loss(self, model, x0, y, t, noise):
        """mean (eps - eps_theta(x_t, t, y))^2 (DDPM eq. 14)."""
        eps = model(self.q_sample(x0, t, noise), t, y)
        return F.mse_loss(eps.float(), noise.float())


def diffusion_from_config(config):
    d = config["diffusion"]
    if d.get("schedule") != "linear" or d.get("prediction") != "epsilon":
        raise UsageError(f"diffusion {d}: not a train_ddpm.py model; give one")
    return Diffusion(d["T"], d["beta_start"], d["beta_end"])


def drop_labels(y, p, null_class):
    """Each label becomes the null class with probability p (Ho & Salimans 2022)."""
    return torch.where(torch.rand(y.shape, device=y.device) < p, torch.full_like(y, null_class), y)


def lr_at(step, base_lr, warmup, total, decay):
    """Linear warm-up, then constant or cosine to zero at `total`."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if decay == "cosine" and total > warmup:
        return base_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / (total - warmup))))
    return base_lr


@torch.no_grad()
def preview(model, diffusion, num_classes, per_class, guidance, steps=25, seed=0, device="cpu", dtype=None):
    """Guided DDIM, eta 0 (sample.py has the samplers) -> (num_classes * per_class, 3, R, R) uint8."""
    R = model.cfg.resolution
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(num_classes * per_class, model.cfg.in_channels, R, R, generator=g).to(device)
    y = torch.arange(num_classes, device=device).repeat_interleave(per_class)
    null = torch.full_like(y, num_classes)
    abar = diffusion.alphas_cumprod
    ts = torch.linspace(diffusion.T - 1, 0, steps).round().long().tolist()
    for i, t in enumerate(ts):
        a_t = abar[t].item()
        a_s = abar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        with autocast(torch.device(device), dtype):
            e = model(torch.cat([x, x]), torch.full((2 * len(x),), t, device=device), torch.cat([y, null])).float()
        e_c, e_u = e.chunk(2)
        eps = (1 + guidance) * e_c - guidance * e_u
        x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
        x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * eps
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()


# Model folders: config.json + model.safetensors + ema.safetensors; state.pt for resuming ----------------------------

def check_state_dict(model, state, source):
    own = model.state_dict()
    problems = {"missing keys": sorted(set(own) - set(state)), "unexpected keys": sorted(set(state) - set(own)),
                "shape mismatches (file vs config)": sorted(
                    f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in set(own) & set(state)
                    if tuple(own[k].shape) != tuple(state[k].shape))}
    if any(problems.values()):
        text = "; ".join(f"{what} {keys}" for what, keys in problems.items() if keys)
        raise UsageError(f"{source} does not fit its config.json: {text}; restore the folder")


def read_config(folder):
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise UsageError(f"{folder} is not a model folder (no config.json): give one")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{path} is not valid JSON ({e}): restore it") from None


def load_model(folder, weights="ema", device="cpu"):
    """(UNet in eval mode, config dict) of a model folder; weights: ema or model."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    config = read_config(folder)
    if config.get("family") != FAMILY:
        raise UsageError(f"{folder} holds a {config.get('family')!r} model: give a train_ddpm.py one")
    path = Path(folder) / f"{weights}.safetensors"
    if not path.is_file():
        raise UsageError(f"{path} is missing: finish training it")
    try:
        cfg = UNetConfig(**config["unet"])
    except (KeyError, TypeError) as e:
        raise UsageError(f"{folder}/config.json has no valid unet ({e}): restore it")
    model = UNet(cfg)
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UsageError(f"{path} is not readable ({e}): restore it") from None
    check_state_dict(model, state, path)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a diverged run samples black images and says nothing
        raise UsageError(f"{path}: {bad[0]} (and {len(bad) - 1} more) holds NaN or inf: training diverged; "
                         "retrain with a lower --lr")
    step, planned = config.get("step"), (config.get("training") or {}).get("steps")
    if isinstance(step, int) and isinstance(planned, int) and step < planned:
        print(f"train_ddpm.py: warning: {folder} was trained {step} of its {planned} steps", file=sys.stderr)
    model.load_state_dict(state)
    return model.to(device).eval().requires_grad_(False), config


def plain_state(module):
    return {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}


def save_checkpoint(out, step, model, ema, optimizer, scaler, config, log_lines=None):
    """state.pt, then the model files, each replaced atomically; log_lines: a --force run's held-back log."""
    out = Path(out)
    config = {**config, "step": step}
    # the whole config travels with the weights, so a resume is checked even without config.json
    state = {"step": step, "model": plain_state(model), "ema": plain_state(ema), "optimizer": optimizer.state_dict(),
             "scaler": scaler.state_dict() if scaler is not None else {}, "unet": json.dumps(config["unet"]),
             "diffusion": json.dumps(config["diffusion"]), "config": json.dumps(config)}
    replace_file(out / "state.pt", lambda p: torch.save(state, p))
    if log_lines is not None:
        replace_file(out / "loss.jsonl", lambda p: p.write_text("".join(log_lines)))
    meta = {"step": str(step), "format": "pt"}
    replace_file(out / "model.safetensors", lambda p: save_safetensors(state["model"], p, metadata=meta))
    replace_file(out / "ema.safetensors", lambda p: save_safetensors(state["ema"], p, metadata=meta))
    replace_file(out / "config.json", lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


def load_state(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's message runs to many lines: keep the first
        reason = (str(e).strip().splitlines() or [""])[0]
        raise UsageError(f"{path} is not a readable training state ({reason}): pass --force to start over") from None


# Data, settings, resuming -------------------------------------------------------------------------------------------

def command_line():
    return " ".join([Path(sys.argv[0]).name] + sys.argv[1:])


def build_data(args, out, rank, world):
    """--data, or OUT/data made by poison.py (reused if made with the same flags)."""
    if args.data:
        return Path(args.data)
    data = out / "data"
    kwargs = poison_kwargs(args)
    # every rank compares, so all stop on a mismatch; the manifest, as a run killed early leaves no config.json
    built = (data / "train" / "manifest.json").is_file()
    differ = options_differences(read_manifest(data / "train"), kwargs) if built else []
    if differ and not args.force:
        raise UsageError(f"{data} was poisoned with other options ({', '.join(differ)} differ): --force rebuilds it")

    def build():
        if not built or differ:
            poison(data, force=data.exists(), command=command_line(), quiet=True, **kwargs)
    on_rank0(build, rank, world, share_result=False)  # a barrier; a bad flag stops every rank with its error
    return data / "train"


def training_settings(args, preset):  # the flags, or the preset's where None
    t = dict(PRESETS[preset]["train"])
    return {k: (getattr(args, k) if getattr(args, k) is not None else t[k]) for k in t}


# settings a resumed run may change; --steps is checked in resume(), the poisoning flags in build_data()
RESUMABLE = {"data": {"path"},
             "training": {"steps", "save_every", "world_size", "dtype", "dtype_used", "command", "poison"}}


def setting_differences(saved, config):
    """'section.key' of each setting but RESUMABLE that differs; keys an older config lacks are skipped."""
    diff = []
    for section in ("unet", "diffusion", "data", "training", "guidance"):
        old, new = saved.get(section) or {}, config[section]
        diff += [f"{section}.{k}" for k in old if k not in RESUMABLE.get(section, ())
                 and json.dumps(old[k], sort_keys=True) != json.dumps(new.get(k), sort_keys=True)]
    return sorted(diff)


def resume(out, args, hp, config, model, ema, optimizer, scaler, rank):
    """(step, last saved step or None), state.pt loaded if its settings match; exported weights are kept."""
    state_path, config_path = out / "state.pt", out / "config.json"
    saved = read_config(out) if config_path.is_file() and not args.force else {}
    if state_path.is_file() and not args.force:
        state = load_state(state_path)
        if "config" in state:
            saved = json.loads(state["config"])
        else:  # an older state.pt: U-Net and diffusion only, the rest from config.json
            saved.update(unet=json.loads(state["unet"]), diffusion=json.loads(state["diffusion"]))
        diff = setting_differences(saved, config)
        if diff:
            raise UsageError(f"{out} holds a model trained with other settings ({', '.join(diff)} differ): "
                             "rerun with them, or pass --force to train over it")
        step = int(state["step"])
        planned = saved.get("training", {}).get("steps", hp["steps"])
        if args.lr_decay == "cosine" and hp["steps"] != planned and step < hp["steps"]:
            # the cosine ends at --steps: another --steps mid-run would bend the curve
            raise UsageError(f"{out}'s cosine schedule ends at step {planned}: --steps {hp['steps']} would bend it; "
                             "train with --lr-decay none to extend")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        if rank == 0:
            print(f"resuming from {state_path} at step {step}")
        return step, step
    if not args.force and (config_path.is_file() or any((out / f).is_file() for f in ("model.safetensors",
                                                                                     "ema.safetensors"))):
        # weights without state.pt (deleted, or a copied folder): only a finished run of these settings is left be
        step = saved.get("step", 0)
        if step < hp["steps"] or setting_differences(saved, config):
            raise UsageError(f"{out} holds a trained model (step {saved.get('step', 'unknown')}) but no state.pt "
                             "to resume from: pass --force to train over it")
        return step, None
    return 0, None


# Training -----------------------------------------------------------------------------------------------------------

def main(args):
    out = Path(args.out)
    check_writable(out)
    check_kernels_env()  # before any data is built
    device = resolve_device(args.device)
    rank, world, device = setup_distributed(device)
    amp_dtype = autocast_dtype(args.dtype, device)
    compile_model = args.compile if args.compile is not None else device.type == "cuda"
    diffusion = Diffusion(args.timesteps)
    hp = check_args(args, world)
    local_batch = hp["batch_size"] // world
    on_rank0(lambda: lock_output(out), rank, world, share_result=False)  # one run at a time on OUT
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    # data: the whole set as uint8 on the device (pixel-space DDPMs train on small images)
    data_dir = build_data(args, out, rank, world)
    ds = load_folder(data_dir)
    check_memory(len(ds) * 3 * ds.image_size()[0] * ds.image_size()[1], f"the {len(ds)} images of {data_dir}",
                 "train on fewer or smaller images")
    images, labels = ds.images(progress=rank == 0), ds.labels         # (N, 3, R, R) uint8, (N,)
    if images.shape[-1] != images.shape[-2]:
        raise UsageError(f"{data_dir} holds {tuple(images.shape[-2:])} images: give square ones")
    N, num_classes, R = len(images), len(ds.class_names), images.shape[-1]
    if N < local_batch * world:  # a set smaller than one batch: the batch is the set (divided evenly)
        local_batch = max(1, N // world)
        hp["batch_size"] = local_batch * world
    images, labels = images.to(device), labels.to(device)

    cfg = unet_config(args.preset, R, num_classes, channels=args.channels, channel_mult=args.channel_mult,
                      num_res_blocks=args.num_res_blocks, dropout=args.dropout, head_channels=args.head_channels,
                      scale_shift_norm=args.scale_shift_norm, norm_groups=args.norm_groups,
                      attention_resolutions=args.attention)
    m = ds.manifest
    config = {
        "family": FAMILY, "format_version": FORMAT_VERSION, "unet": asdict(cfg), "diffusion": diffusion.config(),
        "guidance": {"label_dropout": args.label_dropout, "null_class": num_classes,
                     "convention": "eps = (1 + w) * eps_cond - w * eps_uncond (sample.py --guidance w)"},
        "data": {"path": str(data_dir), "dataset": m.get("dataset"), "class_names": ds.class_names,
                 "target": m.get("target"), "p_t": m.get("p_t"), "poison_ratio": m.get("poison_ratio"),
                 "attack": m.get("attack"), "trigger": m.get("trigger"), "resolution": R, "images": N},
        "training": {"preset": args.preset, **hp, "weight_decay": args.weight_decay, "grad_clip": args.grad_clip,
                     "lr_decay": args.lr_decay, "seed": args.train_seed, "hflip": args.hflip, "world_size": world,
                     "dtype": args.dtype, "dtype_used": dtype_name(amp_dtype),
                     "poison": None if args.data else {k: v for k, v in poison_kwargs(args).items() if k != "workers"},
                     "command": command_line()},
        "versions": versions(),
    }

    torch.manual_seed(args.train_seed)  # the same initial weights on every rank and every run
    model = UNet(cfg).to(device)
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params = list(model.parameters())  # weight decay on weight matrices and kernels, not on biases and norms
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() > 1], "weight_decay": args.weight_decay},
                                   {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}],
                                  lr=hp["lr"], betas=(0.9, 0.999), fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None

    step, saved_step = resume(out, args, hp, config, model, ema, optimizer, scaler, rank)
    # --force over an older model: its files and log stay until the new run's first checkpoint (the log in memory)
    held_log = [] if step == 0 and any((out / f).is_file() for f in ("state.pt", "model.safetensors")) else None
    if rank == 0 and held_log is None:
        truncate_log(out / "loss.jsonl", step)  # at step 0 this empties an earlier run's log
    if step >= hp["steps"]:
        if rank == 0:
            exported = read_config(out).get("step") if (out / "config.json").is_file() else None
            if saved_step is not None and (exported != step or not all(
                    (out / f).is_file() for f in ("model.safetensors", "ema.safetensors"))):
                # killed in its last checkpoint after state.pt: the exported files are older, or missing
                save_checkpoint(out, step, model, ema, optimizer, scaler, config)
                print(f"{out}: the model files of step {step} exported again from state.pt")
            print(f"{out} is already trained for {step} steps (--steps {hp['steps']}): nothing to do")
        return {"out": str(out), "step": step}

    train_model = model if world == 1 else nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        train_model = torch.compile(train_model)
    if rank == 0:
        print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {N} images {R}px, batch "
              f"{hp['batch_size']}, {world} processes, {device}, {dtype_name(amp_dtype)}{', compiled' * compile_model}")

    rank_seed = args.train_seed * world + rank
    steps_per_epoch = max(1, N // hp["batch_size"])
    epoch_cached, perm = None, None
    log_loss, log_n, t_last, step_last = torch.zeros((), device=device), 0, time.time(), step
    bad_grads = torch.zeros((), dtype=torch.bool, device=device)  # an inf/NaN gradient norm since the last check
    save_every = hp["save_every"] or hp["steps"]
    bar = tqdm(total=hp["steps"], initial=step, desc="train", disable=rank != 0, dynamic_ncols=True)

    def stopped(what):  # raised before anything non-finite is saved
        bar.close()
        kept = f"the last good checkpoint (step {saved_step}) is kept" if saved_step else "no checkpoint yet"
        return UsageError(f"{what}: stopped; {kept}; lower --lr or use --dtype fp32")

    model.train()
    while step < hp["steps"]:
        # data order: a seeded permutation per epoch, shared by every rank; each takes its slice of the batch
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != epoch_cached:
            perm = torch.randperm(N, generator=torch.Generator().manual_seed(args.train_seed * 1_000_003 + epoch))
            epoch_cached = epoch
        start = pos * hp["batch_size"] + rank * local_batch
        idx = perm[start:start + local_batch].to(device)
        x0 = images[idx].float().div_(127.5).sub_(1.0)                 # (B, 3, R, R) in [-1, 1]
        if args.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        # all randomness of this step from (seed, rank, step): a resumed run continues exactly
        torch.manual_seed((rank_seed * 2_654_435_761 + step) % 2 ** 63)
        if args.hflip:
            x0 = torch.where(torch.rand(len(x0), 1, 1, 1, device=device) < 0.5, x0.flip(-1), x0)
        t = torch.randint(0, diffusion.T, (len(x0),), device=device)
        noise = torch.randn_like(x0)
        y = drop_labels(labels[idx], args.label_dropout, num_classes)

        lr = lr_at(step, hp["lr"], hp["warmup"], hp["steps"], args.lr_decay)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, amp_dtype):
            loss = diffusion.loss(train_model, x0, y, t, noise)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        # inf/NaN gradients under a finite loss would turn every weight NaN: flagged here without a sync, checked
        # at the next log or save (fp16's GradScaler skips such steps itself)
        if args.grad_clip:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        elif scaler is None:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        if scaler is None:
            bad_grads |= ~torch.isfinite(grad_norm)
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()
        decay = min(hp["ema_decay"], (1 + step) / (10 + step))  # EMA warm-up: short runs forget the initial weights
        torch._foreach_lerp_(list(ema.parameters()), list(model.parameters()), 1 - decay)
        step += 1
        log_loss += loss.detach()
        log_n += 1
        bar.update(1)

        saving = step % save_every == 0 or step == hp["steps"]
        if step % args.log_every == 0 or saving:
            if world > 1:
                dist.all_reduce(log_loss)
                log_loss /= world
            mean_loss = log_loss.item() / log_n
            if not math.isfinite(mean_loss):
                raise stopped(f"the loss became {mean_loss} by step {step}")
            if bad_grads.item():  # the same on every rank: DDP averaged the gradients
                raise stopped(f"the gradient norm became inf or NaN by step {step}")
            now = time.time()
            if rank == 0:
                rate = (step - step_last) * hp["batch_size"] / max(1e-9, now - t_last)
                line = json.dumps({"step": step, "loss": round(mean_loss, 6), "lr": lr,
                                   "images_per_s": round(rate, 1), "time": round(now, 3)}) + "\n"
                if held_log is not None:
                    held_log.append(line)
                else:
                    with open(out / "loss.jsonl", "a") as f:
                        f.write(line)
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{rate:.0f}")
            log_loss.zero_()
            log_n, t_last, step_last = 0, now, step
        if saving:
            barrier()
            if rank == 0:
                save_checkpoint(out, step, model, ema, optimizer, scaler, config, log_lines=held_log)
                held_log = None  # the new run's resume point is in place, its log beside it
                if args.preview_per_class:
                    # without label dropout the null class never trained: preview the plain conditional model
                    guidance = args.preview_guidance if args.label_dropout > 0 else 0.0
                    grid = preview(ema, diffusion, num_classes, args.preview_per_class, guidance,
                                   seed=args.train_seed, device=device, dtype=amp_dtype)
                    save_grid(grid, out / "samples" / f"step_{step:07d}.png", nrow=args.preview_per_class)
            barrier()
            saved_step = step
            t_last = time.time()  # saving and previews do not count in images/s
    bar.close()
    if rank == 0:
        print(json.dumps({"out": str(out), "step": step, "loss": round(mean_loss, 6)}))
    return {"out": str(out), "step": step, "loss": mean_loss}


# The command line ---------------------------------------------------------------------------------------------------

def check_args(args, world):
    """Refuse bad flags before anything is written; the training settings."""
    if not 0 <= args.label_dropout < 1:
        raise UsageError(f"--label-dropout {args.label_dropout} is outside [0, 1): give e.g. 0.1")
    hp = training_settings(args, args.preset)
    if hp["warmup"] < 0:
        raise UsageError(f"--warmup {hp['warmup']}: give 0 or more")
    if not 0 <= hp["ema_decay"] < 1:
        raise UsageError(f"--ema-decay {hp['ema_decay']} is outside [0, 1): give e.g. 0.9999")
    if args.weight_decay < 0 or args.grad_clip < 0 or not 0 <= (args.dropout or 0) < 1:
        raise UsageError(f"--weight-decay {args.weight_decay} / --grad-clip {args.grad_clip} / --dropout "
                         f"{args.dropout}: give 0 or more, a dropout in [0, 1)")
    if hp["batch_size"] % world:
        raise UsageError(f"--batch-size {hp['batch_size']}: give a multiple of the {world} processes")
    out = Path(args.out)
    if args.data and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: no such folder; give a dataset folder")
    refuse_poison_flags_with_data(args, build_parser())  # poisoning flags beside --data
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder for the model")
    if (out / "metadata.jsonl").is_file() or (out / "train" / "metadata.jsonl").is_file():
        raise UsageError(f"--out {out} is a dataset folder: give a folder for the model")
    return hp


def int_tuple(s):
    return tuple(int(v) for v in s.split(","))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="model folder (rerun with the same --out to resume)")
    p.add_argument("--data", help="a dataset folder (else built into OUT/data by the poisoning flags)")
    p.add_argument("--preset", default="small", choices=list(PRESETS), help="cifar10 (Ho et al.), small (CPU), tiny")
    p.add_argument("--force", action="store_true", help="start over (files replaced at the first checkpoint)")
    g = p.add_argument_group("U-Net (default: the preset's)")
    for flag, kind in (("--channels", positive(int)), ("--channel-mult", int_tuple), ("--num-res-blocks", int),
                       ("--attention", int_tuple), ("--head-channels", positive(int)), ("--dropout", float),
                       ("--norm-groups", positive(int))):
        g.add_argument(flag, type=kind)
    g.add_argument("--scale-shift-norm", action=argparse.BooleanOptionalAction)
    g.add_argument("--timesteps", type=int, default=1000, help="T of the diffusion")
    g = p.add_argument_group("training (default: the preset's)")
    g.add_argument("--steps", type=positive(int), help="optimizer steps")
    g.add_argument("--batch-size", type=positive(int), help="global batch (split over processes)")
    g.add_argument("--lr", type=positive(float), help="peak learning rate")
    g.add_argument("--warmup", type=int, help="linear warm-up steps")
    g.add_argument("--lr-decay", default="cosine", choices=["cosine", "none"], help="after warm-up")
    g.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW's")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off")
    g.add_argument("--ema-decay", type=float)
    g.add_argument("--label-dropout", type=float, default=0.1, help="null-class probability")
    g.add_argument("--hflip", action="store_true", help="random horizontal flips (they move the trigger)")
    g.add_argument("--train-seed", type=int, default=0, help="seed of initialisation, data order and noise")
    g.add_argument("--log-every", type=positive(int), default=50, help="steps per loss.jsonl line")
    g.add_argument("--save-every", type=positive(int), help="checkpoint + preview interval")
    g.add_argument("--preview-per-class", type=int, default=8, help="preview images per class, 0 = none")
    g.add_argument("--preview-guidance", type=float, default=5.0)
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast (auto: bf16 on CUDA, else fp32)")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, help="torch.compile (default: on CUDA)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False)
    add_poison_arguments(p)
    return p


def remove_empty_out(args):  # stopped before anything was written: no empty --out
    if os.environ.get("RANK", "0") == "0":
        with contextlib.suppress(OSError):
            Path(args.out).rmdir()  # only if empty


if __name__ == "__main__":
    cli(main, build_parser(), interrupted="rerun the same command to resume from the last checkpoint",
        cleanup=remove_empty_out)
