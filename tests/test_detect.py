"""detect.py: each detector separates a planted, easy backdoor and is at chance on a clean model with random labels;
the AUROC sign conventions; batched scoring equals a per-image loop; the stage end to end (CLI, outputs) and each
bad input.

Two toy sets (not from the paper), 16 px, BadNets-poisoned at 20% with poison.py, on which a smallcnn from
classify.py learns the classes and the backdoor in seconds:
- "colours": textures in the class's colour on a dark background. Rotation-invariant classes (FCT) and dark corners,
  so the trigger survives STRIP's superimposition.
- "stripes": stripe patterns in random colours on random-colour backgrounds. CD fills what its mask drops with a
  uniform random colour, which is in the distribution here; on dark backgrounds the fill itself moves the logits of
  poisoned and clean images alike and no mask size separates them.
The "generations" are clean test images plus triggered ones, flagged in their metadata."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import detect as D
from common import UsageError, atomic_output, load_folder, write_folder
from classify import train_classifier, train_trigger_detector, load_classifier
from helpers import rel_err
from poison import poison

ROOT = Path(__file__).resolve().parent.parent
SIZE = 16
TRAIN_OPTS = dict(arch="smallcnn", width=16, lr=0.05, batch_size=32, augment="none", device="cpu", force=True,
                  progress=False)


def make_colours(root, per_class=150, size=SIZE, seed=0):
    """Class folders of random textures in the class's colour (half the pixels lit, random brightness) on a dark
    background, the 3-px border dark."""
    rng = np.random.default_rng(seed)
    colours = {"red": (1, 0.15, 0.15), "green": (0.15, 1, 0.15), "blue": (0.15, 0.15, 1), "yellow": (1, 1, 0.15)}
    for name, colour in colours.items():
        folder = Path(root) / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            lit = rng.uniform(0, 1, (size, size)) < 0.5
            lit[:3], lit[-3:], lit[:, :3], lit[:, -3:] = False, False, False, False
            im = rng.uniform(0, 0.1, (size, size, 3)) + lit[..., None] * np.array(colour) * rng.uniform(0.5, 0.9)
            Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)).save(folder / f"{i:04d}.png")


def make_stripes(root, per_class=150, size=SIZE, seed=0):
    """Class folders of stripe patterns (checker, diagonal, horizontal, vertical; period 4 px, random phase), one
    random colour on another, slight noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    for c, name in enumerate(["checker", "diagonal", "hstripes", "vstripes"]):
        folder = Path(root) / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            ph = int(rng.integers(0, 4))
            pattern = [((xx + ph) % 4 < 2) ^ (yy % 4 < 2), (xx + yy + ph) % 4 < 2, (yy + ph) % 4 < 2,
                       (xx + ph) % 4 < 2][c]
            background, foreground = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
            im = np.where(pattern[..., None], foreground, background) + rng.normal(0, 0.03, (size, size, 3))
            Image.fromarray((np.clip(im, 0, 1) * 255).round().astype(np.uint8)).save(folder / f"{i:04d}.png")


def make_generations(out, data, n_clean=60, n_trigger=30, field="trigger", class_names=None, scale=1):
    """A generation-like dataset folder: clean test images and triggered ones, with a boolean `field`; `scale`
    enlarges the images (nearest neighbour)."""
    test, backdoor = load_folder(data / "test"), load_folder(data / "test_backdoor")

    def pixels(folder, i):
        return folder.image_uint8(i).permute(1, 2, 0).numpy().repeat(scale, 0).repeat(scale, 1)

    items = [({"text": "", "label": int(test.labels[i]), "poisoned": False, field: False}, pixels(test, i))
             for i in range(n_clean)]
    items += [({"text": "", "label": int(backdoor.labels[i]), "poisoned": False, field: True}, pixels(backdoor, i))
              for i in range(n_trigger)]
    manifest = {**{k: v for k, v in test.manifest.items() if k != "counts"},  # the test set's counts are not these
                "stage": "sample", "class_names": class_names or test.class_names}
    with atomic_output(out, force=True) as tmp:
        write_folder(tmp, items, manifest, workers=1)
    return out


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.set_num_threads(2)
    root = tmp_path_factory.mktemp("detect")
    sets = {}
    for name, make, target in (("colours", make_colours, "red"), ("stripes", make_stripes, "checker")):
        make(root / f"{name}-images")
        sets[name] = root / name
        poison(sets[name], dataset=f"folder:{root / f'{name}-images'}", target=target, resolution=SIZE, ratio=0.2,
               workers=1, quiet=True)
        torch.manual_seed(0)
        result = train_classifier(sets[name], root / f"clf-{name}", epochs=8, **TRAIN_OPTS)
        assert result["final"]["ta"] > 0.9 and result["final"]["asr"] > 0.9, (name, result["final"])
    torch.manual_seed(0)
    train_classifier(sets["colours"], root / "clf-clean", clean=True, epochs=4, **TRAIN_OPTS)
    return {"root": root, "data": sets["colours"], "clf": root / "clf-colours", "clean": root / "clf-clean",
            "stripes": sets["stripes"], "clf-stripes": root / "clf-stripes",
            "gen": make_generations(root / "gen", sets["colours"])}


