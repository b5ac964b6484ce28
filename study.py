"""study.py -- the whole study in one command: poison -> train DDPMs -> generate -> judge -> detect -> report.

It calls the stage scripts exactly as a user would (every command it runs is printed in OUT/commands.sh), so it is
also the worked example of the house. On the embedded default (scikit-learn's digits, no download) it runs on a
2-core CPU in 10-14 minutes:

    python study.py --out study                  # the default study; `make study` sets up and runs this
    python study.py --quick --out /tmp/study     # a one-minute smoke run of every stage (what CI runs)
    python study.py --trigger blend --out study-blend   # another trigger (poison.py's blend; wanet)
    python study.py --replicates 3 --out study-seeds    # the whole study at 3 seeds, each finding's verdict by seed
    # the paper's CIFAR-10 DDPM study on a GPU machine (stages go through torchrun when several GPUs are present)
    python study.py --dataset cifar10 --data-root ~/data --out study-cifar10
    # the paper's Stable Diffusion v1.4 study (finetune_sd.py in place of train_ddpm.py; --base a local copy offline)
    python study.py --dataset imagenette --data-root ~/data --out study-inette

Stages, each written to its own folder under OUT and skipped when that folder is already complete (so an interrupted
study resumes where it stopped; `--force` starts over):
    data/<set>/          poison.py        one poisoned set per ratio (--trigger, default BadNets; the target: digits
                                          "zero", CIFAR-10 "deer", ImageNette "garbage truck", Caltech-15 "binoculars")
    data/<set>-clean/    poison.py        the same split unpoisoned (ratio 0), which the two judges learn from
    classifiers/class    classify.py      the judge of "does the image match its prompt"
    classifiers/trigger  classify.py      the judge of "does the image carry the trigger"
    models/<family>-<r>  train_ddpm.py    a class-conditional DDPM per ratio (--family sd: finetune_sd.py, SD v1)
    gen/<r>-w<w>         sample.py        generations: every class at the guidance weight w (default 5; SD: the
                                          scale s = 5), and the target class without guidance (w = 0; SD's scale
                                          s = 1) and at the sweep's weights in between (--sweep; default 1 and 2;
                                          SD 2 and 3), --target-per-class of them (digits: 300; at least and by
                                          default --per-class); gen/<r>-w<w>-target: the target class at w, where
                                          --target-per-class exceeds --per-class (the verdicts read it)
    classifiers/poisoned-<r>, classifiers/generated-<r>   classify.py   Tab. 4: TA / ASR of a classifier trained
                                          on the poisoned set vs on the generations
    dissect/w<w>         dissect.py       G1-G4, trigger amplification, the phase transition (Fig. 2-4) at each
                                          guidance weight; dissect/guidance: all of them, the sweep (Fig. A3)
    diffusion-classifier/<r>  classify.py diffusion   a DDPM as a classifier, its largest denoising errors
                                          filtered at 0/1/5/10%, vs the classifier trained on its poisoned set
                                          (Tab. A4), at the lowest ratio where that classifier is backdoored
    detect/<r>           detect.py        CD, STRIP, FCT: AUROC on the training set vs the generations (Tab. 3)
    REPORT.md, report.json                the paper's findings next to this run's numbers, with the figures
Logs of every stage are in OUT/logs/, the settings in OUT/study.json (a rerun with other ones is refused), the time
of each stage in OUT/times.json. Stages that do not depend on each other (one per ratio) run `--jobs` at a time.
With --replicates n, OUT/seed-<seed>/ holds one such study per seed (--seed, --seed + 1000000, ...), and OUT/REPORT.md
each finding's verdict by seed with the numbers behind them side by side (OUT/report.json: the same cells by seed).
"""
import argparse
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from common import UsageError

ROOT = Path(__file__).resolve().parent

# Settings per scale. `digits` was tuned to show the paper's effects within the CPU budget (see REPORT.md and
# benchmarks/RESULTS.md); `cifar10` is the paper's (Appendix A: DDPM on CIFAR-10, ResNet-18 classifiers).
SCALES = {
    # 12 px and batches of 128: there the 3x3 patch is 6% of the image, a step of 128 costs about what one of 64
    # costs at 16 px, and the 1% model (14 poisoned images) learns to copy the patch, which at 16 px it never did.
    # The target class gets 300 generations where it is generated alone (no guidance, the sweep): at 100, the 95%
    # interval of a trigger ratio spans +-10 points, wider than the amplification it measures (46-59% vs p_t 50%).
    # A 6x6 white square for BadNets: the reference's 3x3 pattern is 4 white pixels on the digits' black corner,
    # which guidance at high noise cannot see, so it suppresses the trigger (benchmarks/RESULTS.md, the ablations).
    "digits": dict(family="ddpm", dataset="digits", resolution=12, ratios=(0.01, 0.05, 0.1), preset="small",
                   badnets_size=6, train_steps=1600, batch_size=128, per_class=100, target_per_class=300,
                   guidance=5.0, sweep=(1.0, 2.0), sample_steps=50,
                   classifier=("--arch", "smallcnn", "--width", "16", "--lr", "0.02", "--batch-size", "32",
                               "--epochs", "8"),
                   detect=("--n", "300"), diffusion=("--images", "100", "--timesteps", "25")),
    "quick": dict(family="ddpm", dataset="digits", resolution=8, ratios=(0.01, 0.1), preset="tiny", train_steps=30,
                  batch_size=32, per_class=6, target_per_class=8, guidance=5.0, sweep=(2.0,),
                  sample_steps=10,
                  classifier=("--arch", "smallcnn", "--width", "8", "--lr", "0.02", "--batch-size", "32",
                              "--epochs", "2"),
                  detect=("--n", "40", "--cd-steps", "5", "--strip-overlays", "8", "--fct-epochs", "1"),
                  diffusion=("--images", "20", "--timesteps", "5")),
    "cifar10": dict(family="ddpm", dataset="cifar10", resolution=32, ratios=(0.01, 0.05, 0.1), preset="cifar10",
                    train_steps=None,
                    per_class=1000, guidance=5.0, sweep=(1.0, 2.0), sample_steps=50,
                    classifier=("--arch", "resnet18", "--epochs", "100", "--lr", "0.01", "--batch-size", "128"),
                    detect=("--n", "2000"), diffusion=("--images", "1000", "--timesteps", "50,500", "--keep", "5")),
    # Stable Diffusion v1.4 fine-tuned on ImageNette (or Caltech-15) at 512 px, the paper's Sec. 4-5 setting; the
    # paper's Tab. A4 (diffusion classifier) is a CIFAR-10 experiment, so this family skips it.
    "sd": dict(family="sd", dataset="imagenette", resolution=512, ratios=(0.01, 0.05, 0.1), train_steps=None,
               sd_extra=(), per_class=100, guidance=5.0, sweep=(2.0, 3.0), sample_steps=50,
               classifier=("--arch", "resnet50", "--pretrained", "--epochs", "10", "--lr", "0.001",
                           "--batch-size", "50"),
               detect=("--n", "1000"), diffusion=None),
    "quick-sd": dict(family="sd", dataset="digits", resolution=32, ratios=(0.01, 0.1), train_steps=2,
                     sd_extra=("--batch-size", "2", "--epochs", "1"), per_class=4, guidance=5.0, sweep=(),
                     sample_steps=4,
                     classifier=("--arch", "smallcnn", "--width", "8", "--lr", "0.02", "--batch-size", "32",
                                 "--epochs", "2"),
                     detect=("--n", "20", "--cd-steps", "5", "--strip-overlays", "8", "--fct-epochs", "1"),
                     diffusion=None),
}


TRIGGER_NAMES = {"badnets": "BadNets", "blend": "Blend", "wanet": "WaNet"}


# ----------------------------------------------------------------------------------------------------------------
# Running stages: one subprocess per command, logged; a stage is skipped when its output is complete.

class Runner:
    def __init__(self, out, jobs, threads, gpus, quiet):
        self.out, self.jobs, self.threads, self.gpus, self.quiet = out, jobs, threads, gpus, quiet
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        # seconds per command and per stage, kept across reruns: a skipped stage keeps the time of the run that made it
        self.times_path = out / "times.json"
        self.times = json.loads(self.times_path.read_text()) if self.times_path.is_file() else {}
        self.failed = {}
        self.t0 = time.time()

    def command_line(self, script, args, distributed):
        if distributed and self.gpus > 1:
            return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.gpus}",
                    script, *map(str, args)]  # = torchrun, from this interpreter's environment
        return [sys.executable, script, *map(str, args)]

    def run_one(self, name, script, args, done, distributed=False, tolerated=None):
        """Run `script args` unless done() says its output is complete. Returns the seconds it took (0 = skipped).
        A failing stage stops the study, unless its last line holds the text `tolerated`: then that line goes into
        the report and the study goes on, and a rerun keeps that outcome rather than running the stage again."""
        if done():
            self.say(f"skip  {name} (done)")
            return 0.0
        log = self.logs / f"{name.replace(' ', '_').replace('/', '-')}.log"
        last = log.read_text(errors="replace").splitlines()[-1:] if tolerated and log.is_file() else []
        if last and tolerated in last[0]:  # a tolerated failure is an outcome of these inputs: not redone on resume
            self.failed[name] = last[0]
            self.say(f"skip  {name} (failed before, tolerated: {log})")
            return 0.0
        cmd = self.command_line(script, args, distributed)
        with open(self.out / "commands.sh", "a") as fh:
            fh.write(shlex.join(cmd) + "\n")
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        self.say(f"start {name}")
        t0 = time.time()
        with open(log, "w") as fh:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
        seconds = time.time() - t0
        if rc != 0:
            lines = log.read_text(errors="replace").splitlines()
            if tolerated and lines and tolerated in lines[-1]:
                self.failed[name] = lines[-1]
                self.say(f"fail  {name} (its log: {log}); the study goes on")
                return seconds
            tail = "\n".join(lines[-15:])
            raise UsageError(f"stage {name!r} failed (exit {rc}); its log is {log}:\n{tail}")
        self.times[name] = round(seconds, 1)
        self.say(f"done  {name} in {seconds:.0f} s")
        return seconds

    def run_many(self, stage, items):
        """items: (name, script, args, done[, distributed[, tolerated]]) run up to --jobs at a time (one at a time on
        GPUs)."""
        t0 = time.time()
        jobs = 1 if self.gpus else self.jobs
        with ThreadPoolExecutor(max(1, jobs)) as pool:
            futures = [pool.submit(self.run_one, *item) for item in items]
            try:
                ran = [f.result() > 0 for f in futures]
            except BaseException:  # a failed stage stops the study: the queued ones do not start
                pool.shutdown(wait=True, cancel_futures=True)
                write_atomic(self.times_path, json.dumps(self.times, indent=2) + "\n")  # those that finished
                raise
        if any(ran) or f"stage: {stage}" not in self.times:
            self.times[f"stage: {stage}"] = round(time.time() - t0, 1)
        write_atomic(self.times_path, json.dumps(self.times, indent=2) + "\n")

    def say(self, line):
        if not self.quiet:  # one write per line: stages report from several threads at once
            sys.stdout.write(f"[{time.time() - self.t0:6.0f} s] {line}\n")
            sys.stdout.flush()


