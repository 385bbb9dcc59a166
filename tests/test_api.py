"""Public names, the dispatch table, and clear errors on bad input."""

import math
import os
import subprocess
import sys

import pytest
import torch

import moram_kernels as mk
from moram_kernels import backends as _dispatch

API = ["moram", "available_backends", "use_backend", "MoRAMLinear", "MoRAMConfig", "inject",
       "add_task", "save_moram", "load_moram"]


def test_public_names():
    for name in API:
        assert hasattr(mk, name), name


def test_available_backends_ends_with_reference():
    names = mk.available_backends()
    assert names[-1] == "reference"
    assert set(names) <= {"triton", "cuda", "cpu", "reference"}


def test_auto_never_picks_an_interpreter_for_cpu_tensors():
    inp = _dispatch.Inputs(torch.device("cpu"), torch.float32, torch.float32, torch.float32, 8, 8, 10, 2)
    assert _dispatch.select(None, inp).name != "triton"
    assert _dispatch.select(None, inp).name == [b for b in mk.available_backends() if b != "triton"][0]


def test_forcing_an_unusable_backend_lists_every_reason():
    inp = _dispatch.Inputs(torch.device("cpu"), torch.float64, torch.float32, torch.float32, 8, 8, 100, 80)
    with pytest.raises(RuntimeError) as e:
        _dispatch.select("triton", inp)
    msg = str(e.value)
    assert "'triton'" in msg and "float64" in msg
    if "triton" in mk.available_backends():
        assert "64 atoms" in msg           # the K > 64 reason is listed too
    with pytest.raises(RuntimeError, match="cuda"):
        mk.moram(torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 2), k=2, tau=0.1, backend="cuda")


def test_use_backend_and_env(monkeypatch):
    x, a, b = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 2)
    with mk.use_backend("reference"):
        assert _dispatch.requested(None) == "reference"
        with pytest.raises(ValueError, match="unknown backend"):
            with mk.use_backend("nope"):
                pass
        mk.moram(x, a, b, k=2, tau=0.1)
    assert _dispatch.requested(None) is None
    monkeypatch.setenv("MORAM_BACKEND", "reference")
    assert _dispatch.requested(None) == "reference"
    assert _dispatch.requested("cpu") == "cpu"            # an explicit argument wins
    monkeypatch.setenv("MORAM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MORAM_BACKEND"):
        mk.moram(x, a, b, k=2, tau=0.1)


def test_env_var_forces_backend_in_fresh_process():
    code = ("import torch, moram_kernels as mk\n"
            "from moram_kernels import backends as _dispatch\n"
            "print(_dispatch.requested(None))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MORAM_BACKEND": "reference"}, check=True)
    assert out.stdout.strip() == "reference"


# Run in a fresh process: a finder placed before the import decides what importing
# moram_kernels._C gives (nothing, an import that fails, a module without the ops).
_EXTENSION_CASES = {
    "missing": "raise ModuleNotFoundError(\"No module named 'moram_kernels._C'\", name=name)",
    "broken": "return _spec(name, lambda m: (_ for _ in ()).throw("
              "OSError('_C.so: undefined symbol: _ZN2at4_ops3foo')))",
    "no-symbols": "return _spec(name, lambda m: None)",
}
_EXTENSION_PROBE = """
import importlib.abc, importlib.machinery, sys, warnings
class _Loader(importlib.abc.Loader):
    def __init__(self, run): self.run = run
    def create_module(self, spec): return None
    def exec_module(self, m): self.run(m)
def _spec(name, run): return importlib.machinery.ModuleSpec(name, _Loader(run))
class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "moram_kernels._C":
            {case}
        return None
sys.meta_path.insert(0, _Finder())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as w:
    import torch, moram_kernels as mk
    x, a, b = torch.randn(2, 4), torch.randn(3, 4), torch.randn(3, 2)
    y = mk.moram(x, a, b, k=2, tau=0.1)
    mk.moram(x, a, b, k=2, tau=0.1)
    names = mk.available_backends()
    from moram_kernels.backends import compiled
    compiled.why_unavailable("cpu")
ours = [str(m.message) for m in w if "moram_kernels._C" in str(m.message)]
print(repr((names, ours, bool(torch.allclose(y, mk.moram(x, a, b, k=2, tau=0.1, backend="reference"))))))
"""


