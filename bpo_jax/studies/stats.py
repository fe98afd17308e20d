"""Confidence intervals for study results: a two-level (seeds x prompts) paired bootstrap.

Every number a verdict rests on is the mean of a [seeds, prompts] matrix: an arm's mean held-out
reward (per seed and prompt, the mean over that prompt's eval samples), its win rate against the
reference, or a contrast between arms (the weighted sum of their matrices, e.g. arm - baseline).
Both sources of noise count: the training seed (which data order, which random pairs) and the
held-out prompts (which questions happened to be asked). One bootstrap replicate draws the seeds
with replacement and, independently, the prompts with replacement, and averages the drawn cells;
contrasts are paired because every arm's matrix is indexed by the same draws (same seeds, same
prompts, same eval sampling keys). The interval is the 2.5% and 97.5% percentiles of the replicates.

With few seeds the seed level is coarse (3 seeds have 10 distinct resamples) and, like any
bootstrap, a little optimistic (its variance is (S - 1) / S of the unbiased one): read a verdict
resting on an interval that barely excludes 0 as weak.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

LEVEL = 0.95


class Estimate(NamedTuple):
    mean: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float]:
        return {"mean": self.mean, "low": self.low, "high": self.high}


def bootstrap_means(cells: np.ndarray, num: int, seed: int = 0, chunk: int = 256) -> np.ndarray:
    """`num` bootstrap replicates of the mean of a [seeds, prompts] matrix (module docstring)."""
    x = np.asarray(cells, np.float64)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"expected a non-empty [seeds, prompts] matrix, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("the matrix holds non-finite values")
    rng = np.random.default_rng(seed)
    s, p = x.shape
    out = np.empty(num)
    for start in range(0, num, chunk):
        b = min(chunk, num - start)
        rows = rng.integers(0, s, size=(b, s))
        cols = rng.integers(0, p, size=(b, p))
        out[start : start + b] = x[rows[:, :, None], cols[:, None, :]].mean(axis=(1, 2))
    return out


def estimate(cells: np.ndarray, num: int = 2000, seed: int = 0) -> Estimate:
    """The mean of a [seeds, prompts] matrix with its 95% bootstrap percentile interval."""
    replicates = bootstrap_means(cells, num, seed)
    low, high = np.quantile(replicates, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Estimate(float(np.mean(cells)), float(low), float(high))


def verdict(e: Estimate) -> str:
    """reproduced: the interval lies above 0 (the claimed direction); not reproduced: below 0;
    inconclusive: it contains 0."""
    if e.low > 0:
        return "reproduced"
    if e.high < 0:
        return "not reproduced"
    return "inconclusive"


def contrast_cells(weighted: list[tuple[float, list[np.ndarray]]]) -> np.ndarray:
    """sum_i w_i * mean(matrices of term i): a contrast between arms (or groups of arms)."""
    return sum(w * np.mean(np.stack(ms), axis=0) for w, ms in weighted)
