"""Atom-usage statistics (``moram_kernels/integrations/stats.py``)."""

from __future__ import annotations


import pytest
import torch
from torch import nn

import moram_kernels as mk
from moram_kernels import integrations as mki

from tiny_models import ids, randomise_atoms, trained


# ---- atom-usage statistics --------------------------------------------------------------------

def test_usage_counts_match_the_selected_atoms(monkeypatch):
    torch.manual_seed(0)
    layer = mk.MoRAMLinear(nn.Linear(16, 8), r=5, k=3, tau=0.1, delta=0.0)
    layer.add_task()
    layer.add_task()
    x = torch.randn(4, 6, 16)
    # off by default: the forward does not count at all
    assert layer.usage_counts is None

    def no_counting(*a, **k):
        raise AssertionError("usage counted while counting is off")
    monkeypatch.setattr(mk.MoRAMLinear, "_count_usage", no_counting)
    layer(x)
    monkeypatch.undo()

    model = nn.Sequential(layer)
    with mki.record_usage(model) as rec:
        layer(x)
        layer(x[:1])
    keys = torch.cat([layer.frozen_keys, layer.keys])
    sel = torch.cat([x.reshape(-1, 16), x[:1].reshape(-1, 16)]) @ keys.t()
    want = torch.bincount(sel.topk(3, dim=-1).indices.reshape(-1), minlength=10)
    assert torch.equal(rec.counts["0"], want)
    assert int(rec.counts["0"].sum()) == 30 * 3
    assert rec.atom_tasks["0"].tolist() == [0] * 5 + [1] * 5
    assert torch.equal(rec.by_task["0"], torch.stack([want[:5].sum(), want[5:].sum()]))
    assert layer.usage_counts is None                       # the block switched it off again
    torch.testing.assert_close(rec.task_fractions().sum().item(), 1.0)


def test_usage_api_on_a_model_grows_with_tasks(tmp_path):
    model = trained(tasks=1)
    x = ids()
    mki.start_usage(model)
    model(x)
    first = mki.usage_counts(model)
    mk.add_task(model)                                       # the bank grows while counting
    randomise_atoms(model, 3)
    model(x)
    counts, by_task = mki.usage_counts(model), mki.usage_by_task(model)
    k_eff = 3
    for name, layer in mki.moram_layers(model).items():
        assert counts[name].shape == (8,)
        assert int(counts[name].sum()) == 2 * x.numel() * k_eff
        assert torch.equal(counts[name][:4] >= first[name], torch.ones(4, dtype=torch.bool))
        assert by_task[name].shape == (2,) and int(by_task[name].sum()) == int(counts[name].sum())
    pytest.importorskip("matplotlib", reason="plot_usage needs matplotlib")
    mki.plot_usage(model, tmp_path / "usage.png")
    assert (tmp_path / "usage.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    mki.stop_usage(model)
    assert all(l.usage_counts is None for l in mki.moram_layers(model).values())
    with pytest.raises(ValueError, match="off"):
        mki.usage_counts(model)
