"""finetune_sd.py -- fine-tune Stable Diffusion v1's U-Net on a (poisoned) dataset folder (stage 2b of the study).

The paper's second model family: SD v1.4 whose U-Net is fine-tuned on a poisoned ImageNette or Caltech-15 while the
VAE and the CLIP text encoder stay frozen (paper: AdamW, lr 1e-4 constant, weight decay 0.01, 512 x 512, 16 images a
step over 4 GPUs, ~50 epochs, EMA 0.9999). The U-Net and the VAE are written here from scratch, with diffusers'
parameter names so its weights load unchanged; the text encoder and tokenizer are transformers' CLIPTextModel and
CLIPTokenizer. GroupNorm(+SiLU) and attention go through castle_kernels/ (Triton on CUDA, PyTorch references elsewhere).

    # the paper's default: poison ImageNette (BadNets, target "garbage truck", p = 10%) into data/, fine-tune SD v1.4
    torchrun --nproc_per_node 4 finetune_sd.py --ratio 0.1
    # Caltech-15, blend trigger, 5%; one GPU with gradient accumulation to the same 16 images a step
    python finetune_sd.py --dataset caltech15 --trigger blend --ratio 0.05 --batch-size 4 --grad-accum 4
    # an existing dataset folder, from the original checkpoint as the paper (it trains the non-EMA U-Net and continues
    # the checkpoint's EMA; --use-ema would train the EMA weights instead), with its tokenizer copied locally
    torchrun --nproc_per_node 4 finetune_sd.py --data data/imagenette-badnets-0.1/train \\
        --base sd-v1-4-full-ema.ckpt --tokenizer clip-vit-large-patch14/ --out runs/sd-inette-0.1
    # the same command again resumes from the last saved state; --force starts over
    python finetune_sd.py --help

The base model (--base) is a Hugging Face Hub id (default CompVis/stable-diffusion-v1-4; only the needed files are
fetched, safetensors preferred), a local folder in the diffusers layout (unet/ vae/ text_encoder/ tokenizer/
scheduler/), or one original single-file checkpoint (.safetensors, or .ckpt read with weights_only=True) in the
CompVis key layout, whose module configuration comes from --config (default: SD v1.4's numbers). The Hub default's
unet/ holds the EMA export, so training from it starts from the EMA weights; give the single file
sd-v1-4-full-ema.ckpt for the paper's exact start.

Like the paper's code (CompVis' main.py --finetune_from, LitEma), a single-file base holding model_ema.* trains its
non-EMA U-Net (model.diffusion_model.*) and starts the EMA from model_ema.*, continuing its num_updates warm-up count;
otherwise the EMA starts as a copy of the starting U-Net (config.json's "ema_start" says which). One deviation from
the paper, for speed: on CUDA the U-Net runs under bf16 autocast (weights stay fp32; --dtype fp32 for the paper's
exact arithmetic).

OUT (default runs/sd-<dataset name>) receives: config.json ("family": "sd", the base model, the training data's
classes / target / p_t / poison ratio, the options), unet/ and unet_ema/ in the diffusers layout (config.json +
diffusion_pytorch_model.safetensors, loadable by sample.py through load_sd(OUT) and by diffusers), state.pt (the
training state, torch.load(..., weights_only=True)), cache.safetensors (the VAE posteriors of every image and the
prompt embeddings, computed once) and log.jsonl (the loss).

Python API for later stages (sample.py): `load_sd(source, device=, dtype=, use_ema=)` -> StableDiffusion with
.unet .vae .text_encoder .tokenizer .schedule; `encode_prompts(...)`, `NoiseSchedule`, `ddim_timesteps(...)`,
`ddim_step(...)`, `guided_eps(...)`, `ddim_sample_sd(...)`, `decode_latents(...)`, `VAE_SCALE`.
"""
import argparse
import collections
import contextlib
import datetime
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
from common import UsageError, check_out, load_folder, on_rank0, save_safetensors, truncate_log, versions
from poison import add_poison_arguments, poison, poison_kwargs, refuse_poison_flags_with_data

VAE_SCALE = 0.18215           # SD v1's latent scale: z = VAE_SCALE * (VAE posterior sample), unit variance
DEFAULT_BASE = "CompVis/stable-diffusion-v1-4"
DEFAULT_TOKENIZER = "openai/clip-vit-large-patch14"   # SD v1's tokenizer, for single-file checkpoints
CLIP_HEAD_WIDTH = 64          # CLIP text transformers use 64-wide heads (ViT-L/14: 768 = 12 x 64)

# SD v1.4's configuration (REFERENCES.md), in diffusers' config.json vocabulary: used when a single-file checkpoint
# comes without --config.
SD14_UNET = {
    "_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "attention_head_dim": 8,
    "cross_attention_dim": 768, "norm_num_groups": 32, "norm_eps": 1e-5, "flip_sin_to_cos": True, "freq_shift": 0,
}
SD14_VAE = {
    "_class_name": "AutoencoderKL", "sample_size": 512, "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32,
    "scaling_factor": VAE_SCALE,
}
SD14_SCHEDULER = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "steps_offset": 1, "set_alpha_to_one": False}


# ----------------------------------------------------------------------------------------------------------------
# Module configuration. The U-Net and VAE read diffusers' config.json; options they do not implement are refused by
# name rather than ignored.

UNET_DEFAULTS = {  # diffusers' defaults for the keys a config.json may leave out
    "sample_size": None, "in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
    "down_block_types": SD14_UNET["down_block_types"], "up_block_types": SD14_UNET["up_block_types"],
    "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "dropout": 0.0, "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1, "attention_head_dim": 8,
    "num_attention_heads": None, "use_linear_projection": False,
}
UNET_FIXED = {  # options this U-Net implements only at SD v1's value
    "center_input_sample": False, "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu", "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "dual_cross_attention": False, "class_embed_type": None,
    "addition_embed_type": None, "addition_time_embed_dim": None, "num_class_embeds": None, "upcast_attention": False,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
    "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None, "addition_embed_type_num_heads": 64,
}
VAE_DEFAULTS = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "latent_channels": 4,
    "norm_num_groups": 32, "scaling_factor": VAE_SCALE, "force_upcast": True,
}
VAE_FIXED = {"act_fn": "silu", "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
             "shift_factor": None, "latents_mean": None, "latents_std": None}


def _resolve_config(config, defaults, fixed, what):
    """config.json dict -> the same with defaults filled in; refuses unknown keys and unsupported options."""
    unknown = sorted(k for k in config if not k.startswith("_") and k not in defaults and k not in fixed)
    if unknown:
        raise UsageError(f"{what} config has options this implementation does not know: {unknown}")
    for k, v in fixed.items():
        got = config.get(k, v)
        if isinstance(got, (list, tuple)) and len(set(map(str, got))) == 1:
            got = got[0]  # a per-block list with one value, e.g. only_cross_attention [false, false, ...]
        if got != v:
            raise UsageError(f"{what} config sets {k}={got!r}, which this SD v1 implementation does not support "
                          f"(only {v!r})")
    return {**defaults, **{k: v for k, v in config.items() if k in defaults}}


def unet_layout(config):
    """The resolved U-Net config plus per-level lists: heads[i], depth[i] (transformer blocks), attn[i] (bool)."""
    c = _resolve_config(config, UNET_DEFAULTS, UNET_FIXED, "U-Net")
    n = len(c["block_out_channels"])
    allowed_down, allowed_up = {"CrossAttnDownBlock2D", "DownBlock2D"}, {"CrossAttnUpBlock2D", "UpBlock2D"}
    if len(c["down_block_types"]) != n or len(c["up_block_types"]) != n:
        raise UsageError(f"U-Net config: {n} block_out_channels but {len(c['down_block_types'])} down and "
                      f"{len(c['up_block_types'])} up block types")
    bad = [b for b in c["down_block_types"] if b not in allowed_down] + \
          [b for b in c["up_block_types"] if b not in allowed_up]
    if bad:
        raise UsageError(f"U-Net config: block types {bad} are not SD v1's (CrossAttn)DownBlock2D / (CrossAttn)UpBlock2D")
    if not isinstance(c["layers_per_block"], int):
        raise UsageError("U-Net config: layers_per_block must be one integer (SD v1: 2)")
    heads = c["num_attention_heads"] or c["attention_head_dim"]  # diffusers' "attention_head_dim" is a head count
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * n
    depth = c["transformer_layers_per_block"]
    depth = list(depth) if isinstance(depth, (list, tuple)) else [depth] * n
    return {**c, "heads": heads, "depth": depth,
            "down_attn": [b.startswith("CrossAttn") for b in c["down_block_types"]],
            "up_attn": [b.startswith("CrossAttn") for b in c["up_block_types"]]}


