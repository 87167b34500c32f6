"""`codec bench --profile quick -o bench/quick/`: CODE against independent ensembles, torchensemble and a
TreeNet."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from codec.commands._common import (
    add_data_dir_argument,
    add_subset_arguments,
    emit,
    fraction,
    non_negative_int,
    positive_int,
    table,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help=(
            "benchmark CODE against independently trained ensembles (the seed papers' tables, with "
            "statistics)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Per recipe and seed: a baseline of independent members (grown until 2 members in a row "
            "gain less\n"
            "than --min-gain on validation), CODE seeded with the baseline's first two members, a "
            "sweep over CODE's\n"
            "open choices, torchensemble's VotingClassifier and a TreeNet side by side, and fused-ensemble\n"
            "inference throughput against a FLOP bound. Every comparison is paired on the same test "
            "examples\n"
            "with bootstrap CIs. Writes OUT/<recipe>.json and OUT/bench.json; render them with\n"
            "`codec report OUT -o OUT/report.html`.\n\n"
            "profiles: quick (small MLP and autoencoder on the bundled MNIST subset, 3 seeds, under 10 "
            "minutes\n"
            "on 2 cores) and "
            "full (the real recipes: classifier_m autoenc_m on MNIST, classifier_cj cifar10_quick_j on the\n"
            "CIFAR-10 JPEG copy; pass --data-dir)."
        ),
    )
    parser.add_argument(
        "--profile", choices=("quick", "full"), default="quick", help="which benchmark (default quick)"
    )
    parser.add_argument(
        "--recipes", nargs="+", default=None, metavar="RECIPE", help="recipes to run (default: the profile's)"
    )
    parser.add_argument(
        "--seeds",
        nargs="+",
        type=non_negative_int,
        default=None,
        metavar="S",
        help="replicate seeds (default 0 1 2)",
    )
    add_data_dir_argument(parser)
    parser.add_argument(
        "--max-members",
        type=positive_int,
        default=None,
        help="largest ensemble tried (default: the profile's)",
    )
    parser.add_argument(
        "--sweep-members",
        type=positive_int,
        default=None,
        help="ensemble size the sweep compares at (default 4, at most --max-members)",
    )
    parser.add_argument(
        "--min-gain",
        type=fraction,
        default=None,
        help=(
            "validation accuracy a member must add to count as an improvement of the baseline (default 0.002)"
        ),
    )
    parser.add_argument(
        "--epochs", type=positive_int, default=None, help="max epochs per member (default: the profile's)"
    )
    add_subset_arguments(parser)
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch/onnxruntime/BLAS threads (quick default 1)"
    )
    parser.add_argument(
        "--n-boot", type=positive_int, default=None, help="bootstrap replicates per interval (default 1000)"
    )
    parser.add_argument("--no-sweep", action="store_true", help="skip the sweep over CODE's open choices")
    parser.add_argument("--no-compare", action="store_true", help="skip torchensemble and the TreeNet")
    parser.add_argument(
        "--no-inference", action="store_true", help="skip the inference throughput measurement"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="keep the compile run directories here (default: a temporary folder, removed)",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the result JSON files")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--json", action="store_true", help="print the index (bench.json) as JSON")
    parser.set_defaults(func=run)


def config_from_args(args: argparse.Namespace):
    """The BenchConfig the command-line arguments describe (the profile's, with the options given)."""
    from codec.pipelines.bench import PROFILES, profile_config

    base = PROFILES[args.profile]
    overrides = dict(base.train_overrides)
    sweep_members = args.sweep_members
    if sweep_members is None and args.max_members is not None:
        sweep_members = min(base.sweep_members, args.max_members)
    for key, value in (("max_epochs", args.epochs), ("n_train", args.n_train), ("n_test", args.n_test)):
        if value is not None:
            overrides[key] = value
    return profile_config(
        args.profile,
        recipes=tuple(args.recipes) if args.recipes else None,
        seeds=tuple(args.seeds) if args.seeds else None,
        data_dir=args.data_dir,
        max_members=args.max_members,
        sweep_members=sweep_members,
        min_gain=args.min_gain,
        threads=args.threads,
        n_boot=args.n_boot,
        train_overrides=tuple(sorted(overrides.items())),
        sweep=() if args.no_sweep else None,
        compare=False if args.no_compare else None,
        inference=False if args.no_inference else None,
    )


def run(args: argparse.Namespace) -> int:
    import time

    from codec.pipelines.bench import command_line, run_bench

    config = config_from_args(args)
    started = time.perf_counter()

    def log(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:6.0f}s] {message}", file=sys.stderr, flush=True)

    index = run_bench(
        config,
        args.output,
        command=getattr(args, "command_line", None) or command_line(),
        work_dir=args.work_dir,
        log=log,
    )
    emit(args, index, summary(index, args.output))
    return 0


def _diff(value, metric: str) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f} pt" if metric == "accuracy" else f"{value:+.3g}"


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def summary(index: dict, out: Path) -> str:
    rows = []
    for h in index["headline"]:
        rows.append(
            [
                h["recipe"],
                h["dataset"],
                h["n_baseline_median"],
                h["reached"],
                _pct(h["time_fraction_median"]),
                _pct(h["work_fraction_median"]),
                _pct(h["memory_footprint_median"]),
                _pct(h["passes_fraction_median"]),
                _diff(h["code_unbounded_diff_median"], h["metric"]),
                ", ".join(h["code_unbounded_verdicts"]),
            ]
        )
    text = table(
        rows, ["recipe", "data", "N_base", "reached", "time", "work", "M", "passes", "CODE-base", "per seed"]
    )
    text += (
        "\n\ntime/work: CODE's training to reach the baseline's validation quality, as a fraction of "
        "the baseline's"
        " (paper: 43.51%); M: memory footprint (paper: 52.38%); passes: share of training time "
        "(paper: <0.05%)."
        "\nCODE-base: test quality difference (accuracy points, or MSE), CODE at its size best on "
        "validation minus the"
        f" baseline, median over seeds; per seed: paired bootstrap verdict (better/worse/not significant)."
        f"\nwrote {out}/bench.json ({index['wall_seconds']:.0f}s); render: codec report {out} -o "
        f"{out}/report.html"
    )
    return text
