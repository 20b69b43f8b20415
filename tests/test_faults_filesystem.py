"""Fault catalogue, class *filesystem* (issue 11): a path that cannot be written or read (a
read-only directory, a file where a directory belongs, a directory where a file belongs, a full
disk) is one line naming the path, exit status 2, no traceback, and nothing changed."""

from __future__ import annotations

import errno
import json
import os

import pytest
from test_training import write_pool

from rose_select.cli import main


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("ROSE_NO_PROGRESS", "1")


@pytest.fixture
def pool(tmp_path):
    return write_pool(tmp_path / "pool.jsonl", 12)


def _one_line(capsys) -> str:
    err = capsys.readouterr().err
    ours = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("rose ")]
    assert "Traceback" not in err and len(ours) == 1, err
    return ours[0]


def _warmup(model, pool, out, *extra):
    return ["warmup", "--model", str(model), "--data", str(pool), "--output", str(out), "--epochs", "1",
            "--lora.r", "2", "--grad-accum", "1", "--device", "cpu", *extra]


def _select(pool, out):
    val = pool.parent / "val.jsonl"
    val.write_text(json.dumps({"prompt": "What about bread?", "chosen": "flour", "rejected": "no"}) + "\n")
    return ["select", "--method", "bm25", "--pool", str(pool), "--validation", str(val), "--plots", "false",
            "--output", str(out)]


def _featurize(model, pool, out):
    return ["featurize", "--model", str(model), "--data", str(pool), "--adam", "false", "--dim", "8",
            "--output", str(out)]


@pytest.mark.parametrize("stage", ["warmup", "featurize", "select"])
def test_output_path_that_is_a_file(stage, tiny_model_dir, pool, tmp_path, capsys):
    out = tmp_path / "out.txt"
    out.write_text("keep me")
    argv = {"warmup": _warmup(tiny_model_dir, pool, out), "featurize": _featurize(tiny_model_dir, pool, out),
            "select": _select(pool, out)}[stage]
    assert main(argv) == 2
    line = _one_line(capsys)
    assert line.startswith(f"rose {stage}: error: ") and str(out) in line
    assert any(w in line for w in ("is a file", "not a directory")), line
    assert out.read_text() == "keep me"


def test_config_that_is_a_directory(tmp_path, capsys):
    assert main(["warmup", "--config", str(tmp_path)]) == 2
    assert _one_line(capsys) == f"rose warmup: error: config file {tmp_path} is a directory; give the YAML file inside it"


def _deny(monkeypatch, where):
    """Make creating anything under ``where`` fail as a read-only directory does (EACCES)."""
    import tempfile
    from pathlib import Path

    real_mkdir, real_mkdtemp = Path.mkdir, tempfile.mkdtemp

    def mkdir(self, *a, **k):
        if str(self).startswith(str(where)) and not self.exists():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *a, **k)

    def mkdtemp(*a, dir=None, **k):
        if dir is not None and str(dir).startswith(str(where)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.path.join(dir, ".tmpXYZ"))
        return real_mkdtemp(*a, dir=dir, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)


@pytest.mark.parametrize("stage", ["warmup", "featurize", "select"])
def test_read_only_output_directory(stage, tiny_model_dir, pool, tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    out = ro / "out"
    _deny(monkeypatch, ro)
    argv = {"warmup": _warmup(tiny_model_dir, pool, out), "featurize": _featurize(tiny_model_dir, pool, out),
            "select": _select(pool, out)}[stage]
    assert main(argv) == 2
    line = _one_line(capsys)
    assert line.startswith(f"rose {stage}: error: {ro}") and "permission denied; choose a path you may write" in line
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_output_directory_for_real(tiny_model_dir, pool, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert main(_select(pool, ro / "out")) == 2
        assert "permission denied" in _one_line(capsys)
    finally:
        ro.chmod(0o755)
