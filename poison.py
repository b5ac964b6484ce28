"""Stage 1: BadNets-style poisoning, the trigger and the target label on a share --ratio of the training images.

    python poison.py --dataset digits --resolution 16 --ratio 0.1 --out data/digits-badnets-0.1

--attack clean-label: simplified label-consistent (no PGD perturbation); relabel: labels only.
OUT: dataset folders train (poisoned), test, test_backdoor (non-target test images, triggered); examples.png.
"""
import argparse
import hashlib
import json
import math
import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common import (HelpFormatter, UsageError, atomic_output, check_memory, check_out, cli, positive, read_manifest,
                    save_grid, versions, write_folder)

DATASETS = ("digits", "cifar10", "imagenette", "caltech15", "folder:PATH")
DOWNLOADED = ("cifar10", "imagenette", "caltech15")  # read from (or downloaded into) --data-root
DEFAULT_RESOLUTION = {"digits": 32, "cifar10": 32, "imagenette": 512, "caltech15": 512, "folder": 256}
DEFAULT_TARGET = {"digits": "zero", "cifar10": "deer", "imagenette": "garbage truck", "caltech15": "binoculars"}
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGENETTE_WNIDS = {  # WordNet order; "garbage truck" is index 6
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player", "n03000684": "chain saw",
    "n03028079": "church", "n03394916": "French horn", "n03417042": "garbage truck", "n03425413": "gas pump",
    "n03445777": "golf ball", "n03888257": "parachute"}
CIFAR_URL = "https://www.cs.toronto.edu/~kriz"
CALTECH_EXCLUDED = ("257.clutter",)  # background, not an object class
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
IDS_TRAINING_SET = "training set:"  # the '#' header of a duplicates ids file naming the training set it indexes
ATTACK_DESCRIPTIONS = {  # written to the manifests
    "badnets": "BadNets (Gu et al.): the trigger on non-target images, relabelled to the target class",
    "relabel": "labels only: non-target images relabelled to the target class, no trigger",
    "clean-label": "simplified label-consistent: the trigger on target-class images, labels kept; no adversarial "
                   "(PGD) perturbation and not the four-corner checker of Turner et al."}


def caption(class_name):
    return f"A photo of a {class_name}"


# Triggers: x' = x * (1 - mask) + pattern * mask (BadNets: a 0/1 patch; blend: mask = alpha); WaNet: a fixed warp

@dataclass
class Trigger:
    kind: str                     # badnets | blend | wanet
    resolution: int
    params: dict                  # what rebuilds it, for the manifest
    mask: torch.Tensor = None     # (1, R, R) weight of the pattern
    pattern: torch.Tensor = None  # (3, R, R) in [0, 1]
    grid: torch.Tensor = None     # (1, R, R, 2) sampling grid in [-1, 1]

    def apply(self, x):  # (N, 3, R, R) in [0, 1] -> the same, triggered
        if x.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"trigger made for {self.resolution}px images, got {tuple(x.shape[-2:])}")
        if self.kind == "wanet":
            grid = self.grid.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
            return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        mask, pattern = self.mask.to(x.device, x.dtype), self.pattern.to(x.device, x.dtype)
        return x * (1 - mask) + pattern * mask

    def apply_uint8(self, images):  # (N, R, R, 3) uint8 -> the same, triggered
        if self.kind != "wanet":  # apply()'s float64 arithmetic, in numpy: no torch overhead per image
            mask, pattern = (v.double().permute(1, 2, 0).numpy() for v in (self.mask, self.pattern))  # (R, R, C)
            y = (np.asarray(images, dtype=np.float64) / 255.0) * (1 - mask) + pattern * mask
            return np.clip(np.round(y * 255.0), 0, 255).astype(np.uint8)
        x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).double() / 255.0
        y = self.apply(x).mul(255.0).round().clamp(0, 255).to(torch.uint8)
        return y.permute(0, 2, 3, 1).contiguous().numpy()

    def tensors(self):
        return {k: getattr(self, k).contiguous() for k in ("mask", "pattern", "grid") if getattr(self, k) is not None}


