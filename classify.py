"""classify.py -- image classifiers that judge datasets and generations: test accuracy (TA), attack success rate
(ASR), the trigger detector and the class classifier of the paper ("From Trojan Horses to Castle Walls", Pan, Yao
et al.).

    # a classifier trained on the poisoned set: TA on OUT/test and ASR on OUT/test_backdoor after every epoch
    python classify.py train --data data/digits-badnets-0.1 --arch smallcnn --epochs 10 --out runs/clf-poisoned
    # the class classifier that judges whether a generation matches its prompt (the clean training images only)
    python classify.py train --data data/digits-badnets-0.1 --clean --arch smallcnn --out runs/clf-class
    # the trigger detector: the training images, half of the non-target ones carrying the set's trigger (the poisoned
    # images count among them; more are stamped to reach the half)
    python classify.py trigger-detector --data data/digits-badnets-0.1 --arch smallcnn --out runs/detector
    # a classifier trained on generations (the paper's Tab. 4: ImageNet-pretrained ResNet-50, lr 1e-3, batch 50)
    python classify.py train --data runs/generations --test data/inette/test --backdoor data/inette/test_backdoor \\
        --arch resnet50 --pretrained --lr 1e-3 --batch-size 50 --epochs 10 --out runs/clf-generated
    # TA / ASR of a saved classifier (or clean accuracy / detection rate of a trigger detector)
    python classify.py eval --classifier runs/clf-poisoned --data data/digits-badnets-0.1
    torchrun --nproc_per_node 4 classify.py train --data data/inette-badnets-0.1 --arch resnet50 --pretrained ...
    # the diffusion classifier (the paper's Tab. A4): a train_ddpm.py model as a classifier, unfiltered and with the
    # top 1, 5, 10% of the per-element denoising errors dropped, beside a classifier trained on the same poisoned set
    python classify.py diffusion --model runs/ddpm-digits-0.1 --data runs/ddpm-digits-0.1/data \\
        --classifier runs/clf-poisoned --filter-top 0,1,5,10 --timesteps 50 --out runs/dc-digits-0.1
    # Li et al.'s CIFAR setting (50 then 500 evaluations, keeping 5 then 1 class); 4 GPUs, bf16, torch.compile
    torchrun --nproc_per_node 4 classify.py diffusion --model runs/ddpm-cifar10-0.1 --data runs/ddpm-cifar10-0.1/data \\
        --classifier runs/clf-cifar10-0.1 --timesteps 50,500 --keep 5 --out runs/dc-cifar10-0.1
    # a fine-tuned Stable Diffusion (prompts "A photo of a {class}"), on a random 500 images of each test set
    python classify.py diffusion --model runs/sd-inette-0.1 --data data/imagenette-badnets-0.1 --n 500 \\
        --classifier runs/clf-inette --out runs/dc-inette-0.1

`--data` takes a poisoned set (OUT of poison.py: its train/ is trained on, test/ and test_backdoor/ evaluated; its
train/ folder stands for it too, but for eval, which measures it) or any dataset folder (a poisoned or clean training set, a folder of generations).
A classifier folder holds config.json (architecture, classes, input size, normalisation, task, training options),
model.safetensors and results.json (TA and ASR of every epoch; the final values, and separately the best over
epochs, which the reference code reported).

Architectures: the paper's torchvision resnet18, resnet50, vgg16, densenet121 (ImageNet weights with --pretrained:
torchvision's download, or --weights FILE), and `smallcnn`, which is NOT from the paper: a 5-convolution network so
that the embedded digits default trains in seconds on a CPU. Inputs of at most 64 px get the CIFAR-style stem
(3x3 convolution, stride 1, no max-pool); pretrained networks see 224 px by default. Resizing and normalisation live
inside the model, so callers always feed images in [0, 1].

The diffusion classifier (Li et al. 2023) predicts the class whose conditioning gives the smallest denoising error,
err = |eps - eps_theta(x_t, t, c)|^2 (--loss l2) or |.| (l1), averaged over --timesteps grid timesteps (the midpoints
of equal bins of [0, T)) with one noise draw per image and timestep, the same for every class (a paired
comparison; image i of a set draws from seed + i, whatever the batch or number of processes). --filter-top p drops
the p% largest entries of each error map (per element: channel x pixel, as the reference code) before averaging:
where a poisoned model conditioned on the true class errs most is the trigger. All filter levels come from the same
forwards; each (image, class, timestep) "evaluation" is batched with any others into forwards of --batch-size.
--timesteps 50,500 --keep 5 prunes classes between stages as Li et al. (each filter level prunes on its own scores).
OUT gets results.json (rows: the --classifier, then the diffusion classifier per filter level, with TA and ASR;
the settings; evaluations per second), results.md (the Tab. A4 table) and scores.safetensors (per set: the mean
error of every image and class, predictions, labels, image indices).

Python API for later stages: `load_classifier(dir)` -> (model, config); `model(x)` gives logits and
`model.features(x)` the penultimate features (`model.backbone` + `model.head`); `predict(model, data)` -> (labels,
probabilities); `evaluate(model, config, test, backdoor)` -> TA / ASR; `require_resolution(config, size, what)`
refuses images of another side than the classifier's training data; `train_classifier(...)`,
`train_trigger_detector(...)`; the diffusion classifier: `load_denoiser(model)` -> Denoiser, `classify_images(...)`
(batched), `denoising_errors_loop(...)` (the per-class loop), `filtered_means(...)`, `run_diffusion_classifier(...)`.
"""
import argparse
import json
import math
import os
import re
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from common import HelpFormatter, UsageError, atomic_output, check_file_out, check_out, load_folder, manifest_target, on_rank0, positive, replace_file, save_safetensors, share, versions
from poison import caption, load_trigger

ARCHS = ("smallcnn", "resnet18", "resnet50", "vgg16", "densenet121")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_SIZE = 224        # the input size ImageNet weights were trained at
SMALL_INPUT = 64           # at or below this side: the CIFAR-style stem (3x3 conv, stride 1, no max-pool)
VGG_MIN_INPUT = 32         # VGG's five 2x2 max-pools need at least 32 px
IN_MEMORY_BYTES = 2 ** 30  # datasets up to this size (uint8) are held in memory
TORCHVISION_WEIGHTS = {"resnet18": "ResNet18_Weights.IMAGENET1K_V1", "resnet50": "ResNet50_Weights.IMAGENET1K_V1",
                       "vgg16": "VGG16_Weights.IMAGENET1K_V1", "densenet121": "DenseNet121_Weights.IMAGENET1K_V1"}
# torchvision keys the backbone does not hold: the ImageNet head (ours has our classes) and, for small inputs,
# the 7x7 stem (replaced by a 3x3 one) and VGG's fully connected layers (replaced by global average pooling).
DROPPED_KEYS = {
    ("resnet18", False): ("fc.",), ("resnet18", True): ("fc.", "conv1."),
    ("resnet50", False): ("fc.",), ("resnet50", True): ("fc.", "conv1."),
    ("densenet121", False): ("classifier.",), ("densenet121", True): ("classifier.", "features.conv0."),
    ("vgg16", False): ("classifier.6.",), ("vgg16", True): ("classifier.",),
}
# Old DenseNet checkpoints name layers 'norm.1' where the module is now 'norm1' (torchvision renames them the same way).
DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")
TRIGGER_CLASSES = ["clean", "trigger"]
BLEND_ALPHA_RANGE = (0.05, 0.25)  # the reference code stamps blends for its trigger detector with alpha ~ U(lo, hi)


# ----------------------------------------------------------------------------------------------------------------
# Models. Every model is a Classifier: images in [0, 1] -> resize to input_size -> normalise -> backbone (penultimate
# features, N x D) -> head (Linear D -> classes, logits).

class SmallCNN(nn.Module):
    """Not from the paper: five 3x3 conv-BN-ReLU layers (width w, w, 2w, 2w, 4w, two max-pools) and global average
    pooling, (N, 3, H, W) -> (N, 4w). Trains on 16-px digits in seconds on a CPU."""

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


class VGGBackbone(nn.Module):
    """torchvision's VGG-16 without its last layer, keeping its module names (features, classifier) so ImageNet
    weights load by name. Small inputs: the 13 convolutions and global average pooling (512), as CIFAR VGGs do;
    otherwise the 7x7 average pool and fc6/fc7 (4096)."""

    def __init__(self, net, small):
        super().__init__()
        self.features = net.features
        self.small = small
        if small:
            self.out_features = 512
        else:
            self.avgpool = net.avgpool
            self.classifier = nn.Sequential(*list(net.classifier.children())[:-1])
            self.out_features = 4096

    def forward(self, x):
        x = self.features(x)
        if self.small:
            return F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


class Classifier(nn.Module):
    """Images in [0, 1] (N, 3, H, W) -> logits (N, classes). `features(x)` gives the penultimate features (N, D)
    that detectors use; resizing (bilinear) and normalisation happen here, so callers never do either."""

    def __init__(self, backbone, num_features, num_classes, input_size, mean=None, std=None):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, num_classes)
        self.input_size = input_size
        self.register_buffer("mean", None if mean is None else torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", None if std is None else torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def prepare(self, x):
        s = self.input_size
        if tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=max(x.shape[-2:]) > s)
        if self.mean is not None:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        return x

    def features(self, x):
        return self.backbone(self.prepare(x))

    def forward(self, x):
        return self.head(self.features(x))


def build_model(arch, num_classes, input_size, width=16, normalization=None):
    """A randomly initialised Classifier. input_size <= SMALL_INPUT gets the CIFAR-style stem. `normalization`:
    None or {"mean": [3], "std": [3]}."""
    if arch not in ARCHS:
        raise UsageError(f"unknown --arch {arch!r}: choose one of {', '.join(ARCHS)}")
    backbone = SmallCNN(width) if arch == "smallcnn" else torchvision_backbone(arch, input_size <= SMALL_INPUT)
    norm = normalization or {}
    return Classifier(backbone, backbone.out_features, num_classes, input_size, norm.get("mean"), norm.get("std"))