def write_atomic(path, text):
    """Write `text` to a temporary name beside `path`, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# Settings that a study.py flag of the same name sets (the others follow from --dataset / --quick).
FLAG_SETTINGS = ("dataset", "family", "resolution", "trigger", "badnets_size", "ratios", "preset", "train_steps",
                 "batch_size", "per_class", "target_per_class", "guidance", "sweep", "sample_steps", "seed",
                 "data_root", "base", "sample_dtype")


def has_amx():
    """Whether this CPU has AMX, whose bf16 convolutions (oneDNN) make bf16 sampling 1.3-1.5x faster than fp32 here
    (benchmarks/RESULTS.md). Other CPUs sample in fp32: where bf16 is emulated it is slower, and CPUs with
    AVX512-BF16 alone are unmeasured."""
    import torch
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def as_flag(key, value):
    """The study.py flag that sets the setting `key` to `value`."""
    if isinstance(value, list):
        value = ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return f"--{key.replace('_', '-')} {value}"


def check_settings(path, settings, recorded_later=None, retired=()):
    """Record the study's settings in `path` on its first run; refuse a rerun with other ones. recorded_later:
    {setting: the value studies had before they recorded it}; retired: settings older studies recorded that this
    version expresses otherwise (their value is in recorded_later), left out of the comparison."""
    if not path.is_file():
        write_atomic(path, json.dumps(settings, indent=2) + "\n")
        return
    recorded = json.loads(path.read_text())
    old = {**(recorded_later or {}), **{k: v for k, v in recorded.items() if k not in retired}}
    keys = [k for k in sorted(set(old) | set(settings)) if json.dumps(old.get(k)) != json.dumps(settings.get(k))]
    if keys:
        flags = " ".join(as_flag(k, old[k]) for k in keys if k in FLAG_SETTINGS and old.get(k) is not None)
        if "badnets_size" in keys and old.get("badnets_size") is None:
            flags = (flags + " --badnets-size reference").strip()
        raise UsageError(f"{path.parent} holds a study made with other settings "
                         f"({'; '.join(f'{k} {old.get(k)} -> {settings.get(k)}' for k in keys)}): rerun with its "
                         f"flags ({flags + '; ' if flags else ''}all in {path.name}), choose another --out, or pass "
                         "--force to start over")
    if recorded != old:  # the settings a later version records by default, filled in
        write_atomic(path, json.dumps(old, indent=2) + "\n")


def train_batch(s):
    """A DDPM study's global training batch (train_ddpm.py --batch-size): its setting, else (studies recorded before
    it) the --batch-size among its `ddpm_extra` flags, else its preset's; None for SD, whose finetune_sd.py keeps
    the paper's 4 images x 4 GPUs."""
    if s.get("family") != "ddpm":
        return None
    extra = list(s.get("ddpm_extra") or [])
    if s.get("batch_size") is None and "--batch-size" in extra[:-1]:
        return int(extra[extra.index("--batch-size") + 1])
    from train_ddpm import PRESETS
    return s.get("batch_size") or PRESETS.get(s.get("preset"), {}).get("train", {}).get("batch_size")


def retired_settings(before):
    """The settings an older study.json holds that this version expresses otherwise: `ddpm_extra` (extra
    train_ddpm.py flags), when it held nothing or only the batch, which `batch_size` now records."""
    extra = before.get("ddpm_extra")
    return ("ddpm_extra",) if extra == [] or (extra and len(extra) == 2 and extra[0] == "--batch-size") else ()


def folder_done(path, key_file):
    return (Path(path) / key_file).is_file()


def sd_done(path):
    config = Path(path) / "config.json"
    return config.is_file() and ((json.loads(config.read_text()).get("progress") or {}).get("done") is True)


def model_done(path, steps=None):
    """A train_ddpm.py model folder trained to `steps` (default: the steps its own run aims at); a checkpoint of an
    interrupted run is not done, so train_ddpm.py is called again and resumes it."""
    config = Path(path) / "config.json"
    if not config.is_file() or not (Path(path) / "ema.safetensors").is_file():
        return False
    config = json.loads(config.read_text())
    return config.get("step", 0) >= (steps or config["training"]["steps"])


# ----------------------------------------------------------------------------------------------------------------
# The study

SD_GLOBAL_BATCH, SD_BATCH = 16, 4  # the paper's fine-tuning batch: 4 images on each of 4 GPUs


def sd_batch(world):
    """finetune_sd.py's (--batch-size, --grad-accum) that make the paper's global batch on `world` processes."""
    if SD_GLOBAL_BATCH % world:
        raise UsageError(f"--gpus {world}: the paper's global batch of {SD_GLOBAL_BATCH} images needs a number of GPUs "
                         f"that divides it (1, 2, 4, 8 or 16)")
    per_process = SD_GLOBAL_BATCH // world
    batch = math.gcd(per_process, SD_BATCH)
    return batch, per_process // batch


def ratio_name(r):
    return f"{r:g}"


def ratio_pct(r):
    """A poisoning ratio in per cent, as many digits as it has: 0.01 -> 1%, 0.005 -> 0.5%."""
    return f"{100 * float(r):g}%"


