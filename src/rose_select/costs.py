"""The cost table of a ``rose run``: per stage the wall time, the device type and count,
device-hours, the bytes written, and a projection to another pool size.

The projection uses each stage's measured seconds per example. Stages whose work grows with the
pool (warm-up on a fraction of it, pool featurization, scoring, training on a selected fraction
or on all of it) are scaled by ``N / n_pool``; stages over the validation or held-out sets keep
their measured time. Bytes scale with the pool for the pool feature stores and the selection
outputs (``N`` rows); checkpoints and adapters do not. Device count: 1 per GPU; on a CPU the
intra-op threads the stage ran with, so CPU device-hours are core-hours.

Beside the measured figures, the plan's (``plan.run_figures``: the run's own model, settings,
pool lengths and device) for the stages over pool records: planned TFLOP, the FLOP/s achieved
(planned FLOPs over measured seconds: on a GPU the measured MFU, once divided by its peak), and
on CUDA the planned peak memory at the stage's batch and device-hours at the plan's MFU. The
plan is cheap (fake tensors) and never breaks a run: a failure leaves the columns empty.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from rose_select.io import read_json

log = logging.getLogger(__name__)
# stage kind -> (time grows with the pool, bytes grow with the pool); featurize depends on the store
SCALING = {"warmup": (True, False), "select": (True, True), "train": (True, False), "evaluate": (False, False)}


def tree_bytes(paths) -> int:
    """Bytes of the files under ``paths`` (files or directories; missing ones count 0)."""
    total = 0
    for p in map(Path, paths):
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return total


def current_threads() -> int | None:
    """torch's intra-op threads in this process (None before torch is loaded)."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


def resolved_device(device: str) -> str:
    if device != "auto":
        return device.split(":")[0]
    torch = sys.modules.get("torch")
    return "cuda" if torch is not None and torch.cuda.is_available() else "cpu"


def run_counts(run: Path, shared: Path, methods: list[str], n_heldout: int) -> dict:
    """Examples each kind of stage processed, read from the run's outputs."""
    sel = {m: read_json(run / "select" / m / "summary.json") for m in methods}
    warm_ids = shared / "warmup" / "warmup_ids.json"
    val_rows = sorted((run / "features").glob("*/val_*/rows.json"))
    return {"pool": next(iter(sel.values()))["n_pool"], "heldout": n_heldout,
            "warmup": len(read_json(warm_ids)["ids"]) if warm_ids.exists() else None,
            "validation": len(read_json(val_rows[0])["ids"]) if val_rows else None,
            "selected": {m: s["n_selected"] for m, s in sel.items()}}


def _examples(key: str, counts: dict) -> tuple[int | None, bool, bool]:
    """(examples the stage processed, time scales with the pool, bytes scale with the pool)."""
    kind, last = key.split("/")[0], key.split("/")[-1]
    if kind == "featurize":
        return (counts["pool"], True, True) if last == "pool" else (counts["validation"], False, False)
    n = {"warmup": counts["warmup"], "select": counts["pool"], "evaluate": counts["heldout"],
         "train": counts["pool"] if last == "full" else counts["selected"].get(last)}.get(kind)
    return (n, *SCALING.get(kind, (False, False)))


def _row(key: str, entry: dict, counts: dict, device: str, project: int | None) -> dict:
    dev = "cpu" if key.startswith("select/") else device
    seconds = entry.get("seconds") or 0.0
    count = (entry.get("threads") or 1) if dev == "cpu" else 1
    n, time_scales, bytes_scale = _examples(key, counts)
    row = {"stage": key, "seconds": seconds, "device": dev, "device_count": count,
           "device_hours": seconds * count / 3600, "bytes": entry.get("bytes"), "examples": n,
           "s_per_example": seconds / n if n else None}
    if project:
        f = project / counts["pool"]
        row["projected_seconds"] = seconds * (f if time_scales else 1.0)
        row["projected_device_hours"] = row["projected_seconds"] * count / 3600
        row["projected_bytes"] = None if row["bytes"] is None else int(row["bytes"] * (f if bytes_scale else 1.0))
    return row


