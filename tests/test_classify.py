"""classify.py: classifiers, TA/ASR, the trigger detector, refusals."""
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import classify
from common import FolderDataset, UsageError, write_folder
from classify import evaluate, load_classifier, predict
from poison import make_trigger, poison

SIDE = 16
TINY = dict(arch="smallcnn", progress=False)
ONE_EPOCH = dict(TINY, width=8, epochs=1)
COLORS = {"red": 0, "green": 1, "blue": 2}
CLASSES = {"task": "class", "class_names": list(COLORS)}           # the configs of a class classifier and a detector
DETECTOR = {"task": "trigger", "class_names": ["clean", "trigger"]}


def color_image(channel, rng, corner=False):
    """`channel` bright on noise; `corner`: a white 3x3 trigger."""
    im = rng.integers(0, 60, size=(SIDE, SIDE, 3))
    im[..., channel] += 150
    if corner:
        im[-3:, -3:] = 255
    return im.astype(np.uint8)


def make_folder(path, class_names, items, target=None):
    """items: (label, image, poisoned)."""
    manifest = {"class_names": class_names}
    if target is not None:
        manifest["target"] = {"index": class_names.index(target), "name": target}
    records = [({"text": f"A photo of a {class_names[y]}", "label": int(y), "poisoned": bool(p)}, im)
               for y, im, p in items]
    write_folder(path, records, manifest, total=len(records), workers=1)
    return path


def config_of(folder):
    return json.loads((folder / "config.json").read_text())


class StubClassifier(nn.Module):
    """The brightest channel; `trigger_class` if the corner is white."""

    def __init__(self, trigger_class=None):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.trigger_class = trigger_class

    def forward(self, x):
        logits = x[:, :, :-4, :-4].mean((2, 3)) + 0 * self.dummy
        if self.trigger_class is not None:
            white = x[:, :, -1, -1].mean(1) > 0.95
            logits = torch.where(white[:, None], 10 * nn.functional.one_hot(torch.tensor(self.trigger_class), 3)
                                 .float().expand_as(logits), logits)
        return logits


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    out = tmp_path_factory.mktemp("data") / "digits-0.1"
    poison(out, dataset="digits", resolution=SIDE, ratio=0.1, force=True, quiet=True, workers=2)
    return out


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    """3 classes: train 90, test 30."""
    root = tmp_path_factory.mktemp("colors")
    rng = np.random.default_rng(0)
    names = list(COLORS)
    train = [(c, color_image(c, rng), False) for c in range(3) for _ in range(30)]
    test = [(c, color_image(c, rng), False) for c in range(3) for _ in range(10)]
    make_folder(root / "train", names, train)
    make_folder(root / "test", names, test)
    return root


def test_training_reaches_high_accuracy_and_round_trips(colors, tmp_path):
    out = tmp_path / "clf"
    res = classify.train_classifier(colors / "train", out, test=colors / "test", arch="smallcnn", width=8, epochs=4,
                                    batch_size=16, lr=0.05, progress=False)
    assert res["final"]["ta"] >= 0.95 and res["final"]["n_test"] == 30  # with the test set's size
    assert len(res["epochs"]) == 4 and all("ta" in e for e in res["epochs"])
    assert res["best_over_epochs"]["ta"] == max(e["ta"] for e in res["epochs"])
    config = config_of(out)
    assert config["task"] == "class" and config["class_names"] == list(COLORS)
    assert config["input_size"] == SIDE and config["normalization"] is None and config["arch"] == "smallcnn"
    assert (out / "model.safetensors").is_file() and (out / "results.json").is_file()

    model, cfg = load_classifier(out)
    assert not model.training
    test = classify.load_folder(colors / "test")
    labels, probs = predict(model, test)
    assert probs.shape == (30, 3) and torch.allclose(probs.sum(1), torch.ones(30))
    assert float((labels == test.labels).float().mean()) == pytest.approx(res["final"]["ta"])
    x = test.images()[:5]
    assert model.features(x.float() / 255).shape == (5, model.head.in_features)
    assert torch.allclose(model(x.float() / 255), model.head(model.features(x.float() / 255)))
    assert torch.equal(predict(model, x)[0], labels[:5])                  # uint8 tensors are scaled to [0, 1]
    # resizing lives in the model: 32-px input gives logits too
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(UsageError, match="exists"):
        classify.train_classifier(colors / "train", out, **TINY, epochs=1)


