"""`codec bench`: CODE against independently trained ensembles, with the statistics to tell them apart.

Per recipe and replicate seed s (member i of replicate s is trained with seed ``100 * s + i``):

1. **Baseline**: independent members (the recipe's training: early stopping, best weights), added one at a
   time. N_baseline is chosen on the *validation* split, as a practitioner would: early stopping over the
   ensemble's size (`select_members`): N is the best ensemble so far, a member counting as better only when
   it gains at least `min_gain` (accuracy, absolute; autoencoders: relative MSE decrease); growing stops
   after `size_patience` members in a row that do not, or at `max_members`. Those extra members are trained
   (that is how one finds out) but neither kept nor charged to the baseline's time.
2. **CODE**: `codec.pipelines.compile.compile_ensemble` with `max_members` members. Its main and peer *are* the
   baseline's first two members (same seeds, identical training); the compile run directory is seeded with
   them and resumed, so they are not trained twice and both methods pay exactly the same for them. CODE's
   extra cost is the passes and the grown members.
3. **Table 1 analogue** (CODE paper): N_code = the smallest CODE ensemble whose validation quality reaches the
   baseline's at N_baseline; the training time it needs as a fraction of the baseline's (paper: 43.51 % on
   average), the same for training work (FLOP estimate, machine independent), its memory footprint M
   (parameters stored by the fused CODE ensemble over N_baseline conventional members; paper: 52.38 %), and
   the passes' share of the training time (paper: < 0.05 %).
4. **Table 2 analogue**: test quality of CODE at the baseline's time budget (the largest CODE ensemble that
   trains in no more time) and unbounded (the CODE size best on validation), against the baseline's.
5. **Sweep** over the choices CODE leaves open (CSNE thresholds, co-firing definition, non-CSN inputs, NDA
   threshold, grown members' initialisation and learning rate, keep_main), each point a compile seeded with
   the same main and peer, compared at `sweep_members` members with the baseline of the same size.
6. **Side by side**: torchensemble's VotingClassifier (same architecture, same initial weights as the
   baseline's members, its own training loop) and a TreeNet (Lee et al.; `codec.runtime.training.coupled`).
7. **Fused inference**: onnxruntime throughput of the fused CODE graph, of the same members as separate
   sessions, and of a torch loop over them, against a bound: the graph's FLOPs at the machine's measured
   float32 GEMM rate (numpy and torch, measured in the same run).

Statistics: every test quality has a percentile bootstrap CI over test examples
(`codec.runtime.evaluation.stats.bootstrap_ci`); every CODE-vs-other comparison is *paired* on the same test examples
(bootstrap CI of the difference, and McNemar's exact test for classifiers) and marked not significant when
the CI contains 0. Across seeds: medians with min/max and a bootstrap CI of the mean over seeds (with three
seeds that interval is crude; the raw per-seed numbers are always recorded).

Times are wall-clock seconds of `train_member` (checkpoints included, as in `codec compile`); on a shared
machine they are noisy, which is why training *work* is reported beside them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codec.errors import ConfigError
from codec.io import write_bytes_atomic, write_json_atomic
from codec.ir.criteria import default_criterion
from codec.pipelines.data import RecipeData, load_recipe_data
from codec.runtime.evaluation.stats import Task, mcnemar_exact, paired_comparison, quality_ci, summarise
from codec.version import __version__

BENCH_FORMAT = 1
RECIPE_KIND = "codec-bench-recipe"
INDEX_KIND = "codec-bench"
INDEX_FILE = "bench.json"
MEMBER_SEED_STRIDE = 100  # replicate s trains member i with seed 100*s + i: replicates share no member
DEFAULT_PASSES = "dna,dne,nda,csne"

# The CODE paper's averages (Trainiti et al.), shown beside the measured numbers.
PAPER_CLAIMS = {
    "time_fraction": {"value": 0.4351, "text": "43.51 % of the baseline's training time (average)"},
    "memory_footprint": {"value": 0.5238, "text": "M = 52.38 % of the baseline (average)"},
    "passes_fraction": {"value": 0.0005, "text": "passes < 0.05 % of the training time"},
}

# How reports name the data sets.
DATASET_LABELS = {
    "mnist_small": "MNIST (bundled 5k/1k subset)",
    "mnist": "MNIST",
    "fashion_mnist": "Fashion-MNIST",
    "cifar10": "CIFAR-10",
    "cifar10_jpeg": "CIFAR-10 (JPEG q75 copy)",
}


def dataset_label(name: str) -> str:
    """The name reports give a data set spec."""
    return DATASET_LABELS.get(name, name)


# --------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    """One setting of CODE's open choices (the compile options that differ from the defaults)."""

    name: str
    passes: str = DEFAULT_PASSES
    grow_init: str = "random"
    grow_lr_scale: float = 1.0
    keep_main: str = "rewritten"

    @property
    def is_default(self) -> bool:
        return (self.passes, self.grow_init, self.grow_lr_scale, self.keep_main) == (DEFAULT_PASSES, "random", 1.0, "rewritten")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


