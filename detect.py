"""detect.py -- poison detectors (CD, STRIP, FCT): AUROC on the training set vs the generations (Tab. 3, Fig. A6).

    python detect.py --classifier runs/clf-c10 --train data/c10-bn-0.05 --generated runs/gen-c10 \\
        --groups runs/dissect-c10 --method cd --n 1000 --dtype bf16 --out runs/detect-c10-cd

Writes OUT/detect.json (AUROCs, 95% intervals, scores), detect.md (Tab. 3), hist_<method>.png (Fig. A6).
"""
import argparse
import copy
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from common import (HelpFormatter, UsageError, atomic_output, autocast, autocast_dtype, check_out, cli, load_folder,
                    positive, resolve_device, same_classes, versions)
from classify import load_classifier, require_resolution

METHODS = ("cd", "strip", "fct")
METHOD_NAMES = {"cd": "CD", "strip": "STRIP", "fct": "FCT"}
POISONED_END = {"cd": "low", "strip": "low", "fct": "high"}  # "low": the AUROC is of 1 - minmax(score)
SCORE_LABELS = {"cd": "mask L1 norm ‖m‖₁ (low = poisoned)", "strip": "mean entropy (low = poisoned)",
                "fct": "feature change under rotation + translation (high = poisoned)"}
# Cognitive Distillation (HanxunH/CognitiveDistillation's defaults for logits).
CD_STEPS, CD_LR, CD_BETAS = 100, 0.1, (0.1, 0.1)
CD_GAMMA = 0.01   # weight of ‖m‖₁ (tuned on 32-px CIFAR; it sums over pixels, so --cd-gamma for other sizes)
CD_BETA = 1.0     # weight of TV(m)
STRIP_OVERLAYS = 100
# FCT (SCLBD/Effective_backdoor_defense, as the CognitiveDistillation repo runs it).
FCT_EPOCHS, FCT_LR, FCT_MOMENTUM, FCT_WEIGHT_DECAY = 10, 0.01, 0.9, 5e-4
FCT_DEGREES = 180.0     # RandomRotation(180)
FCT_TRANSLATE = 0.2     # RandomAffine(degrees=0, translate=(0.2, 0.2))
BOOTSTRAP = 1000        # resamples for the AUROC's 95% interval
GROUPS_WITH_TRIGGER = ("G1", "G2")


def model_device(model):
    return next(model.parameters()).device


def amp(device, dtype):
    return autocast(device, autocast_dtype(dtype, device) if device.type == "cuda" else None)  # bf16: CUDA only


def upcast(t):
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def as_float(x):  # uint8 -> [0, 1]
    return x.float() / 255.0 if x.dtype == torch.uint8 else (x if x.is_floating_point() else x.float())


# Cognitive Distillation (Huang et al., ICLR 2023): a mask m = (tanh θ + 1) / 2 keeps the logits of x·m + (1 − m)·r;
# small ‖m‖₁ = poisoned. The batch loss is the SUM of the images' (Adam is elementwise): each mask as if alone.

def total_variation(m):  # (N, c, h, w) -> (N,)
    _, c, h, w = m.shape
    tv_h = (m[:, :, 1:, :] - m[:, :, :-1, :]).pow(2).sum(dim=(1, 2, 3))
    tv_w = (m[:, :, :, 1:] - m[:, :, :, :-1]).pow(2).sum(dim=(1, 2, 3))
    return (tv_h + tv_w) / (c * h * w)


def cd_loss(adv_logits, clean_logits, m, gamma=CD_GAMMA, beta=CD_BETA):
    """(N,): mean_k |f(x_adv)_k - f(x)_k| + gamma * ||m||_1 + beta * TV(m)."""
    distill = (adv_logits - clean_logits).abs().mean(dim=1)
    return distill + gamma * m.abs().sum(dim=(1, 2, 3)) + beta * total_variation(m)


