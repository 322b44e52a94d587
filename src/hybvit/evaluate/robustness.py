"""Adversarial robustness under white-box PGD attacks (Madry et al. 2018), as Sec. 5.2.3 (Fig. 7) and
App. C.4 (Table 12).

The paper attacks its CIFAR-10 classifiers with L-inf and L2 PGD on images in [0, 1]. Budgets, in units of 1/255:
  L-inf  eps in {1, 2, 4, 8, 12, 16, 22, 30} / 255          (Table 12)
  L2     eps in {50, 100, ..., 500} / 255                    (its scripts/bpda_attack.sh; Table 12 prints to 400)

Two protocols; every report names the one that ran:
  paper (the default): the official code's (bpda_eot_attack.py with bpda_eot_attack.json): 50 steps of a fixed
      20/255 from a random start, and an image counts as robust only if it is classified correctly clean and at
      every iterate, the random start and the last included.
  madry (`--pgd-step-factor F`): step F * eps / steps, the rule of thumb of Madry et al. (F = 2.5 lets the iterates
      cross the ball from any start), and only the last iterate counts, as standard PGD.
Both attack in fp32, as the official code, a random subset of test images drawn with seed 123 (the official code
also shuffled with seed 123, but its order depends on the RNG state after its model's initialisation, so its
exact 1,000 images cannot be reproduced).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import distributed
from ..data import ImageData
from ..errors import HybvitError
from ..precision import autocast
from .calibration import check_classifier
from .plots import line_plot

NORMS = ("linf", "l2")
# The budgets the official code attacked, in units of 1/255 on [0, 1] images.
PAPER_EPS: dict[str, list[float]] = {"linf": [1, 2, 4, 8, 12, 16, 22, 30],
                                     "l2": [50, 100, 150, 200, 250, 300, 350, 400, 450, 500]}
PAPER_STEP = 20 / 255            # bpda_eot_attack.json adv_eta, on [0, 1] images (both norms)
SUBSET_SEED = 123                # bpda_eot_attack.json seed: the test images attacked are a shuffled subset

ModelFn = Callable[[torch.Tensor], torch.Tensor]


def _rand(shape, generator: torch.Generator | None, like: torch.Tensor, normal: bool = False) -> torch.Tensor:
    """Uniform [0, 1) (or standard normal) numbers from `generator`, on like's device and dtype."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.randn if normal else torch.rand
    r = draw(shape, generator=generator, dtype=like.dtype, device=gen_device)
    return r.to(like.device)


def _per_image_norm(v: torch.Tensor) -> torch.Tensor:
    """L2 norm of each image, shaped to broadcast against v (B, 1, 1, ...)."""
    return v.flatten(1).norm(dim=1).view(-1, *([1] * (v.dim() - 1)))


def _project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Onto the eps-ball around x, then onto the [0, 1] box. Clipping to the box only moves each coordinate of
    the perturbation towards 0 (x itself lies in the box), so the result stays inside the ball too."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        n = _per_image_norm(delta)
        delta = delta * torch.where(n > eps, eps / n.clamp_min(1e-30), torch.ones_like(n))
    return (x + delta).clamp(0.0, 1.0)


