"""Images/s of the classification-batch augmentation on this machine (CIFAR-sized uint8 batches, CPU).

    python benchmarks/augment_throughput.py [--batch 128] [--batches 20]

Prints the rate of each stage alone and of the full recipe of the paper's code (crop 4 + flip + AutoAugment
CIFAR10 + random erasing 0.25 + CutMix/Mixup 0.5), all drawn per sample, as training runs it (one process).
"""
import argparse
import time

import torch

from hybvit.augment import classifier_batch
from hybvit.config import DataConfig


def rate(cfg: DataConfig, x, y, batches: int) -> float:
    g = torch.Generator().manual_seed(0)
    classifier_batch(x, y, 10, cfg, g)
    t0 = time.perf_counter()
    for _ in range(batches):
        classifier_batch(x, y, 10, cfg, g)
    return batches * len(x) / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--batches", type=int, default=20)
    a = p.parse_args()
    x = torch.randint(0, 256, (a.batch, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (a.batch,))
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, batch {a.batch}")
    stages = [("crop 4 + flip", DataConfig(crop_padding=4, hflip=True)),
              ("AutoAugment CIFAR10", DataConfig(autoaugment="cifar10")),
              ("random erasing 0.25", DataConfig(random_erasing=0.25)),
              ("CutMix/Mixup 0.5", DataConfig(mix_prob=0.5)),
              ("full recipe", DataConfig(crop_padding=4, hflip=True, autoaugment="cifar10", random_erasing=0.25,
                                         mix_prob=0.5))]
    for name, cfg in stages:
        print(f"{name:22s} {rate(cfg, x, y, a.batches):9.0f} images/s")


if __name__ == "__main__":
    main()
