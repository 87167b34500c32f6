"""Helpers shared by CLI commands: data options, reshaping data to a model's input, JSON/human output."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from codec.pipelines.data import fit_to_model  # noqa: F401  (the commands' import of it)

DATA_HELP = (
    "dataset: mnist, fashion_mnist, cifar10, cifar10_jpeg, mnist_small (bundled, no download), or your own: "
    "npz:PATH (arrays x, y for one split; or x_train, y_train with optional x_val, y_val, x_test, y_test), "
    "npy:DIR (the same arrays as DIR/<name>.npy) or folder:DIR (ImageFolder layout: DIR/<class>/*.png|jpg, "
    "or DIR/train/, DIR/val/, DIR/test/ of class folders); uint8 pixels are scaled to [0, 1]"
)


def add_data_arguments(
    parser: argparse.ArgumentParser,
    default: str | None = "mnist_small",
    split: bool = True,
    limit: bool = True,
    required: bool | None = None,
    default_text: str | None = None,
) -> None:
    """The data options: --data and --data-dir, and (for commands reading one split) --split, --limit.

    `required` defaults to "no default"; `default_text` describes a default computed later (compile's
    "the recipe's dataset").
    """
    default_text = default_text or default
    parser.add_argument(
        "--data",
        default=default,
        required=default is None if required is None else required,
        help=DATA_HELP + (f"; default {default_text}" if default_text else ""),
    )
    parser.add_argument(
        "--data-dir", default=None, help="where dataset files live or are downloaded to (default $CODEC_DATA_DIR or ~/.cache/codec/data)"
    )
    if split:
        parser.add_argument("--split", choices=("train", "test"), default="test", help="which split to use (default test)")
    if limit:
        parser.add_argument("--limit", type=int, default=None, metavar="N", help="use only the first N examples of the split")


def add_normalize_argument(parser: argparse.ArgumentParser) -> None:
    """--normalize: per-channel mean/std standardisation of the inputs, recorded in the run and the model."""
    parser.add_argument(
        "--normalize",
        default=None,
        metavar="MODE",
        help="input normalisation per channel (axis 1): none (default: inputs as loaded, pixels in [0, 1]), "
        "mean-std (mean and std of the training split), or MEAN/STD values, e.g. 0.1307/0.3081 or "
        "0.49,0.48,0.45/0.25,0.24,0.26; recorded in report.json and the ensemble's metadata",
    )


def add_training_arguments(parser: argparse.ArgumentParser, *, lr_help: str = "learning rate",
                           seed_help: str | None = None):
    """The "training options" group shared by `codec train` and `codec train-ensemble` (the recipe's
    values are the defaults); `seed_help` adds --seed to the group. `training_overrides` reads them back."""
    group = parser.add_argument_group("training options (default: the recipe's)")
    group.add_argument("--epochs", type=int, help="maximum number of epochs")
    group.add_argument("--lr", type=float, help=lr_help)
    group.add_argument("--batch-size", type=int, help="training batch size")
    group.add_argument("--patience", type=int, help="epochs without validation improvement before stopping")
    group.add_argument("--n-train", type=int, help="train on a subset of this many examples")
    group.add_argument("--n-test", type=int, help="score on a subset of this many test examples")
    if seed_help is not None:
        group.add_argument("--seed", type=int, default=0, help=seed_help)
    group.add_argument("--device", help="auto (CUDA when available, else CPU), cpu or cuda (default auto)")
    group.add_argument("--threads", type=int, help="torch CPU threads while training (default: torch's)")
    return group


def training_overrides(args) -> dict:
    """The TrainConfig fields the training options set (None: keep the recipe's)."""
    return {
        "max_epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "patience": args.patience,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "device": args.device,
        "num_threads": args.threads,
        "verbose": bool(getattr(args, "verbose", False)),
    }


def load_split(args) -> tuple[np.ndarray, np.ndarray, object]:
    """(x, y, dataset) for the split the command-line arguments name."""
    from codec.pipelines.data import load_split as load

    return load(args.data, data_dir=args.data_dir, split=getattr(args, "split", "test"), limit=args.limit)


def emit(args, payload: dict, human: str) -> None:
    """Print `payload` as JSON with --json, else the human-readable text."""
    if getattr(args, "json", False):
        json.dump(payload, sys.stdout, indent=2, default=_default)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(human.rstrip("\n") + "\n")


def _default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def table(rows: list[list], header: list[str]) -> str:
    """A plain aligned text table."""
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
