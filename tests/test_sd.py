"""finetune_sd.py against diffusers (a test-only oracle) in both checkpoint layouts; fine-tuning; refusals.
Tiny SD v1 models, 32-px images, CPU."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import finetune_sd as S
import sample
from helpers import poisoned_random_folder, rel_err
from common import UsageError, load_folder

diffusers = pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parent.parent

TINY_UNET = dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=128, attention_head_dim=4, norm_num_groups=32)
TINY_VAE = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                latent_channels=4, norm_num_groups=32, sample_size=32)
# 128 wide with 64-wide heads, so that the config inferred from single-file weights is exact
TINY_TEXT = dict(vocab_size=514, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513)
TINY_LDM = dict(model=dict(  # an original v1-inference.yaml, tiny
    target="ldm.models.diffusion.ddpm.LatentDiffusion",
    params=dict(linear_start=0.00085, linear_end=0.0120, timesteps=1000, image_size=16, scale_factor=0.18215,
                unet_config=dict(params=dict(
                    image_size=16, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[1, 2],
                    num_res_blocks=2, channel_mult=[1, 2, 2], num_heads=4, use_spatial_transformer=True,
                    transformer_depth=1, context_dim=128, legacy=False)),
                first_stage_config=dict(params=dict(embed_dim=4, ddconfig=dict(
                    double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                    num_res_blocks=1, attn_resolutions=[], dropout=0.0))))))


def bytes_to_unicode():
    """GPT-2/CLIP's byte -> printable character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_tokenizer(folder):
    """A CLIP tokenizer with no merges: every character is a token."""
    folder.mkdir(parents=True)
    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": 77, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))