def cost_table(entries: dict, counts: dict, device: str, project: int | None = None) -> dict:
    """``{"rows": [...], "total": {...}, "project_pool_size": N}`` from ledger entries."""
    rows = [_row(k, e, counts, device, project) for k, e in entries.items() if e.get("done")]
    keys = ["seconds", "device_hours", "bytes"] + (["projected_seconds", "projected_device_hours",
                                                      "projected_bytes"] if project else [])
    total = {"stage": "total", **{k: sum(r[k] or 0 for r in rows) for k in keys}}
    return {"rows": rows, "total": total, "project_pool_size": project, "pool_size": counts["pool"],
            "host_cores": os.cpu_count()}


PLANNED = ("planned_tflop", "achieved_tflops", "planned_peak_gib", "planned_device_hours")


def plan_stage(key: str) -> str | None:
    """The plan's stage of a cost-table row, for the stages over pool records (else None)."""
    kind, last = key.split("/")[0], key.split("/")[-1]
    if kind == "featurize":
        return "featurize_pool" if last == "pool" else None
    return kind if kind in ("warmup", "train") else None


def planned_columns(row: dict, stage: dict | None, flops_rate: float | None) -> dict:
    """A row's planned TFLOP (per example times its examples), the TFLOP/s that achieves in the
    measured seconds, and (CUDA) the planned peak GiB and device-hours at ``flops_rate``."""
    if not stage or not row["examples"]:
        return dict.fromkeys(PLANNED)
    tflop = stage["tflop_per_example"] * row["examples"]
    return {"planned_tflop": tflop, "achieved_tflops": tflop / row["seconds"] if row["seconds"] else None,
            "planned_peak_gib": stage["peak_gib"],
            "planned_device_hours": tflop * 1e12 / flops_rate / 3600 if flops_rate else None}


def add_plan_columns(costs: dict, figures) -> dict:
    """``costs`` with the plan's columns; ``figures()`` returns ``plan.run_figures``. A plan that
    fails logs one warning line and leaves the columns empty: the plan never breaks a run."""
    try:
        plan = figures()
    except Exception as e:  # noqa: BLE001 (any failure of an estimate must not cost the run)
        log.warning("cost table: planned columns left empty, the plan failed: %s: %s", type(e).__name__, e)
        plan = {"stages": {}, "flops_rate": None}
    for row in costs["rows"]:
        row.update(planned_columns(row, plan["stages"].get(plan_stage(row["stage"])), plan["flops_rate"]))
    costs["total"]["planned_tflop"] = sum(r["planned_tflop"] or 0 for r in costs["rows"])
    costs["plan"] = plan
    return costs


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000


def cost_markdown(costs: dict, table) -> str:
    """The cost section of report.md; ``table`` is the report's markdown table writer."""
    show = lambda v, k: (_size(v) if "bytes" in k else f"{v:.4f}" if "hours" in k  # noqa: E731
                         else f"{v:.3g}" if "tflop" in k else f"{v:.1f}" if isinstance(v, float) else v)
    cols = ["stage", "seconds", "device", "device_count", "device_hours", "bytes", "examples"]
    if costs["project_pool_size"]:
        cols += ["projected_seconds", "projected_device_hours", "projected_bytes"]
    if "plan" in costs:
        cols += [k for k in PLANNED if k in PLANNED[:2] or any(r.get(k) is not None for r in costs["rows"])]
    rows = [{k: (None if r.get(k) is None else show(r[k], k)) for k in cols} for r in costs["rows"] + [costs["total"]]]
    note = (f"Projected to a pool of {costs['project_pool_size']:,} examples (this run: {costs['pool_size']:,}) "
            "from the measured seconds per example; validation and held-out stages keep their time. "
            "Fixed start-up costs (model loading) are scaled too: projected from a small run, the "
            "figures are upper bounds.\n\n"
            if costs["project_pool_size"] else "")
    if "plan" in costs:
        note += ("planned_tflop: the plan's FLOPs (`rose plan`: the run's model and settings at its pool's "
                 "token lengths) for the stages over pool records; achieved_tflops: those over the measured "
                 "seconds (loading included). Training rows at the pool's mean length, not the selection's."
                 + ("" if costs["plan"]["stages"] else " The plan failed: see the log.") + "\n\n")
    return note + table(rows, cols)
