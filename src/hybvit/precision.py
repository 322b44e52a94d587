"""Where a run computes and in what precision: the device choice and the bf16 autocast policy.

  resolve_device("auto")          CUDA when available, else the CPU
  use_bf16("auto", device)        bf16 on CUDA; on a CPU only where bf16 matmuls measure clearly faster than fp32
  with autocast(amp, device): ... the forward passes of training, sampling and evaluation
"""
from __future__ import annotations

import contextlib
import functools
import time

import torch

from .errors import HybvitError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise HybvitError(f"device '{name}' requested but CUDA is not available; use --set train.device=cpu")
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


def use_bf16(cfg_amp: str, device: torch.device) -> bool:
    """amp "auto": bf16 on CUDA, and on a CPU where its measured bf16 matmul rate beats fp32's (bf16_pays); fp32
    otherwise. Under torchrun, train() takes rank 0's answer for every rank."""
    if cfg_amp == "auto":
        if device.type == "cuda":
            return True
        return device.type == "cpu" and bf16_pays(cpu_matmul_gflops(torch.bfloat16), cpu_matmul_gflops(torch.float32))
    return cfg_amp == "bf16"


def autocast(cfg_amp: str, device: torch.device):
    """bf16 autocast where use_bf16 says so, else nothing (fp32)."""
    if use_bf16(cfg_amp, device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