def _probe_extension(case, **env):
    code = _EXTENSION_PROBE.replace("{case}", _EXTENSION_CASES[case] if case else "return None")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "TRITON_INTERPRET": "0", **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return eval(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case,why", [("missing", "ModuleNotFoundError"),
                                      ("broken", "undefined symbol"),
                                      ("no-symbols", "lacks _C.has_cpu")])
def test_missing_or_broken_extension_warns_exactly_once_and_works(case, why):
    """The real loader paths: the import of moram_kernels._C fails, raises an OSError like a
    stale build, or gives a module without the ops. Exactly one warning over import, two
    calls and the availability queries, naming the cause; cpu is not offered; the
    reference path answers."""
    names, warned, same = _probe_extension(case)
    assert len(warned) == 1, warned
    assert why in warned[0] and "falling back" in warned[0]
    assert "cpu" not in names and names[-1] == "reference"
    assert same


def test_disabled_extension_is_silent():
    """MORAM_NO_EXTENSION=1 is the user's own choice: no warning, no cpu backend."""
    names, warned, same = _probe_extension(None, MORAM_NO_EXTENSION="1")
    assert warned == [] and "cpu" not in names and same


X, A, B = torch.randn(3, 4), torch.randn(5, 4), torch.randn(5, 2)
BAD = [
    (dict(x=torch.randn(3, 7)), ValueError, "d_in"),
    (dict(k=0), ValueError, "k must be >= 1"),
    (dict(k=2.5), TypeError, "k must be an int"),
    (dict(k=True), TypeError, "k must be an int"),
    (dict(tau=0.0), ValueError, "tau"),
    (dict(tau=-1.0), ValueError, "tau"),
    (dict(tau=math.nan), ValueError, "tau must not be NaN"),
    (dict(tau=math.inf), ValueError, "tau"),
    (dict(tau="0.1"), TypeError, "tau"),
    (dict(delta=math.nan), ValueError, "delta"),
    (dict(eps=0.0), ValueError, "eps"),
    (dict(values=torch.randn(6, 2)), ValueError, "same number of atoms"),
    (dict(keys=torch.randn(5, 4, 1)), ValueError, "keys must be 2-D"),
    (dict(values=torch.randn(5)), ValueError, "values must be 2-D"),
    (dict(x=torch.ones(3, 4, dtype=torch.long)), TypeError, "x must be a floating-point"),
    (dict(keys=[[1.0]]), TypeError, "keys must be a torch.Tensor"),
    (dict(value_scale=torch.ones(4)), ValueError, "value_scale must have shape"),
    (dict(value_scale=math.nan), ValueError, "value_scale"),
    # inf gave NaN outputs; a threshold above 1 dropped every atom (normalised scores lie in
    # [-1, 1]), a zero delta with no word
    (dict(value_scale=math.inf), ValueError, "value_scale must be finite"),
    (dict(value_scale=-math.inf), ValueError, "value_scale must be finite"),
    (dict(delta=5.0), ValueError, r"delta must be <= 1 \(it is compared with normalised scores"),
    (dict(delta=math.inf), ValueError, r"delta must be <= 1"),
    (dict(delta=1.5, backend="reference"), ValueError, r"delta must be <= 1"),     # the Python checks' road
    (dict(backend="nope"), ValueError, "unknown backend"),
    (dict(backend=3), TypeError, "backend"),
    (dict(keys=torch.randn(5, 4, device="meta")), ValueError, "keys is on meta"),
]


@pytest.mark.parametrize("change,exc,match", BAD, ids=[c[2][:24].replace(" ", "_") + f"-{i}"
                                                       for i, c in enumerate(BAD)])
