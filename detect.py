"""detect.py -- poison detectors on the training set vs the generations: the first "castle wall" of the paper
("From Trojan Horses to Castle Walls", Pan, Yao et al., Tab. 3 and Fig. A6). A poisoned diffusion model amplifies the
trigger, so detectors that probe a classifier trained on the poisoned set separate poisoned from clean images
better among its generations than among the training images (AUROC up by as much as 0.25 in the paper).

    # the three detectors; ground truth of the generations from the trigger detector (predicted class 1 = trigger)
    python detect.py --classifier runs/clf-poisoned --train data/digits-badnets-0.1 --generated runs/gen-digits-0.1 \\
        --detector runs/detector --method all --out runs/detect-digits-0.1
    # ground truth from dissect.py's per-image verdicts (G1/G2 = carries the trigger; its OUT, OUT/<setting> or
    # OUT/<setting>/verdicts.jsonl), CD only, 1000 images a set, bf16 autocast on the GPU
    python detect.py --classifier runs/clf-c10 --train data/c10-bn-0.05 --generated runs/gen-c10 \\
        --groups runs/dissect-c10 --method cd --n 1000 --dtype bf16 --out runs/detect-c10-cd
    # ground truth from a boolean field of the generation folder's metadata
    python detect.py ... --generated-labels trigger --out runs/detect-x

OUT/detect.json holds the settings, the AUROC of every method on both sets and the improvement (each with its 95%
interval), and every per-image score; OUT/detect.md the paper's Table 3 layout (rows: method; columns: training set
AUROC, generation set AUROC, Δ); OUT/hist_<method>.png the score histograms of clean vs poisoned images, training
set vs generations (Fig. A6).

The detectors (all probe `--classifier`, a classifier folder of classify.py trained on the poisoned set; images in
[0, 1], resizing and normalisation inside the model, so every pass of a detector sees the same normalisation):
- CD, Cognitive Distillation (Huang et al., ICLR 2023): per image a one-channel mask m = (tanh θ + 1) / 2, θ = 1 at
  first, optimised for 100 Adam steps (lr 0.1, betas 0.1 / 0.1) on
      mean_k |f(x·m + (1 − m)·r)_k − f(x)_k| + γ‖m‖₁ + β·TV(m),  γ = 0.01, β = 1, f the logits,
  r a fresh uniform colour per image and channel at every step, TV the sum of squared neighbour differences over
  c·h·w. Score ‖m‖₁: a trigger is a small pattern that keeps the prediction alone, so small = poisoned. The mask
  lives at the side the classifier sees (images are resized to it first, as the classifier would). ‖m‖₁ sums over
  pixels while the logit term does not, so γ = 0.01 (tuned on 32-px CIFAR) weighs the mask less on smaller images
  and more on larger ones; `--cd-gamma` changes it.
- STRIP (Gao et al., ACSAC 2019): each input superimposed on 100 training images, clamp(x + x', 0, 1); score the mean
  prediction entropy (natural log). A trigger keeps the prediction whatever the overlay: low = poisoned.
- FCT (Chen et al., NeurIPS 2022): a copy of the classifier fine-tuned 10 epochs on the training set with L_intra
  (cosine similarity of the L2-normalised class-mean penultimate features, off-diagonal); score the mean squared
  change of the penultimate features under a random rotation (±180°) then translation (±20%): high = poisoned.
AUROC (scikit-learn) of 1 − minmax(score) for CD and STRIP and of the score for FCT, poisoned = 1. Ground truth:
the `poisoned` flag of the training set's metadata; for the generations the trigger detector's verdict
(`--detector`), dissect.py's G1/G2 membership (`--groups`) or a metadata field (`--generated-labels`). Both sets
contribute the same number of images (the smaller set's size, or `--n`), a seeded draw that keeps each set's share
of poisoned images. Every AUROC and Δ comes with a 95% bootstrap interval (poisoned and clean images resampled
separately, 1000 times): with a few dozen poisoned images, differences of a few hundredths are noise.
The two sets, and the data the classifier was trained on, must be of one resolution.

Python API: `cd_scores(model, images, ...)`, `strip_scores(model, images, overlays, ...)`,
`fct_finetune(model, data, ...)`, `fct_scores(model, images, ...)`, `auroc(scores, poisoned, method)`,
`auroc_of(pos, neg)`, `bootstrap_aurocs(scores, poisoned, method)`,
`generation_truth(folder, ...)`, `run_detection(classifier, train, generated, ...)`.
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import HelpFormatter, UsageError, atomic_output, check_out, load_folder, positive, same_classes, versions
from classify import load_classifier, require_resolution

METHODS = ("cd", "strip", "fct")
METHOD_NAMES = {"cd": "CD", "strip": "STRIP", "fct": "FCT"}
# Which end of each raw score is poisoned; "low" scores are turned into 1 - minmax(score) before the AUROC.
POISONED_END = {"cd": "low", "strip": "low", "fct": "high"}
SCORE_LABELS = {"cd": "mask L1 norm ‖m‖₁ (low = poisoned)", "strip": "mean entropy (low = poisoned)",
                "fct": "feature change under rotation + translation (high = poisoned)"}
# Cognitive Distillation (Huang et al. 2023; HanxunH/CognitiveDistillation defaults for logits).
CD_STEPS = 100
CD_LR = 0.1
CD_BETAS = (0.1, 0.1)
CD_GAMMA = 0.01   # weight of ‖m‖₁
CD_BETA = 1.0     # weight of TV(m)
BOOTSTRAP = 1000  # resamples for the AUROC's 95% interval
# STRIP (Gao et al. 2019).
STRIP_OVERLAYS = 100
# FCT (Chen et al. 2022; SCLBD/Effective_backdoor_defense, as the CognitiveDistillation repo runs it).
FCT_EPOCHS = 10
FCT_LR = 0.01
FCT_MOMENTUM = 0.9
FCT_WEIGHT_DECAY = 5e-4
FCT_DEGREES = 180.0     # RandomRotation(180)
FCT_TRANSLATE = 0.2     # RandomAffine(degrees=0, translate=(0.2, 0.2))
GROUPS_WITH_TRIGGER = ("G1", "G2")


def autocast(device, dtype):
    """bf16 autocast on CUDA when asked; fp32 everywhere else."""
    if dtype == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def model_device(model):
    return next(model.parameters()).device


def upcast(t):
    """Half-precision outputs of autocast -> float32; float32 and float64 kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def as_float(x):
    """uint8 -> float32 in [0, 1]; floating point kept as it is (float64 for exactness tests)."""
    return x.float() / 255.0 if x.dtype == torch.uint8 else (x if x.is_floating_point() else x.float())


