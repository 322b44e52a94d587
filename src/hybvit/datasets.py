"""Readers for the paper's standard datasets in their published on-disk formats, with download where one exists.

  cifar10[:ROOT]        ROOT/cifar-10-batches-py/{data_batch_1..5, test_batch}   (python pickle batches)
  cifar100[:ROOT]       ROOT/cifar-100-python/{train, test}                       (python pickle, fine labels)
  svhn[:ROOT]           ROOT/{train,test}_32x32.mat                              (MATLAB; label 10 means digit 0)
  stl10[:ROOT]          ROOT/stl10_binary/{train,test}_{X,y}.bin                  (raw uint8, column-major images)
  tiny-imagenet[:ROOT]  ROOT/tiny-imagenet-200/{wnids.txt, train/<wnid>/images/*, val/images/*,
                        val/val_annotations.txt}                                  (the val split is the test set)
  imagenet32[:ROOT]     ROOT/imagenet32/{train_data_batch_1..10.npz, val_data.npz} (Chrabaszcz et al.; labels 1..1000)
  celeba128[:ROOT]      ROOT/celeba/img_align_celeba/*.jpg or any folder of face images; 128x128, unlabeled

ROOT defaults to $HYBVIT_DATA or ~/.cache/hybvit/data. When the files are missing, CIFAR, SVHN and STL-10 are
downloaded through torchvision and Tiny-ImageNet from its public archive, unless HYBVIT_NO_DOWNLOAD=1; ImageNet 32
needs a (free) image-net.org login, so the error says where to put the files. The pickle batches are read with an
unpickler that only admits numpy arrays and plain containers: a dataset file cannot run code either.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch

from .errors import HybvitError

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def no_download() -> bool:
    return os.environ.get("HYBVIT_NO_DOWNLOAD", "") not in ("", "0")


def _download(name: str, root: Path, fetch, where: str) -> None:
    """Run fetch() to download `name` into root, turning every failure into a one-line error."""
    if no_download():
        raise HybvitError(f"{name} not found in '{root}' and downloads are off (HYBVIT_NO_DOWNLOAD); put {where} there")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fetch()
    except Exception as e:  # noqa: BLE001 - network errors come in many types
        raise HybvitError(f"{name} not found in '{root}' and the download failed ({type(e).__name__}); when online "
                          f"run again, or put {where} there") from None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists, bytes and numbers; refuses every other global (no code runs)."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a dataset file")
        return super().find_class(module, name)


def read_pickle_batch(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            d = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
    except Exception as e:  # noqa: BLE001
        raise HybvitError(f"cannot read '{path}' as a CIFAR python batch ({type(e).__name__}: {e}); "
                          f"re-download the dataset")
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}


def _cifar_arrays(batches: list[Path], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for p in batches:
        d = read_pickle_batch(p)
        if "data" not in d or label_key not in d:
            raise HybvitError(f"'{p}' lacks 'data' or '{label_key}'; it is not a CIFAR batch file")
        xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[label_key], dtype=np.int64))
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def load_cifar(root: Path, classes: int):
    """CIFAR-10 or CIFAR-100 from the python-pickle batches; downloads through torchvision when missing."""
    import torchvision
    folder, name = ("cifar-10-batches-py", "CIFAR-10") if classes == 10 else ("cifar-100-python", "CIFAR-100")
    train = [root / folder / f"data_batch_{i}" for i in range(1, 6)] if classes == 10 else [root / folder / "train"]
    test = [root / folder / ("test_batch" if classes == 10 else "test")]
    if not all(p.exists() for p in train + test):
        cls = torchvision.datasets.CIFAR10 if classes == 10 else torchvision.datasets.CIFAR100
        _download(name, root, lambda: cls(str(root), train=True, download=True),
                  f"{folder}/ (from the python version of the {name} archive)")
    key = "labels" if classes == 10 else "fine_labels"
    x_tr, y_tr = _cifar_arrays(train, key)
    x_te, y_te = _cifar_arrays(test, key)
    return x_tr, y_tr, x_te, y_te, classes


def load_svhn(root: Path):
    import scipy.io
    import torchvision
    files = {s: root / f"{s}_32x32.mat" for s in ("train", "test")}
    for split, p in files.items():
        if not p.exists():
            _download("SVHN", root, lambda s=split: torchvision.datasets.SVHN(str(root), split=s, download=True),
                      "train_32x32.mat and test_32x32.mat")
    out = []
    for split, p in files.items():
        try:
            m = scipy.io.loadmat(str(p))
            x, y = m["X"], m["y"].reshape(-1).astype(np.int64)
        except Exception as e:  # noqa: BLE001
            raise HybvitError(f"cannot read '{p}' as an SVHN .mat file ({type(e).__name__}); re-download it")
        y[y == 10] = 0  # SVHN stores the digit 0 as label 10
        out += [torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))), torch.from_numpy(y)]
    return (*out, 10)


def load_stl10(root: Path):
    import torchvision
    folder = root / "stl10_binary"
    names = [folder / f"{s}_{k}.bin" for s in ("train", "test") for k in ("X", "y")]
    if not all(p.exists() for p in names):
        _download("STL-10", root, lambda: torchvision.datasets.STL10(str(root), split="train", download=True),
                  "stl10_binary/ (from stl10_binary.tar.gz)")
    out = []
    for split in ("train", "test"):
        x = np.fromfile(folder / f"{split}_X.bin", dtype=np.uint8)
        y = np.fromfile(folder / f"{split}_y.bin", dtype=np.uint8).astype(np.int64) - 1  # stored as 1..10
        if x.size != len(y) * 3 * 96 * 96:
            raise HybvitError(f"'{folder}/{split}_X.bin' holds {x.size} bytes for {len(y)} labels; expected "
                              f"{len(y)} x 3 x 96 x 96: the files are truncated or mismatched")
        x = x.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)  # images are stored column-major
        out += [torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y)]
    return (*out, 10)


def load_tiny_imagenet(root: Path):
    from torchvision.datasets.utils import download_and_extract_archive
    from .data import load_image_files
    base = root / "tiny-imagenet-200"
    if not (base / "wnids.txt").exists():
        _download("Tiny-ImageNet", root, lambda: download_and_extract_archive(TINY_IMAGENET_URL, str(root)),
                  f"tiny-imagenet-200/ (unzip tiny-imagenet-200.zip from {TINY_IMAGENET_URL})")
    wnids = [w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    train = [(f, index[w]) for w in wnids for f in sorted((base / "train" / w / "images").glob("*"))
             if f.suffix.lower() in (".jpeg", ".jpg", ".png")]
    ann = base / "val" / "val_annotations.txt"
    if not ann.exists():
        raise HybvitError(f"'{ann}' is missing; the Tiny-ImageNet val split needs its annotations file")
    val = []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise HybvitError(f"'{ann}' line {n} is not '<file>\\t<wnid>\\t...' with a wnid from wnids.txt")
        val.append((base / "val" / "images" / parts[0], index[parts[1]]))
    x_tr, y_tr = load_image_files(train, size=64, mode="RGB")
    x_te, y_te = load_image_files(val, size=64, mode="RGB")
    return x_tr, y_tr, x_te, y_te, len(wnids)


def load_imagenet32(root: Path):
    base = root / "imagenet32"
    train = sorted(base.glob("train_data_batch_*.npz"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    val = base / "val_data.npz"
    if not train or not val.exists():
        raise HybvitError(f"ImageNet 32x32 not found in '{base}'; download Imagenet32_train_npz.zip and "
                          f"Imagenet32_val_npz.zip from image-net.org (downsampled images, free login) and unzip "
                          f"train_data_batch_1..10.npz and val_data.npz there")

    def read(paths):
        xs, ys = [], []
        for p in paths:
            try:
                with np.load(p, allow_pickle=False) as f:
                    xs.append(f["data"].reshape(-1, 3, 32, 32).astype(np.uint8, copy=False))
                    ys.append(f["labels"].astype(np.int64).reshape(-1) - 1)  # stored as 1..1000
            except (KeyError, ValueError, OSError) as e:
                raise HybvitError(f"cannot read '{p}' as an ImageNet32 batch ({type(e).__name__}); it needs arrays "
                                  f"'data' (N, 3072) and 'labels' (1..1000)")
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
    return (*read(train), *read([val]), 1000)


def load_celeba128(root: Path, size: int = 128, test_fraction: float = 0.01, max_images: int = 0):
    """Face images, centre-cropped to a square and resized to 128; unlabeled (one class), for generation.
    ROOT/celeba/img_align_celeba/*.jpg (the aligned CelebA release, split by list_eval_partition.txt when present)
    or any folder of images under ROOT. The last 1 % (sorted by name) is the test set when no partition file."""
    from PIL import Image, UnidentifiedImageError
    base = next((p for p in (root / "celeba" / "img_align_celeba", root / "img_align_celeba") if p.is_dir()), root)
    files = sorted(f for f in base.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not files:
        raise HybvitError(f"no face images found under '{root}'; download img_align_celeba.zip (CelebA, aligned) "
                          f"and unzip it into {root}/celeba/, or point celeba128:PATH at a folder of images")
    if max_images:
        files = files[:max_images]
    partition = base.parent / "list_eval_partition.txt"
    if partition.exists():
        split = dict(line.split()[:2] for line in partition.read_text().splitlines() if line.strip())
        test = [f for f in files if split.get(f.name) == "2"]
        train = [f for f in files if split.get(f.name) in ("0", "1")]
    else:
        n_test = max(1, int(len(files) * test_fraction))
        train, test = files[:-n_test], files[-n_test:]
    if not train or not test:
        raise HybvitError(f"'{root}' has too few images for a train and a test split ({len(files)} found)")

    def read(paths):
        arr = np.empty((len(paths), 3, size, size), dtype=np.uint8)
        for n, f in enumerate(paths):
            try:
                with Image.open(f) as im:
                    im = im.convert("RGB")
                    w, h = im.size
                    s = min(w, h)
                    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                    arr[n] = np.asarray(im.resize((size, size), Image.BICUBIC)).transpose(2, 0, 1)
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise HybvitError(f"cannot read image '{f}' ({type(e).__name__}); remove or replace the file")
        return torch.from_numpy(arr), torch.zeros(len(paths), dtype=torch.long)
    return (*read(train), *read(test), 1)


READERS = {
    "cifar10": lambda root: load_cifar(root, 10),
    "cifar100": lambda root: load_cifar(root, 100),
    "svhn": load_svhn,
    "stl10": load_stl10,
    "tiny-imagenet": load_tiny_imagenet,
    "imagenet32": load_imagenet32,
    "celeba128": load_celeba128,
}
