"""objective.py: each process builds only its own share of the step's global batches, and the shares of K processes,
concatenated, are bitwise the one-process batch (the full CIFAR-10 recipe, mix partners, diffusion transforms,
timesteps, noise and label dropout included)."""
import pytest
import torch

import hybvit.objective as objective
from hybvit.augment import classifier_batch
from hybvit.config import preset_config
from hybvit.data import Batches, step_generator
from hybvit.diffusion import GaussianDiffusion
from hybvit.objective import batch_inputs, share_rows

B = 32


@pytest.fixture(scope="module")
def setup():
    cfg = preset_config("cifar10-hybvit")               # crop 4, flip, AutoAugment, erasing 0.25, CutMix/Mixup 0.5
    assert (cfg.data.crop_padding, cfg.data.hflip, cfg.data.autoaugment) == (4, True, "cifar10")
    assert cfg.data.random_erasing > 0 and cfg.data.mix_prob > 0
    cfg.model.class_cond, cfg.data.diffusion_augment = True, 0.5      # every random draw of a step in play
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (200, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 10, (200,), generator=g)
    return cfg, x, y, GaussianDiffusion.from_config(cfg.diffusion)


def build(setup, step, share):
    cfg, x, y, diffusion = setup
    return batch_inputs(cfg, step, x, y, torch.device("cpu"), Batches(len(x), B, cfg.train.seed, 0),
                        Batches(len(x), B, cfg.train.seed, 1), diffusion, share=share)


def test_share_rows_split_the_batch_into_contiguous_pieces():
    assert torch.equal(torch.cat([share_rows(32, (r, 4)) for r in range(4)]), torch.arange(32))
    assert share_rows(32, (1, 2)).tolist() == list(range(16, 32))


def test_the_shares_of_k_processes_are_the_one_process_batch(setup, monkeypatch):
    needed = []
    apply = objective.apply_classifier

    def recording(draw, x_uint8, need, y, rows, num_classes):
        needed.append((draw.mix["mixed"], len(need), len(rows)))
        return apply(draw, x_uint8, need, y, rows, num_classes)
    monkeypatch.setattr(objective, "apply_classifier", recording)
    mixed_steps = set()
    for step in range(10):
        whole_ce, whole_diff = build(setup, step, (0, 1))
        assert len(whole_ce[0]) == B and whole_ce[1].shape == (B, 10)
        for k in (2, 4):
            needed.clear()
            shares = [build(setup, step, (r, k)) for r in range(k)]
            for part, whole in ((0, whole_ce), (1, whole_diff)):
                for i, v in enumerate(whole):
                    together = torch.cat([s[part][i] for s in shares])
                    assert together.dtype == v.dtype and torch.equal(together, v), (step, k, part, i)
            for mixed, need, rows in needed:   # the image work: own rows, and in a mixed batch their partners
                assert rows == B // k and (need == rows if not mixed else rows <= need <= 2 * rows)
                if mixed:
                    mixed_steps.add(step)
    assert 0 < len(mixed_steps) < 10                   # both kinds of batch were compared
    # the one-process share is what the whole-batch augmentation gives, with the same draws from the generator
    cfg, x, y, _ = setup
    for step in range(3):
        g = step_generator(cfg.train.seed, step, 0)
        idx = Batches(len(x), B, cfg.train.seed, 0).indices(step)
        xs, target = classifier_batch(x[idx], y[idx], 10, cfg.data, g)
        ce, _ = build(setup, step, (0, 1))
        assert torch.equal(ce[0], xs) and torch.equal(ce[1], target)