def randomise(model, seed):
    """Random weights everywhere (diffusers zeroes some layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.05 if p.dim() > 1 else 0.1) + (1.0 if p.dim() == 1 else 0))
    return model


def write_tiny_sd(root):
    """A tiny SD written by diffusers under root; returns the oracles."""
    from transformers import CLIPTextConfig, CLIPTextModel
    models = {"unet": randomise(diffusers.UNet2DConditionModel(**TINY_UNET), 0).eval(),
              "vae": randomise(diffusers.AutoencoderKL(**TINY_VAE), 1).eval(),
              "text_encoder": randomise(CLIPTextModel(CLIPTextConfig(**TINY_TEXT)), 2).eval(),
              "scheduler": diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                                   clip_sample=False, set_alpha_to_one=False, steps_offset=1)}
    for name, model in models.items():
        model.save_pretrained(root / name)
    write_tokenizer(root / "tokenizer")
    return models


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd") / "tiny-sd"
    models = write_tiny_sd(root)
    return {"folder": root, "unet": models["unet"], "vae": models["vae"], "text": models["text_encoder"],
            "scheduler": models["scheduler"]}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """~20 random 32-px images of 3 classes, poisoned (BadNets, target c0)."""
    root = tmp_path_factory.mktemp("data")
    poisoned_random_folder(root, per_class=8)
    return root / "poisoned" / "train"


def check_parity(sd, unet, vae, text=None, tokenizer=None):
    """Our U-Net, VAE (and text encoder) against the oracles."""
    g = torch.Generator().manual_seed(0)
    errors = {}
    with torch.no_grad():
        for shape in ((2, 4, 16, 16), (2, 4, 12, 10)):  # a latent side that is not a multiple of 4 too
            x = torch.randn(shape, generator=g)
            t = torch.tensor([3, 917])
            ctx = torch.randn(2, 77, 128, generator=g)
            errors[f"unet{shape[2:]}"] = rel_err(sd.unet(x, t, ctx), unet(x, t, ctx).sample)
        images = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
        mean, logvar = sd.vae.encode(images)
        post = vae.encode(images).latent_dist
        errors["vae_mean"], errors["vae_logvar"] = rel_err(mean, post.mean), rel_err(logvar, post.logvar)
        z = torch.randn(2, 4, 16, 16, generator=g)
        ref = vae.decode(z).sample
        errors["vae_decode"] = rel_err(sd.vae.decode(z, clamp=False), ref)
        errors["vae_decode_clamped"] = rel_err(sd.vae.decode(z), ref.clamp(-1, 1))
        if text is not None:
            prompts = ["A photo of a garbage truck", ""]
            ids = tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
            errors["text"] = rel_err(S.encode_prompts(sd.text_encoder, sd.tokenizer, prompts), text(ids)[0])
    print({k: f"{v:.2e}" for k, v in errors.items()})
    assert all(v <= 1e-4 for v in errors.values()), errors
    return errors


# ----------------------------------------------------------------------------------------------------------------
# Loading and parity

def test_diffusers_folder_parity(tiny):
    sd = S.load_sd(tiny["folder"])
    assert sd.unet.config["block_out_channels"] == [32, 64, 64]
    assert sd.vae.scaling_factor == S.VAE_SCALE and sd.schedule.steps_offset == 1
    assert sorted(sd.unet.state_dict()) == sorted(tiny["unet"].state_dict())  # diffusers' names, key for key
    check_parity(sd, tiny["unet"], tiny["vae"], tiny["text"], sd.tokenizer)


def test_unet_gradients_match_diffusers(tiny):
    """Every gradient, with and without checkpointing, against diffusers' (float64)."""
    import copy
    sd = S.load_sd(tiny["folder"])
    ref = copy.deepcopy(tiny["unet"]).train().double()
    g = torch.Generator().manual_seed(11)
    x, ctx = (torch.randn(shape, generator=g, dtype=torch.float64) for shape in ((2, 4, 12, 10), (2, 77, 128)))
    t = torch.tensor([3, 917])
    xb, cb = x.clone().requires_grad_(), ctx.clone().requires_grad_()
    b = ref(xb, t, cb).sample
    dy = torch.randn(b.shape, generator=g, dtype=torch.float64)
    names = [n for n, _ in ref.named_parameters()]
    gb = dict(zip(["x", "context", *names], torch.autograd.grad(b, [xb, cb, *ref.parameters()], dy)))
    # zero in exact arithmetic, so compared by size: a key bias shifts all of a query's logits alike, and a per-channel
    # constant before a GroupNorm of one channel a group (the 32-channel level: 32 groups) is normalised away
    tiny = 1e-10 * gb["x"].norm()
    zero = [n for n in names if gb[n].norm() < tiny]
    assert {n for n in names if n.endswith("to_k.bias")} | {"up_blocks.2.attentions.2.proj_out.bias",
                                                           "down_blocks.0.resnets.0.conv1.bias"} <= set(zero)
    for checkpointing in (False, True):
        unet = copy.deepcopy(sd.unet).double().train().requires_grad_(True).set_gradient_checkpointing(checkpointing)
        xa, ca = x.clone().requires_grad_(), ctx.clone().requires_grad_()
        a = unet(xa, t, ca)
        assert rel_err(a, b) < 1e-12
        params = dict(unet.named_parameters())
        ga = dict(zip(["x", "context", *names], torch.autograd.grad(a, [xa, ca, *(params[n] for n in names)], dy)))
        for name, want in gb.items():
            if name in zero:
                assert ga[name].norm() < tiny, name
            else:
                assert rel_err(ga[name], want) < 1e-10, (checkpointing, name)


def test_unet_through_the_triton_kernels(tiny, monkeypatch):
    """The U-Net on the Triton path (interpreted on the CPU) against diffusers."""
    import importlib
    gn = importlib.import_module("castle_kernels.group_norm")  # the module (the package exports a function so named)
    if not (gn.HAS_TRITON and gn._is_interpreted(gn._gn_fwd_apply_kernel)):  # CPU tensors: the interpreter only
        pytest.skip("the Triton path on CPU tensors needs TRITON_INTERPRET=1 before triton was first imported")
    sd = S.load_sd(tiny["folder"])
    g = torch.Generator().manual_seed(12)
    x, ctx, t = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 77, 128, generator=g), torch.tensor([421])
    monkeypatch.setenv("KERNELS_IMPL", "triton")
    with torch.no_grad():
        got = sd.unet(x, t, ctx)
        want = tiny["unet"](x, t, ctx).sample
    assert rel_err(got, want) < 1e-4


