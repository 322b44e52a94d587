import numpy as np
import pytest
import scipy.linalg
import torch

from hybvit.datasets import load_data
from hybvit.errors import HybvitError
from hybvit.evaluate.fid import (InceptionFeatures, SmallFeatures, extract, frechet_to_reference, inception_score,
                                 reference_stats)
from hybvit.evaluate.frechet import frechet_distance


def test_frechet_distance_against_direct_scipy():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6)) @ rng.normal(size=(6, 6))
    b = rng.normal(loc=0.5, size=(300, 6)) @ rng.normal(size=(6, 6))
    m1, m2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a.T), np.cov(b.T)
    direct = ((m1 - m2) ** 2).sum() + np.trace(s1 + s2 - 2 * np.real(scipy.linalg.sqrtm(s1 @ s2)))
    assert frechet_distance(a, b) == pytest.approx(direct, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-8)
    # 1-d Gaussians: FD = (m1 - m2)^2 + (s1 - s2)^2
    x, y = rng.normal(1.0, 2.0, size=(200_000, 1)), rng.normal(-1.0, 0.5, size=(200_000, 1))
    assert frechet_distance(x, y) == pytest.approx(4 + 1.5 ** 2, rel=0.01)


def test_small_features_deterministic_and_fid_of_a_set_with_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBVIT_CACHE", str(tmp_path))
    data = load_data("digits")
    f1 = extract(SmallFeatures(), data.x_test[:300], "cpu")
    f2 = extract(SmallFeatures(), data.x_test[:300], "cpu")
    assert f1.shape == (300, 512) and np.array_equal(f1, f2)
    ref = reference_stats(SmallFeatures(), data, "cpu")
    assert not ref["cached"] and ref["num_images"] == len(data.x_train)
    again = reference_stats(SmallFeatures(), data, "cpu")
    assert again["cached"] and np.array_equal(again["mu"], ref["mu"])
    train_feats = extract(SmallFeatures(), data.x_train, "cpu")
    assert frechet_to_reference(train_feats, ref) == pytest.approx(0, abs=1e-6)
    # test images are closer to the training set than noise is
    noise = torch.randint(0, 256, (300, 1, 8, 8), dtype=torch.uint8)
    fd_test = frechet_to_reference(f1, ref)
    fd_noise = frechet_to_reference(extract(SmallFeatures(), noise, "cpu"), ref)
    assert 0 < fd_test < fd_noise / 5


def test_inception_score_formula():
    K = 10
    confident = np.full((1000, K), -30.0)
    confident[np.arange(1000), np.arange(1000) % K] = 30.0       # sure of each class, classes equally used
    assert inception_score(confident)[0] == pytest.approx(K, rel=1e-6)
    assert inception_score(np.zeros((1000, K)))[0] == pytest.approx(1.0, abs=1e-9)
    one_class = np.full((1000, K), -30.0)
    one_class[:, 3] = 30.0
    assert inception_score(one_class)[0] == pytest.approx(1.0, abs=1e-6)


def test_inception_needs_weights_offline(tmp_path, monkeypatch):
    pytest.importorskip("torch_fidelity")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))              # nothing cached there
    monkeypatch.setenv("HYBVIT_NO_DOWNLOAD", "1")
    with pytest.raises(HybvitError, match="--inception-weights"):
        InceptionFeatures()
    with pytest.raises(HybvitError, match="is not a file"):
        InceptionFeatures(str(tmp_path / "missing.pth"))


def test_inception_weights_file_with_code_is_refused(tmp_path):
    pytest.importorskip("torch_fidelity")
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    bad = tmp_path / "evil.pth"
    bad.write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(HybvitError, match="not a plain tensor file"):
        InceptionFeatures(str(bad))


def test_inception_pipeline_shapes_with_a_local_file(tmp_path, monkeypatch):
    """The real torch-fidelity network with a local weights file (random weights here: the test has no network and
    no Inception file), end to end: uint8 images of any size -> (N, 2048) features and (N, 1008) logits."""
    tf = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    torch.manual_seed(0)
    monkeypatch.setattr(tf.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    path = tmp_path / "weights.pth"
    torch.save({}, path)
    ext = InceptionFeatures(str(path))
    x = torch.randint(0, 256, (3, 1, 8, 8), dtype=torch.uint8)   # grayscale digits are repeated to RGB
    feats, logits = extract(ext, x, "cpu", want_logits=True)
    assert feats.shape == (3, 2048) and logits.shape == (3, 1008) and np.isfinite(feats).all()