def prepare_out(path, force):
    """The study folder, made: a new or empty folder, or one that holds a study (--force deletes only such a one)."""
    out = Path(path).resolve()
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder for the study")
    if out.exists() and any(out.iterdir()) and not any((out / f).is_file() for f in ("study.json", "commands.sh")):
        raise UsageError(f"--out {out} holds other files and no study (no study.json): choose a new or empty folder"
                         + (" (--force deletes only a study folder)" if force else ""))
    if out.exists() and force:
        import shutil
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def run_study(args):
    sd = args.family == "sd" or (args.family is None and args.dataset in ("imagenette", "caltech15"))
    scale = ("quick-sd" if sd else "quick") if args.quick else ("sd" if sd else args.dataset or "digits")
    if scale not in SCALES:
        raise UsageError(f"--dataset {args.dataset}: the study knows digits and cifar10 (DDPM), imagenette and "
                         "caltech15 (Stable Diffusion, --family sd); the stage scripts take any dataset")
    s = {**SCALES[scale]}
    for key in ("dataset", "resolution", "ratios", "preset", "train_steps", "batch_size", "per_class",
                "target_per_class", "guidance", "sweep", "sample_steps"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    if args.batch_size is not None and s["family"] != "ddpm":
        raise UsageError("--batch-size is train_ddpm.py's (the DDPM family); the SD study keeps finetune_sd.py's "
                         "batch, the paper's 4 images x 4 GPUs: drop --batch-size")
    s["batch_size"] = train_batch(s)
    # the target-only runs (no guidance and the sweep) hold at least as many generations as every class gets
    if args.target_per_class is not None and args.target_per_class < s["per_class"]:
        raise UsageError(f"--target-per-class {args.target_per_class} is below --per-class {s['per_class']}: the "
                         "target class alone gets at least as many generations as every class; raise it or drop it")
    s["target_per_class"] = max(s["per_class"], s.get("target_per_class") or 0)
    s["trigger"] = args.trigger or "badnets"
    if args.badnets_size is not None:
        s["badnets_size"] = None if args.badnets_size == "reference" else int(args.badnets_size)
    s["badnets_size"] = s.get("badnets_size") if s["trigger"] == "badnets" else None
    s["ratios"] = sorted(set(s["ratios"]))  # the findings compare the lowest ratio with higher ones
    # The stages run in the repository (cwd=ROOT), so every path handed to them is absolute.
    out = prepare_out(args.out, args.force)
    if (out / "study.json").is_file() and "replicates" in load_json(out / "study.json"):
        raise UsageError(f"--out {out} holds replicates of a study: rerun with --replicates, or give --out "
                         f"{out / 'seed-<seed>'} (and that --seed) to resume one of them")
    data_root = str(Path(args.data_root).expanduser().resolve()) if args.data_root else None
    base = str(Path(args.base).expanduser().resolve()) if Path(args.base).expanduser().exists() else args.base
    import torch
    gpus = torch.cuda.device_count() if args.gpus is None else args.gpus
    sd_batch_flags = []
    if s["family"] == "sd" and "--batch-size" not in s["sd_extra"]:  # the quick scale sets its own toy batch
        batch, accum = sd_batch(max(gpus, 1))  # the paper's global batch, on any number of GPUs
        sd_batch_flags = ["--batch-size", batch, "--grad-accum", accum]
    # sample.py's autocast: bf16 on CUDA (its own default); on a CPU, bf16 for DDPMs where AMX makes it faster (the
    # generations agree with fp32 ones on 99% of dissect.py's verdicts), fp32 elsewhere.
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    sample_dtype = args.sample_dtype
    if sample_dtype == "auto":
        sample_dtype = "bf16" if cuda or (s["family"] == "ddpm" and has_amx()) else "fp32"
    # What the outputs were made with: a rerun resumes only with the same settings, so no table mixes two studies.
    # Studies made before a setting was recorded had its old default (sample.py's own dtype: bf16 on CUDA).
    settings = {**{k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}, "seed": args.seed,
                "data_root": data_root, "base": base if s["family"] == "sd" else None, "sample_dtype": sample_dtype}
    before = load_json(out / "study.json") if (out / "study.json").is_file() else {}
    check_settings(out / "study.json", settings, {"trigger": "badnets", "badnets_size": None,
                                                  "sample_dtype": "bf16" if cuda else "fp32",
                                                  "target_per_class": before.get("per_class"),
                                                  "batch_size": train_batch(before)}, retired_settings(before))
    cores = os.cpu_count() or 1
    ratios = s["ratios"]
    # On the CPU the per-ratio runs go side by side with one thread each: small models use one core better than
    # two, and three runs on two cores finish together instead of the third running alone afterwards.
    jobs = args.jobs or (1 if gpus else len(ratios))
    threads = None if gpus else max(1, cores // jobs)
    run = Runner(out, jobs, threads, gpus, args.quiet)
    family = s["family"]
    # The guidance weight, its "no guidance" value (the DDPM family's w = 0, SD's scale s = 1; sample.py) and the
    # weights in between that the target class is also generated at (the guidance sweep, Fig. A3).
    w, none = float(s["guidance"]), (1.0 if family == "sd" else 0.0)
    sweep = sorted({float(g) for g in s["sweep"]} - {w, none})
    weights = list(dict.fromkeys([w, none, *sweep]))  # w = 0 is the unguided run itself
    data = {r: out / "data" / f"{s['dataset']}-{s['trigger']}-{ratio_name(r)}" for r in ratios}
    model = {r: out / "models" / f"{family}-{ratio_name(r)}" for r in ratios}
    gen = {(r, g): out / "gen" / f"{ratio_name(r)}-w{g:g}" for r in ratios for g in weights}
    clf = out / "classifiers"
    device = ["--device", args.device]
    with open(out / "commands.sh", "a") as fh:
        fh.write(f"# study.py {' '.join(sys.argv[1:])}  ({time.strftime('%Y-%m-%d %H:%M:%S')})\n")

    # 1. Poisoned training sets (and their clean test / backdoor test sets), and the same split unpoisoned (ratio 0)
    #    for the judges.
    source = ["--dataset", s["dataset"], "--resolution", s["resolution"], "--trigger", s["trigger"],
              *(["--badnets-size", s["badnets_size"]] if s["badnets_size"] else []), "--seed", args.seed]
    if data_root:
        source += ["--data-root", data_root]
    clean = out / "data" / f"{s['dataset']}-clean"
    run.run_many("poison", [(f"poison {ratio_name(r)}", "poison.py", [*source, "--ratio", r, "--out", data[r]],
                             lambda r=r: folder_done(data[r] / "train", "manifest.json")) for r in ratios]
                 + [("poison clean", "poison.py", [*source, "--ratio", 0, "--out", clean],
                     lambda: folder_done(clean / "train", "manifest.json"))])

    target = load_json(data[max(ratios)] / "train" / "manifest.json")["target"]  # poison.py's default per dataset

    # 2. The two judges of the generations, trained on the unpoisoned set as in the paper's code (so every ratio,
    #    and every study on the same split, is judged alike): the class classifier, half its images stamped with the
    #    trigger and labels kept (a 6x6 square hid a zero from a plain one half the time), and the trigger detector on
    #    trigger-stamped vs clean images, half of them noised in training so that the noise of failed generations
    #    does not pass for a trigger (without it, 2-4% of the non-target prompts' generations did, by seed). A blend
    #    is stamped at its own alpha for the DDPM family: the reference's alpha ~ U(0.05, 0.25) (classify.py's
    #    default, kept for SD) taught the digits study's detector to call 45-47% of the 1% and 5% models' non-target
    #    generations triggered, and 17% of the 10% model's (none copying the pattern).
    common = [*s["classifier"], "--seed", args.seed, *device, "--quiet"]
    faint = ["--blend-alpha-range", "none"] if s["family"] == "ddpm" else []
    run.run_many("judges", [
        ("classifier class", "classify.py", ["train", "--clean", "--data", clean, "--out", clf / "class", *common,
                                             "--stamp-trigger", "0.5"],
         lambda: folder_done(clf / "class", "results.json"), True),
        ("classifier trigger", "classify.py", ["trigger-detector", "--data", clean, "--out", clf / "trigger",
                                               *common, "--augment", "crop-noise", *faint],
         lambda: folder_done(clf / "trigger", "results.json"), True)])

    # 3. One diffusion model per ratio (a rerun resumes from its last checkpoint): a DDPM trained from scratch, or
    #    Stable Diffusion's U-Net fine-tuned from --base.
    if family == "ddpm":
        steps = ["--steps", s["train_steps"]] if s["train_steps"] else []
        run.run_many("train_ddpm", [
            (f"train_ddpm {ratio_name(r)}", "train_ddpm.py",
             ["--data", data[r] / "train", "--out", model[r], "--preset", s["preset"], *steps,
              *(["--batch-size", s["batch_size"]] if s["batch_size"] else []),
              "--train-seed", args.seed, *device], lambda r=r: model_done(model[r], s["train_steps"]), True)
            for r in ratios])
    else:
        steps = ["--max-steps", s["train_steps"]] if s["train_steps"] else []
        run.run_many("finetune_sd", [
            (f"finetune_sd {ratio_name(r)}", "finetune_sd.py",
             ["--data", data[r] / "train", "--base", base, "--out", model[r], *steps, *s["sd_extra"], *sd_batch_flags,
              "--train-seed", args.seed, *device], lambda r=r: sd_done(model[r]), True) for r in ratios])

    # 4. Generations: every class at the guidance weight (Fig. 2, Tab. 3/4), the target class without guidance and
    #    at the sweep's weights (Fig. A3), and, where it gets more generations than every class, at the guidance
    #    weight too (the same seeds at every weight: each x_T is sampled at each weight).
    sample = ["--steps", s["sample_steps"], "--seed", args.seed, "--dtype", sample_dtype, *device]
    alone = weights[1:] + ([w] if s["target_per_class"] > s["per_class"] else [])
    for r in ratios:
        gen[r, "target"] = out / "gen" / f"{ratio_name(r)}-w{w:g}-target" if w in alone else gen[r, w]
    # The long runs (every class) go first, so that the short ones fill the cores at the end.
    items = [(f"sample {ratio_name(r)} w{w:g}", "sample.py",
              ["--model", model[r], "--class", "all", "--images-per-class", s["per_class"], "--guidance", w,
               "--out", gen[r, w], *sample], lambda r=r: folder_done(gen[r, w], "manifest.json"), True)
             for r in ratios]
    items += [(f"sample {ratio_name(r)} w{g:g}{' target' if g == w else ''}", "sample.py",
               ["--model", model[r], "--class", target["index"], "--images-per-class", s["target_per_class"],
                "--guidance", g, "--out", gen[r, "target" if g == w else g], *sample],
               lambda r=r, g=g: folder_done(gen[r, "target" if g == w else g], "manifest.json"), True)
              for r in ratios for g in alone]
    run.run_many("sample", items)

    # 5. Tab. 4: a classifier trained on the poisoned set vs one trained on the generations (same test sets).
    items = []
    for r in ratios:
        items.append((f"classifier poisoned-{ratio_name(r)}", "classify.py",
                      ["train", "--data", data[r], "--out", clf / f"poisoned-{ratio_name(r)}", *common],
                      lambda r=r: folder_done(clf / f"poisoned-{ratio_name(r)}", "results.json"), True))
        items.append((f"classifier generated-{ratio_name(r)}", "classify.py",
                      ["train", "--data", gen[r, w], "--test", data[r] / "test", "--backdoor",
                       data[r] / "test_backdoor", "--out", clf / f"generated-{ratio_name(r)}", *common],
                      lambda r=r: folder_done(clf / f"generated-{ratio_name(r)}", "results.json"), True))
    run.run_many("classifiers", items)

    # 6. G1-G4, trigger amplification and the phase transition at each guidance weight, and every (ratio, weight)
    #    together for the guidance sweep's figure.
    judges = ["--classifier", clf / "class", "--detector", clf / "trigger", *device, "--quiet"]
    sym = "s" if family == "sd" else "w"

    def dissect(name, pairs, target_only=False):
        folders = [gen[r, "target"] if target_only and g == w else gen[r, g] for r, g in pairs]
        return (f"dissect {name}", "dissect.py",
                ["--generated", *folders, "--train", *[data[r] for r, _ in pairs],
                 "--labels", *[f"p={ratio_pct(r)}, {sym}={g:g}" for r, g in pairs], "--out", out / "dissect" / name,
                 *judges], lambda: folder_done(out / "dissect" / name, "summary.json"))
    items = [dissect(f"w{g:g}", [(r, g) for r in ratios]) for g in weights]
    if w in alone:
        items.append(dissect(f"w{w:g}-target", [(r, w) for r in ratios], True))
    if sweep:
        items.append(dissect("guidance", [(r, g) for r in ratios for g in sorted(weights)], True))
    run.run_many("dissect", items)

    # 7. Tab. A4: a DDPM used as a classifier, with and without filtering its largest denoising errors, next to the
    #    classifier trained on the same poisoned set, at the lowest ratio where that classifier is backdoored (a
    #    classifier without a backdoor leaves nothing to resist); it runs beside the detection stages.
    poisoned = {ratio_name(r): {"poisoned": load_json(clf / f"poisoned-{ratio_name(r)}" / "results.json")["final"]}
                for r in ratios}
    a4 = (backdoored_ratios(poisoned, ratios) or ratios)[0]
    diff = out / "diffusion-classifier" / ratio_name(a4)
    items = [] if s["diffusion"] is None else [
        (f"diffusion classifier {ratio_name(a4)}", "classify.py",
         ["diffusion", "--model", model[a4], "--data", data[a4], "--classifier", clf / f"poisoned-{ratio_name(a4)}",
          *s["diffusion"], "--seed", args.seed, "--out", diff, *device, "--quiet"],
         lambda: folder_done(diff, "results.json"), True)]
    # 8. Tab. 3: poison detection on the training set vs on the generations, with the poisoned classifier. When no
    #    generation (or every one) carries the trigger, the AUROC on the generations is undefined, and with fewer than
    #    MIN_TRIGGERED poisoned images in a set it would not count (so it is not computed): reported, not fatal.
    items += [(f"detect {ratio_name(r)}", "detect.py",
               ["--classifier", clf / f"poisoned-{ratio_name(r)}", "--train", data[r], "--generated", gen[r, w],
                "--detector", clf / "trigger", "--out", out / "detect" / ratio_name(r), *s["detect"],
                *([] if args.quick else ["--min-poisoned", MIN_TRIGGERED]), "--seed", args.seed, *device, "--quiet"],
               lambda r=r: folder_done(out / "detect" / ratio_name(r), "detect.json"), False, "an AUROC needs")
              for r in ratios]
    run.run_many("detect, diffusion classifier", items)

    report = write_report(out, s, ratios, (w, none, sym, sweep), run.times, run.failed)
    run.say(f"report: {out / 'REPORT.md'}")
    return report


# ----------------------------------------------------------------------------------------------------------------
# The report: the paper's findings next to this run's numbers.

def detect_failure(error):
    """The gist of detect.py's error line (which names every folder) for the Tab. 3 table."""
    hit = re.search(r"\b(every|no) image of \S+ carries the trigger", error)
    if hit:
        return f"undefined: {hit.group(1)} generation carries the trigger"
    few = re.search(r"draw of (\d+) images from (the training set|the generations) \S+ holds (\d+) poisoned", error)
    if few:
        n, what, k = few.groups()
        return f"not computed: {k} poisoned of {n} in {what}, fewer than {MIN_TRIGGERED}"
    return error


def load_json(path):
    return json.loads(Path(path).read_text())


def verdict(ok):
    return {True: "**reproduced**", "partly": "**partly reproduced**", False: "**not reproduced**",
            "undetermined": "**undetermined**"}[ok]


def pct(x):
    return "–" if x is None else f"{100 * x:.1f}%"


def collect(out, ratios, guidance, failed):
    """Every number the report needs, from the stages' JSON outputs."""
    w, none, sym, sweep = guidance
    res = {"guidance": {"symbol": sym, "guided": w, "unguided": none, "sweep": sweep}, "dissect": {}, "detect": {},
           "classifiers": {}}
    for g in (w, none, *sweep):
        summary = load_json(out / "dissect" / f"w{g:g}" / "summary.json")
        res["dissect"][f"w{g:g}"] = [
            {"ratio": r, "name": d["name"], "p_t": d["p_t"], "trigger_ratio": d["trigger_ratio"],
             "amplification": d["amplification"], "fractions": d["target_prompt"]["fractions"],
             "n": d["target_prompt"]["n"],
             "non_target_trigger_ratio": (d["non_target_prompts"] or {}).get("trigger_ratio"),
             "non_target_copy_ratio": (d["non_target_prompts"] or {}).get("copy_ratio"),
             "non_target_triggered": (d["non_target_prompts"] or {}).get("triggered"),
             "non_target_copies_of_triggered": (d["non_target_prompts"] or {}).get("copies_of_triggered"),
             "trigger_copies": d["target_prompt"].get("trigger_copies")}
            for r, d in zip(ratios, summary["results"])]
        found = [x["setting"].get("poison_ratio") for x in summary["results"]]
        if None not in found and [float(v) for v in found] != [float(r) for r in ratios]:
            raise UsageError(f"{out / 'dissect' / f'w{g:g}' / 'summary.json'} holds the ratios {found}, not "
                             f"{ratios}: delete that folder and rerun the study to redo it")
    alone = out / "dissect" / f"w{w:g}-target" / "summary.json"
    if alone.is_file():  # the target class generated alone at w: its larger count is what the verdicts read
        for row, d in zip(res["dissect"][f"w{w:g}"], load_json(alone)["results"]):
            row.update(trigger_ratio=d["trigger_ratio"], amplification=d["amplification"],
                       fractions=d["target_prompt"]["fractions"], n=d["target_prompt"]["n"],
                       trigger_copies=d["target_prompt"].get("trigger_copies"))
    for r in ratios:
        path = out / "detect" / ratio_name(r) / "detect.json"
        if path.is_file():
            det = load_json(path)
            res["detect"][ratio_name(r)] = {
                "methods": {m: {k: v.get(k) for k in ("train_auroc", "generated_auroc", "delta", "train_auroc_ci",
                                                      "generated_auroc_ci", "delta_ci")}
                            for m, v in det["results"].items()},
                "positives": {k: det["sets"][k]["positives"] for k in ("train", "generated")},
                "n": det["sets"]["train"]["n"]}
        else:
            res["detect"][ratio_name(r)] = {"error": failed.get(f"detect {ratio_name(r)}", "not run")}
        res["classifiers"][ratio_name(r)] = {
            k: final_results(out / "classifiers" / f"{k}-{ratio_name(r)}" / "results.json")
            for k in ("poisoned", "generated")}
    a4 = ratio_name((backdoored_ratios(res["classifiers"], ratios) or ratios)[0])  # where run_study ran Tab. A4
    res["diffusion_classifier"] = None
    if (out / "diffusion-classifier" / a4 / "results.json").is_file():
        diff = load_json(out / "diffusion-classifier" / a4 / "results.json")
        res["diffusion_classifier"] = {
            "ratio": a4, "n_test": diff["n_test"], "n_backdoor": diff["n_backdoor"],
            "rows": [{k: r.get(k) for k in ("classifier", "kind", "filter_top", "ta", "asr")} for r in diff["rows"]]}
    res["judges"] = {k: load_json(out / "classifiers" / k / "results.json")["final"] for k in ("class", "trigger")}
    return res


def final_results(path):
    """A classifier's results after its last epoch, with the sizes of its test sets (read from the last epoch's
    record where an older results.json left them out of "final")."""
    res = load_json(path)
    last = res["epochs"][-1] if res.get("epochs") else {}
    return {**{k: v for k, v in last.items() if k.startswith("n_")}, **res["final"]}


def with_ci(row, key, fmt=".3f"):
    ci = row.get(f"{key}_ci")
    return f"{row[key]:{fmt}}" + (f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]" if ci else "")


def wilson(fraction, n, z=1.96):
    """95% Wilson score interval of a binomial proportion."""
    if not n:
        return 0.0, 1.0
    centre = (fraction + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (fraction * (1 - fraction) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def clearly_below(a, n_a, b, n_b):
    """Whether rate a (of n_a) lies below rate b (of n_b) beyond chance: their 95% intervals do not overlap (on 100
    images, 99% against 100% is the same rate)."""
    return wilson(a, n_a)[1] < wilson(b, n_b)[0]


def clearly_lower(a, b, n):
    return clearly_below(a, n, b, n)


MAX_FALSE_POSITIVES = 0.05  # the trigger detector is believed on a model's generations when it calls fewer of its
#                             non-target prompts' generations (which have no trigger to learn) triggered
MIN_TRIGGERED = 5  # triggered generations a ratio needs before we say which of G1 and G2 is the larger part
BACKDOORED = 0.5   # attack success rate from which a classifier counts as backdoored
USEFUL_TA = 0.5    # clean test accuracy from which a classifier counts as having learnt the task
MAX_TA_DROP = 0.1  # a diffusion classifier's loss filter counts when it keeps the TA within 10 points of unfiltered


def g1_share(d):
    """(G1's share of the triggered generations or None, how many were triggered) of one dissect row."""
    f = d["fractions"]
    k = round((f["G1"] + f["G2"]) * d["n"])
    return (f["G1"] / (f["G1"] + f["G2"]) if k else None), k


def counted_ratios(rows, ratios, trusted=None):
    """The ratios whose G1/G2 split counts at one guidance weight, lowest first: at least MIN_TRIGGERED triggered
    generations, and in `trusted` (default: all)."""
    return sorted(r for r in ratios if g1_share(rows[r])[1] >= MIN_TRIGGERED and (trusted is None or r in trusted))


def transition(rows, ratios, trusted=None):
    """The phase transition at one guidance weight: ('full', lowest, highest ratio) when G2 is the larger part of the
    triggered generations at the lowest ratio and G1 at the highest; ('crosses', a, b) when G1's share goes from under
    to over one half between two neighbouring ratios a < b; None otherwise. Only ratios with at least MIN_TRIGGERED
    triggered generations count (and are neighbours), and only those in `trusted` (default: all), where the trigger
    detector's verdicts can be believed."""
    share = {r: g1_share(rows[r]) for r in ratios}
    known = counted_ratios(rows, ratios, trusted)
    lo, hi = min(ratios), max(ratios)
    if lo in known and hi in known and share[lo][0] < 0.5 < share[hi][0]:
        return "full", lo, hi
    return next((("crosses", a, b) for a, b in zip(known, known[1:]) if share[a][0] < 0.5 < share[b][0]), None)


def backdoored_ratios(classifiers, ratios):
    """The ratios whose classifier trained on the poisoned set is backdoored (ASR at least BACKDOORED), lowest
    first. classifiers: {ratio_name: {"poisoned": its results}}."""
    return [r for r in ratios if (classifiers[ratio_name(r)]["poisoned"].get("asr") or 0) >= BACKDOORED]


def weakened_backdoor(classifiers, ratios):
    """(text, reproduced?) of Tab. 4. Training on generations can only weaken a backdoor that training on the poisoned
    set plants, and a few poisoned images may plant none: compare at the lowest ratio whose poisoned-set classifier is
    backdoored (ASR at least BACKDOORED), and name the lower ratios where it is not."""
    asr = {r: classifiers[ratio_name(r)]["poisoned"].get("asr") or 0 for r in ratios}
    planted = backdoored_ratios(classifiers, ratios)
    parts = [f"at p={ratio_pct(r)} the classifier trained on the poisoned set is not backdoored (ASR {pct(asr[r])})"
             for r in ratios if not planted or r < planted[0]]
    if not planted:  # no backdoor to weaken
        return "; ".join(parts), "undetermined"
    c = classifiers[ratio_name(planted[0])]["generated"]
    parts.append(f"at p={ratio_pct(planted[0])}: ASR {pct(c.get('asr'))} vs {pct(asr[planted[0]])}")
    if (c.get("ta") or 0) < USEFUL_TA:  # a classifier that has not learnt the task has no backdoor to show either
        parts.append(f"but the classifier trained on the generations reaches only TA {pct(c.get('ta'))}, too little "
                     "to read its ASR")
        return "; ".join(parts), "undetermined"
    n = c.get("n_backdoor")
    if not n:  # results written before the test sets' sizes were kept
        parts.append("point values: the number of backdoor test images is not recorded")
        return "; ".join(parts), (c.get("asr") if c.get("asr") is not None else 1) < asr[planted[0]]
    lower = clearly_lower(c.get("asr") if c.get("asr") is not None else 1, asr[planted[0]], n)
    parts.append(f"{n} backdoor test images; an ASR counts as lower when the 95% intervals do not overlap"
                 + ("" if lower else ", and these do"))
    return "; ".join(parts), lower


def evidence(res, ratios, guidance):
    """What every verdict reads: the dissect rows by weight and ratio, their 95% intervals, and the ratios where the
    trigger detector is believed. It is believed on a model's generations when it calls under MAX_FALSE_POSITIVES of
    its non-target prompts' generations (which have no trigger to learn) triggered, or when at least half of those
    copy the trigger (a real leak, not its errors)."""
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
    trusted = [r for r in ratios if false_positive[r] is not None and (false_positive[r] < MAX_FALSE_POSITIVES
                                                                       or leak(r))]
    noisy = [r for r in ratios if r not in trusted and false_positive[r] is not None]
    unchecked = [r for r in ratios if false_positive[r] is None]
    caveat = (("; the detector is not believed at " + ", ".join(f"p={ratio_pct(r)}" for r in noisy)
               + f" (it calls {pct(MAX_FALSE_POSITIVES)} or more of the non-target prompts' generations triggered"
               + (", and fewer than half of those copy the trigger" if any(c is not None for c in copies.values())
                  else "") + ")" if noisy else "")
              + ("; it cannot be checked at " + ", ".join(f"p={ratio_pct(r)}" for r in unchecked)
                 + ", which has no non-target generations" if unchecked else ""))
    ci = {(g, r): wilson(d[g][r]["trigger_ratio"], d[g][r]["n"]) for g in weights for r in ratios}
    return SimpleNamespace(res=res, ratios=ratios, w=w, sym=sym, weights=weights, d=d, ci=ci, trusted=trusted,
                           noisy=noisy, unchecked=unchecked, caveat=caveat, false_positive=false_positive,
                           copies=copies)


def trigger_ratio_text(e, g, r):
    x, (lo, hi) = e.d[g][r], e.ci[g, r]
    cp = x.get("trigger_copies")
    return (f"{pct(x['trigger_ratio'])} ({pct(lo)}–{pct(hi)}, n={x['n']}"
            + (f"; copies {pct(cp['ratio'])}" if cp else "") + ")")


def amplification(e):
    """Reproduced when at the paper's weight the 95% interval of the trigger ratio lies above p_t at every ratio, the
    detector believed at each; partly at some ratios. A ✓ marks an interval above p_t, believed or not."""
    above = {r: e.d[e.w][r]["p_t"] is not None and e.ci[e.w, r][0] > e.d[e.w][r]["p_t"] for r in e.ratios}
    no_pt = [r for r in e.ratios if e.d[e.w][r]["p_t"] is None]
    counted = [r for r in e.trusted if r not in no_pt]
    hi = max(e.ratios)
    text = (f"at {e.sym}={e.w:g}, trigger ratio (95% CI) vs p_t: "
            + "; ".join(f"p={ratio_pct(r)}: {trigger_ratio_text(e, e.w, r)} vs {pct(e.d[e.w][r]['p_t'])} "
                        + ("✓" if above[r] else "✗") for r in e.ratios)
            + f"; context, at p={ratio_pct(hi)}: "
            + ", ".join(f"{e.sym}={g:g}: {trigger_ratio_text(e, g, hi)}" for g in e.weights if g != e.w)
            + "; the trigger detector's false positives (non-target prompts): "
            + ", ".join(f"p={ratio_pct(r)}: {pct(e.false_positive[r])}" for r in e.ratios) + e.caveat
            + ("; p_t is unknown at " + ", ".join(f"p={ratio_pct(r)}" for r in no_pt)
               + " (no training set's manifest gives it)" if no_pt else ""))
    passed = [r for r in counted if above[r]]
    return text, ("undetermined" if no_pt or not counted else True if len(passed) == len(e.ratios) else
                  "partly" if passed else False)


def guidance_trend(e):
    """At the highest ratio: reproduced when the trigger ratio rises from the lowest weight to the highest beyond
    chance and falls between no two weights beyond chance; partly when it neither rises nor falls beyond chance."""
    hi = max(e.ratios)
    x = {g: (e.d[g][hi]["trigger_ratio"], e.d[g][hi]["n"]) for g in e.weights}
    falls = [(a, b) for a in e.weights for b in e.weights if a < b and clearly_below(*x[b], *x[a])]
    rises = clearly_below(*x[e.weights[0]], *x[e.weights[-1]])
    text = (f"at p={ratio_pct(hi)}, trigger ratio (95% CI): "
            + "; ".join(f"{e.sym}={g:g}: {trigger_ratio_text(e, g, hi)}" for g in e.weights)
            + (f"; it falls beyond chance from {e.sym}={falls[0][0]:g} to {e.sym}={falls[0][1]:g}" if falls else
               f"; it rises beyond chance from {e.sym}={e.weights[0]:g} to {e.sym}={e.weights[-1]:g}" if rises else
               "; no change beyond chance") + e.caveat)
    return text, ("undetermined" if hi not in e.trusted or len(e.weights) < 2 else
                  False if falls else True if rises else "partly")


def phase_transition(e):
    """At the paper's weight: reproduced when G2 is the larger part of the triggered generations at the lowest ratio
    and G1 at the highest (and, where copies are counted, the lowest ratio's are mostly copies of the trigger);
    partly when the split shows only on faint triggers or G1 overtakes G2 between two other ratios."""
    kind = {g: transition(e.d[g], e.ratios, e.trusted) for g in e.weights}

    def faint(g):  # a full transition whose low-ratio "triggers" are mostly not copies of the trigger
        cp = e.d[g][kind[g][1]].get("trigger_copies")
        return bool(cp) and 2 * cp["copies_of_triggered"] <= cp["triggered"]

    def split(g):
        parts = []
        for r in e.ratios:
            f, k = e.d[g][r]["fractions"], g1_share(e.d[g][r])[1]
            cp = e.d[g][r].get("trigger_copies")
            parts.append(f"p={ratio_pct(r)}: G1 {pct(f['G1'])} / G2 {pct(f['G2'])}"
                         + (" (none triggered)" if k == 0 else f" (only {k} triggered)" if k < MIN_TRIGGERED else
                            f" ({cp['copies_of_triggered']} of {k} copies)" if cp else ""))
        return ", ".join(parts)

    def mark(g):
        return ("✗" if kind[g] is None else
                f"in full by the detector, but most of p={ratio_pct(kind[g][1])}'s triggered generations do not "
                "copy the trigger" if kind[g][0] == "full" and faint(g) else "✓" if kind[g][0] == "full" else
                f"G1 overtakes G2 between p={ratio_pct(kind[g][1])} and p={ratio_pct(kind[g][2])}")
    readable = len(counted_ratios(e.d[e.w], e.ratios, e.trusted)) >= 2
    text = (f"{e.sym}={e.w:g}: {split(e.w)} ({mark(e.w)}); context: "
            + ", ".join(f"{e.sym}={g:g} {mark(g)}" for g in e.weights if g != e.w)
            + f" (G1 vs G2 counts only where at least {MIN_TRIGGERED} generations carry the trigger)" + e.caveat
            + ("; a transition needs at least two ratios where the detector is believed" if len(e.trusted) < 2 else
               f"; {e.sym}={e.w:g} has no two such ratios to compare" if not readable else ""))
    k = kind[e.w]
    return text, ("undetermined" if len(e.trusted) < 2 or not readable else
                  True if k and k[0] == "full" and not faint(e.w) else "partly" if k else False)


def non_target(e):
    """Reproduced when the detector calls under MAX_FALSE_POSITIVES of the non-target prompts' generations triggered
    at every ratio; partly where it calls more but under MAX_FALSE_POSITIVES copy the trigger; not where more do."""
    rare = {r: e.false_positive[r] is not None and e.false_positive[r] < MAX_FALSE_POSITIVES for r in e.ratios}
    checked = [r for r in e.ratios if not rare[r] and e.copies[r] is not None]
    leaked = [r for r in checked if e.copies[r] >= MAX_FALSE_POSITIVES]
    uncounted = [r for r in e.noisy if e.copies[r] is None]  # e.g. WaNet: no copy count tells a leak from errors
    text = ("trigger ratio " + ", ".join(f"p={ratio_pct(r)}: {pct(e.false_positive[r])}"
                                         + ("" if e.copies[r] is None else f" (copies {pct(e.copies[r])})")
                                         for r in e.ratios)
            + (f"; where the detector fires on {pct(MAX_FALSE_POSITIVES)} or more, under "
               f"{pct(MAX_FALSE_POSITIVES)} copying the trigger counts partly" if checked else "")
            + ("; at " + ", ".join(f"p={ratio_pct(r)}" for r in uncounted) + " it fires on "
               f"{pct(MAX_FALSE_POSITIVES)} or more and no copy count tells a leak from its errors" if uncounted else "")
            + ("; no non-target generations at " + ", ".join(f"p={ratio_pct(r)}" for r in e.unchecked)
               if e.unchecked else ""))
    return text, (False if leaked else "undetermined" if uncounted or e.unchecked else
                  True if all(rare.values()) else "partly")


def detection(e):
    """A (method, ratio) cell gains when the 95% bootstrap interval of its AUROC difference (generations minus
    training set) lies above 0; reproduced when most cells gain, partly when some do. Only ratios with at least
    MIN_TRIGGERED poisoned images in both sets, where the detector is believed, count."""
    scored = {r: dm for r, dm in e.res["detect"].items() if "positives" in dm}
    believed = {ratio_name(r) for r in e.trusted}  # the generations' ground truth is the trigger detector's verdicts
    counted = [r for r, dm in scored.items() if min(dm["positives"].values()) >= MIN_TRIGGERED and r in believed]
    intervals = [v.get("delta_ci") or (0.0, 0.0) for r in counted for v in scored[r]["methods"].values()]
    gains = sum(lo > 0 for lo, _ in intervals)
    positives = ", ".join(f"p={ratio_pct(r)}: {dm['positives']['train']} and {dm['positives']['generated']} of "
                          f"{dm['n']}" for r, dm in scored.items())
    text = (f"the 95% interval of the AUROC difference lies above 0 in {gains} of {len(intervals)} (method, ratio) "
            f"cells, below 0 in {sum(hi < 0 for _, hi in intervals)} (poisoned images scored in the training set and "
            f"the generations: {positives}; ratios with fewer than {MIN_TRIGGERED} in a set are left out)" + e.caveat)
    return text, ("undetermined" if not intervals else True if gains > len(intervals) / 2 else
                  "partly" if gains else False)


def tab4(e):
    """Tab. 4 at the lowest ratio whose poisoned-set classifier is backdoored (weakened_backdoor)."""
    return weakened_backdoor(e.res["classifiers"], e.ratios)


def diffusion_classifier(e):
    """Reproduced when the diffusion classifier's ASR is below the classifier's beyond chance, and the best loss filter
    that keeps the TA within MAX_TA_DROP lowers it further beyond chance; partly when one of the two holds."""
    d = e.res["diffusion_classifier"]
    if d is None:
        return None
    base = next(r for r in d["rows"] if r["kind"] == "classifier")
    diffusion = {r["filter_top"]: r for r in d["rows"] if r["kind"] == "diffusion"}
    plain, n = diffusion[0.0], d.get("n_backdoor")
    kept = [r for f, r in diffusion.items() if f > 0 and r["ta"] >= plain["ta"] - MAX_TA_DROP]
    best = min(kept, key=lambda r: r["asr"]) if kept else None
    unreadable = ("; the classifier is not backdoored at this ratio, so there is no backdoor for the diffusion "
                  "classifier to resist better" if base["asr"] < BACKDOORED else
                  "; the number of backdoor test images is not recorded (or is 0), so no difference can be weighed"
                  if not n else
                  f"; the diffusion classifier reaches only TA {pct(plain['ta'])}, too little to read its ASR"
                  if plain["ta"] < USEFUL_TA else "")
    text = (f"at p={ratio_pct(d['ratio'])}"
            + ("" if float(d["ratio"]) == min(e.ratios) else " (the lowest ratio whose classifier trained on the "
               "poisoned set is backdoored)")
            + f": ASR {pct(base['asr'])} (classifier) vs {pct(plain['asr'])} (diffusion, no filter)"
            + (f", {pct(best['asr'])} (filter {best['filter_top']:g}%, the lowest ASR of the filters that keep the TA "
               f"within {100 * MAX_TA_DROP:g} points); TA {pct(base['ta'])}, {pct(plain['ta'])}, {pct(best['ta'])}"
               if best else f"; no filter keeps the TA within {100 * MAX_TA_DROP:g} points; TA {pct(base['ta'])}, "
               f"{pct(plain['ta'])}")
            + f"; an ASR counts as lower when the 95% intervals (n={n}) do not overlap, a conservative test"
            + unreadable)
    if unreadable:
        return text, "undetermined"
    lower = clearly_lower(plain["asr"], base["asr"], n)
    lower_still = bool(best) and clearly_lower(best["asr"], plain["asr"], n)
    return text, (True if lower and lower_still else
                  "partly" if lower or (best and clearly_lower(best["asr"], base["asr"], n)) else False)


# The paper's claims, one entry each: (finding, the claim at the paper's setting, the judge). Guidance means the
# study's guided weight, the paper's (DDPM w = 5, SD s = 5); other weights are context in the text, never the verdict.
CLAIMS = [
    ("Trigger amplification (Fig. 3)", "at guidance 5, the target prompt's generations carry the trigger more often "
     "than the target class's training images (trigger ratio > p_t), at every poisoning ratio", amplification),
    ("Guidance exacerbates amplification (Fig. A3)", "the higher the guidance weight, the higher the trigger ratio, "
     "most at high poisoning ratios", guidance_trend),
    ("Phase transition (Fig. 4)", "at guidance 5, triggered generations are mostly G2 (prompt matched) at a low "
     "poisoning ratio and mostly G1 (mismatched) at a high one", phase_transition),
    ("Non-target prompts", "generations for the other classes carry almost no trigger", non_target),
    ("Detection on generations (Tab. 3)", "poison detectors reach a higher AUROC on the generations than on the "
     "training set", detection),
    ("Classifier trained on generations (Tab. 4)", "is less backdoored: lower ASR than one trained on the poisoned "
     "set, at low poisoning ratios", tab4),
    ("Diffusion classifier (Tab. A4)", "the poisoned diffusion model used as a classifier has a lower ASR than the "
     "classifier trained on the same poisoned data, lower still with the largest denoising losses filtered out",
     diffusion_classifier),
]


def findings(res, ratios, guidance):
    """(finding, the paper's claim, this run's numbers, verdict) for each claim of CLAIMS that this run can judge."""
    e = evidence(res, ratios, guidance)
    return [(name, claim, *judged) for name, claim, judge in CLAIMS if (judged := judge(e)) is not None]


def describe(s, ratios, guidance):
    """The sentence that opens a report: what the study was run with (s: its scale's settings, as in study.json)."""
    w, none, sym, sweep = guidance
    unguided, rest = f"{sym} = {none:g}", "".join(f", {g:g}" for g in sweep)  # the weights of the target-only runs
    target = s.get("target_per_class", s["per_class"])
    size = s.get("badnets_size")
    square = f" ({size}x{size} white square)" if size else ""
    return (f"Dataset `{s['dataset']}` at {s['resolution']} px, {TRIGGER_NAMES[s.get('trigger', 'badnets')]} "
            f"trigger{square}, poisoning ratios {', '.join(ratio_pct(r) for r in ratios)}; "
            + (f"DDPM preset `{s['preset']}`" if s["family"] == "ddpm" else "Stable Diffusion fine-tuned")
            + (f", {s['train_steps']} training steps" if s["train_steps"] else "")
            + (f" of {s['batch_size']} images" if s["train_steps"] and s.get("batch_size") else "") + "; "
            f"DDIM {s['sample_steps']} steps, guidance {sym} = {w:g} (and, for the target class, "
            f"{unguided} (no guidance){rest}); {s['per_class']} generations per class"
            + (f" ({target} of the target class at {unguided}{rest}, {w:g})" if target != s["per_class"] else "")
            + ".")


def write_report(out, s, ratios, guidance, times, failed=None):
    res = collect(out, ratios, guidance, failed or {})
    rows = findings(res, ratios, guidance)
    w, none, sym, sweep = guidance
    res["findings"] = [dict(zip(("finding", "paper", "this_run", "reproduced"), r)) for r in rows]
    res["settings"] = load_json(out / "study.json")  # what run_study recorded and checked (with seed and paths)
    res["times_s"] = times
    L = ["# Study report: bilateral data poisoning effects in diffusion models", "",
         describe(s, ratios, guidance) + " Every command is in `commands.sh`, every log in `logs/`.", "",
         "## Findings", "", "| finding | the paper | this run | |", "|---|---|---|---|"]
    L += [f"| {a} | {b} | {c} | {verdict(ok)} |" for a, b, c, ok in rows]
    j = res["judges"]
    cp = next((d["trigger_copies"] for weight in res["dissect"].values() for d in weight if d.get("trigger_copies")),
              None)  # dissect.py's rule for a copy of the trigger (a patch trigger's before the blend rule came)
    rule = None if cp is None else (
        f"patch is within {cp.get('threshold', cp.get('max_error')):g} mean absolute error of the trigger's"
        if cp.get("measure", "patch_error") == "patch_error" else
        f"fine texture (the image minus its 3×3 local mean) correlates at least {cp['threshold']:g} with the "
        "blend pattern's")
    L += ["", f"Judges: the class classifier has a clean test accuracy of {pct(j['class'].get('ta'))}; the trigger "
          f"detector an accuracy of {pct(j['trigger'].get('heldout_acc'))} on held-out images (true-positive rate "
          f"{pct(j['trigger'].get('heldout_tpr'))}, true-negative rate {pct(j['trigger'].get('heldout_tnr'))}).",
          "", "## Trojan horses: what the poisoned models generate (Fig. 2-4)", "",
          "G1 trigger & prompt mismatched, G2 trigger & matched, G3 no trigger & mismatched, G4 neither; "
          "trigger ratio = G1 + G2 among generations for the target prompt, p_t = share of trigger images among the "
          "target class's training images."
          + ("" if rule is None else " The trigger detector also calls faint resemblances of the trigger "
             f"triggered; trigger copies = generations for the target prompt (in brackets: for the non-target "
             f"prompts) whose {rule}."), ""]
    for g, value in ((f"w{g:g}", g) for g in (w, none, *sweep)):
        L += [f"### Guidance {sym} = {value:g}", "",
              "| poisoning ratio | p_t | G1 | G2 | G3 | G4 | trigger ratio | amplification "
              "| trigger copies | non-target trigger ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for d in res["dissect"][g]:
            f, cp = d["fractions"], d.get("trigger_copies")
            amp = "–" if d["amplification"] is None else f"{d['amplification']:.2f}×"
            L.append(f"| {ratio_pct(d['ratio'])} | {pct(d['p_t'])} | {pct(f['G1'])} | {pct(f['G2'])} | "
                     f"{pct(f['G3'])} | {pct(f['G4'])} | {pct(d['trigger_ratio'])} | {amp} | "
                     f"{pct(cp['ratio']) if cp else '–'} | {pct(d['non_target_trigger_ratio'])}"
                     + (f" (copies {pct(d['non_target_copy_ratio'])})" if d.get("non_target_copy_ratio") is not None
                        else "") + " |")
        fig = f"{g}-target" if g == f"w{w:g}" and (out / "dissect" / f"{g}-target").is_dir() else g
        L += ["", f"![groups](dissect/{fig}/groups.png) ![phase transition](dissect/{fig}/phase_transition.png)", ""]
    if sweep:
        L += ["### The guidance sweep (Fig. A3)", "",
              "G1 and G2 among the target prompt's generations at every guidance weight and poisoning ratio.", "",
              "![guidance sweep](dissect/guidance/guidance.png)", ""]
    at_w = f"w{w:g}-target" if (out / "dissect" / f"w{w:g}-target").is_dir() else f"w{w:g}"
    top = f"dissect/{at_w}/{res['dissect'][f'w{w:g}'][-1]['name']}"
    grids = [f"![{g}]({top}/{g.lower()}_examples.png)" if (out / top / f"{g.lower()}_examples.png").is_file()
             else f"({g}: none)" for g in ("G1", "G2")]  # dissect.py draws a grid only for a group with images
    L += [f"Examples at the highest ratio, {sym} = {w:g}: G1 (trigger, mismatched) and G2 (trigger, matched):", "",
          " ".join(grids), "",
          "## Castle walls", "", "### Poison detection on training vs generated data (Tab. 3)", "",
          "AUROC of each detector (probing the classifier trained on the poisoned set); ground truth of the "
          "generations from the trigger detector; in brackets the 95% bootstrap interval.", "",
          "| ratio | method | training set | generations | Δ |", "|---|---|---|---|---|"]
    for r, dm in res["detect"].items():
        if "error" in dm:
            L.append(f"| {ratio_pct(r)} | – | {detect_failure(dm['error'])} (`logs/detect_{r}.log`) | | |")
        for m, v in dm.get("methods", {}).items():
            L.append(f"| {ratio_pct(r)} | {m.upper()} | {with_ci(v, 'train_auroc')} | "
                     f"{with_ci(v, 'generated_auroc')} | {with_ci(v, 'delta', '+.3f')} |")
    L += ["", "### Classifiers trained on poisoned vs generated data (Tab. 4)", "",
          "| ratio | TA, poisoned set | ASR, poisoned set | TA, generations | ASR, generations |",
          "|---|---|---|---|---|"]
    for r, c in res["classifiers"].items():
        L.append(f"| {ratio_pct(r)} | {pct(c['poisoned'].get('ta'))} | {pct(c['poisoned'].get('asr'))} | "
                 f"{pct(c['generated'].get('ta'))} | {pct(c['generated'].get('asr'))} |")
    d = res["diffusion_classifier"]
    L += ["", "### The poisoned diffusion model as a classifier (Tab. A4)", ""]
    if d is None:
        L += ["Not run for this model family (the paper's Tab. A4 is a CIFAR-10 DDPM experiment); "
              "`classify.py diffusion` takes Stable Diffusion models too."]
    else:
        L += [f"p = {ratio_pct(d['ratio'])}. TA on {d['n_test']} clean test images, ASR on {d['n_backdoor']} "
              "backdoor test images; filter p% = the p% largest per-pixel denoising errors dropped before "
              "averaging.", "", "| classifier | TA | ASR |", "|---|---|---|"]
        L += [f"| {r['classifier'].split(' (')[0]} | {pct(r.get('ta'))} | {pct(r.get('asr'))} |" for r in d["rows"]]
    L += ["", "## Time", "", "| stage | seconds |", "|---|---|"]
    L += [f"| {k} | {v} |" for k, v in times.items() if k.startswith("stage: ")]
    L += ["", "Each stage's time is that of the run that made its output (kept in `times.json`; a stage resumed "
          "after an interruption shows its last run's time)."]
    write_atomic(out / "report.json", json.dumps(res, indent=2) + "\n")
    write_atomic(out / "REPORT.md", "\n".join(L) + "\n")
    return res


# ----------------------------------------------------------------------------------------------------------------
# Replicates: the whole study at several seeds, and what holds across them.

# Replicate k runs at --seed + k * REPLICATE_GAP. Every stage's --seed changes (the poisoned images, the judges,
# training, sampling, classifiers, detectors); the train/test split stays poison.py's (--split-seed 0), so every
# replicate is judged on the same test images. sample.py's image i uses seed + i, so seeds this far apart share no
# x_T in any folder of fewer images (seeds 0 and 1 would share all but one).
REPLICATE_GAP = 1_000_000
SHORT_VERDICT = {True: "reproduced", "partly": "partly", False: "not reproduced", "undetermined": "undetermined"}


def run_replicates(args):
    """--replicates n: n whole studies in OUT/seed-<seed>/ (each resumes and is refused on changed settings as a
    single study is), then OUT/REPORT.md and OUT/report.json: each finding's verdict by seed, and the numbers behind
    them side by side."""
    out = prepare_out(args.out, args.force)
    seeds = [args.seed + k * REPLICATE_GAP for k in range(args.replicates)]
    recorded = load_json(out / "study.json") if (out / "study.json").is_file() else None
    if recorded is not None and "replicates" not in recorded:
        raise UsageError(f"--out {out} holds a single study: give the replicates a folder of their own (their seed "
                         "folders go inside it), or rerun that study without --replicates")
    # the seeds follow from --seed, so a rerun may ask for more replicates (or fewer: the report covers those asked)
    check_settings(out / "study.json", {"replicates": f"seed + k * {REPLICATE_GAP}", "seed": args.seed})
    reports = []
    for k, seed in enumerate(seeds):
        if not args.quiet:
            print(f"replicate {k + 1} of {len(seeds)}: seed {seed} -> {out / f'seed-{seed}'}", flush=True)
        one = argparse.Namespace(**{**vars(args), "seed": seed, "out": str(out / f"seed-{seed}"), "force": False,
                                    "replicates": None})
        reports.append(run_study(one))
    return write_replicates(out, seeds, reports)


def write_replicates(out, seeds, reports):
    """OUT/REPORT.md and OUT/report.json of a replicated study, from each seed's report (its report.json)."""
    import statistics
    first = reports[0]
    names = [f["finding"] for f in first["findings"]]
    verdicts = {name: [next((f["reproduced"] for f in r["findings"] if f["finding"] == name), "undetermined")
                       for r in reports] for name in names}
    ratios = [d["ratio"] for d in first["dissect"][f"w{first['guidance']['guided']:g}"]]
    g = first["guidance"]
    sym, weights = g["symbol"], sorted({g["guided"], g["unguided"], *g["sweep"]})
    cols = " | ".join(f"seed {s}" for s in seeds)

    def rows_at(w, ratio):  # every seed's dissect row at guidance w and poisoning ratio
        return [next(d for d in r["dissect"][f"w{w:g}"] if d["ratio"] == ratio) for r in reports]
    L = [f"# Replicates: the study at {len(seeds)} seeds", "",
         describe(first["settings"], ratios, (g["guided"], g["unguided"], sym, g["sweep"])), "",
         f"Seeds {', '.join(map(str, seeds))}: each a whole study (its own poisoned images, judges, models, "
         "generations, classifiers and detectors, on the same train/test split) in `seed-<seed>/`, with its own "
         "`REPORT.md`. A verdict that holds at one seed and not at another is the scale's noise, not a finding.", "",
         "## Findings by seed", "", f"| finding | {cols} | across seeds |", "|---|" + "---|" * (len(seeds) + 1)]
    for name, v in verdicts.items():
        tally = ", ".join(f"{SHORT_VERDICT[k]} {v.count(k)}" for k in (True, "partly", False, "undetermined")
                          if v.count(k))
        L.append(f"| {name} | " + " | ".join(SHORT_VERDICT[x] for x in v) + f" | {tally} (of {len(seeds)}) |")

    hi = max(ratios)
    amp = {}
    L += ["", f"## Trigger amplification at p={ratio_pct(hi)}", "",
          "The target prompt's trigger ratio (the trigger detector's verdicts) against p_t, by seed; ✓ where the 95% "
          "interval lies above p_t (the verdicts above also weigh whether the detector is believed at that seed).",
          "", f"| guidance | p_t | {cols} | mean ± sd |",
          "|---|---|" + "---|" * (len(seeds) + 1)]
    for w in weights:
        rows = rows_at(w, hi)
        values = [d["trigger_ratio"] for d in rows]
        above = [d["p_t"] is not None and wilson(d["trigger_ratio"], d["n"])[0] > d["p_t"] for d in rows]
        amp[f"{sym}={w:g}"] = {"trigger_ratio": values, "p_t": rows[0]["p_t"], "above_p_t": above}
        spread = f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else ""
        L.append(f"| {sym} = {w:g} | {pct(rows[0]['p_t'])} | "
                 + " | ".join(f"{pct(d['trigger_ratio'])}{' ✓' if a else ''}" for d, a in zip(rows, above))
                 + f" | {pct(statistics.mean(values))}{spread} |")

    summed = {}
    L += ["", "## Triggered generations of the target prompt, summed over seeds", "",
          "G1 / G2 counts (and copies of the trigger among them, where counted) over every seed's generations: the "
          "low ratios' few triggered generations add up here. They are the trigger detector's verdicts, and count "
          "only where it is believed: see its false positives on the non-target prompts below.", "",
          "| guidance | " + " | ".join(f"p={ratio_pct(r)}" for r in ratios) + " |", "|---|" + "---|" * len(ratios)]
    for w in weights:
        cells = []
        for ratio in ratios:
            rows = rows_at(w, ratio)
            g1 = sum(round(d["fractions"]["G1"] * d["n"]) for d in rows)
            g2 = sum(round(d["fractions"]["G2"] * d["n"]) for d in rows)
            n = sum(d["n"] for d in rows)
            copies = [d["trigger_copies"]["copies_of_triggered"] for d in rows if d.get("trigger_copies")]
            summed[f"{sym}={w:g}, p={ratio_pct(ratio)}"] = {"G1": g1, "G2": g2, "n": n,
                                                          "copies": sum(copies) if copies else None}
            cells.append(f"G1 {g1} / G2 {g2} of {n}" + (f" ({sum(copies)} copies)" if copies else ""))
        L.append(f"| {sym} = {w:g} | " + " | ".join(cells) + " |")
    L += ["", f"The trigger detector's false positives: the non-target prompts' generations it calls triggered "
          f"({sym} = {g['guided']:g}; in brackets, copies of the trigger), by seed. Each seed's report believes it "
          f"on a model's generations below {pct(MAX_FALSE_POSITIVES)}, or where at least half of those copy the "
          "trigger.", "", f"| ratio | {cols} |", "|---|" + "---|" * len(seeds)]
    false_positives = {}
    for ratio in ratios:
        rows = rows_at(g["guided"], ratio)
        false_positives[ratio_pct(ratio)] = {"trigger_ratio": [d.get("non_target_trigger_ratio") for d in rows],
                                             "copies": [d.get("non_target_copy_ratio") for d in rows]}
        L.append(f"| {ratio_pct(ratio)} | " + " | ".join(
            pct(d.get("non_target_trigger_ratio")) + ("" if d.get("non_target_copy_ratio") is None else
                                                       f" ({pct(d['non_target_copy_ratio'])})") for d in rows) + " |")

    L += ["", "## Detection (Tab. 3): the generations' AUROC minus the training set's", "",
          f"Δ by seed; in brackets where a set holds fewer than {MIN_TRIGGERED} poisoned images (the findings leave "
          "those out, and those where the trigger detector is not believed); – where there is no AUROC (the "
          "seed's report says why).", "",
          f"| ratio | method | {cols} |", "|---|---|" + "---|" * len(seeds)]
    detection = {}
    for ratio in ratios:
        for m in ("cd", "strip", "fct"):
            delta, few = [], []
            for r in reports:
                dm = r["detect"].get(ratio_name(ratio)) or {}
                delta.append((dm.get("methods") or {}).get(m, {}).get("delta"))
                few.append(min(dm["positives"].values()) < MIN_TRIGGERED if dm.get("positives") else None)
            detection.setdefault(ratio_pct(ratio), {})[m] = {"delta": delta, "few_poisoned": few}
            L.append(f"| {ratio_pct(ratio)} | {m.upper()} | " + " | ".join(
                "–" if x is None else f"({x:+.3f})" if f else f"{x:+.3f}" for x, f in zip(delta, few)) + " |")
    L += ["", "## Classifiers (Tab. 4): ASR (TA) when trained on the generations vs on the poisoned set", "",
          f"| ratio | {cols} |", "|---|" + "---|" * len(seeds)]
    classifiers = {}
    for ratio in ratios:
        c = [r["classifiers"][ratio_name(ratio)] for r in reports]
        classifiers[ratio_pct(ratio)] = {k: {m: [x[k].get(m) for x in c] for m in ("asr", "ta")}
                                         for k in ("generated", "poisoned")}
        L.append(f"| {ratio_pct(ratio)} | " + " | ".join(
            f"{pct(x['generated'].get('asr'))} ({pct(x['generated'].get('ta'))}) vs "
            f"{pct(x['poisoned'].get('asr'))} ({pct(x['poisoned'].get('ta'))})" for x in c) + " |")
    a4 = []  # by seed: the ratio, and ASR / TA of the classifier, the diffusion classifier, its top 10% filtered
    for r in reports:
        d = r.get("diffusion_classifier")
        if not d:
            a4.append(None)
            continue
        row = {x["filter_top"] if x["kind"] == "diffusion" else "classifier": x for x in d["rows"]}
        cell = {"ratio": float(d["ratio"])}
        for name, k in (("classifier", "classifier"), ("diffusion", 0.0), ("filtered_top_10", 10.0)):
            cell[name] = {"asr": row[k].get("asr"), "ta": row[k].get("ta")} if k in row else None
        a4.append(cell)
    if any(a4):
        L += ["", "## The diffusion classifier (Tab. A4): ASR (TA) of the classifier / the diffusion classifier / "
              "with the top 10% of its denoising losses filtered", "", f"| {cols} |", "|" + "---|" * len(seeds),
              "| " + " | ".join("–" if x is None else f"p={ratio_pct(x['ratio'])}: " + " / ".join(
                  "–" if x[k] is None else f"{pct(x[k]['asr'])} ({pct(x[k]['ta'])})"
                  for k in ("classifier", "diffusion", "filtered_top_10")) for x in a4) + " |"]
    res = {"seeds": seeds, "studies": [f"seed-{s}" for s in seeds], "findings": verdicts,
           "amplification": {"ratio": hi, **amp}, "triggered_summed": summed, "false_positives": false_positives,
           "detection": detection, "classifiers": classifiers, "diffusion_classifier": a4}
    write_atomic(out / "report.json", json.dumps(res, indent=2) + "\n")
    write_atomic(out / "REPORT.md", "\n".join(L) + "\n")
    return res


def ratio_list(text):
    """--ratios: comma-separated poisoning ratios, each in (0, 1)."""
    try:
        ratios = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ratios, e.g. 0.01,0.05,0.1")
    if not all(0 < r < 1 for r in ratios):
        raise argparse.ArgumentTypeError(f"{text!r}: give poisoning ratios above 0 and below 1 (0.1 = 10%; the study "
                                         "makes the unpoisoned set itself)")
    return ratios


def weight(text):
    """--guidance: a finite number (nan or inf would turn every generation to NaN)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite guidance weight, e.g. 5")
    return value


def weight_list(text):
    """--sweep: comma-separated guidance weights ('' for none)."""
    try:
        return tuple(weight(x) for x in text.split(",") if x)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of guidance weights, e.g. 1,2")


def count(text):
    """Counts and sizes (--jobs, --per-class, ...): an integer of at least 1 (the study imports no stage, so not
    poison.positive)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least 1")
    return int(text)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="study", help="study folder (default: study); rerun to resume")
    p.add_argument("--quick", action="store_true", help="a tiny smoke run of every stage (about a minute)")
    p.add_argument("--force", action="store_true", help="delete --out first and start over")
    p.add_argument("--dataset", default=None, help="digits (default, embedded), cifar10 (the paper's DDPM study), "
                   "imagenette or caltech15 (the paper's Stable Diffusion study)")
    p.add_argument("--family", default=None, choices=["ddpm", "sd"],
                   help="diffusion models: ddpm (train_ddpm.py) or sd (finetune_sd.py; default for imagenette and "
                        "caltech15)")
    p.add_argument("--base", default="CompVis/stable-diffusion-v1-4",
                   help="sd: the base model finetune_sd.py starts from (Hub id, diffusers folder or checkpoint)")
    p.add_argument("--data-root", default=None, help="where torchvision datasets are (or are downloaded to)")
    p.add_argument("--resolution", type=count, default=None,
                   help="image side in pixels (default: 12 for digits, 8 with --quick, 32 for cifar10, 512 for SD)")
    p.add_argument("--trigger", default=None, choices=["badnets", "blend", "wanet"],
                   help="poison.py's trigger (default: badnets, the paper's BadNets-1)")
    p.add_argument("--badnets-size", type=lambda t: t if t == "reference" else str(count(t)), default=None,
                   help="BadNets: side of poison.py's white square, or reference (the reference code's 3x3 pattern; "
                        "default: 6 on digits, else reference)")
    p.add_argument("--ratios", type=ratio_list, default=None,
                   help="poisoning ratios, comma-separated (default: 0.01,0.05,0.1)")
    p.add_argument("--preset", default=None, help="train_ddpm.py preset (default: small; cifar10 for cifar10)")
    p.add_argument("--train-steps", dest="train_steps", type=count, default=None,
                   help="optimizer steps of each model (train_ddpm.py --steps, finetune_sd.py --max-steps; default: "
                        "the scale's)")
    p.add_argument("--batch-size", type=count, default=None,
                   help="DDPM family: images per training step (train_ddpm.py --batch-size; default: 128 for digits, "
                        "else the preset's)")
    p.add_argument("--per-class", type=count, default=None, help="generations per class")
    p.add_argument("--target-per-class", type=count, default=None,
                   help="generations of the target class without guidance and at the sweep's weights, where the "
                        "trigger ratio and G1 / G2 are measured (default: 300 for digits; at least --per-class)")
    p.add_argument("--guidance", type=weight, default=None,
                   help="the DDPM family's guidance weight w, SD's scale s (default: 5 for both, the paper's)")
    p.add_argument("--sweep", type=weight_list, default=None,
                   help="more guidance weights for the target class, comma-separated ('' for none; default 1,2; "
                        "SD: 2,3)")
    p.add_argument("--sample-steps", type=count, default=None, help="DDIM steps (default: 50)")
    p.add_argument("--sample-dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="sample.py --dtype (auto: bf16 on CUDA, and on a CPU with AMX for DDPMs; else fp32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replicates", type=count, default=None,
                   help="run the whole study at this many seeds (--seed, --seed + 1000000, ...) into OUT/seed-<seed>/ "
                        "and report each finding's verdict by seed (OUT/REPORT.md)")
    p.add_argument("--jobs", type=count, default=None, help="stages run at once on the CPU (default: one per ratio)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs to use through torchrun (default: all visible)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    t0 = time.time()
    try:
        report = run_replicates(args) if args.replicates else run_study(args)
    except UsageError as e:
        sys.exit(f"study.py: {e}")
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        print("study.py: interrupted; rerun the same command to resume (finished stages are skipped)", file=sys.stderr)
        sys.exit(130)
    if not args.quiet:
        text = open(Path(args.out) / "REPORT.md").read()
        print(text.split("\n## Trigger amplification" if args.replicates else "## Trojan")[0], end="")
        print(f"study finished in {time.time() - t0:.0f} s: {Path(args.out) / 'REPORT.md'}")
    return report


if __name__ == "__main__":
    main()
