"""The paper's own checkpoints: hybvit's model computes what the official code computed from them.

../shared/official-fixtures/ (described in its README) holds checkpoints written by the official code (github
sndnyang/Diffusion_ViT, commit 84a4cfe) in four small configurations, and what that code computed from their EMA
weights. Where the folder is missing these tests skip, except under CI=true, where they fail.

Tolerance. Each expected tensor is an fp32 computation through a chain of n = 2 + 4 * depth layers (patch embedding,
time MLP, per block attention, MLP and two norms, head), whose inner products run over at most K values (K = the
time MLP's width, 4 (N + 1), or the patch/MLP width). Summed in another order (another BLAS kernel, another
attention kernel), one inner product moves by up to about sqrt(K) * u of its magnitude (u = 2^-24, fp32 rounding,
for random-sign rounding errors), and the errors of n layers add. So we allow
    max |hybvit - official| <= n * sqrt(K) * u * max |official|
(0.8e-5 to 1.4e-5 of the tensor's largest value at the fixtures' sizes; the differences measured on a 2-core AMD EPYC are 11-90x smaller). The old time embedding (frequencies over half, not
half - 1) misses it by a factor of ~10^4 (test_the_tolerance_tells_the_old_embedding_apart).
"""
import hashlib
import json
import math
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from hybvit import model as model_module
from hybvit.cli import main
from hybvit.config import preset_config
from hybvit.diffusion import GaussianDiffusion
from hybvit.errors import HybvitError
from hybvit.model import ViT
from hybvit.official import infer_model_config, match_schedule, official_to_hybvit, read_official
from hybvit.sample import load_run

FIXTURES = Path(os.environ.get("HYBVIT_OFFICIAL_FIXTURES",                 # ../shared/official-fixtures
                                Path(__file__).resolve().parents[2] / "shared" / "official-fixtures"))
NAMES = ["cifar10-tiny", "stl10-tiny", "imagenet32-tiny", "mnist-tiny"]
if not FIXTURES.is_dir():
    if os.environ.get("CI") == "true":
        raise RuntimeError(f"the official fixtures are missing at {FIXTURES}; CI must have them")
    pytest.skip(f"the official fixtures are not at {FIXTURES} (see its README)", allow_module_level=True)

U = 2.0 ** -24


def tolerance(expected: dict, reference: torch.Tensor) -> float:
    c = expected["config"]
    tokens = (c["img_size"] // c["patch_size"]) ** 2 + 1
    widest = max(4 * tokens, c["patch_size"] ** 2 * c["channels"], 2 * c["dim"])
    layers = 2 + 4 * c["depth"]
    return layers * math.sqrt(widest) * U * reference.abs().max().item()


def imported(name: str, file: str = "ema_checkpoint.pth"):
    oc = read_official(FIXTURES / name / file)
    cfg = infer_model_config(oc.vit)
    model = ViT(cfg)
    model.load_state_dict(official_to_hybvit(oc.vit, cfg))
    return model.eval(), GaussianDiffusion(1000, match_schedule(oc.schedule), "l1"), oc


def outputs(model: ViT, diffusion: GaussianDiffusion, e: dict) -> dict[str, torch.Tensor]:
    """What expected.pt holds, computed by hybvit: logits, x_t, eps, the L1 loss, the posterior mean/log-variance."""
    with torch.no_grad():
        xt = diffusion.q_sample(e["x0"], e["t"], e["noise"])
        loss = diffusion.output_loss(model.denoise(xt, e["t"]), e["x0"], e["t"], e["noise"])
        eps = model.denoise(e["xt"], e["t"])
        mean, _, log_var = diffusion.q_posterior(diffusion.x0_from_output(eps, e["xt"], e["t"]), e["xt"], e["t"])
    return {"logits": model.classify(e["x0"]).detach(), "xt": xt, "eps": eps, "p_losses_l1": loss,
            "p_mean": mean, "p_log_variance": log_var}


@pytest.mark.parametrize("file", ["ema_checkpoint.pth", "ema_checkpoint_dataparallel.pth"])
@pytest.mark.parametrize("name", NAMES)
def test_imported_model_reproduces_the_official_outputs(name, file):
    e = torch.load(FIXTURES / name / "expected.pt", weights_only=True)
    model, diffusion, oc = imported(name, file)
    assert oc.kind == "ema" and oc.data_parallel == ("dataparallel" in file)
    assert model.num_params() == e["params"]
    assert e["t"].tolist() == [0, 1, 10, 100, 400, 700, 998, 999]
    got = outputs(model, diffusion, e)
    for key, value in got.items():
        ref = e[key]
        if key == "p_log_variance":          # t = 0: the official log(1e-20) never acts (fixtures README)
            value, ref = value[1:], ref[1:]
        assert value.shape == ref.shape, key
        err = (value.double() - ref.double()).abs().max().item()
        assert err <= tolerance(e, ref), f"{name} {key}: {err:.3g} > {tolerance(e, ref):.3g}"


def test_the_tolerance_tells_the_old_embedding_apart(monkeypatch):
    e = torch.load(FIXTURES / "cifar10-tiny" / "expected.pt", weights_only=True)
    model, diffusion, _ = imported("cifar10-tiny")

    def old(t, dim, max_period=10000.0):                     # hybvit's embedding before config format 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(dim // 2, dtype=torch.float32) / (dim // 2))
        args = t.float()[:, None] * freqs[None]
        return torch.cat([args.sin(), args.cos()], dim=-1)
    monkeypatch.setattr(model_module, "timestep_embedding", old)
    err = (outputs(model, diffusion, e)["eps"] - e["eps"]).abs().max().item()
    assert err > 1000 * tolerance(e, e["eps"])


@pytest.mark.parametrize("name", NAMES)
def test_raw_checkpoint_holds_exactly_the_files_tensors(name):
    raw = torch.load(FIXTURES / name / "checkpoint.pth", weights_only=True)
    model, _, oc = imported(name, "checkpoint.pth")
    assert oc.kind == "raw" and oc.epoch == raw["epoch"]
    ours = model.state_dict()
    official = {k[len("denoise_fn."):]: v for k, v in raw["model_state_dict"].items() if k.startswith("denoise_fn.")}
    mapped = official_to_hybvit(official, model.cfg)
    assert len(mapped) == len(ours) == len(official)
    for key, value in mapped.items():
        assert torch.equal(ours[key], value), key
    assert sum(v.numel() for v in official.values()) == model.num_params()


def test_every_paper_configuration_maps_onto_its_preset():
    configs = json.loads((FIXTURES / "paper-configs.json").read_text())
    preset_of = {"cifar10": "cifar10-hybvit", "cifar100": "cifar100-hybvit", "imagenet32": "imagenet32-hybvit",
                 "tiny-imagenet": "tiny-imagenet-hybvit", "stl10": "stl10-hybvit", "celeba128": "celeba128-genvit"}
    assert set(configs) == set(preset_of)
    for name, entry in configs.items():
        shapes = {k[len("denoise_fn."):]: torch.empty(v, device="meta") for k, v in entry["state_dict"].items()
                  if k.startswith("denoise_fn.")}
        inferred = infer_model_config(shapes)
        preset = preset_config(preset_of[name]).model
        assert inferred == preset, name                     # shapes + the heads rule give the preset's model
        mapped = official_to_hybvit(shapes, preset)         # every key maps, nothing left over on either side
        with torch.device("meta"):
            ours = ViT(preset).state_dict()
        assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in ours.items()}
        assert sum(v.numel() for v in shapes.values()) == entry["params"]


