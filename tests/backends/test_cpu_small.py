"""The cpu backend at small shapes (csrc/cpu/moram_cpu.cpp, csrc/cpu/thread_plan.cpp): the
top-K of a whole score row (a bank that fits in one tile, and one decoded token) against the
running heap of the tiled road and its tie rule, the effective-K rules and NaN rows on that
road, and the thread plan that decides how many threads a call wakes."""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import make_inputs

from moram_kernels.backends import compiled as _C_loader
from moram_kernels.backends import reference as ref

_WHY = _C_loader.why_unavailable("cpu")
if _WHY is not None:
    pytest.skip(f"the cpu backend is not built here: {_WHY}", allow_module_level=True)

from moram_kernels.backends import cpu as _cpu  # noqa: E402  (needs the extension)

_C = importlib.import_module("moram_kernels._C")
TAU, EPS = 0.1, 1e-12


def _segs(keys, values, n0):
    return keys[:n0], values[:n0], None, keys[n0:], values[n0:], None


def _lower_id_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """The K best ids of each row, ties to the lower id, by score descending then id."""
    return torch.sort(-scores, dim=1, stable=True).indices[:, :k]


@pytest.mark.parametrize("t", [1, 37])
def test_row_selection_picks_the_tiled_heaps_atoms(monkeypatch, t):
    """A bank of 300 atoms fits in one tile: its top-K comes from select_row. Forced into
    64-atom tiles (MORAM_CPU_BN) the same call takes the running heap; on distinct scores
    both pick the same atoms with the same raw scores, and the outputs agree."""
    x, keys, values = make_inputs(t, 40, 24, 300, k=16, seed=2, min_gap=0.02)
    segs = _segs(keys, values, 284)
    y, idx, p_sel, norm = _cpu.moram_fwd(x, *segs, 16, TAU, 0.0, EPS)
    monkeypatch.setenv("MORAM_CPU_BN", "64")
    y_h, idx_h, p_h, norm_h = _cpu.moram_fwd(x, *segs, 16, TAU, 0.0, EPS)
    order, order_h = idx.argsort(1), idx_h.argsort(1)
    assert torch.equal(idx.gather(1, order), idx_h.gather(1, order_h))
    assert torch.equal(p_sel.gather(1, order), p_h.gather(1, order_h))
    torch.testing.assert_close(norm, norm_h, rtol=1e-6, atol=0)
    torch.testing.assert_close(y, y_h, rtol=1e-5, atol=1e-6)
    # the row road returns the K by score descending, ties (none here) to the lower id
    assert torch.equal(idx, _lower_id_topk(x @ keys.T, 16))


@pytest.mark.parametrize("t", [1, 5])
def test_ties_go_to_the_lower_id(t):
    """Scores tied at the K-th place: the lower ids win, on the one-token road and on the
    block road alike; all-equal scores select 0..K-1."""
    d = 8
    keys = torch.zeros(7, d)
    keys[:, 0] = torch.tensor([1.0, 2.0, 2.0, 0.5, 2.0, 3.0, 2.0])
    values = torch.randn(7, 6)
    x = torch.zeros(t, d)
    x[:, 0] = 1.0
    _, idx, p_sel, _ = _cpu.moram_fwd(x, *_segs(keys, values, 4), 3, TAU, 0.0, EPS)
    assert idx.tolist() == [[5, 1, 2]] * t
    assert p_sel.tolist() == [[3.0, 2.0, 2.0]] * t
    same = torch.ones(9, d) / d
    _, idx, _, _ = _cpu.moram_fwd(torch.ones(t, d), *_segs(same, torch.randn(9, 6), 2), 4, TAU, 0.0, EPS)
    assert idx.tolist() == [[0, 1, 2, 3]] * t


