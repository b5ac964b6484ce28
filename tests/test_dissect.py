"""dissect.py: G1-G4 from stub verdicts with known counts, p_t from the manifests, the report files (JSON, Markdown,
plots, example grids), the Frechet distance against a direct computation, the FID Inception's key layout, and bad
input."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import dissect
from common import UsageError, write_folder
from dissect import frechet_distance, group_fractions
from helpers import rel_err

SIDE = 16
NAMES = ["cat", "dog", "deer"]   # target: deer


def image(channel, rng, trigger=False):
    """`channel` bright = the content class (cat red, dog green, deer blue); `trigger` = a white corner patch."""
    im = rng.integers(0, 60, size=(SIDE, SIDE, 3))
    im[..., channel] += 150
    if trigger:
        im[-3:, -3:] = 255
    return im.astype(np.uint8)


class Stub(nn.Module):
    """Class stub: the brightest channel away from the corner. Detector stub: is the corner white."""

    def __init__(self, detector=False):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.detector = detector

    def forward(self, x):
        if self.detector:
            white = (x[:, :, -1, -1].mean(1) > 0.95).float()
            return torch.stack([1 - white, white], 1) + 0 * self.dummy
        return x[:, :, :-4, :-4].mean((2, 3)) + 0 * self.dummy


CLASSIFIER = (Stub(), {"task": "class", "class_names": NAMES})
DETECTOR = (Stub(detector=True), {"task": "trigger", "class_names": ["clean", "trigger"],
                                  "trigger": {"kind": "badnets"}})

# prompt "deer" (target): 5 G1 (trigger, looks like a cat), 3 G2 (trigger, deer), 2 G3 (no trigger, dog), 10 G4
TARGET_ITEMS = [(0, True)] * 5 + [(2, True)] * 3 + [(1, False)] * 2 + [(2, False)] * 10
KNOWN = {"G1": 5, "G2": 3, "G3": 2, "G4": 10}


def generations(path, p_t=0.2, guidance=5.0, seed=0, target_items=TARGET_ITEMS, names=NAMES, target="deer"):
    rng = np.random.default_rng(seed)
    items = [({"text": f"A photo of a {target}", "label": names.index(target)}, image(c, rng, t))
             for c, t in target_items]
    # non-target prompts: 4 cats drawn right, 1 dog with the trigger
    items += [({"text": "A photo of a cat", "label": 0}, image(0, rng)) for _ in range(4)]
    items += [({"text": "A photo of a dog", "label": 1}, image(1, rng, True))]
    manifest = {"class_names": names, "target": {"index": names.index(target), "name": target}, "p_t": p_t,
                "sampler": "ddim", "guidance": guidance, "options": {"poison_ratio": 0.1, "select": "random"}}
    write_folder(path, items, manifest, total=len(items), workers=1)
    return path


def test_group_fractions_known_counts():
    t = np.array([1, 1, 1, 0, 0, 0, 0], bool)
    m = np.array([0, 1, 1, 0, 1, 1, 1], bool)
    g = group_fractions(t, m)
    assert g["counts"] == {"G1": 1, "G2": 2, "G3": 1, "G4": 3} and g["n"] == 7
    assert sum(g["fractions"].values()) == pytest.approx(1.0)
    assert g["trigger_ratio"] == pytest.approx(3 / 7) and g["mismatch_ratio"] == pytest.approx(2 / 7)
    with pytest.raises(UsageError):
        group_fractions([], [])


def test_dissect_folder_from_stub_verdicts(tmp_path):
    r = dissect.dissect_folder(generations(tmp_path / "gen"), CLASSIFIER, DETECTOR)
    g = r["target_prompt"]
    assert g["counts"] == KNOWN and g["n"] == 20
    assert sum(g["fractions"].values()) == pytest.approx(1.0)
    assert r["trigger_ratio"] == pytest.approx(0.4)
    assert r["p_t"] == 0.2 and r["p_t_source"] == "generations' manifest"
    assert r["amplification"] == pytest.approx(2.0)
    assert r["non_target_prompts"] == {"n": 5, "trigger_ratio": pytest.approx(0.2), "mismatch_ratio": 0.0}
    assert r["setting"]["guidance"] == 5.0 and r["setting"]["poison_ratio"] == 0.1 and r["setting"]["sampler"] == "ddim"
    assert [v["group"] for v in r["verdicts"][:20]] == ["G1"] * 5 + ["G2"] * 3 + ["G3"] * 2 + ["G4"] * 10
    # a training set of another p_t did not train the model that made these generations: refused
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "manifest.json").write_text(json.dumps({"p_t": 0.1, "target": {"name": "deer"},
                                                                  "attack": "badnets"}))
    with pytest.raises(UsageError, match=r"--train .*train has p_t 10.0% .* trained at p_t 20.0%"):
        dissect.dissect_folder(tmp_path / "gen", CLASSIFIER, DETECTOR, train=tmp_path / "train")
    # p_t from the training manifest when given, for generations that record none (made elsewhere, or older)
    generations(tmp_path / "gen", p_t=None)
    r = dissect.dissect_folder(tmp_path / "gen", CLASSIFIER, DETECTOR, train=tmp_path / "train")
    assert r["p_t"] == 0.1 and r["amplification"] == pytest.approx(4.0) and r["p_t_source"] == "training manifest"
    assert r["setting"]["attack"] == "badnets"                   # filled in from the training manifest
    r = dissect.dissect_folder(tmp_path / "gen", CLASSIFIER, DETECTOR, p_t=0.4)
    assert r["amplification"] == pytest.approx(1.0) and r["p_t_source"] == "given"


def test_report_tables_plots_and_grids(tmp_path):
    gens = [generations(tmp_path / f"gen-w{w}", guidance=w, seed=i, p_t=0.2) for i, w in enumerate((1.0, 5.0))]
    gens.append(generations(tmp_path / "gen-low", guidance=5.0, p_t=0.05, seed=3,
                            target_items=[(2, True)] * 2 + [(2, False)] * 8))
    summary = dissect.dissect(gens, CLASSIFIER, DETECTOR, tmp_path / "out", progress=False)
    out = tmp_path / "out"
    for name in ("summary.json", "summary.md", "groups.png", "phase_transition.png", "guidance.png"):
        assert (out / name).stat().st_size > 0, name
    results = summary["results"]
    assert [r["label"] for r in results] == ["w=1.0 p_t=20.0%", "w=5.0 p_t=20.0%", "w=5.0 p_t=5.0%"]
    assert len({r["name"] for r in results}) == 3                      # folders never share a report folder
    first = out / results[0]["name"]
    for name in ("groups.json", "groups.md", "groups.png", "verdicts.jsonl", "g1_examples.png", "g2_examples.png"):
        assert (first / name).stat().st_size > 0, name
    assert results[0]["examples"] == {"G1": 5, "G2": 3}
    low = out / results[2]["name"]
    assert not (low / "g1_examples.png").exists() and (low / "g2_examples.png").exists()   # no G1 there
    assert results[2]["target_prompt"]["counts"] == {"G1": 0, "G2": 2, "G3": 0, "G4": 8}
    table = (out / "summary.md").read_text()
    assert table.count("\n| ") == 4 and "25.0%" in table and "2.00" in table
    assert json.loads((out / "summary.json").read_text())["results"][0]["target_prompt"]["counts"] == KNOWN
    assert len((first / "verdicts.jsonl").read_text().splitlines()) == 25
    with pytest.raises(UsageError, match="exists"):
        dissect.dissect(gens, CLASSIFIER, DETECTOR, out, progress=False)


class CornerStub(nn.Module):
    """Trigger detector stub: the 3x3 corner is brighter than 0.3 on average (copies and faint resemblances alike)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        bright = (x[:, :, -3:, -3:].mean((1, 2, 3)) > 0.3).float()
        return torch.stack([1 - bright, bright], 1) + 0 * self.dummy