# ----------------------------------------------------------------------------------------------------------------
# Cognitive Distillation. Every image's mask has its own loss term and Adam is elementwise, so the masks of a batch
# are optimised together exactly as each would be alone -- provided the batch loss is the SUM of the per-image
# losses (the reference code backpropagates their mean, which shrinks every gradient by the batch size and so
# changes the result through Adam's epsilon) and each image has its own colours r (drawn up front per image here).

def total_variation(m):
    """(N, c, h, w) -> (N,): sum of squared differences between vertical and horizontal neighbours over c·h·w."""
    _, c, h, w = m.shape
    tv_h = (m[:, :, 1:, :] - m[:, :, :-1, :]).pow(2).sum(dim=(1, 2, 3))
    tv_w = (m[:, :, :, 1:] - m[:, :, :, :-1]).pow(2).sum(dim=(1, 2, 3))
    return (tv_h + tv_w) / (c * h * w)


def cd_loss(adv_logits, clean_logits, m, gamma=CD_GAMMA, beta=CD_BETA):
    """Per-image CD objective (N,): mean_k |f(x_adv)_k - f(x)_k| + gamma * ||m||_1 + beta * TV(m)."""
    distill = (adv_logits - clean_logits).abs().mean(dim=1)
    return distill + gamma * m.abs().sum(dim=(1, 2, 3)) + beta * total_variation(m)


def cd_masks(model, x, colors, lr=CD_LR, betas=CD_BETAS, gamma=CD_GAMMA, beta=CD_BETA, dtype="fp32", bar=None):
    """Optimise the masks of one batch. x: (B, 3, H, W) float in [0, 1] on the model's device; colors: (B, steps, 3)
    the uniform colour r of every image at every step. Returns the masks (B, 1, H, W) in [0, 1]."""
    device = x.device
    amp = autocast(device, dtype)
    steps = colors.shape[1]
    # theta = 1 at first: m = (tanh 1 + 1) / 2 ~ 0.88 everywhere
    theta = torch.ones(x.shape[0], 1, *x.shape[-2:], device=device, dtype=x.dtype, requires_grad=True)
    opt = torch.optim.Adam([theta], lr=lr, betas=betas)
    with torch.no_grad(), amp:
        clean = upcast(model(x))
    with torch.enable_grad():
        for k in range(steps):
            m = (torch.tanh(theta) + 1) / 2                                   # (B, 1, H, W)
            r = colors[:, k, :, None, None].to(device, x.dtype)              # (B, 3, 1, 1)
            x_adv = x * m + (1 - m) * r
            with amp:
                adv = upcast(model(x_adv))
            loss = cd_loss(adv, clean, m, gamma, beta).sum()                 # a sum: images stay independent
            theta.grad, = torch.autograd.grad(loss, theta)                   # no gradients for the weights
            opt.step()
            if bar is not None:
                bar.update(1)
    return ((torch.tanh(theta) + 1) / 2).detach()


def cd_colors(n, steps=CD_STEPS, seed=0):
    """(n, steps, 3) uniform colours: image i at step k sees colors[i, k] whatever the batch it is in."""
    return torch.rand(n, steps, 3, generator=torch.Generator().manual_seed(seed))


def cd_scores(model, images, steps=CD_STEPS, lr=CD_LR, betas=CD_BETAS, gamma=CD_GAMMA, beta=CD_BETA, seed=0,
              colors=None, batch_size=128, dtype="fp32", progress=False, desc="CD", return_masks=False):
    """Cognitive Distillation scores ||m||_1 (N,) of `images` ((N, 3, H, W) uint8 or float in [0, 1]); low =
    poisoned. `colors` (N, steps, 3) overrides the seeded draw. With return_masks, also the masks (N, 1, H, W)."""
    model.eval()
    device = model_device(model)
    n = len(images)
    colors = cd_colors(n, steps, seed) if colors is None else colors
    if colors.shape != (n, colors.shape[1], 3):
        raise UsageError(f"colors have shape {tuple(colors.shape)}, expected ({n}, steps, 3)")
    size = getattr(model, "input_size", None)  # the side the classifier sees: the mask lives there
    scores, masks = [], []
    with tqdm(total=math.ceil(n / batch_size) * colors.shape[1], desc=desc, leave=False, disable=not progress,
              unit="step") as bar:
        for start in range(0, n, batch_size):
            x = as_float(images[start:start + batch_size]).to(device)
            if size is not None and tuple(x.shape[-2:]) != (size, size):  # as Classifier.prepare resizes
                x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                                  antialias=x.shape[-1] > size)
            m = cd_masks(model, x, colors[start:start + batch_size], lr, betas, gamma, beta, dtype, bar)
            scores.append(m.flatten(1).sum(1).cpu())                          # ||m||_1, m >= 0
            if return_masks:
                masks.append(m.cpu())
    scores = torch.cat(scores)
    return (scores, torch.cat(masks)) if return_masks else scores


