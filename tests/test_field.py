"""hybvit with the field's tools: sample files the ADM suite and pytorch-fid read, scoring existing samples,
evaluation during training, --stop-after, provenance, model folders, and the precision a GPU gets."""
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hybvit.checkpoint import load_training_state
from hybvit.cli import main
from hybvit.data import to_uint8
from hybvit.evaluate.fid import kernel_inception_distance, precision_recall
from hybvit.precision import autocast, cuda_amp, grad_scaler
from hybvit.sample import load_run
from hybvit.samplefiles import read_samples, write_samples

from test_cli import TINY, run_cli as cli                  # the tiny model flags and the in-process CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    assert main(["train", "--steps", "30", "--out", str(out)] + TINY) == 0
    return out


# ----------------------------------------------------------------------------- sample files

def test_sample_npz_is_what_the_adm_suite_reads(run_dir, tmp_path, capsys):
    rc, out, _ = cli(capsys, "sample", "--run", run_dir, "--num", 12, "--out", tmp_path / "s.npz", "--steps", 3,
                     "--batch-size", 5)
    assert rc == 0 and "labels (arr_1): the HybViT head's predictions" in out
    with np.load(tmp_path / "s.npz") as f:                     # the ADM evaluator's own reading
        x, y = f["arr_0"], f["arr_1"]
    assert x.dtype == np.uint8 and x.shape == (12, 8, 8, 1) and y.shape == (12,)
    run = load_run(run_dir, device="cpu")
    expected = to_uint8(run.sample(12, steps=3, batch_size=5))           # the same seeds: the same images
    assert np.array_equal(x, expected.permute(0, 2, 3, 1).numpy())
    assert np.array_equal(y, run.classify(expected).argmax(1).numpy())   # arr_1: the head's predictions
    # --class K labels every sample K
    rc, out, _ = cli(capsys, "sample", "--run", run_dir, "--num", 3, "--out", tmp_path / "k.npz", "--steps", 2,
                     "--class", 7, "--guidance-scale", 0)
    assert rc == 0 and np.load(tmp_path / "k.npz")["arr_1"].tolist() == [7, 7, 7]


def test_png_folder_holds_the_same_images(run_dir, tmp_path, capsys):
    cli(capsys, "sample", "--run", run_dir, "--num", 11, "--out", tmp_path / "s.npz", "--steps", 3)
    rc, *_ = cli(capsys, "sample", "--run", run_dir, "--num", 11, "--out", f"{tmp_path / 'pngs'}/", "--steps", 3)
    assert rc == 0
    files = sorted((tmp_path / "pngs").iterdir())
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(11)]
    stacked = np.stack([np.asarray(Image.open(f)) for f in files])[..., None]
    assert np.array_equal(stacked, np.load(tmp_path / "s.npz")["arr_0"])
    x, labels = read_samples(tmp_path / "pngs")
    assert labels is None and np.array_equal(x.permute(0, 2, 3, 1).numpy(), stacked)
    # a folder that is not empty is refused, and nothing is added to it
    rc, _, err = cli(capsys, "sample", "--run", run_dir, "--num", 2, "--out", f"{tmp_path / 'pngs'}/")
    assert rc == 2 and "not empty" in err and len(list((tmp_path / "pngs").iterdir())) == 11


def test_older_files_and_bad_files(tmp_path):
    imgs = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "old.npz", images=imgs)                           # hybvit's older key
    x, labels = read_samples(tmp_path / "old.npz")
    assert labels is None and np.array_equal(x.permute(0, 2, 3, 1).numpy(), imgs)
    write_samples(tmp_path / "w.npz", torch.from_numpy(imgs).permute(0, 3, 1, 2), torch.arange(4))
    assert sorted(np.load(tmp_path / "w.npz").files) == ["arr_0", "arr_1"]
    np.savez(tmp_path / "f.npz", arr_0=imgs.astype(np.float32))
    np.savez(tmp_path / "obj.npz", arr_0=np.array([object()], dtype=object))
    np.savez(tmp_path / "lab.npz", arr_0=imgs, arr_1=np.arange(3))
    from hybvit.errors import HybvitError
    for name, match in (("f.npz", "expected uint8"), ("obj.npz", "Python objects"), ("lab.npz", "one label")):
        with pytest.raises(HybvitError, match=match):
            read_samples(tmp_path / name)