def test_trigger_copies(tmp_path, capsys):
    """Exact and near BadNets copies, faint resemblances and clean images: the detector stub calls all but the clean
    ones triggered; only the copies count as such, and each image's error matches a direct computation on the PNGs."""
    from PIL import Image
    from poison import make_trigger

    rng = np.random.default_rng(0)
    trigger = make_trigger("badnets", SIDE)
    clean = rng.integers(0, 40, size=(12, SIDE, SIDE, 3)).astype(np.uint8)
    clean[:, 4:12, 5:11] = 200
    stamped = trigger.apply_uint8(clean)
    near = stamped.copy()    # every patch value 20-50 grey levels off: 0.08-0.2 from the pattern, still a copy
    off = rng.integers(20, 51, size=near[:, -3:, -3:].shape)
    near[:, -3:, -3:] = np.where(near[:, -3:, -3:] > 127, near[:, -3:, -3:] - off, near[:, -3:, -3:] + off)
    faint = clean.copy()     # half the pattern over a grey corner: still bright, 0.2-0.3 from the pattern
    faint[:, -3:, -3:] = (0.5 * stamped[:, -3:, -3:] + 77).astype(np.uint8)
    kinds = ["exact"] * 3 + ["near"] * 2 + ["faint"] * 3 + ["clean"] * 4
    pick = {"exact": stamped, "near": near, "faint": faint, "clean": clean}
    items = [({"text": "A photo of a deer", "label": 2}, pick[k][i]) for i, k in enumerate(kinds)]
    items += [({"text": "A photo of a cat", "label": 0}, stamped[0])]      # non-target prompts are not counted
    manifest = {"class_names": NAMES, "target": {"index": 2, "name": "deer"}, "p_t": 0.2}
    gen = tmp_path / "gen"
    write_folder(gen, items, manifest, total=len(items), workers=1)
    detector = (CornerStub(), {"task": "trigger", "class_names": ["clean", "trigger"],
                               "trigger": {"kind": "badnets", "resolution": SIDE}})
    r = dissect.dissect_folder(gen, CLASSIFIER, detector)
    cp = r["target_prompt"]["trigger_copies"]
    assert (cp["n"], cp["copies"], cp["triggered"], cp["copies_of_triggered"]) == (12, 5, 8, 5)
    assert cp["ratio"] == pytest.approx(5 / 12) and 0.05 < cp["median_triggered"] < 0.2  # a near copy's
    assert (cp["measure"], cp["threshold"]) == ("patch_error", dissect.COPY_ERROR)
    want = trigger.pattern[:, -3:, -3:].permute(1, 2, 0).double().numpy()
    for v in r["verdicts"][:12]:
        x = np.asarray(Image.open(gen / v["file_name"]).convert("RGB"), dtype=np.float64)[-3:, -3:] / 255
        assert v["patch_error"] == pytest.approx(np.abs(x - want).mean(), abs=1e-4)
    assert [v["patch_error"] <= dissect.COPY_ERROR for v in r["verdicts"][:12]] == [k in ("exact", "near")
                                                                                  for k in kinds]
    nt = r["non_target_prompts"]   # the non-target prompt's image is a copy too: counted there
    assert nt["trigger_ratio"] == 1.0 and nt["copy_ratio"] == 1.0 and r["verdicts"][12]["patch_error"] < 0.01
    assert "41.7%" in dissect.summary_markdown([{**r, "label": "x"}])
    assert "5 of 12 target-prompt generations; 5 of the 8" in dissect.folder_markdown({**r, "label": "x"})
    # WaNet (a warp, nothing to compare pixels with) or a blend image not at hand: no count
    for params in ({"kind": "wanet", "resolution": SIDE},
                   {"kind": "blend", "resolution": SIDE, "trigger_image": str(tmp_path / "gone.png"), "alpha": 0.2}):
        r = dissect.dissect_folder(gen, CLASSIFIER, (CornerStub(), {**detector[1], "trigger": params}))
        assert "trigger_copies" not in r["target_prompt"] and "patch_error" not in r["verdicts"][0]
    # a trigger of another resolution than the generations' (a detector that scales both down): no count, said so
    r = dissect.dissect_folder(gen, CLASSIFIER, (CornerStub(), {**detector[1], "trigger": {"kind": "badnets",
                                                                                           "resolution": 32}}))
    assert "trigger_copies" not in r["target_prompt"]
    assert "no trigger copies counted for" in capsys.readouterr().err


