"""replicate.py -- copy detection as Somepalli et al. (Fig. 5, Tab. A5): which training images are replicated.

    python replicate.py --train data/d-0.1/train --gen runs/gen-0.1 --features pixels --out runs/rep
    python replicate.py --train data/d-0.1/train --gen runs/gen-0.1 --duplicates-train data/d-0.1-dup/train \\
        --duplicates-gen runs/gen-0.1-dup --classifier runs/clf-class --detector runs/detector --out runs/rep-a5

Writes OUT/replication.json, .md, duplicates.txt (ids for poison.py --select duplicates), fig5_scatter.png,
triplets.png, features/ (cache); with --classifier and --detector Table A5: table_a5.json, .md, .png, dissect/.
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
from safetensors.torch import load_file
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import dissect
from common import (HelpFormatter, UsageError, atomic_output, check_out, cli, load_folder, manifest_target, positive,
                    replace_file, resolve_device, same_classes, save_safetensors, versions)
from poison import IDS_TRAINING_SET

SSCD_URL = "https://dl.fbaipublicfiles.com/sscd-copy-detection/sscd_disc_mixup.torchscript.pt"
SSCD_THRESHOLD = 0.5       # Somepalli et al.: a replica when the SSCD cosine > 0.5
RESIZE, CROP = 256, 224    # Somepalli et al.: Resize 256 -> CenterCrop 224 -> Normalize(0.5, 0.5)
GEM_P = 3.0                # SSCD's generalised-mean pooling exponent
PROXY_SEED = 0             # the random-weight proxy is seeded: its features are reproducible
PERCENTILES = (75, 90, 95)  # Somepalli et al.'s reported percentiles
FIG5_POINTS = 200          # Fig. 5 shows each run's 200 generations most similar to the training set
RANK_BY = ("train-duplicates", "generations")
FEATURES = ("auto", "sscd", "proxy", "pixels")
RUN_LABELS = dict(random="poison random", duplicates="poison duplicates")  # Table A5's rows
PAPER_TABLE_A5 = dict(setting="ImageNette, BadNets, p = 10%, Stable Diffusion", random=dict(G1=0.540, G2=0.194),
                      duplicates=dict(G1=0.545, G2=0.197))


# Copy-detection features: images -> (B, D) L2-normalised float32, so cosine similarity is a dot product.

def copy_detection_preprocess(image):  # (3, H, W) uint8 -> (3, 224, 224) float, as Somepalli et al.
    x = TF.center_crop(TF.resize(image, [RESIZE], antialias=True), [CROP])
    return (x.float() / 255.0 - 0.5) / 0.5


def pixel_preprocess(image, size):  # (3, H, W) uint8 -> (3, size, size) in [0, 1]
    return TF.resize(image.float() / 255.0, [size, size], antialias=True)


class GeM(nn.Module):  # generalised-mean pooling (Radenovic et al.), as in SSCD: (mean of x^p)^(1/p)
    def __init__(self, p=GEM_P, eps=1e-6):
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x):  # (B, C, h, w) -> (B, C)
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class ProxyNet(nn.Module):  # SSCD without its projection: (B, 3, 224, 224) -> (B, 2048)
    def __init__(self, state_dict=None):
        super().__init__()
        import torchvision
        resnet = torchvision.models.resnet50(weights=None)
        if state_dict is not None:
            own = resnet.state_dict()
            missing, unexpected = sorted(set(own) - set(state_dict)), sorted(set(state_dict) - set(own))
            reshaped = [k for k in own if k in state_dict and own[k].shape != state_dict[k].shape]
            if missing or unexpected or reshaped:
                raise UsageError(f"--proxy-weights is no resnet50 ({(missing + unexpected + reshaped)[:4]}): give "
                                 "torchvision's")
            resnet.load_state_dict(state_dict)
        self.trunk = nn.Sequential(*list(resnet.children())[:-2])  # up to layer4: (B, 2048, 7, 7)
        self.pool = GeM()

    def forward(self, x):
        return self.pool(self.trunk(x))


@dataclass
class Extractor:
    kind: str                # "sscd" | "proxy" | "pixels"
    key: str                 # in the cache file name: it changes whenever the features would
    label: str               # what every output calls these features
    preprocess: object       # (3, H, W) uint8 -> float tensor, picklable (DataLoader workers)
    model: nn.Module = None  # None for pixels
    threshold: float = None  # SSCD's 0.5, or None: recalibrate from the background

    @property
    def is_proxy(self):
        return self.kind != "sscd"

    @torch.no_grad()
    def __call__(self, x):  # (B, ...) on the model's device -> (B, D)
        if self.model is None:
            f = x.flatten(1)
            f = f - f.mean(dim=1, keepdim=True)  # mean-centred: cosine = Pearson correlation of the pixels
        else:
            f = self.model(x)
            f = f[0] if isinstance(f, (tuple, list)) else f
            if not torch.is_tensor(f) or f.ndim != 2 or f.shape[0] != x.shape[0]:
                raise UsageError(f"the {self.kind} model gave no (batch, features): give SSCD's")
        return F.normalize(f.float(), dim=1)


# Similarity search, statistics, rankings.

@torch.no_grad()
def topk_cosine(queries, keys, k=1, exclude_self=False, batch_size=1024, device=None, progress=False):
    """(sims, rows) (Nq, k) of the k nearest keys; exclude_self: row i skips itself."""
    k = min(k, keys.shape[0] - int(exclude_self))
    if k < 1:
        raise UsageError(f"{keys.shape[0]} images to search: give at least {1 + int(exclude_self)}")
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


def replication_stats(similarities, threshold):  # Somepalli et al.'s statistics of top-1 similarities
    s = np.asarray(similarities, dtype=np.float64)
    if s.size == 0:
        return {"n": 0}
    return {"n": int(s.size), "mean": float(s.mean()), **{f"p{q}": float(np.percentile(s, q)) for q in PERCENTILES},
            "fraction_above": float((s > threshold).mean())}


def calibrate_threshold(background, quantile):  # features other than SSCD's: a quantile of the background
    if not 0 < quantile < 1:
        raise UsageError(f"--threshold-quantile {quantile} is outside (0, 1): give e.g. 0.95")
    return float(np.quantile(np.asarray(background, dtype=np.float64), quantile))


def rank_by_generations(top1_rows, top1_similarity, threshold, top=None):  # by best match; `top` or > threshold
    best = {}
    for g, (j, s) in enumerate(zip(np.asarray(top1_rows).tolist(), np.asarray(top1_similarity).tolist())):
        b = best.setdefault(j, dict(row=j, score=-np.inf, count=0, generation=g))
        if s > b["score"]:
            b["score"], b["generation"] = s, g
        b["count"] += int(s > threshold)
    ranked = sorted(best.values(), key=lambda b: (-b["score"], -b["count"], b["row"]))
    return ranked[:top] if top is not None else [b for b in ranked if b["score"] > threshold]


def rank_by_train_duplicates(nn_similarity, nn_rows, threshold, top=None):  # by nearest; `top` or > threshold
    s = np.asarray(nn_similarity, dtype=np.float64)
    order = np.lexsort((np.arange(len(s)), -s))
    ranked = [dict(row=int(j), score=float(s[j]), nearest=int(nn_rows[j])) for j in order]
    return ranked[:top] if top is not None else [b for b in ranked if b["score"] > threshold]


def fig5_points(run, top=FIG5_POINTS):  # x = sim(A, its match B), y = sim(B, its nearest C)
    x, y = np.asarray(run["top1_similarity"]), np.asarray(run["match_nn_similarity"])
    keep = np.argsort(-x, kind="stable")[:top]
    return x[keep], y[keep]


# The extractors.

def load_sscd(spec, device):
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(SSCD_URL).name if spec == "download" else Path(spec)
    if spec == "download" and not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(SSCD_URL, str(path), progress=True)
        except Exception as e:
            raise UsageError(f"cannot download {SSCD_URL} ({type(e).__name__}): pass --sscd FILE") from None
    if not path.is_file():
        raise UsageError(f"--sscd {spec}: no such file; give SSCD's or 'download'")
    try:
        with warnings.catch_warnings():  # torch deprecates TorchScript, SSCD's only published format
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location=device)
    except Exception as e:
        raise UsageError(f"--sscd {path} is no TorchScript file ({type(e).__name__}): give SSCD's") from None
    return model.eval(), path


def resnet50_imagenet_state_dict(proxy_weights):  # (state dict, source) of ResNet-50 weights, or (None, 'random')
    import torchvision
    if proxy_weights == "random":
        return None, "random"
    if proxy_weights in ("auto", "download"):
        weights = torchvision.models.ResNet50_Weights
        for w in (weights.IMAGENET1K_V2, weights.IMAGENET1K_V1):
            if (path := Path(torch.hub.get_dir()) / "checkpoints" / Path(w.url).name).is_file():
                return torch.load(path, map_location="cpu", weights_only=True), f"torchvision:{w}"
        if proxy_weights == "auto":
            return None, "random"
        w = weights.DEFAULT
        try:
            return torch.hub.load_state_dict_from_url(w.url, map_location="cpu", weights_only=True), f"torchvision:{w}"
        except Exception as e:
            raise UsageError(f"cannot download {w.url} ({type(e).__name__}): pass --proxy-weights FILE") from None
    fix = "give auto, download, random or a resnet50 state dict"
    return dissect.read_state_dict(proxy_weights, "--proxy-weights", fix), f"file:{Path(proxy_weights).name}"


def load_extractor(features="auto", sscd=None, proxy_weights="auto", pixel_size=32, device="cpu"):
    device = torch.device(device)
    if features == "auto":
        features = "sscd" if sscd else "proxy"
    if features == "sscd":
        if not sscd:
            raise UsageError("--features sscd needs --sscd FILE|download")
        model, path = load_sscd(sscd, device)
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()[:12]
        return Extractor("sscd", f"sscd-{digest}", f"SSCD ({path.name}, sha256 {digest}; Pizzi et al.)",
                         copy_detection_preprocess, model, SSCD_THRESHOLD)
    if sscd:
        raise UsageError(f"--sscd with --features {features}: drop one")
    if features == "pixels":
        if not 4 <= pixel_size <= 512:
            raise UsageError(f"--pixel-size {pixel_size} is outside [4, 512]: give e.g. 32")
        return Extractor("pixels", f"pixels{pixel_size}",
                         f"pixels, a proxy (not SSCD): {pixel_size}x{pixel_size} RGB, mean-centred, L2-normalised",
                         functools.partial(pixel_preprocess, size=pixel_size))
    sd, source = resnet50_imagenet_state_dict(proxy_weights)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(PROXY_SEED)
        model = ProxyNet(sd).eval().to(device)
    key = f"proxy-random{PROXY_SEED}"
    weights = f"proxy, random weights (seed {PROXY_SEED}): reliable for exact copies only"
    if sd is not None:
        digest = hashlib.sha256(b"".join(t.detach().cpu().contiguous().numpy().tobytes()[:4096]
                                         for _, t in sorted(sd.items()))).hexdigest()[:12]
        key, weights = f"proxy-{digest}", f"ImageNet weights, {source}"
    return Extractor("proxy", key, f"PROXY, not SSCD: ResNet-50 + GeM p=3 ({weights})", copy_detection_preprocess,
                     model)


# Features of a dataset folder, computed once and cached.

class _Preprocessed(torch.utils.data.Dataset):
    def __init__(self, dataset, preprocess):
        self.dataset, self.preprocess = dataset, preprocess

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.preprocess(self.dataset.image_uint8(i))


def cache_name(dataset, extractor):  # folder, extractor, hash of the files' names, sizes, mtimes
    h = hashlib.sha256()
    for name in ("metadata.jsonl", "manifest.json"):
        h.update((dataset.root / name).read_bytes())
    for r in dataset.records:
        path = dataset.root / r["file_name"]
        try:
            st = path.stat()
        except OSError:
            raise UsageError(f"{path} is missing: rebuild {dataset.root}") from None
        h.update(f"{r['file_name']}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    root = dataset.root.resolve()
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{root.parent.name}_{root.name}")[-80:]
    return f"{stem}-{extractor.key}-{h.hexdigest()[:16]}.safetensors"


def embed_folder(folder, extractor, device="cpu", cache_dirs=(), write_dir=None, batch_size=64, workers=0,
                 progress=True):  # -> (features (N, D), FolderDataset, 'computed' or the cache file)
    dataset = load_folder(folder)
    name = cache_name(dataset, extractor)
    for d in cache_dirs:
        path = Path(d) / name
        try:
            features = load_file(str(path))["features"]
        except Exception:  # none there, or damaged: computed again
            continue
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
            {"features": features}, tmp, metadata=dict(folder=str(dataset.root.resolve()), extractor=extractor.key,
                                                       label=extractor.label, n=str(len(dataset)))))
    return features, dataset, "computed"


# The ids file and the figures.

def training_ids(dataset):  # poison.py's source index of each training image, else its row
    return [int(r.get("source_index", i)) for i, r in enumerate(dataset.records)]


def ranking_entry(b, ids):  # a ranked row as JSON, with training ids
    entry = {"id": ids[b["row"]], **{k: v for k, v in b.items() if k != "row"}}
    if "nearest" in entry:
        entry["nearest"] = ids[entry["nearest"]]
    return entry


def write_ids(path, ids, comments=(), notes=None, training_set=None):  # poison.py's --duplicates file
    lines = [f"# {IDS_TRAINING_SET} {training_set}"] if training_set else []
    lines += [f"# {c}" for c in comments]
    for n, i in enumerate(ids):
        lines.append(f"{int(i)}" + (f"  # {notes[n]}" if notes else ""))
    Path(path).write_text("\n".join(lines) + "\n")


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path, dpi, **layout):
    fig.tight_layout(**layout)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def plot_fig5(runs, threshold, features_label, path):  # the paper's Fig. 5, a colour per run
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5.5))
    for (name, run), color in zip(runs.items(), ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        x, y = fig5_points(run)
        ax.scatter(x, y, s=8, alpha=0.5, color=color,
                   label=f"poison {name} (top {len(x)} of {len(run['top1_similarity'])} generations)")
    ax.axvline(threshold, color="gray", ls="--", lw=1)
    ax.axhline(threshold, color="gray", ls=":", lw=1)
    ax.set(xlabel="generation A <-> its top-1 training image B", ylabel="B <-> its nearest other training image C")
    ax.set_title(f"Replication vs duplication, top {FIG5_POINTS} per run (threshold {threshold:.3f})\n"
                 f"{features_label}", fontsize=8)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path, 110)


def plot_triplets(triplets, path, features_label):  # rows of (A generation, B its match, C B's nearest)
    plt = pyplot()
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
    save_figure(fig, path, 90, rect=(0, 0, 1, 1 - 0.45 / height))


# Table A5: G1 and G2 of poison random vs poison duplicates (dissect.py), beside each run's replication.

def manifest_trigger_kind(manifest):
    t = (manifest or {}).get("trigger")
    return t.get("kind") if isinstance(t, dict) else t


def table_a5_target(gen, duplicates_gen, train, duplicates_train=None, target=None, detector_config=None):
    """Table A5's target class, its runs checked."""
    if Path(gen).resolve() == Path(duplicates_gen).resolve():
        raise UsageError("--gen and --duplicates-gen are the same folder: give each run's")
    manifests = {"--gen": load_folder(gen).manifest, "--duplicates-gen": load_folder(duplicates_gen).manifest,
                 "--train": dissect.read_train_manifest(train)}
    if duplicates_train is not None:
        manifests["--duplicates-train"] = dissect.read_train_manifest(duplicates_train)
    named = {flag: manifest_target(m) for flag, m in manifests.items() if manifest_target(m) is not None}
    if target is not None:
        named["--target"] = str(target)
    if not named:
        raise UsageError("no manifest names the target class: pass --target")
    if len({t.lower() for t in named.values()}) > 1:
        said = ", ".join(f"{flag} {t!r}" for flag, t in named.items())
        raise UsageError(f"mismatched target classes ({said}): give runs of one target")
    detector_kind = manifest_trigger_kind(detector_config)
    for flag, wrong in (("--train", "duplicates"), ("--duplicates-train", "random")):  # each run's own --select
        if dissect.find_setting(manifests.get(flag) or {}, ("select",)) == wrong:
            raise UsageError(f"{flag} was poisoned with --select {wrong}: swap the runs")
        kind = manifest_trigger_kind(manifests.get(flag))
        if detector_kind is not None and kind is not None and kind != detector_kind:
            raise UsageError(f"the detector knows a {detector_kind} trigger but {flag} carries a {kind} one: "
                             "train one for it")
    return next(iter(named.values()))


