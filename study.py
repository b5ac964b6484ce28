"""study.py: the whole study in one command (poison, train, generate, judge, detect), then REPORT.md.

    python study.py --out study                 # digits: 10-14 min on 2 CPU cores; a rerun resumes
    python study.py --quick --out /tmp/study    # every stage at toy size, about a minute
    python study.py --replicates 3 --out study-seeds    # 3 seeds, verdicts by seed

The paper's scales, the verdicts' rules, the flags: docs/study.md.
"""
import argparse
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import torch

from common import HelpFormatter, UsageError, finite, positive, replace_file

ROOT = Path(__file__).resolve().parent

MAX_FALSE_POSITIVES = 0.05  # the trigger detector is believed below this share of non-target "triggers"
MIN_TRIGGERED = 5  # triggered generations a ratio needs before G1 vs G2 is read
BACKDOORED = 0.5   # ASR from which a classifier counts as backdoored
USEFUL_TA = 0.5    # clean accuracy from which a classifier counts as having learnt the task
MAX_TA_DROP = 0.1  # the TA a diffusion classifier's loss filter may cost


# The verdicts: each finding reads its numbers from the stages' outputs; a test in CLAIMS grades them.

def pct(x):
    return "–" if x is None else f"{100 * x:.1f}%"


def ratio_name(r):
    return f"{r:g}"


def ratio_pct(r):
    return f"{100 * float(r):g}%"


def at(ratios, value=None):
    return ", ".join(f"p={ratio_pct(r)}" + (f": {value(r)}" if value else "") for r in ratios)


