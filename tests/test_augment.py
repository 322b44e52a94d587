import math
import pytest
import torch

from hybvit.augment import _per_image, _policy, auto_augment_batched, classifier_batch, mix, random_erasing_batched
from hybvit.config import DataConfig, preset_config
from hybvit.data import Batches, to_float
from hybvit.datasets import load_data


def strong():
    return DataConfig(crop_padding=4, hflip=True, autoaugment="cifar10", random_erasing=0.25, mix_prob=0.5)


def test_classifier_batch_shapes_ranges_and_soft_labels():
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (64,))
    out, target = classifier_batch(x, y, 10, strong(), torch.Generator().manual_seed(0))
    assert out.shape == (64, 3, 32, 32) and out.dtype == torch.float32
    assert out.min() >= -1 and out.max() <= 1
    assert target.shape == (64, 10) and (target >= 0).all()
    assert torch.allclose(target.sum(1), torch.ones(64))
    mixed = (target.max(1).values < 1).sum().item()
    assert mixed == 0 or mixed >= 44  # one draw for the whole batch (a partner of the same label leaves one hot)
    again, target2 = classifier_batch(x, y, 10, strong(), torch.Generator().manual_seed(0))
    assert torch.equal(out, again) and torch.equal(target, target2)  # a pure function of the step's generator
    other, _ = classifier_batch(x, y, 10, strong(), torch.Generator().manual_seed(1))
    assert not torch.equal(out, other)


