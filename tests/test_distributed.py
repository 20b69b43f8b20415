"""Scale out and hold up: featurization in 2 processes under torchrun (gloo) writes the bytes of a
single-process run and selects the same examples; a run killed with SIGKILL resumes to the bytes of
an uninterrupted one; a failing rank stops the others."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from rose_select import distributed as D
from rose_select.config import to_dict
from rose_select.errors import ConfigError
from rose_select.features.stage import FeaturizeConfig, plan_batches, plan_rounds, run_featurize
from rose_select.features.store import open_features
from rose_select.tokenization import TokenizeConfig


@pytest.fixture(scope="module")
def ckpt(tiny_model_dir, tmp_path_factory):
    from rose_select.testing import write_lora_checkpoint

    return write_lora_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("ckpt"), seed=1)


def _write_pool(path, n):
    topics = ["bread", "physics", "law", "cats", "France"]
    with open(path, "w") as f:
        for i in range(n):
            t = topics[i % 5]
            f.write(json.dumps({"id": f"p{i}", "messages": [
                {"role": "user", "content": f"Tell me about {t} number {i}. " * (1 + i % 3)},
                {"role": "assistant", "content": f"A fact about {t}." + " yes" * (i % 7)}]}) + "\n")
    return path


def _write_prefs(path, n):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"v{i}", "subtask": f"s{i % 2}", "prompt": f"How do I bake bread {i}?",
                                "chosen": "Mix flour and water." + " knead" * i, "rejected": "No."}) + "\n")
    return path


def _args(cfg: dict) -> list[str]:
    """``--flag value`` pairs for ``rose featurize`` from a FeaturizeConfig-style dict (a nested
    section such as ``tokenize`` becomes ``--tokenize.max-length``)."""
    flat = {}
    for k, v in cfg.items():
        flat.update({f"{k}.{kk}": vv for kk, vv in to_dict(v).items()} if dataclasses.is_dataclass(v) else {k: v})
    return [a for k, v in flat.items() for a in (f"--{k.replace('_', '-')}", str(v))]


@pytest.fixture
def one_thread(monkeypatch):
    """1 intra-op thread here and in subprocesses: CPU kernels may round differently with another
    thread count, so byte identity across process counts holds at equal threads per process."""
    monkeypatch.setenv("ROSE_NO_PROGRESS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONFAULTHANDLER", "1")  # a crashing subprocess shows where
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _rose(argv, **kw):
    return subprocess.run([sys.executable, "-m", "rose_select", *argv], capture_output=True, text=True,
                          timeout=180, **kw)


def test_plan_is_global_and_dealt_round_robin():
    encs = [[{"input_ids": [0] * n}] for n in (5, 3, 9, 3, 1, 7, 2)]
    batches = plan_batches(encs, 2)
    assert batches == [[4, 6], [1, 3], [0, 5], [2]]  # by (length, index), the same for any world
    assert plan_rounds(batches, 1) == [[b] for b in batches]
    assert plan_rounds(batches, 3) == [[[4, 6], [1, 3], [0, 5]], [[2]]]


def test_env_ranks_and_threads():
    assert D.env_ranks({}) == (0, 1, 0)
    assert D.env_ranks({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4, 1)
    with pytest.raises(ConfigError, match="RANK=4, WORLD_SIZE=4"):
        D.env_ranks({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ConfigError, match="integers"):
        D.env_ranks({"RANK": "x"})
    assert D.threads_per_process(2, cores=16) == 8 and D.threads_per_process(4, cores=2) == 1
    cmd = D.torchrun_command(2, ["featurize", "--config", "c.yaml"])
    assert cmd[1:6] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m"]


def test_a_torchrun_rank_ends_without_teardown_and_keeps_its_output(tmp_path):
    """Under torchrun a rank exits with its code straight after its work (flushed output, no
    interpreter teardown, where gloo's threads can abort a finished rank); alone it returns."""
    assert D.end_rank(3) == 3  # no WORLD_SIZE here (pytest's own process)
    script = ("import atexit, sys, logging\n"
              "from rose_select.distributed import end_rank\n"
              "atexit.register(lambda: print('teardown ran'))\n"
              "logging.basicConfig(stream=sys.stderr); logging.getLogger('x').warning('logged')\n"
              "print('work done', end='')\n"
              "sys.exit(end_rank(int(sys.argv[1])))\n")
    for world, teardown in (("2", False), ("1", True)):
        proc = subprocess.run([sys.executable, "-c", script, "5"], capture_output=True, text=True,
                              env={**os.environ, "WORLD_SIZE": world}, timeout=60)
        assert proc.returncode == 5 and proc.stdout.startswith("work done") and "logged" in proc.stderr
        assert ("teardown ran" in proc.stdout) is teardown, proc.stdout


def test_two_processes_write_the_same_bytes_and_select_the_same(tiny_model_dir, ckpt, tmp_path, one_thread):
    from rose_select.select.stage import SelectConfig, run_select

    pool, prefs = _write_pool(tmp_path / "pool.jsonl", 25), _write_prefs(tmp_path / "prefs.jsonl", 7)
    common = dict(model=str(tiny_model_dir), checkpoint=str(ckpt), dim=32, batch_size=3, tokenize=TokenizeConfig(max_length=64))
    jobs = {"pool": dict(common, data=str(pool), loss="sft"),
            "val": dict(common, data=str(prefs), loss="pairwise")}
    for name, job in jobs.items():  # 9 and 3 batches: the last round leaves rank 1 without one
        run_featurize(FeaturizeConfig(**job, output=str(tmp_path / f"one_{name}")))
        proc = _rose(["featurize", "--nproc", "2", *_args(dict(job, output=tmp_path / f"two_{name}"))])
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().splitlines() == [str(tmp_path / f"two_{name}")]  # printed once
        one, meta, rows = open_features(tmp_path / f"one_{name}")
        two, meta2, rows2 = open_features(tmp_path / f"two_{name}")
        assert one.tobytes() == two.tobytes() and rows == rows2
        assert meta["settings"] == meta2["settings"] and meta2["complete"]
        assert np.abs(np.asarray(two, dtype=np.float32)).sum(axis=1).min() > 0  # every row written

    selected = {}
    for n in ("one", "two"):
        out = tmp_path / f"select_{n}"
        run_select(SelectConfig(method="rose", pool=str(pool), validation=str(prefs), fraction=0.2,
                                pool_features=[str(tmp_path / f"{n}_pool")],
                                val_features=[str(tmp_path / f"{n}_val")], plots=False, output=str(out)))
        selected[n] = [(out / f).read_bytes() for f in ("selected.jsonl", "scores.npy")]
    assert selected["one"] == selected["two"]
    assert len(selected["one"][0].decode().splitlines()) == 5


def test_sigkill_mid_run_then_resume_equals_uninterrupted(tiny_model_dir, ckpt, tmp_path, one_thread):
    pool = _write_pool(tmp_path / "pool.jsonl", 160)
    job = dict(model=str(tiny_model_dir), checkpoint=str(ckpt), data=str(pool), dim=32, batch_size=1,
               tokenize=TokenizeConfig(max_length=96))
    out = tmp_path / "killed"
    argv = ["featurize", *_args(dict(job, output=out))]
    proc = subprocess.Popen([sys.executable, "-m", "rose_select", *argv], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline, n_done = time.monotonic() + 120, 0
    try:
        while n_done == 0 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
            if (out / "done.npy").exists():
                n_done = int(np.load(out / "done.npy").sum())
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
        stderr = proc.stderr.read()
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    meta = json.loads((out / "meta.json").read_text())
    left = int((np.load(out / "done.npy") == 0).sum())
    assert not meta["complete"] and 0 < left < 160, left  # killed mid-run, with rows on disk

    resumed = _rose(argv)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    run_featurize(FeaturizeConfig(**job, output=str(tmp_path / "whole")))
    a, meta_a, _ = open_features(out)
    b, meta_b, _ = open_features(tmp_path / "whole")
    assert a.tobytes() == b.tobytes() and meta_a["complete"] and meta_a["settings"] == meta_b["settings"]


def test_failing_rank_stops_every_rank_and_names_the_example(tmp_path, one_thread):
    """A NaN only example p4 meets: its rank fails naming p4, the other stops with a PeerError
    instead of waiting for it, and p4 is never marked done."""
    from rose_select.testing import poison_embeddings, write_tiny_model_dir

    model_dir = write_tiny_model_dir(tmp_path / "nan_model")
    poison_embeddings(model_dir, "~~~~")
    rows = [{"id": f"p{i}", "messages": [{"role": "user", "content": f"Tell me about bread {i}."},
                                          {"role": "assistant", "content": "~~~~" if i == 4 else "Flour."}]}
            for i in range(6)]
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "store"
    proc = _rose(["featurize", "--nproc", "2", *_args(dict(model=model_dir, data=pool, adam="false", dim=16,
                                                          batch_size=1, tokenize=TokenizeConfig(max_length=64), output=out))])
    assert proc.returncode != 0
    assert "non-finite loss for 1 item(s): ['p4']" in proc.stderr, proc.stderr[-3000:]
    assert "rank(s) [" in proc.stderr and "failed" in proc.stderr
    if out.exists():  # batches of earlier rounds may be on disk; p4 is not, and nothing is final
        assert np.load(out / "done.npy")[4] == 0
        assert not json.loads((out / "meta.json").read_text())["complete"]


@pytest.mark.parametrize("finished", [True, False])
def test_leave_open_group_tears_down_a_group_left_open(finished):
    """A stage run under torchrun whose library (the Trainer) left its gloo group open: the command
    leaves it (with a barrier after success), so no rank exits with the group's threads alive;
    without a group it does nothing."""
    import torch.distributed as dist

    from rose_select.distributed import leave_open_group

    leave_open_group(finished)  # no group: nothing to do
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        leave_open_group(finished)
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
