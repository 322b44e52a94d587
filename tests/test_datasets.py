"""Each standard-dataset reader against tiny files written here in that dataset's real on-disk format."""
import pickle

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from hybvit.datasets import load_data
from hybvit.errors import HybvitError


def rgb(n, size, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 3, size, size), dtype=np.uint8)


def write_cifar_batch(path, images, labels, label_key):
    # the published batches: a pickled dict with bytes keys, data (N, 3072) as R, G, B planes, labels a list
    with open(path, "wb") as f:
        pickle.dump({b"data": images.reshape(len(images), -1), label_key: list(map(int, labels))}, f, protocol=2)


def test_cifar10_python_batches(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    imgs = rgb(12, 32)
    for i in range(5):
        write_cifar_batch(d / f"data_batch_{i + 1}", imgs[2 * i:2 * i + 2], [i, 9 - i], b"labels")
    write_cifar_batch(d / "test_batch", imgs[10:], [3, 4], b"labels")
    data = load_data(f"cifar10:{tmp_path}")
    assert data.x_train.shape == (10, 3, 32, 32) and data.num_classes == 10
    assert torch.equal(data.x_train[3], torch.from_numpy(imgs[3]))
    assert data.y_train.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5] and data.y_test.tolist() == [3, 4]


def test_cifar100_fine_labels(tmp_path):
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    imgs = rgb(5, 32)
    write_cifar_batch(d / "train", imgs[:3], [0, 57, 99], b"fine_labels")
    write_cifar_batch(d / "test", imgs[3:], [12, 13], b"fine_labels")
    data = load_data(f"cifar100:{tmp_path}")
    assert data.num_classes == 100 and data.y_train.tolist() == [0, 57, 99]
    assert torch.equal(data.x_test[1], torch.from_numpy(imgs[4]))


def test_dataset_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            import os
            return (os.system, ("echo pwned",))
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    for name in ("train", "test"):
        with open(d / name, "wb") as f:
            pickle.dump({b"data": Evil(), b"fine_labels": [0]}, f)
    with pytest.raises(HybvitError, match="not allowed"):
        load_data(f"cifar100:{tmp_path}")


def test_svhn_mat(tmp_path):
    imgs = rgb(4, 32)
    for split, labels in (("train", [10, 1, 2, 3]), ("test", [4, 5, 10, 9])):
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat",
                         {"X": imgs.transpose(2, 3, 1, 0), "y": np.array(labels, dtype=np.uint8)[:, None]})
    data = load_data(f"svhn:{tmp_path}")
    assert data.y_train.tolist() == [0, 1, 2, 3] and data.y_test.tolist() == [4, 5, 0, 9]  # 10 means digit 0
    assert torch.equal(data.x_train[2], torch.from_numpy(imgs[2]))


def test_stl10_binary(tmp_path):
    d = tmp_path / "stl10_binary"
    d.mkdir()
    imgs = rgb(3, 96)
    for split, labels in (("train", [1, 10, 5]), ("test", [2, 3, 4])):
        imgs.transpose(0, 1, 3, 2).tofile(d / f"{split}_X.bin")  # column-major, as published
        np.array(labels, dtype=np.uint8).tofile(d / f"{split}_y.bin")
    data = load_data(f"stl10:{tmp_path}")
    assert data.x_train.shape == (3, 3, 96, 96) and data.y_train.tolist() == [0, 9, 4]
    assert torch.equal(data.x_test[1], torch.from_numpy(imgs[1]))
    (d / "test_y.bin").write_bytes(b"\x01\x02")
    with pytest.raises(HybvitError, match="truncated or mismatched"):
        load_data(f"stl10:{tmp_path}")


def test_tiny_imagenet_folder_with_val_annotations(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n09999999"]
    (base / "val" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    imgs = rgb(6, 64).transpose(0, 2, 3, 1)
    for k, w in enumerate(wnids):
        (base / "train" / w / "images").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(imgs[2 * k + i]).save(base / "train" / w / "images" / f"{w}_{i}.png")
    lines = []
    for i, w in enumerate([wnids[1], wnids[0]]):
        Image.fromarray(imgs[4 + i]).save(base / "val" / "images" / f"val_{i}.png")
        lines.append(f"val_{i}.png\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    data = load_data(f"tiny-imagenet:{tmp_path}")
    assert data.num_classes == 2 and data.x_train.shape == (4, 3, 64, 64)
    assert data.y_train.tolist() == [0, 0, 1, 1] and data.y_test.tolist() == [1, 0]
    assert torch.equal(data.x_test[0].permute(1, 2, 0), torch.from_numpy(imgs[4]))  # PNG is lossless
    (base / "val" / "val_annotations.txt").write_text("val_0.png\tn00000000\n")
    with pytest.raises(HybvitError, match="line 1"):
        load_data(f"tiny-imagenet:{tmp_path}")


def test_imagenet32_npz_batches(tmp_path):
    d = tmp_path / "imagenet32"
    d.mkdir()
    imgs = rgb(5, 32)
    np.savez(d / "train_data_batch_1.npz", data=imgs[:2].reshape(2, -1), labels=np.array([1, 1000]))
    np.savez(d / "train_data_batch_2.npz", data=imgs[2:4].reshape(2, -1), labels=np.array([7, 8]))
    np.savez(d / "val_data.npz", data=imgs[4:].reshape(1, -1), labels=np.array([500]))
    data = load_data(f"imagenet32:{tmp_path}")
    assert data.num_classes == 1000 and data.y_train.tolist() == [0, 999, 6, 7] and data.y_test.tolist() == [499]
    assert torch.equal(data.x_train[3], torch.from_numpy(imgs[3]))


@pytest.mark.parametrize("name,hint", [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"),
                                       ("svhn", "train_32x32.mat"), ("stl10", "stl10_binary"),
                                       ("tiny-imagenet", "tiny-imagenet-200"), ("imagenet32", "image-net.org"),
                                       ("celeba128", "img_align_celeba")])
def test_offline_without_files_says_where_to_put_them(name, hint, tmp_path, monkeypatch):
    monkeypatch.setenv("HYBVIT_NO_DOWNLOAD", "1")
    with pytest.raises(HybvitError, match=hint) as err:
        load_data(f"{name}:{tmp_path}")
    assert "\n" not in str(err.value)


def test_celeba128_folder_is_cropped_resized_and_unlabeled(tmp_path, capsys):
    d = tmp_path / "celeba" / "img_align_celeba"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 256, (218, 178, 3), dtype=np.uint8)).save(d / f"{i:06d}.jpg")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text(
        "".join(f"{i:06d}.jpg {0 if i < 3 else (1 if i == 3 else 2)}\n" for i in range(5)))
    data = load_data(f"celeba128:{tmp_path}")
    assert data.x_train.shape == (4, 3, 128, 128) and data.x_test.shape == (1, 3, 128, 128)
    assert data.num_classes == 1 and data.y_train.eq(0).all()
    from hybvit.cli import main
    assert main(["train", "--data", f"celeba128:{tmp_path}", "--out", str(tmp_path / "r")]) == 2
    assert "no class labels" in capsys.readouterr().err and not (tmp_path / "r").exists()
