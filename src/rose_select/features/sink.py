"""The stores a featurize job writes: one, or two for the joint validation pass (``joint.py``).

A batch's features arrive as ``[rows, k * dim]``: the columns of output ``j`` are
``[j * dim, (j + 1) * dim)``. Every output is created at the first write (inputs that fail on the
first batch leave nothing behind), resumed only with identical settings, and a row counts as done
only once every output has it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rose_select.errors import StoreMismatchError
from rose_select.features.store import FeatureStore, META


@dataclass
class Output:
    """One feature store of a job: its directory and the settings it is fingerprinted with."""

    path: str
    settings: dict


def outputs(output: str, chosen_output: str | None, settings: dict) -> list[Output]:
    """A job's stores: ``output``, plus, for the joint validation pass, ``chosen_output`` with the
    sft_chosen settings (both marked ``pass: joint``: batches are planned over pairs)."""
    if not chosen_output:
        return [Output(output, settings)]
    chosen = {k: v for k, v in settings.items() if k != "pair_scale"}
    chosen.update(loss="sft_chosen", beta=None, ref=None)
    return [Output(output, {**settings, "pass": "joint"}), Output(chosen_output, {**chosen, "pass": "joint"})]


def _store_kwargs(job, out: Output) -> dict:
    return dict(n_rows=len(job.ids), dim=job.projector.dim, dtype=job.store_dtype, settings=out.settings,
                row_ids=job.ids, row_groups=job.groups)


def _open_one(job, out: Output):

    if not (Path(out.path) / META).exists():
        if Path(out.path).exists() and any(Path(out.path).iterdir()):
            raise StoreMismatchError(f"{out.path} exists but is not a feature store (no {META}); "
                                     f"use a new output directory or delete it")
        return None
    return FeatureStore.open(out.path, **_store_kwargs(job, out))


def open_existing(job) -> list:
    """Per output, the store to resume (after checking its settings), or None (not created yet)."""
    return [_open_one(job, out) for out in job.outputs]


def done_mask(stores: list, n: int):
    """``[n]`` uint8, 1 where a row has features in every output (0 where an output is absent)."""
    import numpy as np

    done = np.ones(n, dtype=np.uint8)
    for store in stores:
        if store is None:
            done[:] = 0
        else:
            done[store.pending()] = 0
    return done


def write_round(job, stores: list, round_, got, done) -> tuple[list, int]:
    """Write the pending rows of a round's batches into every output (creating stores first if
    needed). Returns (stores, rows written)."""

    dim = job.projector.dim
    stores = [s or FeatureStore.open(out.path, **_store_kwargs(job, out)) for s, out in zip(stores, job.outputs)]
    written = 0
    for rows, feats in zip(round_, got):
        keep = [j for j, i in enumerate(rows) if not done[i]]
        for k, store in enumerate(stores):
            store.write([rows[j] for j in keep], feats[keep, k * dim:(k + 1) * dim].numpy())
        written += len(keep)
    return stores, written


def finalize(stores: list, notes: dict | None = None) -> None:
    for store in stores:
        if store is not None and not store.meta.get("complete"):
            store.finalize(notes)
