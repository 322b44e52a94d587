"""Image folders, `folder:PATH`: PATH/train/<class>/* and PATH/test/<class>/*, any image format PIL reads.

`list_folder` checks the layout and reads one image's header (mode, size); nothing is decoded yet. Then:

  Folder.write(DIR)    decodes every image straight into the memory-mapped arrays of a prepared folder, one image
                       at a time: `hybvit prepare folder:PATH` and the automatic cache hold one image and the pages
                       being written, never the dataset, so a set larger than memory can be prepared
  Folder.to_data()     decodes into memory (only when the cache cannot be written)
  load_folder          what `--data folder:PATH` loads: the cached prepared arrays, mapped (prepared.cached)

Both decode each image the same way (convert to L or RGB, bicubic resize when an image size is asked), so the
arrays are equal bitwise whichever path made them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from .config import MAX_SIDE, RULES
from .data import ImageData
from .errors import HybvitError
from .prepared import cached, listing_digest, write_streamed

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
UNREADABLE = (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError)


@dataclass
class Folder:
    """A checked image folder: its classes, its (file, label) pairs per split, and how images are decoded."""
    root: Path
    classes: list[str]
    files: dict[str, list[tuple[Path, int]]]      # "train" / "test" -> [(path, label)]
    size: int                                     # the side of every decoded image
    mode: str                                     # "L" (one channel) or "RGB"
    resize: bool                                  # an image size was asked: other sizes are resized, not refused

    @property
    def name(self) -> str:
        return f"folder:{self.root}"

    @property
    def shape(self) -> tuple[int, int, int]:
        return (1 if self.mode == "L" else 3, self.size, self.size)

    def decode(self, split: str, out: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return load_image_files(self.files[split], self.size, self.mode, self.resize, self.files["train"][0][0], out)

    def to_data(self) -> ImageData:
        (x_tr, y_tr), (x_te, y_te) = self.decode("train"), self.decode("test")
        return ImageData(x_tr, y_tr, x_te, y_te, len(self.classes), self.name, self.classes)

    def write(self, out: Path) -> dict:
        """The prepared folder `out`, decoded image by image into its mapped arrays; returns its prepared.json."""
        return write_streamed(out, self.name, self.classes, len(self.classes), self.shape,
                              {s: len(self.files[s]) for s in ("train", "test")},
                              lambda split, x: self.decode(split, x)[1].numpy())

    def key(self) -> str:
        """A digest of the listing (paths, sizes, times) and the decoding options: a new one for any change."""
        listing = [f for split in ("train", "test") for f, _ in self.files[split]]
        return listing_digest(listing, len(self.files["train"]), self.classes, self.size, self.mode, self.resize)


def list_folder(root: Path, image_size: int = 0) -> Folder:
    """Check the layout of `root` and list its images (one line per problem); decodes nothing. The folder is named
    by its absolute path, so a relative and an absolute spec of it share one cache."""
    root = Path(root).absolute()
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise HybvitError(f"folder data '{root}' has no '{split}/' folder; expected "
                              f"{root}/train/<class>/* and {root}/test/<class>/*")
    classes = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    if not classes:
        raise HybvitError(f"'{root}/train' has no class folders; put images in {root}/train/<class>/")
    if len(classes) > RULES["model.num_classes"][2]:
        raise HybvitError(f"'{root}/train' has {len(classes):,} class folders, more than hybvit takes "
                          f"({RULES['model.num_classes'][2]:,}); merge classes")
    index = {c: i for i, c in enumerate(classes)}
    extra = sorted(p.name for p in (root / "test").iterdir() if p.is_dir() and p.name not in index)
    if extra:
        raise HybvitError(f"'{root}/test' has classes not in train: {', '.join(extra[:5])}; "
                          f"use the same class folders in both")
    files = {split: [(f, index[c]) for c in classes if (root / split / c).is_dir()
                     for f in sorted((root / split / c).iterdir()) if f.suffix.lower() in IMAGE_EXTENSIONS]
             for split in ("train", "test")}
    for split in ("train", "test"):
        if not files[split]:
            raise HybvitError(f"no images found under '{root}/{split}/<class>/'")
    first = files["train"][0][0]
    try:
        with Image.open(first) as im:
            mode = "L" if im.mode in ("L", "1", "I;16", "I") else "RGB"
            size = image_size or im.size[0]
    except UNREADABLE as e:
        raise HybvitError(f"cannot read image '{first}' ({type(e).__name__}); remove or replace the file") from None
    if size > MAX_SIDE:
        raise HybvitError(f"'{first}' is {size} pixels wide; hybvit reads images up to {MAX_SIDE}: resize them with "
                          f"--set data.image_size=N")
    return Folder(root, classes, files, size, mode, bool(image_size))


def load_folder(root: Path, image_size: int = 0) -> ImageData:
    """`folder:PATH`: decoded once into the prepared cache (one per folder, size and mode), mapped afterwards."""
    folder = list_folder(root, image_size)
    source = hashlib.sha256(f"{folder.root}\0{folder.size}\0{folder.mode}".encode()).hexdigest()[:12]
    return cached(f"folder-{source}", folder.key()[:32], folder.name, folder.write, folder.to_data)


def load_image_files(items: list[tuple[Path, int]], size: int, mode: str = "RGB", resize: bool = True,
                     reference: Path | None = None, out: np.ndarray | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode (path, label) pairs into uint8 (N, C, H, W) and int64 labels, into `out` when given (a writable
    array of that shape: a memory map, say). Images of another size are resized (bicubic) when resize is True,
    else refused; a file PIL cannot read is named in the error."""
    arr = np.empty((len(items), 1 if mode == "L" else 3, size, size), dtype=np.uint8) if out is None else out
    bar = tqdm(total=len(items), desc="reading images", unit="img", mininterval=1.0, leave=False,
               disable=None) if len(items) > 5000 else None
    try:
        for n, (f, _) in enumerate(items):
            try:
                with Image.open(f) as im:
                    if im.size[0] * im.size[1] > MAX_SIDE ** 2:      # the header's claim, before decoding
                        raise HybvitError(f"image '{f}' claims {im.size[0]}x{im.size[1]} pixels, more than "
                                          f"hybvit reads ({MAX_SIDE}x{MAX_SIDE}); remove or shrink the file")
                    im = im.convert(mode)
                    if im.size != (size, size):
                        if not resize:
                            raise HybvitError(
                                f"image '{f}' is {im.size[0]}x{im.size[1]} but '{reference}' is {size}x{size}; "
                                f"resize them all with --set data.image_size=N")
                        im = im.resize((size, size), Image.BICUBIC)
                    arr[n] = np.asarray(im).reshape(size, size, -1).transpose(2, 0, 1)
            except UNREADABLE as e:
                raise HybvitError(f"cannot read image '{f}' ({type(e).__name__}); remove or replace the file") from None
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    labels = torch.tensor([c for _, c in items], dtype=torch.long)
    return torch.from_numpy(arr), labels
