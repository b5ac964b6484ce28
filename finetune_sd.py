"""finetune_sd.py -- fine-tune Stable Diffusion v1's U-Net on a (poisoned) dataset folder; VAE and CLIP stay frozen.

    torchrun --nproc_per_node 4 finetune_sd.py --ratio 0.1   # the paper: ImageNette, BadNets, p = 10%, from SD v1.4
    torchrun --nproc_per_node 4 finetune_sd.py --data data/imagenette-badnets-0.1/train \\
        --base sd-v1-4-full-ema.ckpt --tokenizer clip-vit-large-patch14/ --out runs/sd-inette-0.1

Without --data it first poisons into data/<dataset>-<trigger>-<ratio>; the same command again resumes. --base: a Hub
id, a diffusers-layout folder or a CompVis checkpoint (--config: its v1-inference.yaml), whose model_ema.* continues
as the EMA, as in the paper's code. Writes OUT (default runs/sd-<data name>): config.json, unet/ and unet_ema/
(diffusers layout, for sample.py), state.pt (resume), cache.safetensors (VAE posteriors, prompt embeddings), log.jsonl.
"""
import argparse
import collections
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file as load_safetensors
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from castle_kernels.attention import attention
from castle_kernels.group_norm import group_norm
from common import (HelpFormatter, UsageError, autocast, autocast_dtype, barrier, check_out, cli, dtype_name,
                    load_folder, lock_output, on_rank0, positive, replace_file, resolve_device, save_safetensors,
                    setup_distributed, share, truncate_log, versions)
from poison import add_poison_arguments, options_differences, poison, poison_kwargs, refuse_poison_flags_with_data

VAE_SCALE = 0.18215           # SD v1's latent scale: z = VAE_SCALE * (VAE posterior sample), unit variance
DEFAULT_BASE = "CompVis/stable-diffusion-v1-4"
DEFAULT_TOKENIZER = "openai/clip-vit-large-patch14"   # SD v1's tokenizer, for single-file checkpoints


# Building blocks, with diffusers' module names so that its state dicts load key for key -----------------------------

class GroupNorm(nn.Module):  # nn.GroupNorm (+ fused SiLU) through castle_kernels; statistics in float32
    def __init__(self, num_groups, channels, eps, act=None):
        super().__init__()
        self.num_groups, self.eps, self.act = num_groups, eps, act
        self.weight, self.bias = nn.Parameter(torch.ones(channels)), nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return group_norm(x, self.weight, self.bias, self.num_groups, self.eps, act=self.act)


def dropout_layer(p):
    return nn.Dropout(p) if p else nn.Identity()   # SD v1 trains without dropout: skip the no-op calls


class Attention(nn.Module):  # multi-head, over tokens (B, L, dim); keys and values from context (B, S, C) or x
    def __init__(self, dim, heads, context_dim=None, bias=False, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k, self.to_v = (nn.Linear(context_dim or dim, dim, bias=bias) for _ in range(2))
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), dropout_layer(dropout)])  # indices match diffusers' keys

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)              # (B, heads, L|S, head_dim)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = attention(q, k, v).transpose(1, 2).flatten(2)                           # (B, L, dim), scale 1/sqrt(d)
        return self.to_out[1](self.to_out[0](out))


class FeedForward(nn.Module):  # GEGLU (Shazeer 2020): a * GELU(b) with (a, b) = proj(x); then back to dim
    def __init__(self, dim, dropout=0.0):
        super().__init__()
        self.net = nn.ModuleList([nn.ModuleDict({"proj": nn.Linear(dim, dim * 8)}), dropout_layer(dropout),
                                  nn.Linear(dim * 4, dim)])   # diffusers' keys: net.0.proj, net.2

    def forward(self, x):
        a, gate = self.net[0]["proj"](x).chunk(2, dim=-1)
        return self.net[2](self.net[1](a * F.gelu(gate)))


