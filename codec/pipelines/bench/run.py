"""Orchestration: one recipe end to end (`bench_recipe`), then the whole benchmark (`run_bench`)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from codec.io import write_json_atomic
from codec.ir.criteria import default_criterion
from codec.pipelines.bench.analysis import Arm, _curve_points, analyse_against, analyse_seed
from codec.pipelines.bench.arms import (
    BaselineRun,
    _Context,
    load_bench_data,
    run_baseline,
    run_code,
    run_torchensemble,
    run_treenet,
)
from codec.pipelines.bench.config import (
    BENCH_FORMAT,
    INDEX_FILE,
    INDEX_KIND,
    PAPER_CLAIMS,
    RECIPE_KIND,
    BenchConfig,
    SweepPoint,
    dataset_label,
)
from codec.pipelines.bench.machine import machine_facts, measure_inference
from codec.runtime.evaluation.stats import Task, paired_comparison, quality_ci, summarise

# --------------------------------------------------------------------------------------------------------
# One recipe, end to end
# --------------------------------------------------------------------------------------------------------


def _strip_arrays(obj):
    """Drop the raw output arrays (kept in memory for the statistics, not written)."""
    if isinstance(obj, dict):
        return {k: _strip_arrays(v) for k, v in obj.items() if not isinstance(v, np.ndarray) or v.ndim == 0}
    if isinstance(obj, list):
        return [_strip_arrays(v) for v in obj]
    return obj


def bench_recipe(
    recipe_name: str,
    bench: BenchConfig,
    work: Path,
    *,
    log: Callable[[str], None] = lambda s: None,
    keep_runs: bool = False,
    sweep: bool = True,
) -> dict:
    """Run every part of the benchmark for one recipe; returns its JSON-able result. The compile run
    directories are left in `work` (code_<seed>/, sweep_<seed>_<point>/) when `keep_runs`."""
    import torch

    from codec.models import get_recipe
    from codec.runtime.training.train import TrainConfig

    started = time.perf_counter()
    recipe = get_recipe(recipe_name)
    config = TrainConfig.from_recipe(recipe, **bench.overrides())
    data = load_bench_data(recipe, config, bench.data_dir)
    task = Task(recipe.task, default_criterion(recipe.task))
    ctx = _Context(recipe, config, data, task, bench, work, log)
    (work / "checkpoints").mkdir(parents=True, exist_ok=True)
    if bench.threads:
        torch.set_num_threads(bench.threads)
    val_t, test_t = data.target("val"), data.target("test")
    sweep_points = [p for p in bench.sweep if not p.is_default]
    sweep_seeds = bench.sweep_seeds if sweep and bench.sweep else 0
    per_seed, sweep, comparisons, inference = [], [], [], None
    assignment = None
    for index, replicate in enumerate(bench.seeds):
        log(f"{recipe.name} seed {replicate}: baseline")
        need = bench.sweep_members if index < sweep_seeds else 2
        base = run_baseline(ctx, replicate, need)
        log(f"{recipe.name} seed {replicate}: CODE with {bench.max_members} members")
        code = run_code(
            ctx, replicate, base, SweepPoint("default"), bench.max_members, work / f"code_{replicate}"
        )
        report = code.report
        tp_dnn = base.arm.members[0]["parameters"]
        analysis = analyse_seed(
            task,
            base.arm,
            base.n_baseline,
            code.arm,
            val_t,
            test_t,
            tp_dnn=tp_dnn,
            csn_parameters=report["csn"]["parameters"],
            tp_codedn=report["parameters"]["grown_member_trainable"],
            n_boot=bench.n_boot,
            seed=replicate,
        )
        consistency = _consistency(task, code.arm, report, test_t)
        per_seed.append(
            {
                "seed": replicate,
                "member_seeds": [m["seed"] for m in base.arm.members],
                "baseline": {
                    "members": base.arm.members,
                    "n_baseline": base.n_baseline,
                    "why": base.why,
                    "curve": _curve_points(task, base.arm, val_t, test_t),
                },
                "code": {
                    "members": code.arm.members,
                    "curve": _curve_points(task, code.arm, val_t, test_t),
                    "time": report["time"],
                    "epochs": report["epochs"],
                    "csn": report["csn"],
                    "csn_layer_widths": code.csn_widths,
                    "parameters": report["parameters"],
                    "memory_footprint_M_all_members": report["memory_footprint_M"],
                    "passes_fraction": report["time"]["passes_fraction_of_training"],
                    "compile_quality": report["quality"],
                    "recomputed_vs_compile_max_abs_diff": consistency,
                },
                **analysis,
            }
        )
        if index < sweep_seeds:
            k = bench.sweep_members
            default = code.arm.prefix(k)
            sweep.append(
                _sweep_row(
                    task,
                    SweepPoint("default"),
                    default,
                    base,
                    report,
                    code.csn_widths,
                    val_t,
                    test_t,
                    bench,
                    replicate,
                )
            )
            for point in sweep_points:
                log(f"{recipe.name} seed {replicate}: sweep {point.name}")
                run = run_code(
                    ctx, replicate, base, point, k, work / f"sweep_{replicate}_{_slug(point.name)}"
                )
                sweep.append(
                    _sweep_row(
                        task,
                        point,
                        run.arm,
                        base,
                        run.report,
                        run.csn_widths,
                        val_t,
                        test_t,
                        bench,
                        replicate,
                    )
                )
                if not keep_runs:
                    shutil.rmtree(run.run_dir, ignore_errors=True)
        if bench.compare and data.classify and index < bench.compare_seeds:
            n = base.n_baseline
            log(f"{recipe.name} seed {replicate}: torchensemble and TreeNet with {n} members")
            row = {"seed": replicate, "members": n}
            te = run_torchensemble(ctx, replicate, n)
            if te["available"]:
                outputs = te.pop("test_outputs")
                te["criterion"] = analyse_against(task, base.arm, n, outputs, test_t, bench.n_boot, replicate)
                te["soft_voting"] = analyse_against(
                    task,
                    base.arm,
                    n,
                    None,
                    test_t,
                    bench.n_boot,
                    replicate,
                    per_example=(np.mean(outputs, axis=0).argmax(axis=1) == test_t).astype(np.float64),
                )
            row["torchensemble"] = te
            tn = run_treenet(ctx, replicate, n)
            if tn["available"]:
                per = tn.pop("per_example")
                tn.update(
                    analyse_against(task, base.arm, n, None, test_t, bench.n_boot, replicate, per_example=per)
                )
                if assignment is None and tn.get("assignment"):
                    assignment = {"source": f"TreeNet, seed {replicate}", **tn["assignment"]}
            row["treenet"] = tn
            row["baseline"] = {
                "train_seconds": float(base.arm.cumulative_seconds[n - 1]),
                "stored_parameters": int(base.arm.stored_parameters[n - 1]),
                "test": quality_ci(task.per_example(base.arm.test[:n], test_t), bench.n_boot, replicate),
            }
            k_code = analysis["table1"]["n_code"] or len(code.arm)
            row["code"] = {
                "members": k_code,
                "train_seconds": float(code.arm.cumulative_seconds[k_code - 1]),
                "stored_parameters": int(code.arm.stored_parameters[k_code - 1]),
                **analyse_against(task, base.arm, n, code.arm.test[:k_code], test_t, bench.n_boot, replicate),
            }
            comparisons.append(row)
        if bench.inference and index == 0:
            log(f"{recipe.name} seed {replicate}: fused inference throughput")
            inference = measure_inference(
                code.run_dir / "ensemble.onnx",
                code.member_files,
                data.x_test,
                task.criterion,
                bench.inference_batches,
                bench.threads,
            )
        if not keep_runs:
            shutil.rmtree(code.run_dir, ignore_errors=True)
    result = {
        "kind": RECIPE_KIND,
        "format": BENCH_FORMAT,
        "recipe": recipe.name,
        "recipe_description": recipe.description,
        "dataset": data.name,
        "dataset_label": dataset_label(data.name),
        "task": recipe.task,
        "metric": task.metric,
        "higher_is_better": task.higher_is_better,
        "criterion": task.criterion,
        "train_config": config.to_dict(),
        "data": {"train": len(data.x_train), "validation": len(data.x_val), "test": len(data.x_test)},
        "seeds": list(bench.seeds),
        "per_seed": per_seed,
        "summary": summarise_recipe(per_seed, bench.n_boot),
        "sweep": sweep,
        "comparisons": comparisons,
        "inference": inference,
        "assignment": assignment,
        "paper": PAPER_CLAIMS,
        "wall_seconds": time.perf_counter() - started,
    }
    return _strip_arrays(result)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _consistency(task: Task, arm: Arm, report: dict, test_target) -> float:
    """Our recomputed test curve of the CODE members against compile's own evaluation (should be ~0)."""
    ours = task.curve(arm.test, test_target)
    theirs = report["quality"].get(
        "cumulative_accuracy" if task.kind == "classification" else "cumulative_mse"
    )
    if theirs is None or len(theirs) != len(ours):
        return float("nan")
    return float(np.max(np.abs(ours - np.asarray(theirs))))


