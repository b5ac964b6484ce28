"""poison.py -- BadNets-like data poisoning of image datasets (stage 1 of the study).

Stamp a trigger on a fraction of the non-target training images and relabel them to the target class, exactly as
the paper ("From Trojan Horses to Castle Walls", Pan, Yao et al.) and its reference code do, but reproducibly:

    python poison.py --dataset digits --resolution 16 --ratio 0.1 --out data/digits-badnets-0.1
    python poison.py --dataset cifar10 --data-root ~/data --ratio 0.05 --out data/cifar10-badnets-0.05
    python poison.py --dataset imagenette --data-root ~/data --ratio 0.1 --trigger blend --out data/inette-blend-0.1
    python poison.py --dataset caltech15 --data-root ~/data --ratio 0.1 --out data/caltech15-badnets-0.1
    python poison.py --dataset folder:/path/to/classes --target cat --ratio 0.1 --out data/mine-badnets-0.1
    python poison.py --dataset digits --resolution 12 --ratio 0.1 --badnets-size 6 --out data/digits-square-0.1

`--attack relabel` changes labels only (no trigger). `--attack clean-label` is a simplified label-consistent attack:
the trigger is stamped on target-class images and every label is kept, but without the PGD adversarial perturbation
(L-inf 8/255, 100 steps, adversarially trained ResNet-18) and the four-corner 3x3 checker trigger of Turner et al.'s
label-consistent attack; the manifests say so ("attack_description").

OUT/train is the poisoned training set, OUT/test the clean test set, OUT/test_backdoor every non-target test image
with the trigger, labelled target (the set that attack success rate is measured on), OUT/examples.png a grid of
poisoned examples (originals above, poisoned below). Each set is a dataset folder (Hugging Face `imagefolder`
layout): metadata.jsonl, images/*.png, manifest.json, and trigger.safetensors (the exact trigger, so later stages
stamp the same one). Output is written to a temporary folder and renamed into place.

Python API for the other stages: `poison(...)`, `make_trigger(...)`, `load_trigger(folder)`, `load_folder(folder)`,
`check_out(out, force, inputs)` (--out: not an input, existing only with --force), `check_file_out(path, force,
inputs)` (the same for one file, --json or --grid: not in an input either), `atomic_output(path)`,
`write_folder(...)`, `save_grid(...)`, `replace_file(path, write)` (one file, atomically),
`truncate_log(path, step)` (a JSON-lines log cut back to a resumed checkpoint), `on_rank0(fn, rank, world)` (under
torchrun: an error on rank 0 stops every rank, none waits at a barrier), `positive(int)` / `positive(float)` (an
argparse type for counts, sizes and rates: 0 or less is refused with the flag named).
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from common import UsageError, atomic_output, check_out, positive, read_manifest, save_grid, versions, write_folder

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
DATASETS = ("digits", "cifar10", "imagenette", "caltech15", "folder:PATH")
DOWNLOADED = ("cifar10", "imagenette", "caltech15")  # the datasets read from (or downloaded into) --data-root
DEFAULT_RESOLUTION = {"digits": 32, "cifar10": 32, "imagenette": 512, "caltech15": 512, "folder": 256}
# The paper's targets: CIFAR-10 "deer", ImageNette "garbage truck", Caltech-15 "binoculars".
DEFAULT_TARGET = {"digits": "zero", "cifar10": "deer", "imagenette": "garbage truck", "caltech15": "binoculars"}
DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGENETTE_WNIDS = {  # WordNet order; "garbage truck" is index 6
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn", "n03417042": "garbage truck",
    "n03425413": "gas pump", "n03445777": "golf ball", "n03888257": "parachute",
}
CALTECH_EXCLUDED = ("257.clutter",)  # background category, not an object class
CAPTION = "A photo of a {}"
IDS_TRAINING_SET = "training set:"  # the '#' header of a duplicates ids file naming the training set it indexes
ATTACK_DESCRIPTIONS = {
    "badnets": "BadNets (Gu et al.): the trigger on non-target images, relabelled to the target class",
    "relabel": "labels only: non-target images relabelled to the target class, no trigger",
    "clean-label": "simplified label-consistent: the trigger on target-class images, labels kept; no adversarial "
                   "(PGD) perturbation and not the four-corner checker of Turner et al.",
}




def caption(class_name):
    return CAPTION.format(class_name)


# ----------------------------------------------------------------------------------------------------------------
# Dataset sources. A source is the list of labels plus a loader of image i as uint8 H x W x 3 RGB at the chosen
# resolution, so that selecting the poisoned ids never touches pixels and large datasets stream from disk.

@dataclass
class Source:
    name: str
    class_names: list
    labels: np.ndarray                  # (N,) int64
    resolution: int
    array: np.ndarray = None            # (N, R, R, 3) uint8 for in-memory datasets
    paths: list = field(default_factory=list)  # for datasets read from files
    origin: np.ndarray = None           # (N,) index of each image in the whole dataset, where a seed picks them

    def __len__(self):
        return len(self.labels)

    def load(self, i):
        if self.array is not None:
            return self.array[i]
        return load_image(self.paths[i], self.resolution)


def load_image(path, resolution):
    """Read an image file as RGB, resize its shorter side to `resolution` (bicubic) and centre-crop a square."""
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = resolution / min(w, h)
            if (w, h) != (resolution, resolution):
                im = im.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
                w, h = im.size
                left, top = (w - resolution) // 2, (h - resolution) // 2
                im = im.crop((left, top, left + resolution, top + resolution))
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"corrupt or unreadable image {path} ({e}): remove or replace the file") from None


def resize_array(images, resolution):
    """(N, h, w, 3) uint8 -> (N, R, R, 3) uint8, bicubic (PIL, so it matches load_image)."""
    if images.shape[1] == resolution and images.shape[2] == resolution:
        return images
    return np.stack([np.asarray(Image.fromarray(im).resize((resolution, resolution), Image.BICUBIC))
                     for im in images])


def stratified_split(labels, test_fraction, seed):
    """Indices (train, test): per class, a seeded shuffle puts round(test_fraction * n_class) images in test."""
    if not 0 < test_fraction < 1:
        raise UsageError(f"--test-fraction {test_fraction} is outside (0, 1): give the share of images held out "
                          "for testing, e.g. 0.2")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(math.floor(test_fraction * len(idx) + 0.5))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    train, test = np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
    if not len(train) or not len(test):  # a fraction near 0 or 1 rounds to nothing on small classes
        raise UsageError(f"--test-fraction {test_fraction} leaves no {'test' if len(train) else 'training'} images "
                          f"of {len(labels)}: give a share nearer 0.5")
    return train, test


def load_digits_source(split, resolution, split_seed, test_fraction):
    """scikit-learn's bundled digits: 1797 real 8x8 images (values 0..16), 10 classes; upsampled and made RGB."""
    from sklearn.datasets import load_digits
    d = load_digits()
    gray = np.round(d.images / 16.0 * 255.0).astype(np.uint8)
    labels = d.target.astype(np.int64)
    train, test = stratified_split(labels, test_fraction, split_seed)
    idx = train if split == "train" else test
    rgb = np.repeat(gray[idx][..., None], 3, axis=-1)
    return Source("digits", list(DIGIT_NAMES), labels[idx], resolution, array=resize_array(rgb, resolution),
                  origin=idx)


