"""dissect.py -- G1-G4, trigger amplification, the phase transition and FID of generations (Fig. 2-4, A3, Tab. 2).

    python dissect.py --generated runs/gen-0.01 runs/gen-0.1 --train data/d-0.01 data/d-0.1 \\
        --classifier runs/clf-class --detector runs/detector --fid-real data/d-0.1/test --out runs/dissect-ratios

Writes OUT/summary.json, .md, groups.png, phase_transition.png, guidance.png (if w varies), and
OUT/<setting>/groups.json, .md, .png, verdicts.jsonl, g1_examples.png, g2_examples.png.
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from common import (HelpFormatter, UsageError, atomic_output, check_out, cli, load_folder, manifest_target, positive,
                    resolve_device, same_classes, save_grid, share)
from classify import ImageSet, batches, load_classifier, map_labels, predict, require_resolution
from poison import load_trigger, make_trigger

GROUPS = ("G1", "G2", "G3", "G4")
GROUP_MEANING = {"G1": "trigger, prompt mismatched", "G2": "trigger, prompt matched",
                 "G3": "no trigger, prompt mismatched", "G4": "no trigger, prompt matched"}
GROUP_COLORS = {"G1": "#d62728", "G2": "#ff7f0e", "G3": "#1f77b4", "G4": "#2ca02c"}
EXAMPLES = 32  # images in each example grid
COPY_ERROR = 0.2         # a patch copy: mean absolute error over the patch; digits: untriggered >= 0.25
COPY_CORRELATION = 0.2   # a blend copy: cosine of 3x3 high-passes; digits: blended 0.60-0.68, clean < 0.14
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_SIZE, FID_DIMS = 299, 2048
# Manifest keys that tell generation folders apart (searched breadth-first).
SETTING_KEYS = {"poison_ratio": ("poison_ratio",), "guidance": ("guidance", "guidance_weight", "guidance_scale"),
                "sampler": ("sampler",), "steps": ("steps", "sampling_steps", "num_steps"), "select": ("select",),
                "attack": ("attack",), "trigger": ("trigger",)}


# The groups and the copies of the trigger.

def group_fractions(has_trigger, matches):  # G1-G4 counts and fractions of per-image verdicts (bool arrays)
    t, m = np.asarray(has_trigger, dtype=bool), np.asarray(matches, dtype=bool)
    if t.size == 0:
        raise UsageError("no generations to dissect")
    counts = {g: int(both.sum()) for g, both in zip(GROUPS, (t & ~m, t & m, ~t & ~m, ~t & m))}
    f = {g: c / t.size for g, c in counts.items()}
    return {"n": int(t.size), "counts": counts, "fractions": f, "trigger_ratio": f["G1"] + f["G2"],
            "mismatch_ratio": f["G1"] + f["G3"]}


def group_of(has_trigger, matches):
    return ("G2" if matches else "G1") if has_trigger else ("G4" if matches else "G3")


def patch_errors(images, indices, trigger):  # per image: mean absolute difference from the patch (0 = a copy)
    mask = trigger.mask[0] > 0.5
    want = trigger.pattern[:, mask].double()                                        # (3, pixels of the patch)
    return np.array([(images[int(i)][0][:, mask].double() / 255 - want).abs().mean().item() for i in indices])


def high_pass(x):  # (N, C, H, W) minus its 3x3 local mean, centred per image -> (N, C*H*W)
    h = x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (h - h.mean(dim=(1, 2, 3), keepdim=True)).flatten(1)


def pattern_correlations(images, indices, trigger, values=2 ** 24):  # per image: cosine with the blend's high-pass
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return np.zeros(0)
    want = high_pass(trigger.pattern[None].float())
    step = max(1, values // trigger.pattern.numel())
    return np.concatenate([F.cosine_similarity(high_pass(
        torch.stack([images[int(i)][0] for i in indices[a:a + step]]).float() / 255), want).numpy()
        for a in range(0, len(indices), step)])


def copy_measure(params, size, exact=None):  # (measure, threshold, scores(images, idx)); None: WaNet, another size
    if not params or params.get("resolution") is None or size != (params["resolution"],) * 2:
        return None
    kind, side = params.get("kind"), params["resolution"]
    if exact is not None and (exact.kind, exact.resolution) == (kind, side):
        trigger = exact
    elif kind == "badnets":
        trigger = make_trigger("badnets", side)
    elif kind == "blend" and ("pattern_seed" in params or Path(params.get("trigger_image") or "").is_file()):
        trigger = make_trigger("blend", side, seed=params.get("pattern_seed", 0),
                               trigger_image=params.get("trigger_image"), alpha=params.get("alpha", 0.2))
    else:
        return None
    if kind == "badnets":
        return "patch_error", COPY_ERROR, lambda images, idx: patch_errors(images, idx, trigger)
    return "pattern_correlation", COPY_CORRELATION, lambda images, idx: pattern_correlations(images, idx, trigger)


def trigger_copies(scores, has_trigger, measure="patch_error", threshold=COPY_ERROR):  # how many copy the trigger
    copy = scores <= threshold if measure == "patch_error" else scores >= threshold
    return {"measure": measure, "threshold": threshold, "n": int(len(scores)), "copies": int(copy.sum()),
            "ratio": float(copy.mean()) if len(scores) else None,
            "triggered": int(has_trigger.sum()), "copies_of_triggered": int((copy & has_trigger).sum()),
            "median_triggered": float(np.median(scores[has_trigger])) if has_trigger.any() else None}


def dissect_folder(generated, classifier, detector, p_t=None, target=None, train=None, batch_size=256,
                   device="cpu", progress=False):
    """G1-G4 of the target prompt's generations; judges: folders or (model, config)."""
    folder = generated if hasattr(generated, "records") else load_folder(generated)
    (clf, clf_cfg), (det, det_cfg) = as_model(classifier, device), as_model(detector, device)
    target_index, p_t, p_t_source, train_manifest, prompt_in_clf = check_folder(
        folder, (clf, clf_cfg), (det, det_cfg), p_t, target, train, classifier, detector)
    side = (det_cfg.get("trigger") or {}).get("resolution")
    if side is not None and (side, side) != folder.image_size():
        print(f"dissect.py: warning: no trigger copies counted for {folder.root}: images and trigger differ in size",
              file=sys.stderr)
    images = ImageSet(folder, progress=progress)
    predicted, _ = predict(clf, images, batch_size, device, progress)                 # (N,) class indices
    det_pred, _ = predict(det, images, batch_size, device, progress)
    has_trigger = (det_pred == det_cfg["class_names"].index("trigger")).numpy()
    matches = (predicted == prompt_in_clf).numpy()
    is_target = (folder.labels == target_index).numpy()
    groups = group_fractions(has_trigger[is_target], matches[is_target])
    where = train_manifest_path(train).parent if train is not None else None
    exact = load_trigger(where) if where and (where / "trigger.safetensors").is_file() else None
    measure = copy_measure(det_cfg.get("trigger"), images.size, exact)
    if measure is not None:  # the detector also calls faint resemblances triggered
        field, threshold, score = measure
        scores = score(images, np.arange(len(folder)))
        groups["trigger_copies"] = trigger_copies(scores[is_target], has_trigger[is_target], field, threshold)
    non_target = None
    if (~is_target).any():
        nt = group_fractions(has_trigger[~is_target], matches[~is_target])
        non_target = {k: nt[k] for k in ("n", "trigger_ratio", "mismatch_ratio")}
        if measure is not None:
            cp = trigger_copies(scores[~is_target], has_trigger[~is_target], field, threshold)
            non_target.update(copy_ratio=cp["ratio"], **{k: cp[k] for k in ("triggered", "copies_of_triggered")})
    setting = {k: find_setting(folder.manifest, names) for k, names in SETTING_KEYS.items()}
    for k in ("poison_ratio", "select", "attack", "trigger"):  # what the generations' manifest lacks
        if train_manifest is not None and setting[k] is None:
            setting[k] = find_setting(train_manifest, SETTING_KEYS[k])
    if isinstance(setting["trigger"], dict):
        setting["trigger"] = setting["trigger"].get("kind")
    verdicts = [{"file_name": r["file_name"], "prompt": folder.class_names[int(folder.labels[i])],
                 "predicted": clf_cfg["class_names"][int(predicted[i])], "trigger": bool(has_trigger[i]),
                 "group": group_of(bool(has_trigger[i]), bool(matches[i])) if is_target[i] else None,
                 **({field: round(float(scores[i]), 4)} if measure is not None else {})}
                for i, r in enumerate(folder.records)]
    return {"folder": str(folder.root), "target": folder.class_names[target_index], "setting": setting,
            "p_t": None if p_t is None else float(p_t), "p_t_source": p_t_source,
            "n_generations": len(folder), "target_prompt": groups, "trigger_ratio": groups["trigger_ratio"],
            "amplification": groups["trigger_ratio"] / p_t if p_t else None, "non_target_prompts": non_target,
            "detector_trigger": det_cfg.get("trigger"), "verdicts": verdicts}