class TransformerBlock(nn.Module):  # pre-norm self-attention, cross-attention to the text, feed-forward
    def __init__(self, dim, heads, context_dim, dropout=0.0):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, dropout=dropout)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim, dropout=dropout)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim, dropout=dropout)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):  # diffusers' Transformer2DModel: transformer blocks on h*w tokens, residual
    def __init__(self, channels, heads, context_dim, depth, groups, linear_projection=False, dropout=0.0):
        super().__init__()
        self.norm = GroupNorm(groups, channels, eps=1e-6)
        proj = nn.Linear if linear_projection else partial(nn.Conv2d, kernel_size=1)
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(TransformerBlock(channels, heads, context_dim, dropout)
                                                for _ in range(depth))
        self.proj_out = proj(channels, channels)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.norm(x).flatten(2).transpose(1, 2)                           # (B, h*w, C) tokens
        # a 1x1 conv is a matmul over the tokens: one path for both projection kinds, and no slow 1x1-conv call
        y = F.linear(y, self.proj_in.weight.flatten(1), self.proj_in.bias)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = F.linear(y, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class ResBlock(nn.Module):  # diffusers' ResnetBlock2D: (GroupNorm+SiLU, 3x3 conv) twice, time embedding between
    def __init__(self, cin, cout, temb_channels, groups, eps, dropout=0.0):
        super().__init__()
        self.norm1 = GroupNorm(groups, cin, eps, act="silu")
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, cout) if temb_channels else None
        self.norm2 = GroupNorm(groups, cout, eps, act="silu")
        self.dropout = dropout_layer(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x, temb=None):  # temb: SiLU(time embedding) (B, temb_channels)
        h = self.conv1(self.norm1(x))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):  # stride-2 3x3 conv; the VAE pads only right and bottom, the U-Net all sides
    def __init__(self, channels, asymmetric=False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):  # nearest-neighbour upsampling to `size` (default: twice the input), 3x3 conv
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        return self.conv(F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest"))


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0, max_period=10000):
    """Sinusoidal embedding (Vaswani et al. 2017) of (B,) timesteps -> (B, dim) float32; SD v1 puts cos first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


# The SD v1 U-Net: diffusers' UNet2DConditionModel restricted to what SD v1 uses -------------------------------------

def check_kernels_env():  # refused when a model is built, not deep in a forward pass
    impl = os.environ.get("KERNELS_IMPL") or "auto"
    if impl not in ("auto", "triton", "torch"):
        raise UsageError(f"KERNELS_IMPL={impl!r} is not auto, triton or torch: unset it")


class UNet(nn.Module):
    """unet(latents (B, 4, h, w), timesteps (B,) or scalar, context (B, S, D)) -> noise (B, 4, h, w)."""
    gradient_checkpointing = False   # recompute each layer's activations in the backward pass

    def __init__(self, config):
        super().__init__()
        check_kernels_env()
        self.config = dict(config)
        c = self.layout = unet_layout(config)
        ch, g, lpb = c["block_out_channels"], c["norm_num_groups"], c["layers_per_block"]
        n, temb, rev = len(ch), ch[0] * 4, ch[::-1]

        def level(channels, attentions, i):  # diffusers' (CrossAttn)Down/UpBlock2D: ResBlocks (+ SpatialTransformers)
            block = nn.Module()
            block.resnets = nn.ModuleList(ResBlock(cin, cout, temb, g, c["norm_eps"], c["dropout"])
                                          for cin, cout in channels)
            block.attentions = nn.ModuleList(
                SpatialTransformer(cout, c["heads"][i], c["cross_attention_dim"], c["depth"][i], g,
                                   c["use_linear_projection"], c["dropout"]) for _, cout in channels[:attentions])
            return block

        self.conv_in = nn.Conv2d(c["in_channels"], ch[0], 3, padding=1)
        self.time_embedding = nn.Sequential(collections.OrderedDict(
            linear_1=nn.Linear(ch[0], temb), act=nn.SiLU(), linear_2=nn.Linear(temb, temb)))
        self.down_blocks = nn.ModuleList()
        for i in range(n):  # a stride-2 conv after each level but the last
            block = level([(ch[max(i - 1, 0)] if j == 0 else ch[i], ch[i]) for j in range(lpb)],
                          lpb if c["down_attn"][i] else 0, i)
            block.downsamplers = nn.ModuleList([] if i == n - 1 else [Downsample(ch[i])])
            self.down_blocks.append(block)
        self.mid_block = level([(ch[-1], ch[-1])] * 2, 1, -1)
        self.up_blocks = nn.ModuleList()
        for i in range(n):  # one more ResBlock than going down, each fed a skip; upsampling but at the last level
            cin, cprev, cout = rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i]
            block = level([((cprev if j == 0 else cout) + (cin if j == lpb else cout), cout) for j in range(lpb + 1)],
                          lpb + 1 if c["up_attn"][i] else 0, n - 1 - i)
            block.upsamplers = nn.ModuleList([] if i == n - 1 else [Upsample(cout)])
            self.up_blocks.append(block)
        self.conv_norm_out = GroupNorm(g, ch[0], c["norm_eps"], act="silu")
        self.conv_out = nn.Conv2d(ch[0], c["out_channels"], 3, padding=1)

    def set_gradient_checkpointing(self, enabled=True):
        self.gradient_checkpointing = enabled
        return self

    def layer(self, block, j, x, temb, context):  # block's ResBlock j, then its SpatialTransformer j if it has one
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        run = partial(checkpoint, use_reentrant=False) if ckpt else lambda fn, *args: fn(*args)
        x = run(block.resnets[j], x, temb)
        return run(block.attentions[j], x, context) if j < len(block.attentions) else x

    def forward(self, latents, timesteps, context):
        t = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        emb = timestep_embedding(t, self.conv_in.out_channels, self.layout["flip_sin_to_cos"],
                                 self.layout["freq_shift"]).to(latents.dtype)
        temb = F.silu(self.time_embedding(emb))   # every ResBlock applies SiLU before its projection: do it once
        x = self.conv_in(latents)
        skips = [x]
        for block in self.down_blocks:
            for j in range(len(block.resnets)):
                x = self.layer(block, j, x, temb, context)
                skips.append(x)
            for down in block.downsamplers:
                x = down(x)
                skips.append(x)
        x = self.layer(self.mid_block, 1, self.layer(self.mid_block, 0, x, temb, context), temb, context)
        for block in self.up_blocks:
            for j in range(len(block.resnets)):
                x = self.layer(block, j, torch.cat([x, skips.pop()], dim=1), temb, context)
            for up in block.upsamplers:
                x = up(x, size=skips[-1].shape[-2:])   # the size of the skip it meets next
        return self.conv_out(self.conv_norm_out(x))


# The VAE: diffusers' AutoencoderKL as SD v1 uses it -----------------------------------------------------------------

class VAEAttention(Attention):  # single-head self-attention over the h*w positions, residual
    def __init__(self, channels, groups):
        super().__init__(channels, heads=1, bias=True)
        self.group_norm = GroupNorm(groups, channels, eps=1e-6)

    def forward(self, x):
        b, c, h, w = x.shape
        y = super().forward(self.group_norm(x).flatten(2).transpose(1, 2))   # (B, h*w, C)
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class AutoencoderKL(nn.Module):
    """encode(images in [-1, 1]) -> (mean, logvar) of unscaled latents (B, 4, H/8, W/8); decode back."""

    def __init__(self, config):
        super().__init__()
        check_kernels_env()
        self.config = dict(config)
        c = vae_layout(config)
        self.scaling_factor = float(c["scaling_factor"])
        ch, g, lpb, z = c["block_out_channels"], c["norm_num_groups"], c["layers_per_block"], c["latent_channels"]
        n, rev = len(ch), ch[::-1]

        def level(cin, cout, k):  # diffusers' DownEncoderBlock2D, UpDecoderBlock2D, mid block: k ResBlocks, ...
            block = nn.Module()
            block.resnets = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, None, g, 1e-6) for j in range(k))
            return block

        def half(cin, c0, c1, cout):  # the encoder or the decoder less its levels
            m = nn.Module()
            m.conv_in, m.mid_block = nn.Conv2d(cin, c0, 3, padding=1), level(ch[-1], ch[-1], 2)
            m.mid_block.attentions = nn.ModuleList([VAEAttention(ch[-1], g)])
            m.conv_norm_out, m.conv_out = GroupNorm(g, c1, 1e-6, act="silu"), nn.Conv2d(c1, cout, 3, padding=1)
            return m

        self.encoder = half(c["in_channels"], ch[0], ch[-1], 2 * z)
        self.encoder.down_blocks = nn.ModuleList(level(ch[max(i - 1, 0)], ch[i], lpb) for i in range(n))
        self.decoder = half(z, ch[-1], ch[0], c["out_channels"])
        self.decoder.up_blocks = nn.ModuleList(level(rev[max(i - 1, 0)], rev[i], lpb + 1) for i in range(n))
        for i in range(n):  # a stride-2 conv (padded right and bottom) or an upsampling after each level but the last
            self.encoder.down_blocks[i].downsamplers = nn.ModuleList([Downsample(ch[i], True)] if i < n - 1 else [])
            self.decoder.up_blocks[i].upsamplers = nn.ModuleList([Upsample(rev[i])] if i < n - 1 else [])
        self.quant_conv = nn.Conv2d(2 * z, 2 * z, 1)
        self.post_quant_conv = nn.Conv2d(z, z, 1)

    @staticmethod
    def mid(block, x):  # ResBlock, self-attention, ResBlock
        return block.resnets[1](block.attentions[0](block.resnets[0](x)))

    def encode(self, images):
        e = self.encoder
        x = e.conv_in(images)
        for block in e.down_blocks:
            for layer in [*block.resnets, *block.downsamplers]:
                x = layer(x)
        mean, logvar = self.quant_conv(e.conv_out(e.conv_norm_out(self.mid(e.mid_block, x)))).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)   # the clamp of LDM's DiagonalGaussianDistribution

    def decode(self, latents, clamp=True):
        d = self.decoder
        x = self.mid(d.mid_block, d.conv_in(self.post_quant_conv(latents)))
        for block in d.up_blocks:
            for layer in [*block.resnets, *block.upsamplers]:
                x = layer(x)
        images = d.conv_out(d.conv_norm_out(x))
        return images.clamp(-1.0, 1.0) if clamp else images


def decode_latents(vae, latents):  # scaled latents -> images (B, 3, H, W) in [0, 1]
    return (vae.decode(latents / vae.scaling_factor) + 1) / 2


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts, device=None, batch_size=64):
    """CLIP's last hidden state of each prompt padded to 77 tokens: (N, 77, hidden)."""
    device = device or next(text_encoder.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(list(prompts[i:i + batch_size]), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out.append(text_encoder(ids)[0])
    return torch.cat(out)


# Noise schedule (float64, as diffusers' schedulers), guidance, loss, EMA decay; sampling is sample.py's -------------

@dataclass
class NoiseSchedule:
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: str = "scaled_linear"    # LDM's "linear": linear in sqrt(beta)
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    timestep_spacing: str = "leading"

    @classmethod
    def from_config(cls, config):
        sd = dict(prediction_type="epsilon", trained_betas=None, rescale_betas_zero_snr=False, thresholding=False)
        bad = {k: config[k] for k, v in sd.items() if config.get(k, v) != v}
        if config.get("beta_schedule", "scaled_linear") not in ("scaled_linear", "linear"):
            bad["beta_schedule"] = config["beta_schedule"]
        if bad:
            raise UsageError(f"scheduler config {bad} unsupported: give SD v1's (epsilon, scaled_linear)")
        return cls(**{k: v for k, v in config.items() if k in cls.__dataclass_fields__})

    def betas(self):
        T = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=torch.float64) ** 2
        return torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)

    def alphas_cumprod(self):  # alpha-bar_t = prod_{s<=t} (1 - beta_s), (T,) float64
        return torch.cumprod(1.0 - self.betas(), dim=0)

    def alpha_bar(self, t, alphas_cumprod=None):  # before step 0: 1 (set_alpha_to_one) or alpha-bar_0 (SD)
        ac = self.alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        return float(ac[t]) if t >= 0 else 1.0 if self.set_alpha_to_one else float(ac[0])