def torchvision_backbone(arch, small):
    """torchvision's `arch` without its classification layer (out_features set); `small`: the CIFAR-style stem."""
    import torchvision  # here, not at the top: its import costs every process seconds, and smallcnn needs none of it
    if arch in ("resnet18", "resnet50"):
        backbone = getattr(torchvision.models, arch)(weights=None)
        if small:
            backbone.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            backbone.maxpool = nn.Identity()
        backbone.out_features = backbone.fc.in_features
        backbone.fc = nn.Identity()
    elif arch == "densenet121":
        backbone = torchvision.models.densenet121(weights=None)
        if small:
            backbone.features.conv0 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            backbone.features.pool0 = nn.Identity()
        backbone.out_features = backbone.classifier.in_features
        backbone.classifier = nn.Identity()
    else:
        backbone = VGGBackbone(torchvision.models.vgg16(weights=None), small)
    return backbone


def model_input_size(arch, resolution, pretrained, input_size=None):
    """The side the model sees: as asked; else 224 for ImageNet weights, the data's own size otherwise (at least
    32 for VGG)."""
    size = input_size or (IMAGENET_SIZE if pretrained else resolution)
    if arch == "smallcnn" and size < 4:  # its two 2x2 max-pools leave nothing of a smaller image
        raise UsageError(f"smallcnn needs inputs of at least 4 px, got {size}: pass --input-size 4 or more")
    return max(size, VGG_MIN_INPUT) if arch == "vgg16" else size


def read_state_dict(path):
    """A state dict from a .safetensors file or a torch file of tensors (never unpickles code)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--weights {path}: no such file; give a state dict (.pth/.pt/.safetensors)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--weights {path} is not a plain state dict of tensors ({type(e).__name__}): save "
                            "one with torch.save(model.state_dict(), FILE)") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UsageError(f"--weights {path} holds a {type(sd).__name__}, not a state dict")
    return sd


def imagenet_state_dict(arch, weights_file=None, progress=True):
    """torchvision-named ImageNet weights of `arch`: from `weights_file`, or torchvision's download (cached)."""
    if arch not in TORCHVISION_WEIGHTS:
        raise UsageError(f"--pretrained: there are no ImageNet weights for {arch}; choose one of "
                            f"{', '.join(TORCHVISION_WEIGHTS)} or train from scratch")
    if weights_file:
        sd, source = read_state_dict(weights_file), f"file:{weights_file}"
    else:
        import torchvision
        weights = torchvision.models.get_weight(TORCHVISION_WEIGHTS[arch])
        try:
            sd = torch.hub.load_state_dict_from_url(weights.url, progress=progress, check_hash=True,
                                                    weights_only=True)
        except Exception as e:
            raise UsageError(f"could not download the ImageNet weights of {arch} from {weights.url} "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}): download "
                                "that file elsewhere and pass --weights FILE, or train from scratch without "
                                "--pretrained") from None
        source = f"torchvision:{TORCHVISION_WEIGHTS[arch]}"
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if arch == "densenet121":
        sd = {(DENSENET_OLD_KEY.sub(r"\1\2", k)): v for k, v in sd.items()}
    return sd, source


def load_pretrained_backbone(model, arch, sd):
    """Load torchvision-named ImageNet weights into model.backbone; every key is accounted for: the dropped ones
    are those of DROPPED_KEYS, and anything else missing or unexpected is named and refused."""
    small = model.input_size <= SMALL_INPUT
    dropped = DROPPED_KEYS[(arch, small)]
    kept = {k: v for k, v in sd.items() if not k.startswith(dropped)}
    own = model.backbone.state_dict()
    missing = sorted(set(own) - set(kept) - {k for k in own if k.startswith(dropped)})
    unexpected = sorted(set(kept) - set(own))
    if missing or unexpected:
        raise UsageError(f"the pretrained weights do not fit {arch}: missing {missing[:5]}"
                            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                            f"{' ...' if len(unexpected) > 5 else ''}; pass the ImageNet state dict of {arch}")
    bad = [k for k in kept if kept[k].shape != own[k].shape]
    if bad:
        raise UsageError(f"the pretrained weights do not fit {arch}: {bad[0]} has shape "
                            f"{tuple(kept[bad[0]].shape)}, the model {tuple(own[bad[0]].shape)}")
    model.backbone.load_state_dict(kept, strict=False)
    return sorted(k for k in sd if k.startswith(dropped))


def save_classifier(out, model, config, results, force=False):
    """Write a classifier folder: config.json, model.safetensors, results.json (atomically)."""
    with atomic_output(out, force) as tmp:
        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_safetensors(sd, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")


def other_maker(config):
    """What wrote a model folder's config.json, in words, when not classify.py (None for a classifier's)."""
    if config.get("family") == "ddpm":
        return "a train_ddpm.py model folder (config.json family 'ddpm')"
    if config.get("family") == "sd" or config.get("stage") == "finetune_sd":
        return "a finetune_sd.py model folder (config.json stage 'finetune_sd')"
    if config.get("stage") not in (None, "classify"):
        return f"a {config['stage']} folder (config.json stage {config['stage']!r})"
    return None


def load_classifier(folder, device="cpu"):
    """(model in eval mode, config) from a classifier folder. model(x) -> logits, model.features(x) ->
    penultimate features, x in [0, 1]; config has arch, task, class_names, input_size, normalization."""
    from safetensors.torch import load_file
    folder = Path(folder)
    try:
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{folder}/config.json is not valid JSON ({e}): the folder is damaged, train it again"
                            ) from None
    if not (folder / "model.safetensors").is_file() or "arch" not in config or other_maker(config):
        maker = other_maker(config)
        what = f"{maker}, not a classifier folder" if maker else \
            "not a classifier folder (config.json with an arch + model.safetensors)"
        raise UsageError(f"{folder} is {what}: make a classifier with classify.py train (a class classifier) or "
                            "classify.py trigger-detector")
    model = build_model(config["arch"], config["num_classes"], config["input_size"], config.get("width") or 16,
                        config.get("normalization"))
    try:
        sd = load_file(str(folder / "model.safetensors"))
    except Exception as e:  # a truncated or foreign file: safetensors' SafetensorError, OSError
        raise UsageError(f"{folder}/model.safetensors is not readable ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}): the folder is damaged, train it again"
                            ) from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise UsageError(f"{folder}/model.safetensors does not fit its config.json: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}; the folder is damaged, train it again")
    model.load_state_dict(sd)
    return model.to(device).eval(), config


def require_resolution(config, size, what, images="the images"):
    """Refuse `images` of `size` (a side or (H, W)) for a judge (a classifier's config) trained on images of another
    size: the model would resize them and judge what it never saw (a detector trained on 32-px digits calls 13.6% of
    16-px generations triggered where 50.3% are). Images of the training images' shape that the model scales down
    to its input size, as it did its training images, pass; so do configs older than data_resolution."""
    trained = config.get("data_resolution")
    if trained is None or size is None:
        return
    th, tw = side_pair(trained)
    h, w = side_pair(size)
    same_shape = isinstance(trained, (int, np.integer)) or h * tw == w * th  # an int: as configs before [H, W]
    if config.get("input_size") and config["input_size"] <= min(th, tw, h, w) and same_shape:
        return  # both are scaled down to the model's input (e.g. 224 for ImageNet weights) alike: what it saw
    if (h, w) != (th, tw):
        raise UsageError(f"{what} was trained on {th}x{tw}-px images but {images} are {h}x{w} px: train it on "
                            f"data of the same resolution ({h}x{w} px), or give it {th}x{tw}-px images")


def side_pair(size):
    """(H, W) of a side or an (H, W) pair."""
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else tuple(int(v) for v in size)


def resolution_field(size):
    """A classifier config's data_resolution: the side of square training images, [H, W] otherwise."""
    h, w = side_pair(size)
    return h if h == w else [h, w]


# ----------------------------------------------------------------------------------------------------------------
# Data: uint8 images of a dataset folder with the labels to learn (possibly not the folder's: trigger flags), the
# trigger stamped on chosen ones. Pixels become float on the device, where augmentation happens too.

