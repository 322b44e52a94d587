import copy
import json
import math

import pytest
import torch

from hybvit import checkpoint as ckpt
from hybvit.datasets import load_data
from hybvit.errors import HybvitError
from hybvit.model import ViT
from hybvit.sample import load_run
from hybvit.optim import lr_at
from hybvit.train import train


@pytest.fixture(scope="module")
def digits():
    return load_data("digits")


def small(data, n=64):
    """The first n training images (the test split stays whole)."""
    import copy
    d = copy.copy(data)
    d.x_train, d.y_train = data.x_train[:n], data.y_train[:n]
    return d


def test_lr_schedule():
    assert lr_at(0, 100, 10, 1.0, 0.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, 0.0) == pytest.approx(0.0)
    # cosine from lr to min_lr over the 90 steps after the warm-up: (1 + cos(pi * 22 / 90)) / 2 at step 32
    assert lr_at(32, 100, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 22 / 90)))
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


@pytest.mark.parametrize("mode", ["vit", "genvit", "hybvit"])
def test_tiny_overfit_loss_falls(mode, tiny_cfg, digits, tmp_path):
    cfg = tiny_cfg(mode=mode, steps=80, warmup_epochs=0, ema_warmup=True, lr=3e-3)   # scalars every LOG_EVERY=10
    cfg.train.alpha = 10.0  # at alpha 100 a 2-block model spends 80 steps almost only on the diffusion term
    metrics = train(cfg, small(digits), tmp_path, progress=False)
    scalars = read_scalars(tmp_path / "tb")
    key = "loss/total"
    assert scalars[key][-1] < 0.6 * scalars[key][0], scalars[key]
    assert metrics["steps"] == 80 and metrics["images_seen"] == 80 * 32 * (2 if mode == "hybvit" else 1)
    if mode == "vit":
        assert scalars["train/accuracy"][-1] > 0.5
    if mode == "hybvit":  # both parts of L = CE + alpha * L_simple fall
        assert scalars["loss/ce"][-1] < 0.9 * scalars["loss/ce"][0]
        assert scalars["loss/diffusion"][-1] < 0.6 * scalars["loss/diffusion"][0]
    if mode != "genvit":                   # the EMA weights' test accuracy, as computed here from the saved weights
        run = load_run(tmp_path)
        assert metrics["test_accuracy"] == (run.predict(digits.x_test) == digits.y_test).double().mean().item()
    assert (tmp_path / "samples.png").exists() == (mode != "vit")
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["steps"] == 80 and "wall_seconds" in saved


def read_scalars(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_checkpoint_roundtrip(tiny_cfg, digits, tmp_path):
    cfg = tiny_cfg(steps=3)
    train(cfg, small(digits), tmp_path, progress=False)
    state = ckpt.load_training_state(tmp_path / "checkpoints" / "last.pt")
    assert state["step"] == 3 and set(state) >= {"model", "ema", "optimizer", "rng", "config"}
    run = load_run(tmp_path, device="cpu")
    for k, v in run.model.state_dict().items():
        assert torch.equal(v, state["ema"][k]), k
    run2 = load_run(checkpoint=tmp_path / "checkpoints" / "last.pt", device="cpu")
    x = digits.x_test[:5]
    assert torch.equal(run.classify(x), run2.classify(x))
    assert run.sample(3, steps=3).shape == (3, 1, 8, 8)


def test_checkpoint_never_unpickles_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"ema": Evil(), "config": {}}, tmp_path / "evil.pt")
    with pytest.raises(HybvitError, match="asks to run code .*print"):
        ckpt.load_training_state(tmp_path / "evil.pt")


