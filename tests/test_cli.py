"""The command line end to end on digits with a tiny budget, and every bad input the CLI promises to refuse."""
import json
from pathlib import Path
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hybvit.cli import main

TINY = ["--set", "model.dim=32", "--set", "model.depth=2", "--set", "model.heads=2", "--set", "batch_size=32",
        "--set", "fd_samples=0", "--quiet"]


def run_cli(capsys, *args):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "r"
    assert main(["train", "--steps", "6", "--out", str(out)] + TINY + ["--set", "fd_samples=40"]) == 0
    return out


def test_train_writes_the_run(trained):
    metrics = json.loads((trained / "metrics.json").read_text())
    for key in ("test_accuracy", "steps", "images_seen", "wall_seconds", "pixel_fd"):
        assert key in metrics
    assert metrics["steps"] == 6 and metrics["images_seen"] == 6 * 64
    assert metrics["pixel_fd_samples"] == 40
    assert (trained / "samples.png").exists() and (trained / "checkpoints" / "last.pt").exists()
    assert (trained / "checkpoints" / "ema.safetensors").exists()
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["model"]["dim"] == 32 and cfg["preset"] == "digits-hybvit"
    assert Image.open(trained / "samples.png").size == (10 * 33 + 1, 10 * 33 + 1)  # 8px -> 32px, 10x10 grid
    assert metrics["pixel_fd_sampler"] == "ddim-50"                      # the run's own samples: DDIM-50


def test_sample_npz_and_png(trained, tmp_path, capsys):
    rc, out, _ = run_cli(capsys, "sample", "--run", trained, "--num", 5, "--out", tmp_path / "s.npz", "--steps", 3)
    assert rc == 0
    images = np.load(tmp_path / "s.npz")["arr_0"]
    assert images.shape == (5, 8, 8, 1) and images.dtype == np.uint8
    rc, *_ = run_cli(capsys, "sample", "--checkpoint", trained / "checkpoints" / "ema.safetensors", "--num", 4,
                     "--out", tmp_path / "s.png", "--sampler", "ddim", "--steps", 2, "--eta", 1.0, "--seed", 3)
    assert rc == 0 and Image.open(tmp_path / "s.png").size == (2 * 33 + 1, 2 * 33 + 1)
    # the same seed gives the same samples
    run_cli(capsys, "sample", "--run", trained, "--num", 5, "--out", tmp_path / "t.npz", "--steps", 3)
    assert np.array_equal(np.load(tmp_path / "t.npz")["arr_0"], images)
    # epsilon scaling changes them; a scale <= 0 is refused before anything is written
    run_cli(capsys, "sample", "--run", trained, "--num", 5, "--out", tmp_path / "e.npz", "--steps", 3, "--eps-scale", 1.05)
    assert not np.array_equal(np.load(tmp_path / "e.npz")["arr_0"], images)
    rc, _, err = run_cli(capsys, "sample", "--run", trained, "--num", 5, "--out", tmp_path / "z.npz", "--eps-scale", -1)
    assert rc == 2 and "--eps-scale must be > 0" in err and not (tmp_path / "z.npz").exists()
    # classifier-free guidance needs a class-conditional run
    rc, _, err = run_cli(capsys, "sample", "--run", trained, "--num", 5, "--out", tmp_path / "c.npz", "--cfg-scale", 2)
    assert rc == 2 and "--cfg-scale needs a class-conditional run" in err and not (tmp_path / "c.npz").exists()
    rc, _, err = run_cli(capsys, "sample", "--checkpoint", trained / "checkpoints" / "ema.safetensors", "--num", 5,
                         "--out", tmp_path / "c.npz", "--cfg-scale", 2)     # known from the weights' config alone
    assert rc == 2 and "--cfg-scale needs a class-conditional run" in err and not (tmp_path / "c.npz").exists()


