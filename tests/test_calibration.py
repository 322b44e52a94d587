"""ECE (Sec. 5.2.1 / App. C.5): synthetic predictors with known calibration, torchmetrics agreement, plots."""
import math

import pytest
import torch

from hybvit.errors import HybvitError
from hybvit.evaluate.calibration import calibration, evaluate_ece

K = 10


def synthetic(conf: torch.Tensor, true_acc: torch.Tensor, g: torch.Generator):
    """Probabilities whose max is `conf` on a random predicted class, correct with probability `true_acc`."""
    n = len(conf)
    pred = torch.randint(0, K, (n,), generator=g)
    probs = ((1 - conf) / (K - 1))[:, None].repeat(1, K)
    probs[torch.arange(n), pred] = conf
    correct = torch.rand(n, generator=g, dtype=torch.float64) < true_acc
    wrong = (pred + torch.randint(1, K, (n,), generator=g)) % K
    labels = torch.where(correct, pred, wrong)
    return probs, labels


def test_perfectly_calibrated_has_ece_near_zero():
    g = torch.Generator().manual_seed(0)
    c = 0.15 + 0.85 * torch.rand(200_000, generator=g, dtype=torch.float64)
    probs, labels = synthetic(c, c, g)
    for n_bins in (15, 20):
        r = calibration(probs, labels, n_bins)
        assert r["ece"] < 0.01, r["ece"]
        assert r["mce"] < 0.05
        assert sum(b["count"] for b in r["bins"]) == len(labels)
        assert r["accuracy"] == pytest.approx(r["mean_confidence"], abs=0.005)


def test_overconfident_ece_equals_expected_gap():
    """Reported confidence sqrt(c) where the true accuracy is c ~ U(a, b): every bin is over-confident, so
    ECE = E[sqrt(c) - c] whatever the binning (the absolute values never cancel)."""
    a, b = 0.2, 0.9
    expected = ((2 / 3) * (b ** 1.5 - a ** 1.5) - (b ** 2 - a ** 2) / 2) / (b - a)
    g = torch.Generator().manual_seed(1)
    c = a + (b - a) * torch.rand(200_000, generator=g, dtype=torch.float64)
    probs, labels = synthetic(c.sqrt(), c, g)
    for n_bins in (10, 15, 20):
        r = calibration(probs, labels, n_bins)
        assert r["ece"] == pytest.approx(expected, abs=0.0015), (n_bins, r["ece"], expected)
        assert r["mean_confidence"] - r["accuracy"] == pytest.approx(expected, abs=0.0015)
    assert expected > 0.1  # a real gap, far from the sampling noise


def test_mixed_calibration_matches_per_bin_formula():
    """Reported confidence r = 0.5 + k (c - 0.5) with c ~ U(a, b): under-confident below 0.5, over-confident
    above. For the bin (l, u] of r, c runs over an interval [c1, c2] and acc - conf = (1 - k)(mid - 0.5) with mid
    its midpoint, so ECE = sum over bins (c2 - c1)/(b - a) * |1 - k| * |mid - 0.5|, which depends on the bins."""
    a, b, k = 0.3, 0.75, 1.6
    g = torch.Generator().manual_seed(2)
    c = a + (b - a) * torch.rand(200_000, generator=g, dtype=torch.float64)
    probs, labels = synthetic(0.5 + k * (c - 0.5), c, g)
    for n_bins in (3, 5, 7, 15, 20):  # expected 0.0539, 0.0631, 0.0657, 0.0678, 0.0683
        expected = 0.0
        for m in range(n_bins):
            lo, hi = m / n_bins, (m + 1) / n_bins
            c1, c2 = max(a, 0.5 + (lo - 0.5) / k), min(b, 0.5 + (hi - 0.5) / k)
            if c2 > c1:
                expected += (c2 - c1) / (b - a) * abs(1 - k) * abs((c1 + c2) / 2 - 0.5)
        r = calibration(probs, labels, n_bins)
        assert r["ece"] == pytest.approx(expected, abs=0.0015), (n_bins, r["ece"], expected)
    # one bin: the gaps cancel down to |accuracy - mean confidence|
    assert calibration(probs, labels, 1)["ece"] == pytest.approx(abs((1 - k) * ((a + b) / 2 - 0.5)), abs=0.0015)