# ----------------------------------------------------------------------------------------------------------------
# STRIP. Every input is blended with the same seeded draw of training images (the reference draws one set of
# overlays per batch; one draw for the run makes an image's score independent of its batch).

def strip_overlays(folder, n=STRIP_OVERLAYS, seed=0, workers=4):
    """(n, 3, H, W) uint8: a seeded draw of images of the dataset folder (with replacement only if it is smaller)."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(folder), size=n, replace=len(folder) < n)
    return read_images(folder, idx, workers=workers)


def entropy(logits):
    """Prediction entropy (natural log) of logits (..., K) -> (...). From log_softmax, so p = 0 gives 0, not NaN
    (the reference's log(p) can)."""
    logp = F.log_softmax(upcast(logits), dim=-1)
    return -(logp.exp() * logp).sum(-1)


@torch.no_grad()
def strip_scores(model, images, overlays, batch_size=1024, dtype="fp32", progress=False, desc="STRIP"):
    """STRIP scores (N,): the mean entropy of the predictions on clamp(x + overlay, 0, 1) over the K overlays
    ((K, 3, h, w), resized to the images' size if needed); low = poisoned. About `batch_size` blends per forward."""
    model.eval()
    device = model_device(model)
    amp = autocast(device, dtype)
    ov = as_float(overlays).to(device)
    size = tuple(images.shape[-2:])
    if tuple(ov.shape[-2:]) != size:
        ov = F.interpolate(ov, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    k = len(ov)
    per_chunk = max(1, batch_size // k)
    scores = []
    for start in tqdm(range(0, len(images), per_chunk), desc=desc, leave=False, disable=not progress):
        x = as_float(images[start:start + per_chunk]).to(device)              # (b, 3, H, W)
        blend = (x[:, None] + ov[None]).clamp(0, 1).flatten(0, 1)             # (b * K, 3, H, W)
        with amp:
            logits = model(blend)
        scores.append(entropy(logits).view(len(x), k).mean(1).cpu())
    return torch.cat(scores)


# ----------------------------------------------------------------------------------------------------------------
# FCT: fine-tune with L_intra, then the feature change under a random rotation + translation.

def intra_class_loss(features, labels):
    """L_intra: the cosine similarities of the L2-normalised class-mean features of the classes present, diagonal
    zeroed, averaged over the k x k matrix (the reference's arithmetic: the off-diagonal mean times (k - 1) / k).
    Zero (no gradient) when fewer than two classes are present."""
    classes = labels.unique()
    if len(classes) < 2:
        return None
    centres = torch.stack([features[labels == c].mean(0) for c in classes])   # (k, D)
    centres = F.normalize(upcast(centres), dim=1)
    sim = centres @ centres.T
    sim = sim * (1 - torch.eye(len(classes), device=sim.device))
    return sim.mean()


def fct_finetune(model, data, epochs=FCT_EPOCHS, lr=FCT_LR, momentum=FCT_MOMENTUM, weight_decay=FCT_WEIGHT_DECAY,
                 batch_size=128, seed=0, dtype="fp32", workers=0, progress=False):
    """A copy of `model` fine-tuned on `data` (a Dataset of (uint8 image, label)) with L_intra, SGD (lr 0.01,
    momentum 0.9, weight decay 5e-4), batch norm in training mode, seeded shuffling (the reference does not shuffle;
    on a class-sorted folder its batches would hold one class and no loss). Returned in eval mode."""
    device = model_device(model)
    tuned = copy.deepcopy(model).train()
    for p in tuned.parameters():
        p.requires_grad_(True)
    amp = autocast(device, dtype)
    opt = torch.optim.SGD(tuned.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed),
                                         pin_memory=device.type == "cuda")
    with torch.enable_grad(), tqdm(total=epochs * len(loader), desc="FCT fine-tune", leave=False,
                                   disable=not progress) as bar:
        for _ in range(epochs):
            for x, y in loader:
                x, y = as_float(x).to(device, non_blocking=True), y.to(device)
                with amp:
                    features = tuned.features(x)
                loss = intra_class_loss(upcast(features), y)
                if loss is not None:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.set_postfix(l_intra=f"{loss.item():.4f}", refresh=False)
                bar.update(1)
    return tuned.eval()


def fct_params(n, size, seed=0, degrees=FCT_DEGREES, translate=FCT_TRANSLATE):
    """Per-image transform parameters, drawn up front: angles (n,) uniform in [-degrees, degrees] and integer shifts
    (n, 2) (dx, dy), each round(uniform(-translate * side, translate * side)) as torchvision's RandomAffine does."""
    h, w = size
    g = torch.Generator().manual_seed(seed)
    angles = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * degrees
    limit = torch.tensor([translate * w, translate * h], dtype=torch.float64)
    shifts = torch.round((torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * limit)
    return angles, shifts


def fct_transform(x, angles, shifts):
    """Rotate each image about its centre by angles[i] degrees (counter-clockwise, as torchvision), then shift it by
    shifts[i] = (dx, dy) px: nearest neighbour, zeros outside, as torchvision's RandomRotation then
    RandomAffine(translate) on PIL images: two resamplings, so the corners the rotation empties stay empty when shifted.
    x: (N, 3, H, W) float."""
    h, w = x.shape[-2:]
    a = torch.deg2rad(angles.to(torch.float64))
    cos, sin, zero, one = a.cos(), a.sin(), torch.zeros_like(a), torch.ones_like(a)
    tx, ty = shifts[:, 0].to(torch.float64), shifts[:, 1].to(torch.float64)
    sx, sy = w / 2, h / 2                               # pixels -> affine_grid's [-1, 1] coordinates
    # output pixel p (from the centre, y down) reads input pixel R p for the rotation, p - shift for the shift
    rotate = torch.stack([torch.stack([cos, -sin * sy / sx, zero], 1), torch.stack([sin * sx / sy, cos, zero], 1)], 1)
    shift = torch.stack([torch.stack([one, zero, -tx / sx], 1), torch.stack([zero, one, -ty / sy], 1)], 1)
    for theta in (rotate, shift):
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return x


@torch.no_grad()
def fct_scores(model, images, seed=0, params=None, batch_size=1024, dtype="fp32", progress=False, desc="FCT"):
    """FCT scores (N,): mean over features of (f(x) - f(T x))^2, f = model.features (penultimate), T the image's
    own random rotation + translation (`params` = (angles, shifts), else drawn from `seed`); high = poisoned.
    `model` is normally the output of fct_finetune."""
    model.eval()
    device = model_device(model)
    amp = autocast(device, dtype)
    n = len(images)
    angles, shifts = fct_params(n, tuple(images.shape[-2:]), seed) if params is None else params
    scores = []
    for start in tqdm(range(0, n, batch_size), desc=desc, leave=False, disable=not progress):
        x = as_float(images[start:start + batch_size]).to(device)
        tx = fct_transform(x, angles[start:start + batch_size], shifts[start:start + batch_size])
        with amp:
            f = upcast(model.features(torch.cat([x, tx])))
        scores.append((f[:len(x)] - f[len(x):]).pow(2).mean(1).cpu())
    return torch.cat(scores)


# ----------------------------------------------------------------------------------------------------------------
# AUROC with each method's sign convention.

def minmax(x):
    lo, hi = x.min(), x.max()
    return np.zeros_like(x) if hi <= lo else np.clip((x - lo) / (hi - lo), 0, 1)


def suspicion(scores, method):
    """Higher = more likely poisoned: 1 - minmax(score) for CD and STRIP (low = poisoned), the score for FCT."""
    s = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(s).all():
        raise UsageError(f"{METHOD_NAMES[method]} produced non-finite scores: check the classifier "
                          "(NaN weights?) and --dtype")
    return 1.0 - minmax(s) if POISONED_END[method] == "low" else s


def auroc(scores, poisoned, method):
    """AUROC of `method`'s raw `scores` against `poisoned` (bool, 1 = poisoned)."""
    y = np.asarray(poisoned, dtype=bool)
    s = suspicion(scores, method)
    return float(auroc_of(s[y], s[~y]))


def auroc_of(pos, neg):
    """The area under the ROC curve of suspicion scores `pos` (poisoned images) and `neg` (clean ones): the chance
    that a poisoned image scores above a clean one, ties counted half (Mann-Whitney), by counting in the sorted
    clean scores. It equals scikit-learn's roc_auc_score (a test checks) and takes microseconds instead of its
    milliseconds of input checks, which the bootstrap's thousands of resamples would pay each."""
    if len(pos) == 0 or len(neg) == 0:
        raise UsageError("the AUROC needs poisoned and clean images, and this set holds only "
                          f"{'clean' if len(pos) == 0 else 'poisoned'} ones")
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, side="left").sum()
    ties = np.searchsorted(neg, pos, side="right").sum() - below
    return (below + 0.5 * ties) / (len(pos) * len(neg))


def bootstrap_aurocs(scores, poisoned, method, n=BOOTSTRAP, seed=0):
    """(n,) AUROCs of bootstrap resamples that redraw the poisoned and the clean images separately (each resample
    keeps the set's numbers of both). With a few dozen poisoned images an AUROC is uncertain by several hundredths:
    their percentiles give its interval, and the differences of two sets' resamples the interval of Δ."""
    y = np.asarray(poisoned, dtype=bool)
    s = suspicion(scores, method)
    pos, neg = s[y], s[~y]
    rng = np.random.default_rng(seed)
    return np.array([auroc_of(rng.choice(pos, len(pos)), rng.choice(neg, len(neg))) for _ in range(n)])


def interval(samples, level=0.95):
    return [float(v) for v in np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])]


