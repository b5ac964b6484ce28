"""train_ddpm.py and sample.py (DDPM family): the U-Net, the schedule, the samplers against their formulas and
diffusers' schedulers (a test-only oracle), training, resuming, determinism, the folder contract, bad input."""
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
import train_ddpm
from helpers import rel_err
from common import UsageError, load_folder
from poison import poison

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
RES = 8  # digits' native size: the fastest images the U-Net can take
# Other test modules may share the two cores: spinning OpenMP threads then slow tiny convolutions down 20x
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def tiny_args(out, data, *extra):
    return train_ddpm.build_parser().parse_args(
        ["--out", str(out), "--data", str(data), "--preset", "tiny", "--preview-per-class", "1", "--log-every", "1",
         "--device", "cpu", *map(str, extra)])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpm") / "digits"
    poison(out, dataset="digits", resolution=RES, ratio=0.1, quiet=True, workers=2)
    return out / "train"


@pytest.fixture(scope="module")
def model_dir(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpm") / "model"
    train_ddpm.main(tiny_args(out, data, "--steps", 30, "--save-every", 30))
    return out


def randomised_unet(cfg, seed=0):
    """A U-Net whose zero-initialised layers are random, so every input matters."""
    torch.manual_seed(seed)
    model = train_ddpm.UNet(cfg)
    for p in model.parameters():
        if not p.any():
            p.data.normal_(0, 0.1)
    return model.eval()


def tiny_cfg(**kw):
    return train_ddpm.unet_config("tiny", RES, 10, **kw)


# ----------------------------------------------------------------------------------------------------------------
# The U-Net.

def test_unet_shapes_zero_init_and_conditioning():
    cfg = tiny_cfg(scale_shift_norm=True)
    x, t = torch.randn(4, 3, RES, RES), torch.tensor([0, 10, 500, 999])
    fresh = train_ddpm.UNet(cfg)
    assert fresh(x, t, torch.tensor([0, 1, 2, 10])).abs().max() == 0  # zero-initialised output layer
    for ss in (False, True):
        model = randomised_unet(tiny_cfg(scale_shift_norm=ss))
        out = model(x, t, torch.tensor([0, 1, 2, 3]))
        assert out.shape == x.shape and out.dtype == torch.float32
        x1, t1 = x[:1].expand(3, -1, -1, -1), t[:1].expand(3)
        e = model(x1, t1, torch.tensor([0, 5, 10]))               # class 0, class 5, the null class
        assert (e[0] - e[1]).abs().max() > 1e-4 and (e[0] - e[2]).abs().max() > 1e-4
        assert (model(x1, t[1:2].expand(3), torch.tensor([0, 5, 10])) - e).abs().max() > 1e-4  # t matters
    # the null class is embedding row num_classes; label dropout maps dropped labels onto it
    assert model.label_embed.num_embeddings == cfg.num_classes + 1
    y = torch.arange(10).repeat(100)
    assert (train_ddpm.drop_labels(y, 1.0, 10) == 10).all() and (train_ddpm.drop_labels(y, 0.0, 10) == y).all()
    dropped = train_ddpm.drop_labels(y, 0.1, 10)
    assert 0.05 < (dropped == 10).float().mean() < 0.15 and ((dropped == y) | (dropped == 10)).all()


def diffusers_unet(cfg):
    """diffusers' UNet2DModel (a test-only oracle) with our U-Net's layout, and our state dict's keys in its names."""
    from diffusers import UNet2DModel
    levels = len(cfg.channel_mult)
    down = ["AttnDownBlock2D" if cfg.resolution >> i in cfg.attention_resolutions else "DownBlock2D"
            for i in range(levels)]
    ref = UNet2DModel(
        sample_size=cfg.resolution, in_channels=cfg.in_channels, out_channels=cfg.in_channels,
        block_out_channels=[cfg.channels * m for m in cfg.channel_mult], layers_per_block=cfg.num_res_blocks,
        down_block_types=down, up_block_types=[b.replace("Down", "Up") for b in reversed(down)],
        attention_head_dim=cfg.head_channels, norm_num_groups=cfg.norm_groups, norm_eps=cfg.norm_eps,
        num_class_embeds=cfg.num_classes + 1, flip_sin_to_cos=True, freq_shift=0, downsample_padding=1,
        resnet_time_scale_shift="scale_shift" if cfg.scale_shift_norm else "default",
        attn_norm_num_groups=cfg.norm_groups, dropout=0.0)  # without it, scale-shift drops the middle's attention norm
    names = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
             "label_embed": "class_embedding", "conv_in": "conv_in", "norm_out": "conv_norm_out",
             "conv_out": "conv_out"}
    attn = {}

    def res(ours, theirs):
        names.update({f"{ours}.res.{a}": f"{theirs}.{b}" for a, b in (
            ("norm1", "norm1"), ("conv1", "conv1"), ("emb", "time_emb_proj"), ("norm2", "norm2"), ("conv2", "conv2"),
            ("skip", "conv_shortcut"))})
    s = 0
    for level in range(levels):
        for i in range(cfg.num_res_blocks):
            res(f"down.{s}", f"down_blocks.{level}.resnets.{i}")
            attn[f"down.{s}.attn"] = f"down_blocks.{level}.attentions.{i}"
            s += 1
        if level < levels - 1:
            names[f"down.{s}.resample.conv"] = f"down_blocks.{level}.downsamplers.0.conv"
            s += 1
    res("mid.0", "mid_block.resnets.0")
    res("mid.1", "mid_block.resnets.1")
    attn["mid.0.attn"] = "mid_block.attentions.0"
    s = 0
    for level in range(levels):
        for i in range(cfg.num_res_blocks + 1):
            res(f"up.{s}", f"up_blocks.{level}.resnets.{i}")
            attn[f"up.{s}.attn"] = f"up_blocks.{level}.attentions.{i}"
            names[f"up.{s}.resample.conv"] = f"up_blocks.{level}.upsamplers.0.conv"
            s += 1
    attn_parts = {"norm": "group_norm", "proj": "to_out.0"}

    def convert(state):
        out = {}
        for key, value in state.items():
            module, leaf = key.rsplit(".", 1)
            if module in names:
                out[f"{names[module]}.{leaf}"] = value
                continue
            block, part = module.rsplit(".", 1)
            if part == "qkv":  # one projection here, three there: (3 C, C) rows in q, k, v order
                out.update({f"{attn[block]}.{n}.{leaf}": v for n, v in zip(("to_q", "to_k", "to_v"), value.chunk(3))})
            else:
                out[f"{attn[block]}.{attn_parts[part]}.{leaf}"] = value
        return out
    return ref, convert


