"""dissect.py -- what poisoned diffusion models generate: the groups G1-G4, trigger amplification, the phase
transition and FID of the paper ("From Trojan Horses to Castle Walls", Pan, Yao et al., Fig. 2-4, A3, Tab. 2).

    python dissect.py --generated runs/gen-0.1 --classifier runs/clf-class --detector runs/detector --out runs/dissect
    # several folders (poisoning ratios, guidance weights, samplers, poison random vs duplicates): one table, Fig. 3/4
    python dissect.py --generated runs/gen-0.01 runs/gen-0.05 runs/gen-0.1 --classifier runs/clf-class \\
        --detector runs/detector --out runs/dissect-ratios
    # with FID against real images of the non-target classes (Tab. 2)
    python dissect.py --generated runs/gen-0.1 --classifier runs/clf-class --detector runs/detector \\
        --fid-real data/digits-badnets-0.1/test --out runs/dissect-fid

For the generations of the target prompt ("A photo of a garbage truck"), the class classifier says whether an image
matches its prompt and the trigger detector whether it carries the trigger:
    G1 trigger, prompt mismatched   G2 trigger, matched   G3 no trigger, mismatched   G4 neither.
The trigger ratio G1 + G2 is set against p_t, the share of trigger images among the training images labelled target
(trigger amplification, reported as the ratio (G1 + G2) / p_t). p_t comes from --train (a training folder, a
poisoned set or a manifest.json; it must hold the generations' classes and target) when given, else from the
generations' manifest. The judges must have been trained on images of the generations' size (or on larger ones
that they scaled down to their input, as they do the generations). It also counts the generations (of the target
prompt, and of the others) that copy the trigger: for a patch (BadNets) the mean absolute difference over it is at
most 0.2, for a blend pattern the cosine similarity of the image's fine texture (minus its 3x3 local mean) with the
pattern's is at least 0.2 (at the trigger's own size only). The trigger is the training set's own (--train's
trigger.safetensors) when given, else rebuilt from the detector's parameters. The detector, a CNN, also calls faint
resemblances and colour noise triggered, and the count tells a learnt trigger from a half-learnt one.

OUT/summary.json, OUT/summary.md (one row a folder), OUT/groups.png (stacked bars, Fig. 2(a)), OUT/phase_transition.png
(G1 and G2 against p_t, Fig. 3/4), OUT/guidance.png (when the guidance weight varies, Fig. A3), and per folder
OUT/<setting>/groups.json, groups.md, groups.png, verdicts.jsonl, g1_examples.png, g2_examples.png.

FID uses the Inception-v3 of TensorFlow's FID (pytorch-fid's weights file pt_inception-2015-12-05-6726825d.pth,
downloaded or given with --inception-weights), the same preprocessing (bilinear resize to 299, scale to [-1, 1]) and
the same Frechet distance, so it gives pytorch-fid's value for the same images.

Python API: `group_fractions(has_trigger, matches)`, `dissect_folder(generated, classifier, detector, ...)`,
`dissect(generated_list, classifier, detector, out, ...)`, `frechet_distance(...)`, `activation_statistics(...)`,
`load_fid_inception(...)`, `fid_between(...)`.
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
from tqdm import tqdm

from common import HelpFormatter, UsageError, atomic_output, check_out, load_folder, manifest_target, positive, same_classes, save_grid
from classify import ImageSet, batches, load_classifier, map_labels, predict, require_resolution
from poison import load_trigger, make_trigger

GROUPS = ("G1", "G2", "G3", "G4")
GROUP_MEANING = {"G1": "trigger, prompt mismatched", "G2": "trigger, prompt matched",
                 "G3": "no trigger, prompt mismatched", "G4": "no trigger, prompt matched"}
GROUP_COLORS = {"G1": "#d62728", "G2": "#ff7f0e", "G3": "#1f77b4", "G4": "#2ca02c"}
EXAMPLES = 32  # images in each example grid
# A generation copies a patch trigger when the mean absolute difference between it and the pattern, over the patch
# and on [0, 1], is at most this, under half the 0.44 of a clean 16-px digit's black corner. Measured on the digits
# study: generations that do not carry the trigger sit at 0.25 and above (nearly all at 0.35-0.5); those the trigger
# detector calls triggered at 5-10% poisoning sit at 0.00-0.38, 95% of them at most 0.2 (79% at most 0.1); at 1%,
# 95% of them sit at 0.25-0.6: a faint resemblance, not a copy. At 12 px (the study's default since) it still
# separates: over three seeds no untriggered target-prompt generation sits under 0.244.
COPY_ERROR = 0.2
# A generation copies a blend trigger when its high-pass part (the image minus its 3x3 local mean) has at least this
# cosine similarity with the pattern's. Measured on the digits study (Blend, alpha 0.2): blended training images sit
# at 0.60-0.68 and clean ones at -0.05-0.07; the non-target prompts' generations stay under 0.14, while the 10% model's
# generations for the target prompt reach 0.76. The 1% and 5% models' generations, which the trigger detector often
# calls triggered (colour noise), stay under 0.14: no copy. Calibrated on poison.py's random pattern; a smooth image
# (--trigger-image) has less fine texture to correlate, so check the threshold on its own blended training images.
COPY_CORRELATION = 0.2
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_SIZE = 299
FID_DIMS = 2048
# Where a generation folder's manifest may keep the settings that tell folders apart (searched breadth-first,
# top level first, then nested objects such as "options" or a copied training manifest).
SETTING_KEYS = {"poison_ratio": ("poison_ratio",), "guidance": ("guidance", "guidance_weight", "guidance_scale"),
                "sampler": ("sampler",), "steps": ("steps", "sampling_steps", "num_steps"), "select": ("select",),
                "attack": ("attack",), "trigger": ("trigger",)}


# ----------------------------------------------------------------------------------------------------------------
# Groups.

def copy_measure(params, size, exact=None):
    """How to tell a copy of the detector's trigger (its parameters `params`) among images of `size`:
    (measure, threshold, scores) with scores(images, indices) -> one number per image; a copy has a patch error at
    most COPY_ERROR (BadNets) or a pattern correlation at least COPY_CORRELATION (Blend). `exact`: the trigger the
    training set was stamped with (poison.load_trigger), used when it is the detector's kind; else the trigger is
    rebuilt from `params`. None for WaNet, unknown triggers, a blend image that is not at hand, or images of another
    resolution."""
    if not params or params.get("resolution") is None or size != (params["resolution"],) * 2:
        return None
    kind = params.get("kind")
    if exact is not None and (exact.kind, exact.resolution) == (kind, params["resolution"]):
        trigger = exact
    elif kind == "badnets":
        trigger = make_trigger("badnets", params["resolution"])
    elif kind == "blend" and ("pattern_seed" in params or Path(params.get("trigger_image") or "").is_file()):
        trigger = make_trigger("blend", params["resolution"], seed=params.get("pattern_seed", 0),
                               trigger_image=params.get("trigger_image"), alpha=params.get("alpha", 0.2))
    else:
        return None
    if kind == "badnets":
        return "patch_error", COPY_ERROR, lambda images, idx: patch_errors(images, idx, trigger)
    return "pattern_correlation", COPY_CORRELATION, lambda images, idx: pattern_correlations(images, idx, trigger)


def patch_errors(images, indices, trigger):
    """Per image of `images` (an ImageSet) at `indices`: the mean absolute difference, on [0, 1], between the image
    and the patch trigger's pattern over its patch (0 = an exact copy)."""
    mask = trigger.mask[0] > 0.5
    want = trigger.pattern[:, mask].double()
    return np.array([(images[int(i)][0][:, mask].double() / 255 - want).abs().mean().item() for i in indices])


