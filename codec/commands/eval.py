"""`codec eval`: score ONNX ensemble members, alone and combined, on a dataset with onnxruntime."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from codec.commands._common import add_data_arguments
from codec.errors import ConfigError, ShapeError

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
    from codec.runtime.evaluation.metrics import CRITERIA

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


def _static_dims(shape) -> list:
    """An onnxruntime shape without its batch dimension, symbolic dims as None."""
    return [d if isinstance(d, int) else None for d in list(shape)[1:]]


def _same_dims(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _describe(dims: list) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def evaluate_members(
    members: list[str],
    data: str,
    *,
    data_dir=None,
    criterion: str = "prod",
    split: str = "test",
    batch_size: int = 512,
    limit: int | None = None,
) -> dict:
    """Run each member on a dataset split and compute the ensemble's metrics.

    Returns:
        A JSON-serialisable dict: task, dataset, split, n_examples, members (paths) and the metrics
        (`evaluate_classifier`'s keys for classifiers; member_mse, cumulative_mse and mse for autoencoders).

    Raises:
        ModelLoadError: a member onnxruntime cannot load.
        ShapeError: members whose input or output shapes differ, or data that does not fit them.
    """
    import numpy as np

    from codec.runtime.data import load_dataset
    from codec.runtime.evaluation import metrics
    from codec.runtime.execution.session import create_session, predict

    sessions = [create_session(path) for path in members]
    first_in = _static_dims(sessions[0].get_inputs()[0].shape)
    first_out = _static_dims(sessions[0].get_outputs()[0].shape)
    for path, session in zip(members[1:], sessions[1:]):
        dims_in = _static_dims(session.get_inputs()[0].shape)
        dims_out = _static_dims(session.get_outputs()[0].shape)
        if not _same_dims(dims_in, first_in):
            raise ShapeError(
                f"member {path} takes inputs {_describe(dims_in)}"
                f" but {members[0]} takes {_describe(first_in)}"
            )
        if not _same_dims(dims_out, first_out):
            raise ShapeError(
                f"member {path} outputs {_describe(dims_out)} but {members[0]} outputs {_describe(first_out)}"
            )

    dataset = load_dataset(data, data_dir=data_dir)
    x = dataset.x_test if split == "test" else dataset.x_train
    y = dataset.y_test if split == "test" else dataset.y_train
    if limit is not None:
        x, y = x[:limit], y[:limit]

    outputs = []
    for path, session in zip(members, sessions):
        out = predict(session, x, batch_size=batch_size)
        if outputs and out.shape != outputs[0].shape:
            raise ShapeError(
                f"member {path} outputs {out.shape[1:]} per example but {members[0]} outputs "
                f"{outputs[0].shape[1:]}"
            )
        outputs.append(out)
    stack = np.stack(outputs).astype(np.float64)  # (M, N, ...)

    report = {"dataset": dataset.name, "split": split, "n_examples": len(x), "members": list(members)}
    flat_inputs = int(np.prod(x.shape[1:]))
    if stack.ndim == 3 and stack.shape[2] == flat_inputs and flat_inputs != dataset.num_classes:
        target = x.reshape(len(x), -1)
        member_mse = [metrics.mse(recon, target) for recon in stack]
        cumulative = metrics.cumulative_mse(stack, target)
        report.update(
            task="reconstruction",
            member_mse=member_mse,
            cumulative_mse=[float(v) for v in cumulative],
            mse=float(cumulative[-1]),
        )
        return report

    if stack.ndim != 3 or stack.shape[2] != dataset.num_classes:
        raise ShapeError(
            f"the members output {tuple(stack.shape[2:])} values per example, which is neither one per class "
            f"({dataset.num_classes} for {dataset.name})"
            f" nor a reconstruction of the {flat_inputs} input values"
        )
    softmaxed = []
    for index, path in enumerate(members):
        member = stack[index]
        if np.any(member < 0) or not np.allclose(member.sum(axis=1), 1.0, atol=1e-3):
            # Scores (logits) rather than probabilities: the criteria combine probabilities.
            shifted = np.exp(member - member.max(axis=1, keepdims=True))
            stack[index] = shifted / shifted.sum(axis=1, keepdims=True)
            softmaxed.append(path)
    report["task"] = "classification"
    report.update(metrics.evaluate_classifier(stack, y, criterion))
    report["softmax_applied"] = softmaxed
    return report


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