def test_evaluate(trained, tmp_path, capsys):
    rc, out, _ = run_cli(capsys, "evaluate", "--run", trained, "--metrics", "accuracy,pixel-fd,small-fd,speed",
                         "--out", tmp_path / "r.json", "--num-samples", 30, "--steps", 2, "--speed-samples", 2)
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    m = report["metrics"]
    # accuracy and pixel-FD against the same quantities computed here from the run's weights
    from hybvit.datasets import load_data
    from hybvit.evaluate.frechet import pixel_frechet_distance
    from hybvit.sample import load_run
    run, data = load_run(trained), load_data("digits")
    assert m["accuracy"]["test_accuracy"] == (run.predict(data.x_test) == data.y_test).double().mean().item()
    assert m["accuracy"]["num_test_images"] == 360 and "test_accuracy_raw" in m["accuracy"]
    assert m["pixel-fd"]["num_samples"] == 30
    from hybvit.data import to_float, to_uint8                # scored as a saved file holds them: uint8
    assert m["pixel-fd"]["value"] == pytest.approx(pixel_frechet_distance(to_float(to_uint8(run.sample(30, steps=2))),
                                                                          data.x_test))
    assert m["small-fd"]["num_samples"] == 30 and m["small-fd"]["value"] > 0 and "random CNN" in m["small-fd"]["features"]
    metrics = json.loads((trained / "metrics.json").read_text())
    assert m["accuracy"]["test_accuracy"] == metrics["test_accuracy"]
    assert m["speed"]["training"]["steps"] == metrics["steps"] and m["speed"]["training"]["minutes_per_epoch"] > 0
    assert {r["sampler"] for r in m["speed"]["sampling"]} == {"ddim", "dpm-solver++", "ancestral"}
    # the HTML report is one self-contained file: every picture inline
    html = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in html and "<img src=\"data:" in html and 'src="http' not in html
    assert html.count("<img") >= 1 + len(report["training_curves"]["plots"])
    plots = tmp_path / "r-plots"
    assert all((plots / p).exists() for p in report["training_curves"]["plots"].values())
    assert not list(tmp_path.glob(".hybvit-eval-*"))                     # no temporary folder left behind
    # the same numbers for the same checkpoint and seed
    rc, *_ = run_cli(capsys, "evaluate", "--run", trained, "--metrics", "pixel-fd,small-fd", "--out",
                     tmp_path / "again.json", "--num-samples", 30, "--steps", 2, "--no-html")
    again = json.loads((tmp_path / "again.json").read_text())["metrics"]
    assert again["pixel-fd"]["value"] == m["pixel-fd"]["value"] and again["small-fd"]["value"] == m["small-fd"]["value"]
    assert not (tmp_path / "again.html").exists()
    # --eta: stochastic DDIM draws other samples, and the report says which sampler ran
    run_cli(capsys, "evaluate", "--run", trained, "--metrics", "pixel-fd", "--out", tmp_path / "eta.json",
            "--num-samples", 30, "--steps", 2, "--eta", 1, "--no-html")
    eta_report = json.loads((tmp_path / "eta.json").read_text())
    eta = eta_report["metrics"]["pixel-fd"]
    assert eta_report["samples"]["eta"] == 1 and report["samples"]["eta"] == 0 and eta["value"] != m["pixel-fd"]["value"]
    rc, _, err = run_cli(capsys, "evaluate", "--run", trained, "--metrics", "pixel-fd", "--out", tmp_path / "bad.json",
                         "--eta", -1)
    assert rc != 0 and "--eta" in err and not (tmp_path / "bad.json").exists()
    # --eps-scale: other samples, recorded in the report; <= 0 refused with nothing written
    run_cli(capsys, "evaluate", "--run", trained, "--metrics", "pixel-fd", "--out", tmp_path / "es.json",
            "--num-samples", 30, "--steps", 2, "--eps-scale", 1.02, "--no-html")
    es_report = json.loads((tmp_path / "es.json").read_text())
    es = es_report["metrics"]["pixel-fd"]
    assert es_report["samples"]["eps_scale"] == 1.02 and "eps_scale" not in report["samples"]
    assert es["value"] != m["pixel-fd"]["value"]
    rc, _, err = run_cli(capsys, "evaluate", "--run", trained, "--metrics", "pixel-fd", "--out", tmp_path / "bad.json",
                         "--eps-scale", 0)
    assert rc == 2 and "--eps-scale must be > 0" in err and not (tmp_path / "bad.json").exists()
    # --balance-classes reaches the sampler: this 6-step run's classifier calls nearly every sample one class, so
    # the balanced draw cannot fill its quotas and stops with one line, nothing written (the balanced draw itself:
    # test_model.py::test_balanced_samples_...)
    rc, _, err = run_cli(capsys, "evaluate", "--run", trained, "--metrics", "pixel-fd", "--out", tmp_path / "bal.json",
                         "--num-samples", 10, "--steps", 1, "--balance-classes", "--no-html")
    assert rc == 2 and "too few of class" in err and not (tmp_path / "bal.json").exists()
    rc, _, err = run_cli(capsys, "sample", "--run", trained, "--out", tmp_path / "bad.npz", "--num", 4,
                         "--balance-classes", "--class", 3)
    assert rc == 2 and "exclude each other" in err and not (tmp_path / "bad.npz").exists()