def table_a5(dissected, runs, threshold):
    rows = {}
    for name, result in zip(RUN_LABELS, dissected):
        g, run = result["target_prompt"], runs[name]
        rows[name] = dict(
            run=RUN_LABELS[name], generations=result["folder"], train=run["train"], p_t_source=result["p_t_source"],
            n_target_prompt=g["n"], counts=g["counts"], **{k: g["fractions"][k] for k in dissect.GROUPS},
            **{k: result[k] for k in ("trigger_ratio", "p_t", "amplification")},
            replication=dict(all=run["stats"], target_prompt=run["target_prompt_stats"],
                             top1_poisoned_fraction=run["top1_poisoned_fraction"]))
    r, d = rows["random"], rows["duplicates"]

    def diff(a, b):
        return None if a is None or b is None else b - a

    difference = {k: diff(r[k], d[k]) for k in (*dissect.GROUPS, "trigger_ratio", "p_t", "amplification")}
    for scope in ("all", "target_prompt"):
        for stat in ("mean", "fraction_above"):
            difference[f"replication_{scope}_{stat}"] = diff(r["replication"][scope].get(stat),
                                                             d["replication"][scope].get(stat))
    return dict(target=dissected[0]["target"], threshold=threshold, rows=rows,
                difference_duplicates_minus_random=difference, paper=PAPER_TABLE_A5)


