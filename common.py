"""Shared by every stage: UsageError, argparse types, devices and torchrun, atomic outputs, provenance, image grids,
and the dataset folder the stages hand each other. Imports nothing of the project."""
import argparse
import atexit
import contextlib
import datetime
import errno
import itertools
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm


# Errors and argparse types ------------------------------------------------------------------------------------------
class UsageError(Exception):
    """Bad input: the message is one line naming the problem and the fix."""


FIXES = {errno.ENOSPC: "free space on that disk, or choose another --out", errno.EROFS: "choose a writable --out",
         errno.EACCES: "choose a folder you may write, or fix its permissions", errno.ENAMETOOLONG: "use shorter names",
         errno.EDQUOT: "free space (your quota is full), or choose another --out"}


def cli(main, parser, interrupted="--out not written", cleanup=None):
    """A stage's entry point: bad input, a failing machine (full disk...) and Ctrl-C end in one line, exit 1 or 130."""
    name = Path(sys.argv[0]).name
    args = parser.parse_args()
    try:
        main(args)
    except (UsageError, OSError, KeyboardInterrupt) as e:
        if cleanup is not None:
            cleanup(args)
        if isinstance(e, KeyboardInterrupt):
            print(f"{name}: interrupted; {interrupted}", file=sys.stderr)
            sys.exit(130)
        if isinstance(e, OSError):
            e = f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}: {FIXES.get(e.errno, 'check the path')}"
        sys.exit(f"{name}: error: {e}")
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def number(text, kind=float):  # `kind(text)`, or argparse's one-line error
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None


def positive(kind=int):  # argparse type: a number above 0
    def parse(text):
        value = number(text, kind)
        if not 0 < value < float("inf"):  # also refuses nan
            raise argparse.ArgumentTypeError(f"{text}: give a number above 0")
        return value
    parse.__name__ = f"positive {kind.__name__}"
    return parse


def finite(text):  # argparse type: a finite number
    value = number(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text}: give a finite number")
    return value