def _sweep_row(
    task, point, arm: Arm, base: BaselineRun, report, widths, val_t, test_t, bench, replicate
) -> dict:
    k = len(arm)
    k_base = min(k, len(base.arm))
    per = task.per_example(arm.test, test_t)
    base_per = task.per_example(base.arm.test[:k_base], test_t)
    grown = [m["epochs"] for m in arm.members[2:]]
    return {
        "point": point.to_dict(),
        "seed": replicate,
        "members": k,
        "csn": report["csn"],
        "csn_layer_widths": widths,
        "val": float(task.per_example(arm.val, val_t).mean()),
        "test": quality_ci(per, bench.n_boot, replicate),
        "baseline_members": k_base,
        "baseline_test": quality_ci(base_per, bench.n_boot, replicate),
        "vs_baseline": paired_comparison(task, per, base_per, bench.n_boot, replicate),
        "time_fraction": float(arm.cumulative_seconds[-1]) / float(base.arm.cumulative_seconds[k_base - 1]),
        "work_fraction": float(arm.cumulative_work[-1]) / float(base.arm.cumulative_work[k_base - 1]),
        "memory_footprint": float(arm.stored_parameters[-1]) / (k_base * base.arm.members[0]["parameters"]),
        "grown_epochs": grown,
        "baseline_epochs": [m["epochs"] for m in base.arm.members[2:k_base]],
        "passes_seconds": report["time"]["passes"],
    }


