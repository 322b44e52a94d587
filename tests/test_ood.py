"""OOD detection (Sec. 5.2.2, Table 3; App. C.3, Table 11): AUROC, interp/noise sets, evaluate_ood."""
import numpy as np
import pytest
import torch

from hybvit.data import to_float
from hybvit.errors import HybvitError
from hybvit.evaluate.ood import (auroc, evaluate_ood, interp_images, match_channels, noise_images, roc_curve,
                                 score_logits)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_equals_sklearn_with_ties(seed):
    from sklearn.metrics import roc_auc_score
    g = torch.Generator().manual_seed(seed)
    # integer-valued scores: many ties within and across the two sets
    s_in = torch.randint(0, 20, (300 + 17 * seed,), generator=g).double() + 2
    s_out = torch.randint(0, 15, (211,), generator=g).double()
    y = np.r_[np.ones(len(s_in)), np.zeros(len(s_out))]
    ref = roc_auc_score(y, np.r_[s_in.numpy(), s_out.numpy()])
    assert auroc(s_in, s_out) == pytest.approx(ref, abs=1e-12)
    # continuous scores too
    a, b = torch.randn(123, generator=g), torch.randn(77, generator=g) - 0.3
    ref = roc_auc_score(np.r_[np.ones(123), np.zeros(77)], np.r_[a.numpy(), b.numpy()])
    assert auroc(a, b) == pytest.approx(ref, abs=1e-12)


def test_auroc_extremes_and_ties():
    a, b = torch.arange(10.0) + 100, torch.arange(7.0)
    assert auroc(a, b) == 1.0
    assert auroc(b, a) == 0.0
    assert auroc(torch.ones(5), torch.ones(8)) == 0.5        # all tied: half credit
    assert auroc(torch.tensor([1.0, 2.0]), torch.tensor([1.0])) == pytest.approx(0.75)
    with pytest.raises(HybvitError):
        auroc(torch.tensor([]), torch.ones(3))
    with pytest.raises(HybvitError):
        auroc(torch.tensor([float("nan")]), torch.ones(3))


def test_roc_curve_area_is_auroc():
    g = torch.Generator().manual_seed(5)
    a = torch.randint(0, 12, (150,), generator=g).double()
    b = torch.randint(0, 9, (90,), generator=g).double()
    fpr, tpr = roc_curve(a, b)
    assert fpr[0] == 0 and tpr[0] == 0 and fpr[-1] == 1 and tpr[-1] == 1
    assert (fpr.diff() >= 0).all() and (tpr.diff() >= 0).all()
    area = float(((fpr[1:] - fpr[:-1]) * (tpr[1:] + tpr[:-1]) / 2).sum())
    assert area == pytest.approx(auroc(a, b), abs=1e-12)


def test_score_logits():
    logits = torch.tensor([[0.0, 0.0], [10.0, -10.0], [1.0, 2.0]])
    s = score_logits(logits)
    assert torch.allclose(s["logsumexp"], torch.logsumexp(logits.double(), 1))
    assert s["max_softmax"][0] == pytest.approx(0.5)
    assert s["max_softmax"][1] > 0.999 and s["logsumexp"][1] == pytest.approx(10.0, abs=1e-6)
    assert s["max_softmax"][2] == pytest.approx(1 / (1 + np.exp(-1.0)))