@pytest.mark.parametrize("t", [1, 9])
@pytest.mark.parametrize("n,k", [(200, 8), (161, 16), (64, 8), (40, 16), (33, 2), (1000, 24), (1000, 64)])
def test_rows_full_of_ties_match_a_stable_sort(t, n, k):
    """Integer scores from a handful of values, so every row ties at and around its K-th
    place, in the same and in different groups of the row road's threshold (score j in
    group j mod 2K): the K ids and scores are exactly a stable sort's, lower ids first.
    Rows with more than 3K candidates take the selection before the sort."""
    g = torch.Generator().manual_seed(31 * n + k)
    keys = torch.zeros(n, 4)
    keys[:, 0] = torch.randint(-3, 4, (n,), generator=g).float()
    keys[:, 1] = torch.randint(-2, 3, (n,), generator=g).float()
    x = torch.zeros(t, 4)
    x[:, 0] = 1.0
    x[:, 1] = (torch.arange(t) % 3).float()   # row 0: seven distinct scores for n atoms
    scores = x @ keys.T                        # small integers: exact in any summation order
    _, idx, p_sel, _ = _cpu.moram_fwd(x, *_segs(keys, torch.randn(n, 5, generator=g), n // 2), k, TAU, 0.0, EPS)
    want = _lower_id_topk(scores, k)
    assert torch.equal(idx, want)
    assert torch.equal(p_sel, scores.gather(1, want))


@pytest.mark.parametrize("road", ["portable", "avx2"])
def test_pass_packs_the_scores_above_the_floor(road):
    """The row road's pass packs, in row order, the scores strictly above the threshold
    with their places: at lengths with and without a vector tail, with NaN and infinities
    (NaN never passes) and scores equal to the threshold (they do not pass either). The
    binding fills the output past the count with NaN, so a count that overshoots shows."""
    if road == "avx2":
        try:
            _C.cpu_pass_above(torch.zeros(1), 0.0, "avx2")
        except RuntimeError as e:
            pytest.skip(f"no avx2 pass on this CPU or build: {e}")
    g = torch.Generator().manual_seed(5)
    for n in (0, 1, 7, 8, 9, 15, 16, 17, 64, 1003):
        row = torch.randn(n, generator=g).round(decimals=1)   # many scores tie with the floor
        if n >= 9:
            row[torch.randint(0, n, (3,), generator=g)] = float("nan")
            row[torch.randint(0, n, (2,), generator=g)] = float("inf")
            row[torch.randint(0, n, (2,), generator=g)] = -float("inf")
        for floor in (0.3, -0.1, 2.5, float("-inf"), float("inf")):
            keep = row > floor
            got_v, got_p = _C.cpu_pass_above(row, floor, road)
            assert torch.equal(got_p, keep.nonzero().flatten()), (n, floor)
            assert torch.equal(got_v, row[keep]), (n, floor)


@pytest.mark.parametrize("t", [1, 6])
@pytest.mark.parametrize("n,k,want_k", [(1, 4, 1), (5, 1, 2), (3, 8, 3), (2, 2, 2)])
def test_effective_k_on_the_row_road(t, n, k, want_k):
    """K = min(max(k, 2), N), or 1 when N == 1 (the eager entry), and the atoms the
    reference picks, at banks far below one tile."""
    x, keys, values = make_inputs(t, 12, 10, n, k=min(want_k, n), seed=4, min_gap=0.02)
    y, idx = _C_loader.eager()(x, keys, values, None, None, None, None, None, k, TAU, 0.0, EPS)
    assert idx.shape == (t, want_k)
    yr, idxr, _, _ = ref.moram_fwd(x, keys, values, None, keys[:0], values[:0], None, want_k, TAU, 0.0, EPS)
    assert torch.equal(idx.sort(1).values, idxr.sort(1).values)
    torch.testing.assert_close(y.detach(), yr, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t", [1, 4])
def test_nan_row_keeps_valid_distinct_ids(t):
    """A NaN token: its output is NaN, its K ids valid and distinct (filled from the lowest
    unused ids); a token with one NaN score never selects it; the other tokens are exact."""
    x, keys, values = make_inputs(t, 16, 8, 20, k=4, seed=6, min_gap=0.02)
    x[0] = float("nan")
    keys = keys.clone()
    keys[3, 0] = float("nan")   # one NaN score for every token... only where x[:, 0] != 0
    y, idx, _, _ = _cpu.moram_fwd(x, *_segs(keys, values, 12), 4, TAU, 0.0, EPS)
    assert torch.isnan(y[0]).all()
    assert idx[0].tolist() == [0, 1, 2, 3]
    for r in range(1, t):
        assert 3 not in idx[r].tolist() and len(set(idx[r].tolist())) == 4
        assert torch.isnan(y[r]).all()   # the NaN score still enters the norm
    assert ((idx >= 0) & (idx < 20)).all()


def test_all_minus_inf_row_fills_lowest_unused_ids():
    """Scores of -inf never pass the threshold either: the row is filled the same way."""
    keys = torch.zeros(6, 4)
    keys[:, 0] = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5])
    x = torch.zeros(1, 4)
    x[0, 0] = float("inf")
    _, idx, p_sel, _ = _cpu.moram_fwd(x, *_segs(keys, torch.randn(6, 3), 6), 4, TAU, 0.0, EPS)
    assert idx.tolist() == [[0, 2, 4, 1]]   # three +inf scores by id, then the lowest unused
    assert p_sel[0, :3].tolist() == [float("inf")] * 3 and p_sel[0, 3].item() == float("-inf")


# ---- the thread plan -------------------------------------------------------------------------

L2 = 512 * 1024


@pytest.mark.parametrize("madds,nbytes,want", [
    (64 * 96 * 56, 4 * (96 * 40 + 64 * 56), 1),      # a tiny block: fits in L2, µs of work
    (4096 * 64, 4 * 4096 * 64, 1),                   # one token over 1 MiB of keys: 2 L2s
    (4096 * 1024, 4 * 4096 * 1024, 2),               # one token over 16 MiB of keys
    (8 * L2 / 4, 8 * L2, 2),                         # four L2s' worth of bytes per thread
    (7 * L2 / 4, 7 * L2, 1),                         # ... not quite for two
    (3 * 2**20, 1000, 2),                            # compute-bound, three grains
    (3 * 2**20, 1000, 3),                            # ... with four threads allowed
])
def test_thread_plan_from_bytes_and_compute(madds, nbytes, want):
    max_threads = 4 if want == 3 else 2
    assert _C.cpu_thread_plan(madds, nbytes, max_threads, L2, 0) == want


def test_thread_plan_caps_and_override(monkeypatch):
    assert _C.cpu_thread_plan(1e12, 1e12, 1, L2, 0) == 1          # never above max_threads
    assert _C.cpu_thread_plan(float("nan"), 0.0, 8, L2, 0) == 1
    assert _C.cpu_thread_plan(4096 * 1024, 0.0, 8, L2, 2**17) == 8   # MORAM_CPU_GRAIN: madds only
    assert _C.cpu_thread_plan(1000, 1e9, 8, L2, 2**17) == 1
    l2, cores = _C.cpu_machine()
    assert l2 >= 16 * 1024 and cores >= 1
    # this machine's values and the environment variable, read on every call
    monkeypatch.setenv("MORAM_CPU_GRAIN", "1")
    assert _C.cpu_thread_plan(10.0, 0.0) == min(10, torch.get_num_threads())
    monkeypatch.delenv("MORAM_CPU_GRAIN")
    assert _C.cpu_thread_plan(10.0, 40.0) == 1
