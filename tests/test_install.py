"""The install as a new user gets it: none of our top-level modules shadows an installed distribution, transformers and
diffusers import beside our kernels from the repository root, every stage answers --help, and the headline SD command
(torchrun finetune_sd.py --ratio 0.1) runs on the CPU, writes a U-Net that diffusers loads, and sample.py samples it.
`make test-latest` runs this file on the newest versions that requirements.txt allows."""
import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["poison", "train_ddpm", "finetune_sd", "sample", "dissect", "detect", "classify", "replicate", "study"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run(*argv, timeout=600):
    r = subprocess.run([sys.executable, *map(str, argv)], cwd=ROOT, env=ENV, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, f"{argv}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_no_top_level_module_of_ours_shadows_an_installed_distribution():
    """A top-level module of ours with the name of an installed package shadows it (transformers 5.25 imports the
    PyPI package `kernels`, which our old `kernels/` folder hid)."""
    ours = {p.stem for p in ROOT.glob("*.py")} | {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert set(STAGES) <= ours and len(ours) > len(STAGES)           # the kernels package is found too
    theirs = importlib.metadata.packages_distributions()
    clashes = {name: theirs[name] for name in sorted(ours) if name in theirs}
    assert not clashes, f"our top-level modules shadow installed distributions: {clashes}"


def test_transformers_and_diffusers_import_beside_our_kernels():
    """From the repository root, after the stages have imported our kernels, in the same process."""
    pytest.importorskip("diffusers")
    out = run("-c", "import finetune_sd, train_ddpm\n"
                    "print(finetune_sd.group_norm.__module__, train_ddpm.attention.__module__)\n"
                    "from transformers import CLIPTextModel\n"
                    "from diffusers import UNet2DConditionModel\n"
                    "print(CLIPTextModel.__name__, UNet2DConditionModel.__name__)")
    kernels, _ = out.split("\n")[0].split()
    assert kernels.split(".")[0] not in ("kernels", "transformers", "diffusers")
    assert out.split("\n")[1] == "CLIPTextModel UNet2DConditionModel"


def test_every_stage_answers_help():
    """Each stage's command line as `python STAGE.py --help` runs it (one process, one torch import)."""
    out = run("-c", "import runpy, sys\n"
                    f"for stage in {STAGES!r}:\n"
                    "    sys.argv = [stage + '.py', '--help']\n"
                    "    try:\n"
                    "        runpy.run_path(stage + '.py', run_name='__main__')\n"
                    "    except SystemExit as e:\n"
                    "        assert e.code in (0, None), (stage, e.code)\n", timeout=300)
    assert [line.split()[1] for line in out.splitlines() if line.startswith("usage:")] == \
        [f"{stage}.py" for stage in STAGES]


def test_headline_sd_command_on_the_cpu(tmp_path):
    """torchrun finetune_sd.py poisons the embedded digits and fine-tunes a tiny SD folder in the diffusers layout on 2
    CPU processes; diffusers loads the run's U-Net (and computes what ours computes); sample.py writes images."""
    diffusers = pytest.importorskip("diffusers")
    from test_sd import rel_err, write_tiny_sd
    base = tmp_path / "tiny-sd"
    write_tiny_sd(base)
    run_dir = tmp_path / "run"
    run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node", 2, "finetune_sd.py", "--ratio", 0.1,
        "--dataset", "digits", "--resolution", 64, "--base", base, "--max-steps", 3, "--poison-out", tmp_path / "data",
        "--out", run_dir, "--device", "cpu", "--workers", 0)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["run"]["world"] == 2 and config["progress"]["step"] == 3

    import finetune_sd
    theirs = diffusers.UNet2DConditionModel.from_pretrained(run_dir / "unet").eval()
    ours = finetune_sd.load_sd(run_dir).unet.eval()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.randn(2, 77, 128)
    with torch.no_grad():
        assert rel_err(ours(x, t, ctx), theirs(x, t, ctx).sample) < 1e-4

    run("sample.py", "--model", run_dir, "--class", "all", "--n", 1, "--steps", 2, "--device", "cpu",
        "--out", tmp_path / "gen")
    records = [json.loads(line) for line in (tmp_path / "gen" / "metadata.jsonl").read_text().splitlines()]
    assert sorted(r["label"] for r in records) == list(range(10))
    assert all((tmp_path / "gen" / r["file_name"]).is_file() for r in records)
