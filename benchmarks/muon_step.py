"""Time one Muon optimizer step on a preset's transformer-block matrices: torch.optim.Muon against train.BatchedMuon.

    python benchmarks/muon_step.py                                # digits-hybvit-plus, CPU
    python benchmarks/muon_step.py --preset cifar10-hybvit-plus --device cuda

torch.optim.Muon orthogonalises each matrix's update on its own, in bf16. BatchedMuon runs the same Newton-Schulz
iteration once per matrix shape on a stack of those matrices, in bf16 or fp32 (the trainer picks the run's training
precision). Prints milliseconds per step (momentum, orthogonalisation and update of every Muon matrix, random
gradients) and the largest weight difference from torch's step after a few steps. A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import time

import torch

from hybvit.config import preset_config
from hybvit.model import ViT
from hybvit.optim import BatchedMuon, _muon_param


def time_steps(make, params, grads, device, steps: int, warmup: int = 3) -> float:
    opt = make(params)
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="digits-hybvit-plus")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=30)
    args = ap.parse_args()
    if not hasattr(torch.optim, "Muon"):
        raise SystemExit(f"torch.optim.Muon needs torch >= 2.9 (this is {torch.__version__})")
    device = torch.device(args.device)
    cfg = preset_config(args.preset)
    torch.manual_seed(0)
    model = ViT(cfg.model).to(device)
    start = [p.detach().clone() for n, p in model.named_parameters() if _muon_param(n, p)]
    grads = [torch.randn_like(p) for p in start]
    shapes = sorted({tuple(p.shape) for p in start})
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, preset {args.preset}: "
          f"{len(start)} matrices of shapes {shapes}")
    kw = dict(lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, adjust_lr_fn="match_rms_adamw")
    rows = [("torch.optim.Muon (bf16, one matrix at a time)", lambda ps: torch.optim.Muon(ps, **kw)),
            ("BatchedMuon, bf16", lambda ps: BatchedMuon(ps, ns_dtype=torch.bfloat16, **kw)),
            ("BatchedMuon, fp32", lambda ps: BatchedMuon(ps, ns_dtype=torch.float32, **kw))]
    base = None
    for name, make in rows:
        params = [torch.nn.Parameter(p.clone()) for p in start]
        sec = time_steps(make, params, grads, device, args.steps)
        if base is None:
            base, ref = sec, [p.detach().clone() for p in params]
            diff = ""
        else:
            diff = f"  max |w - torch's w| {max((p - r).abs().max().item() for p, r in zip(params, ref)):.2e}"
        print(f"{name:48s} {sec * 1e3:7.2f} ms/step  {base / sec:5.2f}x{diff}")


if __name__ == "__main__":
    main()