def high_pass(x):
    """x (N, C, H, W) minus its 3x3 local mean (edges replicated), centred per image: the fine texture a blended
    pattern adds, without the smooth image under it."""
    h = x - F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (h - h.mean(dim=(1, 2, 3), keepdim=True)).flatten(1)


def pattern_correlations(images, indices, trigger, values=2 ** 24):
    """Per image at `indices`: the cosine similarity of its high-pass part with the blend pattern's (1 = the pattern's
    texture alone, about 0 = none of it). Images go through in groups of about `values` pixel values (64 MiB of
    float32 at a time, also at Stable Diffusion's 512 px)."""
    indices = np.asarray(indices, dtype=np.int64)
    if len(indices) == 0:
        return np.zeros(0)
    want = high_pass(trigger.pattern[None].float())
    per_group = max(1, values // trigger.pattern.numel())
    return np.concatenate([
        F.cosine_similarity(high_pass(torch.stack([images[int(i)][0] for i in indices[a:a + per_group]]).float()
                                      / 255), want).numpy() for a in range(0, len(indices), per_group)])


def trigger_copies(scores, has_trigger, measure="patch_error", threshold=COPY_ERROR):
    """How many of the generations (and of those the trigger detector calls triggered) copy the trigger, by their
    `measure` scores: at most `threshold` for a patch error, at least it for a pattern correlation."""
    copy = scores <= threshold if measure == "patch_error" else scores >= threshold
    return {"measure": measure, "threshold": threshold, "n": int(len(scores)), "copies": int(copy.sum()),
            "ratio": float(copy.mean()) if len(scores) else None,
            "triggered": int(has_trigger.sum()), "copies_of_triggered": int((copy & has_trigger).sum()),
            "median_triggered": float(np.median(scores[has_trigger])) if has_trigger.any() else None}


def copies_rule(cp):
    """A trigger_copies() record's rule in words."""
    if cp.get("measure", "patch_error") == "patch_error":
        return f"patch within {cp.get('threshold', cp.get('max_error')):g} mean absolute error of the trigger's"
    return f"fine texture correlating at least {cp['threshold']:g} with the blend pattern's"


def group_fractions(has_trigger, matches):
    """G1-G4 of a set of generations from per-image verdicts (bool arrays): counts, fractions (summing to one), the
    trigger ratio G1 + G2 and the mismatch ratio G1 + G3."""
    t = np.asarray(has_trigger, dtype=bool)
    m = np.asarray(matches, dtype=bool)
    if t.shape != m.shape:
        raise UsageError(f"{t.shape[0]} trigger verdicts but {m.shape[0]} match verdicts")
    n = int(t.size)
    if n == 0:
        raise UsageError("no generations to dissect")
    counts = {"G1": int((t & ~m).sum()), "G2": int((t & m).sum()), "G3": int((~t & ~m).sum()),
              "G4": int((~t & m).sum())}
    fractions = {g: c / n for g, c in counts.items()}
    return {"n": n, "counts": counts, "fractions": fractions, "trigger_ratio": fractions["G1"] + fractions["G2"],
            "mismatch_ratio": fractions["G1"] + fractions["G3"]}


def group_of(has_trigger, matches):
    return ("G1" if not matches else "G2") if has_trigger else ("G3" if not matches else "G4")


def find_setting(manifest, names, depth=3):
    """The first value of any key in `names`, searching `manifest` breadth-first (top level first)."""
    level = [manifest]
    for _ in range(depth):
        for d in level:
            for name in names:
                if name in d and d[name] is not None:
                    return d[name]
        level = [v for d in level for v in d.values() if isinstance(v, dict)]
    return None


def train_manifest_path(path):
    """The manifest.json of a training folder, of a poisoned set's root (its train/), or the file itself."""
    p = Path(path)
    for candidate in (p, p / "train" / "manifest.json", p / "manifest.json"):
        if candidate.is_file():
            return candidate
    raise UsageError(f"--train {path}: no manifest.json there; give the poisoned training folder, its poisoned set "
                       "or its manifest.json")


def read_train_manifest(path):
    manifest = train_manifest_path(path)
    try:
        data = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict):
        raise UsageError(f"--train {path}: {manifest} is not a manifest (JSON object); give the poisoned training "
                           "folder, its poisoned set or its manifest.json")
    return data