QUICK_SWEEP = (
    SweepPoint("default"),
    SweepPoint("csne fire=corr=0.7", passes="dna,dne,nda,csne{fire=0.7,corr=0.7}"),
    SweepPoint("csne fire=corr=0.9", passes="dna,dne,nda,csne{fire=0.9,corr=0.9}"),
    SweepPoint("cofire=jaccard", passes="dna,dne,nda,csne{cofire=jaccard}"),
    SweepPoint("inputs=drop", passes="dna,dne,nda,csne{inputs=drop}"),
    SweepPoint("nda fire=0.3", passes="dna,dne,nda{fire=0.3},csne"),
    SweepPoint("grow init=main", grow_init="main"),
    SweepPoint("grow lr x0.5", grow_lr_scale=0.5),
    SweepPoint("keep_main=whole", keep_main="whole"),
)

FULL_SWEEP = QUICK_SWEEP + (
    SweepPoint("csne fire=corr=0.6", passes="dna,dne,nda,csne{fire=0.6,corr=0.6}"),
    SweepPoint("csne 0.7 + inputs=drop", passes="dna,dne,nda,csne{fire=0.7,corr=0.7,inputs=drop}"),
    SweepPoint("nda fire=0.7", passes="dna,dne,nda{fire=0.7},csne"),
    SweepPoint("nda mode=jaccard", passes="dna,dne,nda{mode=jaccard},csne"),
    SweepPoint("grow lr x2", grow_lr_scale=2.0),
    SweepPoint("init=main, lr x0.5", grow_init="main", grow_lr_scale=0.5),
)