def test_an_npz_header_claiming_terabytes_is_refused_before_allocation(tmp_path):
    """The .npy header claims (10^6, 10^3, 10^3, 3) uint8 (3 TB); the file holds 16 bytes."""
    from hybvit.errors import HybvitError
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1,), np.uint8))
    header["shape"] = (10 ** 6, 1000, 1000, 3)
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as z:
        with z.open("arr_0.npy", "w") as f:
            np.lib.format.write_array_header_1_0(f, header)
            f.write(b"\0" * 16)
    with pytest.raises(HybvitError, match="claims"):
        read_samples(path)


# ----------------------------------------------------------------------------- evaluate --samples

def test_evaluate_samples_gives_the_fd_of_the_same_images_drawn_inside(run_dir, tmp_path, capsys):
    cli(capsys, "sample", "--run", run_dir, "--num", 60, "--out", tmp_path / "s.npz", "--steps", 3, "--quiet")
    with np.load(tmp_path / "s.npz") as f:
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape[-1] == 1
    rc, out, _ = cli(capsys, "evaluate", "--samples", tmp_path / "s.npz", "--data", "digits", "--metrics",
                     "small-fd,pixel-fd", "--out", tmp_path / "file.json", "--quiet")
    assert rc == 0 and "from " + str(tmp_path / "s.npz") in out
    rc, *_ = cli(capsys, "evaluate", "--run", run_dir, "--metrics", "small-fd,pixel-fd,sample-analysis",
                 "--num-samples", 60, "--steps", 3, "--out", tmp_path / "drawn.json", "--quiet")
    assert rc == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("file.json", "drawn.json"))
    for m in ("small-fd", "pixel-fd"):
        assert a["metrics"][m]["value"] == b["metrics"][m]["value"] and np.isfinite(a["metrics"][m]["value"])
    assert b["samples"]["source"] == "drawn by this evaluation" and b["samples"]["steps"] == 3
    assert a["samples"] == {"source": str(tmp_path / "s.npz"), "num_samples": 60}
    # sample-analysis classified the same set: its class counts are the head's predictions of the file's images
    counts = np.bincount(np.load(tmp_path / "s.npz")["arr_1"], minlength=10).tolist()
    assert b["metrics"]["sample-analysis"]["predicted_class_counts"] == counts
    assert a["provenance"]["command"].startswith("hybvit evaluate --samples")
    assert (tmp_path / "file.html").exists() and "hybvit sample report" in (tmp_path / "file.html").read_text()


def test_evaluate_samples_needs_data_and_a_run_for_model_metrics(run_dir, tmp_path, capsys):
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((5, 8, 8, 1), np.uint8))
    for argv, match in ((["--metrics", "small-fd"], "needs --data"),
                        (["--metrics", "accuracy", "--data", "digits"], "needs a model"),
                        (["--metrics", "pixel-fd", "--data", "npz:" + str(tmp_path / "none.npz")], "does not exist")):
        rc, _, err = cli(capsys, "evaluate", "--samples", tmp_path / "s.npz", *argv, "--out", tmp_path / "r.json")
        assert rc == 2 and match in err and "\n" not in err.strip(), err
        assert not (tmp_path / "r.json").exists() and not list(tmp_path.glob(".hybvit-eval-*"))
    rc, _, err = cli(capsys, "evaluate", "--metrics", "small-fd", "--out", tmp_path / "r.json")
    assert rc == 2 and "--run DIR, --samples" in err


