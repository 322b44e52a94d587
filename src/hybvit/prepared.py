"""Prepared datasets: any dataset decoded once (`hybvit prepare SPEC --out DIR`) into plain .npy arrays that training
and evaluation map read-only (`--data prepared:DIR`), so the processes of a node share one copy in the page cache.

  DIR/x_train.npy     uint8 (N, C, H, W), the layout of ImageData
  DIR/y_train.npy     int64 (N,)
  DIR/x_test.npy      uint8 (M, C, H, W)
  DIR/y_test.npy      int64 (M,)
  DIR/prepared.json   {"format": 1, "name": the source spec, "shape": [C, H, W], "num_classes", "classes" (a list
                      or null), "train": N, "test": M, "digest": sha256 of the four arrays' bytes in that order}

`write_prepared` writes data held in memory; `write_streamed` creates the arrays at full size, maps them and lets
the caller decode into them (image folders: folders.py), so the data is never in memory at once. The folder is
written through a temporary sibling renamed into place: an interrupted prepare leaves nothing (a
killed one may leave a hidden `.DIR.*.tmp` sibling, never a folder that reads as prepared).
`folder:PATH` data is prepared automatically (`cached`): decoded once into $HYBVIT_CACHE/prepared/, keyed by a
digest of its file listing (paths, sizes, modification and change times) and the decoding options, and mapped
afterwards; a new version of a folder replaces the cache of the one before (`hybvit prepare` never caches). A load
reads no image: it checks each file's .npy header (dtype, shape) against prepared.json and its size against the
header, then maps it; a truncated or mismatched folder is a one-line HybvitError. The digest is not recomputed on
load (that would read every byte); `content_digest` recomputes it.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:
    import fcntl                          # POSIX; elsewhere the cache is written without a lock
except ImportError:
    fcntl = None

from . import checkpoint as ckpt
from .config import MAX_SIDE, RULES
from .data import ImageData, cache_dir
from .errors import CannotWrite, HybvitError

FORMAT = 1
META = "prepared.json"
ARRAYS = ("x_train", "y_train", "x_test", "y_test")
MAX_META_BYTES = 64 << 20                 # a class list of 100,000 long names fits; more is not a hybvit file
MAX_HEADER_BYTES = 1 << 16                # numpy writes ~128 bytes for these arrays
AGAIN = "run hybvit prepare again"
MAX_CLASSES = RULES["model.num_classes"][2]


def check_new_folder(out: Path) -> None:
    """Refuse, before anything is decoded, an --out that holds something or under which nothing can be created."""
    out = Path(out)
    try:
        taken = out.exists() and (not out.is_dir() or any(out.iterdir()))
    except OSError as e:
        raise CannotWrite(f"cannot read --out '{out}' ({e.strerror or type(e).__name__}); give a new folder for "
                          f"the prepared data") from None
    if taken:
        raise CannotWrite(f"--out '{out}' exists and is not an empty folder; give a new folder for the prepared data")
    ckpt.check_can_create(out)


def content_digest(arrays: dict[str, np.ndarray]) -> str:
    """sha256 of the arrays' bytes (C order) in the order x_train, y_train, x_test, y_test, read in 64 MiB pieces
    (memory maps are hashed without reading them into memory)."""
    h = hashlib.sha256()
    for name in ARRAYS:
        flat = np.ascontiguousarray(arrays[name]).reshape(-1).view(np.uint8)
        for i in range(0, len(flat), 64 << 20):
            h.update(memoryview(flat[i:i + (64 << 20)]))
    return h.hexdigest()


def write_prepared(data: ImageData, out: Path) -> dict[str, Any]:
    """Write `data` (held in memory) as the prepared folder `out` (new or empty), all or nothing; returns its
    prepared.json."""
    def fill(split: str, x: np.ndarray) -> np.ndarray:
        x[...] = getattr(data, f"x_{split}").detach().cpu().numpy()
        return getattr(data, f"y_{split}").detach().cpu().numpy()
    return write_streamed(out, data.name, data.classes, data.num_classes, tuple(data.x_train.shape[1:]),
                          {"train": len(data.x_train), "test": len(data.x_test)}, fill)


def _allocate(path: Path) -> None:
    """Give the file its blocks now, so that a full disk fails here (OSError), not while the map is written (SIGBUS);
    a file system without posix_fallocate writes all the same."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, path.stat().st_size)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise


def write_streamed(out: Path, name: str, classes: list[str] | None, num_classes: int, shape: tuple[int, int, int],
                   counts: dict[str, int], fill: Callable[[str, np.ndarray], np.ndarray]) -> dict[str, Any]:
    """Write the prepared folder `out` (new or empty) without holding its images: x_{split}.npy is created at its
    full size and memory-mapped, fill(split, x) decodes into x (N, C, H, W) and returns the labels; the digest is
    read back from the files. All or nothing, like write_prepared; returns prepared.json."""
    out = Path(out)
    check_new_folder(out)
    meta: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        arrays = {}
        for split in ("train", "test"):
            path, n = tmp / f"x_{split}.npy", counts[split]
            if n:                                                # full size on disk, mapped, filled in place
                x = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, *shape))
                _allocate(path)
            else:                                                # (an empty array cannot be mapped)
                x = np.empty((0, *shape), np.uint8)
            y = np.ascontiguousarray(fill(split, x), dtype=np.int64)
            if n:
                x.flush()
                del x                                            # unmapped; read back below, read-only
                x = np.load(path, mmap_mode="r", allow_pickle=False)
            else:
                with open(path, "wb") as f:
                    np.lib.format.write_array(f, x, allow_pickle=False)
            with open(tmp / f"y_{split}.npy", "wb") as f:
                np.lib.format.write_array(f, y, allow_pickle=False)
            arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
        meta.update(format=FORMAT, name=name, shape=list(shape), num_classes=int(num_classes),
                    classes=list(classes) if classes is not None else None, train=counts["train"],
                    test=counts["test"], digest=content_digest(arrays))
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    ckpt.write_folder(out, write)
    return meta


def read_meta(folder: Path) -> dict[str, Any]:
    """prepared.json of `folder`, every field checked; anything else is a one-line error."""
    path = Path(folder) / META
    if not path.is_file():
        raise HybvitError(f"'{folder}' is not a prepared dataset (no {META}); make one with "
                          f"hybvit prepare SPEC --out {folder}")
    try:
        if path.stat().st_size > MAX_META_BYTES:
            raise ValueError("too large")
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise HybvitError(f"cannot read '{path}' ({type(e).__name__}); the folder is damaged: {AGAIN}") from None
    if not isinstance(meta, dict) or type(meta.get("format")) is not int or meta["format"] != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise HybvitError(f"'{path}' is not format {FORMAT} of a prepared dataset (format {got!r}); {AGAIN} "
                          f"with this hybvit")

    def count(v: Any, low: int, high: int | None = None) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low and (high is None or v <= high)
    shape, classes = meta.get("shape"), meta.get("classes")
    wrong = [k for k, ok in (
        ("name", isinstance(meta.get("name"), str)),
        ("shape", isinstance(shape, list) and len(shape) == 3 and all(count(s, 1, MAX_SIDE) for s in shape)
         and shape[0] in (1, 3, 4) and shape[1] == shape[2]),              # square images of 1, 3 or 4 channels
        ("num_classes", count(meta.get("num_classes"), 0, MAX_CLASSES)),
        ("classes", classes is None or (isinstance(classes, list) and all(isinstance(c, str) for c in classes)
                                        and len(classes) == meta.get("num_classes"))),
        ("train", count(meta.get("train"), 0)), ("test", count(meta.get("test"), 0)),
        ("digest", isinstance(meta.get("digest"), str))) if not ok]
    if wrong:
        raise HybvitError(f"'{path}' has missing or malformed fields ({', '.join(wrong)}); the folder is damaged: "
                          f"{AGAIN}")
    return meta


def map_array(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> torch.Tensor:
    """The .npy file `path` mapped read-only as a tensor (no copy), after its header is checked against the shape
    and dtype prepared.json states and its size against the header: a truncated file is refused, never mapped."""
    name = f"'{path}'"
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"npy version {version}")
            width = 2 if version == (1, 0) else 4                 # the header's length, little-endian
            claimed = int.from_bytes(f.read(width), "little")
            if claimed > MAX_HEADER_BYTES:                        # refused before numpy reads (allocates) it
                raise ValueError(f"a header of {claimed:,} bytes")
            f.seek(-width, 1)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            got_shape, fortran, got_dtype = read(f)
            offset = f.tell()
        size = path.stat().st_size
    except FileNotFoundError:
        raise HybvitError(f"{name} is missing; the prepared folder is incomplete: {AGAIN}") from None
    except (OSError, ValueError) as e:
        raise HybvitError(f"cannot read {name} as a .npy file ({type(e).__name__}: it is truncated or damaged); "
                          f"{AGAIN}") from None
    if tuple(got_shape) != shape or got_dtype != dtype or fortran:
        raise HybvitError(f"{name} holds {tuple(got_shape)} {got_dtype}{' (Fortran order)' if fortran else ''} but "
                          f"{META} says {shape} {dtype}; the folder is mismatched: {AGAIN}")
    expected = offset + int(np.prod(shape, dtype=object)) * dtype.itemsize
    if size != expected:
        raise HybvitError(f"{name} holds {size:,} bytes but its header says {expected:,}; the file is "
                          f"{'truncated' if size < expected else 'damaged'}: {AGAIN}")
    if expected == offset:                                    # nothing to map (mmap refuses empty ranges)
        return torch.from_numpy(np.empty(shape, dtype))
    try:
        arr = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    except (OSError, ValueError) as e:
        raise HybvitError(f"cannot map {name} ({type(e).__name__}: {e}); {AGAIN}") from None
    with warnings.catch_warnings():                            # read-only on purpose: the pages stay shared
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(arr)