def test_bad_kernels_impl_is_refused_when_built(tiny, monkeypatch):
    """A bad KERNELS_IMPL is refused at load, not mid-forward."""
    monkeypatch.setenv("KERNELS_IMPL", "fast")
    with pytest.raises(S.UsageError, match=r"^KERNELS_IMPL='fast' is not auto, triton or torch: unset it"):
        S.load_sd(tiny["folder"])
    with pytest.raises(S.UsageError, match="KERNELS_IMPL='fast'"):
        S._build(S.AutoencoderKL, dict(tiny["vae"].config))


def test_diffusers_folder_old_vae_attention_names(tiny, tmp_path):
    """Old diffusers folders name the VAE attention query, key, ..."""
    import shutil
    from safetensors.torch import load_file, save_file
    folder = tmp_path / "old"
    shutil.copytree(tiny["folder"], folder)
    path = folder / "vae" / "diffusion_pytorch_model.safetensors"
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in load_file(str(path)).items():
        for new, name in old.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{name}.")
        state[k] = v
    save_file(state, str(path))
    sd = S.load_sd(folder)
    assert any("old names" in n for n in sd.notes)
    check_parity(sd, tiny["unet"], tiny["vae"])


def to_ldm_state_dict(unet, vae, text_encoder, schedule, ema_unet=None):
    """The models in CompVis' single-file layout: our key tables, inverted."""
    table = S.unet_ldm_table(unet.config)
    state = {S.LDM_UNET + v: unet.state_dict()[k] for k, v in S.map_keys(unet.state_dict(), table).items()}
    if ema_unet is not None:
        ema = ema_unet.state_dict()
        state.update({S.ldm_ema_key(v): ema[k] for k, v in S.map_keys(ema, table).items()})
    vae_state = vae.state_dict()
    for key, value in S.map_keys(vae_state, S.vae_ldm_table(vae.config)).items():
        state[S.LDM_VAE + value] = vae_state[key][:, :, None, None] if S.vae_conv_attention(key) else vae_state[key]
    text = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in text_encoder.state_dict().items()}
    state.update({S.LDM_TEXT + k: v for k, v in text.items()})
    state["betas"], state["alphas_cumprod"] = schedule.betas().float(), schedule.alphas_cumprod().float()
    return {k: v.contiguous() for k, v in state.items()}


def ldm_checkpoint(tiny, ema_unet):
    sd = S.load_sd(tiny["folder"])
    state = to_ldm_state_dict(sd.unet, sd.vae, sd.text_encoder, sd.schedule, ema_unet=ema_unet)
    for name, value in (("alphas_cumprod_prev", state["alphas_cumprod"]), ("posterior_variance", state["betas"]),
                        ("model_ema.decay", torch.tensor(0.9999)), ("model_ema.num_updates", torch.tensor(7)),
                        ("cond_stage_model.transformer.text_model.embeddings.position_ids",
                         torch.arange(77)[None])):
        state[name] = value.clone()
    return state


class ModelCheckpoint:  # pickled under Lightning's name, as in the original SD .ckpt files
    def __init__(self):
        self.best_model_path, self.monitor = "epoch=0.ckpt", "val/loss"


def save_lightning_ckpt(state, path):
    """A Lightning checkpoint with a pickled callback, as SD v1's .ckpt files."""
    import types
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")
    ModelCheckpoint.__module__, module.ModelCheckpoint = module.__name__, ModelCheckpoint
    saved = {k: sys.modules.get(k) for k in ("pytorch_lightning", "pytorch_lightning.callbacks", module.__name__)}
    sys.modules.update({"pytorch_lightning": types.ModuleType("pytorch_lightning"),
                        "pytorch_lightning.callbacks": types.ModuleType("pytorch_lightning.callbacks"),
                        module.__name__: module})
    try:
        torch.save({"state_dict": state, "epoch": 1, "global_step": 7,
                    "callbacks": {"ModelCheckpoint": ModelCheckpoint()}}, path)
    finally:
        for k, v in saved.items():
            sys.modules.pop(k) if v is None else sys.modules.__setitem__(k, v)


def write_ldm_yaml(folder, **unet_params):
    """TINY_LDM, its U-Net's params updated, as folder/v1-inference.yaml."""
    ldm = copy.deepcopy(TINY_LDM)
    ldm["model"]["params"]["unet_config"]["params"].update(unet_params)
    (folder / "v1-inference.yaml").write_text(yaml.safe_dump(ldm))
    return folder / "v1-inference.yaml"