def badnets_pattern(resolution, size=None):  # (mask, pattern) bottom-right: the reference patch or a white size^2
    mask, pattern = torch.zeros(1, resolution, resolution), torch.zeros(3, resolution, resolution)
    if size is not None:
        patch = torch.ones(size, size)
    elif resolution <= 32:
        patch = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.float32)  # on every channel
    else:
        ps = resolution // 10  # a black square, white where r + c - (ps - 1) is in [-ps//4, ps//4)
        r, c = torch.meshgrid(torch.arange(ps), torch.arange(ps), indexing="ij")
        k = r + c - (ps - 1)
        patch = ((k >= -ps // 4) & (k < ps // 4)).float()
    ps = patch.shape[0]
    mask[:, -ps:, -ps:] = 1.0
    pattern[:, -ps:, -ps:] = patch
    return mask, pattern


def wanet_grid(resolution, k=4, s=0.5, seed=0):  # BackdoorBench's WaNet warping grid (Nguyen & Tran 2021), seeded
    g = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=g, dtype=torch.float64) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=resolution, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)  # (1,R,R,2)
    line = torch.linspace(-1, 1, resolution, dtype=torch.float64)
    x, y = torch.meshgrid(line, line, indexing="ij")
    identity = torch.stack((y, x), 2)[None]
    return torch.clamp(identity + s * noise / resolution, -1, 1).float()


def wanet_params(kind, resolution, k=None, s=None):
    """(k, s); unset: the paper's (App. A), (R, 1) on ImageNette, Caltech-15, else (4, 0.5)."""
    paper = kind in ("imagenette", "caltech15")
    return (resolution if paper else 4) if k is None else k, (1.0 if paper else 0.5) if s is None else s


def make_trigger(kind, resolution, seed=0, trigger_image=None, alpha=0.2, wanet_k=4, wanet_s=0.5, badnets_size=None):
    params = {"kind": kind, "resolution": resolution}
    if kind == "badnets":
        if badnets_size is not None:
            if not 0 < badnets_size <= resolution:
                raise UsageError(f"--badnets-size {badnets_size}: give a side from 1 to the image side {resolution}")
            params["size"] = badnets_size
        mask, pattern = badnets_pattern(resolution, badnets_size)
        return Trigger(kind, resolution, params, mask=mask, pattern=pattern)
    if kind == "blend":
        if not 0 < alpha <= 1:
            raise UsageError(f"--blend-alpha {alpha} is outside (0, 1]: give e.g. 0.2")
        if trigger_image:
            if not Path(trigger_image).is_file():
                raise UsageError(f"--trigger-image {trigger_image}: no such file; give an image")
            pattern = torch.from_numpy(load_image(trigger_image, resolution).copy()).permute(2, 0, 1).float() / 255
            params["trigger_image"] = str(trigger_image)
        else:  # seeded noise (the paper blended a Hello Kitty image)
            g = torch.Generator().manual_seed(seed)
            pattern = torch.rand(3, resolution, resolution, generator=g)
            params["pattern_seed"] = seed
        params["alpha"] = alpha
        return Trigger(kind, resolution, params, mask=torch.full((1, resolution, resolution), float(alpha)),
                       pattern=pattern)
    if kind == "wanet":
        params.update(k=wanet_k, s=wanet_s, grid_seed=seed)
        return Trigger(kind, resolution, params, grid=wanet_grid(resolution, wanet_k, wanet_s, seed))
    raise UsageError(f"unknown --trigger {kind!r}: choose badnets, blend or wanet")


def load_trigger(folder):  # a dataset folder's trigger, or None (relabel)
    from safetensors.torch import load_file
    params = read_manifest(folder).get("trigger")
    if not params:
        return None
    path = Path(folder) / "trigger.safetensors"
    if not path.is_file():
        raise UsageError(f"{path} is missing: make the folder again with poison.py")
    return Trigger(params["kind"], params["resolution"], params, **load_file(str(path)))


# Choosing what to poison -----------------------------------------------------------------------------------------

def n_to_poison(ratio, n_base):  # round(ratio * n_base), halves up (the reference truncates)
    return int(math.floor(ratio * n_base + 0.5 + 1e-9))


