"""Benchmark: poisoning a CIFAR-10-sized dataset (50 000 training + 10 000 test images, 32 px) end to end.

    python benchmarks/poison.py [--n-train 50000] [--workers 8]

The data are random images written in CIFAR-10's binary on-disk format, so no download is needed; the work
(selection, trigger stamping, PNG encoding of train/test/test_backdoor) is the same as for the real set.
Prints the machine, the wall time of each part and images/s.
"""
import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import poison as P  # noqa: E402


def cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(args):
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "cifar-10-batches-bin"
        d.mkdir()
        per_batch = args.n_train // 5
        for name, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", args.n_train // 5)]:
            rec = rng.integers(0, 256, (n, 3073), dtype=np.uint8)
            rec[:, 0] = rng.integers(0, 10, n)
            rec.tofile(d / f"{name}.bin")
        t0 = time.perf_counter()
        src = P.load_source("cifar10", "train", data_root=tmp)
        t1 = time.perf_counter()
        ids = P.select_poison(src.labels, 4, 0.1, seed=0)
        t2 = time.perf_counter()
        s = P.poison(Path(tmp) / "out", dataset="cifar10", data_root=tmp, ratio=0.1, workers=args.workers, quiet=True)
        t3 = time.perf_counter()
    n_images = s["train"] + s["test"] + s["test_backdoor"]
    print(f"machine: {cpu_name()} ({platform.machine()}, {os.cpu_count()} cores), workers {args.workers}")
    print(f"load {len(src)} training images: {t1 - t0:.2f} s; select {len(ids)} poisoned ids: {1e3 * (t2 - t1):.1f} ms")
    print(f"poison.py end to end ({n_images} PNGs written): {t3 - t2:.1f} s, {n_images / (t3 - t2):.0f} images/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=50000)
    parser.add_argument("--workers", type=int, default=8)
    main(parser.parse_args())