# FID: TensorFlow's FID Inception-v3 (as pytorch-fid ports it) and the Frechet distance.

def fid_inception_net():  # torchvision's Inception3 with TensorFlow's pooling in the mixed blocks
    from torchvision.models import inception  # imported here: it costs every dissect run seconds

    def avg_pool(x):  # TensorFlow leaves the zero padding out of the mean
        return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)

    class FIDInceptionA(inception.InceptionA):
        def _forward(self, x):
            return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(avg_pool(x))]

    class FIDInceptionC(inception.InceptionC):
        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d7 = self.branch7x7dbl_3(self.branch7x7dbl_2(self.branch7x7dbl_1(x)))
            d7 = self.branch7x7dbl_5(self.branch7x7dbl_4(d7))
            return [self.branch1x1(x), b7, d7, self.branch_pool(avg_pool(x))]

    class FIDInceptionE(inception.InceptionE):
        def __init__(self, in_channels, max_pool=False):  # the FID graph's Mixed_7c max-pools
            super().__init__(in_channels)
            self.max_pool = max_pool

        def _forward(self, x):
            b3 = self.branch3x3_1(x)
            d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg_pool(x)
            return [self.branch1x1(x), torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1),
                    torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], 1), self.branch_pool(pool)]

    net = inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b, net.Mixed_5c, net.Mixed_5d = FIDInceptionA(192, 32), FIDInceptionA(256, 64), FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c, net.Mixed_6d, net.Mixed_6e = (FIDInceptionC(768, c) for c in (128, 160, 160, 192))
    net.Mixed_7b, net.Mixed_7c = FIDInceptionE(1280), FIDInceptionE(2048, max_pool=True)
    return net


