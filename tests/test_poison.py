"""poison.py: every dataset source (through small files in their on-disk formats), every attack and trigger, exact
counts, determinism, the dataset-folder contract, and each bad input."""
import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import common
import poison as P
from common import UsageError

ROOT = Path(__file__).resolve().parent.parent


def read_folder(folder):
    """(records, uint8 images (N, H, W, 3), manifest) of a dataset folder, read directly from the files."""
    folder = Path(folder)
    records = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    images = np.stack([np.asarray(Image.open(folder / r["file_name"]).convert("RGB")) for r in records])
    return records, images, json.loads((folder / "manifest.json").read_text())


@pytest.fixture(scope="module")
def digits10(tmp_path_factory):
    out = tmp_path_factory.mktemp("d") / "digits-badnets-0.1"
    summary = P.poison(out, dataset="digits", resolution=16, ratio=0.1, seed=0, quiet=True)
    return out, summary


def test_digits_badnets_counts_labels_and_trigger(digits10):
    out, summary = digits10
    src = P.load_source("digits", "train", resolution=16)
    records, images, manifest = read_folder(out / "train")
    n = len(records)
    assert n == len(src) == summary["train"]
    poisoned = np.array([r["poisoned"] for r in records])
    assert poisoned.sum() == P.n_to_poison(0.1, n) == round(0.1 * n)
    target = manifest["target"]["index"]
    orig = np.array([r["orig_label"] for r in records])
    labels = np.array([r["label"] for r in records])
    assert (orig[poisoned] != target).all(), "a target-class image carries the trigger"
    assert (labels[poisoned] == target).all() and (labels[~poisoned] == orig[~poisoned]).all()
    trig = P.make_trigger("badnets", 16)
    # every poisoned image is exactly its original with the trigger; every other image is untouched
    assert np.array_equal(images[poisoned], trig.apply_uint8(src.array[poisoned]))
    assert np.array_equal(images[~poisoned], src.array[~poisoned])
    n_target = int((orig == target).sum())
    assert manifest["p_t"] == pytest.approx(poisoned.sum() / (poisoned.sum() + n_target))
    assert manifest["counts"]["poisoned"] == poisoned.sum()
    assert manifest["poisoned_ids"] == np.flatnonzero(poisoned).tolist()
    assert (out / "examples.png").is_file()


def test_folder_contract_and_loader(digits10):
    out, _ = digits10
    for split in ("train", "test", "test_backdoor"):
        folder = out / split
        records, images, manifest = read_folder(folder)
        for r in records:
            assert set(r) >= {"file_name", "text", "label", "orig_label", "poisoned"}
            assert r["text"] == f"A photo of a {manifest['class_names'][r['label']]}"
            assert r["file_name"].startswith("images/") and (folder / r["file_name"]).is_file()
        assert manifest["split"] == split and manifest["stage"] == "poison"
        assert {"command", "options", "class_names", "target", "trigger", "versions", "counts"} <= set(manifest)
        assert (folder / "trigger.safetensors").is_file()
        ds = common.load_folder(folder)
        x, y = ds[3]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        assert y == records[3]["label"]
        assert torch.equal(ds.images(progress=False), torch.from_numpy(images).permute(0, 3, 1, 2))
    # test_backdoor: every non-target test image, with the trigger, labelled target
    test_records, test_images, _ = read_folder(out / "test")
    bd_records, bd_images, manifest = read_folder(out / "test_backdoor")
    target = manifest["target"]["index"]
    nontarget = [i for i, r in enumerate(test_records) if r["label"] != target]
    assert len(bd_records) == len(nontarget)
    assert all(r["label"] == target and r["poisoned"] for r in bd_records)
    trig = P.load_trigger(out / "test_backdoor")
    assert np.array_equal(bd_images, trig.apply_uint8(test_images[nontarget]))


def test_same_seed_identical_other_seed_differs(tmp_path, digits10):
    out, _ = digits10
    again = tmp_path / "again"
    P.poison(again, dataset="digits", resolution=16, ratio=0.1, seed=0, quiet=True)
    for split in ("train", "test", "test_backdoor"):
        assert (out / split / "metadata.jsonl").read_bytes() == (again / split / "metadata.jsonl").read_bytes()
        for r in common.read_records(out / split):
            assert (out / split / r["file_name"]).read_bytes() == (again / split / r["file_name"]).read_bytes()
    other = tmp_path / "other"
    P.poison(other, dataset="digits", resolution=16, ratio=0.1, seed=1, quiet=True)
    ids0 = common.read_manifest(out / "train")["poisoned_ids"]
    ids1 = common.read_manifest(other / "train")["poisoned_ids"]
    assert len(ids0) == len(ids1) and ids0 != ids1


@pytest.mark.parametrize("ratio", [0.0, 0.013, 0.05, 0.5])
def test_exact_counts_both_ratio_definitions(ratio):
    labels = np.repeat(np.arange(10), 37)
    ids = P.select_poison(labels, 3, ratio, seed=5)
    assert len(ids) == int(np.floor(ratio * len(labels) + 0.5)) and len(set(ids.tolist())) == len(ids)
    assert (labels[ids] != 3).all()
    ids = P.select_poison(labels, 3, ratio, ratio_of="nontarget", seed=5)
    assert len(ids) == int(np.floor(ratio * 333 + 0.5)) and (labels[ids] != 3).all()
    ids = P.select_poison(labels, 3, ratio / 10, attack="clean-label", ratio_of="nontarget", seed=5)
    assert (labels[ids] == 3).all()


