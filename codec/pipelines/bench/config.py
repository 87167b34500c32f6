"""The benchmark's configuration: sweep points, `BenchConfig`, the named profiles, file kinds."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from codec.errors import ConfigError

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
        return (self.passes, self.grow_init, self.grow_lr_scale, self.keep_main) == (
            DEFAULT_PASSES,
            "random",
            1.0,
            "rewritten",
        )

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
        treenet_split: where the TreeNet's shared trunk ends (a module name, see
            codec.runtime.training.coupled).
        inference: measure fused-ensemble inference throughput (first seed).
        inference_batches: batch sizes of the throughput measurement.
        threads: torch / onnxruntime / BLAS threads (1: small MLPs on a busy machine are fastest
            single-threaded).
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
            raise ConfigError(
                f"max members must be at least 3 (main, peer and one grown member), got {self.max_members}"
            )
        if not 2 <= self.sweep_members <= self.max_members:
            raise ConfigError(
                f"sweep members must be in [2, max members = {self.max_members}], got {self.sweep_members}"
            )
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
            if (
                point.grow_init not in ("random", "main")
                or point.keep_main not in ("rewritten", "whole")
                or not point.grow_lr_scale > 0
            ):
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
    # Under 10 minutes on 2 busy CPU cores: the small MLP and autoencoder on the bundled 5k MNIST subset, 3
    # seeds,
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
