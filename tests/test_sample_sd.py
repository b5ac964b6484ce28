"""sample.py, SD family, against diffusers (a test-only oracle): DDIM step for step, StableDiffusionPipeline image for
image; guidance in one forward; images independent of the batch size; the CLI on a tiny finetune_sd.py folder."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import finetune_sd as S
import sample
from helpers import poisoned_random_folder
from common import UsageError, load_folder
from test_sd import rel_err, write_tiny_sd

diffusers = pytest.importorskip("diffusers")
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
CAPTIONS = ["zero, a drawing", "one, a drawing", "two, a drawing"]   # not poison.py's: must come from the data


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny SD v1 in the diffusers layout and the oracle models."""
    root = tmp_path_factory.mktemp("sd") / "tiny-sd"
    return {"folder": root, **write_tiny_sd(root), "sd": S.load_sd(root)}


@pytest.fixture(scope="module")
def finetuned(tiny, tmp_path_factory):
    """finetune_sd.py's model folder (one step) on a poisoned set captioned CAPTIONS."""
    root = tmp_path_factory.mktemp("data")
    poisoned_random_folder(root, per_class=4)
    train = root / "poisoned" / "train"
    records = [json.loads(line) for line in (train / "metadata.jsonl").read_text().splitlines()]
    (train / "metadata.jsonl").write_text("".join(json.dumps({**r, "text": CAPTIONS[r["label"]]}) + "\n"
                                                  for r in records))
    out = root / "sd-run"
    S.main(S.build_parser().parse_args([str(a) for a in (
        "--data", train, "--base", tiny["folder"], "--out", out, "--epochs", 1, "--max-steps", 1, "--batch-size", 2,
        "--device", "cpu", "--workers", 0)]))
    return out, train


# ----------------------------------------------------------------------------------------------------------------
# The sampler against diffusers

def test_ddim_matches_diffusers_step_for_step(tiny):
    """sample.ddim + sd_guided_eps on SD's 50 steps vs DDIMScheduler: every latent, eta 0 and 0.5."""
    sd, unet, sched = tiny["sd"], tiny["unet"], tiny["scheduler"]
    ts = S.ddim_timesteps(sd.schedule, 50).tolist()
    sched.set_timesteps(50)
    assert ts == sched.timesteps.tolist() and ts[:2] == [981, 961] and ts[-1] == 1
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(2, 77, 128, generator=g), torch.randn(1, 77, 128, generator=g).expand(2, -1, -1)
    ac = sd.schedule.alphas_cumprod()
    for eta in (0.0, 0.5):
        ours = []
        eps_fn = sample.sd_guided_eps(sd.unet, cond, uncond, 5.0, torch.device("cpu"))
        noise = sample.ImageNoise([3, 4], (4, 8, 8), "cpu")
        out = sample.ddim(lambda x, t: ours.append(x) or eps_fn(x, t), noise(), ac, ts, noise, eta=eta,
                          final_abar=sd.schedule.alpha_bar(-1, ac))
        ours.append(out)
        noise = sample.ImageNoise([3, 4], (4, 8, 8), "cpu")
        x, theirs = noise(), []
        with torch.no_grad():
            for t in sched.timesteps:
                theirs.append(x)
                eps_u, eps_c = unet(torch.cat([x, x]), t, torch.cat([uncond, cond])).sample.chunk(2)
                x = sched.step(eps_u + 5.0 * (eps_c - eps_u), t, x, eta=eta,
                               variance_noise=noise() if eta > 0 else None).prev_sample
        theirs.append(x)
        errors = [rel_err(a, b) for a, b in zip(ours, theirs)]
        assert len(errors) == 51 and max(errors) < 1e-4, (eta, max(errors))