def test_kid_and_precision_recall():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)), rng.normal(size=(300, 16))
    far = rng.normal(size=(300, 16)) + 50
    assert abs(kernel_inception_distance(a, b)["value"]) < 0.01         # the same distribution: unbiased ~0
    assert kernel_inception_distance(a, far)["value"] > 1
    itself = precision_recall(a, a)                          # every point lies in its own k-NN ball
    assert itself["precision"] == 1 and itself["recall"] == 1
    same = precision_recall(a, b)
    assert 0.5 < same["precision"] < 1 and 0.5 < same["recall"] < 1
    apart = precision_recall(far, a)
    assert apart["precision"] == 0 and apart["recall"] == 0


def test_fid_kid_prc_share_one_inception_pass(run_dir, tmp_path, capsys, monkeypatch):
    """The Inception metrics of a report extract the sample set's features once (random weights: no network)."""
    tf = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    monkeypatch.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    torch.save({}, tmp_path / "inception.pth")
    import hybvit.evaluate as ev
    calls = []
    real = ev.extract
    monkeypatch.setattr(ev, "extract", lambda ext, x, *a, **k: calls.append(len(x)) or real(ext, x, *a, **k))
    rng = np.random.default_rng(0)                     # a small reference set: Inception is slow on a CPU
    np.savez(tmp_path / "small.npz", x_train=rng.integers(0, 256, (12, 8, 8), dtype=np.uint8), y_train=np.arange(12) % 10,
             x_test=rng.integers(0, 256, (14, 8, 8), dtype=np.uint8), y_test=np.arange(14) % 10)
    rc, out, _ = cli(capsys, "evaluate", "--run", run_dir, "--metrics", "fid,is,kid,prc", "--num-samples", 12,
                     "--steps", 2, "--inception-weights", tmp_path / "inception.pth", "--fid-reference", "test",
                     "--data", f"npz:{tmp_path / 'small.npz'}", "--out", tmp_path / "r.json", "--quiet", "--no-html")
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["metrics"]) == {"fid", "is", "kid", "prc"}
    assert report["metrics"]["kid"]["subset_size"] == 12 and 0 <= report["metrics"]["prc"]["recall"] <= 1
    assert sorted(calls) == [12, 14]              # the 12 samples once for all four; the 14 test images for FID


# ----------------------------------------------------------------------------- training: eval, snapshots, stop

def test_eval_every_keep_every_stop_after_and_exact_resume(tmp_path, capsys, monkeypatch):
    import hybvit.evaluate.end_of_run
    assert hybvit.evaluate.end_of_run.EVAL_SAMPLES == 1000
    monkeypatch.setattr(hybvit.evaluate.end_of_run, "EVAL_SAMPLES", 20)     # small-fd of 20 samples: quicker
    plain = tmp_path / "plain"
    assert main(["train", "--steps", "40", "--out", str(plain)] + TINY) == 0
    run = tmp_path / "run"
    extra = ["--set", "train.eval_every=10", "--set", "train.keep_every=20"]
    rc, out, _ = cli(capsys, "train", "--steps", 40, "--out", run, "--stop-after", 30, *TINY, *extra)
    assert rc == 0 and "as asked (--stop-after)" in out
    assert load_training_state(run / "checkpoints" / "last.pt")["step"] == 30 and not (run / "metrics.json").exists()
    rc, *_ = cli(capsys, "train", "--resume", run, "--quiet")
    assert rc == 0
    # evaluations and snapshots did not change training: the weights equal those of a run without them
    a, b = (load_training_state(d / "checkpoints" / "last.pt") for d in (plain, run))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert sorted(p.name for p in (run / "checkpoints").glob("ema-*.safetensors")) == \
        ["ema-0000020.safetensors", "ema-0000040.safetensors"]
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/small_fd" in r]
    assert [r["step"] for r in evals] == [10, 20, 30, 40]                # once each, the resume did not repeat 30
    assert all(0 <= r["eval/test_accuracy"] <= 1 and np.isfinite(r["eval/small_fd"]) for r in evals)
    from hybvit.evaluate.report import read_scalars
    import shutil
    shutil.move(str(run / "log.jsonl"), str(tmp_path / "log.jsonl"))     # TensorBoard has the same scalars
    tb = read_scalars(run)
    assert tb["eval/test_accuracy"][0] == [10, 20, 30, 40]
    metrics = json.loads((run / "metrics.json").read_text())
    prov = metrics["provenance"]
    assert prov["command"] == f"hybvit train --resume {run} --quiet" and prov["precision"] == metrics["amp"]
    assert prov["torch"] == torch.__version__ and prov["processes"] == 1 and prov["device_name"]
    head = subprocess.run(["git", "-C", str(Path(__file__).parent), "rev-parse", "HEAD"], capture_output=True,
                          text=True).stdout.strip()
    assert prov["git_commit"] == (head or None)