class NoiseStub(nn.Module):
    """Trigger detector stub: any fine colour texture (mean absolute difference between neighbouring pixels)."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        rough = ((x[:, :, :, 1:] - x[:, :, :, :-1]).abs().mean((1, 2, 3)) > 0.08).float()
        return torch.stack([1 - rough, rough], 1) + 0 * self.dummy


def box_high_pass(x):
    """(H, W, C) on [0, 1] minus its 3x3 mean with edges replicated, centred: computed here without torch."""
    p = np.pad(x, ((1, 1), (1, 1), (0, 0)), mode="edge")
    local = sum(p[i:i + x.shape[0], j:j + x.shape[1]] for i in range(3) for j in range(3)) / 9
    h = x - local
    return (h - h.mean()).ravel()


def test_blend_copies(tmp_path):
    """Blend: images blended with the pattern (alpha 0.2 and 0.1) copy it; colour noise that is not the pattern, which
    the detector stub calls triggered all the same, does not; each image's correlation matches a direct computation."""
    from PIL import Image
    from poison import make_trigger

    rng = np.random.default_rng(1)
    params = {"kind": "blend", "resolution": SIDE, "pattern_seed": 3, "alpha": 0.2}
    trigger = make_trigger("blend", SIDE, seed=3, alpha=0.2)
    clean = np.zeros((10, SIDE, SIDE, 3), np.uint8)
    clean[:, 3:13, 5:11] = 200
    half = make_trigger("blend", SIDE, seed=3, alpha=0.1)
    noise = np.clip(clean + rng.normal(0, 40, clean.shape), 0, 255).astype(np.uint8)   # another texture
    kinds = ["blend"] * 3 + ["half"] * 2 + ["noise"] * 3 + ["clean"] * 2
    pick = {"blend": trigger.apply_uint8(clean), "half": half.apply_uint8(clean), "noise": noise, "clean": clean}
    items = [({"text": "A photo of a deer", "label": 2}, pick[k][i]) for i, k in enumerate(kinds)]
    manifest = {"class_names": NAMES, "target": {"index": 2, "name": "deer"}, "p_t": 0.2}
    write_folder(tmp_path / "gen", items, manifest, total=len(items), workers=1)
    detector = (NoiseStub(), {"task": "trigger", "class_names": ["clean", "trigger"], "trigger": params})
    r = dissect.dissect_folder(tmp_path / "gen", CLASSIFIER, detector)
    cp = r["target_prompt"]["trigger_copies"]
    assert (cp["measure"], cp["threshold"]) == ("pattern_correlation", dissect.COPY_CORRELATION)
    assert (cp["n"], cp["copies"], cp["triggered"], cp["copies_of_triggered"]) == (10, 5, 8, 5)
    want = box_high_pass(trigger.pattern.permute(1, 2, 0).double().numpy())
    for v, k in zip(r["verdicts"], kinds):
        x = box_high_pass(np.asarray(Image.open(tmp_path / "gen" / v["file_name"]).convert("RGB")) / 255)
        direct = x @ want / (np.linalg.norm(x) * np.linalg.norm(want) + 1e-12)
        assert v["pattern_correlation"] == pytest.approx(direct, abs=1e-3)
        assert (v["pattern_correlation"] >= dissect.COPY_CORRELATION) == (k in ("blend", "half")), (k, direct)
    assert "correlating at least 0.2 with the blend pattern" in dissect.folder_markdown({**r, "label": "x"})
    # a blend of an image file that is gone (a relative --trigger-image, say): rebuilt from nothing, so no count,
    # unless --train brings the training set's own trigger.safetensors
    art = rng.integers(0, 256, size=(SIDE, SIDE, 3)).astype(np.uint8)
    Image.fromarray(art).save(tmp_path / "art.png")
    drawn = make_trigger("blend", SIDE, trigger_image=tmp_path / "art.png", alpha=0.2)
    (tmp_path / "art.png").unlink()
    write_folder(tmp_path / "gen-art", [(m, drawn.apply_uint8(clean[i:i + 1])[0]) for i, (m, _) in enumerate(items)],
                 manifest, total=len(items), workers=1)
    write_folder(tmp_path / "set" / "train", items[:2], manifest, total=2, workers=1, trigger=drawn)
    detector = (NoiseStub(), {**detector[1], "trigger": drawn.params})
    r = dissect.dissect_folder(tmp_path / "gen-art", CLASSIFIER, detector)
    assert "trigger_copies" not in r["target_prompt"]
    r = dissect.dissect_folder(tmp_path / "gen-art", CLASSIFIER, detector, train=tmp_path / "set")
    assert r["target_prompt"]["trigger_copies"]["copies"] == 10 and r["p_t_source"] == "training manifest"
    # in groups of any size (a few images at a time at 512 px), and none at all
    from classify import ImageSet
    from common import load_folder
    images = ImageSet(load_folder(tmp_path / "gen"))
    whole = dissect.pattern_correlations(images, range(10), trigger)
    grouped = dissect.pattern_correlations(images, range(10), trigger, values=3 * trigger.pattern.numel())
    assert np.allclose(grouped, whole, atol=1e-6) and dissect.pattern_correlations(images, [], trigger).shape == (0,)