def training_images(data, n_each=24):
    """(uint8 images, poisoned flags, folder): n_each poisoned and n_each clean training images."""
    folder = load_folder(data / "train")
    flags = folder.poisoned.numpy()
    idx = np.concatenate([np.flatnonzero(flags)[:n_each], np.flatnonzero(~flags)[:n_each]])
    return D.read_images(folder, idx, workers=1), flags[idx], folder


def strip_and_fct(model, x, folder, fct_epochs=2):
    overlays = D.strip_overlays(folder, 50, seed=0, workers=1)
    tuned = D.fct_finetune(model, D.LabelledImages(folder, x.shape[-2:]), fct_epochs, batch_size=32)
    return {"strip": D.strip_scores(model, x, overlays), "fct": D.fct_scores(tuned, x)}


def test_each_method_separates_a_planted_backdoor(toy):
    model, _ = load_classifier(toy["clf"])
    x, flags, folder = training_images(toy["data"])
    scores = strip_and_fct(model, x, folder)
    cd_model, _ = load_classifier(toy["clf-stripes"])
    cd_x, cd_flags, _ = training_images(toy["stripes"])
    scores["cd"] = D.cd_scores(cd_model, cd_x)                      # the paper's settings: 100 steps, gamma 0.01
    aurocs = {m: D.auroc(s.numpy(), cd_flags if m == "cd" else flags, m) for m, s in scores.items()}
    print("planted backdoor AUROC:", {m: round(a, 3) for m, a in aurocs.items()})
    assert all(a >= 0.8 for a in aurocs.values()), aurocs
    # the raw scores point the documented way: small masks and low entropy, large feature change = poisoned
    assert scores["cd"][cd_flags].mean() < scores["cd"][~cd_flags].mean()
    assert scores["strip"][flags].mean() < scores["strip"][~flags].mean()
    assert scores["fct"][flags].mean() > scores["fct"][~flags].mean()


def test_clean_model_with_random_labels_is_at_chance(toy):
    model, _ = load_classifier(toy["clean"])
    folder = load_folder(toy["data"] / "train")
    x = D.read_images(folder, np.flatnonzero(~folder.poisoned.numpy())[:48], workers=1)
    random_flags = np.random.default_rng(1).permutation(np.arange(48) < 24)
    scores = {**strip_and_fct(model, x, folder, fct_epochs=1), "cd": D.cd_scores(model, x, 50)}
    aurocs = {m: D.auroc(s.numpy(), random_flags, m) for m, s in scores.items()}
    print("clean model, random labels AUROC:", {m: round(a, 3) for m, a in aurocs.items()})
    assert all(abs(a - 0.5) < 0.25 for a in aurocs.values()), aurocs


def test_auroc_sign_conventions():
    scores = np.array([1.0, 2.0, 3.0, 4.0])
    poisoned = np.array([True, True, False, False])
    assert D.auroc(scores, poisoned, "cd") == 1.0       # small mask = poisoned
    assert D.auroc(scores, poisoned, "strip") == 1.0    # low entropy = poisoned
    assert D.auroc(scores, poisoned, "fct") == 0.0      # high feature change = poisoned
    assert D.auroc(-scores, poisoned, "fct") == 1.0
    np.testing.assert_allclose(D.suspicion(scores, "cd"), [1, 2 / 3, 1 / 3, 0])  # 1 - minmax(score)
    assert D.auroc(np.ones(4), poisoned, "cd") == 0.5   # constant scores: no information, no NaN
    with pytest.raises(D.UsageError, match="poisoned and clean"):
        D.auroc(scores, np.ones(4, bool), "cd")
    with pytest.raises(D.UsageError, match="non-finite"):
        D.auroc(np.array([1.0, np.nan, 2.0, 3.0]), poisoned, "strip")


