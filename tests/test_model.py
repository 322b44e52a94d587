import pytest
import torch

from hybvit.config import ModelConfig, preset_config
from hybvit.errors import HybvitError
from hybvit.model import OFFICIAL_CIFAR10_PARAMS, ViT


@pytest.mark.parametrize("channels,size,patch", [(1, 8, 2), (3, 32, 4), (3, 16, 8), (4, 12, 3)])
def test_shapes_all_modes(channels, size, patch):
    cfg = ModelConfig(image_size=size, channels=channels, patch_size=patch, num_classes=7, dim=32, depth=2, heads=4)
    model = ViT(cfg)
    x = torch.randn(5, channels, size, size)
    t = torch.randint(0, 1000, (5,))
    assert model.classify(x).shape == (5, 7)
    assert model.denoise(x, t).shape == x.shape
    assert model(x).shape == (5, 7)
    assert model(x, t).shape == x.shape
    assert model.forward_features(x, t).shape == (5, (size // patch) ** 2 + 1, 32)


def test_patchify_roundtrip_and_raster_order():
    model = ViT(ModelConfig(image_size=8, channels=3, patch_size=4, dim=16, depth=1, heads=2))
    x = torch.randn(2, 3, 8, 8)
    p = model.patchify(x)
    assert p.shape == (2, 4, 4 * 4 * 3)
    assert torch.equal(model.unpatchify(p), x)
    # patch 1 is the top-right 4x4 block, flattened as (P, P, C)
    assert torch.equal(p[:, 1], x[:, :, :4, 4:].permute(0, 2, 3, 1).reshape(2, -1))


def test_param_count_matches_official_cifar10():
    model = ViT(preset_config("cifar10-hybvit").model)
    assert model.num_params() == OFFICIAL_CIFAR10_PARAMS == 11_185_068
    assert abs(model.flops_per_image() / 1e9 - 1.44) < 0.01


def test_time_changes_denoising_but_classification_has_no_time_input():
    torch.manual_seed(0)
    model = ViT(ModelConfig(image_size=8, channels=1, patch_size=2, dim=32, depth=2, heads=4))
    x = torch.randn(3, 1, 8, 8)
    e1 = model.denoise(x, torch.full((3,), 10))
    e2 = model.denoise(x, torch.full((3,), 900))
    assert not torch.allclose(e1, e2, atol=1e-4)
    # classification equals the trunk run with zero modulation (scale = shift = 0)
    for block in model.blocks:
        torch.nn.init.zeros_(block.modulation.weight)
        torch.nn.init.zeros_(block.modulation.bias)
    h_time = model.forward_features(x, torch.full((3,), 500))
    assert torch.allclose(h_time, model.forward_features(x), atol=1e-5)


def test_modulation_is_one_scalar_per_token():
    model = ViT(ModelConfig(image_size=8, channels=1, patch_size=2, dim=32, depth=2, heads=4))
    assert model.blocks[0].modulation.out_features == 2 * (16 + 1)
    assert model.time_mlp[0].out_features == 4 * 17  # the paper code's hidden width 4(N+1)


def test_bad_model_config():
    with pytest.raises(HybvitError, match="not divisible by patch size"):
        ViT(ModelConfig(image_size=8, patch_size=3))
    with pytest.raises(HybvitError, match="heads"):
        ViT(ModelConfig(dim=30, heads=4))


def test_gradients_reach_every_parameter():
    model = ViT(ModelConfig(image_size=8, channels=1, patch_size=2, dim=32, depth=2, heads=4))
    x = torch.randn(4, 1, 8, 8)
    loss = model.classify(x).sum() + model.denoise(x, torch.randint(0, 1000, (4,))).sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_joint_pass_equals_separate_passes():
    torch.manual_seed(0)
    model = ViT(ModelConfig(image_size=8, channels=1, patch_size=2, dim=32, depth=2, heads=4))
    x0, xt = torch.randn(3, 1, 8, 8), torch.randn(5, 1, 8, 8)
    t = torch.randint(0, 1000, (5,))
    logits, eps = model.classify_and_denoise(x0, xt, t)
    assert torch.allclose(logits, model.classify(x0), atol=1e-5)
    assert torch.allclose(eps, model.denoise(xt, t), atol=1e-5)


def test_every_preset_builds_and_matches_the_papers_parameter_count():
    from hybvit.config import PRESETS, preset_config, preset_paper_params
    checked = 0
    for name in PRESETS:
        cfg = preset_config(name)
        cfg.validate()
        with torch.device("meta"):
            n = ViT(cfg.model).num_params()
        paper = preset_paper_params(name)
        if paper:  # the paper reports millions with one decimal (Tables 7-8)
            assert abs(n / 1e6 - float(paper.rstrip("M"))) < 0.1, (name, n, paper)
            checked += 1
    assert checked >= 10
    assert len(PRESETS) >= 40


# ------------------------------------------------------------------ the -plus architecture (model.plus)
OPTIONS = [dict(), dict(plus=True)]


def test_plus_switches_on_the_four_changes_together():
    faithful, plus = ModelConfig(), ModelConfig(plus=True)
    assert (faithful.time_cond, faithful.time_token, faithful.long_skips, faithful.zero_init_out) == \
        ("token-scalar", False, False, False)
    assert (plus.time_cond, plus.time_token, plus.long_skips, plus.zero_init_out) == ("adaln", True, True, True)


@pytest.mark.parametrize("opts", OPTIONS)
@pytest.mark.parametrize("depth", [3, 4])
def test_options_shapes_and_plain_classification(opts, depth):
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=8, channels=1, patch_size=2, num_classes=5, dim=32, depth=depth, heads=4, **opts)
    model = ViT(cfg)
    x, t = torch.randn(6, 1, 8, 8), torch.randint(0, 1000, (6,))
    assert model.classify(x).shape == (6, 5) and model.denoise(x, t).shape == x.shape
    logits, eps = model.classify_and_denoise(x[:2], x[2:], t[2:])
    torch.testing.assert_close(logits, model.classify(x[:2]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eps, model.denoise(x[2:], t[2:]), rtol=1e-5, atol=1e-5)
    # training moves the time pathway: after one gradient step the denoiser depends on t
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    (model.denoise(x, t) - torch.randn_like(x)).pow(2).mean().backward()
    opt.step()
    a, b = model.denoise(x, torch.full((6,), 10)), model.denoise(x, torch.full((6,), 900))
    assert not torch.allclose(a, b)


def test_adaln_zero_starts_as_the_plain_block_and_zero_out_predicts_zero():
    torch.manual_seed(0)
    model = ViT(ModelConfig(image_size=8, channels=1, patch_size=2, dim=32, depth=2, heads=4, plus=True))
    x = torch.randn(4, 1, 8, 8)
    # zero-initialised adaLN modulation: at init every block given the time features computes the plain block
    h = torch.randn(4, model.num_tokens + 1, 32)                        # CLS, patches and the time token
    A = model.time_features(torch.tensor([5, 50, 500, 900]))
    for block in model.blocks:
        assert block.time_cond == "adaln"
        torch.testing.assert_close(block(h, A), block(h))
    # ... which the time input then moves once the modulation is trained
    torch.nn.init.normal_(model.blocks[0].modulation.weight, std=0.1)
    assert not torch.allclose(model.blocks[0](h, A), model.blocks[0](h))
    # the zero-initialised output layer: the denoiser starts by predicting 0
    plus = ViT(ModelConfig(image_size=8, channels=1, patch_size=2, dim=32, depth=2, heads=4, plus=True))
    assert torch.equal(plus.denoise(x, torch.full((4,), 5)), torch.zeros_like(x))
    faithful = ViT(ModelConfig(image_size=8, channels=1, patch_size=2, dim=32, depth=2, heads=4))
    assert faithful.denoise(x, torch.full((4,), 5)).abs().max() > 0


def test_long_skips_add_the_projections_and_faithful_count_is_unchanged():
    base = dict(image_size=32, channels=3, patch_size=4, dim=384, depth=9, heads=12)
    faithful = ViT(ModelConfig(**base)).num_params()
    assert faithful == OFFICIAL_CIFAR10_PARAMS
    with torch.device("meta"):
        plus = ViT(ModelConfig(**base, plus=True))
    D, H, N = 384, 4 * 65, 64                                # dim, time features 4 (N + 1), patches
    skips = sum(p.numel() for p in plus.skip_proj.parameters())
    assert skips == 4 * (2 * D * D + D)                      # one Linear(2D, D) per pair of the 9 blocks
    # the rest of the difference: the time token's Linear(H, D), and per block adaLN's Linear(H, 6D) in place of
    # the paper's per-token Linear(H, 2 (N + 1))
    adaln, per_token = H * 6 * D + 6 * D, H * 2 * (N + 1) + 2 * (N + 1)
    assert plus.num_params() - faithful == skips + (H * D + D) + 9 * (adaln - per_token)


@pytest.mark.parametrize("options", [{}, {"plus": True}, {"plus": True, "depth": 5}])
def test_classify_computes_only_the_cls_token_in_the_last_block_with_the_same_result(options):
    cfg = ModelConfig(image_size=8, channels=3, patch_size=2, num_classes=5, dim=32, depth=options.pop("depth", 4),
                      heads=4, **options)
    torch.manual_seed(0)
    model = ViT(cfg)
    for p in model.parameters():                                   # no zero-initialised (inert) weights
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(6, 3, 8, 8)
    full = model.head(model.forward_features(x)[:, 0])             # all tokens through every block

    def close(a, b):                                               # float32 rounding of large activations
        return torch.allclose(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())
    assert close(model.classify(x), full)
    xt, t = torch.randn(4, 3, 8, 8), torch.randint(0, 1000, (4,))
    if not cfg.time_token:
        logits, eps = model.classify_and_denoise(x, xt, t)
        assert close(logits, full)
        assert close(eps, model.denoise(xt, t))


def test_cpu_bf16_attention_backward_matches_autograd():
    from hybvit.model import _CPUAttention

    def reference(qkv, heads):
        B, L, D3 = qkv.shape
        q, k, v = qkv.reshape(B, L, 3, heads, D3 // 3 // heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return x.transpose(1, 2).reshape(B, L, D3 // 3)

    qkv = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: _CPUAttention.apply(a, 4), (qkv,))
    assert torch.allclose(_CPUAttention.apply(qkv, 4), reference(qkv, 4), atol=1e-12)
    # the bf16 path the model takes on the CPU, against fp32 SDPA: forward and gradient within bf16 rounding
    x, w = torch.randn(3, 17, 48), torch.randn(3, 17, 16)          # qkv and a fixed random readout
    grads = []
    for fn, dtype in ((reference, torch.float32), (_CPUAttention.apply, torch.bfloat16)):
        a = x.to(dtype).detach().clone().requires_grad_()
        out = fn(a, 4)
        (out.float() * w).sum().backward()
        grads.append((out.float(), a.grad.float()))
    (o32, g32), (o16, g16) = grads
    assert (o16 - o32).abs().max() < 0.05 * o32.abs().max()
    assert (g16 - g32).norm() < 0.05 * g32.norm()


def test_eps_function_converts_v_and_scales_eps():
    """sample.eps_function of a v-prediction model gives eps = sigma_t x_t + alpha_t v (from x_t = alpha x0 + sigma
    eps and v = alpha eps - sigma x0, computed here independently), and eps_scale divides it."""
    from hybvit.diffusion import GaussianDiffusion
    from hybvit.sample import eps_function
    torch.manual_seed(0)
    model = ViT(ModelConfig(image_size=8, channels=1, patch_size=2, dim=32, depth=2, heads=4))
    diffusion = GaussianDiffusion(100, "cosine", prediction="v")
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 40, 90])
    abar = diffusion.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    expected = (1 - abar).sqrt() * x + abar.sqrt() * model.denoise(x, t)
    plain = eps_function(model, diffusion, amp="fp32")
    torch.testing.assert_close(plain(x, t), expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eps_function(model, diffusion, amp="fp32", eps_scale=1.25)(x, t), plain(x, t) / 1.25)