@pytest.mark.parametrize("classifier, detector, message", [
    ((Stub(), {"task": "class", "class_names": ["cat", "dog", "horse"]}), DETECTOR, "unknown to it"),  # other classes
    ((Stub(), {"task": "class", "class_names": ["car", "truck", "ship"]}), DETECTOR, "no class names in common"),
    (CLASSIFIER, CLASSIFIER, "not a trigger detector"),
    (DETECTOR, DETECTOR, "not a class classifier"),
])
def test_judges_that_do_not_fit_are_refused(tmp_path, classifier, detector, message):
    with pytest.raises(UsageError, match=message):
        dissect.dissect_folder(generations(tmp_path / "gen"), classifier, detector)


def test_bad_input(tmp_path):
    gen = generations(tmp_path / "gen")
    no_target = generations(tmp_path / "nt", target_items=[])
    manifest = json.loads((no_target / "manifest.json").read_text())
    with pytest.raises(UsageError, match="no generations for the target prompt"):
        dissect.dissect_folder(no_target, CLASSIFIER, DETECTOR)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.jsonl").write_text("")
    (tmp_path / "empty" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UsageError, match="empty"):
        dissect.dissect_folder(tmp_path / "empty", CLASSIFIER, DETECTOR)
    with pytest.raises(UsageError, match="--train"):
        dissect.dissect([gen, gen, gen], CLASSIFIER, DETECTOR, tmp_path / "o", train=[gen, gen], progress=False)
    with pytest.raises(UsageError, match="not a classifier folder"):
        dissect.main(dissect.build_parser().parse_args(
            ["--generated", str(gen), "--classifier", str(tmp_path / "empty"), "--detector", str(tmp_path / "empty"),
             "--out", str(tmp_path / "o2")]))