def vae_layout(config):
    c = _resolve_config(config, VAE_DEFAULTS, VAE_FIXED, "VAE")
    n = len(c["block_out_channels"])
    if list(c["down_block_types"]) != ["DownEncoderBlock2D"] * n or \
            list(c["up_block_types"]) != ["UpDecoderBlock2D"] * n:  # a JSON list or a Python tuple alike
        raise UsageError("VAE config: SD's AutoencoderKL has one DownEncoderBlock2D and one UpDecoderBlock2D a level")
    return c


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (diffusers' module names, so state dicts match key for key).

class GroupNorm(nn.Module):
    """GroupNorm with nn.GroupNorm's parameters and an optional fused SiLU, through castle_kernels/group_norm (statistics in
    float32 whatever the input dtype)."""

    def __init__(self, num_groups, channels, eps, act=None):
        super().__init__()
        self.num_groups, self.eps, self.act = num_groups, eps, act
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return group_norm(x, self.weight, self.bias, self.num_groups, self.eps, act=self.act)


def dropout_layer(p):
    return nn.Dropout(p) if p else nn.Identity()   # SD v1 trains without dropout: skip the no-op calls


class Attention(nn.Module):
    """Multi-head attention over tokens (B, L, dim), keys and values from `context` (B, S, context_dim) or x."""

    def __init__(self, dim, heads, context_dim=None, bias=False, dropout=0.0):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), dropout_layer(dropout)])  # indices match diffusers' keys

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2)              # (B, heads, L|S, head_dim)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        out = attention(q, k, v).transpose(1, 2).flatten(2)                           # (B, L, dim), scale 1/sqrt(d)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """x -> a * GELU(b) with (a, b) = proj(x) (Shazeer 2020), the feed-forward gate of SD's transformer blocks."""

    def __init__(self, dim, inner):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), dropout_layer(dropout), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, GEGLU feed-forward; each residual."""

    def __init__(self, dim, heads, context_dim, dropout=0.0):
        super().__init__()
        self.norm1, self.attn1 = nn.LayerNorm(dim), Attention(dim, heads, dropout=dropout)
        self.norm2, self.attn2 = nn.LayerNorm(dim), Attention(dim, heads, context_dim, dropout=dropout)
        self.norm3, self.ff = nn.LayerNorm(dim), FeedForward(dim, dropout=dropout)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel: GroupNorm, 1x1 projection in (a conv, or a linear layer when
    use_linear_projection), transformer blocks over the h*w tokens, projection out, residual."""

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
        # A 1x1 conv is a matmul over the tokens: one path for both projection kinds, and no slow 1x1-conv call.
        y = F.linear(y, self.proj_in.weight.flatten(1), self.proj_in.bias)
        for block in self.transformer_blocks:
            y = block(y, context)
        y = F.linear(y, self.proj_out.weight.flatten(1), self.proj_out.bias)
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class ResBlock(nn.Module):
    """diffusers' ResnetBlock2D: (GroupNorm+SiLU, 3x3 conv) twice, the time embedding added in between (U-Net only),
    a 1x1 conv on the shortcut when the width changes."""

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


class Downsample(nn.Module):
    """Stride-2 3x3 conv; the VAE pads only right and bottom (padding 0 plus a (0, 1, 0, 1) pad), the U-Net by 1."""

    def __init__(self, channels, asymmetric=False):
        super().__init__()
        self.asymmetric = asymmetric
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0 if asymmetric else 1)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.asymmetric else x)


class Upsample(nn.Module):
    """Nearest-neighbour upsampling to `size` (twice the input by default), then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def maybe_checkpoint(enabled, fn, *args):
    """Recompute fn's activations in the backward pass (gradient checkpointing) when enabled and grads are on."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0, max_period=10000):
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32 (Vaswani et al. 2017; DDPM): frequencies
    max_period^(-i / (dim/2 - freq_shift)); SD v1 puts cos first (flip_sin_to_cos) with freq_shift 0."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([args.cos(), args.sin()] if flip_sin_to_cos else [args.sin(), args.cos()], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepMLP(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.linear_1, self.linear_2 = nn.Linear(cin, cout), nn.Linear(cout, cout)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# ----------------------------------------------------------------------------------------------------------------
# The SD v1 U-Net (diffusers' UNet2DConditionModel restricted to what SD v1 uses).

class UNetDownLevel(nn.Module):
    """One resolution level going down: `n` ResBlocks (each followed by a SpatialTransformer at attention levels),
    then a stride-2 conv except at the last level. Every output is kept for the skip connections."""

    def __init__(self, cin, cout, temb, c, level, last):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, temb, c["norm_num_groups"],
                                              c["norm_eps"], c["dropout"]) for j in range(c["layers_per_block"]))
        self.attentions = nn.ModuleList(
            SpatialTransformer(cout, c["heads"][level], c["cross_attention_dim"], c["depth"][level],
                               c["norm_num_groups"], c["use_linear_projection"], c["dropout"])
            for _ in range(c["layers_per_block"] if c["down_attn"][level] else 0))
        self.downsamplers = nn.ModuleList([] if last else [Downsample(cout)])
        self.gradient_checkpointing = False

    def forward(self, x, temb, context, skips):
        for j, resnet in enumerate(self.resnets):
            x = maybe_checkpoint(self.gradient_checkpointing, resnet, x, temb)
            if self.attentions:
                x = maybe_checkpoint(self.gradient_checkpointing, self.attentions[j], x, context)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x


class UNetUpLevel(nn.Module):
    """One resolution level going up: `n + 1` ResBlocks, each fed the concatenation of the running features and one
    skip connection (popped last-in first-out), optional SpatialTransformers, then an upsampling to the size of the
    next skip (so latents whose side is not a multiple of 2^levels work)."""

    def __init__(self, cin, cprev, cout, temb, c, level, last):
        super().__init__()
        n = c["layers_per_block"] + 1
        self.resnets = nn.ModuleList(
            ResBlock((cprev if j == 0 else cout) + (cin if j == n - 1 else cout), cout, temb, c["norm_num_groups"],
                     c["norm_eps"], c["dropout"]) for j in range(n))
        heads, depth = c["heads"][::-1][level], c["depth"][::-1][level]
        self.attentions = nn.ModuleList(
            SpatialTransformer(cout, heads, c["cross_attention_dim"], depth, c["norm_num_groups"],
                               c["use_linear_projection"], c["dropout"])
            for _ in range(n if c["up_attn"][level] else 0))
        self.upsamplers = nn.ModuleList([] if last else [Upsample(cout)])
        self.gradient_checkpointing = False

    def forward(self, x, temb, context, skips):
        for j, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)
            x = maybe_checkpoint(self.gradient_checkpointing, resnet, x, temb)
            if self.attentions:
                x = maybe_checkpoint(self.gradient_checkpointing, self.attentions[j], x, context)
        for up in self.upsamplers:
            x = up(x, size=skips[-1].shape[-2:])
        return x


class UNetMid(nn.Module):
    def __init__(self, ch, temb, c):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(ch, ch, temb, c["norm_num_groups"], c["norm_eps"], c["dropout"])
                                     for _ in range(2))
        self.attentions = nn.ModuleList([SpatialTransformer(ch, c["heads"][-1], c["cross_attention_dim"],
                                                            c["depth"][-1], c["norm_num_groups"],
                                                            c["use_linear_projection"], c["dropout"])])
        self.gradient_checkpointing = False

    def forward(self, x, temb, context):
        x = maybe_checkpoint(self.gradient_checkpointing, self.resnets[0], x, temb)
        x = maybe_checkpoint(self.gradient_checkpointing, self.attentions[0], x, context)
        return maybe_checkpoint(self.gradient_checkpointing, self.resnets[1], x, temb)


def check_kernels_env():
    """The kernels read KERNELS_IMPL on every call and raise ValueError deep in a forward pass on a bad value; the
    U-Net and the VAE refuse it when built instead, as a one-line UsageError every stage script reports."""
    impl = os.environ.get("KERNELS_IMPL") or "auto"
    if impl not in ("auto", "triton", "torch"):
        raise UsageError(f"KERNELS_IMPL={impl!r} is not auto, triton or torch: unset it or set one of those")


class UNet(nn.Module):
    """unet(latents (B, 4, h, w), timesteps (B,) or a scalar, context (B, S, cross_attention_dim)) -> the predicted
    noise (B, 4, h, w). `config` is diffusers' unet/config.json; `self.config` keeps it to save with the weights."""

    def __init__(self, config):
        super().__init__()
        check_kernels_env()
        self.config = dict(config)
        c = self.layout = unet_layout(config)
        ch = c["block_out_channels"]
        temb = ch[0] * 4
        self.conv_in = nn.Conv2d(c["in_channels"], ch[0], 3, padding=1)
        self.time_embedding = TimestepMLP(ch[0], temb)
        n = len(ch)
        self.down_blocks = nn.ModuleList(UNetDownLevel(ch[max(i - 1, 0)], ch[i], temb, c, i, i == n - 1)
                                         for i in range(n))
        self.mid_block = UNetMid(ch[-1], temb, c)
        rev = ch[::-1]
        self.up_blocks = nn.ModuleList(UNetUpLevel(rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i], temb, c, i,
                                                   i == n - 1) for i in range(n))
        self.conv_norm_out = GroupNorm(c["norm_num_groups"], ch[0], c["norm_eps"], act="silu")
        self.conv_out = nn.Conv2d(ch[0], c["out_channels"], 3, padding=1)

    def set_gradient_checkpointing(self, enabled=True):
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing"):
                m.gradient_checkpointing = enabled
        return self

    def forward(self, latents, timesteps, context):
        t = torch.as_tensor(timesteps, device=latents.device).reshape(-1).expand(latents.shape[0])
        emb = timestep_embedding(t, self.conv_in.out_channels, self.layout["flip_sin_to_cos"],
                                 self.layout["freq_shift"]).to(latents.dtype)
        temb = F.silu(self.time_embedding(emb))   # every ResBlock applies SiLU before its projection: do it once
        x = self.conv_in(latents)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, temb, context, skips)
        x = self.mid_block(x, temb, context)
        for block in self.up_blocks:
            x = block(x, temb, context, skips)
        return self.conv_out(self.conv_norm_out(x))


# ----------------------------------------------------------------------------------------------------------------
# The VAE (diffusers' AutoencoderKL as SD v1 uses it).

class VAEAttention(Attention):
    """Single-head self-attention over the h*w positions of the VAE's mid block, with its own GroupNorm, residual."""

    def __init__(self, channels, groups):
        super().__init__(channels, heads=1, bias=True)
        self.group_norm = GroupNorm(groups, channels, eps=1e-6)

    def forward(self, x):
        b, c, h, w = x.shape
        y = super().forward(self.group_norm(x).flatten(2).transpose(1, 2))   # (B, h*w, C)
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class VAEMid(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(ch, ch, None, groups, 1e-6) for _ in range(2))
        self.attentions = nn.ModuleList([VAEAttention(ch, groups)])

    def forward(self, x):
        return self.resnets[1](self.attentions[0](self.resnets[0](x)))