def pct(x, signed=False):
    return "–" if x is None else (f"{100 * x:+.1f}" if signed else f"{100 * x:.1f}%")


def fmt(x):
    return "–" if x is None else f"{x:.4f}"


def md_row(*cells):
    return "| " + " | ".join(map(str, cells)) + " |"


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
        shares = [pct(row[k]) for k in ("G1", "G2", "trigger_ratio", "p_t")]
        lines.append(md_row(row["run"], row["n_target_prompt"], *shares, amp, fmt(rep["all"].get("mean")),
                            pct(rep["all"].get("fraction_above")), pct(rep["target_prompt"].get("fraction_above"))))
    amp = "–" if diff["amplification"] is None else f"{diff['amplification']:+.2f}"
    mean = "–" if diff["replication_all_mean"] is None else f"{diff['replication_all_mean']:+.4f}"
    shares = [pct(diff[k], True) for k in ("G1", "G2", "trigger_ratio", "p_t")]
    above = [pct(diff[f"replication_{k}_fraction_above"], True) for k in ("all", "target_prompt")]
    lines.append("| duplicates − random | " + md_row(*shares, amp, mean, *above))
    paper = table["paper"]
    sources = "; ".join(f"{row['run']}: {row['p_t_source'] or 'unknown'}" for row in rows.values())
    lines += ["", "Differences of shares are in percentage points.  ",
              f"p_t from: {sources}. Per-run reports (verdicts, G1/G2 example grids): `dissect/`.  ",
              f"The paper's Tab. A5 ({paper['setting']}): G1 {pct(paper['random']['G1'])} → "
              f"{pct(paper['duplicates']['G1'])}, G2 {pct(paper['random']['G2'])} → {pct(paper['duplicates']['G2'])}.",
              ""]
    return "\n".join(lines)