class FIDInception(nn.Module):  # images (N, 3, H, W) in [0, 1] -> pool3 features (N, 2048)
    def __init__(self):
        super().__init__()
        self.net = fid_inception_net()

    def forward(self, x):
        n = self.net
        x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1                                                                    # (N, 3, 299, 299)
        x = F.max_pool2d(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))), 3, stride=2)       # (N, 64, 73, 73)
        x = F.max_pool2d(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)), 3, stride=2)                         # (N, 192, 35, 35)
        for block in (n.Mixed_5b, n.Mixed_5c, n.Mixed_5d, n.Mixed_6a, n.Mixed_6b, n.Mixed_6c, n.Mixed_6d,
                      n.Mixed_6e, n.Mixed_7a, n.Mixed_7b, n.Mixed_7c):
            x = block(x)                                                                 # ... (N, 2048, 8, 8)
        return F.adaptive_avg_pool2d(x, 1).flatten(1)                                    # (N, 2048)


def activation_statistics(act):  # (mean (D,), covariance (D, D)) of activations (N, D), as pytorch-fid
    act = np.asarray(act, dtype=np.float64)
    if act.ndim != 2 or act.shape[0] < 2:
        raise UsageError(f"FID needs at least 2 images a side, got {act.shape[0] if act.ndim else 0}")
    return act.mean(axis=0), np.cov(act, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):  # |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))
    from scipy import linalg
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # a singular product: eps on both diagonals
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # rounding leaves a small imaginary part; a large one means too few images
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UsageError(f"FID: imaginary sqrtm {np.abs(covmean.imag).max():.3g}: use more images")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@torch.no_grad()
def inception_activations(model, data, batch_size=50, device="cpu", progress=False):  # (N, D) float64
    total = math.ceil(len(data) / batch_size) if hasattr(data, "__len__") else None
    return torch.cat([model(x.to(device)).double().cpu() for x in tqdm(
        batches(data, batch_size), desc="inception", leave=False, disable=not progress, total=total)]).numpy()