def test_images_match_the_diffusers_pipeline(tiny):
    """generate_sd against StableDiffusionPipeline fed one CPU generator per image."""
    pipe = diffusers.StableDiffusionPipeline(
        vae=tiny["vae"], text_encoder=tiny["text_encoder"], tokenizer=tiny["sd"].tokenizer, unet=tiny["unet"],
        scheduler=diffusers.DDIMScheduler.from_config(tiny["scheduler"].config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a cat", "a dog", "a cat"], [5, 6, 7]
    ref = pipe(prompts, height=32, width=32, num_inference_steps=10, guidance_scale=5.0, output_type="np",
               generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    ref = torch.from_numpy((ref * 255).round().astype(np.uint8)).permute(0, 3, 1, 2)
    sd = tiny["sd"]
    texts = sorted(set(prompts))
    embeds = S.encode_prompts(sd.text_encoder, sd.tokenizer, texts + [""])
    ours = sample.generate_sd(sd, embeds, [texts.index(p) for p in prompts], seeds,
                              S.ddim_timesteps(sd.schedule, 10).tolist(), guidance=5.0, batch_size=2)
    assert ours.shape == (3, 3, 32, 32) and ours.dtype == torch.uint8
    assert (ours.int() - ref.int()).abs().max() <= 1 and ours.float().std() > 10


# ----------------------------------------------------------------------------------------------------------------
# Guidance and determinism

def test_guidance_is_one_batched_forward(tiny):
    calls = []
    unet = tiny["sd"].unet

    class Counting(torch.nn.Module):
        def forward(self, x, t, context):
            calls.append(len(x))
            return unet(x, t, context)
    g = torch.Generator().manual_seed(1)
    x, cond, uncond = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 77, 128, generator=g), \
        torch.randn(1, 77, 128, generator=g).expand(3, -1, -1)
    cpu = torch.device("cpu")
    with torch.no_grad():
        got = sample.sd_guided_eps(Counting(), cond, uncond, 5.0, cpu)(x, 501)
        assert calls == [6]                                           # uncond and cond in one forward
        eps_c, eps_u = unet(x, 501, cond), unet(x, 501, uncond)       # two separate passes
        assert rel_err(got, eps_u + 5.0 * (eps_c - eps_u)) < 1e-5
        plain = sample.sd_guided_eps(Counting(), cond, uncond, 1.0, cpu)(x, 501)
    assert calls[-1] == 3 and rel_err(plain, eps_c) < 1e-6           # s = 1: the conditional pass alone


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.5), ("sde", 0.0)])
def test_image_i_depends_only_on_its_seed(tiny, sampler, eta):
    sd = tiny["sd"]
    embeds = S.encode_prompts(sd.text_encoder, sd.tokenizer, ["a cat", "a dog", ""])
    ids, seeds = [0, 1, 0, 1], [10, 11, 12, 13]
    ts = S.ddim_timesteps(sd.schedule, 6).tolist() if sampler == "ddim" else sample.make_timesteps(1000, 6)

    def run(idx, sds, batch_size):
        return sample.generate_sd(sd, embeds, idx, sds, ts, sampler, 5.0, eta, batch_size=batch_size)
    a, b, c = run(ids, seeds, 4), run(ids, seeds, 3), run(ids[2:3], seeds[2:3], 1)
    assert (a.int() - b.int()).abs().max() <= 1 and (a[2:3].int() - c.int()).abs().max() <= 1
    d = run(ids, [s + 100 for s in seeds], 4)
    assert (a.int() - d.int()).abs().float().mean() > 5              # other seeds, other images


# ----------------------------------------------------------------------------------------------------------------
# The command line

def run_sample(*argv):
    sample.main(sample.build_parser().parse_args(["--device", "cpu", *map(str, argv)]))


def test_cli_end_to_end_on_a_finetuned_folder(finetuned, tmp_path):
    model, train = finetuned
    out = tmp_path / "gen"
    run_sample("--model", model, "--class", "all", "--n", 2, "--steps", 4, "--seed", 7, "--grid", tmp_path / "g.png",
               "--out", out)
    ds = load_folder(out)
    train_manifest = load_folder(train).manifest
    assert len(ds) == 6 and ds.images(progress=False).shape == (6, 3, 32, 32)
    assert [r["label"] for r in ds.records] == [0, 0, 1, 1, 2, 2]
    assert [r["text"] for r in ds.records] == [c for c in CAPTIONS for _ in range(2)]    # the training captions
    assert [r["seed"] for r in ds.records] == list(range(7, 13)) and ds.records[2]["class_name"] == "c1"
    m = ds.manifest
    assert (m["family"], m["sampler"], m["steps"], m["spacing"], m["weights"]) == ("sd", "ddim", 4, "leading", "ema")
    assert m["timesteps"] == [751, 501, 251, 1] and m["eta"] == 0.0 and m["clip_x0"] is False
    assert m["guidance"] == 5.0 and m["guidance_convention"].startswith("eps = eps_uncond + s")
    assert m["guidance_ddpm_w"] == 4.0 and m["model"] == str(model) and m["model_step"] == 1
    for key in ("class_names", "target", "p_t", "poison_ratio"):
        assert m[key] == train_manifest[key], key
    assert m["select"] == "random" and m["counts"]["per_class"] == {"c0": 2, "c1": 2, "c2": 2}
    assert (tmp_path / "g.png").is_file()

    # a class by name, the non-EMA U-Net: the same seeds give other images; a prompt names its class if it can
    run_sample("--model", model, "--class", "C1", "--n", 1, "--steps", 4, "--seed", 9, "--weights", "model",
               "--out", tmp_path / "one")
    one = load_folder(tmp_path / "one")
    assert one.records[0]["text"] == CAPTIONS[1] and one.manifest["weights"] == "model"
    run_sample("--model", model, "--prompt", CAPTIONS[2].upper(), "--prompt", "a bird", "--n", 1, "--steps", 2,
               "--sampler", "sde", "--guidance", 3, "--out", tmp_path / "prompts")
    p = load_folder(tmp_path / "prompts")
    assert [(r["text"], r["label"], r["class_name"]) for r in p.records] == [(CAPTIONS[2].upper(), 2, "c2"),
                                                                              ("a bird", -1, None)]
    assert p.manifest["sampler"] == "sde" and p.manifest["spacing"] == "uniform" and p.manifest["guidance"] == 3.0
    assert p.manifest["counts"]["per_prompt"] == {"c2": 1, "a bird": 1}