def test_balanced_samples_hold_each_class_equally_and_come_from_the_plain_draws():
    """sample.draw_balanced: every class (by the model's own classifier) exactly n // K times (the first n % K
    classes once more), each kept sample one of the plain samples of the same seeds; a class the model never
    draws stops with a clear error instead of looping."""
    from hybvit.diffusion import GaussianDiffusion
    from hybvit.sample import draw_balanced, draw_samples
    torch.manual_seed(0)
    model = ViT(ModelConfig(image_size=8, channels=1, patch_size=2, num_classes=2, dim=32, depth=2, heads=4)).eval()
    d = GaussianDiffusion(100, "cosine")
    pool = torch.cat([draw_samples(model, d, 8, steps=3, seed=3 + k, batch_size=8, amp="fp32") for k in range(30)])
    with torch.no_grad():       # an untrained head calls everything one class: put its boundary at the 30 % point
        logits = model.classify(pool)
        model.head[-1].bias[0] += torch.quantile(logits[:, 1] - logits[:, 0], 0.3)
    x = draw_balanced(model, d, 11, batch_size=8, seed=3, steps=3, amp="fp32")
    assert x.shape == (11, 1, 8, 8)
    labels = model.classify(x).argmax(1)
    assert torch.bincount(labels, minlength=2).tolist() == [6, 5]
    for xi in x:                                     # each kept image is one the plain sampler drew
        assert ((pool - xi).abs().flatten(1).amax(1) < 1e-6).any()
    plain = draw_samples(model, d, 11, steps=3, seed=3, batch_size=8, amp="fp32")
    assert torch.bincount(model.classify(plain).argmax(1), minlength=2).tolist() != [6, 5]   # not balanced by chance
    with torch.no_grad():                            # a classifier that never says class 1
        model.head[-1].bias.copy_(torch.tensor([100.0, -100.0]))
    with pytest.raises(HybvitError, match="too few of class"):
        draw_balanced(model, d, 4, batch_size=8, seed=0, steps=2, amp="fp32", max_factor=5)


