"""Where a run computes and in what precision: the device choice and the autocast policy.

  resolve_device("auto")          CUDA when available, then Apple's MPS, else the CPU
  resolve_amp("auto", device)     "bf16" on GPUs that run it natively (compute capability >= 8.0: A100, H100, RTX 30
                                  and later), "fp16" (autocast + a gradient scaler) on older GPUs (V100, T4), and on a
                                  CPU "bf16" only where bf16 matmuls measure clearly faster than fp32, else "fp32"
  with autocast(amp, device): ... the forward passes of training, sampling and evaluation
  enable_tf32(device)             fp32 matmuls and convolutions in TF32 on GPUs that have it (Ampere and later)
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
from .data import cache_dir
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
    path = cache_dir() / "precision.json"
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


def cuda_amp(capability: tuple[int, int]) -> str:
    """amp "auto" on a GPU of this compute capability: bf16 where the tensor cores run it natively (>= 8.0), else
    fp16 with a gradient scaler (Volta 7.0, Turing 7.5: bf16 there is emulated and slow; before Volta, no fp16
    tensor cores either, but fp16 still halves the memory traffic)."""
    return "bf16" if tuple(capability) >= (8, 0) else "fp16"


def resolve_amp(cfg_amp: str, device: torch.device) -> str:
    """The precision that runs: "bf16", "fp16" or "fp32". amp "auto": cuda_amp on a GPU, bf16 on a CPU where bf16
    matmuls measure clearly faster than fp32 (cpu_prefers_bf16, cached per machine), fp32 otherwise (MPS included).
    A new run records the answer in its config (resolve.py), so --resume and sampling keep the precision the run
    was trained in. Under torchrun, train() takes rank 0's answer."""
    if cfg_amp != "auto":
        return cfg_amp
    if device.type == "cuda":
        return cuda_amp(torch.cuda.get_device_capability(device))
    return "bf16" if device.type == "cpu" and cpu_prefers_bf16() else "fp32"


def use_bf16(cfg_amp: str, device: torch.device) -> bool:
    return resolve_amp(cfg_amp, device) == "bf16"


def autocast(cfg_amp: str, device: torch.device):
    """bf16 or fp16 autocast where resolve_amp says so, else nothing (fp32)."""
    amp = resolve_amp(cfg_amp, device)
    if amp == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def grad_scaler(amp: str, device: torch.device):
    """A gradient scaler for fp16 training (small gradients would underflow to 0 in fp16), None otherwise."""
    if amp != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def enable_tf32(device: torch.device) -> bool:
    """Let fp32 matmuls and convolutions use TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation; PyTorch
    leaves this off for matmuls) on GPUs that have them (compute capability >= 8.0). Returns whether it did."""
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 0):
        return False
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return True