@pytest.mark.parametrize("preset,res,scale_shift", [("tiny", 8, False), ("tiny", 8, True), ("small", 16, True)])
def test_unet_matches_diffusers_unet2dmodel(preset, res, scale_shift):
    """Our U-Net against diffusers' UNet2DModel loaded with the same random weights: the output, the input's gradient
    and every parameter's gradient, by relative error."""
    torch.manual_seed(1000 + res + scale_shift)
    cfg = train_ddpm.unet_config(preset, res, 10, scale_shift_norm=scale_shift)
    ours = train_ddpm.UNet(cfg)
    for p in ours.parameters():
        p.data.normal_(0, 0.1)
    ref, convert = diffusers_unet(cfg)
    ref.load_state_dict(convert(ours.state_dict()), strict=True)
    x = torch.randn(3, 3, res, res, requires_grad=True)
    t, y = torch.randint(0, 1000, (3,)), torch.tensor([0, 7, 10])  # 10: the null class
    a, b = ours(x, t, y), ref(x, t, class_labels=y).sample
    assert rel_err(a, b) < 1e-5
    dy = torch.randn_like(a)
    ga = dict(zip(["x"] + [n for n, _ in ours.named_parameters()],
                  torch.autograd.grad(a, [x, *ours.parameters()], dy)))
    gb = dict(zip(["x"] + [n for n, _ in ref.named_parameters()],
                  torch.autograd.grad(b, [x, *ref.parameters()], dy, allow_unused=True)))
    assert rel_err(ga.pop("x"), gb.pop("x")) < 1e-5
    ga = convert(ga)
    assert ga.keys() == gb.keys()
    for name, g in gb.items():
        if name.endswith("to_k.bias"):  # a key bias shifts every logit of a query alike: softmax ignores it
            assert g is None or g.abs().max() < 1e-6 and ga[name].abs().max() < 1e-6, name
        else:
            assert rel_err(ga[name], g) < 1e-4, name


def test_attention_block_is_multi_head_self_attention():
    cfg = tiny_cfg(head_channels=8)
    block = train_ddpm.AttentionBlock(cfg, 32)
    for p in block.parameters():
        p.data.normal_(0, 0.1)
    x = torch.randn(2, 32, 4, 4)
    tokens = block.norm(x).flatten(2).transpose(1, 2)                    # (B, L, C)
    q, k, v = block.qkv(tokens).view(2, 16, 3, 4, 8).unbind(2)           # (B, L, heads, d)
    weights = torch.softmax(torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(8), dim=-1)
    ref = x + block.proj(torch.einsum("bhlm,bmhd->blhd", weights, v).reshape(2, 16, 32)).transpose(1, 2).view(x.shape)
    torch.testing.assert_close(block(x), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(block(x.contiguous(memory_format=torch.channels_last)), ref, atol=1e-5, rtol=1e-5)


def test_unet_through_the_triton_kernels():
    """The U-Net's GroupNorm and attention layers run the castle_kernels/ Triton path (interpreted on the CPU)."""
    model = randomised_unet(tiny_cfg()).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, RES, RES).contiguous(memory_format=torch.channels_last)
    t, y = torch.tensor([5, 700]), torch.tensor([1, 10])
    results = []
    for impl in ("torch", "triton"):
        train_ddpm.set_kernel_impl(model, impl)
        model.zero_grad()
        out = model(x, t, y)
        out.square().sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in model.parameters()])
    train_ddpm.set_kernel_impl(model, None)
    for a, b in zip(*results):  # per tensor, relative to its norm: an element-wise atol would hide small gradients
        assert rel_err(a, b) < 1e-4


def test_presets_and_attention_layout():
    cfg = train_ddpm.unet_config("cifar10", 32, 10)
    model = train_ddpm.UNet(cfg)
    n = sum(p.numel() for p in model.parameters()) - model.label_embed.weight.numel()
    assert abs(n / 1e6 - 35.7) < 0.1  # the DDPM paper's CIFAR-10 model
    assert cfg.attention_resolutions == (16,) and cfg.dropout == 0.1 and cfg.channel_mult == (1, 2, 2, 2)
    attn = [m for m in model.modules() if isinstance(m, train_ddpm.AttentionBlock)]
    assert len(attn) == 2 + 3 + 1  # down at 16x16, up at 16x16, middle
    with pytest.raises(UsageError, match="halved"):
        train_ddpm.unet_config("cifar10", 36, 10)


def test_timestep_embedding_matches_diffusers():
    from diffusers.models.embeddings import get_timestep_embedding
    t = torch.tensor([0, 1, 17, 999])
    ref = get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    torch.testing.assert_close(train_ddpm.timestep_embedding(t, 64), ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# The schedule and the samplers.

def test_schedule_float64_and_q_sample():
    from diffusers import DDPMScheduler
    d = train_ddpm.Diffusion()
    assert d.betas.dtype == torch.float64 and len(d.betas) == 1000
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    torch.testing.assert_close(d.alphas_cumprod.float(), ref.alphas_cumprod, atol=0, rtol=1e-5)
    # the formula in float64 (diffusers keeps float32), relative: abar_999 is about 4e-5, where an atol would hide it
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    assert np.abs(d.alphas_cumprod.numpy() / abar - 1).max() < 1e-12
    x0, noise, t = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4), torch.tensor([0, 1, 10, 500, 999])
    torch.testing.assert_close(d.q_sample(x0, t, noise), ref.add_noise(x0, noise, t), atol=1e-5, rtol=1e-5)
    a = d.alphas_cumprod[500].item()
    torch.testing.assert_close(d.q_sample(x0[3:4], t[3:4], noise[3:4]),
                               math.sqrt(a) * x0[3:4] + math.sqrt(1 - a) * noise[3:4])
    # betas scale by 1000 / T: T = 20 reaches beta = 1 (abar = 0, NaN everywhere), T = 21 stays below
    short = train_ddpm.Diffusion(21)
    assert short.betas.max() < 1 and short.alphas_cumprod[-1] > 0
    for T in (20, 2):
        with pytest.raises(UsageError, match=rf"--timesteps {T}: .* not below 1.*use --timesteps 21 or more"):
            train_ddpm.Diffusion(T)


def test_timesteps():
    q = sample.make_timesteps(1000, 50, "quadratic")[::-1]
    ref = list((np.linspace(0, np.sqrt(1000), 49) ** 2).astype(int))
    assert q == [0] + ref[:-1] + [999] and len(q) == 50 and q[:4] == [0, 0, 0, 1]
    assert sample.make_timesteps(1000, 1000, "uniform") == list(range(999, -1, -1))
    u = sample.make_timesteps(1000, 50, "uniform")
    assert u[0] == 999 and u[-1] == 0 and len(u) == 50 and u == sorted(u, reverse=True)
    with pytest.raises(UsageError):
        sample.make_timesteps(1000, 0, "uniform")
    with pytest.raises(UsageError, match="spacing"):
        sample.make_timesteps(1000, 10, "cosine")


def fake_eps(x, t):
    """A smooth stand-in for a network: depends on x and t."""
    return 0.3 * torch.tanh(x) * math.cos(t / 300) + 0.1 * math.sin(t / 50)


def test_ddim_matches_diffusers():
    from diffusers import DDIMScheduler
    for eta, clip in ((0.0, False), (0.7, False)):
        sch = DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                            clip_sample=clip, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
        sch.set_timesteps(50)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 4, 4, generator=g)
        zs = [torch.randn(2, 3, 4, 4, generator=g) for _ in sch.timesteps]
        ref = x.clone()
        for i, t in enumerate(sch.timesteps):
            ref = sch.step(fake_eps(ref, int(t)), t, ref, eta=eta, variance_noise=zs[i]).prev_sample
        it = iter(zs)
        ours = sample.ddim(fake_eps, x.clone(), sch.alphas_cumprod.double(), [int(t) for t in sch.timesteps],
                           lambda: next(it), eta=eta, clip_x0=clip)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("clip", [False, True])
