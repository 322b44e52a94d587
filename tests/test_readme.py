"""The README's Python examples run as written (against a tiny run trained here) and give what they say."""
import re
from pathlib import Path

import torch

from hybvit.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) == 2, "the README has two Python examples"
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--steps", "2", "--out", "runs/digits", "--quiet", "--set", "model.dim=32",
                 "--set", "model.depth=2", "--set", "model.heads=2", "--set", "fd_samples=0"]) == 0
    run_api, own_loop = {}, {}
    exec(compile(blocks[0], "README.md", "exec"), run_api)
    exec(compile(blocks[1], "README.md", "exec"), own_loop)
    # the first example: samples in [-1, 1] of the digits' shape, labels and logits of the same network
    for name, n in (("samples", 16), ("fast", 16), ("sevens", 8)):
        x = run_api[name]
        assert x.shape == (n, 1, 8, 8) and float(x.min()) >= -1 and float(x.max()) <= 1, name
    assert run_api["logits"].shape == (16, 10)
    assert torch.equal(run_api["labels"], run_api["logits"].argmax(1))
    # the second: one finite training step and samples of the asked shape
    assert torch.isfinite(own_loop["loss"]) and own_loop["samples"].shape == (4, 1, 8, 8)