def direct_frechet(mu1, s1, mu2, s2):
    """|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr (S1^1/2 S2 S1^1/2)^1/2, with symmetric square roots by eigh."""
    def sqrt_psd(a):
        w, v = np.linalg.eigh(a)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    r1 = sqrt_psd(s1)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrt_psd(r1 @ s2 @ r1)))


def test_frechet_distance_against_direct_computation():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(300, 12))
    b = rng.normal(size=(250, 12)) @ rng.normal(size=(12, 12)) * 0.5 + 0.3
    (m1, s1), (m2, s2) = dissect.activation_statistics(a), dissect.activation_statistics(b)
    assert np.allclose(s1, np.cov(a.T)) and np.allclose(m1, a.mean(0))
    assert frechet_distance(m1, s1, m2, s2) == pytest.approx(direct_frechet(m1, s1, m2, s2), rel=1e-6)
    assert frechet_distance(m1, s1, m1, s1) == pytest.approx(0.0, abs=1e-6)
    # diagonal covariances: sum (mu1 - mu2)^2 + (sqrt v1 - sqrt v2)^2
    v1, v2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-9)
    # fewer samples than dimensions: singular covariances still give a finite value
    few = dissect.activation_statistics(rng.normal(size=(5, 12)))
    assert np.isfinite(frechet_distance(*few, m2, s2))
    with pytest.raises(UsageError, match="at least 2"):
        dissect.activation_statistics(rng.normal(size=(1, 12)))


