"""Benchmark: Lee et al., "Why M Heads are Better than One" (arXiv 1511.06314), on codec's coupled ensembles.

Trains M = 4 member ensembles of the `classifier_s` MLP (784-128-96-64-32-10) on the bundled MNIST subset
(`mnist_small`) with `codec.pipelines.train_ensemble.train_ensemble_recipe`, several seeds per configuration,
and checks the paper's qualitative findings:

1. MCL with k = 1 raises the oracle accuracy far above a standard (independently trained, random-init)
   ensemble, while the members' own accuracy drops (each member specialises on a few classes);
2. bagging lowers the ensemble-mean accuracy compared with random initialisation alone;
and, for context, the score-/probability-averaged losses, MCL with k = 2 and with pretraining, TreeNets
sharing the lowest layers, and the fully shared single-model end.

Runs are spread over worker processes (1 torch thread each). Results, with the exact command, go to
bench/lee_results.json: every run's metrics, mean and standard deviation per configuration, paired
per-seed differences and whether each finding reproduced.

Usage (from the repository root):
    python bench/lee.py                        # bench/lee_results.json: seeds 0-4, 2 workers
    python bench/lee.py --n-train 5000 --seeds 0 1 2 --configs standard bagging bagging+random mcl_k1 \
        -o bench/lee_full_data.json           # all 4,500 training images (plus 500 validation)
    python bench/lee.py --seeds 0 --workers 1  # quicker look
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RECIPE = "classifier_s"
# name -> EnsembleOptions fields (members is added from the command line)
CONFIGS: dict[str, dict] = {
    "standard": {"variation": "random", "loss": "independent"},
    "bagging": {"variation": "bagging", "loss": "independent"},
    "bagging+random": {"variation": "both", "loss": "independent"},
    "mcl_k1": {"loss": "mcl", "k": 1},
    "mcl_k2": {"loss": "mcl", "k": 2},
    "mcl_k1_pretrain3": {"loss": "mcl", "k": 1, "pretrain_epochs": 3},
    # Lee et al. multiply SGD's learning rate by M for these losses (each member's gradient is ~1/M of
    # independent training's); the recipe trains with Adam, which normalises that scale away, so both are run.
    "score_avg": {"loss": "score_avg"},
    "prob_avg": {"loss": "prob_avg"},
    "score_avg_lrxM": {"loss": "score_avg", "lr_scale_by_members": True},
    "prob_avg_lrxM": {"loss": "prob_avg", "lr_scale_by_members": True},
    "treenet_fc1": {"split": "fc1"},
    "treenet_fc2": {"split": "fc2"},
    "single_model": {"split": "all"},
}


# The two bagged configurations, as the findings describe them.
BAGGED = {
    "bagging+random": (
        "bagging on top of random initialisation (each member its own initialisation and bootstrap sample)"
    ),
    "bagging": "bagging alone (one initialisation, a bootstrap sample per member)",
}


def run_one(job: tuple[str, int, dict]) -> dict:
    """Train and score one configuration for one seed (in a worker process)."""
    import torch

    from codec.pipelines.train_ensemble import train_ensemble_recipe
    from codec.runtime.training.coupled import EnsembleOptions

    name, seed, settings = job
    torch.set_num_threads(1)
    options = EnsembleOptions(members=settings["members"], **CONFIGS[name])
    overrides = {
        "seed": seed,
        "num_threads": 1,
        "n_train": settings["n_train"],
        "max_epochs": settings["epochs"],
        "device": "cpu",
    }
    with tempfile.TemporaryDirectory() as out:
        report = train_ensemble_recipe(RECIPE, options, out, overrides=overrides, quiet=True, plot=False)
    metrics = report["metrics"]
    return {
        "config": name,
        "seed": seed,
        "options": report["options"],
        "accuracy": metrics["accuracy"],
        "logit_mean_accuracy": metrics["logit_mean_accuracy"],
        "oracle_accuracy": metrics["oracle_accuracy"],
        "member_accuracies": metrics["member_accuracies"],
        "mean_member_accuracy": report["mean_member_accuracy"],
        "nll": metrics["nll"],
        "epochs_run": report["epochs_run"],
        "best_epoch": report["best_epoch"],
        "stopped_early": report["stopped_early"],
        "parameters_stored": report["treenet"]["parameters"]["stored"],
        "train_seconds": report["times"]["train_seconds"],
        "assignment_table": report["assignment"]["table"],
        "n_train": report["n_train"],
        "n_val": report["n_val"],
        "n_test": report["n_test"],
    }


def summarise(runs: list[dict]) -> dict:
    """Mean and standard deviation over seeds of each configuration's metrics."""
    summary = {}
    for name in CONFIGS:
        rows = [r for r in runs if r["config"] == name]
        if not rows:
            continue
        entry = {"seeds": [r["seed"] for r in rows]}
        for key in (
            "accuracy",
            "logit_mean_accuracy",
            "oracle_accuracy",
            "mean_member_accuracy",
            "nll",
            "epochs_run",
            "train_seconds",
        ):
            values = np.array([r[key] for r in rows], dtype=np.float64)
            entry[key] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            }
        entry["parameters_stored"] = rows[0]["parameters_stored"]
        summary[name] = entry
    return summary


