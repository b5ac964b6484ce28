"""replicate.py: planted copies are found and ranked first; proxies are labelled; SSCD through TorchScript; the ids
file round-trips into poison.py; search equals brute force; the cache; Table A5 equals what planted generations imply
under exact hand-set judges; bad input."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import classify as C
import common
import poison as P
import replicate as R
from helpers import rel_err
from common import UsageError

ROOT = Path(__file__).resolve().parent.parent
EXACT, NEAR = 10, 20                  # training rows copied by generations
DUP_A, DUP_B = (5, 100), (7, 200)      # planted duplicate pairs inside the training set: row a := copy of row b
N_TRAIN = 400                          # the first 400 digits training images (ids = their source indices)


def write_dataset(path, images, labels, extra=None, class_names=P.DIGIT_NAMES):
    """A dataset folder of (N, H, W, 3) uint8 images."""
    items = [({"text": P.caption(class_names[int(l)]), "label": int(l), **(extra[i] if extra else {})}, im)
             for i, (im, l) in enumerate(zip(images, labels))]
    with P.atomic_output(path) as tmp:
        P.write_folder(tmp, items, dict(stage="test", class_names=list(class_names)), workers=1)
    return path


def near_copy(image, seed, amplitude=4):
    noise = np.random.default_rng(seed).integers(-amplitude, amplitude + 1, image.shape)
    return np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Digits (16 px) with two planted duplicate pairs; generations copying two of them among noise; a second run."""
    root = tmp_path_factory.mktemp("replicate")
    src = P.load_source("digits", "train", resolution=16)
    images, labels = src.array[:N_TRAIN].copy(), src.labels[:N_TRAIN].copy()
    images[DUP_A[0]], labels[DUP_A[0]] = images[DUP_A[1]], labels[DUP_A[1]]
    images[DUP_B[0]], labels[DUP_B[0]] = near_copy(images[DUP_B[1]], 1), labels[DUP_B[1]]
    extra = [dict(source_index=i, poisoned=False) for i in range(len(images))]
    train = write_dataset(root / "train", images, labels, extra)
    noise = np.random.default_rng(2).integers(0, 256, (30, 16, 16, 3)).astype(np.uint8)
    gen_images = np.concatenate([images[EXACT][None], near_copy(images[NEAR], 3)[None], noise])
    gen_labels = np.concatenate([[labels[EXACT], labels[NEAR]], np.arange(30) % 10])
    gen = write_dataset(root / "gen", gen_images, gen_labels)
    gen_dup = write_dataset(root / "gen_dup", np.concatenate([images[DUP_B[1]][None], noise[:10]]),
                            np.concatenate([[labels[DUP_B[1]]], np.arange(10)]))
    return dict(root=root, train=train, gen=gen, gen_dup=gen_dup, n_train=len(images))


@pytest.fixture(scope="module")
def by_generations(data):
    out = data["root"] / "rep-gen"
    summary = R.replicate(out, data["train"], gen=data["gen"], duplicates_gen=data["gen_dup"], features="pixels",
                          device="cpu", quiet=True, progress=False)  # the default ranking, given generations
    return out, summary, json.loads((out / "replication.json").read_text())


def test_planted_copies_found_and_ranked_first(by_generations):
    assert by_generations[2]["duplicates_file"]["rank_by"] == "generations"  # the paper's Sec. 6, by default
    out, summary, result = by_generations
    run = result["runs"]["random"]
    assert run["top1_id"][:2] == [EXACT, NEAR]
    assert run["top1_similarity"][0] > 0.9999 and run["top1_similarity"][1] > 0.99
    assert max(run["top1_similarity"][2:]) < 0.5, "noise images should match nothing"
    thr = result["features"]["threshold"]
    assert run["stats"]["fraction_above"] == pytest.approx(2 / 32)
    assert 0.5 < thr < run["top1_similarity"][1]
    # ids file: the exact copy first, then the near copy, and nothing else above the threshold
    assert P.read_ids(out / "duplicates.txt") == [EXACT, NEAR]
    assert result["duplicates_file"]["ranked"][0]["count"] == 1
    # statistics and labels
    bg = result["train"]["background"]
    assert bg["n"] == N_TRAIN and bg["p75"] <= bg["p90"] <= bg["p95"]
    assert bg["fraction_above"] == pytest.approx(0.05, abs=0.01)  # the recalibrated threshold is its 0.95 quantile
    assert result["features"]["kind"] == "pixels" and result["features"]["proxy"]
    assert "recalibrated" in result["features"]["threshold_source"]
    assert "proxy" in (out / "replication.md").read_text() and "pixels" in (out / "replication.md").read_text()
    # the second run and the figures
    dup = result["runs"]["duplicates"]
    assert dup["top1_id"][0] == DUP_B[1] and dup["top1_similarity"][0] > 0.9999
    assert dup["match_nn_id"][0] == DUP_B[0] and dup["match_nn_similarity"][0] > 0.99
    assert run["top1_same_label_fraction"] >= 2 / 32
    for name in ("fig5_scatter.png", "triplets.png", "replication.md"):
        assert (out / name).stat().st_size > 0
    assert result["table_a5"] is None and not (out / "table_a5.json").exists()  # no --classifier: no Table A5


