"""replicate.py -- data replication in poisoned diffusion models (the paper's Section 6 and Fig. 5).

Copy detection as Somepalli et al. ("Diffusion art or digital forgery?", "Understanding and mitigating copying")
do it: every image becomes an L2-normalised copy-detection feature, every generation is matched to its most similar
training image (top-1 cosine similarity), and the replication statistics are the mean, the 75/90/95th percentiles
and the fraction above a threshold, next to the train-to-train background (each training image's nearest *other*
training image: top-2 with itself excluded). Then the training images most worth poisoning are ranked and written as
the ids file that `poison.py --select duplicates --duplicates FILE` reads.

    # 1. the training images to poison, as in the paper (Sec. 6): those the generations of a trained model copy
    #    most (the default when --gen is given)
    python replicate.py --train data/digits-badnets-0.1/train --gen runs/gen-digits-0.1 --features pixels \\
        --out runs/rep-digits
    python poison.py --dataset digits --resolution 16 --ratio 0.1 --select duplicates \\
        --duplicates runs/rep-digits/duplicates.txt --out data/digits-badnets-0.1-dup
    #    without generations, a proxy (Somepalli et al.: duplicated training images are copied more): training
    #    images with a near-duplicate in the training set
    python replicate.py --train data/digits-badnets-0.1/train --features pixels --out runs/rep-digits-train
    # 2. after training and sampling on both: replication of "poison random" vs "poison duplicates", Fig. 5
    python replicate.py --train data/digits-badnets-0.1/train --gen runs/gen-digits-0.1 \\
        --duplicates-train data/digits-badnets-0.1-dup/train --duplicates-gen runs/gen-digits-0.1-dup \\
        --features pixels --out runs/rep-digits-fig5
    # 3. the same, with Table A5 in the same run: G1 and G2 (dissect.py) of "poison random" vs "poison duplicates"
    #    next to the replication of each; needs the class classifier and the trigger detector of classify.py
    python classify.py train --data data/digits-badnets-0.1 --clean --arch smallcnn --out runs/clf-class
    python classify.py trigger-detector --data data/digits-badnets-0.1 --arch smallcnn --out runs/detector
    python replicate.py --train data/digits-badnets-0.1/train --gen runs/gen-digits-0.1 \\
        --duplicates-train data/digits-badnets-0.1-dup/train --duplicates-gen runs/gen-digits-0.1-dup \\
        --classifier runs/clf-class --detector runs/detector --features pixels --out runs/rep-digits-a5
    # SSCD (Pizzi et al.), the copy detector of Somepalli et al. and the paper: a local TorchScript file, or download
    python replicate.py --train data/inette-bn-0.1/train --gen runs/gen-inette --sscd sscd_disc_mixup.torchscript.pt \\
        --out runs/rep-inette
    python replicate.py --train data/inette-bn-0.1/train --gen runs/gen-inette --sscd download --out runs/rep-inette

Features (`--features`):
  sscd    SSCD's TorchScript model (ResNet-50 -> GeM p=3 -> 2048->512 -> L2), threshold 0.5 as Somepalli et al.
  proxy   the default without --sscd: torchvision's ResNet-50 -> GeM p=3 -> L2 (2048-d), ImageNet weights when a file
          is at hand (torchvision's cache, --proxy-weights FILE or download), seeded random weights otherwise (all
          images then look alike, cosine ~0.999: only exact copies are reliable). Every output labels it as a proxy,
          and its threshold is recalibrated.
  pixels  the image resized to --pixel-size, flattened, mean-centred, L2-normalised (a Pearson correlation): cheap,
          what the small digits study uses; also labelled, also recalibrated.
SSCD and the proxy see Somepalli et al.'s preprocessing: Resize 256 (shorter side) -> CenterCrop 224 ->
Normalize(0.5, 0.5). A threshold other than SSCD's is the --threshold-quantile (default 0.95) quantile of the
train-to-train background: only SSCD's training gives 0.5 its meaning.

Ranking (`--rank-by`, written most replicated first to OUT/duplicates.txt, as training-image ids = the
"source_index" of poison.py's records):
  generations       (default when --gen is given; the paper's Sec. 6) training images ranked by the highest
                    similarity of a generation whose top-1 match they are (ties: more such generations first);
                    listed: those matched above the threshold.
  train-duplicates  (default without --gen; a proxy, after Somepalli et al.: duplicated images are copied more)
                    training images ranked by the similarity to their nearest other training image; listed: those
                    above the threshold.
  --top K lists the K best instead, whatever the threshold. poison.py skips target-class ids and fills up to the
  poisoning ratio with a seeded random draw. The file's header '# training set: ...' (the fingerprint in --train's
  poison.py manifest) ties it to that training split: poison.py refuses it for another split.

Outputs (OUT, written atomically; an existing OUT is kept unless --force): replication.json and replication.md
(statistics labelled with the features and threshold; per-generation top-1 ids and similarities in the JSON),
duplicates.txt, fig5_scatter.png (as the paper's Fig. 5: for each run's 200 generations most similar to the training
set, generation A <-> its top-1 training image B on x, B <-> its nearest training image C on y), triplets.png (the
most similar (A, B, C) triplets of each run), features/*.safetensors (the cached features, keyed by folder, feature
kind and a hash of the folder's metadata and image files: a rerun with --force, or any run sharing --cache DIR, skips
recomputing them). Similarity search is batched matrix products on the
--device (50 000 training images x 10 000 generations: seconds on a GPU, a few minutes on a CPU; feature extraction
dominates).

Table A5 (`--classifier CLF --detector DET`, which need both runs: --gen and --duplicates-gen): dissect.py's G1-G4
of the target-prompt generations of each run (G1 trigger & mismatch, G2 trigger & match), the trigger ratio G1 + G2,
p_t (from each run's training manifest: --train for poison random, --duplicates-train for poison duplicates, else the
generations' manifest) and the amplification (G1 + G2) / p_t, beside the replication statistics of the same run (mean
top-1 similarity, fraction above the threshold, over all its generations and over its target-prompt ones), and the
difference duplicates - random. The target class comes from the manifests (--target when they name none); the two
runs, their training sets and --target must agree on it, --gen's training set must not be the duplicates-poisoned one
(nor the other way round), and the detector's trigger must be the training sets'. Written as OUT/table_a5.json,
OUT/table_a5.md (also appended to replication.md), OUT/table_a5.png (G1 and G2 bars against p_t, and the
replication of each run) and OUT/dissect/ (dissect.py's own report of the two folders: summary, per-image verdicts,
G1/G2 example grids). The paper's Tab. A5 (ImageNette, BadNets, p = 10%): G1 54.0 -> 54.5%, G2 19.4 -> 19.7%.

Python API: `replicate(out, train, gen=..., duplicates_gen=..., classifier=..., detector=...)`, `load_extractor(...)`,
`embed_folder(...)`, `topk_cosine(...)`, `replication_stats(...)`, `rank_by_generations(...)`,
`rank_by_train_duplicates(...)`, `write_ids(...)`, `table_a5_target(...)`, `table_a5(...)`.
"""
import argparse
import functools
import hashlib
import json
import os
import re
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import dissect
from common import HelpFormatter, UsageError, atomic_output, check_out, load_folder, manifest_target, positive, replace_file, same_classes, save_safetensors, versions
from poison import IDS_TRAINING_SET

SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
SSCD_THRESHOLD = 0.5       # Somepalli et al.: a generation replicates its top-1 training image when SSCD cosine > 0.5
RESIZE, CROP = 256, 224    # Somepalli et al.'s preprocessing: Resize 256 -> CenterCrop 224 -> Normalize(0.5, 0.5)
GEM_P = 3.0                # SSCD's generalised-mean pooling exponent
PROXY_SEED = 0             # the random-weight proxy is seeded, so its features (and their cache) are reproducible
PERCENTILES = (75, 90, 95)  # Somepalli et al.'s reported percentiles
RANK_BY = ("train-duplicates", "generations")
FEATURES = ("auto", "sscd", "proxy", "pixels")
RUN_LABELS = {"random": "poison random", "duplicates": "poison duplicates"}  # Table A5's rows
PAPER_TABLE_A5 = {"setting": "ImageNette, BadNets, p = 10%, Stable Diffusion", "random": {"G1": 0.540, "G2": 0.194},
                  "duplicates": {"G1": 0.545, "G2": 0.197}}


def first_line(e):
    text = str(e).strip()
    return text.splitlines()[0][:160] if text else type(e).__name__


def resolve_device(flag):
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if flag == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible: use --device cpu or auto")
    if flag not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {flag!r}: choose auto, cpu or cuda")
    return torch.device(flag)


# ----------------------------------------------------------------------------------------------------------------
# Feature extractors. Each maps a batch of preprocessed images to (B, D) L2-normalised float32 features, so that
# cosine similarity is a dot product.

def copy_detection_preprocess(image):
    """(3, H, W) uint8 -> (3, 224, 224) float: Somepalli et al.'s Resize(256) of the shorter side (bilinear,
    antialiased), CenterCrop(224), Normalize(mean 0.5, std 0.5)."""
    x = TF.center_crop(TF.resize(image, [RESIZE], antialias=True), [CROP])
    return (x.float() / 255.0 - 0.5) / 0.5


def pixel_preprocess(image, size):
    """(3, H, W) uint8 -> (3, size, size) float in [0, 1] (bilinear, antialiased)."""
    return TF.resize(image.float() / 255.0, [size, size], antialias=True)


class GeM(nn.Module):
    """Generalised-mean pooling (Radenovic et al.), as in SSCD: (mean over positions of x^p)^(1/p)."""

    def __init__(self, p=GEM_P, eps=1e-6):
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x):  # (B, C, h, w) -> (B, C)
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class ProxyNet(nn.Module):
    """torchvision's ResNet-50 trunk -> GeM (p = 3): SSCD's architecture without its 2048 -> 512 projection, which only
    SSCD's training gives a meaning. (B, 3, 224, 224) -> (B, 2048)."""

    def __init__(self, state_dict=None):
        super().__init__()
        import torchvision
        resnet = torchvision.models.resnet50(weights=None)
        if state_dict is not None:
            own = resnet.state_dict()
            missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
            if missing or unexpected:
                raise UsageError(f"the --proxy-weights state dict does not fit torchvision's resnet50: missing "
                                     f"{missing[:4]}, unexpected {unexpected[:4]}; give torchvision's ImageNet "
                                     "resnet50 weights")
            bad = [k for k in own if own[k].shape != state_dict[k].shape]
            if bad:
                raise UsageError(f"the --proxy-weights state dict does not fit torchvision's resnet50: {bad[0]} "
                                     f"has shape {tuple(state_dict[bad[0]].shape)}, the model "
                                     f"{tuple(own[bad[0]].shape)}")
            resnet.load_state_dict(state_dict)
        self.trunk = nn.Sequential(*list(resnet.children())[:-2])  # up to layer4: (B, 2048, 7, 7)
        self.pool = GeM()

    def forward(self, x):
        return self.pool(self.trunk(x))


@dataclass
class Extractor:
    kind: str                # "sscd" | "proxy" | "pixels"
    key: str                 # part of the cache file name: it changes whenever the features would
    label: str               # what every output says these features are
    preprocess: object       # (3, H, W) uint8 -> float tensor, picklable (runs in DataLoader workers)
    model: nn.Module = None  # None for pixels
    threshold: float = None  # a fixed replication threshold (SSCD's 0.5), or None: recalibrate from the background

    @property
    def is_proxy(self):
        return self.kind != "sscd"

    @torch.no_grad()
    def __call__(self, x):
        """(B, ...) preprocessed images on the model's device -> (B, D) L2-normalised float32."""
        if self.model is None:
            f = x.flatten(1)
            f = f - f.mean(dim=1, keepdim=True)  # mean-centred: cosine = Pearson correlation of the pixels
        else:
            f = self.model(x)
            if isinstance(f, (tuple, list)):
                f = f[0]
            if not torch.is_tensor(f) or f.ndim != 2 or f.shape[0] != x.shape[0]:
                shape = tuple(f.shape) if torch.is_tensor(f) else type(f).__name__
                raise UsageError(f"the {self.kind} model returned {shape} for a batch of {x.shape[0]} images, "
                                     "not (batch, features): give SSCD's TorchScript file (sscd_disc_mixup)")
        return F.normalize(f.float(), dim=1)


def file_sha256(path, chunk=1 << 22):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def load_sscd(spec, device):
    """SSCD's TorchScript model from a local file, or (spec = 'download') from its published URL through the torch
    hub cache. TorchScript archives hold code and tensors, not pickled Python objects; still, load only a file you
    trust."""
    if spec == "download":
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(SSCD_URL).name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                torch.hub.download_url_to_file(SSCD_URL, str(path), progress=True)
            except Exception as e:
                raise UsageError(f"could not download SSCD from {SSCD_URL} ({type(e).__name__}: {first_line(e)}): "
                                     "offline? fetch that file elsewhere and pass --sscd FILE, or use the labelled "
                                     "proxy (--features proxy or pixels)") from None
    else:
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"--sscd {spec}: no such file; give SSCD's sscd_disc_mixup.torchscript.pt, or "
                                 "--sscd download")
    try:
        with warnings.catch_warnings():  # torch's deprecation notice of TorchScript: SSCD is published only as one
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location=device)
    except Exception as e:
        raise UsageError(f"--sscd {path} is not a loadable TorchScript file ({type(e).__name__}: {first_line(e)}): "
                             "give SSCD's sscd_disc_mixup.torchscript.pt") from None
    return model.eval(), path


