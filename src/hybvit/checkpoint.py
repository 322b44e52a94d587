"""Run folders and checkpoints: atomic writes, JSON, and the training state and weights (read through
untrusted.py, which never unpickles arbitrary objects and never allocates what a file merely claims).

A run directory holds
  config.json                    the resolved configuration
  checkpoints/last.pt            full training state (model, EMA, optimiser, step, RNG), read with
                                 torch.load(weights_only=True): tensors and plain containers only
  checkpoints/ema.safetensors    the EMA weights alone, config in the safetensors metadata; what
                                 `hybvit sample` and `hybvit evaluate` use, and what to share
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from .errors import CannotWrite, HybvitError
from .untrusted import load_torch_file


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write through a temporary file in the same folder, then rename over `path` (atomic on POSIX)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise HybvitError(f"cannot write '{path}' ({e.strerror or type(e).__name__}); choose another --out") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())             # mkstemp makes 0600; the file gets the user's usual mode
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):                   # a full disk, a read-only folder: the old file stays as it was
            raise HybvitError(f"cannot write '{path}' ({e.strerror or type(e).__name__}); the previous version, "
                              f"if any, is unchanged: free space or choose another --out") from None
        raise


def write_folder(out: Path, write: Callable[[Path], None]) -> None:
    """Create the folder `out` (absent or empty) all or nothing: write(tmp) fills a temporary sibling folder, which
    is then renamed to `out`; on any failure nothing is left behind."""
    out = Path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise CannotWrite(f"cannot write '{out}' ({e.strerror or type(e).__name__}); choose another --out") from None
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise CannotWrite(f"cannot write '{out}' ({e.strerror or type(e).__name__}); choose another --out") from None
        raise


def check_can_create(path: Path, what: str = "--out") -> None:
    """Refuse, with one line, a path under which nothing can be created (a read-only or virtual file system such
    as /proc), by creating and removing a temporary folder in its nearest existing ancestor; creates nothing."""
    base = Path(path).absolute()
    while not base.exists() and base != base.parent:
        base = base.parent
    try:
        if not base.is_dir():
            raise NotADirectoryError(20, "not a folder")
        os.rmdir(tempfile.mkdtemp(prefix=".hybvit-probe-", dir=base))
    except OSError as e:
        raise CannotWrite(f"cannot create '{path}' ({e.strerror or type(e).__name__} in '{base}'); choose another "
                          f"{what}") from None


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def remove_stale_temporaries(run_dir: Path) -> None:
    """Delete the temporary files (.NAME.*.tmp) that a write killed half-way leaves in a run directory."""
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if folder.is_dir():
            for tmp in folder.glob(".*.tmp"):
                tmp.unlink(missing_ok=True)


def write_json(path: Path, obj: Any) -> None:
    def w(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
    atomic_write(path, w)


def read_json(path: Path, what: str) -> dict[str, Any]:
    """A JSON object from a file hybvit wrote (config.json, metrics.json); anything else is a one-line error."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise HybvitError(f"cannot read {what} '{path}' ({type(e).__name__}); the file is damaged: restore it "
                          f"or start a new run") from None
    if not isinstance(obj, dict):
        raise HybvitError(f"{what} '{path}' is not a JSON object; the file is damaged: restore it or start a new run")
    return obj


def plain_state_dict(obj: torch.nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of the bare model, as single-process tools load it: a module is unwrapped from
    DistributedDataParallel (`.module`) and torch.compile (`._orig_mod`) first; a state dict whose keys all carry
    the `module.` or `_orig_mod.` prefix of such a wrapper loses it."""
    if isinstance(obj, torch.nn.Module):
        while isinstance(obj, torch.nn.parallel.DistributedDataParallel) or hasattr(obj, "_orig_mod"):
            obj = obj.module if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj._orig_mod
        obj = obj.state_dict()
    out = dict(obj)
    for prefix in ("module.", "_orig_mod.", "module."):
        if out and all(k.startswith(prefix) for k in out):
            out = {k[len(prefix):]: v for k, v in out.items()}
    return out


def save_training_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_training_state(path: Path) -> dict[str, Any]:
    if not Path(path).exists():
        raise HybvitError(f"checkpoint '{path}' does not exist; give a run directory that has checkpoints/last.pt")
    state = load_torch_file(path, "it is corrupt or not a hybvit checkpoint")
    shapes = {"model": dict, "ema": dict, "optimizer": dict, "rng": dict, "config": dict, "step": int}
    wrong = [k for k, kind in shapes.items() if not isinstance(state, dict) or not isinstance(state.get(k), kind)]
    if wrong:
        raise HybvitError(f"'{path}' is not a hybvit training checkpoint (missing or malformed: {', '.join(wrong)}); "
                          f"give the checkpoints/last.pt of a hybvit run")
    for part in ("model", "ema"):
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state[part].items()):
            raise HybvitError(f"'{path}': its '{part}' is not a state dict of tensors; the file is damaged")
    return state


def save_weights(path: Path, state_dict: dict[str, torch.Tensor], config: dict[str, Any]) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"config": json.dumps(config)}))


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a .safetensors file (weights + config metadata) or the EMA weights of a last.pt."""
    path = Path(path)
    if not path.exists():
        raise HybvitError(f"checkpoint '{path}' does not exist; check the path")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
            weights = load_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise HybvitError(f"cannot read '{path}' as safetensors ({type(e).__name__}); the file is corrupt")
        if "config" not in meta:
            raise HybvitError(f"'{path}' has no hybvit config in its metadata; it was not written by hybvit")
        try:
            config = json.loads(meta["config"])
        except ValueError:
            config = None
        if not isinstance(config, dict):
            raise HybvitError(f"'{path}': the config in its metadata is not a JSON object; the file is damaged")
        return plain_state_dict(weights), config
    state = load_training_state(path)
    if "ema" not in state or "config" not in state:
        raise HybvitError(f"'{path}' is not a hybvit training checkpoint (no 'ema' or 'config')")
    return plain_state_dict(state["ema"]), state["config"]