def test_auroc_counts_as_scikit_learn_does():
    """auroc_of (counting in sorted scores) against scikit-learn's roc_auc_score on fresh random scores: continuous,
    heavily tied (rounded), one-sided and of unequal sizes; and a bootstrap resample through both."""
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng()
    for P, N, decimals in ((30, 270, None), (7, 3, None), (50, 50, 0), (1, 40, 1), (120, 9, 0)):
        pos, neg = rng.normal(0.7, 1.0, P), rng.normal(0.0, 1.0, N)
        if decimals is not None:
            pos, neg = pos.round(decimals), neg.round(decimals)
        expected = roc_auc_score(np.r_[np.ones(P), np.zeros(N)], np.r_[pos, neg])
        assert D.auroc_of(pos, neg) == pytest.approx(expected, abs=1e-12)
        assert D.auroc_of(pos + 10, neg) == 1.0 and D.auroc_of(pos - 10, neg) == 0.0
    for pos, neg, only in (([], [0.5], "clean"), ([0.5], [], "poisoned")):
        with pytest.raises(D.UsageError, match=f"holds only {only} ones"):
            D.auroc_of(np.array(pos), np.array(neg))
    scores = rng.normal(size=60).round(1)
    poisoned = rng.random(60) < 0.3
    seed = int(rng.integers(1 << 31))
    boot = D.bootstrap_aurocs(scores, poisoned, "fct", n=20, seed=seed)
    draw = np.random.default_rng(seed)  # the same resamples, judged by scikit-learn
    pos, neg = scores[poisoned], scores[~poisoned]
    expected = [roc_auc_score(np.r_[np.ones(len(pos)), np.zeros(len(neg))],
                              np.r_[draw.choice(pos, len(pos)), draw.choice(neg, len(neg))]) for _ in range(20)]
    np.testing.assert_allclose(boot, expected, rtol=0, atol=1e-12)


def test_cd_objective_pieces():
    m = torch.tensor([[[[0.0, 1.0], [1.0, 1.0]]]])            # (1, 1, 2, 2)
    assert D.total_variation(m).item() == pytest.approx((1 + 1) / 4)  # one vertical, one horizontal jump
    adv, clean = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 2.0, 5.0]])
    loss = D.cd_loss(adv, clean, m, gamma=0.01, beta=1.0)
    assert loss.item() == pytest.approx(1.0 + 0.01 * 3 + 0.5)