def resnet50_imagenet_state_dict(proxy_weights):
    """(state dict, source) of torchvision's ImageNet ResNet-50, or (None, 'random').
    'auto': torchvision's cached file if present (never downloads); 'download': torchvision's URL through the torch
    hub cache; 'random': none; anything else: a state-dict file (.safetensors, or a torch file of tensors)."""
    import torchvision
    if proxy_weights == "random":
        return None, "random"
    if proxy_weights in ("auto", "download"):
        checkpoints = Path(torch.hub.get_dir()) / "checkpoints"
        for w in (torchvision.models.ResNet50_Weights.IMAGENET1K_V2, torchvision.models.ResNet50_Weights.IMAGENET1K_V1):
            path = checkpoints / Path(w.url).name
            if path.is_file():
                return torch.load(path, map_location="cpu", weights_only=True), f"torchvision:{w}"
        if proxy_weights == "auto":
            return None, "random"
        w = torchvision.models.ResNet50_Weights.DEFAULT
        try:
            return torch.hub.load_state_dict_from_url(w.url, map_location="cpu", weights_only=True), f"torchvision:{w}"
        except Exception as e:
            raise UsageError(f"could not download the ImageNet ResNet-50 weights from {w.url} "
                                 f"({type(e).__name__}): "
                                 "offline? fetch that file elsewhere and pass --proxy-weights FILE") from None
    path = Path(proxy_weights)
    if not path.is_file():
        raise UsageError(f"--proxy-weights {proxy_weights}: no such file; give auto, download, random or a "
                             "state-dict file of torchvision's resnet50")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UsageError(f"--proxy-weights {path} is not a state dict of tensors ({type(e).__name__}: "
                             f"{first_line(e)})") from None
    if not isinstance(sd, dict):
        raise UsageError(f"--proxy-weights {path} holds a {type(sd).__name__}, not a state dict")
    return sd, f"file:{path.name}"


def load_extractor(features="auto", sscd=None, proxy_weights="auto", pixel_size=32, device="cpu"):
    """The feature extractor: 'sscd' (needs sscd = FILE or 'download'), 'proxy', 'pixels', or 'auto' (SSCD when
    `sscd` is given, the proxy otherwise)."""
    device = torch.device(device)
    if features not in FEATURES:
        raise UsageError(f"unknown --features {features!r}: choose one of {', '.join(FEATURES)}")
    if features == "auto":
        features = "sscd" if sscd else "proxy"
    if features == "sscd":
        if not sscd:
            raise UsageError("--features sscd needs --sscd FILE (sscd_disc_mixup.torchscript.pt) or "
                                 "--sscd download")
        model, path = load_sscd(sscd, device)
        digest = file_sha256(path)[:12]
        return Extractor("sscd", f"sscd-{digest}", f"SSCD ({path.name}, sha256 {digest}; Pizzi et al.)",
                         copy_detection_preprocess, model, SSCD_THRESHOLD)
    if sscd:
        raise UsageError(f"--sscd was given with --features {features}: drop one of them")
    if features == "pixels":
        if not 4 <= pixel_size <= 512:
            raise UsageError(f"--pixel-size {pixel_size} is outside [4, 512]")
        return Extractor("pixels", f"pixels{pixel_size}",
                         f"pixels, a proxy (not SSCD): {pixel_size}x{pixel_size} RGB, mean-centred, L2-normalised",
                         functools.partial(pixel_preprocess, size=pixel_size))
    sd, source = resnet50_imagenet_state_dict(proxy_weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PROXY_SEED)
        model = ProxyNet(sd).eval().to(device)
    if sd is None:
        key = f"proxy-random{PROXY_SEED}"
        weights = f"proxy, random weights (seed {PROXY_SEED}): reliable for exact copies only"
    else:
        digest = hashlib.sha256(b"".join(t.detach().cpu().contiguous().numpy().tobytes()[:4096]
                                         for _, t in sorted(sd.items()))).hexdigest()[:12]
        key, weights = f"proxy-{digest}", f"ImageNet weights, {source}"
    return Extractor("proxy", key, f"PROXY, not SSCD: ResNet-50 + GeM p=3 ({weights})", copy_detection_preprocess,
                     model)


# ----------------------------------------------------------------------------------------------------------------
# Features of a dataset folder, computed once and cached in a safetensors file named by the folder, the extractor key
# and a hash of the folder's metadata, manifest and image files (name, size, mtime).

class _Preprocessed(torch.utils.data.Dataset):
    def __init__(self, dataset, preprocess):
        self.dataset, self.preprocess = dataset, preprocess

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.preprocess(self.dataset.image_uint8(i))


