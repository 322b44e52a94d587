"""Provenance: what produced a result. metrics.json, report.json and the HTML report record it, because the same
seed gives different numbers on different machines and software versions.

  provenance(device, processes, amp) -> {"hybvit": "0.1.0", "git_commit": "a5d548b...", "git_dirty": False,
      "python": "3.11.9", "torch": "2.14.1", "torchvision": ..., "torch_fidelity": ..., "device": "cpu",
      "device_name": "AMD EPYC, 2 cores", "processes": 1, "precision": "bf16", "command": "hybvit train ..."}
"""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .precision import cpu_model

_command: list[str] | None = None


def record_command(argv: list[str]) -> None:
    """The command line as the user typed it (`hybvit` and its arguments); cli.main calls this once."""
    global _command
    _command = ["hybvit", *argv]


def command_line() -> str:
    return shlex.join(_command if _command is not None else [Path(sys.argv[0]).name, *sys.argv[1:]])


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def git_state() -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout hybvit runs from (an editable install), or (None, None) outside one."""
    src = Path(__file__).resolve().parent
    root = src.parent.parent                      # <checkout>/src/hybvit: only hybvit's own checkout counts, not
    if not (root / ".git").exists() or not (root / "pyproject.toml").exists():   # a repo around a site-packages
        return None, None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty if commit else None


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU model and its cores."""
    device = torch.device(device if str(device) != "auto" else "cpu")
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"{cpu_model()}, {os.cpu_count()} cores"


def provenance(device: torch.device | str, processes: int = 1, amp: str | None = None) -> dict[str, Any]:
    commit, dirty = git_state()
    return {"hybvit": _version("hybvit"), "git_commit": commit, "git_dirty": dirty,
            "python": platform.python_version(), "torch": torch.__version__, "torchvision": _version("torchvision"),
            "torch_fidelity": _version("torch-fidelity"), "device": str(device), "device_name": device_name(device),
            "processes": processes, "precision": amp, "command": command_line()}


__all__ = ["provenance", "record_command", "command_line", "device_name", "git_state"]
