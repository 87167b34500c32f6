"""Statistics of ensemble quality: bootstrap confidence intervals, paired comparisons, summaries over seeds.

`bootstrap_ci` resamples test examples (members, labels and inputs kept aligned); `Task` says what quality
is for a task (accuracy, higher is better; MSE, lower is better) and scores each example; `quality_ci`,
`paired_comparison` (bootstrap CI of a difference plus McNemar's exact test) and `summarise` (across seeds)
build on them. `codec bench` and its report are the users.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from codec.errors import ConfigError, DataError, ShapeError
from codec.errors import positive_int as _positive_int


def bootstrap_ci(
    values_fn: Callable[..., float],
    *arrays: np.ndarray,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    axes: Sequence[int] | None = None,
) -> tuple[float, float, float]:
    """Point estimate and percentile bootstrap confidence interval of a metric, resampling examples.

    Each bootstrap replicate draws N example indices with replacement (``np.random.default_rng(seed)``)
    and applies the same indices to every array along its example axis, so members, labels and inputs
    stay aligned. The example axis of each array is `axes[i]` when given; otherwise the rule is: a 3-D
    array is a member stack (M, N, K) and is resampled along axis 1, any other array along axis 0
    (labels (N,), inputs (N, ...)). Pass `axes` for anything else, e.g. (M, N) member losses or 3-D
    inputs such as (N, H, W) images. All example axes must have the same length N.

    Args:
        values_fn: ``values_fn(*arrays) -> float``, e.g. ``lambda p, y: accuracy(combine(p), y)``.
        *arrays: the arrays `values_fn` takes.
        n_boot: number of bootstrap replicates, >= 1.
        alpha: 1 - confidence level, in (0, 1); the interval is the alpha/2 and 1 - alpha/2 percentiles
            (numpy's linear interpolation) of the replicates.
        seed: seed of the resampling; the same seed gives the same interval.
        axes: the example axis of each array (one per array), or None for the rule above.

    Returns:
        (point, low, high), where point is ``values_fn(*arrays)`` on the full data. A percentile
        interval need not contain the point estimate for skewed statistics; it is not forced to.
    """
    n_boot = _positive_int(n_boot, "n_boot")
    if not (isinstance(alpha, (int, float, np.floating)) and 0.0 < float(alpha) < 1.0):
        raise ConfigError(f"alpha must be in (0, 1), got {alpha!r}")
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if not arrays:
        raise DataError("bootstrap_ci needs at least one array to resample")
    arrays = tuple(np.asarray(array) for array in arrays)
    if axes is None:
        axes = tuple(1 if array.ndim == 3 else 0 for array in arrays)
    else:
        axes = tuple(axes)
        if len(axes) != len(arrays):
            raise ConfigError(f"axes has {len(axes)} entries but {len(arrays)} arrays were given")
    lengths = []
    for index, (array, axis) in enumerate(zip(arrays, axes, strict=True)):
        if not isinstance(axis, (int, np.integer)) or not -array.ndim <= axis < array.ndim:
            raise ShapeError(f"array {index} of shape {array.shape} has no axis {axis!r}")
        lengths.append(array.shape[axis])
    if len(set(lengths)) != 1:
        described = ", ".join(
            f"array {i}: {n} (axis {a})" for i, (n, a) in enumerate(zip(lengths, axes, strict=True))
        )
        raise ShapeError(f"arrays disagree on the number of examples: {described}")
    n_examples = lengths[0]
    if n_examples == 0:
        raise DataError("bootstrap_ci: there are no examples to resample")

    point = _scalar(values_fn(*arrays), "the full data")
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        indices = rng.integers(0, n_examples, size=n_examples)
        resampled = [np.take(array, indices, axis=axis) for array, axis in zip(arrays, axes, strict=True)]
        replicates[b] = _scalar(values_fn(*resampled), f"bootstrap replicate {b}")
    low, high = np.percentile(replicates, [100.0 * alpha / 2.0, 100.0 * (1.0 - alpha / 2.0)])
    return point, float(low), float(high)


def _scalar(value, where: str) -> float:
    """A finite float from what `values_fn` returned."""
    array = np.asarray(value)
    if array.ndim != 0 or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ConfigError(f"values_fn must return a number, got {type(value).__name__} on {where}")
    result = float(array)
    if not np.isfinite(result):
        raise DataError(f"values_fn returned {result} on {where}")
    return result


# --------------------------------------------------------------------------------------------------------
# Task: what quality is and how members combine (a metric policy, not the `task` string)
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    """Classification (accuracy of the combined probabilities, higher is better) or reconstruction (MSE of
    the mean reconstruction, lower is better)."""

    kind: str
    criterion: str

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "classification" else "mse"

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "classification"

    def per_example(self, outputs: np.ndarray, target: np.ndarray) -> np.ndarray:
        """Per-example score of the ensemble of all members in `outputs` (M, N, ...): 1/0 correct, or the
        example's squared reconstruction error averaged over features."""
        from codec.runtime.evaluation.metrics import combine

        if self.kind == "classification":
            return (combine(outputs, self.criterion).argmax(axis=1) == target).astype(np.float64)
        mean = (
            np.asarray(outputs, dtype=np.float64).reshape(outputs.shape[0], outputs.shape[1], -1).mean(axis=0)
        )
        return np.mean((mean - target.reshape(len(target), -1)) ** 2, axis=1)

    def curve(self, outputs: np.ndarray, target: np.ndarray) -> np.ndarray:
        """(M,) quality of the ensembles of the first k members, k = 1..M."""
        return np.array([self.per_example(outputs[:k], target).mean() for k in range(1, len(outputs) + 1)])

    def reaches(self, value: float, target: float) -> bool:
        """`value` is at least as good as `target`."""
        return value >= target if self.higher_is_better else value <= target

    def gain(self, before: float, after: float) -> float:
        """What a member added: accuracy points (absolute), or the relative MSE decrease."""
        if self.higher_is_better:
            return after - before
        return (before - after) / before if before > 0 else 0.0

    def best_index(self, values: Sequence[float]) -> int:
        """Index of the best value (the first on ties)."""
        values = np.asarray(values, dtype=np.float64)
        return int(np.argmax(values) if self.higher_is_better else np.argmin(values))


# --------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------


def quality_ci(per_example: np.ndarray, n_boot: int, seed: int = 0) -> dict:
    """Mean of a per-example score with its 95 % bootstrap CI over examples."""
    point, low, high = bootstrap_ci(
        np.mean, np.asarray(per_example, dtype=np.float64), n_boot=n_boot, seed=seed
    )
    return {"value": point, "ci95": [low, high], "n": len(per_example)}


def mcnemar_exact(a_correct: np.ndarray, b_correct: np.ndarray) -> float:
    """Two-sided exact McNemar p-value (binomial test on the discordant pairs)."""
    a = np.asarray(a_correct, dtype=bool)
    b = np.asarray(b_correct, dtype=bool)
    only_a = int(np.sum(a & ~b))
    only_b = int(np.sum(b & ~a))
    n = only_a + only_b
    if n == 0:
        return 1.0
    k = min(only_a, only_b)
    # exact integers: 2.0**n overflows a float past n = 1023 discordant pairs (10,000 test images reach it)
    tail = 2 * sum(math.comb(n, i) for i in range(k + 1)) / (1 << n)
    return float(min(1.0, tail))


def paired_comparison(task: Task, a: np.ndarray, b: np.ndarray, n_boot: int, seed: int = 0) -> dict:
    """A - B on the same test examples: the difference of mean per-example scores, its bootstrap CI
    (examples resampled jointly), McNemar's exact p for classifiers, and whether A is better, worse or not
    significantly different (the CI contains 0)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    diff, low, high = bootstrap_ci(lambda u, v: np.mean(u) - np.mean(v), a, b, n_boot=n_boot, seed=seed)
    out = {"diff": diff, "ci95": [low, high], "n": len(a)}
    if task.kind == "classification":
        out["mcnemar_p"] = mcnemar_exact(a, b)
        out["discordant"] = [int(np.sum((a > 0.5) & (b < 0.5))), int(np.sum((b > 0.5) & (a < 0.5)))]
    significant = low > 0 or high < 0
    out["significant"] = bool(significant)
    if not significant:
        out["verdict"] = "not significant"
    else:
        a_better = (diff > 0) == task.higher_is_better
        out["verdict"] = "better" if a_better else "worse"
    return out


def summarise(values: Sequence[float | None], n_boot: int = 1000, seed: int = 0) -> dict:
    """Across seeds: the raw values, median, min, max, mean and a bootstrap CI of the mean (None values,
    e.g. 'never reached', are counted but left out of the statistics)."""
    raw = [None if v is None else float(v) for v in values]
    present = np.array([v for v in raw if v is not None], dtype=np.float64)
    out: dict = {"values": raw, "n": len(present), "missing": len(raw) - len(present)}
    if len(present) == 0:
        out.update(median=None, min=None, max=None, mean=None, ci95=None)
        return out
    out.update(
        median=float(np.median(present)),
        min=float(present.min()),
        max=float(present.max()),
        mean=float(present.mean()),
    )
    if len(present) >= 2:
        _, low, high = bootstrap_ci(np.mean, present, n_boot=n_boot, seed=seed)
        out["ci95"] = [low, high]
    else:
        out["ci95"] = None
    return out


__all__ = ["Task", "bootstrap_ci", "mcnemar_exact", "paired_comparison", "quality_ci", "summarise"]