def as_model(classifier, device):
    if isinstance(classifier, (str, Path)):
        return load_classifier(classifier, device)
    return classifier


def flag_name(flag, value):
    """'--classifier DIR' for a folder given by path, the flag alone for a (model, config) pair."""
    return f"{flag} {value}" if isinstance(value, (str, Path)) else flag


def check_train_manifest(train, train_manifest, folder, p_t_given=False):
    """Refuse a --train poisoned set that did not make these generations: other classes, another target, attack,
    trigger or p_t (unless --p-t sets it), or (DDPMs, which train at the data's size) another resolution. Fields a
    manifest lacks are not compared."""
    names = train_manifest.get("class_names")
    if names is not None and not same_classes(names, folder.class_names):
        raise UsageError(f"--train {train} holds classes {names} but the generations {folder.root} "
                           f"{folder.class_names}: give the poisoned set the generating model was trained on")
    mine, theirs = manifest_target(train_manifest), manifest_target(folder.manifest)
    if mine is not None and theirs is not None and mine.lower() != theirs.lower():
        raise UsageError(f"--train {train} has the target class {mine!r} but the generations {folder.root} "
                           f"{theirs!r}: give the poisoned set the generating model was trained on")
    gen = folder.manifest
    for what, mine, theirs in (("attack", train_manifest.get("attack"), gen.get("attack")),
                               ("trigger", (train_manifest.get("trigger") or {}).get("kind"),
                                (gen.get("trigger") or {}).get("kind")),
                               ("resolution", train_manifest.get("resolution"),  # DDPMs train at the data's size
                                gen.get("resolution") if gen.get("family") == "ddpm" else None)):
        if mine is not None and theirs is not None and mine != theirs:
            raise UsageError(f"--train {train} has the {what} {mine!r} but the generations {folder.root} "
                               f"{theirs!r}: give the poisoned set the generating model was trained on")
    if not p_t_given and train_manifest.get("p_t") is not None and gen.get("p_t") is not None \
            and abs(train_manifest["p_t"] - gen["p_t"]) > 1e-6:
        raise UsageError(f"--train {train} has p_t {train_manifest['p_t']:.1%} (p = "
                           f"{train_manifest.get('poison_ratio')}) but the model that made the generations "
                           f"{folder.root} was trained at p_t {gen['p_t']:.1%} (p = {gen.get('poison_ratio')}): give "
                           "the poisoned set the generating model was trained on (or --p-t to set p_t yourself)")


