"""study.py: the --quick study runs every stage end to end, the report has every section with numbers, a second run
skips every finished stage, and a failing stage stops the study with a one-line error naming it and its log."""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}


def study(*args, cwd=ROOT):
    return subprocess.run([sys.executable, str(ROOT / "study.py"), *map(str, args)], cwd=cwd, env=ENV,
                          capture_output=True, text=True)


VERDICT = re.compile(r"\*\*(reproduced|partly reproduced|not reproduced|undetermined)\*\*")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "quick"
    first = study("--quick", "--out", out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return out, first


def test_quick_study_writes_every_section_with_numbers(quick):
    out, first = quick
    report = json.loads((out / "report.json").read_text())
    ratios = ["0.01", "0.1"]
    assert report["guidance"] == {"symbol": "w", "guided": 5.0, "unguided": 0.0, "sweep": [2.0]}
    for g in ("w5", "w0", "w2"):
        rows = report["dissect"][g]
        assert [r["ratio"] for r in rows] == [0.01, 0.1]
        for r in rows:
            assert 0 <= r["trigger_ratio"] <= 1 and 0 < r["p_t"] < 1
            assert abs(sum(r["fractions"].values()) - 1) < 1e-9
            cp = r["trigger_copies"]  # copies of the BadNets patch, among them the triggered ones
            assert cp["n"] == r["n"] and cp["triggered"] == round(r["trigger_ratio"] * r["n"])
            assert 0 <= cp["copies_of_triggered"] <= min(cp["copies"], cp["triggered"]) and cp["copies"] <= cp["n"]
        assert rows[0]["p_t"] < rows[1]["p_t"]  # more poison, more trigger images in the target class
    for r in ratios:
        det = report["detect"][r]["methods"]
        assert {"cd", "strip", "fct"} <= set(det)
        assert all(0 <= det[m][k] <= 1 for m in ("cd", "strip", "fct") for k in ("train_auroc", "generated_auroc"))
        for kind in ("poisoned", "generated"):
            assert 0 <= report["classifiers"][r][kind]["ta"] <= 1 and 0 <= report["classifiers"][r][kind]["asr"] <= 1
    # Tab. A4 ran where the poisoned set backdoors its classifier (or at the lowest ratio when it nowhere does)
    import study as S
    a4 = S.ratio_name((S.backdoored_ratios(report["classifiers"], [0.01, 0.1]) or [0.01])[0])
    assert report["diffusion_classifier"]["ratio"] == a4 and os.listdir(out / "diffusion-classifier") == [a4]
    rows = report["diffusion_classifier"]["rows"]
    assert [r["kind"] for r in rows] == ["classifier"] + ["diffusion"] * 4
    assert [r["filter_top"] for r in rows[1:]] == [0, 1, 5, 10]
    assert all(0 <= r["ta"] <= 1 and 0 <= r["asr"] <= 1 for r in rows)
    assert len(report["findings"]) == 7
    assert report["settings"] == json.loads((out / "study.json").read_text()) and report["settings"]["seed"] == 0
    assert all(f["reproduced"] in (True, False, "partly", "undetermined") for f in report["findings"])
    text = (out / "REPORT.md").read_text()
    for heading in ("## Findings", "## Trojan horses", "### Guidance w = 5", "### Guidance w = 0", "### Guidance w = 2",
                    "### The guidance sweep", "## Castle walls", "Tab. 3", "Tab. 4", "Tab. A4", "## Time"):
        assert heading in text
    for image in ("dissect/w5-target/groups.png", "dissect/w5-target/phase_transition.png", "dissect/w0/groups.png",
                  "dissect/guidance/guidance.png"):
        assert image in text and (out / image).is_file()
    # the sweep's figure holds every (ratio, weight) pair; the target class alone is generated at the sweep's weight
    assert len(json.loads((out / "dissect" / "guidance" / "summary.json").read_text())["results"]) == 6
    manifest = json.loads((out / "gen" / "0.1-w2" / "manifest.json").read_text())
    assert manifest["classes"] == ["zero"] and manifest["n_per_class"] == 8 and manifest["guidance"] == 2
    # --target-per-class: the target class alone gets 8 generations at every weight, the same x_T at each (the
    # verdicts read those at w = 5), every class 6 at w = 5 (its non-target prompts stay the w = 5 row's)
    assert [rows[0]["n"] for rows in (report["dissect"][g] for g in ("w0", "w2", "w5"))] == [8, 8, 8]
    seeds = [json.loads((out / "gen" / f"0.1-{g}" / "manifest.json").read_text())["seeds"] for g in ("w0", "w5-target")]
    assert seeds[0] == seeds[1]
    every = json.loads((out / "dissect" / "w5" / "summary.json").read_text())["results"]
    assert [d["non_target_prompts"]["trigger_ratio"] for d in every] == \
        [d["non_target_trigger_ratio"] for d in report["dissect"]["w5"]]
    assert "6 generations per class (8 of the target class at w = 0, 2, 5)." in text
    # sampled in bf16 on CUDA and on a CPU with AMX, else in fp32, and recorded so
    import torch
    bf16 = torch.cuda.is_available() or S.has_amx()
    assert manifest["dtype_used"] == report["settings"]["sample_dtype"] == ("bf16" if bf16 else "fp32")
    assert len(VERDICT.findall(text)) == 7
    assert "| trigger copies |" in text and "mean absolute error" in text
    assert "; copies " in report["findings"][0]["this_run"]   # beside the detector's trigger ratio
    # the commands a user would type are recorded, one per stage run
    commands = (out / "commands.sh").read_text()
    for script in ("poison.py", "classify.py", "train_ddpm.py", "sample.py", "dissect.py", "detect.py"):
        assert script in commands
    assert commands.count("--trigger badnets") == 3 and "BadNets trigger" in text  # 2 ratios + the clean split
    judge = [line for line in commands.splitlines() if "classify.py train --clean" in line]
    assert len(judge) == 1 and "--stamp-trigger 0.5" in judge[0]  # the class judge learns to look past the trigger
    train = [line for line in commands.splitlines() if "train_ddpm.py" in line]
    assert len(train) == 2 and all("--steps 30 --batch-size 32 " in line for line in train)  # the quick scale's
    assert "30 training steps of 32 images" in text


def test_second_run_skips_finished_stages(quick):
    out, first = quick
    assert "start train_ddpm" in first.stdout
    before = (out / "report.json").read_text()
    second = study("--quick", "--out", out)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "start " not in second.stdout and second.stdout.count("skip ") >= 15
    after = json.loads((out / "report.json").read_text())
    assert after["dissect"] == json.loads(before)["dissect"]
    # the time of each stage is that of the run that made it, not the skipping run's 0 s
    assert after["times_s"] == json.loads(before)["times_s"] and after["times_s"]["stage: train_ddpm"] > 0


def test_failing_stage_is_named_with_its_log(tmp_path):
    """Also: a relative --out is the caller's (the stages run in the repository), and repeated ratios run once."""
    res = study("--quick", "--resolution", "2", "--ratios", "0.1,0.01,0.10", "--out", "bad", cwd=tmp_path)
    assert res.returncode != 0
    assert "stage 'poison 0.01' failed" in res.stderr and str(tmp_path / "bad" / "logs") in res.stderr
    assert "poison.py: error: --resolution 2" in res.stderr   # the stage's own one-line error, from its log
    assert not (ROOT / "bad").exists()
    assert json.loads((tmp_path / "bad" / "study.json").read_text())["ratios"] == [0.01, 0.1]
    assert json.loads((tmp_path / "bad" / "times.json").read_text()) == {}   # written (nothing finished) on failure


def test_bad_flags_and_changed_settings_are_refused(quick, tmp_path):
    """A rerun with other settings would mix two studies in one report: refused, naming what changed. --force
    deletes only a study folder, and a folder holding other files is not taken over."""
    out, _ = quick
    res = study("--quick", "--per-class", "3", "--out", out)
    assert res.returncode != 0 and "per_class 6 -> 3" in res.stderr and "--force" in res.stderr
    # a study recorded before --target-per-class generated the target class --per-class times, and is told so
    old = tmp_path / "old"
    old.mkdir()
    settings = json.loads((out / "study.json").read_text())
    del settings["target_per_class"]
    (old / "study.json").write_text(json.dumps(settings))
    res = study("--quick", "--out", old)
    assert res.returncode != 0 and "target_per_class 6 -> 8" in res.stderr and "--target-per-class 6" in res.stderr
    # a finished quick study from before --batch-size (its batch in ddpm_extra) resumes as it is, and is re-recorded
    copied = tmp_path / "copied"
    shutil.copytree(out, copied)
    recorded = json.loads((copied / "study.json").read_text())
    older = {k: v for k, v in recorded.items() if k != "batch_size"}
    (copied / "study.json").write_text(json.dumps({**older, "ddpm_extra": ["--batch-size", "32"]}))
    res = study("--quick", "--out", copied)
    assert res.returncode == 0 and "start " not in res.stdout, res.stderr[-2000:]
    assert json.loads((copied / "study.json").read_text()) == recorded
    res = study("--quick", "--batch-size", "16", "--out", out)
    assert res.returncode != 0 and "batch_size 32 -> 16" in res.stderr
    res = study("--quick", "--trigger", "blend", "--out", out)
    assert res.returncode != 0 and "trigger badnets -> blend" in res.stderr
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("precious")
    for force in ((), ("--force",)):  # neither taken over (commands.sh, logs/ ...) nor deleted
        res = study("--quick", *force, "--out", keep)
        assert res.returncode != 0 and "no study (no study.json)" in res.stderr
        assert sorted(p.name for p in keep.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("flags, words", [
    (("--per-class", "9", "--target-per-class", "7"), ("--target-per-class 7 is below --per-class 9", "raise it")),
    (("--family", "sd", "--batch-size", "16"), ("--batch-size is train_ddpm.py's", "drop --batch-size")),
    (("--ratios", "0"), ("above 0 and below 1",)),
    (("--ratios", "0.1,x"), ("comma-separated list",)),
])
def test_bad_flags_are_refused_before_anything_is_written(tmp_path, flags, words):
    res = study("--quick", *flags, "--out", tmp_path / "x")
    assert res.returncode != 0 and all(w in res.stderr for w in words) and not (tmp_path / "x").exists()


def test_settings_recorded_before_their_flags_are_the_old_defaults(tmp_path):
    """A study recorded before --trigger and --sample-dtype was a BadNets study sampled in sample.py's default dtype;
    a rerun with other settings is refused, naming the flags that resume it."""
    import study as S
    old_defaults = {"trigger": "badnets", "sample_dtype": "fp32"}  # on a CPU
    settings = {"dataset": "digits", "ratios": [0.01, 0.1], "trigger": "badnets", "sample_dtype": "fp32"}
    (tmp_path / "study.json").write_text(json.dumps({"dataset": "digits", "ratios": [0.01, 0.1]}))
    S.check_settings(tmp_path / "study.json", settings, old_defaults)  # an older study: resumed as the study it is
    assert json.loads((tmp_path / "study.json").read_text()) == settings          # and recorded as such
    with pytest.raises(S.UsageError, match="trigger badnets -> blend.*rerun with its flags \\(--trigger badnets; all "
                                           "in study.json\\)"):
        S.check_settings(tmp_path / "study.json", {**settings, "trigger": "blend"}, old_defaults)
    with pytest.raises(S.UsageError, match="ratios .* sample_dtype fp32 -> bf16.*flags \\(--ratios 0.01,0.1 "
                                           "--sample-dtype fp32; all"):
        S.check_settings(tmp_path / "study.json", {**settings, "ratios": [0.05], "sample_dtype": "bf16"},
                         old_defaults)
    # before --badnets-size, BadNets was the reference's 3x3 pattern: resumed with --badnets-size reference
    with pytest.raises(S.UsageError, match="badnets_size None -> 6.*flags \\(--badnets-size reference; all"):
        S.check_settings(tmp_path / "study.json", {**settings, "badnets_size": 6},
                         {**old_defaults, "badnets_size": None})
    (tmp_path / "study.json").write_text(json.dumps({"dataset": "digits", "ratios": [0.01, 0.1]}))
    with pytest.raises(S.UsageError, match="sample_dtype bf16 -> fp32"):  # an older study on CUDA sampled in bf16
        S.check_settings(tmp_path / "study.json", settings, {**old_defaults, "sample_dtype": "bf16"})
    # before --batch-size: the batch was the preset's (small: 64) or set among train_ddpm.py flags in ddpm_extra,
    # which is retired when it held nothing else; flags of any other kind are a change
    now = {"dataset": "digits", "family": "ddpm", "preset": "small", "batch_size": 64}
    for extra, batch in (([], 64), (["--batch-size", "128"], 128), (["--dropout", "0.1"], 64)):
        before = {"dataset": "digits", "family": "ddpm", "preset": "small", "ddpm_extra": extra}
        (tmp_path / "study.json").write_text(json.dumps(before))
        args = ({"batch_size": S.train_batch(before)}, S.retired_settings(before))
        assert args[0]["batch_size"] == batch
        if extra[:1] == ["--dropout"]:
            with pytest.raises(S.UsageError, match=r"ddpm_extra \['--dropout', '0.1'\] -> None\)"):
                S.check_settings(tmp_path / "study.json", now, *args)
            continue
        with pytest.raises(S.UsageError, match=rf"\(batch_size {batch} -> 32\): rerun with its flags "
                                               rf"\(--batch-size {batch};"):
            S.check_settings(tmp_path / "study.json", {**now, "batch_size": 32}, *args)
        S.check_settings(tmp_path / "study.json", {**now, "batch_size": batch}, *args)
        assert json.loads((tmp_path / "study.json").read_text()) == {**now, "batch_size": batch}
    assert S.train_batch({"family": "sd", "preset": None}) is None
    assert S.train_batch({"family": "ddpm", "preset": "cifar10"}) == 128


def test_quick_sd_study_runs_through_finetune_sd(tmp_path):
    """The Stable Diffusion family: finetune_sd.py and SD sampling in place of train_ddpm.py, on a tiny local SD."""
    pytest.importorskip("diffusers")
    from test_sd import write_tiny_sd
    base = tmp_path / "tiny-sd"
    write_tiny_sd(base)
    out = tmp_path / "study-sd"
    res = study("--quick", "--family", "sd", "--base", base, "--out", out)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    commands = (out / "commands.sh").read_text()
    assert "finetune_sd.py" in commands and "train_ddpm.py" not in commands
    report = json.loads((out / "report.json").read_text())
    # SD's scale: s = 1 is unguided
    assert report["guidance"] == {"symbol": "s", "guided": 5.0, "unguided": 1.0, "sweep": []}
    assert set(report["dissect"]) == {"w5", "w1"} and report["diffusion_classifier"] is None
    manifest = json.loads((out / "gen" / "0.1-w1" / "manifest.json").read_text())
    assert manifest["guidance_sd_scale"] == 1.0
    text = (out / "REPORT.md").read_text()
    assert "### Guidance s = 5" in text and "### Guidance s = 1" in text and "Not run for this model family" in text
    assert len(report["findings"]) == 6  # no Tab. A4
    # a random tiny SD makes noise that the trigger detector calls all triggered (or none): the generations' AUROC is
    # undefined, which the report says instead of stopping the study
    for r in ("0.01", "0.1"):
        det = report["detect"][r]
        assert "methods" in det or ("AUROC" in det["error"] and re.search(
            rf"\| {float(r):.0%} \| – \| undefined: (every|no) generation carries the trigger "
            rf"\(`logs/detect_{r}.log`\)", text))


def test_an_interrupted_model_is_not_done(tmp_path):
    """A checkpoint short of its run's steps is resumed, not skipped, also when the scale leaves the steps to the
    preset (--train-steps not given)."""
    import study as S
    (tmp_path / "ema.safetensors").write_bytes(b"")
    config = {"step": 500, "training": {"steps": 1600}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert not S.model_done(tmp_path) and not S.model_done(tmp_path, 800) and S.model_done(tmp_path, 500)
    (tmp_path / "config.json").write_text(json.dumps({**config, "step": 1600}))
    assert S.model_done(tmp_path) and not S.model_done(tmp_path, 2000)


def row(g1, g2, n=100):
    return {"fractions": {"G1": g1, "G2": g2, "G3": 0.0, "G4": 1 - g1 - g2}, "n": n}


def test_phase_transition_needs_enough_triggered_generations():
    """G2 the larger part at the lowest ratio and G1 at the highest is the full transition; a crossing between two
    higher ratios counts only partly; a ratio with fewer than MIN_TRIGGERED triggered generations does not count."""
    import study as S
    ratios = [0.01, 0.05, 0.1]
    assert S.transition({0.01: row(0.02, 0.08), 0.05: row(0.2, 0.2), 0.1: row(0.5, 0.1)}, ratios) == ("full", 0.01, 0.1)
    assert S.transition({0.01: row(0.0, 0.02), 0.05: row(0.17, 0.2), 0.1: row(0.32, 0.24)},
                        ratios) == ("crosses", 0.05, 0.1)
    assert S.transition({0.01: row(0.1, 0.3), 0.05: row(0.3, 0.1), 0.1: row(0.12, 0.32)},
                        ratios) == ("crosses", 0.01, 0.05)
    assert S.transition({0.01: row(0.0, 0.02), 0.05: row(0.3, 0.2), 0.1: row(0.5, 0.1)}, ratios) is None
    assert S.transition({0.01: row(0.1, 0.3), 0.05: row(0.1, 0.3), 0.1: row(0.12, 0.32)}, ratios) is None
    assert S.g1_share(row(0.32, 0.24)) == (0.32 / 0.56, 56)
    full = {0.01: row(0.02, 0.3), 0.05: row(0.2, 0.2), 0.1: row(0.5, 0.1)}
    assert S.transition(full, ratios, trusted=[0.05, 0.1]) is None    # 1%'s "triggers" are the detector's errors


def test_sd_study_keeps_the_papers_global_batch_on_any_number_of_gpus():
    """16 images an optimizer step (4 a GPU on 4 GPUs) through --grad-accum on fewer GPUs, smaller batches on more."""
    import study as S
    assert [S.sd_batch(w) for w in (1, 2, 4, 8, 16)] == [(4, 4), (4, 2), (4, 1), (2, 1), (1, 1)]
    assert all(b * a * w == 16 for w in (1, 2, 4, 8, 16) for b, a in [S.sd_batch(w)])
    with pytest.raises(S.UsageError, match="--gpus 3: the paper's global batch of 16 images"):
        S.sd_batch(3)


def handmade(trigger, detect_ci=(0.05, 0.2), p_t=(0.1, 0.3, 0.5), n=300):
    """A report's numbers as collect() gathers them, for ratios 1%, 5%, 10% and weights w = 0, 2, 5: trigger[w] holds
    the target prompt's trigger ratio at each ratio (G2 the larger part at 1%, G1 at 10%); detect_ci is every
    detection cell's 95% interval of the AUROC difference."""
    import study as S
    ratios = [0.01, 0.05, 0.1]
    dissect = {f"w{w:g}": [{"ratio": r, "p_t": p, "trigger_ratio": t, "n": n, "trigger_copies": None,
                            "fractions": {"G1": t * share, "G2": t * (1 - share), "G3": 0.0, "G4": 1 - t},
                            "non_target_trigger_ratio": 0.0, "non_target_copy_ratio": 0.0}
                           for r, p, t, share in zip(ratios, p_t, trigger[w], (0.2, 0.5, 0.8))] for w in trigger}
    detect = {S.ratio_name(r): {"n": 300, "positives": {"train": 10, "generated": 30}, "methods": {
        m: {"train_auroc": 0.8, "generated_auroc": 0.8 + sum(detect_ci) / 2, "delta_ci": list(detect_ci)}
        for m in ("cd", "strip", "fct")}} for r in ratios}
    classifiers = {S.ratio_name(r): {"poisoned": {"asr": 1.0, "ta": 0.9}, "generated": {"asr": 0.0, "ta": 0.9}}
                   for r in ratios}
    res = {"dissect": dissect, "detect": detect, "classifiers": classifiers, "diffusion_classifier": None}
    return {f[0].split()[0]: f[3] for f in S.findings(res, ratios, (5.0, 0.0, "w", [2.0]))}


def test_verdicts_judge_the_papers_claims_at_its_setting():
    """Amplification and the phase transition are judged at w = 5, every ratio for amplification; Fig. A3 needs the
    trigger ratio to rise with w beyond chance and never fall; a detection cell gains only when its interval lies
    above 0 (a tie is no gain)."""
    paper = handmade({0: (0.05, 0.3, 0.5), 2: (0.2, 0.5, 0.7), 5: (0.4, 0.7, 0.9)})
    assert paper == {"Trigger": True, "Guidance": True, "Phase": True, "Non-target": True, "Detection": True,
                     "Classifier": True}
    unguided_only = handmade({0: (0.3, 0.5, 0.7), 2: (0.15, 0.35, 0.6), 5: (0.05, 0.2, 0.4)})
    assert unguided_only["Trigger"] is False and unguided_only["Guidance"] is False
    assert handmade({0: (0.3, 0.5, 0.7), 2: (0.15, 0.35, 0.6), 5: (0.3, 0.35, 0.6)})["Trigger"] == "partly"
    flat = handmade({0: (0.4, 0.6, 0.8), 2: (0.4, 0.6, 0.8), 5: (0.4, 0.6, 0.8)})
    assert flat["Trigger"] is True and flat["Guidance"] == "partly"
    dip = handmade({0: (0.4, 0.6, 0.8), 2: (0.4, 0.6, 0.65), 5: (0.4, 0.6, 0.9)})
    assert dip["Guidance"] is False                               # rises overall, but falls from w = 0 to 2
    tie = {0: (0.05, 0.3, 0.5), 2: (0.2, 0.5, 0.7), 5: (0.4, 0.7, 0.9)}
    assert handmade(tie, detect_ci=(0.0, 0.0))["Detection"] is False      # 1.000 vs 1.000 is no gain
    assert handmade(tie, detect_ci=(-0.01, 0.2))["Detection"] is False    # the interval holds 0
    assert handmade(tie, detect_ci=(-0.3, -0.1))["Detection"] is False


def test_the_trigger_detector_is_believed_per_model(quick):
    """A model whose non-target prompts' generations the trigger detector calls triggered (5% or more: colour noise
    that looks like a Blend trigger to it) gives no trigger ratio, G1/G2 split or detection cell to count."""
    import copy
    import study as S
    out, _ = quick
    report = json.loads((out / "report.json").read_text())
    ratios = [0.01, 0.1]
    g = report["guidance"]
    guidance = (g["guided"], g["unguided"], g["symbol"], g["sweep"])
    res = copy.deepcopy(report)
    for weight in res["dissect"].values():
        for r, (g1, g2) in zip(weight, ((0.02, 0.3), (0.5, 0.1))):
            r.update(fractions={"G1": g1, "G2": g2, "G3": 0.0, "G4": 1 - g1 - g2}, n=100, trigger_ratio=g1 + g2,
                     p_t=0.1 if r["ratio"] == 0.01 else 0.4, trigger_copies=None)
    guided = res["dissect"][f"w{g['guided']:g}"]
    for r, fp in zip(guided, (0.0, 0.01)):
        r["non_target_trigger_ratio"] = fp
    res["detect"] = {"0.01": {"n": 300, "positives": {"train": 10, "generated": 30}, "methods": {
        m: {"train_auroc": 0.6, "generated_auroc": 0.9, "delta_ci": [0.1, 0.5]} for m in ("cd", "strip", "fct")}}}
    found = {f[0].split()[0]: f for f in S.findings(res, ratios, guidance)}
    assert found["Phase"][3] is True and found["Trigger"][3] is True and found["Detection"][3] is True
    assert "p=1%: 32.0% (" in found["Trigger"][2] and "not believed" not in found["Trigger"][2]
    assert found["Guidance"][3] == "partly"       # the same trigger ratio at every weight
    for weight in res["dissect"].values():   # the 1% "triggers" resemble the trigger but do not copy it
        weight[0]["trigger_copies"] = {"n": 100, "copies": 1, "ratio": 0.01, "triggered": 32, "copies_of_triggered": 1}
    found = {f[0].split()[0]: f for f in S.findings(res, ratios, guidance)}
    assert found["Phase"][3] == "partly" and "most of p=1%'s triggered generations do not copy" in found["Phase"][2]
    for weight in res["dissect"].values():
        weight[0]["trigger_copies"].update(copies=20, copies_of_triggered=20)
    assert next(f for f in S.findings(res, ratios, guidance) if f[0].startswith("Phase"))[3] is True
    guided[0].update(non_target_trigger_ratio=0.136, non_target_copy_ratio=0.06)
    found = {f[0].split()[0]: f for f in S.findings(res, ratios, guidance)}
    assert found["Phase"][3] == "undetermined" and found["Detection"][3] == "undetermined"  # one ratio believed
    assert found["Non-target"][3] is False
    assert "p=1%: 13.6% (copies 6.0%)" in found["Non-target"][2]
    guided[0]["non_target_copy_ratio"] = 0.0   # the detector's "triggers" copy nothing: its errors, not a leak
    found = {f[0].split()[0]: f for f in S.findings(res, ratios, guidance)}
    assert found["Non-target"][3] == "partly" and found["Phase"][3] == "undetermined"
    assert found["Trigger"][3] == "partly"        # above p_t at 10%; 1% is not believed, so not every ratio counts
    assert all("the detector is not believed at p=1%" in found[k][2] for k in ("Trigger", "Phase", "Detection"))


def weakened_backdoor(classifiers, ratios):
    """Tab. 4's finding on hand-made classifier results: (this run's text, verdict)."""
    import study as S
    n = S.tab4(SimpleNamespace(res={"classifiers": classifiers}, ratios=ratios))
    return n.text, next(c for c in S.CLAIMS if c.reads is S.tab4).test(n)


def test_tab4_compares_where_the_poisoned_set_plants_a_backdoor():
    """A classifier trained on a few poisoned images may not be backdoored at all: Tab. 4 (and Tab. A4's stage) is
    judged at the lowest ratio whose poisoned-set classifier is (ASR at least one half), and the ratios below it are
    named."""
    import study as S
    ratios = [0.01, 0.05, 0.1]

    def cl(*pairs):  # (ASR poisoned, ASR generated) per ratio
        return {S.ratio_name(r): {"poisoned": {"asr": p}, "generated": {"asr": g, "ta": 0.9}}
                for r, (p, g) in zip(ratios, pairs)}
    assert S.backdoored_ratios(cl((0.93, 0.0), (0.4, 0.0), (0.5, 0.3)), ratios) == [0.01, 0.1]
    assert S.backdoored_ratios(cl((0.028, 0.0), (1.0, 0.0), (1.0, 0.3)), ratios) == [0.05, 0.1]
    assert S.backdoored_ratios(cl((0.0, 0.0), (None, 0.0), (0.49, 0.3)), ratios) == []
    text, ok = weakened_backdoor(cl((0.93, 0.0), (1.0, 0.06), (1.0, 0.3)), ratios)
    assert ok and text == "at p=1%: ASR 0.0% vs 93.0%; point values: the number of backdoor test images is not recorded"
    text, ok = weakened_backdoor(cl((0.028, 0.003), (1.0, 0.03), (1.0, 0.3)), ratios)
    assert ok and text.startswith("at p=1% the classifier trained on the poisoned set is not backdoored (ASR 2.8%)")
    assert "at p=5%: ASR 3.0% vs 100.0%" in text
    assert weakened_backdoor(cl((0.02, 0.0), (0.9, 0.95), (1.0, 0.3)), ratios)[1] is False   # not weakened
    text, ok = weakened_backdoor(cl((0.02, 0.0), (0.1, 0.0), (0.3, 0.0)), ratios)
    assert ok == "undetermined" and text.count("not backdoored") == 3   # no backdoor to weaken
    # with the number of backdoor test images, a lower ASR must be lower beyond chance (95% Wilson intervals)
    counted = cl((0.93, 0.85), (1.0, 0.06), (1.0, 0.3))
    for r in counted.values():
        r["generated"]["n_backdoor"] = 100
    text, ok = weakened_backdoor(counted, ratios)
    assert ok is False and text.endswith("do not overlap, and these do")  # 85% vs 93% of 100: within chance
    counted[S.ratio_name(0.01)]["generated"]["asr"] = 0.7
    assert weakened_backdoor(counted, ratios)[1] is True


def editable_report(quick):
    """The quick study's report.json, two of its ratios, and finding(res, name): the named finding of an edited
    copy."""
    import study as S
    out, _ = quick
    report = json.loads((out / "report.json").read_text())
    ratios = [0.01, 0.1]
    g = report["guidance"]
    guidance = (g["guided"], g["unguided"], g["symbol"], g["sweep"])

    def finding(res, name):
        return next(f for f in S.findings(res, ratios, guidance) if f[0].startswith(name))
    return report, ratios, finding


def test_verdicts_need_readable_numbers(quick):
    """The findings on the quick study's own numbers, edited: a filter that costs the diffusion classifier its clean
    accuracy does not count, an unusable classifier or no scorable detection cell is undetermined, and an untrusted
    trigger detector leaves amplification unreproduced while the text still shows where the interval lies."""
    import copy
    import study as S
    report, ratios, finding = editable_report(quick)
    g = report["guidance"]

    res = copy.deepcopy(report)
    res["diffusion_classifier"]["n_backdoor"] = 100

    def a4(*rows):  # (filter, TA, ASR) of the diffusion classifier; the smallcnn at TA 98%, ASR 100%
        res["diffusion_classifier"]["rows"] = [
            {"classifier": "smallcnn", "kind": "classifier", "filter_top": None, "ta": 0.98, "asr": 1.0},
            *({"classifier": "diffusion", "kind": "diffusion", "filter_top": f, "ta": ta, "asr": asr}
              for f, ta, asr in rows)]
        return finding(res, "Diffusion classifier")
    _, _, text, ok = a4((0.0, 0.98, 0.8), (1.0, 0.97, 0.5), (5.0, 0.8, 0.0), (10.0, 0.6, 0.0))
    assert ok is True and "50.0% (filter 1%" in text            # not the 0% of filters that cost 18-38 TA points
    # 99% of 100 backdoor images is not a lower ASR than 100% (a Blend-trigger run's numbers): within chance
    assert a4((0.0, 0.98, 0.99), (1.0, 0.98, 1.0), (5.0, 0.98, 0.99), (10.0, 0.97, 1.0))[3] is False
    assert a4((0.0, 0.98, 0.95), (1.0, 0.98, 0.9), (5.0, 0.98, 0.3), (10.0, 0.97, 0.1))[3] == "partly"
    res["diffusion_classifier"]["rows"][1]["ta"] = 0.3
    res["diffusion_classifier"]["rows"][2]["ta"] = 0.3
    assert finding(res, "Diffusion classifier")[3] == "undetermined"
    res = copy.deepcopy(report)
    for r in ratios:
        res["classifiers"][S.ratio_name(r)] = {"poisoned": {"ta": 0.98, "asr": 1.0}, "generated": {"ta": 0.1,
                                                                                                    "asr": 0.0}}
    _, _, text, ok = finding(res, "Classifier trained on generations")
    assert ok == "undetermined" and "too little to read its ASR" in text
    res["detect"] = {}
    assert finding(res, "Detection")[3] == "undetermined"
    res = copy.deepcopy(report)
    top = res["dissect"][f"w{g['guided']:g}"][-1]
    for rows in res["dissect"].values():
        rows[0].update(trigger_ratio=0.0, n=100, p_t=0.1)
        rows[-1].update(trigger_ratio=0.9, n=100, p_t=0.5)
    low = res["dissect"][f"w{g['guided']:g}"][0]
    low["non_target_trigger_ratio"] = 0.0
    top.update(non_target_trigger_ratio=0.06, non_target_copy_ratio=0.0, trigger_ratio=0.9, n=100, p_t=0.5)
    _, _, text, ok = finding(res, "Trigger amplification")
    assert ok is False and "not believed at p=" in text and "p=10%: 90.0% (" in text
    assert "✓" in text          # where the interval lies is shown, believed or not
    low["non_target_trigger_ratio"] = 0.2   # believed nowhere: nothing to read
    assert finding(res, "Trigger amplification")[3] == "undetermined"
    top.update(non_target_copy_ratio=0.05, non_target_triggered=6, non_target_copies_of_triggered=5)  # a real leak
    assert finding(res, "Trigger amplification")[3] == "partly"     # above p_t at 10%, the one ratio believed
    low.update(non_target_trigger_ratio=0.0)
    assert finding(res, "Trigger amplification")[3] == "partly"     # believed at 1% too, where it is below p_t
    low.update(trigger_ratio=0.3)
    assert finding(res, "Trigger amplification")[3] is True         # above p_t at every ratio, believed at each
    assert finding(res, "Non-target prompts")[3] is False


def test_unreadable_numbers_are_undetermined_not_wrong(quick):
    """Edge cases from a review: filters that raise the diffusion classifier's ASR do not make it "lower still"; a
    phase transition with no weight that has two counted ratios, a p_t nobody recorded, or no non-target generations
    leave their findings undetermined; the detector's non-target "triggers" count as a leak only when at least half
    of them (not of all generations) copy the trigger."""
    import copy
    report, ratios, finding = editable_report(quick)
    g = report["guidance"]

    res = copy.deepcopy(report)
    res["diffusion_classifier"]["n_backdoor"] = 100
    res["diffusion_classifier"]["rows"] = [
        {"classifier": "smallcnn", "kind": "classifier", "filter_top": None, "ta": 0.98, "asr": 1.0},
        *({"classifier": "diffusion", "kind": "diffusion", "filter_top": f, "ta": 0.98, "asr": asr}
          for f, asr in ((0.0, 0.1), (1.0, 0.4), (5.0, 0.4), (10.0, 0.4)))]
    _, _, text, ok = finding(res, "Diffusion classifier")
    assert ok == "partly" and "40.0% (filter 1%" in text      # lower than the classifier, but not lower still
    res = copy.deepcopy(report)
    for rows in res["dissect"].values():
        for r, k in zip(rows, (0, 30)):                          # triggers at the top ratio only: nothing to compare
            r.update(fractions={"G1": k / 200, "G2": k / 200, "G3": 0.0, "G4": 1 - k / 100}, n=100,
                     trigger_ratio=k / 100, p_t=0.1, non_target_trigger_ratio=0.0)
    _, _, text, ok = finding(res, "Phase transition")
    assert ok == "undetermined" and "w=5 has no two such ratios" in text
    for rows in res["dissect"].values():
        rows[-1]["p_t"] = None
    _, _, text, ok = finding(res, "Trigger amplification")
    assert ok == "undetermined" and "p_t is unknown at p=10%" in text
    guided = res["dissect"][f"w{g['guided']:g}"]
    guided[0]["non_target_trigger_ratio"] = None
    _, _, text, ok = finding(res, "Non-target prompts")
    assert ok == "undetermined" and "no non-target generations at p=1%" in text
    # 10% "triggers" among the non-target generations, 5% of all of them copies, but none of the triggered ones
    guided[0].update(non_target_trigger_ratio=0.1, non_target_copy_ratio=0.05, non_target_triggered=90,
                     non_target_copies_of_triggered=0)
    assert "the detector is not believed at p=1%" in finding(res, "Trigger amplification")[2]
    guided[0]["non_target_copies_of_triggered"] = 45              # half of them copy it: a real leak, believed
    assert "not believed at p=1%" not in finding(res, "Trigger amplification")[2]


def test_a_tolerated_failure_is_kept_on_resume(tmp_path):
    """A stage that fails with the tolerated message (detect.py's undefined AUROC) is reported, not fatal, and a rerun
    keeps its outcome instead of running it again; any other failure stops the study."""
    import study as S
    calls = tmp_path / "calls"
    script = tmp_path / "stage.py"
    script.write_text("import sys\nopen(sys.argv[1], 'a').write('x')\n"
                      "sys.exit('stage.py: error: an AUROC needs poisoned and clean images')\n")
    for run in (1, 2):
        runner = S.Runner(tmp_path / "study", jobs=1, threads=1, gpus=0, quiet=True)
        runner.run_one("detect 0.1", str(script), [calls], lambda: False, False, "an AUROC needs")
        assert "an AUROC needs" in runner.failed["detect 0.1"] and calls.read_text() == "x"   # ran once only
    with pytest.raises(S.UsageError, match="stage 'other' failed"):
        S.Runner(tmp_path / "study", jobs=1, threads=1, gpus=0, quiet=True).run_one(
            "other", str(script), [calls], lambda: False, False, "something else")


def test_detect_failures_are_told_in_short():
    """The Tab. 3 table keeps the gist of detect.py's one-line errors (which name every folder)."""
    sys.path.insert(0, str(ROOT))
    import study as S
    assert S.detect_failure("detect.py: error: by the trigger detector, no image of /x/gen/0.01-w5 carries the "
                            "trigger: an AUROC needs both") == "undefined: no generation carries the trigger"
    err = ("detect.py: error: the draw of 300 images from the generations /x/gen/0.01-w5 holds 1 poisoned, fewer than "
           "--min-poisoned 5: an AUROC needs more (a larger --n, or a lower --min-poisoned)")
    assert S.detect_failure(err) == f"not computed: 1 poisoned of 300 in the generations, fewer than {S.MIN_TRIGGERED}"
    assert S.detect_failure("something else") == "something else"


def test_replicates_report_each_finding_by_seed(quick, tmp_path):
    """--replicates 2: two whole studies at seeds a REPLICATE_GAP apart (other poisoned images, no shared x_T; the
    same split), and a report whose cells come from the seeds' own reports; a rerun skips everything, and neither
    kind of study is run into the other's folder."""
    import study as S
    out = tmp_path / "reps"
    first = study("--quick", "--replicates", "2", "--out", out)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    seeds = [0, S.REPLICATE_GAP]
    res = json.loads((out / "report.json").read_text())
    assert res["seeds"] == seeds
    subs = [json.loads((out / f"seed-{s}" / "report.json").read_text()) for s in seeds]
    assert [r["settings"]["seed"] for r in subs] == seeds
    gen = [json.loads((out / f"seed-{s}" / "gen" / "0.1-w5" / "manifest.json").read_text()) for s in seeds]
    assert [m["seeds"]["first"] for m in gen] == seeds and gen[0]["seeds"]["last"] < seeds[1]
    data = [json.loads((out / f"seed-{s}" / "data" / "digits-badnets-0.1" / "train" / "manifest.json").read_text())
            for s in seeds]
    assert [m["options"]["seed"] for m in data] == seeds
    assert data[0]["options"]["split_seed"] == data[1]["options"]["split_seed"] == 0
    # the verdicts by seed are each seed's own
    assert len(res["findings"]) == 7
    for name, verdicts in res["findings"].items():
        assert verdicts == [next(f["reproduced"] for f in r["findings"] if f["finding"] == name) for r in subs]
    # the summed G1 / G2 counts are the seeds' counts added up
    assert len(res["triggered_summed"]) == 3 * 2  # weights x ratios
    for key, cell in res["triggered_summed"].items():
        w, ratio = key.split(", p=")
        rows = [next(d for d in r["dissect"]["w" + w.split("=")[1]] if S.ratio_pct(d["ratio"]) == ratio) for r in subs]
        assert cell["G1"] == sum(round(d["fractions"]["G1"] * d["n"]) for d in rows)
        assert cell["G2"] == sum(round(d["fractions"]["G2"] * d["n"]) for d in rows)
        assert cell["n"] == sum(d["n"] for d in rows) == 16  # 8 a seed: the target class alone at every weight
    for w in (0, 2, 5):
        rows = [next(d for d in r["dissect"][f"w{w}"] if d["ratio"] == 0.1) for r in subs]
        amp = res["amplification"][f"w={w}"]
        assert amp["trigger_ratio"] == [d["trigger_ratio"] for d in rows] and amp["p_t"] == rows[0]["p_t"]
        assert amp["above_p_t"] == [S.wilson(d["trigger_ratio"], d["n"])[0] > d["p_t"] for d in rows]
    text = (out / "REPORT.md").read_text()
    opening = (out / "seed-0" / "REPORT.md").read_text().splitlines()[2]  # what the study was run with
    assert text.splitlines()[2] + " Commands: `commands.sh`; logs: `logs/`." == opening
    for heading in ("## Findings by seed", "## Trigger amplification at p=10%", "summed over seeds", "Tab. 3",
                    "Tab. 4", "Tab. A4"):
        assert heading in text
    assert f"| seed 0 | seed {S.REPLICATE_GAP} | across seeds |" in text and len(re.findall(r"\(of 2\) \|", text)) == 7
    c = [r["classifiers"]["0.1"] for r in subs]  # Tab. 4's row at 10%: every seed's ASR (TA) on both sets
    row = " | ".join(f"{S.pct(x['generated']['asr'])} ({S.pct(x['generated']['ta'])}) vs "
                     f"{S.pct(x['poisoned']['asr'])} ({S.pct(x['poisoned']['ta'])})" for x in c)
    assert f"| 10% | {row} |" in text
    # report.json holds every table's cells by seed, each the seed's own number
    assert res["classifiers"]["10%"]["generated"]["asr"] == [x["generated"]["asr"] for x in c]
    assert res["classifiers"]["10%"]["poisoned"]["ta"] == [x["poisoned"]["ta"] for x in c]
    at_1 = [next(d for d in r["dissect"]["w5"] if d["ratio"] == 0.01) for r in subs]
    assert res["false_positives"]["1%"] == {"trigger_ratio": [d["non_target_trigger_ratio"] for d in at_1],
                                           "copies": [d["non_target_copy_ratio"] for d in at_1]}
    for ratio, name in (("1%", "0.01"), ("10%", "0.1")):
        for m in ("cd", "strip", "fct"):
            cell = res["detection"][ratio][m]
            for k, r in enumerate(subs):
                dm = r["detect"][name]
                if "methods" in dm:  # scored: Δ is the generations' AUROC minus the training set's
                    x = dm["methods"][m]
                    assert abs(cell["delta"][k] - (x["generated_auroc"] - x["train_auroc"])) < 1e-9
                    assert cell["few_poisoned"][k] == (min(dm["positives"].values()) < S.MIN_TRIGGERED)
                else:  # not scored (e.g. too few poisoned images in the quick draw): no Δ, no count
                    assert cell["delta"][k] is None
    a4 = res["diffusion_classifier"]
    assert [x and x["ratio"] for x in a4] == [r["diffusion_classifier"] and float(r["diffusion_classifier"]["ratio"])
                                              for r in subs] and any(a4)
    for x, r in zip(a4, subs):
        if x:
            rows = r["diffusion_classifier"]["rows"]
            for name, kind, top in (("classifier", "classifier", None), ("diffusion", "diffusion", 0),
                                    ("filtered_top_10", "diffusion", 10)):
                y = next(y for y in rows if y["kind"] == kind and (top is None or y["filter_top"] == top))
                assert x[name] == {"asr": y["asr"], "ta": y["ta"]}
            assert f"p={S.ratio_pct(x['ratio'])}: {S.pct(x['classifier']['asr'])}" in text
    # fewer replicates on a rerun: nothing runs, the report covers the seeds asked for
    second = study("--quick", "--replicates", "1", "--out", out)
    assert second.returncode == 0 and "start " not in second.stdout and second.stdout.count("skip ") >= 15
    assert json.loads((out / "report.json").read_text())["seeds"] == [0]
    res = study("--quick", "--out", out)
    assert res.returncode != 0 and "holds replicates of a study" in res.stderr
    res = study("--quick", "--replicates", "2", "--out", quick[0])
    assert res.returncode != 0 and "holds a single study" in res.stderr
