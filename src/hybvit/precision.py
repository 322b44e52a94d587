"""Where a run computes and in what precision: the device choice and the bf16 autocast policy.

  resolve_device("auto")          CUDA when available, then Apple's MPS, else the CPU
  use_bf16("auto", device)        bf16 on CUDA; on a CPU only where bf16 matmuls measure clearly faster than fp32
  with autocast(amp, device): ... the forward passes of training, sampling and evaluation
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import platform
import time
from pathlib import Path

import torch

from .config import check_device
from .errors import HybvitError


def resolve_device(name: str) -> torch.device:
    """auto: CUDA, then Apple's MPS, then the CPU; a named device must exist on this machine."""
    check_device(name, "the device")
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise HybvitError(f"device '{name}' requested but CUDA is not available; use --set train.device=cpu")
        if ":" in name and int(name.split(":")[1]) >= torch.cuda.device_count():
            raise HybvitError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} "
                              f"GPU(s); use cuda:0 .. cuda:{torch.cuda.device_count() - 1}")
    if name == "mps" and not mps:
        raise HybvitError("device 'mps' requested but Apple's MPS is not available; use --set train.device=cpu")
    return torch.device(name)


def bf16_pays(bf16_gflops: float, fp32_gflops: float, margin: float = 1.2) -> bool:
    """amp "auto" on a CPU: bf16 autocast only where this CPU multiplies bf16 matrices clearly faster than fp32.
    CPU flags do not tell: two 2-core AMD EPYC machines, both with AVX512-BF16, measured bf16 matmuls at 2.4-2.6x
    the fp32 rate on one (where the default digits run trained 1.4x faster in bf16, same accuracy and FD) and at
    0.5x on the other (where the digits-hybvit-plus step took 1.37x longer in bf16; docs/speed.md)."""
    return bf16_gflops > margin * fp32_gflops


@functools.lru_cache(maxsize=None)
def cpu_matmul_gflops(dtype: torch.dtype, n: int = 1024, reps: int = 3) -> float:
    """This CPU's rate for an n x n x n matmul in dtype, best of `reps` after one warm-up (about 0.1 s for both
    dtypes at n = 1024); measured once per process."""
    g = torch.Generator().manual_seed(0)              # a generator of its own: the global RNG stays untouched
    a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def cpu_prefers_bf16() -> bool:
    """bf16_pays for this CPU, measured once per machine and cached in $HYBVIT_CACHE/precision.json (keyed by the
    CPU model, thread count and torch version). The probe is bounded: a 256^3 bf16 product that takes over 8x the
    fp32 one (bf16 emulated, as on CPUs without native support) decides "no" before the 1024^3 measurement."""
    key = f"{cpu_model()} | {torch.get_num_threads()} threads | torch {torch.__version__}"
    path = Path(os.environ.get("HYBVIT_CACHE", Path.home() / ".cache" / "hybvit")) / "precision.json"
    try:
        cache = json.loads(path.read_text())
        if isinstance(cache.get(key), dict) and isinstance(cache[key].get("bf16"), bool):
            return cache[key]["bf16"]
    except (OSError, ValueError, AttributeError):
        cache = {}
    small = cpu_matmul_gflops(torch.bfloat16, n=256, reps=1), cpu_matmul_gflops(torch.float32, n=256, reps=1)
    if small[0] * 8 < small[1]:
        rates = small
    else:
        rates = cpu_matmul_gflops(torch.bfloat16), cpu_matmul_gflops(torch.float32)
    answer = bf16_pays(*rates)
    cache = cache if isinstance(cache, dict) else {}
    cache[key] = {"bf16": answer, "bf16_gflops": round(rates[0], 1), "fp32_gflops": round(rates[1], 1)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError:                                     # a read-only home: measure again next time
        pass
    return answer


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), for caches and reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def use_bf16(cfg_amp: str, device: torch.device) -> bool:
    """amp "auto": bf16 on CUDA, and on a CPU where bf16 matmuls measure clearly faster than fp32 (cpu_prefers_bf16,
    cached per machine); fp32 otherwise. A new run records the answer in its config (resolve.py), so --resume and
    sampling keep the precision the run was trained in. Under torchrun, train() takes rank 0's answer."""
    if cfg_amp == "auto":
        if device.type == "cuda":
            return True
        return device.type == "cpu" and cpu_prefers_bf16()
    return cfg_amp == "bf16"


def autocast(cfg_amp: str, device: torch.device):
    """bf16 autocast where use_bf16 says so, else nothing (fp32)."""
    if use_bf16(cfg_amp, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