def wilson(fraction, n, z=1.96):
    """95% Wilson score interval."""
    if not n:
        return 0.0, 1.0
    centre = (fraction + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (fraction * (1 - fraction) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def clearly_below(a, n_a, b, n_b):
    """a (of n_a) below b (of n_b) beyond chance: 95% intervals apart."""
    return wilson(a, n_a)[1] < wilson(b, n_b)[0]


def g1_share(d):
    """(G1's share of the triggered or None, their count)."""
    f = d["fractions"]
    k = round((f["G1"] + f["G2"]) * d["n"])
    return (f["G1"] / (f["G1"] + f["G2"]) if k else None), k


def counted_ratios(rows, ratios, trusted=None):
    return sorted(r for r in ratios if g1_share(rows[r])[1] >= MIN_TRIGGERED and (trusted is None or r in trusted))


def transition(rows, ratios, trusted=None):
    """('full', lo, hi): G2 leads at lo, G1 at hi; ('crosses', a, b): G1 overtakes G2 between neighbours; else None."""
    share = {r: g1_share(rows[r]) for r in ratios}
    known = counted_ratios(rows, ratios, trusted)
    lo, hi = min(ratios), max(ratios)
    if lo in known and hi in known and share[lo][0] < 0.5 < share[hi][0]:
        return "full", lo, hi
    return next((("crosses", a, b) for a, b in zip(known, known[1:]) if share[a][0] < 0.5 < share[b][0]), None)


def backdoored_ratios(classifiers, ratios):
    return [r for r in ratios if (classifiers[ratio_name(r)]["poisoned"].get("asr") or 0) >= BACKDOORED]


def evidence(res, ratios, guidance):
    """The rows by weight and ratio, with where the trigger detector is believed."""
    w, none, sym, sweep = guidance
    weights = sorted((w, none, *sweep))
    d = {g: {x["ratio"]: x for x in res["dissect"][f"w{g:g}"]} for g in weights}
    false_positive = {r: d[w][r]["non_target_trigger_ratio"] for r in ratios}
    copies = {r: d[w][r].get("non_target_copy_ratio") for r in ratios}

    def leak(r):
        x = d[w][r]
        fired = x.get("non_target_triggered")
        if fired is not None:
            return fired > 0 and 2 * x["non_target_copies_of_triggered"] >= fired
        return copies[r] is not None and copies[r] >= false_positive[r] / 2  # summaries from before those counts
    trusted = [r for r in ratios
               if false_positive[r] is not None and (false_positive[r] < MAX_FALSE_POSITIVES or leak(r))]
    noisy = [r for r in ratios if r not in trusted and false_positive[r] is not None]
    unchecked = [r for r in ratios if false_positive[r] is None]
    copied = ", under half copies" if any(c is not None for c in copies.values()) else ""
    caveat = ((f"; the detector is not believed at {at(noisy)} (fires on {pct(MAX_FALSE_POSITIVES)}+ of "
               f"non-target generations{copied})" if noisy else "")
              + (f"; unchecked at {at(unchecked)} (no non-target generations)" if unchecked else ""))
    ci = {(g, r): wilson(d[g][r]["trigger_ratio"], d[g][r]["n"]) for g in weights for r in ratios}
    return SimpleNamespace(res=res, ratios=ratios, w=w, sym=sym, weights=weights, d=d, ci=ci, trusted=trusted,
                           noisy=noisy, unchecked=unchecked, caveat=caveat, false_positive=false_positive,
                           copies=copies)


def trigger_ratio_text(e, g, r):
    x, (lo, hi) = e.d[g][r], e.ci[g, r]
    cp = x.get("trigger_copies")
    copies = f"; copies {pct(cp['ratio'])}" if cp else ""
    return f"{pct(x['trigger_ratio'])} ({pct(lo)}–{pct(hi)}, n={x['n']}{copies})"


def amplification(e):
    x = e.d[e.w]
    above = {r: x[r]["p_t"] is not None and e.ci[e.w, r][0] > x[r]["p_t"] for r in e.ratios}
    no_pt = [r for r in e.ratios if x[r]["p_t"] is None]
    counted = [r for r in e.trusted if r not in no_pt]
    text = (f"at {e.sym}={e.w:g}, trigger ratio (95% CI) vs p_t: "
            + "; ".join(f"p={ratio_pct(r)}: {trigger_ratio_text(e, e.w, r)} vs {pct(x[r]['p_t'])} "
                        + ("✓" if above[r] else "✗") for r in e.ratios)
            + "; detector's false positives: " + at(e.ratios, lambda r: pct(e.false_positive[r]))
            + e.caveat + (f"; p_t is unknown at {at(no_pt)}" if no_pt else ""))
    return SimpleNamespace(text=text, ratios=e.ratios, no_pt=no_pt, counted=counted,
                           passed=[r for r in counted if above[r]])


def guidance_trend(e):
    hi, ws = max(e.ratios), e.weights
    x = {g: (e.d[g][hi]["trigger_ratio"], e.d[g][hi]["n"]) for g in ws}
    falls = [(a, b) for a in ws for b in ws if a < b and clearly_below(*x[b], *x[a])]
    rises = clearly_below(*x[ws[0]], *x[ws[-1]])
    text = (f"at p={ratio_pct(hi)}, trigger ratio (95% CI): "
            + "; ".join(f"{e.sym}={g:g}: {trigger_ratio_text(e, g, hi)}" for g in ws)
            + (f"; it falls beyond chance from {e.sym}={falls[0][0]:g} to {e.sym}={falls[0][1]:g}" if falls else
               f"; it rises beyond chance from {e.sym}={ws[0]:g} to {e.sym}={ws[-1]:g}" if rises else
               "; no change beyond chance") + e.caveat)
    return SimpleNamespace(text=text, unknown=hi not in e.trusted or len(ws) < 2, falls=falls, rises=rises)


def phase_transition(e):
    kind = {g: transition(e.d[g], e.ratios, e.trusted) for g in e.weights}

    def faint(g):  # a full transition whose low-ratio "triggers" are mostly not copies of the trigger
        cp = e.d[g][kind[g][1]].get("trigger_copies")
        return bool(cp) and 2 * cp["copies_of_triggered"] <= cp["triggered"]

    def split(r):
        f, k, cp = e.d[e.w][r]["fractions"], g1_share(e.d[e.w][r])[1], e.d[e.w][r].get("trigger_copies")
        return (f"p={ratio_pct(r)}: G1 {pct(f['G1'])} / G2 {pct(f['G2'])}"
                + (" (none triggered)" if k == 0 else f" (only {k} triggered)" if k < MIN_TRIGGERED else
                   f" ({cp['copies_of_triggered']} of {k} copies)" if cp else ""))

    def mark(g):
        k = kind[g]
        return ("✗" if k is None else f"G1 overtakes G2 between p={ratio_pct(k[1])} and p={ratio_pct(k[2])}"
                if k[0] != "full" else "✓" if not faint(g) else
                f"in full, but most of p={ratio_pct(k[1])}'s triggered generations do not copy the trigger")
    readable = len(counted_ratios(e.d[e.w], e.ratios, e.trusted)) >= 2
    text = (f"{e.sym}={e.w:g}: {', '.join(map(split, e.ratios))} ({mark(e.w)}); context: "
            + ", ".join(f"{e.sym}={g:g} {mark(g)}" for g in e.weights if g != e.w)
            + f" (G1 vs G2 read at {MIN_TRIGGERED}+ triggered)" + e.caveat
            + ("; a transition needs two ratios with the detector believed" if len(e.trusted) < 2 else
               f"; {e.sym}={e.w:g} has no two such ratios to compare" if not readable else ""))
    k = kind[e.w]
    return SimpleNamespace(text=text, unknown=len(e.trusted) < 2 or not readable, kind=k,
                           faint=k is not None and k[0] == "full" and faint(e.w))


def non_target(e):
    rare = {r: e.false_positive[r] is not None and e.false_positive[r] < MAX_FALSE_POSITIVES for r in e.ratios}
    checked = [r for r in e.ratios if not rare[r] and e.copies[r] is not None]
    uncounted = [r for r in e.noisy if e.copies[r] is None]  # e.g. WaNet: no copy count tells a leak from errors
    m = pct(MAX_FALSE_POSITIVES)
    text = ("trigger ratio " + at(e.ratios, lambda r: pct(e.false_positive[r]) + (
                "" if e.copies[r] is None else f" (copies {pct(e.copies[r])})"))
            + (f"; where the detector fires on {m}+, under {m} copies counts partly" if checked else "")
            + (f"; at {at(uncounted)} it fires on {m}+, no copy count" if uncounted else "")
            + (f"; no non-target generations at {at(e.unchecked)}" if e.unchecked else ""))
    return SimpleNamespace(text=text, leaked=any(e.copies[r] >= MAX_FALSE_POSITIVES for r in checked),
                           unknown=bool(uncounted or e.unchecked), rare=all(rare.values()))


def detection(e):
    scored = {r: dm for r, dm in e.res["detect"].items() if "positives" in dm}
    believed = {ratio_name(r) for r in e.trusted}  # the generations' ground truth is the trigger detector's
    counted = [r for r, dm in scored.items() if min(dm["positives"].values()) >= MIN_TRIGGERED and r in believed]
    intervals = [v.get("delta_ci") or (0.0, 0.0) for r in counted for v in scored[r]["methods"].values()]
    gains = sum(lo > 0 for lo, _ in intervals)
    positives = at(scored, lambda r: f"{scored[r]['positives']['train']} and "
                   f"{scored[r]['positives']['generated']} of {scored[r]['n']}")
    text = (f"the AUROC difference's 95% interval lies above 0 in {gains} of {len(intervals)} (method, ratio) "
            f"cells, below 0 in {sum(hi < 0 for _, hi in intervals)} (poisoned in training set and generations: "
            f"{positives}; under {MIN_TRIGGERED}: left out)" + e.caveat)
    return SimpleNamespace(text=text, cells=len(intervals), gains=gains)


def tab4(e):
    """Tab. 4 at the lowest ratio whose poisoned set plants a backdoor."""
    classifiers, ratios = e.res["classifiers"], e.ratios
    asr = {r: classifiers[ratio_name(r)]["poisoned"].get("asr") or 0 for r in ratios}
    planted = backdoored_ratios(classifiers, ratios)
    parts = [f"at p={ratio_pct(r)} the classifier trained on the poisoned set is not backdoored (ASR {pct(asr[r])})"
             for r in ratios if not planted or r < planted[0]]
    n = SimpleNamespace(unreadable=not planted, lower=False)
    if planted:
        c, r = classifiers[ratio_name(planted[0])]["generated"], planted[0]
        gen_asr, backdoors = (c.get("asr") if c.get("asr") is not None else 1), c.get("n_backdoor")
        parts.append(f"at p={ratio_pct(r)}: ASR {pct(c.get('asr'))} vs {pct(asr[r])}")
        if (c.get("ta") or 0) < USEFUL_TA:  # a classifier that has not learnt the task shows no backdoor either
            parts.append(f"but the generations' classifier reaches only TA {pct(c.get('ta'))}, too little to read "
                         "its ASR")
            n.unreadable = True
        elif not backdoors:  # results from before the test sets' sizes were kept
            parts.append("point values: the number of backdoor test images is not recorded")
            n.lower = gen_asr < asr[r]
        else:
            n.lower = clearly_below(gen_asr, backdoors, asr[r], backdoors)
            parts.append(f"{backdoors} backdoor test images; lower means 95% intervals do not overlap"
                         + ("" if n.lower else ", and these do"))
    n.text = "; ".join(parts)
    return n


def diffusion_classifier(e):
    """Tab. A4 (None: not run)."""
    d = e.res["diffusion_classifier"]
    if d is None:
        return None
    base = next(r for r in d["rows"] if r["kind"] == "classifier")
    diffusion = {r["filter_top"]: r for r in d["rows"] if r["kind"] == "diffusion"}
    plain, n = diffusion[0.0], d.get("n_backdoor")
    kept = [r for f, r in diffusion.items() if f > 0 and r["ta"] >= plain["ta"] - MAX_TA_DROP]
    best = min(kept, key=lambda r: r["asr"]) if kept else None
    drop = f"{100 * MAX_TA_DROP:g} points"
    unreadable = ("; the classifier is not backdoored: nothing to resist" if base["asr"] < BACKDOORED else
                  "; the number of backdoor test images is not recorded" if not n else
                  f"; the diffusion classifier reaches only TA {pct(plain['ta'])}, too little to read its ASR"
                  if plain["ta"] < USEFUL_TA else "")
    text = (f"at p={ratio_pct(d['ratio'])}"
            + ("" if float(d["ratio"]) == min(e.ratios) else " (lowest with a backdoored classifier)")
            + f": ASR {pct(base['asr'])} (classifier) vs {pct(plain['asr'])} (diffusion, no filter)"
            + (f", {pct(best['asr'])} (filter {best['filter_top']:g}%, best keeping TA within "
               f"{drop}); TA {pct(base['ta'])}, {pct(plain['ta'])}, {pct(best['ta'])}" if best else
               f"; no filter keeps the TA within {drop}; TA {pct(base['ta'])}, {pct(plain['ta'])}")
            + f"; lower = 95% intervals (n={n}) apart" + unreadable)

    def below(a, b):  # a's ASR below b's beyond chance
        return not unreadable and a is not None and clearly_below(a["asr"], n, b["asr"], n)
    return SimpleNamespace(text=text, unreadable=bool(unreadable), lower=below(plain, base),
                           lower_still=below(best, plain), best_lower=below(best, base))


def grade(undetermined, reproduced, partly=False):
    return "undetermined" if undetermined else True if reproduced else "partly" if partly else False


# Per finding: the paper's claim and setting, the function that reads this run's numbers, the test that grades them.
# Guidance 5 is the paper's (DDPM w, SD s); the other weights are context, never the verdict.
Claim = namedtuple("Claim", "finding paper setting reads test")
CLAIMS = [
    Claim("Trigger amplification (Fig. 3)",
          paper="the target prompt's generations carry the trigger more often than the target class's training "
                "images (trigger ratio > p_t)",
          setting="guidance 5, every poisoning ratio", reads=amplification,
          test=lambda n: grade(n.no_pt or not n.counted, len(n.passed) == len(n.ratios), n.passed)),
    Claim("Guidance exacerbates amplification (Fig. A3)",
          paper="the higher the guidance weight, the higher the trigger ratio",
          setting="most at high poisoning ratios", reads=guidance_trend,
          test=lambda n: grade(n.unknown, n.rises and not n.falls, not n.falls)),
    Claim("Phase transition (Fig. 4)",
          paper="triggered generations are mostly G2 (prompt matched) at a low poisoning ratio and mostly G1 "
                "(mismatched) at a high one",
          setting="guidance 5", reads=phase_transition,
          test=lambda n: grade(n.unknown, n.kind and n.kind[0] == "full" and not n.faint, n.kind)),
    Claim("Non-target prompts",
          paper="generations for the other classes carry almost no trigger",
          setting="guidance 5", reads=non_target,
          test=lambda n: grade(n.unknown and not n.leaked, n.rare and not n.leaked, not n.leaked)),
    Claim("Detection on generations (Tab. 3)",
          paper="poison detectors reach a higher AUROC on the generations than on the training set",
          setting="CD, STRIP, FCT", reads=detection,
          test=lambda n: grade(not n.cells, n.gains > n.cells / 2, n.gains)),
    Claim("Classifier trained on generations (Tab. 4)",
          paper="is less backdoored: lower ASR than one trained on the poisoned set",
          setting="low poisoning ratios", reads=tab4,
          test=lambda n: grade(n.unreadable, n.lower)),
    Claim("Diffusion classifier (Tab. A4)",
          paper="the poisoned DDPM as a classifier has a lower ASR than a classifier trained on its data, lower still "
                "with its largest losses filtered",
          setting="CIFAR-10 DDPM", reads=diffusion_classifier,
          test=lambda n: grade(n.unreadable, n.lower and n.lower_still, n.lower or n.best_lower)),
]


def findings(res, ratios, guidance):
    """(finding, claim, this run's numbers, verdict) per claim."""
    e = evidence(res, ratios, guidance)
    return [(c.finding, f"{c.paper}; {c.setting}", n.text, c.test(n)) for c in CLAIMS if (n := c.reads(e)) is not None]


# The report: reads the stages' JSON outputs, writes REPORT.md and report.json.

TRIGGER_NAMES = {"badnets": "BadNets", "blend": "Blend", "wanet": "WaNet"}
GROUPS = ("G1", "G2", "G3", "G4")
VERDICT = {True: "reproduced", "partly": "partly reproduced", False: "not reproduced", "undetermined": "undetermined"}
SHORT_VERDICT = {**VERDICT, "partly": "partly"}


def load_json(path):
    return json.loads(Path(path).read_text())


def write_json(path, obj):
    replace_file(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def final_results(path):
    """A classifier's final results with its test sets' sizes (older runs keep those per epoch only)."""
    res = load_json(path)
    last = res["epochs"][-1] if res.get("epochs") else {}
    return {**{k: v for k, v in last.items() if k.startswith("n_")}, **res["final"]}


def target_prompt(d):
    t = d["target_prompt"]
    return dict(trigger_ratio=d["trigger_ratio"], amplification=d["amplification"], fractions=t["fractions"],
                n=t["n"], trigger_copies=t.get("trigger_copies"))


def collect(out, ratios, guidance, failed):
    w, none, sym, sweep = guidance
    res = {"guidance": {"symbol": sym, "guided": w, "unguided": none, "sweep": sweep}, "dissect": {}, "detect": {},
           "classifiers": {}}
    for g in (w, none, *sweep):
        path = out / "dissect" / f"w{g:g}" / "summary.json"
        summary = load_json(path)["results"]
        res["dissect"][f"w{g:g}"] = [
            {"ratio": r, "name": d["name"], "p_t": d["p_t"], **target_prompt(d),
             **{f"non_target_{k}": (d["non_target_prompts"] or {}).get(k)
                for k in ("trigger_ratio", "copy_ratio", "triggered", "copies_of_triggered")}}
            for r, d in zip(ratios, summary)]
        found = [x["setting"].get("poison_ratio") for x in summary]
        if None not in found and [float(v) for v in found] != [float(r) for r in ratios]:
            raise UsageError(f"{path} holds the ratios {found}, not {ratios}: delete its folder and rerun")
    alone = out / "dissect" / f"w{w:g}-target" / "summary.json"
    if alone.is_file():  # the target class alone at w: the verdicts read its larger count
        for x, d in zip(res["dissect"][f"w{w:g}"], load_json(alone)["results"]):
            x.update(target_prompt(d))
    for r in map(ratio_name, ratios):
        path = out / "detect" / r / "detect.json"
        det = load_json(path) if path.is_file() else None
        res["detect"][r] = {"error": failed.get(f"detect {r}", "not run")} if det is None else {
            "methods": {m: {k: v.get(k) for k in ("train_auroc", "generated_auroc", "delta", "train_auroc_ci",
                                                  "generated_auroc_ci", "delta_ci")}
                        for m, v in det["results"].items()},
            "positives": {k: det["sets"][k]["positives"] for k in ("train", "generated")},
            "n": det["sets"]["train"]["n"]}
        res["classifiers"][r] = {k: final_results(out / "classifiers" / f"{k}-{r}" / "results.json")
                                 for k in ("poisoned", "generated")}
    a4 = ratio_name((backdoored_ratios(res["classifiers"], ratios) or ratios)[0])  # where run_study ran Tab. A4
    path = out / "diffusion-classifier" / a4 / "results.json"
    diff = load_json(path) if path.is_file() else None
    res["diffusion_classifier"] = None if diff is None else {
        "ratio": a4, "n_test": diff["n_test"], "n_backdoor": diff["n_backdoor"],
        "rows": [{k: r.get(k) for k in ("classifier", "kind", "filter_top", "ta", "asr")} for r in diff["rows"]]}
    res["judges"] = {k: load_json(out / "classifiers" / k / "results.json")["final"] for k in ("class", "trigger")}
    return res


def detect_failure(error):
    hit = re.search(r"\b(every|no) image of \S+ carries the trigger", error)
    if hit:
        return f"undefined: {hit.group(1)} generation carries the trigger"
    few = re.search(r"draw of (\d+) images from (the training set|the generations) \S+ holds (\d+) poisoned", error)
    if few:
        n, what, k = few.groups()
        return f"not computed: {k} poisoned of {n} in {what}, fewer than {MIN_TRIGGERED}"
    return error


def with_ci(row, key, fmt=".3f"):
    ci = row.get(f"{key}_ci")
    return f"{row[key]:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


def describe(s, ratios, guidance):
    """The report's opening sentence."""
    w, none, sym, sweep = guidance
    target, size, steps = s.get("target_per_class", s["per_class"]), s.get("badnets_size"), s["train_steps"]
    alone = ", ".join(f"{g:g}" for g in (none, *sweep, *([w] if target != s["per_class"] else [])))
    return (f"Dataset `{s['dataset']}` at {s['resolution']} px, {TRIGGER_NAMES[s.get('trigger', 'badnets')]} "
            f"trigger{f' ({size}x{size} white square)' if size else ''}, poisoning ratios "
            f"{', '.join(map(ratio_pct, ratios))}; "
            + (f"DDPM preset `{s['preset']}`" if s["family"] == "ddpm" else "Stable Diffusion fine-tuned")
            + (f", {steps} training steps" if steps else "")
            + (f" of {s['batch_size']} images" if steps and s.get("batch_size") else "")
            + f"; DDIM {s['sample_steps']} steps, guidance {sym} = {w:g}; {s['per_class']} generations per class ("
            + (f"{target} of the target class" if target != s["per_class"] else "the target class also")
            + f" at {sym} = {alone}).")


def row(*cells):
    return "| " + " | ".join(map(str, cells)) + " |"


def table(heading, header, rows=()):
    return ["", heading, "", row(*header), "|" + "---|" * len(header), *rows]


def write_reports(out, res, lines):
    write_json(out / "report.json", res)
    replace_file(out / "REPORT.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return res


def write_report(out, s, ratios, guidance, times, failed=None):
    res = collect(out, ratios, guidance, failed or {})
    rows = findings(res, ratios, guidance)
    w, none, sym, sweep = guidance
    res["findings"] = [dict(zip(("finding", "paper", "this_run", "reproduced"), r)) for r in rows]
    res["settings"] = load_json(out / "study.json")  # what run_study recorded and checked (with seed and paths)
    res["times_s"] = times
    j, d, t = res["judges"], res["diffusion_classifier"], res["judges"]["trigger"]
    cp = next((x["trigger_copies"] for weight in res["dissect"].values() for x in weight if x.get("trigger_copies")),
              None)  # dissect.py's rule for a copy of the trigger (older summaries: patches only)
    rule = "" if cp is None else " Trigger copies: generations whose " + (
        f"patch is within {cp.get('threshold', cp.get('max_error')):g} mean absolute error of the trigger's."
        if cp.get("measure", "patch_error") == "patch_error" else
        f"fine texture correlates {cp['threshold']:g}+ with the blend pattern's.")
    judges = (f"Judges: class classifier TA {pct(j['class'].get('ta'))}; trigger detector held-out accuracy "
              f"{pct(t.get('heldout_acc'))} (TPR {pct(t.get('heldout_tpr'))}, TNR {pct(t.get('heldout_tnr'))}).")
    L = ["# Study report: bilateral data poisoning in diffusion models", "",
         describe(s, ratios, guidance) + " Commands: `commands.sh`; logs: `logs/`.", "",
         "## Findings (rules: docs/study.md)",
         *table(judges, ("finding", "the paper", "this run", ""), [row(*r[:3], f"**{VERDICT[r[3]]}**") for r in rows]),
         "", "## Trojan horses (Fig. 2-4)", "",
         "G1 trigger & prompt mismatched, G2 trigger & matched, G3 mismatched, G4 neither; trigger ratio = G1 + G2; "
         "p_t: the trigger's share of the target class's training images." + rule]
    at_w = f"w{w:g}-target" if (out / "dissect" / f"w{w:g}-target").is_dir() else f"w{w:g}"
    for g in (w, none, *sweep):
        fig = at_w if g == w else f"w{g:g}"
        L += table(f"### Guidance {sym} = {g:g}", ("poisoning ratio", "p_t", *GROUPS, "trigger ratio", "amplification",
                                                  "trigger copies", "non-target trigger ratio"))
        for x in res["dissect"][f"w{g:g}"]:
            f, cp, copies = x["fractions"], x.get("trigger_copies"), x.get("non_target_copy_ratio")
            amp = "–" if x["amplification"] is None else f"{x['amplification']:.2f}×"
            L.append(row(ratio_pct(x["ratio"]), pct(x["p_t"]), *(pct(f[k]) for k in GROUPS),
                         pct(x["trigger_ratio"]), amp, pct(cp["ratio"]) if cp else "–",
                         pct(x["non_target_trigger_ratio"]) + ("" if copies is None else f" (copies {pct(copies)})")))
        L += ["", f"![groups](dissect/{fig}/groups.png) ![phase transition](dissect/{fig}/phase_transition.png)"]
    if sweep:
        L += ["", "### The guidance sweep (Fig. A3)", "", "![guidance sweep](dissect/guidance/guidance.png)"]
    top = f"dissect/{at_w}/{res['dissect'][f'w{w:g}'][-1]['name']}"
    grids = [f"![{g}]({top}/{g.lower()}_examples.png)" if (out / top / f"{g.lower()}_examples.png").is_file()
             else f"({g}: none)" for g in ("G1", "G2")]  # dissect.py draws a grid only for a group with images
    auroc = "AUROC [95% bootstrap interval]; the generations' truth: the trigger detector."
    L += ["", f"G1 and G2 at the highest ratio, {sym} = {w:g}:", "", " ".join(grids), "", "## Castle walls", "",
          "### Poison detection (Tab. 3)", *table(auroc, ("ratio", "method", "training set", "generations", "Δ"))]
    for r, dm in res["detect"].items():
        if "error" in dm:
            L.append(row(ratio_pct(r), "–", f"{detect_failure(dm['error'])} (`logs/detect_{r}.log`)", "", ""))
        L += [row(ratio_pct(r), m.upper(), with_ci(v, "train_auroc"), with_ci(v, "generated_auroc"),
                  with_ci(v, "delta", "+.3f")) for m, v in dm.get("methods", {}).items()]
    L += table("### Classifiers trained on poisoned vs generated data (Tab. 4)",
               ("ratio", "TA, poisoned set", "ASR, poisoned set", "TA, generations", "ASR, generations"),
               [row(ratio_pct(r), *(pct(c[k].get(m)) for k in ("poisoned", "generated") for m in ("ta", "asr")))
                for r, c in res["classifiers"].items()])
    L += ["", "### The poisoned diffusion model as a classifier (Tab. A4)"] + (
        ["", "Not run for this model family."] if d is None else
        table(f"p = {ratio_pct(d['ratio'])}; TA on {d['n_test']} clean images, ASR on {d['n_backdoor']} backdoor ones.",
              ("classifier", "TA", "ASR"),
              [row(r["classifier"].split(" (")[0], pct(r.get("ta")), pct(r.get("asr"))) for r in d["rows"]]))
    return write_reports(out, res, L + table("## Time", ("stage", "seconds, by the run that made it"), [
        row(k, v) for k, v in times.items() if k.startswith("stage: ")]))


def write_replicates(out, seeds, reports):
    """The seeds' reports side by side."""
    first, g = reports[0], reports[0]["guidance"]
    verdicts = {f["finding"]: [next((x["reproduced"] for x in r["findings"] if x["finding"] == f["finding"]),
                                    "undetermined") for r in reports] for f in first["findings"]}
    ratios = [d["ratio"] for d in first["dissect"][f"w{g['guided']:g}"]]
    sym, weights, hi = g["symbol"], sorted({g["guided"], g["unguided"], *g["sweep"]}), max(ratios)
    cols, ps = [f"seed {s}" for s in seeds], [ratio_pct(r) for r in ratios]
    res = {"seeds": seeds, "studies": [f"seed-{s}" for s in seeds], "findings": verdicts,
           "amplification": {"ratio": hi}, "triggered_summed": {}, "false_positives": {}, "detection": {},
           "classifiers": {}, "diffusion_classifier": []}

    def rows_at(w, ratio):  # every seed's dissect row at guidance w and poisoning ratio
        return [next(d for d in r["dissect"][f"w{w:g}"] if d["ratio"] == ratio) for r in reports]
    L = [f"# Replicates: the study at {len(seeds)} seeds", "",
         describe(first["settings"], ratios, (g["guided"], g["unguided"], sym, g["sweep"])),
         *table("## Findings by seed", ("finding", *cols, "across seeds"), [
             row(name, *(SHORT_VERDICT[x] for x in v), ", ".join(
                 f"{SHORT_VERDICT[k]} {v.count(k)}" for k in VERDICT if v.count(k)) + f" (of {len(seeds)})")
             for name, v in verdicts.items()]),
         "", f"## Trigger amplification at p={ratio_pct(hi)}",
         *table("✓: the trigger ratio's 95% interval lies above p_t.", ("guidance", "p_t", *cols, "mean ± sd"))]
    for w in weights:
        rows = rows_at(w, hi)
        values = [d["trigger_ratio"] for d in rows]
        above = [d["p_t"] is not None and wilson(d["trigger_ratio"], d["n"])[0] > d["p_t"] for d in rows]
        res["amplification"][f"{sym}={w:g}"] = {"trigger_ratio": values, "p_t": rows[0]["p_t"], "above_p_t": above}
        spread = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
        L.append(row(f"{sym} = {w:g}", pct(rows[0]["p_t"]), *(pct(v) + " ✓" * a for v, a in zip(values, above)),
                     pct(statistics.mean(values)) + spread))
    L += table("## Triggered target-prompt generations, summed over seeds", ("guidance", *(f"p={p}" for p in ps)))
    for w in weights:
        cells = []
        for ratio, p in zip(ratios, ps):
            rows = rows_at(w, ratio)
            g1, g2 = (sum(round(d["fractions"][k] * d["n"]) for d in rows) for k in ("G1", "G2"))
            n = sum(d["n"] for d in rows)
            copies = [d["trigger_copies"]["copies_of_triggered"] for d in rows if d.get("trigger_copies")]
            res["triggered_summed"][f"{sym}={w:g}, p={p}"] = {
                "G1": g1, "G2": g2, "n": n, "copies": sum(copies) if copies else None}
            cells.append(f"G1 {g1} / G2 {g2} of {n}" + (f" ({sum(copies)} copies)" if copies else ""))
        L.append(row(f"{sym} = {w:g}", *cells))
    L += table(f"Non-target prompts' trigger ratio ({sym} = {g['guided']:g}; copies in brackets).", ("ratio", *cols))
    for ratio, p in zip(ratios, ps):
        fp, copies = zip(*((d.get("non_target_trigger_ratio"), d.get("non_target_copy_ratio"))
                           for d in rows_at(g["guided"], ratio)))
        res["false_positives"][p] = {"trigger_ratio": list(fp), "copies": list(copies)}
        L.append(row(p, *(pct(f) + ("" if c is None else f" ({pct(c)})") for f, c in zip(fp, copies))))
    L += ["", "## Detection (Tab. 3): AUROC, generations minus training set", *table(
        f"In brackets: under {MIN_TRIGGERED} poisoned images in a set; –: no AUROC.", ("ratio", "method", *cols))]
    for ratio, p in zip(ratios, ps):
        dms = [r["detect"].get(ratio_name(ratio)) or {} for r in reports]
        for m in ("cd", "strip", "fct"):
            delta = [(dm.get("methods") or {}).get(m, {}).get("delta") for dm in dms]
            few = [min(dm["positives"].values()) < MIN_TRIGGERED if dm.get("positives") else None for dm in dms]
            res["detection"].setdefault(p, {})[m] = {"delta": delta, "few_poisoned": few}
            L.append(row(p, m.upper(), *("–" if x is None else f"({x:+.3f})" if f else f"{x:+.3f}"
                                         for x, f in zip(delta, few))))
    L += table("## Classifiers (Tab. 4): ASR (TA), trained on generations vs poisoned set", ("ratio", *cols))
    for ratio, p in zip(ratios, ps):
        c = [r["classifiers"][ratio_name(ratio)] for r in reports]
        res["classifiers"][p] = {k: {m: [x[k].get(m) for x in c] for m in ("asr", "ta")}
                                 for k in ("generated", "poisoned")}
        L.append(row(p, *(" vs ".join(f"{pct(x[k].get('asr'))} ({pct(x[k].get('ta'))})"
                                      for k in ("generated", "poisoned")) for x in c)))
    a4_rows = {"classifier": "classifier", "diffusion": 0.0, "filtered_top_10": 10.0}  # name: kind or filter_top
    for r in reports:
        d = r.get("diffusion_classifier")
        by = {x["filter_top"] if x["kind"] == "diffusion" else "classifier": x for x in d["rows"]} if d else {}
        res["diffusion_classifier"].append({"ratio": float(d["ratio"]), **{
            name: {"asr": by[k].get("asr"), "ta": by[k].get("ta")} if k in by else None
            for name, k in a4_rows.items()}} if d else None)
    if any(res["diffusion_classifier"]):
        L += table("## Diffusion classifier (Tab. A4): ASR (TA) of classifier / diffusion / top 10% filtered", cols, [
            row(*("–" if x is None else f"p={ratio_pct(x['ratio'])}: " + " / ".join(
                "–" if x[k] is None else f"{pct(x[k]['asr'])} ({pct(x[k]['ta'])})" for k in a4_rows)
                  for x in res["diffusion_classifier"]))])
    return write_reports(out, res, L)


# The driver: settings per scale, then each stage as a subprocess, skipped when its output is complete.
# `digits` shows the paper's effects on a CPU (benchmarks/RESULTS.md); `cifar10` and `sd` are the paper's.


def small_cnn(width, epochs):
    return "--arch", "smallcnn", "--width", width, "--lr", "0.02", "--batch-size", "32", "--epochs", epochs


QUICK_DETECT = ("--cd-steps", "5", "--strip-overlays", "8", "--fct-epochs", "1")
SCALES = {
    "digits": dict(family="ddpm", dataset="digits", resolution=12, ratios=(0.01, 0.05, 0.1), preset="small",
                   badnets_size=6, train_steps=1600, batch_size=128, per_class=100, target_per_class=300,
                   guidance=5.0, sweep=(1.0, 2.0), sample_steps=50, classifier=small_cnn("16", "8"),
                   detect=("--n", "300"), diffusion=("--images", "100", "--timesteps", "25")),
    "quick": dict(family="ddpm", dataset="digits", resolution=8, ratios=(0.01, 0.1), preset="tiny", train_steps=30,
                  batch_size=32, per_class=6, target_per_class=8, guidance=5.0, sweep=(2.0,), sample_steps=10,
                  classifier=small_cnn("8", "2"), detect=("--n", "40", *QUICK_DETECT),
                  diffusion=("--images", "20", "--timesteps", "5")),
    "cifar10": dict(family="ddpm", dataset="cifar10", resolution=32, ratios=(0.01, 0.05, 0.1), preset="cifar10",
                    train_steps=None, per_class=1000, guidance=5.0, sweep=(1.0, 2.0), sample_steps=50,
                    classifier=("--arch", "resnet18", "--epochs", "100", "--lr", "0.01", "--batch-size", "128"),
                    detect=("--n", "2000"), diffusion=("--images", "1000", "--timesteps", "50,500", "--keep", "5")),
    "sd": dict(family="sd", dataset="imagenette", resolution=512, ratios=(0.01, 0.05, 0.1), train_steps=None,
               sd_extra=(), per_class=100, guidance=5.0, sweep=(2.0, 3.0), sample_steps=50,
               classifier=("--arch", "resnet50", "--pretrained", "--epochs", "10", "--lr", "0.001", "--batch-size",
                           "50"), detect=("--n", "1000"), diffusion=None),
    "quick-sd": dict(family="sd", dataset="digits", resolution=32, ratios=(0.01, 0.1), train_steps=2,
                     sd_extra=("--batch-size", "2", "--epochs", "1"), per_class=4, guidance=5.0, sweep=(),
                     sample_steps=4, classifier=small_cnn("8", "2"), detect=("--n", "20", *QUICK_DETECT),
                     diffusion=None),
}
# study.py flags that override the scale's setting of their name, and all that set one
OVERRIDES = ("dataset", "resolution", "ratios", "preset", "train_steps", "batch_size", "per_class", "target_per_class",
             "guidance", "sweep", "sample_steps")
FLAG_SETTINGS = (*OVERRIDES, "family", "trigger", "badnets_size", "seed", "data_root", "base", "sample_dtype")
SD_GLOBAL_BATCH, SD_BATCH = 16, 4  # the paper's fine-tuning batch: 4 images on each of 4 GPUs
# Replicate k runs at --seed + k * REPLICATE_GAP (the split stays); sample.py's image i uses seed + i: no shared x_T.
REPLICATE_GAP = 1_000_000


class Runner:
    """Runs stage commands --jobs at a time; writes OUT/commands.sh, OUT/logs/, OUT/times.json."""

    def __init__(self, out, jobs, threads, gpus, quiet):
        self.out, self.jobs, self.threads, self.gpus, self.quiet = out, jobs, threads, gpus, quiet
        (out / "logs").mkdir(parents=True, exist_ok=True)
        self.times_path = out / "times.json"  # kept across reruns: a skipped stage keeps its maker's time
        self.times = load_json(self.times_path) if self.times_path.is_file() else {}
        self.failed, self.t0 = {}, time.time()

    def run_one(self, name, script, args, done, distributed=False, tolerated=None):
        """Run `script args` unless `done`; a failure stops the study unless the log's last line holds `tolerated`."""
        if done() if callable(done) else done.is_file():
            self.say(f"skip  {name} (done)")
            return 0.0
        log = self.out / "logs" / f"{name.replace(' ', '_').replace('/', '-')}.log"
        if self.tolerates(name, log, tolerated):  # an outcome of these inputs: not redone on resume
            self.say(f"skip  {name} (failed before, tolerated: {log})")
            return 0.0
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.gpus}"]
        cmd = [*(torchrun if distributed and self.gpus > 1 else [sys.executable]), script, *map(str, args)]
        with open(self.out / "commands.sh", "a") as fh:
            fh.write(shlex.join(cmd) + "\n")
        threads = {"OMP_NUM_THREADS": str(self.threads)} if self.threads else {}
        self.say(f"start {name}")
        t0 = time.time()
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", **threads},
                                stdout=fh, stderr=subprocess.STDOUT).returncode
        seconds = time.time() - t0
        if rc and self.tolerates(name, log, tolerated):
            self.say(f"fail  {name} (its log: {log}); the study goes on")
            return seconds
        if rc:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
            raise UsageError(f"stage {name!r} failed (exit {rc}); its log is {log}:\n{tail}")
        self.times[name] = round(seconds, 1)
        self.say(f"done  {name} in {seconds:.0f} s")
        return seconds

    def tolerates(self, name, log, words):
        last = log.read_text(errors="replace").splitlines()[-1:] if words and log.is_file() else []
        if last and words in last[0]:
            self.failed[name] = last[0]  # for the report
        return name in self.failed

    def run_many(self, stage, items):
        t0 = time.time()
        with ThreadPoolExecutor(1 if self.gpus else self.jobs) as pool:
            futures = [pool.submit(self.run_one, *item) for item in items]
            try:
                ran = [f.result() > 0 for f in futures]
            except BaseException:  # a failed stage stops the study: the queued ones do not start
                pool.shutdown(wait=True, cancel_futures=True)
                write_json(self.times_path, self.times)  # those that finished
                raise
        if any(ran) or f"stage: {stage}" not in self.times:
            self.times[f"stage: {stage}"] = round(time.time() - t0, 1)
        write_json(self.times_path, self.times)

    def say(self, line):
        if not self.quiet:  # one write per line: stages report from several threads at once
            sys.stdout.write(f"[{time.time() - self.t0:6.0f} s] {line}\n")
            sys.stdout.flush()


def has_amx():
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def as_flag(key, value):
    if isinstance(value, list):
        value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"--{key.replace('_', '-')} {value}"


def check_settings(path, settings, recorded_later=None, retired=()):
    """Record the settings, or refuse others. recorded_later: {setting: its default before it was recorded}."""
    if not path.is_file():
        write_json(path, settings)
        return
    recorded = load_json(path)
    old = {**(recorded_later or {}), **{k: v for k, v in recorded.items() if k not in retired}}
    keys = [k for k in sorted(set(old) | set(settings)) if json.dumps(old.get(k)) != json.dumps(settings.get(k))]
    if keys:
        flags = [as_flag(k, old[k]) for k in keys if k in FLAG_SETTINGS and old.get(k) is not None]
        flags += ["--badnets-size reference"] if "badnets_size" in keys and old.get("badnets_size") is None else []
        changes = "; ".join(f"{k} {old.get(k)} -> {settings.get(k)}" for k in keys)
        raise UsageError(f"{path.parent} holds a study with other settings ({changes}): rerun with its flags "
                         f"({' '.join(flags) + '; ' if flags else ''}all in {path.name}), another --out, or --force")
    if recorded != old:  # the settings a later version records by default, filled in
        write_json(path, old)


def train_batch(s):
    """A DDPM's batch: its own, an older study's `ddpm_extra` one, or the preset's."""
    if s.get("family") != "ddpm":
        return None
    extra = list(s.get("ddpm_extra") or [])
    if s.get("batch_size") is None and "--batch-size" in extra[:-1]:
        return int(extra[extra.index("--batch-size") + 1])
    from train_ddpm import PRESETS  # only here: the driver needs no model code
    return s.get("batch_size") or PRESETS.get(s.get("preset"), {}).get("train", {}).get("batch_size")


def retired_settings(before):
    """`ddpm_extra` when it held nothing or only the batch (now `batch_size`)."""
    extra = before.get("ddpm_extra")
    return ("ddpm_extra",) if extra == [] or (extra and len(extra) == 2 and extra[0] == "--batch-size") else ()


def model_done(path, steps=None):
    """finetune_sd.py's model done, or train_ddpm.py's trained to `steps` (default: its run's)."""
    config = Path(path) / "config.json"
    config = load_json(config) if config.is_file() else {}
    if "progress" in config:  # finetune_sd.py's
        return (config["progress"] or {}).get("done") is True
    ema = (Path(path) / "ema.safetensors").is_file()
    return ema and "step" in config and config["step"] >= (steps or config["training"]["steps"])


def sd_batch(world):
    """(--batch-size, --grad-accum): the paper's global batch on `world` processes."""
    if SD_GLOBAL_BATCH % world:
        raise UsageError(f"--gpus {world}: the paper's global batch of {SD_GLOBAL_BATCH} images needs a GPU count "
                         "dividing it")
    per_process = SD_GLOBAL_BATCH // world
    batch = math.gcd(per_process, SD_BATCH)
    return batch, per_process // batch


def prepare_out(path, force):
    out = Path(path).resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder")
    if out.exists() and any(out.iterdir()) and not any((out / f).is_file() for f in ("study.json", "commands.sh")):
        raise UsageError(f"--out {out} holds other files and no study (no study.json): give an empty folder")
    if out.exists() and force:
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def scale_of(args):
    sd = args.family == "sd" or (args.family is None and args.dataset in ("imagenette", "caltech15"))
    return ("quick-sd" if sd else "quick") if args.quick else ("sd" if sd else args.dataset or "digits")


def study_settings(args):
    s = {**SCALES[scale_of(args)]}
    s.update({k: getattr(args, k) for k in OVERRIDES if getattr(args, k) is not None})
    s["batch_size"] = train_batch(s)
    s["target_per_class"] = max(s["per_class"], s.get("target_per_class") or 0)
    s["trigger"] = args.trigger or "badnets"
    if args.badnets_size is not None:
        s["badnets_size"] = None if args.badnets_size == "reference" else int(args.badnets_size)
    s["badnets_size"] = s.get("badnets_size") if s["trigger"] == "badnets" else None
    s["ratios"] = sorted(set(s["ratios"]))  # the findings compare the lowest ratio with higher ones
    return s


def run_study(args):
    s = study_settings(args)
    family, ratios = s["family"], s["ratios"]
    out = prepare_out(args.out, args.force)  # the stages run in the repository (cwd=ROOT): every path is absolute
    before = load_json(out / "study.json") if (out / "study.json").is_file() else {}
    if "replicates" in before:
        raise UsageError(f"--out {out} holds replicates of a study: rerun with --replicates")
    data_root = str(Path(args.data_root).expanduser().resolve()) if args.data_root else None
    base = str(Path(args.base).expanduser().resolve()) if Path(args.base).expanduser().exists() else args.base
    gpus = torch.cuda.device_count() if args.gpus is None else args.gpus
    steps = [] if not s["train_steps"] else ["--steps" if family == "ddpm" else "--max-steps", s["train_steps"]]
    if family == "ddpm":
        train = ["--preset", s["preset"], *steps, *(["--batch-size", s["batch_size"]] if s["batch_size"] else [])]
    elif "--batch-size" in s["sd_extra"]:  # the quick scale's toy batch
        train = [*steps, *s["sd_extra"]]
    else:  # the paper's global batch, on any number of GPUs
        batch, accum = sd_batch(max(gpus, 1))
        train = [*steps, *s["sd_extra"], "--batch-size", batch, "--grad-accum", accum]
    # sample.py in bf16 on CUDA, and for DDPMs on a CPU with AMX (99% of dissect.py's verdicts agree with fp32's)
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    auto_dtype = "bf16" if cuda or (family == "ddpm" and has_amx()) else "fp32"
    sample_dtype = auto_dtype if args.sample_dtype == "auto" else args.sample_dtype
    # a rerun resumes only with the same settings; a setting recorded later had its old default before
    settings = {**{k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}, "seed": args.seed,
                "data_root": data_root, "base": base if family == "sd" else None, "sample_dtype": sample_dtype}
    check_settings(out / "study.json", settings, {"trigger": "badnets", "badnets_size": None,
                                                  "sample_dtype": "bf16" if cuda else "fp32",
                                                  "target_per_class": before.get("per_class"),
                                                  "batch_size": train_batch(before)}, retired_settings(before))
    # On the CPU the per-ratio runs go side by side, one thread each: small models use one core better than two.
    jobs = args.jobs or (1 if gpus else len(ratios))
    run = Runner(out, jobs, None if gpus else max(1, (os.cpu_count() or 1) // jobs), gpus, args.quiet)
    # the guided weight, its "no guidance" value (DDPM w = 0, SD s = 1) and the sweep's weights between (Fig. A3)
    w, none, sym = float(s["guidance"]), (1.0 if family == "sd" else 0.0), ("s" if family == "sd" else "w")
    sweep = sorted({float(g) for g in s["sweep"]} - {w, none})
    weights = list(dict.fromkeys([w, none, *sweep]))
    alone = weights[1:] + ([w] if s["target_per_class"] > s["per_class"] else [])  # the target class alone
    name = {r: ratio_name(r) for r in ratios}
    data = {r: out / "data" / f"{s['dataset']}-{s['trigger']}-{name[r]}" for r in ratios}
    clean, model = out / "data" / f"{s['dataset']}-clean", {r: out / "models" / f"{family}-{name[r]}" for r in ratios}
    gen = {(r, g): out / "gen" / f"{name[r]}-w{g:g}" for r in ratios for g in weights}
    gen.update({(r, "target"): out / "gen" / f"{name[r]}-w{w:g}-target" if w in alone else gen[r, w] for r in ratios})
    clf = out / "classifiers"
    poisoned, generated = ({r: clf / f"{kind}-{name[r]}" for r in ratios} for kind in ("poisoned", "generated"))
    device, seed = ["--device", args.device], ["--seed", args.seed]
    with open(out / "commands.sh", "a") as fh:
        fh.write(f"# study.py {' '.join(sys.argv[1:])}  ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")

    # 1. A poisoned set per ratio (with its clean and backdoor test sets), and the split unpoisoned for the judges.
    source = ["--dataset", s["dataset"], "--resolution", s["resolution"], "--trigger", s["trigger"],
              *(["--badnets-size", s["badnets_size"]] if s["badnets_size"] else []), *seed,
              *(["--data-root", data_root] if data_root else [])]
    run.run_many("poison", [(f"poison {name.get(r, 'clean')}", "poison.py", [*source, "--ratio", r, "--out", folder],
                             folder / "train" / "manifest.json") for r, folder in {**data, 0: clean}.items()])
    target = load_json(data[max(ratios)] / "train" / "manifest.json")["target"]  # poison.py's default per dataset

    # 2. The judges, on the unpoisoned split: a class classifier (half its images stamped), a trigger detector.
    common = [*s["classifier"], *seed, *device, "--quiet"]

    def classify(label, folder, head, tail=()):
        return (f"classifier {label}", "classify.py", [*head, "--out", folder, *common, *tail],
                folder / "results.json", True)
    faint = ["--blend-alpha-range", "none"] if family == "ddpm" else []
    run.run_many("judges", [
        classify("class", clf / "class", ["train", "--clean", "--data", clean], ["--stamp-trigger", "0.5"]),
        classify("trigger", clf / "trigger", ["trigger-detector", "--data", clean],
                 ["--augment", "crop-noise", *faint])])

    # 3. A diffusion model per ratio (a rerun resumes it): a DDPM from scratch, or SD's U-Net fine-tuned from --base.
    trainer = "train_ddpm" if family == "ddpm" else "finetune_sd"
    run.run_many(trainer, [(f"{trainer} {name[r]}", f"{trainer}.py", [
        "--data", data[r] / "train", *(["--base", base] if family == "sd" else []), "--out", model[r], *train,
        "--train-seed", args.seed, *device], lambda r=r: model_done(model[r], s["train_steps"]), True) for r in ratios])

    # 4. Every class at w (Fig. 2, Tab. 3/4); the target class alone at the other weights, and at w if it gets more.
    def sample(r, g, classes, per_class, folder, label=""):
        return (f"sample {name[r]} w{g:g}{label}", "sample.py",
                ["--model", model[r], "--class", classes, "--images-per-class", per_class, "--guidance", g,
                 "--out", folder, "--steps", s["sample_steps"], *seed, "--dtype", sample_dtype, *device],
                folder / "manifest.json", True)
    run.run_many("sample", [sample(r, w, "all", s["per_class"], gen[r, w]) for r in ratios]
                 + [sample(r, g, target["index"], s["target_per_class"], gen[r, "target" if g == w else g],
                           " target" if g == w else "") for r in ratios for g in alone])

    # 5. Tab. 4: a classifier trained on the poisoned set vs one trained on the generations (same test sets).
    run.run_many("classifiers", [item for r in ratios for item in (
        classify(f"poisoned-{name[r]}", poisoned[r], ["train", "--data", data[r]]),
        classify(f"generated-{name[r]}", generated[r], ["train", "--data", gen[r, w], "--test", data[r] / "test",
                                                        "--backdoor", data[r] / "test_backdoor"]))])

    # 6. G1-G4, amplification and the phase transition at each weight, and all (ratio, weight) pairs for Fig. A3.
    def dissect(label, pairs, target_only=False):
        folders = [gen[r, "target"] if target_only and g == w else gen[r, g] for r, g in pairs]
        return (f"dissect {label}", "dissect.py",
                ["--generated", *folders, "--train", *[data[r] for r, _ in pairs],
                 "--labels", *[f"p={ratio_pct(r)}, {sym}={g:g}" for r, g in pairs], "--out", out / "dissect" / label,
                 "--classifier", clf / "class", "--detector", clf / "trigger", *device, "--quiet"],
                out / "dissect" / label / "summary.json")
    run.run_many("dissect", [dissect(f"w{g:g}", [(r, g) for r in ratios]) for g in weights]
                 + ([dissect(f"w{w:g}-target", [(r, w) for r in ratios], True)] if w in alone else [])
                 + ([dissect("guidance", [(r, g) for r in ratios for g in sorted(weights)], True)] if sweep else []))

    # 7. Tab. A4: the DDPM as a classifier, at the lowest ratio whose poisoned-set classifier is backdoored.
    results = {name[r]: {"poisoned": load_json(poisoned[r] / "results.json")["final"]} for r in ratios}
    a4 = (backdoored_ratios(results, ratios) or ratios)[0]
    diff = out / "diffusion-classifier" / name[a4]
    items = [] if s["diffusion"] is None else [
        (f"diffusion classifier {name[a4]}", "classify.py",
         ["diffusion", "--model", model[a4], "--data", data[a4], "--classifier", poisoned[a4], *s["diffusion"],
          *seed, "--out", diff, *device, "--quiet"], diff / "results.json", True)]
    # 8. Tab. 3: detection on the training set vs the generations; an undefined AUROC is reported, not fatal.
    items += [(f"detect {name[r]}", "detect.py",
               ["--classifier", poisoned[r], "--train", data[r], "--generated", gen[r, w], "--detector",
                clf / "trigger", "--out", out / "detect" / name[r], *s["detect"],
                *([] if args.quick else ["--min-poisoned", MIN_TRIGGERED]), *seed, *device, "--quiet"],
               out / "detect" / name[r] / "detect.json", False, "an AUROC needs") for r in ratios]
    run.run_many("detect, diffusion classifier", items)

    report = write_report(out, s, ratios, (w, none, sym, sweep), run.times, run.failed)
    run.say(f"report: {out / 'REPORT.md'}")
    return report


def run_replicates(args):
    out = prepare_out(args.out, args.force)
    seeds = [args.seed + k * REPLICATE_GAP for k in range(args.replicates)]
    if (out / "study.json").is_file() and "replicates" not in load_json(out / "study.json"):
        raise UsageError(f"--out {out} holds a single study: give --replicates another --out")
    # the seeds follow from --seed, so a rerun may ask for more replicates (or fewer: the report covers those)
    check_settings(out / "study.json", {"replicates": f"seed + k * {REPLICATE_GAP}", "seed": args.seed})
    reports = []
    for k, seed in enumerate(seeds):
        if not args.quiet:
            print(f"replicate {k + 1} of {len(seeds)}: seed {seed} -> {out / f'seed-{seed}'}", flush=True)
        reports.append(run_study(argparse.Namespace(**{**vars(args), "seed": seed, "out": str(out / f"seed-{seed}"),
                                                       "force": False, "replicates": None})))
    return write_replicates(out, seeds, reports)


def main(args):
    t0 = time.time()
    report = run_replicates(args) if args.replicates else run_study(args)
    if not args.quiet:
        text = (Path(args.out) / "REPORT.md").read_text()
        print(text.split("\n## Trigger amplification" if args.replicates else "## Trojan")[0], end="")
        print(f"study finished in {time.time() - t0:.0f} s: {Path(args.out) / 'REPORT.md'}")
    return report


def ratio_list(text):
    try:
        ratios = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a comma-separated list, e.g. 0.01,0.05,0.1") from None
    if not all(0 < r < 1 for r in ratios):
        raise argparse.ArgumentTypeError(f"{text!r}: give ratios above 0 and below 1")
    return ratios


def check_args(args):
    if args.batch_size is not None and SCALES[scale_of(args)]["family"] != "ddpm":
        raise UsageError("--batch-size is train_ddpm.py's: drop --batch-size for SD")
    per_class = args.per_class or SCALES[scale_of(args)]["per_class"]
    if args.target_per_class is not None and args.target_per_class < per_class:
        raise UsageError(f"--target-per-class {args.target_per_class} is below --per-class {per_class}: raise it")


class Help(HelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
    add = p.add_argument
    add("--out", default="study", help="study folder")
    add("--quick", action="store_true", help="every stage at toy size")
    add("--force", action="store_true", help="delete --out first")
    add("--dataset", choices=["digits", "cifar10", "imagenette", "caltech15"], help="default: digits")
    add("--family", choices=["ddpm", "sd"], help="default: sd for imagenette, caltech15")
    add("--base", default="CompVis/stable-diffusion-v1-4", help="SD base model")
    add("--data-root", help="torchvision's datasets")
    add("--resolution", type=positive(int))
    add("--trigger", choices=["badnets", "blend", "wanet"], help="default: badnets")
    add("--badnets-size", type=lambda t: t if t == "reference" else str(positive(int)(t)), help="side or reference")
    add("--ratios", type=ratio_list, help="default: 0.01,0.05,0.1")
    add("--preset", help="train_ddpm.py's")
    add("--train-steps", type=positive(int), help="per model")
    add("--batch-size", type=positive(int), help="DDPM only")
    add("--per-class", type=positive(int), help="generations per class")
    add("--target-per-class", type=positive(int), help="of the target class")
    add("--guidance", type=finite, help="DDPM w, SD s; default: 5")
    add("--sweep", type=lambda t: tuple(finite(x) for x in t.split(",") if x),
        help="more target-class weights ('' for none)")
    add("--sample-steps", type=positive(int), help="DDIM steps; default: 50")
    add("--sample-dtype", default="auto", choices=["auto", "fp32", "bf16"], help="auto: bf16 on CUDA and AMX")
    add("--seed", type=int, default=0)
    add("--replicates", type=positive(int), help="seeds --seed + k * 1000000")
    add("--jobs", type=positive(int), help="stages at once on the CPU; default: one per ratio")
    add("--gpus", type=int, help="default: all")
    add("--device", default="auto", choices=["auto", "cpu", "cuda"])
    add("--quiet", action="store_true")
    return p


if __name__ == "__main__":
    args = build_parser().parse_args()
    try:
        check_args(args)
        main(args)
    except UsageError as e:
        sys.exit(f"study.py: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print("study.py: interrupted; rerun to resume", file=sys.stderr)
        sys.exit(130)