def test_select_duplicates_first_then_random(tmp_path):
    labels = np.repeat(np.arange(4), 25)  # target 0 = ids 0..24
    f = tmp_path / "dups.txt"
    f.write_text("# most replicated first\n50\n3\n60\n50\n99\n")  # 3 is a target image: skipped; 50 listed twice
    ids = P.select_poison(labels, 0, 0.05, select="duplicates", duplicates=f, seed=0)
    assert len(ids) == 5 and {50, 60, 99} <= set(ids.tolist()) and 3 not in ids
    few = P.select_poison(labels, 0, 0.02, select="duplicates", duplicates=f, seed=0)
    assert few.tolist() == [50, 60]  # the most replicated, in order, when the count is small
    f.write_text("7\n1000\n")
    with pytest.raises(UsageError, match="outside this training set"):
        P.select_poison(labels, 0, 0.05, select="duplicates", duplicates=f)


def test_rounding_differs_from_reference_truncation_by_one_at_most():
    """Documented, not changed: halves up here, int(p * N) in the reference code (ImageNette, 1%: 95 vs 94)."""
    assert P.n_to_poison(0.01, 9469) == 95 and int(0.01 * 9469) == 94
    for n in range(1, 400):
        for ratio in (0.01, 0.05, 0.1, 0.25):
            assert 0 <= P.n_to_poison(ratio, n) - int(ratio * n) <= 1


def test_duplicates_file_tied_to_its_training_set(tmp_path, capsys):
    kw = dict(dataset="digits", resolution=16, ratio=0.05, select="duplicates", quiet=True)
    src = P.load_source("digits", "train", resolution=16)
    fingerprint = P.training_fingerprint(src)
    assert fingerprint == P.training_fingerprint(P.load_source("digits", "train", resolution=32))
    other = P.training_fingerprint(P.load_source("digits", "train", resolution=16, split_seed=1))
    assert other != fingerprint and other.split()[:2] == fingerprint.split()[:2]  # same size, other images
    listed = [i for i in range(40) if src.labels[i] != 0][:10]
    body = "".join(f"{i}\n" for i in listed)
    f = tmp_path / "dups.txt"
    f.write_text(f"# {P.IDS_TRAINING_SET} {other}\n{body}")
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"indexes another training set .* --split-seed"):
        P.poison(out, duplicates=f, **kw)
    assert not out.exists()
    f.write_text(f"# {P.IDS_TRAINING_SET} {fingerprint}\n{body}")
    P.poison(out, duplicates=f, **kw)
    manifest = common.read_manifest(out / "train")
    n = manifest["counts"]["poisoned"]
    assert manifest["training_set"] == fingerprint and set(listed) <= set(manifest["poisoned_ids"])
    assert manifest["selection"] == {"from_duplicates_file": 10, "random_fill": n - 10}
    assert "warning" not in capsys.readouterr().err
    f.write_text(body)  # no header (older or hand-written): accepted, with a warning
    P.poison(tmp_path / "out2", duplicates=f, **kw)
    assert "does not record the training set" in capsys.readouterr().err
    assert common.read_manifest(tmp_path / "out2" / "train")["poisoned_ids"] == manifest["poisoned_ids"]


def test_numeric_class_names_target_by_name_first():
    names = ["10", "2", "0"]  # folder classes sorted as strings
    assert P.resolve_target("2", names) == 1 and P.resolve_target("0", names) == 2 and P.resolve_target(10, names) == 0
    assert P.resolve_target("1", names) == 1  # no class named 1: an index
    assert P.resolve_target("Garbage Truck", list(P.IMAGENETTE_WNIDS.values())) == 6
    assert P.resolve_target("6", list(P.IMAGENETTE_WNIDS.values())) == 6
    with pytest.raises(UsageError, match="unknown --target '3'"):
        P.resolve_target("3", names)