def test_interp_images_are_the_paper_codes_consecutive_batch_means():
    """Task/eval_tasks.py: a shuffled pass over the test set in batches of 100, each batch averaged (as floats)
    with the batch before it: every image but the first batch's is averaged once with a different image."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (350, 3, 4, 4), generator=g, dtype=torch.uint8)
    out, pairs = interp_images(x, None, torch.Generator().manual_seed(1), return_pairs=True)
    assert out.dtype == torch.float32 and out.shape == (250, 3, 4, 4)            # N - 100
    i, j = pairs[:, 0], pairs[:, 1]
    assert (i != j).all() and len(set(i.tolist())) == 250 and len(set(i.tolist()) | set(j.tolist())) == 350
    assert set(j[100:].tolist()) <= set(i[:150].tolist())                        # each batch mixes the one before
    torch.testing.assert_close(out, (to_float(x[i]) + to_float(x[j])) / 2)       # the float mean, not rounded
    assert ((out + 1) * 127.5 % 1 != 0).any()
    same = interp_images(x, 40, torch.Generator().manual_seed(1))
    assert torch.equal(same, out[:40])
    assert interp_images(x[:7], None, g).shape[0] == 4                         # small sets: half-batches
    with pytest.raises(HybvitError):
        interp_images(x[:1], 3)


def test_noise_images():
    n = noise_images(500, (1, 8, 8), torch.Generator().manual_seed(0))
    assert n.dtype == torch.uint8 and n.shape == (500, 1, 8, 8)
    assert int(n.min()) == 0 and int(n.max()) == 255
    assert abs(n.float().mean().item() - 127.5) < 2
    assert torch.equal(n, noise_images(500, (1, 8, 8), torch.Generator().manual_seed(0)))


def test_match_channels():
    rgb = torch.tensor([[[[255]], [[0]], [[0]]], [[[10]], [[20]], [[30]]]], dtype=torch.uint8)  # (2, 3, 1, 1)
    gray = match_channels(rgb, 1)
    assert gray.shape == (2, 1, 1, 1) and gray.flatten().tolist() == [76, 18]   # 0.299*255, 0.299*10+...
    assert torch.equal(match_channels(gray, 3), gray.repeat(1, 3, 1, 1))
    with pytest.raises(HybvitError, match="channels"):
        match_channels(torch.zeros(2, 2, 4, 4, dtype=torch.uint8), 3)


def test_evaluate_ood_tiny_run(tiny_run, digits, tmp_path):
    calls = []

    def neg_brightness(x):   # an extra score: darker = more in-distribution (digits are mostly black)
        calls.append(x.dtype)
        return -x.float().mean(dim=(1, 2, 3))

    r = evaluate_ood(tiny_run, digits, ["interp", "noise"], num_images=200, seed=0,
                     extra_scores={"neg_brightness": neg_brightness}, out_dir=tmp_path)
    assert r["in_distribution"]["num_images"] == 200 and r["scores"] == ["logsumexp", "max_softmax", "neg_brightness"]
    for name in ("interp", "noise"):
        entry = r["sets"][name]
        assert entry["num_images"] == 200
        assert set(entry["auroc"]) == set(r["scores"])
        assert all(0.0 <= v <= 1.0 for v in entry["auroc"].values())
        assert (tmp_path / r["plots"][name]).read_bytes()[:4] == b"\x89PNG"
    assert calls == [torch.uint8, torch.float32, torch.uint8]      # in-distribution, interp (floats), noise
    assert r["protocol"].startswith("the first 200 images")
    whole = evaluate_ood(tiny_run, digits, ["interp"], seed=0)
    assert whole["protocol"].startswith("paper: whole test sets")
    assert whole["in_distribution"]["num_images"] == 360 and whole["sets"]["interp"]["num_images"] == 260
    # uniform noise is much brighter than digits: the brightness score separates it almost perfectly
    assert r["sets"]["noise"]["auroc"]["neg_brightness"] > 0.95

    again = evaluate_ood(tiny_run, digits, ["noise", "interp"], num_images=200, seed=0,
                         extra_scores={"neg_brightness": neg_brightness})
    assert again["sets"] == r["sets"]            # deterministic, independent of the order of the sets
    other = evaluate_ood(tiny_run, digits, ["noise"], num_images=200, seed=1)
    assert other["sets"]["noise"]["auroc"]["logsumexp"] != r["sets"]["noise"]["auroc"]["logsumexp"]


def test_evaluate_ood_data_spec_converts_channels_and_size(tiny_run, digits, tmp_path):
    """An RGB 16x16 data set (npz spec) is resized to 8x8 and converted to grayscale; matches a direct computation."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (30, 16, 16, 3), generator=g, dtype=torch.uint8).numpy()
    y = np.arange(30) % 3
    path = tmp_path / "rgb.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    spec = f"npz:{path}"
    r = evaluate_ood(tiny_run, digits, [spec], num_images=25)
    assert r["sets"][spec]["num_images"] == 25

    from hybvit.datasets import load_data
    ood_x = match_channels(load_data(spec, 8).x_test[:25], 1)
    s_in = score_logits(tiny_run.classify(digits.x_test[:25]))
    s_out = score_logits(tiny_run.classify(ood_x))
    for k in ("logsumexp", "max_softmax"):
        assert r["sets"][spec]["auroc"][k] == pytest.approx(auroc(s_in[k], s_out[k]), abs=1e-12)