@dataclass(frozen=True)
class BenchConfig:
    """Everything that decides a benchmark's result (recorded in every result file).

    Attributes:
        profile: "quick" or "full" (the defaults below come from `PROFILES`).
        recipes: recipe names (codec.models.RECIPES).
        seeds: replicate seeds; member i of replicate s is trained with seed 100*s + i.
        max_members: upper bound on the baseline's N and CODE's ensemble size.
        min_gain: a member counts as an improvement of the baseline when it gains at least this much
            validation accuracy over the best ensemble so far (see `select_members`).
        min_gain_relative_mse: the same for autoencoders, as a relative decrease of validation MSE.
        size_patience: members in a row that may fail to gain before the baseline stops growing.
        train_overrides: TrainConfig fields replacing the recipes' (e.g. max_epochs), as (key, value) pairs.
        calibration: training inputs the passes profile.
        sweep: the sweep points (run on the first `sweep_seeds` seeds).
        sweep_seeds: how many seeds the sweep runs on.
        sweep_recipes: how many recipes (the first ones listed) the sweep runs on.
        sweep_members: ensemble size at which sweep points are compared.
        compare: run torchensemble's VotingClassifier and a TreeNet (classifiers only).
        compare_seeds: how many seeds the comparisons run on.
        treenet_split: where the TreeNet's shared trunk ends (a module name, see codec.runtime.training.coupled).
        inference: measure fused-ensemble inference throughput (first seed).
        inference_batches: batch sizes of the throughput measurement.
        threads: torch / onnxruntime / BLAS threads (1: small MLPs on a busy machine are fastest single-threaded).
        n_boot: bootstrap replicates per interval.
        data_dir: where data sets live (None: codec's default).
    """

    profile: str
    recipes: tuple[str, ...]
    seeds: tuple[int, ...] = (0, 1, 2)
    max_members: int = 6
    min_gain: float = 0.002
    min_gain_relative_mse: float = 0.005
    size_patience: int = 2
    train_overrides: tuple[tuple[str, object], ...] = ()
    calibration: int | None = 10_000
    sweep: tuple[SweepPoint, ...] = QUICK_SWEEP
    sweep_seeds: int = 1
    sweep_recipes: int = 1
    sweep_members: int = 4
    compare: bool = True
    compare_seeds: int = 1
    treenet_split: str = "relu1"
    inference: bool = True
    inference_batches: tuple[int, ...] = (1, 256)
    threads: int | None = 1
    n_boot: int = 1000
    data_dir: str | None = None

    def validate(self) -> None:
        """Raise ConfigError (one line) for a configuration the benchmark cannot run."""
        from codec.models import get_recipe
        from codec.runtime.training.train import TrainConfig

        if not self.recipes:
            raise ConfigError("no recipes to benchmark")
        for name in self.recipes:
            TrainConfig.from_recipe(get_recipe(name), **self.overrides())
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ConfigError(f"seeds must be distinct non-negative integers, got {list(self.seeds)}")
        if self.max_members < 3:
            raise ConfigError(f"max members must be at least 3 (main, peer and one grown member), got {self.max_members}")
        if not 2 <= self.sweep_members <= self.max_members:
            raise ConfigError(f"sweep members must be in [2, max members = {self.max_members}], got {self.sweep_members}")
        if self.size_patience < 1:
            raise ConfigError(f"size patience must be at least 1, got {self.size_patience}")
        if self.min_gain < 0 or self.min_gain_relative_mse < 0:
            raise ConfigError("min gain must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be positive, got {self.threads}")
        if self.n_boot < 1:
            raise ConfigError(f"n_boot must be positive, got {self.n_boot}")
        if any(b < 1 for b in self.inference_batches):
            raise ConfigError(f"inference batch sizes must be positive, got {list(self.inference_batches)}")
        from codec.passes.registry import parse_pipeline

        for point in self.sweep:
            parse_pipeline(point.passes)
            if point.grow_init not in ("random", "main") or point.keep_main not in ("rewritten", "whole") or not point.grow_lr_scale > 0:
                raise ConfigError(f"sweep point {point.name!r}: bad grow/keep_main options")

    def overrides(self) -> dict:
        """The TrainConfig overrides every member is trained with."""
        out = dict(self.train_overrides)
        if self.threads is not None:
            out["num_threads"] = self.threads
        return out

    def member_seed(self, replicate: int, member: int) -> int:
        return MEMBER_SEED_STRIDE * replicate + member

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["train_overrides"] = dict(self.train_overrides)
        d["sweep"] = [p.to_dict() for p in self.sweep]
        return d


PROFILES: dict[str, BenchConfig] = {
    # Under 10 minutes on 2 busy CPU cores: the small MLP and autoencoder on the bundled 5k MNIST subset, 3 seeds,
    # the recipes' own training (15 epochs max), ensembles of up to 6, the sweep at 3 members on the MLP.
    "quick": BenchConfig(
        profile="quick",
        recipes=("classifier_s", "autoenc_s"),
        seeds=(0, 1, 2),
        max_members=6,
        sweep_members=3,
        sweep=QUICK_SWEEP,
        inference_batches=(1, 256),
    ),
    # The real recipes (hours on a CPU): MNIST from --data-dir, the local CIFAR-10 JPEG copy.
    "full": BenchConfig(
        profile="full",
        recipes=("classifier_m", "autoenc_m", "classifier_cj", "cifar10_quick_j"),
        seeds=(0, 1, 2),
        max_members=10,
        sweep=FULL_SWEEP,
        sweep_seeds=3,
        sweep_recipes=4,
        compare_seeds=3,
        threads=None,
        inference_batches=(1, 64, 1024),
        n_boot=2000,
    ),
}


def profile_config(name: str, **changes) -> BenchConfig:
    """A profile's configuration with some fields replaced (None values keep the profile's)."""
    if name not in PROFILES:
        raise ConfigError(f"unknown profile {name!r}; choose one of {', '.join(PROFILES)}")
    config = dataclasses.replace(PROFILES[name], **{k: v for k, v in changes.items() if v is not None})
    config.validate()
    return config


def select_members(val_curve: Sequence[float], task: Task, min_gain: float, max_members: int,
                   patience: int = 2) -> tuple[int, str, bool]:
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
            return best_k, f"members {k - patience + 1}..{k} each gained < {min_gain:g} over {best_k} members on validation", True
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
        return Arm(self.name, self.members[:k], self.cumulative_seconds[:k], self.cumulative_work[:k],
                   self.stored_parameters[:k], self.val[:k], self.test[:k])


