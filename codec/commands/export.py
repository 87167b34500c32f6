"""`codec export ensemble.onnx -o deploy.onnx`: check a fused ensemble and write the deployable model + card.

The checks and the writing are `codec.pipelines.export.export_ensemble`; this module is its flags and its
summary line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from codec.commands._common import (
    add_data_arguments,
    emit,
    finite_non_negative_float,
    non_negative_int,
    positive_int,
)
from codec.ir.criteria import CRITERIA
from codec.pipelines.export import DEFAULT_ATOL, DEFAULT_SAMPLES, ExportOptions, ParityError  # noqa: F401


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help=(
            "check a fused ensemble (ONNX checker, shapes, parity with its members) and write a deployable "
            "model"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "The deployment step: load ENSEMBLE safely, run the full ONNX checker and strict shape "
            "inference,\n"
            "check parity (the fused model vs. its members run one by one and combined by the ensemble's\n"
            "criterion, with runtime.metrics.combine), then write the deployable model and a model card.\n\n"
            "Members: --members, else the ensemble's codec.members metadata (paths relative to it), "
            "else the\n"
            "member_i outputs of the fused graph (checks only the collect stage). The members of a "
            "`codec compile`\n"
            "run are the files its graph computes: opt/main.onnx and opt/peer.onnx (as the passes left "
            "them)\n"
            "and members/grown_<i>.onnx (members/main.onnx with --keep-main whole); its ensemble.onnx "
            "names them.\n"
            "Parity fails (exit status 2, nothing written) when the largest absolute error exceeds "
            "--atol.\n\n"
            "Example:\n"
            "  codec export out/ensemble.onnx -o deploy/model.onnx --data mnist_small --limit 512"
        ),
    )
    parser.add_argument("ensemble", type=Path, help="the fused ensemble (ONNX, from codec's ensembler)")
    parser.add_argument(
        "-o", "--output", type=Path, required=True, help="where to write the deployable model (.onnx)"
    )
    parser.add_argument(
        "--members",
        type=Path,
        nargs="+",
        default=None,
        metavar="MEMBER",
        help="the member models, in the ensemble's member order (default: its codec.members metadata)",
    )
    parser.add_argument(
        "--criterion",
        choices=CRITERIA,
        default=None,
        help="how members are combined (default: the ensemble's codec.ensemble metadata)",
    )
    # parity inputs: a dataset split, or without --data seeded noise
    add_data_arguments(parser, default=None, limit=512, default_text="seeded uniform noise, see --samples")
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=DEFAULT_SAMPLES,
        metavar="N",
        help=f"random parity inputs when no --data is given (default {DEFAULT_SAMPLES})",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=0, help="seed of the random parity inputs (default 0)"
    )
    parser.add_argument(
        "--atol",
        type=finite_non_negative_float,
        default=DEFAULT_ATOL,
        help=f"largest parity error accepted (default {DEFAULT_ATOL:g})",
    )
    parser.add_argument(
        "--batch-size", type=positive_int, default=256, help="inference batch size (default 256)"
    )
    parser.add_argument(
        "--external-data", action="store_true", help="write tensors to <output>.data beside the model"
    )
    parser.add_argument(
        "--card",
        type=Path,
        default=None,
        help="where to write the model card (default <output stem>.card.json)",
    )
    parser.add_argument("--json", action="store_true", help="print the model card as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from codec.pipelines.export import export_ensemble

    options = ExportOptions(**{f: getattr(args, f) for f in ExportOptions.__dataclass_fields__})
    card = export_ensemble(options)
    parity, data, data_file = card["parity"], card["parity"]["data"], card["external_data"]
    human = (
        f"{args.ensemble} -> {args.output}{f' (+ {data_file})' if data_file else ''}: "
        f"{card['file_size_bytes']} bytes\n"
        f"parity: max abs error {parity['max_abs_error']:.3g} <= {args.atol:g} on {data['examples']} inputs "
        f"({data['source']}) against {parity['reference']}, criterion {parity['criterion']}\n"
        f"card: {card['card']}"
    )
    emit(args, card, human)
    return 0