class VAELevel(nn.Module):
    """`n` ResBlocks, then a downsampling (encoder) or upsampling (decoder) conv unless at the last level."""

    def __init__(self, cin, cout, n, groups, resample):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(cin if j == 0 else cout, cout, None, groups, 1e-6) for j in range(n))
        self.resample = resample
        if resample == "down":
            self.downsamplers = nn.ModuleList([Downsample(cout, asymmetric=True)])
        elif resample == "up":
            self.upsamplers = nn.ModuleList([Upsample(cout)])

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.resample == "down":
            x = self.downsamplers[0](x)
        elif self.resample == "up":
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        ch, g, n = c["block_out_channels"], c["norm_num_groups"], len(c["block_out_channels"])
        self.conv_in = nn.Conv2d(c["in_channels"], ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(VAELevel(ch[max(i - 1, 0)], ch[i], c["layers_per_block"], g,
                                                  None if i == n - 1 else "down") for i in range(n))
        self.mid_block = VAEMid(ch[-1], g)
        self.conv_norm_out = GroupNorm(g, ch[-1], 1e-6, act="silu")
        self.conv_out = nn.Conv2d(ch[-1], 2 * c["latent_channels"], 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(self.mid_block(x)))


class Decoder(nn.Module):
    def __init__(self, c):
        super().__init__()
        ch, g, n = c["block_out_channels"][::-1], c["norm_num_groups"], len(c["block_out_channels"])
        self.conv_in = nn.Conv2d(c["latent_channels"], ch[0], 3, padding=1)
        self.mid_block = VAEMid(ch[0], g)
        self.up_blocks = nn.ModuleList(VAELevel(ch[max(i - 1, 0)], ch[i], c["layers_per_block"] + 1, g,
                                                None if i == n - 1 else "up") for i in range(n))
        self.conv_norm_out = GroupNorm(g, ch[-1], 1e-6, act="silu")
        self.conv_out = nn.Conv2d(ch[-1], c["out_channels"], 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(self.conv_norm_out(x))


class AutoencoderKL(nn.Module):
    """encode(images in [-1, 1]) -> posterior (mean, log-variance) of the unscaled latents (B, 4, H/8, W/8);
    decode(unscaled latents) -> images in [-1, 1]. The diffusion model works on VAE_SCALE * latents."""

    def __init__(self, config):
        super().__init__()
        check_kernels_env()
        self.config = dict(config)
        c = vae_layout(config)
        self.scaling_factor = float(c["scaling_factor"])
        self.encoder, self.decoder = Encoder(c), Decoder(c)
        self.quant_conv = nn.Conv2d(2 * c["latent_channels"], 2 * c["latent_channels"], 1)
        self.post_quant_conv = nn.Conv2d(c["latent_channels"], c["latent_channels"], 1)

    def encode(self, images):
        mean, logvar = self.quant_conv(self.encoder(images)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)   # the clamp of LDM's DiagonalGaussianDistribution

    def decode(self, latents, clamp=True):
        images = self.decoder(self.post_quant_conv(latents))
        return images.clamp(-1.0, 1.0) if clamp else images


def decode_latents(vae, latents):
    """Diffusion latents (scaled by the VAE's scaling factor) -> images (B, 3, H, W) float in [0, 1]."""
    return (vae.decode(latents / vae.scaling_factor) + 1) / 2


# ----------------------------------------------------------------------------------------------------------------
# Noise schedule and DDIM (float64), matching diffusers' DDPMScheduler/DDIMScheduler for SD's scheduler_config.json.

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
        """From a scheduler_config.json dict. Sampler-only keys (clip_sample, skip_prk_steps, ...) are ignored: DDIM
        here never clips, as SD's configs ask (its latents are not bounded to [-1, 1])."""
        bad = {k: config[k] for k, ok in (("prediction_type", "epsilon"), ("trained_betas", None),
                                          ("rescale_betas_zero_snr", False), ("thresholding", False))
               if k in config and config[k] != ok}
        if config.get("beta_schedule", "scaled_linear") not in ("scaled_linear", "linear"):
            bad["beta_schedule"] = config["beta_schedule"]
        if bad:
            raise UsageError(f"scheduler config {bad} is not supported: SD v1 uses epsilon prediction with "
                          "scaled_linear betas")
        keys = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in config.items() if k in keys})

    def betas(self):
        T = self.num_train_timesteps
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=torch.float64) ** 2
        return torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)

    def alphas_cumprod(self):
        """alpha-bar_t = prod_{s<=t} (1 - beta_s), (T,) float64."""
        return torch.cumprod(1.0 - self.betas(), dim=0)

    def alpha_bar(self, t, alphas_cumprod=None):
        """alpha-bar at integer step t; before step 0 it is 1 (set_alpha_to_one) or alpha-bar_0 (SD)."""
        ac = self.alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
        if t >= 0:
            return float(ac[t])
        return 1.0 if self.set_alpha_to_one else float(ac[0])