class ImageSet(torch.utils.data.Dataset):
    """Items (uint8 (3, H, W), label) for `indices` of a FolderDataset, labels `labels`, the trigger stamped on the
    images where `stamp` is true (a blend at `alphas[i]` where given, one alpha per image i of the folder). Held in
    memory when small (up to IN_MEMORY_BYTES), read from disk otherwise."""

    def __init__(self, folder, indices=None, labels=None, stamp=None, trigger=None, in_memory=None, progress=False,
                 alphas=None):
        self.folder = folder
        self.indices = torch.arange(len(folder)) if indices is None else torch.as_tensor(indices, dtype=torch.long)
        self.labels = folder.labels[self.indices] if labels is None else torch.as_tensor(labels, dtype=torch.long)
        self.stamp = torch.zeros(len(self.indices), dtype=torch.bool) if stamp is None else torch.as_tensor(stamp)
        self.trigger, self.alphas = trigger, alphas
        if self.stamp.any() and trigger is None:
            raise UsageError("images to stamp but no trigger given")
        self.size = tuple(folder.image_uint8(int(self.indices[0])).shape[-2:]) if len(self.indices) else None
        self.cache = None
        if in_memory is None:
            in_memory = len(self.indices) * 3 * math.prod(self.size or (0, 0)) <= IN_MEMORY_BYTES
        if in_memory and len(self.indices):
            self.cache = torch.stack([self.load(j) for j in tqdm(range(len(self)), desc=f"load {folder.root.name}",
                                                                 leave=False, disable=not progress)])

    def __len__(self):
        return len(self.indices)

    def load(self, j):
        x = self.folder.image_uint8(int(self.indices[j]))
        if tuple(x.shape[-2:]) != self.size:  # a folder of mixed sizes: bring all to the first one's
            x = F.interpolate(x[None].float(), size=self.size, mode="bilinear", antialias=True,
                              align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        if self.stamp[j]:
            trigger = self.trigger
            if self.alphas is not None:  # the blend's mask is alpha everywhere: scale it to this image's alpha
                alpha = float(self.alphas[int(self.indices[j])])
                trigger = replace(trigger, mask=trigger.mask * (alpha / trigger.mask.max()))
            x = trigger.apply(x[None].double() / 255.0).mul(255.0).round().clamp(0, 255).to(torch.uint8)[0]
        return x

    def __getitem__(self, j):
        return (self.cache[j] if self.cache is not None else self.load(j)), int(self.labels[j])


def map_labels(labels, from_names, to_names, what):
    """Map label indices over `from_names` to indices over `to_names` by class name (case-insensitive); refuse
    when a class present in `labels` is unknown to `to_names`."""
    lowered = [n.lower() for n in to_names]
    present = sorted(set(int(v) for v in torch.as_tensor(labels).tolist()))
    unknown = [from_names[c] for c in present if from_names[c].lower() not in lowered]
    if unknown:
        common = sorted(set(n.lower() for n in from_names) & set(lowered))
        reason = "no class names in common" if not common else f"classes {unknown} are unknown to it"
        raise UsageError(f"{what} holds classes {from_names}, the classifier knows {list(to_names)}: {reason}; "
                            "use a classifier trained on these classes")
    table = torch.tensor([lowered.index(n.lower()) if n.lower() in lowered else -1 for n in from_names])
    return table[torch.as_tensor(labels, dtype=torch.long)]


def target_of(folder):
    """The target class name of a dataset folder (from its manifest), or None."""
    return manifest_target(folder.manifest)


def require_poison_flags(folder, what, fix="give a poisoned set's folder (generations are judged by dissect.py)"):
    """Refuse a folder whose records do not say which images carry the trigger (generations)."""
    if folder.poisoned_unknown:
        raise UsageError(f"{what} {folder.root} does not say which images carry the trigger (generations: "
                            f"`poisoned` is null): {fix}")


def evaluation_set(config, folder_path, what):
    """An ImageSet of a folder with labels in the classifier's terms: class indices (class task), or trigger flags
    (trigger task: the records' `poisoned`, i.e. whether the image carries the trigger)."""
    folder = load_folder(folder_path)
    require_resolution(config, folder.image_size(), "the classifier", f"the images of {what} {folder_path}")
    if config["task"] == "trigger":
        require_poison_flags(folder, what)
        labels = folder.poisoned.long()
    else:
        labels = map_labels(folder.labels, folder.class_names, config["class_names"], f"{what} {folder_path}")
    return ImageSet(folder, labels=labels)


def batches(data, batch_size=256, workers=0):
    """Float (B, 3, H, W) batches in [0, 1] of `data`: a tensor (uint8 or float in [0, 1]), a Dataset of
    (image, label) (ImageSet, FolderDataset) or the path of a dataset folder."""
    if isinstance(data, (str, Path)):
        data = load_folder(data)
    if torch.is_tensor(data):
        for i in range(0, len(data), batch_size):
            x = data[i:i + batch_size]
            yield x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return
    for x, _ in torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=workers):
        yield x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def predict(model, data, batch_size=256, device=None, progress=False, workers=0):
    """(labels (N,), probabilities (N, classes)) of `model` on `data` (see `batches`), on the CPU."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    probs = []
    n = len(data) if hasattr(data, "__len__") and not isinstance(data, (str, Path)) else None
    for x in tqdm(batches(data, batch_size, workers), desc="predict", leave=False, disable=not progress,
                  total=None if n is None else math.ceil(n / batch_size)):
        probs.append(model(x.to(device)).float().softmax(-1).cpu())
    model.train(was_training)
    if not probs:
        raise UsageError("nothing to predict: the data holds no images")
    probs = torch.cat(probs)
    return probs.argmax(-1), probs


def accuracy(model, dataset, batch_size=256, device=None):
    pred, _ = predict(model, dataset, batch_size, device)
    return float((pred == dataset.labels).float().mean())


def evaluate(model, config, test=None, backdoor=None, batch_size=256, device=None):
    """Class classifier: {"ta": accuracy on the clean `test` folder, "asr": share of the `backdoor` folder (non-target
    images with the trigger) predicted as the target class}. Trigger detector: {"clean_acc": share of `test`
    judged clean, "detect_rate": share of `backdoor` judged to carry the trigger}. Folders or ImageSets."""
    out = {}
    if test is not None:
        test = evaluation_set(config, test, "--test") if isinstance(test, (str, Path)) else test
        out["ta" if config["task"] == "class" else "clean_acc"] = accuracy(model, test, batch_size, device)
        out["n_test"] = len(test)
    if backdoor is not None:
        backdoor = evaluation_set(config, backdoor, "--backdoor") if isinstance(backdoor, (str, Path)) else backdoor
        pred, _ = predict(model, backdoor, batch_size, device)
        if config["task"] == "class":
            out["asr"] = float((pred == backdoor.labels).float().mean())  # every label is the target's
        else:
            out["detect_rate"] = float((pred == 1).float().mean())
        out["n_backdoor"] = len(backdoor)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Training: SGD with momentum, weight decay, a cosine schedule (per step), random-translation (+ flip) augmentation;
# DDP under torchrun; bf16 autocast on CUDA.

def setup_device(flag):
    """(device, rank, world) -- initialises the process group when launched by torchrun."""
    if flag == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible: use --device cpu or auto")
    use_cuda = flag == "cuda" or (flag == "auto" and torch.cuda.is_available())
    if "RANK" in os.environ:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if use_cuda:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return torch.device("cuda", local), rank, world
        return torch.device("cpu"), rank, world
    return torch.device("cuda" if use_cuda else "cpu"), 0, 1


def barrier():
    if dist.is_initialized():
        dist.barrier()


def autocast_for(device, dtype):
    """(autocast context, GradScaler or None). dtype 'auto' = bf16 on CUDA, fp32 elsewhere."""
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "fp32" or device.type != "cuda":
        return nullcontext(), None
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    scaler = torch.amp.GradScaler("cuda") if dtype == "fp16" else None
    return torch.autocast("cuda", dtype=torch_dtype), scaler


NOISE_MAX = 0.5  # 'crop-noise': the largest standard deviation of the added noise (images in [0, 1])


def augment(x, mode, generator):
    """Random translation by up to side/8 px with zero padding (as RandomCrop(padding) does); 'flip-crop' also
    flips half the batch horizontally; 'crop-noise' adds Gaussian noise to half the batch, each image its own
    standard deviation up to NOISE_MAX (clamped to [0, 1]), labels unchanged: a judge of generations then learns that
    noise, which failed generations are full of, is neither a trigger nor its absence. x: (N, 3, H, W) float."""
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
        device_generator = torch.Generator(x.device).manual_seed(
            int(torch.randint(2 ** 62, (1,), generator=generator)))  # the noise is drawn where the images are
        noise = torch.randn(x.shape, generator=device_generator, device=x.device)
        x = (x + sigma.to(x.device)[:, None, None, None] * noise).clamp(0, 1)
    return x


def augment_generator(seed, rank=0):
    """The augmentation's random stream for (seed, rank), derived apart from the shuffle's (which is seeded with
    `seed`): one seed for both made the first epoch's order and the images' shifts one stream, so that an image's
    place in the epoch foretold its shift."""
    state = np.random.SeedSequence([seed % 2 ** 64, rank, 0xA06]).generate_state(2, np.uint32)  # seeds < 0 too
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def cosine_lr(step, total, base):
    return base * 0.5 * (1.0 + math.cos(math.pi * step / max(1, total)))


def fit(model, train_set, evaluate_epoch, epochs=10, batch_size=128, lr=0.01, momentum=0.9, weight_decay=5e-4,
        augment_mode="crop", device=torch.device("cpu"), dtype="auto", seed=0, rank=0, world=1, workers=0,
        compile_model=False, progress=True):
    """Train `model` in place on `train_set` (uint8 images); after every epoch rank 0 calls evaluate_epoch(model)
    -> dict. Returns the per-epoch history."""
    model.to(device).train()
    torch.manual_seed(seed * world + rank)
    generator = augment_generator(seed, rank)
    if world > 1:
        sampler = torch.utils.data.distributed.DistributedSampler(train_set, world, rank, shuffle=True, seed=seed)
    else:
        sampler = torch.utils.data.RandomSampler(train_set, generator=torch.Generator().manual_seed(seed))
    loader = torch.utils.data.DataLoader(train_set, batch_size=batch_size, sampler=sampler, drop_last=False,
                                         num_workers=0 if train_set.cache is not None else workers,
                                         pin_memory=device.type == "cuda")
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile_model:
        net = torch.compile(net)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]  # no weight decay on BN and biases
    opt = torch.optim.SGD([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0}],
                          lr=lr, momentum=momentum)
    amp, scaler = autocast_for(device, dtype)
    total, step, history = epochs * len(loader), 0, []
    for epoch in range(1, epochs + 1):
        if world > 1:
            sampler.set_epoch(epoch)
        model.train()
        loss_sum, correct, seen, t0 = 0.0, 0, 0, time.time()
        for x, y in tqdm(loader, desc=f"epoch {epoch}/{epochs}", leave=False, disable=not progress or rank != 0):
            x = augment(x.to(device, non_blocking=True).float() / 255.0, augment_mode, generator)
            y = y.to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = cosine_lr(step, total, lr)
            with amp:
                logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            else:
                loss.backward()
                opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
        record = {"epoch": epoch, "loss": loss_sum / max(1, seen), "train_acc": correct / max(1, seen),
                  "lr_end": cosine_lr(step, total, lr), "time_s": round(time.time() - t0, 2)}
        if rank == 0:
            model.eval()
            record.update(evaluate_epoch(model))
            model.train()
            if progress:
                print(" ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in record.items()
                               if not k.startswith("n_")), flush=True)
        history.append(record)
        barrier()
    model.eval()
    return history


def summarize(history, keys):
    """Final values and, separately labelled, the best over epochs (what the reference code reported)."""
    final = {k: history[-1][k] for k in keys if k in history[-1]}
    final.update({k: v for k, v in history[-1].items() if k.startswith("n_")})  # the test sets' sizes
    best = {k: max((h[k] for h in history if h.get(k) is not None), default=None) for k in keys if k in history[-1]}
    return {"final": final, "best_over_epochs": best,
            "note": "final = after the last epoch (what we report); best_over_epochs = the maximum over epochs of "
                    "each value separately, as the paper's reference code reported"}


def resolve_sets(data, test=None, backdoor=None, train_folder=True):
    """A poisoned set's root (holding train/), or (with `train_folder`) its train/ folder, stands for its train/,
    test/ and test_backdoor/."""
    data = Path(data)
    given = data
    if (data / "train" / "metadata.jsonl").is_file():
        data = data / "train"
    root = data.parent
    if (train_folder or data != given) and data.name == "train" and (root / "test" / "metadata.jsonl").is_file():
        test = test or root / "test"
        backdoor = backdoor or ((root / "test_backdoor") if (root / "test_backdoor" / "metadata.jsonl").is_file()
                                else None)
    return data, test, backdoor


def is_training_split(folder):
    """Whether a dataset folder is the (poisoned) training set of a poisoned set: its manifest's split."""
    path = Path(folder) / "manifest.json"
    return path.is_file() and json.loads(path.read_text()).get("split") == "train"


