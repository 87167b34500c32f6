"""`codec bench`: CODE against independently trained ensembles, with the statistics to tell them apart.

The package, by job: `config` (sweep points, BenchConfig, profiles), `arms` (baseline, CODE, torchensemble,
TreeNet), `analysis` (N_baseline, the Table 1/2 analogues, comparisons), `flops` (the FLOP model),
`machine` (GEMM rates, inference throughput, machine facts) and `run` (one recipe, then the benchmark).
The statistics are `codec.runtime.evaluation.stats`.

Per recipe and replicate seed s (member i of replicate s is trained with seed ``100 * s + i``):

1. **Baseline**: independent members (the recipe's training: early stopping, best weights), added one at a
   time. N_baseline is chosen on the *validation* split, as a practitioner would: early stopping over the
   ensemble's size (`select_members`): N is the best ensemble so far, a member counting as better only when
   it gains at least `min_gain` (accuracy, absolute; autoencoders: relative MSE decrease); growing stops
   after `size_patience` members in a row that do not, or at `max_members`. Those extra members are trained
   (that is how one finds out) but neither kept nor charged to the baseline's time.
2. **CODE**: `codec.pipelines.compile.compile_ensemble` with `max_members` members. Its main and peer *are*
   the baseline's first two members (same seeds, identical training); the compile run directory is seeded with
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
(`codec.runtime.evaluation.stats.bootstrap_ci`); every CODE-vs-other comparison is *paired* on the same test
examples
(bootstrap CI of the difference, and McNemar's exact test for classifiers) and marked not significant when
the CI contains 0. Across seeds: medians with min/max and a bootstrap CI of the mean over seeds (with three
seeds that interval is crude; the raw per-seed numbers are always recorded).

Times are wall-clock seconds of `train_member` (checkpoints included, as in `codec compile`); on a shared
machine they are noisy, which is why training *work* is reported beside them.
"""

from __future__ import annotations

import dataclasses  # noqa: F401  (tests build profile variants with bench.dataclasses.replace)

from codec.pipelines.bench.analysis import Arm, analyse_against, analyse_seed, select_members
from codec.pipelines.bench.arms import (
    BaselineRun,
    BenchData,
    CodeRun,
    load_bench_data,
    run_baseline,
    run_code,
    run_torchensemble,
    run_treenet,
)
from codec.pipelines.bench.config import (
    BENCH_FORMAT,
    DATASET_LABELS,
    DEFAULT_PASSES,
    FULL_SWEEP,
    INDEX_FILE,
    INDEX_KIND,
    MEMBER_SEED_STRIDE,
    PAPER_CLAIMS,
    PROFILES,
    QUICK_SWEEP,
    RECIPE_KIND,
    BenchConfig,
    SweepPoint,
    dataset_label,
    profile_config,
)
from codec.pipelines.bench.flops import layer_macs, training_work
from codec.pipelines.bench.machine import command_line, gemm_rates, machine_facts, measure_inference
from codec.pipelines.bench.run import bench_recipe, headline, run_bench, summarise_recipe
from codec.runtime.evaluation.stats import Task, mcnemar_exact, paired_comparison, quality_ci, summarise

__all__ = [
    "BENCH_FORMAT",
    "DATASET_LABELS",
    "DEFAULT_PASSES",
    "FULL_SWEEP",
    "INDEX_FILE",
    "INDEX_KIND",
    "MEMBER_SEED_STRIDE",
    "PAPER_CLAIMS",
    "PROFILES",
    "QUICK_SWEEP",
    "RECIPE_KIND",
    "Arm",
    "BaselineRun",
    "BenchConfig",
    "BenchData",
    "CodeRun",
    "SweepPoint",
    "Task",
    "analyse_against",
    "analyse_seed",
    "bench_recipe",
    "command_line",
    "dataset_label",
    "gemm_rates",
    "headline",
    "layer_macs",
    "load_bench_data",
    "machine_facts",
    "mcnemar_exact",
    "measure_inference",
    "paired_comparison",
    "profile_config",
    "quality_ci",
    "run_baseline",
    "run_bench",
    "run_code",
    "run_torchensemble",
    "run_treenet",
    "select_members",
    "summarise",
    "summarise_recipe",
    "training_work",
]