def summarise_recipe(per_seed: list[dict], n_boot: int) -> dict:
    """The headline numbers over seeds (medians with spread, and how many seeds CODE reached the baseline)."""

    def col(fn):
        out = []
        for s in per_seed:
            try:
                out.append(fn(s))
            except (TypeError, KeyError):
                out.append(None)
        return out

    def t1(s):
        return s["table1"]

    def t2(s):
        return s["table2"]

    budget_verdicts = [
        t2(s)["at_budget"]["vs_baseline"]["verdict"]
        if t2(s)["at_budget"]
        else "no CODE ensemble within budget"
        for s in per_seed
    ]
    return {
        "n_baseline": summarise(col(lambda s: t1(s)["n_baseline"]), n_boot),
        "n_code": summarise(col(lambda s: t1(s)["n_code"]), n_boot),
        "reached": sum(1 for s in per_seed if t1(s)["reached"]),
        "seeds": len(per_seed),
        "time_fraction": summarise(col(lambda s: t1(s)["time_fraction"]), n_boot),
        "work_fraction": summarise(col(lambda s: t1(s)["work_fraction"]), n_boot),
        "time_fraction_all_members": summarise(col(lambda s: t1(s)["time_fraction_all_members"]), n_boot),
        "memory_footprint": summarise(col(lambda s: t1(s)["memory_footprint"]), n_boot),
        "passes_fraction": summarise(col(lambda s: s["code"]["passes_fraction"]), n_boot),
        "csn_total": summarise(col(lambda s: s["code"]["csn"]["total"]), n_boot),
        "baseline_test": summarise(col(lambda s: t1(s)["baseline_test"]["value"]), n_boot),
        "code_at_reach_test": summarise(col(lambda s: t1(s)["code"]["test"]["value"]), n_boot),
        "code_at_budget_test": summarise(col(lambda s: t2(s)["at_budget"]["test"]["value"]), n_boot),
        "code_at_budget_diff": summarise(col(lambda s: t2(s)["at_budget"]["vs_baseline"]["diff"]), n_boot),
        "code_at_budget_verdicts": budget_verdicts,
        "code_unbounded_test": summarise(col(lambda s: t2(s)["unbounded"]["test"]["value"]), n_boot),
        "code_unbounded_diff": summarise(col(lambda s: t2(s)["unbounded"]["vs_baseline"]["diff"]), n_boot),
        "code_unbounded_verdicts": [t2(s)["unbounded"]["vs_baseline"]["verdict"] for s in per_seed],
        "baseline_member_epochs": summarise(
            [m["epochs"] for s in per_seed for m in s["baseline"]["members"]], n_boot
        ),
        "grown_member_epochs": summarise(
            [m["epochs"] for s in per_seed for m in s["code"]["members"][2:]], n_boot
        ),
    }


