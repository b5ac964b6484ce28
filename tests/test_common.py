"""common.py: the lock on an output folder, the checks of a dataset folder when it is opened."""
import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import common
from common import UsageError, load_folder, lock_output


def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_output_lock_refuses_a_live_run_takes_over_a_dead_ones_and_releases(tmp_path):
    out = tmp_path / "model"
    lock = tmp_path / ".model.lock"
    release = lock_output(out)
    assert lock.read_text().strip() == f"{os.getpid()}@{platform.node()}"
    lock.write_text(f"{os.getppid()}@{platform.node()}\n")  # a live process on this machine holds it
    with pytest.raises(UsageError, match=r"another run \(\d+@.*\) is writing .*model: wait for it, or delete"):
        lock_output(out)
    release()
    assert not lock.exists()
    lock.write_text(f"{dead_pid()}@{platform.node()}\n")  # a killed run's lock
    release = lock_output(out)
    assert lock.read_text().strip() == f"{os.getpid()}@{platform.node()}"
    release()
    assert not lock.exists()
    lock.write_text(f"{dead_pid()}@another-host\n")  # another machine's: never taken over
    with pytest.raises(UsageError, match="another run"):
        lock_output(out)


def test_atomic_output_is_refused_while_another_run_writes_the_same_out(tmp_path):
    out = tmp_path / "set"
    (tmp_path / ".set.lock").write_text(f"{os.getppid()}@{platform.node()}\n")
    with pytest.raises(UsageError, match="another run .* is writing"):
        with common.atomic_output(out):
            pass
    assert not out.exists() and not list(tmp_path.glob(".set.tmp-*"))
    (tmp_path / ".set.lock").unlink()
    with common.atomic_output(out) as tmp:
        (tmp / "x").write_text("1")
    assert (out / "x").read_text() == "1" and sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def small_set(folder, labels=(0, 0, 0, 0, 1, 1), poisoned=(1, 1, 0, 0, 0, 0), **manifest):
    """A dataset folder of 8x8 images as poison.py writes one: target class 0, p_t = 2/4."""
    items = [({"text": "x", "label": y, "poisoned": bool(p)}, np.full((8, 8, 3), 10 * i, np.uint8))
             for i, (y, p) in enumerate(zip(labels, poisoned))]
    counts = {"total": len(labels), "poisoned": sum(poisoned), "per_class": {"a": labels.count(0), "b": labels.count(1)}}
    manifest = {"stage": "poison", "class_names": ["a", "b"], "target": {"index": 0, "name": "a"}, "p_t": 0.5,
                "counts": counts, **manifest}
    common.write_folder(folder, items, manifest)
    return folder


def drop_record(folder, i):
    lines = (folder / "metadata.jsonl").read_text().splitlines(keepends=True)
    (folder / "metadata.jsonl").write_text("".join(lines[:i] + lines[i + 1:]))


def test_a_folder_is_checked_against_its_manifest_when_opened(tmp_path):
    assert len(load_folder(small_set(tmp_path / "ok"))) == 6
    drop_record(small_set(tmp_path / "lost"), 5)  # a record lost: the counts disagree
    with pytest.raises(UsageError, match=r"lost/metadata.jsonl does not match manifest.json \(total: 5 in the records, "
                                         r"6 in the manifest\): the folder is damaged; make it again"):
        load_folder(tmp_path / "lost")
    folder = small_set(tmp_path / "moved")  # a record relabelled: per-class counts disagree
    (folder / "metadata.jsonl").write_text((folder / "metadata.jsonl").read_text().replace(
        '"label": 1', '"label": 0', 1))
    with pytest.raises(UsageError, match=r"per_class: \{'a': 5, 'b': 1\} in the records"):
        load_folder(folder)
    folder = small_set(tmp_path / "pt", p_t=0.4)  # the manifest's p_t is wrong: the records win, with a warning
    with pytest.warns(UserWarning, match="manifest.json says p_t 0.4000, its records 0.5000"):
        assert load_folder(folder).manifest["p_t"] == 0.5


def test_a_folder_of_mixed_sizes_is_refused_naming_the_odd_image(tmp_path):
    folder = small_set(tmp_path / "s")
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(folder / "images" / "000003.png")
    with pytest.raises(UsageError, match=r"000003.png is 8x9 RGB, the folder's first image 8x8 RGB: give a folder of "
                                         "one size and mode"):
        load_folder(folder)


def test_sixteen_bit_images_load_with_their_true_values(tmp_path):
    folder = small_set(tmp_path / "g")
    for i in range(6):
        Image.fromarray(np.full((8, 8), 257 * 40 * i, np.uint16)).save(folder / "images" / f"{i:06d}.png")
    ds = load_folder(folder)
    assert all(torch.equal(ds.image_uint8(i), torch.full((3, 8, 8), 40 * i, dtype=torch.uint8)) for i in range(6))


def stage_exit(monkeypatch, capsys, error):
    """What a stage's entry point does when its main raises `error`: (exit code, stderr lines)."""
    def main(args):
        raise error
    monkeypatch.setattr(sys, "argv", ["stage.py"])
    with pytest.raises(SystemExit) as e:
        common.cli(main, common.argparse.ArgumentParser())
    code = e.value.code
    return (1, [code]) if isinstance(code, str) else (code, capsys.readouterr().err.strip().splitlines())


@pytest.mark.parametrize("error, code, line", [
    (OSError(28, "No space left on device", "/data/out/x.png"), 1,
     "stage.py: error: No space left on device: /data/out/x.png: free space on that disk, or choose another --out"),
    (OSError(30, "Read-only file system", "/ro/out"), 1, "stage.py: error: Read-only file system: /ro/out: choose a "
                                                          "writable --out"),
    (UsageError("--steps 0: give 1 or more"), 1, "stage.py: error: --steps 0: give 1 or more"),
    (KeyboardInterrupt(), 130, "stage.py: interrupted; --out not written"),
])
def test_the_machine_failing_is_one_line_not_a_traceback(monkeypatch, capsys, error, code, line):
    assert stage_exit(monkeypatch, capsys, error) == (code, [line])


def test_an_out_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match=r"file is a file, not a folder: choose another --out"):
        common.check_out(tmp_path / "file" / "out")
    with pytest.raises(UsageError, match=r"the name n{20}\.\.\. is longer than the \d+ bytes a name may have here"):
        common.check_out(tmp_path / ("n" * 250))
    common.check_out(tmp_path / "new" / "out")  # a folder that can be made: fine
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only mount (root passes chmod)
    with pytest.raises(UsageError, match=r"cannot write in .* \(read-only or not yours\): choose another --out"):
        common.check_out(tmp_path / "out")
    monkeypatch.undo()
    monkeypatch.setattr(common.shutil, "disk_usage", lambda path: common.shutil._ntuple_diskusage(10, 10, 5 << 20))
    with pytest.raises(UsageError, match=r"the disk of .* has 5 MiB free: free space, or choose another --out"):
        common.check_out(tmp_path / "out")


def test_sizes_past_the_free_memory_are_refused_before_allocating():
    common.check_memory(1 << 20, "a small set", "never")
    with pytest.raises(UsageError, match=r"100000 images would take 9313225\.7 GiB of memory, [\d.]+ GiB are free: "
                                         r"give a smaller --n"):
        common.check_memory(10 ** 16, "100000 images", "give a smaller --n")