def test_atomic_write_leaves_no_partial_file(tmp_path):
    target = tmp_path / "x.json"
    ckpt.write_json(target, {"a": 1})
    def boom(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("disk full")
    with pytest.raises(RuntimeError):
        ckpt.atomic_write(target, boom)
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


def test_interrupted_and_resumed_equals_uninterrupted(tiny_cfg, digits, tmp_path):
    cfg = tiny_cfg(steps=12, ema_warmup=True)
    cfg.data.crop_padding = 1  # exercise the augmentation RNG too
    data = small(digits, 96)
    train(cfg, data, tmp_path / "a", progress=False)
    out = train(cfg, data, tmp_path / "b", progress=False, stop_after=5)
    assert out["interrupted"] and not (tmp_path / "b" / "metrics.json").exists()
    train(cfg, data, tmp_path / "b", resume=True, progress=False)
    a = ckpt.load_training_state(tmp_path / "a" / "checkpoints" / "last.pt")
    b = ckpt.load_training_state(tmp_path / "b" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 12
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), (part, k)
    for k, sa in a["optimizer"]["state"].items():
        for name in sa:
            assert torch.equal(sa[name], b["optimizer"]["state"][k][name])
    # and the interruption did change something relative to a different seed (the comparison is not vacuous)
    cfg.train.seed = 1
    train(cfg, data, tmp_path / "c", progress=False)
    c = ckpt.load_training_state(tmp_path / "c" / "checkpoints" / "last.pt")
    assert not torch.equal(a["model"]["head.1.weight"], c["model"]["head.1.weight"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_cfg, digits, tmp_path):
    cfg = tiny_cfg(steps=4, ckpt_every=2)
    train(cfg, small(digits), tmp_path, progress=False)
    good = ckpt.load_training_state(tmp_path / "checkpoints" / "last.pt")
    cfg.train.steps, cfg.train.alpha, cfg.train.ckpt_every = 10, 1e39, 1    # alpha * L_simple overflows fp32
    with pytest.raises(HybvitError, match="(loss became nan|non-finite).*last good checkpoint"):
        train(cfg, small(digits), tmp_path, resume=True, progress=False)
    kept = ckpt.load_training_state(tmp_path / "checkpoints" / "last.pt")
    assert kept["step"] == 4
    assert all(torch.isfinite(v).all() for v in kept["model"].values())
    assert torch.equal(kept["model"]["head.1.weight"], good["model"]["head.1.weight"])


def test_joint_pass_trains_the_same_model(tiny_cfg, digits, tmp_path, joint_pass):
    """CE and diffusion batches through one forward pass (what hybvit does on CUDA, forced here on the CPU) give
    the same run as the two passes the CPU uses."""
    from hybvit.checkpoint import load_training_state
    runs = {}
    for joint in (False, True):
        calls = joint_pass(joint)
        cfg = tiny_cfg(steps=4, amp="fp32")
        train(cfg, digits, tmp_path / str(joint), progress=False)
        runs[joint] = load_training_state(tmp_path / str(joint) / "checkpoints" / "last.pt")["model"]
        assert calls == ([32] * 4 if joint else [])                    # one joint forward per step, or none
    torch.manual_seed(cfg.train.seed)                                   # the weights both runs started from
    runs["init"] = ViT(cfg.model).state_dict()
    flat = {k: torch.cat([run[name].flatten().double() for name in runs[False]]) for k, run in runs.items()}
    # Equal in exact arithmetic; in fp32 the concatenated batch's matrix products round differently (and
    # differently from one CPU to another), and Adam carries those roundings into its steps. So the two runs must
    # agree to a small fraction of how far training moved the weights: a rounding-level gap is ~1e-4 of it, while
    # a pass that drops or mixes up a batch moves the weights elsewhere (a gap of the order of the movement).
    moved = (flat[False] - flat["init"]).norm()
    assert moved > 0
    gap = (flat[True] - flat[False]).norm()
    assert gap <= 1e-2 * moved, (gap, moved)


@pytest.mark.parametrize("class_cond", [False, True])
def test_joint_objective_equals_two_passes_on_one_batch(tiny_cfg, digits, class_cond):
    """Objective(joint=True), hybvit's step on CUDA: one step's batch (augmented CE images, noised diffusion images,
    labels) gives the loss, its statistics and every gradient of the two passes (joint=False, the CPU's), up to
    float rounding; and the joint forward is the one that ran."""
    from hybvit.data import Batches
    from hybvit.diffusion import GaussianDiffusion
    from hybvit.objective import Objective, batch_inputs
    cfg = tiny_cfg(amp="fp32")
    cfg.model.class_cond = class_cond
    cfg.data.crop_padding, cfg.data.mix_prob = 1, 0.5
    torch.manual_seed(0)
    model = ViT(cfg.model)
    diffusion = GaussianDiffusion.from_config(cfg.diffusion)
    n = len(digits.x_train)
    ce_in, diff_in = batch_inputs(cfg, 3, digits.x_train, digits.y_train, torch.device("cpu"),
                                  Batches(n, 32, cfg.train.seed, 0), Batches(n, 32, cfg.train.seed, 1), diffusion)
    results = {}
    for joint in (False, True):
        calls = []
        objective = Objective(model, model, diffusion, cfg.train.alpha, cfg.train.label_smoothing, joint=joint,
                              joint_net=lambda *a: (calls.append(len(a[0])), model.classify_and_denoise(*a))[1])
        model.zero_grad(set_to_none=True)
        loss, stats = objective(ce_in, diff_in)
        loss.backward()
        assert calls == ([32] if joint else [])
        results[joint] = stats, {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    (stats2, grads2), (stats1, grads1) = results[False], results[True]
    torch.testing.assert_close(stats1, stats2, rtol=1e-5, atol=1e-6)
    assert stats2[1] > 0 and stats2[2] > 0                              # both terms are there
    assert set(grads1) == set(grads2) == {k for k, _ in model.named_parameters()}
    for k, g in grads2.items():
        assert g.abs().max() > 0 or k == "label_embed.weight", k
        torch.testing.assert_close(grads1[k], g, rtol=1e-4, atol=1e-5 * float(g.abs().max()), msg=k)


def test_metrics_record_the_precision_that_ran(tiny_cfg, digits, tmp_path):
    from hybvit.precision import resolve_amp
    for amp in ("fp32", "bf16", "fp16"):
        metrics = train(tiny_cfg(steps=2, amp=amp), digits, tmp_path / amp, progress=False)
        assert metrics["amp"] == amp and metrics["provenance"]["precision"] == amp
    assert resolve_amp("fp32", torch.device("cuda")) == "fp32"           # a named precision is kept on any device


def test_auto_precision_on_the_cpu_follows_the_measured_matmul_rates():
    """amp=auto on a CPU: bf16 only where bf16 matmuls measure clearly faster than fp32 (the flags do not tell:
    two AVX512-BF16 hosts measured 2.5x and 0.5x); the probe leaves the global RNG alone."""
    from hybvit.precision import bf16_pays, cpu_matmul_gflops, use_bf16
    assert bf16_pays(400.0, 160.0) and not bf16_pays(166.0, 329.0) and not bf16_pays(110.0, 100.0)
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    rates = cpu_matmul_gflops(torch.bfloat16, n=256), cpu_matmul_gflops(torch.float32, n=256)
    assert torch.equal(torch.rand(4), expected)
    assert all(0 < r < float("inf") for r in rates)
    cpu = torch.device("cpu")
    assert use_bf16("bf16", cpu) and not use_bf16("fp32", cpu)


def test_auto_precision_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    """The answer of the probe is written to $HYBVIT_CACHE/precision.json and read back instead of measuring
    again (a cached answer wins even against the rates); a damaged cache file is measured over."""
    import hybvit.precision as precision
    monkeypatch.setenv("HYBVIT_CACHE", str(tmp_path))
    cpu = torch.device("cpu")
    first = precision.use_bf16("auto", cpu)
    cache = json.loads((tmp_path / "precision.json").read_text())
    (entry,) = cache.values()
    assert entry["bf16"] == first and entry["bf16"] == precision.bf16_pays(entry["bf16_gflops"], entry["fp32_gflops"])
    for key in cache:
        cache[key]["bf16"] = not first
    (tmp_path / "precision.json").write_text(json.dumps(cache))
    monkeypatch.setattr(precision, "cpu_matmul_gflops", lambda *a, **k: 1 / 0)     # must not be measured again
    assert precision.use_bf16("auto", cpu) == (not first)
    (tmp_path / "precision.json").write_text("{not json")
    monkeypatch.undo()
    monkeypatch.setenv("HYBVIT_CACHE", str(tmp_path))
    assert precision.use_bf16("auto", cpu) in (True, False)
    assert json.loads((tmp_path / "precision.json").read_text())


def test_end_of_run_fd_names_the_sampler_that_drew_it(tiny_cfg, digits, tmp_path):
    """A run's own samples are DDIM-50 of the EMA weights (end_of_run.SAMPLER, SAMPLE_STEPS): metrics.json names
    that sampler for its pixel-FD ("ddim-50"), the FD equals one computed here from the same draw of the saved
    EMA weights (the first fd_samples of the PNG_SAMPLES drawn together), and samples.png shows PNG_SAMPLES of
    them as a square grid."""
    from PIL import Image
    from hybvit.evaluate.end_of_run import PNG_SAMPLES, SAMPLE_STEPS, SAMPLER
    from hybvit.evaluate.frechet import pixel_frechet_distance
    assert (SAMPLER, SAMPLE_STEPS, PNG_SAMPLES) == ("ddim", 50, 100)
    cfg = tiny_cfg(steps=2, fd_samples=20)
    m = train(cfg, small(digits), tmp_path, progress=False)
    assert m["pixel_fd_sampler"] == "ddim-50" and m["pixel_fd_samples"] == 20
    run = load_run(tmp_path)
    x = run.sample(PNG_SAMPLES, sampler="ddim", steps=50, seed=cfg.train.seed)[:20]
    assert round(pixel_frechet_distance(x, digits.x_test), 4) == m["pixel_fd"]
    other = run.sample(PNG_SAMPLES, sampler="ddim", steps=3, seed=cfg.train.seed)[:20]     # not any sampler's FD
    assert round(pixel_frechet_distance(other, digits.x_test), 4) != m["pixel_fd"]
    side = round(PNG_SAMPLES ** 0.5)                                      # 8 px digits drawn at 32 px, 1 px apart
    assert Image.open(tmp_path / "samples.png").size == (side * 33 + 1, side * 33 + 1)


def test_a_batch_that_does_not_split_names_a_size_that_does(tiny_cfg, digits):
    from hybvit.data import check_batch_split
    cfg = tiny_cfg(batch_size=30, grad_accum=4)
    with pytest.raises(HybvitError, match="batch_size=32"):
        check_batch_split(cfg, len(digits.x_train))
    cfg.train.batch_size = 32
    check_batch_split(cfg, len(digits.x_train))        # 32 + 32 split into 4 micro-batches


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
@pytest.mark.parametrize("nesterov", [True, False])
def test_batched_muon_is_torch_muon_and_loads_its_state(nesterov):
    """BatchedMuon (one Newton-Schulz iteration per shape, in ns_dtype) takes torch.optim.Muon's steps: equal in
    bf16, where both iterate in the same precision, and within bf16's rounding in fp32; a torch.optim.Muon state
    dict (checkpoints written before BatchedMuon) loads into it and goes on from the same momentum."""
    from hybvit.optim import BatchedMuon, newton_schulz
    shapes = [(48, 16), (16, 16), (32, 16), (16, 32), (16, 32)]     # tall, square, wide; two of one shape

    def run(cls, steps=4, state=None, **kw):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(0.1 * torch.randn(s)) for s in shapes]
        opt = cls(params, lr=3e-3, weight_decay=0.05, nesterov=nesterov, adjust_lr_fn="match_rms_adamw", **kw)
        if state is not None:
            opt.load_state_dict(copy.deepcopy(state))     # load_state_dict may keep the buffers themselves
        g = torch.Generator().manual_seed(1 if state is None else 2)
        for _ in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        return params, opt

    start = [p.detach().clone() for p in run(torch.optim.Muon, steps=0)[0]]
    ref, ref_opt = run(torch.optim.Muon)
    bf16, _ = run(BatchedMuon, ns_dtype=torch.bfloat16)
    fp32, _ = run(BatchedMuon)
    for r, a, b, s in zip(ref, bf16, fp32, start):
        moved = (r - s).abs().max()
        assert moved > 1e-3
        torch.testing.assert_close(a, r, rtol=0, atol=1e-6)
        assert (b - r).abs().max() < 0.05 * moved and not torch.equal(b, r)
    # resuming from torch.optim.Muon's state: same momentum buffers, same next steps (in bf16)
    state = ref_opt.state_dict()
    go_on_ref, _ = run(torch.optim.Muon, state=state)
    go_on, _ = run(BatchedMuon, state=state, ns_dtype=torch.bfloat16)
    for r, a in zip(go_on_ref, go_on):
        torch.testing.assert_close(a, r, rtol=0, atol=1e-6)
    # the iteration itself: singular values of a badly conditioned stack pulled into Muon's band around 1
    x = torch.randn(3, 16, 40) * torch.logspace(-3, 0, 40)
    sv = torch.linalg.svdvals(newton_schulz(x, (3.4445, -4.7750, 2.0315), 5, 1e-7))
    assert torch.linalg.svdvals(x).min() < 0.2 and 0.5 < sv.min() and sv.max() < 1.3


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_adamw_and_sgd_decay_every_parameter_as_the_paper_code(tiny_cfg, name):
    """The paper's code: AdamW(diffusion_model.parameters(), weight_decay=0.05): norms, biases, the positional
    embedding and the CLS token decay too. With zero gradients a first step shrinks every parameter by lr * wd
    (AdamW), or lr * wd * (1 + momentum) (SGD with Nesterov momentum, where the decay enters the gradient)."""
    from hybvit.model import ViT
    from hybvit.optim import build_optimizer
    cfg = tiny_cfg(optimizer=name, lr=0.1, weight_decay=0.5)
    model = ViT(cfg.model)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert all(g["weight_decay"] == 0.5 for g in opt.param_groups)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    if name == "sgd":                                   # the paper's text: Nesterov momentum 0.9
        assert all(g["momentum"] == 0.9 and g["nesterov"] for g in opt.param_groups)
    for n, p in model.named_parameters():
        if before[n].abs().max() > 0:
            shrink = 0.1 * 0.5 * (1 + 0.9 if name == "sgd" else 1)
            torch.testing.assert_close(p.detach(), before[n] * (1 - shrink), msg=n)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_splits_the_parameters_trains_and_resumes_exactly(tiny_cfg, digits, tmp_path):
    """train.optimizer=muon: Muon owns exactly the blocks' attention/MLP matrices, AdamW the rest; a run lowers its
    loss, and an interrupted run resumed from its checkpoint ends bitwise equal to an uninterrupted one."""
    from hybvit.model import ViT
    from hybvit.optim import MuonAdamW, build_optimizer
    cfg = tiny_cfg(steps=10, optimizer="muon", lr=2e-3)
    model = ViT(cfg.model)
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    assert isinstance(opt, MuonAdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in opt.muon.param_groups for p in g["params"])
    assert muon == sorted(n for n, p in model.named_parameters() if n.startswith("blocks.") and p.ndim == 2
                          and "modulation" not in n)
    assert len(muon) == 4 * cfg.model.depth
    n_adam = sum(len(g["params"]) for g in opt.adamw.param_groups)
    assert len(muon) + n_adam == len(list(model.parameters()))
    no_decay = sorted(names[id(p)] for g in opt.adamw.param_groups if g["weight_decay"] == 0 for p in g["params"])
    assert "pos_embed" in no_decay and "cls_token" in no_decay and "head.0.weight" in no_decay   # Muon's own rule
    data = small(digits, 96)
    m = train(cfg, data, tmp_path / "a", progress=False)
    assert m["steps"] == 10
    out = train(cfg, data, tmp_path / "b", progress=False, stop_after=4)
    assert out["interrupted"]
    train(cfg, data, tmp_path / "b", resume=True, progress=False)
    a = ckpt.load_training_state(tmp_path / "a" / "checkpoints" / "last.pt")
    b = ckpt.load_training_state(tmp_path / "b" / "checkpoints" / "last.pt")
    assert set(a["optimizer"]) == {"muon", "adamw"}
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    # the Muon step really moved the blocks' matrices away from where AdamW would have taken them
    adam = train(tiny_cfg(steps=10, lr=2e-3), data, tmp_path / "c", progress=False)
    c = ckpt.load_training_state(tmp_path / "c" / "checkpoints" / "last.pt")
    assert adam["steps"] == 10 and not torch.allclose(a["model"]["blocks.0.mlp.fc1.weight"],
                                                      c["model"]["blocks.0.mlp.fc1.weight"])
    # resuming a Muon checkpoint with AdamW is refused with one line
    cfg_adam = tiny_cfg(steps=12, lr=2e-3)
    with pytest.raises(HybvitError, match="optimizer state"):
        train(cfg_adam, data, tmp_path / "b", resume=True, progress=False)


def test_class_conditioning_trains_the_labels_it_is_given(tiny_cfg, digits, tmp_path, monkeypatch, joint_pass):
    """model.class_cond: the diffusion images' labels reach the denoiser. With objective.LABEL_DROPOUT (0.1) set to
    0 the rows of the label table for real classes learn and the "no label" row keeps its initial value; with 1
    only the "no label" row learns. The joint pass (clean and noisy images in one forward) trains the same model."""
    import hybvit.objective
    from hybvit.checkpoint import load_training_state
    from hybvit.model import ViT
    assert hybvit.objective.LABEL_DROPOUT == 0.1
    weights = {}
    for name, drop, joint in (("d0", 0.0, False), ("d1", 1.0, False), ("d0j", 0.0, True)):
        monkeypatch.setattr(hybvit.objective, "LABEL_DROPOUT", drop)
        calls = joint_pass(joint)
        cfg = tiny_cfg(steps=3, amp="fp32", warmup_epochs=0, weight_decay=0.0)
        cfg.model.class_cond = True
        train(cfg, small(digits), tmp_path / name, progress=False)
        weights[name] = load_training_state(tmp_path / name / "checkpoints" / "last.pt")["model"]
    assert len(calls) == 3                                               # d0j did take the joint pass
    torch.manual_seed(cfg.train.seed)                                    # the trainer's initialisation
    init = ViT(cfg.model).label_embed.weight.detach()                   # (classes + 1, 4 (N + 1))
    null = cfg.model.num_classes
    d0, d1 = weights["d0"]["label_embed.weight"], weights["d1"]["label_embed.weight"]
    assert torch.equal(d0[null], init[null]) and not torch.equal(d0[:null], init[:null])
    assert torch.equal(d1[:null], init[:null]) and not torch.equal(d1[null], init[null])
    for k, v in weights["d0"].items():     # Adam turns float rounding in near-zero gradients into ~1e-5 moves
        torch.testing.assert_close(weights["d0j"][k], v, rtol=1e-4, atol=1e-4)
    with pytest.raises(HybvitError, match="unknown config key 'train.label_dropout'"):   # a rule, not an option
        tiny_cfg().set("train.label_dropout=0.2")
    cfg = tiny_cfg(mode="vit")
    cfg.model.class_cond = True
    with pytest.raises(HybvitError, match="class_cond"):
        cfg.validate()


def test_diffusion_augmentation_reaches_the_denoiser_with_its_labels(tiny_cfg, digits, tmp_path, monkeypatch,
                                                                     joint_pass):
    """data.diffusion_augment + model.augment_cond: the noised images are the batch's images, each under one of the
    72 transforms; the embedding rows of the transforms drawn learn, the identity row stays 0; with probability 0
    nothing is transformed and the table never moves. grad_accum 2 and the joint pass train the same model."""
    from hybvit.augment import geometric_transform
    from hybvit.checkpoint import load_training_state
    from hybvit.data import Batches, to_float
    from hybvit.diffusion import GaussianDiffusion
    seen = []
    q_sample = GaussianDiffusion.q_sample                   # x_t from x0: what the diffusion batch trains on
    monkeypatch.setattr(GaussianDiffusion, "q_sample",
                        lambda self, x0, t, noise: (seen.append(x0.clone()), q_sample(self, x0, t, noise))[1])
    data, weights = small(digits), {}
    for name, p, extra in (("p0", 0.0, {}), ("p1", 1.0, {}), ("half", 0.5, {}), ("half-accum", 0.5, {"grad_accum": 2}),
                           ("half-joint", 0.5, {})):
        calls = joint_pass(name == "half-joint")
        cfg = tiny_cfg(steps=3, amp="fp32", warmup_epochs=0, weight_decay=0.0, **extra)
        cfg.model.augment_cond, cfg.data.diffusion_augment = True, p
        seen.clear()
        train(cfg, data, tmp_path / name, progress=False)
        weights[name] = load_training_state(tmp_path / name / "checkpoints" / "last.pt")["model"]["augment_embed.weight"]
        batches = Batches(len(data.x_train), cfg.train.batch_size, cfg.train.seed, 1)
        for step in range(3):
            clean = to_float(data.x_train[batches.indices(step)])
            got = seen[step][:len(clean)]
            same = [torch.equal(got[i], clean[i]) for i in range(len(clean))]
            if p == 0:
                assert all(same)
            else:
                for i in range(len(clean)):               # every image is one of the 72 transforms of its original
                    assert any(torch.equal(got[i], geometric_transform(clean[i:i + 1], k)[0]) for k in range(72))
                if p == 1:
                    assert not any(same)
    assert len(calls) == 3                                               # half-joint did take the joint pass
    assert torch.count_nonzero(weights["p0"]) == 0
    for name in ("p1", "half"):
        moved = weights[name].abs().sum(1) > 0
        assert not moved[0] and int(moved.sum()) > 20, name
    torch.testing.assert_close(weights["half-accum"], weights["half"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(weights["half-joint"], weights["half"], rtol=1e-4, atol=1e-4)
    cfg = tiny_cfg()
    cfg.data.diffusion_augment = 0.2
    with pytest.raises(HybvitError, match="model.augment_cond=true"):
        cfg.validate()
    cfg.data.diffusion_augment = 1.5
    with pytest.raises(HybvitError, match="diffusion_augment is a probability"):
        cfg.data.validate()
    cfg = tiny_cfg(mode="vit")
    cfg.model.augment_cond = True
    with pytest.raises(HybvitError, match="augment_cond conditions the denoiser"):
        cfg.validate()