# ----------------------------------------------------------------------------- model folders

def test_export_samples_the_same_images(run_dir, tmp_path, capsys):
    rc, *_ = cli(capsys, "export", "--run", run_dir, "--out", tmp_path / "model")
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "model").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    card = (tmp_path / "model" / "README.md").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert f"| test_accuracy | {metrics['test_accuracy']} |" in card and "load_run" in card
    a, b = load_run(run_dir, device="cpu"), load_run(tmp_path / "model", device="cpu")
    assert torch.equal(a.sample(6, steps=3), b.sample(6, steps=3))
    rc, *_ = cli(capsys, "sample", "--run", tmp_path / "model", "--num", 3, "--out", tmp_path / "s.npz", "--steps", 2)
    assert rc == 0
    rc, _, err = cli(capsys, "export", "--run", run_dir, "--out", tmp_path / "model")     # not empty: refused
    assert rc == 2 and "not an empty folder" in err


# ----------------------------------------------------------------------------- devices

def test_gpu_precision_policy_and_fp16_training_on_the_cpu(tmp_path, capsys):
    assert cuda_amp((7, 0)) == "fp16" and cuda_amp((7, 5)) == "fp16"      # V100, T4: no native bf16
    assert cuda_amp((8, 0)) == "bf16" and cuda_amp((9, 0)) == "bf16"      # A100, H100
    cpu = torch.device("cpu")
    assert grad_scaler("bf16", cpu) is None and grad_scaler("fp16", cpu) is not None
    with autocast("fp16", cpu):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float16
    # the fp16 path trains (autocast + scaler), checkpoints its scaler and resumes exactly
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["train", "--steps", "12", "--out", str(a), "--set", "amp=fp16"] + TINY) == 0
    assert main(["train", "--steps", "12", "--out", str(b), "--set", "amp=fp16", "--stop-after", "5"] + TINY) == 0
    assert "scaler" in load_training_state(b / "checkpoints" / "last.pt")
    assert main(["train", "--resume", str(b), "--quiet"]) == 0
    sa, sb = (load_training_state(d / "checkpoints" / "last.pt") for d in (a, b))
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])
    assert json.loads((a / "metrics.json").read_text())["amp"] == "fp16"


def test_end_of_run_sampling_fits_the_run():
    """evaluate.end_of_run.fits: all samples while they cost at most max(60 s, a quarter of the training time),
    estimated as steps forward passes a third the cost of a training image each; else as many as fit."""
    from hybvit.evaluate.end_of_run import fits
    assert fits(1000, 50, 950.0, 270.0) == 1000              # the default digits run: ~18 s of sampling
    assert fits(100, 100, 48.8, 16.0) == 87                  # 3 steps of cifar10-hybvit on a CPU: 60 s of room
    assert fits(100, 100, 48.8, 16.0 * 400) == 100           # the same after a long run
    assert fits(100, 100, None, None) == 100                 # no training figures: all