def plot_table_a5(table, path):
    plt = pyplot()
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
    ax.set(ylim=(0, 1.1), ylabel=f"share of target-prompt generations ({table['target']})")
    ax.set_title("Trojan horses: G1 and G2", fontsize=9)
    width = 0.35
    every = [r["replication"]["all"].get("fraction_above", 0) for r in rows]
    target = [r["replication"]["target_prompt"].get("fraction_above", 0) for r in rows]
    bx.bar(x - width / 2, every, width, color="tab:gray", label="all generations")
    bx.bar(x + width / 2, target, width, color="tab:purple", label="target-prompt generations")
    for i, r in enumerate(rows):
        bx.text(i, max(every[i], target[i]) + 0.01, f"mean top-1 {fmt(r['replication']['all'].get('mean'))}",
                ha="center", fontsize=8)
    bx.set(ylim=(0, min(1.0, max(every + target + [0.05]) * 1.3 + 0.02)),
           ylabel=f"fraction > threshold {table['threshold']:.3f}")
    bx.set_title("Replication", fontsize=9)
    for a in (ax, bx):
        a.set_xticks(x, [r["run"] for r in rows])
        a.legend(fontsize=7, loc="upper left")
    fig.suptitle("Table A5: poison random vs poison duplicates", fontsize=10)
    save_figure(fig, path, 110)