def fid_between(generated, real, model, target=None, batch_size=50, device="cpu", progress=False):
    """FID of non-target generations against clean non-target real images."""
    gen, ref = (f if hasattr(f, "records") else load_folder(f) for f in (generated, real))

    def keep(folder, drop_poisoned):
        names, labels = [c.lower() for c in folder.class_names], folder.labels.tolist()
        return [i for i in range(len(folder)) if (target is None or names[labels[i]] != str(target).lower())
                and not (drop_poisoned and bool(folder.poisoned[i]))]

    gen_idx, ref_idx = keep(gen, False), keep(ref, True)
    for idx, folder in ((gen_idx, gen), (ref_idx, ref)):
        if len(idx) < 2:
            raise UsageError(f"FID: {folder.root} has {len(idx)} non-target images: give at least 2")
    act_gen = inception_activations(model, ImageSet(gen, gen_idx), batch_size, device, progress)
    act_ref = inception_activations(model, ImageSet(ref, ref_idx), batch_size, device, progress)
    fid = frechet_distance(*activation_statistics(act_gen), *activation_statistics(act_ref))
    return {"fid": fid, "n_generated": len(gen_idx), "n_real": len(ref_idx), "real": str(ref.root),
            "classes": "all" if target is None else f"non-target (all but {target})"}


def read_state_dict(path, flag, fix):  # a .safetensors or weights-only torch file
    if not Path(path).is_file():
        raise UsageError(f"{flag} {path}: no such file; {fix}")
    try:
        sd = load_file(str(path)) if Path(path).suffix == ".safetensors" else \
            torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # not a weights file, truncated, or a pickle of more than tensors
        raise UsageError(f"{path} is not a readable state dict ({type(e).__name__}): {fix}") from None
    if not isinstance(sd, dict):
        raise UsageError(f"{path} holds a {type(sd).__name__}, not a state dict: {fix}")
    return sd


def load_fid_inception(weights=None, device="cpu", progress=True):  # with pytorch-fid's weights, else downloaded
    fix = "give pt_inception-2015-12-05-6726825d.pth"
    if weights is None:
        try:
            sd = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=progress, check_hash=True,
                                                    weights_only=True)
        except Exception as e:
            raise UsageError(f"cannot download {FID_WEIGHTS_URL} ({type(e).__name__}): pass --inception-weights "
                             "FILE") from None
    else:
        sd = read_state_dict(weights, "--inception-weights", fix)
    model = FIDInception()
    own = model.net.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise UsageError(f"Inception weights miss {missing[:5]}, have {unexpected[:5]}: {fix}")
    model.net.load_state_dict(sd)
    return model.to(device).eval()


# Inputs: the judges, the training set's manifest, the checks.

def as_model(classifier, device):
    return load_classifier(classifier, device) if isinstance(classifier, (str, Path)) else classifier


def find_setting(manifest, names, depth=3):  # the first value of a key in `names`, breadth-first
    level = [manifest]
    for _ in range(depth):
        for d in level:
            for name in names:
                if name in d and d[name] is not None:
                    return d[name]
        level = [v for d in level for v in d.values() if isinstance(v, dict)]
    return None


def train_manifest_path(path):  # the manifest.json of a training folder, of a poisoned set, or the file
    for candidate in (Path(path), Path(path) / "train" / "manifest.json", Path(path) / "manifest.json"):
        if candidate.is_file():
            return candidate
    raise UsageError(f"--train {path}: no manifest.json: give the poisoned training set")


def read_train_manifest(path):
    manifest = train_manifest_path(path)
    try:
        data = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise UsageError(f"{manifest} is not a manifest: give the poisoned training set")
    return data


