"""Hostile input to every stage, from the command line: each case ends with exit 1 and one line naming the problem and
the fix, before any expensive work, and leaves every input byte for byte as it was."""
import hashlib
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from poison import poison

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, TRITON_INTERPRET="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
LONG = "n" * 300   # past every file system's 255-byte names
CASES = [  # (stage and arguments, what the one line says); {set}: a poisoned digits set, {model}: a DDPM
    (["poison.py", "--dataset", "digits", "--resolution", "8", "--ratio", "0.1", "--out", "{file}/out"],
     r"--out .*afile/out: .*afile is a file, not a folder: choose another --out"),
    (["poison.py", "--dataset", "digits", "--resolution", "8", "--ratio", "0.1", "--out", f"{{tmp}}/{LONG}"],
     r"the name n{20}\.\.\. is longer than the \d+ bytes a name may have here: choose a shorter --out"),
    (["poison.py", "--dataset", "digits", "--resolution", "200000", "--ratio", "0.1", "--out", "{tmp}/big"],
     r"images of 200000 px would take [\d.]+ GiB of memory, [\d.]+ GiB are free: give a smaller --resolution"),
    (["poison.py", "--dataset", "folder:{images}", "--target", "c0", "--resolution", "8", "--ratio", "0.1",
      "--out", "{images}/c0/x"],
     r"--out .*images/c0/x .*the input --dataset folder:"),
    (["train_ddpm.py", "--data", "{set}/train", "--steps", "2", "--out", "{file}/model"],
     r"afile is a file, not a folder: choose another --out"),
    (["train_ddpm.py", "--data", "{set}/train", "--steps", "2", "--out", f"{{tmp}}/{LONG}"],
     r"is longer than the \d+ bytes a name may have here"),
    (["classify.py", "train", "--data", "{set}/train", "--out", "{set}/train"], r"--out .*train is the input --data"),
    (["classify.py", "train", "--data", "{set}/train", "--out", "{file}/clf"], r"afile is a file, not a folder"),
    (["classify.py", "eval", "--classifier", "{tmp}/none", "--data", "{set}/test", "--json", "{set}/test/manifest.json",
      "--force"], r"--json .*manifest.json lies in the input --data"),
    (["sample.py", "--model", "{model}", "--out", "{model}/gen"], r"--out .*model/gen lies in the input --model"),
    (["sample.py", "--model", "{model}", "--n", "100000000", "--out", "{tmp}/gen"],
     r"1000000000 images of 8 px would take [\d.]+ GiB of memory, [\d.]+ GiB are free: give a smaller --n"),
    (["sample.py", "--model", "{model}", "--out", "{tmp}/gen", "--grid", "{model}/grid.png", "--force"],
     r"--grid .*grid.png lies in the input --model"),
    (["dissect.py", "--generated", "{set}/test", "--classifier", "{tmp}/none", "--detector", "{tmp}/none",
      "--out", "{set}/test"], r"--out .*test is the input --generated"),
    (["detect.py", "--classifier", "{tmp}/none", "--train", "{set}/train", "--generated", "{set}/test",
      "--out", "{set}"], r"--out .*set holds the input --train"),
    (["replicate.py", "--train", "{set}/train", "--out", "{file}/rep"], r"afile is a file, not a folder"),
    (["replicate.py", "--train", "{set}/train", "--out", f"{{tmp}}/{LONG}"], r"is longer than the \d+ bytes"),
]


def snapshot(*roots):
    return {p: hashlib.sha256(p.read_bytes()).hexdigest()
            for root in roots for p in ([root] if root.is_file() else sorted(root.rglob("*"))) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    poison(tmp / "set", dataset="digits", resolution=8, ratio=0.1, force=True, quiet=True, workers=1)
    (tmp / "afile").write_text("not a folder\n")
    for c in ("c0", "c1"):
        (tmp / "images" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(tmp / "images" / c / f"{i}.png")
    r = subprocess.run([sys.executable, "train_ddpm.py", "--data", str(tmp / "set" / "train"), "--preset", "tiny",
                        "--steps", "2", "--device", "cpu", "--out", str(tmp / "model")], cwd=ROOT, env=ENV,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp


@pytest.mark.parametrize("argv, message", CASES, ids=[f"{c[0][0]}-{i}" for i, c in enumerate(CASES)])
def test_hostile_case_is_one_line_and_leaves_the_inputs_alone(inputs, argv, message):
    fill = dict(set=inputs / "set", file=inputs / "afile", tmp=inputs, images=inputs / "images", model=inputs / "model")
    argv = [a.format(**fill) for a in argv]
    kept = [inputs / name for name in ("set", "afile", "images", "model")]
    before = snapshot(*kept)
    r = subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith(f"{argv[0]}: error: ") and re.search(message, lines[0]), lines[0]
    assert snapshot(*kept) == before
    assert sorted(p.name for p in inputs.iterdir()) == ["afile", "images", "model", "set"]  # nothing else written