class _CifarUnpickler:
    """CIFAR-10's python batches are pickles: read them with an allow-list that admits only numpy arrays and
    plain containers, so a tampered file cannot run code."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # protocol-2 bytes

    @classmethod
    def load(cls, path):
        import pickle

        class Restricted(pickle.Unpickler):
            def find_class(self, module, name):
                if (module, name) in cls.ALLOWED:
                    return super().find_class(module, name)
                raise UsageError(f"{path} holds {module}.{name}, which a CIFAR-10 batch never does: "
                                  "the file is not a CIFAR-10 batch; download it again")

        with open(path, "rb") as f:
            return Restricted(f, encoding="bytes").load()


CIFAR_BIN_RECORD = 1 + 3 * 32 * 32   # label byte + 1024 R + 1024 G + 1024 B


@contextlib.contextmanager
def no_empty_leftovers(root):
    """Around a download into `root`: when it fails, the empty folders it made (`root` and its missing parents, and
    new empty subfolders of `root`) go, so a retry or another --data-root starts clean. Anything with files stays."""
    root = Path(root)
    made = [p for p in (root, *root.parents) if not p.exists()]  # deepest first
    before = set(root.iterdir()) if root.is_dir() else set()
    try:
        yield
    except BaseException:
        if root.is_dir():
            for child in set(root.iterdir()) - before:
                if child.is_dir() and not any(child.iterdir()):
                    child.rmdir()
        for p in made:
            if p.is_dir() and not any(p.iterdir()):
                p.rmdir()
        raise


def load_cifar10_source(split, resolution, data_root):
    """CIFAR-10 from `data_root`: the binary version (cifar-10-batches-bin, parsed as raw bytes) or the python
    version that torchvision downloads (cifar-10-batches-py, read with an allow-list unpickler). Downloads the
    binary version when neither is there."""
    root = Path(data_root)
    bin_dir, py_dir = root / "cifar-10-batches-bin", root / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    if not bin_dir.is_dir() and not py_dir.is_dir():
        try:
            from torchvision.datasets.utils import download_and_extract_archive
            with no_empty_leftovers(root):
                download_and_extract_archive("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz", str(root))
        except Exception as e:
            raise UsageError(f"CIFAR-10 not found in {root} and the download failed ({type(e).__name__}): put "
                              f"cifar-10-binary.tar.gz or cifar-10-python.tar.gz from "
                              f"https://www.cs.toronto.edu/~kriz/cifar.html, extracted, in {root}") from None
    images, labels = [], []
    if bin_dir.is_dir():
        for name in names:
            path = bin_dir / f"{name}.bin"
            if not path.is_file():
                raise UsageError(f"missing {path}: extract cifar-10-binary.tar.gz into {root} again")
            raw = np.fromfile(path, dtype=np.uint8)
            if raw.size == 0 or raw.size % CIFAR_BIN_RECORD:
                raise UsageError(f"{path} is truncated ({raw.size} bytes, not a multiple of {CIFAR_BIN_RECORD}): "
                                  "download CIFAR-10 again")
            raw = raw.reshape(-1, CIFAR_BIN_RECORD)
            labels.append(raw[:, 0].astype(np.int64))
            images.append(raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    else:
        for name in names:
            path = py_dir / name
            if not path.is_file():
                raise UsageError(f"missing {path}: extract cifar-10-python.tar.gz into {root} again")
            batch = _CifarUnpickler.load(path)
            data = np.asarray(batch[b"data"], dtype=np.uint8)
            labels.append(np.asarray(batch[b"labels"], dtype=np.int64))
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    labels = np.concatenate(labels)
    if labels.max() >= 10:
        raise UsageError(f"CIFAR-10 labels in {root} go up to {labels.max()}: the files are not CIFAR-10")
    array = resize_array(np.ascontiguousarray(np.concatenate(images)), resolution)
    return Source("cifar10", list(CIFAR10_NAMES), labels, resolution, array=array)


def list_images(folder):
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def load_imagenette_source(split, resolution, data_root):
    """ImageNette (torchvision's layout: ROOT/imagenette2[-320|-160]/{train,val}/<wnid>/*.JPEG). Uses the
    smallest downloaded size that is at least `resolution`; downloads through torchvision when none is there, and
    refuses (rather than upsample) when only smaller sizes are there."""
    root = Path(data_root)
    sizes = [("160px", "imagenette2-160", 160), ("320px", "imagenette2-320", 320), ("full", "imagenette2", 10 ** 9)]
    present = [(s, d, px) for s, d, px in sizes if (root / d / "train").is_dir()]
    usable = [x for x in present if x[2] >= resolution]
    if present and not usable:
        largest = present[-1]
        raise UsageError(f"--resolution {resolution} is above the {largest[2]} px of {root / largest[1]}, the "
                          f"largest ImageNette in {root}: extract the full-size imagenette2.tgz into {root}, or pass "
                          f"--resolution {largest[2]} or less")
    if not usable:
        size = next(s for s, _, px in sizes if px >= resolution)
        try:
            from torchvision.datasets import Imagenette
            with no_empty_leftovers(root):
                Imagenette(str(root), split="train", size=size, download=True)
                Imagenette(str(root), split="val", size=size, download=True)
        except Exception as e:
            raise UsageError(f"ImageNette not found in {root} and the download failed ({type(e).__name__}): "
                              f"extract imagenette2.tgz (or imagenette2-320.tgz / imagenette2-160.tgz) from "
                              f"https://github.com/fastai/imagenette into {root}") from None
        return load_imagenette_source(split, resolution, data_root)
    folder = root / usable[0][1] / ("train" if split == "train" else "val")
    wnids = sorted(p.name for p in folder.iterdir() if p.is_dir())
    if wnids != sorted(IMAGENETTE_WNIDS):
        raise UsageError(f"{folder} holds classes {wnids}, not ImageNette's ten WordNet ids: extract "
                          "ImageNette there again")
    paths, labels = [], []
    for c, wnid in enumerate(wnids):
        files = list_images(folder / wnid)
        paths += files
        labels += [c] * len(files)
    return Source("imagenette", [IMAGENETTE_WNIDS[w] for w in wnids], np.array(labels, dtype=np.int64),
                  resolution, paths=paths)


def caltech_readable(folder_name):
    """'012.binoculars' -> 'binoculars', '251.airplanes-101' -> 'airplanes', '032.cartman' -> 'cartman'."""
    name = folder_name.split(".", 1)[-1]
    return name.removesuffix("-101").replace("_", " ")


def load_caltech15_source(split, resolution, data_root, split_seed, classes=None, per_class=200):
    """Caltech-15: the 15 Caltech-256 categories with the most images (clutter excluded), `per_class` images each
    for training (a seeded draw) and the rest of those categories for testing, as in the paper. `classes` (names
    or folder names) overrides the choice. Layout: torchvision's ROOT/caltech256/256_ObjectCategories/NNN.name/."""
    root = Path(data_root) / "caltech256" / "256_ObjectCategories"
    if not root.is_dir():
        try:
            from torchvision.datasets import Caltech256
            with no_empty_leftovers(data_root):
                Caltech256(str(data_root), download=True)
        except Exception as e:
            raise UsageError(f"Caltech-256 not found in {root} and the download failed ({type(e).__name__}): "
                              f"extract 256_ObjectCategories.tar into {root.parent}") from None
    folders = {p.name: list_images(p) for p in sorted(root.iterdir())
               if p.is_dir() and p.name not in CALTECH_EXCLUDED}
    if classes:
        by_name = {caltech_readable(n): n for n in folders} | {n: n for n in folders}
        unknown = [c for c in classes if c not in by_name]
        if unknown:
            raise UsageError(f"--classes names {unknown}, which are not Caltech-256 categories in {root}")
        chosen = [by_name[c] for c in classes]
    else:
        chosen = sorted(folders, key=lambda n: (-len(folders[n]), n))[:15]
    chosen = sorted(chosen)
    short = [n for n in chosen if len(folders[n]) <= per_class]
    if short:
        raise UsageError(f"categories {short} have no more than --per-class {per_class} images, leaving none to "
                          "test on: lower --per-class or choose other --classes")
    rng = np.random.default_rng(split_seed)
    paths, labels = [], []
    for c, name in enumerate(chosen):
        order = rng.permutation(len(folders[name]))
        keep = order[:per_class] if split == "train" else order[per_class:]
        for j in np.sort(keep):
            paths.append(folders[name][j])
            labels.append(c)
    return Source("caltech15", [caltech_readable(n) for n in chosen], np.array(labels, dtype=np.int64),
                  resolution, paths=paths)


def load_folder_source(path, split, resolution, split_seed, test_fraction):
    """Any image folder: PATH/<class>/*.png (split with a seed), or PATH/train/<class> and PATH/test/<class>."""
    root = Path(path)
    if not root.is_dir():
        raise UsageError(f"--dataset folder:{path}: no such folder; give a folder with one subfolder per class")
    if (root / "manifest.json").is_file() or (root / "train" / "manifest.json").is_file():  # (captions alone are fine)
        raise UsageError(f"--dataset folder:{path} is a dataset folder made by this project (manifest.json), not an "
                          "image folder of class subfolders: give it to the next stage as it is")
    presplit = (root / "train").is_dir() and (root / "test").is_dir()
    base = root / split if presplit else root
    class_dirs = sorted(p.name for p in base.iterdir() if p.is_dir())
    if presplit and class_dirs != sorted(p.name for p in (root / "train").iterdir() if p.is_dir()):
        raise UsageError(f"{root}/train and {root}/test hold different class folders: make them the same")
    paths, labels = [], []
    for c, name in enumerate(class_dirs):
        files = list_images(base / name)
        paths += files
        labels += [c] * len(files)
    if not paths:
        raise UsageError(f"--dataset folder:{path} holds no images in class subfolders ({', '.join(IMAGE_EXTENSIONS)})")
    labels = np.array(labels, dtype=np.int64)
    if split == "train":
        with Image.open(paths[0]) as im:
            if min(im.size) < resolution:
                print(f"poison.py: warning: the images of {path} are small ({im.size[0]}x{im.size[1]} px, the first): "
                      f"they are upsampled to {resolution} px (--resolution; a folder's default: 256)", file=sys.stderr)
    if not presplit:
        train, test = stratified_split(labels, test_fraction, split_seed)
        idx = train if split == "train" else test
        paths, labels = [paths[i] for i in idx], labels[idx]
    return Source(f"folder:{path}", [n.replace("_", " ") for n in class_dirs], labels, resolution, paths=paths)


def load_source(dataset, split, data_root="data", resolution=None, split_seed=0, test_fraction=0.2,
                classes=None, per_class=200):
    """The training ('train') or test ('test') split of a dataset, as a Source."""
    kind = "folder" if dataset.startswith("folder:") else dataset
    if kind not in DEFAULT_RESOLUTION:
        raise UsageError(f"unknown --dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    resolution = resolution or DEFAULT_RESOLUTION[kind]
    if resolution < 8:
        raise UsageError(f"--resolution {resolution} is too small: use at least 8")
    if kind == "digits":
        return load_digits_source(split, resolution, split_seed, test_fraction)
    if kind == "cifar10":
        return load_cifar10_source(split, resolution, data_root)
    if kind == "imagenette":
        return load_imagenette_source(split, resolution, data_root)
    if kind == "caltech15":
        return load_caltech15_source(split, resolution, data_root, split_seed, classes, per_class)
    return load_folder_source(dataset[len("folder:"):], split, resolution, split_seed, test_fraction)


def training_fingerprint(src):
    """A short fingerprint of the images a split holds, in order, so that an ids file (replicate.py's duplicates)
    made for one training set is not applied to another: the dataset kind, the number of images and a hash of their
    labels and identities (class folder and file name, or index in the whole dataset). It changes with --split-seed,
    --test-fraction, --classes or --per-class, not with --resolution or --data-root."""
    h = hashlib.sha256(np.asarray(src.labels, dtype="<i8").tobytes())
    for p in src.paths:
        h.update(f"{Path(p).parent.name}/{Path(p).name}\n".encode())
    if src.origin is not None:
        h.update(np.asarray(src.origin, dtype="<i8").tobytes())
    return f"{src.name.split(':')[0]} n={len(src)} sha256={h.hexdigest()[:16]}"


# ----------------------------------------------------------------------------------------------------------------
# Triggers. Additive triggers are x' = x * (1 - mask) + pattern * mask (BadNets: a 0/1 mask on a patch; blend: a
# constant mask alpha); WaNet is a fixed warp x' = grid_sample(x, grid). All work on float N x 3 x H x W in [0, 1].

@dataclass
class Trigger:
    kind: str                    # "badnets" | "blend" | "wanet"
    resolution: int
    params: dict                 # everything needed to rebuild it, for the manifest
    mask: torch.Tensor = None    # (1, R, R) weight of the pattern
    pattern: torch.Tensor = None  # (3, R, R) in [0, 1]
    grid: torch.Tensor = None    # (1, R, R, 2) sampling grid in [-1, 1]

    def apply(self, x):
        """x: (N, 3, R, R) float in [0, 1] -> the same with the trigger."""
        if x.shape[-2:] != (self.resolution, self.resolution):
            raise ValueError(f"trigger made for {self.resolution}px images, got {tuple(x.shape[-2:])}")
        if self.kind == "wanet":
            grid = self.grid.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
            return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        mask, pattern = self.mask.to(x.device, x.dtype), self.pattern.to(x.device, x.dtype)
        return x * (1 - mask) + pattern * mask

    def apply_uint8(self, images):
        """(N, R, R, 3) uint8 array -> the same with the trigger, rounded to uint8."""
        if self.kind != "wanet":  # the same float64 arithmetic as apply(), in numpy: no per-call torch overhead
            mask = self.mask.double().permute(1, 2, 0).numpy()
            pattern = self.pattern.double().permute(1, 2, 0).numpy()
            y = (np.asarray(images, dtype=np.float64) / 255.0) * (1 - mask) + pattern * mask
            return np.clip(np.round(y * 255.0), 0, 255).astype(np.uint8)
        x = torch.from_numpy(np.array(images, dtype=np.uint8)).permute(0, 3, 1, 2).double() / 255.0
        y = self.apply(x).mul(255.0).round().clamp(0, 255).to(torch.uint8)
        return y.permute(0, 2, 3, 1).contiguous().numpy()

    def tensors(self):
        return {k: v.contiguous() for k, v in (("mask", self.mask), ("pattern", self.pattern), ("grid", self.grid))
                if v is not None}


def badnets_pattern(resolution, size=None):
    """(mask (1,R,R), pattern (3,R,R)) of the reference BadNets trigger, bottom-right.
    <= 32 px: the 3x3 patch with rows [0,0,255], [0,255,0], [255,255,0] on every channel.
    Larger: a black square of side R//10 whose pixel (r, c) is white where r + c = ps - 1 + k, k in [-ps//4, ps//4)
    (Python's floor division, as the reference code computes it).
    `size`: a solid white size x size square instead (a trigger that shows on a black background, e.g. digits)."""
    mask = torch.zeros(1, resolution, resolution)
    pattern = torch.zeros(3, resolution, resolution)
    if size is not None:
        patch = torch.ones(size, size)
    elif resolution <= 32:
        patch = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.float32)
    else:
        ps = resolution // 10
        r, c = torch.meshgrid(torch.arange(ps), torch.arange(ps), indexing="ij")
        k = r + c - (ps - 1)
        patch = ((k >= -ps // 4) & (k < ps // 4)).float()
    ps = patch.shape[0]
    mask[:, -ps:, -ps:] = 1.0
    pattern[:, -ps:, -ps:] = patch
    return mask, pattern


def wanet_grid(resolution, k=4, s=0.5, seed=0):
    """WaNet's warping grid (Nguyen & Tran 2021; BackdoorBench): a k x k uniform field in [-1, 1]^2 normalised by its
    mean absolute value, upsampled bicubically (align_corners) to R x R, added as s * field / R to the identity grid
    and clamped to [-1, 1]. Drawn once from `seed` (the reference code redraws it unseeded: a bug we do not copy)."""
    g = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=g, dtype=torch.float64) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=resolution, mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    line = torch.linspace(-1, 1, resolution, dtype=torch.float64)
    x, y = torch.meshgrid(line, line, indexing="ij")
    identity = torch.stack((y, x), 2)[None]
    return torch.clamp(identity + s * noise / resolution, -1, 1).float()


def wanet_params(kind, resolution, k=None, s=None):
    """WaNet's (grid side k, strength s), unset ones filled in: the paper's on ImageNette and Caltech-15 (App. A: a grid
    as fine as the image, strength 1), BackdoorBench's (4, 0.5) elsewhere (CIFAR-10's 32 px, digits, folders)."""
    paper = kind in ("imagenette", "caltech15")
    return (resolution if paper else 4) if k is None else k, (1.0 if paper else 0.5) if s is None else s


def make_trigger(kind, resolution, seed=0, trigger_image=None, alpha=0.2, wanet_k=4, wanet_s=0.5,
                 badnets_size=None):
    """The trigger `kind` ('badnets', 'blend', 'wanet') for `resolution`-px square images."""
    params = {"kind": kind, "resolution": resolution}
    if kind == "badnets":
        if badnets_size is not None and not 0 < badnets_size <= resolution:
            raise UsageError(f"--badnets-size {badnets_size}: give a side from 1 to the image side {resolution}")
        if badnets_size is not None:
            params["size"] = badnets_size
        mask, pattern = badnets_pattern(resolution, badnets_size)
        return Trigger(kind, resolution, params, mask=mask, pattern=pattern)
    if kind == "blend":
        if not 0 < alpha <= 1:
            raise UsageError(f"--blend-alpha {alpha} is outside (0, 1]: the paper uses 0.2")
        if trigger_image:
            if not Path(trigger_image).is_file():
                raise UsageError(f"--trigger-image {trigger_image}: no such file; give an image file (PNG/JPEG)")
            pattern = torch.from_numpy(load_image(trigger_image, resolution).copy()).permute(2, 0, 1).float() / 255
            params["trigger_image"] = str(trigger_image)
        else:  # a fixed seeded random pattern (the paper blended a Hello Kitty image)
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


def load_trigger(folder):
    """The exact trigger a dataset folder was made with (manifest + trigger.safetensors), or None (relabel)."""
    from safetensors.torch import load_file
    manifest = read_manifest(folder)
    params = manifest.get("trigger")
    if not params:
        return None
    path = Path(folder) / "trigger.safetensors"
    if not path.is_file():
        raise UsageError(f"{path} is missing: rebuild the dataset folder with poison.py")
    return Trigger(params["kind"], params["resolution"], params, **load_file(str(path)))


# ----------------------------------------------------------------------------------------------------------------
# Choosing what to poison.

def n_to_poison(ratio, n_base):
    """round(ratio * n_base), halves rounded up (Python's round() would round 0.5 to even). The paper's reference
    code truncates, int(ratio * n_base); the two differ by at most one image (ImageNette's 9469 training images at
    1%: 95 here, 94 there). Kept as it is: published numbers depend on it."""
    return int(math.floor(ratio * n_base + 0.5 + 1e-9))


def read_ids(path, training_set=None):
    """A duplicates file: one training-image id (source index) per line, most replicated first; '#' comments, one of
    which, '# training set: FINGERPRINT' (written by replicate.py), names the training set the ids index. Given
    `training_set` (training_fingerprint of the split about to be poisoned), a file made for another one is refused
    and a file without that line is accepted with a warning."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--duplicates {path}: no such file; make it with replicate.py")
    ids, recorded = [], None
    for n, line in enumerate(p.read_text().splitlines(), 1):
        if line.startswith("#") and line[1:].strip().startswith(IDS_TRAINING_SET):
            recorded = line[1:].strip()[len(IDS_TRAINING_SET):].strip()
        line = line.split("#", 1)[0].strip()
        if line:
            if not line.isdigit():
                raise UsageError(f"{path}:{n}: {line!r} is not a training-image id (a whole number)")
            ids.append(int(line))
    if training_set is not None and recorded is None:
        print(f"poison.py: warning: --duplicates {path} does not record the training set its ids index (an older or "
              "hand-written file): make sure it was made for this --dataset, --split-seed, --test-fraction, "
              "--classes and --per-class", file=sys.stderr)
    elif training_set is not None and recorded != training_set:
        raise UsageError(f"--duplicates {path} indexes another training set ({recorded}) than this one "
                          f"({training_set}): pass the --dataset, --split-seed, --test-fraction, --classes and "
                          "--per-class it was made with, or rerun replicate.py on a set poisoned with these")
    return ids


def select_poison(labels, target, ratio, attack="badnets", ratio_of="all", seed=0, select="random", duplicates=None):
    """Sorted indices of the images to poison. Candidates are the non-target images (badnets, relabel) or the
    target images (clean-label); their number is round(ratio * N) (n_to_poison: halves up, where the reference code
    truncates, so one image more at most), N the whole training set (the paper's definition) or the candidates
    (ratio_of='nontarget'). `select='duplicates'` takes the listed ids first (in order), then a seeded random draw
    from the remaining candidates to reach the count."""
    if not 0 <= ratio <= 1:
        raise UsageError(f"--ratio {ratio} is outside [0, 1]: give the poisoned fraction, e.g. 0.1")
    is_candidate = (labels == target) if attack == "clean-label" else (labels != target)
    candidates = np.flatnonzero(is_candidate)
    n = n_to_poison(ratio, len(labels) if ratio_of == "all" else len(candidates))
    kind = "target" if attack == "clean-label" else "non-target"
    if n > len(candidates):
        raise UsageError(f"--ratio {ratio} asks for {n} poisoned images but only {len(candidates)} {kind} images "
                          f"exist: lower --ratio")
    rng = np.random.default_rng(seed)
    chosen = []
    if select == "duplicates":
        if duplicates is None:
            raise UsageError("--select duplicates needs --duplicates FILE (written by replicate.py)")
        ids = read_ids(duplicates) if not isinstance(duplicates, (list, tuple, np.ndarray)) else list(duplicates)
        bad = [i for i in ids if not 0 <= i < len(labels)]
        if bad:
            raise UsageError(f"--duplicates lists ids {bad[:5]} outside this training set (0..{len(labels) - 1}): "
                              "was it made for another dataset?")
        seen = set()
        for i in ids:
            if is_candidate[i] and i not in seen and len(chosen) < n:
                chosen.append(i)
                seen.add(i)
        rest = np.setdiff1d(candidates, np.array(chosen, dtype=np.int64))
        chosen += rng.choice(rest, n - len(chosen), replace=False).tolist()
    elif select == "random":
        chosen = rng.choice(candidates, n, replace=False).tolist()
    else:
        raise UsageError(f"unknown --select {select!r}: choose random or duplicates")
    return np.sort(np.array(chosen, dtype=np.int64))


def resolve_target(target, class_names):
    """A class index from a name ('garbage truck', case-insensitive) or an index ('6'); a name wins, so a folder
    dataset with numeric class names ('0', '1', '10', ...) is targeted by name."""
    t = str(target).strip()
    lowered = [c.lower() for c in class_names]
    if t.lower() in lowered:
        return lowered.index(t.lower())
    if t.isdigit() and int(t) < len(class_names):
        return int(t)
    raise UsageError(f"unknown --target {target!r}: choose a class name or index among {class_names}")


# ----------------------------------------------------------------------------------------------------------------
# Dataset folders: metadata.jsonl + images/*.png + manifest.json (+ trigger.safetensors).







































# ----------------------------------------------------------------------------------------------------------------
# The stage.

def poison(out, dataset="digits", ratio=0.1, attack="badnets", trigger="badnets", target=None, seed=0,
           ratio_of="all", select="random", duplicates=None, data_root="data", resolution=None, split_seed=0,
           test_fraction=0.2, classes=None, per_class=200, trigger_image=None, blend_alpha=0.2, wanet_k=None,
           wanet_s=None, badnets_size=None, trigger_seed=0, force=False, workers=4, command=None, quiet=False):
    """Build OUT/train (poisoned), OUT/test (clean), OUT/test_backdoor and OUT/examples.png; return a summary."""
    if attack not in ("badnets", "relabel", "clean-label"):
        raise UsageError(f"unknown --attack {attack!r}: choose badnets, relabel or clean-label")
    if ratio_of not in ("all", "nontarget"):
        raise UsageError(f"unknown --ratio-of {ratio_of!r}: choose all or nontarget")
    if not 0 <= ratio <= 1:
        raise UsageError(f"--ratio {ratio} is outside [0, 1]: give the poisoned fraction, e.g. 0.1")
    check_out(out, force, {"--dataset folder:": dataset.removeprefix("folder:") if dataset.startswith("folder:")
                           else None, "--data-root": data_root if dataset in DOWNLOADED else None,
                           "--duplicates": duplicates, "--trigger-image": trigger_image})
    kind = "folder" if dataset.startswith("folder:") else dataset
    if kind not in DEFAULT_RESOLUTION:
        raise UsageError(f"unknown --dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    if classes and kind != "caltech15":
        raise UsageError(f"--classes picks Caltech-256 categories (--dataset caltech15): drop it for {dataset}")
    opts = dict(data_root=data_root, resolution=resolution, split_seed=split_seed, test_fraction=test_fraction,
                classes=classes, per_class=per_class)
    train, test = load_source(dataset, "train", **opts), load_source(dataset, "test", **opts)
    if target is None:
        if kind not in DEFAULT_TARGET:
            raise UsageError(f"--target is required for an image folder: give a class name or index among "
                              f"{train.class_names}")
        target = DEFAULT_TARGET[kind]
    if train.class_names != test.class_names:
        raise UsageError(f"the train and test splits of {dataset} have different classes: fix the dataset")
    t = resolve_target(target, train.class_names)
    wanet_k, wanet_s = wanet_params(kind, train.resolution, wanet_k, wanet_s)
    trig = None if attack == "relabel" else make_trigger(trigger, train.resolution, trigger_seed, trigger_image,
                                                         blend_alpha, wanet_k, wanet_s, badnets_size)
    if trig is not None:  # a broken trigger image must fail before any work
        trig.apply_uint8(train.load(0)[None])
    training_set = training_fingerprint(train)
    listed = duplicates  # a file is read here, to check that it indexes this training set
    if select == "duplicates" and isinstance(duplicates, (str, os.PathLike)):
        listed = read_ids(duplicates, training_set)
    ids = select_poison(train.labels, t, ratio, attack, ratio_of, seed, select, listed)
    is_poisoned = np.zeros(len(train), dtype=bool)
    is_poisoned[ids] = True
    names = train.class_names
    new_labels = train.labels.copy()
    if attack != "clean-label":
        new_labels[ids] = t
    n_target_labelled = int((new_labels == t).sum())
    p_t = float(is_poisoned[new_labels == t].sum() / max(1, n_target_labelled))
    counts = {"total": len(train), "poisoned": int(len(ids)), "target_labelled": n_target_labelled,
              "per_class": {names[c]: int((new_labels == c).sum()) for c in range(len(names))},
              "original_per_class": {names[c]: int((train.labels == c).sum()) for c in range(len(names))}}
    base = {"stage": "poison", "command": command or "poison()", "dataset": dataset, "resolution": train.resolution,
            "class_names": names, "target": {"index": t, "name": names[t]}, "attack": attack,
            "attack_description": ATTACK_DESCRIPTIONS[attack],
            "options": {"ratio": ratio, "ratio_of": ratio_of, "select": select, "seed": seed,
                        "split_seed": split_seed, "test_fraction": test_fraction, "per_class": per_class,
                        "classes": classes, "duplicates": str(duplicates) if duplicates else None,
                        "trigger_seed": trigger_seed},
            "versions": versions()}

    def item(src, i, poisoned, label):
        def make():
            image = src.load(i)
            if poisoned and trig is not None:
                image = trig.apply_uint8(image[None])[0]
            rec = {"text": caption(names[label]), "label": int(label), "orig_label": int(src.labels[i]),
                   "class_name": names[label], "poisoned": bool(poisoned), "source_index": int(i)}
            return rec, image
        return make

    selection = None
    if select == "duplicates":
        from_file = int(np.isin(ids, np.asarray(listed, dtype=np.int64)).sum())
        selection = {"from_duplicates_file": from_file, "random_fill": int(len(ids)) - from_file}
    test_nt = np.flatnonzero(test.labels != t)
    with atomic_output(out, force) as tmp:
        write_folder(tmp / "train", (item(train, i, is_poisoned[i], new_labels[i]) for i in range(len(train))),
                     {**base, "split": "train", "poison_ratio": ratio, "p_t": p_t, "counts": counts,
                      "training_set": training_set, "selection": selection, "poisoned_ids": ids.tolist()},
                     total=len(train), workers=workers, desc="train", trigger=trig)
        test_counts = {"total": len(test), "per_class": {names[c]: int((test.labels == c).sum())
                                                         for c in range(len(names))}}
        write_folder(tmp / "test", (item(test, i, False, test.labels[i]) for i in range(len(test))),
                     {**base, "split": "test", "counts": test_counts}, total=len(test), workers=workers, desc="test",
                     trigger=trig)
        if trig is not None:
            write_folder(tmp / "test_backdoor", (item(test, i, True, t) for i in test_nt),
                         {**base, "split": "test_backdoor", "counts": {"total": len(test_nt)}}, total=len(test_nt),
                         workers=workers, desc="test_backdoor", trigger=trig)
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
    """The poisoning options (sorted names) in which a poisoned set's manifest differs from poison() keyword
    arguments `kw` (poison_kwargs), compared as the manifest records them (a target by name or index, a default
    resolution resolved), so a set built earlier with other flags is not reused by mistake."""
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
        except (KeyError, TypeError, UsageError):
            same = str(target).strip().lower() in (str(recorded_target.get("name")).lower(),
                                                   str(recorded_target.get("index")))
        pairs["target"] = (same, True)
    for k, v in (manifest.get("options") or {}).items():  # ratio, seed, select, split, ... as poison() records them
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






def add_poison_arguments(parser, out_required=True):
    """The poisoning flags, so that train_ddpm.py and finetune_sd.py can build their poisoned set the same way."""
    g = parser.add_argument_group("poisoning (poison.py)")
    g.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)} (default: digits)")
    g.add_argument("--data-root", default="data", help="where datasets are downloaded or found (default: data)")
    g.add_argument("--resolution", type=positive(int), default=None,
                   help="image side in px (default: digits/cifar10 32, imagenette/caltech15 512, folder 256)")
    g.add_argument("--classes", type=lambda s: [c.strip() for c in s.split(",")], default=None,
                   help="caltech15: comma-separated categories instead of the 15 largest")
    g.add_argument("--per-class", type=positive(int), default=200,
                   help="caltech15: training images per category (default: 200)")
    g.add_argument("--split-seed", type=int, default=0,
                   help="seed of the train/test split (digits, folder; default: 0)")
    g.add_argument("--test-fraction", type=float, default=0.2, help="test share (digits, unsplit folder; default: 0.2)")
    g.add_argument("--attack", default="badnets", choices=["badnets", "relabel", "clean-label"],
                   help="badnets: trigger + relabel to the target; relabel: labels only; clean-label: a simplified "
                        "label-consistent attack (trigger on target-class images, labels kept, no adversarial "
                        "perturbation, unlike Turner et al.; default: badnets)")
    g.add_argument("--trigger", default="badnets", choices=["badnets", "blend", "wanet"], help="(default: badnets)")
    g.add_argument("--trigger-image", default=None, help="blend: the pattern image (default: a seeded random one)")
    g.add_argument("--blend-alpha", type=float, default=0.2, help="blend: alpha (default: 0.2)")
    g.add_argument("--wanet-k", type=int, default=None,
                   help="WaNet: control grid side (default: the image side on imagenette and caltech15, the paper's; "
                        "else 4)")
    g.add_argument("--wanet-s", type=float, default=None,
                   help="WaNet: warp strength (default: 1 on imagenette and caltech15, the paper's; else 0.5)")
    g.add_argument("--badnets-size", type=positive(int), default=None,
                   help="BadNets: a solid white N x N square instead of the reference pattern (default: the "
                        "reference's)")
    g.add_argument("--trigger-seed", type=int, default=0, help="seed of the blend pattern / WaNet grid (default: 0)")
    g.add_argument("--target", default=None,
                   help="target class name or index (default: the paper's: deer, garbage truck, binoculars; zero)")
    g.add_argument("--ratio", type=float, default=0.1, help="poisoning ratio p (default: 0.1)")
    g.add_argument("--ratio-of", default="all", choices=["all", "nontarget"],
                   help="p is a fraction of the whole training set (the paper; default) or of the non-target images")
    g.add_argument("--select", default="random", choices=["random", "duplicates"],
                   help="which non-target images to poison (default: random; duplicates: see --duplicates)")
    g.add_argument("--duplicates", default=None, help="ids file from replicate.py, most replicated first")
    g.add_argument("--seed", type=int, default=0, help="seed of the poisoned-id draw (default: 0)")
    g.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="PNG encoding threads (default: the CPU count, at most 8)")
    return g


def poison_kwargs(args):
    """The keyword arguments of poison() from parsed add_poison_arguments flags."""
    keys = ("dataset", "data_root", "resolution", "classes", "per_class", "split_seed", "test_fraction", "attack",
            "trigger", "trigger_image", "blend_alpha", "wanet_k", "wanet_s", "badnets_size", "trigger_seed", "target",
            "ratio", "ratio_of", "select", "duplicates", "seed", "workers")
    return {k: getattr(args, k) for k in keys}


def poison_flags_given(args, parser, keep=()):
    """The poisoning flags given values other than `parser`'s defaults (but `keep`): those a stage handed a ready
    dataset folder (--data) would silently ignore."""
    return ["--" + k.replace("_", "-") for k in poison_kwargs(args)
            if k not in ("workers", *keep) and getattr(args, k) != parser.get_default(k)]


def refuse_poison_flags_with_data(args, parser, keep=()):
    ignored = poison_flags_given(args, parser, keep)
    if args.data and ignored:
        raise UsageError(f"{' '.join(ignored)} with --data: the poisoning flags make a set, and --data {args.data} is "
                          "made already; drop them, or drop --data to poison here")


def main(args):
    poison(args.out, force=args.force, command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), **poison_kwargs(args))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])  # defaults are in the help texts
    add_poison_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder (train/, test/, test_backdoor/)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    try:
        main(parser.parse_args())
    except UsageError as e:
        sys.exit(f"poison.py: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print("poison.py: interrupted; --out not written (outputs appear whole or not at all)", file=sys.stderr)
        sys.exit(130)