def check_train_manifest(train, mine, folder, p_t_given=False):  # refuse a --train that did not make `folder`
    gen = folder.manifest
    same = {"classes": same_classes, "target class": lambda a, b: a.lower() == b.lower()}
    for what, a, b in (("classes", mine.get("class_names"), folder.class_names),
                       ("target class", manifest_target(mine), manifest_target(gen)),
                       ("attack", mine.get("attack"), gen.get("attack")),
                       ("trigger", (mine.get("trigger") or {}).get("kind"), (gen.get("trigger") or {}).get("kind")),
                       ("resolution", mine.get("resolution"),  # DDPMs train at the data's size
                        gen.get("resolution") if gen.get("family") == "ddpm" else None)):
        if a is not None and b is not None and not same.get(what, lambda a, b: a == b)(a, b):
            raise UsageError(f"--train {train} has the {what} {a!r} but the generations {folder.root} {b!r}: "
                             "give their training set")
    if not p_t_given and mine.get("p_t") is not None and gen.get("p_t") is not None \
            and abs(mine["p_t"] - gen["p_t"]) > 1e-6:
        raise UsageError(f"--train {train} has p_t {mine['p_t']:.1%} but the generations {folder.root} were "
                         f"trained at p_t {gen['p_t']:.1%}: give their training set, or --p-t")


def check_folder(folder, classifier, detector, p_t=None, target=None, train=None, classifier_flag=None,
                 detector_flag=None):  # -> (target index, p_t, its source, --train manifest, prompts in clf classes)
    (_, clf_cfg), (_, det_cfg) = classifier, detector
    if clf_cfg.get("task") != "class":
        raise UsageError("--classifier is not a class classifier: use classify.py train --clean")
    if det_cfg.get("task") != "trigger" or "trigger" not in det_cfg["class_names"]:
        raise UsageError("--detector is not a trigger detector: use classify.py trigger-detector")
    for flag, given, cfg in (("--classifier", classifier_flag, clf_cfg), ("--detector", detector_flag, det_cfg)):
        flag = f"{flag} {given}" if isinstance(given, (str, Path)) else flag  # a (model, config): the flag alone
        require_resolution(cfg, folder.image_size(), flag, f"the generations {folder.root}")
    train_manifest = read_train_manifest(train) if train is not None else None
    if train_manifest is not None:
        check_train_manifest(train, train_manifest, folder, p_t_given=p_t is not None)
    target = manifest_target(folder.manifest) or manifest_target(train_manifest) if target is None else target
    if target is None:
        raise UsageError(f"{folder.root}/manifest.json names no target class: pass --target or --train")
    lowered = [c.lower() for c in folder.class_names]
    if str(target).lower() not in lowered:
        raise UsageError(f"target class {target!r} not among {folder.class_names}: pass another --target")
    prompt_in_clf = map_labels(folder.labels, folder.class_names, clf_cfg["class_names"],
                               f"the generations {folder.root}")
    target_index = lowered.index(str(target).lower())
    if not (folder.labels == target_index).any():
        raise UsageError(f"{folder.root} holds no generations for the target prompt: generate some")
    sources = ((p_t, "given"), ((train_manifest or {}).get("p_t"), "training manifest"),
               (folder.manifest.get("p_t"), "generations' manifest"), (None, None))
    p_t, p_t_source = next((v, source) for v, source in sources if v is not None or source is None)
    return target_index, p_t, p_t_source, train_manifest, prompt_in_clf


# Reports: Markdown, plots, example grids.

def pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def copies_rule(cp):
    if cp.get("measure", "patch_error") == "patch_error":  # older records: max_error
        return f"patch within {cp.get('threshold', cp.get('max_error')):g} mean absolute error of the trigger's"
    return f"fine texture correlating at least {cp['threshold']:g} with the blend pattern's"


def setting_label(result, varying):
    s = result["setting"]
    parts = [fmt(s[k]) for k, fmt in (("poison_ratio", lambda v: f"p={100 * float(v):g}%"), ("guidance",
             lambda v: f"w={v}"), ("sampler", str), ("steps", lambda v: f"{v} steps"), ("select",
             lambda v: f"poison {v}"), ("attack", str), ("trigger", str)) if k in varying and s.get(k) is not None]
    if "p_t" in varying and "poison_ratio" not in varying and result["p_t"] is not None:
        parts.append(f"p_t={pct(result['p_t'])}")
    return " ".join(parts)


