"""Classifiers that judge datasets and generations (TA, ASR), the trigger detector, the diffusion classifier (Tab. A4).

    python classify.py train --data SET --arch smallcnn --out runs/clf [--clean]
    python classify.py trigger-detector --data SET --arch smallcnn --out runs/detector
    python classify.py eval --classifier runs/clf --data SET [--json r.json]
    python classify.py diffusion --model runs/ddpm --data SET --classifier runs/clf --out runs/dc
    torchrun --nproc_per_node 4 classify.py train --data SET --arch resnet50 --pretrained ...

SET: poison.py's OUT or any dataset folder. train and trigger-detector write a classifier folder (config.json,
model.safetensors, results.json); diffusion writes results.json, results.md, scores.safetensors.
"""
import argparse
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from common import (HelpFormatter, UsageError, atomic_output, autocast, autocast_dtype, barrier, check_file_out,
                    check_out, cli, dtype_name, load_folder, manifest_target, on_rank0, positive, read_manifest,
                    replace_file, resolve_device, save_safetensors, setup_distributed, share, versions)
from poison import caption, load_trigger

ARCHS = ("smallcnn", "resnet18", "resnet50", "vgg16", "densenet121")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENET_SIZE = 224        # the input size ImageNet weights were trained at
SMALL_INPUT = 64           # at or below this side: the CIFAR-style stem (3x3 conv, stride 1, no max-pool)
VGG_MIN_INPUT = 32         # VGG's five 2x2 max-pools need at least 32 px
IN_MEMORY_BYTES = 2 ** 30  # datasets up to this size (uint8) are held in memory
NOISE_MAX = 0.5            # 'crop-noise': the largest standard deviation of the added noise (images in [0, 1])
NOISE_BYTES = 2 ** 28      # the diffusion classifier's noise held at once (images are grouped under it)
DEFAULT_OPTS = dict(epochs=10, batch_size=50, lr=0.01, momentum=0.9, weight_decay=5e-4, augment="crop",
                    dtype="auto", seed=0, workers=0, compile=False)
TRIGGER_CLASSES = ["clean", "trigger"]
BLEND_ALPHA_RANGE = (0.05, 0.25)  # the reference stamps blends for its trigger detector with alpha ~ U(lo, hi)
DEFAULT_FILTERS = (0.0, 1.0, 5.0, 10.0)   # percent of the per-element errors dropped: the paper's sweep (Tab. A4)
DEFAULT_TIMESTEPS = (50,)                 # evaluations per class; Li et al.'s CIFAR setting is 50,500 keeping 5,1
LOSSES = ("l2", "l1")
TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights.IMAGENET1K_V1", "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
                       "vgg16": "VGG16_Weights.IMAGENET1K_V1", "densenet121": "DenseNet121_Weights.IMAGENET1K_V1"}
# torchvision keys the backbone does not hold, (ImageNet stem, small stem): the head, the 7x7 stem, VGG's fc layers
DROPPED_KEYS = {"resnet18": (("fc.",), ("fc.", "conv1.")), "resnet50": (("fc.",), ("fc.", "conv1.")),
                "densenet121": (("classifier.",), ("classifier.", "features.conv0.")),
                "vgg16": (("classifier.6.",), ("classifier.",))}
# Old DenseNet checkpoints name layers 'norm.1' where the module is now 'norm1' (torchvision renames them the same way).
DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
OTHER_MAKERS = dict(ddpm="train_ddpm.py model", sd="finetune_sd.py model", finetune_sd="finetune_sd.py model")


# Models: images in [0, 1] -> resize to input_size -> normalise -> backbone (N, D) -> head (logits) ----------------
class SmallCNN(nn.Module):  # not from the paper: five conv layers, (N, 3, H, W) -> (N, 4w)
    def __init__(self, width=16):
        super().__init__()

        def block(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        w = width
        self.layers = nn.Sequential(*block(3, w), *block(w, w), nn.MaxPool2d(2),
                                    *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),
                                    *block(2 * w, 4 * w), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = 4 * w

    def forward(self, x):
        return self.layers(x)


class Classifier(nn.Module):  # (N, 3, H, W) in [0, 1] -> logits; resizes, normalises
    def __init__(self, backbone, num_features, num_classes, input_size, mean=None, std=None):
        super().__init__()
        self.backbone, self.head, self.input_size = backbone, nn.Linear(num_features, num_classes), input_size
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def features(self, x):
        s = self.input_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=max(x.shape[-2:]) > s)
        if self.mean is not None:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return self.backbone(x)

    def forward(self, x):
        return self.head(self.features(x))


def build_model(arch, num_classes, input_size, width=16, normalization=None):
    if arch not in ARCHS:
        raise UsageError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHS)}")
    backbone = SmallCNN(width) if arch == "smallcnn" else torchvision_backbone(arch, input_size <= SMALL_INPUT)
    norm = normalization or {}
    return Classifier(backbone, backbone.out_features, num_classes, input_size, norm.get("mean"), norm.get("std"))


def torchvision_backbone(arch, small):
    import torchvision  # here: its import costs every process seconds, and smallcnn needs none of it
    net = getattr(torchvision.models, arch)(weights=None)
    if arch == "vgg16":  # VGG-16 minus its last layer; small inputs: pooled convolutions, as CIFAR VGGs
        net.avgpool = nn.AdaptiveAvgPool2d(1) if small else net.avgpool
        net.classifier = nn.Identity() if small else nn.Sequential(*list(net.classifier.children())[:-1])
        net.out_features = 512 if small else 4096
        return net
    stem, conv, pool, head = (net.features, "conv0", "pool0", "classifier") if arch == "densenet121" else \
        (net, "conv1", "maxpool", "fc")
    if small:  # the CIFAR-style stem
        setattr(stem, conv, nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False))
        setattr(stem, pool, nn.Identity())
    net.out_features = getattr(net, head).in_features
    setattr(net, head, nn.Identity())
    return net


def model_input_size(arch, resolution, pretrained, input_size=None):
    size = input_size or (IMAGENET_SIZE if pretrained else resolution)
    if arch == "smallcnn" and size < 4:  # its two 2x2 max-pools leave nothing of a smaller image
        raise UsageError(f"smallcnn needs inputs of at least 4 px, got {size}: pass --input-size 4 or more")
    return max(size, VGG_MIN_INPUT) if arch == "vgg16" else size


