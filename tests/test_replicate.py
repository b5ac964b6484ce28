"""replicate.py: planted exact and near copies are found (similarity near 1) and ranked first, by generations and by
train-to-train duplicates; the proxy features are labelled; the SSCD path through a TorchScript file; the ids file
round-trips into poison.py; batched search equals a brute-force loop; the feature cache; bad input."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import poison as P
import replicate as R
from poison import PoisonError

ROOT = Path(__file__).resolve().parent.parent
EXACT, NEAR = 10, 20                  # training rows copied by generations
DUP_A, DUP_B = (5, 100), (7, 200)      # planted duplicate pairs inside the training set: row a := copy of row b
N_TRAIN = 400                          # the first 400 digits training images (ids = their source indices)


def write_dataset(path, images, labels, extra=None, class_names=P.DIGIT_NAMES):
    """A dataset folder of (N, H, W, 3) uint8 images (as sample.py or poison.py would write it)."""
    items = [({"text": P.caption(class_names[int(l)]), "label": int(l), **(extra[i] if extra else {})}, im)
             for i, (im, l) in enumerate(zip(images, labels))]
    with P.atomic_output(path) as tmp:
        P.write_folder(tmp, items, {"stage": "test", "class_names": list(class_names)}, workers=1)
    return path


def near_copy(image, seed, amplitude=4):
    noise = np.random.default_rng(seed).integers(-amplitude, amplitude + 1, image.shape)
    return np.clip(image.astype(np.int64) + noise, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A digits training folder (16 px) with two planted duplicate pairs, generations that copy two training images
    exactly / nearly among unrelated noise images, and a second generation set for the 'poison duplicates' run."""
    root = tmp_path_factory.mktemp("replicate")
    src = P.load_source("digits", "train", resolution=16)
    images, labels = src.array[:N_TRAIN].copy(), src.labels[:N_TRAIN].copy()
    images[DUP_A[0]], labels[DUP_A[0]] = images[DUP_A[1]], labels[DUP_A[1]]
    images[DUP_B[0]], labels[DUP_B[0]] = near_copy(images[DUP_B[1]], 1), labels[DUP_B[1]]
    extra = [{"source_index": i, "poisoned": False} for i in range(len(images))]
    train = write_dataset(root / "train", images, labels, extra)
    noise = np.random.default_rng(2).integers(0, 256, (30, 16, 16, 3)).astype(np.uint8)
    gen_images = np.concatenate([images[EXACT][None], near_copy(images[NEAR], 3)[None], noise])
    gen_labels = np.concatenate([[labels[EXACT], labels[NEAR]], np.arange(30) % 10])
    gen = write_dataset(root / "gen", gen_images, gen_labels)
    gen_dup = write_dataset(root / "gen_dup", np.concatenate([images[DUP_B[1]][None], noise[:10]]),
                            np.concatenate([[labels[DUP_B[1]]], np.arange(10)]))
    return {"root": root, "train": train, "gen": gen, "gen_dup": gen_dup, "n_train": len(images)}


@pytest.fixture(scope="module")
def by_generations(data):
    out = data["root"] / "rep-gen"
    summary = R.replicate(out, data["train"], gen=data["gen"], duplicates_gen=data["gen_dup"], features="pixels",
                          rank_by="generations", device="cpu", quiet=True, progress=False)
    return out, summary, json.loads((out / "replication.json").read_text())


def test_planted_copies_found_and_ranked_first(by_generations):
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
    """Three training images and two generations (an exact copy of training row 2 and a noise image)."""
    ds = P.load_folder(data["train"])
    images = torch.stack([ds.image_uint8(i) for i in range(3)]).permute(0, 2, 3, 1).numpy()
    train = write_dataset(root / "train", images, range(3), [{"source_index": 40 + i} for i in range(3)])
    noise = np.random.default_rng(5).integers(0, 256, (1, 16, 16, 3)).astype(np.uint8)
    gen = write_dataset(root / "gen", np.concatenate([images[2][None], noise]), [2, 0])
    return train, gen


def test_proxy_is_labelled(data, tmp_path, monkeypatch):
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


def test_bad_input(data, tmp_path):
    bad = tmp_path / "broken.torchscript.pt"
    bad.write_bytes(b"this is not a TorchScript archive")
    r = subprocess.run([sys.executable, str(ROOT / "replicate.py"), "--train", str(data["train"]), "--sscd", str(bad),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0
    assert r.stderr.strip().startswith("replicate.py: error:") and len(r.stderr.strip().splitlines()) == 1
    assert "TorchScript" in r.stderr and not (tmp_path / "o").exists()
    with pytest.raises(PoisonError, match="no such file"):
        R.load_extractor("sscd", sscd=tmp_path / "missing.pt")
    with pytest.raises(PoisonError, match="needs --sscd"):
        R.load_extractor("sscd")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PoisonError, match="not a dataset folder"):
        R.replicate(tmp_path / "o", empty, features="pixels", device="cpu", quiet=True)
    no_images = tmp_path / "no-images"
    no_images.mkdir()
    (no_images / "metadata.jsonl").write_text("")
    (no_images / "manifest.json").write_text(json.dumps({"class_names": ["a"]}))
    with pytest.raises(PoisonError, match="empty dataset folder"):
        R.replicate(tmp_path / "o", data["train"], gen=no_images, features="pixels", device="cpu", quiet=True,
                    progress=False)
    with pytest.raises(PoisonError, match="needs --gen"):
        R.replicate(tmp_path / "o", data["train"], rank_by="generations", features="pixels", quiet=True)
    one = write_dataset(tmp_path / "one", np.zeros((1, 16, 16, 3), np.uint8), [0])
    with pytest.raises(PoisonError, match="at least 2"):
        R.replicate(tmp_path / "o", one, features="pixels", device="cpu", quiet=True, progress=False)
    assert not (tmp_path / "o").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(PoisonError, match="exists"):
        R.replicate(tmp_path / "taken", data["train"], features="pixels", quiet=True)
