"""A property of load_folder, fuzzed: whatever damage metadata.jsonl or manifest.json suffer, opening the folder
either refuses it with a UsageError or yields a dataset that agrees with its records (labels within the classes,
images inside the folder, p_t recomputed). Never another exception, never a silent disagreement."""
import json
import random

import numpy as np
import pytest
from PIL import Image

from common import UsageError, load_folder, write_folder

VALUES = [None, -1, 0, 1, 2, 10 ** 30, 1.5, float("nan"), "1", "", True, [], {}, [1, 2], {"a": 1},
          "../outside.png", "/etc/hostname", "images", "images/missing.png", "images/000001.png", "\udcff"]
CASES = 300


def base_set(folder):
    """6 images of 8x8, classes a and b, target a, 2 of its 4 images poisoned (p_t 0.5)."""
    labels, poisoned = (0, 0, 0, 0, 1, 1), (1, 1, 0, 0, 0, 0)
    items = [({"text": f"a photo of {'ab'[y]}", "label": y, "poisoned": bool(p)}, np.full((8, 8, 3), 20 * i, np.uint8))
             for i, (y, p) in enumerate(zip(labels, poisoned))]
    manifest = {"stage": "poison", "class_names": ["a", "b"], "target": {"index": 0, "name": "a"}, "p_t": 0.5,
                "counts": {"total": 6, "poisoned": 2, "per_class": {"a": 4, "b": 2}}}
    write_folder(folder, items, manifest, workers=1)


def damage_bytes(rng, data):
    kind = rng.choice(["truncate", "flip", "insert", "delete"])
    i = rng.randrange(len(data) + 1)
    if kind == "truncate":
        return data[:i]
    if kind == "flip":
        return data[:i] + bytes([rng.randrange(256)]) + data[i + 1:]
    if kind == "insert":
        return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8))) + data[i:]
    return data[:i] + data[i + rng.randrange(1, 16):]


def damage_records(rng, lines):
    i = rng.randrange(len(lines))
    kind = rng.choice(["drop", "duplicate", "set", "remove_key", "replace"])
    if kind == "drop":
        return lines[:i] + lines[i + 1:]
    if kind == "duplicate":
        return lines[:i + 1] + lines[i:]
    if kind == "replace":
        lines[i] = json.dumps(rng.choice(VALUES))
        return lines
    record = json.loads(lines[i])
    key = rng.choice(["label", "file_name", "poisoned", "text"])
    if kind == "remove_key":
        record.pop(key)
    else:
        record[key] = rng.choice(VALUES)
    lines[i] = json.dumps(record)
    return lines


def damage_manifest(rng, manifest):
    path = rng.choice([("class_names",), ("class_names", 0), ("target",), ("target", "index"), ("p_t",), ("stage",),
                       ("counts",), ("counts", "total"), ("counts", "poisoned"), ("counts", "per_class"),
                       ("counts", "per_class", "a")])
    *parents, key = path
    node = manifest
    for p in parents:
        node = node[p]
    if rng.random() < 0.3 and isinstance(node, dict):
        node.pop(key)
    else:
        node[key] = rng.choice(VALUES)
    return manifest


def damage(rng, folder):
    target = rng.choice(["metadata.jsonl", "manifest.json"])
    path = folder / target
    data = path.read_bytes()
    try:  # structured damage while the file still parses, else damage to its bytes
        if rng.random() < 0.3:
            raise ValueError
        if target == "metadata.jsonl":
            text = "".join(line + "\n" for line in damage_records(rng, data.decode().splitlines()))
        else:
            text = json.dumps(damage_manifest(rng, json.loads(data)))
        path.write_text(text, errors="surrogatepass")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        path.write_bytes(damage_bytes(rng, data))


def check_consistent(ds):
    root = ds.root.resolve()
    n_classes = len(ds.class_names)
    assert len(ds) == len(ds.records) == len(ds.labels)
    for i, r in enumerate(ds.records):
        lowest = -1 if ds.poisoned_unknown else 0
        assert isinstance(r["label"], int) and not isinstance(r["label"], bool) and lowest <= r["label"] < n_classes
        assert root in (root / r["file_name"]).resolve().parents, r["file_name"]  # an image of this folder
        x, y = ds[i]
        assert x.shape == (3, 8, 8) and y == r["label"]
    m = ds.manifest
    if m.get("stage") == "poison" and isinstance(m.get("target"), dict) and "p_t" in m:
        t = m["target"]["index"]
        assert isinstance(t, int) and 0 <= t < n_classes
        in_target = ds.labels == t
        assert m["p_t"] == int(ds.poisoned[in_target].sum()) / max(1, int(in_target.sum()))


@pytest.mark.parametrize("seed", range(CASES))
def test_a_damaged_folder_is_refused_or_read_as_its_records_say(tmp_path_factory, seed):
    rng = random.Random(seed)
    root = tmp_path_factory.mktemp(f"fuzz{seed}")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "outside.png")  # a valid image outside the folder
    folder = root / "set"
    base_set(folder)
    for _ in range(rng.choice([1, 1, 2, 3])):
        damage(rng, folder)
    try:
        ds = load_folder(folder)
    except UsageError as e:
        assert "\n" not in str(e)
        return
    check_consistent(ds)