def load_prepared(path: str, spec: str) -> ImageData:
    """`prepared:DIR`: the four arrays mapped read-only (see map_array), with the name and classes of the source.
    (Another image size is made by load_data, in memory: prepare at that size to keep the one shared copy.)"""
    if not path:
        raise HybvitError(f"data spec '{spec}' needs a folder, e.g. prepared:/path/to/folder (made by hybvit prepare)")
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise HybvitError(f"prepared data folder '{folder}' does not exist; make it with hybvit prepare SPEC "
                          f"--out {folder}")
    meta = read_meta(folder)
    c, h, w = meta["shape"]
    u8, i64 = np.dtype(np.uint8), np.dtype(np.int64)
    t = {name: map_array(folder / f"{name}.npy", (meta[split], c, h, w) if name[0] == "x" else (meta[split],),
                         u8 if name[0] == "x" else i64)
         for name, split in zip(ARRAYS, ("train", "train", "test", "test"))}
    return ImageData(t["x_train"], t["y_train"], t["x_test"], t["y_test"], meta["num_classes"], meta["name"],
                     meta["classes"], mapped=True)


def listing_digest(files: list[Path], *options: Any) -> str:
    """sha256 of each file's path, size and modification and change times, and the decoding options: any file
    added, removed, renamed or rewritten gives another digest, without reading the images."""
    h = hashlib.sha256(repr(options).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on the file `path` while inside (fcntl.flock; best effort: none where it is unavailable),
    so that processes loading the same folder at once decode it once: the others wait, then map it."""
    try:
        f = open(path, "a") if fcntl is not None else None
    except OSError:
        f = None
    if f is None:
        yield
        return
    with f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:
            pass
        yield


def _cached_copy(folder: Path, name: str) -> ImageData | None:
    """The cached prepared folder, mapped, if it is there and whole; a damaged one is removed."""
    if (folder / META).is_file():
        try:
            data = load_prepared(str(folder), f"prepared:{folder}")
            if data.name == name:
                return data
        except HybvitError:
            pass
    shutil.rmtree(folder, ignore_errors=True)                    # damaged or half removed: made again
    return None


def cached(source: str, key: str, name: str, write: Callable[[Path], Any], decode: Callable[[], ImageData]
           ) -> ImageData:
    """The data `name` from the prepared cache folder $HYBVIT_CACHE/prepared/<source>-<key>, mapped. If it is not
    there, write(folder) makes it (decoding straight into it) and it replaces the cache of an earlier version of the
    same source (`source` names the source, `key` digests its contents); a process still mapping a removed version
    keeps its pages until it ends. Processes that ask at once wait for the first one (a lock file). Best effort:
    where the cache cannot be written, decode() loads the data into memory instead."""
    folder = cache_dir() / "prepared" / f"{source}-{key}"
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        return decode()
    with _locked(folder.parent / f".{source}.lock"):
        data = _cached_copy(folder, name)
        if data is not None:
            return data
        try:
            write(folder)
            written = True
        except (OSError, CannotWrite):
            written = False
        if written:
            for old in folder.parent.glob(f"{source}-*"):
                if old != folder and (old / META).is_file():
                    shutil.rmtree(old, ignore_errors=True)
            data = _cached_copy(folder, name)
    if data is None:
        return decode()                                          # outside the except: nothing of the write is kept
    with contextlib.suppress(OSError):
        size = sum(p.stat().st_size for p in folder.iterdir()) / 2 ** 20
        print(f"decoded images kept as prepared arrays in {folder} ({size:,.0f} MiB; the next run maps them; "
              f"delete the folder to free the space)")
    return data


def source_spec(spec: str | None) -> str | None:
    """The spec a prepared folder was made from (`prepared:DIR` -> its prepared.json name), so a run on it picks
    the preset the source would; any other spec, or a folder that cannot be read (load_data reports it), as given."""
    kind, _, path = (spec or "").partition(":")
    if kind != "prepared" or not path:
        return spec
    try:
        return read_meta(Path(path).expanduser())["name"]
    except HybvitError:
        return spec
