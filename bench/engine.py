"""Epoch time per member of codec's training engine against the other ways to train K members, side by side.

Arms, for K = 2, 4, 8 members of one recipe (all on the same data, Adam at the recipe's LR and batch size,
cross-entropy, no validation set so that every arm times training only):

- engine:   codec's `train_members` (stacked: one baddbmm forward/backward per layer for all K);
- separate: K hand-written plain torch loops, one after the other (tensor batching from a randperm, Adam,
            CE: what a user would write);
- vmap:     torch.func.stack_module_state + functional_call + vmap, torch.optim.Adam over the stacked params;
- torchensemble: torchensemble's VotingClassifier (a DataLoader, n_jobs=1);

and the single-member comparison: codec's `train_member` against the hand-written loop (K = 1).

Arms are interleaved (each repeat runs every arm of every configuration once, in a rotated order) and each
figure is the median over repeats; the machine's load average is recorded beside every measurement. For
the engine and the hand-written loop a per-step breakdown (gather, forward+loss, backward, optimizer) is
measured too, so a missed target shows where the time goes.

    python bench/engine.py --data-dir ../shared/data -o bench/engine.json         # the full configuration
    python bench/engine.py --smoke -o bench/engine.json                           # a few seconds per arm
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from codec.models import build_model, get_recipe
from codec.runtime.data import load_dataset
from codec.runtime.training.engine import _StackedUnit, train_members
from codec.runtime.training.train import TrainConfig, train_member

ARMS = ("engine", "separate", "vmap", "torchensemble")
SINGLE_ARMS = ("engine_k1", "handwritten_k1")


def load(recipe_name: str, data_dir: str | None, n_train: int | None):
    recipe = get_recipe(recipe_name)
    dataset = load_dataset(recipe.dataset, data_dir=data_dir)
    x, y = dataset.x_train, dataset.y_train
    if n_train is not None:
        x, y = x[:n_train], y[:n_train]
    return recipe, np.ascontiguousarray(x, dtype=np.float32), np.asarray(y, dtype=np.int64), dataset


def members(recipe, dataset, k: int, seed0: int = 0):
    return [
        build_model(
            recipe.arch,
            tuple(dataset.input_shape),
            dataset.num_classes,
            seed=seed0 + i,
            **dict(recipe.arch_kwargs or {}),
        )
        for i in range(k)
    ]


def config_for(recipe, epochs: int, threads: int) -> TrainConfig:
    return TrainConfig.from_recipe(
        recipe,
        max_epochs=epochs,
        patience=None,
        val_fraction=0.0,
        quiet=True,
        device="cpu",
        num_threads=threads,
        lr_decay=1.0,
    )


# ----------------------------------------------------------------------------------------------------
# Arms: each returns seconds per epoch for all K members together
# ----------------------------------------------------------------------------------------------------


def arm_engine(recipe, dataset, x, y, k, epochs, threads) -> float:
    cfg = config_for(recipe, epochs, threads)
    result = train_members(members(recipe, dataset, k), x, y, None, None, cfg, seeds=list(range(k)))
    assert len(result.stacked) == k or k == 1, "the engine did not stack these members"
    return statistics.median(e["seconds"] for e in result.members[0].history)


def arm_engine_k1(recipe, dataset, x, y, k, epochs, threads) -> float:
    cfg = config_for(recipe, epochs, threads)
    result = train_member(members(recipe, dataset, 1)[0], x, y, None, None, cfg)
    return statistics.median(e["seconds"] for e in result.history)


def handwritten_loop(module, x_t, y_t, lr, batch_size, epochs, seed) -> list[float]:
    """What a user writes: Adam, CE, a randperm per epoch, tensor batches. Returns each epoch's seconds."""
    optimizer = torch.optim.Adam(module.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        order = torch.randperm(len(x_t), generator=generator)
        for s in range(0, len(x_t), batch_size):
            index = order[s : s + batch_size]
            loss = F.cross_entropy(module(x_t[index]), y_t[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        times.append(time.perf_counter() - start)
    return times


def arm_separate(recipe, dataset, x, y, k, epochs, threads) -> float:
    cfg = config_for(recipe, epochs, threads)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    per_member = []
    with _threads(threads):
        for i, module in enumerate(members(recipe, dataset, k)):
            per_member.append(handwritten_loop(module, x_t, y_t, cfg.lr, cfg.batch_size, epochs, i))
    return sum(statistics.median(t) for t in per_member)


def arm_handwritten_k1(recipe, dataset, x, y, k, epochs, threads) -> float:
    return arm_separate(recipe, dataset, x, y, 1, epochs, threads)


def arm_vmap(recipe, dataset, x, y, k, epochs, threads) -> float:
    from torch.func import functional_call, stack_module_state, vmap

    cfg = config_for(recipe, epochs, threads)
    models = members(recipe, dataset, k)
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    optimizer = torch.optim.Adam(list(params.values()), lr=cfg.lr)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    generators = [torch.Generator().manual_seed(i) for i in range(k)]

    def call(p, b, xb):
        return functional_call(base, (p, b), (xb,))

    batched = vmap(call)
    times = []
    with _threads(threads):
        for _ in range(epochs):
            start = time.perf_counter()
            order = torch.stack([torch.randperm(len(x_t), generator=g) for g in generators])
            for s in range(0, len(x_t), cfg.batch_size):
                index = order[:, s : s + cfg.batch_size]
                out = batched(params, buffers, x_t[index])
                loss = F.cross_entropy(
                    out.reshape(-1, out.shape[-1]), y_t[index].reshape(-1), reduction="sum"
                )
                loss = loss / index.shape[1]  # the sum over members of each member's mean CE
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def arm_torchensemble(recipe, dataset, x, y, k, epochs, threads) -> float:
    import logging

    from torch.utils.data import DataLoader, TensorDataset
    from torchensemble import VotingClassifier

    logging.getLogger("torchensemble").setLevel(logging.ERROR)
    cfg = config_for(recipe, epochs, threads)
    template = members(recipe, dataset, 1)[0]
    loader = DataLoader(
        TensorDataset(torch.from_numpy(x), torch.from_numpy(y)), batch_size=cfg.batch_size, shuffle=True
    )
    with _threads(threads):
        ensemble = VotingClassifier(estimator=template, n_estimators=k, cuda=False, n_jobs=1)
        ensemble.set_optimizer("Adam", lr=cfg.lr)
        torch.manual_seed(0)
        start = time.perf_counter()
        # torchensemble logs its first batch of every epoch to stdout; keep the summary readable
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ensemble.fit(loader, epochs=epochs, log_interval=10**9, save_model=False)
        seconds = time.perf_counter() - start
    return seconds / epochs


ARM_FUNCS = {
    "engine": arm_engine,
    "separate": arm_separate,
    "vmap": arm_vmap,
    "torchensemble": arm_torchensemble,
    "engine_k1": arm_engine_k1,
    "handwritten_k1": arm_handwritten_k1,
}


class _threads:
    def __init__(self, n):
        self.n, self.previous = n, None

    def __enter__(self):
        self.previous = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.previous)


# ----------------------------------------------------------------------------------------------------
# Per-step breakdown
# ----------------------------------------------------------------------------------------------------


def breakdown(recipe, dataset, x, y, k, steps, threads) -> dict:
    """Milliseconds per step in each phase: the engine's stacked step against K hand-written steps."""
    cfg = config_for(recipe, 1, threads)
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    b = cfg.batch_size
    out = {}
    with _threads(threads):
        unit = _StackedUnit(
            list(range(k)), members(recipe, dataset, k), cfg, [cfg.lr] * k, torch.device("cpu")
        )
        phases = dict.fromkeys(("gather", "forward", "backward", "optimizer"), 0.0)
        for step in range(steps + 3):
            t0 = time.perf_counter()
            index = torch.stack([torch.randint(0, len(x_t), (b,)) for _ in range(k)])
            flat = index.reshape(-1)  # as the engine's batcher gathers
            xb = x_t.index_select(0, flat).reshape(*index.shape, *x_t.shape[1:])
            yb = y_t.index_select(0, flat).reshape(index.shape)
            t1 = time.perf_counter()
            for p in unit.trainable:
                p.grad = None
            logits = unit.forward(xb)
            loss = torch.stack([F.cross_entropy(logits[j], yb[j]) for j in range(k)]).sum()
            t2 = time.perf_counter()
            loss.backward()
            t3 = time.perf_counter()
            unit.optimizer.step(list(range(k)))
            t4 = time.perf_counter()
            if step >= 3:  # warm-up steps are not counted
                for name, seconds in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    phases[name] += seconds
        out["engine"] = {name: 1e3 * s / steps for name, s in phases.items()}
        phases = dict.fromkeys(phases, 0.0)
        models = members(recipe, dataset, k)
        optimizers = [torch.optim.Adam(m.parameters(), lr=cfg.lr) for m in models]
        for step in range(steps + 3):
            times = [0.0] * 4
            for module, optimizer in zip(models, optimizers):
                t0 = time.perf_counter()
                index = torch.randint(0, len(x_t), (b,))
                xb, yb = x_t[index], y_t[index]
                t1 = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(module(xb), yb)
                t2 = time.perf_counter()
                loss.backward()
                t3 = time.perf_counter()
                optimizer.step()
                t4 = time.perf_counter()
                for i, seconds in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    times[i] += seconds
            if step >= 3:
                for name, seconds in zip(phases, times):
                    phases[name] += seconds
        out["separate"] = {name: 1e3 * s / steps for name, s in phases.items()}
    return out


# ----------------------------------------------------------------------------------------------------
# End to end: codec compile against the baseline ensemble
# ----------------------------------------------------------------------------------------------------


def compare_compile(
    recipe_name: str,
    members_n: int,
    data_dir,
    threads: int,
    seed: int,
    workdir: Path,
    max_epochs: int | None = None,
) -> dict:
    """`codec compile` (CODE, members trained by the engine) against N members trained the usual way, one
    `train_member` run after another (the recipe's training, early stopping); both scored on the test set
    with the compile's default criterion ("prod"). Time to the baseline's quality: compile's wall time
    when its ensemble reaches the N-member baseline's test accuracy, else None."""
    import dataclasses

    from codec.pipelines.compile import CompileOptions, compile_ensemble
    from codec.pipelines.data import load_recipe_data
    from codec.runtime.evaluation.metrics import evaluate_classifier
    from codec.runtime.training.train import predict_torch

    recipe = get_recipe(recipe_name)
    config = TrainConfig.from_recipe(
        recipe, quiet=True, device="cpu", num_threads=threads, max_epochs=max_epochs
    )
    data = load_recipe_data(recipe, config, data_dir)
    probs, cumulative = [], []
    start = time.perf_counter()
    for i in range(members_n):
        module = build_model(
            recipe.arch, data.input_shape, data.num_outputs, seed=seed + i, **dict(recipe.arch_kwargs or {})
        )
        result = train_member(
            module,
            data.x_train,
            data.y_train,
            data.x_val,
            data.y_val,
            dataclasses.replace(config, seed=seed + i),
        )
        probs.append(
            torch.softmax(torch.from_numpy(predict_torch(result.module, data.x_test)), dim=1).numpy()
        )
        cumulative.append(time.perf_counter() - start)
    baseline = evaluate_classifier(np.stack(probs), data.y_test, "prod")
    load_before = os.getloadavg()
    start = time.perf_counter()
    report = compile_ensemble(
        CompileOptions(
            recipe_name,
            members=members_n,
            seed=seed,
            data_dir=data_dir,
            train_overrides={"num_threads": threads, "max_epochs": max_epochs},
        ),
        workdir / f"compile_{recipe_name}_{members_n}",
        quiet=True,
    )
    compile_seconds = time.perf_counter() - start
    accuracy = report["quality"]["accuracy"]
    reached = accuracy >= baseline["accuracy"]
    return {
        "recipe": recipe_name,
        "members": members_n,
        "baseline": {
            "seconds": cumulative[-1],
            "cumulative_seconds": cumulative,
            "accuracy": baseline["accuracy"],
            "cumulative_accuracy": baseline["cumulative_accuracy"],
        },
        "compile": {
            "seconds": compile_seconds,
            "accuracy": accuracy,
            "time": report.get("time"),
            "loadavg_before": load_before,
        },
        "compile_reached_baseline_quality": reached,
        "time_to_baseline_quality": compile_seconds if reached else None,
        "time_ratio_compile_vs_baseline": compile_seconds / cumulative[-1],
    }


# ----------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------


def machine() -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
    except OSError:
        commit = None
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torchensemble  # noqa: F401 - its presence is part of the machine record

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "commit": commit,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--recipes", nargs="+", default=["classifier_s", "classifier_m"])
    parser.add_argument("--members", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per measurement (median epoch time)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (median over them)")
    parser.add_argument("--n-train", type=int, default=None, help="training examples (default: all)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every arm")
    parser.add_argument("--data-dir", default=None, help="where mnist.npz lives (classifier_m)")
    parser.add_argument("--breakdown-steps", type=int, default=30)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny validation run: classifier_s, 1,000 examples, 1 epoch, K = 2 and 8",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also: codec compile (CODE + engine) vs the baseline ensemble of N separate runs",
    )
    parser.add_argument("--compile-members", type=int, default=4)
    parser.add_argument("--compile-recipe", default="classifier_s")
    parser.add_argument("-o", "--output", default="bench/engine.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.recipes, args.members, args.n_train, args.epochs = ["classifier_s"], [2, 8], 1000, 1
        args.breakdown_steps = min(args.breakdown_steps, 10)
    command = "python bench/engine.py " + " ".join(argv if argv is not None else sys.argv[1:])
    record = {
        "command": command,
        "smoke": args.smoke,
        "machine": machine(),
        "threads": args.threads,
        "epochs": args.epochs,
        "repeats": args.repeats,
        "configs": {},
    }
    started = time.perf_counter()
    data = {r: load(r, args.data_dir, args.n_train) for r in args.recipes}
    for recipe_name in args.recipes:
        recipe, x, y, dataset = data[recipe_name]
        record["configs"][recipe_name] = {
            "n_train": len(x),
            "batch_size": recipe.train.get("batch_size"),
            "members": {},
            "single": {"runs": []},
        }
        for k in args.members:
            record["configs"][recipe_name]["members"][str(k)] = {"runs": []}
    jobs = [(r, k, arm) for r in args.recipes for k in args.members for arm in args.arms]
    jobs += [(r, 1, arm) for r in args.recipes for arm in SINGLE_ARMS]
    for repeat in range(args.repeats):
        shift = repeat % len(jobs)
        for recipe_name, k, arm in jobs[shift:] + jobs[:shift]:  # rotated: no arm always runs first
            recipe, x, y, dataset = data[recipe_name]
            load_before = os.getloadavg()
            seconds = ARM_FUNCS[arm](recipe, dataset, x, y, k, args.epochs, args.threads)
            entry = {
                "repeat": repeat,
                "arm": arm,
                "epoch_seconds": seconds,
                "per_member": seconds / k,
                "loadavg_before": load_before,
                "loadavg_after": os.getloadavg(),
            }
            config = record["configs"][recipe_name]
            (config["single"] if arm in SINGLE_ARMS else config["members"][str(k)])["runs"].append(entry)
            print(
                f"{recipe_name} K={k} {arm:14s} {seconds:8.3f} s/epoch  load {load_before[0]:.2f}",
                file=sys.stderr,
            )
    for recipe_name in args.recipes:
        recipe, x, y, dataset = data[recipe_name]
        config = record["configs"][recipe_name]
        for k in args.members:
            cell = config["members"][str(k)]
            cell["median_per_member"] = {
                arm: statistics.median(e["per_member"] for e in cell["runs"] if e["arm"] == arm)
                for arm in args.arms
            }
            if "engine" in args.arms and "separate" in args.arms:
                med = cell["median_per_member"]
                cell["speedup_engine_vs_separate"] = med["separate"] / med["engine"]
            cell["breakdown_ms_per_step"] = breakdown(
                recipe, dataset, x, y, k, args.breakdown_steps, args.threads
            )
        single = config["single"]
        single["median_epoch_seconds"] = {
            arm: statistics.median(e["epoch_seconds"] for e in single["runs"] if e["arm"] == arm)
            for arm in SINGLE_ARMS
        }
        single["ratio_engine_vs_handwritten"] = (
            single["median_epoch_seconds"]["engine_k1"] / single["median_epoch_seconds"]["handwritten_k1"]
        )
    if args.compile:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            record["compile"] = compare_compile(
                args.compile_recipe,
                args.compile_members,
                args.data_dir,
                args.threads,
                0,
                Path(tmp),
                max_epochs=2 if args.smoke else None,
            )
    record["targets"] = targets(record, args)
    record["wall_seconds"] = time.perf_counter() - started
    record["loadavg_end"] = os.getloadavg()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(f"{args.output}.tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(args.output)
    print_summary(record, args)
    return 0


def targets(record: dict, args) -> dict:
    out = {}
    for recipe_name, config in record["configs"].items():
        ratio = config["single"]["ratio_engine_vs_handwritten"]
        out[f"{recipe_name}: single member within 1.1x of hand-written"] = {
            "ratio": ratio,
            "met": ratio <= 1.1,
        }
        cell = config["members"].get("8")
        if cell is not None and "speedup_engine_vs_separate" in cell and recipe_name == "classifier_s":
            speedup = cell["speedup_engine_vs_separate"]
            out["classifier_s: stacked K=8 >= 3x faster per member than separate"] = {
                "speedup": speedup,
                "met": speedup >= 3.0,
            }
    return out


def print_summary(record: dict, args) -> None:
    print(f"\nseconds per epoch per member (median of {args.repeats}; {args.threads} thread(s))")
    header = f"{'recipe':14s} {'K':>3s} " + " ".join(f"{a:>13s}" for a in args.arms) + "   engine speed-up"
    print(header)
    for recipe_name, config in record["configs"].items():
        for k, cell in config["members"].items():
            med = cell["median_per_member"]
            row = f"{recipe_name:14s} {k:>3s} " + " ".join(f"{med[a]:13.4f}" for a in args.arms)
            speed = cell.get("speedup_engine_vs_separate")
            print(row + (f"   {speed:.2f}x" if speed else ""))
        single = config["single"]["median_epoch_seconds"]
        print(
            f"{recipe_name:14s}   1 engine {single['engine_k1']:.4f}  hand-written "
            f"{single['handwritten_k1']:.4f}"
            f"  ratio {config['single']['ratio_engine_vs_handwritten']:.3f}"
        )
    print("\nper-step breakdown (ms): gather / forward+loss / backward / optimizer")
    for recipe_name, config in record["configs"].items():
        for k, cell in config["members"].items():
            for arm, phases in cell["breakdown_ms_per_step"].items():
                print(
                    f"{recipe_name:14s} K={k:<3s} {arm:9s} "
                    + " / ".join(f"{v:7.2f}" for v in phases.values())
                )
    if "compile" in record:
        c = record["compile"]
        print(
            f"\ncodec compile {c['recipe']} ({c['members']} members): {c['compile']['seconds']:.1f} s, "
            "accuracy "
            f"{c['compile']['accuracy']:.4f}; baseline of {c['members']} separate runs: "
            f"{c['baseline']['seconds']:.1f} s,"
            f" accuracy {c['baseline']['accuracy']:.4f}; reached the baseline's quality: "
            f"{c['compile_reached_baseline_quality']}"
        )
    print()
    for name, value in record["targets"].items():
        print(
            f"{'met   ' if value['met'] else 'MISSED'} {name}: "
            f"{json.dumps({k: v for k, v in value.items() if k != 'met'})}"
        )


if __name__ == "__main__":
    sys.exit(main())