def test_no_augmentation_is_identity():
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.arange(8) % 3
    out, target = classifier_batch(x, y, 3, DataConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(out, to_float(x)) and torch.equal(target, y)


def test_mixing_is_one_draw_per_batch_as_the_paper_code():
    """The official ce_loss: with probability 0.5 the whole batch is mixed (CutMix or Mixup at even odds) with one
    lambda, one permutation and one box; otherwise the batch is clean. Image i is the constant i, so every output
    pixel tells which images it came from."""
    B, H = 16, 8
    x = torch.arange(B, dtype=torch.float32)[:, None, None, None].expand(B, 1, H, H).contiguous()
    y = torch.arange(B)
    kinds = {"clean": 0, "cutmix": 0, "mixup": 0}
    for seed in range(400):
        out, target = mix(x, y, B, prob=0.5, alpha=1.0, generator=torch.Generator().manual_seed(seed))
        assert torch.allclose(target.sum(1), torch.ones(B))
        own = target.diagonal()                                  # each image's weight on its own label
        moved = own < 1 - 1e-6                                   # not a fixed point of the permutation
        if not moved.any():
            assert torch.equal(out, x)
            kinds["clean"] += 1
            continue
        lam = own[moved][0]
        assert torch.allclose(own[moved], lam.expand(int(moved.sum()))), "one lambda for the whole batch"
        others = target.clone().fill_diagonal_(0)
        partner = torch.where(moved, others.argmax(1), torch.arange(B))
        assert sorted(partner.tolist()) == list(range(B)), "one permutation"
        if ((out == x) | (out == x[partner])).all():             # CutMix: one box, the same in every image
            kinds["cutmix"] += 1
            box = (out != x)[:, 0]
            first = box[moved][0]
            assert all(torch.equal(box[i], first) for i in range(B) if moved[i])
            assert abs(1 - first.float().mean().item() - lam.item()) < 1e-6      # lambda: the unpasted share
        else:                                                    # Mixup: one blend for every image
            kinds["mixup"] += 1
            assert torch.allclose(out, lam * x + (1 - lam) * x[partner], atol=1e-5)
    assert 160 <= kinds["clean"] <= 240, kinds                   # about half of all batches untouched
    assert kinds["cutmix"] >= 60 and kinds["mixup"] >= 60, kinds


def _official_erasing_box(H: int, W: int, rng) -> tuple[int, int] | None:
    """The paper code's utils/random_erasing.py, written out with Python's random: (h, w) of the box, or None."""
    for _ in range(100):
        area = rng.uniform(0.02, 0.4) * H * W
        ratio = rng.uniform(0.3, 1 / 0.3)
        h, w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if w < W and h < H:
            return h, w
    return None


def test_random_erasing_has_the_paper_codes_area_aspect_and_fill():
    import random
    H = W = 32
    x = torch.rand(4000, 3, H, W) - 2.0                           # strictly below -1: erased pixels read 0.5
    out = random_erasing_batched(x, 1.0, torch.Generator().manual_seed(0))
    erased = out[:, 0] == 0.5
    assert torch.equal((out == 0.5).all(1), (out == 0.5).any(1))   # every channel of an erased pixel
    rows, cols = erased.any(2).sum(1).float(), erased.any(1).sum(1).float()     # box height and width
    assert torch.equal(erased.sum((1, 2)).float(), rows * cols)   # one axis-aligned box each
    rng = random.Random(0)
    ref = [b for b in (_official_erasing_box(H, W, rng) for _ in range(4000)) if b]
    ref_h, ref_w = torch.tensor([b[0] for b in ref], dtype=torch.float), torch.tensor([b[1] for b in ref], dtype=torch.float)
    for ours, theirs in ((rows * cols / (H * W), ref_h * ref_w / (H * W)), (rows / cols, ref_h / ref_w)):
        se = (ours.var() / len(ours) + theirs.var() / len(theirs)).sqrt()
        assert abs(ours.mean() - theirs.mean()) < 4 * se, (ours.mean(), theirs.mean())
    # uniform aspect (the code's), not log-uniform (torchvision's): mean h/w ~ 1.8 here, log-uniform gives ~1.3
    assert (rows / cols).mean() > 1.5


def test_autoaugment_follows_the_paper_code_and_randaugment_torchvision(monkeypatch):
    from hybvit import augment
    seen = []
    original = augment._apply
    monkeypatch.setattr(augment, "_apply", lambda x, op, m, paper=False: (seen.append((op, m, paper)),
                                                                           original(x, op, m, paper))[1])
    x = _smooth_images(800)
    auto_augment_batched(x, "cifar10", torch.Generator().manual_seed(0))
    rotations = [m for op, m, paper in seen if op == "Rotate"]
    assert rotations and min(rotations) > 0 and all(paper for *_, paper in seen)   # counter-clockwise only
    seen.clear()
    auto_augment_batched(x, "rand", torch.Generator().manual_seed(0))
    rotations = [m for op, m, paper in seen if op == "Rotate"]
    assert min(rotations) < 0 < max(rotations) and not any(paper for *_, paper in seen)
    img = torch.full((1, 3, 16, 16), 200, dtype=torch.uint8)
    for op, m in (("Rotate", 30.0), ("TranslateX", 5.0), ("ShearX", 0.3)):
        assert original(img, op, m, paper=True)[0, :, 0, 0].tolist() in ([128] * 3, [200] * 3)
        assert (original(img, op, m, paper=True) == 128).any() and not (original(img, op, m) == 128).any()
    assert torch.equal(original(img, "Solarize", 1.0, paper=True), img)          # threshold 256: no pixel


def test_diffusion_branch_is_never_augmented(tmp_path, monkeypatch):
    from hybvit.diffusion import GaussianDiffusion
    from hybvit.train import train
    seen = []
    original = GaussianDiffusion.q_sample                  # x_t from x0: what the diffusion batch trains on
    monkeypatch.setattr(GaussianDiffusion, "q_sample", lambda self, x0, t, noise: (seen.append(x0.clone()), original(self, x0, t, noise))[1])
    cfg = preset_config("digits-hybvit")
    cfg.model.dim, cfg.model.depth, cfg.model.heads = 32, 1, 2
    cfg.train.steps, cfg.train.batch_size, cfg.train.fd_samples, cfg.train.device = 3, 16, 0, "cpu"
    cfg.data.crop_padding, cfg.data.hflip, cfg.data.random_erasing, cfg.data.mix_prob = 2, True, 1.0, 1.0
    data = load_data("digits")
    train(cfg, data, tmp_path, progress=False)
    batches = Batches(len(data.x_train), 16, cfg.train.seed, stream=1)
    for step in range(3):
        assert torch.equal(seen[step], to_float(data.x_train[batches.indices(step)]))


def test_paper_presets_turn_the_recipe_on():
    d = preset_config("cifar10-hybvit").data
    assert (d.crop_padding, d.hflip, d.autoaugment, d.random_erasing, d.mix_prob) == (4, True, "cifar10", 0.25, 0.5)
    assert preset_config("cifar10-hybvit").train.label_smoothing == 0.1
    assert preset_config("cifar10-hybvit").data.diffusion_augment == 0          # the diffusion batch: untouched


def _smooth_images(n: int, seed: int = 0) -> torch.Tensor:
    """CIFAR-sized uint8 images with structure (upsampled 8x8 noise), so every operation changes something."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 8, 8, generator=g)
    return (torch.nn.functional.interpolate(low, size=32, mode="bilinear") * 255).round().to(torch.uint8)


def _change_stats(out: torch.Tensor, x: torch.Tensor) -> tuple[float, float, float]:
    d = out.float() - x.float()
    changed = (d != 0).flatten(1).any(1).float().mean().item()
    return changed, d.abs().mean().item(), d.mean().item()


@pytest.mark.parametrize("policy", ["cifar10", "imagenet", "svhn", "rand"])
def test_batched_autoaugment_has_torchvisions_distribution(policy):
    """The grouped batched implementation and torchvision's transform applied per image agree in distribution:
    fraction of images changed, mean absolute and mean signed pixel change, over 1500 images."""
    x = _smooth_images(1500)
    ours = auto_augment_batched(x, policy, torch.Generator().manual_seed(0))
    ref = _per_image(_policy(policy), x, torch.Generator().manual_seed(0))
    assert ours.dtype == torch.uint8 and ours.shape == x.shape
    (c1, a1, s1), (c2, a2, s2) = _change_stats(ours, x), _change_stats(ref, x)
    assert abs(c1 - c2) < 0.05, (c1, c2)
    assert abs(a1 - a2) < 0.12 * a2, (a1, a2)
    assert abs(s1 - s2) < 0.12 * a2, (s1, s2)


def test_batched_autoaugment_draws_per_image_and_is_seeded():
    x = _smooth_images(64)
    a = auto_augment_batched(x, "cifar10", torch.Generator().manual_seed(5))
    b = auto_augment_batched(x, "cifar10", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    same = x[:1].expand(64, -1, -1, -1).contiguous()           # one image 64 times: different results
    out = auto_augment_batched(same, "cifar10", torch.Generator().manual_seed(5))
    assert len({bytes(o.numpy().tobytes()) for o in out}) > 10


def test_both_backends_give_the_same_kind_of_batch():
    x = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8)
    y = torch.randint(0, 10, (32,))
    for per_image in (False, True):
        out, target = classifier_batch(x, y, 10, strong(), torch.Generator().manual_seed(0), per_image=per_image)
        assert out.shape == (32, 3, 32, 32) and -1 <= out.min() and out.max() <= 1
        assert torch.allclose(target.sum(1), torch.ones(32))


def test_each_operation_and_magnitude_equals_torchvisions():
    """Exact check of every operation at every magnitude bin against torchvision's own AutoAugment / RandAugment
    internals (private API, used only here: if torchvision renames it this test fails loudly)."""
    from torchvision.transforms import v2

    from hybvit.augment import _SPACE, _apply
    x = _smooth_images(4)
    for tv, bins in ((v2.AutoAugment(), 10), (v2.RandAugment(), 31)):
        for op, (mag_fn, signed) in tv._AUGMENTATION_SPACE.items():
            ours_fn, ours_signed = _SPACE[op]
            assert ours_signed == signed, op
            mags = mag_fn(bins, 32, 32)
            for b in range(bins):
                m = None if mags is None else float(mags[b])
                mine = ours_fn(b / (bins - 1), 32, 32)
                if m is None:
                    assert mine is None
                    m = 0.0
                else:
                    assert abs(mine - m) < 1e-5, (op, b, mine, m)
                for sign in ((1, -1) if signed else (1,)):
                    expected = tv._apply_image_or_video_transform(x, op, sign * m, v2.InterpolationMode.NEAREST,
                                                                  {torch.Tensor: None})
                    got = _apply(x, op, None if mine is None else type(mine)(sign * m))
                    assert torch.equal(got, expected), (op, b, sign)


def test_diffusion_transforms_are_the_squares_symmetries_with_one_pixel_shifts():
    """GEOMETRIC: index 0 is the identity; the unshifted eight are the dihedral group of the square (built here
    from transposes and flips, independently); a shift moves the image by one pixel with a black border."""
    from hybvit.augment import GEOMETRIC, geometric_transform
    x = torch.rand(2, 3, 6, 6) * 2 - 1
    assert len(GEOMETRIC) == 72 and GEOMETRIC[0] == (0, 0, 0) and len(set(GEOMETRIC)) == 72
    assert torch.equal(geometric_transform(x, 0), x)
    T = x.transpose(-2, -1)
    group = [x, x.flip(-1), x.flip(-2), x.flip(-1).flip(-2), T, T.flip(-1), T.flip(-2), T.flip(-1).flip(-2)]
    unshifted = [geometric_transform(x, i) for i, (d, dy, dx) in enumerate(GEOMETRIC) if dy == dx == 0]
    assert len(unshifted) == 8
    for g in group:                                          # each symmetry appears exactly once
        assert sum(torch.equal(g, u) for u in unshifted) == 1
    outs = [geometric_transform(x, i) for i in range(72)]
    assert len({tuple(o.flatten().tolist()) for o in outs}) == 72        # 72 different images
    down = geometric_transform(x, GEOMETRIC.index((0, 1, 0)))             # out[i] = x[i + 1], last row black
    assert torch.equal(down[..., :-1, :], x[..., 1:, :]) and bool((down[..., -1, :] == -1).all())
    left = geometric_transform(x, GEOMETRIC.index((0, 0, -1)))            # out[:, j] = x[:, j - 1], column 0 black
    assert torch.equal(left[..., 1:], x[..., :-1]) and bool((left[..., 0] == -1).all())


def test_diffusion_augmentation_draws_per_image_with_probability_p():
    from hybvit.augment import GEOMETRIC, diffusion_geometric, geometric_transform
    x = torch.rand(7100, 1, 4, 4) * 2 - 1
    out, index = diffusion_geometric(x, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(out, x) and int(index.max()) == 0
    out, index = diffusion_geometric(x, 1.0, torch.Generator().manual_seed(0))
    counts = torch.bincount(index, minlength=72)
    assert counts[0] == 0 and int(counts[1:].min()) > 60 and int(counts[1:].max()) < 140   # uniform: 100 each
    for k in (1, 17, 40, 71):                                # each image got the transform its index names
        rows = index == k
        assert torch.equal(out[rows], geometric_transform(x[rows], k))
    out3, index3 = diffusion_geometric(x, 0.3, torch.Generator().manual_seed(1))
    assert abs(float((index3 > 0).float().mean()) - 0.3) < 0.03
    assert torch.equal(out3[index3 == 0], x[index3 == 0])
    again, index_again = diffusion_geometric(x, 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(again, out3) and torch.equal(index_again, index3)
    assert len(GEOMETRIC) == 72