def layer_macs(net) -> list[dict]:
    """Multiply-accumulates per example of each compute layer of a NetworkIR, split into the layer's own
    neurons and its frozen-shared (CSN) ones."""
    from codec.ir.network import Conv, Dense, Role

    out = []
    shapes = [tuple(net.input_shape)] + net.shapes()
    for index, layer in enumerate(net.layers):
        if not isinstance(layer, (Dense, Conv)):
            continue
        frozen = int(np.sum(layer.roles == Role.FROZEN_SHARED))
        if isinstance(layer, Dense):
            per_neuron = layer.in_features
        else:
            _, oh, ow = layer.output_shape(shapes[index])
            kh, kw = layer.kernel_shape
            per_neuron = layer.in_channels * kh * kw * oh * ow
        out.append({"layer": layer.name, "own": (layer.num_neurons - frozen) * per_neuron, "frozen": frozen * per_neuron,
                    "neurons": layer.num_neurons, "frozen_neurons": frozen})
    return out


def training_work(macs: list[dict], epochs: int, n_train: int, n_val: int, cached: bool) -> float:
    """FLOP estimate of training one member: per epoch 6 FLOP per trainable MAC and training example (forward
    and backward), 2 per frozen MAC when the CSN is recomputed every step, and 2 per MAC for the validation
    pass; plus computing the CSN cache once."""
    own = sum(m["own"] for m in macs)
    frozen = sum(m["frozen"] for m in macs)
    per_epoch = n_train * (6.0 * own + (0.0 if cached else 2.0 * frozen)) + n_val * 2.0 * (own + frozen)
    return float(epochs * per_epoch + (2.0 * frozen * (n_train + n_val) if cached else 0.0))


# The splits every arm trains and is scored on are exactly `codec compile`'s: pipelines.data.RecipeData.
BenchData = RecipeData


def load_bench_data(recipe, config, data_dir) -> RecipeData:
    """The recipe's data with compile's subset and validation split (DATA_SEED), so every arm sees the same."""
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
    result = train_member(module, d.x_train, d.y_train, d.x_val, d.y_val, config, checkpoint_path=checkpoint, resume=False, desc=name)
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
            onnx[role] = ({"path": f"members/{role}.onnx", **{k: v for k, v in facts.items() if k != "name"},
                           "reused_from": f"baseline {name}"}, blob)
        if len(members) >= 2:
            curve = task.curve(np.stack(val), d.target("val"))
            stopped = stopped or select_members(curve, task, min_gain, bench.max_members, bench.size_patience)[2]
            if stopped and len(members) >= need:
                break
    val_stack, test_stack = np.stack(val), np.stack(test)
    n, why, _ = select_members(task.curve(val_stack, d.target("val")), task, min_gain, bench.max_members, bench.size_patience)
    macs = layer_macs(lift(onnx["main"][1], name="main"))
    work = [training_work(macs, m["epochs"], len(d.x_train), len(d.x_val), cached=False) for m in members]
    params = members[0]["parameters"]
    arm = Arm("baseline", members, np.cumsum([m["train_seconds"] for m in members]), np.cumsum(work),
              np.array([params * k for k in range(1, len(members) + 1)]), val_stack, test_stack)
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