def pgd(model_fn: ModelFn, x01: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf", steps: int = 50,
        step_size: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Projected gradient ascent on the cross-entropy of model_fn (images in [0, 1] -> logits): the last iterate
    of pgd_attack (detached, same shape and dtype as x01)."""
    return pgd_attack(model_fn, x01, y, eps, norm, steps, step_size, generator)[0]


def pgd_attack(model_fn: ModelFn, x01: torch.Tensor, y: torch.Tensor, eps: float, norm: str = "linf",
               steps: int = 50, step_size: float | None = None,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """PGD (Madry et al. 2018), as the paper's Sec. 5.2.3 / Table 12. Returns (the last iterate, whether each
    image was classified correctly at every iterate: the random start, each step and the last).

    Random start: uniform in the L-inf ball, or for L2 a uniformly random direction with a radius uniform in
    [0, eps]; then `steps` steps of x += step_size * sign(grad) (L-inf) or step_size * grad / ||grad||_2 (L2),
    each followed by projection onto the eps-ball around x01 and onto the [0, 1] box. step_size defaults to
    2.5 * eps / steps. Gradients are taken with respect to the input only (torch.autograd.grad), under
    torch.enable_grad, so it works when called under no_grad and never touches the model's .grad."""
    if norm not in NORMS:
        raise HybvitError(f"unknown PGD norm '{norm}'; use linf or l2")
    if eps < 0 or steps < 0:
        raise HybvitError("PGD needs eps >= 0 and steps >= 0")
    x = x01.detach()
    if eps == 0:
        return x.clone(), _predict(model_fn, x, y)
    step = 2.5 * eps / max(steps, 1) if step_size is None else float(step_size)

    if norm == "linf":
        delta = (2 * _rand(x.shape, generator, x) - 1) * eps
    else:
        direction = _rand(x.shape, generator, x, normal=True)
        direction = direction / _per_image_norm(direction).clamp_min(1e-30)
        radius = _rand((len(x),), generator, x).view(-1, *([1] * (x.dim() - 1))) * eps
        delta = direction * radius
    x_adv = _project(x + delta, x, eps, norm)

    robust = torch.ones(len(x), dtype=torch.bool, device=x.device)
    for _ in range(steps):
        with torch.enable_grad():
            x_adv.requires_grad_(True)
            logits = model_fn(x_adv).float()
            loss = F.cross_entropy(logits, y, reduction="sum")
            grad, = torch.autograd.grad(loss, x_adv)
        with torch.no_grad():
            robust &= logits.argmax(1) == y
            if norm == "linf":
                x_adv = x_adv.detach() + step * grad.sign()
            else:
                x_adv = x_adv.detach() + step * grad / _per_image_norm(grad).clamp_min(1e-30)
            x_adv = _project(x_adv, x, eps, norm)
    return x_adv.detach(), robust & _predict(model_fn, x_adv, y)