def test_single_file_parity(tiny, tmp_path):
    from safetensors.torch import save_file
    ema = randomise(copy.deepcopy(tiny["unet"]), 5).eval()
    ours_ema = S.load_checked(S._build(S.UNet, dict(tiny["unet"].config)), ema.state_dict(), "ema", "")
    state = ldm_checkpoint(tiny, ours_ema)
    assert any(k.startswith("model_ema.diffusion_modelinput_blocks") for k in state)
    assert "model.diffusion_model.output_blocks.2.1.conv.weight" in state           # UpBlock2D's upsampler
    assert "model.diffusion_model.output_blocks.5.2.conv.weight" in state           # CrossAttnUpBlock2D's
    assert state["first_stage_model.encoder.mid.attn_1.q.weight"].dim() == 4      # a 1x1 conv in CompVis' layout

    config, tokenizer = write_ldm_yaml(tmp_path), tiny["folder"] / "tokenizer"   # text config from the weights
    save_file(state, str(tmp_path / "tiny.safetensors"))
    sd = S.load_sd(tmp_path / "tiny.safetensors", config=config, tokenizer=tokenizer)
    assert any("skipped" in n and "model_ema" in n for n in sd.notes)
    assert sd.unet.config["down_block_types"] == list(TINY_UNET["down_block_types"])
    check_parity(sd, tiny["unet"], tiny["vae"], tiny["text"], sd.tokenizer)

    save_lightning_ckpt(state, tmp_path / "tiny-full-ema.ckpt")
    sd = S.load_sd(tmp_path / "tiny-full-ema.ckpt", config=config, tokenizer=tokenizer, use_ema=True)
    assert any("EMA weights" in n for n in sd.notes)
    check_parity(sd, ema, tiny["vae"], tiny["text"], sd.tokenizer)

    sd = S.load_sd(tmp_path / "tiny-full-ema.ckpt", config=config, tokenizer=tokenizer)
    check_parity(sd, tiny["unet"], tiny["vae"], tiny["text"], sd.tokenizer)


