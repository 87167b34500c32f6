"""The arms: the baseline's independent members, CODE, torchensemble and a TreeNet, trained on one recipe's
data."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codec.io import write_bytes_atomic, write_json_atomic
from codec.pipelines.bench.analysis import Arm, select_members
from codec.pipelines.bench.config import BenchConfig, SweepPoint
from codec.pipelines.bench.flops import layer_macs, training_work
from codec.pipelines.data import RecipeData, load_recipe_data
from codec.runtime.evaluation.stats import Task

# The splits every arm trains and is scored on are exactly `codec compile`'s: pipelines.data.RecipeData.
BenchData = RecipeData


def load_bench_data(recipe, config, data_dir) -> RecipeData:
    """The recipe's data with compile's subset and validation split (DATA_SEED), so every arm sees the
    same."""
    return load_recipe_data(recipe, config, data_dir, need_validation=True)


@dataclass
class _Context:
    recipe: object
    config: object  # TrainConfig
    data: BenchData
    task: Task
    bench: BenchConfig
    work: Path
    log: Callable[[str], None]


def _onnx_outputs(model, x: np.ndarray, threads: int | None) -> np.ndarray:
    """A single-output ONNX model's outputs on x, reshaped to its input (float32)."""
    from codec.runtime.evaluation.scoring import model_outputs

    return model_outputs(model, x, threads=threads).astype(np.float32)


def _train_independent(ctx: _Context, name: str, seed: int) -> tuple[dict, object]:
    """Train one member exactly as `codec compile` trains main and peer; returns (facts, module)."""
    from codec.pipelines.train import member_facts
    from codec.runtime.training.train import train_member

    d = ctx.data
    config = dataclasses.replace(ctx.config, seed=seed, quiet=True)
    module = ctx.recipe.build(d.input_shape, d.num_outputs, seed=seed)
    checkpoint = ctx.work / "checkpoints" / f"{name}.ckpt"
    checkpoint.unlink(missing_ok=True)
    result = train_member(
        module,
        d.x_train,
        d.y_train,
        d.x_val,
        d.y_val,
        config,
        checkpoint_path=checkpoint,
        resume=False,
        desc=name,
    )
    checkpoint.unlink(missing_ok=True)
    return {"name": name, **member_facts(result, seed, parameters=True)}, result.module


def _torch_outputs(ctx: _Context, module, x: np.ndarray) -> np.ndarray:
    import torch

    from codec.runtime.training.train import predict_torch

    out = predict_torch(module, x, batch_size=1024)
    if ctx.data.classify:
        return torch.softmax(torch.from_numpy(out).double(), dim=1).numpy().astype(np.float32)
    return out.reshape(len(out), -1)


@dataclass
class BaselineRun:
    arm: Arm
    n_baseline: int
    why: str
    onnx: dict  # "main"/"peer" -> (compile facts, ONNX bytes) of members 0 and 1
    macs: list[dict]


def run_baseline(ctx: _Context, replicate: int, need: int) -> BaselineRun:
    """Independent members added one at a time until the validation gain is too small (or max members);
    at least `need` members are trained (the sweep compares at that size)."""
    from codec.ir import lift
    from codec.runtime.training.train import export_onnx

    d, task, bench = ctx.data, ctx.task, ctx.bench
    min_gain = bench.min_gain if task.higher_is_better else bench.min_gain_relative_mse
    members, val, test, onnx = [], [], [], {}
    stopped = False
    for i in range(bench.max_members):
        name = f"member_{i}"
        facts, module = _train_independent(ctx, name, bench.member_seed(replicate, i))
        members.append(facts)
        val.append(_torch_outputs(ctx, module, d.x_val))
        test.append(_torch_outputs(ctx, module, d.x_test))
        ctx.log(f"  baseline {name}: {facts['epochs']} epochs, {facts['train_seconds']:.1f}s")
        if i < 2:
            role = ("main", "peer")[i]
            part = export_onnx(module, ctx.work / f"{role}.onnx.part", d.input_shape, task=ctx.recipe.task)
            blob = part.read_bytes()
            part.unlink()
            onnx[role] = (
                {
                    "path": f"members/{role}.onnx",
                    **{k: v for k, v in facts.items() if k != "name"},
                    "reused_from": f"baseline {name}",
                },
                blob,
            )
        if len(members) >= 2:
            curve = task.curve(np.stack(val), d.target("val"))
            stopped = (
                stopped or select_members(curve, task, min_gain, bench.max_members, bench.size_patience)[2]
            )
            if stopped and len(members) >= need:
                break
    val_stack, test_stack = np.stack(val), np.stack(test)
    n, why, _ = select_members(
        task.curve(val_stack, d.target("val")), task, min_gain, bench.max_members, bench.size_patience
    )
    macs = layer_macs(lift(onnx["main"][1], name="main"))
    work = [training_work(macs, m["epochs"], len(d.x_train), len(d.x_val), cached=False) for m in members]
    params = members[0]["parameters"]
    arm = Arm(
        "baseline",
        members,
        np.cumsum([m["train_seconds"] for m in members]),
        np.cumsum(work),
        np.array([params * k for k in range(1, len(members) + 1)]),
        val_stack,
        test_stack,
    )
    return BaselineRun(arm, n, why, onnx, macs)