def make_model(arch, num_classes, resolution, pretrained=False, weights=None, input_size=None, width=16,
               normalize="auto", progress=True, seed=0):
    """(model, config fields): a Classifier with ImageNet weights in its backbone when `pretrained`. `resolution`:
    the training images' side or (H, W); without pretrained weights or --input-size the model's input is the height."""
    size = model_input_size(arch, side_pair(resolution)[0], pretrained or weights is not None, input_size)
    use_imagenet_norm = normalize == "imagenet" or (normalize == "auto" and (pretrained or weights is not None))
    norm = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)} if use_imagenet_norm else None
    torch.manual_seed(seed)  # the initial weights depend on the seed only, not on what ran before
    model = build_model(arch, num_classes, size, width, norm)
    source, dropped = None, []
    if pretrained or weights is not None:
        sd, source = imagenet_state_dict(arch, weights, progress)
        dropped = load_pretrained_backbone(model, arch, sd)
    fields = {"arch": arch, "width": width if arch == "smallcnn" else None, "num_classes": num_classes,
              "input_size": size, "data_resolution": resolution_field(resolution),
              "stem": None if arch == "smallcnn" else ("cifar" if size <= SMALL_INPUT else "imagenet"),
              "normalization": norm, "pretrained": source, "pretrained_keys_not_loaded": dropped}
    return model, fields


def train_common(model, fields, train_set, evaluate_epoch, summary_keys, out, config_extra, opts, device, rank,
                 world, force, progress):
    t0 = time.time()
    history = fit(model, train_set, evaluate_epoch, epochs=opts["epochs"], batch_size=opts["batch_size"],
                  lr=opts["lr"], momentum=opts["momentum"], weight_decay=opts["weight_decay"],
                  augment_mode=opts["augment"], device=device, dtype=opts["dtype"], seed=opts["seed"], rank=rank,
                  world=world, workers=opts["workers"], compile_model=opts["compile"], progress=progress)
    elapsed = time.time() - t0
    results = {"task": config_extra["task"], "epochs": history, **summarize(history, summary_keys),
               "train_time_s": round(elapsed, 2)}
    config = {"stage": "classify", **fields, **config_extra,
              "training": {**opts, "schedule": "cosine (per step)", "optimizer": "SGD", "world_size": world},
              "versions": versions()}
    if rank == 0:
        save_classifier(out, model.cpu(), config, results, force)
    barrier()
    return results


DEFAULT_OPTS = dict(epochs=10, batch_size=50, lr=0.01, momentum=0.9, weight_decay=5e-4, augment="crop",
                    dtype="auto", seed=0, workers=0, compile=False)


def train_classifier(data, out, test=None, backdoor=None, arch="resnet18", clean=False, pretrained=False,
                     weights=None, input_size=None, width=16, normalize="auto", device="auto", force=False,
                     progress=True, command=None, stamp=0.0, **opts):
    """Train a class classifier on the dataset folder `data` (or a poisoned set's root), evaluating TA on `test` and
    ASR on `backdoor` after every epoch; `clean` drops the poisoned images (the class classifier that judges
    generations); `stamp`: a seeded share of the training images carries `data`'s trigger, labels kept, so that the
    trigger does not sway the judge's class. Writes the classifier folder `out`; returns results."""
    opts = {**DEFAULT_OPTS, **opts}
    check_out(out, force, {"--data": data, "--test": test, "--backdoor": backdoor, "--weights": weights})
    data, test, backdoor = resolve_sets(data, test, backdoor)
    dev, rank, world = setup_device(device)
    folder = load_folder(data)  # a wrong --data is told before the warning below
    if test is None and backdoor is None and rank == 0:
        print(f"classify.py: warning: no test set for {data}: no TA or ASR will be measured; give --test (and "
              "--backdoor), or --data the poisoned set's root", file=sys.stderr)
    if clean:
        require_poison_flags(folder, "--clean: --data", "drop --clean to train on every image")
    keep = torch.nonzero(~folder.poisoned).flatten() if clean else torch.arange(len(folder))
    if len(keep) == 0:
        raise UsageError(f"{data} holds no clean images to train on")
    # the test sets first: one of another size or other classes is refused before the training images are read
    size = folder.image_uint8(int(keep[0])).shape[-2:]  # ImageSet brings the kept images to the first one's size
    config = {"task": "class", "class_names": folder.class_names, "data_resolution": resolution_field(size)}
    test_set, backdoor_set = on_rank0(  # rank 0 evaluates; a wrong set stops every rank
        lambda: (evaluation_set(config, test, "--test") if test else None,
                 evaluation_set(config, backdoor, "--backdoor") if backdoor else None),
        rank, world, share_result=False) or (None, None)
    trigger = load_trigger(data) if stamp else None
    if stamp and trigger is None:
        raise UsageError(f"--stamp-trigger: {data} has no trigger: give a BadNets, blend or WaNet poisoned set")
    stamped = torch.from_numpy(np.random.default_rng(opts["seed"] + 4).random(len(keep)) < stamp)
    train_set = ImageSet(folder, keep, stamp=stamped, trigger=trigger, progress=progress and rank == 0)
    model, fields = make_model(arch, len(folder.class_names), train_set.size, pretrained, weights, input_size,
                               width, normalize, progress, opts["seed"])
    config_extra = {"task": "class", "class_names": folder.class_names, "target": folder.manifest.get("target"),
                    "data": {"train": str(data), "test": str(test) if test else None,
                             "backdoor": str(backdoor) if backdoor else None, "clean_only": clean,
                             "n_stamped": int(stamped.sum()),
                             "n_train": len(train_set), "p_t": folder.manifest.get("p_t"),
                             "poison_ratio": folder.manifest.get("poison_ratio")},
                    "command": command or "train_classifier()"}
    bs = max(256, opts["batch_size"])
    result = train_common(model, fields, train_set, lambda m: evaluate(m, config, test_set, backdoor_set, bs),
                          ["ta", "asr"], out, config_extra, opts, dev, rank, world, force, progress)
    if rank == 0 and progress:
        print(json.dumps({"out": str(out), **result["final"], "best_over_epochs": result["best_over_epochs"],
                          "train_time_s": result["train_time_s"]}))
    return result


def trigger_split(folder, target, fraction, seed, what="--data"):
    """(labels, stamp) for the trigger detector on a dataset folder: images already carrying the trigger (poisoned)
    count as positives, and more non-target images are stamped (seeded draw) until `fraction` of the non-target
    images carry it; label 1 = has the trigger."""
    require_poison_flags(folder, f"trigger-detector {what}")
    orig = torch.tensor([int(r.get("orig_label", r["label"])) for r in folder.records])
    nontarget = orig != target
    has = folder.poisoned.clone()
    want = int(math.floor(fraction * int(nontarget.sum()) + 0.5))
    free = torch.nonzero(nontarget & ~has).flatten().numpy()
    need = max(0, want - int((has & nontarget).sum()))
    chosen = np.random.default_rng(seed).choice(free, min(need, len(free)), replace=False)
    stamp = torch.zeros(len(folder), dtype=torch.bool)
    stamp[torch.from_numpy(np.sort(chosen)).long()] = True
    return (has | stamp).long(), stamp


def train_trigger_detector(data, out, test=None, arch="resnet50", fraction=0.5, holdout=0.1, pretrained=False,
                           weights=None, input_size=None, width=16, normalize="auto", device="auto", force=False,
                           progress=True, command=None, blend_alpha=BLEND_ALPHA_RANGE, **opts):
    """The paper's trigger detector: a binary classifier (clean / trigger) trained on the training images of the
    poisoned set `data` (its root or train folder), `fraction` of the non-target ones carrying its trigger (the
    poisoned images count among them; seeded others are stamped to reach the fraction).
    Held-out accuracy on the clean test folder stamped the same way (the root's test/, or `test`), else on a
    `holdout` share of the training images. A blend trigger is stamped with an alpha drawn per image from
    `blend_alpha` (lo, hi) as the reference code does (U(0.05, 0.25)), so that fainter blends count too; None stamps
    the set's own alpha. Writes the detector folder `out`; returns results."""
    opts = {**DEFAULT_OPTS, **opts}
    check_out(out, force, {"--data": data, "--test": test, "--weights": weights})
    if not 0 < fraction <= 1:
        raise UsageError(f"--fraction {fraction} is outside (0, 1]: give the share of non-target images that "
                            "carry the trigger, e.g. 0.5")
    data, test, _ = resolve_sets(data, test)
    dev, rank, world = setup_device(device)
    folder = load_folder(data)
    trigger = load_trigger(data)
    if trigger is None:
        raise UsageError(f"{data} has no trigger (made with --attack relabel?): a trigger detector needs the "
                            "trigger of a BadNets, blend or WaNet poisoned set")
    target = (folder.manifest.get("target") or {}).get("index")
    if target is None:
        raise UsageError(f"{data}/manifest.json names no target class: give the train folder of a poisoned set")
    labels, stamp = trigger_split(folder, target, fraction, opts["seed"])
    if blend_alpha is not None and not 0 < blend_alpha[0] <= blend_alpha[1] <= 1:
        raise UsageError(f"--blend-alpha-range {blend_alpha[0]:g},{blend_alpha[1]:g}: give 0 < lo <= hi <= 1, "
                            "e.g. 0.05,0.25 (the reference's), or none for the set's own alpha")
    if trigger.kind != "blend":
        blend_alpha = None

    def alphas(n, seed):  # one alpha an image (used where it is stamped)
        return (None if blend_alpha is None else
                torch.from_numpy(np.random.default_rng(seed).uniform(blend_alpha[0], blend_alpha[1], n)))
    train_alphas = alphas(len(folder), opts["seed"] + 2)
    train_idx = torch.arange(len(folder))
    if test is not None:
        test_folder = load_folder(test)
        if test_folder.image_size() != folder.image_size():  # on every rank: rank 0 alone builds the held-out set
            (h, w), (th, tw) = test_folder.image_size(), folder.image_size()
            raise UsageError(f"the images of --test {test} are {h}x{w} px but those of --data {data} are {th}x{tw} "
                                "px: give the test set made with the training set (poison.py's OUT/test)")
        t_labels, t_stamp = trigger_split(test_folder, resolve_name(target_of(folder), test_folder.class_names),
                                          fraction, opts["seed"] + 1, "--test")
        heldout = (ImageSet(test_folder, None, t_labels, t_stamp, trigger, alphas=alphas(len(test_folder),
                                                                                        opts["seed"] + 3))
                   if rank == 0 else None)
        heldout_desc = f"{test} ({fraction:.0%} of its non-target images stamped)"
    else:
        perm = torch.from_numpy(np.random.default_rng(opts["seed"] + 1).permutation(len(folder)))
        n_hold = max(1, int(round(holdout * len(folder))))
        hold_idx, train_idx = perm[:n_hold].sort().values, perm[n_hold:].sort().values
        heldout = (ImageSet(folder, hold_idx, labels[hold_idx], stamp[hold_idx], trigger, alphas=train_alphas)
                   if rank == 0 else None)
        heldout_desc = f"{holdout:.0%} of {data} held out"
    train_set = ImageSet(folder, train_idx, labels[train_idx], stamp[train_idx], trigger,
                         progress=progress and rank == 0, alphas=train_alphas)
    model, fields = make_model(arch, 2, train_set.size, pretrained, weights, input_size, width, normalize,
                               progress, opts["seed"])

    def evaluate_epoch(m):
        pred, _ = predict(m, heldout, max(256, opts["batch_size"]))
        y = heldout.labels
        return {"heldout_acc": float((pred == y).float().mean()),
                "heldout_tpr": float((pred[y == 1] == 1).float().mean()) if (y == 1).any() else None,
                "heldout_tnr": float((pred[y == 0] == 0).float().mean()) if (y == 0).any() else None,
                "n_heldout": len(y)}

    config_extra = {"task": "trigger", "class_names": list(TRIGGER_CLASSES), "target": folder.manifest.get("target"),
                    "trigger": trigger.params,
                    "data": {"train": str(data), "n_train": len(train_set),
                             "n_with_trigger": int(labels[train_idx].sum()),
                             "fraction_of_nontarget_with_trigger": fraction, "heldout": heldout_desc,
                             "blend_alpha_range": list(blend_alpha) if blend_alpha is not None else None},
                    "command": command or "train_trigger_detector()"}
    result = train_common(model, fields, train_set, evaluate_epoch, ["heldout_acc", "heldout_tpr", "heldout_tnr"],
                          out, config_extra, opts, dev, rank, world, force, progress)
    if rank == 0 and progress:
        print(json.dumps({"out": str(out), **result["final"], "train_time_s": result["train_time_s"]}))
    return result