def test_evaluate_all_metrics_and_the_html_report(trained, tmp_path, capsys):
    rc, out, _ = run_cli(capsys, "evaluate", "--run", trained, "--metrics", "all", "--out", tmp_path / "r.json",
                         "--num-samples", 20, "--steps", 3, "--bpd-images", 4, "--bpd-timesteps", 5, "--ood-images",
                         20, "--pgd-images", 10, "--pgd-steps", 2, "--speed-samples", 2, "--ece-bins", "10",
                         "--pgd-eps-l2", "50,100", "--pgd-step-factor", "2")
    assert rc == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert set(report["metrics"]) == {"accuracy", "small-fd", "pixel-fd", "bpd", "ece", "ood", "pgd",
                                      "sample-analysis", "speed"}                      # fid/is need Inception
    m = report["metrics"]
    assert m["bpd"]["num_images"] == 4 and m["bpd"]["bits_per_dim"] > 0 and "estimate" in m["bpd"]["estimator"]
    assert set(m["ece"]["ece"]) == {"10"} and 0 <= m["ece"]["ece"]["10"] <= 1
    assert set(m["ood"]["sets"]) == {"interp", "noise"}
    assert "bits_per_dim (negated)" in m["ood"]["sets"]["noise"]["auroc"]
    acc = m["pgd"]["norms"]["linf"]["accuracy"]
    assert len(acc) == 9 and all(0 <= a <= 1 for a in acc)             # eps 0 (clean) and the paper's 8
    assert m["pgd"]["norms"]["l2"]["eps_255"] == [0, 50, 100]
    html = (tmp_path / "r.html").read_text()
    for name in report["metrics"]:
        assert f"<h2>{name}</h2>" in html
    plots = tmp_path / "r-plots"
    for f in ("reliability_10bins.png", "pgd_linf.png", "pgd_l2.png", "ood_roc_interp.png",
              "samples-logsumexp-best.png", "hist-max-softmax.png"):
        assert (plots / f).stat().st_size > 1000, f
    assert html.count("<img") >= 12
    for name in report["metrics"]:                                 # the console summary names every metric
        assert f"{name}:" in out


def test_evaluate_bad_input_leaves_nothing(trained, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "evaluate", "--run", trained, "--metrics", "accuracy,nope", "--out", tmp_path / "r.json")
    assert rc == 2 and "unknown metric" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(capsys, "evaluate", "--run", trained, "--metrics", "accuracy", "--out", tmp_path / "r.json",
                         "--ece-bins", "a,b")
    assert rc == 2 and "--ece-bins" in err
    rc, _, err = run_cli(capsys, "evaluate", "--run", trained, "--metrics", "pgd", "--out", tmp_path / "r.json",
                         "--pgd-eps-linf", "x")
    assert rc == 2 and "--pgd-eps-linf" in err
    rc, _, err = run_cli(capsys, "evaluate", "--run", trained, "--metrics", "fid", "--out", tmp_path / "r.json",
                         "--inception-weights", tmp_path / "none.pth", "--num-samples", 4)
    try:                     # a test extra; where it is missing (a bare GPU box) that is the first error to name
        import torch_fidelity  # noqa: F401
        assert rc == 2 and "--inception-weights" in err
    except ImportError:
        assert rc == 2 and "pip install 'hybvit[fid]'" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_resume_extends_a_run(trained, tmp_path, capsys):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(trained, run)
    rc, *_ = run_cli(capsys, "train", "--resume", run, "--steps", 8, "--quiet")
    assert rc == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == 8