def cd_masks(model, x, colors, lr=CD_LR, betas=CD_BETAS, gamma=CD_GAMMA, beta=CD_BETA, dtype="fp32", bar=None):
    """Masks (B, 1, H, W) of x (B, 3, H, W); colors (B, steps, 3): image i's fill at step k."""
    ctx = amp(x.device, dtype)
    theta = torch.ones(x.shape[0], 1, *x.shape[-2:], device=x.device, dtype=x.dtype, requires_grad=True)  # m ~ 0.88
    opt = torch.optim.Adam([theta], lr=lr, betas=betas)
    with torch.no_grad(), ctx:
        clean = upcast(model(x))
    with torch.enable_grad():
        for k in range(colors.shape[1]):
            m = (torch.tanh(theta) + 1) / 2                                   # (B, 1, H, W)
            r = colors[:, k, :, None, None].to(x.device, x.dtype)            # (B, 3, 1, 1)
            x_adv = x * m + (1 - m) * r
            with ctx:
                adv = upcast(model(x_adv))
            loss = cd_loss(adv, clean, m, gamma, beta).sum()                 # a sum: images stay independent
            theta.grad, = torch.autograd.grad(loss, theta)                   # no gradients for the weights
            opt.step()
            if bar is not None:
                bar.update(1)
    return ((torch.tanh(theta) + 1) / 2).detach()


def cd_colors(n, steps=CD_STEPS, seed=0):  # (n, steps, 3), drawn up front: independent of the batch
    return torch.rand(n, steps, 3, generator=torch.Generator().manual_seed(seed))


def cd_scores(model, images, steps=CD_STEPS, lr=CD_LR, betas=CD_BETAS, gamma=CD_GAMMA, beta=CD_BETA, seed=0,
              colors=None, batch_size=128, dtype="fp32", progress=False, desc="CD", return_masks=False):
    """||m||_1 (N,) of images (N, 3, H, W); low = poisoned. Optionally the masks."""
    model.eval()
    device, n = model_device(model), len(images)
    colors = cd_colors(n, steps, seed) if colors is None else colors
    size = getattr(model, "input_size", None)  # the mask lives at the side the classifier sees
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
    return (torch.cat(scores), torch.cat(masks)) if return_masks else torch.cat(scores)


# STRIP (Gao et al., ACSAC 2019): low mean entropy over superimposed overlays = poisoned. One draw of overlays a run.

def strip_overlays(folder, n=STRIP_OVERLAYS, seed=0, workers=4):  # (n, 3, H, W) uint8
    idx = np.random.default_rng(seed).choice(len(folder), size=n, replace=len(folder) < n)
    return read_images(folder, idx, workers=workers)


@torch.no_grad()
def strip_scores(model, images, overlays, batch_size=1024, dtype="fp32", progress=False, desc="STRIP"):
    """(N,): mean entropy of clamp(x + overlay, 0, 1) over the overlays; low = poisoned."""
    model.eval()
    device = model_device(model)
    ctx = amp(device, dtype)
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
        with ctx:
            logits = upcast(model(blend))
        logp = F.log_softmax(logits, dim=-1)
        scores.append(-(logp.exp() * logp).sum(-1).view(len(x), k).mean(1).cpu())  # mean entropy over the overlays
    return torch.cat(scores)


# FCT (Chen et al., NeurIPS 2022): fine-tune a copy with L_intra; a large feature change under rotation = poisoned.

def intra_class_loss(features, labels):  # L_intra: mean off-diagonal cosine of the class means; None for one
    classes = labels.unique()
    if len(classes) < 2:
        return None
    centres = torch.stack([features[labels == c].mean(0) for c in classes])   # (k, D)
    centres = F.normalize(upcast(centres), dim=1)
    sim = centres @ centres.T
    return (sim * (1 - torch.eye(len(classes), device=sim.device))).mean()


