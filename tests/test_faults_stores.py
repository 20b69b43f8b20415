"""Fault catalogue, class *stores* (issue 11): a feature store is resumed only with the very model
it was started with and only when its files are whole; anything else stops with an error that
says how to recover, and the store is left byte for byte as it was."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil

import numpy as np
import pytest

from rose_select.errors import StoreMismatchError
from rose_select.features.stage import FeaturizeConfig, run_featurize
from rose_select.features.store import StoreNotReadyError, open_features
from rose_select.modeling import LoraSettings
from rose_select.tokenization import TokenizeConfig

MSGS = [{"role": "user", "content": "Tell me about bread."}, {"role": "assistant", "content": "Flour and water."}]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("ROSE_NO_PROGRESS", "1")


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "pool.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "messages": [MSGS[0], {
        "role": "assistant", "content": f"Flour {'and water ' * i}."}]}) + "\n" for i in range(6)))
    return path


def _cfg(model, data, out, **kw) -> FeaturizeConfig:
    return FeaturizeConfig(**{**dict(model=str(model), data=str(data), output=str(out), adam=False, dim=16,
                                     batch_size=2, tokenize=TokenizeConfig(max_length=64), store_dtype="float32",
                                     lora=LoraSettings(r=2, alpha=4.0, dropout=0.0)), **kw})


def _snapshot(path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_model_replaced_at_the_same_path_is_refused(tiny_model_dir, pool, tmp_path):
    """Case 2: the store was fingerprinted by the model's name, so rows of two models mixed."""
    from rose_select.testing import write_tiny_model_dir

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    out = tmp_path / "store"
    run_featurize(_cfg(model, pool, out), stop_after_batches=1)
    before = _snapshot(out)
    shutil.rmtree(model)
    write_tiny_model_dir(model, seed=1)  # other weights, same shapes, same path
    with pytest.raises(StoreMismatchError, match=r"holds features made with other settings:\n  settings.model: "
                       r"stored \"sha256:[0-9a-f]+\", requested \"sha256:[0-9a-f]+\""):
        run_featurize(_cfg(model, pool, out))
    assert _snapshot(out) == before


def test_relative_and_absolute_model_paths_agree(tiny_model_dir, pool, tmp_path, monkeypatch):
    """Accepted-list: a relative vs absolute path to the same model was a false mismatch."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    run_featurize(_cfg(model, pool, tmp_path / "full"))
    out = tmp_path / "store"
    run_featurize(_cfg(model, pool, out), stop_after_batches=1)
    monkeypatch.chdir(tmp_path)
    run_featurize(_cfg("./model", "pool.jsonl", "store"))
    assert np.array_equal(np.array(open_features(out)[0]), np.array(open_features(tmp_path / "full")[0]))


@pytest.mark.parametrize("name", ["features.npy", "done.npy"])
def test_truncated_store_file_is_refused_not_zero_extended(tiny_model_dir, pool, tmp_path, name):
    """Case 3: a truncated features.npy was zero-extended on resume and its zero rows ranked."""
    out = tmp_path / "store"
    run_featurize(_cfg(tiny_model_dir, pool, out), stop_after_batches=2)
    path = out / name
    path.write_bytes(path.read_bytes()[:-3])  # an interrupted copy
    before = _snapshot(out)
    with pytest.raises(StoreMismatchError, match=rf"{path} is damaged: \d+ bytes, but its header and meta.json "
                       rf"need \d+ .*copy the store again from its source, or delete {out} to recompute"):
        run_featurize(_cfg(tiny_model_dir, pool, out))
    assert _snapshot(out) == before
    if name == "features.npy":  # and a finished store read by select is refused the same way
        run_featurize(_cfg(tiny_model_dir, pool, tmp_path / "done"))
        feats = tmp_path / "done" / name
        feats.write_bytes(feats.read_bytes()[:-3])
        with pytest.raises(StoreMismatchError, match="is damaged"):
            open_features(tmp_path / "done")


def test_too_little_free_space_is_refused_before_the_store_grows(tiny_model_dir, pool, tmp_path, monkeypatch):
    """Case 11: a full disk killed featurization with SIGBUS (exit 135) and no message."""
    import collections

    from rose_select.features import store

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 4096, 4096))
    out = tmp_path / "store"
    with pytest.raises(StoreNotReadyError, match=rf"{tmp_path}: not enough free space for the feature store: "
                       r"it needs 1\.0 MiB, 0\.0 MiB are free"):
        run_featurize(_cfg(tiny_model_dir, pool, out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.jsonl"]


def test_disk_full_while_allocating_is_one_line_naming_the_file(tiny_model_dir, pool, tmp_path, monkeypatch, capsys):
    """Case 11: the store's blocks are allocated up front (no SIGBUS later in a memmap); a full disk
    there is an OSError naming the file, which the CLI prints as one line."""
    import os

    from rose_select.cli import main

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", full)
    out = tmp_path / "store"
    status = main(["featurize", "--model", str(tiny_model_dir), "--data", str(pool), "--adam", "false",
                   "--dim", "2048", "--output", str(out)])
    err = capsys.readouterr().err
    ours = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("rose ")]
    assert status == 2 and "Traceback" not in err and len(ours) == 1
    assert ours[0] == (f"rose featurize: error: {out}/features.npy: no space left on the device; free some space "
                       "or choose another output directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pool.jsonl"]


def test_store_files_are_allocated_not_sparse(tiny_model_dir, pool, tmp_path):
    run_featurize(_cfg(tiny_model_dir, pool, tmp_path / "store", dim=2048), stop_after_batches=1)
    st = (tmp_path / "store" / "features.npy").stat()
    assert st.st_blocks * 512 >= st.st_size


def test_adam_moments_replaced_at_the_same_checkpoint_are_refused(tiny_model_dir, pool, tmp_path):
    """Case 2 for the training side's preconditioner: the adapter was hashed, its Adam moments not."""
    import torch

    from rose_select.checkpoint import save_adam_moments
    from rose_select.testing import write_lora_checkpoint

    ckpt = write_lora_checkpoint(tiny_model_dir, tmp_path / "ckpt")
    out = tmp_path / "store"
    run_featurize(_cfg(tiny_model_dir, pool, out, checkpoint=str(ckpt), adam=True), stop_after_batches=1)
    before = _snapshot(out)
    from safetensors.torch import load_file

    stored = load_file(str(ckpt / "optimizer_state.safetensors"))
    names = [k.split("/", 1)[1] for k in stored if k.startswith("exp_avg/")]
    save_adam_moments(ckpt / "optimizer_state.safetensors",
                      {n: (stored[f"exp_avg/{n}"], stored[f"exp_avg_sq/{n}"] * 4 + torch.rand(1)) for n in names}, step=1)
    with pytest.raises(StoreMismatchError, match=r"settings.optimizer_sha256: stored \"[0-9a-f]+\""):
        run_featurize(_cfg(tiny_model_dir, pool, out, checkpoint=str(ckpt), adam=True))
    assert _snapshot(out) == before