def test_batched_equals_per_image_loop(toy):
    # in float64, so that the rounding differences between batch shapes (which 25 Adam steps with betas 0.1, nearly
    # sign descent, can amplify in float32) stay negligible and the comparison is of the arithmetic itself
    model = load_classifier(toy["clf"])[0].double()
    x, _, folder = training_images(toy["data"], n_each=3)
    x = x.double() / 255
    n = len(x)
    colors = D.cd_colors(n, 25, seed=3)
    batched = D.cd_scores(model, x, 25, colors=colors, batch_size=4)  # batches of 4 and 2
    looped = torch.cat([D.cd_scores(model, x[i:i + 1], 25, colors=colors[i:i + 1])
                        for i in range(n)])
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-9)
    # the colours are drawn per image up front: the same seed gives the same scores whatever the batch size
    torch.testing.assert_close(D.cd_scores(model, x, 25, seed=3, batch_size=n), batched, rtol=1e-9, atol=1e-9)

    overlays = D.strip_overlays(folder, 10, seed=0, workers=1)
    batched = D.strip_scores(model, x, overlays, batch_size=40)       # 4 images x 10 overlays a forward
    looped = torch.cat([D.strip_scores(model, x[i:i + 1], overlays) for i in range(n)])
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-9)
    # STRIP's definition, spelled out for one image
    with torch.no_grad():
        p = model(torch.clamp(x[:1] + overlays.double() / 255, 0, 1)).softmax(-1)
    assert batched[0].item() == pytest.approx(float(torch.special.entr(p).sum(-1).mean()), rel=1e-6)

    params = D.fct_params(n, (SIZE, SIZE), seed=5)
    batched = D.fct_scores(model, x, params=params, batch_size=4)
    looped = torch.cat([D.fct_scores(model, x[i:i + 1], params=(params[0][i:i + 1], params[1][i:i + 1]))
                        for i in range(n)])
    torch.testing.assert_close(batched, looped, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(D.fct_scores(model, x, seed=5, batch_size=n), batched)


def test_fct_transform_geometry():
    x = torch.rand(2, 3, 8, 8)
    zero = torch.zeros(2, dtype=torch.float64)
    torch.testing.assert_close(D.fct_transform(x, zero, torch.zeros(2, 2)), x)
    # 180 degrees about the centre of an even-sized image is a flip of both axes
    torch.testing.assert_close(D.fct_transform(x, torch.full((2,), 180.0), torch.zeros(2, 2)), x.flip(-1, -2))
    # a shift by (dx, dy) = (2, -1) px moves content right and up, zeros coming in
    shifted = D.fct_transform(x, zero, torch.tensor([[2.0, -1.0], [2.0, -1.0]]))
    expected = torch.zeros_like(x)
    expected[:, :, :-1, 2:] = x[:, :, 1:, :-2]
    torch.testing.assert_close(shifted, expected)
    # against torchvision's RandomRotation then RandomAffine(translate), on PIL images as the FCT reference code
    import torchvision.transforms.functional as TF
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    for side in ((16, 16), (12, 20)):
        x = torch.randint(0, 256, (20, 3, *side)).float() / 255
        angles, shifts = D.fct_params(20, side, seed=sum(side))
        got = D.fct_transform(x, angles, shifts)
        for i in range(20):
            img = Image.fromarray((x[i] * 255).round().byte().permute(1, 2, 0).numpy())
            img = TF.rotate(img, float(angles[i]), interpolation=InterpolationMode.NEAREST)
            img = TF.affine(img, angle=0.0, translate=[int(shifts[i, 0]), int(shifts[i, 1])], scale=1.0, shear=[0.0],
                            interpolation=InterpolationMode.NEAREST)
            assert torch.equal((got[i] * 255).round().byte(), torch.from_numpy(np.array(img)).permute(2, 0, 1)), i
    angles, shifts = D.fct_params(1000, (20, 10), seed=0)
    assert angles.abs().max() <= 180 and angles.min() < -170 and angles.max() > 170
    assert shifts[:, 0].abs().max() == 2 and shifts[:, 1].abs().max() == 4  # round(0.2 * side), integers
    assert torch.equal(shifts, shifts.round())


def test_cd_masks_follow_the_reference_loop():
    """cd_masks against Cognitive Distillation's loop written out with a hand-made Adam: theta = 1, m = (tanh theta +
    1) / 2, x_adv = x m + (1 - m) r, loss = mean_k |f(x_adv) - f(x)|_k + gamma |m|_1 + beta TV(m), Adam(lr 0.1,
    betas (0.1, 0.1), eps 1e-8); random linear model and images, float64."""
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 6 * 5, 4)).double()
    x = torch.rand(3, 3, 6, 5, dtype=torch.float64)
    steps = 12
    colors = D.cd_colors(3, steps, seed=9).double()
    got = D.cd_masks(model, x, colors)
    theta, first, second = torch.ones(3, 1, 6, 5, dtype=torch.float64), 0.0, 0.0
    with torch.no_grad():
        clean = model(x)
    for k in range(1, steps + 1):
        theta.requires_grad_(True)
        m = (torch.tanh(theta) + 1) / 2
        x_adv = x * m + (1 - m) * colors[:, k - 1, :, None, None]
        tv = ((m[..., 1:, :] - m[..., :-1, :]) ** 2).sum((1, 2, 3)) + ((m[..., 1:] - m[..., :-1]) ** 2).sum((1, 2, 3))
        loss = ((model(x_adv) - clean).abs().mean(1) + 0.01 * m.sum((1, 2, 3)) + 1.0 * tv / (6 * 5)).sum()
        grad, = torch.autograd.grad(loss, theta)
        theta = theta.detach()
        first = 0.1 * first + 0.9 * grad
        second = 0.1 * second + 0.9 * grad ** 2
        theta -= 0.1 * (first / (1 - 0.1 ** k)) / ((second / (1 - 0.1 ** k)).sqrt() + 1e-8)
    want = (torch.tanh(theta) + 1) / 2
    assert rel_err(got, want) < 1e-10
    assert (got - 0.88).abs().max() > 0.05  # the masks moved from their start


