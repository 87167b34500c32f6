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

The machine limit (on by default; --no-roofline skips it): per recipe and K, a lower bound of one training
step per member, the GEMM FLOPs of forward+backward at the fastest torch.mm rate measured here on the
recipe's largest layer at its batch size, plus Adam's bytes (4 reads, 3 writes per parameter) at the
torch.add stream rate measured at the optimizer's working-set size; the separate loops' and the engine's
measured step times are reported against it (separate / bound is the most any engine could gain here).

--compile adds the end-to-end comparison, time to the baseline's quality (`end_to_end`): the baseline of
N members trained one after another (separate `train_member` loops, early stopping), the same N members
trained stacked by the engine alone, and one `codec compile` with N_max members; each arm's ensemble
quality at every size with the time that size was available, and the earliest time each arm reaches the
full baseline's validation quality (reported with its test quality).

    python bench/engine.py --data-dir ../shared/data --compile -o bench/engine.json  # the full configuration
    python bench/engine.py --smoke --compile -o bench/engine.json                    # about 20 seconds
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
# Machine limit (roofline): a lower bound of one training step per member
# ----------------------------------------------------------------------------------------------------

# Adam's update per parameter (float32): reads param, grad, exp_avg, exp_avg_sq; writes param, exp_avg,
# exp_avg_sq.
ADAM_READS, ADAM_WRITES = 4, 3
PHASES = ("forward", "weight_grad", "input_grad")


def gemm_layers(module, input_shape) -> list[dict]:
    """The GEMMs of one example's forward, in execution order: per Linear/Conv2d layer its (m, k, n) GEMM
    shape for one example (Linear: 1 x in x out; Conv2d, as im2col: out positions x in/groups*kh*kw x
    out/groups, times groups) and its MACs."""
    from torch import nn

    layers, hooks = [], []

    def hook(layer, inputs, output):
        if isinstance(layer, nn.Linear):
            m, k, n, groups = (
                int(np.prod(output.shape[1:-1], dtype=np.int64)),
                layer.in_features,
                layer.out_features,
                1,
            )
        else:
            m = int(np.prod(output.shape[2:], dtype=np.int64))
            k = layer.in_channels // layer.groups * int(np.prod(layer.kernel_size))
            n, groups = layer.out_channels // layer.groups, layer.groups
        kind = type(layer).__name__
        layers.append(
            {"name": f"{name_of[layer]} ({kind} {k}x{n})", "m": m, "k": k, "n": n, "macs": m * k * n * groups}
        )

    name_of = {}
    for name, layer in module.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            name_of[layer] = name
            hooks.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module.eval()
            module(torch.zeros(1, *input_shape))
    finally:
        for h in hooks:
            h.remove()
    return layers


def training_flops(layers: list[dict], batch: int) -> dict:
    """GEMM FLOPs of one forward+backward step at `batch` examples, per phase: forward, weight gradient and
    input gradient each 2 * MACs per example, except that the first layer needs no input gradient (the
    input does not require one). "total" is their sum."""
    macs = sum(layer["macs"] for layer in layers)
    first = layers[0]["macs"] if layers else 0
    phases = {
        "forward": 2.0 * batch * macs,
        "weight_grad": 2.0 * batch * macs,
        "input_grad": 2.0 * batch * (macs - first),
    }
    return {**phases, "total": sum(phases.values())}


def adam_bytes(parameters: int) -> int:
    """Bytes Adam's step moves for `parameters` float32 parameters (the reads and writes counted once)."""
    return 4 * (ADAM_READS + ADAM_WRITES) * parameters