def test_train_duplicates_ranked_first(data):
    out = data["root"] / "rep-train"
    R.replicate(out, data["train"], features="pixels", device="cpu", quiet=True, progress=False)
    result = json.loads((out / "replication.json").read_text())
    ranked = result["duplicates_file"]["ranked"]
    assert {b["id"] for b in ranked[:2]} == set(DUP_A) and ranked[0]["score"] > 0.9999
    assert {b["id"] for b in ranked[2:4]} == set(DUP_B) and ranked[3]["score"] > 0.99
    assert ranked[0]["nearest"] in DUP_A and ranked[2]["nearest"] in DUP_B
    ids = P.read_ids(out / "duplicates.txt")
    assert ids == [b["id"] for b in ranked] and len(ids) == pytest.approx(0.05 * data["n_train"], abs=3)
    assert not (out / "fig5_scatter.png").exists() and result["runs"] == {}  # no generations: no Fig. 5
    top = data["root"] / "rep-top"
    R.replicate(top, data["train"], features="pixels", top=3, device="cpu", quiet=True, progress=False)
    assert P.read_ids(top / "duplicates.txt") == ids[:3]


def test_ids_file_roundtrips_into_poison(data, tmp_path):
    out = tmp_path / "rep"
    cmd = [sys.executable, str(ROOT / "replicate.py"), "--train", str(data["train"]), "--top", "20",
           "--features", "pixels", "--device", "cpu", "--workers", "0", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])["duplicates"] == 20
    ids = P.read_ids(out / "duplicates.txt")
    assert set(ids[:4]) == set(DUP_A + DUP_B) and len(ids) == len(set(ids)) == 20
    # poison.py's selection (what `poison.py --select duplicates --duplicates FILE` runs): the listed non-target ids
    # first, in order, then a random fill to the ratio
    labels = P.load_source("digits", "train", resolution=16).labels
    target = P.resolve_target(P.DEFAULT_TARGET["digits"], P.DIGIT_NAMES)
    chosen = P.select_poison(labels, target, 0.1, select="duplicates", duplicates=out / "duplicates.txt")
    listed = [i for i in ids if labels[i] != target]
    assert listed and set(listed) <= set(chosen.tolist()) and len(chosen) == P.n_to_poison(0.1, len(labels))
    few = P.select_poison(labels, target, 5 / len(labels), select="duplicates", duplicates=out / "duplicates.txt")
    assert sorted(few.tolist()) == sorted(listed[:5])


def test_ids_file_names_its_training_set(tmp_path, capsys):
    """The ids file records its training set; poison.py refuses it for another split."""
    kw = dict(dataset="digits", resolution=16, ratio=0.05, quiet=True)
    P.poison(tmp_path / "random", **kw)
    out = tmp_path / "rep"
    R.replicate(out, tmp_path / "random" / "train", features="pixels", top=8, device="cpu", quiet=True,
                progress=False)
    fingerprint = P.read_manifest(tmp_path / "random" / "train")["training_set"]
    assert (out / "duplicates.txt").read_text().splitlines()[0] == f"# {P.IDS_TRAINING_SET} {fingerprint}"
    assert json.loads((out / "replication.json").read_text())["duplicates_file"]["training_set"] == fingerprint
    ids = P.read_ids(out / "duplicates.txt", fingerprint)
    P.poison(tmp_path / "dup", select="duplicates", duplicates=out / "duplicates.txt", **kw)
    manifest = P.read_manifest(tmp_path / "dup" / "train")
    listed = [i for i in ids if manifest["target"]["index"] != P.load_source("digits", "train").labels[i]]
    assert manifest["selection"]["from_duplicates_file"] == len(listed) and set(listed) <= set(manifest["poisoned_ids"])
    assert "warning" not in capsys.readouterr().err
    with pytest.raises(UsageError, match="indexes another training set"):
        P.poison(tmp_path / "other", select="duplicates", duplicates=out / "duplicates.txt", split_seed=3, **kw)
    R.write_ids(tmp_path / "plain.txt", [1, 2], ["no training set"])  # a folder without the fingerprint
    assert P.read_ids(tmp_path / "plain.txt", fingerprint) == [1, 2]
    assert "does not record the training set" in capsys.readouterr().err