def test_ddpm_matches_diffusers(clip):
    from diffusers import DDPMScheduler
    for timesteps in (None, sample.make_timesteps(1000, 40, "quadratic")[:-2] + [1, 0]):
        sch = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                            clip_sample=clip, variance_type="fixed_small")
        if timesteps is None:
            sch.set_timesteps(1000)
        else:
            timesteps = sorted(set(timesteps), reverse=True)
            sch.set_timesteps(timesteps=timesteps)
        x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 1.5
        g_ref, g_ours = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
        ref = x.clone()
        for t in sch.timesteps:
            ref = sch.step(fake_eps(ref, int(t)), t, ref, generator=g_ref).prev_sample
        ours = sample.ddpm(fake_eps, x.clone(), sch.alphas_cumprod.double(), [int(t) for t in sch.timesteps],
                           lambda: torch.randn(x.shape, generator=g_ours), clip_x0=clip)
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=2e-4)


def test_sde_update_formula():
    abar = train_ddpm.Diffusion().alphas_cumprod
    x, z = torch.randn(3, 2), torch.randn(3, 2)
    t, s = 500, 480
    out = sample.sde(fake_eps, x.clone(), abar, [t, s], lambda: z)
    beta = 1 - abar[t].item() / abar[t - 1].item()
    x1 = x + 20 * beta * (0.5 * x - fake_eps(x, t) / math.sqrt(1 - abar[t].item())) + math.sqrt(20 * beta) * z
    beta_s = 1 - abar[s].item() / abar[s - 1].item()
    x2 = x1 + (s + 1) * beta_s * (0.5 * x1 - fake_eps(x1, s) / math.sqrt(1 - abar[s].item()))  # last: no noise
    torch.testing.assert_close(out, x2)
    # clip_x0: the score comes from x0_hat clipped to [-1, 1] (some x0_hat lie outside, some inside)
    x = torch.linspace(-0.6, 0.6, 6).view(3, 2)
    out = sample.sde(fake_eps, x.clone(), abar, [t], lambda: z, clip_x0=True)
    a = abar[t].item()
    x0 = ((x - math.sqrt(1 - a) * fake_eps(x, t)) / math.sqrt(a))
    assert (x0.abs() > 1).any() and (x0.abs() < 1).any()
    eps = (x - math.sqrt(a) * x0.clamp(-1, 1)) / math.sqrt(1 - a)
    torch.testing.assert_close(out, x + (t + 1) * beta * (0.5 * x - eps / math.sqrt(1 - a)))


@pytest.mark.parametrize("name,steps,spacing", [("ddpm", 1000, "uniform"), ("ddim", 50, "quadratic"),
                                                ("sde", 1000, "uniform"), ("ddim", 1000, "uniform")])
def test_samplers_recover_a_gaussian(name, steps, spacing):
    """Data N(mu, s^2): the exact eps(x_t, t) is known, so every sampler must return N(mu, s^2)."""
    abar = train_ddpm.Diffusion().alphas_cumprod
    mu, s = 0.3, 0.5

    def eps(x, t):
        a = abar[t].item()
        return math.sqrt(1 - a) * (x - math.sqrt(a) * mu) / (a * s * s + 1 - a)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 1, generator=g)
    opts = {"eta": 1.0} if name == "ddim" and spacing == "uniform" else {}
    out = sample.SAMPLERS[name](eps, x, abar, sample.make_timesteps(1000, steps, spacing),
                                lambda: torch.randn(x.shape, generator=g), **opts)
    assert out.mean().item() == pytest.approx(mu, abs=0.02) and out.std().item() == pytest.approx(s, abs=0.02)


def test_ddim_eta_one_is_ddpm():
    abar = train_ddpm.Diffusion().alphas_cumprod
    ts = sample.make_timesteps(1000, 30, "quadratic")
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    runs = []
    for fn, opts in ((sample.ddim, {"eta": 1.0}), (sample.ddpm, {})):
        g = torch.Generator().manual_seed(1)
        runs.append(fn(fake_eps, x.clone(), abar, ts, lambda: torch.randn(x.shape, generator=g), **opts))
    torch.testing.assert_close(runs[0], runs[1], atol=1e-5, rtol=1e-5)


def test_guidance_convention_one_batched_forward():
    calls = []

    class Fake(torch.nn.Module):
        def forward(self, x, t, y):
            calls.append(len(x))
            return torch.where((y == 10)[:, None, None, None], torch.ones_like(x), 3 * torch.ones_like(x))
    eps_fn = sample.guided_eps(Fake(), torch.tensor([1, 2]), 10, 5.0, torch.device("cpu"))
    e = eps_fn(torch.zeros(2, 3, 2, 2), 7)
    assert calls == [4] and torch.allclose(e, torch.full_like(e, (1 + 5) * 3 - 5 * 1))  # (1+w) e_c - w e_u
    assert sample.guided_eps(Fake(), torch.tensor([1, 2]), 10, 0.0, torch.device("cpu"))(
        torch.zeros(2, 3, 2, 2), 7).eq(3).all() and calls[-1] == 2


def test_same_images_whatever_the_batch_size():
    model = randomised_unet(tiny_cfg())
    abar = train_ddpm.Diffusion().alphas_cumprod
    labels, seeds = [0, 1, 2, 3, 4, 0, 1], [10, 11, 12, 13, 14, 15, 16]
    for sampler, steps, eta in (("ddim", 8, 0.5), ("ddpm", 8, 0.0)):
        a = sample.generate(model, abar, labels, seeds, 10, sampler, steps, "uniform", 2.0, eta, batch_size=7)
        b = sample.generate(model, abar, labels, seeds, 10, sampler, steps, "uniform", 2.0, eta, batch_size=3)
        c = sample.generate(model, abar, labels[2:3], seeds[2:3], 10, sampler, steps, "uniform", 2.0, eta,
                            batch_size=1)
        assert (a.int() - b.int()).abs().max() <= 1 and (a.int() - b.int()).abs().float().mean() < 0.01
        assert (a[2:3].int() - c.int()).abs().max() <= 1
        d = sample.generate(model, abar, labels, [s + 100 for s in seeds], 10, sampler, steps, "uniform", 2.0, eta)
        assert (a.int() - d.int()).abs().float().mean() > 5  # other seeds, other images


# ----------------------------------------------------------------------------------------------------------------
# Training, checkpoints, resuming.