# Training: SGD + momentum, cosine schedule per step, random shifts (+ flip or noise); DDP, autocast on CUDA -----
def augment(x, mode, generator):  # x (N, 3, H, W): shifts by up to side/8 px (+ flips or noise on half)
    if mode == "none":
        return x
    n, _, h, w = x.shape
    pad = max(1, h // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy, dx = torch.randint(0, 2 * pad + 1, (2, n), generator=generator).tolist()
    x = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
    if mode == "flip-crop":
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if mode == "crop-noise":
        sigma = torch.rand(n, generator=generator) * NOISE_MAX * (torch.rand(n, generator=generator) < 0.5)
        g = torch.Generator(x.device).manual_seed(int(torch.randint(2 ** 62, (1,), generator=generator)))
        noise = torch.randn(x.shape, generator=g, device=x.device)  # drawn where the images are
        x = (x + sigma.to(x.device)[:, None, None, None] * noise).clamp(0, 1)
    return x


def cosine_lr(step, total, base):
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


def fit(model, train_set, evaluate_epoch, epochs=10, batch_size=128, lr=0.01, momentum=0.9, weight_decay=5e-4,
        augment_mode="crop", device=torch.device("cpu"), dtype="auto", seed=0, rank=0, world=1, workers=0,
        compile_model=False, progress=True):  # train in place; rank 0 logs evaluate_epoch(model) every epoch
    model.to(device).train()
    torch.manual_seed(seed * world + rank)
    # the shifts draw apart from the shuffle (one stream would tie an image's place to its shift); seeds < 0 too
    state = np.random.SeedSequence([seed % 2 ** 64, rank, 0xA06]).generate_state(2, np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    sampler = torch.utils.data.distributed.DistributedSampler(train_set, world, rank, shuffle=True, seed=seed) \
        if world > 1 else torch.utils.data.RandomSampler(train_set, generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(train_set, batch_size, sampler=sampler, pin_memory=device.type == "cuda",
                                         num_workers=0 if train_set.cache is not None else workers)
    net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else model
    net = torch.compile(net) if compile_model else net
    groups = [dict(params=[p for p in model.parameters() if p.ndim > 1], weight_decay=weight_decay),
              dict(params=[p for p in model.parameters() if p.ndim <= 1], weight_decay=0)]  # none on BN and biases
    opt = torch.optim.SGD(groups, lr=lr, momentum=momentum)
    amp_dtype = autocast_dtype(dtype, device) if device.type == "cuda" else None  # the CPU trains in fp32
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)  # disabled: a plain backward and step
    total, step, history = epochs * len(loader), 0, []
    for epoch in range(1, epochs + 1):
        if world > 1:
            sampler.set_epoch(epoch)
        loss_sum, correct, seen, t0 = 0.0, 0, 0, time.time()
        for x, y in tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False, disable=not progress or rank != 0):
            x = augment(x.to(device, non_blocking=True).float() / 255.0, augment_mode, generator)  # (B, 3, H, W)
            y = y.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, lr)
            with autocast(device, amp_dtype):
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
        record = dict(epoch=epoch, loss=loss_sum / max(1, seen), train_acc=correct / max(1, seen),
                      lr_end=cosine_lr(step, total, lr), time_s=round(time.time() - t0, 2))
        if rank == 0:
            record.update(evaluate_epoch(model))  # predict() switches to eval mode and back
            if progress:
                print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                               if not k.startswith("n_")), flush=True)
        history.append(record)
        barrier(device)
    model.eval()
    return history


def trigger_split(folder, target, fraction, seed, what="--data"):
    """The detector's (labels, stamp): `fraction` of the non-target images carry the trigger, the poisoned first."""
    require_poison_flags(folder, f"trigger-detector {what}")
    nontarget = torch.tensor([int(r.get("orig_label", r["label"])) for r in folder.records]) != target
    has = folder.poisoned.clone()
    want = int(math.floor(fraction * int(nontarget.sum()) + 0.5))
    free = torch.nonzero(nontarget & ~has).flatten().numpy()
    need = max(0, want - int((has & nontarget).sum()))
    chosen = np.random.default_rng(seed).choice(free, min(need, len(free)), replace=False)
    stamp = torch.zeros(len(folder), dtype=torch.bool)
    stamp[torch.from_numpy(np.sort(chosen)).long()] = True
    return (has | stamp).long(), stamp