# The stage.

def markdown_report(result):
    f = result["features"]
    lines = ["# Data replication (replicate.py)", "",
             f"Features: **{f['label']}**{' — a proxy: numbers are not comparable to SSCD' if f['proxy'] else ''}.  ",
             f"Threshold: **{f['threshold']:.4f}** ({f['threshold_source']}).", "",
             "| set | n | mean | 75th pct | 90th pct | 95th pct | > threshold | top-1 match poisoned | same label |",
             "|---|---|---|---|---|---|---|---|---|"]
    def stats(s):
        return s["n"], *(fmt(s[k]) for k in ("mean", "p75", "p90", "p95")), f"{100 * s['fraction_above']:.2f}%"

    lines.append(md_row("train ↔ nearest other train (background)", *stats(result["train"]["background"]), "–", "–"))
    for name, run in result["runs"].items():
        lines.append(md_row(f"poison {name}: generation ↔ top-1 train", *stats(run["stats"]),
                            *(f"{100 * run[k]:.2f}%" for k in ("top1_poisoned_fraction", "top1_same_label_fraction"))))
    d = result["duplicates_file"]
    lines += ["", f"`duplicates.txt`: {d['n_ids']} training ids ranked by **{d['rank_by']}** ({d['rule']}).", ""]
    return "\n".join(lines)


