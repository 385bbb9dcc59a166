"""The shapes benchmarked: sweeps over N, k and T, and the paper's own layers."""

from __future__ import annotations

from dataclasses import dataclass, replace

from moram_kernels.backends.reference import effective_k


@dataclass(frozen=True)
class Case:
    """One layer shape. ``r`` atoms of the ``n`` are trainable in the train step."""

    sweep: str          # which sweep(s) it belongs to, e.g. "N" or "paper:CLIP"
    d_in: int
    d_out: int
    n: int
    k: int
    t: int
    r: int = 16
    tau: float = 0.01
    # the eval-time threshold. 0 by default: with random atoms the normalised scores of a
    # token have sum of squares 1 over N atoms, so at N >= ~500 none reaches 0.2 and every
    # output would be zero (an empty check against the authors). The paper's layers keep
    # their own 0.2, where random inputs still pass it on most rows.
    delta: float = 0.0
    eps: float = 1e-12
    alpha: float | None = None

    @property
    def kk(self) -> int:
        return effective_k(self.k, self.n)

    @property
    def scaling(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r

    @property
    def shape_key(self) -> tuple:
        return (self.d_in, self.d_out, self.n, self.k, self.t, self.r, self.tau, self.delta,
                self.eps, self.alpha)

    def label(self) -> str:
        return f"d{self.d_in}-N{self.n}-k{self.k}-T{self.t}"


def _clip(t: int) -> Case:
    # ViT-B/16 width 768, 160 atoms per layer after 10 tasks of r = 16 (docs/op.md, defaults)
    return Case("paper:CLIP", 768, 768, 160, 16, t, r=16, tau=0.01, delta=0.2, eps=1e-12)


def _llama(t: int) -> Case:
    # LLaMA-2-7B width 4096, 64 atoms per layer after 8 tasks of r = 8, alpha = 2r
    return Case("paper:LLaMA", 4096, 4096, 64, 8, t, r=8, tau=0.03, delta=0.2, eps=1e-8, alpha=16.0)


def decode() -> list[Case]:
    """One token per call (generation): the paper's banks, a bank large enough to be
    memory-bound, and N = 1, whose time is the per-call overhead."""
    return [_clip(1), _llama(1), Case("decode", 4096, 4096, 1024, 8, 1, r=8, tau=0.03, eps=1e-8, alpha=16.0),
            Case("overhead", 768, 768, 1, 1, 1, r=1)]


def full() -> list[Case]:
    d, t, n, k = 768, 256, 4096, 16
    cases = [Case("N", d, d, nn, k, t) for nn in (64, 256, 1024, 4096, 16384, 65536)]
    cases += [Case("k", d, d, n, kk, t) for kk in (8, 16, 64)]
    cases += [Case("T", d, d, n, k, tt) for tt in (1, 16, 256, 2048)]
    cases += [_clip(197), _clip(197 * 8), _llama(512)] + decode()
    return merge(cases)


def quick() -> list[Case]:
    """Shapes that share one compiled graph per mode (decode, T = 1, and N above a few
    thousand each cost torch.compile a recompile, tens of seconds on 2 cores)."""
    d, t, k = 768, 128, 16
    cases = [Case("N", d, d, nn, k, t) for nn in (64, 512, 4096)]
    cases += [_clip(197)]
    return merge(cases)


def smoke() -> list[Case]:
    """A tiny grid for testing the harness itself (seconds, not minutes)."""
    cases = [Case("N", 32, 24, nn, 4, 8, r=4) for nn in (8, 32)]
    cases += [Case("T", 32, 24, 32, 4, 1, r=4)]
    return merge(cases)


def custom(d: list[int], n: list[int], k: list[int], t: list[int], r: int) -> list[Case]:
    return merge([Case("custom", dd, dd, nn, kk, tt, r=min(r, nn))
                  for dd in d for nn in n for kk in k for tt in t])


def merge(cases: list[Case]) -> list[Case]:
    """One case per shape; a shape in several sweeps lists them all, e.g. "N,k,T"."""
    out: dict[tuple, Case] = {}
    for c in cases:
        if c.shape_key in out:
            prev = out[c.shape_key]
            if c.sweep not in prev.sweep.split(","):
                out[c.shape_key] = replace(prev, sweep=prev.sweep + "," + c.sweep)
        else:
            out[c.shape_key] = c
    return list(out.values())
