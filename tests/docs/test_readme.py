"""The README's quickstart runs as written, and the README stays a short front door."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[2] / "README.md"
MAX_CHARS = 8000


def test_quickstart_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)             # the quickstart writes atoms.safetensors
    text = README.read_text(encoding="utf-8")
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README quickstart", "exec"), scope)
    assert scope["y"].shape == (4, 128, 768)
    assert scope["layer"].num_atoms == 32 and scope["layer"].num_trainable_atoms == 16
    # the whole-model cycle: three tasks of 8 atoms, saved, loaded into a fresh model, removed
    fresh = scope["fresh"][0]
    assert fresh.num_atoms == 24 and fresh.num_trainable_atoms == 8
    assert fresh.task_sizes.tolist() == [8, 8, 8]
    assert type(scope["model"][0]) is torch.nn.Linear          # remove() put the original back
    assert (tmp_path / "atoms.safetensors").is_file()


def test_readme_is_short():
    n = len(README.read_text(encoding="utf-8"))
    assert n < MAX_CHARS, (f"README.md has {n} characters; keep it a front door under {MAX_CHARS} "
                           "and move detail to docs/")