def run_code(ctx: _Context, replicate: int, baseline: BaselineRun, point: SweepPoint, members: int, run_dir: Path) -> CodeRun:
    """One CODE compile seeded with the baseline's main and peer; its members' outputs and prefix costs."""
    from codec.ir import lift
    from codec.pipelines.compile import CompileOptions, compile_ensemble
    from codec.runtime.training.grow import GrowOptions

    d, bench = ctx.data, ctx.bench
    options = CompileOptions(
        recipe=ctx.recipe.name, members=members, seed=bench.member_seed(replicate, 0), passes=point.passes,
        calibration=bench.calibration, grow=GrowOptions(init=point.grow_init, lr_scale=point.grow_lr_scale),
        keep_main=point.keep_main, train_overrides=ctx.bench.overrides(), data_dir=bench.data_dir,
    )
    _seed_compile_run(run_dir, options, baseline.onnx)
    with contextlib.redirect_stdout(sys.stderr):
        report = compile_ensemble(options, run_dir, resume=True, quiet=True)
    state = json.loads((run_dir / "state.json").read_text())["steps"]
    grown = [f"grown_{i}" for i in range(1, members - 1)]
    files = [run_dir / ("opt/main.onnx" if point.keep_main == "rewritten" else "members/main.onnx"), run_dir / "opt/peer.onnx"]
    files += [run_dir / "members" / f"{g}.onnx" for g in grown]
    threads = bench.threads
    val = np.stack([_onnx_outputs(f, d.x_val, threads) for f in files])
    test = np.stack([_onnx_outputs(f, d.x_test, threads) for f in files])
    if not d.classify:
        val, test = val.reshape(len(files), len(d.x_val), -1), test.reshape(len(files), len(d.x_test), -1)
    t = report["time"]
    seconds = [t["train_main"], t["train_peer"] + t["passes"], *t["grow"]]
    base_members = baseline.arm.members
    work = [float(baseline.arm.cumulative_work[0]), float(baseline.arm.cumulative_work[1] - baseline.arm.cumulative_work[0])]
    facts = [dict(base_members[0], name="main"), dict(base_members[1], name="peer")]
    for g, epochs in zip(grown, report["epochs"]["grow"]):
        step = state.get(f"train:{g}", {})
        macs = layer_macs(lift(run_dir / "members" / f"{g}.onnx", name=g))
        cached = bool(step.get("csn_cache", False))
        work.append(training_work(macs, epochs, len(d.x_train), len(d.x_val), cached))
        facts.append({"name": g, "seed": step.get("seed"), "epochs": epochs, "best_epoch": step.get("best_epoch"),
                      "train_seconds": step.get("train_seconds"), "trainable_parameters": step.get("trainable_parameters"),
                      "frozen_parameters": step.get("frozen_parameters"), "csn_cache": cached})
    fused = report["parameters"]["fused_graph"]
    own, shared = fused["members"], fused["shared_layers"]
    stored = [sum(own[:k]) + (fused["csn"] if any(shared[:k]) else 0) for k in range(1, members + 1)]
    rewritten = lift(run_dir / "opt" / "main.onnx", name="main")
    widths = {layer.name: layer.num_neurons for layer in rewritten.hidden_layers()}
    arm = Arm(point.name if not point.is_default else "code", facts, np.cumsum(seconds), np.cumsum(work),
              np.array(stored), val, test)
    return CodeRun(arm, report, run_dir, files, widths)


# --------------------------------------------------------------------------------------------------------
# Analysis (pure functions of measured arms)
# --------------------------------------------------------------------------------------------------------


def _curve_points(task: Task, arm: Arm, val_target, test_target, start: int = 1) -> list[dict]:
    val = task.curve(arm.val, val_target)
    test = task.curve(arm.test, test_target)
    return [{"k": k, "seconds": float(arm.cumulative_seconds[k - 1]), "work": float(arm.cumulative_work[k - 1]),
             "stored_parameters": int(arm.stored_parameters[k - 1]), "val": float(val[k - 1]), "test": float(test[k - 1])}
            for k in range(start, len(arm) + 1)]


def analyse_seed(task: Task, baseline: Arm, n_baseline: int, code: Arm, val_target, test_target, *,
                 tp_dnn: int, csn_parameters: int, tp_codedn: int, n_boot: int, seed: int = 0) -> dict:
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
        return {"k": k, "seconds": float(code.cumulative_seconds[k - 1]), "work": float(code.cumulative_work[k - 1]),
                "val": float(code_val[k - 1]), "test": quality_ci(per, n_boot, seed),
                "vs_baseline": paired_comparison(task, per, base_test, n_boot, seed),
                "stored_parameters": int(code.stored_parameters[k - 1]),
                "memory_footprint": float(code.stored_parameters[k - 1]) / (n_baseline * tp_dnn)}

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
        "memory_footprint_formula": memory_footprint(int(tp_dnn), int(k_m), int(tp_codedn), int(csn_parameters), int(n_baseline)),
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


