"""Crash-safe writes (moram_kernels/_io.py) and the checkpoints written through them: a save
that fails or is killed half-way leaves the previous file whole and loadable."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import moram_kernels as mk
from moram_kernels._io import atomic_path

ROOT = Path(__file__).resolve().parents[1]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_path_puts_the_whole_file_in_place_with_the_usual_mode(tmp_path):
    new, old = tmp_path / "new.safetensors", tmp_path / "old.safetensors"
    old.write_bytes(b"previous")
    old.chmod(0o640)
    for path in (new, old):
        with atomic_path(path) as tmp:
            assert Path(tmp).parent == tmp_path
            save_file({"a": torch.arange(3.0)}, tmp)   # safetensors 0.8 leaves a 0600 file
            # until the writer is done, path is what it was
            assert (not path.exists()) if path == new else path.read_bytes() == b"previous"
    for path in (new, old):
        assert torch.equal(load_file(path)["a"], torch.arange(3.0))
    assert stat.S_IMODE(new.stat().st_mode) == 0o666 & ~_umask()
    assert stat.S_IMODE(old.stat().st_mode) == 0o640          # the replaced file's bits kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.safetensors", "old.safetensors"]


def test_atomic_path_on_error_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    path.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as tmp:
            Path(tmp).write_bytes(b"half a fi")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.safetensors"]
    with pytest.raises(IsADirectoryError):
        with atomic_path(tmp_path):
            pass


def test_atomic_path_flushes_the_file_and_the_directory_entry(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        synced.append((stat.S_ISDIR(st.st_mode), st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    path = tmp_path / "ckpt.bin"
    with atomic_path(path) as tmp:
        Path(tmp).write_bytes(b"data")
        assert synced == []
    assert synced == [(False, path.stat().st_ino), (True, tmp_path.stat().st_ino)]


def test_atomic_path_writes_through_a_symbolic_link(tmp_path):
    (tmp_path / "real.bin").write_bytes(b"old")
    link = tmp_path / "latest.bin"
    link.symlink_to("real.bin")
    with atomic_path(link) as tmp:
        Path(tmp).write_bytes(b"new")
    assert link.is_symlink() and (tmp_path / "real.bin").read_bytes() == b"new"


# ---- a save killed half-way ------------------------------------------------------------------

_MODEL = """
import torch, moram_kernels as mk
def model(task_seed):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64))
    mk.inject(m, mk.MoRAMConfig(target_modules=["0", "2"], r=8, k=4))
    mk.add_task(m)
    torch.manual_seed(task_seed)
    with torch.no_grad():
        for layer in mk.integrations.moram_layers(m).values():
            layer.values.normal_()
    return m
"""

# Saves a newer checkpoint over the old one, through a writer that behaves as safetensors
# before 0.8 does (it opens the target itself and writes in place), and stops half-way so
# that the test can kill the process there.
_KILLED_SAVER = _MODEL + """
import sys, time, safetensors.torch
def in_place_then_stall(tensors, filename, metadata=None):
    data = safetensors.torch.save(tensors, metadata=metadata)
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
        f.flush()
        print("half written", flush=True)
        time.sleep(300)
safetensors.torch.save_file = in_place_then_stall
mk.save_moram(model(task_seed=2), sys.argv[1])
"""


def _state(m):
    return {n: t.clone() for n, t in m.state_dict().items()}


def test_save_moram_killed_mid_write_leaves_the_old_checkpoint_loadable(tmp_path):
    scope: dict = {}
    exec(_MODEL, scope)
    path = tmp_path / "ckpt.safetensors"
    old = scope["model"](task_seed=1)
    mk.save_moram(old, path)

    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_SAVER, str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()          # blocks until the writer is half-way
        assert line == "half written\n", (line, proc.stderr.read()[-3000:] if proc.poll() else "")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    fresh = scope["model"](task_seed=3)        # same layers, other atoms
    mk.load_moram(fresh, path)                 # the OLD checkpoint, whole
    want, got = _state(old), _state(fresh)
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt.safetensors"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt.")   # the killed writer's temp


def test_plot_usage_that_fails_half_way_keeps_the_previous_plot(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="plot_usage needs matplotlib")
    from matplotlib.figure import Figure

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    mk.inject(model, mk.MoRAMConfig(target_modules=["0"], r=2, k=2))
    mk.add_task(model)
    with mk.integrations.record_usage(model) as rec:
        model(torch.randn(4, 8))
    path = tmp_path / "usage.png"
    mk.integrations.plot_usage(rec, path)
    previous = path.read_bytes()

    def dies_half_way(self, fname, **kw):
        Path(fname).write_bytes(previous[:10])
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", dies_half_way)
    with pytest.raises(OSError, match="disk full"):
        mk.integrations.plot_usage(rec, path)
    assert path.read_bytes() == previous and [p.name for p in tmp_path.iterdir()] == ["usage.png"]