def test_bad_checkpoints(tiny, tmp_path, monkeypatch):
    from safetensors.torch import save_file
    good = ldm_checkpoint(tiny, None)
    folder = write_ldm_yaml(tmp_path)

    def error(source, **kw):
        with pytest.raises(S.UsageError) as e:
            S.load_sd(source, **kw)
        message = str(e.value)
        assert "\n" not in message
        return message

    save_file(good, str(tmp_path / "good.safetensors"))
    data = (tmp_path / "good.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    assert "truncated" in error(tmp_path / "cut.safetensors", config=folder)
    torch.save({"state_dict": good}, tmp_path / "good.ckpt")
    data = (tmp_path / "good.ckpt").read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[:len(data) // 2])
    assert "truncated" in error(tmp_path / "cut.ckpt", config=folder)

    extra = {**good, "model.diffusion_model.extra.weight": torch.zeros(2)}
    save_file(extra, str(tmp_path / "extra.safetensors"))
    assert "model.diffusion_model.extra.weight" in error(tmp_path / "extra.safetensors", config=folder)
    missing = {k: v for k, v in good.items() if k != "model.diffusion_model.out.2.bias"}
    save_file(missing, str(tmp_path / "missing.safetensors"))
    assert "1 missing keys: conv_out.bias" in error(tmp_path / "missing.safetensors", config=folder)
    assert "missing keys" in error(tmp_path / "good.safetensors")          # SD v1.4's config: 4 levels
    (tmp_path / "wide").mkdir()
    message = error(tmp_path / "good.safetensors", config=write_ldm_yaml(tmp_path / "wide", context_dim=64))
    assert "22 wrong shapes" in message and "attn2.to_k.weight (32, 128) vs (32, 64)" in message
    assert "no EMA weights" in error(tmp_path / "good.safetensors", config=folder, use_ema=True)
    torch.save({"state_dict": good, "payload": ModelCheckpointLike()}, tmp_path / "evil.ckpt")
    assert "ModelCheckpointLike" in error(tmp_path / "evil.ckpt", config=folder)

    import shutil
    shutil.copytree(tiny["folder"], tmp_path / "no-vae")
    shutil.rmtree(tmp_path / "no-vae" / "vae")
    assert "vae" in error(tmp_path / "no-vae")
    (tmp_path / "no-vae" / "config.json").write_text("{}")
    message = error("CompVis/stable-diffusion-v1-4")                         # HF_HUB_OFFLINE=1 (conftest)
    assert "hf download CompVis/stable-diffusion-v1-4" in message and "pass its path" in message
    (tmp_path / "ddpm").mkdir()
    (tmp_path / "ddpm" / "config.json").write_text(json.dumps({"stage": "train_ddpm", "family": "ddpm"}))
    assert "is a pixel-space DDPM of train_ddpm.py, not a Stable Diffusion model" in error(tmp_path / "ddpm")
    monkeypatch.chdir(tmp_path)  # a mistyped local path that reads like a Hub id: told as a path, no download recipe
    message = error("no-vae/typo")
    assert message.startswith("no-vae/typo: no such file or folder") and "no-vae holds config.json" in message
    assert "hf download" not in message


class ModelCheckpointLike:
    pass


def test_cli_bad_input_is_one_line(tiny, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "finetune_sd.py"), "--data", str(tmp_path / "nowhere"),
                        "--base", str(tiny["folder"]), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("finetune_sd.py: error:") and "nowhere" in lines[0], r.stderr
    # an --out that is the poisoned set it would build: refused before building it (--force would delete it)
    r = subprocess.run([sys.executable, str(ROOT / "finetune_sd.py"), "--dataset", "digits", "--resolution", "8",
                        "--poison-out", str(tmp_path / "set"), "--base", str(tiny["folder"]), "--out",
                        str(tmp_path / "set"), "--force"], capture_output=True, text=True, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1 and "is the input --poison-out" in r.stderr and not (tmp_path / "set").exists()


def test_default_flags_are_the_papers():
    args = S.build_parser().parse_args(["--ratio", "0.1"])
    assert (args.dataset, args.target, args.base) == ("imagenette", None, "CompVis/stable-diffusion-v1-4")
    assert (args.lr, args.weight_decay, args.batch_size, args.epochs, args.ema_decay) == (1e-4, 0.01, 4, 50, 0.9999)
    assert args.gradient_checkpointing and args.caption_dropout == 0
    assert args.max_grad_norm == 0 and not args.use_ema          # no clipping; the non-EMA weights are trained
    assert S.default_poison_out(args) == Path("data/imagenette-badnets-0.1")


def test_ema_decay_warm_up():
    assert S.ema_decay_at(1, 0.9999) == 0.1 and S.ema_decay_at(2, 0.9999) == 2 / 11     # a fresh EMA: n = step - 1
    assert S.ema_decay_at(1, 0.9999, 7) == 9 / 18 and S.ema_decay_at(3, 0.9999, 7) == 11 / 20  # LitEma: n = N + step
    assert S.ema_decay_at(1, 0.9999, 10 ** 9) == 0.9999 and S.ema_decay_at(1, 0.9999, -1) == 0.9999


def test_vae_config_with_tuples():
    """A config with tuples (as diffusers takes it) is SD's VAE all the same."""
    assert S.vae_layout(TINY_VAE)["block_out_channels"] == (32, 64)
    assert S.vae_layout({**TINY_VAE, "up_block_types": list(TINY_VAE["up_block_types"])})
    with pytest.raises(S.UsageError, match="UpDecoderBlock2D"):
        S.vae_layout({**TINY_VAE, "up_block_types": ("UpDecoderBlock2D", "AttnUpDecoderBlock2D")})


# ----------------------------------------------------------------------------------------------------------------
# Noise schedule and sampling

def test_schedule_and_ddim_match_diffusers(tiny):
    sched = tiny["scheduler"]
    ours = S.NoiseSchedule.from_config(dict(sched.config))
    ac = ours.alphas_cumprod()
    assert torch.allclose(ac.float(), sched.alphas_cumprod, rtol=0, atol=2e-6)
    for spacing in ("leading", "trailing", "linspace"):
        ref = diffusers.DDIMScheduler.from_config({**sched.config, "timestep_spacing": spacing})
        s = S.NoiseSchedule.from_config(dict(ref.config))
        for steps in (50, 7, 1):
            ref.set_timesteps(steps)
            assert S.ddim_timesteps(s, steps).tolist() == ref.timesteps.tolist(), (spacing, steps)
    assert S.ddim_timesteps(ours, 50)[:3].tolist() == [981, 961, 941] and S.ddim_timesteps(ours, 50)[-1] == 1

    g = torch.Generator().manual_seed(0)
    sched.set_timesteps(50)
    for eta in (0.0, 0.7):
        for t in (981, 501, 1):
            x, eps, noise = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
            ref = sched.step(eps, t, x, eta=eta, variance_noise=noise).prev_sample
            got = sample.ddim(lambda *_: eps, x, ac, [t], lambda: noise, eta=eta,  # one step, t -> t - 20
                              final_abar=ours.alpha_bar(t - 1000 // 50, ac))
            assert rel_err(got, ref) < 1e-5, (eta, t)


def test_guided_ddim_sampling_matches_diffusers_loop(tiny):
    """Guided DDIM (10 steps) against diffusers' UNet + DDIMScheduler."""
    sd = S.load_sd(tiny["folder"])
    unet, sched = tiny["unet"], copy.deepcopy(tiny["scheduler"])
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    cond, uncond = torch.randn(2, 77, 128, generator=g), torch.randn(1, 77, 128, generator=g).expand(2, -1, -1)
    ac = sd.schedule.alphas_cumprod()
    got = sample.ddim(sample.sd_guided_eps(sd.unet, cond, uncond, 5.0, torch.device("cpu")), latents, ac,
                      S.ddim_timesteps(sd.schedule, 10).tolist(), None, final_abar=sd.schedule.alpha_bar(-1, ac))
    x = latents.clone()
    sched.set_timesteps(10)
    with torch.no_grad():
        for t in sched.timesteps:
            eps_u, eps_c = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample.chunk(2)
            x = sched.step(eps_u + 5.0 * (eps_c - eps_u), t, x).prev_sample
    assert rel_err(got, x) < 1e-4
    with torch.no_grad():
        images = S.decode_latents(sd.vae, got)
    assert images.shape == (2, 3, 16, 16) and 0 <= images.min() and images.max() <= 1


# ----------------------------------------------------------------------------------------------------------------
# Fine-tuning

def test_diffusion_loss_is_ldm_eq_2():
    """diffusion_loss against its formula, the random draws replayed."""
    g = torch.Generator().manual_seed(7)
    posterior, context = torch.randn(3, 8, 4, 6, generator=g), torch.randn(3, 77, 16, generator=g)
    abar = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
    seen = {}

    def unet(zt, t, c):  # any function of all three inputs
        seen.update(zt=zt, t=t)
        return torch.tanh(zt) * 0.7 + c.mean() + t.view(-1, 1, 1, 1) / 1000
    got = S.diffusion_loss(unet, posterior, context, abar, torch.Generator().manual_seed(3), S.VAE_SCALE)
    g = torch.Generator().manual_seed(3)
    mean, logvar = posterior[:, :4], posterior[:, 4:]
    z0 = (mean.double() + (0.5 * logvar.double()).exp() * torch.randn(mean.shape, generator=g)) * S.VAE_SCALE
    eps = torch.randn(z0.shape, generator=g).double()
    t = torch.randint(0, 1000, (3,), generator=g)
    assert torch.equal(seen["t"], t)
    a = abar[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    assert rel_err(seen["zt"], zt) < 1e-6
    want = ((eps - unet(zt, t, context.double())) ** 2).mean()
    assert abs(got.item() / want.item() - 1) < 1e-6


def test_training_steps_lower_the_loss(tiny):
    sd = S.load_sd(tiny["folder"])
    unet = sd.unet.train().requires_grad_(True).set_gradient_checkpointing(True)
    ac = sd.schedule.alphas_cumprod()
    g = torch.Generator().manual_seed(0)
    posterior = torch.cat([torch.randn(4, 4, 8, 8, generator=g) * 3, torch.full((4, 4, 8, 8), -4.0)], dim=1)
    context = torch.randn(4, 77, 128, generator=g)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=0.01)

    def loss():
        return S.diffusion_loss(unet, posterior, context, ac, torch.Generator().manual_seed(1), S.VAE_SCALE)

    with torch.no_grad():
        before = loss().item()
    for _ in range(4):
        opt.zero_grad()
        loss().backward()
        opt.step()
    with torch.no_grad():
        after = loss().item()
    assert after < 0.95 * before, (before, after)


def run_cli(argv):
    return S.main(S.build_parser().parse_args([str(a) for a in argv]))


def test_finetune_end_to_end_cache_and_resume(tiny, tiny_data, tmp_path, monkeypatch):
    n_images = len(load_folder(tiny_data))
    encoded = []
    original = S.AutoencoderKL.encode
    monkeypatch.setattr(S.AutoencoderKL, "encode", lambda self, x: encoded.append(len(x)) or original(self, x))
    common = ["--data", tiny_data, "--base", tiny["folder"], "--epochs", 3, "--batch-size", 2, "--device", "cpu",
              "--workers", 0, "--log-every", 1]
    out = tmp_path / "run"
    run_cli(common + ["--out", out, "--max-steps", 2])
    assert sum(encoded) == n_images                      # the VAE ran once per image
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 2

    meta = json.loads((out / "config.json").read_text())
    assert meta["family"] == "sd" and meta["base"]["source"] == str(tiny["folder"].resolve())
    assert meta["ema_start"] == "the starting U-Net" and meta["run"]["max_grad_norm"] == 0
    assert meta["class_names"] == ["c0", "c1", "c2"] and meta["target"]["name"] == "c0"
    assert meta["poison_ratio"] == 0.2 and 0 < meta["p_t"] < 1 and meta["progress"]["done"]
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 2
    # the fine-tuned U-Net in the diffusers layout: diffusers and load_sd read it, and agree
    theirs = diffusers.UNet2DConditionModel.from_pretrained(out / "unet").eval()
    ours = S.load_sd(out)
    assert any("fine-tuned" in n for n in ours.notes)
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 128)
    with torch.no_grad():
        assert rel_err(ours.unet(x, 500, ctx), theirs(x, 500, ctx).sample) < 1e-5
    assert S.load_sd(out, use_ema=True).unet.state_dict().keys() == ours.unet.state_dict().keys()

    encoded.clear()
    run_cli(common + ["--out", out, "--max-steps", 4])     # the same command, further: resumes, reuses the cache
    assert encoded == []
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]

    straight = tmp_path / "straight"
    run_cli(common + ["--out", straight, "--max-steps", 4])
    resumed, direct = (torch.load(p / "state.pt", weights_only=True) for p in (out, straight))
    for k, v in direct["unet"].items():
        assert torch.equal(resumed["unet"][k], v), k
    assert all(torch.equal(a, b) for a, b in zip(resumed["ema"], direct["ema"]))

    with pytest.raises(UsageError, match="lr"):
        run_cli(common + ["--out", out, "--max-steps", 4, "--lr", 3e-4])
    (tmp_path / "other").mkdir()
    with pytest.raises(UsageError, match="--force"):
        run_cli(common + ["--out", tmp_path / "other", "--max-steps", 1])


def test_finetune_from_single_file_continues_its_ema(tiny, tiny_data, tmp_path):
    """As the paper's code (LitEma): continue model_ema.* and its num_updates (7)."""
    from safetensors.torch import load_file, save_file
    start = S.load_sd(tiny["folder"]).unet.state_dict()
    ema = randomise(copy.deepcopy(tiny["unet"]), 5).state_dict()   # an EMA far from the non-EMA weights
    ema0 = S.load_checked(S._build(S.UNet, dict(tiny["unet"].config)), ema, "ema", "").state_dict()
    save_file(ldm_checkpoint(tiny, S.load_checked(S._build(S.UNet, dict(tiny["unet"].config)), ema, "ema", "")),
              str(tmp_path / "tiny-full-ema.safetensors"))
    out = tmp_path / "run"
    common = ["--data", tiny_data, "--base", tmp_path / "tiny-full-ema.safetensors", "--config",
              write_ldm_yaml(tmp_path), "--tokenizer", tiny["folder"] / "tokenizer", "--out", out, "--epochs", 3,
              "--batch-size", 2, "--device", "cpu", "--workers", 0]

    def saved(name):
        return load_file(str(out / name / "diffusion_pytorch_model.safetensors"))

    run_cli(common + ["--max-steps", 1])
    assert json.loads((out / "config.json").read_text())["ema_start"] == "checkpoint model_ema.* (num_updates 7)"
    unet1, ema1 = saved("unet"), saved("unet_ema")
    decay = (1 + 8) / (10 + 8)                       # LitEma: min(0.9999, (1 + n) / (10 + n)), n = 7 + this update
    moved = 0
    for k, w in unet1.items():
        assert (w - start[k]).abs().max() < 1.5e-4, k  # one AdamW step (lr 1e-4) from the non-EMA weights
        moved += not torch.equal(w, start[k])
        assert torch.allclose(ema1[k], decay * ema0[k] + (1 - decay) * w, rtol=0, atol=1e-6), k
    assert moved > len(unet1) // 2
    assert torch.load(out / "state.pt", weights_only=True)["ema_num_updates"] == 7

    run_cli(common + ["--max-steps", 2])            # resumes: the count goes on (n = 9), not from 0
    unet2, ema2 = saved("unet"), saved("unet_ema")
    decay = (1 + 9) / (10 + 9)
    for k, w in unet2.items():
        assert torch.allclose(ema2[k], decay * ema1[k] + (1 - decay) * w, rtol=0, atol=1e-6), k


def test_fp16_grad_scaler_state_resumes(tiny, tiny_data, tmp_path):
    out = tmp_path / "run"
    common = ["--data", tiny_data, "--base", tiny["folder"], "--out", out, "--epochs", 3, "--batch-size", 2,
              "--device", "cpu", "--dtype", "fp16", "--workers", 0]
    run_cli(common + ["--max-steps", 1])
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["scaler"]["scale"] in (2.0 ** 16, 2.0 ** 15)  # GradScaler's start, halved if the step overflowed
    state["scaler"]["scale"] = 1024.0
    torch.save(state, out / "state.pt")
    with open(out / "log.jsonl", "a") as f:         # a line past the saved state: dropped on resume
        f.write(json.dumps({"step": 7, "loss": 1.0}) + "\n")
    run_cli(common + ["--max-steps", 2])
    assert torch.load(out / "state.pt", weights_only=True)["scaler"]["scale"] in (1024.0, 512.0)
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
    assert not (out / "log.jsonl.tmp").exists()


def test_ddp_two_processes_on_cpu(tiny, tiny_data, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "finetune_sd.py"), "--data", str(tiny_data), "--base", str(tiny["folder"]), "--out", str(out),
           "--epochs", "1", "--max-steps", "2", "--batch-size", "2", "--device", "cpu", "--dtype", "bf16",
           "--workers", "0", "--log-every", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((out / "config.json").read_text())
    assert meta["run"]["world"] == 2 and meta["run"]["dtype"] == "bf16" and meta["progress"]["step"] == 2
    assert r.stdout.count("done:") == 1                       # only rank 0 prints
    from safetensors.torch import load_file
    cache = load_file(str(out / "cache.safetensors"))        # gathered from both ranks, in dataset order
    sd = S.load_sd(tiny["folder"])
    dataset = load_folder(tiny_data)
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(len(dataset))]) * 2 - 1
        mean, logvar = sd.vae.encode(images)
    assert torch.allclose(cache["posterior"], torch.cat([mean, logvar], 1), atol=1e-5)
    assert S.load_sd(out).unet is not None


def test_poisoning_flags_beside_data_are_refused(tmp_path):
    """A poisoning flag beside --data is refused; --resolution is also the training one."""
    (tmp_path / "set").mkdir()
    parser = S.build_parser()
    args = parser.parse_args(["--data", str(tmp_path / "set"), "--ratio", "0.05", "--target", "cat"])
    with pytest.raises(UsageError, match=r"--target --ratio with --data: .*drop them, or drop --data"):
        S.poisoned_set(args, 0, 1, "finetune_sd.py")
    args = parser.parse_args(["--data", str(tmp_path / "set"), "--resolution", "256"])
    assert S.poisoned_set(args, 0, 1, "finetune_sd.py") == tmp_path / "set"
    args = parser.parse_args(["--data", str(tmp_path / "set"), "--poison-out", str(tmp_path / "other")])
    with pytest.raises(UsageError, match="--poison-out with --data"):
        S.poisoned_set(args, 0, 1, "finetune_sd.py")
