"""benchmarks/gpu_curve.py, the CIFAR-10 learning curve for a lent GPU, on its CPU smoke path: the training run is
stopped by the budget (SIGTERM after the minimum epochs), every epoch's accuracies are read back, samples are drawn
and scored, and the JSON and plots are written, so the script cannot rot between GPUs."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_curve_smoke(tmp_path):
    out = tmp_path / "curve"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_curve.py"), "--smoke", "--minutes", "0",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (result_file,) = out.glob("gpu-curve-cpu-smoke-*.json")
    result = json.loads(result_file.read_text())
    epochs = result["epochs"]
    assert [e["epoch"] for e in epochs][:2] == [1, 2]              # the minimum epochs, then the budget stopped it
    assert result["train_exit_status"] == 75 and result["stopped_at_step"] >= 2 * result["steps_per_epoch"]
    assert all(0 <= e["test_accuracy_raw"] <= 1 and 0 <= e["test_accuracy_ema"] <= 1 for e in epochs)
    assert result["throughput"]["images_per_second"] > 0 and result["samples"]["num"] == 40
    assert result["samples"]["small_fd"] > 0 and result["official_raw_accuracy_percent"]["10"] == 65.04
    assert result_file.with_suffix(".png").exists() and (out / f"{result_file.stem}-samples.png").exists()