@pytest.mark.parametrize("k,batch", [(1, 5), (3, 7), (4, 1000)])
def test_batched_search_equals_brute_force(k, batch):
    g = torch.Generator().manual_seed(k)
    queries = F.normalize(torch.randn(37, 16, generator=g), dim=1)
    keys = F.normalize(torch.randn(23, 16, generator=g), dim=1)
    sims, idx = R.topk_cosine(queries, keys, k=k, batch_size=batch)
    for i in range(len(queries)):
        brute = sorted(((float(queries[i] @ keys[j]), j) for j in range(len(keys))), reverse=True)[:k]
        assert idx[i].tolist() == [j for _, j in brute]
        assert sims[i].tolist() == pytest.approx([s for s, _ in brute], abs=1e-6)
    # the train-to-train background: the nearest other row; an exact duplicate is found with similarity 1
    keys[3] = keys[8]
    sims, idx = R.topk_cosine(keys, keys, k=k, exclude_self=True, batch_size=batch)
    for i in range(len(keys)):
        brute = sorted(((float(keys[i] @ keys[j]), j) for j in range(len(keys)) if j != i), reverse=True)[:k]
        assert sims[i].tolist() == pytest.approx([s for s, _ in brute], abs=1e-6)
        same = lambda rows: [8 if j == 3 and i != 8 else j for j in rows]  # rows 3 and 8 tie: either is right
        assert same(idx[i].tolist()) == same([j for _, j in brute])
    assert idx[3, 0] == 8 and idx[8, 0] == 3 and sims[3, 0] == pytest.approx(1.0)


def test_fig5_points_are_the_top_generations_with_the_papers_axes():
    run = {"top1_similarity": [0.2, 0.9, 0.5, 0.95], "match_nn_similarity": [0.1, 0.3, 0.7, 0.8]}
    x, y = R.fig5_points(run, top=2)
    assert x.tolist() == [0.95, 0.9] and y.tolist() == [0.8, 0.3]   # x: A <-> B, y: B <-> C, highest x first
    assert len(R.fig5_points(run)[0]) == 4 and R.FIG5_POINTS == 200


def test_stats_and_rankings():
    s = np.linspace(0, 1, 101)
    stats = R.replication_stats(s, 0.5)
    assert stats["mean"] == pytest.approx(0.5) and stats["p90"] == pytest.approx(0.9)
    assert stats["fraction_above"] == pytest.approx(50 / 101)
    ranked = R.rank_by_generations(np.array([4, 2, 4, 7]), np.array([0.9, 0.95, 0.6, 0.3]), 0.5)
    assert [(b["row"], b["count"]) for b in ranked] == [(2, 1), (4, 2)]
    assert [b["row"] for b in R.rank_by_generations(np.array([4, 2, 7]), np.array([0.9, 0.95, 0.3]), 0.5, top=3)] \
        == [2, 4, 7]
    ranked = R.rank_by_train_duplicates(np.array([0.2, 0.9, 0.9, 0.7]), np.array([3, 2, 1, 0]), 0.5)
    assert [b["row"] for b in ranked] == [1, 2, 3]


def small_folders(root, data):
    """Three training images; two generations: a copy of training row 2 and noise."""
    ds = common.load_folder(data["train"])
    images = torch.stack([ds.image_uint8(i) for i in range(3)]).permute(0, 2, 3, 1).numpy()
    train = write_dataset(root / "train", images, range(3), [dict(source_index=40 + i) for i in range(3)])
    noise = np.random.default_rng(5).integers(0, 256, (1, 16, 16, 3)).astype(np.uint8)
    gen = write_dataset(root / "gen", np.concatenate([images[2][None], noise]), [2, 0])
    return train, gen