def test_train_is_the_default_command(tmp_path, capsys):
    rc, out, _ = run_cli(capsys, "--steps", 1, "--out", tmp_path / "r", *TINY)
    assert rc == 0 and (tmp_path / "r" / "metrics.json").exists() and "training hybvit (digits-hybvit)" in out


def test_minutes_budget_stops_on_time(tmp_path, capsys):
    import time
    t0 = time.time()
    rc, *_ = run_cli(capsys, "train", "--minutes", 0.03, "--out", tmp_path / "r", *TINY)
    assert rc == 0 and time.time() - t0 < 30
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert metrics["steps"] >= 1 and metrics["train_seconds"] < 0.03 * 60 + 5


def test_presets_lists_and_shows(capsys):
    rc, out, _ = run_cli(capsys, "presets")
    assert rc == 0 and "digits-hybvit" in out and "11,185,068" in out
    rc, out, _ = run_cli(capsys, "presets", "cifar10-hybvit")
    assert json.loads(out)["model"]["dim"] == 384


def test_adapts_model_to_other_data(tmp_path, capsys):
    rng = np.random.default_rng(0)
    p = tmp_path / "d.npz"
    np.savez(p, x_train=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), y_train=np.arange(40) % 3,
             x_test=rng.integers(0, 256, (9, 16, 16, 3), dtype=np.uint8), y_test=np.arange(9) % 3)
    rc, out, _ = run_cli(capsys, "train", "--data", f"npz:{p}", "--steps", 2, "--out", tmp_path / "r", *TINY,
                         "--set", "model.dim=64")
    assert rc == 0                                     # no preset on your data: the own-data preset, fitted
    assert "classes 10 -> 3" in out and "image size 32 -> 16" in out and "patch size 2: a 8x8 grid" in out
    assert "docs/results/own-data.md" in out
    saved = json.loads((tmp_path / "r" / "config.json").read_text())
    cfg = saved["model"]
    assert saved["preset"] == "own-data"
    assert (cfg["image_size"], cfg["channels"], cfg["patch_size"], cfg["num_classes"]) == (16, 3, 2, 3)


# ------------------------------------------------------------------ bad input: one line, exit != 0, nothing written

def bad_npz(tmp_path, name, **arrays):
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


def check_refused(capsys, tmp_path, args, pattern):
    out_dir = tmp_path / "should-not-exist"
    rc, out, err = run_cli(capsys, *args, "--out", out_dir)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hybvit: error: "), err
    import re
    assert re.search(pattern, lines[0]), lines[0]
    assert not out_dir.exists()