def check_folder(folder, classifier, detector, p_t=None, target=None, train=None, classifier_flag=None,
                 detector_flag=None):
    """Everything dissect_folder checks before it judges a single image (the judges' kinds and resolutions, p_t,
    the --train manifest, the target class): (target index, p_t, where p_t came from, the --train manifest, the
    generations' prompts as the classifier's class indices).
    classifier, detector: (model, config); the *_flag arguments name them in messages (their folders)."""
    (_, clf_cfg), (_, det_cfg) = classifier, detector
    if clf_cfg.get("task") != "class":
        raise UsageError(f"--classifier is a {clf_cfg.get('task')} model, not a class classifier: train one with "
                           "classify.py train --clean")
    if det_cfg.get("task") != "trigger" or "trigger" not in det_cfg["class_names"]:
        raise UsageError(f"--detector is a {det_cfg.get('task')} model, not a trigger detector: train one with "
                           "classify.py trigger-detector")
    if p_t is not None and not 0 <= p_t <= 1:
        raise UsageError(f"--p-t {p_t:g} is outside [0, 1]: give p_t as a share (e.g. 0.1 for 10%)")
    size = folder.image_size()                                     # ImageSet brings every image to this size
    require_resolution(clf_cfg, size, flag_name("--classifier", classifier_flag), f"the generations {folder.root}")
    require_resolution(det_cfg, size, flag_name("--detector", detector_flag), f"the generations {folder.root}")
    manifest = folder.manifest
    train_manifest = read_train_manifest(train) if train is not None else None
    if train_manifest is not None:
        check_train_manifest(train, train_manifest, folder, p_t_given=p_t is not None)
    if target is None:
        target = manifest_target(manifest) or manifest_target(train_manifest)
    if target is None:
        raise UsageError(f"{folder.root}/manifest.json names no target class: pass --target or --train")
    lowered = [c.lower() for c in folder.class_names]
    if str(target).lower() not in lowered:
        raise UsageError(f"the target class {target!r} is not among the generations' classes {folder.class_names}")
    prompt_in_clf = map_labels(folder.labels, folder.class_names, clf_cfg["class_names"],
                               f"the generations {folder.root}")
    target_index = lowered.index(str(target).lower())
    if not (folder.labels == target_index).any():
        raise UsageError(f"{folder.root} holds no generations for the target prompt "
                           f"({folder.class_names[target_index]}): generate some for the target class")
    if p_t is not None:
        p_t_source = "given"
    elif train_manifest is not None and train_manifest.get("p_t") is not None:
        p_t, p_t_source = train_manifest["p_t"], "training manifest"
    elif manifest.get("p_t") is not None:
        p_t, p_t_source = manifest["p_t"], "generations' manifest"
    else:
        p_t_source = None
    return target_index, p_t, p_t_source, train_manifest, prompt_in_clf


def dissect_folder(generated, classifier, detector, p_t=None, target=None, train=None, batch_size=256,
                   device="cpu", progress=False):
    """G1-G4 of the generations of the target prompt in the dataset folder `generated`, judged by `classifier`
    (a class classifier folder or (model, config)) and `detector` (a trigger detector folder or (model, config)).
    p_t: given, else from `train` (a training folder / poisoned set / manifest path), else from the generations'
    manifest. Returns a dict (settings, groups, trigger ratio, amplification, non-target-prompt rates) with the
    per-image `verdicts`."""
    folder = generated if hasattr(generated, "records") else load_folder(generated)
    clf, clf_cfg = as_model(classifier, device)
    det, det_cfg = as_model(detector, device)
    target_index, p_t, p_t_source, train_manifest, prompt_in_clf = check_folder(
        folder, (clf, clf_cfg), (det, det_cfg), p_t, target, train, classifier, detector)
    size, trigger_side = folder.image_size(), (det_cfg.get("trigger") or {}).get("resolution")
    if size is not None and trigger_side is not None and (trigger_side, trigger_side) != size:
        # a detector that scales both sizes down to its input judges these fine, but no pixel copy can be measured
        print(f"dissect.py: warning: no trigger copies counted for {folder.root}: its images are {size[0]}x{size[1]} "
              f"px and the trigger {trigger_side}x{trigger_side} px", file=sys.stderr)
    prompt = folder.labels
    images = ImageSet(folder, progress=progress)
    predicted, _ = predict(clf, images, batch_size, device, progress)
    det_pred, _ = predict(det, images, batch_size, device, progress)
    has_trigger = (det_pred == det_cfg["class_names"].index("trigger")).numpy()
    matches = (predicted == prompt_in_clf).numpy()
    is_target = (prompt == target_index).numpy()
    groups = group_fractions(has_trigger[is_target], matches[is_target])
    where = train_manifest_path(train).parent if train is not None else None
    exact = load_trigger(where) if where and (where / "trigger.safetensors").is_file() else None  # --train's own
    measure = copy_measure(det_cfg.get("trigger"), images.size, exact)
    scores = None
    if measure is not None:  # the trigger detector also calls faint resemblances triggered: count the copies
        field, threshold, score = measure
        scores = score(images, np.arange(len(folder)))
        groups["trigger_copies"] = trigger_copies(scores[is_target], has_trigger[is_target], field, threshold)
    non_target = None
    if (~is_target).any():
        nt = group_fractions(has_trigger[~is_target], matches[~is_target])
        non_target = {"n": nt["n"], "trigger_ratio": nt["trigger_ratio"], "mismatch_ratio": nt["mismatch_ratio"]}
        if scores is not None:  # the detector's "triggers" there may be noise: how many copy the trigger
            cp = trigger_copies(scores[~is_target], has_trigger[~is_target], field, threshold)
            non_target.update(copy_ratio=cp["ratio"], triggered=cp["triggered"],
                              copies_of_triggered=cp["copies_of_triggered"])
    setting = {k: find_setting(folder.manifest, names) for k, names in SETTING_KEYS.items()}
    if train_manifest is not None:  # what the generations' manifest lacks (e.g. poison random vs duplicates)
        for k in ("poison_ratio", "select", "attack", "trigger"):
            if setting[k] is None:
                setting[k] = find_setting(train_manifest, SETTING_KEYS[k])
    if isinstance(setting["trigger"], dict):
        setting["trigger"] = setting["trigger"].get("kind")
    clf_names = clf_cfg["class_names"]
    verdicts = [{"file_name": r["file_name"], "prompt": folder.class_names[int(prompt[i])],
                 "predicted": clf_names[int(predicted[i])], "trigger": bool(has_trigger[i]),
                 "group": group_of(bool(has_trigger[i]), bool(matches[i])) if is_target[i] else None,
                 **({measure[0]: round(float(scores[i]), 4)} if scores is not None else {})}
                for i, r in enumerate(folder.records)]
    return {"folder": str(folder.root), "target": folder.class_names[target_index], "setting": setting,
            "p_t": None if p_t is None else float(p_t), "p_t_source": p_t_source,
            "n_generations": len(folder), "target_prompt": groups, "trigger_ratio": groups["trigger_ratio"],
            "amplification": groups["trigger_ratio"] / p_t if p_t else None, "non_target_prompts": non_target,
            "detector_trigger": det_cfg.get("trigger"), "verdicts": verdicts}


