"""`classify.py diffusion` (Tab. A4): a tiny DDPM beats chance, the filter against sorting and on a trigger-like region,
batched = the per-class loop (with pruning), shared noise, the SD path, torchrun, refusals."""
import functools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import classify
import train_ddpm
from common import UsageError, load_folder, write_folder
from poison import poison
from helpers import denoising_errors_loop

ROOT = Path(__file__).resolve().parent.parent
SIDE = 8                                   # the smallest images the tiny U-Net takes: fast
NAMES = ["red", "green", "blue"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """3 colours at 8 px, BadNets 10% (target red); a tiny DDPM (200 steps) and a small CNN trained on it."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    for c, name in enumerate(NAMES):
        (root / "src" / name).mkdir(parents=True)
        for i in range(40):
            im = rng.integers(0, 60, size=(SIDE, SIDE, 3))
            im[..., c] += 150
            Image.fromarray(im.astype(np.uint8)).save(root / "src" / name / f"{i}.png")
    poison(root / "set", dataset=f"folder:{root / 'src'}", target="red", resolution=SIDE, ratio=0.1, force=True,
           quiet=True, workers=1)
    args = train_ddpm.build_parser().parse_args(
        ["--out", str(root / "ddpm"), "--data", str(root / "set" / "train"), "--preset", "tiny", "--steps", "200",
         "--batch-size", "32", "--lr", "3e-3", "--ema-decay", "0.99", "--preview-per-class", "0", "--log-every",
         "1000", "--device", "cpu"])
    train_ddpm.main(args)
    classify.train_classifier(root / "set", root / "clf", arch="smallcnn", width=8, epochs=4, batch_size=16, lr=0.05,
                              progress=False)
    return root


def test_tiny_model_beats_chance_and_the_cli_writes_table_a4(toy, tmp_path, capsys):
    out = tmp_path / "dc"
    argv = ["diffusion", "--model", str(toy / "ddpm"), "--data", str(toy / "set"), "--classifier", str(toy / "clf"),
            "--timesteps", "10", "--filter-top", "0,5,10", "--device", "cpu", "--out", str(out)]
    classify.main(classify.build_parser().parse_args(argv))
    results = json.loads((out / "results.json").read_text())
    assert results["n_test"] == 24 and results["n_backdoor"] == 16 and results["target"] == "red"
    assert results["stages"] == [[10, 1]] and results["timestep_grid"] == list(range(50, 1000, 100))
    rows = results["rows"]
    assert [r["kind"] for r in rows] == ["classifier", "diffusion", "diffusion", "diffusion"]
    assert [r.get("filter_top") for r in rows[1:]] == [0, 5, 10]
    assert rows[1]["ta"] >= 0.8, rows                                       # chance is 1/3
    assert all(0 <= r["ta"] <= 1 and 0 <= r["asr"] <= 1 for r in rows)
    assert results["evaluations"] == (24 + 16) * 3 * 10
    # the classifier row is that classifier's TA / ASR on the same images
    model, config = classify.load_classifier(toy / "clf")
    ref = classify.evaluate(model, config, toy / "set" / "test", toy / "set" / "test_backdoor")
    assert rows[0]["ta"] == pytest.approx(ref["ta"]) and rows[0]["asr"] == pytest.approx(ref["asr"])
    md = (out / "results.md").read_text()
    assert "| classifier | TA (%) | ASR (%) |" in md and md.count("| diffusion classifier") == 3
    assert f"| {100 * rows[1]['ta']:.1f} |" in md
    from safetensors.torch import load_file
    scores = load_file(str(out / "scores.safetensors"))
    assert scores["test/scores"].shape == (3, 24, 3) and scores["backdoor/predictions"].shape == (3, 16)
    assert float((scores["test/predictions"][0] == scores["test/labels"]).float().mean()) == rows[1]["ta"]
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["out"] == str(out)

    # p = 0 alone (spelled with the alias) gives bit for bit the same p = 0 scores: the filters do not touch it
    classify.main(classify.build_parser().parse_args(
        ["diffusion-classifier", "--model", str(toy / "ddpm"), "--data", str(toy / "set"), "--timesteps", "10",
         "--filter-top", "0", "--device", "cpu", "--out", str(tmp_path / "p0"), "--quiet"]))
    alone = load_file(str(tmp_path / "p0" / "scores.safetensors"))
    assert alone["test/scores"].shape == (1, 24, 3)
    assert torch.equal(alone["test/scores"][0], scores["test/scores"][0])
    assert torch.equal(alone["backdoor/scores"][0], scores["backdoor/scores"][0])
    # a random subset (--n) scores its images as the full run does (up to batch-composition rounding)
    classify.main(classify.build_parser().parse_args(
        ["diffusion", "--model", str(toy / "ddpm"), "--data", str(toy / "set"), "--timesteps", "10",
         "--filter-top", "0", "--device", "cpu", "--out", str(tmp_path / "n5"), "--quiet", "--n", "5"]))
    subset = load_file(str(tmp_path / "n5" / "scores.safetensors"))
    idx = subset["test/indices"]
    assert len(idx) == 5 and len(set(idx.tolist())) == 5
    assert torch.allclose(subset["test/scores"][0], scores["test/scores"][0, idx], rtol=1e-5)
    with pytest.raises(UsageError, match="exists"):
        classify.main(classify.build_parser().parse_args(argv))


def test_filtered_means_against_sorting_and_p0_is_the_plain_mean():
    g = torch.Generator().manual_seed(0)
    err = torch.rand(6, 192, generator=g) ** 3
    drops = classify.drop_counts([0, 1, 5, 10], 192)
    assert drops == [0, 2, 10, 20]                       # 192 - int(q * 192), as the reference keeps int(q n)
    assert classify.drop_counts([1, 2, 5, 10], 3072) == [31, 62, 154, 308]   # CIFAR-10: 3 x 32 x 32 errors
    got = classify.filtered_means(err, drops)
    for l, d in enumerate(drops):
        kept = err.double().sort(1).values[:, :192 - d]
        assert torch.allclose(got[:, l], kept.mean(1), rtol=1e-12, atol=0)
    assert torch.allclose(got[:, 0], err.double().mean(1), rtol=1e-12, atol=0)
    assert torch.equal(classify.filtered_means(err, [0])[:, 0], got[:, 0])
    assert (got[:, 1:] < got[:, :1]).all()                    # dropping the largest lowers the mean
    with pytest.raises(UsageError, match="outside"):
        classify.drop_counts([100], 192)


class Oracle(nn.Module):
    """The exact noise of x0's x_t, but class 0 is off by 3 on a 2x2 corner (12 of 192: a trigger), class 1 by 0.5."""

    def __init__(self, x0, alphas_cumprod):
        super().__init__()
        self.x0, self.abar = x0, alphas_cumprod

    def forward(self, x, t, y):
        a = self.abar[t].float().view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        patch = torch.zeros_like(eps)
        patch[..., -2:, -2:] = 3.0
        return eps + torch.where((y == 0).view(-1, 1, 1, 1), patch, torch.full_like(eps, 0.5))


def test_the_filter_discounts_a_trigger_like_region():
    ac = train_ddpm.Diffusion().alphas_cumprod
    x0 = torch.rand(1, 3, SIDE, SIDE) * 2 - 1
    P = 4
    noise = classify.draw_noise([0], P, (3, SIDE, SIDE))
    ts = torch.tensor(classify.timestep_grid(1000, P))
    drops = classify.drop_counts([0, 1, 10], 3 * SIDE * SIDE)                # 0, 2, 20 of 192
    preds, scores, _ = classify.classify_images(Oracle(x0, ac), x0, noise, ac, ts, [(P, 1)], 2, drops)
    # class 0: 12 * 9 / 192 = 0.5625 unfiltered, 10 * 9 / 190 with two dropped, 0 once all 12 are; class 1: 0.25
    assert torch.allclose(scores[:, 0, 0], torch.tensor([0.5625, 90 / 190, 0.0], dtype=torch.float64), atol=1e-4)
    assert torch.allclose(scores[:, 0, 1], torch.tensor([0.25] * 3, dtype=torch.float64), atol=1e-4)
    assert preds[:, 0].tolist() == [1, 1, 0]


class Recorder(nn.Module):
    """eps = 0.5 x_t (+ a class term when class_blind is False), recording every (x_t, t, y) it sees."""

    def __init__(self, class_blind):
        super().__init__()
        self.class_blind, self.seen = class_blind, []

    def forward(self, x, t, y):
        self.seen += [(x[i].clone(), int(t[i]), int(y[i])) for i in range(len(x))]
        return 0.5 * x + (0 if self.class_blind else 0.1 * y.float().view(-1, 1, 1, 1))


def test_the_paired_noise_and_timesteps_are_shared_across_classes():
    ac = train_ddpm.Diffusion().alphas_cumprod
    B, K, P = 2, 4, 5
    x0 = torch.rand(B, 3, SIDE, SIDE) * 2 - 1
    noise = classify.draw_noise([10, 11], P, (3, SIDE, SIDE))
    ts = torch.tensor(classify.timestep_grid(1000, P))
    rec = Recorder(class_blind=False)
    classify.classify_images(rec, x0, noise, ac, ts, [(P, 1)], K, [0, 3], batch_size=7)   # chunks mix everything
    assert len(rec.seen) == B * K * P
    groups = {}
    for x, t, y in rec.seen:
        groups.setdefault((x.numpy().tobytes(), t), []).append(y)
    assert len(groups) == B * P                                 # one x_t per (image, timestep) ...
    assert all(sorted(ys) == list(range(K)) for ys in groups.values())   # ... seen once by every class
    assert sorted({t for _, t in groups}) == ts.tolist()
    # a model that ignores the class gives every class exactly the same error: nothing but the class differs
    blind = Recorder(class_blind=True)
    _, scores, _ = classify.classify_images(blind, x0, noise, ac, ts, [(P, 1)], K, [0, 3], batch_size=7)
    assert (scores == scores[..., :1]).all()
    # and the classes do differ when the model reads them
    _, scores, _ = classify.classify_images(rec, x0, noise, ac, ts, [(P, 1)], K, [0], batch_size=7)
    assert len(set(scores[0, 0].tolist())) == K
    # padded to one shape for torch.compile: every forward has batch_size rows, the padding is dropped
    sizes = []
    padded = Recorder(class_blind=False)
    padded.register_forward_hook(lambda m, args, out: sizes.append(len(args[0])))
    _, scores_padded, n = classify.classify_images(padded, x0, noise, ac, ts, [(P, 1)], K, [0], batch_size=7,
                                                   pad=True)
    assert set(sizes) == {7} and n == B * K * P and torch.equal(scores_padded, scores)
    # an image's noise depends on its own seed only (not on the batch), and differs between timesteps
    assert torch.equal(classify.draw_noise([11], P, (3, SIDE, SIDE))[0], noise[1])
    assert not torch.equal(noise[0, 0], noise[0, 1]) and not torch.equal(noise[0], noise[1])


@pytest.mark.parametrize("loss", ["l2", "l1"])
def test_denoising_errors_are_li_et_als(loss):
    """Each query's error against its formula (train_ddpm's q_sample), plain and with the top 10% dropped."""
    torch.manual_seed(2)
    d = train_ddpm.Diffusion()
    x0, noise = torch.rand(2, 3, 4, 5) * 2 - 1, torch.randn(2, 3, 3, 4, 5)
    ts = torch.tensor([100, 500, 900])

    def eps_fn(x, t, c):
        return torch.tanh(x) * 0.8 + c.view(-1, 1, 1, 1) * 0.2 + t.view(-1, 1, 1, 1) / 1000
    q = torch.tensor([[0, 0, 0], [1, 2, 1], [0, 1, 2], [1, 0, 2]])
    got = classify.denoising_errors(eps_fn, x0, noise, d.alphas_cumprod, ts, q, [0, 6], loss=loss)
    for row, (b, c, k) in zip(got, q.tolist()):
        x_t = d.q_sample(x0[b:b + 1], ts[k:k + 1], noise[b:b + 1, k])
        diff = (noise[b, k] - eps_fn(x_t, ts[k:k + 1], torch.tensor([c]))[0]).double().flatten()
        err = diff.square() if loss == "l2" else diff.abs()
        want = [err.mean(), err.sort().values[:54].mean()]  # 60 entries: drop the largest 6
        assert torch.allclose(row, torch.stack(want), rtol=1e-6, atol=0)


def test_batched_equals_the_per_class_loop_with_and_without_pruning(toy):
    model, config = train_ddpm.load_model(toy / "ddpm")
    den = classify.ddpm_denoiser(model, config)
    test = load_folder(toy / "set" / "test")
    x0 = den.encode(torch.stack([test.image_uint8(i) for i in (0, 9, 17, 23)]).float() / 255)
    B, K, P = len(x0), 3, 6
    noise = classify.draw_noise(range(B), P, den.shape)
    ts = torch.tensor(classify.timestep_grid(1000, P))
    drops = classify.drop_counts([0, 5, 10], 192)
    loop = denoising_errors_loop(den.eps, x0, noise, den.alphas_cumprod, ts, K, drops)   # (B, K, P, L)
    # every triple in a shuffled order, 5 a forward: the same numbers
    q = torch.cartesian_prod(torch.arange(B), torch.arange(K), torch.arange(P))
    q = q[torch.randperm(len(q), generator=torch.Generator().manual_seed(0))]
    e = classify.denoising_errors(den.eps, x0, noise, den.alphas_cumprod, ts, q, drops, batch_size=5)
    assert torch.allclose(e, loop[q[:, 0], q[:, 1], q[:, 2]], rtol=1e-5, atol=1e-8)
    preds, scores, n = classify.classify_images(den.eps, x0, noise, den.alphas_cumprod, ts, [(P, 1)], K, drops,
                                                batch_size=16)
    assert n == B * K * P
    assert torch.allclose(scores, loop.mean(2).permute(2, 0, 1), rtol=1e-5, atol=1e-8)
    assert torch.equal(preds, loop.mean(2).permute(2, 0, 1).argmin(2))
    # Li et al.'s pruning, 2 then 6 evaluations keeping 2 then 1 class, against the loop's full table
    stages = [(2, 2), (P, 1)]
    first = classify.stage_points(P, 2)
    assert first == [1, 4]
    preds, _, _ = classify.classify_images(den.eps, x0, noise, den.alphas_cumprod, ts, stages, K, drops)
    for l in range(len(drops)):
        kept = loop[:, :, first, l].mean(2).topk(2, dim=1, largest=False).indices          # (B, 2)
        final = loop[:, :, :, l].mean(2).gather(1, kept).argmin(1)
        assert torch.equal(preds[l], kept.gather(1, final[:, None])[:, 0])
    _, _, n = classify.classify_images(den.eps, x0, noise, den.alphas_cumprod, ts, stages, K, [0])
    assert n == B * K * 2 + B * 2 * (P - 2)                     # the pruned class is not evaluated again


class StubTokenizer:
    model_max_length = 77

    def __call__(self, prompts, **kwargs):
        ids = torch.zeros(len(prompts), self.model_max_length, dtype=torch.long)
        for i, p in enumerate(prompts):
            codes = [ord(ch) % 100 for ch in p][:self.model_max_length]
            ids[i, :len(codes)] = torch.tensor(codes)
        return SimpleNamespace(input_ids=ids)


class StubTextEncoder(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.embed = nn.Embedding(100, dim)

    def forward(self, ids):
        return (self.embed(ids),)


def test_sd_denoiser_on_a_tiny_stable_diffusion():
    import finetune_sd as S
    torch.manual_seed(0)
    unet = S.UNet(dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 32],
                       layers_per_block=1, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                       up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                       attention_head_dim=2, norm_num_groups=8)).eval()
    vae = S.AutoencoderKL(dict(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                               up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16],
                               layers_per_block=1, latent_channels=4, norm_num_groups=8)).eval()
    sd = S.StableDiffusion(unet, vae, StubTextEncoder(32).eval(), StubTokenizer(), S.NoiseSchedule(), {})
    den = classify.sd_denoiser(sd, NAMES, 16)
    assert den.shape == (4, 8, 8) and den.info["prompts"][0] == "A photo of a red"
    with torch.no_grad():
        x0 = den.encode(torch.rand(2, 3, 24, 24))                # resized to 16 px, then the VAE halves it
        mean, _ = vae.encode(torch.nn.functional.interpolate(torch.rand(1, 3, 16, 16), size=16) * 2 - 1)
    assert x0.shape == (2, 4, 8, 8) and mean.shape == (1, 4, 8, 8)
    noise = classify.draw_noise([0, 1], 3, den.shape)
    ts = torch.tensor(classify.timestep_grid(1000, 3))
    loop = denoising_errors_loop(den.eps, x0, noise, den.alphas_cumprod, ts, 3, [0, 12])
    _, scores, _ = classify.classify_images(den.eps, x0, noise, den.alphas_cumprod, ts, [(3, 1)], 3, [0, 12],
                                            batch_size=7)
    assert torch.allclose(scores, loop.mean(2).permute(2, 0, 1), rtol=1e-5, atol=1e-8)
    assert len(set(scores[0, 0].tolist())) == 3                 # the prompts condition the U-Net
    with pytest.raises(UsageError, match="multiple of 2"):
        classify.sd_denoiser(sd, NAMES, 15)


