"""`codec train-ensemble`: train M members together (TreeNets, bagging, MCL and other ensemble-aware losses,
after Lee et al., "Why M Heads are Better than One", 2015) and export them as one fused ONNX graph."""

from __future__ import annotations

import argparse
import json
import sys

from codec.commands._common import (
    add_data_dir_argument,
    add_training_arguments,
    finite_positive_float,
    fraction,
    non_negative_int,
    positive_int,
    small_overrides,
    training_overrides,
)
from codec.errors import ConfigError

DESCRIPTION = """\
Train an ensemble of M members of a recipe's network in one coupled pass with one optimizer, and export it
as one fused ONNX graph (a shared trunk is computed once).

Members differ by --variation: random (own initialisation per member), bagging (same initialisation, own
bootstrap sample) or both. --split makes a TreeNet: the modules up to and including the named one are a
trunk shared by all members, the rest is one branch per member. Module names come from the module type and
a per-type count (conv1, conv2, fc1, pool1, relu1, flatten1, dropout1, ...); --list-splits prints them for
a recipe. --split none (or 0) trains M independent networks, an integer n shares the first n modules,
--split all shares everything (the M heads are one network: the single-model end of the TreeNet range).

Losses (--loss): independent (sum of the members' cross-entropies), score_avg (cross-entropy of the mean
logits), prob_avg (NLL of the mean probabilities; for both, Lee et al. multiply SGD's learning rate by M:
--lr-scale-by-members; Adam's steps do not shrink with the gradient, so there it makes them M times larger), \
mcl (Multiple Choice Learning: each example trains only the --k members with the
lowest loss on it, ties broken at random; --alpha mixes in the independent loss, --pretrain-epochs trains
with the independent loss first).

Early stopping watches --monitor on the validation split: objective (the training loss, for MCL the sum of
the k lowest member losses), ensemble_nll or member_ce. A checkpoint is written at every epoch end; run
the same command with --resume to continue after an interruption.

Writes OUTPUT/ensemble.onnx (fused), OUTPUT/report.json (metrics: ensemble, oracle and member accuracy;
the assignment of test examples to the member with the lowest loss, per class; options; times),
OUTPUT/assignment.svg (that table as a heatmap),
OUTPUT/ensemble.ckpt, and with --export-members OUTPUT/members/member_<i>.onnx.

examples:
  codec train-ensemble --recipe cifar10_quick_j --members 4 --split conv1 --loss mcl --k 1 -o out/
  codec train-ensemble --recipe classifier_s --members 5 --variation bagging -o bagged/ --json
  codec train-ensemble --recipe cifar10_quick --list-splits
"""

# Per-example input shape and class count of the built-in datasets, so --list-splits and a bad --split
# are answered without loading any data.
_KNOWN_SHAPES = {
    "mnist": (1, 28, 28),
    "fashion_mnist": (1, 28, 28),
    "mnist_small": (1, 28, 28),
    "cifar10": (3, 32, 32),
    "cifar10_jpeg": (3, 32, 32),
}


def register(subparsers) -> None:
    """Add the `train-ensemble` parser."""
    parser = subparsers.add_parser(
        "train-ensemble",
        help="train M members together (TreeNet, bagging, MCL) and export one fused ONNX ensemble",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--recipe", help="recipe name (see codec train --list-recipes), e.g. cifar10_quick_j")
    parser.add_argument("-o", "--output", help="output folder")
    parser.add_argument(
        "--list-splits", action="store_true", help="print the recipe's module names (split points) and exit"
    )
    group = parser.add_argument_group("ensemble")
    group.add_argument("--members", type=positive_int, default=4, help="number of members M (default 4)")
    group.add_argument(
        "--split",
        default="none",
        help="TreeNet split: a module name (e.g. conv1), an integer n (share the first n modules), "
        "none (default) or all",
    )
    group.add_argument("--variation", default="random", help="random (default), bagging or both")
    group.add_argument(
        "--loss", default="independent", help="independent (default), score_avg, prob_avg or mcl"
    )
    group.add_argument(
        "--k", type=positive_int, default=1, help="MCL: members trained on each example (1..M, default 1)"
    )
    group.add_argument(
        "--alpha",
        type=fraction,
        default=0.0,
        help="MCL: weight of the independent cross-entropy mixed in, in [0, 1] (default 0)",
    )
    group.add_argument(
        "--pretrain-epochs",
        type=non_negative_int,
        default=0,
        help="epochs of independent cross-entropy before the loss takes over (default 0)",
    )
    group.add_argument("--lr-scale-by-members", action="store_true", help="multiply the learning rate by M")
    group.add_argument(
        "--accumulate",
        type=positive_int,
        default=1,
        help="sum the gradients of this many batches per optimizer step (default 1)",
    )
    group.add_argument(
        "--monitor",
        default="objective",
        help="validation loss for early stopping: objective (default), ensemble_nll or member_ce",
    )
    group.add_argument(
        "--criterion",
        default="mean",
        help="how the fused ONNX combines members: mean (default), prod, vote or max",
    )
    group.add_argument(
        "--width",
        type=finite_positive_float,
        default=1.0,
        help="width multiplier of the network (default 1.0)",
    )
    add_training_arguments(
        parser,
        lr_help="learning rate (before --lr-scale-by-members)",
        seed_help="seed of initialisation, bootstrap samples, shuffling, ties (default 0)",
    )
    add_data_dir_argument(parser)
    parser.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="processes for model-parallel training (launches torchrun; branches spread over ranks)",
    )
    parser.add_argument(
        "--trunk-exchange",
        choices=("broadcast", "replicate", "auto"),
        default="auto",
        help="with --nproc > 1: broadcast trunk activations (the paper's design) or replicate the "
        "trunk and all-reduce its gradients; auto moves less data (default auto)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from OUTPUT/ensemble.ckpt when it exists"
    )
    parser.add_argument(
        "--export-members",
        action="store_true",
        help="also write each member as OUTPUT/members/member_<i>.onnx",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw assignment.svg")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args) -> int:
    """Train, export, score; print a summary. Returns the exit code."""
    if not args.recipe:
        raise ConfigError("--recipe is required (see codec train --list-recipes)")
    from codec.models import get_recipe

    recipe = get_recipe(args.recipe)
    if args.list_splits:
        return _list_splits(recipe, args)
    if not args.output:
        raise ConfigError("-o/--output is required: the folder to write the ensemble and report to")
    if args.seed < 0:
        raise ConfigError(f"--seed must be >= 0, got {args.seed}")

    import os

    from codec.pipelines.train_ensemble import train_ensemble_recipe
    from codec.runtime.training import distributed
    from codec.runtime.training.coupled import EnsembleOptions

    if args.nproc != 1 and "WORLD_SIZE" not in os.environ:
        return distributed.launch(args.nproc, distributed.strip_nproc(args.argv))

    options = EnsembleOptions(
        members=args.members,
        loss=args.loss,
        k=args.k,
        alpha=args.alpha,
        pretrain_epochs=args.pretrain_epochs,
        lr_scale_by_members=args.lr_scale_by_members,
        accumulate=args.accumulate,
        variation=args.variation,
        split=args.split,
        monitor=args.monitor,
        criterion=args.criterion,
    )
    _check_split(recipe, args)  # a bad --split fails before any data is read
    overrides = small_overrides({"seed": args.seed, **training_overrides(args)}, "train-ensemble")
    report = train_ensemble_recipe(
        recipe.name,
        options,
        args.output,
        overrides=overrides,
        width=args.width,
        data_dir=args.data_dir,
        resume=args.resume,
        quiet=args.quiet or args.json,
        export_members=args.export_members,
        plot=not args.no_plot,
        trunk_exchange=args.trunk_exchange,
    )
    if not report:  # ranks other than 0 print nothing
        return 0
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_report(report))
    return 0