def analyse_against(task: Task, baseline: Arm, k_base: int, other_test: np.ndarray, test_target, n_boot: int,
                    seed: int = 0, per_example: np.ndarray | None = None) -> dict:
    """Test quality of another ensemble (its member outputs, or its per-example scores) paired with the
    baseline's first `k_base` members."""
    per = per_example if per_example is not None else task.per_example(other_test, test_target)
    base = task.per_example(baseline.test[:k_base], test_target)
    return {"test": quality_ci(per, n_boot, seed), "baseline_members": k_base,
            "baseline_test": quality_ci(base, n_boot, seed), "vs_baseline": paired_comparison(task, per, base, n_boot, seed)}


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
        return {"available": False, "why": f"torchensemble is not installed ({exc}); pip install --no-deps torchensemble joblib"}
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
    train = DataLoader(TensorDataset(torch.from_numpy(d.x_train), torch.from_numpy(d.y_train)), batch_size=config.batch_size,
                       shuffle=True, generator=generator)
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
            outputs.append(torch.softmax(est(torch.from_numpy(d.x_test)).double(), dim=1).numpy().astype(np.float32))
    params = sum(p.numel() for p in model.estimators_.parameters())
    import importlib.metadata

    return {"available": True, "version": importlib.metadata.version("torchensemble"), "members": n, "epochs": config.max_epochs,
            "train_seconds": seconds, "stored_parameters": int(params), "test_outputs": np.stack(outputs),
            "rule": "soft voting (mean of probabilities); scored here with the benchmark's criterion too"}


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
        report = train_ensemble_recipe(ctx.recipe.name, options, out_dir, overrides=overrides, data_dir=ctx.bench.data_dir,
                                       quiet=True, plot=False)
    fused = _onnx_outputs(out_dir / "ensemble.onnx", d.x_test, ctx.bench.threads)
    per_example = (fused.argmax(axis=1) == d.y_test).astype(np.float64)
    return {"available": True, "members": n, "split": ctx.bench.treenet_split, "loss": options.loss,
            "epochs": report["epochs_run"], "train_seconds": report["times"]["train_seconds"],
            "stored_parameters": int(report["treenet"]["fused_parameters"]["total_stored"]),
            "trunk": report["treenet"].get("trunk"), "per_example": per_example,
            "member_accuracies": report["metrics"]["member_accuracies"],
            "assignment": report.get("assignment")}


# --------------------------------------------------------------------------------------------------------
# Fused inference
# --------------------------------------------------------------------------------------------------------


def _time_call(fn: Callable[[], object], min_seconds: float = 0.3, min_reps: int = 5, max_reps: int = 2000) -> float:
    """Median seconds per call (after one warm-up call), repeating for at least `min_seconds`."""
    fn()
    times = []
    started = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - started < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def gemm_rates(threads: int | None, sizes: Sequence[tuple[int, int, int]] = ((256, 784, 128), (1024, 1024, 1024))) -> list[dict]:
    """Measured float32 GEMM GFLOP/s of numpy (BLAS) and torch at the given (m, k, n) shapes."""
    import torch

    rng = np.random.default_rng(0)
    out = []
    limit = _blas_threads(threads)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with limit:
            for m, k, n in sizes:
                a = rng.standard_normal((m, k), dtype=np.float32)
                b = rng.standard_normal((k, n), dtype=np.float32)
                ta, tb = torch.from_numpy(a), torch.from_numpy(b)
                flop = 2.0 * m * k * n
                out.append({"m": m, "k": k, "n": n,
                            "numpy_gflops": flop / _time_call(lambda a=a, b=b: a @ b) / 1e9,
                            "torch_gflops": flop / _time_call(lambda ta=ta, tb=tb: torch.mm(ta, tb)) / 1e9})
    finally:
        torch.set_num_threads(previous)
    return out


def _blas_threads(threads: int | None):
    if not threads:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