def test_two_processes_give_the_one_process_results(toy, tmp_path):
    common = ["diffusion", "--model", str(toy / "ddpm"), "--data", str(toy / "set"), "--timesteps", "4",
              "--filter-top", "0,10", "--images", "7", "--device", "cpu", "--quiet", "--batch-size", "16"]
    classify.main(classify.build_parser().parse_args(common + ["--out", str(tmp_path / "one")]))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(ROOT / "classify.py"), *common, "--out", str(tmp_path / "two")],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and one["evaluations"] == two["evaluations"] == 14 * 3 * 4
    assert [(x["ta"], x["asr"]) for x in one["rows"]] == [(x["ta"], x["asr"]) for x in two["rows"]]
    from safetensors.torch import load_file
    a, b = (load_file(str(tmp_path / d / "scores.safetensors")) for d in ("one", "two"))
    assert torch.equal(a["test/indices"], b["test/indices"])
    assert torch.allclose(a["test/scores"], b["test/scores"], rtol=1e-5)


def test_the_train_folder_resolves_to_the_sets_test_folders(toy, tmp_path):
    """--data SET/train measures TA on SET/test and ASR on SET/test_backdoor, as --data SET does."""
    out = tmp_path / "dc"
    classify.main(classify.build_parser().parse_args(
        ["diffusion", "--model", str(toy / "ddpm"), "--data", str(toy / "set" / "train"), "--n", "3", "--timesteps",
         "2", "--filter-top", "0", "--device", "cpu", "--quiet", "--out", str(out)]))
    results = json.loads((out / "results.json").read_text())
    assert results["test"] == str(toy / "set" / "test") and results["backdoor"] == str(toy / "set" / "test_backdoor")


