"""`codec inspect model.onnx`: the model as codec sees it — layers, neurons, parameters, what cannot be
lifted."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

from codec.commands._common import emit, table


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show a model's layers, neurons and parameters as codec lifts them",
        description=(
            "Lift an ONNX model into codec's neuron-granular IR and list its layers (kind, neurons, "
            "activation, output shape, parameters). If the model cannot be lifted, list the graph's ops, "
            "mark the unsupported ones and exit with status 2."
        ),
    )
    parser.add_argument(
        "model", type=Path, help="an ONNX model file (external .onnx.data beside it is read too)"
    )
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON")
    parser.set_defaults(func=run)


def _op_census(path: Path) -> list[dict]:
    """Op types in the graph with counts, flagging those lift refuses; for models lift cannot take."""
    from codec.ir.lift import SUPPORTED_OPS, load_model

    counts = Counter(node.op_type for node in load_model(path).graph)
    return [{"op": op, "count": n, "supported": op in SUPPORTED_OPS} for op, n in sorted(counts.items())]


def run(args: argparse.Namespace) -> int:
    from codec.errors import LiftError
    from codec.ir import lift

    try:
        net = lift(args.model)
    except LiftError as exc:
        census = _op_census(args.model)
        payload = {"model": str(args.model), "lifted": False, "error": str(exc), "ops": census}
        human = table(
            [[c["op"], c["count"], "yes" if c["supported"] else "NO"] for c in census],
            ["op", "count", "supported"],
        )
        emit(args, payload, f"{args.model}: {exc}\n\n{human}")
        return 2
    rows = net.summary()
    payload = {
        "model": str(args.model),
        "lifted": True,
        "input": {"name": net.input_name, "shape": list(net.input_shape)},
        "output": {"name": net.output_name, "shape": list(net.output_shape)},
        "parameters": net.num_parameters,
        "neurons": sum(layer.num_neurons for layer in net.compute_layers()),
        "hidden_neurons": sum(layer.num_neurons for layer in net.hidden_layers()),
        "layers": rows,
    }
    dropped = net.metadata.get("codec.lift.dropped")
    if dropped:
        payload["dropped"] = dropped.splitlines()
    body = table(
        [
            [
                r["name"],
                r["kind"],
                r.get("neurons", ""),
                r.get("activation", ""),
                "x".join(map(str, r["output_shape"])),
                r.get("parameters", ""),
            ]
            for r in rows
        ],
        ["layer", "kind", "neurons", "activation", "output", "params"],
    )
    human = (
        f"{args.model}: input {net.input_name} {list(net.input_shape)} -> output {net.output_name} "
        f"{list(net.output_shape)}\n{len(net.compute_layers())} compute layers, "
        f"{payload['hidden_neurons']} hidden "
        f"neurons, {net.num_parameters:,} parameters\n"
        + "".join(f"{line}\n" for line in payload.get("dropped", []))
        + f"\n{body}"
    )
    emit(args, payload, human)
    return 0