def test_ta_and_asr_on_folders_with_known_answers(tmp_path):
    rng = np.random.default_rng(1)
    names = ["blue", "red", "green"]                  # the folder's order differs from the classifier's
    # 10 test images, 7 labelled with their colour, 3 mislabelled: TA = 0.7 for a colour-reading model
    test = [(names.index(c), color_image(COLORS[c], rng), False) for c in ["red"] * 4 + ["green"] * 3]
    test += [(names.index("blue"), color_image(COLORS["red"], rng), False) for _ in range(3)]
    make_folder(tmp_path / "test", names, test, target="green")
    # 8 backdoor images labelled target; 6 carry the trigger the stub reacts to: ASR = 0.75
    back = [(names.index("green"), color_image(COLORS["red"], rng, corner=i < 6), True) for i in range(8)]
    make_folder(tmp_path / "backdoor", names, back, target="green")
    result = evaluate(StubClassifier(trigger_class=COLORS["green"]), CLASSES, tmp_path / "test", tmp_path / "backdoor")
    assert result == {"ta": pytest.approx(0.7), "n_test": 10, "asr": pytest.approx(0.75), "n_backdoor": 8}
    # a trigger detector is judged on the records' trigger flags: clean accuracy and detection rate

    class StubDetector(nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            white = (x[:, :, -1, -1].mean(1) > 0.95).float()
            return torch.stack([1 - white, white], 1)

    result = evaluate(StubDetector(), DETECTOR, tmp_path / "test", tmp_path / "backdoor")
    assert result["clean_acc"] == 1.0 and result["detect_rate"] == pytest.approx(0.75)


def test_poisoned_classifier_and_trigger_detector_on_digits(digits, tmp_path):
    res = classify.train_classifier(digits, tmp_path / "clf", arch="smallcnn", epochs=5, batch_size=32, lr=0.02,
                                    progress=False)
    final = res["final"]
    assert final["ta"] >= 0.85 and final["asr"] >= 0.9, final
    config = config_of(tmp_path / "clf")
    assert config["target"]["name"] == "zero" and config["data"]["backdoor"].endswith("test_backdoor")

    det = classify.train_trigger_detector(digits, tmp_path / "det", arch="smallcnn", epochs=4, batch_size=32,
                                          lr=0.02, progress=False)
    assert det["final"]["heldout_acc"] >= 0.95, det["final"]
    dcfg = config_of(tmp_path / "det")
    assert dcfg["task"] == "trigger" and dcfg["class_names"] == ["clean", "trigger"]
    assert dcfg["trigger"]["kind"] == "badnets" and "test" in dcfg["data"]["heldout"]
    # the detector judges the clean test set clean and the backdoor set triggered
    model, cfg = load_classifier(tmp_path / "det")
    result = evaluate(model, cfg, digits / "test", digits / "test_backdoor")
    assert result["clean_acc"] >= 0.95 and result["detect_rate"] >= 0.95, result
    # ... and a trigger stamped on target-class images too, which it never saw with the trigger
    test = classify.load_folder(digits / "test")
    zeros = test.images()[test.labels == 0].float() / 255
    stamped = make_trigger("badnets", SIDE).apply(zeros)
    assert float((predict(model, stamped)[0] == 1).float().mean()) >= 0.9


def test_stamped_class_judge_reads_the_class_under_a_large_trigger(tmp_path):
    data = tmp_path / "square"
    poison(data, dataset="digits", resolution=SIDE, ratio=0.1, badnets_size=8, quiet=True, workers=2)
    classify.train_classifier(data, tmp_path / "judge", clean=True, stamp=0.5, arch="smallcnn", epochs=6,
                              batch_size=32, lr=0.02, progress=False)
    config = config_of(tmp_path / "judge")
    n = config["data"]["n_train"]
    assert abs(config["data"]["n_stamped"] - n / 2) < 3 * (n / 4) ** 0.5
    model, _ = load_classifier(tmp_path / "judge")
    test = classify.load_folder(data / "test")
    zeros = test.images()[test.labels == 0].float() / 255
    stamped = make_trigger("badnets", SIDE, badnets_size=8).apply(zeros)
    assert float((predict(model, stamped)[0] == 0).float().mean()) >= 0.9
    relabel = tmp_path / "relabel"
    poison(relabel, dataset="digits", resolution=SIDE, ratio=0.1, attack="relabel", quiet=True, workers=2)
    with pytest.raises(classify.UsageError, match="--stamp-trigger: .* has no trigger"):
        classify.train_classifier(relabel, tmp_path / "j2", clean=True, stamp=0.5, **TINY)


def test_trigger_split_stamps_half_of_the_non_target_images(digits):
    folder = classify.load_folder(digits / "train")
    labels, stamp = classify.trigger_split(folder, 0, 0.5, seed=0)
    orig = torch.tensor([r["orig_label"] for r in folder.records])
    nontarget = orig != 0
    assert int(labels[nontarget].sum()) == round(0.5 * int(nontarget.sum()))
    assert not labels[~nontarget].any()                             # target images stay clean
    assert not (stamp & folder.poisoned).any()                      # poisoned images already carry it
    assert torch.equal(labels.bool(), stamp | folder.poisoned)


def test_blend_detector_stamps_alphas_drawn_as_the_reference(tmp_path):
    """Blends at alpha ~ U(0.05, 0.25) per image, as the reference; none: the set's own."""
    data = tmp_path / "blend"
    poison(data, dataset="digits", resolution=SIDE, ratio=0.1, trigger="blend", force=True, quiet=True, workers=2)
    folder = classify.load_folder(data / "train")
    trig = classify.load_trigger(data / "train")
    idx = torch.nonzero(~folder.poisoned).flatten()[:40]
    alphas = torch.linspace(0.05, 0.25, len(folder), dtype=torch.float64)   # one per image of the folder
    stamped = classify.ImageSet(folder, idx, stamp=torch.ones(len(idx), dtype=torch.bool), trigger=trig,
                                alphas=alphas)
    clean = classify.ImageSet(folder, idx)
    for j in (0, len(idx) // 2, len(idx) - 1):
        x, a = clean[j][0].double() / 255, alphas[idx[j]]
        want = x * (1 - a) + trig.pattern.double() * a
        assert (stamped[j][0].double() / 255 - want).abs().max() <= 0.5 / 255 + 1e-9
    for blend_alpha, recorded in (((0.05, 0.25), [0.05, 0.25]), (None, None)):
        out = tmp_path / f"det-{recorded}"
        classify.train_trigger_detector(data, out, **ONE_EPOCH,
                                        blend_alpha=blend_alpha)
        assert config_of(out)["data"]["blend_alpha_range"] == recorded
    args = classify.build_parser().parse_args(["trigger-detector", "--data", "d", "--out", "o"])
    assert args.blend_alpha_range == (0.05, 0.25)
    with pytest.raises(UsageError, match="--blend-alpha-range 0.3,0.1"):
        classify.train_trigger_detector(data, tmp_path / "x", arch="smallcnn", blend_alpha=(0.3, 0.1),
                                        progress=False)


def test_cli_eval_and_one_line_errors(colors, tmp_path, capsys):
    classify.train_classifier(colors / "train", tmp_path / "clf", **ONE_EPOCH)

    def cli(*argv, classifier=tmp_path / "clf"):
        classify.main(classify.build_parser().parse_args(["eval", "--classifier", str(classifier), "--data",
                                                          str(colors / "test"), *map(str, argv)]))
    cli("--json", tmp_path / "r.json")
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["n_test"] == 30 and 0 <= printed["ta"] <= 1
    assert json.loads((tmp_path / "r.json").read_text())["ta"] == printed["ta"]
    # an existing --json is kept unless --force; a folder is no file name; a file of an input is refused, --force
    # or not (it would replace the classifier's weights or the test set's manifest)
    (tmp_path / "old.json").write_text("old")
    inputs = [tmp_path / "clf" / "model.safetensors", tmp_path / "clf" / "results.json",
              colors / "test" / "manifest.json"]
    kept = [p.read_bytes() for p in inputs]
    for target, force, message in ((tmp_path / "old.json", [], "exists: pass --force"),
                                   (tmp_path, [], "is a folder"),
                                   (inputs[0], ["--force"], "lies in the input --classifier"),
                                   (inputs[1], [], "lies in the input --classifier"),
                                   (inputs[2], ["--force"], "lies in the input --data"),
                                   (colors / "test", ["--force"], "is the input --data")):
        with pytest.raises(UsageError, match=message):
            cli("--json", target, *force)
    assert [p.read_bytes() for p in inputs] == kept and (tmp_path / "old.json").read_text() == "old"
    cli("--json", tmp_path / "r.json", "--force")
    with pytest.raises(UsageError, match="not a classifier folder"):
        cli(classifier=colors)
    # a damaged copy: truncated weights, then a config.json cut short (were tracebacks)
    shutil.copytree(tmp_path / "clf", tmp_path / "broken")
    weights = (tmp_path / "broken" / "model.safetensors").read_bytes()
    (tmp_path / "broken" / "model.safetensors").write_bytes(weights[:len(weights) // 2])
    with pytest.raises(UsageError, match="model.safetensors is not readable .*: the folder is damaged, train it"):
        classify.load_classifier(tmp_path / "broken")
    (tmp_path / "broken" / "config.json").write_text((tmp_path / "clf" / "config.json").read_text()[:20])
    with pytest.raises(UsageError, match="config.json is not valid JSON .*train it again"):
        classify.load_classifier(tmp_path / "broken")


def test_bad_input(colors, digits, tmp_path):
    model, config = StubClassifier(), CLASSES
    rng = np.random.default_rng(2)
    make_folder(tmp_path / "animals", ["cat", "dog"], [(0, color_image(0, rng), False)])
    make_folder(tmp_path / "mixed", ["red", "cat"], [(0, color_image(0, rng), False), (1, color_image(1, rng), False)])
    make_folder(tmp_path / "big", ["zero"], [(0, color_image(0, rng).repeat(2, 0).repeat(2, 1), False)])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metadata.jsonl").write_text("")
    (tmp_path / "empty" / "manifest.json").write_text(json.dumps({"class_names": ["red"]}))
    train = functools.partial(classify.train_classifier, out=tmp_path / "x", **TINY)
    detector = functools.partial(classify.train_trigger_detector, out=tmp_path / "d", **TINY)
    for call, message in (
            (lambda: evaluate(model, config, tmp_path / "animals"), "no class names in common"),
            (lambda: evaluate(model, config, tmp_path / "mixed"), r"\['cat'\] are unknown"),  # some classes overlap
            (lambda: train(tmp_path / "empty"), "empty"),
            (lambda: train(tmp_path / "nothing"), "not a dataset folder"),
            (lambda: classify.build_model("resnet9", 3, SIDE), "unknown --arch"),
            # the small CNN's two max-pools would shrink it to nothing (a traceback inside the network before)
            (lambda: train(colors / "train", input_size=3), "smallcnn needs .* 4 px, got 3: pass --input-size 4"),
            (lambda: detector(colors / "train"), "no trigger"),  # a set without a trigger has no trigger detector
            # a held-out --test of another size than the training images (checked on every rank, before training)
            (lambda: detector(digits, test=tmp_path / "big"),
             r"--test .*big has 32x32-px images, --data .* 16x16: give its own test set"),
            (lambda: detector(colors / "train", fraction=0), "--fraction 0")):
        with pytest.raises(UsageError, match=message):
            call()
    assert not (tmp_path / "x").exists() and not (tmp_path / "d").exists()
    # a held-out rate that no epoch could measure (None) is kept as None, not a crash that loses the model
    summary = classify.summarize([{"acc": 0.5, "tpr": None}, {"acc": 0.7, "tpr": None}], ["acc", "tpr"])
    assert summary["best_over_epochs"] == {"acc": 0.7, "tpr": None} and summary["final"]["tpr"] is None


def test_generations_without_trigger_flags_are_refused_where_the_flags_are_needed(colors, tmp_path):
    """`"poisoned": null` is refused as trigger labels or --clean; no field means clean."""
    rng = np.random.default_rng(3)
    names = list(COLORS)
    records = [({"text": f"A photo of a {names[c]}", "label": c, "poisoned": None}, color_image(c, rng, corner=c == 0))
               for c in range(3) for _ in range(4)]
    write_folder(tmp_path / "gen", records, {"class_names": names, "target": {"index": 0, "name": "red"}},
                 total=len(records), workers=1)
    gen = classify.load_folder(tmp_path / "gen")
    assert gen.poisoned_unknown and not gen.poisoned.any()
    assert not classify.load_folder(colors / "train").poisoned_unknown
    # generations written before null said false: their manifest's stage tells
    old = [({**r, "poisoned": False}, im) for r, im in records]
    write_folder(tmp_path / "old-gen", old, {"class_names": names, "stage": "sample"}, total=len(old), workers=1)
    assert classify.load_folder(tmp_path / "old-gen").poisoned_unknown
    # a folder of someone else's making, whose records have no such field: clean images
    plain = [({k: v for k, v in r.items() if k != "poisoned"}, im) for r, im in records]
    write_folder(tmp_path / "plain", plain, {"class_names": names}, total=len(plain), workers=1)
    assert not classify.load_folder(tmp_path / "plain").poisoned_unknown
    with pytest.raises(UsageError, match=r"--test .*gen does not say which images carry the trigger"):
        evaluate(StubClassifier(), DETECTOR, tmp_path / "gen")
    with pytest.raises(UsageError, match="--clean: --data .*does not say which .* carry the trigger.*: drop --clean"):
        classify.train_classifier(tmp_path / "gen", tmp_path / "x", clean=True, **TINY)
    with pytest.raises(UsageError, match="does not say which images carry the trigger"):
        classify.trigger_split(gen, 0, 0.5, seed=0)
    assert not (tmp_path / "x").exists()
    # the class task reads the labels alone
    assert evaluate(StubClassifier(), {"task": "class", "class_names": names}, tmp_path / "gen")["ta"] == 1.0


def test_architectures_and_small_input_stems():
    for arch, size, dim in (("resnet18", 16, 512), ("vgg16", 16, 512), ("densenet121", 32, 1024)):
        model = classify.build_model(arch, 4, classify.model_input_size(arch, size, False)).eval()
        with torch.no_grad():
            assert model(torch.rand(2, 3, size, size)).shape == (2, 4)
            assert model.features(torch.rand(2, 3, size, size)).shape == (2, dim)
    assert classify.model_input_size("vgg16", 16, False) == 32
    assert classify.model_input_size("resnet50", 16, True) == 224
    assert isinstance(classify.build_model("resnet18", 4, 16).backbone.maxpool, nn.Identity)
    assert classify.build_model("resnet18", 4, 224).backbone.conv1.kernel_size == (7, 7)


def test_pretrained_weights_from_a_local_file_and_offline_message(tmp_path, monkeypatch):
    sd = torchvision.models.resnet18(weights=None).state_dict()
    torch.save(sd, tmp_path / "r18.pth")
    model, fields = classify.make_model("resnet18", 3, SIDE, weights=tmp_path / "r18.pth", input_size=SIDE)
    # small input: the 7x7 stem and the ImageNet head are the keys not loaded, everything else is
    assert fields["pretrained_keys_not_loaded"] == ["conv1.weight", "fc.bias", "fc.weight"]
    assert fields["normalization"]["mean"] == list(classify.IMAGENET_MEAN) and fields["stem"] == "cifar"
    assert torch.equal(model.backbone.layer1[0].conv1.weight, sd["layer1.0.conv1.weight"])
    # an unexpected key is named and refused
    torch.save({**sd, "extra.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(UsageError, match="extra.weight"):
        classify.make_model("resnet18", 3, SIDE, weights=tmp_path / "bad.pth")
    with pytest.raises(UsageError, match="no such file"):
        classify.make_model("resnet18", 3, SIDE, weights=tmp_path / "missing.pth")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UsageError, match="--weights FILE"):
        classify.make_model("resnet18", 3, SIDE, pretrained=True)
    with pytest.raises(UsageError, match="no ImageNet weights for smallcnn"):
        classify.make_model("smallcnn", 3, SIDE, pretrained=True)


def test_crop_noise_augmentation_noises_half_the_images():
    seed = int(torch.randint(1 << 30, (1,)))
    x = torch.full((400, 3, 16, 16), 0.5)
    out = classify.augment(x, "crop-noise", torch.Generator().manual_seed(seed))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    # a translated constant image holds only the constant and the zero padding; a noised one holds other values
    plain = ((out == 0.5) | (out == 0)).flatten(1).all(1)
    assert 0.4 < (~plain).float().mean() < 0.6
    inside = out[~plain][:, :, 6:10, 6:10]      # the centre, never padding: the noise unclamped here mostly
    assert inside.std(dim=(1, 2, 3)).max() < classify.NOISE_MAX * 1.15
    assert inside.std(dim=(1, 2, 3)).mean() > classify.NOISE_MAX / 4
    same = classify.augment(x, "crop-noise", torch.Generator().manual_seed(seed))
    assert torch.equal(out, same)
    assert torch.equal(classify.augment(x, "none", torch.Generator()), x)


class TensorSet(torch.utils.data.TensorDataset):
    cache = None  # what fit() asks of a training set beside the items


def test_shuffle_and_augmentation_draw_from_separate_streams(monkeypatch):
    seed = int(torch.randint(1 << 30, (1,)))
    starts = []

    def spy(x, mode, generator):
        starts.append(generator.get_state().clone())  # before this batch draws its shifts
        return real(x, mode, generator)

    real = classify.augment
    monkeypatch.setattr(classify, "augment", spy)
    data = TensorSet(torch.randint(0, 256, (24, 3, SIDE, SIDE), dtype=torch.uint8), torch.arange(24) % 3)
    for _ in range(2):
        model = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, 3))
        classify.fit(model, data, lambda m: {}, epochs=1, batch_size=8, seed=seed, progress=False)
    assert len(starts) == 6 and torch.equal(starts[0], starts[3])
    shuffle = torch.Generator().manual_seed(seed)
    augment = torch.Generator().set_state(starts[0])
    assert not torch.equal(starts[0], shuffle.get_state())
    assert not torch.equal(torch.randperm(24, generator=shuffle), torch.randperm(24, generator=augment))


def test_folders_of_other_stages_are_named_not_loaded(tmp_path):
    ddpm = tmp_path / "ddpm"
    ddpm.mkdir()
    (ddpm / "config.json").write_text(json.dumps({"family": "ddpm", "format_version": 1, "unet": {}, "data": {}}))
    (ddpm / "model.safetensors").write_bytes(b"")
    with pytest.raises(UsageError, match="train_ddpm.py model folder .*not a classifier folder: make a classifier with "
                                          "classify.py train") as e:
        load_classifier(ddpm)
    assert "\n" not in str(e.value)
    (ddpm / "config.json").write_text(json.dumps({"stage": "finetune_sd", "run": {}}))
    with pytest.raises(UsageError, match="finetune_sd.py model folder"):
        load_classifier(ddpm)


def test_judges_refuse_images_of_another_resolution(colors, tmp_path):
    classify.require_resolution({"task": "class"}, 32, "--classifier old")          # no data_resolution: accepted
    classify.require_resolution({"data_resolution": 16}, (16, 16), "--classifier c")
    with pytest.raises(UsageError, match=r"--classifier c was trained on 32x32-px images but the generations g "
                                            r"are 16x16 px: train it on data of the same resolution"):
        classify.require_resolution({"data_resolution": 32}, 16, "--classifier c", "the generations g")
    rng = np.random.default_rng(3)
    big = [(c, color_image(c, rng).repeat(2, 0).repeat(2, 1), False) for c in range(3)]
    make_folder(tmp_path / "test32", list(COLORS), big)
    config = {"task": "class", "class_names": list(COLORS), "data_resolution": SIDE}
    with pytest.raises(UsageError, match="16x16-px images but the images of --test .* are 32x32 px"):
        evaluate(StubClassifier(), config, tmp_path / "test32")
    # train_classifier refuses such a --test before it reads its training images (only the first, for its size)
    small = [(c, color_image(c, rng), False) for c in range(3) for _ in range(4)]
    make_folder(tmp_path / "train16", list(COLORS), small)
    read = []
    original = FolderDataset.image_uint8
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(FolderDataset, "image_uint8", lambda self, i: read.append((self.root.name, i)) or original(self, i))
        with pytest.raises(UsageError, match="the images of --test .*test32 are 32x32 px"):
            classify.train_classifier(tmp_path / "train16", tmp_path / "clf", test=tmp_path / "test32",
                                      **ONE_EPOCH)
    assert {i for name, i in read if name == "train16"} == {0} and not (tmp_path / "clf").exists()
    # images that are not square: both sides are recorded, so the same size passes and a square one is refused
    wide = [(c, np.concatenate([color_image(c, rng), color_image(c, rng)[:, :8]], 1), False) for c in range(3)
            for _ in range(4)]
    make_folder(tmp_path / "wide", list(COLORS), wide)
    classify.train_classifier(tmp_path / "wide", tmp_path / "wide-clf", test=tmp_path / "wide", arch="smallcnn",
                              width=8, epochs=1, progress=False)
    model, config = load_classifier(tmp_path / "wide-clf")
    assert config["data_resolution"] == [SIDE, SIDE + 8] and config["input_size"] == SIDE
    assert 0 <= evaluate(model, config, tmp_path / "wide")["ta"] <= 1
    with pytest.raises(UsageError, match=r"trained on 16x24-px images but the images of --test .* are 16x16 px"):
        evaluate(model, config, tmp_path / "train16")
    # under torchrun rank 0 alone reads --test; its error stops both processes (none waits in DDP's set-up)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "--monitor-interval", "5",  # torchrun stops the other rank soon after one fails: let it print
                        str(Path(classify.__file__)), "train", "--data", str(tmp_path / "train16"), "--test",
                        str(tmp_path / "test32"), "--arch", "smallcnn", "--width", "8", "--epochs", "1", "--out",
                        str(tmp_path / "ddp")], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and not (tmp_path / "ddp").exists()
    # both processes print it (their lines may interleave)
    assert r.stderr.count("classify.py: error: ") == 2 and r.stderr.count("test32 are 32x32 px: train it on") == 2


def test_the_train_folder_of_a_poisoned_set_stands_for_the_set(digits, tmp_path, capsys):
    want = (digits / "train", digits / "test", digits / "test_backdoor")
    assert classify.resolve_sets(digits) == want and classify.resolve_sets(digits / "train") == want
    assert classify.resolve_sets(digits / "train", tmp_path / "t")[1] == tmp_path / "t"     # given ones win
    # eval measures a train/ folder it is given on itself (e.g. a detector's detection rate on the poisoned images)
    assert classify.resolve_sets(digits / "train", train_folder=False) == (digits / "train", None, None)
    assert classify.resolve_sets(digits, train_folder=False) == want
    lonely = tmp_path / "lonely" / "train"
    shutil.copytree(digits / "train", lonely)
    assert classify.resolve_sets(lonely) == (lonely, None, None)
    res = classify.train_classifier(lonely, tmp_path / "clf", **ONE_EPOCH)
    assert res["final"].get("ta") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no TA or ASR will be measured" in err[0] and "--test" in err[0]


def help_entries(parser):
    """{flag: its help text, unwrapped}."""
    entries, flag = {}, None
    for line in parser.format_help().splitlines():
        m = re.match(r"  (-[^ ,]+)", line)
        if m:
            flag = m.group(1)
            entries[flag] = line
        elif flag and line.startswith("    "):
            entries[flag] += " " + line.strip()
        else:
            flag = None
    return entries


def test_help_shows_each_default_once():
    import detect
    import dissect
    parsers = [dissect.build_parser(), detect.build_parser()]
    sub = classify.build_parser()._subparsers._group_actions[0]
    parsers += list(dict.fromkeys(sub.choices.values()))          # train, trigger-detector, eval, diffusion
    for parser in parsers:
        by_flag = {a.option_strings[0]: a for a in parser._actions}
        for flag, text in help_entries(parser).items():
            a = by_flag[flag]
            told = len(re.findall(r"\bdefault\b", text))
            assert "default: None" not in text and told <= 1, (parser.prog, text)
            if not (a.required or a.nargs == 0 or a.default is None):
                assert told == 1, (parser.prog, text)
    train = help_entries(sub.choices["train"])
    for flag, value in (("--epochs", "10"), ("--lr", "0.01"), ("--momentum", "0.9"), ("--weight-decay", "0.0005")):
        assert f"(default: {value})" in train[flag], train[flag]