def fct_finetune(model, data, epochs=FCT_EPOCHS, lr=FCT_LR, momentum=FCT_MOMENTUM, weight_decay=FCT_WEIGHT_DECAY,
                 batch_size=128, seed=0, dtype="fp32", workers=0, progress=False):  # a copy fine-tuned with L_intra
    device = model_device(model)
    tuned = copy.deepcopy(model).train().requires_grad_(True)
    ctx = amp(device, dtype)
    opt = torch.optim.SGD(tuned.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(seed),
                                         pin_memory=device.type == "cuda")
    with torch.enable_grad(), tqdm(total=epochs * len(loader), desc="FCT fine-tune", leave=False,
                                   disable=not progress) as bar:
        for _ in range(epochs):
            for x, y in loader:
                x, y = as_float(x).to(device, non_blocking=True), y.to(device)
                with ctx:
                    features = tuned.features(x)
                loss = intra_class_loss(upcast(features), y)
                if loss is not None:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.set_postfix(l_intra=f"{loss.item():.4f}", refresh=False)
                bar.update(1)
    return tuned.eval()


def fct_params(n, size, seed=0, degrees=FCT_DEGREES, translate=FCT_TRANSLATE):  # angles (n,), shifts (n, 2)
    h, w = size
    g = torch.Generator().manual_seed(seed)
    angles = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1) * degrees
    limit = torch.tensor([translate * w, translate * h], dtype=torch.float64)
    shifts = torch.round((torch.rand(n, 2, generator=g, dtype=torch.float64) * 2 - 1) * limit)
    return angles, shifts


def fct_transform(x, angles, shifts):  # x (N, 3, H, W) rotated, then shifted (RandomRotation + RandomAffine)
    h, w = x.shape[-2:]
    a = torch.deg2rad(angles.to(torch.float64))
    cos, sin, zero, one = a.cos(), a.sin(), torch.zeros_like(a), torch.ones_like(a)
    tx, ty = shifts[:, 0].to(torch.float64), shifts[:, 1].to(torch.float64)
    sx, sy = w / 2, h / 2                               # pixels -> affine_grid's [-1, 1] coordinates
    # output pixel p (from the centre, y down) reads input pixel R p for the rotation, p - shift for the shift
    rotate = torch.stack([torch.stack([cos, -sin * sy / sx, zero], 1), torch.stack([sin * sx / sy, cos, zero], 1)], 1)
    shift = torch.stack([torch.stack([one, zero, -tx / sx], 1), torch.stack([zero, one, -ty / sy], 1)], 1)
    for theta in (rotate, shift):  # two resamplings: the corners the rotation empties stay empty when shifted
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return x


@torch.no_grad()
def fct_scores(model, images, seed=0, params=None, batch_size=1024, dtype="fp32", progress=False, desc="FCT"):
    """(N,): mean (f(x) - f(T x))^2, T a seeded rotation + shift; high = poisoned."""
    model.eval()
    device = model_device(model)
    ctx = amp(device, dtype)
    n = len(images)
    angles, shifts = fct_params(n, tuple(images.shape[-2:]), seed) if params is None else params
    scores = []
    for start in tqdm(range(0, n, batch_size), desc=desc, leave=False, disable=not progress):
        x = as_float(images[start:start + batch_size]).to(device)
        tx = fct_transform(x, angles[start:start + batch_size], shifts[start:start + batch_size])
        with ctx:
            f = upcast(model.features(torch.cat([x, tx])))
        scores.append((f[:len(x)] - f[len(x):]).pow(2).mean(1).cpu())
    return torch.cat(scores)


# AUROC with each method's sign, and its bootstrap interval.

def suspicion(scores, method):  # higher = more likely poisoned: 1 - minmax(score) where low = poisoned
    s = np.asarray(scores, dtype=np.float64)
    if not np.isfinite(s).all():
        raise UsageError(f"{METHOD_NAMES[method]} gave non-finite scores: check the classifier and --dtype")
    if POISONED_END[method] == "high":
        return s
    lo, hi = s.min(), s.max()
    return np.ones_like(s) if hi <= lo else 1.0 - np.clip((s - lo) / (hi - lo), 0, 1)


def auroc(scores, poisoned, method):
    y = np.asarray(poisoned, dtype=bool)
    s = suspicion(scores, method)
    return float(auroc_of(s[y], s[~y]))


