"""Time one training step per mode at the paper's CIFAR-10 configuration and compare with this machine's matmul rate.

    python benchmarks/train_step.py                  # 32x32x3, D 384, depth 9, heads 12, patch 4, batch 128/branch
    python benchmarks/train_step.py --amp bf16       # bf16 autocast (CPU or CUDA)
    python benchmarks/train_step.py --device cuda --compile
    python benchmarks/train_step.py --reference      # also time a re-creation of the paper code's step (below)
    python benchmarks/train_step.py --preset digits-hybvit --batch-size 128

Prints per mode: seconds per step, images/s, achieved GFLOP/s (3 x forward FLOPs per image, the usual estimate for
forward + backward), and the MFU against the measured dense matmul rate of the same dtype. A benchmark, not a test.

--reference adds the "reference-style" row: the same network and step computed the way the paper's code computes it
(fp32, attention as explicit q k^T / softmax / v products, the classification pass through the whole last block),
so the speed-up of our path is measured against it in one run on one machine. It is a re-creation of that
computation, not the paper's code itself.
"""
from __future__ import annotations

import argparse
import os
import platform
import time
import types

import torch
import torch.nn.functional as F

from hybvit.config import COMPILE_MODES, preset_config
from hybvit.diffusion import GaussianDiffusion
from hybvit.model import ViT
from hybvit.optim import EMA, build_optimizer
from hybvit.precision import autocast


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(dtype, device, reps=5) -> float:
    """Best dense matmul rate over a square 2048^3 product and the model's own MLP shape (128*65 x 384 x 768),
    best of three timings each: a ceiling for what the model's matmuls can reach on this machine right now."""
    best = 0.0
    for m, k, n in ((2048, 2048, 2048), (128 * 65, 384, 768)):
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        for _ in range(2):
            a @ b
        for _ in range(3):
            sync(device)
            t0 = time.perf_counter()
            for _ in range(reps):
                a @ b
            sync(device)
            best = max(best, 2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
    return best


def reference_style(model: ViT) -> None:
    """Make `model` compute as the paper's code does: explicit fp32 attention products, full last block."""
    def attention(self, x, queries=0):
        B, L, D = x.shape
        q, k, v = self.qkv(x).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * (D // self.heads) ** -0.5).softmax(dim=-1)   # (B, heads, L, L)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, L, D))
    for block in model.blocks:
        block.attn.forward = types.MethodType(attention, block.attn)
    model.classify = lambda x: model.head(model.forward_features(x)[:, 0])


def time_step(mode: str, args, device, batch_size: int, reference: bool = False) -> dict:
    cfg = preset_config(args.preset)
    cfg.train.mode, cfg.train.amp = mode, "fp32" if reference else args.amp
    torch.manual_seed(0)
    model = ViT(cfg.model).to(device)
    if reference:
        reference_style(model)
    ema = EMA(model, 0.999)
    opt = build_optimizer(model, cfg, device, cfg.train.amp)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    compile_ = (lambda f: torch.compile(f, mode=args.compile_mode)) if args.compile and not reference else (lambda f: f)
    fwd, joint = compile_(model), compile_(model.classify_and_denoise)
    B = batch_size
    m = cfg.model
    x = torch.rand(B, m.channels, m.image_size, m.image_size, device=device) * 2 - 1
    y = torch.randint(0, m.num_classes, (B,), device=device)
    g = torch.Generator().manual_seed(0)

    graphs = args.compile and args.compile_mode == "reduce-overhead" and device.type == "cuda" and not reference

    def noised(x0):
        """t, eps and x_t as the trainer draws them (CPU generator: the same on every device and process count),
        or with --device-noise on the device (no host work, no copy; not what the trainer does)."""
        if not args.device_noise:
            return diffusion.noised(x0, g)
        t = torch.randint(0, diffusion.T, (len(x0),), device=device)
        noise = torch.randn_like(x0)
        return diffusion.q_sample(x0, t, noise), t, noise

    def step():
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        loss = torch.zeros((), device=device)
        with autocast(cfg.train.amp, device):
            if mode == "hybvit" and args.joint and not reference:   # both batches in one pass (the trainer's, on CUDA)
                xt, t, noise = noised(x)
                logits, eps = joint(x, xt, t)
                loss = F.cross_entropy(logits.float(), y) + 100 * diffusion.output_loss(eps, x, t, noise)
            elif mode in ("vit", "hybvit"):
                loss = loss + F.cross_entropy((model.classify(x) if reference else fwd(x)).float(), y)
            if mode == "genvit" or (mode == "hybvit" and (reference or not args.joint)):
                xt, t, noise = noised(x)
                loss = loss + 100 * diffusion.output_loss(fwd(xt, t), x, t, noise)     # diffusion.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(model, 0)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    images = B * (2 if mode == "hybvit" else 1)
    flops = 3 * model.flops_per_image() * images
    if args.profile and not reference:
        profile_steps(step, device, dt)
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return {"mode": mode + (" (reference-style fp32)" if reference else ""), "s_per_step": dt, "images_per_s": images / dt, "gflops": flops / dt / 1e9,
            "tflop_per_step": flops / 1e12, "peak_gib": peak}


def profile_steps(step, device, dt: float, n: int = 5) -> None:
    """Where a step's time goes: the top kernels/ops over n more steps (times are totals over the n steps). With
    CUDA graphs the "Call CompiledFxGraph" rows are whole graph replays and include the kernels listed as rows of
    their own, so the "Self CUDA time total" line counts those kernels twice."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        sync(device)
    events = prof.key_averages()
    key = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    print(f"  profile of {n} steps (timed step {dt * 1e3:.2f} ms):")
    print(events.table(sort_by=key if device.type == "cuda" else "self_cpu_time_total", row_limit=15,
                       max_name_column_width=60))


def time_sampling(args, device) -> None:
    """Sampling images/s per sampler at the paper's CIFAR-10 model (random weights: speed only)."""
    from hybvit.sample import draw_samples
    cfg = preset_config(args.preset)
    model = ViT(cfg.model).to(device).eval()
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    amp = args.amp
    for sampler, steps, n in (("ddim", 20, args.sample_batch), ("dpm-solver++", 20, args.sample_batch),
                              ("ddim", 50, args.sample_batch), ("ancestral", 1000, max(1, args.sample_batch // 10))):
        if sampler != "ancestral":                                   # warm-up
            draw_samples(model, diffusion, min(n, 8), sampler=sampler, steps=2, device=device, amp=amp)
        sync(device)
        t0 = time.perf_counter()
        draw_samples(model, diffusion, n, sampler=sampler, steps=steps, device=device, amp=amp, batch_size=n)
        sync(device)
        dt = time.perf_counter() - t0
        print(f"sampling {sampler:13s} {steps:5d} evaluations, batch {n:4d}: {n / dt:9.1f} images/s")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--modes", default="vit,genvit,hybvit")
    p.add_argument("--preset", default="cifar10-hybvit", help="model and diffusion configuration to time")
    p.add_argument("--reference", action="store_true",
                   help="also time the reference-style fp32 step of each mode and print our speed-up over it")
    p.add_argument("--batch-size", default="128", help="images per branch; a comma list times each size")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-mode", default="default",
                   choices=COMPILE_MODES,
                   help="torch.compile mode (reduce-overhead: CUDA graphs, fewer launches)")
    p.add_argument("--joint", action="store_true", help="hybvit: CE and diffusion batches in one forward pass")
    p.add_argument("--sampling", action="store_true", help="also time the samplers")
    p.add_argument("--device-noise", action="store_true",
                   help="draw t and eps on the device (the trainer draws them on the CPU, for reproducibility)")
    p.add_argument("--profile", action="store_true", help="profile 5 more steps per mode: the top kernels/ops")
    p.add_argument("--sample-batch", type=int, default=500)
    args = p.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, threads {torch.get_num_threads()}, "
          f"device {device}{' ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}, amp {args.amp}, "
          f"compile {args.compile_mode if args.compile else False}, "
          f"joint {args.joint}")
    peak = {"fp32": matmul_gflops(torch.float32, device), "bf16": matmul_gflops(torch.bfloat16, device)}
    print(f"matmul (best of 2048^3 and 8320x384x768): fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s "
          f"(bf16/fp32 {peak['bf16'] / peak['fp32']:.2f}x)")
    ref = peak[args.amp]
    print(f"{'mode':8s} {'batch':>5s} {'s/step':>8s} {'images/s':>9s} {'TFLOP/step':>11s} {'GFLOP/s':>9s} {'MFU':>6s} "
          f"{'peak GiB':>9s}")
    for batch_size in [int(b) for b in args.batch_size.split(",")]:
        for mode in args.modes.split(","):
            r = time_step(mode, args, device, batch_size)
            print(f"{mode:8s} {batch_size:5d} {r['s_per_step']:8.4f} {r['images_per_s']:9.1f} {r['tflop_per_step']:11.3f} "
                  f"{r['gflops']:9.1f} {r['gflops'] / ref:6.1%} {r['peak_gib']:9.2f}", flush=True)
            if args.reference:
                b = time_step(mode, args, device, batch_size, reference=True)
                print(f"{b['mode']:8s} {batch_size:5d} {b['s_per_step']:8.4f} {b['images_per_s']:9.1f} "
                      f"{b['tflop_per_step']:11.3f} {b['gflops']:9.1f} {b['gflops'] / peak['fp32']:6.1%} "
                      f"{b['peak_gib']:9.2f}   -> speed-up {b['s_per_step'] / r['s_per_step']:.2f}x", flush=True)
    if args.sampling:
        time_sampling(args, device)
    print("MFU = achieved / measured matmul rate of the same dtype on this machine (not a datasheet peak).")


if __name__ == "__main__":
    main()
