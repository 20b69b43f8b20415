"""What a ``rose run`` is about to do: printed before its stages, and again before its long ones.

The outline names every stage with the rows it processes and the checkpoints it uses, and where
the results and ``report.html`` will be. Its time estimate is timed on the run itself: the warm-up
is a short batch of ordinary training steps, so once it has run (or when a resumed run finds it
done) its seconds per training row-step, times each later stage's work in row-steps, give the
estimate. The work of one row relative to a training row-step was measured on the demo's stage
times (README, "How fast can the demo be on this CPU?": pool features 0.53 s a row, a validation
triple 0.94 s, a training row-step 0.62 s, an evaluated pair 0.41 s); the warm-up's seconds include
model loading, so the estimate leans high for small runs.
"""

from __future__ import annotations

from dataclasses import dataclass

# work per row, in training row-steps (forward + backward + optimiser step of one example)
ROW_STEPS = {"pool": 0.85, "validation": 1.5, "train": 1.0, "evaluate": 0.65}


@dataclass(frozen=True)
class Work:
    """The rows each stage of a run processes."""

    pool: int
    warmup: int
    warmup_epochs: int
    checkpoints: int
    validation: int
    methods: tuple[str, ...]
    selected: int
    train_epochs: int
    heldout: int


def stage_row_steps(work: Work) -> dict[str, float]:
    """Each stage's work in training row-steps (a finished stage is dropped by the caller)."""
    out = {"warmup": float(work.warmup * work.warmup_epochs),
           "pool features": work.checkpoints * work.pool * ROW_STEPS["pool"],
           "validation features": work.checkpoints * work.validation * ROW_STEPS["validation"],
           "training": len(work.methods) * work.selected * work.train_epochs * ROW_STEPS["train"],
           "evaluation": (len(work.methods) + 1) * work.heldout * ROW_STEPS["evaluate"]}
    return out


def seconds_per_row_step(warmup_seconds: float, work: Work) -> float:
    return warmup_seconds / max(1, work.warmup * work.warmup_epochs)


def _duration(seconds: float) -> str:
    minutes = seconds / 60
    return f"{seconds:.0f} s" if seconds < 90 else f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def outline(work: Work, run_dir, pool_desc: str, rate: float | None = None, done: tuple[str, ...] = ()) -> str:
    """The printed outline; with ``rate`` (seconds per training row-step) a time per stage."""
    steps = stage_row_steps(work)
    m = len(work.methods)
    rows = {"warmup": f"{work.warmup} rows x {work.warmup_epochs} epochs, one checkpoint per epoch",
            "pool features": f"{work.pool} rows x {work.checkpoints} checkpoint(s)",
            "validation features": f"{work.validation} triples x {work.checkpoints} checkpoint(s)",
            "training": f"{m} models ({', '.join(work.methods)}), about {work.selected} rows x {work.train_epochs} epochs each",
            "evaluation": f"{m + 1} models (base too) on {work.heldout} held-out pairs"}
    lines = [f"[rose run] plan: pool {pool_desc}"]
    for stage, what in rows.items():
        when = "done" if stage in done else (f"~{_duration(steps[stage] * rate)}" if rate else "")
        lines.append(f"  {stage:<20} {what}" + (f"  [{when}]" if when else ""))
    lines.append("  selection (no model): " + ", ".join(work.methods))
    if rate:
        left = sum(v for k, v in steps.items() if k not in done) * rate
        lines.append(f"  estimate for what is left: ~{_duration(left)} (timed on this run's warm-up: "
                     f"{rate:.2f} s per training row-step, model loading included)")
    else:
        lines.append("  time: estimated once the warm-up (a short timed batch of training) has run")
    lines.append(f"  results: {run_dir}/report.md, {run_dir}/results.json; page to look through: {run_dir}/report.html")
    return "\n".join(lines)