def test_evaluate_ood_errors(tiny_run, digits):
    with pytest.raises(HybvitError, match="clash"):
        evaluate_ood(tiny_run, digits, ["noise"], num_images=10, extra_scores={"logsumexp": lambda x: x})
    with pytest.raises(HybvitError, match="returned"):
        evaluate_ood(tiny_run, digits, ["noise"], num_images=10, extra_scores={"bad": lambda x: torch.zeros(3)})
    with pytest.raises(HybvitError, match="unknown data spec"):
        evaluate_ood(tiny_run, digits, ["no-such-set"], num_images=10)


def test_bpd_ood_score_converts_v_prediction_to_eps(tiny_cfg, digits):
    """The OOD bits/dim score of a v-prediction run bounds the likelihood with eps = sigma_t x_t + alpha_t v, not
    with the raw output (which an earlier version passed as eps)."""
    from hybvit.diffusion import GaussianDiffusion
    from hybvit.evaluate import EvalOptions, _bpd_score
    from hybvit.likelihood import bits_per_dim
    from hybvit.model import ViT
    from hybvit.sample import Run
    from hybvit.data import to_float
    cfg = tiny_cfg(amp="fp32")
    cfg.diffusion.prediction = "v"
    torch.manual_seed(0)
    model = ViT(cfg.model).eval().requires_grad_(False)
    run = Run(model, cfg, GaussianDiffusion.from_config(cfg.diffusion), torch.device("cpu"))
    x = digits.x_test[:6]
    got = _bpd_score(run, EvalOptions(seed=3, batch_size=500, bpd_timesteps=5))(x)
    g = torch.Generator().manual_seed(3)
    converted = run.diffusion.eps_model(lambda xt, t: model.denoise(xt, t))
    want = -bits_per_dim(run.diffusion, converted, to_float(x), generator=g, timesteps=5)["total"].double()
    torch.testing.assert_close(got, want)
    raw = -bits_per_dim(run.diffusion, lambda xt, t: model.denoise(xt, t), to_float(x),
                        generator=torch.Generator().manual_seed(3), timesteps=5)["total"].double()
    assert (got - raw).abs().max() > 1e-3                  # the check can tell the two apart


def test_celeba_ood_set_is_the_test_split_stretched_not_cropped(tmp_path, digits):
    """The paper's code read CelebA's test split with Resize((32, 32)): whole images, aspect ratio not kept."""
    from PIL import Image
    from hybvit.evaluate.ood import ood_images
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    for k in range(8):                                     # 32 wide, 8 high: left quarter black, the rest white
        img = np.full((8, 32, 3), 255, dtype=np.uint8)
        img[:, :8] = 0
        Image.fromarray(img).save(folder / f"{k:06d}.png")
    (tmp_path / "celeba" / "list_eval_partition.txt").write_text(
        "".join(f"{k:06d}.png {2 if k >= 6 else 0}\n" for k in range(8)))
    x = ood_images(digits, f"celeba128:{tmp_path}", None, torch.Generator())
    assert x.shape == (2, 1, 8, 8)                          # the 2 test images, at the data's size and channels
    columns = x[0, 0].float().mean(0)                       # the black quarter survives as the first 2 columns
    assert columns[:2].max() < 60 and columns[3:].min() > 200