def paired(runs: list[dict], a: str, b: str, key_a: str, key_b: str | None = None) -> dict:
    """Per-seed differences run(a)[key_a] - run(b)[key_b] over the seeds both configurations ran."""
    by_seed = {(r["config"], r["seed"]): r for r in runs}
    seeds = sorted(s for s in {r["seed"] for r in runs} if (a, s) in by_seed and (b, s) in by_seed)
    diffs = [by_seed[(a, s)][key_a] - by_seed[(b, s)][key_b or key_a] for s in seeds]
    return {"seeds": seeds, "differences": diffs, "mean": float(np.mean(diffs)) if diffs else None}


def verdict(diff: dict, sign: int, margin: float = 0.0) -> dict:
    """Whether the per-seed differences go the claimed way (`sign` -1: a below b, +1: a above b; with
    `margin`, "not worse than b by more than margin"): on average and in how many seeds."""
    agreeing = sum((d * sign > 0) if margin == 0 else (d > -margin) for d in diff["differences"])
    n = len(diff["differences"])
    mean_ok = diff["mean"] is not None and (
        (diff["mean"] * sign > 0) if margin == 0 else diff["mean"] > -margin
    )
    if mean_ok and agreeing == n:
        text = f"reproduced (every seed, {agreeing} of {n})"
    elif mean_ok:
        text = f"on average only ({agreeing} of {n} seeds)"
    else:
        text = f"not reproduced ({agreeing} of {n} seeds agree)"
    return {
        "reproduced": bool(mean_ok and agreeing == n),
        "on_average": bool(mean_ok),
        "seeds_agreeing": agreeing,
        "verdict": text,
    }


