"""Small statistics for reports: intervals of proportions and of means over seeds."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (``successes`` may be fractional: ties count 1/2)."""
    if n == 0:
        return (math.nan, math.nan)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


# two-sided 95% quantiles of Student's t for 1..10 degrees of freedom (beyond: 1.96 is close enough
# for a report; 2.23 at 10, 2.09 at 19)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def t975(dof: int) -> float:
    return _T975[dof - 1] if dof <= len(_T975) else 1.96 + 2.4 / dof


def mean_interval(values: Sequence[float]) -> dict:
    """Mean and 95% t-interval over seeds (``lo``/``hi`` None for a single seed)."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], np.float64)
    if len(v) == 0:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    mean = float(v.mean())
    if len(v) < 2:
        return {"mean": mean, "lo": None, "hi": None, "n": 1}
    half = float(t975(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": int(len(v))}


def fmt_interval(stat: dict, digits: int = 2) -> str:
    """``mean [lo, hi]`` of a ``mean_interval`` (the mean alone for one seed, ``-`` for none)."""
    if stat["mean"] is None:
        return "-"
    if stat["lo"] is None:
        return f"{stat['mean']:.{digits}f}"
    return f"{stat['mean']:.{digits}f} [{stat['lo']:.{digits}f}, {stat['hi']:.{digits}f}]"