def test_bad_inputs(tmp_path, capsys):
    x = np.zeros((4, 8, 8), np.uint8)
    y = np.array([0, 1, 2, 3])
    cases = [
        (["train", "--preset", "nope"], "unknown preset 'nope'.*hybvit presets"),
        (["train", "--mode", "gan"], "unknown mode 'gan'"),
        (["train", "--data", "imagenet99"], "unknown data spec 'imagenet99'"),
        (["train", "--data", f"npz:{tmp_path / 'missing.npz'}"], "does not exist"),
        (["train", "--data", f"folder:{tmp_path / 'nodir'}"], "does not exist"),
        (["train", "--data", f"npz:{bad_npz(tmp_path, 'k.npz', x_train=x, y_train=y)}"],
         "lacks the arrays x_test, y_test"),
        (["train", "--data", f"npz:{bad_npz(tmp_path, 'd.npz', x_train=x[:, 0], y_train=y, x_test=x, y_test=y)}"],
         "expected uint8 \\(N,H,W\\)"),
        (["train", "--data", f"npz:{bad_npz(tmp_path, 'l.npz', x_train=x, y_train=y, x_test=x, y_test=y + 5)}"],
         "labels must lie in"),
        (["train", "--set", "model.patch_size=3"], "not divisible by patch size 3"),
        (["train", "--preset", "digits-hybvit", "--data",
          f"npz:{bad_npz(tmp_path, 's.npz', x_train=x[:, :7, :7], y_train=y, x_test=x[:, :7, :7], y_test=y)}"],
         "image size 7 is not divisible by patch size 2"),
        (["train", "--set", "model.num_classes=2"], "labels out of range"),
        (["train", "--set", "nosuchkey=1"], "unknown or ambiguous --set key"),
        (["train", "--set", "model.dim=abc"], "bad value 'abc' for model.dim"),
        (["train", "--set", "diffusion.schedule=sigmoid"], "unknown diffusion.schedule"),
        (["train", "--set", "train.grad_clip=-1"], r"train.grad_clip must be >= 0 \(got -1.0\)"),
        (["train", "--set", "model.final_norm=true"], "unknown config key 'model.final_norm'"),
        (["train", "--preset", "cifar10-hybvit+bogus"], "unknown overlay '\\+bogus'"),
        (["train", "--set", "data.mix_prob=2"], r"data.mix_prob is a probability in \[0, 1\]"),
        (["train", "--set", "train.label_smoothing=1"], r"train.label_smoothing is a probability in \[0, 1\)"),
        (["train", "--set", "model.dropout=0.1"], "unknown config key 'model.dropout'"),     # removed options
        (["train", "--set", "train.compile_mode=default"], "unknown config key 'train.compile_mode'"),
        (["train", "--mode", "vit", "--set", "model.class_cond=true"], "class_cond conditions the denoiser"),
        (["train", "--set", "data.diffusion_augment=0.2"], "would leak turned and shifted images into the samples"),
        (["train", "--set", "data.diffusion_augment=2", "--set", "model.augment_cond=true"],
         "data.diffusion_augment is a probability"),
        (["train", "--resume", tmp_path / "no-run"], "cannot resume"),
    ]
    for args, pattern in cases:
        check_refused(capsys, tmp_path, args, pattern)


def test_corrupt_image_in_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / "f" / split / c).mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(tmp_path / "f" / split / c / f"{i}.png")
    (tmp_path / "f" / "test" / "b" / "zz-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    check_refused(capsys, tmp_path, ["train", "--data", f"folder:{tmp_path / 'f'}"], "zz-corrupt.png")


def test_resume_with_different_model_config(trained, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "train", "--resume", trained, "--set", "model.dim=64")
    assert rc == 2 and "different model config (model.dim: 32 -> 64)" in err and len(err.strip().splitlines()) == 1
    rc, _, err = run_cli(capsys, "train", "--resume", trained, "--mode", "vit")
    assert rc == 2 and "mode" in err


def test_refuses_to_overwrite_a_run(trained, capsys):
    rc, _, err = run_cli(capsys, "train", "--out", trained, "--steps", 1)
    assert rc == 2 and "already holds a run" in err


def test_nan_loss_via_cli(tmp_path, capsys):
    run = tmp_path / "nan"
    assert main(["train", "--steps", "3", "--out", str(run)] + TINY) == 0
    before = (run / "checkpoints" / "last.pt").read_bytes()
    rc, _, err = run_cli(capsys, "train", "--resume", run, "--steps", 9, "--set", "alpha=1e39", "--set", "ckpt_every=1",
                         "--quiet")
    assert rc == 2 and "last good checkpoint" in err and len(err.strip().splitlines()) == 1
    assert (run / "checkpoints" / "last.pt").read_bytes() == before


def test_sample_and_evaluate_bad_input(trained, tmp_path, capsys):
    rc, _, err = run_cli(capsys, "sample", "--run", trained, "--num", 2, "--out", tmp_path / "x.jpg")
    assert rc == 2 and ".png" in err
    rc, _, err = run_cli(capsys, "sample", "--run", tmp_path / "nope", "--num", 2, "--out", tmp_path / "x.png")
    assert rc == 2 and "does not exist" in err
    rc, _, err = run_cli(capsys, "evaluate", "--run", trained, "--metrics", "accuracy,magic", "--out", tmp_path / "r.json")
    assert rc == 2 and "unknown metric(s) magic" in err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "r.json").exists()