def trained_plus(model: ViT) -> ViT:
    """model.plus starts with its adaLN modulation and output layer at zero (time and labels change nothing yet):
    random values there, as training leaves them."""
    if model.cfg.plus:
        with torch.no_grad():
            for block in model.blocks:
                block.modulation.weight.normal_(std=0.1)
            torch.nn.init.xavier_normal_(model.out.weight)
    return model


@pytest.mark.parametrize("plus", [False, True])
def test_class_conditional_denoiser_reads_its_labels(plus):
    """model.class_cond: y = None and y = num_classes ("no label") are the same unconditional denoiser, other
    labels change the prediction, the joint pass equals two passes, and classification ignores the table."""
    cfg = ModelConfig(image_size=8, channels=1, patch_size=2, num_classes=3, dim=32, depth=2, heads=4,
                      class_cond=True, plus=plus)
    torch.manual_seed(0)
    model = trained_plus(ViT(cfg).eval())
    with torch.no_grad():
        model.label_embed.weight.normal_()                  # a trained table, not the small initial one
    x0, xt, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([5, 300, 600, 900])
    torch.testing.assert_close(model.denoise(xt, t), model.denoise(xt, t, y=torch.full((4,), 3)))
    e0, e1 = model.denoise(xt, t, y=torch.zeros(4, dtype=torch.long)), model.denoise(xt, t, y=torch.ones(4).long())
    assert (e0 - e1).abs().mean() > 1e-3
    y = torch.tensor([0, 2, 1, 3])
    logits, eps = model.classify_and_denoise(x0, xt, t, y=y)
    torch.testing.assert_close(eps, model.denoise(xt, t, y=y), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, model.classify(x0), rtol=1e-4, atol=1e-5)
    before = model.classify(x0)
    with torch.no_grad():
        model.label_embed.weight.mul_(3)
    torch.testing.assert_close(model.classify(x0), before)