def auroc_of(pos, neg):  # P(pos > neg), ties half (Mann-Whitney)
    if len(pos) == 0 or len(neg) == 0:
        raise UsageError(f"AUROC needs poisoned and clean images; this set holds only "
                         f"{'clean' if len(pos) == 0 else 'poisoned'} ones")
    neg = np.sort(neg)
    below = np.searchsorted(neg, pos, side="left").sum()
    ties = np.searchsorted(neg, pos, side="right").sum() - below
    return (below + 0.5 * ties) / (len(pos) * len(neg))


def bootstrap_aurocs(scores, poisoned, method, n=BOOTSTRAP, seed=0):  # (n,) AUROCs of resampled images
    y = np.asarray(poisoned, dtype=bool)
    s = suspicion(scores, method)
    pos, neg = s[y], s[~y]
    rng = np.random.default_rng(seed)
    return np.array([auroc_of(rng.choice(pos, len(pos)), rng.choice(neg, len(neg))) for _ in range(n)])


def interval(samples, level=0.95):
    return [float(v) for v in np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])]


# Data: images, the ground truth of each set, the draw.

def resize_uint8(x, size):
    return F.interpolate(x[None].float(), size=size, mode="bilinear", antialias=True,
                         align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)


def read_images(folder, indices, workers=4, progress=False, desc=None):  # (N, 3, H, W) uint8, at the first's size
    indices = [int(i) for i in indices]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        images = list(tqdm(pool.map(folder.image_uint8, indices), total=len(indices), desc=desc or "load",
                           leave=False, disable=not progress))
    size = tuple(images[0].shape[-2:])
    return torch.stack([im if tuple(im.shape[-2:]) == size else resize_uint8(im, size) for im in images])


class LabelledImages(torch.utils.data.Dataset):  # FCT's fine-tuning set
    def __init__(self, folder, size):
        self.folder, self.size = folder, tuple(size)

    def __len__(self):
        return len(self.folder)

    def __getitem__(self, i):
        x = self.folder.image_uint8(i)
        return (x if tuple(x.shape[-2:]) == self.size else resize_uint8(x, self.size)), int(self.folder.labels[i])


def open_train(path):  # a dataset folder, or a poisoned set's root (its train/)
    path = Path(path)
    return load_folder(path / "train" if (path / "train" / "metadata.jsonl").is_file() else path)


def groups_file(path, folder):  # dissect.py's verdicts.jsonl for `folder`: the file, OUT/<setting> or OUT
    path = Path(path)
    for candidate in (path, path / "verdicts.jsonl"):
        if candidate.is_file():
            return candidate
    settings = sorted(p.parent for p in path.glob("*/verdicts.jsonl"))
    if len(settings) > 1:
        def folder_of(d):
            try:
                return Path(json.loads((d / "groups.json").read_text()).get("folder", "")).resolve()
            except (OSError, json.JSONDecodeError):
                return None
        settings = [d for d in settings if folder_of(d) == Path(folder.root).resolve()]
    if len(settings) != 1:
        raise UsageError(f"--groups {path}: no (single) verdicts.jsonl for {folder.root}: give OUT/<setting>")
    return settings[0] / "verdicts.jsonl"


def read_groups(path, folder):  # per-image trigger flags: G1/G2, else the "trigger" field
    path = groups_file(path, folder)
    text = path.read_text()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise UsageError(f"--groups {path} is no JSON ({e}): give dissect.py's verdicts") from None
    if isinstance(data, dict):
        data = data.get("images") or data.get("per_image") or []
    by_name = {r["file_name"]: i for i, r in enumerate(folder.records)}
    flags = np.full(len(folder), -1, dtype=np.int64)
    for rec in data if isinstance(data, list) else []:
        i = None if not isinstance(rec, dict) else by_name.get(rec["file_name"]) if "file_name" in rec else \
            rec.get("index")
        if i is None or not 0 <= int(i) < len(folder):
            continue
        if rec.get("group") is not None:
            g = str(rec["group"]).upper()
            flags[int(i)] = (g if g.startswith("G") else f"G{g}") in GROUPS_WITH_TRIGGER
        elif isinstance(rec.get("trigger"), bool):
            flags[int(i)] = rec["trigger"]
    missing = int((flags < 0).sum())
    if missing:
        raise UsageError(f"--groups {path} gives no group for {missing} images of {folder.root}: give their verdicts")
    return flags.astype(bool)