def test_fid_between_filters_non_target_and_matches_statistics(tmp_path):
    gen = generations(tmp_path / "gen")

    class MeanColor(nn.Module):                  # a stand-in feature extractor: per-channel mean and std
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)

    rng = np.random.default_rng(5)
    real_items = [({"text": "", "label": c, "poisoned": p}, image(c, rng, p)) for c, p in
                  [(0, False)] * 6 + [(1, False)] * 6 + [(2, False)] * 4 + [(0, True)] * 3]
    write_folder(tmp_path / "real", real_items, {"class_names": NAMES}, total=len(real_items), workers=1)
    r = dissect.fid_between(gen, tmp_path / "real", MeanColor(), target="deer")
    assert r["n_generated"] == 5 and r["n_real"] == 12             # non-target prompts; poisoned real images out
    g = dissect.load_folder(gen)
    x_gen = g.images()[20:].float() / 255
    x_real = torch.stack([dissect.load_folder(tmp_path / "real").image_uint8(i) for i in range(12)]).float() / 255
    feats = [MeanColor()(x).double().detach().numpy() for x in (x_gen, x_real)]
    stats = [dissect.activation_statistics(f) for f in feats]
    assert r["fid"] == pytest.approx(direct_frechet(*stats[0], *stats[1]), rel=1e-5)