def test_training_lowers_the_loss_and_writes_a_model_folder(model_dir, data):
    log = [json.loads(line) for line in (model_dir / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert np.mean([r["loss"] for r in log[-5:]]) < 0.8 * np.mean([r["loss"] for r in log[:3]])
    config = json.loads((model_dir / "config.json").read_text())
    assert config["family"] == "ddpm" and config["step"] == 30 and config["unet"]["resolution"] == RES
    assert config["training"]["dtype"] == "auto" and config["training"]["dtype_used"] == "fp32"  # the flag, the dtype
    manifest = load_folder(data).manifest
    assert config["data"]["class_names"] == manifest["class_names"] and config["data"]["target"] == manifest["target"]
    assert config["data"]["p_t"] == manifest["p_t"] and config["data"]["poison_ratio"] == 0.1
    assert (model_dir / "samples" / "step_0000030.png").is_file()
    state = torch.load(model_dir / "state.pt", weights_only=True)
    assert state["step"] == 30
    model, _ = train_ddpm.load_model(model_dir, "model")
    ema, _ = train_ddpm.load_model(model_dir)
    torch.testing.assert_close(model.state_dict(), {k: v for k, v in state["model"].items()})
    assert any((ema.state_dict()[k] - v).abs().max() > 0 for k, v in model.state_dict().items())
    assert not list((model_dir).glob(".*tmp*"))
    # every file of the model folder as readable as config.json (safetensors alone would make the weights private)
    mode = (model_dir / "config.json").stat().st_mode & 0o777
    assert {(model_dir / f).stat().st_mode & 0o777 for f in ("model.safetensors", "ema.safetensors")} == {mode}


def test_loss_and_ema_follow_their_formulas(data, tmp_path):
    """The simple loss is mean (eps - eps_theta(sqrt(abar) x0 + sqrt(1 - abar) eps, t, y))^2; the EMA after update n
    (0, 1, ...) is ema + (1 - d) (model - ema) with d = min(--ema-decay, (1 + n) / (10 + n)), from a copy of the
    initial U-Net."""
    d = train_ddpm.Diffusion()
    model = randomised_unet(tiny_cfg())
    x0, noise = torch.randn(2, 3, RES, RES), torch.randn(2, 3, RES, RES)
    t, y = torch.tensor([3, 800]), torch.tensor([1, 10])
    a = d.alphas_cumprod[t].view(-1, 1, 1, 1)
    want = (noise.double() - model((a.sqrt() * x0 + (1 - a).sqrt() * noise).float(), t, y).double()).square().mean()
    assert abs(d.loss(model, x0, y, t, noise).item() / want.item() - 1) < 1e-6
    out, states = tmp_path / "run", []
    for steps in (1, 2, 3):  # a resume continues exactly (test_resume_continues_exactly), so each run adds one update
        train_ddpm.main(tiny_args(out, data, "--steps", steps, "--lr-decay", "none", "--ema-decay", 0.2,
                                  "--preview-per-class", 0))
        states.append(torch.load(out / "state.pt", weights_only=True))
    for n, (before, after) in enumerate(zip(states, states[1:]), start=1):
        decay = min(0.2, (1 + n) / (10 + n))
        for key, ema in after["ema"].items():
            want = before["ema"][key] + (1 - decay) * (after["model"][key] - before["ema"][key])
            assert rel_err(ema, want) < 1e-6 if want.any() else not ema.any(), key  # a zero bias stays zero


def test_resume_continues_exactly(data, tmp_path, monkeypatch, capsys):
    straight = tmp_path / "straight"
    train_ddpm.main(tiny_args(straight, data, "--steps", 6, "--save-every", 3, "--preview-per-class", 0))
    interrupted = tmp_path / "interrupted"
    real_save = train_ddpm.save_checkpoint

    def save_then_die(out, step, *a, **k):
        real_save(out, step, *a, **k)
        raise KeyboardInterrupt  # killed right after the step-3 checkpoint
    monkeypatch.setattr(train_ddpm, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_ddpm.main(tiny_args(interrupted, data, "--steps", 6, "--save-every", 3, "--preview-per-class", 0))
    monkeypatch.setattr(train_ddpm, "save_checkpoint", real_save)
    assert torch.load(interrupted / "state.pt", weights_only=True)["step"] == 3
    train_ddpm.main(tiny_args(interrupted, data, "--steps", 6, "--save-every", 3, "--preview-per-class", 0))
    assert "resuming from" in capsys.readouterr().out
    a = torch.load(straight / "state.pt", weights_only=True)
    b = torch.load(interrupted / "state.pt", weights_only=True)
    assert b["step"] == 6
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a["ema"][k], b["ema"][k], atol=1e-6, rtol=1e-5)
    steps = [json.loads(line)["step"] for line in (interrupted / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    # a finished run has nothing to do; other model settings in the same --out are refused
    train_ddpm.main(tiny_args(interrupted, data, "--steps", 6))
    assert "already trained" in capsys.readouterr().out
    with pytest.raises(train_ddpm.UsageError, match="channels"):
        train_ddpm.main(tiny_args(interrupted, data, "--steps", 8, "--channels", 8))


def test_killed_mid_save_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    real_save = torch.save

    def dying_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:  # the second checkpoint: half a file, then the process "dies"
            Path(path).write_bytes(b"PK\x03\x04 truncated")
            raise KeyboardInterrupt
        return real_save(obj, path, *a, **k)
    monkeypatch.setattr(train_ddpm.torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train_ddpm.main(tiny_args(out, data, "--steps", 4, "--save-every", 2, "--preview-per-class", 0))
    monkeypatch.setattr(train_ddpm.torch, "save", real_save)
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2
    assert json.loads((out / "config.json").read_text())["step"] == 2
    train_ddpm.load_model(out)
    assert not list(out.glob(".*tmp*"))


def spoil_loss(monkeypatch, spoil):
    """Diffusion.loss passed through spoil(value, n), n = 1, 2, ... its calls: a NaN planted at a chosen step."""
    real_loss = train_ddpm.Diffusion.loss
    calls = []

    def loss(self, *a):
        calls.append(1)
        return spoil(real_loss(self, *a), len(calls))
    monkeypatch.setattr(train_ddpm.Diffusion, "loss", loss)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    spoil_loss(monkeypatch, lambda value, n: value * float("nan") if n >= 5 else value)
    with pytest.raises(train_ddpm.UsageError, match=r"loss became nan by step 5.*checkpoint \(step 4\)"):
        train_ddpm.main(tiny_args(out, data, "--steps", 10, "--save-every", 2, "--preview-per-class", 0))
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 4 and all(v.isfinite().all() for v in state["model"].values())


class NanGradient(torch.autograd.Function):
    """The identity whose backward returns NaN: a finite loss with NaN gradients (as an overflow in backward)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


@pytest.mark.parametrize("flags", [[], ["--grad-clip", 0], ["--dtype", "fp16"]])
def test_nan_gradients_never_reach_a_checkpoint(data, tmp_path, monkeypatch, flags):
    """Step 4's loss is finite but its gradients are NaN, and step 4 is a checkpoint: the run stops before saving it
    (with clipping or without), or, with fp16's GradScaler, skips that step and goes on."""
    out = tmp_path / "run"
    spoil_loss(monkeypatch, lambda value, n: NanGradient.apply(value) if n == 4 else value)
    args = tiny_args(out, data, "--steps", 6, "--save-every", 2, "--preview-per-class", 0, *flags)
    if "fp16" in flags:
        train_ddpm.main(args)
        step = 6
    else:
        with pytest.raises(train_ddpm.UsageError, match=r"the gradient norm became inf or NaN by step 4: stopped; the "
                                                           r"last good checkpoint \(step 2\) is kept"):
            train_ddpm.main(args)
        step = 2
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == step and all(v.isfinite().all() for k in ("model", "ema") for v in state[k].values())
    assert all(v.isfinite().all() for v in train_ddpm.load_model(out)[0].state_dict().values())


def test_sigkill_then_rerun_resumes(data, tmp_path):
    out = tmp_path / "run"
    cmd = [PY, str(ROOT / "train_ddpm.py"), "--out", str(out), "--data", str(data), "--preset", "tiny",
           "--preview-per-class", "0", "--log-every", "1", "--save-every", "2", "--device", "cpu",
           "--lr-decay", "none"]  # a constant rate: the rerun lowers --steps
    proc = subprocess.Popen(cmd + ["--steps", "100000"], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (out / "config.json").is_file() and json.loads((out / "config.json").read_text())["step"] >= 4:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint within 120 s")
        second = subprocess.run(cmd + ["--steps", "3"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 1 and second.stderr.strip().splitlines() == [
            f"train_ddpm.py: error: another run ({proc.pid}@{platform.node()}) is writing {out}: wait for it, or "
            f"delete {tmp_path / '.run.lock'} if it is gone"]  # two runs on one --out: the second is refused
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = torch.load(out / "state.pt", weights_only=True)["step"]
    r = subprocess.run(cmd + ["--steps", str(saved + 2)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"resuming from {out / 'state.pt'} at step {saved}" in r.stdout
    steps = [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()]
    assert steps == list(range(1, saved + 3))


def test_exported_model_without_state_is_kept(data, tmp_path, capsys):
    """A model folder without state.pt (deleted, or a copied folder) is not silently retrained from step 0."""
    out = tmp_path / "run"
    train_ddpm.main(tiny_args(out, data, "--steps", 2, "--preview-per-class", 0))
    (out / "state.pt").unlink()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    for extra in (["--steps", 4], ["--steps", 2, "--lr", 5e-3]):
        with pytest.raises(train_ddpm.UsageError, match=r"holds a trained model \(step 2\) but no state.pt to "
                                                           r"resume from: .*pass --force"):
            train_ddpm.main(tiny_args(out, data, "--preview-per-class", 0, *extra))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    train_ddpm.main(tiny_args(out, data, "--steps", 2, "--preview-per-class", 0))  # finished, same settings
    assert "nothing to do" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # --force trains a new model over it (from step 0, a fresh log) and replaces the files at its checkpoint
    train_ddpm.main(tiny_args(out, data, "--steps", 3, "--lr", 5e-3, "--force", "--preview-per-class", 0))
    assert "resuming" not in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["training"]["lr"] == 5e-3
    assert [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 3
    # --force also ignores a state.pt; a broken one names --force as the way out
    (out / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(train_ddpm.UsageError, match="not a readable training state .*--force") as e:
        train_ddpm.main(tiny_args(out, data, "--steps", 3, "--lr", 5e-3, "--preview-per-class", 0))
    assert "\n" not in str(e.value)
    train_ddpm.main(tiny_args(out, data, "--steps", 2, "--force", "--preview-per-class", 0))
    assert torch.load(out / "state.pt", weights_only=True)["step"] == 2


def test_resume_refuses_other_training_settings(data, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--steps", 2, "--preview-per-class", 0]
    train_ddpm.main(tiny_args(out, data, *common))
    other = tmp_path / "other"
    poison(other, dataset="digits", resolution=RES, ratio=0.2, quiet=True, workers=2)
    for extra, key in ((["--lr", 5e-3], "training.lr"), (["--batch-size", 16], "training.batch_size"),
                       (["--warmup", 1], "training.warmup"), (["--ema-decay", 0.99], "training.ema_decay"),
                       (["--weight-decay", 0], "training.weight_decay"), (["--grad-clip", 0], "training.grad_clip"),
                       (["--lr-decay", "none"], "training.lr_decay"), (["--train-seed", 1], "training.seed"),
                       (["--label-dropout", 0.2], "guidance.label_dropout"), (["--channels", 8], "unet.channels")):
        with pytest.raises(train_ddpm.UsageError, match=rf"other settings \({key} differ\): .*--force"):
            train_ddpm.main(tiny_args(out, data, *common, *extra))
    with pytest.raises(train_ddpm.UsageError, match=r"\(data\.p_t, data\.poison_ratio differ\)"):
        train_ddpm.main(tiny_args(out, other / "train", *common))
    # what may change: the data folder's path, dtype, logging, saving (and --steps, within the schedule's rules)
    shutil.copytree(data, tmp_path / "moved")
    train_ddpm.main(tiny_args(out, tmp_path / "moved", *common, "--dtype", "fp32", "--log-every", 5,
                              "--save-every", 1))
    assert "nothing to do" in capsys.readouterr().out


def test_resume_checks_the_settings_saved_in_state(data, tmp_path, capsys):
    """state.pt holds the run's whole config, so a resume is checked even without config.json (a run killed between
    writing state.pt and config.json, or config.json deleted); an older state.pt (U-Net and diffusion only) falls
    back on config.json, and an older config.json without dtype_used still resumes."""
    out = tmp_path / "run"
    common = ["--lr-decay", "none", "--preview-per-class", 0]
    train_ddpm.main(tiny_args(out, data, "--steps", 2, *common))
    (out / "config.json").unlink()
    for extra, key in ((["--lr", 5e-3], "training.lr"), (["--label-dropout", 0.2], "guidance.label_dropout")):
        with pytest.raises(train_ddpm.UsageError, match=rf"other settings \({key} differ\): .*--force"):
            train_ddpm.main(tiny_args(out, data, "--steps", 4, *common, *extra))
    train_ddpm.main(tiny_args(out, data, "--steps", 4, *common))
    assert f"resuming from {out / 'state.pt'} at step 2" in capsys.readouterr().out
    state = torch.load(out / "state.pt", weights_only=True)
    config = json.loads((out / "config.json").read_text())
    assert json.loads(state["config"]) == config and config["step"] == 4
    # a run from before: state.pt without its config, config.json without dtype_used
    del state["config"], config["training"]["dtype_used"]
    torch.save(state, out / "state.pt")
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(train_ddpm.UsageError, match=r"other settings \(training\.lr differ\)"):
        train_ddpm.main(tiny_args(out, data, "--steps", 6, *common, "--lr", 5e-3))
    train_ddpm.main(tiny_args(out, data, "--steps", 6, *common, "--dtype", "fp32"))
    assert f"resuming from {out / 'state.pt'} at step 4" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["training"]["dtype_used"] == "fp32"


def test_cosine_schedule_is_not_extended(data, tmp_path, capsys):
    """lr_at's cosine reaches zero at --steps: a raised --steps would send the rate back up from near zero."""
    out = tmp_path / "cosine"
    train_ddpm.main(tiny_args(out, data, "--steps", 2, "--preview-per-class", 0))
    with pytest.raises(train_ddpm.UsageError, match=r"cosine .* ends at step 2: --steps 4 .*--lr-decay none"):
        train_ddpm.main(tiny_args(out, data, "--steps", 4, "--preview-per-class", 0))
    out = tmp_path / "constant"
    train_ddpm.main(tiny_args(out, data, "--steps", 2, "--lr-decay", "none", "--preview-per-class", 0))
    train_ddpm.main(tiny_args(out, data, "--steps", 4, "--lr-decay", "none", "--preview-per-class", 0))
    assert f"resuming from {out / 'state.pt'} at step 2" in capsys.readouterr().out
    assert [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_force_keeps_the_older_run_until_its_first_checkpoint(data, tmp_path, monkeypatch, capsys):
    """--force over a trained model, killed before its first checkpoint: the older model and its log stay together."""
    out = tmp_path / "run"
    train_ddpm.main(tiny_args(out, data, "--steps", 2, "--preview-per-class", 0))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert before["loss.jsonl"].count(b"\n") == 2

    def die(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train_ddpm, "save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        train_ddpm.main(tiny_args(out, data, "--steps", 3, "--lr", 5e-3, "--force", "--preview-per-class", 0))
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # killed mid-checkpoint, after state.pt: the new run's log is already beside it, and a rerun resumes that run
    monkeypatch.setattr(train_ddpm, "save_safetensors", die)
    with pytest.raises(KeyboardInterrupt):
        train_ddpm.main(tiny_args(out, data, "--steps", 3, "--lr", 5e-3, "--force", "--preview-per-class", 0))
    monkeypatch.undo()
    log = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [1, 2, 3] and log[0]["lr"] == 5e-3  # the new run's (the older one: 1e-3)
    assert json.loads((out / "config.json").read_text())["training"]["lr"] == 1e-3  # the older model's files
    train_ddpm.main(tiny_args(out, data, "--steps", 3, "--lr", 5e-3, "--preview-per-class", 0))  # no --force
    assert "exported again from state.pt" in capsys.readouterr().out
    config = json.loads((out / "config.json").read_text())
    assert config["training"]["lr"] == 5e-3 and config["step"] == 3
    saved = torch.load(out / "state.pt", weights_only=True)
    from safetensors.torch import load_file
    assert all(torch.equal(v, saved["ema"][k]) for k, v in load_file(out / "ema.safetensors").items())
    assert [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_fresh_start_empties_the_log_and_half_lines_are_dropped(data, tmp_path, monkeypatch):
    out = tmp_path / "run"

    def die(*a, **k):
        raise KeyboardInterrupt  # killed at the first checkpoint, before anything was saved
    monkeypatch.setattr(train_ddpm, "save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        train_ddpm.main(tiny_args(out, data, "--steps", 3, "--preview-per-class", 0))
    monkeypatch.undo()
    assert not (out / "state.pt").exists() and (out / "loss.jsonl").read_text().count("\n") == 3
    with open(out / "loss.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # and the kill cut a line short
    train_ddpm.main(tiny_args(out, data, "--steps", 3, "--preview-per-class", 0))
    assert [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()] == [1, 2, 3]
    # resuming keeps the lines up to the checkpoint and drops a half-written last one
    log = out / "loss.jsonl"
    log.write_text(log.read_text() + '{"step": 4, "loss": 0.5}\n{"step": 5, "lo')
    train_ddpm.truncate_log(log, 3)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2, 3]
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(UsageError, match="line 2 is not JSON"):
        train_ddpm.truncate_log(log, 3)


def test_built_poisoned_set_is_checked_before_the_first_checkpoint(tmp_path, monkeypatch):
    """OUT/data built from the poisoning flags by a run killed before its first checkpoint (so no config.json):
    a rerun with other flags is refused by the set's manifest; --force rebuilds it."""
    out = tmp_path / "run"

    def args(*extra):
        return train_ddpm.build_parser().parse_args(
            ["--out", str(out), "--dataset", "digits", "--resolution", str(RES), "--preset", "tiny", "--steps", "2",
             "--preview-per-class", "0", "--device", "cpu", "--workers", "2", *map(str, extra)])
    def die(*a, **k):
        raise KeyboardInterrupt  # killed at the first checkpoint, before anything was saved
    monkeypatch.setattr(train_ddpm, "save_checkpoint", die)
    with pytest.raises(KeyboardInterrupt):
        train_ddpm.main(args("--ratio", 0.1))
    monkeypatch.undo()
    assert (out / "data" / "train" / "manifest.json").is_file() and not (out / "config.json").exists()
    with pytest.raises(train_ddpm.UsageError, match=r"data was poisoned with other options \(ratio, seed differ\)"):
        train_ddpm.main(args("--ratio", 0.2, "--seed", 1))
    train_ddpm.main(args("--ratio", 0.2, "--force"))
    assert load_folder(out / "data" / "train").manifest["poison_ratio"] == 0.2
    assert json.loads((out / "config.json").read_text())["data"]["poison_ratio"] == 0.2
    train_ddpm.main(args("--ratio", 0.2, "--target", "0"))  # the same set, the target by index: nothing to do


def test_presets_checkpoint_interval():
    parser = train_ddpm.build_parser()
    hp = train_ddpm.training_settings(parser.parse_args(["--out", "x", "--preset", "cifar10"]), "cifar10")
    assert hp["save_every"] == 10_000 and hp["steps"] == 800_000  # a crash of a days-long run loses hours, not days
    for preset in ("small", "tiny"):
        assert train_ddpm.training_settings(parser.parse_args(["--out", "x"]), preset)["save_every"] is None
    assert train_ddpm.training_settings(parser.parse_args(["--out", "x", "--save-every", "7"]), "cifar10")[
        "save_every"] == 7


@pytest.mark.parametrize("flags,message", [
    (["--label-dropout", 1], r"--label-dropout 1.0 is outside \[0, 1\)"),
    (["--label-dropout", -0.1], r"outside \[0, 1\)"),
    (["--log-every", 0], "argument --log-every: 0: give a number above 0"),
    (["--save-every", 0], "argument --save-every: 0: give a number above 0"),
    (["--timesteps", 20], r"--timesteps 20: .*reach 1, not below 1.*--timesteps 21 or more"),
    (["--timesteps", 0], r"--timesteps 0: .*--timesteps 21 or more"),
    (["--steps", 0], "argument --steps: 0: give a number above 0"),  # was: 'already trained', exit 0
    (["--batch-size", -5], "argument --batch-size: -5: give a number above 0"),
    (["--lr", 0], "argument --lr: 0: give a number above 0"),
    (["--warmup", -1], "--warmup -1: give 0 or more"),
    (["--ema-decay", 1.5], r"--ema-decay 1.5 is outside \[0, 1\)"),  # was: silently min()
    (["--grad-clip", -1], "--grad-clip -1.0 .* 0 or more"),
    (["--dropout", 2], r"--dropout 2.0: .*dropout in \[0, 1\)")])
def test_bad_training_flags(flags, message, data, tmp_path, capsys):
    if message.startswith("argument "):  # refused by argparse's types
        with pytest.raises(SystemExit):
            tiny_args(tmp_path / "x", data, *flags)
        assert message in capsys.readouterr().err
    else:
        with pytest.raises(UsageError, match=message):
            train_ddpm.main(tiny_args(tmp_path / "x", data, *flags))
    assert not (tmp_path / "x").exists()


def test_bad_model_and_out_folders(data, tmp_path):
    with pytest.raises(UsageError, match="--head-channels 5 splits the .* channels .* unevenly"):  # was: reshape
        train_ddpm.main(tiny_args(tmp_path / "heads", data, "--head-channels", 5))
    another_set = shutil.copytree(data, tmp_path / "another-set")  # was: 'holds a trained model (step unknown)'
    with pytest.raises(UsageError, match="--out .* is a dataset folder: give a folder for the model"):
        train_ddpm.main(tiny_args(another_set, data))
    (tmp_path / "afile").write_text("kept")
    with pytest.raises(UsageError, match="--out .*afile is a file: give a folder"):  # was: FileExistsError
        train_ddpm.main(tiny_args(tmp_path / "afile", data))
    assert (tmp_path / "afile").read_text() == "kept"


def test_ddp_on_a_set_smaller_than_one_batch(tmp_path):
    """12 images, batch 32, 2 processes: each takes 6, so the global batch is 12 (it was recorded as 6)."""
    from helpers import poisoned_random_folder
    data = poisoned_random_folder(tmp_path, per_class=5, side=RES) / "train"
    assert len(load_folder(data)) == 12
    out = tmp_path / "ddp"
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "train_ddpm.py"), "--out", str(out), "--data", str(data), "--preset", "tiny",
                        "--steps", "1", "--preview-per-class", "0", "--device", "cpu"], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["training"]["batch_size"] == 12


# ----------------------------------------------------------------------------------------------------------------
# Generation: the folder contract, processes, bad input.

def run_sample(model_dir, out, *extra):
    args = sample.build_parser().parse_args(["--model", str(model_dir), "--out", str(out), "--device", "cpu",
                                             *map(str, extra)])
    sample.main(args)


def test_a_diverged_or_unfinished_model_is_named_when_loaded(model_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    short = tmp_path / "short"
    shutil.copytree(model_dir, short)
    config = json.loads((short / "config.json").read_text())
    assert config["step"] == config["training"]["steps"] == 30
    train_ddpm.load_model(model_dir)
    assert "warning" not in capsys.readouterr().err
    (short / "config.json").write_text(json.dumps({**config, "step": 20}))
    train_ddpm.load_model(short)
    assert "was trained 20 of its 30 steps" in capsys.readouterr().err
    state = load_file(str(short / "ema.safetensors"))
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = torch.full_like(state[name], float("nan"))
    save_file(state, str(short / "ema.safetensors"))
    with pytest.raises(UsageError, match=rf"ema.safetensors: {name} .* holds NaN or inf: training diverged"):
        train_ddpm.load_model(short)
    train_ddpm.load_model(short, "model")  # the raw weights are finite


def test_generations_folder_contract(model_dir, data, tmp_path):
    out = tmp_path / "gen"
    run_sample(model_dir, out, "--class", "all", "--n", 2, "--steps", 5, "--seed", 7, "--grid", tmp_path / "g.png")
    ds = load_folder(out)
    train_manifest = load_folder(data).manifest
    assert len(ds) == 20 and ds.images().shape == (20, 3, RES, RES)
    assert [r["label"] for r in ds.records] == [c for c in range(10) for _ in range(2)]
    assert [r["seed"] for r in ds.records] == list(range(7, 27))
    assert all(r["poisoned"] is None for r in ds.records) and ds.poisoned_unknown   # for a judge to tell
    r = ds.records[5]
    assert r["text"] == f"A photo of a {ds.class_names[2]}" and r["class_name"] == ds.class_names[2]
    m = ds.manifest
    assert m["stage"] == "sample" and m["sampler"] == "ddim" and m["steps"] == 5 and m["spacing"] == "quadratic"
    assert m["guidance"] == 5.0 and m["weights"] == "ema" and m["model"] == str(model_dir)
    assert m["seeds"]["base"] == 7 and m["eta"] == 0.0 and len(m["timesteps"]) == 5 and m["clip_x0"] is True
    assert m["dtype"] == "auto" and m["dtype_used"] == "fp32"
    for key in ("class_names", "target", "p_t", "poison_ratio"):
        assert m[key] == train_manifest[key if key != "poison_ratio" else "poison_ratio"]
    assert (tmp_path / "g.png").is_file()
    # one class by name or index; the same seeds give the same images
    run_sample(model_dir, tmp_path / "one", "--class", ds.class_names[0], "--n", 2, "--steps", 5, "--seed", 7)
    one = load_folder(tmp_path / "one")
    assert (one.images().int() - ds.images()[:2].int()).abs().max() <= 1
    with pytest.raises(UsageError, match="exists"):
        run_sample(model_dir, tmp_path / "one", "--class", "0", "--n", 1)
    # an existing --grid file is kept unless --force, as --out
    grid = (tmp_path / "g.png").read_bytes()
    with pytest.raises(UsageError, match=r"g.png exists: pass --force"):
        run_sample(model_dir, tmp_path / "two", "--class", "0", "--n", 1, "--steps", 2, "--grid", tmp_path / "g.png")
    assert (tmp_path / "g.png").read_bytes() == grid and not (tmp_path / "two").exists()
    with pytest.raises(UsageError, match=r"--grid .*x\.png lies in the input --model"):  # --force or not
        run_sample(model_dir, tmp_path / "two", "--n", 1, "--steps", 2, "--grid", model_dir / "x.png", "--force")
    assert not (model_dir / "x.png").exists() and not (tmp_path / "two").exists()
    with pytest.raises(UsageError, match=r"--grid .*g\.jpg: give a \.png file name"):
        run_sample(model_dir, tmp_path / "two", "--class", "0", "--n", 1, "--steps", 2, "--grid", tmp_path / "g.jpg")
    assert not (tmp_path / "two").exists()
    run_sample(model_dir, tmp_path / "two", "--class", "0", "--n", 1, "--steps", 2, "--grid", tmp_path / "g.png",
               "--force")
    assert (tmp_path / "g.png").read_bytes() != grid and not list(tmp_path.glob(".*tmp-*"))


def test_bf16_on_the_cpu_follows_fp32(model_dir, tmp_path):
    """--dtype bf16 on the CPU (channels-last weights, bf16 autocast) makes the fp32 run's images, up to rounding."""
    run_sample(model_dir, tmp_path / "fp32", "--class", "all", "--n", 3, "--steps", 10, "--dtype", "fp32")
    run_sample(model_dir, tmp_path / "bf16", "--class", "all", "--n", 3, "--steps", 10, "--dtype", "bf16")
    a, b = load_folder(tmp_path / "fp32"), load_folder(tmp_path / "bf16")
    assert a.manifest["dtype_used"] == "fp32" and b.manifest["dtype_used"] == "bf16"
    x, y = a.images().float(), b.images().float()
    diff = (x - y).abs()
    print(f"bf16 vs fp32: mean |diff| {diff.mean():.2f} of 255, relative {diff.norm() / x.norm():.4f}")
    assert 0 < diff.mean() < 3 and diff.norm() / x.norm() < 0.03


def test_guidance_needs_a_trained_null_class(model_dir, tmp_path):
    """A model trained with --label-dropout 0 never saw the null class: only unguided sampling is meaningful."""
    folder = tmp_path / "no-dropout"
    folder.mkdir()
    config = json.loads((model_dir / "config.json").read_text())
    config["guidance"]["label_dropout"] = 0.0
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "ema.safetensors").write_bytes((model_dir / "ema.safetensors").read_bytes())
    with pytest.raises(UsageError, match=r"--label-dropout 0.*sample with --guidance 0"):
        run_sample(folder, tmp_path / "g", "--class", "0", "--n", 1, "--steps", 2)
    with pytest.raises(UsageError, match="--eta -0.5: give 0"):  # was: accepted
        run_sample(folder, tmp_path / "g", "--class", "0", "--n", 1, "--steps", 2, "--guidance", 0, "--eta", -0.5)
    assert not (tmp_path / "g").exists()
    run_sample(folder, tmp_path / "g", "--class", "0", "--n", 1, "--steps", 2, "--guidance", 0)
    assert len(load_folder(tmp_path / "g")) == 1


def test_one_vs_two_processes(model_dir, tmp_path):
    common = ["--model", str(model_dir), "--class", "all", "--images-per-class", "1", "--sampler", "ddim",
              "--eta", "0.5", "--steps", "4", "--batch-size", "3", "--device", "cpu", "--seed", "3"]
    env = ENV
    one = subprocess.run([PY, str(ROOT / "sample.py"), *common, "--out", str(tmp_path / "one")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(ROOT / "sample.py"), *common, "--out", str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a, b = load_folder(tmp_path / "one"), load_folder(tmp_path / "two")
    assert a.records == b.records
    assert (a.images().int() - b.images().int()).abs().max() <= 1
    assert b.manifest["world_size"] == 2


def test_ddp_training_under_torchrun(data, tmp_path):
    out = tmp_path / "ddp"
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "train_ddpm.py"), "--out", str(out), "--data", str(data), "--preset", "tiny",
                        "--steps", "4", "--save-every", "2", "--log-every", "1", "--preview-per-class", "1",
                        "--device", "cpu"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["step"] == 4 and config["training"]["world_size"] == 2
    assert [json.loads(line)["step"] for line in (out / "loss.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    train_ddpm.load_model(out)


def test_a_bad_poisoning_flag_under_torchrun_stops_every_process(tmp_path):
    """Rank 0 alone runs poison.py for the other ranks; its one-line error (an unknown --target) reaches them too,
    so none waits at the barrier for a dataset that will not come."""
    r = subprocess.run([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "--monitor-interval", "5",  # torchrun stops the other rank soon after one fails: let it print
                        str(ROOT / "train_ddpm.py"), "--out", str(tmp_path / "ddp"), "--dataset", "digits",
                        "--resolution", "8", "--target", "zebra", "--preset", "tiny", "--device", "cpu"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    # both processes print it (their lines may interleave)
    assert r.stderr.count("train_ddpm.py: error: ") == 2 and r.stderr.count("zebra") == 2, r.stderr[-2000:]
    assert not (tmp_path / "ddp" / "data").exists()


def test_bad_input(model_dir, data, tmp_path):
    with pytest.raises(UsageError, match="no such folder"):
        train_ddpm.main(tiny_args(tmp_path / "x", tmp_path / "missing"))
    with pytest.raises(UsageError, match="unknown --class 'zebra'"):
        sample.resolve_class("zebra", ["cat", "dog"])
    assert sample.resolve_class("DOG", ["cat", "dog"]) == [1] and sample.resolve_class("0", ["cat", "dog"]) == [0]
    with pytest.raises(UsageError, match="unknown --class '7'"):
        sample.resolve_class("7", ["cat", "dog"])
    with pytest.raises(UsageError, match="not a model folder"):
        train_ddpm.load_model(tmp_path)
    other = tmp_path / "classifier"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"stage": "classify", "arch": "smallcnn"}))
    with pytest.raises(UsageError, match="holds a 'classify' folder: give a model folder of train_ddpm.py"):
        sample.model_family(other)  # was: 'holds a None model'
    (other / "config.json").write_text(json.dumps({"stage": "finetune_sd", "run": {}}))  # before its first save
    with pytest.raises(UsageError, match="a finetune_sd.py run that has saved no model yet"):
        sample.model_family(other)
    with pytest.raises(UsageError, match="is a weights file of the ddpm model folder .*: give the folder"):
        sample.model_family(model_dir / "ema.safetensors")  # was read as an SD checkpoint: '934 missing keys'
    # a broken copy of the model folder: a missing weights file, then mismatched keys and shapes
    from safetensors.torch import load_file, save_file
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    with pytest.raises(UsageError, match="ema.safetensors is missing"):
        train_ddpm.load_model(broken)
    state = load_file(str(model_dir / "ema.safetensors"))
    state.pop("conv_out.bias")
    state.pop("label_embed.weight")
    state["extra.weight"] = torch.zeros(1)
    state["conv_in.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(state, str(broken / "ema.safetensors"))
    with pytest.raises(UsageError) as e:
        train_ddpm.load_model(broken)
    msg = str(e.value)
    for key in ("conv_out.bias", "label_embed.weight", "extra.weight", "conv_in.weight"):
        assert key in msg
    assert "missing" in msg and "unexpected" in msg and "\n" not in msg
    # the command lines: one-line errors, non-zero exit
    r = subprocess.run([PY, str(ROOT / "sample.py"), "--model", str(model_dir), "--class", "zebra", "--n", "1",
                        "--out", str(tmp_path / "g"), "--device", "cpu"], cwd=ROOT, env=ENV, capture_output=True,
                       text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("sample.py: error: unknown --class")
    r = subprocess.run([PY, str(ROOT / "sample.py"), "--model", str(model_dir), "--class", "0", "--n", "1",
                        "--out", str(tmp_path / "g"), "--device", "cpu"], cwd=ROOT, env={**ENV, "KERNELS_IMPL": "fast"},
                       capture_output=True, text=True)  # refused when the model is built, not deep in a forward
    assert r.returncode != 0 and r.stderr.strip().splitlines() == [
        "sample.py: error: KERNELS_IMPL='fast' is not auto, triton or torch: unset it or set one of those"], r.stderr
    assert not (tmp_path / "g").exists()
    r = subprocess.run([PY, str(ROOT / "train_ddpm.py"), "--data", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "m")], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("train_ddpm.py: error: --data")
    assert not (tmp_path / "m").exists()  # a refused run leaves no empty --out behind
    r = subprocess.run([PY, str(ROOT / "train_ddpm.py"), "--dataset", "digits", "--resolution", str(RES), "--ratio",
                        "0.1", "--preset", "tiny", "--out", str(tmp_path / "m")], cwd=ROOT,
                       env={**ENV, "KERNELS_IMPL": "fast"}, capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("train_ddpm.py: error: KERNELS_IMPL")
    assert not (tmp_path / "m").exists()  # refused before the poisoned set was built
    with pytest.raises(UsageError, match=r"--trigger --ratio with --data: .*drop them, or drop --data"):
        train_ddpm.main(tiny_args(tmp_path / "y", data, "--ratio", 0.05, "--trigger", "blend"))  # were ignored
    with pytest.raises(UsageError, match=f"holds a poisoned set.*not one dataset folder: give {data}"):
        train_ddpm.main(tiny_args(tmp_path / "y", data.parent))  # the set's root instead of its train/