@pytest.mark.parametrize("n_bins", [15, 20])
def test_agrees_with_torchmetrics(n_bins):
    from torchmetrics.classification import MulticlassCalibrationError
    g = torch.Generator().manual_seed(3)
    logits = 3 * torch.randn(5000, K, generator=g)
    probs = torch.softmax(logits, 1)
    labels = torch.where(torch.rand(5000, generator=g) < 0.6, logits.argmax(1),
                         torch.randint(0, K, (5000,), generator=g))
    metric = MulticlassCalibrationError(num_classes=K, n_bins=n_bins, norm="l1")
    metric.update(probs, labels)
    ours = calibration(probs, labels, n_bins)
    assert ours["ece"] == pytest.approx(float(metric.compute()), abs=1e-6)
    mce = MulticlassCalibrationError(num_classes=K, n_bins=n_bins, norm="max")
    mce.update(probs, labels)
    assert ours["mce"] == pytest.approx(float(mce.compute()), abs=1e-6)
    assert sum(b["count"] for b in ours["bins"]) == 5000


def test_bins_nll_brier_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [1.0, 0.0], [0.5, 0.5]])
    labels = torch.tensor([0, 1, 1, 0, 1])
    r = calibration(probs, labels, n_bins=4)
    # bins (0, .25], (.25, .5], (.5, .75], (.75, 1]; conf 0.9 0.6 0.7 1.0 0.5 (exactly 0.5 -> second bin)
    assert [b["count"] for b in r["bins"]] == [0, 1, 2, 2]
    assert r["bins"][0]["accuracy"] is None
    assert r["bins"][2]["accuracy"] == pytest.approx(0.5) and r["bins"][2]["confidence"] == pytest.approx(0.65)
    assert r["bins"][3]["accuracy"] == pytest.approx(1.0) and r["bins"][3]["confidence"] == pytest.approx(0.95)
    # the tie [0.5, 0.5] predicts class 0 (first maximum): wrong
    assert r["accuracy"] == pytest.approx(3 / 5)
    assert r["ece"] == pytest.approx((1 * 0.5 + 2 * 0.15 + 2 * 0.05) / 5)
    assert r["mce"] == pytest.approx(0.5)
    assert r["nll"] == pytest.approx(-(math.log(0.9) + math.log(0.4) + math.log(0.7) + 0 + math.log(0.5)) / 5)
    assert r["brier"] == pytest.approx((2 * 0.01 + 2 * 0.36 + 2 * 0.09 + 0 + 2 * 0.25) / 5)


def test_rejects_logits():
    with pytest.raises(HybvitError, match="softmax"):
        calibration(torch.randn(10, 3), torch.zeros(10, dtype=torch.long))


def test_evaluate_ece_on_tiny_run(tiny_run, digits, tmp_path):
    r = evaluate_ece(tiny_run, digits, (15, 20), out_dir=tmp_path)
    assert r["num_images"] == len(digits.x_test)
    assert set(r["ece"]) == {"15", "20"} and all(0 <= v <= 1 for v in r["ece"].values())
    logits = tiny_run.classify(digits.x_test)
    direct = calibration(torch.softmax(logits.double(), 1), digits.y_test, 20)
    assert r["ece"]["20"] == pytest.approx(direct["ece"], abs=1e-12)
    assert r["accuracy"] == pytest.approx(float((logits.argmax(1) == digits.y_test).float().mean()))
    for k in ("15", "20"):
        png = tmp_path / r["plots"][k]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_without_matplotlib_raise_one_line_error(monkeypatch, tmp_path):
    import sys
    from hybvit.evaluate.plots import reliability_diagram
    bins = calibration(torch.tensor([[0.8, 0.2]]), torch.tensor([0]), 4)["bins"]
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)   # makes the import fail
    with pytest.raises(HybvitError, match="pip install matplotlib") as e:
        reliability_diagram(tmp_path / "r.png", bins)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "r.png").exists()