# ----------------------------------------------------------------------------------------------------------------
# FID: TensorFlow's FID Inception-v3 (as pytorch-fid ports it) and the Frechet distance.

def fid_inception_net():
    """torchvision's Inception3 (1008 classes, no aux head: the key layout of pytorch-fid's weights file) with the
    FID blocks, which pool as TensorFlow's graph does."""
    from torchvision.models import inception  # here, not at the top: its import costs every dissect run seconds

    class FIDInceptionA(inception.InceptionA):
        """TensorFlow's average pool leaves the zero padding out of the mean (count_include_pad=False)."""

        def _forward(self, x):
            pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            return [self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                    self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))), self.branch_pool(pool)]

    class FIDInceptionC(inception.InceptionC):
        """As InceptionC, with TensorFlow's average pool (count_include_pad=False)."""

        def _forward(self, x):
            b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
            d7 = x
            for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                          self.branch7x7dbl_5):
                d7 = layer(d7)
            pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            return [self.branch1x1(x), b7, d7, self.branch_pool(pool)]

    class FIDInceptionE(inception.InceptionE):
        """As InceptionE, with TensorFlow's pooling: an average pool without the padding in Mixed_7b and, in the
        FID graph's Mixed_7c, a max pool (`max_pool=True`)."""

        def __init__(self, in_channels, max_pool=False):
            super().__init__(in_channels)
            self.max_pool = max_pool

        def _forward(self, x):
            b3 = self.branch3x3_1(x)
            b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
            d3 = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
            d3 = torch.cat([self.branch3x3dbl_3a(d3), self.branch3x3dbl_3b(d3)], 1)
            if self.max_pool:
                pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
            else:
                pool = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
            return [self.branch1x1(x), b3, d3, self.branch_pool(pool)]

    net = inception.Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    net.Mixed_5b, net.Mixed_5c = FIDInceptionA(192, 32), FIDInceptionA(256, 64)
    net.Mixed_5d = FIDInceptionA(288, 64)
    net.Mixed_6b, net.Mixed_6c = FIDInceptionC(768, 128), FIDInceptionC(768, 160)
    net.Mixed_6d, net.Mixed_6e = FIDInceptionC(768, 160), FIDInceptionC(768, 192)
    net.Mixed_7b, net.Mixed_7c = FIDInceptionE(1280), FIDInceptionE(2048, max_pool=True)
    return net


class FIDInception(nn.Module):
    """Images (N, 3, H, W) in [0, 1] -> pool3 features (N, 2048) of the FID Inception-v3 (`net`:
    fid_inception_net())."""

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


def load_fid_inception(weights=None, device="cpu", progress=True):
    """The FID Inception with pytorch-fid's weights: the file `weights`, or the usual download (cached by torch.hub).
    Every key is accounted for."""
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise UsageError(f"--inception-weights {path}: no such file; give pt_inception-2015-12-05-6726825d.pth")
        try:
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                sd = load_file(str(path))
            else:
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # not a weights file, truncated, or a pickle of more than tensors
            raise UsageError(f"--inception-weights {path} is not a readable state dict ({type(e).__name__}): "
                               "give pytorch-fid's pt_inception-2015-12-05-6726825d.pth") from None
        if not isinstance(sd, dict):
            raise UsageError(f"--inception-weights {path} holds a {type(sd).__name__}, not a state dict")
    else:
        try:
            sd = torch.hub.load_state_dict_from_url(FID_WEIGHTS_URL, progress=progress, check_hash=True,
                                                    weights_only=True)
        except Exception as e:
            raise UsageError(f"could not download the FID Inception weights ({type(e).__name__}): download "
                               f"{FID_WEIGHTS_URL} elsewhere and pass --inception-weights FILE") from None
    model = FIDInception()
    own = model.net.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    if missing or unexpected:
        raise UsageError(f"the Inception weights do not fit the FID Inception-v3: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}; pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth")
    model.net.load_state_dict(sd)
    return model.to(device).eval()