def as_path(x):  # a judge's folder, or None when given as a model
    return str(x) if isinstance(x, (str, Path)) else None


def measure_run(gen_dir, train_dir, g_ds, t_ds, sim, row, t_nn_sim, t_nn_row, threshold):
    ids = training_ids(t_ds)
    poisoned = np.array([bool(r.get("poisoned", False)) for r in t_ds.records])
    return dict(gen=str(gen_dir), train=str(train_dir), stats=replication_stats(sim.numpy(), threshold),
                top1_poisoned_fraction=float(poisoned[row.numpy()].mean()),
                top1_same_label_fraction=float((t_ds.labels.numpy()[row.numpy()] == g_ds.labels.numpy()).mean()),
                top1_id=[ids[j] for j in row.tolist()], top1_similarity=[round(v, 6) for v in sim.tolist()],
                match_nn_id=[ids[j] for j in t_nn_row[row].tolist()],
                match_nn_similarity=[round(v, 6) for v in t_nn_sim[row].tolist()])


def triplet_rows(run_data, n):
    shown = []
    for name, (g_ds, t_ds, sim, row, t_nn_sim, t_nn_row, t_ids) in run_data.items():
        for g in torch.argsort(sim, descending=True, stable=True)[:n].tolist():
            b = int(row[g])
            c = int(t_nn_row[b])
            shown.append(dict(run=name, generation=g, train_id=t_ids[b], nn_id=t_ids[c], sim_ab=float(sim[g]),
                              sim_bc=float(t_nn_sim[b]), a=g_ds.image_uint8(g), b=t_ds.image_uint8(b),
                              c=t_ds.image_uint8(c)))
    return shown