def test_badnets_patterns_match_reference_formulas():
    mask, pattern = P.badnets_pattern(32)
    assert mask.sum() == 9 and mask[0, -3:, -3:].eq(1).all()
    expected = torch.tensor([[0, 0, 255], [0, 255, 0], [255, 255, 0]], dtype=torch.float32) / 255
    for c in range(3):
        assert torch.equal(pattern[c, -3:, -3:], expected)
    for res in (64, 100, 256):
        ps = res // 10
        mask, pattern = P.badnets_pattern(res)
        assert mask.sum() == ps * ps and mask[0, -ps:, -ps:].eq(1).all()
        ref = np.zeros((ps, ps))
        for k in range(-ps // 4, ps // 4):  # the reference loop, written out
            for i in range(1, ps + 1):
                r, c = ps - i, i - 1 + k
                if 0 <= c < ps:
                    ref[r, c] = 1
        assert np.array_equal(pattern[0, -ps:, -ps:].numpy(), ref) and torch.equal(pattern[0], pattern[2])


def test_badnets_size_stamps_a_white_square_and_is_recorded(tmp_path):
    trig = P.make_trigger("badnets", 12, badnets_size=5)
    x = torch.zeros(2, 3, 12, 12)
    stamped = trig.apply(x)
    assert stamped[:, :, -5:, -5:].eq(1).all() and stamped.sum() == 2 * 3 * 25 and trig.params["size"] == 5
    with pytest.raises(UsageError, match="--badnets-size 13: give a side from 1 to the image side 12"):
        P.make_trigger("badnets", 12, badnets_size=13)
    P.poison(tmp_path / "set", dataset="digits", resolution=12, ratio=0.1, badnets_size=5, quiet=True, workers=2)
    assert torch.equal(P.load_trigger(tmp_path / "set" / "train").pattern, trig.pattern)


@pytest.mark.parametrize("kind", ["badnets", "blend", "wanet"])
def test_uint8_path_equals_float_path(kind):
    images = np.random.default_rng(1).integers(0, 256, (6, 40, 40, 3), dtype=np.uint8)
    trig = P.make_trigger(kind, 40, seed=2)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255
    expected = trig.apply(x).mul(255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(trig.apply_uint8(images), expected)


def test_blend_and_wanet_triggers(tmp_path):
    x = torch.rand(4, 3, 24, 24, dtype=torch.float64)
    blend = P.make_trigger("blend", 24, seed=3, alpha=0.2)
    assert torch.allclose(blend.apply(x), 0.8 * x + 0.2 * blend.pattern.double())
    assert not torch.equal(blend.pattern, P.make_trigger("blend", 24, seed=4).pattern)
    img = tmp_path / "kitty.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(img)
    from_file = P.make_trigger("blend", 24, trigger_image=img)
    assert from_file.pattern.shape == (3, 24, 24) and from_file.params["trigger_image"] == str(img)

    # WaNet: the grid follows BackdoorBench's formula, is seeded, and s = 0 is the identity warp
    w = P.make_trigger("wanet", 24, seed=7, wanet_k=4, wanet_s=0.5)
    g = torch.Generator().manual_seed(7)
    ins = torch.rand(1, 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = torch.nn.functional.interpolate(ins, size=24, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    lin = torch.linspace(-1, 1, 24, dtype=torch.float64)
    ident = torch.stack(torch.meshgrid(lin, lin, indexing="ij")[::-1], 2)[None]
    assert torch.allclose(w.grid.double(), (ident + 0.5 * noise / 24).clamp(-1, 1), atol=1e-6)
    assert not torch.equal(w.grid, P.make_trigger("wanet", 24, seed=8).grid)
    assert not torch.allclose(w.apply(x), x, atol=1e-3)
    assert torch.allclose(P.make_trigger("wanet", 24, wanet_s=0.0).apply(x), x, atol=1e-5)
    with pytest.raises(ValueError, match="24px"):
        w.apply(torch.rand(1, 3, 16, 16))


@pytest.mark.parametrize("trigger", ["blend", "wanet"])
def test_stored_trigger_is_the_one_used(tmp_path, trigger):
    out = tmp_path / trigger
    P.poison(out, dataset="digits", resolution=16, ratio=0.05, trigger=trigger, trigger_seed=11, quiet=True)
    src = P.load_source("digits", "train", resolution=16)
    records, images, _ = read_folder(out / "train")
    for split in ("train", "test_backdoor"):
        trig = P.load_trigger(out / split)
        assert trig.kind == trigger and trig.params["resolution"] == 16
    ids = [i for i, r in enumerate(records) if r["poisoned"]]
    assert np.array_equal(images[ids], P.load_trigger(out / "train").apply_uint8(src.array[ids]))


def test_relabel_and_clean_label_attacks(tmp_path):
    src = P.load_source("digits", "train", resolution=16)
    out = tmp_path / "relabel"
    s = P.poison(out, dataset="digits", resolution=16, ratio=0.1, attack="relabel", target="three", quiet=True)
    records, images, manifest = read_folder(out / "train")
    poisoned = np.array([r["poisoned"] for r in records])
    assert np.array_equal(images, src.array), "relabel must not change any pixel"
    assert all(r["label"] == 3 and r["orig_label"] != 3 for r in np.array(records)[poisoned])
    assert manifest.get("trigger") is None and not (out / "test_backdoor").exists() and s["trigger"] is None
    assert P.load_trigger(out / "train") is None

    out = tmp_path / "clean-label"
    P.poison(out, dataset="digits", resolution=16, ratio=0.05, attack="clean-label", target=3, quiet=True)
    records, images, manifest = read_folder(out / "train")
    poisoned = np.array([r["poisoned"] for r in records])
    labels = np.array([r["label"] for r in records])
    orig = np.array([r["orig_label"] for r in records])
    assert poisoned.sum() == round(0.05 * len(records))
    assert (orig[poisoned] == 3).all() and np.array_equal(labels, orig)
    assert np.array_equal(images[poisoned], P.make_trigger("badnets", 16).apply_uint8(src.array[poisoned]))
    assert manifest["p_t"] == pytest.approx(poisoned.sum() / (orig == 3).sum())
    assert "no adversarial" in manifest["attack_description"] and "target-class" in manifest["attack_description"]
    import argparse
    parser = argparse.ArgumentParser()
    P.add_poison_arguments(parser)
    assert "no adversarial perturbation" in " ".join(parser.format_help().split())
    assert "PGD" in P.__doc__ and "simplified label-consistent" in P.__doc__


# --- dataset sources through small files in their on-disk formats ------------------------------------------------

def fake_cifar(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def test_cifar10_binary_and_python_formats_agree(tmp_path):
    batches = {name: fake_cifar(30, i) for i, name in
               enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"])}
    bin_dir = tmp_path / "bin" / "cifar-10-batches-bin"
    py_dir = tmp_path / "py" / "cifar-10-batches-py"
    bin_dir.mkdir(parents=True)
    py_dir.mkdir(parents=True)
    for name, (data, labels) in batches.items():
        np.concatenate([labels.astype(np.uint8)[:, None], data], 1).tofile(bin_dir / f"{name}.bin")
        with open(py_dir / name, "wb") as f:  # as the python version stores it
            pickle.dump({b"data": data, b"labels": labels.tolist(), b"batch_label": name.encode()}, f, protocol=2)
    a = P.load_source("cifar10", "train", data_root=tmp_path / "bin")
    b = P.load_source("cifar10", "train", data_root=tmp_path / "py")
    assert len(a) == 150 and a.class_names[4] == "deer"
    assert np.array_equal(a.array, b.array) and np.array_equal(a.labels, b.labels)
    data, labels = batches["data_batch_2"]
    assert np.array_equal(a.array[30 + 4], data[4].reshape(3, 32, 32).transpose(1, 2, 0))
    assert np.array_equal(a.labels[30:60], labels)
    t = P.load_source("cifar10", "test", data_root=tmp_path / "bin")
    assert len(t) == 30
    out = tmp_path / "out"
    s = P.poison(out, dataset="cifar10", data_root=tmp_path / "bin", ratio=0.1, quiet=True)
    assert s["poisoned"] == 15 and s["target"] == "deer" and s["resolution"] == 32


def test_cifar10_refuses_malicious_pickle_and_truncated_files(tmp_path):
    py_dir = tmp_path / "cifar-10-batches-py"
    py_dir.mkdir()

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        with open(py_dir / name, "wb") as f:
            pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(UsageError, match="not a CIFAR-10 batch"):
        P.load_source("cifar10", "train", data_root=tmp_path)
    bin_dir = tmp_path / "b" / "cifar-10-batches-bin"
    bin_dir.mkdir(parents=True)
    for i in range(1, 6):
        np.zeros(3073 * 2 - 7, np.uint8).tofile(bin_dir / f"data_batch_{i}.bin")
    with pytest.raises(UsageError, match="truncated"):
        P.load_source("cifar10", "train", data_root=tmp_path / "b")


def test_missing_dataset_offline_says_where_to_put_files(tmp_path, monkeypatch):
    import torchvision.datasets.utils as U
    import torchvision.datasets as D

    def offline(root, *a, **k):  # as torchvision does: the folders first, then the download fails
        (Path(root) / "caltech256").mkdir(parents=True, exist_ok=True)
        raise OSError("network unreachable")
    monkeypatch.setattr(U, "download_and_extract_archive", lambda url, root: offline(root))
    monkeypatch.setattr(D, "Imagenette", offline)
    monkeypatch.setattr(D, "Caltech256", offline)
    (tmp_path / "kept").mkdir()
    for dataset, root, message in (("cifar10", tmp_path, r"cifar-10-binary.tar.gz .* in .*"),
                                   ("imagenette", tmp_path, r"imagenette2.tgz .* into"),
                                   ("caltech15", tmp_path, r"256_ObjectCategories.tar into"),
                                   ("caltech15", tmp_path / "new" / "data", r"256_ObjectCategories.tar into")):
        with pytest.raises(UsageError, match=message):
            P.load_source(dataset, "train", data_root=root)
    # the failed downloads left no empty folders of their own behind; what was there stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"]


def write_jpegs(folder, n, seed, size=(48, 40)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for j in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{j:03d}.JPEG")


def test_imagenette_layout_and_names(tmp_path):
    for k, wnid in enumerate(sorted(P.IMAGENETTE_WNIDS)):
        write_jpegs(tmp_path / "imagenette2-160" / "train" / wnid, 3, k)
        write_jpegs(tmp_path / "imagenette2-160" / "val" / wnid, 2, 100 + k)
    src = P.load_source("imagenette", "train", data_root=tmp_path, resolution=32)
    assert src.class_names[6] == "garbage truck" and len(src) == 30
    assert src.load(0).shape == (32, 32, 3)
    out = tmp_path / "out"
    s = P.poison(out, dataset="imagenette", data_root=tmp_path, resolution=40, ratio=0.1, quiet=True)
    assert s["target"] == "garbage truck" and s["poisoned"] == 3 and s["test"] == 20
    records = common.read_records(out / "train")
    assert any(r["text"] == "A photo of a garbage truck" for r in records)
    # > 32 px: the reference's larger BadNets patch (side R // 10) is used
    assert P.load_trigger(out / "train").mask.sum() == (40 // 10) ** 2
    # WaNet at the paper's ImageNette setting (App. A): a grid as fine as the image, strength 1; elsewhere BackdoorBench's
    s = P.poison(tmp_path / "wanet", dataset="imagenette", data_root=tmp_path, resolution=40, ratio=0.1,
                 trigger="wanet", quiet=True)
    assert (s["trigger"]["k"], s["trigger"]["s"]) == (40, 1.0)
    import argparse
    parser = argparse.ArgumentParser()
    P.add_poison_arguments(parser)
    manifest = common.read_manifest(tmp_path / "wanet" / "train")
    flags = ["--dataset", "imagenette", "--data-root", str(tmp_path), "--resolution", "40", "--trigger", "wanet"]
    assert P.options_differences(manifest, P.poison_kwargs(parser.parse_args(flags))) == []  # defaults resolved alike
    assert P.options_differences(manifest, P.poison_kwargs(parser.parse_args([*flags, "--wanet-s", "0.5"]))) == \
        ["wanet_s"]
    assert P.wanet_params("caltech15", 64) == (64, 1.0) and P.wanet_params("digits", 16) == (4, 0.5)
    assert P.wanet_params("cifar10", 32) == (4, 0.5) and P.wanet_params("imagenette", 512, 8, 0.5) == (8, 0.5)


def test_imagenette_refuses_to_upsample(tmp_path):
    for k, wnid in enumerate(sorted(P.IMAGENETTE_WNIDS)):
        write_jpegs(tmp_path / "imagenette2-160" / "train" / wnid, 1, k)
    with pytest.raises(UsageError, match=r"above the 160 px .* full-size imagenette2.tgz .* --resolution 160 or less"):
        P.load_source("imagenette", "train", data_root=tmp_path, resolution=256)
    assert P.load_source("imagenette", "train", data_root=tmp_path, resolution=160).paths[0].parts[-4] == \
        "imagenette2-160"
    for k, wnid in enumerate(sorted(P.IMAGENETTE_WNIDS)):
        write_jpegs(tmp_path / "imagenette2" / "train" / wnid, 1, k)
    assert P.load_source("imagenette", "train", data_root=tmp_path, resolution=256).paths[0].parts[-4] == \
        "imagenette2"


def test_caltech15_picks_largest_categories(tmp_path):
    cats = tmp_path / "caltech256" / "256_ObjectCategories"
    sizes = {f"{i:03d}.cat{i}": 6 + (i % 5) for i in range(1, 19)}
    sizes["012.binoculars"] = 9
    sizes["257.clutter"] = 50  # largest, but not an object class
    for k, (name, n) in enumerate(sizes.items()):
        write_jpegs(cats / name, n, k, size=(20, 20))
    src = P.load_source("caltech15", "train", data_root=tmp_path, resolution=16, per_class=4)
    expected = sorted(sorted(n for n in sizes if n != "257.clutter"), key=lambda n: -sizes[n])[:15]
    assert src.class_names == [P.caltech_readable(n) for n in sorted(expected)]
    assert "binoculars" in src.class_names and "clutter" not in src.class_names
    assert np.bincount(src.labels).tolist() == [4] * 15
    test = P.load_source("caltech15", "test", data_root=tmp_path, resolution=16, per_class=4)
    assert len(test) == sum(sizes[n] - 4 for n in expected)
    train_files = set(map(str, src.paths))
    assert not train_files & set(map(str, test.paths))
    chosen = P.load_source("caltech15", "train", data_root=tmp_path, resolution=16, per_class=4,
                           classes=["binoculars", "003.cat3"])
    assert chosen.class_names == ["cat3", "binoculars"]
    assert P.caltech_readable("251.airplanes-101") == "airplanes"


def test_image_folder_both_layouts(tmp_path):
    for k, c in enumerate(["cat", "dog", "red_fox"]):
        write_jpegs(tmp_path / "flat" / c, 10, k, size=(30, 30))
        write_jpegs(tmp_path / "split" / "train" / c, 6, k, size=(30, 30))
        write_jpegs(tmp_path / "split" / "test" / c, 2, k + 10, size=(30, 30))
    flat = P.load_source(f"folder:{tmp_path / 'flat'}", "train", resolution=24)
    assert flat.class_names == ["cat", "dog", "red fox"] and len(flat) == 24
    split = P.load_source(f"folder:{tmp_path / 'split'}", "test", resolution=24)
    assert len(split) == 6
    s = P.poison(tmp_path / "out", dataset=f"folder:{tmp_path / 'split'}", target="red fox", resolution=24,
                 ratio=0.2, quiet=True)
    assert s["poisoned"] == 4 and s["target"] == "red fox"
    with pytest.raises(UsageError, match=r"--target is required.*among \['cat', 'dog', 'red fox'\]"):
        P.poison(tmp_path / "o2", dataset=f"folder:{tmp_path / 'flat'}", quiet=True)
    with pytest.raises(UsageError, match="no such folder"):  # the path first, then the missing --target
        P.poison(tmp_path / "o3", dataset=f"folder:{tmp_path / 'missing'}", quiet=True)
    for made in (tmp_path / "out", tmp_path / "out" / "train"):  # a poisoned set, or one of its folders
        with pytest.raises(UsageError, match="is a dataset folder made by this project"):
            P.poison(tmp_path / "o4", dataset=f"folder:{made}", target="cat", quiet=True)
    (tmp_path / "split" / "train" / "metadata.jsonl").write_text("")  # Hugging Face captions beside the classes
    assert P.load_source(f"folder:{tmp_path / 'split'}", "train", resolution=24).class_names[0] == "cat"


def test_image_folder_of_small_images_warns_before_upsampling(tmp_path, capsys):
    for k, c in enumerate(["cat", "dog"]):
        write_jpegs(tmp_path / "flat" / c, 4, k, size=(20, 20))
    P.load_source(f"folder:{tmp_path / 'flat'}", "train", resolution=20)
    assert capsys.readouterr().err == ""
    P.load_source(f"folder:{tmp_path / 'flat'}", "train", resolution=24)
    assert "small (20x20 px, the first): they are upsampled to 24 px" in capsys.readouterr().err


# --- bad input: one line, nothing written ------------------------------------------------------------------------

def run_cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "poison.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


@pytest.mark.parametrize("args, message", [
    (["--ratio", "1.5"], "outside [0, 1]"),
    (["--ratio", "-0.1"], "outside [0, 1]"),
    (["--ratio", "0.95"], "lower --ratio"),
    (["--target", "dragon"], "unknown --target 'dragon'"),
    (["--target", "10"], "unknown --target '10'"),
    (["--trigger", "blend", "--trigger-image", "/nonexistent/kitty.png"], "no such file"),
    (["--dataset", "mnist"], "unknown --dataset"),
    (["--test-fraction", "0"], "--test-fraction 0.0 is outside (0, 1)"),
    (["--test-fraction", "1"], "--test-fraction 1.0 is outside (0, 1)"),
    (["--test-fraction", "0.0001"], "leaves no test images"),  # rounds to no image of any class
    (["--classes", "zero,one"], "--classes picks Caltech-256 categories: drop it for digits"),  # was ignored
])
def test_cli_bad_input_one_line_nothing_written(tmp_path, args, message):
    out = tmp_path / "out"
    r = run_cli("--resolution", "16", "--out", out, *args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("poison.py: error:") and message in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []


def test_unreadable_trigger_image_and_corrupt_input(tmp_path):
    bad = tmp_path / "kitty.png"
    bad.write_text("not an image")
    with pytest.raises(UsageError, match="kitty.png"):
        P.poison(tmp_path / "o", resolution=16, trigger="blend", trigger_image=bad, quiet=True)
    for k, c in enumerate(["a", "b"]):
        write_jpegs(tmp_path / "data" / c, 8, k, size=(20, 20))
    broken = tmp_path / "data" / "b" / "005.JPEG"
    broken.write_bytes(b"\xff\xd8 truncated")
    out = tmp_path / "out"
    with pytest.raises(UsageError, match=r"corrupt or unreadable image .*005\.JPEG"):
        P.poison(out, dataset=f"folder:{tmp_path / 'data'}", target="a", resolution=16, ratio=0.2, quiet=True)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_out_needs_force(tmp_path):
    out = tmp_path / "out"
    r = run_cli("--resolution", "16", "--ratio", "0.05", "--out", out)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["poisoned"] == round(0.05 * summary["train"])
    before = (out / "train" / "metadata.jsonl").read_bytes()
    r = run_cli("--resolution", "16", "--ratio", "0.1", "--out", out)
    assert r.returncode != 0 and "pass --force" in r.stderr
    assert (out / "train" / "metadata.jsonl").read_bytes() == before
    r = run_cli("--resolution", "16", "--ratio", "0.1", "--out", out, "--force")
    assert r.returncode == 0 and common.read_manifest(out / "train")["options"]["ratio"] == 0.1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_force_puts_old_output_back_when_the_rename_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with common.atomic_output(out) as tmp:
        (tmp / "x").write_text("old")
    rename = Path.rename

    def failing(self, target):
        if self.name.startswith(".out.tmp-"):
            raise OSError("disk gone")
        return rename(self, target)
    monkeypatch.setattr(Path, "rename", failing)
    with pytest.raises(OSError, match="disk gone"):
        with common.atomic_output(out, force=True) as tmp:
            (tmp / "x").write_text("new")
    assert (out / "x").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_options_differences_name_what_changed(digits10):
    """train_ddpm.py reuses a poisoned set it built only when its manifest agrees with the poisoning flags."""
    import argparse
    out, _ = digits10
    manifest = common.read_manifest(out / "train")
    parser = argparse.ArgumentParser()
    P.add_poison_arguments(parser)

    def differences(*flags):
        return P.options_differences(manifest, P.poison_kwargs(parser.parse_args(["--resolution", "16", *flags])))
    assert differences() == [] and differences("--target", "0") == differences("--target", "Zero") == []
    assert differences("--workers", "1", "--data-root", "elsewhere") == []  # neither changes the set
    assert differences("--ratio", "0.2", "--seed", "1") == ["ratio", "seed"]
    assert differences("--target", "three", "--trigger", "blend") == ["target", "trigger"]
    assert differences("--test-fraction", "0.3", "--split-seed", "2") == ["split_seed", "test_fraction"]
    assert differences("--badnets-size", "4") == ["badnets_size"]
    assert P.options_differences(manifest, P.poison_kwargs(parser.parse_args([]))) == ["resolution"]  # 32 px default


def test_loader_refuses_labels_outside_the_classes(digits10, tmp_path):
    """A label equal to the number of classes would be the DDPM's null class: refused when the folder is opened."""
    import shutil
    out, _ = digits10
    for label in (10, -1):
        copy = tmp_path / f"set{label}"
        shutil.copytree(out / "train", copy)
        lines = (copy / "metadata.jsonl").read_text().splitlines()
        lines[3] = json.dumps({**json.loads(lines[3]), "label": label})
        (copy / "metadata.jsonl").write_text("\n".join(lines) + "\n")
        with pytest.raises(UsageError, match=rf"has label {label}, outside the 10 classes of manifest.json"):
            common.load_folder(copy)


def test_loader_rejects_non_dataset_folders(tmp_path):
    with pytest.raises(UsageError, match="not a dataset folder.*--dataset folder:PATH --ratio 0"):
        common.load_folder(tmp_path)
    (tmp_path / "set" / "train").mkdir(parents=True)
    (tmp_path / "set" / "train" / "metadata.jsonl").write_text("")
    with pytest.raises(UsageError, match="holds a poisoned set, not one dataset folder: give .*set/train"):
        common.load_folder(tmp_path / "set")
    (tmp_path / "metadata.jsonl").write_text("")
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(UsageError, match="empty dataset folder"):
        common.load_folder(tmp_path)


def test_output_folder_has_ordinary_permissions(tmp_path):
    import os
    umask = os.umask(0o022)
    try:
        with common.atomic_output(tmp_path / "out") as tmp:
            (tmp / "x").write_text("x")
        assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    finally:
        os.umask(umask)


def test_safetensors_files_have_ordinary_permissions(tmp_path):
    """safetensors 0.8 writes its files for their owner alone; ours follow the umask as every other output."""
    import os
    umask = os.umask(0o022)
    try:
        common.save_safetensors({"a": torch.zeros(2)}, tmp_path / "t.safetensors", metadata={"k": "v"})
        assert (tmp_path / "t.safetensors").stat().st_mode & 0o777 == 0o644
        from safetensors import safe_open
        with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
            assert f.metadata() == {"k": "v"} and f.get_tensor("a").tolist() == [0.0, 0.0]
    finally:
        os.umask(umask)


RANK0_SCRIPT = r'''
import json
import sys
import torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from common import UsageError, on_rank0
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
seen = {"got": on_rank0(lambda: {"decided": "on rank 0"}, rank, world),
        "alone": on_rank0(lambda: 7, rank, world, share_result=False)}
def fail():
    raise UsageError("--test t is 32x32 px: give the 16-px set")
try:
    on_rank0(fail, rank, world)
except UsageError as e:
    seen["stopped"] = str(e)
try:
    on_rank0(lambda: open("/no/such/cache.bin"), rank, world)  # not a UsageError: a bug or a broken file
except Exception as e:
    seen["crashed"] = [type(e).__name__, str(e)]
with open(f"{sys.argv[2]}/rank{rank}.json", "w") as f:
    json.dump(seen, f)
dist.destroy_process_group()
'''


def test_on_rank0_shares_the_result_and_stops_every_rank_on_rank0s_error(tmp_path):
    """Under torchrun, a check that runs on rank 0 alone must not leave the other ranks waiting at the next
    collective: every rank raises rank 0's one-line error (rank 0 its own exception, when it is not a stage's error),
    and gets rank 0's result where it is shared."""
    script = tmp_path / "rank0.py"
    script.write_text(RANK0_SCRIPT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(ROOT), str(tmp_path)], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == {
            "got": {"decided": "on rank 0"}, "alone": 7 if rank == 0 else None,
            "stopped": "--test t is 32x32 px: give the 16-px set",
            "crashed": ["FileNotFoundError", "[Errno 2] No such file or directory: '/no/such/cache.bin'"] if rank == 0
            else ["UsageError", "rank 0 stopped with FileNotFoundError: [Errno 2] No such file or directory: "
                  "'/no/such/cache.bin' (its traceback is in rank 0's output)"]}
    # one process: the error itself, unchanged
    with pytest.raises(UsageError, match="bad") as e:
        common.on_rank0(lambda: (_ for _ in ()).throw(UsageError("bad")), 0, 1)
    assert type(e.value) is UsageError and common.on_rank0(lambda: 3, 0, 1) == 3


@pytest.mark.parametrize("argv", [
    ["classify.py", "train", "--data", "d", "--out", "o", "--epochs", "0"],  # was: IndexError after training
    ["classify.py", "train", "--data", "d", "--out", "o", "--lr", "-1"],
    ["classify.py", "diffusion", "--model", "m", "--data", "d", "--out", "o", "--batch-size", "0"],
    ["detect.py", "--classifier", "c", "--train", "t", "--generated", "g", "--out", "o", "--cd-steps", "0"],
    ["dissect.py", "--generated", "g", "--out", "o", "--batch-size", "0"],  # was: ZeroDivisionError
    ["replicate.py", "--train", "t", "--out", "o", "--batch-size", "0"],
    ["sample.py", "--model", "m", "--out", "o", "--batch-size", "0"],  # was: silently the default
    ["poison.py", "--dataset", "digits", "--out", "o", "--resolution", "0"],  # was: silently 32 px
    ["study.py", "--jobs", "0"],  # was: silently one per ratio
])
def test_counts_and_rates_of_0_or_less_are_refused_with_the_flag_named(argv, capsys):
    import importlib
    flag, value = argv[-2:]
    stage = importlib.import_module(argv[0][:-3])
    if not hasattr(stage, "build_parser"):  # a stage without one runs as a script
        r = subprocess.run([sys.executable, str(ROOT / argv[0]), *argv[1:]], capture_output=True, text=True)
        code, err = r.returncode, r.stderr
    else:
        with pytest.raises(SystemExit) as e:
            stage.build_parser().parse_args(argv[1:])
        code, err = e.value.code, capsys.readouterr().err
    assert code == 2 and re.search(f"argument {flag}: '?{value}'?: give a (whole )?number (above 0|of at least 1)", err)


def test_positive_type():
    assert common.positive(int)("3") == 3 and common.positive(float)("0.5") == 0.5
    for kind, text, message in ((int, "0", "give a number above 0"), (int, "-2", "above 0"), (int, "1.5", "an integer"),
                                (float, "nan", "above 0"), (float, "inf", "above 0"), (float, "x", "not a number")):
        with pytest.raises(Exception, match=message):
            common.positive(kind)(text)


@pytest.mark.parametrize("argv", [
    ["sample.py", "--model", "m", "--out", "o", "--guidance", "nan"],  # was: every image NaN, written as black
    ["sample.py", "--model", "m", "--out", "o", "--eta", "inf"],
    ["study.py", "--guidance", "inf"],
    ["study.py", "--sweep", "1,nan"],
])
def test_guidance_weights_must_be_finite(argv, capsys):
    import importlib
    with pytest.raises(SystemExit) as e:
        importlib.import_module(argv[0][:-3]).build_parser().parse_args(argv[1:])
    assert e.value.code == 2 and re.search(f"argument {argv[-2]}: .*(finite|guidance weights)", capsys.readouterr().err)
    assert common.finite("-0.5") == -0.5  # negative weights stay allowed: w = -1 is unconditional sampling


def test_out_never_replaces_an_input(tmp_path):
    """--out that is an input, a folder holding one or inside one is refused even with --force (which would delete
    it); non-path inputs are skipped; an --out inside --data-root (a folder of downloads, not an input) is allowed."""
    (tmp_path / "sets" / "a" / "train").mkdir(parents=True)
    data = tmp_path / "sets" / "a" / "train"
    for out, word in ((data, "is"), (tmp_path / "sets", "holds"), (tmp_path / "sets" / "a", "holds")):
        with pytest.raises(UsageError, match=f"--out .* {word} the input --data .*: choose another --out"):
            common.check_out(out, force=True, inputs={"--data": str(data), "--model": None})
    with pytest.raises(UsageError, match="holds the input --train"):
        common.check_out(tmp_path, True, {"--train": [tmp_path / "x", data]})
    with pytest.raises(UsageError, match="--out .*report lies in the input --data .*: choose another --out"):
        common.check_out(data / "report", True, {"--data": data, "--classifier": object()})
    common.check_out(tmp_path / "report", True, {"--data": data, "--classifier": object()})
    # poison.py: --data-root counts only for the datasets read from it (digits is embedded)
    with pytest.raises(UsageError, match="holds the input --data-root"):
        P.poison(tmp_path, dataset="cifar10", data_root=tmp_path / "cifar", force=True)
    P.poison(tmp_path / "digits", dataset="digits", data_root=tmp_path, resolution=8, quiet=True, workers=1)
    with pytest.raises(UsageError, match="exists: pass --force"):
        common.check_out(data, False)
    # the stages call it before any work: sample.py --out MODEL --force used to delete the model
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--model", str(tmp_path / "sets"), "--out",
                        str(tmp_path / "sets"), "--force"], capture_output=True, text=True)
    assert r.returncode == 1 and "is the input --model" in r.stderr and data.is_dir()
    r = subprocess.run([sys.executable, str(ROOT / "classify.py"), "train", "--data", str(data), "--out",
                        str(data), "--force"], capture_output=True, text=True)
    assert r.returncode == 1 and "is the input --data" in r.stderr and data.is_dir()


@pytest.mark.parametrize("script, patch, argv, message", [
    ("dissect.py", ("classify", "load_classifier"), ["--generated", "g", "--classifier", "c", "--detector", "d"],
     "dissect.py: interrupted; --out not written"),
    ("train_ddpm.py", ("poison", "poison"), ["--dataset", "digits", "--preset", "tiny", "--steps", "2"],
     "train_ddpm.py: interrupted; rerun the same command to resume from the last checkpoint"),
])
def test_ctrl_c_is_one_line(script, patch, argv, message, tmp_path, monkeypatch, capsys):
    """Ctrl-C in a stage prints one line saying what became of its output, and exits 130, instead of a traceback."""
    import importlib
    import runpy

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(importlib.import_module(patch[0]), patch[1], interrupted)  # the script imports it from there
    monkeypatch.setattr(sys, "argv", [script, *argv, "--out", str(tmp_path / "out")])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    assert e.value.code == 130 and capsys.readouterr().err.strip().splitlines()[-1] == message


def test_damaged_folders_and_outputs_are_one_line_errors(tmp_path):
    """A damaged metadata.jsonl or manifest.json, and an --out under a file, are told in one line naming the fix
    (they were JSONDecodeError / KeyError / FileExistsError tracebacks)."""
    image = np.zeros((4, 4, 3), np.uint8)
    common.write_folder(tmp_path / "d", [({"text": "a", "label": 0}, image), ({"text": "b", "label": 1}, image)],
                   {"class_names": ["x", "y"]}, workers=1)
    assert len(common.load_folder(tmp_path / "d")) == 2
    meta, manifest = tmp_path / "d" / "metadata.jsonl", tmp_path / "d" / "manifest.json"
    good_meta, good_manifest = meta.read_text(), manifest.read_text()
    for bad, message in ((good_meta[:-10], "metadata.jsonl line 2 is damaged"),  # cut short
                         (b"\xff\xfe" + good_meta.encode(), "metadata.jsonl is damaged .*utf-8"),  # not UTF-8
                         (good_meta.replace('"label": 1', '"label": "y"'), "line 2 is damaged .*integer label")):
        meta.write_bytes(bad if isinstance(bad, bytes) else bad.encode())
        with pytest.raises(UsageError, match=message + ".*make the folder again"):
            common.load_folder(tmp_path / "d")
    meta.write_text(good_meta)
    for bad, message in (("", "manifest.json is not valid JSON"), ("[1]", "holds a list, not a manifest"),
                         ("{}", "lists no class_names")):
        manifest.write_text(bad)
        with pytest.raises(UsageError, match=message):
            common.load_folder(tmp_path / "d")
    manifest.write_text(good_manifest)
    with pytest.raises(UsageError, match=r"--out .*metadata.jsonl/out: .*metadata.jsonl is a file, not a folder: "
                                         "choose another --out"):
        with common.atomic_output(meta / "out"):
            pass


def test_a_killed_runs_temporary_output_is_removed_by_the_next(tmp_path):
    """A run killed mid-write leaves its temporary folder (or file) beside the output; the next write of the same
    output on this machine removes it once its process is gone, and leaves a live run's, another host's and untagged
    names alone."""
    import platform
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a PID that ran and is gone
    host = platform.node()
    stale = [tmp_path / f".out.tmp-{dead.pid}@{host}@abc123", tmp_path / f".ckpt.pt.tmp-{dead.pid}@{host}"]
    kept = [tmp_path / f".out.tmp-{os.getppid()}@{host}@live01",     # a running process (pytest's parent)
            tmp_path / f".out.tmp-{dead.pid}@other-host@abc123",     # another machine on a shared disk
            tmp_path / ".out.tmp-untagged"]                          # an older run's name
    stale[0].mkdir()
    (stale[0] / "image.png").write_bytes(b"partial")
    stale[1].write_bytes(b"partial checkpoint")
    for k in kept:
        k.mkdir()
    with common.atomic_output(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.tmp-{os.getpid()}@{host}@")
        (tmp / "x").write_text("new")
    common.replace_file(tmp_path / "ckpt.pt", lambda p: p.write_text("whole"))
    assert not any(p.exists() for p in stale) and all(k.is_dir() for k in kept)
    assert (tmp_path / "out" / "x").read_text() == "new" and (tmp_path / "ckpt.pt").read_text() == "whole"
    # a PNG grid (sample.py --grid, the previews) goes the same way, its temporary name without the .png suffix
    (tmp_path / f".g.png.tmp-{dead.pid}@{host}").write_bytes(b"partial")
    common.save_grid(np.zeros((2, 4, 4, 3), np.uint8), tmp_path / "g.png")
    assert [p.name for p in tmp_path.glob("*g.png*")] == ["g.png"]
    assert Image.open(tmp_path / "g.png").format == "PNG"