def _best_seconds(fn, repeats: int, min_seconds: float = 0.05) -> float:
    """The fastest of `repeats` timings of fn (each timing loops until min_seconds, per call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_seconds:
                break
        best = min(best, elapsed / calls)
    return best


def gemm_rate(layer: dict, batch: int, threads: int, repeats: int = 5) -> dict:
    """FLOP/s of torch.mm on one layer's three training GEMMs at `batch` (forward [B*m, k] x [k, n],
    input gradient [B*m, n] x [n, k], weight gradient [n, B*m] x [B*m, k]). The fastest is the rate of the
    strict bound (a bound must not assume a GEMM slower than the machine runs); each phase's own rate
    gives the estimate at torch.mm's rates on these shapes."""
    rows = batch * layer["m"]
    k, n = layer["k"], layer["n"]
    shapes = {"forward": (rows, k, n), "input_grad": (rows, n, k), "weight_grad": (n, rows, k)}
    rates = {}
    with _threads(threads):
        for name, (a, b, c) in shapes.items():
            left, right, out = torch.randn(a, b), torch.randn(b, c), torch.empty(a, c)
            seconds = _best_seconds(lambda x=left, w=right, o=out: torch.mm(x, w, out=o), repeats)
            rates[name] = 2.0 * a * b * c / seconds
    return {"layer": layer["name"], "shapes": shapes, "flops_per_second": rates, "best": max(rates.values())}