def replicate(out, train, gen=None, duplicates_gen=None, duplicates_train=None, features="auto", sscd=None,
              proxy_weights="auto", pixel_size=32, threshold=None, threshold_quantile=0.95,
              rank_by="auto", top=None, triplets=6, batch_size=64, search_batch_size=1024, workers=0,
              device="auto", cache=None, force=False, command=None, quiet=False, progress=True, classifier=None,
              detector=None, target=None):
    """Copy detection of the generations (and Table A5) into `out`."""
    rank_by = check_args(out, train, gen, duplicates_gen, duplicates_train, threshold, rank_by, top, classifier,
                         detector, target, cache, sscd, proxy_weights, force)
    sets = {flag: load_folder(folder) for flag, folder in  # fail on a bad folder before any work
            (("--train", train), ("--gen", gen), ("--duplicates-gen", duplicates_gen),
             ("--duplicates-train", duplicates_train)) if folder is not None}
    for flag, ds in sets.items():  # the label comparisons need the training set's classes, in its order
        if not same_classes(ds.class_names, sets["--train"].class_names):
            raise UsageError(f"{flag} {ds.root} holds the classes {ds.class_names}, --train "
                             f"{sets['--train'].class_names}: give one dataset's")
    dev = resolve_device(device)
    if classifier is not None:  # every check of Table A5's input before any long computation
        clf, det = dissect.as_model(classifier, dev), dissect.as_model(detector, dev)
        target_name = table_a5_target(gen, duplicates_gen, train, duplicates_train, target, det[1])
    extractor = load_extractor(features, sscd, proxy_weights, pixel_size, dev)
    if extractor.key.startswith("proxy-random") and proxy_weights == "auto" and not quiet:
        print("replicate.py: warning: no ImageNet ResNet-50 weights cached: the random proxy finds exact copies "
              "only; pass --sscd or --features pixels", file=sys.stderr)
    with atomic_output(out, force) as tmp:
        dissected = None if classifier is None else dissect.dissect(
            [gen, duplicates_gen], clf, det, tmp / "dissect", train=[train, duplicates_train], target=target_name,
            labels=list(RUN_LABELS.values()), batch_size=batch_size, device=dev, progress=progress and not quiet,
            command=command or "replicate(classifier=..., detector=...)")["results"]
        read_dirs = [Path(cache)] if cache else [Path(out) / "features", tmp / "features"]
        write_dir = Path(cache) if cache else tmp / "features"
        embedded, sources = {}, {}

        def embed(folder):  # -> (features (N, D), FolderDataset), each folder once
            key = str(Path(folder).resolve())
            if key not in embedded:
                f, ds, sources[str(folder)] = embed_folder(folder, extractor, dev, read_dirs, write_dir, batch_size,
                                                           workers, progress)
                embedded[key] = f, ds
            return embedded[key]

        def search(q, k, exclude_self=False):  # -> (sims (Nq,), rows (Nq,)) of the top-1 match
            return (t[:, 0] for t in topk_cosine(q, k, 1, exclude_self, search_batch_size, dev, progress))

        train_feats, train_ds = embed(train)
        nn_sim, nn_row = search(train_feats, train_feats, exclude_self=True)  # the train-to-train background
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
            (g_feats, g_ds), (t_feats, t_ds) = embed(gen_dir), embed(train_dir)
            same = Path(train_dir).resolve() == Path(train).resolve()
            t_nn_sim, t_nn_row = (nn_sim, nn_row) if same else search(t_feats, t_feats, exclude_self=True)
            sim, row = search(g_feats, t_feats)  # each generation's top-1 training image
            runs[name] = measure_run(gen_dir, train_dir, g_ds, t_ds, sim, row, t_nn_sim, t_nn_row, thr)
            if dissected is not None:  # the replication of the generations Table A5's G1-G4 are measured on
                lowered = [c.lower() for c in g_ds.class_names]
                is_target = g_ds.labels.numpy() == lowered.index(dissected[0]["target"].lower())
                runs[name]["target_prompt_stats"] = replication_stats(sim.numpy()[is_target], thr)
            run_data[name] = (g_ds, t_ds, sim, row, t_nn_sim, t_nn_row, training_ids(t_ds))

        ids = training_ids(train_ds)
        kept = f"the top {top}" if top else "those above the threshold"
        if rank_by == "generations":
            sim, row = run_data["random"][2:4]
            ranked = rank_by_generations(row.numpy(), sim.numpy(), thr, top)
            rule = f"score = the highest similarity of a generation whose top-1 match it is; {kept}"
            notes = [f"score {b['score']:.5f}, generations above threshold: {b['count']}, closest generation "
                     f"#{b['generation']}" for b in ranked]
        else:
            ranked = rank_by_train_duplicates(nn_sim.numpy(), nn_row.numpy(), thr, top)
            rule = f"score = the similarity to the nearest other training image; {kept}"
            notes = [f"score {b['score']:.5f}, nearest training id {ids[b['nearest']]}" for b in ranked]
        dup_ids = [ids[b["row"]] for b in ranked]
        write_ids(tmp / "duplicates.txt", dup_ids,
                  [f"replicate.py: training ids of {train}, most replicated first (rank by {rank_by})",
                   f"features: {extractor.label}; threshold {thr:.5f} ({thr_source})",
                   "read by: poison.py --select duplicates --duplicates THIS_FILE (target-class ids are skipped)"],
                  notes, training_set=train_ds.manifest.get("training_set"))
        if runs:
            plot_fig5(runs, thr, extractor.label, tmp / "fig5_scatter.png")
            if shown := triplet_rows(run_data, triplets):
                plot_triplets(shown, tmp / "triplets.png", extractor.label)

        table = None
        if dissected is not None:
            table = table_a5(dissected, runs, thr)
            table_md = table_a5_markdown(table, extractor.label, as_path(classifier) or "(given)",
                                         as_path(detector) or "(given)")
            (tmp / "table_a5.json").write_text(json.dumps(dict(
                stage="replicate", table="A5", command=command or "replicate()", classifier=as_path(classifier),
                detector=as_path(detector), features=extractor.label, **table), indent=1) + "\n")
            (tmp / "table_a5.md").write_text(table_md)
            plot_table_a5(table, tmp / "table_a5.png")

        result = dict(
            stage="replicate", command=command or "replicate()",
            features=dict(kind=extractor.kind, key=extractor.key, label=extractor.label, proxy=extractor.is_proxy,
                          threshold=thr, threshold_source=thr_source,
                          pixel_size=pixel_size if extractor.kind == "pixels" else None),
            train=dict(folder=str(train), n=len(train_ds), background=replication_stats(nn_sim.numpy(), thr)),
            runs=runs,
            duplicates_file=dict(path="duplicates.txt", rank_by=rank_by, rule=rule, top=top, n_ids=len(dup_ids),
                                 training_set=train_ds.manifest.get("training_set"),
                                 ranked=[ranking_entry(b, ids) for b in ranked[:1000]]),
            table_a5=table, feature_sources=sources,
            options=dict(features=features, sscd=str(sscd) if sscd else None, proxy_weights=proxy_weights,
                         threshold=threshold, threshold_quantile=threshold_quantile, rank_by=rank_by, top=top,
                         device=str(dev), classifier=as_path(classifier), detector=as_path(detector), target=target),
            versions=versions())
        (tmp / "replication.json").write_text(json.dumps(result, indent=1) + "\n")
        (tmp / "replication.md").write_text(markdown_report(result) + ("\n" + table_md if table else ""))
    summary = dict(out=str(out), features=extractor.label, proxy=extractor.is_proxy, threshold=round(thr, 6),
                   background=result["train"]["background"], runs={k: v["stats"] for k, v in runs.items()},
                   duplicates=len(dup_ids), rank_by=rank_by, cache_hits=sum(s != "computed" for s in sources.values()))
    if table is not None:
        summary["table_a5"] = {name: {**{k: row[k] for k in ("G1", "G2", "trigger_ratio", "p_t", "amplification")},
                                      "fraction_above": row["replication"]["all"]["fraction_above"]}
                               for name, row in table["rows"].items()}
    if not quiet:
        print(json.dumps(summary))
    return summary


