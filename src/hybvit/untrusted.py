"""Reading files that hybvit did not write (a user's npz, a checkpoint of the paper's code, a shared model) without
running code from them and without allocating what they merely claim: every size a header states is checked
against the bytes the file holds and against half of this machine's memory first."""
from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import HybvitError


def physical_memory() -> int | None:
    """This machine's RAM in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def held_bytes(info: zipfile.ZipInfo) -> int:
    """The most bytes a zip member can really hold, whatever size its header claims: the bytes stored for it, or
    for a compressed member at most 1032x those (deflate's limit)."""
    if info.compress_type == zipfile.ZIP_STORED:
        return info.compress_size
    return 1032 * info.compress_size


def load_torch_file(path: Path, fix: str) -> Any:
    """A file of torch.save (zip format) read with torch.load(weights_only=True): tensors and plain containers only,
    so loading never runs code from the file. Before torch reads a byte, every member's claimed size is checked
    against what the archive can hold and against half of this machine's memory (torch itself checks each tensor's
    storage against its member). Every failure is a one-line HybvitError ending with `fix`."""
    path = Path(path)
    if not path.is_file():
        raise HybvitError(f"'{path}' does not exist or is not a file; {fix}")
    limit = physical_memory()
    try:
        with zipfile.ZipFile(path) as z:
            members = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise HybvitError(f"cannot read '{path}' as a torch.save file ({type(e).__name__}: it is truncated, "
                          f"damaged or in torch's pre-1.6 format); {fix}") from None
    claimed = sum(info.file_size for info in members)
    stored = sum(info.compress_size for info in members)
    if (stored > path.stat().st_size or any(info.file_size > held_bytes(info) for info in members)
            or (limit and claimed > limit // 2)):
        raise HybvitError(f"'{path}' claims {claimed:,} bytes, more than the file holds or this machine can load; "
                          f"{fix}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        named = re.search(r"GLOBAL (\S+)", str(e))
        why = f"it names {named.group(1)}" if named else type(e).__name__
        raise HybvitError(f"'{path}' asks to run code when loaded ({why}); hybvit loads tensors only, never "
                          f"code: {fix}") from None
    except Exception as e:  # noqa: BLE001 - any other read failure is a damaged file
        raise HybvitError(f"cannot load '{path}' ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})"
                          f"; {fix}") from None


def read_npz(path: Path, fix: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file, read without unpickling and without trusting its headers: each member's .npy
    header (shape, dtype) is checked against the bytes the archive holds for it (at most 1032x its compressed size,
    deflate's limit) and against half of this machine's memory before numpy allocates the array. `fix` ends each
    error: how to write a good file."""
    limit = physical_memory()
    try:
        with zipfile.ZipFile(path) as z:
            for info in z.infolist():
                with z.open(info) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                if dtype.hasobject:
                    raise HybvitError(f"npz file '{path}' holds Python objects in '{info.filename}' (hybvit never "
                                      f"unpickles); {fix}")
                claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
                held = held_bytes(info)
                if claimed > held or (limit is not None and claimed > limit // 2):
                    raise HybvitError(f"npz file '{path}': '{info.filename}' claims {shape} {dtype} ({claimed:,} "
                                      f"bytes), more than the file holds or this machine can load; {fix}")
        with np.load(path, allow_pickle=False) as f:
            return {k: f[k] for k in f.files}
    except HybvitError:
        raise
    except Exception as e:  # noqa: BLE001 - any read failure is a bad file
        raise HybvitError(f"cannot read npz file '{path}' ({type(e).__name__}: {e}); {fix}") from None