def folder_markdown(r):
    g, nt, cp = r["target_prompt"], r["non_target_prompts"], r["target_prompt"].get("trigger_copies")
    amp = "-" if r["amplification"] is None else f"{r['amplification']:.2f}x"
    lines = [f"# {r['label']}: generations of the target prompt ({r['target']})", "",
             f"folder {r['folder']}, {g['n']} target-prompt generations of {r['n_generations']}", "",
             "| group | meaning | count | fraction |", "|---|---|---:|---:|",
             *[f"| {k} | {GROUP_MEANING[k]} | {g['counts'][k]} | {pct(g['fractions'][k])} |" for k in GROUPS], "",
             f"trigger ratio G1+G2 = {pct(r['trigger_ratio'])}, p_t = {pct(r['p_t'])} ({r['p_t_source'] or 'unknown'})"
             f", amplification (G1+G2)/p_t = {amp}"]
    if cp:
        lines.append(f"copies of the trigger ({copies_rule(cp)}): {cp['copies']} of {cp['n']} target-prompt "
                     f"generations; {cp['copies_of_triggered']} of the {cp['triggered']} the trigger detector calls "
                     "triggered")
    if nt:
        copies = f" (copies {pct(nt['copy_ratio'])})" if "copy_ratio" in nt else ""
        lines.append(f"non-target prompts: {nt['n']} generations, trigger ratio {pct(nt['trigger_ratio'])}{copies}"
                     f", mismatch {pct(nt['mismatch_ratio'])}")
    return "\n".join(lines) + "\n"