def measure_inference(ensemble: Path, member_files: Sequence[Path], x: np.ndarray, criterion: str, batches: Sequence[int],
                      threads: int | None) -> dict:
    """Throughput (examples/s) of the fused graph, the members as separate onnxruntime sessions (outputs
    combined with numpy), and a torch loop over the members (same combine), with the FLOP bound."""
    import torch

    from codec.ir import lift
    from codec.ir.ensemble import ensemble_description
    from codec.runtime.evaluation.metrics import combine
    from codec.runtime.execution.session import create_session
    from codec.runtime.training.torch_ir import IRModule

    fused = create_session(ensemble, intra_op_threads=threads)
    sessions = [create_session(f, intra_op_threads=threads) for f in member_files]
    nets = [lift(f, name=f.stem) for f in member_files]
    modules = [IRModule(net, probabilities=True).eval() for net in nets]
    shape = tuple(fused.get_inputs()[0].shape[1:])
    x = np.ascontiguousarray(x.reshape((len(x), *shape)), dtype=np.float32)
    fused_name = fused.get_inputs()[0].name
    names = [s.get_inputs()[0].name for s in sessions]

    # FLOPs per example: the CSN once, each member's own neurons (from the fused graph's sharing).
    import onnx_ir as ir

    description = ensemble_description(ir.load(str(ensemble))) or {}
    csn_neurons = {c["layer"]: c["neurons"] for c in description.get("csn", [])}
    macs = 0
    for net in nets:
        macs += sum(m["own"] for m in layer_macs(net))
    csn_macs = 0
    if csn_neurons:
        main_macs = layer_macs(nets[0])
        csn_macs = sum(m["frozen"] for m in main_macs)
    flops = 2.0 * (macs + csn_macs)
    separate_flops = 2.0 * sum(sum(m["own"] + m["frozen"] for m in layer_macs(net)) for net in nets)

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    results = []
    try:
        with _blas_threads(threads):
            for batch in batches:
                xb = x[:batch] if batch <= len(x) else np.resize(x, (batch, *shape)).astype(np.float32)
                tb = torch.from_numpy(xb)

                def run_fused(xb=xb):
                    return fused.run(None, {fused_name: xb})[0]

                def run_separate(xb=xb):
                    return combine(np.stack([s.run(None, {n: xb})[0] for s, n in zip(sessions, names)]), criterion)

                def run_torch(tb=tb):
                    with torch.no_grad():
                        return combine(np.stack([m(tb).numpy() for m in modules]), criterion)

                agreement = float(np.max(np.abs(run_fused() - run_separate())))
                row = {"batch": batch, "max_abs_diff_fused_vs_separate": agreement}
                for label, fn in (("fused_onnx", run_fused), ("separate_onnx", run_separate), ("torch_loop", run_torch)):
                    seconds = _time_call(fn)
                    row[label] = {"seconds_per_batch": seconds, "examples_per_second": batch / seconds}
                results.append(row)
    finally:
        torch.set_num_threads(previous)
    gemm = gemm_rates(threads)
    best = max(max(g["numpy_gflops"], g["torch_gflops"]) for g in gemm)
    for row in results:
        row["bound_examples_per_second"] = best * 1e9 / flops
        row["fused_fraction_of_bound"] = row["fused_onnx"]["examples_per_second"] / row["bound_examples_per_second"]
    return {"members": len(member_files), "criterion": criterion, "flops_per_example_fused": flops,
            "flops_per_example_separate": separate_flops, "gemm": gemm, "gemm_best_gflops": best, "threads": threads,
            "batches": results}


# --------------------------------------------------------------------------------------------------------
# Machine facts
# --------------------------------------------------------------------------------------------------------


