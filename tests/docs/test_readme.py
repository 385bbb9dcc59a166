"""The README's quickstart runs as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_quickstart_runs():
    text = README.read_text()
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", text, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README quickstart", "exec"), scope)
    assert scope["y"].shape == (4, 128, 768)
    assert scope["layer"].num_atoms == 32 and scope["layer"].num_trainable_atoms == 16