def test_intra_class_loss_against_a_loop():
    """L_intra on random features of 5 classes against the definition, and its gradient (FCT fine-tunes with it)."""
    torch.manual_seed(6)
    f = torch.randn(40, 7, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (40,))
    y[:5] = torch.arange(5)
    centres = [F.normalize(f[y == c].mean(0), dim=0) for c in range(5)]
    want = sum(centres[i] @ centres[j] for i in range(5) for j in range(5) if i != j) / 25
    got = D.intra_class_loss(f, y)
    assert abs(got.item() / want.item() - 1) < 1e-12
    g_got, = torch.autograd.grad(got, f)
    g_want, = torch.autograd.grad(want, f)
    assert rel_err(g_got, g_want) < 1e-12
    assert torch.autograd.gradcheck(lambda t: D.intra_class_loss(t, y), (f,))


def test_intra_class_loss():
    f = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 0, 1, 1])
    centres = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.5, 1.0]]), dim=1)
    cos = float(centres[0] @ centres[1])
    assert D.intra_class_loss(f, y).item() == pytest.approx(2 * cos / 4)  # k x k mean, diagonal zeroed
    assert D.intra_class_loss(f, torch.zeros(4, dtype=torch.long)) is None


def test_stratified_sample():
    flags = np.arange(100) < 10
    idx = D.stratified_sample(flags, 20, seed=0)
    assert len(idx) == len(set(idx)) == 20 and flags[idx].sum() == 2
    assert np.array_equal(idx, D.stratified_sample(flags, 20, seed=0))
    assert flags[D.stratified_sample(flags, 5, seed=1)].sum() == 1       # both kinds, however few
    assert np.array_equal(D.stratified_sample(flags, 500), np.arange(100))


