import os
import tempfile

import pytest
import torch

from hybvit.config import preset_config

os.environ.setdefault("HYBVIT_NO_DOWNLOAD", "1")  # tests never touch the network
os.environ.setdefault("HYBVIT_CACHE", tempfile.mkdtemp(prefix="hybvit-test-cache-"))   # not the user's cache
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_cfg():
    """The default preset shrunk to a model and budget that train in seconds."""
    def make(mode="hybvit", steps=8, **train):
        cfg = preset_config("digits-hybvit")
        cfg.model.dim, cfg.model.depth, cfg.model.heads = 32, 2, 2
        cfg.train.mode = mode
        cfg.train.steps = steps
        cfg.train.batch_size = 32
        cfg.train.fd_samples = 0
        cfg.train.ckpt_every = 1000
        cfg.train.device = "cpu"  # bitwise resume equality is a CPU promise
        for k, v in train.items():
            if not hasattr(cfg.train, k):           # a removed option would otherwise become a silent attribute
                raise TypeError(f"train has no field {k!r}")
            setattr(cfg.train, k, v)
        return cfg
    return make


@pytest.fixture
def joint_pass(monkeypatch):
    """joint_pass(True): hybvit.train builds its Objective with the joint pass (both hybvit batches through one
    forward, what it does on CUDA) also on the CPU; joint_pass(False): the CPU's two passes again. Returns a list
    that gets the size of each joint forward's clean batch, so a test can see the joint pass really ran."""
    import hybvit.train
    from hybvit.objective import Objective
    calls = []

    class Joint(Objective):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "joint": True})
            inner = self.joint_net
            self.joint_net = lambda x0, *rest: (calls.append(len(x0)), inner(x0, *rest))[1]

    def use(on: bool = True) -> list:
        monkeypatch.setattr(hybvit.train, "Objective", Joint if on else Objective)
        return calls
    return use


@pytest.fixture(scope="session")
def digits():
    """The bundled digits (tests that need their own copy define a module fixture of the same name)."""
    from hybvit.datasets import load_data
    return load_data("digits")


@pytest.fixture
def tiny_run(tiny_cfg):
    """An untrained tiny ViT as a Run (vit mode), for metric plumbing tests."""
    from hybvit.diffusion import GaussianDiffusion
    from hybvit.model import ViT
    from hybvit.sample import Run
    cfg = tiny_cfg(mode="vit")
    torch.manual_seed(0)
    model = ViT(cfg.model).eval().requires_grad_(False)
    return Run(model, cfg, GaussianDiffusion.from_config(cfg.diffusion), torch.device("cpu"))
