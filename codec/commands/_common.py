"""Helpers shared by CLI commands: data options, reshaping data to a model's input, JSON/human output."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
from pathlib import Path

import numpy as np

from codec.pipelines.data import fit_to_model  # noqa: F401  (the commands' import of it)

# The data options, defined once: every command that reads a dataset shows them in these words (a test checks
# that `--help` agrees across commands); only the defaults differ, and each is printed after the words.
DATA_HELP = (
    "dataset: mnist_small (bundled, no download), mnist, fashion_mnist, cifar10, cifar10_jpeg, or your own: "
    "npz:PATH (arrays x, y for one split; or x_train, y_train with optional x_val, y_val, x_test, y_test), "
    "npy:DIR (the same arrays as DIR/<name>.npy) or folder:DIR (ImageFolder layout: DIR/<class>/*.png|jpg, "
    "or DIR/train/, DIR/val/, DIR/test/ of class folders)"
)
DATA_DIR_HELP = (
    "where dataset files live or are downloaded to (default $CODEC_DATA_DIR or ~/.cache/codec/data)"
)
SPLIT_HELP = "which split of the dataset to use"
LIMIT_HELP = "use only the first N examples of the split"
N_TRAIN_HELP = "train on a subset of this many training examples"
N_TEST_HELP = "score on a subset of this many test examples"
# --- option types: every numeric option of every command uses one of these ---------------------------------
# A flag that takes any int or float lets a typo switch a safety check off (`--verify-inputs -1` verified
# nothing, `--atol nan` accepted every difference). argparse turns the ArgumentTypeError into its usual
# one-line usage error, exit 2.


def _number(text: str, kind: type, what: str):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, sizes, epochs)."""
    value = _number(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (seeds, counts where 0 means none)."""
    value = _number(text, int, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def finite_positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, tolerances that must leave room)."""
    value = _number(text, float, "a finite number > 0")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def finite_non_negative_float(text: str) -> float:
    """A finite number >= 0 (absolute tolerances: 0 demands exact equality; NaN and inf are refused)."""
    value = _number(text, float, "a finite number >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _number(text, float, "a fraction in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}")
    return value


def data_path(spec: str | None) -> Path | None:
    """The file an `npz:PATH` data spec reads (for the output-aliasing check), else None."""
    return (
        Path(spec[len("npz:") :]).expanduser() if isinstance(spec, str) and spec.startswith("npz:") else None
    )


def refuse_aliased_outputs(outputs, inputs) -> None:
    """`codec.io.refuse_alias` with the CLI's error class (a ConfigError, exit 2)."""
    from codec.errors import ConfigError
    from codec.io import refuse_alias

    refuse_alias(outputs, inputs, ConfigError)


def add_data_arguments(
    parser: argparse.ArgumentParser,
    default: str | None = "mnist_small",
    split: str = "test",
    limit: int | None = None,
    default_text: str | None = None,
) -> None:
    """Add --data, --data-dir, --split and --limit, in the words every data-reading command shares.

    Args:
        parser: the subcommand's parser.
        default: the dataset used without --data.
        split: the split used without --split.
        limit: how many examples are used without --limit (None: all).
        default_text: how to describe a --data default that is not a dataset (e.g. export's noise).
    """
    parser.add_argument("--data", default=default, help=f"{DATA_HELP} (default {default_text or default})")
    add_data_dir_argument(parser)
    parser.add_argument(
        "--split", choices=("train", "test"), default=split, help=f"{SPLIT_HELP} (default {split})"
    )
    parser.add_argument(
        "--limit",
        type=positive_int,
        default=limit,
        metavar="N",
        help=f"{LIMIT_HELP} (default {limit or 'all'})",
    )


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


def add_data_dir_argument(parser) -> None:
    """Add --data-dir (commands whose dataset comes from a recipe take only this one)."""
    parser.add_argument("--data-dir", default=None, help=DATA_DIR_HELP)


def add_subset_arguments(parser) -> None:
    """Add --n-train and --n-test (commands that train on a recipe's dataset)."""
    parser.add_argument("--n-train", type=positive_int, default=None, metavar="N", help=N_TRAIN_HELP)
    parser.add_argument("--n-test", type=positive_int, default=None, metavar="N", help=N_TEST_HELP)


def data_options_epilog() -> str:
    """The data options as `codec --help` lists them: the same words as each subcommand's help."""
    rows = [
        ("--data", DATA_HELP),
        ("--data-dir", DATA_DIR_HELP),
        ("--split", SPLIT_HELP + " (train or test)"),
        ("--limit N", LIMIT_HELP),
        ("--n-train N", N_TRAIN_HELP),
        ("--n-test N", N_TEST_HELP),
    ]
    lines = [
        "data options (profile, eval, opt and export read --data; compile reads --data or its recipe's",
        "dataset; train, train-ensemble and bench read their recipe's dataset):",
    ]
    for flag, text in rows:
        lines += textwrap.wrap(text, 100, initial_indent=f"  {flag:<13}", subsequent_indent=" " * 15)
    return "\n".join(lines)


# CODEC_SMALL=1 makes the training commands (train, compile, train-ensemble) cap their work, so that the
# README's commands run exactly as printed in seconds (tests/test_readme.py, CI). A capped run says so on
# stderr, and the caps are in its recorded options like any --epochs/--n-train: its numbers cannot pass for a
# real run's.
SMALL_ENV = "CODEC_SMALL"
SMALL_CAPS = {"max_epochs": 1, "n_train": 600, "n_test": 300}


def small_overrides(overrides: dict, command: str) -> dict:
    """`overrides` (TrainConfig fields) capped by `SMALL_CAPS` when $CODEC_SMALL is set, else unchanged.

    A value the user gave that is already smaller is kept.
    """
    if os.environ.get(SMALL_ENV, "").strip() in ("", "0"):
        return overrides
    capped = dict(overrides)
    for key, cap in SMALL_CAPS.items():
        given = capped.get(key)
        capped[key] = cap if given is None else min(given, cap)
    print(
        f"codec {command}: {SMALL_ENV} is set: at most {capped['max_epochs']} epoch(s), "
        f"{capped['n_train']} training and {capped['n_test']} test examples (unset it for real results)",
        file=sys.stderr,
    )
    return capped


def add_training_arguments(
    parser: argparse.ArgumentParser, *, lr_help: str = "learning rate", seed_help: str | None = None
):
    """The "training options" group shared by `codec train` and `codec train-ensemble` (the recipe's
    values are the defaults); `seed_help` adds --seed to the group. `training_overrides` reads them back."""
    group = parser.add_argument_group("training options (default: the recipe's)")
    group.add_argument("--epochs", type=positive_int, help="maximum number of epochs")
    group.add_argument("--lr", type=finite_positive_float, help=lr_help)
    group.add_argument("--batch-size", type=positive_int, help="training batch size")
    group.add_argument(
        "--patience", type=positive_int, help="epochs without validation improvement before stopping"
    )
    add_subset_arguments(group)
    if seed_help is not None:
        group.add_argument("--seed", type=non_negative_int, default=0, help=seed_help)
    group.add_argument("--device", help="auto (CUDA when available, else CPU), cpu or cuda (default auto)")
    group.add_argument(
        "--threads", type=positive_int, help="torch CPU threads while training (default: torch's)"
    )
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
