"""`codec compile --recipe classifier_s --members 4 -o runs/demo`: the CODE pipeline end to end."""

from __future__ import annotations

import argparse
from pathlib import Path

from codec.commands._common import (
    DATA_HELP,
    add_data_dir_argument,
    add_normalize_argument,
    add_subset_arguments,
    emit,
    finite_positive_float,
    fraction,
    non_negative_int,
    positive_int,
    small_overrides,
    table,
)
from codec.ir.criteria import CRITERIA


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compile",
        help=(
            "train main and peer, run the passes, grow the other members around the CSN, emit the fused "
            "ensemble"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "The whole CODE pipeline in one command:\n"
            "  1. train main and peer conventionally (early stopping), or take the given --main/--peer\n"
            "  2. passes (default dna,dne,nda,csne) on calibration inputs from the training set\n"
            "  3. grow members 3..N: the CSN frozen and shared, fresh neurons trained\n"
            "  4. emit ensemble.onnx: input dispatched, CSN computed once, members, collect\n"
            "  5. evaluate members and the ensemble on the test set; write report.json\n\n"
            "Main and peer come from one of:\n"
            "  --recipe NAME            a zoo architecture with its training settings (codec train "
            "--list-recipes)\n"
            "  --model ARCH.onnx        your architecture (lifted, trained through the torch backend; "
            "main starts\n"
            "                           from its weights, or afresh with --init random; peer always afresh)\n"
            "  --main A.onnx --peer B.onnx  two members you already trained (no training: straight to "
            "the passes)\n"
            "--model and --main/--peer need --data. The loss follows the output: a softmax output "
            "trains with\n"
            "cross-entropy; logits (no activation, one output per class) get a softmax appended, with "
            "a note\n"
            "(the rule codec eval applies to logits); an output as wide as the input is an autoencoder "
            "(MSE).\n"
            "--loss overrides. All of this, and the data against the model, is checked before training.\n\n"
            "-o is the run directory (ensemble.onnx goes inside it), or a path ending in .onnx for the\n"
            "ensemble itself, with the run directory beside it (<name>.run/). Interrupted? Run the same\n"
            "command with --resume: finished members are never trained again."
        ),
    )
    source = parser.add_argument_group("where main and peer come from (exactly one)")
    source.add_argument("--recipe", default=None, help="a recipe name (codec train --list-recipes)")
    source.add_argument(
        "--model", default=None, metavar="ARCH.onnx", help="your architecture as an ONNX file"
    )
    source.add_argument(
        "--main", default=None, metavar="A.onnx", help="your trained main member (with --peer)"
    )
    source.add_argument(
        "--peer", default=None, metavar="B.onnx", help="your trained peer member (with --main)"
    )
    parser.add_argument(
        "--init",
        choices=("onnx", "random"),
        default="onnx",
        help="--model: main starts from the file's weights (onnx, default) or afresh (random)",
    )
    parser.add_argument(
        "--data",
        default=None,
        help=f"{DATA_HELP} (default the recipe's dataset; required with --model and --main/--peer)",
    )
    add_data_dir_argument(parser)
    add_normalize_argument(parser)
    parser.add_argument(
        "--members", type=positive_int, default=4, help="ensemble size N, at least 2 (default 4)"
    )
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="run directory, or ensemble .onnx path"
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="main gets SEED, peer SEED+1, grown member i SEED+1+i (default 0)",
    )
    parser.add_argument(
        "--passes", default="dna,dne,nda,csne", help="pass pipeline (see codec opt --list-passes)"
    )
    parser.add_argument(
        "--plugin",
        type=Path,
        action="append",
        default=[],
        metavar="FILE.py",
        help="a Python file defining passes with @register_pass, for --passes (repeatable; also on --resume)",
    )
    parser.add_argument(
        "--calibration",
        type=positive_int,
        default=10_000,
        help="training inputs profiled by the passes (default 10000)",
    )
    parser.add_argument(
        "--grow-init",
        choices=("random", "main"),
        default="random",
        help="grown members' fresh neurons: random init or main's weights (default random)",
    )
    parser.add_argument(
        "--grow-lr-scale",
        type=finite_positive_float,
        default=1.0,
        help="learning-rate multiplier for grown members (default 1)",
    )
    parser.add_argument(
        "--cache",
        choices=("auto", "on", "off"),
        default="auto",
        help="cache CSN activations while growing (default auto)",
    )
    parser.add_argument(
        "--keep-main",
        choices=("rewritten", "whole"),
        default="rewritten",
        help="main in the ensemble: sharing the CSN (rewritten) or as trained (whole)",
    )
    parser.add_argument(
        "--criterion",
        choices=CRITERIA,
        default=None,
        help="collect criterion (default prod for classifiers, mean for autoencoders)",
    )
    parser.add_argument(
        "--member-outputs",
        action="store_true",
        help="the fused graph also outputs each member's own output (member_0, member_1, ... in the order "
        "of report.json's outputs), e.g. to report member disagreement",
    )
    parser.add_argument(
        "--loss",
        choices=("ce", "mse"),
        default=None,
        help=(
            "ce (cross-entropy on labels) or mse (reconstruct the input); default: from the output layer, "
            "or the recipe's"
        ),
    )
    parser.add_argument(
        "--optimizer",
        choices=("adam", "sgd"),
        default=None,
        help="optimizer (default: the recipe's; adam for --model)",
    )
    parser.add_argument(
        "--epochs",
        type=positive_int,
        default=None,
        help="max epochs per member (default: the recipe's; 20 for --model)",
    )
    parser.add_argument(
        "--lr",
        type=finite_positive_float,
        default=None,
        help="learning rate (default: the recipe's; 1e-3 for --model)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=None,
        help="batch size (default: the recipe's; 128 for --model)",
    )
    parser.add_argument(
        "--patience",
        type=positive_int,
        default=None,
        help="early-stopping patience in epochs (default: the recipe's; 5 for --model)",
    )
    parser.add_argument(
        "--val-fraction",
        type=fraction,
        default=None,
        help="share of the training split held out for early stopping when the data has no x_val "
        "(default: the recipe's; 0.1 for --model)",
    )
    add_subset_arguments(parser)
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads while training (default: torch's)"
    )
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default=None,
        help="training device (default auto: CUDA when available)",
    )
    parser.add_argument(
        "--nproc",
        type=positive_int,
        default=1,
        help="processes to train members in parallel (launches torchrun; default 1)",
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue an interrupted run in the same directory"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    from codec.passes.registry import load_plugin_file
    from codec.pipelines.compile import CompileOptions, compile_ensemble
    from codec.runtime.training import distributed
    from codec.runtime.training.grow import GrowOptions

    for path in args.plugin:  # before launching workers: a bad plugin fails here, once (workers reload it)
        load_plugin_file(path)
    if args.nproc != 1 and "WORLD_SIZE" not in os.environ:
        return distributed.launch(args.nproc, distributed.strip_nproc(args.argv))

    overrides = {
        "max_epochs": args.epochs,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "patience": args.patience,
        "optimizer": args.optimizer,
        "val_fraction": args.val_fraction,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "num_threads": args.threads,
        "device": args.device,
    }
    options = CompileOptions(
        recipe=args.recipe,
        members=args.members,
        seed=args.seed,
        passes=args.passes,
        calibration=args.calibration,
        grow=GrowOptions(init=args.grow_init, lr_scale=args.grow_lr_scale, cache=args.cache),
        keep_main=args.keep_main,
        criterion=args.criterion,
        train_overrides={k: v for k, v in small_overrides(overrides, "compile").items() if v is not None},
        data_dir=args.data_dir,
        data=args.data,
        model=args.model,
        main=args.main,
        peer=args.peer,
        init=args.init,
        loss=args.loss,
        normalize=args.normalize,
    )
    out = args.output
    if out.suffix == ".onnx":
        run_dir, ensemble = out.with_suffix(".run"), out
    else:
        run_dir, ensemble = out, None
    report = compile_ensemble(
        options,
        run_dir,
        resume=args.resume,
        quiet=args.quiet,
        ensemble_path=ensemble,
        member_outputs=args.member_outputs,
    )
    if report:  # ranks other than 0 have nothing to print
        emit(args, report, summary(report, run_dir))
    return 0


def summary(report: dict, run_dir: Path) -> str:
    q = report["quality"]
    t = report["time"]
    metric = "accuracy" if report["task"] == "classification" else "mse"
    rows = [[name, f"{value:.4f}"] for name, value in q["members"].items()]
    ensemble_value = q["accuracy"] if metric == "accuracy" else q["mse"]
    rows.append([f"ensemble ({report['criterion']})", f"{ensemble_value:.4f}"])
    source = report["recipe"] and f"recipe {report['recipe']}" or report["model"] or "given main and peer"
    text = f"{source} on {report['dataset']}; loss {report['loss']['name']} ({report['loss']['why']})\n\n"
    text += table(rows, ["member", f"test {metric}"])
    csn = report["csn"]
    text += (
        f"\n\nCSN: {csn['total']} neurons "
        f"({', '.join(f'{k} {v}' for k, v in csn['per_layer'].items())}), {csn['parameters']:,} "
        "parameters"
        f"\nmemory footprint M = {report['memory_footprint_M']:.3f} of {report['members']} "
        "conventional members "
        f"({report['parameters']['fused_graph_stored']:,} parameters stored)"
        f"\ntime: main {t['train_main']:.1f}s, peer {t['train_peer']:.1f}s, passes {t['passes']:.2f}s, "
        f"grow {sum(t['grow']):.1f}s ({len(t['grow'])} members)"
        f"\nwrote {report['ensemble']} and {run_dir}/report.json"
    )
    return text