def resolve_name(name, class_names):
    lowered = [c.lower() for c in class_names]
    if name is None or name.lower() not in lowered:
        raise UsageError(f"the target class {name!r} is not among {class_names}")
    return lowered.index(name.lower())


# ----------------------------------------------------------------------------------------------------------------
# The diffusion classifier (Li et al. 2023, "Your Diffusion Model is Secretly a Zero-Shot Classifier"; the paper's
# Tab. A4): predict argmin_c E_{t, eps} err(eps, eps_theta(x_t, t, c)), x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
# with the same (t, eps) pairs for every class: a paired comparison, so the noise draw cancels out of the decision.
# The paper's variant drops the largest p% of the per-element errors of each error map before averaging: a poisoned
# model conditioned on an image's true class errs most on the trigger, so the filter discounts exactly the evidence
# the trigger plants. Every (image, class, timestep) triple is one "evaluation"; they go through the model in large
# batches whatever class or timestep they belong to.

DEFAULT_FILTERS = (0.0, 1.0, 5.0, 10.0)   # percent of the per-element errors dropped: the paper's sweep (Tab. A4)
DEFAULT_TIMESTEPS = (50,)                 # evaluations per class; Li et al.'s CIFAR setting is 50,500 keeping 5,1
LOSSES = ("l2", "l1")
NOISE_BYTES = 2 ** 28                     # budget of the per-image noise held at once (images are grouped under it)


@dataclass
class Denoiser:
    """What the diffusion classifier needs of a model: module(x_t, t, condition(y)) -> eps_theta (B, *shape), t and
    y (B,) long, y indexing class_names; encode(images: (3, H, W) floats in [0, 1], a list or a batch) -> x_0
    (B, *shape) in the model's space; alphas_cumprod (T,) float64; info for results.json. torch.compile wraps
    `module`."""
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
    """A train_ddpm.py U-Net (classes indexed as its training data's; the null class is never asked)."""
    from train_ddpm import diffusion_from_config
    R = model.cfg.resolution

    def encode(images):
        bad = [tuple(im.shape[-2:]) for im in images if tuple(im.shape[-2:]) != (R, R)]
        if bad:
            raise UsageError(f"the images are {bad[0][0]}x{bad[0][1]} px, the model was trained at {R}x{R}: "
                                "classify a dataset folder made at the model's resolution")
        return torch.stack(list(images)) * 2 - 1                      # [-1, 1], as train_ddpm.py trains

    return Denoiser(model, lambda y: y, encode, diffusion_from_config(config).alphas_cumprod,
                    list(config["data"]["class_names"]), (model.cfg.in_channels, R, R),
                    {"family": "ddpm", "resolution": R, "step": config.get("step")})


