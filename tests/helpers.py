"""Small builders and the relative error shared by test modules (pytest puts tests/ on sys.path:
`from helpers import ...`)."""
import numpy as np
from PIL import Image

from poison import poison


def poisoned_random_folder(root, per_class, side=32, classes=3, ratio=0.2):
    """A `folder:` dataset of `classes` classes (c0, c1, ...) of random side-px images under root/src, poisoned by
    poison.py (BadNets, target c0) into root/poisoned, which is returned."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        folder = root / "src" / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    poison(root / "poisoned", dataset=f"folder:{root / 'src'}", target="c0", resolution=side, ratio=ratio, force=True,
           quiet=True, workers=1)
    return root / "poisoned"


def rel_err(got, ref):
    """||got - ref|| / ||ref|| in float64, over whole tensors: the comparison every reference check uses."""
    return ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