def test_proxy_is_labelled(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no cached ImageNet weights: never downloads
    assert R.resnet50_imagenet_state_dict("auto") == (None, "random")
    train, gen = small_folders(tmp_path, data)
    summary = R.replicate(tmp_path / "rep", train, gen=gen, features="proxy", proxy_weights="random",
                          rank_by="generations", device="cpu", quiet=True, progress=False)
    result = json.loads((tmp_path / "rep" / "replication.json").read_text())
    assert summary["proxy"] and result["features"]["proxy"] and result["features"]["kind"] == "proxy"
    assert "PROXY" in result["features"]["label"] and "random weights" in result["features"]["label"]
    assert "recalibrated" in result["features"]["threshold_source"]
    md = (tmp_path / "rep" / "replication.md").read_text()
    assert "PROXY" in md and "random weights" in md
    run = result["runs"]["random"]
    assert run["top1_id"][0] == 42 and run["top1_similarity"][0] > 0.999
    assert "proxy" in (tmp_path / "rep" / "duplicates.txt").read_text().lower()
    # the default (auto) falls back to random weights offline: said on stderr, not only in the outputs' labels
    capsys.readouterr()
    R.replicate(tmp_path / "rep-auto", train, features="proxy", device="cpu", progress=False)
    assert "warning: no ImageNet ResNet-50 weights" in capsys.readouterr().err


def test_copy_detection_preprocess_is_the_references():
    """Somepalli et al.'s PIL transform as the reference, up to one level of 255 (PIL and torch round apart)."""
    import torchvision.transforms as T
    from PIL import Image
    ref = T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    rng = np.random.default_rng(8)
    for shape in ((16, 16), (40, 60), (300, 500)):
        image = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        got, want = R.copy_detection_preprocess(torch.from_numpy(image).permute(2, 0, 1)), ref(Image.fromarray(image))
        assert got.shape == want.shape == (3, 224, 224)
        assert rel_err(got, want) < 1e-2 and (got - want).abs().max() <= 2 / 255 + 1e-6


def test_gem_pooling():
    x = torch.rand(2, 5, 4, 3, dtype=torch.float64) + 0.01
    want = (x ** 3).mean((2, 3)) ** (1 / 3)
    assert rel_err(R.GeM()(x), want) < 1e-12
    assert torch.allclose(R.GeM(p=1)(x), F.adaptive_avg_pool2d(x, 1).flatten(1), rtol=1e-12, atol=0)
    assert (R.GeM()(-x) > 0).all()  # negative activations are clamped to eps, as SSCD's GeM


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_sscd_torchscript_file(data, tmp_path):
    class TinyCopyDetector(nn.Module):  # SSCD's interface: (B, 3, 224, 224) -> (B, 512), L2-normalised
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 16, 5, stride=4)
            self.fc = nn.Linear(16, 512)

        def forward(self, x):
            return F.normalize(self.fc(self.conv(x).relu().mean(dim=(2, 3))), dim=1)

    torch.manual_seed(0)
    path = tmp_path / "tiny.torchscript.pt"
    torch.jit.script(TinyCopyDetector()).save(str(path))
    train, gen = small_folders(tmp_path, data)
    summary = R.replicate(tmp_path / "rep", train, gen=gen, sscd=path, device="cpu", quiet=True, progress=False)
    result = json.loads((tmp_path / "rep" / "replication.json").read_text())
    assert result["features"]["kind"] == "sscd" and not summary["proxy"]
    assert result["features"]["threshold"] == R.SSCD_THRESHOLD and "SSCD" in result["features"]["label"]
    assert result["runs"]["random"]["top1_id"][0] == 42
    assert result["runs"]["random"]["top1_similarity"][0] == pytest.approx(1.0, abs=1e-5)


def test_features_cached(data, tmp_path):
    train, gen = small_folders(tmp_path, data)
    out = tmp_path / "rep"
    kw = dict(gen=gen, features="pixels", triplets=0, device="cpu", quiet=True, progress=False)
    assert R.replicate(out, train, **kw)["cache_hits"] == 0
    cached = sorted(p.name for p in (out / "features").glob("*.safetensors"))
    assert len(cached) == 2 and all("pixels32" in n for n in cached)
    first = (out / "replication.json").read_text()
    assert R.replicate(out, train, force=True, **kw)["cache_hits"] == 2
    assert json.loads((out / "replication.json").read_text())["runs"] == json.loads(first)["runs"]
    img = gen / "images" / "000001.png"  # rewriting an image invalidates that folder's features only
    img.write_bytes(img.read_bytes())
    assert R.replicate(out, train, force=True, **kw)["cache_hits"] == 1
    shared = tmp_path / "shared-cache"
    R.replicate(tmp_path / "rep2", train, cache=shared, **kw)
    assert R.replicate(tmp_path / "rep3", train, cache=shared, **kw)["cache_hits"] == 2