def stream_rate(n_bytes: int, threads: int, repeats: int = 5) -> float:
    """Bytes/s of torch.add(a, b, out=c) on float32 tensors whose three arrays together hold `n_bytes`
    (2 reads + 1 write per element): the memory rate at that working-set size (cache or DRAM)."""
    n = max(n_bytes // 12, 1024)
    a, b, c = torch.rand(n), torch.rand(n), torch.empty(n)
    with _threads(threads):
        seconds = _best_seconds(lambda: torch.add(a, b, out=c), repeats)
    return 12.0 * n / seconds


def roofline(recipe, dataset, n_train: int, ks, cells: dict, threads: int) -> dict:
    """Per K: the lower bound of one training step per member from this machine's measured GEMM and memory
    rates, and the separate loops' and the engine's measured step times against it.

    The bound counts the GEMMs (forward+backward) at the fastest measured rate and Adam's bytes at the
    faster of the memory rates measured for one member's and for K members' optimizer working set (an
    engine could update members one at a time in cache). Everything else a step does (activations, loss,
    bias, gradient zeroing, Python) is left out, so the bound is below any real step and separate / bound
    is an upper limit of what any engine could gain over separate loops on this machine.
    """
    module = members(recipe, dataset, 1)[0]
    batch = int(recipe.train.get("batch_size"))
    layers = gemm_layers(module, tuple(dataset.input_shape))
    parameters = sum(p.numel() for p in module.parameters() if p.requires_grad)
    flops = training_flops(layers, batch)
    gemm = gemm_rate(max(layers, key=lambda layer: layer["macs"]), batch, threads)
    steps = -(-n_train // batch)
    state_bytes = 4 * ADAM_READS * parameters  # what one member's Adam step touches
    one_member_stream = stream_rate(state_bytes, threads)
    out = {
        "batch_size": batch,
        "steps_per_epoch": steps,
        "layers": layers,
        "parameters_per_member": parameters,
        "gemm_flops_per_step": flops["total"],
        "gemm_flops_per_step_by_phase": flops,
        "adam_bytes_per_step": adam_bytes(parameters),
        "gemm": gemm,
        "stream_bytes_per_second_one_member": one_member_stream,
        "counted": "GEMMs (forward, weight and input gradients) and Adam's bytes only",
        "per_k": {},
    }
    for k in ks:
        stream_k = stream_rate(k * state_bytes, threads)
        stream = max(one_member_stream, stream_k)
        gemm_seconds, adam_seconds = flops["total"] / gemm["best"], adam_bytes(parameters) / stream
        bound = gemm_seconds + adam_seconds
        # not a bound: every layer's GEMMs at the rate torch.mm reached on the largest layer's shape of
        # the same phase (smaller layers usually run slower, so real steps are slower still)
        estimate = adam_seconds + sum(flops[phase] / gemm["flops_per_second"][phase] for phase in PHASES)
        entry = {
            "stream_bytes_per_second_k_members": stream_k,
            "bound_seconds_per_member_step": bound,
            "bound_gemm_seconds": gemm_seconds,
            "bound_adam_seconds": adam_seconds,
            "estimate_seconds_per_member_step": estimate,
        }
        medians = cells.get(str(k), {}).get("median_per_member", {})
        for arm in ("separate", "engine"):
            if arm in medians:
                step = medians[arm] / steps
                entry[f"{arm}_seconds_per_member_step"] = step
                entry[f"{arm}_over_bound"] = step / bound
                entry[f"{arm}_over_estimate"] = step / estimate
        if "separate" in medians:
            entry["best_possible_speedup_over_separate"] = entry["separate_over_bound"]
            entry["speedup_over_separate_at_phase_rates"] = entry["separate_over_estimate"]
        out["per_k"][str(k)] = entry
    return out


# ----------------------------------------------------------------------------------------------------
# End to end: time to the baseline's quality
# ----------------------------------------------------------------------------------------------------


def _size_points(task, val: np.ndarray, test: np.ndarray, val_target, test_target, seconds) -> list[dict]:
    """One point per ensemble size k = 1..M: when it was available (seconds) and its val/test quality."""
    val_curve, test_curve = task.curve(val, val_target), task.curve(test, test_target)
    return [
        {
            "k": k,
            "seconds": float(seconds[k - 1]),
            "val": float(val_curve[k - 1]),
            "test": float(test_curve[k - 1]),
        }
        for k in range(1, len(val) + 1)
    ]


# A value within this relative distance of the target counts as reaching it: the same members scored
# after a graph rewrite (CODE's main and peer after the passes: neurons reordered) differ from the
# baseline's in float32 summation order, about 1e-10 relative in an MSE, and that must not decide.
REACH_RTOL = 1e-6


def time_to_quality(task, points: list[dict], target_val: float, baseline_seconds: float) -> dict:
    """The earliest size at which an arm's ensemble reaches `target_val` on validation (decided on
    validation, reported with its test quality, like `codec bench`), or "not reached".

    Points need not be sorted by time (sizes that share one time are common): the earliest by seconds wins,
    the smaller size on a tie. Reaching allows `REACH_RTOL` of float noise.
    """
    slack = REACH_RTOL * abs(target_val)
    reaching = [
        p for p in points if task.reaches(p["val"], target_val) or abs(p["val"] - target_val) <= slack
    ]
    if not reaching:
        return {"reached": False, "k": None, "seconds": None, "val": None, "test": None, "fraction": None}
    first = min(reaching, key=lambda p: (p["seconds"], p["k"]))
    return {"reached": True, **first, "fraction": first["seconds"] / baseline_seconds}


def _loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def end_to_end(
    recipe_name: str,
    n_baseline: int,
    n_max: int,
    data_dir,
    threads: int,
    seed: int,
    workdir: Path,
    overrides: dict | None = None,
) -> dict:
    """Time to the baseline's quality: `codec compile` (CODE + engine) and the engine alone against the
    baseline ensemble trained the usual way.

    - baseline: `n_baseline` members trained one after another, each its own `train_member` loop (the
      recipe's training, early stopping on the validation split), seeds seed, seed+1, ...; size k is
      available after the first k members' training seconds.
    - code: one `codec compile` with `n_max` members (main+peer stacked by the engine in one run, the
      passes, the grown members in one engine run). Sizes 1 and 2 are main and peer as the fused graph
      computes them (after the passes), so they are available after main+peer + passes; the grown members
      train together, so every size from 3 on shares one time: main+peer + passes + grown.
    - engine_only: the baseline's `n_baseline` members (same seeds) trained stacked by `train_members`, no
      passes; they train together, so every size shares one time. (A smaller stacked run would be cheaper
      for a smaller size; it is not run.)

    Every time is training seconds (plus the passes for CODE): data loading, export and scoring are out of
    every arm. Every arm's members are scored by onnxruntime on their ONNX files. The target is the full
    baseline's (n_baseline members) validation quality with the recipe's default criterion; each arm's
    earliest size reaching it (within `REACH_RTOL`) is reported with its test quality.
    """
    import dataclasses

    from codec.ir.criteria import default_criterion
    from codec.pipelines.compile import CompileOptions, compile_ensemble
    from codec.pipelines.data import load_recipe_data
    from codec.runtime.evaluation.scoring import member_outputs, softmax_scores
    from codec.runtime.evaluation.stats import Task
    from codec.runtime.training.train import export_onnx

    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    recipe = get_recipe(recipe_name)
    config = TrainConfig.from_recipe(recipe, quiet=True, device="cpu", num_threads=threads, **overrides)
    data = load_recipe_data(recipe, config, data_dir, need_validation=True)
    task = Task(recipe.task, default_criterion(recipe.task))
    val_target, test_target = data.target("val"), data.target("test")

    def scored(files: list[Path], names: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Every arm's members are scored the same way, by onnxruntime on their ONNX files, as compile's
        report scores them (a torch-scored baseline would differ from CODE in float noise alone)."""
        val = member_outputs(files, data.x_val, names=names, threads=threads)
        test = member_outputs(files, data.x_test, names=names, threads=threads)
        if data.classify:
            return softmax_scores(val, names)[0], softmax_scores(test, names)[0]
        return val.reshape(len(files), len(data.x_val), -1), test.reshape(len(files), len(data.x_test), -1)

    def exported(modules, arm: str) -> list[Path]:
        return [
            export_onnx(module, workdir / f"{arm}_{i}.onnx", data.input_shape, task=recipe.task)
            for i, module in enumerate(modules)
        ]

    def build(i):
        return recipe.build(data.input_shape, data.num_outputs, seed=seed + i)

    # baseline: N separate loops, one after the other
    load_before = _loadavg()
    facts, modules = [], []
    for i in range(n_baseline):
        result = train_member(
            build(i),
            data.x_train,
            data.y_train,
            data.x_val,
            data.y_val,
            dataclasses.replace(config, seed=seed + i),
        )
        facts.append({"seed": seed + i, "epochs": result.epochs_run, "train_seconds": result.train_seconds})
        modules.append(result.module)
        print(
            f"e2e baseline member {i}: {result.epochs_run} epochs, {result.train_seconds:.1f} s",
            file=sys.stderr,
        )
    cumulative = np.cumsum([f["train_seconds"] for f in facts])
    val, test = scored(exported(modules, "baseline"), [f"baseline_{i}" for i in range(n_baseline)])
    baseline_points = _size_points(task, val, test, val_target, test_target, cumulative)
    baseline = {
        "members": facts,
        "sizes": baseline_points,
        "seconds": float(cumulative[-1]),
        "loadavg": [load_before, _loadavg()],
    }
    target_val = baseline_points[-1]["val"]

    # engine only: the same members, stacked, no passes
    load_before = _loadavg()
    trained = train_members(
        [build(i) for i in range(n_baseline)],
        data.x_train,
        data.y_train,
        data.x_val,
        data.y_val,
        dataclasses.replace(config, seed=seed),
        seeds=[seed + i for i in range(n_baseline)],
    )
    val, test = scored(
        exported([r.module for r in trained.members], "engine"), [f"engine_{i}" for i in range(n_baseline)]
    )
    engine_seconds = [trained.train_seconds] * n_baseline  # one run: every size at its end
    engine = {
        "members": [{"seed": seed + i, "epochs": r.epochs_run} for i, r in enumerate(trained.members)],
        "stacked": list(trained.stacked),
        "seconds": trained.train_seconds,
        "sizes": _size_points(task, val, test, val_target, test_target, engine_seconds),
        "loadavg": [load_before, _loadavg()],
    }
    print(f"e2e engine-only: {trained.train_seconds:.1f} s, stacked {trained.stacked}", file=sys.stderr)

    # CODE: one codec compile with up to n_max members
    load_before = _loadavg()
    run_dir = workdir / f"compile_{recipe_name}_{n_max}"
    started = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):
        report = compile_ensemble(
            CompileOptions(
                recipe_name,
                members=n_max,
                seed=seed,
                data_dir=data_dir,
                train_overrides={"num_threads": threads, **overrides},
            ),
            run_dir,
            quiet=True,
        )
    compile_wall = time.perf_counter() - started
    training = report["training"]
    main_peer = training["main"]["group_train_seconds"]
    passes = report["time"]["passes"]
    grown = training["grown_1"]["group_train_seconds"] if n_max > 2 else 0.0
    grown_names = [f"grown_{i}" for i in range(1, n_max - 1)]
    files = [
        run_dir / ("opt/main.onnx" if report["options"]["keep_main"] == "rewritten" else "members/main.onnx"),
        run_dir / "opt" / "peer.onnx",
        *[run_dir / "members" / f"{g}.onnx" for g in grown_names],
    ]
    val, test = scored(files, ["main", "peer", *grown_names])
    available = [main_peer + passes] * 2 + [main_peer + passes + grown] * (n_max - 2)
    code = {
        "members": n_max,
        "time": {"main_peer": main_peer, "passes": passes, "grown": grown, "compile_wall": compile_wall},
        "main_peer_stacked": bool(training["main"]["stacked"]),
        "epochs": report["epochs"],
        "csn_total": report["csn"]["total"],
        "sizes": _size_points(task, val, test, val_target, test_target, available),
        "loadavg": [load_before, _loadavg()],
    }
    print(f"e2e compile: {compile_wall:.1f} s wall", file=sys.stderr)
    return {
        "recipe": recipe_name,
        "seed": seed,
        "criterion": task.criterion,
        "metric": task.metric,
        "overrides": overrides,
        "data": {"train": len(data.x_train), "validation": data.n_val, "test": len(data.x_test)},
        "timing": "training seconds (CODE: + passes); sizes that train together share one time",
        "target_val": target_val,
        "baseline": baseline,
        "engine_only": engine,
        "code": code,
        "time_to_baseline_quality": {
            name: time_to_quality(task, arm["sizes"], target_val, baseline["seconds"])
            for name, arm in (("code", code), ("engine_only", engine))
        },
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
        help="also: time to the baseline's quality, codec compile (CODE + engine) and the engine alone "
        "against the baseline ensemble of N separate loops",
    )
    parser.add_argument(
        "--compile-members", type=int, default=4, help="N: the baseline's (and engine-only's) members"
    )
    parser.add_argument(
        "--compile-max-members", type=int, default=6, help="N_max: codec compile's members (at least 2)"
    )
    parser.add_argument("--compile-recipe", default="classifier_s")
    parser.add_argument("--seed", type=int, default=0, help="the end-to-end comparison's first member seed")
    parser.add_argument("--no-roofline", action="store_true", help="skip the machine-limit figure")
    parser.add_argument(
        "--compile-only",
        action="store_true",
        help="only the end-to-end comparison (implies --compile; no arms, breakdown or machine limit)",
    )
    parser.add_argument("-o", "--output", default="bench/engine.json")
    args = parser.parse_args(argv)
    if args.smoke:
        args.recipes, args.members, args.n_train, args.epochs = ["classifier_s"], [2, 8], 1000, 1
        args.breakdown_steps = min(args.breakdown_steps, 10)
        args.compile_members, args.compile_max_members = 2, 3
    if args.compile_only:
        args.recipes, args.compile = [], True
    if args.compile_members < 1 or args.compile_max_members < 2:
        parser.error("--compile-members must be at least 1 and --compile-max-members at least 2")
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
    for repeat in range(args.repeats if jobs else 0):
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
    if not args.no_roofline:
        for recipe_name in args.recipes:
            recipe, x, y, dataset = data[recipe_name]
            config = record["configs"][recipe_name]
            config["roofline"] = roofline(
                recipe, dataset, len(x), args.members, config["members"], args.threads
            )
    if args.compile:
        import tempfile

        # smoke: a tiny run that checks the protocol, not the result
        overrides = {"max_epochs": 2, "n_train": 1000} if args.smoke else {}
        with tempfile.TemporaryDirectory() as tmp:
            record["compile"] = end_to_end(
                args.compile_recipe,
                args.compile_members,
                args.compile_max_members,
                args.data_dir,
                args.threads,
                args.seed,
                Path(tmp),
                overrides,
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
            target = {"speedup": speedup, "met": speedup >= 3.0}
            roof = config.get("roofline", {}).get("per_k", {}).get("8", {})
            if "best_possible_speedup_over_separate" in roof:
                # beside the miss: the most any engine could gain over separate loops on this machine
                target["machine_limit_speedup"] = roof["best_possible_speedup_over_separate"]
            out["classifier_s: stacked K=8 >= 3x faster per member than separate"] = target
    return out


def print_summary(record: dict, args) -> None:
    if record["configs"]:
        print_arms(record, args)
    print_end_to_end(record)
    print()
    for name, value in record["targets"].items():
        print(
            f"{'met   ' if value['met'] else 'MISSED'} {name}: "
            f"{json.dumps({k: v for k, v in value.items() if k != 'met'})}"
        )


def print_arms(record: dict, args) -> None:
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
    if any("roofline" in config for config in record["configs"].values()):
        print(
            "\nmachine limit per member step: bound = GEMMs at the best measured rate + Adam's bytes at the "
            "measured stream rate (a lower bound); estimate = each GEMM phase at its own measured rate"
        )
        print(
            f"{'recipe':14s} {'K':>3s} {'bound ms':>9s} {'separate/bound':>15s} {'engine/bound':>13s}"
            f" {'estimate ms':>12s} {'separate/est.':>14s} {'engine/est.':>12s}"
        )
        for recipe_name, config in record["configs"].items():
            roof = config.get("roofline")
            if roof is None:
                continue
            print(
                f"{recipe_name:14s} GEMM {roof['gemm']['best'] / 1e9:.1f} GFLOP/s on "
                f"{roof['gemm']['layer']}, {roof['gemm_flops_per_step'] / 1e6:.1f} MFLOP and "
                f"{roof['adam_bytes_per_step'] / 1e6:.2f} MB (Adam) per member step"
            )
            for k, entry in roof["per_k"].items():
                ratios = [
                    f"{entry[key]:.2f}" if key in entry else "-"
                    for key in ("separate_over_bound", "engine_over_bound")
                ]
                estimates = [
                    f"{entry[key]:.2f}" if key in entry else "-"
                    for key in ("separate_over_estimate", "engine_over_estimate")
                ]
                sep = entry.get("separate_over_bound")
                bound_ms = 1e3 * entry["bound_seconds_per_member_step"]
                estimate_ms = 1e3 * entry["estimate_seconds_per_member_step"]
                print(
                    f"{recipe_name:14s} {k:>3s} {bound_ms:9.3f} {ratios[0]:>15s} {ratios[1]:>13s}"
                    f" {estimate_ms:12.3f} {estimates[0]:>14s} {estimates[1]:>12s}"
                    + (f"   any engine: at most {sep:.2f}x over separate loops" if sep else "")
                )


def print_end_to_end(record: dict) -> None:
    if "compile" in record:
        c = record["compile"]
        print(
            f"\nend to end, {c['recipe']} (seed {c['seed']}, {c['criterion']}): target = the "
            f"{len(c['baseline']['sizes'])}-member baseline's validation {c['metric']} {c['target_val']:.4f}"
        )
        for name in ("baseline", "engine_only", "code"):
            sizes = c[name]["sizes"]
            print(
                f"  {name:12s} "
                + "  ".join(
                    f"k={p['k']} {p['seconds']:.1f}s val {p['val']:.4f} test {p['test']:.4f}" for p in sizes
                )
            )
        for name, reach in c["time_to_baseline_quality"].items():
            if reach["reached"]:
                print(
                    f"  {name}: reached at k={reach['k']} after {reach['seconds']:.1f} s "
                    f"({100 * reach['fraction']:.1f} % of the baseline's {c['baseline']['seconds']:.1f} s), "
                    f"test {reach['test']:.4f}"
                )
            else:
                print(f"  {name}: did not reach the baseline's validation quality")


if __name__ == "__main__":
    sys.exit(main())