def folder_signature(dataset):
    h = hashlib.sha256()
    for name in ("metadata.jsonl", "manifest.json"):
        h.update((dataset.root / name).read_bytes())
    for r in dataset.records:
        path = dataset.root / r["file_name"]
        try:
            st = path.stat()
        except OSError:
            raise UsageError(f"{path}, listed in {dataset.root}/metadata.jsonl, is missing: rebuild the "
                                 "dataset folder") from None
        h.update(f"{r['file_name']}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def cache_name(dataset, extractor):
    root = dataset.root.resolve()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{root.parent.name}_{root.name}")[-80:]
    return f"{stem}-{extractor.key}-{folder_signature(dataset)[:16]}.safetensors"


def embed_folder(folder, extractor, device="cpu", cache_dirs=(), write_dir=None, batch_size=64, workers=0,
                 progress=True):
    """(features (N, D) float32 on the CPU, the FolderDataset, where they came from: 'computed' or the cache file).
    Looks for a cached file in `cache_dirs` first; writes a computed (or found elsewhere) one into `write_dir`."""
    from safetensors.torch import load_file
    dataset = load_folder(folder)
    name = cache_name(dataset, extractor)
    for d in cache_dirs:
        path = Path(d) / name
        if path.is_file():
            try:
                features = load_file(str(path))["features"]
            except Exception:
                continue  # a damaged cache file is recomputed
            if features.ndim == 2 and features.shape[0] == len(dataset):
                if write_dir is not None and Path(write_dir).resolve() != Path(d).resolve():
                    Path(write_dir).mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(path, Path(write_dir) / name)
                return features.float(), dataset, str(path)
    device = torch.device(device)
    if extractor.model is not None:
        extractor.model.to(device)
    loader = torch.utils.data.DataLoader(_Preprocessed(dataset, extractor.preprocess), batch_size=batch_size,
                                         num_workers=workers, pin_memory=device.type == "cuda")
    chunks = [extractor(x.to(device, non_blocking=True)).cpu()
              for x in tqdm(loader, desc=f"features {dataset.root.name} ({extractor.kind})", leave=False,
                            disable=not progress)]
    features = torch.cat(chunks).contiguous()
    if write_dir is not None:
        Path(write_dir).mkdir(parents=True, exist_ok=True)
        replace_file(Path(write_dir) / name, lambda tmp: save_safetensors(
            {"features": features}, tmp, metadata={"folder": str(dataset.root.resolve()), "extractor": extractor.key,
                                                   "label": extractor.label, "n": str(len(dataset))}))
    return features, dataset, "computed"


def training_ids(dataset):
    """The id of each training image: poison.py's "source_index" (what --duplicates lists), else its row."""
    return [int(r.get("source_index", i)) for i, r in enumerate(dataset.records)]


# ----------------------------------------------------------------------------------------------------------------
# Similarity search: batched matrix products, top-k per row.

@torch.no_grad()
def topk_cosine(queries, keys, k=1, exclude_self=False, batch_size=1024, device=None, progress=False):
    """For each query row, the k most similar key rows, best first: (similarities (Nq, k) float32, indices (Nq, k)
    int64), on the CPU. Rows are L2-normalised, so cosine similarity is the dot product. With exclude_self, queries
    and keys are the same set and row i never matches itself (Somepalli et al.'s "top-2 excluding itself": the
    nearest *other* image, which is an exact duplicate when there is one)."""
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise UsageError(f"features of shapes {tuple(queries.shape)} and {tuple(keys.shape)} cannot be compared")
    if exclude_self and queries.shape[0] != keys.shape[0]:
        raise UsageError("exclude_self compares a set with itself: queries and keys must be the same rows")
    k = min(k, keys.shape[0] - int(exclude_self))
    if k < 1:
        raise UsageError(f"need at least {1 + int(exclude_self)} images to search among, got {keys.shape[0]}")
    device = torch.device(device) if device is not None else keys.device
    keys_t = keys.to(device, torch.float32).T.contiguous()  # (D, Nk)
    sims, idx = [], []
    for start in tqdm(range(0, queries.shape[0], batch_size), desc="search", leave=False, disable=not progress):
        q = queries[start:start + batch_size].to(device, torch.float32)
        s = q @ keys_t  # (b, Nk)
        if exclude_self:
            rows = torch.arange(q.shape[0], device=device)
            s[rows, rows + start] = float("-inf")
        v, i = s.topk(k, dim=1)
        sims.append(v.cpu())
        idx.append(i.cpu())
    return torch.cat(sims), torch.cat(idx)


def replication_stats(similarities, threshold):
    """Somepalli et al.'s statistics of top-1 similarities: n, mean, 75/90/95th percentiles, fraction > threshold."""
    s = np.asarray(similarities, dtype=np.float64)
    if s.size == 0:
        return {"n": 0}
    stats = {"n": int(s.size), "mean": float(s.mean())}
    stats.update({f"p{q}": float(np.percentile(s, q)) for q in PERCENTILES})
    stats["fraction_above"] = float((s > threshold).mean())
    return stats


def calibrate_threshold(background, quantile):
    """A replication threshold for features that are not SSCD: the `quantile` of the train-to-train background."""
    if not 0 < quantile < 1:
        raise UsageError(f"--threshold-quantile {quantile} is outside (0, 1): e.g. 0.95")
    return float(np.quantile(np.asarray(background, dtype=np.float64), quantile))


# ----------------------------------------------------------------------------------------------------------------
# Ranking the training images.

def rank_by_generations(top1_rows, top1_similarity, threshold, top=None):
    """Training rows ranked by how strongly the generations copy them. A row's score is the highest similarity of a
    generation whose top-1 match it is; ties go to the row matched (above the threshold) by more generations, then to
    the lower row. Listed: rows matched above the threshold, or the `top` best of all matched rows.
    Returns dicts {row, score, count (generations matching above the threshold), generation (the closest)}."""
    best = {}
    for g, (j, s) in enumerate(zip(np.asarray(top1_rows).tolist(), np.asarray(top1_similarity).tolist())):
        b = best.setdefault(j, {"row": j, "score": -np.inf, "count": 0, "generation": g})
        if s > b["score"]:
            b["score"], b["generation"] = s, g
        b["count"] += int(s > threshold)
    ranked = sorted(best.values(), key=lambda b: (-b["score"], -b["count"], b["row"]))
    return ranked[:top] if top is not None else [b for b in ranked if b["score"] > threshold]


def rank_by_train_duplicates(nn_similarity, nn_rows, threshold, top=None):
    """Training rows ranked by the similarity to their nearest other training image (the paper's duplicates, after
    Somepalli et al.), ties to the lower row. Listed: rows above the threshold, or the `top` best.
    Returns dicts {row, score, nearest (row of the nearest other training image)}."""
    s = np.asarray(nn_similarity, dtype=np.float64)
    order = np.lexsort((np.arange(len(s)), -s))
    ranked = [{"row": int(j), "score": float(s[j]), "nearest": int(nn_rows[j])} for j in order]
    return ranked[:top] if top is not None else [b for b in ranked if b["score"] > threshold]


def ranking_entry(b, ids):
    """A ranked row as JSON, rows replaced by training ids."""
    entry = {"id": ids[b["row"]], **{k: v for k, v in b.items() if k != "row"}}
    if "nearest" in entry:
        entry["nearest"] = ids[entry["nearest"]]
    return entry


def write_ids(path, ids, comments=(), notes=None, training_set=None):
    """The ids file of `poison.py --duplicates`: '#' comment lines, then one id a line, most replicated first (a
    trailing '# ...' note per id is allowed). `training_set` (the "training_set" fingerprint of poison.py's training
    manifest) becomes the header line '# training set: ...', which poison.py checks against the set it poisons."""
    lines = [f"# {IDS_TRAINING_SET} {training_set}"] if training_set else []
    lines += [f"# {c}" for c in comments]
    for n, i in enumerate(ids):
        lines.append(f"{int(i)}" + (f"  # {notes[n]}" if notes else ""))
    Path(path).write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------------------------------------
# Figures.

FIG5_POINTS = 200  # the paper's Fig. 5 shows each run's 200 generations most similar to the training set


def fig5_points(run, top=FIG5_POINTS):
    """(x, y) of the paper's Fig. 5 for one run: x = similarity(generation A, its top-1 training image B), y =
    similarity(B, B's nearest other training image C), for the `top` generations with the highest x."""
    x, y = np.asarray(run["top1_similarity"]), np.asarray(run["match_nn_similarity"])
    keep = np.argsort(-x, kind="stable")[:top]
    return x[keep], y[keep]


def plot_fig5(runs, threshold, features_label, path):
    """The paper's Fig. 5: fig5_points of each run (poison random, poison duplicates), one colour per run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for (name, run), color in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        x, y = fig5_points(run)
        ax.scatter(x, y, s=8, alpha=0.5, color=color,
                   label=f"poison {name} (top {len(x)} of {len(run['top1_similarity'])} generations)")
    ax.axvline(threshold, color="gray", ls="--", lw=1)
    ax.axhline(threshold, color="gray", ls=":", lw=1)
    ax.set_xlabel("generation A <-> its top-1 training image B")
    ax.set_ylabel("B <-> its nearest other training image C")
    ax.set_title(f"Replication vs duplication, top {FIG5_POINTS} per run (threshold {threshold:.3f})\n"
                 f"{features_label}", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_triplets(triplets, path, features_label):
    """Rows of (A generation, B its top-1 training image, C B's nearest other training image), with similarities."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = max(1, len(triplets))
    height = 1.8 * rows + 0.6
    fig, axes = plt.subplots(rows, 3, figsize=(5.5, height), squeeze=False)
    for r, t in enumerate(triplets):
        titles = (f"{t['run']}: A gen #{t['generation']}", f"B train id {t['train_id']}\nsim(A,B) {t['sim_ab']:.3f}",
                  f"C train id {t['nn_id']}\nsim(B,C) {t['sim_bc']:.3f}")
        for c, (image, title) in enumerate(zip((t["a"], t["b"], t["c"]), titles)):
            axes[r, c].imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
            axes[r, c].set_title(title, fontsize=7)
            axes[r, c].axis("off")
    for ax in axes.flat[3 * len(triplets):]:
        ax.axis("off")
    fig.suptitle(f"(A, B, C) triplets, most similar first\n{features_label}", fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / height))
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Table A5: G1 and G2 of "poison random" vs "poison duplicates" (measured by dissect.py on the two generation folders),
# beside the replication of each run.

def manifest_trigger_kind(manifest):
    t = (manifest or {}).get("trigger")
    return t.get("kind") if isinstance(t, dict) else t


def table_a5_target(gen, duplicates_gen, train, duplicates_train=None, target=None, detector_config=None):
    """Check that the two runs of Table A5 can be compared and return their target class name: --gen and
    --duplicates-gen are different folders; every manifest that names a target class (both generation folders, both
    training sets) and `target` name the same one; --gen's training set was not poisoned with --select duplicates,
    nor --duplicates-train with --select random; the trigger detector's trigger is the training sets'."""
    if Path(gen).resolve() == Path(duplicates_gen).resolve():
        raise UsageError(f"--gen and --duplicates-gen are the same folder {gen}: give the generations of the model "
                             "trained on the randomly poisoned set and of the one trained on the duplicates-poisoned "
                             "set")
    manifests = {"--gen": load_folder(gen).manifest, "--duplicates-gen": load_folder(duplicates_gen).manifest,
                 "--train": dissect.read_train_manifest(train)}
    if duplicates_train is not None:
        manifests["--duplicates-train"] = dissect.read_train_manifest(duplicates_train)
    named = {flag: manifest_target(m) for flag, m in manifests.items() if manifest_target(m) is not None}
    if target is not None:
        named["--target"] = str(target)
    if not named:
        raise UsageError("no manifest names the target class (neither --gen's nor --duplicates-gen's nor their "
                             "training sets'): pass --target NAME")
    if len({t.lower() for t in named.values()}) > 1:
        said = ", ".join(f"{flag} {t!r}" for flag, t in named.items())
        raise UsageError(f"mismatched target classes ({said}): Table A5 compares two runs poisoned for one target; "
                             f"give matching folders{', or drop --target' if target is not None else ''}")
    for flag, wrong, right in (("--train", "duplicates", "random"), ("--duplicates-train", "random", "duplicates")):
        select = dissect.find_setting(manifests.get(flag) or {}, ("select",))
        if select == wrong:
            raise UsageError(f"{flag} was poisoned with --select {wrong} (its manifest), but it is the "
                                 f"'{RUN_LABELS[right]}' run: swap the --gen/--train and "
                                 "--duplicates-gen/--duplicates-train folders")
    detector_kind = manifest_trigger_kind(detector_config)
    for flag in ("--train", "--duplicates-train"):
        kind = manifest_trigger_kind(manifests.get(flag))
        if detector_kind is not None and kind is not None and kind != detector_kind:
            raise UsageError(f"the trigger detector knows a {detector_kind} trigger but {flag} carries a {kind} "
                                 "one: train a detector on this poisoned set (classify.py trigger-detector)")
    return next(iter(named.values()))


def table_a5(dissected, runs, threshold):
    """Table A5 as a dict: a row per run (dissect.py's groups of its target-prompt generations, trigger ratio, p_t,
    amplification, and the run's replication statistics) and the difference duplicates - random."""
    rows = {}
    for name, result in zip(RUN_LABELS, dissected):
        g, run = result["target_prompt"], runs[name]
        rows[name] = {
            "run": RUN_LABELS[name], "generations": result["folder"], "train": run["train"],
            "p_t_source": result["p_t_source"], "n_target_prompt": g["n"], "counts": g["counts"],
            **{k: g["fractions"][k] for k in dissect.GROUPS},
            "trigger_ratio": result["trigger_ratio"], "p_t": result["p_t"], "amplification": result["amplification"],
            "replication": {"all": run["stats"], "target_prompt": run["target_prompt_stats"],
                            "top1_poisoned_fraction": run["top1_poisoned_fraction"]}}
    r, d = rows["random"], rows["duplicates"]

    def diff(a, b):
        return None if a is None or b is None else b - a

    difference = {k: diff(r[k], d[k]) for k in (*dissect.GROUPS, "trigger_ratio", "p_t", "amplification")}
    for scope in ("all", "target_prompt"):
        difference[f"replication_{scope}_mean"] = diff(r["replication"][scope].get("mean"),
                                                       d["replication"][scope].get("mean"))
        difference[f"replication_{scope}_fraction_above"] = diff(r["replication"][scope].get("fraction_above"),
                                                                 d["replication"][scope].get("fraction_above"))
    return {"target": dissected[0]["target"], "threshold": threshold, "rows": rows,
            "difference_duplicates_minus_random": difference, "paper": PAPER_TABLE_A5}


def pct(x, signed=False):
    return "–" if x is None else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}%")