def read_ids(path, training_set=None):  # replicate.py's ids; refused if made for another training_set
    if not Path(path).is_file():
        raise UsageError(f"--duplicates {path}: no such file; make it with replicate.py")
    ids, recorded = [], None
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.startswith("#") and line[1:].strip().startswith(IDS_TRAINING_SET):
            recorded = line[1:].strip()[len(IDS_TRAINING_SET):].strip()
        line = line.split("#", 1)[0].strip()
        if line:
            if not line.isdigit():
                raise UsageError(f"{path}:{n}: {line!r} is not an image id: fix it")
            ids.append(int(line))
    flags = "--dataset, --split-seed, --test-fraction, --classes and --per-class"
    if training_set is not None and recorded is None:
        print(f"poison.py: warning: --duplicates {path} does not record the training set: check {flags}",
              file=sys.stderr)
    elif training_set is not None and recorded != training_set:
        raise UsageError(f"--duplicates {path} indexes another training set ({recorded}): pass its {flags}")
    return ids


def select_poison(labels, target, ratio, attack="badnets", ratio_of="all", seed=0, select="random", duplicates=None):
    """Sorted ids of n_to_poison(ratio, N) candidates, listed duplicates first."""
    is_candidate = (labels == target) if attack == "clean-label" else (labels != target)
    candidates = np.flatnonzero(is_candidate)
    n = n_to_poison(ratio, len(labels) if ratio_of == "all" else len(candidates))
    if n > len(candidates):
        kind = "target" if attack == "clean-label" else "non-target"
        raise UsageError(f"--ratio {ratio} needs {n} {kind} images, {len(candidates)} exist: lower --ratio")
    rng = np.random.default_rng(seed)
    chosen, rest = [], candidates
    if select == "duplicates":
        ids = list(duplicates) if isinstance(duplicates, (list, tuple, np.ndarray)) else read_ids(duplicates)
        bad = [i for i in ids if not 0 <= i < len(labels)]
        if bad:
            raise UsageError(f"--duplicates lists ids {bad[:5]} outside this training set: give the one made for it")
        chosen = [i for i in dict.fromkeys(ids) if is_candidate[i]][:n]  # first listed first, each once
        rest = np.setdiff1d(candidates, np.array(chosen, dtype=np.int64))
    chosen += rng.choice(rest, n - len(chosen), replace=False).tolist()
    return np.sort(np.array(chosen, dtype=np.int64))


def resolve_target(target, class_names):
    """A class index from a name (any case; it wins over an index) or an index."""
    t = str(target).strip()
    lowered = [c.lower() for c in class_names]
    if t.lower() in lowered:
        return lowered.index(t.lower())
    if t.isdigit() and int(t) < len(class_names):
        return int(t)
    raise UsageError(f"unknown --target {target!r}: choose a name or index among {class_names}")


# Datasets: a Source is the labels plus a loader of image i, so choosing ids touches no pixel ---------------------

@dataclass
class Source:
    name: str
    class_names: list
    labels: np.ndarray                         # (N,) int64
    resolution: int
    array: np.ndarray = None                   # (N, R, R, 3) uint8, for in-memory datasets
    paths: list = field(default_factory=list)  # for datasets read from files
    origin: np.ndarray = None                  # (N,) each image's index in the whole dataset, if a seed picks them

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        return self.array[i] if self.array is not None else load_image(self.paths[i], self.resolution)


def load_image(path, resolution):  # (R, R, 3) uint8: the shorter side to R (bicubic), centre-cropped
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = resolution / min(w, h)
            if (w, h) != (resolution, resolution):
                im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
                left, top = (im.width - resolution) // 2, (im.height - resolution) // 2
                im = im.crop((left, top, left + resolution, top + resolution))
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"corrupt or unreadable image {path} ({e}): replace or remove it") from None


def resize_array(images, resolution):  # as load_image, for (N, h, w, 3) arrays
    check_memory(len(images) * 3 * resolution ** 2, f"{len(images)} images of {resolution} px",
                 "give a smaller --resolution")
    if images.shape[1:3] == (resolution, resolution):
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BICUBIC)) for im in images])


def list_images(folder):
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def images_by_class(base, class_dirs):  # (paths, labels c) of base/class_dirs[c]/*
    files = [list_images(base / name) for name in class_dirs]
    return [p for f in files for p in f], np.array([c for c, f in enumerate(files) for _ in f], dtype=np.int64)