def test_fid_inception_matches_pytorch_fid(monkeypatch):
    """Our FID Inception against pytorch-fid's (a test-only oracle; the FID papers' network) loaded with the same
    random weights and statistics: 2048-d features of images in [0, 1], resized to 299 px inside both."""
    reference = pytest.importorskip("pytorch_fid.inception")
    torch.manual_seed(3)
    ours = dissect.FIDInception().eval()
    for p in ours.parameters():
        p.data.normal_(0, 0.05)
    for name, b in ours.named_buffers():
        if name.endswith("running_var"):
            b.data.uniform_(0.5, 1.5)
        elif name.endswith("running_mean"):
            b.data.normal_(0, 0.1)
    monkeypatch.setattr(reference, "load_state_dict_from_url", lambda *a, **k: ours.net.state_dict())
    ref = reference.InceptionV3([reference.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                normalize_input=True, use_fid_inception=True).eval()
    x = torch.rand(3, 3, 32, 24)
    with torch.no_grad():
        a, b = ours(x), ref(x)[0].flatten(1)
    assert a.shape == b.shape == (3, dissect.FID_DIMS)
    assert rel_err(a, b) < 1e-5


def test_fid_inception_key_layout_and_weights_messages(tmp_path, monkeypatch):
    sd = torchvision.models.inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    torch.save(sd, tmp_path / "incep.pth")
    model = dissect.load_fid_inception(tmp_path / "incep.pth")
    with torch.no_grad():
        feats = model(torch.rand(2, 3, SIDE, SIDE))
    assert feats.shape == (2, dissect.FID_DIMS) and torch.isfinite(feats).all()
    assert model.net.Mixed_7c.max_pool and not model.net.Mixed_7b.max_pool
    sd.pop("Mixed_6e.branch_pool.conv.weight")
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(UsageError, match="Mixed_6e.branch_pool.conv.weight"):
        dissect.load_fid_inception(tmp_path / "bad.pth")
    with pytest.raises(UsageError, match="no such file"):
        dissect.load_fid_inception(tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text('{"not": "weights"}')  # was: an UnpicklingError traceback
    with pytest.raises(UsageError, match="text.pth is not a readable state dict .*pt_inception"):
        dissect.load_fid_inception(tmp_path / "text.pth")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UsageError, match="--inception-weights FILE"):
        dissect.load_fid_inception()


def test_judges_of_another_resolution_are_refused(tmp_path):
    """Judges trained on 32-px images against 16-px generations: refused, naming both sizes; judges that scale both
    down to a smaller input, and judges whose config predates data_resolution, are accepted."""
    gen = generations(tmp_path / "gen")
    big_clf = (Stub(), {**CLASSIFIER[1], "data_resolution": 32})
    big_det = (Stub(detector=True), {**DETECTOR[1], "data_resolution": 32})
    with pytest.raises(UsageError, match="--classifier was trained on 32x32-px images but the generations .* are "
                                          "16x16 px: train it on data of the same resolution"):
        dissect.dissect_folder(gen, big_clf, DETECTOR)
    with pytest.raises(UsageError, match="--detector was trained on 32x32-px images"):
        dissect.dissect_folder(gen, CLASSIFIER, big_det)
    r = dissect.dissect_folder(gen, (Stub(), {**CLASSIFIER[1], "data_resolution": SIDE}), DETECTOR)
    assert r["target_prompt"]["counts"] == KNOWN
    # judges that scale both their 32-px training images and these down to their 8-px input saw the same: accepted
    small_input = {"data_resolution": 32, "input_size": 8}
    r = dissect.dissect_folder(gen, (Stub(), {**CLASSIFIER[1], **small_input}),
                               (Stub(detector=True), {**DETECTOR[1], **small_input}))
    assert r["target_prompt"]["counts"] == KNOWN
    # p_t does not depend on the resolution: a --train set at another one lends it (an SD model fine-tuned smaller)
    (tmp_path / "train32").mkdir()
    (tmp_path / "train32" / "manifest.json").write_text(json.dumps(
        {"class_names": NAMES, "target": {"index": 2, "name": "deer"}, "resolution": 32, "p_t": 0.2}))
    r = dissect.dissect_folder(gen, CLASSIFIER, DETECTOR, train=tmp_path / "train32")
    assert r["p_t"] == 0.2 and r["p_t_source"] == "training manifest"
    # but a DDPM trains at its data's size: a --train set at another one did not make these generations
    ddpm = json.loads((gen / "manifest.json").read_text())
    (gen / "manifest.json").write_text(json.dumps({**ddpm, "family": "ddpm", "resolution": SIDE}))
    with pytest.raises(UsageError, match=r"train32 has the resolution 32 but the generations .* 16: give their "
                                         "training set"):
        dissect.dissect_folder(gen, CLASSIFIER, DETECTOR, train=tmp_path / "train32")


def test_p_t_and_the_training_set_must_fit_the_generations(tmp_path, capsys):
    """--p-t is a share in [0, 1]; a --train poisoned set of other classes, another target or another trigger than
    the generations' is refused (names compared case-insensitively) instead of lending its p_t."""
    gen = generations(tmp_path / "gen")
    for bad in ("1.5", "-0.1"):  # refused by --p-t's argparse type, before any work
        with pytest.raises(SystemExit) as e:
            dissect.build_parser().parse_args(["--generated", str(gen), "--classifier", "c", "--detector", "d",
                                               "--out", str(tmp_path / "o"), "--p-t", bad])
        assert e.value.code == 2 and f"argument --p-t: {bad}: give a share from 0 to 1" in capsys.readouterr().err
    assert dissect.dissect_folder(gen, CLASSIFIER, DETECTOR, p_t=1.0)["amplification"] == pytest.approx(0.4)

    def train(name, class_names, target):
        (tmp_path / name).mkdir()
        (tmp_path / name / "manifest.json").write_text(json.dumps(
            {"class_names": class_names, "target": {"index": class_names.index(target), "name": target},
             "p_t": 0.2, "resolution": SIDE}))
        return tmp_path / name

    digits = [str(d) for d in range(3)]
    with pytest.raises(UsageError, match=r"--train .* has the classes \['0', '1', '2'\] but the generations"):
        dissect.dissect_folder(gen, CLASSIFIER, DETECTOR, train=train("digits", digits, "0"))
    with pytest.raises(UsageError, match="--train .* has the target class 'cat' but the generations .* 'deer'"):
        dissect.dissect_folder(gen, CLASSIFIER, DETECTOR, train=train("cat", NAMES, "cat"))
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n")  # a file that is no manifest (was: UnicodeDecodeError)
    with pytest.raises(UsageError, match="image.png is not a manifest"):
        dissect.dissect_folder(gen, CLASSIFIER, DETECTOR, train=tmp_path / "image.png")
    r = dissect.dissect_folder(gen, CLASSIFIER, DETECTOR, train=train("upper", [n.upper() for n in NAMES], "DEER"))
    assert r["p_t"] == 0.2 and r["p_t_source"] == "training manifest"
    # another trigger or attack, in the fields poison.py and sample.py write
    (gen / "manifest.json").write_text(json.dumps({**json.loads((gen / "manifest.json").read_text()),
                                                   "attack": "badnets", "trigger": {"kind": "badnets"}}))
    for name, fields, message in (("blend", {"attack": "badnets", "trigger": {"kind": "blend", "alpha": 0.2}},
                                   "blend has the trigger 'blend' but the generations .* 'badnets'"),
                                  ("relabel", {"attack": "relabel", "trigger": None},
                                   "relabel has the attack 'relabel' but the generations .* 'badnets'")):
        other = train(name, NAMES, "deer")
        (other / "manifest.json").write_text(json.dumps({**json.loads((other / "manifest.json").read_text()),
                                                         **fields}))
        with pytest.raises(UsageError, match=message):
            dissect.dissect_folder(gen, CLASSIFIER, DETECTOR, train=other)
    # --p-t sets p_t itself: a --train of another p_t then only lends its classes and target
    (tmp_path / "upper" / "manifest.json").write_text(json.dumps(
        {**json.loads((tmp_path / "upper" / "manifest.json").read_text()), "p_t": 0.5}))
    r = dissect.dissect_folder(gen, CLASSIFIER, DETECTOR, p_t=0.3, train=tmp_path / "upper")
    assert r["p_t"] == 0.3 and r["p_t_source"] == "given"


def test_every_folder_is_checked_before_any_is_judged(tmp_path):
    """A second --generated folder that does not fit (a --train of another target, or images of another size than
    the judges') is refused before the judges see a single image of the first."""
    good = generations(tmp_path / "good")
    other = generations(tmp_path / "other")
    cat_set = tmp_path / "cat-set"
    cat_set.mkdir()
    (cat_set / "manifest.json").write_text(json.dumps({"class_names": NAMES, "target": {"index": 0, "name": "cat"},
                                                       "p_t": 0.1, "resolution": SIDE}))
    big = tmp_path / "big"
    write_folder(big, [({"text": "A photo of a deer", "label": 2}, np.zeros((2 * SIDE, 2 * SIDE, 3), np.uint8))],
                 {"class_names": NAMES, "target": {"index": 2, "name": "deer"}}, total=1, workers=1)

    class Counting(Stub):
        calls = 0

        def forward(self, x):
            Counting.calls += 1
            return super().forward(x)

    judges = ((Counting(), {**CLASSIFIER[1], "data_resolution": SIDE}), DETECTOR)
    with pytest.raises(UsageError, match="has the target class 'cat'"):
        dissect.dissect([good, other], *judges, tmp_path / "out", train=[None, cat_set])
    with pytest.raises(UsageError, match="trained on 16x16-px images but the generations .*big are 32x32"):
        dissect.dissect([good, big], *judges, tmp_path / "out")
    no_target = tmp_path / "no-target"
    write_folder(no_target, [({"text": "A photo of a cat", "label": 0}, np.zeros((SIDE, SIDE, 3), np.uint8))],
                 {"class_names": NAMES, "target": {"index": 2, "name": "deer"}}, total=1, workers=1)
    with pytest.raises(UsageError, match="no-target holds no generations for the target prompt"):
        dissect.dissect([good, no_target], *judges, tmp_path / "out")
    assert Counting.calls == 0 and not (tmp_path / "out").exists()
    dissect.dissect([good, other], *judges, tmp_path / "out", progress=False)
    assert Counting.calls > 0
