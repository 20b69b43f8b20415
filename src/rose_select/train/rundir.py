"""A training run directory (warm-up or final training): its config, its logs, and the rules
that keep it self-describing: a rerun with other settings is refused while the directory holds
results, a config with no result beside it is replaced, and a first run that fails before its
first result leaves no directory behind."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from rose_select.checkpoint import completed_epochs
from rose_select.config import to_dict
from rose_select.errors import StoreMismatchError
from rose_select.io import read_json, remove_stale_temps, sha256_json, write_json
from rose_select.modeling import model_identity

# Keys of the config that do not change the result (left out of the fingerprint).
NOT_FINGERPRINTED = ("output", "device", "save_every_epoch", "report_to")


def fingerprint(cfg, source: dict, ids: Sequence[str], extra: dict | None = None) -> tuple[dict, str]:
    """(resolved config, fingerprint of everything that changes the result); ``extra``: settings
    from outside the config (e.g. the number of processes), recorded and compared like its keys."""
    resolved = {**to_dict(cfg), **(extra or {})}
    key = {k: v for k, v in resolved.items() if k not in NOT_FINGERPRINTED}
    # the model by content: a relative or absolute path agree, weights replaced in place do not
    key.update(source=source, ids_sha256=sha256_json(list(ids)), model=model_identity(cfg.model))
    return resolved, sha256_json(key)


def has_results(run_dir: Path) -> bool:
    return bool(completed_epochs(run_dir)) or (run_dir / "adapter").exists()


def check_or_write_config(run_dir: Path, resolved: dict, fp: str) -> None:
    """Refuse a directory holding results made with other settings; a config with no result
    beside it (a run that failed or was killed before its first checkpoint) is replaced."""
    path = run_dir / "config.json"
    if path.exists() and has_results(run_dir):
        old = read_json(path)
        if old.get("fingerprint") != fp:
            old_cfg = old.get("config", {})
            diff = sorted(k for k in set(old_cfg) | set(resolved)
                          if k not in NOT_FINGERPRINTED and old_cfg.get(k) != resolved.get(k))
            raise StoreMismatchError(
                f"{run_dir} holds a run with other settings (differing keys: {diff or 'the data or model'}); "
                "use a new output directory or delete this one")
        return
    write_json(path, {"config": resolved, "fingerprint": fp})


def prepare(run_dir: Path, cfg, source: dict, ids: Sequence[str], extra: dict | None = None) -> bool:
    """Check or write the run's config (the model is resolved first, so a mistyped path fails
    before anything is written) and clear temporaries of killed runs. Returns True if this call
    created the directory."""
    resolved, fp = fingerprint(cfg, source, ids, extra)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    check_or_write_config(run_dir, resolved, fp)
    remove_stale_temps(run_dir / "adapter")
    for e in range(1, cfg.epochs + 1):
        remove_stale_temps(run_dir / f"ckpt-{e}")
    return created


def undo_if_empty(run_dir: Path, created: bool) -> None:
    """After a failure: remove a directory this run created if it holds no result yet."""
    if created and not has_results(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)
