"""CPU settings: passive OpenMP waiting set before torch loads, a thread per available core, user wins."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rose_select.errors import ConfigError
from rose_select.runtime import available_cores
from rose_select.runtime import configure_cpu


def _fresh(code: str, **env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "ROSE_THREADS")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env},
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def test_policy_is_set_before_torch_loads_and_user_settings_win():
    code = ("import os; from rose_select.runtime import configure_cpu; r = configure_cpu(); import torch; "
            "print(os.environ['OMP_WAIT_POLICY'], r['threads'], torch.get_num_threads())")
    policy, threads, torch_threads = _fresh(code).split()
    assert policy == "PASSIVE" and threads == torch_threads == str(available_cores())
    assert _fresh(code, OMP_WAIT_POLICY="ACTIVE", ROSE_THREADS="3").split() == ["ACTIVE", "3", "3"]
    assert _fresh(code, OMP_NUM_THREADS="1").split()[1:] == ["1", "1"]


def test_bad_thread_counts_are_config_errors():
    with pytest.raises(ConfigError, match="ROSE_THREADS"):
        configure_cpu({"ROSE_THREADS": "many"})
    with pytest.raises(ConfigError, match="OMP_NUM_THREADS"):
        configure_cpu({"OMP_NUM_THREADS": "0"})