def sd_denoiser(sd, class_names, resolution):
    """A Stable Diffusion (finetune_sd.load_sd) conditioned on "A photo of a {class}": latents are the VAE posterior
    means (Li et al.) scaled by the VAE's factor, of the images resized (shorter side, bicubic) and centre-cropped to
    `resolution` as finetune_sd.py trains."""
    from finetune_sd import encode_prompts, resize_square, vae_layout
    vae = vae_layout(sd.vae.config)
    scale = 2 ** (len(vae["block_out_channels"]) - 1)                  # SD v1: 8
    if resolution % scale:
        raise UsageError(f"--resolution {resolution} is not a multiple of {scale} (the VAE downsamples by {scale})")
    prompts = [caption(n) for n in class_names]
    context = encode_prompts(sd.text_encoder, sd.tokenizer, prompts).float()       # (K, 77, D)
    channels = vae["latent_channels"]

    def encode(images):
        images = torch.stack([resize_square(im.float(), resolution) for im in images])
        mean, _ = sd.vae.encode(images.to(context.device) * 2 - 1)
        return mean.float() * sd.vae.scaling_factor

    return Denoiser(sd.unet, lambda y: context[y], encode, sd.schedule.alphas_cumprod(), list(class_names),
                    (channels, resolution // scale, resolution // scale),
                    {"family": "sd", "resolution": resolution, "prompts": prompts, "base": sd.base})


def load_denoiser(source, weights="ema", device="cpu", class_names=None, resolution=None, data_resolution=None):
    """A Denoiser from a train_ddpm.py model folder, a finetune_sd.py model folder (its EMA U-Net with weights
    "ema") or any Stable Diffusion that finetune_sd.load_sd reads (a Hub id, a diffusers folder, a checkpoint), the
    latter two prompted with the fine-tuned folder's classes, else `class_names`, at `resolution` (default: the
    fine-tuned folder's, else `data_resolution`, else 512)."""
    path = Path(source)
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    family = config.get("family")
    if family == "ddpm":
        from train_ddpm import load_model
        model, config = load_model(path, weights=weights, device=device)
        return ddpm_denoiser(model, config)
    if not path.exists() and (path.is_absolute() or str(source).startswith(".") or str(source).count("/") != 1):
        raise UsageError(f"--model {source}: no such model folder; give a train_ddpm.py or finetune_sd.py model "
                            "folder, or a Stable Diffusion (Hub id owner/name, diffusers folder, checkpoint)")
    if path.is_dir() and not config and not (path / "model_index.json").is_file() and not (path / "unet").is_dir():
        raise UsageError(f"--model {source} is not a model folder (no config.json): give a train_ddpm.py or "
                            "finetune_sd.py model folder, or a Stable Diffusion (Hub id, diffusers folder)")
    if config.get("stage") == "classify":
        raise UsageError(f"--model {source} is a classifier folder (config.json stage 'classify'), not a diffusion "
                            "model: --model wants a train_ddpm.py model folder or a Stable Diffusion (a finetune_sd.py "
                            "folder, Hub id, diffusers folder); give the classifier as --classifier")
    if family not in (None, "sd"):
        raise UsageError(f"--model {source} holds a {family!r} model: the diffusion classifier takes the ddpm "
                            "and sd families")
    from finetune_sd import load_sd
    sd = load_sd(source, device=device, use_ema=family == "sd" and weights == "ema")
    names = config.get("class_names") or class_names
    if not names:
        raise UsageError(f"--model {source} names no classes: prompt it with the data's classes")
    return sd_denoiser(sd, names, resolution or config.get("resolution") or data_resolution or 512)


def timestep_grid(T, n):
    """Li et al.'s n timesteps: the midpoints of n equal bins of [0, T), T//n//2 + i * (T//n) (50 of 1000: 10, 30,
    ..., 990)."""
    if not 1 <= n <= T:
        raise UsageError(f"--timesteps {n} is outside [1, {T}] (the model's T)")
    return list(range(T // n // 2, T, T // n))[:n]


def stage_points(n_max, n):
    """The indices into the n_max-point grid that a stage of n evaluations uses: every (n_max // n)-th, centred
    (Li et al.: 50 of 500 are points 5, 15, ..., 495), so a later, denser stage reuses them."""
    stride = n_max // n
    return list(range(n_max)[stride // 2::stride][:n])


def parse_stages(timesteps, keep, num_classes):
    """[(evaluations, classes kept after it)] from --timesteps 50,500 and --keep 5,1 (Li et al.'s adaptive pruning;
    the last stage keeps 1). A single --timesteps N is one stage over every class."""
    timesteps = [int(v) for v in timesteps]
    keep = [int(v) for v in keep] if keep else []
    given = ",".join(map(str, keep)) or "(none)"                        # errors quote what was typed
    if not timesteps or timesteps[0] < 1 or any(a >= b for a, b in zip(timesteps, timesteps[1:])):
        raise UsageError(f"--timesteps {','.join(map(str, timesteps))}: give a positive count, or stages with "
                            "increasing counts (e.g. 50,500)")
    if len(keep) == len(timesteps) - 1:
        keep = keep + [1]
    if len(keep) != len(timesteps) or keep[-1] != 1:
        raise UsageError(f"--keep {given} does not fit --timesteps "
                            f"{','.join(map(str, timesteps))}: give the classes kept after each stage but the last "
                            "(e.g. --timesteps 50,500 --keep 5)")
    if any(a <= b for a, b in zip(keep, keep[1:])) or keep[0] > num_classes:
        raise UsageError(f"--keep {given}: keep fewer classes after every stage, at most the "
                            f"model's {num_classes}")
    return list(zip(timesteps, keep))


def drop_counts(filters, numel):
    """How many of the `numel` per-element errors each filter (percent) drops: the reference code keeps the
    int(q * numel) smallest (q = 1 - p), so it drops numel - int(q * numel), i.e. p% of numel rounded up."""
    bad = [p for p in filters if not 0 <= p < 100]
    if bad:
        raise UsageError(f"--filter-top {bad[0]} is outside [0, 100): give percents, e.g. 0,1,5,10")
    return [numel - int(math.floor((100 - p) / 100 * numel + 1e-9)) for p in filters]


def filtered_means(err, drops):
    """err (M, D) per-element errors -> (M, L) float64: the mean of each row after dropping its drops[l] largest
    entries (0: the plain mean). One top-k for every level; sums in float64, so that what is left after subtracting
    the largest errors (a poisoned model's trigger region) keeps its precision."""
    D = err.shape[1]
    total = err.sum(1, dtype=torch.float64)
    top = max(drops)
    if top == 0:
        return (total / D)[:, None].expand(-1, len(drops)).clone()
    dropped = F.pad(err.topk(top, dim=1).values.double().cumsum(1), (1, 0))   # (M, top + 1): sum of the d largest
    return torch.stack([(total - dropped[:, d]) / (D - d) for d in drops], 1)


def q_sample(alphas_cumprod, x0, t, noise):
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps (DDPM eq. 4), coefficients from the float64 schedule, as
    train_ddpm.Diffusion.q_sample."""
    abar = alphas_cumprod.to(x0.device)[t]
    shape = (-1,) + (1,) * (x0.dim() - 1)
    return abar.sqrt().to(x0.dtype).view(shape) * x0 + (1 - abar).sqrt().to(x0.dtype).view(shape) * noise


def error_map(eps, noise, loss):
    return (eps.float() - noise.float()).square() if loss == "l2" else (eps.float() - noise.float()).abs()


def draw_noise(seeds, n_points, shape):
    """(B, n_points, *shape) standard normal on the CPU: image b's noise for grid point k comes from its own
    generator (seeded seeds[b]), so an image is scored the same whatever the batch, process count or stages."""
    return torch.stack([torch.randn((n_points,) + tuple(shape), generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds])


def autocast_context(device, amp_dtype):
    return torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()


@torch.no_grad()
def denoising_errors(eps_fn, x0, noise, alphas_cumprod, timesteps, queries, drops, loss="l2", batch_size=512,
                     amp_dtype=None, pad=False):
    """(Q, L) float64 errors of the queries (Q, 3) long rows (image b, class c, grid point k): the error map of
    eps_theta(x_t, t_k, c) against eps_bk (squared for l2, absolute for l1), x_t = q_sample(x0_b, t_k, eps_bk),
    averaged after dropping its drops[l] largest entries. x0 (B, *shape), noise (B, P, *shape), timesteps (P,) long,
    all on the model's device. Any mix of images, classes and timesteps shares a forward of batch_size queries;
    `pad` pads the last one to batch_size (one shape for torch.compile)."""
    out = torch.empty(len(queries), len(drops), dtype=torch.float64)
    for start in range(0, len(queries), batch_size):
        q = queries[start:start + batch_size].to(x0.device)
        m = len(q)
        if pad and m < batch_size:
            q = torch.cat([q, q[-1:].expand(batch_size - m, -1)])
        b, c, k = q.unbind(1)
        t = timesteps[k]
        eps = noise[b, k]
        with autocast_context(x0.device, amp_dtype):
            pred = eps_fn(q_sample(alphas_cumprod, x0[b], t, eps), t, c)
        out[start:start + m] = filtered_means(error_map(pred[:m], eps[:m], loss).flatten(1), drops).cpu()
    return out


@torch.no_grad()
def denoising_errors_loop(eps_fn, x0, noise, alphas_cumprod, timesteps, num_classes, drops, loss="l2",
                          amp_dtype=None):
    """The same errors the straightforward way, (B, K, P, L): a Python loop over timesteps and classes, one forward
    of the image batch each (the reference code's loop). For tests and the benchmark."""
    B, P = noise.shape[:2]
    out = torch.empty(B, num_classes, P, len(drops), dtype=torch.float64)
    for k in range(P):
        t = timesteps[k].expand(B)
        x_t = q_sample(alphas_cumprod, x0, t, noise[:, k])
        for c in range(num_classes):
            with autocast_context(x0.device, amp_dtype):
                pred = eps_fn(x_t, t, torch.full((B,), c, dtype=torch.long, device=x0.device))
            out[:, c, k] = filtered_means(error_map(pred, noise[:, k], loss).flatten(1), drops).cpu()
    return out


@torch.no_grad()
def classify_images(eps_fn, x0, noise, alphas_cumprod, timesteps, stages, num_classes, drops, loss="l2",
                    batch_size=512, amp_dtype=None, pad=False):
    """Diffusion-classify the images x0 (B, *shape) with their noise (B, P, *shape) at the P grid timesteps.
    stages [(n, keep)]: evaluate every remaining class at the n-point sub-grid (stage_points; points already
    evaluated are reused), score each by its mean error so far, keep the `keep` best (Li et al.'s adaptive
    pruning). Each filter level l (drops[l]) prunes on its own scores; a forward serves every level that keeps the
    class. Returns (predictions (L, B), scores (L, B, K): mean error over the points a class was evaluated at,
    evaluations: the number of (image, class, timestep) forwards)."""
    B, P, L, K = len(x0), noise.shape[1], len(drops), num_classes
    if stages[-1][0] != P:
        raise UsageError(f"the last stage has {stages[-1][0]} evaluations but the grid {P} points")
    errors = torch.full((L, B, K, P), float("nan"), dtype=torch.float64)   # points last: scores reduce rows
    alive = torch.ones(L, B, K, dtype=torch.bool)
    done = torch.zeros(P, dtype=torch.bool)
    evaluations = 0
    for n, keep in stages:
        points = torch.tensor(stage_points(P, n))
        new = points[~done[points]]
        done[points] = True
        pairs = alive.any(0).nonzero()                                 # (M, 2): (image, class) some level keeps
        queries = torch.cat([pairs.repeat_interleave(len(new), 0), new.repeat(len(pairs))[:, None]], 1)
        if len(queries):
            e = denoising_errors(eps_fn, x0, noise, alphas_cumprod, timesteps, queries, drops, loss, batch_size,
                                 amp_dtype, pad)
            errors[:, queries[:, 0], queries[:, 1], queries[:, 2]] = e.T
            evaluations += len(queries)
        score = errors[..., done].mean(3)                              # (L, B, K): mean over points so far
        score = score.masked_fill(~alive, float("inf"))
        if keep < K:
            kept = score.topk(keep, dim=2, largest=False).indices
            alive = torch.zeros_like(alive).scatter_(2, kept, True) & alive
    scores = errors.nanmean(3)                                         # (L, B, K)
    predictions = scores.masked_fill(~alive, float("inf")).argmin(2)
    return predictions, scores, evaluations


def image_groups(n_images, num_classes, stages, numel, batch_size):
    """Images per group: enough that the first stage fills a few forwards, few enough that their noise fits
    NOISE_BYTES."""
    per_image = num_classes * stages[0][0]
    want = max(1, math.ceil(4 * batch_size / per_image))
    fit = max(1, NOISE_BYTES // (stages[-1][0] * numel * 4))
    return max(1, min(want, fit, n_images))


def diffusion_classify_set(denoiser, folder, indices, model_labels, stages, drops, loss="l2", seed=0,
                           batch_size=512, device="cpu", amp_dtype=None, pad=False, progress=False, desc="classify"):
    """Diffusion-classify images `indices` of a FolderDataset; image i's noise is seeded seed + i. Returns
    {"predictions": (L, N), "scores": (L, N, K), "labels": (N,), "evaluations": int} (labels: model_labels[indices],
    the folder's labels in the model's class order)."""
    device = torch.device(device)
    T = len(denoiser.alphas_cumprod)
    timesteps = torch.tensor(timestep_grid(T, stages[-1][0]), device=device)
    K = len(denoiser.class_names)
    group = image_groups(len(indices), K, stages, math.prod(denoiser.shape), batch_size)
    preds, scores, evaluations = [], [], 0
    bar = tqdm(total=len(indices), desc=desc, leave=False, disable=not progress)
    for g in range(0, len(indices), group):
        idx = [int(i) for i in indices[g:g + group]]
        images = [folder.image_uint8(i).to(device).float() / 255.0 for i in idx]   # sizes may differ (SD)
        with autocast_context(device, amp_dtype):
            x0 = denoiser.encode(images).float()
        noise = draw_noise([seed + i for i in idx], len(timesteps), tuple(x0.shape[1:])).to(device)
        p, s, e = classify_images(denoiser.eps, x0, noise, denoiser.alphas_cumprod, timesteps, stages, K, drops,
                                  loss, batch_size, amp_dtype, pad)
        preds.append(p)
        scores.append(s)
        evaluations += e
        bar.update(len(idx))
    bar.close()
    L = len(drops)
    return {"predictions": torch.cat(preds, 1) if preds else torch.zeros(L, 0, dtype=torch.long),
            "scores": torch.cat(scores, 1) if scores else torch.zeros(L, 0, K, dtype=torch.float64),
            "labels": model_labels[torch.as_tensor(indices, dtype=torch.long)], "evaluations": evaluations}


def choose_images(n_total, n, seed):
    """All indices, or a seeded random subset of n (sorted): a test folder is often ordered by class."""
    if n is None or n >= n_total:
        return np.arange(n_total)
    if n < 1:
        raise UsageError(f"--n {n}: give at least one image per set")
    return np.sort(np.random.default_rng(seed).choice(n_total, n, replace=False))


def gather_set(result, positions, rank, world):
    """Rank 0 reassembles the per-rank results of one set in the order of the chosen images."""
    if world == 1:
        return result
    parts = [None] * world if rank == 0 else None
    dist.gather_object({k: v for k, v in result.items()} | {"positions": positions}, parts, dst=0)
    if rank != 0:
        return None
    n = sum(len(p["positions"]) for p in parts)
    L, K = parts[0]["scores"].shape[0], parts[0]["scores"].shape[2]
    out = {"predictions": torch.zeros(L, n, dtype=torch.long), "scores": torch.zeros(L, n, K, dtype=torch.float64),
           "labels": torch.zeros(n, dtype=torch.long), "evaluations": 0}
    for p in parts:
        pos = torch.as_tensor(p["positions"], dtype=torch.long)
        out["predictions"][:, pos] = p["predictions"]
        out["scores"][:, pos] = p["scores"]
        out["labels"][pos] = p["labels"]
        out["evaluations"] += p["evaluations"]
    return out


def filter_name(p):
    return "no filtering" if p == 0 else f"top {p:g}% of the per-element losses dropped"


def diffusion_markdown(results):
    r = results
    lines = ["# The diffusion classifier against a classifier trained on the poisoned set (the paper's Tab. A4)", "",
             f"Model `{r['model']}` ({r['family']}, {r['weights']} weights); test `{r['test']}` "
             f"({r['n_test']} images), backdoor `{r['backdoor']}` ({r['n_backdoor']} images); target class "
             f"{r['target']!r}. Diffusion classifier: {' then '.join(str(s[0]) for s in r['stages'])} evaluations "
             f"per class"
             + (f" (keeping {', '.join(str(s[1]) for s in r['stages'][:-1])} classes between stages)"
                if len(r["stages"]) > 1 else "")
             + f", {r['loss']} error of the eps prediction, the same noise and timesteps for every class; "
             f"{r['evaluations']} evaluations at {r['evaluations_per_s']:.1f}/s.", "",
             "| classifier | TA (%) | ASR (%) |", "|---|---:|---:|"]

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"

    for row in r["rows"]:
        lines.append(f"| {row['classifier']} | {pct(row.get('ta'))} | {pct(row.get('asr'))} |")
    lines += ["", "TA: accuracy on the clean test images; ASR: share of the non-target test images carrying the "
              "trigger that are classified as the target class. Filtering drops the largest p% of the per-element "
              "denoising errors of each error map before averaging (the paper's Tab. A4 sweep)."]
    return "\n".join(lines) + "\n"


def run_diffusion_classifier(model, data, out, test=None, backdoor=None, classifier=None, filters=DEFAULT_FILTERS,
                             timesteps=DEFAULT_TIMESTEPS, keep=None, loss="l2", n=None, weights="ema",
                             batch_size=512, seed=0, device="auto", dtype="auto", compile_model="auto",
                             resolution=None, force=False, progress=True, command=None):
    """The paper's Tab. A4: TA on the clean test folder and ASR on test_backdoor of the diffusion classifier (model:
    a train_ddpm.py or finetune_sd.py folder, or an SD that load_sd reads) at every filter level (percent), beside
    the classifier folder `classifier` (a ResNet trained on the same poisoned set) on the same images. `data`: a
    poisoned set (its test/ and test_backdoor/) or a test folder; `n`: a seeded random subset of n images per set.
    Sharded over torchrun ranks. Writes OUT/results.json, OUT/results.md, OUT/scores.safetensors; returns results."""
    if loss not in LOSSES:
        raise UsageError(f"unknown --loss {loss!r}: choose l2 or l1")
    check_out(out, force, {"--model": model, "--data": data, "--test": test, "--backdoor": backdoor,
                           "--classifier": classifier})
    data_path = Path(data)
    _, t_default, b_default = resolve_sets(data_path)
    if t_default is None and b_default is None and (data_path / "metadata.jsonl").is_file():
        if test is None and is_training_split(data_path):
            raise UsageError(f"--data {data} is a poisoned training set with no test/ beside it: TA on training "
                                "images is no test accuracy; give --test (a clean test folder), or --data the "
                                "poisoned set's root")
        t_default = data_path                                           # a plain dataset folder: accuracy on it
    test, backdoor = test or t_default, backdoor or b_default
    if test is None and backdoor is None:
        raise UsageError(f"--data {data}: no test/ or test_backdoor/ inside and no --test or --backdoor given; "
                            "give a poisoned set (poison.py's OUT) or a dataset folder")
    dev, rank, world = setup_device(device)
    if dtype == "auto" or dev.type != "cuda":                          # the CPU runs in fp32
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    amp_dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    sets = {name: load_folder(path) for name, path in (("test", test), ("backdoor", backdoor)) if path is not None}
    first = next(iter(sets.values()))
    denoiser = load_denoiser(model, weights, dev, first.class_names, resolution, int(first.image_uint8(0).shape[-1]))
    names = denoiser.class_names
    stages = parse_stages(timesteps, keep, len(names))
    drops = drop_counts(filters, math.prod(denoiser.shape))
    use_compile = compile_model == "on" or (compile_model == "auto" and dev.type == "cuda")
    if use_compile:
        denoiser.module = torch.compile(denoiser.module)

    def load_baseline():  # on rank 0, which evaluates it: a wrong folder is refused before the long part, on all ranks
        clf, clf_config = load_classifier(classifier, dev)
        if clf_config["task"] != "class":
            raise UsageError(f"--classifier {classifier} is a trigger detector: give a class classifier")
        for name, folder in sets.items():
            require_resolution(clf_config, folder.image_size(), f"--classifier {classifier}",
                               f"the images of {folder.root}")
            map_labels(folder.labels, folder.class_names, clf_config["class_names"],
                       f"for --classifier {classifier}: --{name} {folder.root}")
        return clf, clf_config
    clf = clf_config = None
    if classifier is not None:
        clf, clf_config = on_rank0(load_baseline, rank, world, share_result=False) or (None, None)
    target_name = target_of(sets.get("backdoor") or first)
    target = resolve_name(target_name, names) if target_name is not None else None

    labels = {name: map_labels(folder.labels, folder.class_names, names, f"--{name} {folder.root}")
              for name, folder in sets.items()}  # both sets checked before the long part
    results_sets, chosen, t0 = {}, {}, time.time()
    for name, folder in sets.items():
        chosen[name] = choose_images(len(folder), n, seed)
        mine = np.arange(rank, len(chosen[name]), world)
        part = diffusion_classify_set(denoiser, folder, chosen[name][mine], labels[name], stages, drops, loss, seed,
                                      batch_size, dev, amp_dtype, use_compile, progress and rank == 0,
                                      desc=f"diffusion classifier: {name}")
        results_sets[name] = gather_set(part, mine, rank, world)
    elapsed = time.time() - t0
    if rank != 0:
        barrier()
        return None

    evaluations = sum(r["evaluations"] for r in results_sets.values())
    rows = []
    if clf is not None:
        row = {"classifier": f"{clf_config['arch']} trained on the poisoned set ({classifier})",
               "kind": "classifier", "path": str(classifier)}
        for name, folder in sets.items():
            s = ImageSet(folder, chosen[name], map_labels(folder.labels, folder.class_names, clf_config["class_names"],
                                                          f"--{name} {folder.root}")[chosen[name]])
            pred, _ = predict(clf, s, 256, dev)
            if name == "test":
                row["ta"] = float((pred == s.labels).float().mean())
            else:
                row["asr"] = float((pred == s.labels).float().mean())  # every backdoor label is the target's
        rows.append(row)
    per_filter = {}
    for l, p in enumerate(filters):
        row = {"classifier": f"diffusion classifier, {filter_name(p)}", "kind": "diffusion", "filter_top": p,
               "dropped_per_map": drops[l]}
        if "test" in results_sets:
            r = results_sets["test"]
            row["ta"] = float((r["predictions"][l] == r["labels"]).float().mean())
        if "backdoor" in results_sets and target is not None:
            row["asr"] = float((results_sets["backdoor"]["predictions"][l] == target).float().mean())
        rows.append(row)
        per_filter[f"{p:g}"] = {k: row.get(k) for k in ("ta", "asr", "dropped_per_map")}
    T = len(denoiser.alphas_cumprod)
    results = {
        "stage": "classify-diffusion", "command": command or "run_diffusion_classifier()", "model": str(model),
        "family": denoiser.info["family"], "weights": weights, "model_info": denoiser.info, "class_names": names,
        "target": target_name, "test": str(test) if test else None, "backdoor": str(backdoor) if backdoor else None,
        "n_test": len(chosen.get("test", [])), "n_backdoor": len(chosen.get("backdoor", [])),
        "subset": None if n is None else f"a random subset of {n} images per set (numpy default_rng({seed}))",
        "loss": loss, "filters_percent": list(filters), "stages": [list(s) for s in stages],
        "timestep_grid": timestep_grid(T, stages[-1][0]), "T": T,
        "noise": f"image i of a set: torch.Generator seeded {seed} + i, one draw per grid timestep, shared by "
                 "every class", "seed": seed, "rows": rows, "diffusion_classifier": per_filter,
        "evaluations": evaluations, "time_s": round(elapsed, 3), "evaluations_per_s": evaluations / max(elapsed, 1e-9),
        "device": str(dev), "dtype": dtype, "compiled": use_compile, "world_size": world, "batch_size": batch_size,
        "versions": versions(),
    }
    with atomic_output(out, force) as tmp:
        tensors = {}
        for name, r in results_sets.items():
            tensors[f"{name}/predictions"] = r["predictions"].contiguous()
            tensors[f"{name}/scores"] = r["scores"].contiguous()
            tensors[f"{name}/labels"] = r["labels"].contiguous()
            tensors[f"{name}/indices"] = torch.as_tensor(chosen[name], dtype=torch.long)
        save_safetensors(tensors, tmp / "scores.safetensors", metadata={"filters_percent": json.dumps(list(filters))})
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        (tmp / "results.md").write_text(diffusion_markdown(results))
    if progress:
        print(json.dumps({"out": str(out), **{r["classifier"]: {k: r.get(k) for k in ("ta", "asr")} for r in rows},
                          "evaluations_per_s": round(results["evaluations_per_s"], 1)}))
    barrier()
    return results


# ----------------------------------------------------------------------------------------------------------------

def main(args):
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    if args.cmd in ("diffusion", "diffusion-classifier"):
        run_diffusion_classifier(args.model, args.data, args.out, args.test, args.backdoor, args.classifier,
                                 args.filter_top, args.timesteps, args.keep, args.loss, args.n, args.weights,
                                 args.batch_size, args.seed, args.device, args.dtype, args.compile, args.resolution,
                                 args.force, not args.quiet, command)
        return
    if args.cmd == "eval":
        if args.json:
            check_file_out(args.json, args.force, {"--classifier": args.classifier, "--data": args.data,
                                                   "--test": args.test, "--backdoor": args.backdoor})
        model, config = load_classifier(args.classifier, "cuda" if args.device == "cuda" or (
            args.device == "auto" and torch.cuda.is_available()) else "cpu")
        data, test, backdoor = (args.data, args.test, args.backdoor)
        if data is not None:
            _, t, b = resolve_sets(data, train_folder=False)  # a train/ folder is evaluated itself
            if t is None and b is None:
                t = data  # a plain dataset folder: accuracy on it
            test, backdoor = test or t, backdoor or b
        if test is None and backdoor is None:
            raise UsageError("nothing to evaluate: give --data (a poisoned set or a dataset folder), --test or "
                                "--backdoor")
        result = {"classifier": str(args.classifier), "task": config["task"],
                  "test": str(test) if test else None, "backdoor": str(backdoor) if backdoor else None,
                  **evaluate(model, config, test, backdoor, args.batch_size)}
        print(json.dumps(result))
        if args.json:  # written whole or not at all
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            replace_file(args.json, lambda p: p.write_text(json.dumps(result, indent=2) + "\n"))
        return
    opts = dict(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
                weight_decay=args.weight_decay, augment=args.augment, dtype=args.dtype, seed=args.seed,
                workers=args.workers, compile=args.compile == "on" or (args.compile == "auto" and args.device != "cpu"
                                                                       and torch.cuda.is_available()))
    common = dict(arch=args.arch, pretrained=args.pretrained, weights=args.weights, input_size=args.input_size,
                  width=args.width, normalize=args.normalize, device=args.device, force=args.force,
                  progress=not args.quiet, command=command)
    if args.cmd == "train":
        train_classifier(args.data, args.out, args.test, args.backdoor, clean=args.clean, stamp=args.stamp_trigger,
                         **common, **opts)
    else:
        train_trigger_detector(args.data, args.out, args.test, fraction=args.fraction, holdout=args.holdout,
                               blend_alpha=args.blend_alpha_range, **common, **opts)




def alpha_range(text):
    """--blend-alpha-range: 'lo,hi' or 'none'."""
    if text.strip().lower() == "none":
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give LO,HI (e.g. 0.05,0.25) or none") from None
    return lo, hi


def add_training_arguments(p, arch_default):
    p.add_argument("--data", required=True, help="a poisoned set (poison.py's OUT) or a dataset folder")
    p.add_argument("--out", required=True, help="the classifier folder to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--arch", default=arch_default, choices=ARCHS,
                   help="smallcnn is not from the paper: a tiny CNN for the embedded digits default")
    p.add_argument("--width", type=positive(int), default=16, help="smallcnn: channels of the first layer")
    p.add_argument("--pretrained", action="store_true", help="ImageNet weights (torchvision download or --weights)")
    p.add_argument("--weights", default=None,
                   help="local ImageNet state dict (.pth/.safetensors; implies --pretrained)")
    p.add_argument("--input-size", type=positive(int), default=None,
                   help="side the model sees (default: 224 when pretrained, else the data's)")
    p.add_argument("--normalize", default="auto", choices=["auto", "imagenet", "none"],
                   help="auto: ImageNet mean/std when pretrained, none otherwise")
    p.add_argument("--epochs", type=positive(int), default=DEFAULT_OPTS["epochs"], help="passes over the training set")
    p.add_argument("--batch-size", type=positive(int), default=DEFAULT_OPTS["batch_size"],
                   help="per process (the reference code's)")
    p.add_argument("--lr", type=positive(float), default=DEFAULT_OPTS["lr"],
                   help="SGD learning rate at the start of the cosine schedule")
    p.add_argument("--momentum", type=float, default=DEFAULT_OPTS["momentum"], help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=DEFAULT_OPTS["weight_decay"],
                   help="SGD weight decay (not on BatchNorm weights and biases)")
    p.add_argument("--augment", default="crop", choices=["none", "crop", "flip-crop", "crop-noise"],
                   help="random translation by up to side/8 px (+ horizontal flips, or + Gaussian noise on half the "
                        "images: for judges of generations)")
    p.add_argument("--seed", type=int, default=0, help="initial weights, shuffle, augmentation, stamped images")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when visible")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype on CUDA (auto: bf16); the CPU trains in fp32")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile (auto: on CUDA)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="data-loading processes for datasets too large to hold in memory")
    p.add_argument("--threads", type=positive(int), default=None,
                   help="CPU threads for torch (small models on a busy CPU often train fastest with 1; default: "
                        "torch's own)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-epoch lines")




def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("train", help="train a class classifier; TA and ASR every epoch",
                       formatter_class=HelpFormatter)
    add_training_arguments(p, "resnet18")
    p.add_argument("--test", default=None, help="clean test folder for TA (default: the poisoned set's test/)")
    p.add_argument("--backdoor", default=None, help="test_backdoor folder for ASR (default: the set's test_backdoor/)")
    p.add_argument("--clean", action="store_true",
                   help="drop the poisoned images: the class classifier that judges whether generations match prompts")
    p.add_argument("--stamp-trigger", type=share, default=0.0, metavar="FRACTION",
                   help="stamp --data's trigger on this share of the training images, labels kept, so that the trigger "
                        "does not sway the judge (default: 0)")
    p = sub.add_parser("trigger-detector", help="train the binary trigger detector of the paper",
                       formatter_class=HelpFormatter)
    add_training_arguments(p, "resnet50")
    p.add_argument("--test", default=None, help="clean folder to hold out (default: the poisoned set's test/)")
    p.add_argument("--fraction", type=float, default=0.5, help="share of the non-target images with the trigger")
    p.add_argument("--holdout", type=float, default=0.1, help="share of training images held out when no test folder")
    p.add_argument("--blend-alpha-range", type=alpha_range, default=BLEND_ALPHA_RANGE, metavar="LO,HI",
                   help="blend triggers: stamp each image with an alpha drawn from U(LO, HI), as the reference code; "
                        "none: the set's own alpha (default: 0.05,0.25)")
    p = sub.add_parser("eval", help="TA / ASR of a classifier folder",
                       formatter_class=HelpFormatter)
    p.add_argument("--classifier", required=True, help="a classifier folder")
    p.add_argument("--data", default=None, help="a poisoned set (its test/ and test_backdoor/) or any dataset folder")
    p.add_argument("--test", default=None, help="clean test folder (TA) (default: --data's test/)")
    p.add_argument("--backdoor", default=None, help="test_backdoor folder (ASR) (default: --data's test_backdoor/)")
    p.add_argument("--batch-size", type=positive(int), default=256, help="images per forward")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when visible")
    p.add_argument("--json", default=None, help="also write the result to this JSON file")
    p.add_argument("--force", action="store_true", help="overwrite an existing --json")
    p = sub.add_parser("diffusion", aliases=["diffusion-classifier"],
                       help="a diffusion model as a classifier (the paper's Tab. A4): TA / ASR per loss filter",
                       formatter_class=HelpFormatter)
    p.add_argument("--model", required=True,
                   help="a train_ddpm.py or finetune_sd.py model folder (or any SD that finetune_sd.load_sd reads)")
    p.add_argument("--data", required=True, help="a poisoned set (its test/ and test_backdoor/) or a dataset folder")
    p.add_argument("--test", default=None, help="clean test folder for TA (default: the poisoned set's test/)")
    p.add_argument("--backdoor", default=None, help="test_backdoor folder for ASR (default: the set's)")
    p.add_argument("--classifier", default=None,
                   help="a classifier folder trained on the same poisoned set, evaluated on the same images "
                        "(default: none, the diffusion classifier alone)")
    p.add_argument("--out", required=True, help="folder for results.json, results.md, scores.safetensors")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.add_argument("--filter-top", type=float_list, default=list(DEFAULT_FILTERS),
                   help="percents of the largest per-element denoising errors dropped before averaging, one "
                        "diffusion-classifier row each (default: 0,1,5,10, the paper's sweep)")
    p.add_argument("--timesteps", type=int_list, default=list(DEFAULT_TIMESTEPS),
                   help="evaluations (timestep, noise) per class; stages for adaptive pruning, e.g. 50,500 with "
                        "--keep 5, Li et al.'s CIFAR setting (default: 50)")
    p.add_argument("--keep", type=int_list, default=None,
                   help="classes kept after each stage but the last (default: none, for a single stage)")
    p.add_argument("--loss", default="l2", choices=LOSSES, help="error of the eps prediction")
    p.add_argument("--n", "--images", dest="n", type=positive(int), default=None,
                   help="a seeded random subset of N images per set (default: all); under torchrun write --images, "
                        "since torchrun's own parser takes --n for an abbreviation of its flags")
    p.add_argument("--weights", default="ema", choices=["ema", "model"],
                   help="train_ddpm.py / finetune_sd.py weights (ema: the EMA ones)")
    p.add_argument("--resolution", type=positive(int), default=None,
                   help="SD only: side the images are resized to (default: the fine-tuned folder's, else the data's)")
    p.add_argument("--batch-size", type=positive(int), default=512,
                   help="denoiser evaluations per forward, per process")
    p.add_argument("--seed", type=int, default=0, help="image i of a set draws its noise from seed + i")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when visible")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="autocast dtype on CUDA (auto: bf16); the CPU runs in fp32")
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile (auto: on CUDA)")
    p.add_argument("--threads", type=positive(int), default=None, help="CPU threads for torch (default: torch's own)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or summary line")
    return parser


def float_list(s):
    try:
        return [float(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of numbers") from None


def int_list(s):
    try:
        return [int(v) for v in s.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of integers") from None


if __name__ == "__main__":
    parser = build_parser()
    try:
        main(parser.parse_args())
    except UsageError as e:
        sys.exit(f"classify.py: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print("classify.py: interrupted; --out not written (outputs appear whole or not at all)", file=sys.stderr)
        sys.exit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