def write_npz(path: Path, shape: tuple, labels: np.ndarray) -> None:
    rng = np.random.default_rng(0)
    x = lambda: rng.integers(0, 256, (len(labels), *shape), dtype=np.uint8)    # noqa: E731
    np.savez(path, x_train=x(), y_train=labels, x_test=x(), y_test=labels)


def test_import_sample_evaluate_export_and_fine_tune(tmp_path, capsys):
    for name in NAMES:
        run = tmp_path / name
        assert main(["import", str(FIXTURES / name / "ema_checkpoint.pth"), "--out", str(run)]) == 0
        assert main(["sample", "--run", str(run), "--num", "2", "--steps", "2", "--out", str(tmp_path / f"{name}.png"),
                     "--quiet"]) == 0
        c = torch.load(FIXTURES / name / "expected.pt", weights_only=True)["config"]
        shape = (c["img_size"], c["img_size"]) + ((c["channels"],) if c["channels"] == 3 else ())
        npz = tmp_path / f"{name}.npz"
        labels = np.array([0, 1, 2, 3, 4, c["num_classes"] - 1])          # the model's class count
        write_npz(npz, shape, labels)
        assert main(["evaluate", "--run", str(run), "--metrics", "accuracy", "--data", f"npz:{npz}",
                     "--out", str(tmp_path / f"{name}.json"), "--no-html", "--quiet"]) == 0
        assert 0 <= json.loads((tmp_path / f"{name}.json").read_text())["metrics"]["accuracy"]["test_accuracy"] <= 1
    meta = json.loads((tmp_path / "cifar10-tiny" / "metrics.json").read_text())
    sha = hashlib.sha256((FIXTURES / "cifar10-tiny" / "ema_checkpoint.pth").read_bytes()).hexdigest()
    assert meta["provenance"]["source"]["sha256"] == sha
    # the imported run equals the official model: load_run gives the fixture's logits
    e = torch.load(FIXTURES / "cifar10-tiny" / "expected.pt", weights_only=True)
    logits = load_run(tmp_path / "cifar10-tiny", device="cpu").model.classify(e["x0"]).detach()
    assert (logits - e["logits"]).abs().max() <= tolerance(e, e["logits"])
    assert main(["export", "--run", str(tmp_path / "cifar10-tiny"), "--out", str(tmp_path / "model")]) == 0
    assert "paper's code" in (tmp_path / "model" / "README.md").read_text()
    # fine-tune the official checkpoint itself on 3 classes: the head is new, the rest starts as the file's
    npz = tmp_path / "three.npz"
    write_npz(npz, (28, 28), np.arange(6) % 3)
    assert main(["train", "--init-from", str(FIXTURES / "mnist-tiny" / "checkpoint.pth"), "--data", f"npz:{npz}",
                 "--steps", "2", "--out", str(tmp_path / "ft"), "--set", "batch_size=4", "--set", "fd_samples=0",
                 "--quiet"]) == 0
    notes = json.loads((tmp_path / "ft" / "config.json").read_text())["notes"]
    assert any("re-initialised: 10 -> 3" in n for n in notes)


