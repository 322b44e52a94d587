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
        cfg.train.num_samples = 4
        cfg.train.sample_steps = 3
        cfg.train.fd_samples = 0
        cfg.train.ckpt_every = 1000
        cfg.train.device = "cpu"  # bitwise resume equality is a CPU promise
        for k, v in train.items():
            setattr(cfg.train, k, v)
        return cfg
    return make


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