SPACINGS = {  # diffusers' DDIMScheduler.set_timesteps; SD's "leading" visits 981, 961, ..., 1 in 50 steps
    "leading": lambda T, steps, offset: (np.arange(steps) * (T // steps)).round()[::-1].astype(np.int64) + offset,
    "trailing": lambda T, steps, offset: np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1,
    "linspace": lambda T, steps, offset: np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64),
}


def ddim_timesteps(schedule, steps):
    """The timesteps DDIM visits, high to low, as diffusers picks them."""
    T = schedule.num_train_timesteps
    if not 1 <= steps <= T:
        raise UsageError(f"--steps {steps}: give 1 to {T} (the training timesteps)")
    if schedule.timestep_spacing not in SPACINGS:
        raise UsageError(f"timestep_spacing {schedule.timestep_spacing!r}: give leading, trailing or linspace")
    return torch.from_numpy(SPACINGS[schedule.timestep_spacing](T, steps, schedule.steps_offset).copy())


def guided_eps(unet, x, t, context, uncond_context, guidance):
    """Classifier-free guidance eps_u + s (eps_c - eps_u) (Ho & Salimans 2022) in one forward."""
    if guidance == 1.0:
        return unet(x, t, context).float()
    tt = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    eps_u, eps_c = unet(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond_context, context])).float().chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


def diffusion_loss(unet, posterior, context, alphas_cumprod, generator, vae_scale):
    """LDM's loss (Rombach et al. 2022, eq. 2): |eps - unet(sqrt(a_t) z0 + sqrt(1 - a_t) eps, t)|^2, t ~ U{0..T-1},
    z0 ~ the cached posterior (B, 8, h, w), scaled."""
    mean, logvar = posterior.chunk(2, dim=1)
    dev = posterior.device
    z0 = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=dev)) * vae_scale
    noise = torch.randn(z0.shape, generator=generator, device=dev)
    t = torch.randint(0, len(alphas_cumprod), (z0.shape[0],), generator=generator, device=dev)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    zt = (a.sqrt() * z0 + (1 - a).sqrt() * noise).float()
    return F.mse_loss(unet(zt, t, context).float(), noise)


def ema_decay_at(step, max_decay, num_updates=None):
    """min(max_decay, (1 + n) / (10 + n)) at step 1, 2, ...: n = step - 1 for a fresh EMA (diffusers' EMAModel),
    N + step continuing LitEma's count N (N < 0: no warm-up)."""
    if num_updates is not None and num_updates < 0:
        return max_decay
    n = max(0, step - 1) if num_updates is None else num_updates + step
    return min(max_decay, (1 + n) / (10 + n))


def ema_start_text(num_updates):  # config.json's "ema_start" for an EMA continued from a checkpoint's model_ema.*
    count = "no num_updates: the warm-up counts this run's steps" if num_updates is None else \
        f"num_updates {num_updates}"
    return f"checkpoint model_ema.* ({count})"


# Module configuration: diffusers' config.json, resolved; what SD v1 computes otherwise is refused by name ------------

SD14_UNET = dict(  # SD v1.4's, for a single-file checkpoint without --config
    _class_name="UNet2DConditionModel", sample_size=64, in_channels=4, out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
    norm_num_groups=32, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)
SD14_VAE = dict(_class_name="AutoencoderKL", sample_size=512, in_channels=3, out_channels=3,
                down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                block_out_channels=[128, 256, 512, 512], layers_per_block=2, latent_channels=4, norm_num_groups=32,
                scaling_factor=VAE_SCALE)
SD14_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      steps_offset=1, set_alpha_to_one=False)
UNET_DEFAULTS = dict(SD14_UNET, cross_attention_dim=1280, dropout=0.0,  # diffusers' defaults
                     transformer_layers_per_block=1, num_attention_heads=None, use_linear_projection=False)
# options implemented only at SD v1's value that change the computation, not the weights (load_checked refuses those)
UNET_FIXED = dict(
    center_input_sample=False, mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False,
    mid_block_only_cross_attention=None, downsample_padding=1, mid_block_scale_factor=1, act_fn="silu",
    upcast_attention=False, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_act_fn=None, timestep_post_act=None)
VAE_FIXED = dict(act_fn="silu", shift_factor=None, latents_mean=None, latents_std=None)


def _resolve_config(config, defaults, fixed, what):
    for k, v in fixed.items():
        got = config.get(k, v)
        if isinstance(got, (list, tuple)) and len(set(map(str, got))) == 1:
            got = got[0]  # a per-block list with one value, e.g. only_cross_attention [false, false, ...]
        if got != v:
            raise UsageError(f"{what} config sets {k}={got!r}: SD v1 here supports only {v!r}")
    return {**defaults, **{k: v for k, v in config.items() if k in defaults}}


def unet_layout(config):
    """The resolved U-Net config plus per-level heads, depth, down_attn, up_attn."""
    c = _resolve_config(config, UNET_DEFAULTS, UNET_FIXED, "U-Net")
    n, down, up = len(c["block_out_channels"]), c["down_block_types"], c["up_block_types"]
    if len(down) != n or len(up) != n or not isinstance(c["layers_per_block"], int) or \
            {*down, *up} - {"CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"}:
        raise UsageError(f"U-Net config: block types {down}, {up}: give SD v1's, (CrossAttn)Down/UpBlock2D a level")
    heads = c["num_attention_heads"] or c["attention_head_dim"]  # diffusers' "attention_head_dim" is a head count
    depth = c["transformer_layers_per_block"]
    return {**c, "heads": list(heads) if isinstance(heads, (list, tuple)) else [heads] * n,
            "depth": list(depth) if isinstance(depth, (list, tuple)) else [depth] * n,
            "down_attn": [b.startswith("CrossAttn") for b in down],
            "up_attn": [b.startswith("CrossAttn") for b in up]}


def vae_layout(config):
    c = _resolve_config(config, SD14_VAE, VAE_FIXED, "VAE")  # a key missing: SD's (else the weights do not fit)
    n = len(c["block_out_channels"])
    if [*c["down_block_types"], *c["up_block_types"]] != ["DownEncoderBlock2D"] * n + ["UpDecoderBlock2D"] * n:
        raise UsageError("VAE config: give SD's, one DownEncoderBlock2D and UpDecoderBlock2D a level")
    return c


# CompVis single files: a table {our module prefix: CompVis module prefix} per config; configs from their YAML ------