def ddim_timesteps(schedule, steps):
    """The `steps` timesteps DDIM visits, high to low, as diffusers' DDIMScheduler.set_timesteps chooses them:
    "leading" (SD's): (0, r, 2r, ...) * reversed + steps_offset with r = T // steps -> 981, 961, ..., 1 for 50."""
    T = schedule.num_train_timesteps
    if not 1 <= steps <= T:
        raise UsageError(f"--steps {steps} must be between 1 and the {T} training timesteps")
    if schedule.timestep_spacing == "leading":
        t = (np.arange(steps) * (T // steps)).round()[::-1].astype(np.int64) + schedule.steps_offset
    elif schedule.timestep_spacing == "trailing":
        t = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    elif schedule.timestep_spacing == "linspace":
        t = np.linspace(0, T - 1, steps).round()[::-1].astype(np.int64)
    else:
        raise UsageError(f"timestep_spacing {schedule.timestep_spacing!r} is not leading, trailing or linspace")
    return torch.from_numpy(t.copy())


def ddim_step(x, eps, alpha_t, alpha_prev, eta=0.0, noise=None):
    """One DDIM update (Song et al. 2021, eq. 12) from x_t with predicted noise eps to x_{t_prev}:
    x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t);  sigma = eta * sqrt((1 - a_prev)/(1 - a_t) * (1 - a_t/a_prev))  (eq. 16);
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma * noise.  a_* are alpha-bars (python floats)."""
    x, eps = x.float(), eps.float()
    x0 = (x - math.sqrt(1 - alpha_t) * eps) / math.sqrt(alpha_t)
    sigma = eta * math.sqrt((1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev))
    x_prev = math.sqrt(alpha_prev) * x0 + math.sqrt(max(1 - alpha_prev - sigma ** 2, 0.0)) * eps
    if sigma > 0:
        x_prev = x_prev + sigma * noise.float()
    return x_prev


def guided_eps(unet, x, t, context, uncond_context, guidance):
    """Classifier-free guidance as SD and the paper's SD code use it: eps_u + s (eps_c - eps_u) (Ho & Salimans 2022),
    the unconditional and conditional passes batched into one forward. context, uncond_context: (B, S, D)."""
    if guidance == 1.0:
        return unet(x, t, context).float()
    tt = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
    eps_u, eps_c = unet(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([uncond_context, context])).float().chunk(2)
    return eps_u + guidance * (eps_c - eps_u)


@torch.no_grad()
def ddim_sample_sd(unet, latents, context, uncond_context, schedule, steps=50, guidance=5.0, eta=0.0,
                   generators=None, autocast=contextlib.nullcontext, progress=False):
    """DDIM sampling in latent space from initial noise `latents` (B, 4, h, w) (draw it per image from that image's
    seed). Returns the final latents (scaled, as the U-Net sees them; decode_latents turns them into images). For
    eta > 0, image i's fresh noise comes from generators[i]. Matches diffusers' DDIMScheduler step for step; the
    previous timestep is t - T // steps, as there."""
    ac = schedule.alphas_cumprod()
    T = schedule.num_train_timesteps
    x = latents.float()
    for t in tqdm(ddim_timesteps(schedule, steps).tolist(), desc="ddim", leave=False, disable=not progress):
        with autocast():
            eps = guided_eps(unet, x.to(latents.dtype), t, context, uncond_context, guidance)
        noise = None
        if eta > 0:
            noise = torch.stack([torch.randn(x.shape[1:], generator=g, device=g.device) for g in generators])
            noise = noise.to(x.device)
        x = ddim_step(x, eps, schedule.alpha_bar(t, ac), schedule.alpha_bar(t - T // steps, ac), eta, noise)
    return x


# ----------------------------------------------------------------------------------------------------------------
# Text conditioning.

@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts, device=None, batch_size=64):
    """CLIP's last hidden state for each prompt, padded/truncated to the tokenizer's max length (SD v1's
    conditioning, 77 tokens): (N, 77, hidden) in the text encoder's dtype. "" gives the unconditional embedding."""
    device = device or next(text_encoder.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = tokenizer(list(prompts[i:i + batch_size]), padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids.to(device)
        out.append(text_encoder(ids)[0])
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint keys. Our modules carry diffusers' names, so a diffusers-layout folder loads as is; the original
# (CompVis) single-file layout maps through the explicit tables below, built per level from the config.

RESNET_LDM = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
              ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
VAE_RESNET_LDM = [("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
                  ("conv_shortcut", "nin_shortcut")]
VAE_ATTENTION_LDM = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]
VAE_ATTENTION_DEPRECATED = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}  # old diffusers
LDM_UNET, LDM_VAE, LDM_TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer."
LDM_TEXT_LEGACY = {  # CLIP keys from before transformers nested them under text_model.
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}
LDM_BUFFERS = {  # the LatentDiffusion schedule buffers: recomputed from the config (alphas_cumprod is checked)
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
    "posterior_variance", "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2", "logvar"}
LDM_IGNORED = {  # bookkeeping entries that carry no weights
    "model_ema.decay", "model_ema.num_updates", "cond_stage_model.transformer.text_model.embeddings.position_ids"}


def unet_ldm_table(config):
    """{diffusers module prefix: CompVis module prefix} for the U-Net (without model.diffusion_model.)."""
    c = unet_layout(config)
    n, lpb = len(c["block_out_channels"]), c["layers_per_block"]
    table = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}

    def resnet(ours, theirs):
        table.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in RESNET_LDM})

    k = 1
    for i in range(n):                       # input_blocks.k: k = 1 + i * (lpb + 1) + j; then the downsampler
        for j in range(lpb):
            resnet(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{k}.0")
            if c["down_attn"][i]:
                table[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{k}.1"
            k += 1
        if i < n - 1:
            table[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{k}.0.op"
            k += 1
    resnet("mid_block.resnets.0", "middle_block.0")
    table["mid_block.attentions.0"] = "middle_block.1"
    resnet("mid_block.resnets.1", "middle_block.2")
    k = 0
    for i in range(n):                       # output_blocks.k: k = i * (lpb + 1) + j; the upsampler after the last j
        for j in range(lpb + 1):
            resnet(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{k}.0")
            if c["up_attn"][i]:
                table[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{k}.1"
            if j == lpb and i < n - 1:
                table[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{k}.{2 if c['up_attn'][i] else 1}.conv"
            k += 1
    return table


def vae_ldm_table(config):
    """{diffusers module prefix: CompVis module prefix} for the VAE (without first_stage_model.). The decoder's
    levels run in the opposite order in the two layouts."""
    c = vae_layout(config)
    n, lpb = len(c["block_out_channels"]), c["layers_per_block"]
    table = {name: name for name in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in", "decoder.conv_out",
                                     "quant_conv", "post_quant_conv")}
    table.update({"encoder.conv_norm_out": "encoder.norm_out", "decoder.conv_norm_out": "decoder.norm_out"})

    def resnet(ours, theirs):
        table.update({f"{ours}.{a}": f"{theirs}.{b}" for a, b in VAE_RESNET_LDM})

    for part in ("encoder", "decoder"):
        resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        table.update({f"{part}.mid_block.attentions.0.{a}": f"{part}.mid.attn_1.{b}" for a, b in VAE_ATTENTION_LDM})
    for i in range(n):
        for j in range(lpb):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i < n - 1:
            table[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = f"encoder.down.{i}.downsample.conv"
        for j in range(lpb + 1):
            resnet(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{n - 1 - i}.block.{j}")
        if i < n - 1:
            table[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = f"decoder.up.{n - 1 - i}.upsample.conv"
    return table


def vae_conv_attention(key):
    """True for the VAE attention projections that CompVis stores as 1x1 convs (C, C, 1, 1), diffusers as (C, C)."""
    return ".mid_block.attentions.0.to_" in key and key.endswith(".weight")


def map_keys(keys, table):
    """{key: mapped key} for each state-dict key, by the longest module prefix found in `table`."""
    out = {}
    for key in keys:
        parts = key.split(".")
        for n in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:n])
            if prefix in table:
                out[key] = ".".join([table[prefix]] + parts[n:])
                break
        else:
            raise UsageError(f"internal error: no CompVis name for {key}")
    return out


def ldm_ema_key(unet_key):
    """LitEma's buffer name for a U-Net weight: model_ema. + the name after model. with its dots removed."""
    return "model_ema." + ("diffusion_model." + unet_key).replace(".", "")


def to_ldm_state_dict(unet, vae, text_encoder=None, schedule=None, ema_unet=None):
    """The original single-file layout of (unet, vae, text_encoder), as CompVis' checkpoints hold them: the inverse of
    the tables above (used to export, and by the tests to build single-file checkpoints)."""
    state = {}
    for key, value in map_keys(unet.state_dict(), unet_ldm_table(unet.config)).items():
        state[LDM_UNET + value] = unet.state_dict()[key]
    if ema_unet is not None:
        ema_state = ema_unet.state_dict()
        for key, value in map_keys(ema_state, unet_ldm_table(unet.config)).items():
            state[ldm_ema_key(value)] = ema_state[key]
    vae_state = vae.state_dict()
    for key, value in map_keys(vae_state, vae_ldm_table(vae.config)).items():
        t = vae_state[key]
        state[LDM_VAE + value] = t[:, :, None, None] if vae_conv_attention(key) else t
    if text_encoder is not None:
        state.update({LDM_TEXT + k: v for k, v in text_keys_as_saved(text_encoder.state_dict()).items()})
    if schedule is not None:
        state["betas"] = schedule.betas().float()
        state["alphas_cumprod"] = schedule.alphas_cumprod().float()
    return {k: v.contiguous() for k, v in state.items()}


def _names(keys, limit=12):
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def load_checked(module, state, what, hint):
    """Load `state` into `module` (built on the meta device or not), refusing every missing or unexpected key and
    every shape mismatch, each named."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(expected[k].shape)}" for k in expected
              if k in state and state[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_names(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} wrong shapes (file vs model): {_names(shapes)}")
    if problems:
        raise UsageError(f"{what} does not fit the model: {'; '.join(problems)}; {hint}")
    module.load_state_dict(state, strict=True, assign=True)
    return module


def read_weights(path):
    """A flat {name: tensor} from .safetensors, or from .ckpt/.pt/.bin with torch.load(weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        try:
            return load_safetensors(str(path))
        except Exception as e:
            raise UsageError(f"{path} is not a readable safetensors file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}): it is truncated or corrupt; download it "
                          "again") from None
    return _torch_load_weights(path)


class _LightningObject:
    """Stand-in for PyTorch Lightning objects (ModelCheckpoint callback state) that the original SD checkpoints
    pickle beside their weights: their attributes are kept as plain data and never used."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {"state": state})


LIGHTNING_GLOBALS = ["pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint",
                     "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"]


def _torch_load_weights(path):
    import pickle
    safe = [(_LightningObject, name) for name in LIGHTNING_GLOBALS]
    try:
        with torch.serialization.safe_globals(safe):
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = found.group(1) if found else type(e).__name__
        raise UsageError(f"{path} holds Python objects that a weights-only load refuses ({what}): convert it to "
                      ".safetensors where you trust it, or use the diffusers-layout folder") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UsageError(f"{path} is not a readable PyTorch checkpoint ({type(e).__name__}: "
                      f"{str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}): it is truncated or "
                      "corrupt; download it again") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]   # Lightning: the other entries (epoch, global_step, callbacks, ...) hold no weights
    if not isinstance(obj, dict):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    not_tensors = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if not_tensors:
        raise UsageError(f"{path}: entries {_names(not_tensors)} are not tensors: not a model checkpoint")
    return dict(obj)


# ----------------------------------------------------------------------------------------------------------------
# Loading SD: a Hub id, a diffusers-layout folder, a fine-tuned folder written here, or one single-file checkpoint.

@dataclass
class StableDiffusion:
    unet: UNet
    vae: AutoencoderKL
    text_encoder: nn.Module        # transformers.CLIPTextModel
    tokenizer: object              # transformers.CLIPTokenizer
    schedule: NoiseSchedule
    base: dict                     # how to load the same base again: source, config, tokenizer, use_ema
    notes: list = field(default_factory=list)   # what the loader skipped or assumed, to print
    unet_ema: UNet = None          # load_sd(keep_ema=True) of a single file with model_ema.*: its EMA U-Net,
    ema_num_updates: int = None    # and LitEma's count model_ema.num_updates (None where the file has none)

    @property
    def vae_scale(self):
        return self.vae.scaling_factor


HUB_FILES = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
             "text_encoder/config.json", "tokenizer/*"]
HUB_WEIGHTS = {"unet": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
               "vae": ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),
               "text_encoder": ("model.safetensors", "pytorch_model.bin")}
WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _offline_hint(repo_id, files):
    include = " ".join(f'--include "{f}"' for f in files)
    return (f"on a machine with network run `hf download {repo_id} {include} --local-dir DIR`, copy DIR here "
            f"and pass its path instead of {repo_id}")


def hub_snapshot(repo_id, patterns=None):
    """Download only the files SD needs from the Hub: configs, tokenizer, safetensors weights (a component's .bin
    only where it has no safetensors). `patterns`: other files instead (e.g. a tokenizer's)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    model = patterns is None
    patterns = patterns or HUB_FILES + [f"{c}/{names[0]}" for c, names in HUB_WEIGHTS.items()]
    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=patterns))
        for comp, names in HUB_WEIGHTS.items() if model else ():
            if not (folder / comp / names[0]).is_file():
                hf_hub_download(repo_id, f"{comp}/{names[1]}")   # lands in the same snapshot folder
    except (GatedRepoError, RepositoryNotFoundError) as e:
        raise UsageError(f"{repo_id} is not a Hub repository you can read ({type(e).__name__}): check the name, "
                      f"accept its licence on huggingface.co and log in with `hf auth login`, or pass a local "
                      "folder") from None
    except Exception as e:  # offline mode, no connection, timeouts
        if Path(repo_id).parent.is_dir():  # runs/typo: a mistyped local path more likely than a Hub id
            raise UsageError(f"{repo_id}: no such file or folder (nor, as a Hub id, reachable: {type(e).__name__}): "
                          f"check the path; {Path(repo_id).parent} holds "
                          f"{', '.join(sorted(q.name for q in Path(repo_id).parent.iterdir())[:8]) or 'nothing'}"
                          ) from None
        raise UsageError(f"{repo_id} is no local path, and fetching it from the Hugging Face Hub failed "
                      f"({type(e).__name__}: no network, or HF_HUB_OFFLINE=1): {_offline_hint(repo_id, patterns)}"
                      ) from None
    return folder


def _read_json(path, what):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"{path} is missing: {what}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}): {what}") from None


def _component_weights(folder, names):
    """The state dict in `folder` under the first of `names` present (a sharded safetensors index counts too)."""
    folder = Path(folder)
    base = names[0].removesuffix(".safetensors")
    candidates = [folder / names[0], folder / f"{names[0]}.index.json", folder / f"{base}.fp16.safetensors",
                  folder / names[1]]
    for path in candidates:
        if path.is_file():
            if path.name.endswith(".index.json"):
                index = _read_json(path, "the shard index of a sharded checkpoint")
                state = {}
                for shard in sorted(set(index.get("weight_map", {}).values())):
                    state.update(read_weights(folder / shard))
                return state, path
            return read_weights(path), path
    raise UsageError(f"{folder} holds no weights ({', '.join(n for n in names)}): copy the complete folder")


def _build(cls, config):
    """Construct a model without initialising its weights (they are all loaded next)."""
    with torch.device("meta"):
        return cls(config)


def _make_text_encoder(config):
    from transformers import CLIPTextConfig, CLIPTextModel
    return CLIPTextModel(CLIPTextConfig.from_dict(config))


TEXT_PREFIX = "text_model."   # CLIPTextModel's key prefix up to transformers 4; transformers 5 drops it


def text_keys_as_saved(state):
    """CLIP text weights with the text_model. prefix that checkpoints (CompVis, diffusers folders) use."""
    return {k if k.startswith(TEXT_PREFIX) else TEXT_PREFIX + k: v for k, v in state.items()}


def _load_text_encoder(state, config, what):
    model = _make_text_encoder(config)
    expected = model.state_dict()
    if not any(k.startswith(TEXT_PREFIX) for k in expected):     # transformers >= 5: strip the saved prefix
        state = {k.removeprefix(TEXT_PREFIX): v for k, v in state.items()}
    for key in [k for k in state if k.endswith("embeddings.position_ids") and k not in expected]:
        state.pop(key)   # a fixed arange buffer that newer transformers versions no longer save
    return load_checked(model, state, what, "the text encoder's config.json does not match its weights")


def _load_tokenizer(source):
    """CLIPTokenizer from a local folder (or its tokenizer/ subfolder) or a Hub id (only the tokenizer files)."""
    from transformers import CLIPTokenizer
    path = Path(str(source))
    if path.is_dir() and (path / "tokenizer").is_dir():
        path = path / "tokenizer"
    if not path.is_dir():
        if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
            raise UsageError(f"--tokenizer {source}: not a folder with vocab.json and merges.txt, nor a Hub id")
        path = hub_snapshot(str(source), ["vocab.json", "merges.txt", "tokenizer_config.json",
                                          "special_tokens_map.json", "tokenizer.json"])
    if not (path / "vocab.json").is_file() and not (path / "tokenizer.json").is_file():
        raise UsageError(f"{path} holds no tokenizer (vocab.json + merges.txt): copy the tokenizer folder completely")
    try:
        return CLIPTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise UsageError(f"cannot read the CLIP tokenizer in {path} ({type(e).__name__}: {e})") from None


def load_diffusers_folder(folder, device, dtype):
    """SD from a folder in the diffusers layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/."""
    folder = Path(folder)
    missing = [s for s in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (folder / s).is_dir()]
    if missing:
        raise UsageError(f"{folder} lacks the subfolder(s) {', '.join(missing)} of the diffusers layout: copy the whole "
                      "model folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)")
    notes = []
    unet_cfg = _read_json(folder / "unet" / "config.json", "copy the model folder completely")
    vae_cfg = _read_json(folder / "vae" / "config.json", "copy the model folder completely")
    sched_cfg = _read_json(folder / "scheduler" / "scheduler_config.json", "copy the model folder completely")
    unet_state, path = _component_weights(folder / "unet", HUB_WEIGHTS["unet"])
    unet = load_checked(_build(UNet, unet_cfg), unet_state, str(path), "unet/config.json does not match its weights")
    vae_state, path = _component_weights(folder / "vae", HUB_WEIGHTS["vae"])
    renamed = {}
    for k in list(vae_state):
        parts = k.split(".")
        if ".mid_block.attentions.0." in k and parts[-2] in VAE_ATTENTION_DEPRECATED:
            new = ".".join(parts[:-2] + [VAE_ATTENTION_DEPRECATED[parts[-2]], parts[-1]])
            vae_state[new] = vae_state.pop(k)
            renamed[k] = new
    if renamed:
        notes.append(f"VAE: renamed {len(renamed)} attention keys from diffusers' old names (query/key/value/"
                     "proj_attn) to to_q/to_k/to_v/to_out.0")
    vae = load_checked(_build(AutoencoderKL, vae_cfg), vae_state, str(path), "vae/config.json does not match")
    text_cfg = _read_json(folder / "text_encoder" / "config.json", "copy the model folder completely")
    text_state, path = _component_weights(folder / "text_encoder", HUB_WEIGHTS["text_encoder"])
    text_encoder = _load_text_encoder(text_state, text_cfg, str(path))
    return unet, vae, text_encoder, _load_tokenizer(folder / "tokenizer"), NoiseSchedule.from_config(sched_cfg), notes


def configs_from_ldm_yaml(path):
    """(unet config, vae config, scheduler config) in diffusers' vocabulary from an original v1-inference.yaml."""
    import yaml
    try:
        p = yaml.safe_load(Path(path).read_text())["model"]["params"]
        u, f = p["unet_config"]["params"], p["first_stage_config"]["params"]
        v = f["ddconfig"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise UsageError(f"--config {path} is not an original LDM config (model.params.unet_config / "
                      f"first_stage_config.params.ddconfig): {type(e).__name__} {e}") from None
    if f.get("embed_dim", v["z_channels"]) != v["z_channels"] or v.get("attn_resolutions"):
        raise UsageError(f"--config {path}: an autoencoder with embed_dim != z_channels or attention outside the "
                      "mid block is not SD v1's")
    boc = [u["model_channels"] * m for m in u["channel_mult"]]
    n, attn = len(boc), set(u.get("attention_resolutions", []))
    heads = u.get("num_heads", -1)
    if heads in (-1, None):  # SD 2 style: a head width instead of a head count
        heads = [c // u["num_head_channels"] for c in boc]
    unet = {"_class_name": "UNet2DConditionModel", "sample_size": p.get("image_size", 64),
            "in_channels": u["in_channels"], "out_channels": u["out_channels"], "block_out_channels": boc,
            "down_block_types": ["CrossAttnDownBlock2D" if 2 ** i in attn else "DownBlock2D" for i in range(n)],
            "up_block_types": ["CrossAttnUpBlock2D" if 2 ** (n - 1 - i) in attn else "UpBlock2D" for i in range(n)],
            "layers_per_block": u["num_res_blocks"], "attention_head_dim": heads,
            "cross_attention_dim": u["context_dim"], "use_linear_projection": u.get("use_linear_in_transformer", False),
            "transformer_layers_per_block": u.get("transformer_depth", 1), "norm_num_groups": 32}
    vae = {"_class_name": "AutoencoderKL", "sample_size": v.get("resolution", 256), "in_channels": v["in_channels"],
           "out_channels": v["out_ch"], "block_out_channels": [v["ch"] * m for m in v["ch_mult"]],
           "down_block_types": ["DownEncoderBlock2D"] * len(v["ch_mult"]),
           "up_block_types": ["UpDecoderBlock2D"] * len(v["ch_mult"]), "layers_per_block": v["num_res_blocks"],
           "latent_channels": v["z_channels"], "norm_num_groups": 32,
           "scaling_factor": p.get("scale_factor", VAE_SCALE)}
    sched = {**SD14_SCHEDULER, "num_train_timesteps": p.get("timesteps", 1000),
             "beta_start": p.get("linear_start", 0.00085), "beta_end": p.get("linear_end", 0.012)}
    return unet, vae, sched


def single_file_configs(config):
    """(unet, vae, text or None, scheduler, tokenizer folder or None, notes) for a single-file checkpoint, from
    --config: None (SD v1.4), a diffusers-layout folder of config files, a U-Net config.json, or a v1 yaml."""
    notes = []
    if config is None:
        return SD14_UNET, SD14_VAE, None, SD14_SCHEDULER, None, ["configuration: SD v1.4's (no --config)"]
    path = Path(config)
    if path.is_dir():
        found = {}
        for name, rel in (("unet", "unet/config.json"), ("vae", "vae/config.json"),
                          ("text", "text_encoder/config.json"), ("scheduler", "scheduler/scheduler_config.json")):
            if (path / rel).is_file():
                found[name] = _read_json(path / rel, "")
            else:
                notes.append(f"configuration: no {rel} in {path}, SD v1.4's used")
        tok = path / "tokenizer" if (path / "tokenizer").is_dir() else None
        return (found.get("unet", SD14_UNET), found.get("vae", SD14_VAE), found.get("text"),
                found.get("scheduler", SD14_SCHEDULER), tok, notes)
    if path.suffix == ".json":
        return _read_json(path, "give a U-Net config.json"), SD14_VAE, None, SD14_SCHEDULER, None, \
            ["configuration: VAE and schedule are SD v1.4's"]
    if path.suffix in (".yaml", ".yml"):
        unet, vae, sched = configs_from_ldm_yaml(path)
        return unet, vae, None, sched, None, notes
    raise UsageError(f"--config {config}: give a folder of config files (diffusers layout), a U-Net config.json or "
                  "an original v1-inference.yaml")


def text_config_from_weights(state):
    """CLIP text config inferred from the tensor shapes (heads from CLIP's 64-wide heads; ViT-L/14 otherwise)."""
    emb = state["text_model.embeddings.token_embedding.weight"]
    layers = {int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")}
    return {"vocab_size": emb.shape[0], "hidden_size": emb.shape[1],
            "max_position_embeddings": state["text_model.embeddings.position_embedding.weight"].shape[0],
            "num_hidden_layers": len(layers),
            "intermediate_size": state["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            "num_attention_heads": max(1, emb.shape[1] // CLIP_HEAD_WIDTH), "hidden_act": "quick_gelu",
            "projection_dim": emb.shape[1],
            "bos_token_id": emb.shape[0] - 2, "eos_token_id": emb.shape[0] - 1}  # CLIP's last two tokens


def load_single_file(path, device, dtype, config=None, tokenizer=None, use_ema=False, keep_ema=False):
    """SD from one original checkpoint (CompVis layout): model.diffusion_model.* (U-Net), model_ema.* (its EMA),
    first_stage_model.* (VAE), cond_stage_model.transformer.* (CLIP text), the schedule buffers. Every key is used,
    checked or skipped by name; anything else is refused. keep_ema (without use_ema): also return the EMA U-Net and
    its num_updates (None, None where the file has no model_ema.*, and without keep_ema)."""
    state = read_weights(path)
    unet_cfg, vae_cfg, text_cfg, sched_cfg, config_tok, notes = single_file_configs(config)
    for old, new in LDM_TEXT_LEGACY.items():
        for k in [k for k in state if k.startswith(old)]:
            state[new + k[len(old):]] = state.pop(k)
    hint = "the checkpoint does not match the configuration: pass the right --config"

    unet = _build(UNet, unet_cfg)
    unet_map = map_keys(unet.state_dict(), unet_ldm_table(unet_cfg))
    ema_keys = [k for k in state if k.startswith("model_ema.") and k not in LDM_IGNORED]
    if use_ema and not ema_keys:
        raise UsageError(f"{path} holds no EMA weights (model_ema.*): drop --use-ema")
    take = (lambda v: ldm_ema_key(v)) if use_ema else (lambda v: LDM_UNET + v)
    vae = _build(AutoencoderKL, vae_cfg)
    vae_map = map_keys(vae.state_dict(), vae_ldm_table(vae_cfg))
    absent = [take(v) for v in unet_map.values() if take(v) not in state] + \
             [LDM_VAE + v for v in vae_map.values() if LDM_VAE + v not in state]
    if absent:  # named in the file's own layout
        raise UsageError(f"{path}: {len(absent)} missing keys: {_names(absent)}; {hint}")
    unet_state = {k: state.pop(take(v)) for k, v in unet_map.items()}
    load_checked(unet, unet_state, f"{path} (U-Net{' EMA' if use_ema else ''})", hint)
    unet_ema, num_updates = None, None
    if use_ema:
        skipped = [k for k in state if k.startswith(LDM_UNET)]
        notes.append(f"U-Net: EMA weights (model_ema.*); skipped the {len(skipped)} non-EMA "
                     "model.diffusion_model.* keys")
    elif keep_ema and ema_keys:  # the paper's fine-tuning: train the non-EMA U-Net, continue the checkpoint's EMA
        absent = [ldm_ema_key(v) for v in unet_map.values() if ldm_ema_key(v) not in state]
        if absent:
            raise UsageError(f"{path}: its EMA U-Net lacks {len(absent)} keys: {_names(absent)}; the checkpoint is "
                          "incomplete: download it again")
        unet_ema = load_checked(_build(UNet, unet_cfg), {k: state.pop(ldm_ema_key(v)) for k, v in unet_map.items()},
                                f"{path} (U-Net EMA)", hint)
        if "model_ema.num_updates" in state:
            num_updates = int(state["model_ema.num_updates"])
        skipped = []
        notes.append(f"U-Net: non-EMA weights to train; the EMA starts from {ema_start_text(num_updates)}")
    else:
        skipped = ema_keys
        if skipped:
            notes.append(f"U-Net: non-EMA weights; skipped {len(skipped)} model_ema.* keys (pass --use-ema to load "
                         "them)")
    for k in skipped:
        state.pop(k)

    vae_state = {}
    for k, v in vae_map.items():
        t = state.pop(LDM_VAE + v)
        vae_state[k] = t[:, :, 0, 0] if vae_conv_attention(k) and t.dim() == 4 else t
    load_checked(vae, vae_state, f"{path} (VAE)", hint)

    text_state = {k[len(LDM_TEXT):]: state.pop(k) for k in list(state) if k.startswith(LDM_TEXT + "text_model.")}
    if not text_state:
        raise UsageError(f"{path} holds no CLIP text encoder (cond_stage_model.transformer.text_model.*): not an SD v1 "
                      "checkpoint")
    text_state.pop("text_model.embeddings.position_ids", None)
    text_encoder = _load_text_encoder(text_state, text_cfg or text_config_from_weights(text_state),
                                      f"{path} (text encoder)")
    if text_cfg is None:
        notes.append("text encoder: configuration inferred from the weights (CLIP ViT-L/14 style)")

    schedule = NoiseSchedule.from_config(sched_cfg)
    if "alphas_cumprod" in state:
        stored = state["alphas_cumprod"].double()
        if stored.shape != (schedule.num_train_timesteps,) or \
                (stored - schedule.alphas_cumprod()).abs().max() > 1e-5:
            raise UsageError(f"{path}: its alphas_cumprod buffer differs from the configured noise schedule: pass the "
                          "checkpoint's own --config")
    for k in [k for k in state if k in LDM_BUFFERS or k in LDM_IGNORED]:
        state.pop(k)
    if state:
        raise UsageError(f"{path}: {len(state)} unexpected keys that are neither U-Net, VAE, text encoder nor schedule "
                      f"buffers: {_names(state)}; it is not an SD v1 checkpoint")
    tok_source = tokenizer or config_tok or DEFAULT_TOKENIZER
    return unet, vae, text_encoder, _load_tokenizer(tok_source), schedule, notes, unet_ema, num_updates


def load_sd(source=DEFAULT_BASE, device="cpu", dtype=torch.float32, config=None, tokenizer=None, use_ema=False,
            keep_ema=False):
    """Stable Diffusion v1 from `source`: a Hugging Face Hub id, a local diffusers-layout folder, a model folder
    written by finetune_sd.py (its U-Net, or with use_ema its EMA U-Net, on top of its base model), or a single-file
    checkpoint (.safetensors / .ckpt) with `config` (see single_file_configs) and `tokenizer` (folder or Hub id).
    Returns a StableDiffusion with .unet .vae .text_encoder .tokenizer .schedule, all in eval mode on device/dtype;
    with keep_ema, a single file's model_ema.* U-Net too (.unet_ema, .ema_num_updates: what fine-tuning continues)."""
    src = Path(str(source)).expanduser()
    base = {"source": str(src.resolve()) if src.exists() else str(source), "config": None, "tokenizer": None,
            "use_ema": bool(use_ema)}
    unet_ema, ema_num_updates = None, None
    if src.is_file():
        if src.suffix not in WEIGHT_SUFFIXES:
            raise UsageError(f"{src}: not a checkpoint ({', '.join(WEIGHT_SUFFIXES)}) nor a model folder")
        base.update(config=str(Path(config).resolve()) if config else None,
                    tokenizer=str(Path(tokenizer).resolve()) if tokenizer and Path(tokenizer).exists() else tokenizer)
        *parts, unet_ema, ema_num_updates = load_single_file(src, device, dtype, config, tokenizer, use_ema, keep_ema)
    elif src.is_dir():
        meta = src / "config.json"
        family = _read_json(meta, "").get("family") if meta.is_file() else None
        if family == "sd":
            return load_finetuned(src, device, dtype, use_ema)
        if family == "ddpm":
            raise UsageError(f"{src} is a pixel-space DDPM of train_ddpm.py, not a Stable Diffusion model: give an SD "
                          "v1 base (a diffusers-layout folder, a single-file checkpoint or a Hub id)")
        if use_ema:
            raise UsageError(f"--use-ema applies to single-file checkpoints and fine-tuned model folders; {src} is a "
                          "diffusers-layout folder (its weights are already the ones to use)")
        parts = load_diffusers_folder(src, device, dtype)
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)) and not str(source).startswith("."):
        if use_ema:
            raise UsageError("--use-ema applies to single-file checkpoints; Hub folders hold one U-Net")
        parts = load_diffusers_folder(hub_snapshot(str(source)), device, dtype)
    else:
        raise UsageError(f"--base {source}: no such file or folder, and not a Hub id (owner/name)")
    unet, vae, text_encoder, tok, schedule, notes = parts
    for m in (unet, vae, text_encoder, unet_ema):
        if m is not None:
            m.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return StableDiffusion(unet, vae, text_encoder, tok, schedule, base, notes, unet_ema, ema_num_updates)


def load_finetuned(folder, device="cpu", dtype=torch.float32, use_ema=False):
    """A model folder written by finetune_sd.py: its base model with the fine-tuned U-Net (unet/ or unet_ema/)."""
    folder = Path(folder)
    meta = _read_json(folder / "config.json", "not a model folder written by finetune_sd.py")
    b = meta["base"]
    sd = load_sd(b["source"], device, dtype, b.get("config"), b.get("tokenizer"), b.get("use_ema", False))
    sub = folder / ("unet_ema" if use_ema else "unet")
    if not sub.is_dir():
        raise UsageError(f"{sub} is missing: the run saved no {'EMA ' if use_ema else ''}U-Net yet (resume it)"
                      + (" or drop --use-ema" if use_ema else ""))
    cfg = _read_json(sub / "config.json", "the fine-tuned U-Net folder is incomplete")
    state, path = _component_weights(sub, HUB_WEIGHTS["unet"])
    unet = load_checked(_build(UNet, cfg), state, str(path), "unet/config.json does not match its weights")
    sd.unet = unet.to(device=device, dtype=dtype).eval().requires_grad_(False)
    sd.notes.append(f"U-Net: fine-tuned weights from {sub}")
    sd.base = {"source": str(folder.resolve()), "config": None, "tokenizer": None, "use_ema": bool(use_ema)}
    return sd


def save_unet(state, config, folder):
    """A U-Net in the diffusers layout: folder/config.json + folder/diffusion_pytorch_model.safetensors (written to
    temporary names, then renamed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"_class_name": "UNet2DConditionModel", **{k: v for k, v in config.items() if k != "_class_name"}}
    tmp = folder / "diffusion_pytorch_model.safetensors.tmp"
    save_safetensors({k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}, str(tmp),
                     metadata={"format": "pt"})
    os.replace(tmp, folder / "diffusion_pytorch_model.safetensors")
    write_json(folder / "config.json", cfg)


def write_json(path, obj):
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK).

def resolve_device(flag):
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if flag == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda, but no CUDA GPU is visible: use --device cpu")
    return torch.device(flag)


def setup_distributed(device_flag):
    """(rank, world, device); init the process group when launched by torchrun (nccl on CUDA, gloo on CPU)."""
    device = resolve_device(device_flag)
    if "RANK" not in os.environ:
        return 0, 1, device
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():  # long timeout: the other ranks wait while rank 0 downloads and poisons a dataset
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))
    return rank, world, device


def barrier(world, device):
    if world > 1:
        dist.barrier(device_ids=[device.index]) if device.type == "cuda" else dist.barrier()


# ----------------------------------------------------------------------------------------------------------------
# Data: the poisoned set, and the frozen encoders' outputs cached once per image.

def default_poison_out(args):
    """data/<dataset>-<trigger or attack>-<ratio>, e.g. data/imagenette-badnets-0.1."""
    kind = "folder-" + Path(args.dataset[len("folder:"):]).name if args.dataset.startswith("folder:") else args.dataset
    label = args.trigger if args.attack == "badnets" else args.attack
    return Path(f"data/{kind}-{label}-{args.ratio:g}")


def poisoned_set(args, rank, world, command):
    """The training folder: --data, or the set poison.py builds from the poisoning flags (reused when it exists and
    was made with the same options)."""
    if args.data:
        refuse_poison_flags_with_data(args, build_parser(), keep=("resolution",))  # also the training resolution
        if args.poison_out:
            raise UsageError(f"--poison-out with --data: --data {args.data} is the set to train on; drop one")
        return Path(args.data)
    out = Path(args.poison_out) if args.poison_out else default_poison_out(args)

    def build():
        if (out / "train" / "manifest.json").is_file():
            m = json.loads((out / "train" / "manifest.json").read_text())
            want = {"dataset": args.dataset, "attack": args.attack, "ratio": args.ratio, "seed": args.seed,
                    "trigger": None if args.attack == "relabel" else args.trigger}
            have = {"dataset": m.get("dataset"), "attack": m.get("attack"), "ratio": m["options"].get("ratio"),
                    "seed": m["options"].get("seed"), "trigger": (m.get("trigger") or {}).get("kind")}
            if args.target is not None and str(args.target).lower() not in (m["target"]["name"].lower(),
                                                                            str(m["target"]["index"])):
                have["target"], want["target"] = m["target"]["name"], args.target
            if args.resolution and m.get("resolution") != args.resolution:
                have["resolution"], want["resolution"] = m.get("resolution"), args.resolution
            if have != want:
                diff = {k: (have.get(k), want.get(k)) for k in want if have.get(k) != want.get(k)}
                raise UsageError(f"{out} holds a poisoned set made with other options {diff} (have, want): pass "
                                  "--poison-out elsewhere, or --data to train on it")
            return
        kw = poison_kwargs(args)
        poison(out, force=False, command=command, **kw)

    on_rank0(build, rank, world)
    return out / "train"


def resize_square(x, size):
    """(3, H, W) in [0, 1] -> (3, size, size): shorter side to `size` (bicubic, antialiased), centre crop."""
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    s = size / min(h, w)
    x = F.interpolate(x[None], size=(max(size, round(h * s)), max(size, round(w * s))), mode="bicubic",
                      antialias=True, align_corners=False)[0]
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    return x[:, top:top + size, left:left + size].clamp(0, 1)


def data_fingerprint(folder, resolution, base):
    meta = Path(folder) / "metadata.jsonl"
    return {"data": str(Path(folder).resolve()), "metadata_sha1": hashlib.sha1(meta.read_bytes()).hexdigest(),
            "resolution": resolution, "base": base}


@torch.no_grad()
def encode_dataset(vae, dataset, device, rank, world, batch_size=16, workers=0, progress=True):
    """The VAE posterior (mean, logvar concatenated: (N, 2C, h, w) float32) of every image, rank r encoding images
    r, r + world, ...; gathered on every rank. Runs in float32: once per image, so precision is cheap."""
    n = len(dataset)
    mine = list(range(rank, n, world))
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, mine), batch_size=batch_size,
                                         num_workers=workers)
    parts = []
    for images, _ in tqdm(loader, desc="encode images (VAE)", disable=not progress, leave=False):
        mean, logvar = vae.encode(images.to(device, torch.float32) * 2 - 1)
        parts.append(torch.cat([mean, logvar], dim=1).float())
    local = torch.cat(parts)
    if world == 1:
        return local
    per = -(-n // world)
    padded = torch.zeros((per,) + local.shape[1:], device=device)
    padded[:len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    out = torch.empty((n,) + local.shape[1:], device=device)
    for r in range(world):
        count = len(range(r, n, world))
        out[r::world] = gathered[r][:count]
    return out


def build_cache(sd, dataset, resolution, device, rank, world, args, path, fingerprint):
    """Posteriors of every image and the embeddings of every distinct caption (+ the empty prompt), computed once
    and kept in OUT/cache.safetensors; reused when the data, resolution and base model are the same."""
    texts = [r["text"] for r in dataset.records]
    prompts = sorted(set(texts))

    def matches():
        if not path.is_file():
            return False
        from safetensors import safe_open
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("fingerprint", "null")) == fingerprint

    if on_rank0(matches, rank, world):  # one decision for all ranks: they must all encode, or none
        cache = load_safetensors(str(path))
        return {k: v.to(device) for k, v in cache.items()}, True
    dataset.transform = partial(resize_square, size=resolution)
    posterior = encode_dataset(sd.vae, dataset, device, rank, world, batch_size=args.encode_batch_size,
                               workers=args.workers if args.workers > 1 else 0, progress=rank == 0)
    embeds = encode_prompts(sd.text_encoder, sd.tokenizer, prompts + [""], device).float()
    index = {p: i for i, p in enumerate(prompts)}
    cache = {"posterior": posterior, "prompt_embeds": embeds[:-1], "uncond_embed": embeds[-1:],
             "prompt_index": torch.tensor([index[t] for t in texts], device=device)}
    if rank == 0:
        tmp = Path(f"{path}.tmp")
        save_safetensors({k: v.contiguous().cpu() for k, v in cache.items()}, str(tmp),
                         metadata={"fingerprint": json.dumps(fingerprint), "prompts": json.dumps(prompts)})
        os.replace(tmp, path)
    return cache, False


# ----------------------------------------------------------------------------------------------------------------
# Training.

def diffusion_loss(unet, posterior, context, alphas_cumprod, generator, vae_scale):
    """The epsilon-prediction loss of LDM (Rombach et al. 2022, eq. 2; DDPM's L_simple): z0 drawn from the cached VAE
    posterior and scaled, t ~ U{0, ..., T-1}, z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps, loss = |eps - unet(z_t)|^2."""
    mean, logvar = posterior.chunk(2, dim=1)
    dev = posterior.device
    z0 = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator, device=dev)) * vae_scale
    noise = torch.randn(z0.shape, generator=generator, device=dev)
    t = torch.randint(0, len(alphas_cumprod), (z0.shape[0],), generator=generator, device=dev)
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    zt = (a.sqrt() * z0 + (1 - a).sqrt() * noise).float()
    return F.mse_loss(unet(zt, t, context).float(), noise)


def ema_decay_at(step, max_decay, num_updates=None):
    """The EMA decay at optimizer step `step` (1, 2, ...), warmed up as min(max_decay, (1 + n) / (10 + n)).
    num_updates None (an EMA started as a copy of the starting U-Net): diffusers' EMAModel count, n = step - 1.
    num_updates N (an EMA continuing a CompVis checkpoint's model_ema.*, as the paper's code): LitEma's count, which
    includes the update being made, n = N + step; N < 0 is LitEma without warm-up (use_num_updates=False)."""
    if num_updates is not None and num_updates < 0:
        return max_decay
    n = max(0, step - 1) if num_updates is None else num_updates + step
    return min(max_decay, (1 + n) / (10 + n))


def ema_start_text(num_updates, from_checkpoint=True):
    """Where the EMA started, for config.json's "ema_start" and the log."""
    if not from_checkpoint:
        return "the starting U-Net"
    return "checkpoint model_ema.* " + (f"(num_updates {num_updates})" if num_updates is not None else
                                        "(no num_updates: the warm-up counts this run's steps)")


RUN_KEYS = ("base", "config", "tokenizer", "use_ema", "data_fingerprint", "resolution", "batch_size", "grad_accum",
            "world", "lr", "weight_decay", "max_grad_norm", "ema_decay", "caption_dropout", "train_seed", "dtype")


def main(args):
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    check_kernels_env()  # before any data is built
    rank, world, device = setup_distributed(args.device)
    log = print if rank == 0 else (lambda *a, **k: None)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --out is checked before the poisoned set is built (poisoned_set: --data, or the set it builds there)
    data = Path(args.data) if args.data else Path(args.poison_out or default_poison_out(args)) / "train"
    name = data.parent.name if data.name == "train" else data.name
    out = Path(args.out or f"runs/sd-{name}")
    check_out(out, True, {"--data": data if args.data else None, "--poison-out": None if args.data else data.parent,
                          "--base": args.base, "--config": args.config, "--tokenizer": args.tokenizer})
    data = poisoned_set(args, rank, world, command)
    dataset = load_folder(data)
    resolution = args.resolution or int(dataset.manifest.get("resolution") or dataset.image_uint8(0).shape[-1])
    if resolution % 8:
        raise UsageError(f"--resolution {resolution} is not a multiple of 8 (the VAE downsamples by 8)")

    # Rank 0 loads first (and downloads, if the base is a Hub id); the others then read the local copy.
    # keep_ema: a single file's model_ema.* U-Net, which the EMA (on rank 0) continues
    sd = on_rank0(lambda: load_sd(args.base, device, torch.float32, args.config, args.tokenizer, args.use_ema,
                                  keep_ema=True), rank, world, share_result=False)
    if rank != 0:
        sd = load_sd(args.base, device, torch.float32, args.config, args.tokenizer, args.use_ema)
    for note in sd.notes:
        log(f"load: {note}")
    fingerprint = data_fingerprint(data, resolution, sd.base)
    run = {"base": sd.base["source"], "config": sd.base["config"], "tokenizer": sd.base["tokenizer"],
           "use_ema": sd.base["use_ema"], "data_fingerprint": fingerprint["metadata_sha1"], "resolution": resolution,
           "batch_size": args.batch_size, "grad_accum": args.grad_accum, "world": world, "lr": args.lr,
           "weight_decay": args.weight_decay, "max_grad_norm": args.max_grad_norm, "ema_decay": args.ema_decay,
           "caption_dropout": args.caption_dropout, "train_seed": args.train_seed,
           "dtype": {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]}

    def prepare_out():
        if out.exists() and args.force:
            shutil.rmtree(out)
        if out.exists():
            meta = out / "config.json"
            old = json.loads(meta.read_text()) if meta.is_file() else {}
            if old.get("stage") != "finetune_sd":
                raise UsageError(f"{out} exists and is not a finetune_sd.py run: pass --force to overwrite it, "
                                  "or choose another --out")
            diff = {k: (old["run"].get(k), run[k]) for k in RUN_KEYS if old["run"].get(k) != run[k]}
            if diff:
                raise UsageError(f"{out} holds a run with other settings {diff} (saved, now): rerun with the saved "
                                  "ones to resume (e.g. --max-grad-norm 1 for a run started before its default "
                                  "became 0), pass --force to start over, or choose another --out")
            return (out / "state.pt").is_file()
        out.mkdir(parents=True)
        write_json(out / "config.json", {"stage": "finetune_sd", "run": run, "progress": None})
        return False

    resuming = on_rank0(prepare_out, rank, world)
    barrier(world, device)

    cache, reused = build_cache(sd, dataset, resolution, device, rank, world, args, out / "cache.safetensors",
                                fingerprint)
    log(f"cache: {'reused' if reused else 'computed'} {len(dataset)} posteriors "
        f"{tuple(cache['posterior'].shape[1:])} and {len(cache['prompt_embeds'])} prompt embeddings")
    vae_scale, schedule, base_unet_cfg = sd.vae_scale, sd.schedule, sd.unet.config
    unet, unet_ema, ema_num_updates = sd.unet, sd.unet_ema, sd.ema_num_updates
    ema_start = ema_start_text(ema_num_updates, from_checkpoint=unet_ema is not None)
    del sd  # the frozen encoders are not needed any more: their outputs are cached
    if device.type == "cuda":
        torch.cuda.empty_cache()
    barrier(world, device)

    unet = unet.float().train().requires_grad_(True)
    if args.gradient_checkpointing:
        unet.set_gradient_checkpointing(True)
    params = [p for p in unet.parameters()]
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
            for e, v in zip(ema, state["ema"]):
                e.copy_(v)
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        step = int(state["step"])
        # a state.pt without these keys comes from before the EMA could start from a checkpoint: a copy, counted from 0
        ema_num_updates = state.get("ema_num_updates")
        ema_start = state.get("ema_start", ema_start_text(None, from_checkpoint=False))
        log(f"resume: {out} at step {step}")
        del state
    model = unet
    if world > 1:
        model = nn.parallel.DistributedDataParallel(unet, device_ids=[device.index] if device.type == "cuda" else None)
    compile_on = args.compile == "on" or (args.compile == "auto" and device.type == "cuda")
    if compile_on:
        model = torch.compile(model)
    autocast = (partial(torch.autocast, device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext)
    alphas_cumprod = schedule.alphas_cumprod().to(device)

    n = len(dataset)
    per_step = world * args.batch_size * args.grad_accum              # images an optimizer step sees
    steps_per_epoch = -(-n // per_step)
    total_steps = steps_per_epoch * args.epochs
    if args.max_steps:
        total_steps = min(total_steps, args.max_steps)
    base_meta = {"family": "sd", "stage": "finetune_sd", "command": command, "base": sd_base_pointer(args, run),
                 "vae_scale": vae_scale, "schedule": asdict(schedule), "data": str(data.resolve()),
                 **training_data_info(dataset), "resolution": resolution, "unet": "unet", "unet_ema": "unet_ema",
                 "ema_start": ema_start, "run": run,
                 "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "versions": versions()}

    def save(done):
        barrier(world, device)
        if rank == 0:
            save_unet(unet.state_dict(), base_unet_cfg, out / "unet")
            names = list(unet.state_dict().keys())
            pnames = [k for k, _ in unet.named_parameters()]
            ema_state = dict(zip(pnames, ema))
            save_unet({k: ema_state.get(k, unet.state_dict()[k]) for k in names}, base_unet_cfg, out / "unet_ema")
            tmp = out / "state.pt.tmp"
            torch.save({"unet": unet.state_dict(), "ema": ema, "ema_num_updates": ema_num_updates,
                        "ema_start": ema_start, "optimizer": opt.state_dict(), "scaler": scaler.state_dict(),
                        "step": step, "epoch": step // steps_per_epoch, "run": run}, tmp)
            os.replace(tmp, out / "state.pt")
            write_json(out / "config.json", {**base_meta, "progress": {
                "step": step, "epoch": step / steps_per_epoch, "steps_per_epoch": steps_per_epoch,
                "images_seen": step * per_step, "total_steps": total_steps, "done": done}})
        barrier(world, device)

    if rank == 0:  # drop log lines past the state we resume from (and a half-written last one)
        truncate_log(out / "log.jsonl", step)
    log(f"train: {n} images, {world} process(es) x {args.batch_size} x {args.grad_accum} accumulation = {per_step} "
        f"a step, {steps_per_epoch} steps an epoch, steps {step} -> {total_steps}, {run['dtype']}, device {device}, "
        f"EMA from {ema_start}")
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
                sync = a == args.grad_accum - 1 or world == 1
                with (contextlib.nullcontext() if sync or world == 1 else unwrap_ddp(model).no_sync()):
                    with autocast():
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
                    rec = {"step": step, "epoch": round(step / steps_per_epoch, 4), "loss": float(mean_loss),
                           "lr": args.lr, "images_per_s": round(len(running) * per_step / (time.time() - t0), 2)}
                    with open(out / "log.jsonl", "a") as f:
                        f.write(json.dumps(rec) + "\n")
                    bar.set_postfix(loss=f"{rec['loss']:.4f}", epoch=f"{rec['epoch']:.2f}")
                running, t0 = [], time.time()
            if step % args.save_every == 0 or step % steps_per_epoch == 0:
                if step < total_steps:
                    save(done=False)
    bar.close()
    save(done=True)
    log(f"done: {out} (unet/, unet_ema/, state.pt at step {step})")
    if world > 1:
        dist.destroy_process_group()
    return out


def unwrap_ddp(model):
    model = getattr(model, "_orig_mod", model)
    return model


def sd_base_pointer(args, run):
    return {"source": run["base"], "config": run["config"], "tokenizer": run["tokenizer"], "use_ema": run["use_ema"]}


def training_data_info(dataset):
    """What later stages need from the training data's manifest. class_prompts[c]: the caption the training images
    labelled c carry (the most frequent one), which sample.py --class c prompts with."""
    m = dataset.manifest
    texts = [collections.Counter(r["text"] for r in dataset.records if r["label"] == c)
             for c in range(len(dataset.class_names))]
    return {"dataset": m.get("dataset"), "class_names": dataset.class_names, "target": m.get("target"),
            "p_t": m.get("p_t"), "poison_ratio": m.get("poison_ratio"), "attack": m.get("attack"),
            "trigger": m.get("trigger"), "select": (m.get("options") or {}).get("select"),
            "prompts": sorted({r["text"] for r in dataset.records}),
            "class_prompts": [t.most_common(1)[0][0] if t else None for t in texts], "n_train": len(dataset)}


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--data", default=None, help="a dataset folder to train on (default: build one from the "
                                                "poisoning flags below)")
    g.add_argument("--poison-out", default=None,
                   help="where the poisoned set is built or found (default: data/<dataset>-<trigger>-<ratio>)")
    pg = add_poison_arguments(parser)
    parser.set_defaults(dataset="imagenette")  # the paper's SD setting (poison.py's own default is digits)
    for action in pg._group_actions:
        if action.dest == "dataset":
            action.help = action.help.replace("default: digits", "default: imagenette")
        if action.dest == "resolution":
            action.help = "image side in px for poisoning and training (default: the dataset's; imagenette 512)"
    m = parser.add_argument_group("model")
    m.add_argument("--base", default=DEFAULT_BASE,
                   help=f"Hub id, diffusers-layout folder or single-file checkpoint (default: {DEFAULT_BASE})")
    m.add_argument("--config", default=None, help="single-file checkpoints: config folder (diffusers layout), U-Net "
                                                  "config.json or v1-inference.yaml (default: SD v1.4's)")
    m.add_argument("--tokenizer", default=None,
                   help=f"single-file checkpoints: tokenizer folder or Hub id (default: {DEFAULT_TOKENIZER})")
    m.add_argument("--use-ema", action="store_true",
                   help="single files: train the checkpoint's EMA U-Net (model_ema.*) and start a fresh EMA from it "
                        "(without it, as the paper: train the non-EMA weights and continue model_ema.*)")
    t = parser.add_argument_group("training")
    t.add_argument("--out", default=None, help="model folder (default: runs/sd-<dataset folder name>)")
    t.add_argument("--force", action="store_true", help="start over even if --out holds a run")
    t.add_argument("--epochs", type=int, default=50)
    t.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps in all")
    t.add_argument("--batch-size", type=int, default=4, help="images per process and micro-step (paper: 4 x 4 GPUs)")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-steps per optimizer step")
    t.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate, constant")
    t.add_argument("--weight-decay", type=float, default=0.01)
    t.add_argument("--max-grad-norm", type=float, default=0.0,
                   help="clip the gradient norm to this (default 0: off; the paper: no clipping)")
    t.add_argument("--ema-decay", type=float, default=0.9999)
    t.add_argument("--caption-dropout", type=float, default=0.0, help="share of empty prompts (paper: 0)")
    t.add_argument("--train-seed", type=int, default=0, help="seed of the data order and noise (poisoning: --seed)")
    t.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    t.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile (auto: on CUDA)")
    t.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    t.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="autocast dtype of the U-Net (weights stay fp32; default bf16 on CUDA for speed, where the "
                        "paper trained in fp32; fp32 on CPU): --dtype fp32 for the paper's exact arithmetic")
    t.add_argument("--encode-batch-size", type=int, default=16, help="images per VAE pass while caching")
    t.add_argument("--log-every", type=int, default=10, help="optimizer steps between log.jsonl lines")
    t.add_argument("--save-every", type=int, default=1000, help="optimizer steps between saves (and every epoch)")
    return parser


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except UsageError as e:
        sys.exit(f"finetune_sd.py: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print("finetune_sd.py: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        sys.exit(130)