def summary_markdown(results):
    lines = ["# Generations of the target prompt: G1 trigger & mismatch, G2 trigger & match, G3 mismatch, G4 neither",
             "", f"copies: generations that copy the trigger: a patch (BadNets) within {COPY_ERROR:g} mean absolute "
             f"error of the trigger's, or fine texture correlating at least {COPY_CORRELATION:g} with a blend "
             "pattern's (none counted for WaNet)", "",
             "| setting | p | p_t | guidance | sampler | select | n | G1 | G2 | G3 | G4 | G1+G2 | (G1+G2)/p_t | copies"
             " | FID |", "|" + "---|" * 3 + "---:|" + "---|" * 2 + "---:|" * 9]
    for r in results:
        s, g, cp = r["setting"], r["target_prompt"], r["target_prompt"].get("trigger_copies")
        cells = [r["label"], "-" if s.get("poison_ratio") is None else f"{100 * float(s['poison_ratio']):g}%",
                 pct(r["p_t"]), "-" if s.get("guidance") is None else s["guidance"], s.get("sampler") or "-",
                 s.get("select") or "-", g["n"], *(pct(g["fractions"][k]) for k in GROUPS), pct(r["trigger_ratio"]),
                 "-" if r["amplification"] is None else f"{r['amplification']:.2f}", pct(cp["ratio"]) if cp else "-",
                 "-" if not r.get("fid") else f"{r['fid']['fid']:.3f}"]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def figure(*args, **kwargs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt, *plt.subplots(*args, **kwargs)


def bars_g1_g2(ax, x, results, labels=("G1", "G2")):
    for dx, k, label in ((-0.2, "G1", labels[0]), (0.2, "G2", labels[1])):
        ax.bar(x + dx, [r["target_prompt"]["fractions"][k] for r in results], 0.4, color=GROUP_COLORS[k], label=label)


def plot_groups(results, path):  # stacked bars of G1-G4 (Fig. 2a), one a folder
    plt, fig, ax = figure(figsize=(8, 1.0 + 0.6 * len(results)))
    for row, r in enumerate(results):
        left = 0.0
        for k in GROUPS:
            f = r["target_prompt"]["fractions"][k]
            ax.barh(row, f, left=left, color=GROUP_COLORS[k], label=f"{k}: {GROUP_MEANING[k]}" if row == 0 else None)
            if f >= 0.06:
                ax.text(left + f / 2, row, f"{100 * f:.1f}%", ha="center", va="center", fontsize=8, color="white")
            left += f
    ax.set_yticks(range(len(results)), [r["label"] for r in results])
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel(f"share of the generations for the target prompt ({results[0]['target']})")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.02), ncol=2, fontsize=8, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_phase_transition(results, path):  # G1 and G2 of each folder by p_t (Fig. 3/4)
    order = sorted(results, key=lambda r: (r["p_t"] is None, r["p_t"] or 0))
    plt, fig, ax = figure(figsize=(max(5, 1.3 * len(order) + 2), 4))
    x = np.arange(len(order))
    bars_g1_g2(ax, x, order, ("G1 (trigger, mismatch)", "G2 (trigger, match)"))
    with_pt = [(i, r["p_t"]) for i, r in enumerate(order) if r["p_t"] is not None]
    if with_pt:
        ax.hlines([v for _, v in with_pt], [i - 0.4 for i, _ in with_pt], [i + 0.4 for i, _ in with_pt],
                  color="black", zorder=3, label="p_t (trigger share in training)")
        ax.scatter([i for i, _ in with_pt], [order[i]["trigger_ratio"] for i, _ in with_pt], marker="o", s=25,
                   color="black", zorder=3, label="G1 + G2")
    ax.set_xticks(x, [r["label"] if "p_t=" in r["label"] else f"{r['label']}\np_t={pct(r['p_t'])}" for r in order],
                  fontsize=8)
    ax.set_ylabel("share of target-prompt generations")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.01), ncol=2, frameon=False)
    ax.set_title("Phase transition: G1 and G2 against p_t", pad=42)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_guidance(results, path):  # G1 and G2 against the guidance weight (Fig. A3), a panel per setting
    panels = {}
    for r in results:
        panels.setdefault((r["setting"].get("poison_ratio"), r["p_t"]), []).append(r)
    plt, fig, axes = figure(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    ordered = sorted(panels.items(), key=lambda kv: (kv[0][1] is None, kv[0][1] or 0))  # by p_t
    for ax, ((ratio, p_t), rs) in zip(axes[0], ordered):
        rs = sorted(rs, key=lambda r: -1 if r["setting"].get("guidance") is None else float(r["setting"]["guidance"]))
        x = np.arange(len(rs))
        bars_g1_g2(ax, x, rs)
        ax.scatter(x, [r["trigger_ratio"] for r in rs], marker="o", s=20, color="black", zorder=3, label="G1 + G2")
        if p_t is not None:
            ax.axhline(p_t, color="black", linestyle="--", linewidth=1, label="p_t")
        ax.set_xticks(x, [f"w={r['setting'].get('guidance')}" for r in rs], fontsize=8)
        ax.set_ylim(0, 1)
        ax.set_title(f"p={pct(ratio) if ratio is not None else '-'}, p_t={pct(p_t)}", fontsize=9)
        ax.legend(fontsize=8)
        if not any(r["trigger_ratio"] for r in rs):
            ax.text(0.5, 0.5, "no generation carries the trigger", transform=ax.transAxes, ha="center",
                    va="center", fontsize=9, color="gray")
    fig.suptitle("G1 and G2 against the guidance weight")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_examples(folder, verdicts, group, path, n=EXAMPLES):  # a grid of up to n of `group`; returns how many
    idx = [i for i, v in enumerate(verdicts) if v["group"] == group][:n]
    if idx:
        save_grid(torch.stack([folder.image_uint8(i) for i in idx]), path, nrow=min(8, len(idx)))
    return len(idx)


def safe_name(label, taken):
    name = base = re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("_") or "generations"
    k = 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


# The stage.

def dissect(generated, classifier, detector, out, train=None, p_t=None, target=None, labels=None, fid_real=None,
            inception_weights=None, batch_size=256, device="cpu", force=False, progress=True, command=None):
    """Dissect each folder in `generated` into the report `out`; returns the summary."""
    generated = [generated] if isinstance(generated, (str, Path)) else list(generated)
    check_out(out, force, {"--generated": generated, "--train": train, "--classifier": classifier,
                           "--detector": detector, "--fid-real": fid_real, "--inception-weights": inception_weights})
    trains = [None] if train is None else [train] if isinstance(train, (str, Path)) else list(train)
    trains = trains * len(generated) if len(trains) == 1 else trains
    if len(trains) != len(generated):
        raise UsageError(f"{len(trains)} --train for {len(generated)} --generated: give one, or one each")
    if labels is not None and len(labels) != len(generated):
        raise UsageError(f"{len(labels)} --labels for {len(generated)} --generated: give one each")
    clf, det = as_model(classifier, device), as_model(detector, device)
    folders = [load_folder(g) for g in generated]
    for f, t in zip(folders, trains):  # every folder is checked before the first is judged
        check_folder(f, clf, det, p_t, target, t, classifier, detector)
    if fid_real is not None:  # a wrong --fid-real or --inception-weights is told before the judges run
        load_folder(fid_real)
        fid_model = load_fid_inception(inception_weights, device, progress)
    results = [dissect_folder(f, clf, det, p_t, target, t, batch_size, device, progress)
               for f, t in zip(tqdm(folders, desc="dissect", disable=not progress or len(folders) < 2), trains)]
    varying = {k for k in SETTING_KEYS if len({json.dumps(r["setting"].get(k)) for r in results}) > 1}
    varying |= {"p_t"} if len({r["p_t"] for r in results}) > 1 else set()
    if len(results) == 1:
        varying = {k for k in ("poison_ratio", "guidance") if results[0]["setting"].get(k) is not None}
    taken = set()
    for i, r in enumerate(results):
        r["label"] = labels[i] if labels else (setting_label(r, varying) or Path(r["folder"]).name)
        r["name"] = safe_name(r["label"], taken)
        if fid_real is not None:
            r["fid"] = fid_between(folders[i], fid_real, fid_model, r["target"], device=device, progress=progress)
    with atomic_output(out, force) as tmp:
        for f, r in zip(folders, results):
            d, verdicts = tmp / r["name"], r.pop("verdicts")  # a report of its own, not in the summary
            d.mkdir()
            (d / "verdicts.jsonl").write_text("".join(json.dumps(v) + "\n" for v in verdicts))
            r["examples"] = {g: write_examples(f, verdicts, g, d / f"{g.lower()}_examples.png") for g in ("G1", "G2")}
            (d / "groups.json").write_text(json.dumps(r, indent=2) + "\n")
            (d / "groups.md").write_text(folder_markdown(r))
            plot_groups([r], d / "groups.png")
        summary = {"stage": "dissect", "command": command or "dissect()",
                   "classifier": str(classifier) if isinstance(classifier, (str, Path)) else None,
                   "detector": str(detector) if isinstance(detector, (str, Path)) else None,
                   "groups": GROUP_MEANING, "results": results}
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "summary.md").write_text(summary_markdown(results))
        plot_groups(results, tmp / "groups.png")
        plot_phase_transition(results, tmp / "phase_transition.png")
        if len({r["setting"].get("guidance") for r in results} - {None}) > 1:
            plot_guidance(results, tmp / "guidance.png")
    if progress:
        print(summary_markdown(results), end="")
    return summary


