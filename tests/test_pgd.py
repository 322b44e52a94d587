"""PGD robustness (Sec. 5.2.3, Fig. 7; App. C.4, Table 12): constraints, analytic worst cases, a trained model."""
import pytest
import torch

from hybvit.errors import HybvitError
from hybvit.evaluate.robustness import PAPER_EPS, evaluate_pgd, pgd, robust_accuracy_curve


def linear_model(dim, classes=2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(classes, dim, generator=g, dtype=dtype)
    b = torch.randn(classes, generator=g, dtype=dtype)
    return W, b, (lambda x: x.flatten(1) @ W.T + b)


def small_mlp(dim, seed=0):
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(dim, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))
    return net


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("linf", 0.3), ("l2", 0.5), ("l2", 3.0)])
def test_perturbation_stays_in_ball_and_box(norm, eps):
    g = torch.Generator().manual_seed(0)
    # many pixels at exactly 0 or 1, where the box is active, and some in between
    x = torch.randint(0, 3, (16, 3, 6, 6), generator=g).float() / 2
    y = torch.randint(0, 5, (16,), generator=g)
    net = small_mlp(3 * 36)
    with torch.no_grad():                      # works when called under no_grad
        x_adv = pgd(net, x, y, eps, norm, steps=10, generator=torch.Generator().manual_seed(1))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    d = (x_adv - x).flatten(1)
    if norm == "linf":
        assert (d.abs().amax(1) <= eps + 1e-6).all()
        assert (d.abs().amax(1) > 0.5 * min(eps, 0.5)).all()   # it did move
    else:
        assert (d.norm(dim=1) <= eps * (1 + 1e-5)).all()
        assert (d.norm(dim=1) > 0.3 * eps).all()
    assert all(p.grad is None for p in net.parameters())      # no gradient reached the weights
    loss = torch.nn.functional.cross_entropy
    with torch.no_grad():
        assert loss(net(x_adv), y) > loss(net(x), y)           # it ascended the loss
    again = pgd(net, x, y, eps, norm, steps=10, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, x_adv)                            # deterministic for a generator seed


def test_l2_attack_on_linear_model_finds_analytic_worst_case():
    """For a 2-class linear model the worst L2 perturbation is -eps * w_diff / ||w_diff||, reducing the margin
    (logit of y minus the other) by exactly eps * ||w_diff||; no perturbation in the ball can reduce it more."""
    dim, eps = 3 * 4 * 4, 0.1
    W, _, f = linear_model(dim)
    g = torch.Generator().manual_seed(2)
    x = 0.5 + 0.05 * (torch.rand(40, 3, 4, 4, generator=g, dtype=torch.float64) - 0.5)  # box never active
    y = torch.randint(0, 2, (40,), generator=g)
    w_diff = W[y] - W[1 - y]                                   # (40, dim)

    def margin(z):
        logits = f(z)
        return logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, (1 - y)[:, None]).squeeze(1)

    best = eps * w_diff.norm(dim=1)
    for steps, step_size, rel in ((200, 0.05 * eps, 1e-4), (50, None, 0.03)):  # 50 steps: part of
        # the random start orthogonal to w_diff has not yet been projected away
        x_adv = pgd(f, x, y, eps, "l2", steps=steps, step_size=step_size, generator=torch.Generator().manual_seed(3))
        drop = margin(x) - margin(x_adv)
        assert (drop <= best * (1 + 1e-9)).all()                # never beyond the analytic optimum
        assert (drop >= best * (1 - rel)).all(), (steps, (drop / best).min())
        cos = torch.nn.functional.cosine_similarity((x_adv - x).flatten(1), -w_diff, dim=1)
        assert (cos > 1 - 2 * rel).all()


def test_linf_attack_on_linear_model_finds_analytic_worst_case():
    """L-inf: the worst perturbation is -eps * sign(w_diff), reducing the margin by eps * ||w_diff||_1."""
    dim, eps = 3 * 4 * 4, 4 / 255
    W, _, f = linear_model(dim, seed=1)
    g = torch.Generator().manual_seed(4)
    x = 0.3 + 0.4 * torch.rand(25, 3, 4, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (25,), generator=g)
    w_diff = W[y] - W[1 - y]
    x_adv = pgd(f, x, y, eps, "linf", steps=50, generator=torch.Generator().manual_seed(5))
    assert torch.allclose((x_adv - x).flatten(1), -eps * w_diff.sign(), atol=1e-12)
    logits, logits_adv = f(x), f(x_adv)
    idx = torch.arange(25)
    drop = (logits[idx, y] - logits[idx, 1 - y]) - (logits_adv[idx, y] - logits_adv[idx, 1 - y])
    assert torch.allclose(drop, eps * w_diff.abs().sum(1), rtol=1e-9)