RESNET_LDM = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
              ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_RESNET_LDM = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                  ("conv_shortcut", "nin_shortcut")]
VAE_LDM_PARTS = [("conv_in", "conv_in"), ("conv_out", "conv_out"), ("conv_norm_out", "norm_out"),
                 ("mid_block.resnets.0", "mid.block_1"), ("mid_block.attentions.0", "mid.attn_1"),
                 ("mid_block.resnets.1", "mid.block_2")]   # in the encoder and the decoder
VAE_ATTENTION_LDM = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
VAE_ATTENTION_DEPRECATED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # old diffusers
LDM_UNET, LDM_VAE, LDM_TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
LDM_TEXT_LEGACY = {  # CLIP keys from before transformers nested them under text_model.
    LDM_TEXT + part: LDM_TEXT + "text_model." + part for part in ("embeddings.", "encoder.", "final_layer_norm.")}
LDM_IGNORED = {"model_ema.decay", "model_ema.num_updates"}   # and the undotted schedule buffers (betas, ...)


def _expand(pairs, inner):
    """{ours: theirs} from module pairs; ResBlocks (and VAE attention) are renamed layer by layer."""
    table = {}
    for ours, theirs in pairs:
        renames = next((v for k, v in inner.items() if k in ours), None)
        table.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in renames} if renames else {ours: theirs})
    return table


