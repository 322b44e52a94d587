"""The README's Python examples run as written (against a tiny run trained here)."""
import re
from pathlib import Path

from hybvit.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "the README has Python examples"
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--steps", "2", "--out", "runs/digits", "--quiet", "--set", "model.dim=32",
                 "--set", "model.depth=2", "--set", "model.heads=2", "--set", "fd_samples=0",
                 "--set", "num_samples=4", "--set", "sample_steps=2"]) == 0
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
