"""The fixed costs every stage pays, which the study pays some forty times: a stage's imports against torch's own,
and detect.py's bootstrap of the AUROC (1000 resamples a set and method) by counting against scikit-learn's
roc_auc_score, side by side in one process on the same resamples.

    python benchmarks/overheads.py            # imports (5 runs each, taking turns; the fastest kept), bootstrap
"""
import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STAGES = ("poison", "train_ddpm", "sample", "classify", "detect", "dissect")


def import_seconds(statements, runs):
    """{statement: the fastest of `runs` fresh interpreters running it} (seconds, interpreter start included), the
    statements taking turns so that a busy moment of the machine does not fall on one of them only."""
    times = {s: [] for s in statements}
    for _ in range(runs):
        for statement in statements:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-c", statement], cwd=ROOT, check=True)
            times[statement].append(time.perf_counter() - t0)
    return {s: min(t) for s, t in times.items()}


def bootstrap_seconds(n_pos, n_neg, resamples):
    """(seconds by counting, seconds with scikit-learn, largest difference) for the same resamples."""
    from sklearn.metrics import roc_auc_score
    import detect
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, n_pos), rng.normal(0, 1, n_neg)
    draws = [(rng.choice(pos, n_pos), rng.choice(neg, n_neg)) for _ in range(resamples)]
    labels = np.r_[np.ones(n_pos), np.zeros(n_neg)]
    t0 = time.perf_counter()
    ours = [detect.auroc_of(p, q) for p, q in draws]
    t1 = time.perf_counter()
    theirs = [roc_auc_score(labels, np.r_[p, q]) for p, q in draws]
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, float(np.max(np.abs(np.subtract(ours, theirs))))


def main(args):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import torch
    from ddpm import machine
    print(f"machine: {machine(torch.device('cpu'))}")
    seconds = import_seconds(["import torch"] + [f"import {stage}" for stage in STAGES], args.runs)
    base = seconds.pop("import torch")
    print(f"{'import torch':22s} {base:5.2f} s")
    for statement, s in seconds.items():
        print(f"{statement:22s} {s:5.2f} s   beyond torch's: {s - base:+5.2f} s")
    ours, theirs, diff = bootstrap_seconds(30, 270, args.resamples)
    print(f"bootstrap of {args.resamples} AUROCs (30 poisoned, 270 clean): counting {ours:.3f} s, scikit-learn "
          f"{theirs:.3f} s ({theirs / ours:.0f}x); largest difference {diff:.1e}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="interpreters per import (the fastest is kept)")
    p.add_argument("--resamples", type=int, default=1000)
    main(p.parse_args())
