"""Small builders and the relative error shared by test modules (pytest puts tests/ on sys.path:
`from helpers import ...`)."""
import numpy as np
import torch
from PIL import Image

import classify
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


@torch.no_grad()
def denoising_errors_loop(eps_fn, x0, noise, alphas_cumprod, timesteps, num_classes, drops, loss="l2",
                          amp_dtype=None):
    """classify.denoising_errors' errors, (B, K, P, L), by the reference's loop: the oracle of the batched code."""
    B, P = noise.shape[:2]
    out = torch.empty(B, num_classes, P, len(drops), dtype=torch.float64)
    for k in range(P):
        t = timesteps[k].expand(B)
        x_t = classify.q_sample(alphas_cumprod, x0, t, noise[:, k])
        for c in range(num_classes):
            with classify.autocast(x0.device, amp_dtype):
                pred = eps_fn(x_t, t, torch.full((B,), c, dtype=torch.long, device=x0.device))
            out[:, c, k] = classify.filtered_means(classify.error_map(pred, noise[:, k], loss).flatten(1), drops).cpu()
    return out