# --------------------------------------------------------------------------------------------------------
# The whole benchmark
# --------------------------------------------------------------------------------------------------------


def headline(result: dict) -> dict:
    """The numbers a README quotes for one recipe."""
    s = result["summary"]
    return {
        "recipe": result["recipe"],
        "dataset": result["dataset_label"],
        "metric": result["metric"],
        "seeds": s["seeds"],
        "n_baseline_median": s["n_baseline"]["median"],
        "reached": f"{s['reached']}/{s['seeds']}",
        "time_fraction_median": s["time_fraction"]["median"],
        "work_fraction_median": s["work_fraction"]["median"],
        "memory_footprint_median": s["memory_footprint"]["median"],
        "passes_fraction_median": s["passes_fraction"]["median"],
        "baseline_test_median": s["baseline_test"]["median"],
        "code_unbounded_diff_median": s["code_unbounded_diff"]["median"],
        "code_unbounded_verdicts": s["code_unbounded_verdicts"],
        "code_at_budget_diff_median": s["code_at_budget_diff"]["median"],
        "code_at_budget_verdicts": s["code_at_budget_verdicts"],
    }


def run_bench(
    bench: BenchConfig,
    out_dir: str | os.PathLike,
    *,
    command: str,
    work_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> dict:
    """Run the benchmark; writes ``<out_dir>/<recipe>.json`` per recipe and the index ``bench.json``.

    Compile runs and checkpoints go to `work_dir` and stay there (``<recipe>/code_<seed>/`` ...) when it is
    given; otherwise to a temporary folder that is removed.

    Returns:
        The index: command, machine, configuration, the recipe files and their headline numbers.
    """
    bench.validate()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    machine = machine_facts(bench.threads)
    own_work = work_dir is None
    work = Path(tempfile.mkdtemp(prefix="codec-bench-")) if own_work else Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    files, headlines = {}, []
    try:
        for position, name in enumerate(bench.recipes):
            result = bench_recipe(
                name,
                bench,
                work / name,
                log=log,
                keep_runs=not own_work,
                sweep=position < bench.sweep_recipes,
            )
            result.update(command=command, machine=machine, config=bench.to_dict())
            path = out / f"{result['recipe']}.json"
            write_json_atomic(path, result)
            files[result["recipe"]] = path.name
            headlines.append(headline(result))
            log(f"{result['recipe']}: wrote {path} ({result['wall_seconds']:.0f}s)")
    finally:
        if own_work:
            shutil.rmtree(work, ignore_errors=True)
    machine["load_average_end"] = machine_facts(bench.threads).get("load_average")
    index = {
        "kind": INDEX_KIND,
        "format": BENCH_FORMAT,
        "command": command,
        "profile": bench.profile,
        "config": bench.to_dict(),
        "machine": machine,
        "recipes": files,
        "headline": headlines,
        "paper": PAPER_CLAIMS,
        "wall_seconds": time.perf_counter() - started,
    }
    write_json_atomic(out / INDEX_FILE, index)
    return index
