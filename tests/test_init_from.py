"""`hybvit train --init-from`: a new run that starts from a trained model's weights."""
import json

import numpy as np
import pytest
import torch

from hybvit import init_from
from hybvit.cli import build_parser, main
from hybvit.datasets import load_digits
from hybvit.resolve import resolve_train_config
from hybvit.sample import load_run
from hybvit.train import setup

TINY = ["--set", "model.dim=32", "--set", "model.depth=2", "--set", "model.heads=2", "--set", "batch_size=24",
        "--set", "fd_samples=0", "--quiet"]


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("src") / "digits"
    assert main(["train", "--steps", "3", "--out", str(out)] + TINY) == 0
    return out


@pytest.fixture(scope="module")
def three_classes(tmp_path_factory):
    """The digits 0, 1 and 2 of the bundled set, as a user's npz."""
    d = load_digits()
    path = tmp_path_factory.mktemp("data") / "three.npz"
    keep_tr, keep_te = d.y_train < 3, d.y_test < 3
    np.savez(path, x_train=d.x_train[keep_tr, 0].numpy(), y_train=d.y_train[keep_tr].numpy(),
             x_test=d.x_test[keep_te, 0].numpy(), y_test=d.y_test[keep_te].numpy())
    return path


def resolve(argv):
    init_from.read_source.cache_clear()
    return resolve_train_config(build_parser().parse_args(["train", *argv]))


def test_new_head_every_other_tensor_equal_and_it_trains(digits_run, three_classes, tmp_path, capsys):
    source = load_run(digits_run, device="cpu").model.state_dict()
    args = ["--init-from", str(digits_run), "--data", f"npz:{three_classes}", "--steps", "4",
            "--out", str(tmp_path / "ft"), "--quiet"]
    cfg, data, _, _ = resolve(args)
    assert cfg.model.num_classes == 3 and cfg.model.dim == 32
    tr = setup(cfg, data, None, init_from.start_weights(cfg, init_from.read_source(str(digits_run))))
    start = tr.model.state_dict()
    assert start["head.1.weight"].shape == (3, 32) and source["head.1.weight"].shape == (10, 32)
    for key, value in source.items():
        if not key.startswith("head.1."):
            assert torch.equal(start[key], value), key
    assert torch.equal(tr.ema.model.state_dict()["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])
    assert tr.start_step == 0

    assert main(["train", *args]) == 0
    out = capsys.readouterr().out
    assert "classifier head re-initialised: 10 -> 3 classes" in out
    saved = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert saved["model"]["num_classes"] == 3 and any("initialised from" in n for n in saved["notes"])
    metrics = json.loads((tmp_path / "ft" / "metrics.json").read_text())
    assert metrics["steps"] == 4 and 0 <= metrics["test_accuracy"] <= 1
    trained = load_run(tmp_path / "ft", device="cpu").model.state_dict()
    assert not torch.equal(trained["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])


def test_same_classes_keep_the_head_and_an_exported_folder_works(digits_run, tmp_path):
    assert main(["export", "--run", str(digits_run), "--out", str(tmp_path / "model")]) == 0
    cfg, data, _, _ = resolve(["--init-from", str(tmp_path / "model"), "--steps", "1"])
    weights = init_from.start_weights(cfg, init_from.read_source(str(tmp_path / "model")))
    assert "head.1.weight" in weights and cfg.model.num_classes == 10


def test_a_changed_model_is_one_line_listing_the_tensors(digits_run, tmp_path, capsys):
    init_from.read_source.cache_clear()
    rc = main(["train", "--init-from", str(digits_run), "--set", "model.depth=3", "--steps", "1",
               "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "blocks.2." in err and "missing" in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv,says", [
    (["--init-from", "/nonexistent/run"], "does not exist"),
    (["--init-from", "{run}", "--resume", "{run}"], "give one of them"),
    (["--init-from", "{run}/config.json"], "neither a folder"),
])
def test_bad_sources_give_one_line(digits_run, tmp_path, capsys, argv, says):
    init_from.read_source.cache_clear()
    argv = [a.replace("{run}", str(digits_run)) for a in argv]
    rc = main(["train", *argv, "--steps", "1", "--out", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and says in err, err