@torch.no_grad()
def detector_verdicts(detector, folder, device, batch_size=1024, dtype="fp32", workers=4, progress=False):
    model, config = load_classifier(detector, device)
    if config.get("task") != "trigger":
        raise UsageError(f"--detector {detector} is not a trigger detector: use classify.py trigger-detector")
    require_resolution(config, folder.image_size(), f"--detector {detector}", f"the generations {folder.root}")
    names = [c.lower() for c in config.get("class_names", [])]
    trigger_class = names.index("trigger") if "trigger" in names else 1
    ctx = amp(device, dtype)
    verdicts = []
    for start in tqdm(range(0, len(folder), batch_size), desc="trigger detector", leave=False, disable=not progress):
        x = as_float(read_images(folder, range(start, min(len(folder), start + batch_size)), workers)).to(device)
        with ctx:
            verdicts.append((model(x).argmax(-1) == trigger_class).cpu())
    return torch.cat(verdicts).numpy()


def generation_truth(folder, detector=None, groups=None, field=None, device=torch.device("cpu"), batch_size=1024,
                     dtype="fp32", workers=4, progress=False):
    """(carries the trigger (N,) bool, description) from the source given."""
    given = [s for s in (detector, groups, field) if s is not None]
    if len(given) != 1:
        raise UsageError(f"give one ground truth for {folder.root} (got {len(given)}): --detector, --groups or "
                         "--generated-labels")
    if detector is not None:
        flags, how = (detector_verdicts(detector, folder, device, batch_size, dtype, workers, progress),
                      f"trigger detector {detector} (predicted class 1 = trigger)")
    elif groups is not None:
        flags, how = read_groups(groups, folder), f"dissect.py groups {groups} (G1/G2 = trigger)"
    else:
        n_bad = sum(not isinstance(r.get(field), bool) for r in folder.records)
        if n_bad:
            raise UsageError(f"{n_bad} records of {folder.root} have no boolean {field!r}: choose a --generated-labels")
        flags, how = np.array([r[field] for r in folder.records], dtype=bool), f"metadata field {field!r}"
    if flags.all() or not flags.any():
        raise UsageError(f"by the {how}, {'every' if flags.all() else 'no'} image of {folder.root} carries the "
                         "trigger: an AUROC needs both; generate more")
    return flags, how


def stratified_sample(flags, n, seed=0):  # sorted indices of a draw of n keeping the flagged share, 1 each at least
    flags = np.asarray(flags, dtype=bool)
    if n >= len(flags):
        return np.arange(len(flags))
    pos, neg = np.flatnonzero(flags), np.flatnonzero(~flags)
    n_pos = min(max(int(round(n * len(pos) / len(flags))), 1, n - len(neg)), len(pos), n - 1)
    rng = np.random.default_rng(seed)
    return np.sort(np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n - n_pos, replace=False)]))


# Outputs.

def with_ci(r, key, fmt=".3f"):  # '0.912 [0.870, 0.948]'
    ci = r.get(f"{key}_ci")
    return f"{r[key]:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


def markdown_table(result):
    train, gen = result["sets"]["train"], result["sets"]["generated"]
    lines = ["# Poison detection on the training set vs the generations (the paper's Table 3)", "",
             f"- classifier: `{result['classifier']}`",
             f"- training set: `{train['path']}`: {train['n']} images, {train['positives']} poisoned (ground truth: "
             f"{train['ground_truth']})",
             f"- generation set: `{gen['path']}`: {gen['n']} images, {gen['positives']} with the trigger (ground "
             f"truth: {gen['ground_truth']})",
             "", "| Detection method | Training set AUROC | Generation set AUROC | Δ AUROC |", "|---|---|---|---|"]
    lines += [f"| {METHOD_NAMES[m]} | {with_ci(r, 'train_auroc')} | {with_ci(r, 'generated_auroc')} | "
              f"{with_ci(r, 'delta', '+.3f')} |" for m, r in result["results"].items()]
    return "\n".join(lines + ["", f"In brackets: 95% bootstrap intervals ({BOOTSTRAP} resamples of the poisoned and "
                              "the clean images of each set)."]) + "\n"