def test_bad_input_names_the_argument(change, exc, match):
    kw = dict(x=X, keys=A, values=B, k=2, tau=0.1)
    kw.update(change)
    with pytest.raises(exc, match=match):
        mk.moram(kw.pop("x"), kw.pop("keys"), kw.pop("values"), **kw)


def test_old_reference_path_still_imports():
    """Users import the authors' dense layer from ``moram_kernels.reference``; it is the
    same function as the one under ``backends``."""
    from moram_kernels import reference as old
    from moram_kernels.backends import reference as new
    assert old.moram_dense is new.moram_dense and old.effective_k is new.effective_k


def test_no_backend_module_imports_the_table():
    """The table (``backends/__init__.py``) imports backend modules lazily; a backend module
    that imported the table back would make a cycle. Checked on the source, statically:
    every import of a module under ``backends/`` (plain or ``from``, absolute or relative,
    lazy ones inside functions included) resolved to a module name, and none may be the
    package ``moram_kernels.backends`` itself (importing a submodule of it is fine)."""
    offenders = [f"{importer}:{line}" for importer, imported, line in _package_imports()
                 if importer.startswith("moram_kernels.backends.") and imported == "moram_kernels.backends"]
    importers = {importer for importer, _, _ in _package_imports() if importer.startswith("moram_kernels.backends.")}
    assert {"moram_kernels.backends.cpu", "moram_kernels.backends.triton.forward"} <= importers   # the walk sees them
    assert not offenders, f"backend modules importing the backend table: {offenders}"


# Layers of the package, top to bottom (docs/backends.md, "Where the code is"). A module may
# import from its own layer or any layer below it, never from a layer above.
LAYERS = (
    ("moram_kernels", "moram_kernels.reference"),              # the face, and an old path kept
    ("moram_kernels.integrations", "moram_kernels.distributed"),
    ("moram_kernels.nn",),
    ("moram_kernels.functional",),
    ("moram_kernels.ops", "moram_kernels.eager"),
    ("moram_kernels.backends",),
    ("moram_kernels._precision", "moram_kernels._warnings", "moram_kernels._checks",
     "moram_kernels._cache", "moram_kernels._dist", "moram_kernels._io",
     "moram_kernels._version", "moram_kernels._base_road"),                    # leaves
)


def _layer_of(module: str) -> int | None:
    best, where = -1, None
    for i, names in enumerate(LAYERS):
        for n in names:
            # the face is the package's __init__ alone, not everything below it
            inside = module.startswith(n + ".") and n != "moram_kernels"
            if (module == n or inside) and len(n) > best:
                best, where = len(n), i
    return where


def _package_imports():
    """``(importer, imported, line)`` for every import of a package module by a package
    module, lazy ones inside functions included, resolved to module names."""
    import ast
    import pathlib
    root = pathlib.Path(mk.__file__).parent
    modules = {}
    for path in root.rglob("*.py"):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts.pop()
        modules[".".join(parts)] = (path, is_pkg)
    for name, (path, is_pkg) in modules.items():
        package = name if is_pkg else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                targets = [f"{target}.{a.name}" if f"{target}.{a.name}" in modules else target
                           for a in node.names]
            else:
                continue
            for t in targets:
                if t == "moram_kernels" or t.startswith("moram_kernels."):
                    yield name, t, node.lineno


def test_the_package_reads_top_down():
    """Package face -> integrations / distributed -> nn -> functional -> ops / eager ->
    backends -> leaf modules: no import points back up, and every module has a place."""
    unplaced, upward = set(), []
    for importer, imported, line in _package_imports():
        a, b = _layer_of(importer), _layer_of(imported)
        for m, layer in ((importer, a), (imported, b)):
            if layer is None:
                unplaced.add(m)
        if a is not None and b is not None and b < a:
            upward.append(f"{importer}:{line} imports {imported}")
    assert not unplaced, f"modules with no layer in LAYERS: {sorted(unplaced)}"
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)