def test_select_provenance_for_both_families(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "manifest.json").write_text(json.dumps({"options": {"select": "duplicates"}}))
    ddpm_config = {"family": "ddpm", "data": {"path": str(tmp_path / "train")}}
    assert sample.training_select(ddpm_config) == "duplicates"
    assert sample.training_select({"family": "sd", "data": str(tmp_path / "train")}) == "duplicates"
    assert sample.training_select({"family": "sd", "select": "random", "data": str(tmp_path / "nowhere")}) == "random"
    assert sample.training_select({"family": "ddpm", "data": {"path": str(tmp_path / "nowhere")}}) is None


def test_bad_input(tiny, finetuned, tmp_path):
    model, _ = finetuned
    (tmp_path / "notamodel").mkdir()
    cli = [sys.executable, str(ROOT / "sample.py"), "--device", "cpu", "--n", "1", "--out", str(tmp_path / "g")]
    runs = [subprocess.Popen(cli + extra, cwd=tmp_path, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
            for extra in (["--model", str(model), "--class", "zebra"], ["--model", str(tmp_path / "nowhere")])]
    for r, expected in zip(runs, ("unknown --class 'zebra'", "no such file or folder")):
        _, err = r.communicate(timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert r.returncode == 1 and len(lines) == 1, err
        assert lines[0].startswith("sample.py: error:") and expected in lines[0], err
    assert not (tmp_path / "g").exists()
    for argv, expected in (
            (["--model", tiny["folder"], "--class", "all"], "knows no classes: give --prompt"),
            (["--model", model, "--class", "c0", "--prompt", "a cat"], "not both"),
            (["--model", model, "--steps", 1000], "past the last training step"),
            (["--model", model, "--clip-x0"], "not bounded"),
            (["--model", model, "--resolution", 33], "multiple of the VAE's downsampling"),
            (["--model", tiny["folder"], "--prompt", "a cat", "--weights", "ema"], "diffusers-layout folder"),
            (["--model", tmp_path / "notamodel"], "neither a model folder")):
        with pytest.raises(UsageError, match=expected):
            run_sample(*argv, "--n", 1, "--out", tmp_path / "g")
    with pytest.raises(SystemExit):  # argparse: "argument --steps: 0: give a number above 0" (was: quietly 50)
        run_sample("--model", model, "--steps", 0, "--n", 1, "--out", tmp_path / "g")


def test_two_processes_make_the_same_folder(finetuned, tmp_path):
    model, _ = finetuned
    common = ["--model", str(model), "--class", "all", "--images-per-class", "1", "--steps", "3", "--eta", "0.5",
              "--batch-size", "2", "--seed", "4", "--device", "cpu"]
    run_sample(*common[:-2], "--out", tmp_path / "one")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "sample.py"), *common, "--out", str(tmp_path / "two")], cwd=tmp_path, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = load_folder(tmp_path / "one"), load_folder(tmp_path / "two")
    assert a.records == b.records and b.manifest["world_size"] == 2 and r.stdout.count('"out"') == 1
    assert (a.images(progress=False).int() - b.images(progress=False).int()).abs().max() <= 1
