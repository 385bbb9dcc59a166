"""Every kernel variant the launchers can emit on a GPU, as ``triton.compile`` inputs.

A variant is one (kernel, pointer dtypes, constexprs, num_warps, num_stages). Each is
listed in its aligned form (pointers, d_in and leading strides multiples of 16, unit
inner strides: what a launch on contiguous ``[*, 4096]`` tensors specialises to), and the
scoring kernel also in its generic form (odd sizes, no hints). ``.ci/triton_compile_check.py``
compiles them for sm_90 and sm_80 without a GPU and tabulates shared memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ._common import GROUP, K_BUCKETS, scan_configs, small_block
from .backward import FOLD_BR
from .split import GS_GPU, ONE_CHUNK_N, groups_config, pick_config, split_config, split_variants

__all__ = ["Variant", "all_variants"]

_DTYPES = ("bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Variant:
    kernel: str
    label: str
    signature: dict = field(hash=False)
    constexprs: dict = field(hash=False)
    attrs: dict = field(hash=False)
    num_warps: int = 4
    num_stages: int = 3
    per_sm: int = 0          # programs per SM the grid plan assumes (scan kernel); 0: not planned
    config: str = ""         # the scan config's regime: decode16 / decode64 / prefill

    def fn(self):
        return _kernel(self.kernel)


def _kernel(name):
    from . import _common, backward, forward, scan2, split
    for mod in (forward, scan2, split, backward, _common):
        if hasattr(mod, name):
            return getattr(mod, name)
    raise KeyError(name)


def _spec(kernel, label, ptrs, floats, consts, unit, div, aligned, warps, stages, per_sm=0, config=""):
    fn = _kernel(kernel)
    names = fn.arg_names
    consts = dict(consts)
    if aligned:
        consts.update({n: 1 for n in unit})
    sig = {}
    for n in names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ptrs:
            sig[n] = "*" + ptrs[n]
        elif n in floats:
            sig[n] = "fp32"
        else:
            sig[n] = "i32"
    attrs = {}
    if aligned:
        attrs = {(names.index(n),): [["tt.divisibility", 16]]
                 for n in list(ptrs) + list(div) if n not in consts}
    unknown = set(ptrs) | set(floats) | set(unit) | set(div) | set(consts)
    assert unknown <= set(names), f"{kernel}: {sorted(unknown - set(names))} are not arguments"
    return Variant(kernel, label + ("" if aligned else "-generic"), sig, consts, attrs, warps, stages,
                   per_sm, config)


def _scan(xd, kd, kp, cfg, aligned, prec="tf32"):
    return _spec(
        "_moram_scan_kernel", f"scan-{xd}x{kd}-K{kp}-{cfg.name}" + ("-ieee" if prec == "ieee" and xd == "fp32" else ""),
        ptrs={"x_ptr": xd, "k0_ptr": kd, "k1_ptr": kd, "pv_ptr": "fp32", "pi_ptr": "i32",
              "pss_ptr": "fp32", "pk_ptr": "fp32"},
        floats=(), consts=dict(BT=cfg.BT, BN=cfg.BN, BD=cfg.BD, KP=kp, UPCAST=False, PREC=prec),
        unit=("sxd", "s0d", "s1d"), div=("D", "sxt", "s0n", "s1n"), aligned=aligned,
        warps=cfg.num_warps, stages=cfg.num_stages, per_sm=cfg.per_sm, config=cfg.name)


def _split_scores(dt, prec, bt, bn, groups, aligned):
    cfg = split_config(bt, bn, dt, prec, interpret=False)
    return _spec(
        "_moram_split_scores_kernel",
        f"split_scores-{dt}-T{bt}-N{bn}-{'groups' if groups else 'slices'}" + ("-ieee" if prec == "ieee" else ""),
        ptrs={"x_ptr": dt, "k0_ptr": dt, "k1_ptr": dt, "sc_ptr": "fp32", "pss_ptr": "fp32", "gmax_ptr": "fp32"},
        floats=(), consts=dict(BT=cfg.BT, BN=bn, BD=cfg.BD, GS=GS_GPU, UPCAST=False, PREC=prec, GROUPS=groups),
        unit=("sxd", "s0d", "s1d"), div=("D", "sxt", "s0n", "s1n"), aligned=aligned,
        warps=cfg.num_warps, stages=cfg.num_stages)


def _pick(kp, groups, aligned, n=None):
    bc, warps = pick_config(kp, groups, interpret=False, n=n)
    # p1 (segment 1's scores, column N0 of the split road's buffer) has no alignment to claim
    return _spec(
        "_moram_pick_kernel", f"pick-K{kp}-{'groups' if groups else 'stream'}" + ("-onechunk" if n else ""),
        ptrs={"p0_ptr": "fp32", "p1_ptr": "fp32", "pss_ptr": "fp32", "gmax_ptr": "fp32", "sc0_ptr": "fp32",
              "sc1_ptr": "fp32", "idx_ptr": "i64", "psel_ptr": "fp32", "norm_ptr": "fp32", "coef_ptr": "fp32"},
        floats=("tau", "delta", "eps"), consts=dict(KP=kp, BC=bc, GS=GS_GPU, GROUPS=groups),
        unit=(), div=(), aligned=aligned, warps=warps, stages=3)


def _scan2(dt, kp, aligned):
    from .scan2 import scan2_configs
    cfg = scan2_configs(dt, kp)["prefill"]
    return _spec(
        "_moram_scan2_kernel", f"scan2-{dt}-K{kp}-prefill",
        ptrs={"x_ptr": dt, "k0_ptr": dt, "k1_ptr": dt, "pv_ptr": "fp32", "pi_ptr": "i32",
              "pss_ptr": "fp32", "pk_ptr": "fp32"},
        floats=(), consts=dict(BT=cfg.BT, BN=cfg.BN, BD=cfg.BD, KP=kp, UPCAST=False, PREC="tf32"),
        unit=(), div=("D", "sxt", "s0n", "s1n"), aligned=aligned,
        warps=cfg.num_warps, stages=cfg.num_stages, per_sm=cfg.per_sm, config="prefill")


def all_variants() -> list[Variant]:
    out = []
    # the split road (decode) and the select of the split and gemm roads
    for dt, prec in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee")):
        for bt, bn, groups in split_variants():
            out.append(_split_scores(dt, prec, bt, bn, groups, True))
    out.append(_split_scores("bf16", "tf32", 16, 64, True, False))
    for kp in K_BUCKETS:
        for groups in (True, False):
            out.append(_pick(kp, groups, True))
    out.append(_pick(16, True, False))
    out.append(_pick(16, False, True, n=ONE_CHUNK_N))    # a stream of at most ONE_CHUNK_N scores, one chunk
    # the gemm2 road's groups kernel (fp32 scores whatever the inputs; its row strides are
    # not specialised at run time, so no divisibility is claimed for them: scalar loads,
    # 128 B a warp, coalesced)
    bt, bn, warps = groups_config(interpret=False)
    for aligned in (True, False):
        out.append(_spec(
            "_moram_groups_kernel", "groups-fp32",
            ptrs={"p0_ptr": "fp32", "p1_ptr": "fp32", "pss_ptr": "fp32", "gmax_ptr": "fp32"},
            floats=(), consts=dict(BT=bt, BN=bn, GS=GS_GPU), unit=(), div=(), aligned=aligned,
            warps=warps, stages=3))
    # the dtype policy gives both dot operands one dtype: no mixed variant exists; fp32 runs
    # as TF32 unless float32_matmul_precision is "highest" (IEEE, CUDA cores)
    for dt, prec in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "tf32"), ("fp32", "ieee")):
        for kp in K_BUCKETS:
            for cfg in scan_configs(dt, kp, prec).values():
                out.append(_scan(dt, dt, kp, cfg, True, prec))
    out.append(_scan("bf16", "bf16", 16, scan_configs("bf16", 16)["prefill"], False))
    # scan2 serves tensor-core dots with K <= 16 (scan2.serves), always with 16-slot lists;
    # the rest run the old scan
    for dt in _DTYPES:
        out.append(_scan2(dt, 16, True))
    out.append(_scan2("bf16", 16, False))
    for kp in K_BUCKETS:
        bt, bo, bc = small_block(kp, interpret=False)
        out.append(_spec(
            "_moram_select_kernel", f"select-K{kp}",
            ptrs={"pv_ptr": "fp32", "pi_ptr": "i32", "pss_ptr": "fp32", "pk_ptr": "fp32", "sc0_ptr": "fp32",
                  "sc1_ptr": "fp32", "idx_ptr": "i64", "psel_ptr": "fp32", "norm_ptr": "fp32",
                  "coef_ptr": "fp32"},
            floats=("tau", "delta", "eps"), consts=dict(BT=bt, BC=bc, KP=kp),
            unit=(), div=(), aligned=True, warps=4, stages=3))
        out.append(_spec(
            "_moram_bwd_coef_kernel", f"bwd_coef-K{kp}",
            ptrs={"part_ptr": "fp32", "sc0_ptr": "fp32", "sc1_ptr": "fp32", "idx_ptr": "i64",
                  "psel_ptr": "fp32", "norm_ptr": "fp32", "gsel_ptr": "fp32", "alpha_ptr": "fp32",
                  "cb_ptr": "fp32"},
            floats=("tau", "delta", "eps"), consts=dict(BT=bt, KP=kp),
            unit=(), div=(), aligned=True, warps=4, stages=3))
        for dt in _DTYPES:
            out.append(_spec(
                "_moram_bwd_gc_kernel", f"bwd_gc-{dt}-K{kp}",
                ptrs={"gy_ptr": dt, "v0_ptr": dt, "v1_ptr": dt, "idx_ptr": "i64", "part_ptr": "fp32"},
                floats=(), consts=dict(BT=bt, BO=bo, KP=kp, G=GROUP), unit=("sgd", "sv0d", "sv1d"),
                div=("DO", "sgt", "sv0n", "sv1n"), aligned=True, warps=4, stages=3))
    bt, bo, _ = small_block(16, interpret=False)
    for dt in _DTYPES:
        out.append(_spec(
            "_moram_gather_kernel", f"gather-{dt}",
            ptrs={"idx_ptr": "i64", "coef_ptr": "fp32", "alpha_ptr": "fp32", "r0_ptr": dt,
                  "r1_ptr": dt, "dense_ptr": "fp32", "out_ptr": dt},
            floats=(), consts=dict(BT=bt, BO=bo, G=GROUP), unit=("s0d", "s1d", "sdd", "sod"),
            div=("DO", "s0n", "s1n", "sdt", "sot"), aligned=True, warps=4, stages=3))
        out.append(_spec(
            "_moram_bwd_db_atomic_kernel", f"bwd_db_atomic-{dt}",
            ptrs={"idx_ptr": "i64", "cb_ptr": "fp32", "gy_ptr": dt, "gv_ptr": "fp32"},
            floats=(), consts=dict(BT=bt, BO=bo), unit=("sgd",), div=("DO", "sgt"),
            aligned=True, warps=4, stages=3))
        for prec in ("tf32", "ieee") if dt == "fp32" else ("tf32",):
            out.append(_spec(
                "_moram_bwd_dx_kernel", f"bwd_dx-{dt}" + ("-ieee" if prec == "ieee" else ""),
                ptrs={"idx_ptr": "i64", "gsel_ptr": "fp32", "alpha_ptr": "fp32", "k0_ptr": dt, "k1_ptr": dt,
                      "dense_ptr": "fp32", "p0_ptr": "fp32", "p1_ptr": "fp32", "out_ptr": dt},
                floats=(), consts=dict(BT=bt, BO=bo, BR=FOLD_BR, G=GROUP, UPCAST=False, PREC=prec),
                unit=("s0d", "s1d", "sdd", "sp0n", "sp1n", "sod"),
                div=("DO", "s0n", "s1n", "sdt", "sp0t", "sp1t", "sot"), aligned=True, warps=4, stages=3))
        for kp in K_BUCKETS if dt == "bf16" else (16,):
            out.append(_spec(
                "_moram_bwd_db_hit_kernel", f"bwd_db_hit-{dt}-K{kp}",
                ptrs={"idx_ptr": "i64", "cb_ptr": "fp32", "gy_ptr": dt, "gv_ptr": "fp32", "stats_ptr": "i32"},
                floats=(), consts=dict(BT=bt, BO=bo, KP=kp, STATS=False), unit=("sgd",), div=("DO", "sgt"),
                aligned=True, warps=4, stages=3))
        out.append(_spec(
            "_moram_bwd_db_sorted_kernel", f"bwd_db_sorted-{dt}",
            ptrs={"perm_ptr": "i64", "off_ptr": "i64", "cb_ptr": "fp32", "gy_ptr": dt, "gv_ptr": dt},
            floats=(), consts=dict(BE=16, BO=bo), unit=("sgd", "svd"), div=("DO", "sgt", "svn"),
            aligned=True, warps=4, stages=3))
    return out
