import numpy as np
import pytest
import torch
from PIL import Image

from hybvit.augment import crop_flip as augment
from hybvit.data import Batches, to_float, to_uint8
from hybvit.datasets import load_data
from hybvit.errors import HybvitError


def test_digits_fixed_stratified_split():
    a, b = load_data("digits"), load_data("digits")
    assert a.x_train.shape == (1437, 1, 8, 8) and a.x_test.shape == (360, 1, 8, 8)
    assert a.x_train.dtype == torch.uint8 and a.num_classes == 10
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_test, b.y_test)
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 36 +- 1 per class
    assert a.x_train.max() == 255 and a.x_train.min() == 0


def test_scaling_roundtrip_rounds():
    x = torch.arange(256, dtype=torch.uint8)
    assert torch.equal(to_uint8(to_float(x)), x)
    assert to_float(x).min() == -1 and to_float(x).max() == 1
    # 0.999 of a level below a level's value rounds up, not down (no truncation)
    v = to_float(torch.tensor([100], dtype=torch.uint8)) - 0.4 / 127.5
    assert to_uint8(v).item() == 100


def write_npz(path, x_train, y_train, x_test, y_test, **extra):
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test, **extra)


def test_npz_grayscale_and_color(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "g.npz"
    write_npz(p, rng.integers(0, 256, (20, 12, 12), dtype=np.uint8), np.arange(20) % 4,
              rng.integers(0, 256, (8, 12, 12), dtype=np.uint8), np.arange(8) % 4)
    d = load_data(f"npz:{p}")
    assert d.x_train.shape == (20, 1, 12, 12) and d.num_classes == 4
    p2 = tmp_path / "c.npz"
    xc = rng.integers(0, 256, (6, 16, 16, 3), dtype=np.uint8)
    write_npz(p2, xc, np.arange(6) % 3, xc[:2], np.arange(2))
    d2 = load_data(f"npz:{p2}")
    assert d2.x_train.shape == (6, 3, 16, 16)
    assert torch.equal(d2.x_train[1].permute(1, 2, 0), torch.from_numpy(xc[1]))  # HWC -> CHW, no mixing


def test_npz_errors(tmp_path):
    x = np.zeros((4, 8, 8), np.uint8)
    p = tmp_path / "missing.npz"
    np.savez(p, x_train=x, y_train=np.zeros(4))
    with pytest.raises(HybvitError, match="lacks the arrays x_test, y_test"):
        load_data(f"npz:{p}")
    p = tmp_path / "dims.npz"
    write_npz(p, np.zeros((4, 64), np.uint8), np.zeros(4, int), x, np.zeros(4, int))
    with pytest.raises(HybvitError, match="expected uint8 \\(N,H,W\\)"):
        load_data(f"npz:{p}")
    p = tmp_path / "labels.npz"
    write_npz(p, x, np.array([0, 1, 2, 3]), x, np.array([0, 1, 2, 7]))
    with pytest.raises(HybvitError, match="test labels must lie in \\[0, 3\\]"):
        load_data(f"npz:{p}")
    p = tmp_path / "neg.npz"
    write_npz(p, x, np.array([0, -1, 2, 3]), x, np.array([0, 1, 2, 3]))
    with pytest.raises(HybvitError, match="labels must lie"):
        load_data(f"npz:{p}")
    p = tmp_path / "float.npz"
    write_npz(p, x.astype(np.float32), np.zeros(4, int), x, np.zeros(4, int))
    with pytest.raises(HybvitError, match="dtype float32"):
        load_data(f"npz:{p}")
    with pytest.raises(HybvitError, match="does not exist"):
        load_data(f"npz:{tmp_path / 'nope.npz'}")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(HybvitError, match="cannot read npz"):
        load_data(f"npz:{bad}")


def make_folder(root, size=(10, 10), mode="RGB", n=3, classes=("cat", "dog")):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / split / c / f"{i}.png")


def test_folder_loader(tmp_path):
    make_folder(tmp_path)
    d = load_data(f"folder:{tmp_path}")
    assert d.x_train.shape == (6, 3, 10, 10) and d.classes == ["cat", "dog"]
    assert d.y_train.tolist() == [0, 0, 0, 1, 1, 1]
    img = np.array(Image.open(tmp_path / "train" / "dog" / "1.png"))
    assert torch.equal(d.x_train[4].permute(1, 2, 0), torch.from_numpy(img))


def test_folder_grayscale_and_resize(tmp_path):
    make_folder(tmp_path, size=(12, 12), mode="L")
    d = load_data(f"folder:{tmp_path}", image_size=8)
    assert d.x_train.shape == (6, 1, 8, 8)


def test_folder_errors(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(HybvitError, match="broken.jpg"):
        load_data(f"folder:{tmp_path}")
    (tmp_path / "train" / "cat" / "broken.jpg").unlink()
    Image.new("RGB", (11, 10)).save(tmp_path / "test" / "dog" / "odd.png")
    with pytest.raises(HybvitError, match="odd.png.*data.image_size"):
        load_data(f"folder:{tmp_path}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(HybvitError, match="no 'train/' folder"):
        load_data(f"folder:{empty}")


def test_unknown_spec_and_offline_cifar(tmp_path, monkeypatch):
    with pytest.raises(HybvitError, match="unknown data spec"):
        load_data("imagenet99")
    monkeypatch.setenv("HYBVIT_NO_DOWNLOAD", "1")
    with pytest.raises(HybvitError, match="CIFAR-10 not found"):
        load_data(f"cifar10:{tmp_path}")


def test_batches_are_a_function_of_seed_and_step():
    a, b = Batches(100, 32, seed=3, stream=0), Batches(100, 32, seed=3, stream=0)
    assert a.per_epoch == 3
    assert torch.equal(a.indices(7), b.indices(7))
    epoch = torch.cat([a.indices(s) for s in range(3)])
    assert len(set(epoch.tolist())) == 96  # no repeats within an epoch
    assert not torch.equal(a.indices(0), Batches(100, 32, seed=3, stream=1).indices(0))
    assert not torch.equal(a.indices(0), a.indices(3))  # a new permutation each epoch


def test_augment_crop_flip():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4) / 31 * 2 - 1
    g = torch.Generator().manual_seed(0)
    y = augment(x, crop_padding=1, hflip=True, generator=g)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert torch.equal(augment(x, 0, False, g), x)
    # with padding 0 and flips only, every output is the image or its mirror
    y = augment(x, 0, True, torch.Generator().manual_seed(1))
    for i in range(2):
        assert torch.equal(y[i], x[i]) or torch.equal(y[i], x[i].flip(-1))

