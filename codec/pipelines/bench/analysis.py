"""The analysis: pure functions of measured arms (choosing N_baseline, Table 1/2 analogues, comparisons)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from codec.runtime.evaluation.stats import Task, paired_comparison, quality_ci


def select_members(
    val_curve: Sequence[float], task: Task, min_gain: float, max_members: int, patience: int = 2
) -> tuple[int, str, bool]:
    """N_baseline from the validation curve: early stopping over the ensemble's size. Starting from two
    members, N is the size of the best ensemble so far, where a member only counts as better when it gains
    at least `min_gain` (accuracy, absolute; MSE: relative decrease) over that best; growing stops once
    `patience` members in a row have not.

    Returns:
        (N, why, stopped): stopped is True when patience ran out (more members would not be tried).
    """
    curve = [float(v) for v in val_curve]
    if len(curve) < 2:
        return len(curve), "fewer than 2 members trained", False
    best_k, best, bad = 2, curve[1], 0
    for k in range(3, len(curve) + 1):
        if task.gain(best, curve[k - 1]) >= min_gain:
            best_k, best, bad = k, curve[k - 1], 0
            continue
        bad += 1
        if bad >= patience:
            return (
                best_k,
                f"members {k - patience + 1}..{k} each gained < {min_gain:g} over {best_k} members on "
                "validation",
                True,
            )
    if len(curve) >= max_members:
        return best_k, f"max members ({max_members}) reached; best on validation at {best_k}", True
    return best_k, f"{len(curve)} members trained; best on validation at {best_k}", False


# --------------------------------------------------------------------------------------------------------
# Measured ensembles
# --------------------------------------------------------------------------------------------------------


@dataclass
class Arm:
    """An ensemble method's members in the order they are added, and what each prefix costs.

    Attributes:
        name: "baseline", "code", a sweep point's name, ...
        members: facts per member (name, seed, epochs, seconds, parameters, ...).
        cumulative_seconds: (M,) training seconds of the first k members (CODE: passes included from k=2).
        cumulative_work: (M,) training work of the first k members, FLOP estimate.
        stored_parameters: (M,) parameters the ensemble of the first k members stores (shared ones once).
        val: (M, N_val, ...) member outputs on the validation split (probabilities or reconstructions).
        test: (M, N_test, ...) member outputs on the test split.
    """

    name: str
    members: list[dict]
    cumulative_seconds: np.ndarray
    cumulative_work: np.ndarray
    stored_parameters: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def __len__(self) -> int:
        return len(self.members)

    def prefix(self, k: int) -> Arm:
        return Arm(
            self.name,
            self.members[:k],
            self.cumulative_seconds[:k],
            self.cumulative_work[:k],
            self.stored_parameters[:k],
            self.val[:k],
            self.test[:k],
        )


# --------------------------------------------------------------------------------------------------------
# Analysis (pure functions of measured arms)
# --------------------------------------------------------------------------------------------------------


def _curve_points(task: Task, arm: Arm, val_target, test_target, start: int = 1) -> list[dict]:
    val = task.curve(arm.val, val_target)
    test = task.curve(arm.test, test_target)
    return [
        {
            "k": k,
            "seconds": float(arm.cumulative_seconds[k - 1]),
            "work": float(arm.cumulative_work[k - 1]),
            "stored_parameters": int(arm.stored_parameters[k - 1]),
            "val": float(val[k - 1]),
            "test": float(test[k - 1]),
        }
        for k in range(start, len(arm) + 1)
    ]


def analyse_seed(
    task: Task,
    baseline: Arm,
    n_baseline: int,
    code: Arm,
    val_target,
    test_target,
    *,
    tp_dnn: int,
    csn_parameters: int,
    tp_codedn: int,
    n_boot: int,
    seed: int = 0,
) -> dict:
    """Table 1 and Table 2 analogues for one replicate (see the module docstring)."""
    from codec.runtime.evaluation.metrics import memory_footprint

    base_val = task.curve(baseline.val, val_target)
    code_val = task.curve(code.val, val_target)
    target = float(base_val[n_baseline - 1])
    base_seconds = float(baseline.cumulative_seconds[n_baseline - 1])
    base_work = float(baseline.cumulative_work[n_baseline - 1])
    base_test = task.per_example(baseline.test[:n_baseline], test_target)

    def code_at(k: int) -> dict:
        per = task.per_example(code.test[:k], test_target)
        return {
            "k": k,
            "seconds": float(code.cumulative_seconds[k - 1]),
            "work": float(code.cumulative_work[k - 1]),
            "val": float(code_val[k - 1]),
            "test": quality_ci(per, n_boot, seed),
            "vs_baseline": paired_comparison(task, per, base_test, n_boot, seed),
            "stored_parameters": int(code.stored_parameters[k - 1]),
            "memory_footprint": float(code.stored_parameters[k - 1]) / (n_baseline * tp_dnn),
        }

    reach = next((k for k in range(2, len(code) + 1) if task.reaches(code_val[k - 1], target)), None)
    k_m = reach or len(code)
    table1 = {
        "n_baseline": n_baseline,
        "baseline_seconds": base_seconds,
        "baseline_work": base_work,
        "baseline_val": target,
        "baseline_test": quality_ci(base_test, n_boot, seed),
        "reached": reach is not None,
        "n_code": reach,
        "code": code_at(reach) if reach else None,
        "time_fraction": float(code.cumulative_seconds[reach - 1]) / base_seconds if reach else None,
        "work_fraction": float(code.cumulative_work[reach - 1]) / base_work if reach else None,
        "time_fraction_all_members": float(code.cumulative_seconds[-1]) / base_seconds,
        "memory_footprint": float(code.stored_parameters[k_m - 1]) / (n_baseline * tp_dnn),
        "memory_footprint_at": k_m,
        "memory_footprint_formula": memory_footprint(
            int(tp_dnn), int(k_m), int(tp_codedn), int(csn_parameters), int(n_baseline)
        ),
    }
    within = [k for k in range(2, len(code) + 1) if code.cumulative_seconds[k - 1] <= base_seconds]
    k_budget = max(within) if within else None
    k_best = 2 + task.best_index(code_val[1:])
    table2 = {
        "budget_seconds": base_seconds,
        "baseline": table1["baseline_test"],
        "at_budget": code_at(k_budget) if k_budget else None,
        "unbounded": code_at(k_best),
        "all_members": code_at(len(code)),
    }
    return {"table1": table1, "table2": table2}


def analyse_against(
    task: Task,
    baseline: Arm,
    k_base: int,
    other_test: np.ndarray,
    test_target,
    n_boot: int,
    seed: int = 0,
    per_example: np.ndarray | None = None,
) -> dict:
    """Test quality of another ensemble (its member outputs, or its per-example scores) paired with the
    baseline's first `k_base` members."""
    per = per_example if per_example is not None else task.per_example(other_test, test_target)
    base = task.per_example(baseline.test[:k_base], test_target)
    return {
        "test": quality_ci(per, n_boot, seed),
        "baseline_members": k_base,
        "baseline_test": quality_ci(base, n_boot, seed),
        "vs_baseline": paired_comparison(task, per, base, n_boot, seed),
    }