@torch.no_grad()
def _predict(model_fn: ModelFn, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model_fn(x).argmax(1) == y


def robust_accuracy_curve(model_fn: ModelFn, x01: torch.Tensor, y: torch.Tensor, eps_list: Sequence[float],
                          norm: str = "linf", steps: int = 50, step_size_factor: float | None = 2.5,
                          generator: torch.Generator | None = None, batch_size: int = 250,
                          bar=None) -> list[dict[str, float]]:
    """Accuracy of model_fn on PGD adversarial examples for each eps (in [0, 1] image units), as one row of
    Table 12 / one line of Fig. 7. step_size_factor F: the madry protocol (step F * eps / steps, the last iterate
    counts); None: the paper protocol (step PAPER_STEP; robust only if correct clean and at every iterate).
    eps = 0 is the clean accuracy (no attack, no random start) and is always included, first.
    Returns [{"eps": eps, "accuracy": acc}, ...] in increasing eps."""
    if len(x01) == 0:
        raise HybvitError("robust accuracy needs at least one image")
    y = y.to(x01.device)
    eps_values = sorted({0.0, *(float(e) for e in eps_list)})
    curve = []
    batches = -(-len(x01) // batch_size)
    for eps in eps_values:
        # each batch's random start from its own generator, seeded from `generator`: the batches can be split
        seeds = torch.randint(0, 2 ** 62, (batches,), generator=generator).tolist()

        def one(start: int, stop: int) -> int:
            xb, yb = x01[start:stop], y[start:stop]
            g = torch.Generator().manual_seed(seeds[start // batch_size])
            if eps == 0:
                correct = int(_predict(model_fn, xb, yb).sum())
            elif step_size_factor is None:                       # paper: every iterate, clean included
                clean = _predict(model_fn, xb, yb)
                correct = int((clean & pgd_attack(model_fn, xb, yb, eps, norm, steps, PAPER_STEP, g)[1]).sum())
            else:
                xb = pgd(model_fn, xb, yb, eps, norm, steps, step_size_factor * eps / max(steps, 1), g)
                correct = int(_predict(model_fn, xb, yb).sum())
            if bar is not None:
                bar.update(len(xb))
            return correct
        correct = sum(distributed.map_batches(len(x01), batch_size, one))   # split over the ranks in shared_work
        curve.append({"eps": eps, "accuracy": correct / len(x01)})
    return curve


def evaluate_pgd(run, data: ImageData, norms: Sequence[str] = NORMS,
                 eps: Mapping[str, Sequence[float]] | Sequence[float] | None = None, num_images: int = 1000,
                 steps: int = 50, seed: int = 0, batch_size: int = 250, out_dir: str | Path | None = None,
                 step_size_factor: float | None = None, progress: bool = False) -> dict[str, Any]:
    """Robust accuracy of a run's EMA classifier under PGD (Sec. 5.2.3, Fig. 7; App. C.4, Table 12) on num_images
    test images drawn at random with SUBSET_SEED: the model sees 2 * x01 - 1 (its [-1, 1] input), in fp32.

    step_size_factor: None = the paper protocol, F = the madry protocol (module docstring).
    eps: in units of 1/255, either {norm: [eps, ...]} or one list for every norm; None = PAPER_EPS.
    Returns {"protocol", "num_images", "images", "steps", "step_size", "random_start": True, "seed",
             "norms": {norm: {"eps_255": [0, ...], "accuracy": [...]}},
             "plots": {norm: "pgd_<norm>.png"}} (plots only with out_dir; paths relative to it).
    One generator seeded with `seed` per norm draws a seed per batch, from which that batch draws its random
    starts."""
    check_classifier(run, data, "pgd")
    unknown = [n for n in norms if n not in NORMS]
    if unknown or not norms:
        raise HybvitError(f"unknown PGD norm(s) {', '.join(unknown) or '(none given)'}; use linf and/or l2")
    model, device = run.model, run.device
    model.eval()

    def model_fn(x01: torch.Tensor) -> torch.Tensor:
        with autocast("fp32", device):
            return model.classify(2 * x01 - 1).float()

    pick = torch.randperm(len(data.x_test), generator=torch.Generator().manual_seed(SUBSET_SEED))[:num_images]
    x01 = data.x_test[pick].to(device).float() / 255.0
    y = data.y_test[pick].to(device)
    paper = step_size_factor is None
    out: dict[str, Any] = {
        "protocol": ("paper: step 20/255, robust only if correct clean and at every iterate (the official "
                     "bpda_eot_attack.py), fp32" if paper else
                     f"madry: step {step_size_factor:g} * eps / steps, the last iterate counts, fp32"),
        "num_images": len(x01), "images": f"a random subset of the test set (seed {SUBSET_SEED})", "steps": steps,
        "step_size": "20/255" if paper else f"{step_size_factor:g} * eps / steps", "random_start": True,
        "seed": seed, "norms": {}}
    lists = {n: (PAPER_EPS[n] if eps is None else eps.get(n, []) if isinstance(eps, Mapping) else eps) for n in norms}
    n = len(x01)                                   # this process's images per budget (its batches in shared_work)
    share = sum(min((k + 1) * batch_size, n) - k * batch_size for k in distributed.my_batches(-(-n // batch_size)))
    bar = tqdm(total=share * sum(len({0.0, *map(float, v)}) for v in lists.values()), unit="img",
               desc=f"PGD-{steps}", leave=False, mininterval=1.0, disable=None) if progress else None
    for norm in norms:
        if isinstance(eps, Mapping) and norm not in eps:
            raise HybvitError(f"no eps list given for norm '{norm}'")
        budgets = lists[norm]
        if any(float(e) < 0 for e in budgets):
            raise HybvitError("PGD eps values must be >= 0 (in units of 1/255)")
        g = torch.Generator().manual_seed(seed)
        curve = robust_accuracy_curve(model_fn, x01, y, [float(e) / 255 for e in budgets], norm, steps,
                                      step_size_factor, g, batch_size, bar)
        out["norms"][norm] = {"eps_255": [round(c["eps"] * 255, 6) for c in curve],
                              "accuracy": [c["accuracy"] for c in curve]}
    if bar is not None:
        bar.close()
    if out_dir is not None:
        out["plots"] = {}
        label = f"{run.config.train.mode} ({data.name})"
        for norm, r in out["norms"].items():
            fname = f"pgd_{norm}.png"
            line_plot(Path(out_dir) / fname, r["eps_255"], {label: r["accuracy"]},
                      xlabel=f"{'L-inf' if norm == 'linf' else 'L2'} eps (x 1/255)", ylabel="accuracy",
                      title=f"PGD-{steps} ({norm}), {len(x01)} test images")
            out["plots"][norm] = fname
    return out


__all__ = ["pgd", "pgd_attack", "robust_accuracy_curve", "evaluate_pgd", "PAPER_EPS", "PAPER_STEP", "NORMS"]