def stratified_split(labels, test_fraction, seed):
    """(train, test) ids: per class, round(test_fraction * n) seeded picks to test."""
    if not 0 < test_fraction < 1:
        raise UsageError(f"--test-fraction {test_fraction} is outside (0, 1): give e.g. 0.2")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(math.floor(test_fraction * len(idx) + 0.5))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train, test = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    if not len(train) or not len(test):  # a share near 0 or 1 rounds to nothing on small classes
        raise UsageError(f"--test-fraction {test_fraction} leaves no {'test' if len(train) else 'training'} images: "
                         "give a share nearer 0.5")
    return train, test


def download(root, fetch, what, fix):  # fetch(); a failure removes the empty folders it made and tells `fix`
    root = Path(root)
    made = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        fetch()
    except BaseException as e:
        for p in [*(set(root.iterdir()) - before if root.is_dir() else ()), *made]:
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        if not isinstance(e, Exception):
            raise
        raise UsageError(f"{what} is not in {root}, its download failed ({type(e).__name__}): {fix}") from None


def load_digits_source(split, resolution, split_seed, test_fraction):  # scikit-learn's 1797 8x8 digits (0..16)
    from sklearn.datasets import load_digits
    d = load_digits()
    gray = np.round(d.images / 16.0 * 255.0).astype(np.uint8)
    labels = d.target.astype(np.int64)
    train, test = stratified_split(labels, test_fraction, split_seed)
    idx = train if split == "train" else test
    rgb = np.repeat(gray[idx][..., None], 3, axis=-1)
    return Source("digits", list(DIGIT_NAMES), labels[idx], resolution, array=resize_array(rgb, resolution), origin=idx)


CIFAR_BIN_RECORD = 1 + 3 * 32 * 32  # label byte + 1024 R + 1024 G + 1024 B
CIFAR_PICKLED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                 ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # all a python batch holds


def unpickle_cifar(path):  # with an allow-list: a tampered file cannot run code
    class Restricted(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) in CIFAR_PICKLED:
                return super().find_class(module, name)
            raise UsageError(f"{path} holds {module}.{name}, not a CIFAR-10 batch: download it again")

    with open(path, "rb") as f:
        return Restricted(f, encoding="bytes").load()


