"""`codec profile model.onnx --data ...`: per-layer firing rates and dead neurons on calibration data."""

from __future__ import annotations

import argparse
from pathlib import Path

from codec.commands._common import add_data_arguments, emit, fit_to_model, load_split, positive_int, table


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="profile a model's hidden activations on calibration data (firing rates, dead neurons)",
        description=(
            "Run the model with onnxruntime over a calibration set in batches, tapping every hidden layer, "
            "and report per layer the mean firing rate, neurons that never fire and neurons whose output is "
            "zero on every input (dead: removable without changing any output). Memory does not grow with "
            "the number of calibration inputs. Firing: ReLU/leaky ReLU/tanh > 0, sigmoid > 0.5; a conv "
            "channel fires on an input when it fires at any position."
        ),
    )
    parser.add_argument("model", type=Path, help="an ONNX model file")
    add_data_arguments(parser)
    parser.add_argument("--batch-size", type=positive_int, default=256, help="calibration batch size (default 256)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="also write the JSON report to this file")
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from codec.commands._common import data_path, refuse_aliased_outputs
    from codec.io import write_json_atomic
    from codec.ir import lift
    from codec.runtime.execution.profile import profile

    refuse_aliased_outputs([args.output], [args.model, data_path(args.data)])
    net = lift(args.model)
    x, _, dataset = load_split(args)
    x = fit_to_model(x, net.input_shape, what=f"{dataset.name} {getattr(args, 'split', 'test')}")
    stats = profile(net, x, batch_size=args.batch_size, progress=not args.quiet)
    payload = {"model": str(args.model), "data": dataset.name, "split": args.split, **stats.to_dict()}
    if args.output:
        write_json_atomic(args.output, payload)
    rows = [
        [l["name"], l["activation"], l["neurons"], f"{l['mean_fire_rate']:.3f}", l["never_fire"], l["always_zero"]]
        for l in payload["layers"]
    ]
    human = (
        f"{args.model} on {stats.count} {dataset.name} {args.split} inputs\n\n"
        + table(rows, ["layer", "activation", "neurons", "fire rate", "never fire", "dead (always 0)"])
    )
    emit(args, payload, human)
    return 0