def test_class_conditional_samples_cycle_through_the_classes_or_take_one():
    """draw_samples on a class-conditional model: sample i gets class i mod K (so n // K of each), or all one
    class with label=K; each batch's labels are what the denoiser sees (same noise, other class -> other image)."""
    from hybvit.diffusion import GaussianDiffusion
    from hybvit.sample import draw_samples, sample_labels
    cfg = ModelConfig(image_size=8, channels=1, patch_size=2, num_classes=3, dim=32, depth=2, heads=4,
                      class_cond=True)
    assert sample_labels(cfg, 4, 5, None, "cpu").tolist() == [1, 2, 0, 1, 2]
    assert sample_labels(cfg, 4, 2, 2, "cpu").tolist() == [2, 2]
    assert sample_labels(ModelConfig(), 0, 3, None, "cpu") is None
    torch.manual_seed(0)
    model = ViT(cfg).eval()
    with torch.no_grad():
        model.label_embed.weight.normal_()
    d = GaussianDiffusion(100, "cosine")
    mixed = draw_samples(model, d, 6, steps=3, seed=1, batch_size=4, amp="fp32")
    per_class = [draw_samples(model, d, 6, steps=3, seed=1, batch_size=4, amp="fp32", label=k) for k in range(3)]
    for i in range(6):                                   # the same initial noise, the class i mod 3
        torch.testing.assert_close(mixed[i], per_class[i % 3][i])
    assert (per_class[0] - per_class[1]).abs().mean() > 1e-3