def test_entry_point_subprocess(tmp_path):
    r = subprocess.run([sys.executable, "-m", "hybvit", "train", "--preset", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().startswith("hybvit: error: unknown preset")
    r = subprocess.run([sys.executable, "-m", "hybvit", "presets"], capture_output=True, text=True)
    assert r.returncode == 0 and "cifar10-hybvit" in r.stdout


def test_sigterm_saves_a_checkpoint_and_the_run_resumes(tmp_path):
    """The paper's code deleted the run directory on SIGTERM; here it checkpoints and exits cleanly."""
    import signal
    import time
    run = tmp_path / "r"
    proc = subprocess.Popen([sys.executable, "-m", "hybvit", "train", "--steps", "100000", "--out", str(run)] + TINY,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "tb").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 75, err                  # stopped with a checkpoint: not 0, so scripts can tell
    assert "stopped at step" in out and "--resume" in out
    import torch
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert 0 < state["step"] < 100000
    assert not (run / "metrics.json").exists()
    assert main(["train", "--resume", str(run), "--steps", str(state["step"] + 2), "--quiet"]) == 0
    assert json.loads((run / "metrics.json").read_text())["steps"] == state["step"] + 2


def test_class_conditional_run_end_to_end(tmp_path, capsys):
    """--set model.class_cond=true trains, samples (each class in turn, or --class K through the conditional
    denoiser), evaluates with --cfg-scale and records it; data without labels is refused for it."""
    from types import SimpleNamespace
    from hybvit.resolve import check_data_fits as _check_data_fits
    from hybvit.config import preset_config
    from hybvit.errors import HybvitError
    run = tmp_path / "cc"
    assert main(["train", "--steps", "4", "--out", str(run), "--set", "model.class_cond=true"] + TINY) == 0
    rc, *_ = run_cli(capsys, "sample", "--run", run, "--num", 6, "--steps", 2, "--out", tmp_path / "a.npz",
                     "--cfg-scale", 1.5)
    assert rc == 0 and np.load(tmp_path / "a.npz")["arr_0"].shape == (6, 8, 8, 1)
    rc, *_ = run_cli(capsys, "sample", "--run", run, "--num", 4, "--steps", 2, "--out", tmp_path / "k.npz",
                     "--class", 3, "--guidance-scale", 0)
    assert rc == 0
    rc, *_ = run_cli(capsys, "evaluate", "--run", run, "--metrics", "pixel-fd", "--num-samples", 20, "--steps", 2,
                     "--cfg-scale", 1.5, "--no-html", "--out", tmp_path / "e.json")
    samples = json.loads((tmp_path / "e.json").read_text())["samples"]
    assert rc == 0 and samples["cfg_scale"] == 1.5 and samples["labels"] == "sample i: class i mod K"
    cfg = preset_config("digits-hybvit")
    cfg.train.mode, cfg.model.class_cond = "genvit", True
    unlabeled = SimpleNamespace(num_classes=0, name="faces", channels=1, image_size=8)
    with pytest.raises(HybvitError, match="no class labels for model.class_cond"):
        _check_data_fits(cfg, unlabeled)


@pytest.mark.skipif(not Path("/proc/self").exists(), reason="needs /proc, a folder where nothing can be created")
@pytest.mark.parametrize("argv", [["train", "--steps", "1", "--out", "/proc/run"],
                                  ["sample", "--run", "{run}", "--num", "2", "--out", "/proc/s.png"],
                                  ["sample", "--run", "{run}", "--num", "2", "--out", "/proc/pngs/"],
                                  ["import", "{ckpt}", "--out", "/proc/imported"],
                                  ["export", "--run", "{run}", "--out", "/proc/model"]])
def test_an_out_where_nothing_can_be_created_is_one_line(trained, tmp_path, capsys, argv):
    torch.save({"model_state_dict": {"betas": torch.zeros(2)}}, tmp_path / "c.pth")
    argv = [a.replace("{run}", str(trained)).replace("{ckpt}", str(tmp_path / "c.pth")) for a in argv]
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 2 and err.count("\n") == 1 and "/proc/" in err and "choose another --out" in err, err