def _template(recipe, args):
    """The recipe's network (untrained) when its input shape is known without loading data, else None."""
    shape = _KNOWN_SHAPES.get(recipe.dataset)
    if shape is None:
        return None
    return recipe.build(shape, 10, width=args.width, seed=0)


def _check_split(recipe, args) -> None:
    from codec.runtime.training.coupled import resolve_split

    template = _template(recipe, args)
    if template is not None:
        resolve_split(template, args.split)


def _list_splits(recipe, args) -> int:
    from codec.runtime.training.coupled import module_names

    template = _template(recipe, args)
    if template is None:
        from codec.runtime.data import load_dataset

        dataset = load_dataset(recipe.dataset, data_dir=args.data_dir)
        template = recipe.build(dataset.input_shape, dataset.num_classes, width=args.width, seed=0)
    names = module_names(template)
    rows = [
        {"index": i + 1, "name": name, "module": repr(module)}
        for i, (name, module) in enumerate(zip(names, template))
    ]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    print(
        f"split points of {recipe.name} (--split NAME or --split N shares modules 1..N; none = 0, all "
        f"= {len(names)}):"
    )
    for row in rows:
        print(f"  {row['index']:>3}  {row['name']:<12} {row['module']}")
    return 0


def format_report(report: dict) -> str:
    """The human-readable summary of a `train_ensemble_recipe` report."""
    options, metrics, tree = report["options"], report["metrics"], report["treenet"]
    loss = options["loss"] + (
        f" k={options['k']} alpha={options['alpha']:g}" if options["loss"] == "mcl" else ""
    )
    shared = "everything" if tree["fully_shared"] else (", ".join(tree["trunk"]) or "nothing")
    lines = [
        (
            f"trained {options['members']} members of {report['recipe']} together on {report['dataset']} "
            f"({report['n_train']} train / {report['n_val']} val, {report['device']}): loss {loss}, "
            f"variation {options['variation']}, shared {shared}"
        ),
        (
            f"  {report['epochs_run']} epochs, best epoch {report['best_epoch']}"
            f"{' (stopped early)' if report['stopped_early'] else ''}, "
            f"{report['times']['train_seconds']:.1f} s"
            f"{' (heads stacked)' if report.get('heads_stacked') else ''}; "
            f"parameters stored {tree['parameters']['stored']} (unshared {tree['parameters']['unshared']})"
        ),
        (
            f"  test ({report['n_test']} examples): ensemble {metrics['criterion']} accuracy "
            f"{metrics['accuracy']:.4f}, oracle {metrics['oracle_accuracy']:.4f}, members "
            + " ".join(f"{a:.4f}" for a in metrics["member_accuracies"])
            + f" (mean {report['mean_member_accuracy']:.4f})"
        ),
        "  lowest-loss member per test example, by class (rows: members):",
    ]
    classes = report["assignment"]["classes"]
    width = max(4, *(len(c) for c in classes))
    lines.append("        " + " ".join(f"{c[:width]:>{width}}" for c in classes))
    for m, row in enumerate(report["assignment"]["table"]):
        lines.append(f"    m{m:<3} " + " ".join(f"{v:>{width}}" for v in row))
    files = report["files"]
    written = f"  wrote {files['ensemble']}, {files['report']}"
    if files["assignment_svg"]:
        written += f", {files['assignment_svg']}"
    if files["members"]:
        written += f" and {len(files['members'])} member models"
    lines.append(written)
    return "\n".join(lines)