def _seed_compile_run(run_dir: Path, options, trained: dict) -> None:
    """A compile run directory that already holds main and peer (the baseline's members 0 and 1), so that
    `compile_ensemble(resume=True)` starts at the passes. Uses compile's resume contract: config.json equal
    to the options, state.json with a finished step per member, the member files under members/."""
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (run_dir / "members").mkdir(parents=True)
    steps = {}
    for role, (facts, blob) in trained.items():
        write_bytes_atomic(run_dir / facts["path"], blob)
        steps[f"train:{role}"] = facts
    write_json_atomic(run_dir / "state.json", {"steps": steps})
    write_json_atomic(run_dir / "config.json", options.to_dict())


@dataclass
class CodeRun:
    arm: Arm
    report: dict
    run_dir: Path
    member_files: list[Path]
    csn_widths: dict


def run_code(
    ctx: _Context, replicate: int, baseline: BaselineRun, point: SweepPoint, members: int, run_dir: Path
) -> CodeRun:
    """One CODE compile seeded with the baseline's main and peer; its members' outputs and prefix costs."""
    from codec.ir import lift
    from codec.pipelines.compile import CompileOptions, compile_ensemble
    from codec.runtime.training.grow import GrowOptions

    d, bench = ctx.data, ctx.bench
    options = CompileOptions(
        recipe=ctx.recipe.name,
        members=members,
        seed=bench.member_seed(replicate, 0),
        passes=point.passes,
        calibration=bench.calibration,
        grow=GrowOptions(init=point.grow_init, lr_scale=point.grow_lr_scale),
        keep_main=point.keep_main,
        train_overrides=ctx.bench.overrides(),
        data_dir=bench.data_dir,
    )
    _seed_compile_run(run_dir, options, baseline.onnx)
    with contextlib.redirect_stdout(sys.stderr):
        report = compile_ensemble(options, run_dir, resume=True, quiet=True)
    state = json.loads((run_dir / "state.json").read_text())["steps"]
    grown = [f"grown_{i}" for i in range(1, members - 1)]
    files = [
        run_dir / ("opt/main.onnx" if point.keep_main == "rewritten" else "members/main.onnx"),
        run_dir / "opt/peer.onnx",
    ]
    files += [run_dir / "members" / f"{g}.onnx" for g in grown]
    threads = bench.threads
    val = np.stack([_onnx_outputs(f, d.x_val, threads) for f in files])
    test = np.stack([_onnx_outputs(f, d.x_test, threads) for f in files])
    if not d.classify:
        val, test = val.reshape(len(files), len(d.x_val), -1), test.reshape(len(files), len(d.x_test), -1)
    t = report["time"]
    seconds = [t["train_main"], t["train_peer"] + t["passes"], *t["grow"]]
    base_members = baseline.arm.members
    work = [
        float(baseline.arm.cumulative_work[0]),
        float(baseline.arm.cumulative_work[1] - baseline.arm.cumulative_work[0]),
    ]
    facts = [dict(base_members[0], name="main"), dict(base_members[1], name="peer")]
    for g, epochs in zip(grown, report["epochs"]["grow"]):
        step = state.get(f"train:{g}", {})
        macs = layer_macs(lift(run_dir / "members" / f"{g}.onnx", name=g))
        cached = bool(step.get("csn_cache", False))
        work.append(training_work(macs, epochs, len(d.x_train), len(d.x_val), cached))
        facts.append(
            {
                "name": g,
                "seed": step.get("seed"),
                "epochs": epochs,
                "best_epoch": step.get("best_epoch"),
                "train_seconds": step.get("train_seconds"),
                "trainable_parameters": step.get("trainable_parameters"),
                "frozen_parameters": step.get("frozen_parameters"),
                "csn_cache": cached,
            }
        )
    fused = report["parameters"]["fused_graph"]
    own, shared = fused["members"], fused["shared_layers"]
    stored = [sum(own[:k]) + (fused["csn"] if any(shared[:k]) else 0) for k in range(1, members + 1)]
    rewritten = lift(run_dir / "opt" / "main.onnx", name="main")
    widths = {layer.name: layer.num_neurons for layer in rewritten.hidden_layers()}
    arm = Arm(
        point.name if not point.is_default else "code",
        facts,
        np.cumsum(seconds),
        np.cumsum(work),
        np.array(stored),
        val,
        test,
    )
    return CodeRun(arm, report, run_dir, files, widths)