def test_import_with_a_preset_checks_its_shapes(tmp_path, capsys):
    ckpt = FIXTURES / "cifar10-tiny" / "ema_checkpoint.pth"
    rc = main(["import", str(ckpt), "--out", str(tmp_path / "r"), "--preset", "cifar10-hybvit"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "shape" in err and "denoise_fn." in err
    assert not (tmp_path / "r").exists()


def _rewrite(src: Path, dst: Path, edit) -> None:
    """Copy a torch.save zip, passing each member through edit(name, bytes) -> bytes."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/hybvit-evil",))


def bad_files(tmp_path: Path) -> dict[str, Path]:
    good = FIXTURES / "cifar10-tiny" / "ema_checkpoint.pth"
    out = {"truncated": tmp_path / "truncated.pth", "code": tmp_path / "code.pth", "shape": tmp_path / "shape.pth",
           "unknown": tmp_path / "unknown.pth", "missing": tmp_path / "missing.pth"}
    out["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    torch.save({"model_state_dict": {"betas": torch.zeros(3)}, "hook": _Evil()}, out["code"])
    state = torch.load(good, weights_only=True)["model_state_dict"]
    torch.save({"model_state_dict": {**state, "denoise_fn.recon_head.0.weight": torch.zeros(47, 48)}}, out["shape"])
    torch.save({"model_state_dict": {**state, "denoise_fn.extra.weight": torch.zeros(2)}}, out["unknown"])
    torch.save({"model_state_dict": {k: v for k, v in state.items() if "mlp_head.0" not in k}}, out["missing"])
    return out


@pytest.mark.parametrize("what,says", [("truncated", "truncated"), ("code", "run code"),
                                       ("shape", "recon_head.0.weight"), ("unknown", "denoise_fn.extra.weight"),
                                       ("missing", "head.0")])
def test_bad_files_give_one_line_and_leave_nothing(tmp_path, capsys, what, says):
    path = bad_files(tmp_path)[what]
    run = tmp_path / "run"
    rc = main(["import", str(path), "--out", str(run)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("hybvit: error:") and says in err, err
    assert not run.exists() and not list(tmp_path.glob(".run*"))
    assert not Path("/tmp/hybvit-evil").exists()


def test_a_member_claiming_more_than_the_file_holds_is_refused_before_loading(tmp_path):
    data = bytearray((FIXTURES / "cifar10-tiny" / "ema_checkpoint.pth").read_bytes())
    with zipfile.ZipFile(FIXTURES / "cifar10-tiny" / "ema_checkpoint.pth") as z:
        member = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    claim = (2 ** 31).to_bytes(4, "little")               # 2 GiB where the member stores a few kB
    # this member's central-directory entry: its name follows the 46-byte fixed header
    central = data.find(member.filename.encode(), data.find(b"PK\x01\x02")) - 46
    assert data[central:central + 4] == b"PK\x01\x02"
    data[central + 24:central + 28] = claim
    data[member.header_offset + 22:member.header_offset + 26] = claim
    bomb = tmp_path / "bomb.pth"
    bomb.write_bytes(bytes(data))
    with pytest.raises(HybvitError, match="claims 2,14"):
        read_official(bomb)


def test_old_runs_are_refused_with_one_line(tmp_path, capsys):
    assert main(["import", str(FIXTURES / "cifar10-tiny" / "ema_checkpoint.pth"), "--out", str(tmp_path / "r")]) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["format"] == 2
    del cfg["format"]                                   # what hybvit wrote before the official time embedding
    (tmp_path / "r" / "config.json").write_text(json.dumps(cfg))
    from hybvit.checkpoint import load_weights, save_weights
    weights, _ = load_weights(tmp_path / "r" / "checkpoints" / "ema.safetensors")
    save_weights(tmp_path / "r" / "checkpoints" / "ema.safetensors", weights, cfg)
    capsys.readouterr()
    for argv in (["sample", "--run", str(tmp_path / "r"), "--num", "1", "--out", str(tmp_path / "s.png")],
                 ["evaluate", "--run", str(tmp_path / "r"), "--metrics", "accuracy", "--out", str(tmp_path / "e.json")],
                 ["train", "--init-from", str(tmp_path / "r"), "--steps", "1", "--out", str(tmp_path / "t")]):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1 and "config format 2" in err, (argv, err)
