"""Data specs (``--data``) and the readers of every supported on-disk format.

  digits                scikit-learn's bundled 8x8 digits, a fixed stratified 80/20 split (the default)
  npz:PATH              arrays x_train, y_train, x_test, y_test (Keras convention); uint8 (N,H,W) or (N,H,W,C)
  folder:PATH           PATH/train/<class>/* and PATH/test/<class>/*, any image format PIL reads
  prepared:DIR          a folder of `hybvit prepare`, mapped read-only (prepared.py)
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
unpickler that only admits numpy arrays and plain containers: a dataset file cannot run code either. Every
problem raises HybvitError with a one-line message.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .folders import list_folder, load_folder, load_image_files
from .prepared import load_prepared, write_prepared
from .untrusted import read_npz
from .config import MAX_SIDE, RULES
from .data import ImageData
from .errors import HybvitError

MAX_CLASSES = RULES["model.num_classes"][2]
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"


def load_data(spec: str, image_size: int = 0) -> ImageData:
    """Parse a data spec and load it; every problem raises HybvitError with a one-line message."""
    kind, _, arg = spec.partition(":")
    if kind == "digits" and not arg:
        data = load_digits()
    elif kind == "npz":
        data = load_npz(_existing(arg, spec))
    elif kind == "folder":
        data = load_folder(_existing(arg, spec), image_size)
    elif kind == "prepared":
        data = load_prepared(arg, spec)                      # mapped; another size is resized in memory below
    elif kind in READERS:
        x_tr, y_tr, x_te, y_te, classes = READERS[kind](Path(arg or default_root()).expanduser())
        data = ImageData(x_tr, y_tr, x_te, y_te, classes, kind)
    else:
        raise HybvitError(f"unknown data spec '{spec}'; use digits, npz:PATH, folder:PATH, prepared:DIR or one of "
                          f"{', '.join(f'{k}[:ROOT]' for k in READERS)}")
    if image_size and data.image_size != image_size:
        data.x_train = resize(data.x_train, image_size)
        data.x_test = resize(data.x_test, image_size)
        data.mapped = False                                  # new arrays in this process's memory
    _check_labels(data)
    return data


def prepare(spec: str, out: Path, image_size: int = 0) -> dict:
    """`hybvit prepare`: the data of `spec` as the prepared folder `out`; returns its prepared.json. An image folder
    is decoded straight into it, image by image (folders.Folder.write); other sources are loaded, then written."""
    kind, _, arg = spec.partition(":")
    if kind == "folder":
        return list_folder(_existing(arg, spec), image_size).write(out)
    return write_prepared(load_data(spec, image_size), out)


def default_root() -> str:
    return os.environ.get("HYBVIT_DATA", os.path.join(os.path.expanduser("~"), ".cache", "hybvit", "data"))


def _existing(path: str, spec: str) -> Path:
    if not path:
        raise HybvitError(f"data spec '{spec}' needs a path, e.g. {spec.rstrip(':')}:/path/to/data")
    p = Path(path).expanduser()
    if not p.exists():
        raise HybvitError(f"data path '{p}' does not exist; check the path in the data spec '{spec}'")
    return p


def _check_labels(data: ImageData) -> None:
    for split, y in (("train", data.y_train), ("test", data.y_test)):
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= data.num_classes):
            raise HybvitError(
                f"{data.name}: {split} labels must lie in [0, {data.num_classes - 1}] but range over "
                f"[{int(y.min())}, {int(y.max())}]; relabel the classes as 0..K-1")
    if len(data.x_train) == 0:
        raise HybvitError(f"{data.name}: the training set is empty")
    if len(data.x_test) == 0:
        raise HybvitError(f"{data.name}: the test set is empty; hybvit measures test accuracy and sample quality "
                          f"on it, so add test images (for folders: PATH/test/<class>/*)")


def load_digits() -> ImageData:
    """scikit-learn's 1797 8x8 digits (values 0..16, rescaled to 0..255); stratified 80/20 split, seed 0."""
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # (1797, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.2, stratify=d.target, random_state=0)
    return ImageData(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(), torch.from_numpy(x_te),
                     torch.from_numpy(y_te).long(), 10, "digits", [str(i) for i in range(10)])


