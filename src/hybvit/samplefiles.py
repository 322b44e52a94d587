"""Sample files in the field's formats, written by `hybvit sample` and read by `hybvit evaluate --samples`.

  FILE.npz   arr_0: uint8 images (N, H, W, C); arr_1: int64 labels (N,) when known. What the ADM evaluation suite
             (guided-diffusion's evaluator.py), improved-diffusion and DiT write and read. Files of older hybvit
             versions, which held the key `images`, still load.
  DIR/       numbered PNGs (000000.png, 000001.png, ...), what pytorch-fid, clean-fid and torch-fidelity read.

Images travel as uint8 (N, C, H, W) tensors inside hybvit, as a saved PNG holds them.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .checkpoint import atomic_write, current_umask
from .untrusted import read_npz
from .folders import IMAGE_EXTENSIONS, load_image_files
from .errors import HybvitError

NPZ_FIX = "write it with numpy.savez(path, arr_0=uint8 images (N,H,W,C)[, arr_1=labels])"


def is_folder(out: str | Path) -> bool:
    """`--out DIR/` (a trailing slash), or an existing folder not named like a file (.npz, .png), means a folder
    of PNGs."""
    return str(out).endswith(("/", os.sep)) or (Path(out).is_dir() and Path(out).suffix not in (".npz", ".png"))


def write_samples(out: str | Path, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    """uint8 images (N, C, H, W) to FILE.npz (arr_0, and arr_1 = labels when given) or to a folder of numbered PNGs,
    all or nothing: the npz is renamed into place, the PNGs are written to a hidden folder renamed at the end."""
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError("write_samples takes uint8 images (N, C, H, W)")
    nhwc = images.permute(0, 2, 3, 1).contiguous().numpy()
    if not is_folder(out):
        arrays = {"arr_0": nhwc}
        if labels is not None:
            arrays["arr_1"] = labels.long().numpy()

        def w(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        atomic_write(Path(out), w)
        return
    folder = Path(str(out).rstrip("/" + os.sep) or "/")
    if folder.exists() and any(folder.iterdir()):
        raise HybvitError(f"folder '{folder}' is not empty; give a new or empty folder for the PNGs")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        width = max(6, len(str(len(nhwc) - 1)))
        for i, img in enumerate(nhwc):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp / f"{i:0{width}d}.png")
        os.chmod(tmp, 0o777 & ~current_umask())
        if folder.exists():
            folder.rmdir()                                    # empty (checked above)
        os.replace(tmp, folder)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise HybvitError(f"cannot write PNGs to '{folder}' ({e.strerror or type(e).__name__}); free space or "
                              f"choose another --out") from None
        raise


def read_samples(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images (N, C, H, W) and labels (N,) or None from FILE.npz (arr_0 [+ arr_1], or an older hybvit file's
    `images`) or from a folder of images (PNG, JPEG, ...; sorted by name, all of one size)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise HybvitError(f"folder '{path}' holds no images (png, jpg, ...); give a folder of samples")
        with Image.open(files[0]) as im:
            mode, size = ("L" if im.mode in ("L", "1", "I;16", "I") else "RGB"), im.size[0]
        x, _ = load_image_files([(f, 0) for f in files], size, mode, resize=False, reference=files[0])
        return x, None
    if not path.is_file():
        raise HybvitError(f"samples '{path}' do not exist; give FILE.npz or a folder of PNGs")
    if path.suffix != ".npz":
        raise HybvitError(f"samples '{path}' must be FILE.npz or a folder of images")
    arrays = read_npz(path, NPZ_FIX)
    key = "arr_0" if "arr_0" in arrays else "images" if "images" in arrays else None
    if key is None:
        raise HybvitError(f"npz file '{path}' has no arr_0 (it has {', '.join(sorted(arrays)) or 'nothing'}); "
                          f"{NPZ_FIX}")
    x = arrays[key]
    if x.ndim == 3:
        x = x[..., None]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3) or len(x) == 0:
        raise HybvitError(f"npz file '{path}': {key} is {x.dtype} {x.shape}; expected uint8 (N,H,W,C) with N >= 1 "
                          f"and C 1 or 3; {NPZ_FIX}")
    labels = None
    if key == "arr_0" and "arr_1" in arrays:
        y = arrays["arr_1"].reshape(-1)
        if not np.issubdtype(y.dtype, np.integer) or len(y) != len(x) or (len(y) and y.min() < 0):
            raise HybvitError(f"npz file '{path}': arr_1 must hold one label >= 0 per image ({len(x)}); "
                              f"it is {y.dtype} {arrays['arr_1'].shape}")
        labels = torch.from_numpy(y.astype(np.int64))
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), labels


__all__ = ["is_folder", "write_samples", "read_samples"]