def table_a5_markdown(table, features_label, classifier, detector):
    rows, diff = table["rows"], table["difference_duplicates_minus_random"]
    lines = [f"## Table A5: poison random vs poison duplicates (target class {table['target']})", "",
             f"G1 (trigger, prompt mismatched) and G2 (trigger, prompt matched) of the target-prompt generations, by "
             f"dissect.py with the class classifier {classifier} and the trigger detector {detector}; replication "
             f"with {features_label}, threshold {table['threshold']:.4f}.", "",
             "| run | n (target prompt) | G1 | G2 | G1+G2 | p_t | (G1+G2)/p_t | mean top-1 sim | > threshold | "
             "> threshold (target prompt) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows.values():
        rep = row["replication"]
        amp = "–" if row["amplification"] is None else f"{row['amplification']:.2f}x"
        lines.append(f"| {row['run']} | {row['n_target_prompt']} | {pct(row['G1'])} | {pct(row['G2'])} | "
                     f"{pct(row['trigger_ratio'])} | {pct(row['p_t'])} | {amp} | {fmt(rep['all'].get('mean'))} | "
                     f"{pct(rep['all'].get('fraction_above'))} | {pct(rep['target_prompt'].get('fraction_above'))} |")
    amp = "–" if diff["amplification"] is None else f"{diff['amplification']:+.2f}"
    mean = "–" if diff["replication_all_mean"] is None else f"{diff['replication_all_mean']:+.4f}"
    lines.append(f"| duplicates − random | | {pct(diff['G1'], True)} | {pct(diff['G2'], True)} | "
                 f"{pct(diff['trigger_ratio'], True)} | {pct(diff['p_t'], True)} | {amp} | {mean} | "
                 f"{pct(diff['replication_all_fraction_above'], True)} | "
                 f"{pct(diff['replication_target_prompt_fraction_above'], True)} |")
    paper = table["paper"]
    sources = "; ".join(f"{row['run']}: {row['p_t_source'] or 'unknown'}" for row in rows.values())
    lines += ["", "Differences of shares are in percentage points.  ",
              f"p_t from: {sources}. Per-run reports (verdicts, G1/G2 example grids): `dissect/`.  ",
              f"The paper's Tab. A5 ({paper['setting']}): G1 {pct(paper['random']['G1'])} → "
              f"{pct(paper['duplicates']['G1'])}, G2 {pct(paper['random']['G2'])} → {pct(paper['duplicates']['G2'])}.",
              ""]
    return "\n".join(lines)


def plot_table_a5(table, path):
    """Left: G1 and G2 stacked per run, G1 + G2 against p_t (black tick). Right: the fraction of generations above the
    replication threshold per run, over all generations and over the target-prompt ones."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = list(table["rows"].values())
    x = np.arange(len(rows))
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 4))
    g1, g2 = [r["G1"] for r in rows], [r["G2"] for r in rows]
    ax.bar(x, g1, 0.5, color=dissect.GROUP_COLORS["G1"], label="G1 (trigger, mismatch)")
    ax.bar(x, g2, 0.5, bottom=g1, color=dissect.GROUP_COLORS["G2"], label="G2 (trigger, match)")
    for i, r in enumerate(rows):
        ax.text(i, r["trigger_ratio"] + 0.02, f"G1 {pct(r['G1'])}\nG2 {pct(r['G2'])}", ha="center", fontsize=8)
        if r["p_t"] is not None:
            ax.hlines(r["p_t"], i - 0.3, i + 0.3, color="black", lw=2, zorder=3,
                      label="p_t (trigger share in training)" if i == 0 else None)
    ax.set_xticks(x, [r["run"] for r in rows])
    ax.set_ylim(0, 1.1)
    ax.set_ylabel(f"share of target-prompt generations ({table['target']})")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("Trojan horses: G1 and G2", fontsize=9)
    width = 0.35
    every = [r["replication"]["all"].get("fraction_above", 0) for r in rows]
    target = [r["replication"]["target_prompt"].get("fraction_above", 0) for r in rows]
    bx.bar(x - width / 2, every, width, color="tab:gray", label="all generations")
    bx.bar(x + width / 2, target, width, color="tab:purple", label="target-prompt generations")
    for i, r in enumerate(rows):
        bx.text(i, max(every[i], target[i]) + 0.01, f"mean top-1 {fmt(r['replication']['all'].get('mean'))}",
                ha="center", fontsize=8)
    bx.set_xticks(x, [r["run"] for r in rows])
    bx.set_ylim(0, min(1.0, max(every + target + [0.05]) * 1.3 + 0.02))
    bx.set_ylabel(f"fraction > threshold {table['threshold']:.3f}")
    bx.legend(fontsize=7, loc="upper left")
    bx.set_title("Replication", fontsize=9)
    fig.suptitle("Table A5: poison random vs poison duplicates", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# The stage.

def fmt(x):
    return "–" if x is None else f"{x:.4f}"


def markdown_report(result):
    f = result["features"]
    lines = ["# Data replication (replicate.py)", "",
             f"Features: **{f['label']}**{' — a proxy: numbers are not comparable to SSCD' if f['proxy'] else ''}.  ",
             f"Threshold: **{f['threshold']:.4f}** ({f['threshold_source']}).", "",
             "| set | n | mean | 75th pct | 90th pct | 95th pct | > threshold | top-1 match poisoned | same label |",
             "|---|---|---|---|---|---|---|---|---|"]
    bg = result["train"]["background"]
    lines.append(f"| train ↔ nearest other train (background) | {bg['n']} | {fmt(bg['mean'])} | {fmt(bg['p75'])} | "
                 f"{fmt(bg['p90'])} | {fmt(bg['p95'])} | {100 * bg['fraction_above']:.2f}% | – | – |")
    for name, run in result["runs"].items():
        s = run["stats"]
        lines.append(f"| poison {name}: generation ↔ top-1 train | {s['n']} | {fmt(s['mean'])} | {fmt(s['p75'])} | "
                     f"{fmt(s['p90'])} | {fmt(s['p95'])} | {100 * s['fraction_above']:.2f}% | "
                     f"{100 * run['top1_poisoned_fraction']:.2f}% | {100 * run['top1_same_label_fraction']:.2f}% |")
    d = result["duplicates_file"]
    lines += ["", f"`duplicates.txt`: {d['n_ids']} training ids ranked by **{d['rank_by']}** ({d['rule']}).", ""]
    return "\n".join(lines)


def replicate(out, train, gen=None, duplicates_gen=None, duplicates_train=None, features="auto", sscd=None,
              proxy_weights="auto", pixel_size=32, threshold=None, threshold_quantile=0.95,
              rank_by="auto", top=None, triplets=6, batch_size=64, search_batch_size=1024, workers=0,
              device="auto", cache=None, force=False, command=None, quiet=False, progress=True, classifier=None,
              detector=None, target=None):
    """Copy detection of `gen` (and `duplicates_gen`) against `train` (and `duplicates_train`); with `classifier` and
    `detector` (folders, or (model, config) pairs as classify.load_classifier returns them) also Table A5 of the two
    runs through dissect.py. Writes OUT (see the module docstring) and returns a summary."""
    if threshold is not None and not -1 <= threshold <= 1:
        raise UsageError(f"--threshold {threshold} is outside [-1, 1], where cosine similarities lie: e.g. 0.5, "
                             "SSCD's")
    if rank_by == "auto":
        rank_by = "generations" if gen is not None else "train-duplicates"
    if rank_by not in RANK_BY:
        raise UsageError(f"unknown --rank-by {rank_by!r}: choose {' or '.join(RANK_BY)}")
    if rank_by == "generations" and gen is None:
        raise UsageError("--rank-by generations needs --gen GEN_DIR (generations of a model trained on --train)")
    if duplicates_train is not None and duplicates_gen is None:
        raise UsageError("--duplicates-train is the training set of --duplicates-gen: give --duplicates-gen too")
    if top is not None and top < 1:
        raise UsageError(f"--top {top}: give a positive number of ids")
    with_table = classifier is not None or detector is not None
    if with_table and (classifier is None or detector is None):
        given, missing = ("--classifier", "--detector") if detector is None else ("--detector", "--classifier")
        raise UsageError(f"Table A5 needs both --classifier (classify.py train --clean) and --detector "
                             f"(classify.py trigger-detector): {given} was given, add {missing}")
    if with_table and (gen is None or duplicates_gen is None):
        missing = " and ".join(flag for flag, v in (("--gen", gen), ("--duplicates-gen", duplicates_gen)) if v is None)
        raise UsageError(f"Table A5 compares two runs, poison random (--gen) and poison duplicates "
                             f"(--duplicates-gen): add {missing}")
    if target is not None and not with_table:
        raise UsageError("--target is the target class of Table A5: give --classifier and --detector too, or "
                             "drop it")
    check_out(out, force, {"--train": train, "--gen": gen, "--duplicates-gen": duplicates_gen,
                           "--duplicates-train": duplicates_train, "--classifier": classifier, "--detector": detector,
                           "--cache": cache, "--sscd": None if sscd == "download" else sscd, "--proxy-weights":
                           None if proxy_weights in ("auto", "download", "random") else proxy_weights})
    sets = {flag: load_folder(folder) for flag, folder in  # fail on a bad folder before any work
            (("--train", train), ("--gen", gen), ("--duplicates-gen", duplicates_gen),
             ("--duplicates-train", duplicates_train)) if folder is not None}
    for flag, ds in sets.items():  # the label comparisons need the training set's classes, in its order
        if not same_classes(ds.class_names, sets["--train"].class_names):
            raise UsageError(f"{flag} {ds.root} holds the classes {ds.class_names}, --train {train} "
                                 f"{sets['--train'].class_names}: give folders of one dataset")
    dev = resolve_device(device)
    if with_table:  # every check of Table A5's input before any long computation
        clf, det = dissect.as_model(classifier, dev), dissect.as_model(detector, dev)
        target_name = table_a5_target(gen, duplicates_gen, train, duplicates_train, target, det[1])
    extractor = load_extractor(features, sscd, proxy_weights, pixel_size, dev)
    if extractor.key.startswith("proxy-random") and proxy_weights == "auto" and not quiet:
        print("replicate.py: warning: no ImageNet ResNet-50 weights in torchvision's cache, so the proxy has random "
              "weights and finds exact copies only: pass --sscd FILE, --proxy-weights download|FILE, or "
              "--features pixels for small images such as digits", file=sys.stderr)
    with atomic_output(out, force) as tmp:
        dissected = None
        if with_table:
            dissected = dissect.dissect([gen, duplicates_gen], clf, det, tmp / "dissect",
                                        train=[train, duplicates_train], target=target_name,
                                        labels=list(RUN_LABELS.values()), batch_size=batch_size, device=dev,
                                        progress=progress and not quiet,
                                        command=command or "replicate(classifier=..., detector=...)")["results"]
        read_dirs = [Path(cache)] if cache else [Path(out) / "features", tmp / "features"]
        write_dir = Path(cache) if cache else tmp / "features"
        embedded, sources = {}, {}

        def embed(folder):
            key = str(Path(folder).resolve())
            if key not in embedded:
                f, ds, source = embed_folder(folder, extractor, dev, read_dirs, write_dir, batch_size, workers,
                                             progress)
                embedded[key], sources[str(folder)] = (f, ds), source
            return embedded[key]

        def search(q, k, exclude_self=False):
            return topk_cosine(q, k, 1, exclude_self, search_batch_size, dev, progress)

        train_feats, train_ds = embed(train)
        nn_sim, nn_row = (t[:, 0] for t in search(train_feats, train_feats, exclude_self=True))
        if threshold is not None:
            thr, thr_source = float(threshold), "--threshold"
        elif extractor.threshold is not None:
            thr, thr_source = extractor.threshold, "SSCD's 0.5, as Somepalli et al."
        else:
            thr = calibrate_threshold(nn_sim.numpy(), threshold_quantile)
            thr_source = (f"recalibrated: the {threshold_quantile:g} quantile of the train-to-train background, "
                          "as these features are not SSCD's")

        runs, run_data = {}, {}
        for name, gen_dir, train_dir in (("random", gen, train), ("duplicates", duplicates_gen,
                                                                  duplicates_train or train)):
            if gen_dir is None:
                continue
            g_feats, g_ds = embed(gen_dir)
            t_feats, t_ds = embed(train_dir)
            if Path(train_dir).resolve() == Path(train).resolve():
                t_nn_sim, t_nn_row = nn_sim, nn_row
            else:
                t_nn_sim, t_nn_row = (t[:, 0] for t in search(t_feats, t_feats, exclude_self=True))
            sim, row = (t[:, 0] for t in search(g_feats, t_feats))
            ids = training_ids(t_ds)
            poisoned = np.array([bool(r.get("poisoned", False)) for r in t_ds.records])
            t_labels, g_labels = t_ds.labels.numpy(), g_ds.labels.numpy()
            runs[name] = {
                "gen": str(gen_dir), "train": str(train_dir), "stats": replication_stats(sim.numpy(), thr),
                "top1_poisoned_fraction": float(poisoned[row.numpy()].mean()),
                "top1_same_label_fraction": float((t_labels[row.numpy()] == g_labels).mean()),
                "top1_id": [ids[j] for j in row.tolist()],
                "top1_similarity": [round(v, 6) for v in sim.tolist()],
                "match_nn_id": [ids[j] for j in t_nn_row[row].tolist()],
                "match_nn_similarity": [round(v, 6) for v in t_nn_sim[row].tolist()]}
            if dissected is not None:  # the replication of the generations Table A5's G1-G4 are measured on
                lowered = [c.lower() for c in g_ds.class_names]
                is_target = g_labels == lowered.index(dissected[0]["target"].lower())
                runs[name]["target_prompt_stats"] = replication_stats(sim.numpy()[is_target], thr)
            run_data[name] = (g_ds, t_ds, sim, row, t_nn_sim, t_nn_row, ids)

        ids = training_ids(train_ds)
        if rank_by == "generations":
            _, _, sim, row, _, _, _ = run_data["random"]
            ranked = rank_by_generations(row.numpy(), sim.numpy(), thr, top)
            rule = ("score = the highest similarity of a generation whose top-1 match it is; "
                    + (f"the top {top}" if top else "those above the threshold"))
            notes = [f"score {b['score']:.5f}, generations above threshold: {b['count']}, closest generation "
                     f"#{b['generation']}" for b in ranked]
        else:
            ranked = rank_by_train_duplicates(nn_sim.numpy(), nn_row.numpy(), thr, top)
            rule = ("score = the similarity to the nearest other training image; "
                    + (f"the top {top}" if top else "those above the threshold"))
            notes = [f"score {b['score']:.5f}, nearest training id {ids[b['nearest']]}" for b in ranked]
        dup_ids = [ids[b["row"]] for b in ranked]
        write_ids(tmp / "duplicates.txt", dup_ids,
                  [f"replicate.py: training ids of {train}, most replicated first (rank by {rank_by})",
                   f"features: {extractor.label}; threshold {thr:.5f} ({thr_source})",
                   "read by: poison.py --select duplicates --duplicates THIS_FILE (target-class ids are skipped)"],
                  notes, training_set=train_ds.manifest.get("training_set"))

        if runs:
            plot_fig5(runs, thr, extractor.label, tmp / "fig5_scatter.png")
            shown = []
            for name, (g_ds, t_ds, sim, row, t_nn_sim, t_nn_row, t_ids) in run_data.items():
                for g in torch.argsort(sim, descending=True, stable=True)[:triplets].tolist():
                    b = int(row[g])
                    c = int(t_nn_row[b])
                    shown.append({"run": name, "generation": g, "train_id": t_ids[b], "nn_id": t_ids[c],
                                  "sim_ab": float(sim[g]), "sim_bc": float(t_nn_sim[b]),
                                  "a": g_ds.image_uint8(g), "b": t_ds.image_uint8(b), "c": t_ds.image_uint8(c)})
            if shown:
                plot_triplets(shown, tmp / "triplets.png", extractor.label)

        table = None
        if dissected is not None:
            table = table_a5(dissected, runs, thr)
            table_md = table_a5_markdown(table, extractor.label, classifier if isinstance(classifier, (str, Path))
                                         else "(given)", detector if isinstance(detector, (str, Path)) else "(given)")
            (tmp / "table_a5.json").write_text(json.dumps(
                {"stage": "replicate", "table": "A5", "command": command or "replicate()",
                 "classifier": str(classifier) if isinstance(classifier, (str, Path)) else None,
                 "detector": str(detector) if isinstance(detector, (str, Path)) else None,
                 "features": extractor.label, **table}, indent=1) + "\n")
            (tmp / "table_a5.md").write_text(table_md)
            plot_table_a5(table, tmp / "table_a5.png")

        result = {
            "stage": "replicate", "command": command or "replicate()",
            "features": {"kind": extractor.kind, "key": extractor.key, "label": extractor.label,
                         "proxy": extractor.is_proxy, "threshold": thr, "threshold_source": thr_source,
                         "pixel_size": pixel_size if extractor.kind == "pixels" else None},
            "train": {"folder": str(train), "n": len(train_ds),
                      "background": replication_stats(nn_sim.numpy(), thr)},
            "runs": runs,
            "duplicates_file": {"path": "duplicates.txt", "rank_by": rank_by, "rule": rule, "top": top,
                                "n_ids": len(dup_ids), "training_set": train_ds.manifest.get("training_set"),
                                "ranked": [ranking_entry(b, ids) for b in ranked[:1000]]},
            "table_a5": table,
            "feature_sources": sources,
            "options": {"features": features, "sscd": str(sscd) if sscd else None, "proxy_weights": proxy_weights,
                        "threshold": threshold, "threshold_quantile": threshold_quantile, "rank_by": rank_by,
                        "top": top, "device": str(dev),
                        "classifier": str(classifier) if isinstance(classifier, (str, Path)) else None,
                        "detector": str(detector) if isinstance(detector, (str, Path)) else None, "target": target},
            "versions": versions()}
        (tmp / "replication.json").write_text(json.dumps(result, indent=1) + "\n")
        (tmp / "replication.md").write_text(markdown_report(result) + ("\n" + table_md if table else ""))
    summary = {"out": str(out), "features": extractor.label, "proxy": extractor.is_proxy, "threshold": round(thr, 6),
               "background": result["train"]["background"], "runs": {k: v["stats"] for k, v in runs.items()},
               "duplicates": len(dup_ids), "rank_by": rank_by,
               "cache_hits": sum(s != "computed" for s in sources.values())}
    if table is not None:
        summary["table_a5"] = {name: {"G1": row["G1"], "G2": row["G2"], "trigger_ratio": row["trigger_ratio"],
                                      "p_t": row["p_t"], "amplification": row["amplification"],
                                      "fraction_above": row["replication"]["all"]["fraction_above"]}
                               for name, row in table["rows"].items()}
    if not quiet:
        print(json.dumps(summary))
    return summary


def main(args):
    replicate(args.out, args.train, gen=args.gen, duplicates_gen=args.duplicates_gen,
              duplicates_train=args.duplicates_train, features=args.features, sscd=args.sscd,
              proxy_weights=args.proxy_weights, pixel_size=args.pixel_size, threshold=args.threshold,
              threshold_quantile=args.threshold_quantile, rank_by=args.rank_by, top=args.top, triplets=args.triplets,
              batch_size=args.batch_size, search_batch_size=args.search_batch_size, workers=args.workers,
              device=args.device, cache=args.cache, force=args.force,
              command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), classifier=args.classifier,
              detector=args.detector, target=args.target)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--train", required=True, help="training dataset folder (poison.py's OUT/train)")
    p.add_argument("--gen", "--random", dest="gen", default=None,
                   help="generations (sample.py) of a model trained on --train: the 'poison random' run")
    p.add_argument("--duplicates-gen", default=None,
                   help="generations of a model trained with --select duplicates: the 'poison duplicates' run")
    p.add_argument("--duplicates-train", default=None,
                   help="the training set of --duplicates-gen (None: the same as --train)")
    p.add_argument("--classifier", default=None,
                   help="Table A5: the class classifier folder (classify.py train --clean); needs --detector, --gen "
                        "and --duplicates-gen")
    p.add_argument("--detector", default=None,
                   help="Table A5: the trigger detector folder (classify.py trigger-detector); needs --classifier")
    p.add_argument("--target", default=None,
                   help="Table A5: the target class name (default: from the manifests, which must agree)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out (its cached features are reused)")
    p.add_argument("--features", default="auto", choices=FEATURES,
                   help="copy-detection features: auto = sscd when --sscd is given, else proxy")
    p.add_argument("--sscd", default=None, help="SSCD TorchScript file (sscd_disc_mixup.torchscript.pt) or 'download'")
    p.add_argument("--proxy-weights", default="auto",
                   help="proxy ResNet-50 weights: auto (torchvision's cache, else random), download, random, or FILE")
    p.add_argument("--pixel-size", type=positive(int), default=32,
                   help="--features pixels: side the images are resized to")
    p.add_argument("--threshold", type=float, default=None,
                   help="replication threshold (default: 0.5 for SSCD, else recalibrated from the background)")
    p.add_argument("--threshold-quantile", type=float, default=0.95,
                   help="quantile of the train-to-train background that recalibrates a non-SSCD threshold")
    p.add_argument("--rank-by", default="auto", choices=("auto",) + RANK_BY,
                   help="generations: copied by --gen (auto when --gen is given); train-duplicates: near-duplicates "
                        "within --train (auto otherwise)")
    p.add_argument("--top", type=positive(int), default=None, help="list the top K ids whatever the threshold")
    p.add_argument("--triplets", type=int, default=6, help="(A, B, C) triplets shown per run in triplets.png")
    p.add_argument("--batch-size", type=positive(int), default=64,
                   help="images per feature-extraction batch (and per classifier batch of Table A5)")
    p.add_argument("--search-batch-size", type=positive(int), default=1024,
                   help="query rows per similarity matrix product")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="image-loading processes")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--cache", default=None, help="a feature-cache folder shared between runs (default: OUT/features)")
    return p


if __name__ == "__main__":
    try:
        main(build_parser().parse_args())
    except UsageError as e:
        sys.exit(f"replicate.py: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print("replicate.py: interrupted; --out not written (outputs appear whole or not at all)", file=sys.stderr)
        sys.exit(130)
