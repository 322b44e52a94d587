"""Images/s of the classification-batch augmentation: a CPU data loader against the device-resident batched path.

    python benchmarks/augment_throughput.py [--batch 128] [--batches 20] [--workers 2]

The full recipe of the paper's code (crop 4 + flip + AutoAugment CIFAR10 + random erasing 0.25 + CutMix/Mixup
0.5, every choice per sample) on CIFAR-sized uint8 images, run three ways:
  1. CPU loader: a torch DataLoader with --workers processes applying torchvision.transforms.v2 per image (what the
     paper's code did), CutMix/Mixup on the collated batch;
  2. batched, CPU: hybvit's training path (`classifier_batch`) in the main process;
  3. batched, GPU: the same with the uint8 dataset resident on the GPU (only where CUDA is available).
Also each stage alone, both backends, on the CPU.
"""
import argparse
import time

import torch

from hybvit.augment import classifier_batch, mix
from hybvit.config import DataConfig

FULL = dict(crop_padding=4, hflip=True, autoaugment="cifar10", random_erasing=0.25, mix_prob=0.5)


class _PerImage(torch.utils.data.Dataset):
    """The paper code's loader: one image at a time through torchvision.transforms.v2."""

    def __init__(self, x, y):
        from torchvision.transforms import v2
        self.x, self.y = x, y
        self.t = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(),
                             v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10), v2.ToDtype(torch.float32, scale=True),
                             v2.Normalize([0.5] * 3, [0.5] * 3), v2.RandomErasing(p=0.25, value=0.0)])

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.t(self.x[i]), self.y[i]


def loader_rate(x, y, batch: int, batches: int, workers: int) -> float:
    dl = torch.utils.data.DataLoader(_PerImage(x, y), batch_size=batch, shuffle=True, num_workers=workers,
                                     drop_last=True, persistent_workers=workers > 0)
    g = torch.Generator().manual_seed(0)
    it = iter(dl)
    xb, yb = next(it)                                          # start-up (worker spawn) not counted
    t0 = time.perf_counter()
    for _ in range(batches):
        xb, yb = next(it)
        mix(xb, yb, 10, 0.5, 1.0, g)
    return batches * batch / (time.perf_counter() - t0)


def batched_rate(cfg: DataConfig, x, y, batch: int, batches: int, device: str, per_image: bool = False) -> float:
    x, y = x.to(device), y.to(device)
    g = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, len(x), (batch,), generator=g).to(device)
        return classifier_batch(x[idx], y[idx], 10, cfg, g, per_image=per_image)

    step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(batches):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
    return batches * batch / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--workers", type=int, default=2)
    a = p.parse_args()
    x = torch.randint(0, 256, (10000, 3, 32, 32), dtype=torch.uint8)   # a CIFAR-sized uint8 dataset
    y = torch.randint(0, 10, (10000,))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {a.batch}, {a.batches} batches")
    print("\nstage alone (CPU, main process)          per image    batched")
    for name, kw in [("crop 4 + flip", dict(crop_padding=4, hflip=True)), ("AutoAugment CIFAR10",
                     dict(autoaugment="cifar10")), ("RandAugment", dict(autoaugment="rand")),
                     ("random erasing 0.25", dict(random_erasing=0.25)), ("CutMix/Mixup 0.5", dict(mix_prob=0.5)),
                     ("full recipe", FULL)]:
        r = [batched_rate(DataConfig(**kw), x, y, a.batch, a.batches, "cpu", per_image=b) for b in (True, False)]
        print(f"  {name:36s} {r[0]:9.0f} {r[1]:10.0f} images/s  ({r[1] / r[0]:.1f}x)")
    print("\nfull recipe")
    base = loader_rate(x, y, a.batch, a.batches, a.workers)
    print(f"  CPU DataLoader, {a.workers} workers, per image   {base:9.0f} images/s")
    cpu = batched_rate(DataConfig(**FULL), x, y, a.batch, a.batches, "cpu")
    print(f"  batched, CPU main process           {cpu:9.0f} images/s  ({cpu / base:.1f}x the loader)")
    if torch.cuda.is_available():
        gpu = batched_rate(DataConfig(**FULL), x, y, a.batch, a.batches * 5, "cuda")
        print(f"  batched, GPU-resident ({torch.cuda.get_device_name()})  {gpu:9.0f} images/s  "
              f"({gpu / base:.1f}x the loader)")
    else:
        print("  batched, GPU-resident               (no CUDA device here)")


if __name__ == "__main__":
    main()