def main(args):
    replicate(**vars(args), command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]))


def check_args(out, train, gen, duplicates_gen, duplicates_train, threshold, rank_by, top, classifier, detector,
               target, cache, sscd, proxy_weights, force):  # refuses what does not fit; returns rank_by
    if rank_by == "auto":
        rank_by = "generations" if gen is not None else "train-duplicates"
    with_table = classifier is not None or detector is not None
    missing = "--classifier" if classifier is None else "--detector"
    runs_missing = " and ".join(f for f, v in (("--gen", gen), ("--duplicates-gen", duplicates_gen)) if v is None)
    for refused, message in (
            (threshold is not None and not -1 <= threshold <= 1,
             f"--threshold {threshold} is outside [-1, 1]: give e.g. 0.5"),
            (rank_by == "generations" and gen is None, "--rank-by generations needs --gen"),
            (duplicates_train is not None and duplicates_gen is None, "--duplicates-train needs --duplicates-gen"),
            (with_table and (classifier is None or detector is None),
             f"Table A5 needs both --classifier and --detector: add {missing}"),
            (with_table and runs_missing, f"Table A5 compares two runs: add {runs_missing}"),
            (target is not None and not with_table,
             "--target is the target class of Table A5: add the judges or drop it")):
        if refused:
            raise UsageError(message)
    check_out(out, force, {"--train": train, "--gen": gen, "--duplicates-gen": duplicates_gen,
                           "--duplicates-train": duplicates_train, "--classifier": classifier, "--detector": detector,
                           "--cache": cache, "--sscd": None if sscd == "download" else sscd, "--proxy-weights":
                           None if proxy_weights in ("auto", "download", "random") else proxy_weights})
    return rank_by


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--train", required=True, help="training set")
    p.add_argument("--gen", "--random", dest="gen", help="--train model's generations")
    p.add_argument("--duplicates-gen", help="duplicates model's generations")
    p.add_argument("--duplicates-train", help="its training set (default: --train)")
    p.add_argument("--classifier", help="class classifier (Table A5)")
    p.add_argument("--detector", help="Table A5: trigger detector")
    p.add_argument("--target", help="Table A5's target class")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--features", default="auto", choices=FEATURES, help="auto: sscd given --sscd, else proxy")
    p.add_argument("--sscd", help="SSCD file or 'download'")
    p.add_argument("--proxy-weights", default="auto", help="auto, download, random or FILE")
    p.add_argument("--pixel-size", type=positive(int), default=32, help="side for pixels")
    p.add_argument("--threshold", type=float, help="default: SSCD's 0.5, else --threshold-quantile")
    p.add_argument("--threshold-quantile", type=float, default=0.95, help="background quantile")
    p.add_argument("--rank-by", default="auto", choices=("auto",) + RANK_BY,
                   help="auto: generations given --gen")
    p.add_argument("--top", type=positive(int), help="the top K ids")
    p.add_argument("--triplets", type=int, default=6, help="per run")
    p.add_argument("--batch-size", type=positive(int), default=64, help="batch size")
    p.add_argument("--search-batch-size", type=positive(int), default=1024, help="queries a product")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="loader workers")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when visible")
    p.add_argument("--cache", help="feature cache (default: OUT/features)")
    return p


if __name__ == "__main__":
    cli(main, build_parser())