def plot_histograms(path, method, scores):  # Fig. A6
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


# The stage.

def parse_methods(methods):
    if isinstance(methods, str):
        methods = [m.strip().lower() for m in methods.split(",") if m.strip()]
    methods = list(METHODS) if "all" in methods else list(dict.fromkeys(methods))
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise UsageError(f"unknown --method {','.join(unknown) or '(none)'}: choose from cd,strip,fct or all")
    return methods


def check_sets(config, classifier, train_folder, gen_folder):  # refuses other classes or sizes; training flags
    for folder, what in ((train_folder, "the training set"), (gen_folder, "the generation set")):
        if not same_classes(config["class_names"], folder.class_names):
            raise UsageError(f"{what} {folder.root} holds classes {folder.class_names} but the classifier "
                             f"{classifier} knows {config['class_names']}: use the one of this set")
    train_size, gen_size = train_folder.image_size(), gen_folder.image_size()
    require_resolution(config, train_size, f"--classifier {classifier}", f"the training set {train_folder.root}")
    if train_size != gen_size:
        raise UsageError(f"the training set {train_folder.root} holds {train_size[0]}x{train_size[1]}-px images but "
                         f"the generations {gen_folder.root} {gen_size[0]}x{gen_size[1]}-px ones: give one size")
    require_resolution(config, gen_size, f"--classifier {classifier}", f"the generations {gen_folder.root}")
    flags = train_folder.poisoned.numpy()
    if not flags.any():
        raise UsageError(f"the training set {train_folder.root} has no poisoned images: give the poisoned set")
    if flags.all():
        raise UsageError(f"every image of {train_folder.root} is poisoned: give clean ones too")
    return flags


def run_detection(classifier, train, generated, methods="all", out=None, detector=None, groups=None,
                  generated_labels=None, n=None, seed=0, device="auto", dtype="fp32", batch_size=128,
                  eval_batch_size=1024, cd_steps=CD_STEPS, cd_gamma=CD_GAMMA, strip_overlays_n=STRIP_OVERLAYS,
                  fct_epochs=FCT_EPOCHS, workers=4, force=False, progress=True, command=None, min_poisoned=1):
    """Each method's AUROC on both sets; with `out`, writes detect.json, .md, hist_*.png."""
    methods = parse_methods(methods)
    if out is not None:
        check_out(out, force, {"--classifier": classifier, "--train": train, "--generated": generated,
                               "--detector": detector, "--groups": groups})
    dev = resolve_device(device)
    torch.backends.cudnn.benchmark = dev.type == "cuda"
    model, config = load_classifier(classifier, dev)
    if config.get("task", "class") != "class":
        raise UsageError(f"--classifier {classifier} is a {config.get('task')!r} classifier: give a class one")
    train_folder, gen_folder = open_train(train), load_folder(generated)
    folders = {"train": train_folder, "generated": gen_folder}
    flags = {"train": check_sets(config, classifier, train_folder, gen_folder)}
    flags["generated"], gen_how = generation_truth(gen_folder, detector, groups, generated_labels, dev,
                                                   eval_batch_size, dtype, workers, progress)
    size = min(len(train_folder), len(gen_folder)) if n is None else min(n, len(train_folder), len(gen_folder))
    if size < 2:
        raise UsageError(f"--n {n}: give at least 2 images a set")
    picks = {k: stratified_sample(flags[k], size, seed) for k in folders}
    for name, what in (("train", "the training set"), ("generated", "the generations")):
        k = int(flags[name][picks[name]].sum())
        if k < min_poisoned:
            raise UsageError(f"the draw of {size} images from {what} {folders[name].root} holds {k} poisoned, "
                             f"fewer than --min-poisoned {min_poisoned}: an AUROC needs more; raise --n")
    images = {k: read_images(folders[k], picks[k], workers, progress, f"load {k}") for k in picks}

    results, scores = {}, {}
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
        results[method] = {"train_auroc": a_train, "generated_auroc": a_gen, "delta": a_gen - a_train,
                           "train_auroc_ci": interval(boot["train"]), "generated_auroc_ci": interval(boot["generated"]),
                           "delta_ci": interval(boot["generated"] - boot["train"]),
                           "time_s": round(time.time() - t0, 2)}
        if progress:
            print(f"{METHOD_NAMES[method]}: training set AUROC {a_train:.4f}, generation set AUROC {a_gen:.4f}, "
                  f"delta {a_gen - a_train:+.4f} ({results[method]['time_s']} s)", flush=True)

    truth = {"train": "the `poisoned` flag of its metadata", "generated": gen_how}
    set_info = {k: {"path": str(folders[k].root), "n": int(size), "n_folder": len(folders[k]),
                    "positives": int(flags[k][picks[k]].sum()), "ground_truth": truth[k]} for k in folders}
    result = {
        "stage": "detect", "command": command or "run_detection()", "classifier": str(classifier), "sets": set_info,
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
        "versions": versions(), "scores": scores}
    if out is not None:
        with atomic_output(out, force) as tmp:
            (tmp / "detect.json").write_text(json.dumps(result, indent=1) + "\n")
            (tmp / "detect.md").write_text(markdown_table(result))
            for method in methods:
                plot_histograms(tmp / f"hist_{method}.png", method, scores[method])
    return result