def machine_facts(threads: int | None) -> dict:
    """What the numbers were measured on: CPU, cores, memory, load, library versions, codec's git commit."""
    import importlib.metadata as md
    import subprocess

    facts = {"platform": platform.platform(), "python": platform.python_version(), "machine": platform.machine(),
             "logical_cpus": os.cpu_count(), "threads": threads}
    with contextlib.suppress(AttributeError):
        facts["cpus_available"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                facts["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    with contextlib.suppress(OSError, AttributeError):
        facts["load_average"] = [round(v, 2) for v in os.getloadavg()]
    versions = {"codec": __version__}
    for name in ("torch", "onnxruntime", "onnx", "onnx-ir", "numpy", "torchensemble"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[name] = md.version(name)
    facts["versions"] = versions
    repo = Path(__file__).resolve().parents[1]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=False)
        if commit.returncode == 0:
            facts["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                   capture_output=True, text=True, timeout=10, check=False)
            facts["git_dirty"] = bool(dirty.stdout.strip())
    return facts


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed: `codec ...` for the console script and `python -m codec`."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name in ("codec", "__main__.py"):
        return shlex.join(["codec", *argv[1:]])
    return shlex.join(argv)


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


def bench_recipe(recipe_name: str, bench: BenchConfig, work: Path, *, log: Callable[[str], None] = lambda s: None,
                 keep_runs: bool = False, sweep: bool = True) -> dict:
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
        code = run_code(ctx, replicate, base, SweepPoint("default"), bench.max_members, work / f"code_{replicate}")
        report = code.report
        tp_dnn = base.arm.members[0]["parameters"]
        analysis = analyse_seed(task, base.arm, base.n_baseline, code.arm, val_t, test_t, tp_dnn=tp_dnn,
                                csn_parameters=report["csn"]["parameters"], tp_codedn=report["parameters"]["grown_member_trainable"],
                                n_boot=bench.n_boot, seed=replicate)
        consistency = _consistency(task, code.arm, report, test_t)
        per_seed.append({
            "seed": replicate,
            "member_seeds": [m["seed"] for m in base.arm.members],
            "baseline": {"members": base.arm.members, "n_baseline": base.n_baseline, "why": base.why,
                         "curve": _curve_points(task, base.arm, val_t, test_t)},
            "code": {"members": code.arm.members, "curve": _curve_points(task, code.arm, val_t, test_t),
                     "time": report["time"], "epochs": report["epochs"], "csn": report["csn"], "csn_layer_widths": code.csn_widths,
                     "parameters": report["parameters"], "memory_footprint_M_all_members": report["memory_footprint_M"],
                     "passes_fraction": report["time"]["passes_fraction_of_training"], "compile_quality": report["quality"],
                     "recomputed_vs_compile_max_abs_diff": consistency},
            **analysis,
        })
        if index < sweep_seeds:
            k = bench.sweep_members
            default = code.arm.prefix(k)
            sweep.append(_sweep_row(task, SweepPoint("default"), default, base, report, code.csn_widths, val_t, test_t, bench, replicate))
            for point in sweep_points:
                log(f"{recipe.name} seed {replicate}: sweep {point.name}")
                run = run_code(ctx, replicate, base, point, k, work / f"sweep_{replicate}_{_slug(point.name)}")
                sweep.append(_sweep_row(task, point, run.arm, base, run.report, run.csn_widths, val_t, test_t, bench, replicate))
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
                te["soft_voting"] = analyse_against(task, base.arm, n, None, test_t, bench.n_boot, replicate,
                                                    per_example=(np.mean(outputs, axis=0).argmax(axis=1) == test_t).astype(np.float64))
            row["torchensemble"] = te
            tn = run_treenet(ctx, replicate, n)
            if tn["available"]:
                per = tn.pop("per_example")
                tn.update(analyse_against(task, base.arm, n, None, test_t, bench.n_boot, replicate, per_example=per))
                if assignment is None and tn.get("assignment"):
                    assignment = {"source": f"TreeNet, seed {replicate}", **tn["assignment"]}
            row["treenet"] = tn
            row["baseline"] = {"train_seconds": float(base.arm.cumulative_seconds[n - 1]), "stored_parameters": int(base.arm.stored_parameters[n - 1]),
                               "test": quality_ci(task.per_example(base.arm.test[:n], test_t), bench.n_boot, replicate)}
            k_code = analysis["table1"]["n_code"] or len(code.arm)
            row["code"] = {"members": k_code, "train_seconds": float(code.arm.cumulative_seconds[k_code - 1]),
                           "stored_parameters": int(code.arm.stored_parameters[k_code - 1]),
                           **analyse_against(task, base.arm, n, code.arm.test[:k_code], test_t, bench.n_boot, replicate)}
            comparisons.append(row)
        if bench.inference and index == 0:
            log(f"{recipe.name} seed {replicate}: fused inference throughput")
            inference = measure_inference(code.run_dir / "ensemble.onnx", code.member_files, data.x_test, task.criterion,
                                          bench.inference_batches, bench.threads)
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
    theirs = report["quality"].get("cumulative_accuracy" if task.kind == "classification" else "cumulative_mse")
    if theirs is None or len(theirs) != len(ours):
        return float("nan")
    return float(np.max(np.abs(ours - np.asarray(theirs))))


def _sweep_row(task, point, arm: Arm, base: BaselineRun, report, widths, val_t, test_t, bench, replicate) -> dict:
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

    t1 = lambda s: s["table1"]
    t2 = lambda s: s["table2"]
    budget_verdicts = [t2(s)["at_budget"]["vs_baseline"]["verdict"] if t2(s)["at_budget"] else "no CODE ensemble within budget" for s in per_seed]
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
        "baseline_member_epochs": summarise([m["epochs"] for s in per_seed for m in s["baseline"]["members"]], n_boot),
        "grown_member_epochs": summarise([m["epochs"] for s in per_seed for m in s["code"]["members"][2:]], n_boot),
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


def run_bench(bench: BenchConfig, out_dir: str | os.PathLike, *, command: str, work_dir: str | os.PathLike | None = None,
              log: Callable[[str], None] = lambda s: None) -> dict:
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
            result = bench_recipe(name, bench, work / name, log=log, keep_runs=not own_work, sweep=position < bench.sweep_recipes)
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


__all__ = [
    "PROFILES",
    "BenchConfig",
    "SweepPoint",
    "Task",
    "analyse_seed",
    "bench_recipe",
    "headline",
    "mcnemar_exact",
    "paired_comparison",
    "profile_config",
    "quality_ci",
    "run_bench",
    "select_members",
    "summarise",
]