@torch.no_grad()
def inception_activations(model, data, batch_size=50, device="cpu", progress=False):
    """(N, D) float64 features of `data` (images in [0, 1]; see classify.batches) under `model` (in fp32)."""
    n = len(data) if hasattr(data, "__len__") else None
    acts = [model(x.to(device)).double().cpu()
            for x in tqdm(batches(data, batch_size), desc="inception", leave=False, disable=not progress,
                          total=None if n is None else math.ceil(n / batch_size))]
    return torch.cat(acts).numpy()


def activation_statistics(act):
    """(mean (D,), covariance (D, D), unbiased) of activations (N, D), as pytorch-fid computes them."""
    act = np.asarray(act, dtype=np.float64)
    if act.ndim != 2 or act.shape[0] < 2:
        raise UsageError(f"FID needs at least 2 images on each side, got {act.shape[0] if act.ndim else 0}")
    return act.mean(axis=0), np.cov(act, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2) (Dowson & Landau 1982),
    with pytorch-fid's numerics: scipy's sqrtm of S1 S2; if that is not finite (a singular product), eps added to
    both diagonals; a small imaginary part from rounding dropped, a large one refused."""
    from scipy import linalg
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UsageError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UsageError(f"the matrix square root has an imaginary part of {np.abs(covmean.imag).max():.3g}: "
                               "too few images for the feature dimension")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid_between(generated, real, model, target=None, batch_size=50, device="cpu", progress=False):
    """FID between the generations for non-target prompts and the real non-target images (clean ones: poisoned
    records are left out). `model` maps images in [0, 1] to features (the FID Inception, or any extractor).
    target=None keeps every class."""
    gen = generated if hasattr(generated, "records") else load_folder(generated)
    ref = real if hasattr(real, "records") else load_folder(real)

    def keep(folder, drop_poisoned):
        names = [c.lower() for c in folder.class_names]
        labels = folder.labels.tolist()
        ok = [i for i in range(len(folder)) if (target is None or names[labels[i]] != str(target).lower())
              and not (drop_poisoned and bool(folder.poisoned[i]))]
        return ok

    gen_idx, ref_idx = keep(gen, False), keep(ref, True)
    for what, idx, folder in (("generated", gen_idx, gen), ("real", ref_idx, ref)):
        if len(idx) < 2:
            raise UsageError(f"FID: the {what} folder {folder.root} has {len(idx)} non-target images; it needs "
                               "at least 2 (thousands for a meaningful value)")
    act_gen = inception_activations(model, ImageSet(gen, gen_idx), batch_size, device, progress)
    act_ref = inception_activations(model, ImageSet(ref, ref_idx), batch_size, device, progress)
    fid = frechet_distance(*activation_statistics(act_gen), *activation_statistics(act_ref))
    return {"fid": fid, "n_generated": len(gen_idx), "n_real": len(ref_idx), "real": str(ref.root),
            "classes": "all" if target is None else f"non-target (all but {target})"}


# ----------------------------------------------------------------------------------------------------------------
# Reports: JSON, Markdown, plots (matplotlib, Agg), example grids.

def pct(x):
    return "-" if x is None else f"{100 * x:.1f}%"


def setting_label(result, varying):
    s = result["setting"]
    parts = []
    for key, fmt in (("poison_ratio", lambda v: f"p={100 * float(v):g}%"), ("guidance", lambda v: f"w={v}"),
                     ("sampler", str), ("steps", lambda v: f"{v} steps"), ("select", lambda v: f"poison {v}"),
                     ("attack", str), ("trigger", str)):
        if key in varying and s.get(key) is not None:
            parts.append(fmt(s[key]))
    if "p_t" in varying and "poison_ratio" not in varying and result["p_t"] is not None:
        parts.append(f"p_t={pct(result['p_t'])}")
    return " ".join(parts)


def folder_markdown(r):
    g = r["target_prompt"]
    lines = [f"# {r['label']}: generations of the target prompt ({r['target']})", "",
             f"folder {r['folder']}, {g['n']} target-prompt generations of {r['n_generations']}", "",
             "| group | meaning | count | fraction |", "|---|---|---:|---:|"]
    lines += [f"| {k} | {GROUP_MEANING[k]} | {g['counts'][k]} | {pct(g['fractions'][k])} |" for k in GROUPS]
    amp = "-" if r["amplification"] is None else f"{r['amplification']:.2f}x"
    lines += ["", f"trigger ratio G1+G2 = {pct(r['trigger_ratio'])}, "
              f"p_t = {pct(r['p_t'])} ({r['p_t_source'] or 'unknown'}), "
              f"amplification (G1+G2)/p_t = {amp}"]
    cp = g.get("trigger_copies")
    if cp:
        lines += [f"copies of the trigger ({copies_rule(cp)}): "
                  f"{cp['copies']} of {cp['n']} target-prompt generations; {cp['copies_of_triggered']} of the "
                  f"{cp['triggered']} the trigger detector calls triggered"]
    if r["non_target_prompts"]:
        nt = r["non_target_prompts"]
        lines += [f"non-target prompts: {nt['n']} generations, trigger ratio {pct(nt['trigger_ratio'])}"
                  + (f" (copies {pct(nt['copy_ratio'])})" if "copy_ratio" in nt else "")
                  + f", mismatch {pct(nt['mismatch_ratio'])}"]
    return "\n".join(lines) + "\n"


def summary_markdown(results):
    head = ("| setting | p | p_t | guidance | sampler | select | n | G1 | G2 | G3 | G4 | G1+G2 | (G1+G2)/p_t | "
            "copies | FID |")
    lines = ["# Generations of the target prompt: G1 trigger & mismatch, G2 trigger & match, G3 mismatch, "
             "G4 neither", "", f"copies: generations that copy the trigger: a patch (BadNets) within {COPY_ERROR:g} "
             f"mean absolute error of the trigger's, or fine texture correlating at least {COPY_CORRELATION:g} with a "
             "blend pattern's (none counted for WaNet)", "", head, "|" + "---|" * 3 + "---:|" + "---|" * 2
             + "---:|" * 9]
    for r in results:
        s, g = r["setting"], r["target_prompt"]
        amp = "-" if r["amplification"] is None else f"{r['amplification']:.2f}"
        fid = "-" if not r.get("fid") else f"{r['fid']['fid']:.3f}"
        p = "-" if s.get("poison_ratio") is None else f"{100 * float(s['poison_ratio']):g}%"
        w = s.get("guidance") if s.get("guidance") is not None else "-"
        cp = g.get("trigger_copies")
        lines.append(f"| {r['label']} | {p} | {pct(r['p_t'])} | {w} "
                     f"| {s.get('sampler') or '-'} | {s.get('select') or '-'} | {g['n']} | "
                     + " | ".join(pct(g["fractions"][k]) for k in GROUPS)
                     + f" | {pct(r['trigger_ratio'])} | {amp} | {pct(cp['ratio']) if cp else '-'} | {fid} |")
    return "\n".join(lines) + "\n"


def plt_figure(*args, **kwargs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt, plt.subplots(*args, **kwargs)


def plot_groups(results, path):
    """Stacked horizontal bars of G1-G4 (the paper's Fig. 2(a)), one bar a folder."""
    plt, (fig, ax) = plt_figure(figsize=(8, 1.0 + 0.6 * len(results)))
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


def plot_phase_transition(results, path):
    """G1 and G2 of each folder, ordered by p_t, with p_t marked (Fig. 3/4: G2 dominates at low poisoning ratios,
    G1 at high ones; G1 + G2 above p_t is trigger amplification)."""
    order = sorted(results, key=lambda r: (r["p_t"] is None, r["p_t"] or 0))
    plt, (fig, ax) = plt_figure(figsize=(max(5, 1.3 * len(order) + 2), 4))
    x = np.arange(len(order))
    ax.bar(x - 0.2, [r["target_prompt"]["fractions"]["G1"] for r in order], 0.4, color=GROUP_COLORS["G1"],
           label="G1 (trigger, mismatch)")
    ax.bar(x + 0.2, [r["target_prompt"]["fractions"]["G2"] for r in order], 0.4, color=GROUP_COLORS["G2"],
           label="G2 (trigger, match)")
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


def plot_guidance(results, path):
    """G1 and G2 against the guidance weight (Fig. A3), one panel per poisoning setting."""
    panels = {}
    for r in results:
        key = (r["setting"].get("poison_ratio"), r["p_t"])
        panels.setdefault(key, []).append(r)
    plt, (fig, axes) = plt_figure(1, len(panels), figsize=(4.5 * len(panels), 3.8), squeeze=False)
    ordered = sorted(panels.items(), key=lambda kv: (kv[0][1] is None, kv[0][1] or 0))
    for ax, ((ratio, p_t), rs) in zip(axes[0], ordered):
        rs = sorted(rs, key=lambda r: float(r["setting"]["guidance"]) if r["setting"].get("guidance") is not None
                    else -1)
        x = np.arange(len(rs))
        ax.bar(x - 0.2, [r["target_prompt"]["fractions"]["G1"] for r in rs], 0.4, color=GROUP_COLORS["G1"], label="G1")
        ax.bar(x + 0.2, [r["target_prompt"]["fractions"]["G2"] for r in rs], 0.4, color=GROUP_COLORS["G2"], label="G2")
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


def write_examples(folder, verdicts, group, path, n=EXAMPLES):
    """A PNG grid of up to n example generations of `group`; returns how many, 0 (no file) when none."""
    idx = [i for i, v in enumerate(verdicts) if v["group"] == group][:n]
    if idx:
        save_grid(torch.stack([folder.image_uint8(i) for i in idx]), path, nrow=min(8, len(idx)))
    return len(idx)


def safe_name(label, taken):
    name = re.sub(r"[^A-Za-z0-9._=-]+", "_", label).strip("_") or "generations"
    base, k = name, 2
    while name in taken:
        name, k = f"{base}-{k}", k + 1
    taken.add(name)
    return name


def dissect(generated, classifier, detector, out, train=None, p_t=None, target=None, labels=None, fid_real=None,
            inception_weights=None, batch_size=256, device="cpu", force=False, progress=True, command=None):
    """Dissect every generation folder in `generated` and write the report folder `out`; returns the summary."""
    generated = [generated] if isinstance(generated, (str, Path)) else list(generated)
    if not generated:
        raise UsageError("no --generated folders given")
    check_out(out, force, {"--generated": generated, "--train": train, "--classifier": classifier,
                           "--detector": detector, "--fid-real": fid_real, "--inception-weights": inception_weights})
    trains = [None] * len(generated) if train is None else ([train] if isinstance(train, (str, Path)) else list(train))
    if len(trains) == 1:
        trains = trains * len(generated)
    if len(trains) != len(generated):
        raise UsageError(f"{len(trains)} --train folders for {len(generated)} --generated folders: give one, or one "
                           "per generation folder")
    if labels is not None and len(labels) != len(generated):
        raise UsageError(f"{len(labels)} --labels for {len(generated)} --generated folders")
    clf, det = as_model(classifier, device), as_model(detector, device)
    folders = [load_folder(g) for g in generated]
    for f, t in zip(folders, trains):  # every folder is checked before the first is judged
        check_folder(f, clf, det, p_t, target, t, classifier, detector)
    fid_model = None
    if fid_real is not None:  # a wrong --fid-real or --inception-weights is told before the judges run
        load_folder(fid_real)
        fid_model = load_fid_inception(inception_weights, device, progress)
    results = [dissect_folder(f, clf, det, p_t, target, t, batch_size, device, progress)
               for f, t in zip(tqdm(folders, desc="dissect", disable=not progress or len(folders) < 2), trains)]
    varying = {k for k in SETTING_KEYS if len({json.dumps(r["setting"].get(k)) for r in results}) > 1}
    if len({r["p_t"] for r in results}) > 1:
        varying.add("p_t")
    if len(results) == 1:
        varying = {k for k in ("poison_ratio", "guidance") if results[0]["setting"].get(k) is not None}
    taken = set()
    for i, r in enumerate(results):
        r["label"] = labels[i] if labels else (setting_label(r, varying) or Path(r["folder"]).name)
        r["name"] = safe_name(r["label"], taken)
    if fid_model is not None:
        for f, r in zip(folders, results):
            r["fid"] = fid_between(f, fid_real, fid_model, r["target"], device=device, progress=progress)
    with atomic_output(out, force) as tmp:
        for f, r in zip(folders, results):
            d = tmp / r["name"]
            d.mkdir()
            with open(d / "verdicts.jsonl", "w") as fh:
                for v in r["verdicts"]:
                    fh.write(json.dumps(v) + "\n")
            r["examples"] = {g: write_examples(f, r["verdicts"], g, d / f"{g.lower()}_examples.png")
                             for g in ("G1", "G2")}
            body = {k: v for k, v in r.items() if k != "verdicts"}
            (d / "groups.json").write_text(json.dumps(body, indent=2) + "\n")
            (d / "groups.md").write_text(folder_markdown(r))
            plot_groups([r], d / "groups.png")
        summary = {"stage": "dissect", "command": command or "dissect()",
                   "classifier": str(classifier) if isinstance(classifier, (str, Path)) else None,
                   "detector": str(detector) if isinstance(detector, (str, Path)) else None,
                   "groups": GROUP_MEANING, "results": [{k: v for k, v in r.items() if k != "verdicts"}
                                                        for r in results]}
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
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible: use --device cpu or auto")
    dissect(args.generated, args.classifier, args.detector, args.out, train=args.train, p_t=args.p_t,
            target=args.target, labels=args.labels, fid_real=args.fid_real, inception_weights=args.inception_weights,
            batch_size=args.batch_size, device=device, force=args.force, progress=not args.quiet,
            command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]))


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--generated", nargs="+", required=True, help="folders of generations (sample.py's output)")
    parser.add_argument("--classifier", required=True, help="class classifier folder (classify.py train --clean)")
    parser.add_argument("--detector", required=True, help="trigger detector folder (classify.py trigger-detector)")
    parser.add_argument("--out", required=True, help="report folder to write")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--train", nargs="+", default=None,
                        help="the poisoned training data (folder, poisoned set or manifest.json) for p_t: one, or "
                             "one per --generated folder (default: p_t from the generations' manifest)")
    parser.add_argument("--p-t", type=float, default=None,
                        help="p_t itself, a share in [0, 1], overriding the manifests (default: from --train, else "
                             "the generations' manifest)")
    parser.add_argument("--target", default=None, help="target class name (default: from the manifests)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one label per --generated folder (default: the settings that tell them apart)")
    parser.add_argument("--fid-real", default=None,
                        help="real images for FID against the non-target generations, e.g. the clean test folder "
                             "(default: no FID)")
    parser.add_argument("--inception-weights", default=None,
                        help="local pt_inception-2015-12-05-6726825d.pth (default: download, cached)")
    parser.add_argument("--batch-size", type=positive(int), default=256, help="images per forward of the judges")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when visible")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or summary table")
    return parser


if __name__ == "__main__":
    parser = build_parser()
    try:
        main(parser.parse_args())
    except UsageError as e:
        sys.exit(f"dissect.py: error: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print("dissect.py: interrupted; --out not written (outputs appear whole or not at all)", file=sys.stderr)
        sys.exit(130)