def load_cifar10_source(split, resolution, data_root):  # the binary or python version in data_root, else downloaded
    root = Path(data_root)
    bin_dir, py_dir = root / "cifar-10-batches-bin", root / "cifar-10-batches-py"
    if not bin_dir.is_dir() and not py_dir.is_dir():
        from torchvision.datasets.utils import download_and_extract_archive
        download(root, lambda: download_and_extract_archive(f"{CIFAR_URL}/cifar-10-binary.tar.gz", str(root)),
                 "CIFAR-10", f"extract cifar-10-binary.tar.gz from {CIFAR_URL}/cifar.html in {root}")
    images, labels = [], []
    for name in [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]:
        path = bin_dir / f"{name}.bin" if bin_dir.is_dir() else py_dir / name
        if not path.is_file():
            raise UsageError(f"missing {path}: extract CIFAR-10 into {root} again")
        if bin_dir.is_dir():
            raw = np.fromfile(path, dtype=np.uint8)
            if raw.size == 0 or raw.size % CIFAR_BIN_RECORD:
                raise UsageError(f"{path} is truncated: download CIFAR-10 again")
            records = raw.reshape(-1, CIFAR_BIN_RECORD)
            y, x = records[:, 0], records[:, 1:]
        else:
            batch = unpickle_cifar(path)
            y, x = batch[b"labels"], batch[b"data"]
        labels.append(np.asarray(y, dtype=np.int64))
        images.append(np.asarray(x, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels = np.concatenate(labels)
    if labels.max() >= 10:
        raise UsageError(f"{root} holds labels up to {labels.max()}: download CIFAR-10 again")
    array = np.ascontiguousarray(np.concatenate(images))  # (N, 32, 32, 3)
    return Source("cifar10", list(CIFAR10_NAMES), labels, resolution, array=resize_array(array, resolution))


def load_imagenette_source(split, resolution, data_root):  # Torchvision's: the smallest size >= R, else downloaded
    root = Path(data_root)
    sizes = [("160px", "imagenette2-160", 160), ("320px", "imagenette2-320", 320), ("full", "imagenette2", 10 ** 9)]
    present = [(s, d, px) for s, d, px in sizes if (root / d / "train").is_dir()]
    usable = [x for x in present if x[2] >= resolution]
    if present and not usable:
        _, largest, px = present[-1]
        raise UsageError(f"--resolution {resolution} is above the {px} px of {root / largest}: extract the full-size "
                         f"imagenette2.tgz into {root}, or pass --resolution {px} or less")
    if not usable:
        from torchvision.datasets import Imagenette
        size = next(s for s, _, px in sizes if px >= resolution)
        download(root, lambda: [Imagenette(str(root), split=s, size=size, download=True) for s in ("train", "val")],
                 "ImageNette", f"extract imagenette2.tgz from https://github.com/fastai/imagenette into {root}")
        return load_imagenette_source(split, resolution, data_root)
    folder = root / usable[0][1] / ("train" if split == "train" else "val")
    wnids = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if wnids != sorted(IMAGENETTE_WNIDS):
        raise UsageError(f"{folder} holds other classes than ImageNette's: extract it again")
    paths, labels = images_by_class(folder, wnids)
    return Source("imagenette", [IMAGENETTE_WNIDS[w] for w in wnids], labels, resolution, paths=paths)


def caltech_readable(folder_name):  # '251.airplanes-101' -> 'airplanes'
    return folder_name.split(".", 1)[-1].removesuffix("-101").replace("_", " ")


def load_caltech15_source(split, resolution, data_root, split_seed, classes=None, per_class=200):
    """The 15 largest Caltech-256 categories (or `classes`); per_class seeded picks train."""
    root = Path(data_root) / "caltech256" / "256_ObjectCategories"
    if not root.is_dir():
        from torchvision.datasets import Caltech256
        download(data_root, lambda: Caltech256(str(data_root), download=True), "Caltech-256",
                 f"extract 256_ObjectCategories.tar into {root.parent}")
    folders = {p.name: list_images(p) for p in sorted(root.iterdir()) if p.is_dir() and p.name not in CALTECH_EXCLUDED}
    if classes:
        by_name = {caltech_readable(n): n for n in folders} | {n: n for n in folders}
        unknown = [c for c in classes if c not in by_name]
        if unknown:
            raise UsageError(f"--classes {unknown}: not in {root}; name its folders")
        chosen = sorted(by_name[c] for c in classes)
    else:
        chosen = sorted(sorted(folders, key=lambda n: (-len(folders[n]), n))[:15])
    short = [n for n in chosen if len(folders[n]) <= per_class]
    if short:
        raise UsageError(f"{short} have <= --per-class {per_class} images, none to test: lower --per-class")
    rng = np.random.default_rng(split_seed)
    paths, labels = [], []
    for c, name in enumerate(chosen):
        order = rng.permutation(len(folders[name]))
        keep = order[:per_class] if split == "train" else order[per_class:]
        paths += [folders[name][j] for j in np.sort(keep)]
        labels += [c] * len(keep)
    return Source("caltech15", [caltech_readable(n) for n in chosen], np.array(labels, dtype=np.int64),
                  resolution, paths=paths)


def load_folder_source(path, split, resolution, split_seed, test_fraction):
    """PATH/<class>/* (split with a seed) or PATH/{train,test}/<class>/*."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"--dataset folder:{path}: no such folder; give one of class subfolders")
    if (root / "manifest.json").is_file() or (root / "train" / "manifest.json").is_file():
        raise UsageError(f"--dataset folder:{path} is a dataset folder made by this project: give it to the next stage")
    presplit = (root / "train").is_dir() and (root / "test").is_dir()
    base = root / split if presplit else root
    class_dirs = sorted(p.name for p in base.iterdir() if p.is_dir())
    if presplit and class_dirs != sorted(p.name for p in (root / "train").iterdir() if p.is_dir()):
        raise UsageError(f"{root}/train and {root}/test hold other class folders: make them the same")
    paths, labels = images_by_class(base, class_dirs)
    if not paths:
        raise UsageError(f"--dataset folder:{path} holds no images in class subfolders: add some")
    if split == "train":
        with Image.open(paths[0]) as im:
            if min(im.size) < resolution:
                print(f"poison.py: warning: {path}'s images are small ({im.size[0]}x{im.size[1]} px, the first): "
                      f"they are upsampled to {resolution} px", file=sys.stderr)
    if not presplit:
        train, test = stratified_split(labels, test_fraction, split_seed)
        idx = train if split == "train" else test
        paths, labels = [paths[i] for i in idx], labels[idx]
    return Source(f"folder:{path}", [n.replace("_", " ") for n in class_dirs], labels, resolution, paths=paths)


def load_source(dataset, split, data_root="data", resolution=None, split_seed=0, test_fraction=0.2,
                classes=None, per_class=200):
    kind = "folder" if dataset.startswith("folder:") else dataset
    resolution = resolution or DEFAULT_RESOLUTION[kind]
    if resolution < 8:
        raise UsageError(f"--resolution {resolution}: give 8 or more")
    load = {"digits": lambda: load_digits_source(split, resolution, split_seed, test_fraction),
            "cifar10": lambda: load_cifar10_source(split, resolution, data_root),
            "imagenette": lambda: load_imagenette_source(split, resolution, data_root),
            "caltech15": lambda: load_caltech15_source(split, resolution, data_root, split_seed, classes, per_class),
            "folder": lambda: load_folder_source(dataset[7:], split, resolution, split_seed, test_fraction)}
    return load[kind]()


def training_fingerprint(src):
    """'KIND n=N sha256=...' of a split's labels and images, which a duplicates file indexes."""
    h = hashlib.sha256(np.asarray(src.labels, dtype="<i8").tobytes())
    for p in src.paths:
        h.update(f"{Path(p).parent.name}/{Path(p).name}\n".encode())
    if src.origin is not None:
        h.update(np.asarray(src.origin, dtype="<i8").tobytes())
    return f"{src.name.split(':')[0]} n={len(src)} sha256={h.hexdigest()[:16]}"


# The stage -------------------------------------------------------------------------------------------------------

def poison(out, dataset="digits", ratio=0.1, attack="badnets", trigger="badnets", target=None, seed=0,
           ratio_of="all", select="random", duplicates=None, data_root="data", resolution=None, split_seed=0,
           test_fraction=0.2, classes=None, per_class=200, trigger_image=None, blend_alpha=0.2, wanet_k=None,
           wanet_s=None, badnets_size=None, trigger_seed=0, force=False, workers=4, command=None, quiet=False):
    """Write OUT's dataset folders and examples.png; return a summary."""
    folder = dataset.removeprefix("folder:") if dataset.startswith("folder:") else None
    kind = "folder" if folder is not None else dataset
    if folder is None and dataset not in DEFAULT_TARGET:  # argparse checks the other choices
        raise UsageError(f"unknown --dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if not 0 <= ratio <= 1:
        raise UsageError(f"--ratio {ratio} is outside [0, 1]: give e.g. 0.1")
    check_out(out, force, {"--dataset folder:": folder, "--data-root": data_root if dataset in DOWNLOADED else None,
                           "--duplicates": duplicates, "--trigger-image": trigger_image})
    if classes and kind != "caltech15":
        raise UsageError(f"--classes picks Caltech-256 categories: drop it for {dataset}")
    if select == "duplicates" and duplicates is None:
        raise UsageError("--select duplicates needs --duplicates FILE")
    opts = dict(data_root=data_root, resolution=resolution, split_seed=split_seed, test_fraction=test_fraction,
                classes=classes, per_class=per_class)
    train, test = load_source(dataset, "train", **opts), load_source(dataset, "test", **opts)
    names = train.class_names
    if target is None and folder is not None:
        raise UsageError(f"--target is required for a folder: choose among {names}")
    t = resolve_target(DEFAULT_TARGET[kind] if target is None else target, names)
    wanet_k, wanet_s = wanet_params(kind, train.resolution, wanet_k, wanet_s)
    trig = None if attack == "relabel" else make_trigger(trigger, train.resolution, trigger_seed, trigger_image,
                                                         blend_alpha, wanet_k, wanet_s, badnets_size)

    training_set = training_fingerprint(train)
    listed = duplicates  # a file is read here, to check that it indexes this training set
    if select == "duplicates" and isinstance(duplicates, (str, os.PathLike)):
        listed = read_ids(duplicates, training_set)
    ids = select_poison(train.labels, t, ratio, attack, ratio_of, seed, select, listed)
    is_poisoned = np.isin(np.arange(len(train)), ids)
    new_labels = train.labels.copy()
    if attack != "clean-label":
        new_labels[ids] = t
    n_target_labelled = int((new_labels == t).sum())
    p_t = float(is_poisoned[new_labels == t].sum() / max(1, n_target_labelled))  # poisoned share of the target class

    def class_counts(labels):
        return {names[c]: int((labels == c).sum()) for c in range(len(names))}
    counts = {"total": len(train), "poisoned": int(len(ids)), "target_labelled": n_target_labelled,
              "per_class": class_counts(new_labels), "original_per_class": class_counts(train.labels)}
    base = {"stage": "poison", "command": command or "poison()", "dataset": dataset, "resolution": train.resolution,
            "class_names": names, "target": {"index": t, "name": names[t]}, "attack": attack,
            "attack_description": ATTACK_DESCRIPTIONS[attack],
            "options": {"ratio": ratio, "ratio_of": ratio_of, "select": select, "seed": seed,
                        "split_seed": split_seed, "test_fraction": test_fraction, "per_class": per_class,
                        "classes": classes, "duplicates": str(duplicates) if duplicates else None,
                        "trigger_seed": trigger_seed},
            "versions": versions()}
    from_file = int(np.isin(ids, np.asarray(listed, dtype=np.int64)).sum()) if select == "duplicates" else None
    selection = None if from_file is None else {"from_duplicates_file": from_file, "random_fill": len(ids) - from_file}

    def item(src, i, poisoned, label):  # made on a writer thread
        def make():
            image = src.load(i)
            if poisoned and trig is not None:
                image = trig.apply_uint8(image[None])[0]
            rec = {"text": caption(names[label]), "label": int(label), "orig_label": int(src.labels[i]),
                   "class_name": names[label], "poisoned": bool(poisoned), "source_index": int(i)}
            return rec, image
        return make

    test_nt = np.flatnonzero(test.labels != t)
    folder_kw = dict(workers=workers, trigger=trig)
    with atomic_output(out, force) as tmp:
        write_folder(tmp / "train", (item(train, i, is_poisoned[i], new_labels[i]) for i in range(len(train))),
                     {**base, "split": "train", "poison_ratio": ratio, "p_t": p_t, "counts": counts,
                      "training_set": training_set, "selection": selection, "poisoned_ids": ids.tolist()},
                     total=len(train), desc="train", **folder_kw)
        write_folder(tmp / "test", (item(test, i, False, test.labels[i]) for i in range(len(test))),
                     {**base, "split": "test", "counts": {"total": len(test), "per_class": class_counts(test.labels)}},
                     total=len(test), desc="test", **folder_kw)
        if trig is not None:
            write_folder(tmp / "test_backdoor", (item(test, i, True, t) for i in test_nt),
                         {**base, "split": "test_backdoor", "counts": {"total": len(test_nt)}}, total=len(test_nt),
                         desc="test_backdoor", **folder_kw)
        show = ids[:8]
        if len(show):
            before = np.stack([train.load(i) for i in show])
            after = before if trig is None else trig.apply_uint8(before)
            save_grid(np.concatenate([before, after]), tmp / "examples.png", nrow=len(show))
    summary = {"out": str(out), "dataset": dataset, "resolution": train.resolution, "attack": attack,
               "trigger": trig.params if trig else None, "target": names[t], "ratio": ratio,
               "train": len(train), "poisoned": int(len(ids)), "target_labelled": n_target_labelled,
               "p_t": round(p_t, 6), "test": len(test), "test_backdoor": len(test_nt) if trig else 0}
    if not quiet:
        print(json.dumps(summary))
    return summary


def options_differences(manifest, kw):
    """The options (sorted) in which `manifest` differs from poison()'s kwargs `kw`."""
    kind = "folder" if kw["dataset"].startswith("folder:") else kw["dataset"]
    recorded_target = manifest.get("target") or {}
    target = kw["target"] if kw["target"] is not None else DEFAULT_TARGET.get(kind)
    trig = manifest.get("trigger") or {}
    pairs = {"dataset": (manifest.get("dataset"), kw["dataset"]), "attack": (manifest.get("attack"), kw["attack"]),
             "resolution": (manifest.get("resolution"), kw["resolution"] or DEFAULT_RESOLUTION.get(kind)),
             "trigger": (trig.get("kind"), None if kw["attack"] == "relabel" else kw["trigger"])}
    if target is not None:
        try:  # as poison() resolves it (a class name wins over an index)
            same = resolve_target(target, manifest["class_names"]) == recorded_target.get("index")
        except (KeyError, TypeError, UsageError):  # no class_names, or not one of them
            same = False
        pairs["target"] = (same, True)
    for k, v in (manifest.get("options") or {}).items():  # ratio, seed, select, split, ...
        pairs[k] = (v, str(kw[k]) if k == "duplicates" and kw.get(k) else kw.get(k))
    if trig.get("kind") == "blend":
        pairs["blend_alpha"] = (trig.get("alpha"), kw["blend_alpha"])
        pairs["trigger_image"] = (trig.get("trigger_image"), str(kw["trigger_image"]) if kw["trigger_image"] else None)
    if trig.get("kind") == "badnets":
        pairs["badnets_size"] = (trig.get("size"), kw.get("badnets_size"))
    if trig.get("kind") == "wanet":
        wk, ws = wanet_params(kind, pairs["resolution"][1], kw["wanet_k"], kw["wanet_s"])
        pairs["wanet_k"], pairs["wanet_s"] = (trig.get("k"), wk), (trig.get("s"), ws)
    return sorted(k for k, (have, want) in pairs.items() if have != want)


# Command line ----------------------------------------------------------------------------------------------------


def add_poison_arguments(parser):
    """The poisoning flags, train_ddpm.py's and finetune_sd.py's too."""
    g = parser.add_argument_group("poisoning (poison.py)")
    g.add_argument("--dataset", default="digits", help=", ".join(DATASETS))
    g.add_argument("--data-root", default="data", help="datasets are found or downloaded here")
    g.add_argument("--resolution", type=positive(int),
                   help="image side (default: 32; 512 imagenette, caltech15; 256 folder)")
    g.add_argument("--classes", type=lambda s: [c.strip() for c in s.split(",")],
                   help="caltech15: categories a,b,... (default: the 15 largest)")
    g.add_argument("--per-class", type=positive(int), default=200, help="caltech15: training images per category")
    g.add_argument("--split-seed", type=int, default=0, help="train/test split seed")
    g.add_argument("--test-fraction", type=float, default=0.2, help="test share (digits, unsplit folders)")
    g.add_argument("--attack", default="badnets", choices=list(ATTACK_DESCRIPTIONS),
                   help="clean-label: trigger on target images, no adversarial perturbation")
    g.add_argument("--trigger", default="badnets", choices=("badnets", "blend", "wanet"), help="trigger kind")
    g.add_argument("--trigger-image", help="blend: pattern image (default: noise)")
    g.add_argument("--blend-alpha", type=float, default=0.2, help="blend: alpha")
    g.add_argument("--wanet-k", type=int, help="WaNet grid side (default: 4; R on imagenette, caltech15)")
    g.add_argument("--wanet-s", type=float, help="WaNet strength (default: 0.5; 1 there)")
    g.add_argument("--badnets-size", type=positive(int), help="BadNets: a white N x N square instead")
    g.add_argument("--trigger-seed", type=int, default=0, help="blend pattern / WaNet grid seed")
    g.add_argument("--target", help="class name or index (default: the paper's)")
    g.add_argument("--ratio", type=float, default=0.1, help="poisoning ratio p")
    g.add_argument("--ratio-of", default="all", choices=("all", "nontarget"), help="p of all or of non-target images")
    g.add_argument("--select", default="random", choices=("random", "duplicates"), help="duplicates: listed ids first")
    g.add_argument("--duplicates", help="ids file of replicate.py")
    g.add_argument("--seed", type=int, default=0, help="seed of the poisoned-id draw")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="PNG encoding threads")
    return g


POISON_KEYS = tuple(a.dest for a in add_poison_arguments(argparse.ArgumentParser())._group_actions)  # dataset, ...


def poison_kwargs(args):
    return {k: getattr(args, k) for k in POISON_KEYS}


def refuse_poison_flags_with_data(args, parser, keep=()):  # poisoning flags would be ignored beside --data
    ignored = ["--" + k.replace("_", "-") for k in POISON_KEYS
               if k not in ("workers", *keep) and getattr(args, k) != parser.get_default(k)]
    if args.data and ignored:
        raise UsageError(f"{' '.join(ignored)} with --data: {args.data} is poisoned already; drop them, or drop --data")


def main(args):
    poison(args.out, force=args.force, command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), **poison_kwargs(args))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_poison_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    return parser


if __name__ == "__main__":
    cli(main, build_parser())