# ----------------------------------------------------------------------------------------------------------------
# Data: dataset folders, the ground truth of each set, the draw of images.

def read_images(folder, indices, workers=4, progress=False, desc=None):
    """(N, 3, H, W) uint8 of the images `indices` of a FolderDataset, all brought to the first one's size."""
    indices = [int(i) for i in indices]
    if not indices:
        raise UsageError(f"no images to read from {folder.root}")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        images = list(tqdm(pool.map(folder.image_uint8, indices), total=len(indices), desc=desc or "load",
                           leave=False, disable=not progress))
    size = tuple(images[0].shape[-2:])
    images = [im if tuple(im.shape[-2:]) == size else
              F.interpolate(im[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
              .round().clamp(0, 255).to(torch.uint8) for im in images]
    return torch.stack(images)


class LabelledImages(torch.utils.data.Dataset):
    """(uint8 image (3, H, W), label) of a FolderDataset, read lazily, every image at `size` -- for fine-tuning."""

    def __init__(self, folder, size):
        self.folder, self.size = folder, tuple(size)

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        x = self.folder.image_uint8(i)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x[None].float(), size=self.size, mode="bilinear", antialias=True,
                              align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        return x, int(self.folder.labels[i])


def open_train(path):
    """The training folder: a dataset folder, or a poisoned set's root (its train/)."""
    path = Path(path)
    if (path / "train" / "metadata.jsonl").is_file():
        path = path / "train"
    return load_folder(path)


def check_classes(config, folder, what, classifier):
    if not same_classes(config["class_names"], folder.class_names):
        raise UsageError(f"{what} {folder.root} holds classes {folder.class_names} but the classifier {classifier} "
                          f"knows {config['class_names']}: use the classifier trained on this poisoned set")


def groups_file(path, folder):
    """dissect.py's per-image verdicts for the generation folder: the file itself, a setting folder of dissect.py's
    OUT (its verdicts.jsonl), or dissect.py's OUT (the setting whose groups.json names this folder, or the only one)."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "verdicts.jsonl").is_file():
        return path / "verdicts.jsonl"
    settings = sorted(p.parent for p in path.glob("*/verdicts.jsonl"))
    if len(settings) > 1:
        def folder_of(d):
            try:
                return Path(json.loads((d / "groups.json").read_text()).get("folder", "")).resolve()
            except (OSError, json.JSONDecodeError):
                return None
        settings = [d for d in settings if folder_of(d) == Path(folder.root).resolve()]
    if len(settings) != 1:
        raise UsageError(f"--groups {path}: no (single) verdicts.jsonl for {folder.root} there; give dissect.py's "
                          "OUT/<setting>/verdicts.jsonl of this generation folder")
    return settings[0] / "verdicts.jsonl"


def read_groups(path, folder):
    """Per-image trigger flags from dissect.py's verdicts (see groups_file): JSON Lines (or a JSON list, or an
    object whose "images" holds the list) of records with "file_name" (as in the generation folder's metadata) or
    "index", and "group" ("G1".."G4" or 1..4; G1 and G2 carry the trigger) or, where the group is null (dissect.py
    groups only the target prompt's images), the trigger detector's boolean "trigger"."""
    path = groups_file(path, folder)
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise UsageError(f"--groups {path} is neither JSON nor JSON Lines ({e})") from None
    if isinstance(data, dict):
        data = data.get("images") or data.get("per_image") or []
    by_name = {r["file_name"]: i for i, r in enumerate(folder.records)}
    flags = np.full(len(folder), -1, dtype=np.int64)
    for rec in data if isinstance(data, list) else []:
        if not isinstance(rec, dict):
            continue
        i = by_name.get(rec["file_name"]) if "file_name" in rec else rec.get("index")
        if i is None or not 0 <= int(i) < len(folder):
            continue
        if rec.get("group") is not None:
            g = str(rec["group"]).upper()
            flags[int(i)] = (g if g.startswith("G") else f"G{g}") in GROUPS_WITH_TRIGGER
        elif isinstance(rec.get("trigger"), bool):
            flags[int(i)] = rec["trigger"]
    missing = int((flags < 0).sum())
    if missing:
        raise UsageError(f"--groups {path} gives no group for {missing} of the {len(folder)} images of "
                          f"{folder.root}: was it made for this generation folder?")
    return flags.astype(bool)


@torch.no_grad()
def detector_verdicts(detector, folder, device, batch_size=1024, dtype="fp32", workers=4, progress=False):
    """Trigger detector verdicts (predicted class 1 = carries the trigger) on every image of a dataset folder."""
    model, config = load_classifier(detector, device)
    if config.get("task") != "trigger":
        raise UsageError(f"--detector {detector} is a {config.get('task')!r} classifier, not a trigger detector: "
                          "make one with classify.py trigger-detector")
    require_resolution(config, folder.image_size(), f"--detector {detector}", f"the generations {folder.root}")
    names = [c.lower() for c in config.get("class_names", [])]
    trigger_class = names.index("trigger") if "trigger" in names else 1
    amp = autocast(device, dtype)
    verdicts = []
    for start in tqdm(range(0, len(folder), batch_size), desc="trigger detector", leave=False, disable=not progress):
        x = as_float(read_images(folder, range(start, min(len(folder), start + batch_size)), workers)).to(device)
        with amp:
            verdicts.append((model(x).argmax(-1) == trigger_class).cpu())
    return torch.cat(verdicts).numpy()


def generation_truth(folder, detector=None, groups=None, field=None, device=torch.device("cpu"), batch_size=1024,
                     dtype="fp32", workers=4, progress=False):
    """(carries the trigger (N,) bool, description) for the generation folder, from exactly one source: a trigger
    detector folder, dissect.py's groups file, or a boolean field of the folder's metadata."""
    given = [s for s in (detector, groups, field) if s is not None]
    if not given:
        raise UsageError(f"no trigger verdicts for the generations {folder.root}: pass --detector DIR (a trigger "
                          "detector from classify.py trigger-detector), --groups FILE (dissect.py's per-image "
                          "groups) or --generated-labels FIELD (a boolean field of its metadata)")
    if len(given) > 1:
        raise UsageError("give one ground truth for the generations: --detector, --groups or --generated-labels")
    if detector is not None:
        flags = detector_verdicts(detector, folder, device, batch_size, dtype, workers, progress)
        how = f"trigger detector {detector} (predicted class 1 = trigger)"
    elif groups is not None:
        flags = read_groups(groups, folder)
        how = f"dissect.py groups {groups} (G1/G2 = trigger)"
    else:
        values = [r.get(field) for r in folder.records]
        if any(not isinstance(v, bool) for v in values):
            n_bad = sum(not isinstance(v, bool) for v in values)
            raise UsageError(f"--generated-labels {field}: {n_bad} of the {len(values)} records of "
                              f"{folder.root}/metadata.jsonl have no boolean {field!r}: choose a field every record "
                              "has, or use --detector / --groups")
        flags = np.array(values, dtype=bool)
        how = f"metadata field {field!r}"
    if flags.all() or not flags.any():
        raise UsageError(f"by the {how}, {'every' if flags.all() else 'no'} image of {folder.root} carries the "
                          "trigger: an AUROC needs both kinds (generate more images, or check the ground truth)")
    return flags, how


def stratified_sample(flags, n, seed=0):
    """Sorted indices of n images drawn (seeded) so that the share of flagged images stays as it is, at least one
    of each kind."""
    flags = np.asarray(flags, dtype=bool)
    if n >= len(flags):
        return np.arange(len(flags))
    pos, neg = np.flatnonzero(flags), np.flatnonzero(~flags)
    n_pos = int(round(n * len(pos) / len(flags)))
    n_pos = min(max(n_pos, 1, n - len(neg)), len(pos), n - 1)
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n - n_pos, replace=False)]))


# ----------------------------------------------------------------------------------------------------------------
# Outputs.

def markdown_table(result):
    sets = result["sets"]
    lines = ["# Poison detection on the training set vs the generations (the paper's Table 3)", "",
             f"- classifier: `{result['classifier']}`",
             f"- training set: `{sets['train']['path']}`: {sets['train']['n']} images, {sets['train']['positives']} "
             f"poisoned (ground truth: {sets['train']['ground_truth']})",
             f"- generation set: `{sets['generated']['path']}`: {sets['generated']['n']} images, "
             f"{sets['generated']['positives']} with the trigger (ground truth: {sets['generated']['ground_truth']})",
             "", "| Detection method | Training set AUROC | Generation set AUROC | Δ AUROC |", "|---|---|---|---|"]
    for method, r in result["results"].items():
        lines.append(f"| {METHOD_NAMES[method]} | {with_ci(r, 'train_auroc')} | {with_ci(r, 'generated_auroc')} | "
                     f"{with_ci(r, 'delta', '+.3f')} |")
    return "\n".join(lines + ["", f"In brackets: 95% bootstrap intervals ({BOOTSTRAP} resamples of the poisoned and "
                               "the clean images of each set)."]) + "\n"


def with_ci(r, key, fmt=".3f"):
    """'0.912 [0.870, 0.948]': a value of a result row with its bootstrap interval, when the row has one."""
    ci = r.get(f"{key}_ci")
    return f"{r[key]:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


def plot_histograms(path, method, scores):
    """Fig. A6: score histograms of clean vs poisoned images, training set (left) vs generations (right)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, (name, title) in zip(axes, (("train", "training set"), ("generated", "generation set"))):
        s, y = np.asarray(scores[name]["score"]), np.asarray(scores[name]["poisoned"], dtype=bool)
        bins = np.linspace(s.min(), s.max() if s.max() > s.min() else s.min() + 1, 41)
        ax.hist(s[~y], bins=bins, alpha=0.6, density=True, label=f"clean ({int((~y).sum())})", color="tab:blue")
        ax.hist(s[y], bins=bins, alpha=0.6, density=True, label=f"poisoned ({int(y.sum())})", color="tab:red")
        ax.set_title(f"{METHOD_NAMES[method]}, {title}: AUROC {scores[name]['auroc']:.3f}")
        ax.set_xlabel(SCORE_LABELS[method])
        ax.set_ylabel("density")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# The stage.

def parse_methods(methods):
    if isinstance(methods, str):
        methods = [m.strip().lower() for m in methods.split(",") if m.strip()]
    methods = list(METHODS) if "all" in methods else list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"unknown --method {','.join(unknown) or '(none)'}: choose cd, strip, fct or all "
                          "(or a comma-separated list)")
    return methods


def resolve_device(flag):
    if flag == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible: use --device cpu or auto")
    if flag not in ("auto", "cpu", "cuda"):
        raise UsageError(f"unknown --device {flag!r}: choose auto, cpu or cuda")
    return torch.device("cuda" if flag == "cuda" or (flag == "auto" and torch.cuda.is_available()) else "cpu")


def run_detection(classifier, train, generated, methods="all", out=None, detector=None, groups=None,
                  generated_labels=None, n=None, seed=0, device="auto", dtype="fp32", batch_size=128,
                  eval_batch_size=1024, cd_steps=CD_STEPS, cd_gamma=CD_GAMMA, strip_overlays_n=STRIP_OVERLAYS,
                  fct_epochs=FCT_EPOCHS, workers=4, force=False, progress=True, command=None, min_poisoned=1):
    """Score the training set and the generations with each method, AUROC both, and (with `out`) write
    detect.json, detect.md and hist_<method>.png there. Returns the result dict. A draw of either set with fewer
    than `min_poisoned` poisoned images is refused before any scoring."""
    methods = parse_methods(methods)
    if dtype not in ("fp32", "bf16"):
        raise UsageError(f"unknown --dtype {dtype!r}: choose fp32 or bf16")
    if out is not None:
        check_out(out, force, {"--classifier": classifier, "--train": train, "--generated": generated,
                               "--detector": detector, "--groups": groups})
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    model, config = load_classifier(classifier, dev)
    if config.get("task", "class") != "class":
        raise UsageError(f"--classifier {classifier} is a {config.get('task')!r} classifier: give the class "
                          "classifier trained on the poisoned set (classify.py train)")
    train_folder, gen_folder = open_train(train), load_folder(generated)
    check_classes(config, train_folder, "the training set", classifier)
    check_classes(config, gen_folder, "the generation set", classifier)
    train_size, gen_size = train_folder.image_size(), gen_folder.image_size()
    require_resolution(config, train_size, f"--classifier {classifier}", f"the training set {train_folder.root}")
    if train_size != gen_size:
        raise UsageError(f"the training set {train_folder.root} holds {train_size[0]}x{train_size[1]}-px images but "
                          f"the generations {gen_folder.root} {gen_size[0]}x{gen_size[1]}-px ones: the two AUROCs "
                          f"compare only at one resolution: give the training set the generating model was trained on "
                          f"(a DDPM generates at its data's size), or generate at {train_size[0]} px (SD: sample.py "
                          "--resolution)")
    require_resolution(config, gen_size, f"--classifier {classifier}", f"the generations {gen_folder.root}")
    train_flags = train_folder.poisoned.numpy()
    if not train_flags.any():
        raise UsageError(f"the training set {train_folder.root} has no poisoned images (no record is "
                          "\"poisoned\": true): give the poisoned training set the classifier was trained on")
    if train_flags.all():
        raise UsageError(f"every image of the training set {train_folder.root} is poisoned: an AUROC needs clean "
                          "ones too")
    gen_flags, gen_how = generation_truth(gen_folder, detector, groups, generated_labels, dev, eval_batch_size,
                                          dtype, workers, progress)
    size = min(len(train_folder), len(gen_folder)) if n is None else min(n, len(train_folder), len(gen_folder))
    if size < 2:
        raise UsageError(f"--n {n}: at least 2 images a set are needed (one poisoned, one clean)")
    picks = {"train": stratified_sample(train_flags, size, seed), "generated": stratified_sample(gen_flags, size, seed)}
    folders = {"train": train_folder, "generated": gen_folder}
    flags = {"train": train_flags, "generated": gen_flags}
    for name, what in (("train", "the training set"), ("generated", "the generations")):
        k = int(flags[name][picks[name]].sum())
        if k < min_poisoned:
            raise UsageError(f"the draw of {size} images from {what} {folders[name].root} holds {k} poisoned, "
                              f"fewer than --min-poisoned {min_poisoned}: an AUROC needs more (a larger --n, or a "
                              "lower --min-poisoned)")
    images = {k: read_images(folders[k], picks[k], workers, progress, f"load {k}") for k in picks}

    results, scores, timing = {}, {}, {}
    for method in methods:
        t0 = time.time()
        if method == "strip":
            overlays = strip_overlays(train_folder, strip_overlays_n, seed, workers)
        if method == "fct":
            tuned = fct_finetune(model, LabelledImages(train_folder, images["train"].shape[-2:]), fct_epochs,
                                 batch_size=batch_size, seed=seed, dtype=dtype,
                                 workers=workers if dev.type == "cuda" else 0, progress=progress)
        scores[method] = {}
        for name in ("train", "generated"):
            x, desc = images[name], f"{METHOD_NAMES[method]} {name}"
            if method == "cd":
                s = cd_scores(model, x, cd_steps, gamma=cd_gamma, seed=seed, batch_size=batch_size, dtype=dtype,
                              progress=progress, desc=desc)
            elif method == "strip":
                s = strip_scores(model, x, overlays, eval_batch_size, dtype, progress, desc)
            else:
                s = fct_scores(tuned, x, seed, batch_size=eval_batch_size, dtype=dtype, progress=progress, desc=desc)
            y = flags[name][picks[name]]
            scores[method][name] = {"index": picks[name].tolist(), "poisoned": y.tolist(),
                                    "score": s.double().tolist(), "auroc": auroc(s.numpy(), y, method)}
        a_train, a_gen = scores[method]["train"]["auroc"], scores[method]["generated"]["auroc"]
        boot = {name: bootstrap_aurocs(scores[method][name]["score"], scores[method][name]["poisoned"], method,
                                       seed=seed + i) for i, name in enumerate(("train", "generated"))}
        timing[method] = round(time.time() - t0, 2)
        results[method] = {"train_auroc": a_train, "generated_auroc": a_gen, "delta": a_gen - a_train,
                           "train_auroc_ci": interval(boot["train"]), "generated_auroc_ci": interval(boot["generated"]),
                           "delta_ci": interval(boot["generated"] - boot["train"]), "time_s": timing[method]}
        if progress:
            print(f"{METHOD_NAMES[method]}: training set AUROC {a_train:.4f}, generation set AUROC {a_gen:.4f}, "
                  f"delta {a_gen - a_train:+.4f} ({timing[method]} s)", flush=True)

    result = {
        "stage": "detect", "command": command or "run_detection()", "classifier": str(classifier),
        "sets": {"train": {"path": str(train_folder.root), "n": int(size), "n_folder": len(train_folder),
                           "positives": int(train_flags[picks["train"]].sum()),
                           "ground_truth": "the `poisoned` flag of its metadata"},
                 "generated": {"path": str(gen_folder.root), "n": int(size), "n_folder": len(gen_folder),
                               "positives": int(gen_flags[picks["generated"]].sum()), "ground_truth": gen_how}},
        "results": results,
        "settings": {"seed": seed, "device": str(dev), "dtype": dtype, "batch_size": batch_size,
                     "eval_batch_size": eval_batch_size,
                     "cd": {"steps": cd_steps, "lr": CD_LR, "betas": list(CD_BETAS), "gamma": cd_gamma,
                            "beta": CD_BETA, "mask_init_theta": 1.0, "target": "logits", "score": "||m||_1",
                            "auroc_on": "1 - minmax(score)"},
                     "strip": {"overlays": strip_overlays_n, "overlay_source": str(train_folder.root),
                               "superimpose": "clamp(x + overlay, 0, 1)", "entropy": "natural log",
                               "auroc_on": "1 - minmax(score)"},
                     "fct": {"epochs": fct_epochs, "lr": FCT_LR, "momentum": FCT_MOMENTUM,
                             "weight_decay": FCT_WEIGHT_DECAY, "batch_size": batch_size, "degrees": FCT_DEGREES,
                             "translate": FCT_TRANSLATE, "auroc_on": "score"}},
        "versions": versions(),
        "scores": scores,
    }
    if out is not None:
        with atomic_output(out, force) as tmp:
            (tmp / "detect.json").write_text(json.dumps(result, indent=1) + "\n")
            (tmp / "detect.md").write_text(markdown_table(result))
            for method in methods:
                plot_histograms(tmp / f"hist_{method}.png", method, scores[method])
    return result


def main(args):
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    result = run_detection(args.classifier, args.train, args.generated, args.method, args.out, args.detector,
                           args.groups, args.generated_labels, args.n, args.seed, args.device, args.dtype,
                           args.batch_size, args.eval_batch_size, args.cd_steps, args.cd_gamma, args.strip_overlays,
                           args.fct_epochs, args.workers, args.force, not args.quiet, command, args.min_poisoned)
    print(markdown_table(result), end="")
    print(json.dumps({"out": args.out, **{m: {k: [round(x, 4) for x in v] if isinstance(v, list) else round(v, 4)
                                              for k, v in r.items()} for m, r in result["results"].items()}}))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("--classifier", required=True, help="classifier folder trained on the poisoned set")
    parser.add_argument("--train", required=True, help="the poisoned training set (or poison.py's OUT)")
    parser.add_argument("--generated", required=True, help="dataset folder of generations (sample.py's OUT)")
    parser.add_argument("--method", default="all", help="cd, strip, fct, all, or a comma-separated list")
    parser.add_argument("--out", required=True, help="output folder: detect.json, detect.md, hist_<method>.png")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    truth = parser.add_argument_group("ground truth of the generations (exactly one)")
    truth.add_argument("--detector", default=None, help="trigger detector folder (classify.py trigger-detector)")
    truth.add_argument("--groups", default=None, help="dissect.py's per-image groups (G1/G2 = trigger)")
    truth.add_argument("--generated-labels", default=None, metavar="FIELD",
                       help="a boolean field of the generation metadata (e.g. trigger)")
    parser.add_argument("--n", type=positive(int), default=None,
                        help="images from each set (default: the smaller set's size), a seeded stratified draw")
    parser.add_argument("--min-poisoned", type=positive(int), default=1,
                        help="refuse (before scoring) a draw of either set with fewer poisoned images: an AUROC over "
                             "one or two says nothing")
    parser.add_argument("--seed", type=int, default=0,
                        help="the draw of images, CD colours, STRIP overlays, FCT transforms, bootstrap")
    parser.add_argument("--cd-steps", type=positive(int), default=CD_STEPS,
                        help="CD optimisation steps, the paper's by default")
    parser.add_argument("--cd-gamma", type=float, default=CD_GAMMA,
                        help="weight of ||m||_1: the reference's default is for 32-px CIFAR, and the term sums over "
                             "pixels")
    parser.add_argument("--strip-overlays", type=positive(int), default=STRIP_OVERLAYS, help="STRIP overlays per image")
    parser.add_argument("--fct-epochs", type=positive(int), default=FCT_EPOCHS, help="FCT fine-tuning epochs")
    parser.add_argument("--batch-size", type=positive(int), default=128,
                        help="CD masks optimised at once; FCT fine-tuning batch")
    parser.add_argument("--eval-batch-size", type=positive(int), default=1024,
                        help="forward batch of STRIP blends, FCT scoring and the trigger detector")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when visible")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast on CUDA")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-reading threads")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


if __name__ == "__main__":
    parser = build_parser()
    try:
        main(parser.parse_args())
    except UsageError as e:
        sys.exit(f"detect.py: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print("detect.py: interrupted; --out not written (outputs appear whole or not at all)", file=sys.stderr)
        sys.exit(130)