def findings(runs: list[dict], summary: dict) -> list[dict]:
    """The paper's qualitative claims (and a few context checks) against the measured numbers."""
    out = []

    def mean(config: str, key: str) -> float:
        return summary[config][key]["mean"]

    def add(claim: str, measured: str, diff: dict, sign: int, margin: float = 0.0) -> None:
        out.append(
            {"claim": claim, "measured": measured, "paired_difference": diff, **verdict(diff, sign, margin)}
        )

    if {"mcl_k1", "standard"} <= set(summary):
        error_std, error_mcl = 1 - mean("standard", "oracle_accuracy"), 1 - mean("mcl_k1", "oracle_accuracy")
        add(
            "MCL (k=1) raises oracle accuracy far above the standard ensemble",
            f"oracle {mean('mcl_k1', 'oracle_accuracy'):.4f} vs "
            f"{mean('standard', 'oracle_accuracy'):.4f} (oracle "
            f"error {error_mcl:.4f} vs {error_std:.4f}: {error_std / max(error_mcl, 1e-12):.2f}x fewer)",
            paired(runs, "mcl_k1", "standard", "oracle_accuracy"),
            +1,
        )
        add(
            "while the members' own accuracy drops (members specialise)",
            f"mean member accuracy {mean('mcl_k1', 'mean_member_accuracy'):.4f} vs "
            f"{mean('standard', 'mean_member_accuracy'):.4f}",
            paired(runs, "mcl_k1", "standard", "mean_member_accuracy"),
            -1,
        )
    for bagged, what in BAGGED.items():
        if {bagged, "standard"} <= set(summary):
            add(
                f"bagging lowers ensemble-mean accuracy vs random initialisation: {what}",
                f"ensemble-mean accuracy {mean(bagged, 'accuracy'):.4f} vs "
                f"{mean('standard', 'accuracy'):.4f}",
                paired(runs, bagged, "standard", "accuracy"),
                -1,
            )
    for coupled in ("score_avg", "prob_avg", "score_avg_lrxM", "prob_avg_lrxM"):
        if {coupled, "standard"} <= set(summary):
            # Each loss is judged by the combination it trains (mean logits for score averaging, mean
            # probabilities for probability averaging), the standard ensemble by its mean probabilities.
            key = "logit_mean_accuracy" if coupled.startswith("score") else "accuracy"
            scaled = " with the learning rate x M" if coupled.endswith("lrxM") else ""
            combination = "mean-logit" if key == "logit_mean_accuracy" else "ensemble-mean"
            add(
                f"(context) {coupled.split('_lr')[0]} training{scaled} is below independent training",
                f"{combination} accuracy {mean(coupled, key):.4f} vs {mean('standard', 'accuracy'):.4f} "
                "(standard, ensemble-mean)",
                paired(runs, coupled, "standard", key, "accuracy"),
                -1,
            )
    if {"treenet_fc1", "standard"} <= set(summary):
        add(
            "(context) a TreeNet sharing only the lowest layer is within 0.5 points of the independent "
            "ensemble, "
            "with fewer parameters",
            f"ensemble-mean accuracy {mean('treenet_fc1', 'accuracy'):.4f} vs "
            f"{mean('standard', 'accuracy'):.4f}, "
            f"{summary['treenet_fc1']['parameters_stored']} vs "
            f"{summary['standard']['parameters_stored']} parameters",
            paired(runs, "treenet_fc1", "standard", "accuracy"),
            +1,
            margin=0.005,
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument(
        "--workers", type=int, default=2, help="worker processes, 1 torch thread each (default 2)"
    )
    parser.add_argument("--members", type=int, default=4)
    parser.add_argument(
        "--n-train",
        type=int,
        default=1000,
        help="mnist_small training subset before the 10 %% validation split (default 1000)",
    )
    parser.add_argument("--epochs", type=int, default=30, help="max epochs (early stopping, patience 5)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("-o", "--output", default=str(Path(__file__).with_name("lee_results.json")))
    args = parser.parse_args()

    from codec.io import write_json_atomic

    settings = {"members": args.members, "n_train": args.n_train, "epochs": args.epochs}
    jobs = [(name, seed, settings) for seed in args.seeds for name in args.configs]
    started = time.perf_counter()
    load_before = os.getloadavg()
    runs = []
    context = multiprocessing.get_context("spawn")  # no fork after torch's threads exist
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
        for result in pool.map(run_one, jobs):
            runs.append(result)
            print(
                f"{result['config']:<18} seed {result['seed']}: acc {result['accuracy']:.4f} "
                f"(mean logits {result['logit_mean_accuracy']:.4f}) oracle "
                f"{result['oracle_accuracy']:.4f} member {result['mean_member_accuracy']:.4f} "
                f"({result['epochs_run']} epochs, {result['train_seconds']:.1f} s)",
                flush=True,
            )
    wall = time.perf_counter() - started
    summary = summarise(runs)
    results = {
        "benchmark": "Lee et al. 2015 (arXiv 1511.06314) qualitative findings, codec coupled ensembles",
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__), *sys.argv[1:]]),
        "setup": {
            "recipe": RECIPE,
            "dataset": "mnist_small (bundled 5,000 + 1,000 MNIST subset)",
            "n_train": runs[0]["n_train"] if runs else None,
            "n_val": runs[0]["n_val"] if runs else None,
            "n_test": runs[0]["n_test"] if runs else None,
            "members": args.members,
            "max_epochs": args.epochs,
            "training": "recipe defaults: Adam lr 1e-3, batch 64, early stopping patience 5 on the "
            "validation "
            "objective, best weights restored",
            "criterion": "mean (ensemble-mean of member probabilities)",
            "seeds": args.seeds,
        },
        "environment": {
            "python": platform.python_version(),
            "torch": __import__("torch").__version__,
            "cpu_count": os.cpu_count(),
            "workers": args.workers,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "wall_seconds": wall,
        },
        "findings": findings(runs, summary),
        "summary": summary,
        "runs": runs,
    }
    write_json_atomic(args.output, results)
    print(f"\nwrote {args.output} ({wall:.0f} s)")
    for finding in results["findings"]:
        print(f"  [{finding['verdict']}] {finding['claim']}: {finding['measured']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