# --------------------------------------------------------------------------------------------------------
# Side by side: torchensemble, TreeNet
# --------------------------------------------------------------------------------------------------------


def run_torchensemble(ctx: _Context, replicate: int, n: int) -> dict:
    """torchensemble's VotingClassifier: n members of the recipe's network, initialised like the baseline's
    members, trained by torchensemble's own loop for max_epochs epochs (it keeps the epoch with the best
    validation accuracy; no early stopping)."""
    try:
        import torchensemble  # noqa: F401
        from torchensemble import VotingClassifier
    except ImportError as exc:
        return {
            "available": False,
            "why": f"torchensemble is not installed ({exc}); pip install --no-deps torchensemble joblib",
        }
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    d, config, recipe = ctx.data, ctx.config, ctx.recipe
    seeds = iter([ctx.bench.member_seed(replicate, i) for i in range(n)])

    class Member(nn.Module):
        """One estimator: the recipe's network with the next baseline seed's initial weights."""

        def __init__(self):
            super().__init__()
            self.net = recipe.build(d.input_shape, d.num_outputs, seed=next(seeds))

        def forward(self, x):
            return self.net(x)

    torch.manual_seed(ctx.bench.member_seed(replicate, 0))
    generator = torch.Generator().manual_seed(ctx.bench.member_seed(replicate, 0))
    train = DataLoader(
        TensorDataset(torch.from_numpy(d.x_train), torch.from_numpy(d.y_train)),
        batch_size=config.batch_size,
        shuffle=True,
        generator=generator,
    )
    val = DataLoader(TensorDataset(torch.from_numpy(d.x_val), torch.from_numpy(d.y_val)), batch_size=1024)
    model = VotingClassifier(estimator=Member, n_estimators=n, cuda=False)
    if config.optimizer == "adam":
        model.set_optimizer("Adam", lr=config.lr, weight_decay=config.weight_decay)
    else:
        model.set_optimizer("SGD", lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.lr_decay not in (None, 1.0):
        model.set_scheduler("ExponentialLR", gamma=config.lr_decay)
    previous = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    import logging

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.WARNING)  # torchensemble logs every epoch on the root logger
    try:
        started = time.perf_counter()
        with contextlib.redirect_stdout(open(os.devnull, "w")):
            model.fit(train, epochs=config.max_epochs, test_loader=val, save_model=False, log_interval=10**9)
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
        root.setLevel(level)
    outputs = []
    with torch.no_grad():
        for est in model.estimators_:
            est.eval()
            outputs.append(
                torch.softmax(est(torch.from_numpy(d.x_test)).double(), dim=1).numpy().astype(np.float32)
            )
    params = sum(p.numel() for p in model.estimators_.parameters())
    import importlib.metadata

    return {
        "available": True,
        "version": importlib.metadata.version("torchensemble"),
        "members": n,
        "epochs": config.max_epochs,
        "train_seconds": seconds,
        "stored_parameters": int(params),
        "test_outputs": np.stack(outputs),
        "rule": "soft voting (mean of probabilities); scored here with the benchmark's criterion too",
    }


def run_treenet(ctx: _Context, replicate: int, n: int) -> dict:
    """A TreeNet (Lee et al.): n branches over a shared trunk ending at `treenet_split`, trained jointly with
    independent cross-entropy (codec.runtime.training.coupled)."""
    try:
        from codec.pipelines.train_ensemble import train_ensemble_recipe
        from codec.runtime.training.coupled import EnsembleOptions
    except ImportError as exc:
        return {"available": False, "why": f"codec.runtime.training.coupled is not available ({exc})"}
    d = ctx.data
    out_dir = ctx.work / f"treenet_{replicate}"
    options = EnsembleOptions(members=n, split=ctx.bench.treenet_split, criterion=ctx.task.criterion)
    overrides = {**ctx.bench.overrides(), "seed": ctx.bench.member_seed(replicate, 0)}
    with contextlib.redirect_stdout(sys.stderr):
        report = train_ensemble_recipe(
            ctx.recipe.name,
            options,
            out_dir,
            overrides=overrides,
            data_dir=ctx.bench.data_dir,
            quiet=True,
            plot=False,
        )
    fused = _onnx_outputs(out_dir / "ensemble.onnx", d.x_test, ctx.bench.threads)
    per_example = (fused.argmax(axis=1) == d.y_test).astype(np.float64)
    return {
        "available": True,
        "members": n,
        "split": ctx.bench.treenet_split,
        "loss": options.loss,
        "epochs": report["epochs_run"],
        "train_seconds": report["times"]["train_seconds"],
        "heads_stacked": report["heads_stacked"],  # the training path behind train_seconds
        "stored_parameters": int(report["treenet"]["fused_parameters"]["total_stored"]),
        "trunk": report["treenet"].get("trunk"),
        "per_example": per_example,
        "member_accuracies": report["metrics"]["member_accuracies"],
        "assignment": report.get("assignment"),
    }