def share(text):  # argparse type: a fraction in [0, 1]
    value = number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{text}: give a share from 0 to 1")
    return value


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default once: none where the help tells it, for required flags, switches and None."""

    def _get_help_string(self, action):
        if "default" in action.help or action.required or action.nargs == 0 or action.default is None:
            return action.help
        return super()._get_help_string(action)


# Devices, precision, processes (torchrun sets RANK, WORLD_SIZE, LOCAL_RANK) -----------------------------------------
def resolve_device(flag):
    if flag == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if flag == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is visible: use --device cpu")
    if flag not in ("cpu", "cuda"):
        raise UsageError(f"unknown --device {flag!r}: choose auto, cpu or cuda")
    return torch.device(flag)


def autocast_dtype(flag, device):  # None for fp32; auto = bf16 on CUDA, fp32 on the CPU
    if flag == "auto":
        flag = "bf16" if device.type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[flag]


def dtype_name(dtype):  # autocast_dtype's result as --dtype spells it
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def autocast(device, dtype):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def setup_distributed(device):  # (rank, world, device); joins torchrun's process group (NCCL on CUDA, gloo on the CPU)
    if "RANK" not in os.environ:
        return 0, 1, device
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():  # long timeout: the other ranks wait while rank 0 downloads and poisons a dataset
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=3))
    return dist.get_rank(), dist.get_world_size(), device


def barrier(device=None):  # wait for every rank (a no-op in a single process); NCCL is told its GPU
    if dist.is_available() and dist.is_initialized():
        on_gpu = device is not None and device.type == "cuda" and device.index is not None
        dist.barrier(device_ids=[device.index]) if on_gpu else dist.barrier()


def on_rank0(fn, rank, world, share_result=True):
    """fn() on rank 0 (all ranks call it): its error stops every rank, none hangs; share_result: all get its result."""
    result, err = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:
            if world == 1:
                raise
            err = e
    if world > 1:
        message = None if err is None else str(err) if isinstance(err, UsageError) else \
            f"rank 0 stopped with {type(err).__name__}: {err} (its traceback is in rank 0's output)"
        box = [message, result if share_result else None]
        dist.broadcast_object_list(box, src=0)
        if err is not None:
            raise err  # rank 0 keeps its own error, its class and its traceback
        if box[0] is not None:
            raise UsageError(box[0])
        if share_result:
            result = box[1]
    return result


# Outputs: never over an input, atomic, provenance -------------------------------------------------------------------
def input_paths(inputs):  # (flag, given, resolved) of each path in {flag: path, list of paths or None}
    for flag, paths in (inputs or {}).items():
        for path in paths if isinstance(paths, (list, tuple)) else [paths]:
            if isinstance(path, (str, os.PathLike)):
                yield flag, path, Path(path).resolve()


def check_out(out, force=False, inputs=None):
    """--out is never an input, a folder holding one or inside one, is writable, and exists only with --force."""
    resolved = Path(out).resolve()
    for flag, path, p in input_paths(inputs):
        inside = p in resolved.parents and not flag.endswith("-root")  # a data root holds downloads, outputs beside
        if p == resolved or resolved in p.parents or inside:
            how = "is" if p == resolved else "holds" if resolved in p.parents else "lies in"
            raise UsageError(f"--out {out} {how} the input {flag} {path}: choose another --out")
    check_writable(out)
    if Path(out).exists() and not force:
        raise UsageError(f"{out} exists: pass --force to overwrite it, or choose another --out")


def check_memory(nbytes, what, fix):
    """Refuse, before allocating, what would not fit in the memory this machine has free."""
    try:
        free = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemAvailable:"))) << 10
    except (OSError, StopIteration, ValueError):  # not Linux: the physical memory
        free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if nbytes > 0.8 * free:
        raise UsageError(f"{what} would take {nbytes / 2**30:.1f} GiB of memory, {free / 2**30:.1f} GiB are free: "
                         f"{fix}")


MIN_FREE = 64 << 20   # bytes a stage needs free at the least; a write that finds the disk full still ends in one line


def exists(path):  # False, not an OSError, for a name too long to look up
    try:
        return path.exists()
    except OSError:
        return False


def check_writable(out, flag="--out"):
    """Refused before any work: an `out` that cannot be made (under a file, read-only, names too long, disk full)."""
    out = Path(out).absolute()
    home = next(p for p in out.parents if exists(p))   # the deepest folder that exists already
    if not home.is_dir():
        raise UsageError(f"{flag} {out}: {home} is a file, not a folder: choose another {flag}")
    if not os.access(home, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {out}: cannot write in {home} (read-only or not yours): choose another {flag}")
    longest = os.pathconf(home, "PC_NAME_MAX") - len(f"..tmp-{temp_tag()}@12345678")  # atomic_output's temp name
    name = next((n for n in out.relative_to(home).parts if len(n.encode()) > longest), None)
    if name:
        raise UsageError(f"{flag} {out}: the name {name[:20]}... is longer than the {longest} bytes a name may have "
                         f"here: choose a shorter {flag}")
    if shutil.disk_usage(home).free < MIN_FREE:
        raise UsageError(f"{flag} {out}: the disk of {home} has {shutil.disk_usage(home).free >> 20} MiB free: free "
                         f"space, or choose another {flag}")


def check_file_out(path, force=False, inputs=None, flag="--json"):
    """An output file (--json, --grid) is never an input, inside one or a folder, and exists only with --force."""
    resolved = Path(path).resolve()
    for name, given, p in input_paths(inputs):
        if p == resolved or p in resolved.parents:
            raise UsageError(f"{flag} {path} {'is' if p == resolved else 'lies in'} the input {name} {given}: "
                             "choose a file outside it")
    if resolved.is_dir():
        raise UsageError(f"{flag} {path} is a folder: give a file name, e.g. {Path(path) / 'out.json'}")
    if resolved.exists() and not force:
        raise UsageError(f"{flag} {path} exists: pass --force to overwrite it, or choose another file")


def temp_tag():  # PID@host, the mark of temporary names (see remove_stale)
    return f"{os.getpid()}@{platform.node()}"


def is_dead(tag):  # whether a PID@host[@...] tag names a process of this machine that is no longer running
    pid, at, rest = tag.partition("@")
    if os.name != "posix" or not (at and pid.isdigit() and rest.split("@")[0] == platform.node()) \
            or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: is it running?
    except ProcessLookupError:
        return True
    except OSError:  # running, as another user
        pass
    return False


def remove_stale(parent, prefix):  # remove `parent/<prefix><PID@host>[@...]` of this host's killed runs
    for path in Path(parent).iterdir() if Path(parent).is_dir() else []:
        if not path.name.startswith(prefix) or not is_dead(path.name[len(prefix):]):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def lock_output(out):
    """Hold `.OUT.lock` (PID@host) beside `out` until release() or exit; takes over a dead run's lock, or its own."""
    out = Path(out)
    lock = out.parent / f".{out.name}.lock"
    check_writable(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        holder = lock.read_text(errors="replace").strip() if lock.is_file() else ""
        if holder == temp_tag() or is_dead(holder):
            lock.unlink(missing_ok=True)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            raise UsageError(f"another run ({holder or 'starting'}) is writing {out}: wait for it, or delete {lock} "
                             "if it is gone") from None
    except OSError as e:  # a file where a folder should be, no permission, a full disk
        raise UsageError(f"cannot write {out} ({e.strerror}: {e.filename}): choose another --out") from None
    with os.fdopen(fd, "w") as f:
        f.write(temp_tag() + "\n")

    def release():
        atexit.unregister(release)
        lock.unlink(missing_ok=True)
    atexit.register(release)
    return release


@contextlib.contextmanager
def atomic_output(out, force=False):
    """Yield a temporary folder beside `out`, renamed to `out` on success (over an old one only with force)."""
    out = Path(out)
    release = lock_output(out)
    try:
        if out.exists() and not force:
            raise UsageError(f"{out} exists: pass --force to overwrite it, or choose another --out")
        try:
            remove_stale(out.parent, f".{out.name}.tmp-")
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{temp_tag()}@", dir=out.parent))
        except OSError as e:  # no permission, a full disk
            raise UsageError(f"cannot write {out} ({e.strerror}: {e.filename}): choose another --out") from None
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp makes it private (0700); the output is an ordinary folder
        try:
            yield tmp
            if out.exists():
                old = out.parent / f".{out.name}.old-{os.getpid()}"
                out.rename(old)
                try:
                    tmp.rename(out)
                except BaseException:
                    old.rename(out)  # put the old output back
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        release()


def replace_file(path, write):
    """write(tmp_path) to a temporary name beside `path`, then rename it over `path` (atomic)."""
    path = Path(path)
    remove_stale(path.parent, f".{path.name}.tmp-")
    tmp = path.with_name(f".{path.name}.tmp-{temp_tag()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def save_safetensors(tensors, path, metadata=None):
    """safetensors' save_file with the umask's permissions (safetensors 0.8 makes files owner-only)."""
    from safetensors.torch import save_file
    save_file(tensors, str(path), metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def truncate_log(path, step):
    """Drop a JSON-lines log's lines past the resumed `step`, and a last line a kill left half-written."""
    path = Path(path)
    if not path.is_file():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = []
    for i, ln in enumerate(lines):
        try:
            if json.loads(ln)["step"] <= step:
                kept.append(ln)
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise UsageError(f"{path} line {i + 1} is not JSON: repair or delete the log") from None
    replace_file(path, lambda p: p.write_text("".join(ln + "\n" for ln in kept)))


def versions():  # the versions a run used, from package metadata (importing torchvision costs seconds)
    from importlib.metadata import PackageNotFoundError, version

    def installed(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {"python": platform.python_version(), "torch": torch.__version__, "torchvision": installed("torchvision"),
            "numpy": np.__version__, "pillow": installed("pillow")}


def save_grid(images, path, nrow=8, min_tile=64):
    """(N, H, W, 3) uint8 or (N, 3, H, W) tensors -> one PNG grid (tiles >= min_tile px), atomically."""
    images = images.permute(0, 2, 3, 1).numpy() if torch.is_tensor(images) else np.asarray(images)
    n, h, w, _ = images.shape
    scale, pad = max(1, math.ceil(min_tile / h)), 2
    grid = np.full((math.ceil(n / nrow) * (h * scale + pad) + pad, min(n, nrow) * (w * scale + pad) + pad, 3), 255,
                   np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, nrow)
        y, x = pad + r * (h * scale + pad), pad + c * (w * scale + pad)
        grid[y:y + h * scale, x:x + w * scale] = im.repeat(scale, 0).repeat(scale, 1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    replace_file(path, lambda tmp: Image.fromarray(grid).save(tmp, format="PNG"))


# The dataset folder: metadata.jsonl + images/*.png + manifest.json (+ trigger.safetensors) --------------------------
CHUNK = 256  # images a PNG-writing task handles
DAMAGED = "the folder is damaged; make it again with the stage that made it"


def write_folder(folder, items, manifest, total=None, workers=4, desc=None, trigger=None):
    """A dataset folder of `items`, (record, (H, W, 3) uint8) pairs or callables returning them, in order."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)

    def write(chunk):  # one thread task per chunk of (n, item) pairs (PIL releases the GIL)
        records = []
        for n, item in chunk:
            record, image = item() if callable(item) else item
            record = {"file_name": f"images/{n:06d}.png", **record}
            Image.fromarray(np.asarray(image, dtype=np.uint8)).save(folder / record["file_name"], compress_level=1)
            records.append(record)
        return records

    numbered = enumerate(items)
    chunks = iter(lambda: list(itertools.islice(numbered, CHUNK)), [])
    records = []
    with ThreadPoolExecutor(max(1, workers)) as pool, \
            tqdm(total=total, desc=desc or folder.name, leave=False, disable=total is not None and total < 64) as bar:
        for done in pool.map(write, chunks):
            records += done
            bar.update(len(done))
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if trigger is not None:
        save_safetensors(trigger.tensors(), folder / "trigger.safetensors")
        manifest = {**manifest, "trigger": trigger.params}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return records


def manifest_target(manifest):  # the target class name of a manifest ({"index", "name"} or a plain name), or None
    t = (manifest or {}).get("target")
    t = t.get("name") if isinstance(t, dict) else t
    return None if t is None else str(t)


def same_classes(a, b):  # case aside
    return [c.lower() for c in a] == [c.lower() for c in b]


def read_manifest(folder):
    path = Path(folder) / "manifest.json"
    if not path.is_file():
        raise UsageError(f"{folder} is not a dataset folder (no manifest.json): make one with poison.py or sample.py")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid JSON ({e}): {DAMAGED}") from None
    if not isinstance(manifest, dict):
        raise UsageError(f"{path} holds a {type(manifest).__name__}, not a manifest: {DAMAGED}")
    return manifest


def check_record(r):
    """A record: an integer label, an image inside its folder, a poisoned flag and a text of the right types."""
    name = r.get("file_name") if isinstance(r, dict) else None
    if not isinstance(name, str) or type(r.get("label")) is not int:
        raise ValueError("a record needs an integer label and a file_name")
    if Path(name).is_absolute() or ".." in Path(name).parts:
        raise ValueError(f"file_name {name!r} lies outside the folder")
    if r.get("poisoned") not in (True, False, None) or not isinstance(r.get("text", ""), str):
        raise ValueError("poisoned must be true, false or null and text a string")
    return r


def read_records(folder):
    path = Path(folder) / "metadata.jsonl"
    if (Path(folder) / "train" / "metadata.jsonl").is_file() and not path.is_file():
        raise UsageError(f"{folder} holds a poisoned set, not one dataset folder: give {Path(folder) / 'train'}")
    if not path.is_file():
        raise UsageError(f"{folder} is not a dataset folder (no metadata.jsonl): make one with poison.py (an image "
                         "folder of class subfolders: poison.py --dataset folder:PATH --ratio 0) or sample.py")
    records, n = [], 0
    try:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                records.append(check_record(json.loads(line)))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UsageError(f"{path}{f' line {n}' if n else ''} is damaged ({e}): make the folder again") from None
    if not records:
        raise UsageError(f"{folder} is an empty dataset folder (metadata.jsonl lists no images)")
    return records


class FolderDataset(torch.utils.data.Dataset):
    """A dataset folder: (image (3, H, W) in [0, 1], label) pairs, its records, manifest and `poisoned` flags."""

    def __init__(self, root, transform=None):
        self.root = Path(root)
        self.records = read_records(root)
        self.manifest = read_manifest(root)
        names = self.manifest.get("class_names")
        if not isinstance(names, list) or not names or not all(isinstance(c, str) for c in names):
            raise UsageError(f"{self.root / 'manifest.json'} lists no class_names: {DAMAGED}")
        self.class_names = list(names)
        # generations: only a judge can tell the trigger (older ones said false)
        self.poisoned_unknown = (any(r.get("poisoned", False) is None for r in self.records)
                                 or self.manifest.get("stage") == "sample")
        lowest = -1 if self.poisoned_unknown else 0  # generations for a free prompt have no class: label -1
        bad = next((r for r in self.records if not lowest <= r["label"] < len(names)), None)
        if bad is not None:  # a label past the classes would train the DDPM's null class, silently
            raise UsageError(f"{self.root / 'metadata.jsonl'}: {bad['file_name']} has label {bad['label']}, outside "
                             f"the {len(names)} classes of manifest.json: {DAMAGED}")
        target = self.manifest.get("target")
        if target is not None and not (isinstance(target, dict) and type(target.get("index")) is int
                                       and 0 <= target["index"] < len(names)):
            raise UsageError(f"{self.root / 'manifest.json'}: target {target!r} is not one of its classes: {DAMAGED}")
        self.labels = torch.tensor([r["label"] for r in self.records], dtype=torch.long)
        self.poisoned = torch.tensor([bool(r.get("poisoned", False)) for r in self.records])
        self.check_counts()
        self.check_images()
        self.transform = transform

    def check_counts(self):
        """The records against the manifest's counts; a poisoned set's p_t from the records (with a warning)."""
        m = self.manifest
        counts = m.get("counts") if isinstance(m.get("counts"), dict) else {}
        seen = {"total": len(self.records), "poisoned": None if self.poisoned_unknown else int(self.poisoned.sum())}
        per_class = counts.get("per_class")
        if isinstance(per_class, dict) and set(per_class) <= set(self.class_names):
            seen["per_class"] = {c: int((self.labels == self.class_names.index(c)).sum()) for c in per_class}
        for key, have in seen.items():
            if key in counts and have is not None and counts[key] != have:
                raise UsageError(f"{self.root / 'metadata.jsonl'} does not match manifest.json ({key}: {have} in the "
                                 f"records, {counts[key]} in the manifest): {DAMAGED}")
        if m.get("stage") == "poison" and m.get("target") is not None and "p_t" in m:
            t = m["target"]["index"]
            p_t = int(self.poisoned[self.labels == t].sum()) / max(1, int((self.labels == t).sum()))
            said = m.get("p_t")
            if said != p_t:
                said = f"{said:.4f}" if isinstance(said, (int, float)) else repr(said)
                warnings.warn(f"{self.root}: manifest.json says p_t {said}, its records {p_t:.4f}: using the records'",
                              stacklevel=3)
                m["p_t"] = p_t

    def check_images(self):  # one size and mode per set: a refusal names the first odd image
        first = None
        for r in self.records:
            path = self.root / r["file_name"]
            try:
                with Image.open(path) as im:
                    kind = im.size, im.mode
            except OSError as e:
                raise UsageError(f"corrupt or unreadable image {path} ({e}): rebuild the dataset folder") from None
            first = first or kind
            if kind != first:
                raise UsageError(f"{path} is {kind[0][0]}x{kind[0][1]} {kind[1]}, the folder's first image "
                                 f"{first[0][0]}x{first[0][1]} {first[1]}: give a folder of one size and mode")

    def __len__(self):
        return len(self.records)

    def image_uint8(self, i):
        path = self.root / self.records[i]["file_name"]
        try:
            with Image.open(path) as im:
                if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: scaled, not clipped, to 8 bits
                    grey = np.rint(np.asarray(im, dtype=np.float64) / 257).clip(0, 255).astype(np.uint8)
                    return torch.from_numpy(grey).expand(3, *grey.shape).clone()
                return torch.from_numpy(np.array(im.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1)
        except OSError as e:
            raise UsageError(f"corrupt or unreadable image {path} ({e}): rebuild the dataset folder") from None

    def image_size(self):  # (H, W) of the first image, the side the stages bring all to
        return tuple(self.image_uint8(0).shape[-2:])

    def __getitem__(self, i):
        x = self.image_uint8(i).float() / 255.0
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])

    def images(self, progress=True):  # all images as one (N, 3, H, W) uint8 tensor
        return torch.stack([self.image_uint8(i) for i in tqdm(range(len(self)), desc=f"load {self.root.name}",
                                                              leave=False, disable=not progress)])


def load_folder(root, transform=None):  # open a dataset folder written by poison.py or sample.py
    return FolderDataset(root, transform)