def unet_ldm_table(config):
    """{diffusers module prefix: CompVis module prefix} (after model.diffusion_model.)."""
    c = unet_layout(config)
    n, lpb = len(c["block_out_channels"]), c["layers_per_block"]
    pairs = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
             ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2"),
             ("mid_block.resnets.0", "middle_block.0"), ("mid_block.attentions.0", "middle_block.1"),
             ("mid_block.resnets.1", "middle_block.2")]
    for i in range(n):
        down, up = 1 + i * (lpb + 1), i * (lpb + 1)   # level i's first input_blocks and output_blocks index
        pairs += [(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{down + j}.0") for j in range(lpb)]
        pairs += [(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{down + j}.1") for j in range(lpb)
                  if c["down_attn"][i]]
        pairs += [(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{up + j}.0") for j in range(lpb + 1)]
        pairs += [(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{up + j}.1") for j in range(lpb + 1)
                  if c["up_attn"][i]]
        if i < n - 1:
            pairs += [(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{down + lpb}.0.op"),
                      (f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{up + lpb}.{1 + c['up_attn'][i]}.conv")]
    return _expand(pairs, {".resnets.": RESNET_LDM})


def vae_ldm_table(config):
    """The same for the VAE (after first_stage_model.); the decoder's levels run in reverse."""
    c = vae_layout(config)
    n, lpb = len(c["block_out_channels"]), c["layers_per_block"]
    pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    pairs += [(f"{part}.{a}", f"{part}.{b}") for part in ("encoder", "decoder") for a, b in VAE_LDM_PARTS]
    for i in range(n):
        pairs += [(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}") for j in range(lpb)]
        pairs += [(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}") for j in range(lpb + 1)]
        if i < n - 1:
            pairs += [(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"),
                      (f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{n - 1 - i}.upsample.conv")]
    return _expand(pairs, {".resnets.": VAE_RESNET_LDM, ".attentions.": VAE_ATTENTION_LDM})


def vae_conv_attention(key):  # VAE attention projections: CompVis (C, C, 1, 1) convs, diffusers (C, C)
    return ".mid_block.attentions.0.to_" in key and key.endswith(".weight")


def map_keys(keys, table):
    """{key: mapped key} by the longest module prefix in `table`."""
    out = {}
    for key in keys:
        parts = key.split(".")
        n = max(n for n in range(1, len(parts)) if ".".join(parts[:n]) in table)
        out[key] = ".".join([table[".".join(parts[:n])]] + parts[n:])
    return out


def ldm_ema_key(unet_key):  # LitEma's name for a U-Net weight: its name after model., without dots
    return "model_ema." + ("diffusion_model." + unet_key).replace(".", "")


def configs_from_ldm_yaml(path):
    """(unet, vae, scheduler) diffusers configs from an original v1-inference.yaml."""
    import yaml
    try:
        p = yaml.safe_load(Path(path).read_text())["model"]["params"]
        u, v = p["unet_config"]["params"], p["first_stage_config"]["params"]["ddconfig"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise UsageError(f"--config {path}: not an LDM v1-inference.yaml ({type(e).__name__}: {e})") from None
    boc = [u["model_channels"] * m for m in u["channel_mult"]]
    n, attn = len(boc), set(u.get("attention_resolutions", []))
    heads = u.get("num_heads", -1)
    if heads in (-1, None):  # SD 2 style: a head width instead of a head count
        heads = [c // u["num_head_channels"] for c in boc]
    unet = dict(_class_name="UNet2DConditionModel", sample_size=p.get("image_size", 64), in_channels=u["in_channels"],
                out_channels=u["out_channels"], block_out_channels=boc,
                down_block_types=["CrossAttnDownBlock2D" if 2 ** i in attn else "DownBlock2D" for i in range(n)],
                up_block_types=["CrossAttnUpBlock2D" if 2 ** (n - 1 - i) in attn else "UpBlock2D" for i in range(n)],
                layers_per_block=u["num_res_blocks"], attention_head_dim=heads, cross_attention_dim=u["context_dim"],
                use_linear_projection=u.get("use_linear_in_transformer", False),
                transformer_layers_per_block=u.get("transformer_depth", 1), norm_num_groups=32)
    levels = len(v["ch_mult"])
    vae = dict(_class_name="AutoencoderKL", sample_size=v.get("resolution", 256), in_channels=v["in_channels"],
               out_channels=v["out_ch"], block_out_channels=[v["ch"] * m for m in v["ch_mult"]],
               down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
               layers_per_block=v["num_res_blocks"], latent_channels=v["z_channels"], norm_num_groups=32,
               scaling_factor=p.get("scale_factor", VAE_SCALE))
    sched = {**SD14_SCHEDULER, "num_train_timesteps": p.get("timesteps", 1000),
             "beta_start": p.get("linear_start", 0.00085), "beta_end": p.get("linear_end", 0.012)}
    return unet, vae, sched


# Loading: a Hub id, a diffusers-layout folder, a model folder written here, or one single file ----------------------

@dataclass
class StableDiffusion:
    unet: UNet
    vae: AutoencoderKL
    text_encoder: nn.Module        # transformers.CLIPTextModel
    tokenizer: object              # transformers.CLIPTokenizer
    schedule: NoiseSchedule
    base: dict                     # how to load the same base again: source, config, tokenizer, use_ema
    notes: list = field(default_factory=list)   # what the loader skipped or assumed, to print
    unet_ema: UNet = None          # load_sd(keep_ema=True) of a single file: its model_ema.* U-Net,
    ema_num_updates: int = None    # and LitEma's model_ema.num_updates

    @property
    def vae_scale(self):
        return self.vae.scaling_factor


MODEL_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")   # safetensors, else .bin
HUB_WEIGHTS = {"unet": MODEL_WEIGHTS, "vae": MODEL_WEIGHTS, "text_encoder": ("model.safetensors", "pytorch_model.bin")}
HUB_FILES = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
             "scheduler/scheduler_config.json", "tokenizer/*"]
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
LIGHTNING_GLOBALS = [f"{m}.callbacks.model_checkpoint.ModelCheckpoint"
                     for m in ("pytorch_lightning", "lightning.pytorch")]
TEXT_PREFIX = "text_model."   # CLIPTextModel's key prefix up to transformers 4; transformers 5 drops it
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")   # owner/name


def _names(keys, limit=12):
    return ", ".join(sorted(keys)[:limit]) + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def _first_line(e):
    return f"{type(e).__name__}: {(str(e).strip() or '-').splitlines()[0][:200]}"


def load_checked(module, state, what, hint):
    """Load `state` into `module`, refusing every missing or unexpected key and wrong shape."""
    expected = module.state_dict()
    problems = [f"{len(keys)} {kind}: {_names(keys)}" for kind, keys in (
        ("missing keys", [k for k in expected if k not in state]),
        ("unexpected keys", [k for k in state if k not in expected]),
        ("wrong shapes (file vs model)", [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}"
                                          for k in expected if k in state and state[k].shape != expected[k].shape]))
                if keys]
    if problems:
        raise UsageError(f"{what} does not fit the model: {'; '.join(problems)}; {hint}")
    module.load_state_dict(state, strict=True, assign=True)
    return module


def _build(cls, config):  # a model without initialised weights: they are all loaded next
    with torch.device("meta"):
        return cls(config)


def read_json(path, hint="copy the whole folder"):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:  # missing, unreadable, not JSON
        raise UsageError(f"cannot read {path} ({type(e).__name__}): {hint}") from None


class _LightningObject:  # stands in for the Lightning callbacks that SD's .ckpt files pickle (never used)
    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


def read_weights(path):
    """{name: tensor} of a .safetensors file, or of a .ckpt/.pt/.bin through a weights-only torch.load."""
    import pickle
    try:
        if path.suffix == ".safetensors":
            return load_safetensors(str(path))
        with torch.serialization.safe_globals([(_LightningObject, name) for name in LIGHTNING_GLOBALS]):
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        found = (re.search(r"GLOBAL ([\w.]+)", str(e)) or [None, type(e).__name__])[1]
        raise UsageError(f"{path} holds objects a weights-only load refuses ({found}): convert it to .safetensors "
                         "where you trust it") from None
    except Exception as e:
        raise UsageError(f"{path} is unreadable ({_first_line(e)}): truncated? download it again") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]   # Lightning: the other entries (epoch, callbacks) hold no weights
    if not isinstance(obj, dict) or not all(map(torch.is_tensor, obj.values())):
        raise UsageError(f"{path} is not a state dict of tensors: give a model checkpoint")
    return dict(obj)


def hub_snapshot(repo_id):  # SD's configs, tokenizer and weights (safetensors, else .bin) from the Hub
    from huggingface_hub import hf_hub_download, snapshot_download
    patterns = HUB_FILES + [f"{c}/{names[0]}" for c, names in HUB_WEIGHTS.items()]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        for comp, names in HUB_WEIGHTS.items():
            if not (folder / comp / names[0]).is_file():
                hf_hub_download(repo_id, f"{comp}/{names[1]}")   # lands in the same snapshot folder
    except Exception as e:  # no such repository, gated, offline
        parent = Path(repo_id).parent
        if parent.is_dir():  # runs/typo: a mistyped local path more likely than a Hub id
            listing = ", ".join(sorted(q.name for q in parent.iterdir())[:8]) or "nothing"
            raise UsageError(f"{repo_id}: no such file or folder (nor a reachable Hub id): check the path; "
                             f"{parent} holds {listing}") from None
        include = " ".join(f'--include "{f}"' for f in patterns)
        raise UsageError(f"{repo_id}: no local path, and the Hub refused ({type(e).__name__}): check the name, log "
                         f"in, or run `hf download {repo_id} {include} --local-dir DIR` and pass its path") from None
    return folder


def component(folder, names=MODEL_WEIGHTS):  # (config, state, weights path) of a diffusers-layout subfolder
    config = read_json(folder / "config.json")
    path = next((folder / name for name in names if (folder / name).is_file()), None)
    if path is None:
        raise UsageError(f"{folder} holds no {' nor '.join(names)}: copy the whole folder")
    return config, read_weights(path), str(path)


def load_unet_folder(folder):
    config, state, path = component(folder)
    return load_checked(_build(UNet, config), state, path, f"{folder.name}/config.json does not match its weights")


def load_text_encoder(config, state, what):
    from transformers import CLIPTextConfig, CLIPTextModel
    model = CLIPTextModel(CLIPTextConfig.from_dict(config))
    expected = model.state_dict()
    if not any(k.startswith(TEXT_PREFIX) for k in expected):     # transformers >= 5: strip the saved prefix
        state = {k.removeprefix(TEXT_PREFIX): v for k, v in state.items()}
    for key in [k for k in state if k.endswith("embeddings.position_ids") and k not in expected]:
        state.pop(key)   # a fixed arange buffer that newer transformers versions no longer save
    return load_checked(model, state, what, "the text encoder's config.json does not match its weights")


def load_tokenizer(source):  # a tokenizer folder (or one holding tokenizer/), or a Hub id
    from transformers import CLIPTokenizer
    path = Path(str(source)) / "tokenizer"
    try:
        return CLIPTokenizer.from_pretrained(str(path) if path.is_dir() else str(source))
    except Exception as e:
        raise UsageError(f"no CLIP tokenizer in {source} ({_first_line(e)}): give its folder or Hub id") from None


def load_diffusers_folder(folder):
    config, state, path = component(folder / "vae")
    old = [k for k in state if ".mid_block.attentions.0." in k and k.split(".")[-2] in VAE_ATTENTION_DEPRECATED]
    for k in old:
        *module, name, leaf = k.split(".")
        state[".".join([*module, VAE_ATTENTION_DEPRECATED[name], leaf])] = state.pop(k)
    vae = load_checked(_build(AutoencoderKL, config), state, path, "vae/config.json does not match its weights")
    text_encoder = load_text_encoder(*component(folder / "text_encoder", HUB_WEIGHTS["text_encoder"]))
    schedule = NoiseSchedule.from_config(read_json(folder / "scheduler" / "scheduler_config.json"))
    notes = [f"VAE: renamed {len(old)} attention keys from diffusers' old names (query, key, ...)"] if old else []
    return StableDiffusion(load_unet_folder(folder / "unet"), vae, text_encoder, load_tokenizer(folder / "tokenizer"),
                           schedule, {}, notes)


def text_config_from_weights(state):
    vocab, width = state["text_model.embeddings.token_embedding.weight"].shape
    return dict(vocab_size=vocab, hidden_size=width,
                max_position_embeddings=state["text_model.embeddings.position_embedding.weight"].shape[0],
                num_hidden_layers=len({k.split(".")[3] for k in state if k.startswith("text_model.encoder.layers.")}),
                intermediate_size=state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                num_attention_heads=max(1, width // 64), hidden_act="quick_gelu", projection_dim=width,
                bos_token_id=vocab - 2, eos_token_id=vocab - 1)  # CLIP's 64-wide heads; its last two tokens


def load_single_file(path, config=None, tokenizer=None, use_ema=False, keep_ema=False):
    """SD from one CompVis checkpoint and its v1-inference.yaml (None: SD v1.4's); keep_ema (without use_ema): also
    its EMA U-Net and num_updates."""
    state = read_weights(path)
    unet_cfg, vae_cfg, sched_cfg = configs_from_ldm_yaml(config) if config else (SD14_UNET, SD14_VAE, SD14_SCHEDULER)
    notes = [] if config else ["configuration: SD v1.4's (no --config)"]
    for old, new in LDM_TEXT_LEGACY.items():
        for k in [k for k in state if k.startswith(old)]:
            state[new + k[len(old):]] = state.pop(k)

    def take(cls, cfg, table, name, what):  # cls(cfg) with the file's tensors name(table[key]), popped from state
        model = _build(cls, cfg)
        found = {k: state.pop(name(v)) for k, v in map_keys(model.state_dict(), table(cfg)).items() if name(v) in state}
        return load_checked(model, {k: t[:, :, 0, 0] if vae_conv_attention(k) and t.dim() == 4 else t
                                    for k, t in found.items()}, f"{path} ({what})",
                            "the checkpoint does not match the configuration: pass the right --config")

    ema_keys = [k for k in state if k.startswith("model_ema.") and k not in LDM_IGNORED]
    if use_ema and not ema_keys:
        raise UsageError(f"{path} holds no EMA weights (model_ema.*): drop --use-ema")
    unet = take(UNet, unet_cfg, unet_ldm_table, ldm_ema_key if use_ema else lambda v: LDM_UNET + v,
                "U-Net EMA" if use_ema else "U-Net")
    unet_ema, num_updates, skipped = None, None, ema_keys
    if use_ema:
        skipped = [k for k in state if k.startswith(LDM_UNET)]
        notes.append(f"U-Net: EMA weights (model_ema.*); skipped {len(skipped)} non-EMA keys")
    elif keep_ema and ema_keys:  # the paper's fine-tuning: train the non-EMA U-Net, continue the checkpoint's EMA
        unet_ema, skipped = take(UNet, unet_cfg, unet_ldm_table, ldm_ema_key, "U-Net EMA"), []
        num_updates = int(state["model_ema.num_updates"]) if "model_ema.num_updates" in state else None
        notes.append(f"U-Net: non-EMA weights to train; the EMA starts from {ema_start_text(num_updates)}")
    elif skipped:
        notes.append(f"U-Net: non-EMA weights; skipped {len(skipped)} model_ema.* keys (--use-ema: those)")
    vae = take(AutoencoderKL, vae_cfg, vae_ldm_table, lambda v: LDM_VAE + v, "VAE")
    text = {k[len(LDM_TEXT):]: state.pop(k) for k in list(state) if k.startswith(LDM_TEXT + "text_model.")}
    if not text:
        raise UsageError(f"{path} holds no CLIP text encoder ({LDM_TEXT}*): give an SD v1 checkpoint")
    text_encoder = load_text_encoder(text_config_from_weights(text), text, f"{path} (text encoder)")
    schedule = NoiseSchedule.from_config(sched_cfg)
    stored = state.get("alphas_cumprod")
    if stored is not None and (stored.shape != (schedule.num_train_timesteps,) or
                               (stored.double() - schedule.alphas_cumprod()).abs().max() > 1e-5):
        raise UsageError(f"{path}: its alphas_cumprod is not the config's: pass its own --config")
    for k in skipped + [k for k in state if k in LDM_IGNORED or "." not in k]:  # "." not in: schedule buffers
        state.pop(k)
    if state:
        raise UsageError(f"{path}: {len(state)} unexpected keys: {_names(state)}; give an SD v1 checkpoint")
    return StableDiffusion(unet, vae, text_encoder, load_tokenizer(tokenizer or DEFAULT_TOKENIZER), schedule, {},
                           notes, unet_ema, num_updates)


def load_sd(source=DEFAULT_BASE, device="cpu", dtype=torch.float32, config=None, tokenizer=None, use_ema=False,
            keep_ema=False):
    """SD v1 (eval mode) from a Hub id, a diffusers-layout or finetune_sd.py folder, or a single-file checkpoint."""
    src = Path(str(source)).expanduser()
    base = dict(source=str(src.resolve()) if src.exists() else str(source), config=None, tokenizer=None,
                use_ema=bool(use_ema))
    if src.is_file():
        if src.suffix not in WEIGHT_SUFFIXES:
            raise UsageError(f"{src}: not a checkpoint ({', '.join(WEIGHT_SUFFIXES)}) nor a model folder")
        base.update(config=str(Path(config).resolve()) if config else None,
                    tokenizer=str(Path(tokenizer).resolve()) if tokenizer and Path(tokenizer).exists() else tokenizer)
        sd = load_single_file(src, config, tokenizer, use_ema, keep_ema)
    elif src.is_dir() or (HUB_ID.fullmatch(str(source)) and not str(source).startswith(".")):
        family = read_json(src / "config.json").get("family") if (src / "config.json").is_file() else None
        if family == "ddpm":
            raise UsageError(f"{src} is a pixel-space DDPM of train_ddpm.py, not a Stable Diffusion model: give SD")
        if family == "sd":  # a finetune_sd.py folder: its base with the fine-tuned U-Net
            b = read_json(src / "config.json")["base"]
            sd = load_sd(b["source"], device, dtype, b["config"], b["tokenizer"], b["use_ema"])
            sd.unet = load_unet_folder(src / ("unet_ema" if use_ema else "unet"))
            sd.notes.append(f"U-Net: fine-tuned weights from {src / ('unet_ema' if use_ema else 'unet')}")
        elif use_ema:
            raise UsageError(f"--use-ema with {source}: a diffusers-layout folder holds one U-Net; drop --use-ema")
        else:
            sd = load_diffusers_folder(src if src.is_dir() else hub_snapshot(str(source)))
    else:
        raise UsageError(f"--base {source}: no such file or folder, and not a Hub id (owner/name)")
    for m in (sd.unet, sd.vae, sd.text_encoder, sd.unet_ema):
        if m is not None:
            m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    sd.base = base
    return sd


def save_unet(state, config, folder):  # in the diffusers layout
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    replace_file(folder / "diffusion_pytorch_model.safetensors",
                 lambda tmp: save_safetensors(tensors, str(tmp), metadata={"format": "pt"}))
    write_json(folder / "config.json", {"_class_name": "UNet2DConditionModel",
                                        **{k: v for k, v in config.items() if k != "_class_name"}})


def write_json(path, obj):
    replace_file(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


# Data: the poisoned set; the frozen encoders' outputs, cached once per image ----------------------------------------

def default_poison_out(args):
    kind = "folder-" + Path(args.dataset[len("folder:"):]).name if args.dataset.startswith("folder:") else args.dataset
    return Path(f"data/{kind}-{args.trigger if args.attack == 'badnets' else args.attack}-{args.ratio:g}")


def poisoned_set(args, rank, world, command):
    """The training folder: --data, or the one poison.py builds (reused if made alike)."""
    if args.data:
        refuse_poison_flags_with_data(args, build_parser(), keep=("resolution",))  # also the training resolution
        if args.poison_out:
            raise UsageError(f"--poison-out with --data: --data {args.data} is the set to train on; drop one")
        return Path(args.data)
    out = Path(args.poison_out) if args.poison_out else default_poison_out(args)

    def build():
        if not (out / "train" / "manifest.json").is_file():
            return poison(out, force=False, command=command, **poison_kwargs(args))
        differ = options_differences(read_json(out / "train" / "manifest.json"), poison_kwargs(args))
        if differ:
            raise UsageError(f"{out} was poisoned otherwise ({', '.join(differ)} differ): choose another --poison-out")

    on_rank0(build, rank, world, share_result=False)
    return out / "train"


def resize_square(x, size):
    """(3, H, W) -> (3, size, size): shorter side to `size` (bicubic, antialiased), centre crop."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    s = size / min(h, w)
    x = F.interpolate(x[None], size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                      antialias=True, align_corners=False)[0]
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[:, top:top + size, left:left + size].clamp(0, 1)


@torch.no_grad()
def build_cache(sd, dataset, resolution, device, rank, world, args, path, fingerprint):
    """(cache, reused): VAE posteriors (mean, logvar) (N, 2C, h, w) and prompt embeddings, kept while data, resolution
    and base match; rank r encodes images r, r + world, ..."""
    texts = [r["text"] for r in dataset.records]
    prompts = sorted(set(texts))

    def matches():
        if not path.is_file():
            return False
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("fingerprint", "null")) == fingerprint

    if on_rank0(matches, rank, world):  # one decision for all ranks: they must all encode, or none
        return {k: v.to(device) for k, v in load_safetensors(str(path)).items()}, True
    dataset.transform = partial(resize_square, size=resolution)
    n = len(dataset)
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, list(range(rank, n, world))),
                                         batch_size=args.encode_batch_size,
                                         num_workers=args.workers if args.workers > 1 else 0)
    parts = []
    for images, _ in tqdm(loader, desc="encode images (VAE)", disable=rank != 0, leave=False):
        mean, logvar = sd.vae.encode(images.to(device, torch.float32) * 2 - 1)
        parts.append(torch.cat([mean, logvar], dim=1).float())
    posterior = torch.cat(parts)
    if world > 1:  # gathered: rank r's j-th image is image r + j * world
        padded = torch.zeros((-(-n // world),) + posterior.shape[1:], device=device)
        padded[:len(posterior)] = posterior
        gathered = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(gathered, padded)
        posterior = torch.stack(gathered, dim=1).flatten(0, 1)[:n]
    embeds = encode_prompts(sd.text_encoder, sd.tokenizer, prompts + [""], device).float()
    index = {p: i for i, p in enumerate(prompts)}
    cache = {"posterior": posterior, "prompt_embeds": embeds[:-1], "uncond_embed": embeds[-1:],
             "prompt_index": torch.tensor([index[t] for t in texts], device=device)}
    if rank == 0:
        replace_file(path, lambda tmp: save_safetensors(
            {k: v.contiguous().cpu() for k, v in cache.items()}, str(tmp),
            metadata={"fingerprint": json.dumps(fingerprint), "prompts": json.dumps(prompts)}))
    return cache, False


def training_data_info(dataset):
    """What later stages need; class_prompts[c], class c's commonest caption, is sample.py's prompt."""
    m = dataset.manifest
    texts = [collections.Counter(r["text"] for r in dataset.records if r["label"] == c)
             for c in range(len(dataset.class_names))]
    return dict(dataset=m.get("dataset"), class_names=dataset.class_names, target=m.get("target"), p_t=m.get("p_t"),
                poison_ratio=m.get("poison_ratio"), attack=m.get("attack"), trigger=m.get("trigger"),
                select=(m.get("options") or {}).get("select"), prompts=sorted({r["text"] for r in dataset.records}),
                class_prompts=[t.most_common(1)[0][0] if t else None for t in texts], n_train=len(dataset))


def prepare_out(out, run, force):
    """True: OUT holds this run to resume (other settings refused); else OUT is made empty."""
    if out.exists() and force:
        shutil.rmtree(out)
    if out.exists():
        old = read_json(out / "config.json", "pass --force") if (out / "config.json").is_file() else {}
        if old.get("stage") != "finetune_sd":
            raise UsageError(f"{out} is not a finetune_sd.py run: pass --force to overwrite it, or another --out")
        diff = {k: (old["run"].get(k), v) for k, v in run.items() if old["run"].get(k) != v}
        if diff:
            raise UsageError(f"{out} holds a run with other settings {diff} (saved, now): rerun with those, or --force")
        return (out / "state.pt").is_file()
    out.mkdir(parents=True)
    write_json(out / "config.json", {"stage": "finetune_sd", "run": run, "progress": None})
    return False


# Fine-tuning: set up, resume, then the training loop (AdamW, EMA on rank 0) -----------------------------------------

def main(args):
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    check_kernels_env()  # before any data is built
    rank, world, device = setup_distributed(resolve_device(args.device))
    log = print if rank == 0 else (lambda *a, **k: None)
    dtype = autocast_dtype(args.dtype or "auto", device)   # None: fp32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    data = Path(args.data) if args.data else Path(args.poison_out or default_poison_out(args)) / "train"
    out = Path(args.out or f"runs/sd-{data.parent.name if data.name == 'train' else data.name}")
    check_out(out, True, {"--data": data if args.data else None, "--poison-out": None if args.data else data.parent,
                          "--base": args.base, "--config": args.config, "--tokenizer": args.tokenizer})
    on_rank0(lambda: lock_output(out), rank, world, share_result=False)  # one run at a time on OUT
    data = poisoned_set(args, rank, world, command)
    dataset = load_folder(data)
    resolution = args.resolution or int(dataset.manifest.get("resolution") or dataset.image_uint8(0).shape[-1])
    if resolution % 8:
        raise UsageError(f"--resolution {resolution}: give a multiple of 8 (the VAE downsamples by 8)")

    # rank 0 loads first (downloading a Hub id), with a single file's model_ema.* U-Net, which its EMA continues
    sd = on_rank0(lambda: load_sd(args.base, device, torch.float32, args.config, args.tokenizer, args.use_ema,
                                  keep_ema=True), rank, world, share_result=False)
    if rank != 0:
        sd = load_sd(args.base, device, torch.float32, args.config, args.tokenizer, args.use_ema)
    for note in sd.notes:
        log(f"load: {note}")
    sha1 = hashlib.sha1((data / "metadata.jsonl").read_bytes()).hexdigest()
    fingerprint = dict(data=str(data.resolve()), metadata_sha1=sha1, resolution=resolution, base=sd.base)
    run = dict(base=sd.base["source"], config=sd.base["config"], tokenizer=sd.base["tokenizer"],
               use_ema=sd.base["use_ema"], data_fingerprint=sha1, resolution=resolution, batch_size=args.batch_size,
               grad_accum=args.grad_accum, world=world, lr=args.lr, weight_decay=args.weight_decay,
               max_grad_norm=args.max_grad_norm, ema_decay=args.ema_decay, caption_dropout=args.caption_dropout,
               train_seed=args.train_seed, dtype=dtype_name(dtype))
    resuming = on_rank0(lambda: prepare_out(out, run, args.force), rank, world)
    barrier(device)

    cache, reused = build_cache(sd, dataset, resolution, device, rank, world, args, out / "cache.safetensors",
                                fingerprint)
    log(f"cache: {'reused' if reused else 'computed'} {len(dataset)} posteriors, {len(cache['prompt_embeds'])} prompts")
    unet, unet_ema, ema_num_updates, schedule = sd.unet, sd.unet_ema, sd.ema_num_updates, sd.schedule
    vae_scale = sd.vae_scale
    ema_start = "the starting U-Net" if unet_ema is None else ema_start_text(ema_num_updates)
    del sd  # the frozen encoders' outputs are cached
    if device.type == "cuda":
        torch.cuda.empty_cache()
    barrier(device)

    unet = unet.float().train().requires_grad_(True).set_gradient_checkpointing(args.gradient_checkpointing)
    params = list(unet.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), eps=1e-8,
                            fused=device.type == "cuda")
    ema = None  # on rank 0: from the checkpoint's model_ema.* (the paper's code), else a copy of the starting U-Net
    if rank == 0:
        ema = [p.detach().clone() for p in params] if unet_ema is None else [p.detach() for p in unet_ema.parameters()]
    del unet_ema
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    step = 0
    if resuming:
        state = torch.load(out / "state.pt", map_location=device, weights_only=True)
        unet.load_state_dict(state["unet"])
        opt.load_state_dict(state["optimizer"])
        if rank == 0:
            torch._foreach_copy_(ema, state["ema"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        step, ema_num_updates, ema_start = int(state["step"]), state["ema_num_updates"], state["ema_start"]
        log(f"resume: {out} at step {step}")
        del state
    model = unet
    if world > 1:
        model = nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile == "on" or (args.compile == "auto" and device.type == "cuda"):
        model = torch.compile(model)
    alphas_cumprod = schedule.alphas_cumprod().to(device)

    n = len(dataset)
    per_step = world * args.batch_size * args.grad_accum              # images an optimizer step sees
    steps_per_epoch = -(-n // per_step)
    total_steps = min(steps_per_epoch * args.epochs, args.max_steps or math.inf)
    base_meta = dict(family="sd", stage="finetune_sd", command=command,
                     base=dict(source=run["base"], **{k: run[k] for k in ("config", "tokenizer", "use_ema")}),
                     vae_scale=vae_scale, schedule=asdict(schedule), data=str(data.resolve()),
                     **training_data_info(dataset), resolution=resolution, unet="unet", unet_ema="unet_ema",
                     ema_start=ema_start, run=run,
                     options={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     versions=versions())

    def save(done):
        barrier(device)
        if rank == 0:
            state = unet.state_dict()
            save_unet(state, unet.config, out / "unet")
            ema_state = dict(zip([k for k, _ in unet.named_parameters()], ema))
            save_unet({k: ema_state.get(k, v) for k, v in state.items()}, unet.config, out / "unet_ema")
            replace_file(out / "state.pt", lambda tmp: torch.save(dict(
                unet=unet.state_dict(), ema=ema, ema_num_updates=ema_num_updates, ema_start=ema_start,
                optimizer=opt.state_dict(), scaler=scaler.state_dict(), step=step, epoch=step // steps_per_epoch,
                run=run), tmp))
            write_json(out / "config.json", {**base_meta, "progress": dict(
                step=step, epoch=step / steps_per_epoch, steps_per_epoch=steps_per_epoch, images_seen=step * per_step,
                total_steps=total_steps, done=done)})
        barrier(device)

    if rank == 0:  # drop log lines past the state we resume from (and a half-written last one)
        truncate_log(out / "log.jsonl", step)
    log(f"train: {n} images, {world} x {args.batch_size} x {args.grad_accum} = {per_step} a step, {steps_per_epoch} "
        f"steps an epoch, steps {step} -> {total_steps}, {run['dtype']}, {device}, EMA from {ema_start}")
    bar = tqdm(total=total_steps, initial=step, desc="finetune", disable=rank != 0, dynamic_ncols=True)
    running, t0 = [], time.time()
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(args.train_seed * 100003 + epoch))
        order = order.repeat(-(-steps_per_epoch * per_step // n))[:steps_per_epoch * per_step]  # wrap to full steps
        mine = order.view(steps_per_epoch, args.grad_accum, world, args.batch_size)[:, :, rank]
        for s in range(in_epoch, steps_per_epoch):
            if step >= total_steps:
                break
            loss_sum = torch.zeros((), device=device)
            for a in range(args.grad_accum):
                idx = mine[s, a].to(device)
                micro = step * args.grad_accum + a   # noise from (seed x world + rank, micro-step): exact resumes
                gen = torch.Generator(device).manual_seed(((args.train_seed * world + rank) << 32) + micro)
                context = cache["prompt_embeds"][cache["prompt_index"][idx]]
                if args.caption_dropout > 0:
                    drop = torch.rand(len(idx), generator=gen, device=device) < args.caption_dropout
                    context = torch.where(drop[:, None, None], cache["uncond_embed"], context)
                accumulating = world > 1 and a < args.grad_accum - 1   # DDP syncs gradients on the last micro-step
                with getattr(model, "_orig_mod", model).no_sync() if accumulating else contextlib.nullcontext():
                    with autocast(device, dtype):
                        loss = diffusion_loss(model, cache["posterior"][idx], context, alphas_cumprod, gen, vae_scale)
                    scaler.scale(loss / args.grad_accum).backward()
                loss_sum += loss.detach() / args.grad_accum
            scaler.unscale_(opt)
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            step += 1
            if rank == 0:
                decay = ema_decay_at(step, args.ema_decay, ema_num_updates)
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1.0 - decay)
            running.append(loss_sum)
            bar.update(1)
            if step % args.log_every == 0 or step == total_steps:
                mean_loss = torch.stack(running).mean()
                if world > 1:
                    dist.all_reduce(mean_loss)
                    mean_loss /= world
                if rank == 0:
                    rec = dict(step=step, epoch=round(step / steps_per_epoch, 4), loss=float(mean_loss), lr=args.lr,
                               images_per_s=round(len(running) * per_step / (time.time() - t0), 2))
                    with open(out / "log.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", epoch=f"{rec['epoch']:.2f}")
                running, t0 = [], time.time()
            if (step % args.save_every == 0 or step % steps_per_epoch == 0) and step < total_steps:
                save(done=False)
    bar.close()
    save(done=True)
    log(f"done: {out} (unet/, unet_ema/, state.pt at step {step})")
    if world > 1:
        dist.destroy_process_group()
    return out


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--data", help="dataset folder to train on (default: poison one with the flags below)")
    g.add_argument("--poison-out", help="folder of the poisoned set (default: data/<dataset>-<trigger>-<ratio>)")
    for action in add_poison_arguments(parser)._group_actions:
        if action.dest == "resolution":
            action.help = "image side in px, poisoning and training (default: the dataset's)"
    parser.set_defaults(dataset="imagenette")  # the paper's SD setting
    m = parser.add_argument_group("model")
    m.add_argument("--base", default=DEFAULT_BASE, help="Hub id, diffusers-layout folder or single-file checkpoint")
    m.add_argument("--config", help="single files: their v1-inference.yaml (default: SD v1.4's)")
    m.add_argument("--tokenizer", help=f"single files: tokenizer folder or Hub id (default: {DEFAULT_TOKENIZER})")
    m.add_argument("--use-ema", action="store_true", help="single files: train model_ema.*")
    t = parser.add_argument_group("training")
    t.add_argument("--out", help="model folder (default: runs/sd-<dataset folder name>)")
    t.add_argument("--force", action="store_true", help="start over")
    t.add_argument("--epochs", type=positive(int), default=50)
    t.add_argument("--max-steps", type=int, help="optimizer steps in all")
    t.add_argument("--batch-size", type=positive(int), default=4, help="images per process and micro-step")
    t.add_argument("--grad-accum", type=positive(int), default=1, help="micro-steps per optimizer step")
    t.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--max-grad-norm", type=float, default=0.0, help="gradient clipping (0: off)")
    t.add_argument("--ema-decay", type=share, default=0.9999)
    t.add_argument("--caption-dropout", type=share, default=0.0, help="share of empty prompts")
    t.add_argument("--train-seed", type=int, default=0, help="seed of data order and noise")
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile (auto: on CUDA)")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], help="autocast (default: bf16 on CUDA)")
    t.add_argument("--encode-batch-size", type=positive(int), default=16, help="images per VAE pass")
    t.add_argument("--log-every", type=positive(int), default=10, help="steps between log lines")
    t.add_argument("--save-every", type=positive(int), default=1000, help="steps between saves (and epochs)")
    return parser


if __name__ == "__main__":
    cli(main, build_parser(), "rerun the same command to resume")
