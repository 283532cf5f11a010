"""Every writer is atomic: an existing file survives any failure, no temp file is left behind, no
unrelated file is touched, and every OSError is a FormatError naming the path.

Failures are injected (``os.replace`` / ``os.fsync`` raising ENOSPC, a writer failing midway) and,
where the machine allows a private mount namespace (root, ``unshare -m``), produced for real on a
small tmpfs: a full disk and a read-only folder.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fxquant
from fxquant.errors import FormatError

OLD = b"the user's previous file"


def _writers(w8a8, q8):
    return {
        "save": lambda p: fxquant.save(w8a8, p / "m.safetensors"),
        "save_pt2": lambda p: fxquant.save_pt2(w8a8, p / "m.pt2"),
        "save_gguf": lambda p: fxquant.save_gguf(q8, p / "m.gguf"),
        "report": lambda p: fxquant.report(w8a8, p / "rep"),
    }


TARGET = {"save": "m.safetensors", "save_pt2": "m.pt2", "save_gguf": "m.gguf", "report": "rep/report.json"}


def _prepare(tmp_path, who):
    target = tmp_path / TARGET[who]
    target.parent.mkdir(exist_ok=True)
    target.write_bytes(OLD)
    bystanders = {tmp_path / f"{TARGET[who]}.partial": b"mine", tmp_path / f".{Path(TARGET[who]).name}.tmp": b"mine too"}
    for p, data in bystanders.items():
        p.write_bytes(data)
    return target, bystanders


def _unchanged(tmp_path, target, bystanders):
    assert target.read_bytes() == OLD
    for p, data in bystanders.items():
        assert p.read_bytes() == data  # never removed or overwritten: not fxquant's files
    leftovers = [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp") and p not in bystanders]
    assert leftovers == []


@pytest.mark.parametrize("who", sorted(TARGET))
@pytest.mark.parametrize("fail", ["replace", "fsync"])
def test_injected_os_failure_keeps_the_old_file(w8a8, q8, tmp_path, monkeypatch, who, fail):
    target, bystanders = _prepare(tmp_path, who)

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, fail, full)
    named = target.parent if who == "report" else target  # the report fails on its first file, the plot
    with pytest.raises(FormatError, match=f"cannot write {named}.*: No space left on device"):
        _writers(w8a8, q8)[who](tmp_path)
    monkeypatch.undo()
    _unchanged(tmp_path, target, bystanders)


@pytest.mark.parametrize("who, where", [("save", "fxquant.artifacts.io.write_safetensors"),
                                        ("save_gguf", "gguf.GGUFWriter.write_tensors_to_file")])
def test_writer_failing_midway_keeps_the_old_file(w8a8, q8, tmp_path, monkeypatch, who, where):
    target, bystanders = _prepare(tmp_path, who)
    module, _, name = where.rpartition(".")

    def half(self_or_path, *a, **k):
        if isinstance(self_or_path, str):  # write_safetensors(tmp, ...): leave half a file behind
            Path(self_or_path).write_bytes(b"half")
        raise OSError(errno.EIO, "Input/output error")

    owner = __import__("importlib").import_module(module.rpartition(".")[0] if "GGUFWriter" in module else module)
    owner = getattr(owner, "GGUFWriter") if "GGUFWriter" in module else owner
    monkeypatch.setattr(owner, name, half)
    with pytest.raises(FormatError, match=f"cannot write {target}: Input/output error"):
        _writers(w8a8, q8)[who](tmp_path)
    monkeypatch.undo()
    _unchanged(tmp_path, target, bystanders)


def test_new_file_gets_the_mode_open_would_give(w8a8, tmp_path):
    fxquant.save_pt2(w8a8, tmp_path / "m.pt2")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "m.pt2").stat().st_mode & 0o777 == 0o666 & ~mask


def test_dict_of_branches_onto_an_existing_file_is_named(q8, w8a8, tmp_path):
    f = tmp_path / "taken"
    f.write_bytes(OLD)
    with pytest.raises(FormatError, match=f"save_gguf: cannot write the branches into {f}: it is a file"):
        fxquant.save_gguf({"cond": q8}, f)
    with pytest.raises(FormatError, match=f"report: cannot write the report into {f}: it is a file"):
        fxquant.report({"cond": w8a8}, f)
    assert f.read_bytes() == OLD


def _namespace_ok():
    if shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _namespace_ok(), reason="needs root and a private mount namespace (unshare -m)")
def test_full_disk_and_read_only_folder_for_real(tmp_path):
    """In a private mount namespace: a 300 KiB tmpfs (every artifact is larger) holding an old file
    per writer, then the same tmpfs remounted read-only. The process must not abort (torch's zip
    writer would), every failure must name the path, and the old files must be intact."""
    disk = tmp_path / "disk"
    disk.mkdir()
    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        import fxquant
        from tests.bad_inputs.conftest import *
        w8a8 = fxquant.compile(w8a8_model(), "w8a8-naive", calibration=w8a8_calibration()[:1])
        q8 = fxquant.compile(gguf_model(), gguf_recipe(), calibration=gguf_calibration())
        d = {str(disk)!r}
        writers = {{"m.safetensors": lambda p: fxquant.save(w8a8, p), "m.pt2": lambda p: fxquant.save_pt2(w8a8, p),
                    "m.gguf": lambda p: fxquant.save_gguf(q8, p)}}
        for phase in ("full", "ro"):
            if phase == "ro":
                assert os.system(f"mount -o remount,ro {{d}}") == 0
            for name, write in writers.items():
                p = os.path.join(d, name)
                try:
                    write(p)
                    print("WROTE", name)
                except fxquant.FormatError as e:
                    ok = p in str(e) and open(p, "rb").read() == {OLD!r}
                    print(phase, name, "ok" if ok else "BAD", str(e))
            print(phase, "files", sorted(os.listdir(d)))
    """)
    cmd = (f"mount -t tmpfs -o size=300k tmpfs {disk} && "
           + " && ".join(f"printf %s {OLD.decode()!r} > {disk}/{n}" for n in ("m.safetensors", "m.pt2", "m.gguf"))
           + f" && {sys.executable} -c \"$SCRIPT\"")
    run = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "SCRIPT": script})
    assert run.returncode == 0, run.stderr[-3000:]
    lines = run.stdout.splitlines()
    for phase, why in (("full", "No space left on device"), ("ro", "Read-only file system")):
        results = [ln for ln in lines if ln.startswith(f"{phase} m.")]
        # gguf-py's numpy writer reports a short write without errno: fxquant adds "is the disk full?"
        assert len(results) == 3 and all(" ok " in ln and (why in ln or "is the disk full?" in ln)
                                         for ln in results), run.stdout
        assert f"{phase} files ['m.gguf', 'm.pt2', 'm.safetensors']" in lines, run.stdout