@pytest.mark.parametrize("timesteps, keep, message", [
    ([50, 500], [5, 2], "--keep"), ([500, 50], [5], "increasing"),
    ([5, 50], [20], "^--keep 20: .*at most"),                  # what was typed, not 20,1
    ([5, 50], [3, 2], "^--keep 3,2 does not fit")])
def test_bad_stages(timesteps, keep, message):
    with pytest.raises(UsageError, match=message):
        classify.parse_stages(timesteps, keep, 10)


def test_bad_input(toy, tmp_path):
    assert classify.parse_stages([50, 500], [5], 10) == [(50, 5), (500, 1)]
    with pytest.raises(UsageError, match="outside"):
        classify.timestep_grid(1000, 2000)

    def run(*extra, model=toy / "ddpm", data=toy / "set"):
        argv = ["diffusion", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "o"), "--quiet",
                "--device", "cpu", "--timesteps", "2", *map(str, extra)]
        classify.main(classify.build_parser().parse_args(argv))

    # a baseline classifier of other classes: refused before the long part (on rank 0, shared with every rank)
    other = tmp_path / "clf-other"
    shutil.copytree(toy / "clf", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "class_names": ["red", "green", "cyan"]}))
    # a poisoned set's train/ stands for the set; alone, it is no clean test set
    (tmp_path / "lonely").mkdir()
    shutil.copytree(toy / "set" / "train", tmp_path / "lonely" / "train")
    rng = np.random.default_rng(0)
    write_folder(tmp_path / "big", [({"text": "A photo of a red", "label": 0}, rng.integers(0, 255, (16, 16, 3)))],
                 {"class_names": NAMES}, workers=1)
    write_folder(tmp_path / "pets", [({"text": "A photo of a cat", "label": 0}, rng.integers(0, 255, (8, 8, 3)))],
                 {"class_names": ["cat"]}, workers=1)
    api = functools.partial(classify.run_diffusion_classifier, toy / "ddpm", toy / "set", timesteps=[2], device="cpu")
    for call, message in (
            (lambda: run(model=toy / "set"), "not a model folder"),
            (lambda: run(model=tmp_path / "missing" / "model"), "no such model folder"),
            (lambda: api(tmp_path / "o", loss="l3"), "unknown --loss"),
            (lambda: run("--classifier", toy / "set"), "not a classifier folder"),
            # a model folder and a classifier folder swapped: each named for what it is
            (lambda: run("--classifier", toy / "ddpm"), "train_ddpm.py model folder .*not a classifier folder"),
            (lambda: run(model=toy / "clf"),
             "is a classifier: give it as --classifier, a train_ddpm.py model as --model"),
            (lambda: run(data=tmp_path / "lonely" / "train"), "poisoned training set with no test/ beside it.*--test"),
            (lambda: run("--filter-top", "0,100"), "outside"),
            (lambda: api(tmp_path / "n0", n=0), "--n 0"),              # the Python API's own check
            (lambda: run(data=tmp_path / "big"), "trained at 8x8"),   # images of another size than the model's
            (lambda: run(data=tmp_path / "pets"), "no class names in common")):
        with pytest.raises(UsageError, match=message):
            call()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(classify, "diffusion_classify_set", lambda *a, **k: pytest.fail("the long part ran"))
        with pytest.raises(UsageError, match=r"for --classifier .*clf-other: --test .* holds classes .*blue"):
            run("--classifier", other)
    with pytest.raises(SystemExit):  # argparse: "argument --n/--images: 0: give a number above 0"
        run("--n", "0")
    assert not (tmp_path / "o").exists() and not (tmp_path / "n0").exists()     # nothing half-written
    r = subprocess.run([sys.executable, str(ROOT / "classify.py"), "diffusion", "--model", str(toy / "set"), "--data",
                        str(toy / "set"), "--out", str(tmp_path / "o")], cwd=ROOT, env=ENV, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "not a model folder" in r.stderr
