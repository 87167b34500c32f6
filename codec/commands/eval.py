"""`codec eval`: score ONNX ensemble members, alone and combined, on a dataset with onnxruntime.

The scoring is `codec.pipelines.evaluate.evaluate_members`; this module is its flags and its report text.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from codec.commands._common import add_data_arguments
from codec.errors import ConfigError

DESCRIPTION = """\
Run every member (ONNX) on a dataset split with onnxruntime and report the ensemble.

Classifiers (one output per class): ensemble accuracy under the chosen criterion, per-member accuracies,
oracle accuracy (an example counts when any member gets it right), NLL and ECE of the combined
probabilities, ensemble effect (ensemble minus best member) and output redundancy. Members that output
scores rather than probabilities get a softmax first.
Autoencoders (output size = flattened input size, detected automatically): per-member MSE and the
cumulative MSE of the mean reconstruction of the first m members.

criteria: prod (renormalised product of probabilities), mean, vote (majority), max.

examples:
  codec eval main.onnx peer.onnx --data mnist_small
  codec eval m*.onnx --data mnist_small --criterion vote --json
"""


def register(subparsers) -> None:
    """Add the `eval` parser."""
    parser = subparsers.add_parser(
        "eval",
        help="score ONNX members and their ensemble on a dataset",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("members", nargs="+", metavar="MEMBER.onnx", help="the ensemble's members")
    add_data_arguments(parser)
    parser.add_argument(
        "--criterion",
        default="prod",
        help="how member probabilities combine: prod, mean, vote or max (default prod)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=512, help="examples per onnxruntime call (default 512)"
    )
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Evaluate the members; print the report. Returns the exit code."""
    from codec.ir.criteria import CRITERIA
    from codec.pipelines.evaluate import evaluate_members

    if args.criterion not in CRITERIA:
        raise ConfigError(f"unknown criterion {args.criterion!r}; choose one of {', '.join(CRITERIA)}")
    if args.limit is not None and args.limit < 1:
        raise ConfigError(f"--limit must be positive, got {args.limit}")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    report = evaluate_members(
        args.members,
        args.data,
        data_dir=args.data_dir,
        criterion=args.criterion,
        split=args.split,
        batch_size=args.batch_size,
        limit=args.limit,
    )
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return 0


def format_report(report: dict) -> str:
    """The human-readable form of `evaluate_members`' result."""
    names = report["members"]
    width = max(len(str(Path(name))) for name in names)
    head = (
        f"{len(names)} member(s) on {report['dataset']} ({report['split']}, {report['n_examples']} examples)"
    )
    if report["task"] == "reconstruction":
        lines = [f"{head}: autoencoders", "  member MSE:"]
        lines += [f"    {name:<{width}}  {value:.6f}" for name, value in zip(names, report["member_mse"])]
        lines.append(
            "  cumulative MSE (mean of the first m members): "
            + " ".join(f"{v:.6f}" for v in report["cumulative_mse"])
        )
        lines.append(f"  ensemble MSE  {report['mse']:.6f}")
        return "\n".join(lines)
    lines = [
        f"{head}: classifiers, criterion {report['criterion']}",
        f"  accuracy          {report['accuracy']:.4f}",
        f"  best member       {report['best_member_accuracy']:.4f}",
        f"  ensemble effect   {report['ensemble_effect']:+.4f}",
        f"  oracle accuracy   {report['oracle_accuracy']:.4f}",
        f"  NLL               {report['nll']:.4f}",
        f"  ECE               {report['ece']:.4f}",
        f"  redundancy        {report['redundancy']:.4f}",
        "  member accuracies:",
    ]
    lines += [f"    {name:<{width}}  {acc:.4f}" for name, acc in zip(names, report["member_accuracies"])]
    if report["softmax_applied"]:
        lines.append(f"  (softmax applied to the scores of: {', '.join(report['softmax_applied'])})")
    return "\n".join(lines)