# The diffusion classifier (Li et al. 2023; Tab. A4) --------------------------------------------------------------
# argmin_c E_{t,eps} err(eps, eps_theta(x_t, t, c)), the same (t, eps) for every class. Filtering drops the largest p%
# of each error map before averaging: a poisoned model conditioned on the true class errs most on the trigger.
def timestep_grid(T, n):  # Li et al.'s midpoints of n equal bins of [0, T)
    if not 1 <= n <= T:
        raise UsageError(f"--timesteps {n} is outside [1, {T}]: give fewer")
    return list(range(T // n // 2, T, T // n))[:n]


def stage_points(n_max, n):  # every (n_max // n)-th point, centred (reused by denser stages)
    stride = n_max // n
    return list(range(n_max)[stride // 2::stride][:n])


def drop_counts(filters, numel):  # the reference keeps the int((1 - p) * numel) smallest errors
    bad = [p for p in filters if not 0 <= p < 100]
    if bad:
        raise UsageError(f"--filter-top {bad[0]} is outside [0, 100): give percents")
    return [numel - int(math.floor((100 - p) / 100 * numel + 1e-9)) for p in filters]


def filtered_means(err, drops):  # err (M, D) -> (M, L): row means without the drops[l] largest
    D = err.shape[1]
    total = err.sum(1, dtype=torch.float64)
    dropped = F.pad(err.topk(max(drops), dim=1).values.double().cumsum(1), (1, 0))  # (M, max + 1): d largest summed
    return torch.stack([(total - dropped[:, d]) / (D - d) for d in drops], 1)


def q_sample(alphas_cumprod, x0, t, noise):  # DDPM eq. 4, coefficients from the float64 schedule
    abar = alphas_cumprod.to(x0.device)[t]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return abar.sqrt().to(x0.dtype).view(shape) * x0 + (1 - abar).sqrt().to(x0.dtype).view(shape) * noise


def error_map(eps, noise, loss):
    return (eps.float() - noise.float()).square() if loss == "l2" else (eps.float() - noise.float()).abs()


def draw_noise(seeds, n_points, shape):  # (B, n_points, *shape), image b's from seeds[b]
    return torch.stack([torch.randn((n_points,) + tuple(shape), generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


@torch.no_grad()
def denoising_errors(eps_fn, x0, noise, alphas_cumprod, timesteps, queries, drops, loss="l2", batch_size=512,
                     amp_dtype=None, pad=False):  # (Q, L) errors of queries (image, class, point); pad: for compile
    out = torch.empty(len(queries), len(drops), dtype=torch.float64)
    for start in range(0, len(queries), batch_size):
        q = queries[start:start + batch_size].to(x0.device)
        m = len(q)
        if pad and m < batch_size:  # one shape for every forward
            q = torch.cat([q, q[-1:].expand(batch_size - m, -1)])
        b, c, k = q.unbind(1)
        t, eps = timesteps[k], noise[b, k]
        with autocast(x0.device, amp_dtype):
            pred = eps_fn(q_sample(alphas_cumprod, x0[b], t, eps), t, c)
        out[start:start + m] = filtered_means(error_map(pred[:m], eps[:m], loss).flatten(1), drops).cpu()
    return out


@torch.no_grad()
def classify_images(eps_fn, x0, noise, alphas_cumprod, timesteps, stages, num_classes, drops, loss="l2",
                    batch_size=512, amp_dtype=None, pad=False):
    """-> (predictions (L, B), scores (L, B, K), evaluations); stage (n, keep) keeps the `keep` best; last n = P."""
    B, P, L, K = len(x0), noise.shape[1], len(drops), num_classes
    errors = torch.full((L, B, K, P), float("nan"), dtype=torch.float64)   # points last: scores reduce rows
    alive = torch.ones(L, B, K, dtype=torch.bool)
    done, evaluations = torch.zeros(P, dtype=torch.bool), 0
    for n, keep in stages:
        points = torch.tensor(stage_points(P, n))
        new = points[~done[points]]
        done[points] = True
        pairs = alive.any(0).nonzero()                                 # (M, 2): (image, class) some level keeps
        queries = torch.cat([pairs.repeat_interleave(len(new), 0), new.repeat(len(pairs))[:, None]], 1)
        errors[:, queries[:, 0], queries[:, 1], queries[:, 2]] = denoising_errors(
            eps_fn, x0, noise, alphas_cumprod, timesteps, queries, drops, loss, batch_size, amp_dtype, pad).T
        evaluations += len(queries)
        score = errors[..., done].mean(3).masked_fill(~alive, float("inf"))  # (L, B, K): mean over points so far
        if keep < K:
            kept = score.topk(keep, dim=2, largest=False).indices
            alive = torch.zeros_like(alive).scatter_(2, kept, True) & alive
    scores = errors.nanmean(3)                                         # (L, B, K)
    return scores.masked_fill(~alive, float("inf")).argmin(2), scores, evaluations


# Data: uint8 images, the labels to learn (class indices or trigger flags), the trigger stamped on some ----------
class ImageSet(torch.utils.data.Dataset):  # (uint8 (3, H, W), label) of a folder, the trigger stamped where stamp
    def __init__(self, folder, indices=None, labels=None, stamp=None, trigger=None, in_memory=None, progress=False,
                 alphas=None):
        self.folder, self.trigger, self.alphas = folder, trigger, alphas
        self.indices = torch.arange(len(folder)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.labels = folder.labels[self.indices] if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.stamp = torch.zeros(len(self.indices), dtype=torch.bool) if stamp is None else torch.as_tensor(stamp)
        self.size = folder.image_size()  # load_folder refuses a folder of mixed sizes
        if in_memory is None:
            in_memory = len(self.indices) * 3 * math.prod(self.size) <= IN_MEMORY_BYTES
        self.cache = None
        if in_memory and len(self.indices):
            loading = tqdm(range(len(self)), desc=f"load {folder.root.name}", leave=False, disable=not progress)
            self.cache = torch.stack([self.load(j) for j in loading])

    def __len__(self):
        return len(self.indices)

    def load(self, j):
        x = self.folder.image_uint8(int(self.indices[j]))
        if not self.stamp[j]:
            return x
        trigger = self.trigger
        if self.alphas is not None:  # the blend's mask is alpha everywhere: scale it to this image's alpha
            alpha = float(self.alphas[int(self.indices[j])])
            trigger = replace(trigger, mask=trigger.mask * (alpha / trigger.mask.max()))
        return trigger.apply(x[None].double() / 255.0).mul(255.0).round().clamp(0, 255).to(torch.uint8)[0]

    def __getitem__(self, j):
        return (self.cache[j] if self.cache is not None else self.load(j)), int(self.labels[j])


def batches(data, batch_size=256, workers=0):  # float batches in [0, 1] of images (a tensor) or a dataset
    chunks = data.split(batch_size) if torch.is_tensor(data) else \
        (x for x, _ in torch.utils.data.DataLoader(data, batch_size, shuffle=False, num_workers=workers))
    for x in chunks:
        yield x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def predict(model, data, batch_size=256, device=None, progress=False, workers=0):
    """(labels (N,), probabilities (N, classes)) on the CPU."""
    device, was_training = device or next(model.parameters()).device, model.training
    model.eval()
    probs = torch.cat([model(x.to(device)).float().softmax(-1).cpu() for x in tqdm(
        batches(data, batch_size, workers), desc="predict", leave=False, disable=not progress,
        total=math.ceil(len(data) / batch_size))])
    model.train(was_training)
    return probs.argmax(-1), probs


def evaluate(model, config, test=None, backdoor=None, batch_size=256, device=None):
    """TA and ASR (detectors: clean_acc, detect_rate)."""
    out, keys = {}, ("ta", "asr") if config["task"] == "class" else ("clean_acc", "detect_rate")
    for what, data, key in (("test", test, keys[0]), ("backdoor", backdoor, keys[1])):
        if data is not None:
            data = evaluation_set(config, data, f"--{what}") if isinstance(data, (str, Path)) else data
            pred, _ = predict(model, data, batch_size, device)
            want = 1 if key == "detect_rate" else data.labels  # ASR: every backdoor label is the target's
            out[key], out[f"n_{what}"] = float((pred == want).float().mean()), len(data)
    return out


def evaluation_set(config, folder_path, what):
    folder = load_folder(folder_path)
    require_resolution(config, folder.image_size(), "the classifier", f"the images of {what} {folder_path}")
    if config["task"] == "trigger":
        require_poison_flags(folder, what)
        return ImageSet(folder, labels=folder.poisoned.long())
    return ImageSet(folder, labels=map_labels(folder.labels, folder.class_names, config["class_names"],
                                              f"{what} {folder_path}"))


def resolve_sets(data, test=None, backdoor=None, train_folder=True):  # a poisoned set's root (or train/) -> its sets
    given = data = Path(data)
    if (data / "train" / "metadata.jsonl").is_file():
        data = data / "train"
    root = data.parent
    if (train_folder or data != given) and data.name == "train" and (root / "test" / "metadata.jsonl").is_file():
        test = test or root / "test"
        backdoor = backdoor or ((root / "test_backdoor") if (root / "test_backdoor" / "metadata.jsonl").is_file()
                                else None)
    return data, test, backdoor


def map_labels(labels, from_names, to_names, what):  # labels as indices into to_names (by name, case aside)
    lowered = [n.lower() for n in to_names]
    present = sorted(set(int(v) for v in torch.as_tensor(labels).tolist()))
    unknown = [from_names[c] for c in present if from_names[c].lower() not in lowered]
    if unknown:
        common = set(n.lower() for n in from_names) & set(lowered)
        reason = f"classes {unknown} are unknown to it" if common else "no class names in common"
        raise UsageError(f"{what} holds classes {from_names}, the classifier knows {list(to_names)}: {reason}; "
                         "use a classifier trained on these classes")
    table = torch.tensor([lowered.index(n.lower()) if n.lower() in lowered else -1 for n in from_names])
    return table[torch.as_tensor(labels, dtype=torch.long)]


def resolve_name(name, class_names):
    lowered = [c.lower() for c in class_names]
    if name is None or name.lower() not in lowered:
        raise UsageError(f"no target class {name!r} in {class_names}: give sets of the same classes")
    return lowered.index(name.lower())


def require_poison_flags(folder, what, fix="give a poisoned set's folder"):
    if folder.poisoned_unknown:
        raise UsageError(f"{what} {folder.root} does not say which images carry the trigger: {fix}")


def require_resolution(config, size, what, images="the images"):
    trained = config.get("data_resolution")
    if trained is None or size is None:
        return
    (th, tw), (h, w) = side_pair(trained), side_pair(size)
    same_shape = isinstance(trained, (int, np.integer)) or h * tw == w * th  # an int: as configs before [H, W]
    downsized = config.get("input_size") and config["input_size"] <= min(th, tw, h, w) and same_shape
    if (h, w) != (th, tw) and not downsized:
        raise UsageError(f"{what} was trained on {th}x{tw}-px images but {images} are {h}x{w} px: train it on "
                         "data of the same resolution")


def side_pair(size):  # an int side or (H, W) -> (H, W)
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(v) for v in size)


# Classifier folders: ImageNet weights, save and load ------------------------------------------------------------
def make_model(arch, num_classes, resolution, pretrained=False, weights=None, input_size=None, width=16,
               normalize="auto", progress=True, seed=0):  # (model, its config fields); weights: ImageNet's, a file
    pretrained, (h, w) = pretrained or weights is not None, side_pair(resolution)
    size = model_input_size(arch, h, pretrained, input_size)
    use_imagenet_norm = normalize == "imagenet" or (normalize == "auto" and pretrained)
    norm = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)} if use_imagenet_norm else None
    torch.manual_seed(seed)  # the initial weights depend on the seed only, not on what ran before
    model = build_model(arch, num_classes, size, width, norm)
    source, dropped = load_imagenet(model, arch, weights, progress) if pretrained else (None, [])
    stem = None if arch == "smallcnn" else ("cifar" if size <= SMALL_INPUT else "imagenet")
    return model, dict(arch=arch, width=width if arch == "smallcnn" else None, num_classes=num_classes,
                       input_size=size, data_resolution=h if h == w else [h, w], stem=stem, normalization=norm,
                       pretrained=source, pretrained_keys_not_loaded=dropped)


def load_imagenet(model, arch, weights_file=None, progress=True):  # -> (source, keys not loaded)
    if arch not in TORCHVISION_WEIGHTS:
        raise UsageError(f"no ImageNet weights for {arch}: drop --pretrained")
    if weights_file:
        path, source = Path(weights_file), f"file:{weights_file}"
        if not path.is_file():
            raise UsageError(f"--weights {path}: no such file; give a state dict")
        try:  # a weights-only torch file never unpickles code
            sd = load_file(str(path)) if path.suffix == ".safetensors" else \
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise UsageError(f"--weights {path}: no state dict ({type(e).__name__}); save model.state_dict()") from None
        sd = sd["state_dict"] if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict) else sd
        if not isinstance(sd, dict):
            raise UsageError(f"--weights {path} holds a {type(sd).__name__}: give a state dict")
    else:
        import torchvision
        url = torchvision.models.get_weight(TORCHVISION_WEIGHTS[arch]).url
        try:
            sd = torch.hub.load_state_dict_from_url(url, progress=progress, check_hash=True, weights_only=True)
        except Exception as e:
            raise UsageError(f"cannot download {url} ({type(e).__name__}): pass --weights FILE") from None
        source = f"torchvision:{TORCHVISION_WEIGHTS[arch]}"
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if arch == "densenet121":
        sd = {DENSENET_OLD_KEY.sub(r"\1\2", k): v for k, v in sd.items()}
    dropped = DROPPED_KEYS[arch][model.input_size <= SMALL_INPUT]
    kept, own = {k: v for k, v in sd.items() if not k.startswith(dropped)}, model.backbone.state_dict()
    missing = sorted(set(own) - set(kept) - {k for k in own if k.startswith(dropped)})
    unexpected = sorted(set(kept) - set(own))
    bad = [k for k in kept if k in own and kept[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise UsageError(f"the weights do not fit {arch}: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"reshaped {bad[:5]}; give its ImageNet weights")
    model.backbone.load_state_dict(kept, strict=False)
    return source, sorted(k for k in sd if k.startswith(dropped))


def save_classifier(out, model, config, results, force=False):
    with atomic_output(out, force) as tmp:
        save_safetensors({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                         tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def load_classifier(folder, device="cpu"):  # (model in eval mode, config) of a classifier folder
    folder, damaged = Path(folder), "the folder is damaged, train it again"
    try:
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{folder}/config.json is not valid JSON ({e}): {damaged}") from None
    maker = config.get("family") or config.get("stage") or "classify"
    if maker != "classify" or "arch" not in config or not (folder / "model.safetensors").is_file():
        other = f"a {OTHER_MAKERS.get(maker, maker)} folder ({maker}), " if maker != "classify" else ""
        raise UsageError(f"{folder} is {other}not a classifier folder: make a classifier with classify.py train or "
                         "trigger-detector")
    model = build_model(config["arch"], config["num_classes"], config["input_size"], config.get("width") or 16,
                        config.get("normalization"))
    try:
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    except Exception as e:  # truncated or foreign (SafetensorError, OSError), other keys or shapes (RuntimeError)
        raise UsageError(f"{folder}/model.safetensors is not readable ({type(e).__name__}): {damaged}") from None
    return model.to(device).eval(), config


# Training stages: a class classifier and the trigger detector, each written as a classifier folder --------------
def train_classifier(data, out, test=None, backdoor=None, arch="resnet18", clean=False, pretrained=False,
                     weights=None, input_size=None, width=16, normalize="auto", device="auto", force=False,
                     progress=True, command=None, stamp=0.0, **opts):
    """`clean`: without the poisoned images; `stamp`: a share stamped, labels kept."""
    opts = {**DEFAULT_OPTS, **opts}
    check_out(out, force, {"--data": data, "--test": test, "--backdoor": backdoor, "--weights": weights})
    data, test, backdoor = resolve_sets(data, test, backdoor)
    rank, world, dev = setup_distributed(resolve_device(device))
    folder = load_folder(data)
    if test is None and backdoor is None and rank == 0:
        print("classify.py: warning: no TA or ASR will be measured: give --test and --backdoor", file=sys.stderr)
    if clean:
        require_poison_flags(folder, "--clean: --data", "drop --clean to train on every image")
    keep = torch.nonzero(~folder.poisoned).flatten() if clean else torch.arange(len(folder))
    if len(keep) == 0:
        raise UsageError(f"{data} has no clean images: drop --clean")
    config = dict(task="class", class_names=folder.class_names, data_resolution=folder.image_size())
    # the test sets first: one of another size or other classes is refused before the training images are read
    test_set, backdoor_set = on_rank0(  # rank 0 evaluates; a wrong set stops every rank
        lambda: (evaluation_set(config, test, "--test") if test else None,
                 evaluation_set(config, backdoor, "--backdoor") if backdoor else None),
        rank, world, share_result=False) or (None, None)
    trigger = load_trigger(data) if stamp else None
    if stamp and trigger is None:
        raise UsageError(f"--stamp-trigger: {data} has no trigger: give a poisoned set")
    stamped = torch.from_numpy(np.random.default_rng(opts["seed"] + 4).random(len(keep)) < stamp)
    train_set = ImageSet(folder, keep, stamp=stamped, trigger=trigger, progress=progress and rank == 0)
    model, fields = make_model(arch, len(folder.class_names), train_set.size, pretrained, weights, input_size,
                               width, normalize, progress, opts["seed"])
    manifest = folder.manifest
    data_info = dict(train=str(data), test=str(test) if test else None, backdoor=str(backdoor) if backdoor else None,
                     clean_only=clean, n_stamped=int(stamped.sum()), n_train=len(train_set), p_t=manifest.get("p_t"),
                     poison_ratio=manifest.get("poison_ratio"))
    config_extra = dict(task="class", class_names=folder.class_names, target=manifest.get("target"), data=data_info,
                        command=command or "train_classifier()")
    bs = max(256, opts["batch_size"])
    return fit_and_save(model, fields, train_set, lambda m: evaluate(m, config, test_set, backdoor_set, bs),
                        ["ta", "asr"], out, config_extra, opts, dev, rank, world, force, progress)


def train_trigger_detector(data, out, test=None, arch="resnet50", fraction=0.5, holdout=0.1, pretrained=False,
                           weights=None, input_size=None, width=16, normalize="auto", device="auto", force=False,
                           progress=True, command=None, blend_alpha=BLEND_ALPHA_RANGE, **opts):
    """Clean or triggered: `fraction` of the non-target images carry the trigger, blends at alpha ~ U(blend_alpha)."""
    opts = {**DEFAULT_OPTS, **opts}
    seed = opts["seed"]
    check_out(out, force, {"--data": data, "--test": test, "--weights": weights})
    if not 0 < fraction <= 1:
        raise UsageError(f"--fraction {fraction}: give a share in (0, 1]")
    if blend_alpha is not None and not 0 < blend_alpha[0] <= blend_alpha[1] <= 1:
        raise UsageError(f"--blend-alpha-range {blend_alpha[0]:g},{blend_alpha[1]:g}: give 0 < LO <= HI <= 1")
    data, test, _ = resolve_sets(data, test)
    rank, world, dev = setup_distributed(resolve_device(device))
    folder, trigger = load_folder(data), load_trigger(data)
    target = (folder.manifest.get("target") or {}).get("index")
    if trigger is None or target is None:
        raise UsageError(f"{data} has no trigger or no target class: give a poisoned set")
    labels, stamp = trigger_split(folder, target, fraction, seed)
    blend_alpha = blend_alpha if trigger.kind == "blend" else None

    def alphas(n, seed):  # one alpha an image (used where it is stamped)
        return None if blend_alpha is None else torch.from_numpy(np.random.default_rng(seed).uniform(*blend_alpha, n))
    train_alphas, train_idx = alphas(len(folder), seed + 2), torch.arange(len(folder))
    if test is not None:
        test_folder = load_folder(test)
        if test_folder.image_size() != folder.image_size():  # on every rank: rank 0 alone builds the held-out set
            (h, w), (th, tw) = test_folder.image_size(), folder.image_size()
            raise UsageError(f"--test {test} has {h}x{w}-px images, --data {data} {th}x{tw}: give its own test set")
        t_target = resolve_name(manifest_target(folder.manifest), test_folder.class_names)
        t_labels, t_stamp = trigger_split(test_folder, t_target, fraction, seed + 1, "--test")
        heldout = ImageSet(test_folder, None, t_labels, t_stamp, trigger,
                           alphas=alphas(len(test_folder), seed + 3)) if rank == 0 else None
        heldout_desc = f"{test} ({fraction:.0%} of its non-target images stamped)"
    else:
        perm = torch.from_numpy(np.random.default_rng(seed + 1).permutation(len(folder)))
        n_hold = max(1, int(round(holdout * len(folder))))
        hold_idx, train_idx = perm[:n_hold].sort().values, perm[n_hold:].sort().values
        heldout = ImageSet(folder, hold_idx, labels[hold_idx], stamp[hold_idx], trigger,
                           alphas=train_alphas) if rank == 0 else None
        heldout_desc = f"{holdout:.0%} of {data} held out"
    train_set = ImageSet(folder, train_idx, labels[train_idx], stamp[train_idx], trigger,
                         progress=progress and rank == 0, alphas=train_alphas)
    model, fields = make_model(arch, 2, train_set.size, pretrained, weights, input_size, width, normalize,
                               progress, seed)

    def evaluate_epoch(m):
        y = heldout.labels
        hit = predict(m, heldout, max(256, opts["batch_size"]))[0] == y
        acc, tpr, tnr = (float(hit[mask].float().mean()) if mask.any() else None for mask in (y >= 0, y == 1, y == 0))
        return dict(heldout_acc=acc, heldout_tpr=tpr, heldout_tnr=tnr, n_heldout=len(y))
    data_info = dict(train=str(data), n_train=len(train_set), n_with_trigger=int(labels[train_idx].sum()),
                     fraction_of_nontarget_with_trigger=fraction, heldout=heldout_desc,
                     blend_alpha_range=list(blend_alpha) if blend_alpha is not None else None)
    config_extra = dict(task="trigger", class_names=list(TRIGGER_CLASSES), target=folder.manifest.get("target"),
                        trigger=trigger.params, data=data_info, command=command or "train_trigger_detector()")
    return fit_and_save(model, fields, train_set, evaluate_epoch, ["heldout_acc", "heldout_tpr", "heldout_tnr"],
                        out, config_extra, opts, dev, rank, world, force, progress)


def fit_and_save(model, fields, train_set, evaluate_epoch, summary_keys, out, config_extra, opts, device, rank,
                 world, force, progress):
    t0 = time.time()
    history = fit(model, train_set, evaluate_epoch, opts["epochs"], opts["batch_size"], opts["lr"], opts["momentum"],
                  opts["weight_decay"], opts["augment"], device, opts["dtype"], opts["seed"], rank, world,
                  opts["workers"], opts["compile"], progress)
    results = dict(task=config_extra["task"], epochs=history, **summarize(history, summary_keys),
                   train_time_s=round(time.time() - t0, 2))
    training = dict(opts, schedule="cosine (per step)", optimizer="SGD", world_size=world)
    config = dict(stage="classify", **fields, **config_extra, training=training, versions=versions())
    if rank == 0:
        save_classifier(out, model.cpu(), config, results, force)
        if progress:
            best = {"best_over_epochs": results["best_over_epochs"]} if config_extra["task"] == "class" else {}
            print(json.dumps({"out": str(out), **results["final"], **best, "train_time_s": results["train_time_s"]}))
    barrier(device)
    return results


def summarize(history, keys):
    final = {k: history[-1][k] for k in keys if k in history[-1]}
    final.update({k: v for k, v in history[-1].items() if k.startswith("n_")})  # the test sets' sizes
    best = {k: max((h[k] for h in history if h.get(k) is not None), default=None) for k in keys if k in history[-1]}
    return dict(final=final, best_over_epochs=best,
                note="final = after the last epoch (what we report); best_over_epochs = the maximum over epochs of "
                     "each value separately, as the paper's reference code reported")


# The diffusion classifier's plumbing: denoisers of both families, stages, sharding, the Tab. A4 outputs ---------
@dataclass
class Denoiser:  # module(x_t, t, condition(y)) -> eps; encode(images) -> x_0
    module: nn.Module
    condition: object
    encode: object
    alphas_cumprod: torch.Tensor
    class_names: list
    shape: tuple
    info: dict

    def eps(self, x, t, y):
        return self.module(x, t, self.condition(y))


def ddpm_denoiser(model, config):
    from train_ddpm import diffusion_from_config
    R = model.cfg.resolution

    def encode(images):  # to [-1, 1], as train_ddpm.py trains
        x = torch.stack(list(images))
        if tuple(x.shape[-2:]) != (R, R):
            raise UsageError(f"the images are {x.shape[-2]}x{x.shape[-1]} px, the model was trained at {R}x{R}")
        return x * 2 - 1
    return Denoiser(model, lambda y: y, encode, diffusion_from_config(config).alphas_cumprod,
                    list(config["data"]["class_names"]), (model.cfg.in_channels, R, R),
                    {"family": "ddpm", "resolution": R, "step": config.get("step")})


def sd_denoiser(sd, class_names, resolution):  # prompted "A photo of a {class}"; latents: VAE means (Li et al.)
    from finetune_sd import encode_prompts, resize_square, vae_layout
    vae = vae_layout(sd.vae.config)
    scale = 2 ** (len(vae["block_out_channels"]) - 1)  # SD v1: 8
    if resolution % scale:
        raise UsageError(f"--resolution {resolution}: give a multiple of {scale} (the VAE downsamples by {scale})")
    prompts = [caption(n) for n in class_names]
    context = encode_prompts(sd.text_encoder, sd.tokenizer, prompts).float()       # (K, 77, D)

    def encode(images):
        images = torch.stack([resize_square(im.float(), resolution) for im in images])
        mean, _ = sd.vae.encode(images.to(context.device) * 2 - 1)
        return mean.float() * sd.vae.scaling_factor
    return Denoiser(sd.unet, lambda y: context[y], encode, sd.schedule.alphas_cumprod(), list(class_names),
                    (vae["latent_channels"], resolution // scale, resolution // scale),
                    {"family": "sd", "resolution": resolution, "prompts": prompts, "base": sd.base})


def load_denoiser(source, weights="ema", device="cpu", class_names=None, resolution=None, data_resolution=None):
    path = Path(source)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    family = config.get("family")
    if family == "ddpm":
        from train_ddpm import load_model
        return ddpm_denoiser(*load_model(path, weights=weights, device=device))
    wanted = "give a train_ddpm.py or finetune_sd.py folder or an SD"
    if not path.exists() and (path.is_absolute() or str(source).startswith(".") or str(source).count("/") != 1):
        raise UsageError(f"--model {source}: no such model folder; {wanted}")  # not a Hub id either
    if path.is_dir() and not config and not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
        raise UsageError(f"--model {source} is not a model folder (no config.json): {wanted}")
    if config.get("stage") == "classify":
        raise UsageError(f"--model {source} is a classifier: give it as --classifier, a train_ddpm.py model as --model")
    from finetune_sd import load_sd
    sd = load_sd(source, device=device, use_ema=family == "sd" and weights == "ema")
    return sd_denoiser(sd, config.get("class_names") or class_names,
                       resolution or config.get("resolution") or data_resolution or 512)


def parse_stages(timesteps, keep, num_classes):  # [(evaluations, classes kept after)]; the last keeps 1
    timesteps, keep = [int(v) for v in timesteps], [int(v) for v in keep or []]
    given, steps = ",".join(map(str, keep)) or "(none)", ",".join(map(str, timesteps))  # errors quote what was typed
    if not timesteps or timesteps[0] < 1 or any(a >= b for a, b in zip(timesteps, timesteps[1:])):
        raise UsageError(f"--timesteps {steps}: give increasing positive counts")
    keep = keep + [1] if len(keep) == len(timesteps) - 1 else keep
    if len(keep) != len(timesteps) or keep[-1] != 1:
        raise UsageError(f"--keep {given} does not fit --timesteps {steps}: give one count per stage but the last")
    if any(a <= b for a, b in zip(keep, keep[1:])) or keep[0] > num_classes:
        raise UsageError(f"--keep {given}: give decreasing counts, at most {num_classes}")
    return list(zip(timesteps, keep))


def diffusion_classify_set(denoiser, folder, indices, model_labels, stages, drops, loss="l2", seed=0,
                           batch_size=512, device="cpu", amp_dtype=None, pad=False, progress=False, desc="classify",
                           rank=0, world=1):  # each rank every world-th image; rank 0 gathers them all, in order
    mine = np.arange(rank, len(indices), world)
    indices = indices[mine]
    device, K, L = torch.device(device), len(denoiser.class_names), len(drops)
    timesteps = torch.tensor(timestep_grid(len(denoiser.alphas_cumprod), stages[-1][0]), device=device)
    # images per group: a few first-stage forwards' worth, their noise under NOISE_BYTES
    want = max(1, math.ceil(4 * batch_size / (K * stages[0][0])))
    group = max(1, min(want, NOISE_BYTES // (stages[-1][0] * math.prod(denoiser.shape) * 4), len(indices)))
    parts = [(torch.zeros(L, 0, dtype=torch.long), torch.zeros(L, 0, K, dtype=torch.float64), 0)]  # (preds, scores, n)
    for g in tqdm(range(0, len(indices), group), desc=desc, leave=False, disable=not progress):
        idx = [int(i) for i in indices[g:g + group]]
        images = [folder.image_uint8(i).to(device).float() / 255.0 for i in idx]
        with autocast(device, amp_dtype):
            x0 = denoiser.encode(images).float()
        noise = draw_noise([seed + i for i in idx], len(timesteps), tuple(x0.shape[1:])).to(device)  # image i: seed + i
        parts.append(classify_images(denoiser.eps, x0, noise, denoiser.alphas_cumprod, timesteps, stages, K, drops,
                                     loss, batch_size, amp_dtype, pad))
    preds, scores, evaluations = zip(*parts)
    result = dict(predictions=torch.cat(preds, 1), scores=torch.cat(scores, 1),
                  labels=model_labels[torch.as_tensor(indices, dtype=torch.long)], evaluations=sum(evaluations))
    if world == 1:
        return result
    ranks = [None] * world if rank == 0 else None
    dist.gather_object({**result, "positions": mine}, ranks, dst=0)
    if rank != 0:
        return None
    order = torch.as_tensor(np.argsort(np.concatenate([p["positions"] for p in ranks]), kind="stable"))
    merged = {key: torch.cat([p[key] for p in ranks], dim).index_select(dim, order)
              for key, dim in (("predictions", 1), ("scores", 1), ("labels", 0))}
    return {**merged, "evaluations": sum(p["evaluations"] for p in ranks)}


def diffusion_markdown(r):
    kept = ", ".join(str(s[1]) for s in r["stages"][:-1])
    pruning = f" (keeping {kept} classes between stages)" if len(r["stages"]) > 1 else ""
    lines = ["# The diffusion classifier against a classifier trained on the poisoned set (the paper's Tab. A4)", "",
             f"Model `{r['model']}` ({r['family']}, {r['weights']} weights); test `{r['test']}` ({r['n_test']} "
             f"images), backdoor `{r['backdoor']}` ({r['n_backdoor']} images); target class {r['target']!r}. Diffusion "
             f"classifier: {' then '.join(str(s[0]) for s in r['stages'])} evaluations per class{pruning}, "
             f"{r['loss']} error of the eps prediction, the same noise and timesteps for every class; "
             f"{r['evaluations']} evaluations at {r['evaluations_per_s']:.1f}/s.", "",
             "| classifier | TA (%) | ASR (%) |", "|---|---:|---:|"]

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"
    lines += [f"| {row['classifier']} | {pct(row.get('ta'))} | {pct(row.get('asr'))} |" for row in r["rows"]]
    lines += ["", "TA: accuracy on the clean test images; ASR: share of the non-target test images carrying the "
              "trigger that are classified as the target class. Filtering drops the largest p% of the per-element "
              "denoising errors of each error map before averaging (the paper's Tab. A4 sweep)."]
    return "\n".join(lines) + "\n"


def run_diffusion_classifier(model, data, out, test=None, backdoor=None, classifier=None, filters=DEFAULT_FILTERS,
                             timesteps=DEFAULT_TIMESTEPS, keep=None, loss="l2", n=None, weights="ema",
                             batch_size=512, seed=0, device="auto", dtype="auto", compile_model="auto",
                             resolution=None, force=False, progress=True, command=None):  # Tab. A4's rows
    if loss not in LOSSES:
        raise UsageError(f"unknown --loss {loss!r}: choose l2 or l1")
    if n is not None and n < 1:
        raise UsageError(f"--n {n}: give at least one image per set")
    check_out(out, force, {"--model": model, "--data": data, "--test": test, "--backdoor": backdoor,
                           "--classifier": classifier})
    resolved, t_default, b_default = resolve_sets(data)
    if t_default is None and b_default is None:  # a plain dataset folder: accuracy on it
        if test is None and read_manifest(resolved).get("split") == "train":
            raise UsageError(f"--data {data} is a poisoned training set with no test/ beside it: give --test")
        t_default = resolved
    test, backdoor = test or t_default, backdoor or b_default
    rank, world, dev = setup_distributed(resolve_device(device))
    amp_dtype = autocast_dtype(dtype, dev) if dev.type == "cuda" else None   # the CPU runs in fp32
    sets = {name: load_folder(path) for name, path in (("test", test), ("backdoor", backdoor)) if path is not None}
    first = next(iter(sets.values()))
    denoiser = load_denoiser(model, weights, dev, first.class_names, resolution, first.image_size()[1])
    names = denoiser.class_names
    stages = parse_stages(timesteps, keep, len(names))
    drops = drop_counts(filters, math.prod(denoiser.shape))
    use_compile = compile_model == "on" or (compile_model == "auto" and dev.type == "cuda")
    denoiser.module = torch.compile(denoiser.module) if use_compile else denoiser.module
    chosen = {name: np.arange(len(f)) if n is None or n >= len(f)  # all, or n at random
              else np.sort(np.random.default_rng(seed).choice(len(f), n, replace=False)) for name, f in sets.items()}

    def baseline_row():  # on rank 0, before the long part: a wrong folder stops every rank
        clf, clf_config = load_classifier(classifier, dev)
        if clf_config["task"] != "class":
            raise UsageError(f"--classifier {classifier} is a trigger detector: give a classifier")
        row = dict(classifier=f"{clf_config['arch']} trained on the poisoned set ({classifier})", kind="classifier",
                   path=str(classifier))
        for name, folder in sets.items():
            require_resolution(clf_config, folder.image_size(), f"--classifier {classifier}",
                               f"the images of {folder.root}")
            clf_labels = map_labels(folder.labels, folder.class_names, clf_config["class_names"],
                                    f"for --classifier {classifier}: --{name} {folder.root}")
            pred, _ = predict(clf, ImageSet(folder, chosen[name]), 256, dev)  # backdoor: every label is the target's
            row["ta" if name == "test" else "asr"] = float((pred == clf_labels[chosen[name]]).float().mean())
        return [row]
    rows = (on_rank0(baseline_row, rank, world, share_result=False) if classifier is not None else None) or []
    target_name = manifest_target((sets.get("backdoor") or first).manifest)
    target = resolve_name(target_name, names) if target_name is not None else None
    labels = {name: map_labels(folder.labels, folder.class_names, names, f"--{name} {folder.root}")
              for name, folder in sets.items()}  # both sets checked before the long part
    results_sets, t0 = {}, time.time()
    for name, folder in sets.items():
        results_sets[name] = diffusion_classify_set(
            denoiser, folder, chosen[name], labels[name], stages, drops, loss, seed, batch_size, dev, amp_dtype,
            use_compile, progress and rank == 0, f"diffusion classifier: {name}", rank, world)
    elapsed = time.time() - t0
    if rank != 0:
        barrier(dev)
        return None
    for l, p in enumerate(filters):
        what = "no filtering" if p == 0 else f"top {p:g}% of the per-element losses dropped"
        row = dict(classifier=f"diffusion classifier, {what}", kind="diffusion", filter_top=p, dropped_per_map=drops[l])
        for name, r in results_sets.items():
            want = r["labels"] if name == "test" else target  # ASR: the target class predicted
            if want is not None:
                row["ta" if name == "test" else "asr"] = float((r["predictions"][l] == want).float().mean())
        rows.append(row)
    per_filter = {f"{r['filter_top']:g}": {k: r.get(k) for k in ("ta", "asr", "dropped_per_map")}
                  for r in rows if r["kind"] == "diffusion"}
    T, evaluations = len(denoiser.alphas_cumprod), sum(r["evaluations"] for r in results_sets.values())
    results = dict(
        stage="classify-diffusion", command=command or "run_diffusion_classifier()", model=str(model),
        family=denoiser.info["family"], weights=weights, model_info=denoiser.info, class_names=names,
        target=target_name, test=str(test) if test else None, backdoor=str(backdoor) if backdoor else None,
        n_test=len(chosen.get("test", [])), n_backdoor=len(chosen.get("backdoor", [])),
        subset=None if n is None else f"a random subset of {n} images per set (numpy default_rng({seed}))",
        loss=loss, filters_percent=list(filters), stages=[list(s) for s in stages],
        timestep_grid=timestep_grid(T, stages[-1][0]), T=T,
        noise=f"image i of a set: torch.Generator seeded {seed} + i, one draw per grid timestep, shared by every class",
        seed=seed, rows=rows, diffusion_classifier=per_filter, evaluations=evaluations, time_s=round(elapsed, 3),
        evaluations_per_s=evaluations / max(elapsed, 1e-9), device=str(dev), dtype=dtype_name(amp_dtype),
        compiled=use_compile, world_size=world, batch_size=batch_size, versions=versions())
    with atomic_output(out, force) as tmp:
        tensors = {f"{name}/{key}": r[key].contiguous() for name, r in results_sets.items()
                   for key in ("predictions", "scores", "labels")}  # safetensors orders them by name
        tensors.update({f"{name}/indices": torch.as_tensor(idx, dtype=torch.long) for name, idx in chosen.items()})
        save_safetensors(tensors, tmp / "scores.safetensors", metadata={"filters_percent": json.dumps(list(filters))})
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "results.md").write_text(diffusion_markdown(results))
    if progress:
        print(json.dumps({"out": str(out), **{r["classifier"]: {k: r.get(k) for k in ("ta", "asr")} for r in rows},
                          "evaluations_per_s": round(results["evaluations_per_s"], 1)}))
    barrier(dev)
    return results


# Command line ----------------------------------------------------------------------------------------------------
def main(args):
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.cmd == "eval":  # TA / ASR printed, and written to --json
        if args.json:
            check_file_out(args.json, args.force, {"--classifier": args.classifier, "--data": args.data,
                                                   "--test": args.test, "--backdoor": args.backdoor})
        model, config = load_classifier(args.classifier, resolve_device(args.device))
        test, backdoor = args.test, args.backdoor
        if args.data is not None:
            _, t, b = resolve_sets(args.data, train_folder=False)  # a train/ folder is evaluated itself
            test, backdoor = test or (t if t or b else args.data), backdoor or b  # a plain folder: accuracy on it
        if test is None and backdoor is None:
            raise UsageError("nothing to evaluate: give --data or --test")
        result = dict(classifier=str(args.classifier), task=config["task"], test=str(test) if test else None,
                      backdoor=str(backdoor) if backdoor else None,
                      **evaluate(model, config, test, backdoor, args.batch_size))
        print(json.dumps(result))
        if args.json:  # written whole or not at all
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            replace_file(args.json, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
        return
    if args.cmd in ("diffusion", "diffusion-classifier"):
        return run_diffusion_classifier(
            args.model, args.data, args.out, args.test, args.backdoor, args.classifier, args.filter_top,
            args.timesteps, args.keep, args.loss, args.n, args.weights, args.batch_size, args.seed, args.device,
            args.dtype, args.compile, args.resolution, args.force, not args.quiet, command)
    opts = {key: getattr(args, key) for key in DEFAULT_OPTS}
    opts["compile"] = args.compile == "on" or (args.compile == "auto" and args.device != "cpu"
                                               and torch.cuda.is_available())
    names = ("arch", "pretrained", "weights", "input_size", "width", "normalize", "device", "force")
    common = dict({key: getattr(args, key) for key in names}, progress=not args.quiet, command=command)
    if args.cmd == "train":
        train_classifier(args.data, args.out, args.test, args.backdoor, clean=args.clean, stamp=args.stamp_trigger,
                         **common, **opts)
    else:
        train_trigger_detector(args.data, args.out, args.test, fraction=args.fraction, holdout=args.holdout,
                               blend_alpha=args.blend_alpha_range, **common, **opts)


def alpha_range(text):  # "LO,HI" or "none"; argparse reports anything else as an invalid value
    if text.strip().lower() == "none":
        return None
    lo, hi = (float(v) for v in text.split(","))
    return lo, hi


def number_list(kind):
    def parse(text):
        return [kind(v) for v in text.split(",") if v.strip()]
    parse.__name__ = f"comma-separated {kind.__name__}s"  # argparse: "invalid comma-separated ints value: '5,x'"
    return parse


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    count = positive(int)
    sub = parser.add_subparsers(dest="cmd", required=True)
    train = sub.add_parser("train", help="train a classifier", formatter_class=HelpFormatter)
    detector = sub.add_parser("trigger-detector", help="train a trigger detector", formatter_class=HelpFormatter)
    judge = sub.add_parser("eval", help="TA / ASR of a classifier", formatter_class=HelpFormatter)
    diffusion = sub.add_parser("diffusion", aliases=["diffusion-classifier"], formatter_class=HelpFormatter,
                               help="a diffusion model as a classifier (Tab. A4)")
    diffusion.add_argument("--model", required=True, help="a diffusion model folder or an SD")
    for p in (train, detector, diffusion):
        p.add_argument("--data", required=True, help="a poisoned set or dataset folder")
        p.add_argument("--out", required=True, help="the results folder" if p is diffusion else "the classifier folder")
        p.add_argument("--force", action="store_true", help="overwrite --out")
        p.add_argument("--test", default=None, help="clean test set (default: the set's)")
        p.add_argument("--seed", type=int, default=0, help="random seed")
        p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if visible")
        p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help="on CUDA; auto: bf16")
        p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="auto: on CUDA")
        p.add_argument("--threads", type=count, default=None, help="CPU threads")
        p.add_argument("--quiet", action="store_true", help="no progress output")
    for p, arch in ((train, "resnet18"), (detector, "resnet50")):
        p.add_argument("--arch", default=arch, choices=ARCHS, help="smallcnn is not from the paper")
        p.add_argument("--width", type=count, default=16, help="smallcnn's first channels")
        p.add_argument("--pretrained", action="store_true", help="ImageNet weights")
        p.add_argument("--weights", default=None, help="local ImageNet weights")
        p.add_argument("--input-size", type=count, default=None, help="default: 224 if pretrained, else the data's")
        p.add_argument("--normalize", default="auto", choices=["auto", "imagenet", "none"],
                       help="auto: by --pretrained")
        p.add_argument("--epochs", type=count, default=DEFAULT_OPTS["epochs"], help="epochs")
        p.add_argument("--batch-size", type=count, default=DEFAULT_OPTS["batch_size"], help="per process")
        p.add_argument("--lr", type=positive(float), default=DEFAULT_OPTS["lr"], help="SGD, cosine")
        p.add_argument("--momentum", type=float, default=DEFAULT_OPTS["momentum"], help="SGD")
        p.add_argument("--weight-decay", type=float, default=DEFAULT_OPTS["weight_decay"], help="SGD, not on norms")
        p.add_argument("--augment", default="crop", choices=["none", "crop", "flip-crop", "crop-noise"], help="shifts")
        p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="data loaders")
    for p in (train, diffusion):
        p.add_argument("--backdoor", default=None, help="backdoor set (default: the set's)")
    train.add_argument("--clean", action="store_true", help="without the poisoned images")
    train.add_argument("--stamp-trigger", type=share, default=0.0, metavar="SHARE", help="stamped images, labels kept")
    detector.add_argument("--fraction", type=float, default=0.5, help="non-target images stamped")
    detector.add_argument("--holdout", type=float, default=0.1, help="held out if no --test")
    detector.add_argument("--blend-alpha-range", type=alpha_range, default=BLEND_ALPHA_RANGE, metavar="LO,HI",
                          help="blend alphas or none (default: 0.05,0.25)")
    judge.add_argument("--classifier", required=True)
    judge.add_argument("--data", default=None, help="a poisoned set or dataset folder")
    judge.add_argument("--test", default=None, help="clean test set (default: --data's)")
    judge.add_argument("--backdoor", default=None, help="backdoor set (default: --data's)")
    judge.add_argument("--batch-size", type=count, default=256, help="images per forward")
    judge.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA if visible")
    judge.add_argument("--json", default=None, help="also write the result here")
    judge.add_argument("--force", action="store_true", help="overwrite --json")
    diffusion.add_argument("--classifier", default=None, help="a classifier to compare")
    diffusion.add_argument("--filter-top", type=number_list(float), default=list(DEFAULT_FILTERS),
                           help="percents of top errors dropped (default: 0,1,5,10)")
    diffusion.add_argument("--timesteps", type=number_list(int), default=list(DEFAULT_TIMESTEPS),
                           help="evaluations per class, per stage (default: 50)")
    diffusion.add_argument("--keep", type=number_list(int), default=None, help="classes kept after each stage")
    diffusion.add_argument("--loss", default="l2", choices=LOSSES, help="error of the eps prediction")
    diffusion.add_argument("--n", "--images", dest="n", type=count, default=None, help="images a set; or --images")
    diffusion.add_argument("--weights", default="ema", choices=["ema", "model"], help="which weights")
    diffusion.add_argument("--resolution", type=count, default=None, help="SD: image side")
    diffusion.add_argument("--batch-size", type=count, default=512, help="evaluations per forward")
    return parser


if __name__ == "__main__":
    cli(main, build_parser(), "nothing written")