def test_cli_end_to_end(toy, tmp_path):
    out = tmp_path / "det"
    cmd = [sys.executable, str(ROOT / "detect.py"), "--classifier", str(toy["clf"]), "--train", str(toy["data"]),
           "--generated", str(toy["gen"]), "--generated-labels", "trigger", "--method", "all", "--n", "40",
           "--cd-steps", "30", "--cd-gamma", "0.02", "--strip-overlays", "20", "--fct-epochs", "1",
           "--device", "cpu", "--workers", "1", "--quiet", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    result = json.loads((out / "detect.json").read_text())
    assert set(result["results"]) == {"cd", "strip", "fct"}
    for method, r in result["results"].items():
        assert 0 <= r["train_auroc"] <= 1 and 0 <= r["generated_auroc"] <= 1
        assert r["delta"] == pytest.approx(r["generated_auroc"] - r["train_auroc"])
        for key in ("train_auroc", "generated_auroc", "delta"):
            lo, hi = r[f"{key}_ci"]
            assert -1 <= lo <= hi <= 1
        for name in ("train", "generated"):
            s = result["scores"][method][name]
            assert len(s["score"]) == len(s["index"]) == len(s["poisoned"]) == 40
        assert (out / f"hist_{method}.png").is_file()
    sets = result["sets"]
    assert sets["train"]["n"] == sets["generated"]["n"] == 40
    assert sets["train"]["positives"] == 8 and sets["generated"]["positives"] == 13   # shares kept: 20%, 1/3
    assert "trigger" in sets["generated"]["ground_truth"] and "poisoned" in sets["train"]["ground_truth"]
    md = (out / "detect.md").read_text()
    assert "| Detection method | Training set AUROC | Generation set AUROC | Δ AUROC |" in md
    assert all(f"| {name} |" in md for name in ("CD", "STRIP", "FCT"))
    settings = result["settings"]
    assert settings["cd"]["steps"] == 30 and settings["cd"]["gamma"] == 0.02 and settings["strip"]["overlays"] == 20
    # an existing --out is kept without --force
    with pytest.raises(D.UsageError, match="exists: pass --force"):
        D.run_detection(toy["clf"], toy["data"], toy["gen"], "strip", out=out, generated_labels="trigger")


def test_generation_ground_truth_sources(toy, tmp_path):
    gen = load_folder(toy["gen"])
    truth = np.array([r["trigger"] for r in gen.records])
    flags, how = D.generation_truth(gen, field="trigger")
    assert np.array_equal(flags, truth) and "trigger" in how
    # dissect.py's per-image groups: G1/G2 carry the trigger; by file name or by index
    groups = tmp_path / "groups.jsonl"
    groups.write_text("".join(json.dumps({"file_name": r["file_name"], "group": "G2" if t else ("G3", "G4")[i % 2]})
                              + "\n" for i, (r, t) in enumerate(zip(gen.records, truth))))
    flags, how = D.generation_truth(gen, groups=groups)
    assert np.array_equal(flags, truth) and "G1/G2" in how
    # dissect.py's OUT: <setting>/verdicts.jsonl, groups only for the target prompt, the verdict "trigger" for all
    target = gen.manifest["target"]["index"]
    (tmp_path / "dissect" / "gen").mkdir(parents=True)
    (tmp_path / "dissect" / "gen" / "verdicts.jsonl").write_text("".join(
        json.dumps({"file_name": r["file_name"], "trigger": bool(t),
                    "group": ("G1" if t else "G4") if r["label"] == target else None}) + "\n"
        for r, t in zip(gen.records, truth)))
    assert np.array_equal(D.generation_truth(gen, groups=tmp_path / "dissect")[0], truth)
    (tmp_path / "groups.json").write_text(json.dumps({"images": [{"index": i, "group": 1 if t else 4}
                                                                 for i, t in enumerate(truth)]}))
    assert np.array_equal(D.generation_truth(gen, groups=tmp_path / "groups.json")[0], truth)
    # a trigger detector's verdicts (predicted class 1)
    det = toy["root"] / "detector"
    if not det.exists():
        train_trigger_detector(toy["data"], det, epochs=6, **{**TRAIN_OPTS, "width": 8})
    flags, how = D.generation_truth(gen, detector=det)
    assert "trigger detector" in how and (flags == truth).mean() > 0.8
    result = D.run_detection(toy["clf"], toy["data"], toy["gen"], "strip", detector=det, n=30, strip_overlays_n=10,
                             device="cpu", workers=1, progress=False)
    assert "trigger detector" in result["sets"]["generated"]["ground_truth"]


def test_bad_inputs(toy, tmp_path):
    common = dict(device="cpu", workers=1, progress=False, n=20, strip_overlays_n=5)
    # fewer poisoned images in a draw than --min-poisoned: refused before any scoring, naming the count
    drawn = {what: int(f[D.stratified_sample(f, 20, 0)].sum()) for what, f in (
        ("the training set", D.open_train(toy["data"]).poisoned.numpy()),
        ("the generations", D.generation_truth(load_folder(toy["gen"]), None, None, "trigger")[0]))}
    k = min(drawn.values())
    fewest = min(drawn, key=drawn.get)  # the training set is checked first
    assert D.run_detection(toy["clf"], toy["data"], toy["gen"], "strip", generated_labels="trigger", min_poisoned=k,
                           **common)["results"]["strip"]
    with pytest.raises(D.UsageError, match=f"draw of 20 images from {fewest} .* holds {k} poisoned, fewer "
                                            f"than --min-poisoned {k + 1}: an AUROC needs more"):
        D.run_detection(toy["clf"], toy["data"], toy["gen"], "strip", generated_labels="trigger",
                        min_poisoned=k + 1, **common)
    groups = tmp_path / "partial.jsonl"
    groups.write_text(json.dumps({"index": 0, "group": "G1"}) + "\n")
    other = make_generations(tmp_path / "gen-other", toy["data"], class_names=["a", "b", "c", "d"])
    renamed = tmp_path / "clf-other"
    shutil.copytree(toy["clf"], renamed)
    config = json.loads((renamed / "config.json").read_text())
    (renamed / "config.json").write_text(json.dumps({**config, "class_names": ["w", "x", "y", "z"]}))
    labels = dict(generated_labels="trigger")
    args = dict(classifier=toy["clf"], train=toy["data"], generated=toy["gen"], methods="strip", **common)
    for change, message in (
            ({}, "one ground truth.*--detector.*--groups.*--generated-labels"),  # no ground truth given
            (dict(generated_labels="nonexistent"), "no boolean 'nonexistent'"),
            # sample.py writes "poisoned": false on every generation: one kind only, no AUROC
            (dict(generated_labels="poisoned"), "no image .* carries the trigger"),
            (dict(**labels, groups=tmp_path / "g.jsonl"), "one ground truth"),
            (dict(groups=groups), "no group for"),
            (dict(**labels, generated=other), "holds classes .* classifier .* knows"),  # other classes
            (dict(**labels, classifier=renamed), "the training set .* holds classes"),
            # a class classifier is not a trigger detector
            (dict(detector=toy["clean"]), "not a trigger detector"),
            (dict(**labels, train=toy["data"] / "test"), "no poisoned images"),  # a clean set: nothing to detect
            (dict(**labels, methods="cd,spectral"), "unknown --method"),
            (dict(**labels, classifier=tmp_path), "not a classifier folder")):
        with pytest.raises(UsageError, match=message):
            D.run_detection(**{**args, **change})
    # the CLI: one line, non-zero, nothing written
    out = tmp_path / "never"
    run = subprocess.run([sys.executable, str(ROOT / "detect.py"), "--classifier", str(toy["clf"]), "--train",
                          str(toy["data"]), "--generated", str(toy["gen"]), "--device", "cpu", "--out", str(out)],
                         capture_output=True, text=True, cwd=ROOT)
    assert run.returncode != 0 and not out.exists()
    assert run.stderr.strip().startswith("detect.py: error: give one ground truth")
    assert len(run.stderr.strip().splitlines()) == 1


def test_sets_and_classifier_of_other_resolutions_are_refused(toy, tmp_path):
    """Training set and generations of different sides give AUROCs that do not compare; a classifier (or trigger
    detector) trained on another resolution than the images it probes would resize them: each is refused in one
    line naming both sizes."""
    common = dict(device="cpu", workers=1, progress=False, n=20, strip_overlays_n=5, generated_labels="trigger")
    big = make_generations(tmp_path / "gen-32", toy["data"], scale=2)
    with pytest.raises(D.UsageError, match="holds 16x16-px images but the generations .* 32x32-px ones"):
        D.run_detection(toy["clf"], toy["data"], big, "strip", **common)
    moved = tmp_path / "clf-32"
    shutil.copytree(toy["clf"], moved)
    config = json.loads((moved / "config.json").read_text())
    (moved / "config.json").write_text(json.dumps({**config, "data_resolution": 32, "input_size": 32}))
    with pytest.raises(UsageError, match="--classifier .* trained on 32x32-px images but the training set .* are "
                                            "16x16 px"):
        D.run_detection(moved, toy["data"], toy["gen"], "strip", **common)
    (moved / "config.json").write_text(json.dumps({**config, "task": "trigger", "class_names": ["clean", "trigger"],
                                                   "data_resolution": 32, "input_size": 32}))
    with pytest.raises(UsageError, match="--detector .* trained on 32x32-px images but the generations"):
        D.detector_verdicts(moved, load_folder(toy["gen"]), torch.device("cpu"))


def test_bootstrap_interval_matches_delong():
    """The bootstrap spread of the AUROC agrees with DeLong's (1988) variance of the AUROC on fresh random scores;
    a perfect separator stays perfect in every resample."""
    rng = np.random.default_rng()
    P, N = 30, 270
    scores = np.r_[rng.normal(1.0, 1.0, P), rng.normal(0.0, 1.0, N)]
    poisoned = np.r_[np.ones(P, bool), np.zeros(N, bool)]
    A = D.auroc(scores, poisoned, "fct")
    boot = D.bootstrap_aurocs(scores, poisoned, "fct", seed=int(rng.integers(1 << 31)))
    pos, neg = scores[:P, None], scores[None, P:]
    psi = (pos > neg) + 0.5 * (pos == neg)          # DeLong's placement values
    se = np.sqrt(psi.mean(1).var(ddof=1) / P + psi.mean(0).var(ddof=1) / N)
    assert psi.mean() == pytest.approx(A)
    assert len(boot) == D.BOOTSTRAP and boot.std() == pytest.approx(se, rel=0.15)
    lo, hi = D.interval(boot)
    assert lo < A < hi and hi - lo == pytest.approx(2 * 1.96 * se, rel=0.2)
    separated = np.r_[rng.uniform(2, 3, P), rng.uniform(0, 1, N)]
    assert D.interval(D.bootstrap_aurocs(separated, poisoned, "fct", n=50)) == pytest.approx([1.0, 1.0])
    # low = poisoned for CD
    assert D.interval(D.bootstrap_aurocs(-separated, poisoned, "cd", n=50)) == pytest.approx([1.0, 1.0])