def main(args):
    result = run_detection(args.classifier, args.train, args.generated, args.method, args.out, args.detector,
                           args.groups, args.generated_labels, args.n, args.seed, args.device, args.dtype,
                           args.batch_size, args.eval_batch_size, args.cd_steps, args.cd_gamma, args.strip_overlays,
                           args.fct_epochs, args.workers, args.force, not args.quiet,
                           " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), args.min_poisoned)
    print(markdown_table(result), end="")
    print(json.dumps({"out": args.out, **{m: {k: [round(x, 4) for x in v] if isinstance(v, list) else round(v, 4)
                                              for k, v in r.items()} for m, r in result["results"].items()}}))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--classifier", required=True, help="classifier of the poisoned set")
    p.add_argument("--train", required=True, help="poisoned training set")
    p.add_argument("--generated", required=True, help="generations")
    p.add_argument("--method", default="all", help="cd, strip, fct, all, or a list: cd,fct")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    truth = p.add_argument_group("trigger truth of the generations (give one)")
    truth.add_argument("--detector", default=None, help="trigger detector")
    truth.add_argument("--groups", default=None, help="dissect.py's groups (G1/G2 = trigger)")
    truth.add_argument("--generated-labels", default=None, metavar="FIELD", help="a boolean metadata field")
    p.add_argument("--n", type=positive(int), default=None, help="images a set (default: the smaller set)")
    p.add_argument("--min-poisoned", type=positive(int), default=1, help="refuse draws with fewer poisoned")
    p.add_argument("--seed", type=int, default=0, help="seeds the draw and every method")
    p.add_argument("--cd-steps", type=positive(int), default=CD_STEPS, help="CD optimisation steps")
    p.add_argument("--cd-gamma", type=float, default=CD_GAMMA, help="CD weight of ||m||_1")
    p.add_argument("--strip-overlays", type=positive(int), default=STRIP_OVERLAYS, help="STRIP overlays an image")
    p.add_argument("--fct-epochs", type=positive(int), default=FCT_EPOCHS, help="FCT fine-tuning epochs")
    p.add_argument("--batch-size", type=positive(int), default=128, help="CD, FCT fine-tuning batch")
    p.add_argument("--eval-batch-size", type=positive(int), default=1024, help="STRIP, FCT, detector batch")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when visible")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast on CUDA")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


if __name__ == "__main__":
    cli(main, build_parser())
