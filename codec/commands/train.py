"""`codec train`: train one ensemble member from a named recipe and export it to ONNX."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from codec.commands._common import (
    add_data_dir_argument,
    add_training_arguments,
    non_negative_int,
    small_overrides,
    training_overrides,
)
from codec.errors import ConfigError

DESCRIPTION = """\
Train one member of a named recipe (architecture + dataset + training options) with torch and export it
as a single-file ONNX model whose output is class probabilities (classifiers) or reconstructions
(autoencoders). A checkpoint is written atomically at every epoch end (default <output>.ckpt); after an
interruption, run the same command with --resume to continue exactly where it stopped.

examples:
  codec train --recipe classifier_s --seed 0 -o main.onnx
  codec train --recipe classifier_s --seed 1 -o peer.onnx --epochs 5 --json
  codec train --list-recipes
"""


def register(subparsers) -> None:
    """Add the `train` parser."""
    parser = subparsers.add_parser(
        "train",
        help="train one ensemble member from a recipe and export it to ONNX",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", help="recipe name (see --list-recipes), e.g. classifier_s")
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="member seed: initialisation, shuffling, dropout (default 0)",
    )
    parser.add_argument("-o", "--output", help="the .onnx file to write")
    add_data_dir_argument(parser)
    add_training_arguments(parser)
    parser.add_argument("--checkpoint", help="checkpoint file (default: <output>.ckpt)")
    parser.add_argument("--no-checkpoint", action="store_true", help="do not write a checkpoint")
    parser.add_argument("--resume", action="store_true", help="continue from the checkpoint when it exists")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument(
        "--json", action="store_true", help="print the summary (with per-epoch history) as JSON"
    )
    parser.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Train and export; print a summary. Returns the exit code."""
    from codec.models import RECIPES

    if args.list_recipes:
        return _list_recipes(RECIPES, args.json)
    if not args.recipe:
        raise ConfigError("--recipe is required (see codec train --list-recipes)")
    if not args.output:
        raise ConfigError("-o/--output is required: the .onnx file to write")
    if args.no_checkpoint and (args.resume or args.checkpoint):
        raise ConfigError("--no-checkpoint cannot be combined with --resume or --checkpoint")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")

    from codec.pipelines.train import train_recipe

    output = Path(args.output)
    checkpoint = None if args.no_checkpoint else Path(args.checkpoint or f"{output}.ckpt")
    from codec.commands._common import refuse_aliased_outputs

    refuse_aliased_outputs([output, checkpoint], [])
    overrides = small_overrides(training_overrides(args), "train")
    summary = train_recipe(
        args.recipe,
        args.seed,
        out_path=output,
        data_dir=args.data_dir,
        overrides=overrides,
        checkpoint_path=checkpoint,
        resume=args.resume,
        quiet=args.quiet or args.json,
    )
    if args.json:
        json.dump(summary, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_summary(summary))
    return 0


def _list_recipes(recipes, as_json: bool) -> int:
    rows = [
        {"name": r.name, "arch": r.arch, "dataset": r.dataset, "task": r.task, "description": r.description}
        for r in recipes.values()
    ]
    if as_json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    width = max((len(row["name"]) for row in rows), default=4)
    for row in rows:
        print(
            f"{row['name']:<{width}}  {row['arch']} on {row['dataset']} ({row['task']}): {row['description']}"
        )
    return 0


def format_summary(summary: dict) -> str:
    """The human-readable summary of a `train_recipe` result."""
    stop = "stopped early" if summary["stopped_early"] else "ran to max epochs"
    metric = summary["metric"]
    headline = (
        f"trained {summary['recipe']} seed {summary['seed']} on {summary['dataset']} "
        f"({summary['n_train']} train / {summary['n_val']} val examples, {summary['device']}): "
        f"{summary['epochs_run']} epochs, best epoch {summary['best_epoch']} ({stop}), "
        f"{summary['train_seconds']:.1f} s"
    )
    lines = [headline]
    parts = []
    if summary["val_metric"] is not None:
        parts.append(f"val {metric} {summary['val_metric']:.4f}")
    parts.append(f"test {metric} {summary['test_metric']:.4f} ({summary['n_test']} examples)")
    lines.append("  " + ", ".join(parts))
    written = f"  wrote {summary['output']}"
    if summary["checkpoint"]:
        written += f" (checkpoint {summary['checkpoint']})"
    lines.append(written)
    return "\n".join(lines)