def test_paper_eps_and_curve_basics():
    assert PAPER_EPS["linf"] == [1, 2, 4, 8, 12, 16, 22, 30]           # Table 12, L-inf columns
    assert PAPER_EPS["l2"] == list(range(50, 501, 50))                  # the official script's L2 radii
    *_, f = linear_model(12, seed=3, dtype=torch.float32)
    x = torch.rand(30, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    y = f(x).argmax(1)                                  # all correct when clean
    curve = robust_accuracy_curve(f, x, y, [0.2, 0.05], "linf", steps=5, generator=torch.Generator().manual_seed(0),
                                  batch_size=7)
    assert [c["eps"] for c in curve] == [0.0, 0.05, 0.2]
    assert curve[0]["accuracy"] == 1.0 and curve[2]["accuracy"] <= curve[1]["accuracy"] < 1.0
    with pytest.raises(HybvitError):
        pgd(f, x, y, 0.1, "l1", steps=3)


def test_accuracy_falls_with_eps_on_trained_digits_model(tiny_cfg, tmp_path):
    from hybvit.datasets import load_data
    from hybvit.sample import load_run
    from hybvit.train import train
    data = load_data("digits")
    cfg = tiny_cfg(mode="vit", steps=150, lr=3e-3, warmup_epochs=0, ema_warmup=True)
    metrics = train(cfg, data, tmp_path / "run", progress=False)
    assert metrics["test_accuracy"] > 0.6
    run = load_run(tmp_path / "run", device="cpu")

    eps = {"linf": [4, 8, 16, 32, 64], "l2": [32, 64, 128, 256]}
    r = evaluate_pgd(run, data, eps=eps, num_images=100, steps=5, seed=0, batch_size=64, out_dir=tmp_path / "pgd")
    assert r["num_images"] == 100 and r["steps"] == 5
    assert r["protocol"].startswith("paper") and "every iterate" in r["protocol"] and r["step_size"] == "20/255"
    assert "seed 123" in r["images"]
    for norm in ("linf", "l2"):
        acc = r["norms"][norm]["accuracy"]
        assert r["norms"][norm]["eps_255"] == [0.0] + [float(e) for e in eps[norm]]
        assert acc[0] > 0.6                                         # clean accuracy on these 100 images
        assert all(a2 <= a1 for a1, a2 in zip(acc, acc[1:])), acc   # never rises with eps
        assert acc[-1] < 0.5 * acc[0], acc
        assert (tmp_path / "pgd" / r["plots"][norm]).read_bytes()[:4] == b"\x89PNG"
    assert all(p.grad is None for p in run.model.parameters())

    # the attack beats random perturbations of the same size (random start only: steps = 0)
    x01 = data.x_test[:100].float() / 255
    y = data.y_test[:100]

    def f(z):
        return run.model.classify(2 * z - 1)

    def curve(steps):
        return robust_accuracy_curve(f, x01, y, [32 / 255], "linf", steps=steps,
                                     generator=torch.Generator().manual_seed(0))[1]["accuracy"]

    noise, attack = curve(0), curve(5)
    assert attack < noise - 0.2, (attack, noise)


def test_paper_protocol_counts_an_image_fooled_only_at_an_intermediate_iterate():
    """A classifier that is wrong only on its 6th call, an iterate in the middle of the attack: the paper's
    criterion (correct at every iterate) counts the image as broken, the madry one (last iterate) as robust."""
    calls = []
    W = torch.randn(12, 2, generator=torch.Generator().manual_seed(0))

    def model_fn(x):
        calls.append(None)
        bias = torch.tensor([0.0, 100.0]) if len(calls) == 6 else torch.tensor([100.0, 0.0])
        return x.flatten(1) @ W + bias
    x, y = torch.rand(1, 3, 2, 2, generator=torch.Generator().manual_seed(1)), torch.tensor([0])
    paper = robust_accuracy_curve(model_fn, x, y, [8 / 255], "linf", steps=10, step_size_factor=None,
                                  generator=torch.Generator().manual_seed(2))
    assert len(calls) == 13                     # clean (eps 0), clean again, 10 steps, the last iterate
    calls.clear()
    madry = robust_accuracy_curve(model_fn, x, y, [8 / 255], "linf", steps=10, step_size_factor=2.5,
                                  generator=torch.Generator().manual_seed(2))
    assert [c["accuracy"] for c in paper] == [1.0, 0.0] and [c["accuracy"] for c in madry] == [1.0, 1.0]


def test_paper_step_is_twenty_over_255():
    """With the paper's fixed step an L-inf attack on a linear model reaches the corner of a ball smaller than
    one step in a single step; the madry step (2.5 eps / 50) takes many."""
    from hybvit.evaluate.robustness import PAPER_STEP, pgd_attack
    assert PAPER_STEP == 20 / 255
    dim, eps = 3 * 4 * 4, 8 / 255
    W, _, f = linear_model(dim, seed=1)
    x = 0.3 + 0.4 * torch.rand(10, 3, 4, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    y = torch.randint(0, 2, (10,), generator=torch.Generator().manual_seed(5))
    corner = -eps * (W[y] - W[1 - y]).sign()
    one = pgd_attack(f, x, y, eps, "linf", 1, PAPER_STEP, torch.Generator().manual_seed(6))[0]
    assert torch.allclose((one - x).flatten(1), corner, atol=1e-12)
    small = pgd_attack(f, x, y, eps, "linf", 1, 2.5 * eps / 50, torch.Generator().manual_seed(6))[0]
    assert not torch.allclose((small - x).flatten(1), corner, atol=1e-6)