def test_classifier_free_guidance_mixes_the_conditional_and_unconditional_outputs():
    """eps_function(cfg_scale=w) on a class-conditional model: w = 1 is the conditional denoiser, w = 0 the
    "no label" one, and w = 2 lies as far beyond the conditional output as the unconditional one lies before it."""
    from hybvit.diffusion import GaussianDiffusion
    from hybvit.sample import eps_function
    cfg = ModelConfig(image_size=8, channels=1, patch_size=2, num_classes=3, dim=32, depth=2, heads=4,
                      class_cond=True)
    torch.manual_seed(0)
    model = ViT(cfg).eval()
    with torch.no_grad():
        model.label_embed.weight.normal_()
    d = GaussianDiffusion(100, "cosine", prediction="v")
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([3, 30, 60, 90]), torch.tensor([0, 1, 2, 1])
    with torch.no_grad():
        cond = eps_function(model, d, "fp32", labels=y)(x, t)
        uncond = eps_function(model, d, "fp32")(x, t)
        for w, want in ((1.0, cond), (0.0, uncond), (2.0, 2 * cond - uncond)):
            torch.testing.assert_close(eps_function(model, d, "fp32", labels=y, cfg_scale=w)(x, t), want,
                                       rtol=1e-4, atol=1e-5)
    assert (cond - uncond).abs().mean() > 1e-3


@pytest.mark.parametrize("plus", [False, True])
def test_augmentation_labels_start_silent_then_steer_only_the_denoiser(plus):
    """model.augment_cond: the transform embedding starts at zero (no effect); once trained, aug = None and aug = 0
    (untransformed, what sampling asks for) agree, other transforms change the prediction, the joint pass equals
    two passes, and classification ignores the table."""
    cfg = ModelConfig(image_size=8, channels=1, patch_size=2, num_classes=3, dim=32, depth=2, heads=4,
                      augment_cond=True, plus=plus)
    torch.manual_seed(0)
    model = trained_plus(ViT(cfg).eval())
    x0, xt, t = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8), torch.tensor([5, 300, 600, 900])
    aug = torch.tensor([0, 3, 40, 71])
    assert torch.count_nonzero(model.augment_embed.weight) == 0
    torch.testing.assert_close(model.denoise(xt, t, aug=aug), model.denoise(xt, t))
    with torch.no_grad():
        model.augment_embed.weight[1:].normal_()             # a trained table; row 0 is the identity, kept at 0
    torch.testing.assert_close(model.denoise(xt, t), model.denoise(xt, t, aug=torch.zeros(4, dtype=torch.long)))
    assert (model.denoise(xt, t, aug=aug) - model.denoise(xt, t))[1:].abs().mean() > 1e-3
    logits, eps = model.classify_and_denoise(x0, xt, t, aug=aug)
    torch.testing.assert_close(eps, model.denoise(xt, t, aug=aug), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits, model.classify(x0), rtol=1e-4, atol=1e-5)
    before = model.classify(x0)
    with torch.no_grad():
        model.augment_embed.weight.mul_(3)
    torch.testing.assert_close(model.classify(x0), before)


def test_samples_as_uint8_are_the_float_samples_rounded_batch_by_batch():
    """draw_samples(uint8=True) (what evaluation keeps and what torchrun processes exchange) equals to_uint8 of the
    float samples, image for image, including an empty draw."""
    from hybvit.data import to_uint8
    from hybvit.diffusion import GaussianDiffusion
    from hybvit.sample import draw_samples
    torch.manual_seed(0)
    model = ViT(ModelConfig(image_size=8, channels=1, patch_size=2, num_classes=3, dim=32, depth=2, heads=4)).eval()
    d = GaussianDiffusion(100, "cosine")
    floats = draw_samples(model, d, 5, steps=3, seed=2, batch_size=2, amp="fp32")
    small = draw_samples(model, d, 5, steps=3, seed=2, batch_size=2, amp="fp32", uint8=True)
    assert small.dtype == torch.uint8 and torch.equal(small, to_uint8(floats))
    assert draw_samples(model, d, 0, steps=3, uint8=True).dtype == torch.uint8
