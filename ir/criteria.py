"""What an ensemble is for and how it combines its members: tasks, collect criteria, the product's floor.

These constants are shared by the fused-graph emitter (`codec.ir.ensemble`), the numpy reference that
scores ensembles (`codec.runtime.evaluation.metrics.combine`), the recipes and the CLI, so they live in
the IR layer, below all of them.
"""

import numpy as np

TASKS = ("classification", "reconstruction")

CRITERIA = ("prod", "mean", "vote", "max")

# The floor that `combine(..., "prod")` clips probabilities to before taking logs. The smallest positive
# normal float64 (~2.2e-308) rather than something like 1e-12, so that a member's exact zero keeps its
# meaning as a veto: a class some member gives probability 0 loses to any class no member rules out,
# however small that class's product (with 1e-12 three members agreeing on 1e-5 would lose to a veto).
# When every class is vetoed the floor still gives a finite, well-defined ranking by the other factors.
PROD_EPS = float(np.finfo(np.float64).tiny)


def default_criterion(task: str) -> str:
    """The collect criterion used when none is named: product of probabilities, or the mean of outputs."""
    return "prod" if task == "classification" else "mean"