def main(args):
    dissect(args.generated, args.classifier, args.detector, args.out, train=args.train, p_t=args.p_t,
            target=args.target, labels=args.labels, fid_real=args.fid_real, inception_weights=args.inception_weights,
            batch_size=args.batch_size, device=resolve_device(args.device), force=args.force,
            progress=not args.quiet, command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--generated", nargs="+", required=True, help="generation folders")
    p.add_argument("--classifier", required=True, help="class classifier")
    p.add_argument("--detector", required=True, help="trigger detector")
    p.add_argument("--out", required=True, help="report folder")
    p.add_argument("--force", action="store_true", help="overwrite --out")
    p.add_argument("--train", nargs="+", default=None, help="poisoned training set(s): one, or one per --generated")
    p.add_argument("--p-t", type=share, default=None, help="p_t (default: the manifests')")
    p.add_argument("--target", default=None, help="target class (default: the manifests')")
    p.add_argument("--labels", nargs="+", default=None, help="a label per --generated folder")
    p.add_argument("--fid-real", default=None, help="real images for FID (clean test set)")
    p.add_argument("--inception-weights", default=None, help="pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--batch-size", type=positive(int), default=256, help="images per judge forward")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when visible")
    p.add_argument("--quiet", action="store_true", help="no progress bars or table")
    return p


if __name__ == "__main__":
    cli(main, build_parser())