def test_cli_refusal_is_one_line(data, tmp_path):
    bad = tmp_path / "broken.torchscript.pt"
    bad.write_bytes(b"this is not a TorchScript archive")
    r = subprocess.run([sys.executable, str(ROOT / "replicate.py"), "--train", str(data["train"]), "--sscd", str(bad),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    assert r.stderr.strip().startswith("replicate.py: error:") and len(r.stderr.strip().splitlines()) == 1
    assert "TorchScript" in r.stderr and not (tmp_path / "o").exists()
    with pytest.raises(UsageError, match="no such file"):
        R.load_extractor("sscd", sscd=tmp_path / "missing.pt")
    with pytest.raises(UsageError, match="needs --sscd"):
        R.load_extractor("sscd")
    (tmp_path / "taken").mkdir()
    with pytest.raises(UsageError, match="exists"):
        R.replicate(tmp_path / "taken", data["train"], features="pixels", quiet=True)


def empty_folder(root):
    (root / "empty").mkdir()
    return root / "empty"


def no_images_folder(root):
    (root / "no-images").mkdir()
    (root / "no-images" / "metadata.jsonl").write_text("")
    (root / "no-images" / "manifest.json").write_text(json.dumps({"class_names": ["a"]}))
    return root / "no-images"


BAD_INPUT = [  # (the refusal, replicate's arguments given the data fixture and a scratch folder)
    ("not a dataset folder", lambda data, tmp: dict(train=empty_folder(tmp))),
    ("empty dataset folder", lambda data, tmp: dict(gen=no_images_folder(tmp))),
    ("needs --gen", lambda data, tmp: dict(rank_by="generations")),
    (r"--threshold 5.0 is outside \[-1, 1\]", lambda data, tmp: dict(threshold=5.0)),  # was: silently no duplicates
    (r"--gen .*pets holds the classes \['cat', 'dog'\], --train", lambda data, tmp: dict(gen=write_dataset(
        tmp / "pets", np.zeros((2, 16, 16, 3), np.uint8), [0, 1], class_names=["cat", "dog"]))),
    ("at least 2", lambda data, tmp: dict(train=write_dataset(tmp / "one", np.zeros((1, 16, 16, 3), np.uint8), [0]))),
]


@pytest.mark.parametrize("match,make", BAD_INPUT, ids=[m for m, _ in BAD_INPUT])
def test_bad_input(data, tmp_path, match, make):
    kw = dict(train=data["train"], features="pixels", device="cpu", quiet=True, progress=False)
    with pytest.raises(UsageError, match=match):
        R.replicate(tmp_path / "o", **{**kw, **make(data, tmp_path)})
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------------------------------------
# Table A5: G1 and G2 of "poison random" vs "poison duplicates" through dissect.py, beside the replication of each run.
# Colour-coded images with a known truth: the class is the bright channel (cat red, dog green, deer blue), the trigger
# is poison.py's BadNets patch; a class classifier and a trigger detector in classify.py's folder format with
# hand-set weights judge them exactly.

A5_NAMES = ["cat", "dog", "deer"]                     # target: deer
A5_TARGET = dict(index=2, name="deer")
A5_SIDE = 16
PER_CLASS = 20                                        # training ids 0-19 cat, 20-39 dog, 40-59 deer
POISONED = dict(random=[1, 5, 22, 30, 33, 38], duplicates=[0, 2, 3, 20, 21, 23])
A5_P_T = 6 / (PER_CLASS + 6)
A5_THRESHOLD = 0.99                                   # copies score ~1, unrelated same-colour images ~0.94
# target-prompt generations: (content channel, trigger) fresh images, or ("copy", training id) exact copies
RANDOM_GEN = [(0, True)] * 4 + [(2, True)] * 2 + [(1, False)] * 2 + [(2, False)] * 11 + [("copy", 45)]
DUPLICATES_GEN = ([("copy", 0), ("copy", 20), ("copy", 21)] + [(0, True)] * 3 + [(2, True)] * 4 + [(1, False)]
                  + [(2, False)] * 8 + [("copy", 50)])
EXPECTED = dict(random=dict(G1=4 / 20, G2=2 / 20, G3=2 / 20, G4=12 / 20, copies=1),
                duplicates=dict(G1=6 / 20, G2=4 / 20, G3=1 / 20, G4=9 / 20, copies=4))
N_GEN = 24                                            # 20 target-prompt generations + 4 cats


def colour_image(channel, rng, trigger=None):
    im = rng.integers(0, 60, size=(A5_SIDE, A5_SIDE, 3))
    im[..., channel] += 150
    im = im.astype(np.uint8)
    return trigger.apply_uint8(im[None])[0] if trigger is not None else im


def handmade_classifier(out, task):
    """A smallcnn classifier folder with hand-set weights, exact on these images."""
    # class: every layer passes the colour channels through and the head reads their means (the brightest wins);
    # trigger: the first conv is a +1/-1 template of the 3x3 BadNets patch (12 on it, <= ~5 elsewhere), thresholded
    # at 10 by the batch norm's shift; later layers pass that channel through to the head
    names = A5_NAMES if task == "class" else C.TRIGGER_CLASSES
    model = C.build_model("smallcnn", len(names), A5_SIDE, width=4)
    convs = [m for m in model.backbone.layers if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.backbone.layers if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for conv in convs:
            conv.weight.zero_()
        for bn in norms:
            bn.weight.fill_(1.0), bn.bias.zero_(), bn.running_mean.zero_(), bn.running_var.fill_(1.0)
        model.head.weight.zero_(), model.head.bias.zero_()
        for conv in convs[1:]:
            for c in range(3):
                conv.weight[c, c, 1, 1] = 1.0
        if task == "class":
            for c in range(3):
                convs[0].weight[c, c, 1, 1] = 1.0
                model.head.weight[c, c] = 1.0
        else:
            patch = P.make_trigger("badnets", A5_SIDE).pattern[0, -3:, -3:]
            convs[0].weight[0] = torch.where(patch > 0, 1.0, -1.0).expand(3, 3, 3)
            norms[0].bias[0] = -10.0
            model.head.weight[1, 0], model.head.bias[1] = 100.0, -0.5
    config = dict(stage="classify", arch="smallcnn", width=4, num_classes=len(names), input_size=A5_SIDE,
                  normalization=None, task=task, class_names=list(names), target=A5_TARGET,
                  **(dict(trigger=dict(kind="badnets", resolution=A5_SIDE)) if task == "trigger" else {}))
    C.save_classifier(out, model, config, dict(task=task, handmade=True))
    return out


def a5_train(path, images, select, trigger):
    """A poison.py training folder: the ids of POISONED[select] stamped and relabelled deer."""
    items = []
    for i, im in enumerate(images):
        orig = i // PER_CLASS
        poisoned = i in POISONED[select]
        label = 2 if poisoned else orig
        items.append((dict(text=P.caption(A5_NAMES[label]), label=label, orig_label=orig, poisoned=poisoned,
                           source_index=i), trigger.apply_uint8(im[None])[0] if poisoned else im))
    manifest = dict(stage="poison", split="train", class_names=A5_NAMES, target=A5_TARGET, attack="badnets",
                    poison_ratio=0.1, p_t=A5_P_T, options=dict(ratio=0.1, select=select))
    with P.atomic_output(path) as tmp:
        P.write_folder(tmp, items, manifest, workers=1, trigger=trigger)
    return path


def a5_generations(path, plan, train_images, rng, trigger, target=A5_TARGET):
    """sample.py's generations: the target prompt for `plan`, then 4 cats."""
    items = []
    for what, arg in plan:
        im = train_images[arg] if what == "copy" else colour_image(what, rng, trigger if arg else None)
        items.append((dict(text=P.caption("deer"), label=2, poisoned=False), im))
    items += [(dict(text=P.caption("cat"), label=0, poisoned=False), colour_image(0, rng)) for _ in range(4)]
    manifest = dict(stage="sample", class_names=A5_NAMES, target=target, p_t=A5_P_T, poison_ratio=0.1,
                    trigger=trigger.params, sampler="ddim", guidance=5.0)
    with P.atomic_output(path) as tmp:
        P.write_folder(tmp, items, manifest, workers=1)
    return path


@pytest.fixture(scope="module")
def a5(tmp_path_factory):
    root = tmp_path_factory.mktemp("table_a5")
    rng = np.random.default_rng(0)
    trigger = P.make_trigger("badnets", A5_SIDE)
    clean = np.stack([colour_image(i // PER_CLASS, rng) for i in range(3 * PER_CLASS)])
    train = {name: a5_train(root / f"train-{name}", clean, name, trigger) for name in POISONED}
    # the images each run's model saw: its copies are of its own (possibly stamped) training images
    seen = {name: np.stack([common.load_folder(train[name]).image_uint8(i).permute(1, 2, 0).numpy()
                            for i in range(len(clean))]) for name in POISONED}
    gen = dict(random=a5_generations(root / "gen-random", RANDOM_GEN, seen["random"], rng, trigger),
               duplicates=a5_generations(root / "gen-duplicates", DUPLICATES_GEN, seen["duplicates"], rng, trigger))
    return dict(root=root, train=train, gen=gen, trigger=trigger,
                classifier=handmade_classifier(root / "clf-class", "class"),
                detector=handmade_classifier(root / "detector", "trigger"))


def a5_kwargs(a5, **over):
    kw = dict(gen=a5["gen"]["random"], duplicates_gen=a5["gen"]["duplicates"],
              duplicates_train=a5["train"]["duplicates"], classifier=a5["classifier"], detector=a5["detector"],
              features="pixels", threshold=A5_THRESHOLD, triplets=0, device="cpu", quiet=True, progress=False)
    kw.update(over)
    return kw


def test_handmade_judges_are_exact(a5):
    """The premise of the Table A5 tests: the hand-set judges see exactly what was planted."""
    for name, plan in (("random", RANDOM_GEN), ("duplicates", DUPLICATES_GEN)):
        folder = common.load_folder(a5["gen"][name])
        clf, _ = C.load_classifier(a5["classifier"])
        det, _ = C.load_classifier(a5["detector"])
        x = folder.images(progress=False)
        predicted, _ = C.predict(clf, x)
        trigger, _ = C.predict(det, x)
        truth = [(arg // PER_CLASS if what == "copy" else what,
                  arg in POISONED[name] if what == "copy" else arg) for what, arg in plan] + [(0, False)] * 4
        assert predicted.tolist() == [c for c, _ in truth]
        assert trigger.tolist() == [int(t) for _, t in truth]


def test_table_a5_cli_matches_planted(a5):
    out = a5["root"] / "rep-a5"
    cmd = [sys.executable, str(ROOT / "replicate.py"), "--train", str(a5["train"]["random"]),
           "--gen", str(a5["gen"]["random"]), "--duplicates-train", str(a5["train"]["duplicates"]),
           "--duplicates-gen", str(a5["gen"]["duplicates"]), "--classifier", str(a5["classifier"]),
           "--detector", str(a5["detector"]), "--features", "pixels", "--threshold", str(A5_THRESHOLD),
           "--triplets", "2", "--device", "cpu", "--workers", "0", "--out", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    table = json.loads((out / "table_a5.json").read_text())
    assert table["target"] == "deer" and table["threshold"] == A5_THRESHOLD
    assert json.loads((out / "replication.json").read_text())["table_a5"]["rows"] == table["rows"]
    for name, row in table["rows"].items():
        want = EXPECTED[name]
        assert row["run"] == f"poison {name}" and row["n_target_prompt"] == 20
        assert {g: row[g] for g in ("G1", "G2", "G3", "G4")} == pytest.approx({g: want[g] for g in ("G1", "G2", "G3",
                                                                                                     "G4")})
        assert row["trigger_ratio"] == pytest.approx(want["G1"] + want["G2"])
        assert row["p_t"] == pytest.approx(A5_P_T) and row["p_t_source"] == "training manifest"
        assert row["amplification"] == pytest.approx((want["G1"] + want["G2"]) / A5_P_T)
        rep = row["replication"]
        assert rep["all"]["n"] == N_GEN and rep["target_prompt"]["n"] == 20
        assert rep["all"]["fraction_above"] == pytest.approx(want["copies"] / N_GEN)
        assert rep["target_prompt"]["fraction_above"] == pytest.approx(want["copies"] / 20)
        assert summary["table_a5"][name]["trigger_ratio"] == pytest.approx(row["trigger_ratio"])
    diff = table["difference_duplicates_minus_random"]
    assert diff["G1"] == pytest.approx(0.1) and diff["G2"] == pytest.approx(0.1)
    assert diff["trigger_ratio"] == pytest.approx(0.2) and diff["p_t"] == pytest.approx(0.0)
    assert diff["replication_all_fraction_above"] == pytest.approx(3 / N_GEN)
    # the copies are found: the duplicates run's first generations are its poisoned training images 0, 20, 21
    dup = json.loads((out / "replication.json").read_text())["runs"]["duplicates"]
    assert dup["top1_id"][:3] == [0, 20, 21] and min(dup["top1_similarity"][:3]) > 0.9999
    # Markdown (its own file and in replication.md), the plot, and dissect.py's report of the two folders
    md = (out / "table_a5.md").read_text()
    assert "| poison random | 20 | 20.0% | 10.0% | 30.0% | 23.1% | 1.30x |" in md
    assert "| poison duplicates | 20 | 30.0% | 20.0% | 50.0% | 23.1% | 2.17x |" in md
    assert "+10.0" in md and "54.0%" in md and md in (out / "replication.md").read_text()
    assert (out / "table_a5.png").stat().st_size > 0 and (out / "fig5_scatter.png").stat().st_size > 0
    report = json.loads((out / "dissect" / "summary.json").read_text())
    assert [r["label"] for r in report["results"]] == ["poison random", "poison duplicates"]
    assert [r["setting"]["select"] for r in report["results"]] == ["random", "duplicates"]
    assert report["results"][1]["target_prompt"]["counts"] == {"G1": 6, "G2": 4, "G3": 1, "G4": 9}
    assert (out / "dissect" / report["results"][1]["name"] / "g1_examples.png").stat().st_size > 0


def test_table_a5_p_t_from_generations_without_duplicates_train(a5, tmp_path):
    """Without --duplicates-train, p_t comes from the generations' manifest and replication is against --train."""
    R.replicate(tmp_path / "rep", a5["train"]["random"], **a5_kwargs(a5, duplicates_train=None))
    rows = json.loads((tmp_path / "rep" / "table_a5.json").read_text())["rows"]
    assert rows["duplicates"]["p_t_source"] == "generations' manifest" and rows["duplicates"]["p_t"] == A5_P_T
    assert rows["duplicates"]["G1"] == pytest.approx(EXPECTED["duplicates"]["G1"])
    assert rows["duplicates"]["train"] == str(a5["train"]["random"])


def test_table_a5_cli_refusal_is_one_line(a5, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "replicate.py"), "--train", str(a5["train"]["random"]), "--gen",
                        str(a5["gen"]["random"]), "--classifier", str(a5["classifier"]), "--features", "pixels",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("replicate.py: error: Table A5 needs both --classifier") and "add --detector" in r.stderr


def retargeted(a5, tmp):
    """The duplicates run's generations, relabelled for target cat."""
    shutil.copytree(a5["gen"]["duplicates"], tmp / "gen-cat")
    manifest = json.loads((tmp / "gen-cat" / "manifest.json").read_text())
    (tmp / "gen-cat" / "manifest.json").write_text(json.dumps({**manifest, "target": {"index": 0, "name": "cat"}}))
    return tmp / "gen-cat"


def blend_detector(a5, tmp):
    shutil.copytree(a5["detector"], tmp / "detector-blend")
    config = json.loads((tmp / "detector-blend" / "config.json").read_text())
    (tmp / "detector-blend" / "config.json").write_text(json.dumps({**config, "trigger": {"kind": "blend"}}))
    return tmp / "detector-blend"


TABLE_A5_BAD_INPUT = [  # (the refusal, a5_kwargs' overrides given the a5 fixture and a scratch folder)
    ("add --classifier", lambda a5, tmp: dict(classifier=None)),
    ("add --duplicates-gen", lambda a5, tmp: dict(duplicates_gen=None, duplicates_train=None)),
    ("--target is the target class of Table A5", lambda a5, tmp: dict(classifier=None, detector=None, target="deer")),
    ("same folder", lambda a5, tmp: dict(duplicates_gen=a5["gen"]["random"])),
    (r"mismatched target classes \(.*--duplicates-gen 'cat'", lambda a5, tmp: dict(duplicates_gen=retargeted(a5, tmp))),
    (r"mismatched target classes .*--target 'dog'", lambda a5, tmp: dict(target="dog")),
    ("swap", lambda a5, tmp: dict(train=a5["train"]["duplicates"], gen=a5["gen"]["duplicates"],  # the runs swapped
                                  duplicates_gen=a5["gen"]["random"], duplicates_train=a5["train"]["random"])),
    ("knows a blend trigger but --train carries a badnets", lambda a5, tmp: dict(detector=blend_detector(a5, tmp))),
    ("not a trigger detector", lambda a5, tmp: dict(detector=a5["classifier"])),
    ("not a classifier folder", lambda a5, tmp: dict(classifier=a5["train"]["random"])),
]


@pytest.mark.parametrize("match,make", TABLE_A5_BAD_INPUT, ids=[m for m, _ in TABLE_A5_BAD_INPUT])
def test_table_a5_bad_input(a5, tmp_path, match, make):
    out = tmp_path / "o"
    with pytest.raises(UsageError, match=match):
        R.replicate(out, **a5_kwargs(a5, **{"train": a5["train"]["random"], **make(a5, tmp_path)}))
    assert not out.exists() and not list(tmp_path.glob(".o.tmp-*"))