def load_npz(path: Path) -> ImageData:
    arrays = read_npz(path, "save it with numpy.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise HybvitError(f"npz file '{path}' lacks the arrays {', '.join(missing)} (it has "
                          f"{', '.join(sorted(arrays)) or 'none'}); it needs x_train, y_train, x_test, y_test")
    xs, ys = [], []
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[1] != x.shape[2] or x.shape[3] not in (1, 3, 4):
            raise HybvitError(f"npz x_{split} has shape {arrays[f'x_{split}'].shape}; expected uint8 (N,H,W) "
                              f"or (N,H,W,C) with square images and C in 1, 3, 4")
        if x.dtype != np.uint8:
            raise HybvitError(f"npz x_{split} has dtype {x.dtype}; expected uint8 in [0, 255] "
                              f"(convert with (x * 255).round().astype(np.uint8) for [0, 1] floats)")
        y = np.asarray(y).reshape(-1)
        if y.shape[0] != x.shape[0]:
            raise HybvitError(f"npz y_{split} has {y.shape[0]} labels for {x.shape[0]} images; they must match")
        if not np.issubdtype(y.dtype, np.integer):
            raise HybvitError(f"npz y_{split} has dtype {y.dtype}; labels must be integers 0..K-1")
        xs.append(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        ys.append(torch.from_numpy(y.astype(np.int64)))
    if xs[0].shape[1:] != xs[1].shape[1:]:
        raise HybvitError(f"npz x_train images are {tuple(xs[0].shape[1:])} but x_test are "
                          f"{tuple(xs[1].shape[1:])} (C,H,W); they must match")
    num_classes = int(ys[0].max()) + 1 if len(ys[0]) else 0
    if num_classes > MAX_CLASSES:
        raise HybvitError(f"npz y_train labels go up to {num_classes - 1}: more than {MAX_CLASSES:,} classes; "
                          f"relabel the classes as 0..K-1")
    return ImageData(xs[0], ys[0], xs[1], ys[1], num_classes, f"npz:{path}")


def resize(x: torch.Tensor, size: int, chunk: int = 1024) -> torch.Tensor:
    """uint8 images (N, C, H, W) at size x size (bicubic, antialiased), `chunk` images at a time: the float copy
    never holds more than a chunk (a mapped prepared set is read piece by piece)."""
    out = torch.empty((len(x), x.shape[1], size, size), dtype=torch.uint8)
    for i in range(0, len(x), chunk):
        y = F.interpolate(x[i:i + chunk].float(), size=(size, size), mode="bicubic", antialias=True,
                          align_corners=False)
        out[i:i + chunk] = y.round().clamp(0, 255).to(torch.uint8)
    return out



# ----------------------------------------------------------------------------- the standard datasets

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


def celeba_files(root: Path) -> tuple[list[Path], list[Path]]:
    """(train, test) image files of CelebA under root: list_eval_partition.txt's split when present, else the last
    1 % by name is the test set."""
    base = next((p for p in (root / "celeba" / "img_align_celeba", root / "img_align_celeba") if p.is_dir()), root)
    files = sorted(f for f in base.rglob("*") if f.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"))
    if not files:
        raise HybvitError(f"no face images found under '{root}'; download img_align_celeba.zip (CelebA, aligned) "
                          f"and unzip it into {root}/celeba/, or point celeba128:PATH at a folder of images")
    partition = base.parent / "list_eval_partition.txt"
    if partition.exists():
        split = dict(line.split()[:2] for line in partition.read_text().splitlines() if line.strip())
        return ([f for f in files if split.get(f.name) in ("0", "1")], [f for f in files if split.get(f.name) == "2"])
    n_test = max(1, len(files) // 100)
    return files[:-n_test], files[-n_test:]


def load_celeba_test_stretched(root: Path, size: int) -> torch.Tensor:
    """CelebA's test images as the paper code's OOD set read them: each whole image resized to size x size
    (the aspect ratio not kept), uint8 (N, 3, size, size)."""
    _, test = celeba_files(root)
    x, _ = load_image_files([(f, 0) for f in test], size)
    return x


def load_celeba128(root: Path, size: int = 128):
    """Face images, centre-cropped to a square and resized to 128; unlabeled (one class), for generation.
    ROOT/celeba/img_align_celeba/*.jpg (the aligned CelebA release, split by list_eval_partition.txt when present)
    or any folder of images under ROOT. The last 1 % (sorted by name) is the test set when no partition file."""
    train, test = celeba_files(root)
    if not train or not test:
        raise HybvitError(f"'{root}' has too few images for a train and a test split ({len(train) + len(test)} "
                          f"found)")

    def read(paths):
        arr = np.empty((len(paths), 3, size, size), dtype=np.uint8)
        for n, f in enumerate(paths):
            try:
                with Image.open(f) as im:
                    if im.size[0] * im.size[1] > MAX_SIDE ** 2:      # the header's claim, before decoding
                        raise HybvitError(f"image '{f}' claims {im.size[0]}x{im.size[1]} pixels, more than "
                                          f"hybvit reads ({MAX_SIDE}x{MAX_SIDE}); remove or shrink the file")
                    im = im.convert("RGB")
                    w, h = im.size
                    s = min(w, h)
                    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                    arr[n] = np.asarray(im.resize((size, size), Image.BICUBIC)).transpose(2, 0, 1)
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
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
