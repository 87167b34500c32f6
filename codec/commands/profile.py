"""`codec profile model.onnx --data ...`: per-layer firing rates and dead neurons on calibration data."""

from __future__ import annotations

import argparse
from pathlib import Path

from codec.commands._common import add_data_arguments, emit, fit_to_model, load_split, positive_int, table

OPT_DEFAULT_DNA = "dna{scope=intersect,criterion=zero}"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "profile",
        help="profile a model's hidden activations on calibration data (firing rates, dead neurons)",
        description=(
            "Run the model with onnxruntime over a calibration set in batches, tapping every hidden layer, "
            "and report per layer the mean firing rate, neurons that never fire and neurons whose output is "
            "zero on every input (dead: removable without changing any output). Memory does not grow with "
            "the number of calibration inputs. Firing: ReLU/leaky ReLU/tanh > 0, sigmoid > 0.5; a conv "
            "channel fires on an input when it fires at any position. The default `codec opt` pipeline "
            "removes a dead neuron only where it is dead at the same position in every member "
            f"({OPT_DEFAULT_DNA}): with --peer, the report counts those too."
        ),
    )
    parser.add_argument("model", type=Path, help="an ONNX model file")
    parser.add_argument(
        "--peer",
        type=Path,
        default=None,
        help="the peer member: also count the dead neurons the default codec opt removes from the pair",
    )
    add_data_arguments(parser)
    parser.add_argument(
        "--batch-size", type=positive_int, default=256, help="calibration batch size (default 256)"
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=None, help="also write the JSON report to this file"
    )
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
    peer = lift(args.peer, name="peer") if args.peer is not None else None
    x, _, dataset = load_split(args)
    x = fit_to_model(x, net.input_shape, model=args.model.name)
    stats = profile(net, x, batch_size=args.batch_size, progress=not args.quiet)
    peer_stats = None
    if peer is not None:
        peer_stats = profile(peer, x, batch_size=args.batch_size, progress=not args.quiet)
    payload = {"model": str(args.model), "data": dataset.name, "split": args.split, **stats.to_dict()}
    removed, note = opt_removes(net, stats, peer, peer_stats)
    payload["opt_default"] = {"dna": OPT_DEFAULT_DNA, "removes_per_layer": removed, "note": note}
    if peer_stats is not None:
        payload["peer"] = {"model": str(args.peer), **peer_stats.to_dict()}
    if args.output:
        write_json_atomic(args.output, payload)
    rows = [
        [l["name"], l["activation"], l["neurons"], f"{l['mean_fire_rate']:.3f}"]
        + [l["never_fire"], l["always_zero"], removed[l["name"]]]
        for l in payload["layers"]
    ]
    header = ["layer", "activation", "neurons", "fire rate", "never fire", "dead (always 0)", "opt removes"]
    title = f"{args.model} on {stats.count} {dataset.name} {args.split} inputs"
    human = f"{title}\n\n{table(rows, header)}\n\n{note}"
    emit(args, payload, human)
    return 0


def opt_removes(net, stats, peer=None, peer_stats=None) -> tuple[dict[str, int], str]:
    """Per hidden layer, how many of this model's neurons the default `codec opt` (dna, then dne) removes,
    and a sentence saying why."""
    from codec.passes.dna import removable

    masks = {"model": {name: s.always_zero for name, s in stats.layers.items()}}
    scope = "member"
    if peer is not None:
        difference = net.same_architecture(peer)
        if difference is None:
            masks["peer"] = {name: s.always_zero for name, s in peer_stats.layers.items()}
            scope = "intersect"
    dead = removable(masks, scope)["model"]
    # DNE keeps one neuron of a layer whose neurons are all dead (an empty layer cannot be lowered)
    removed = {name: int(min(mask.sum(), len(mask) - 1)) for name, mask in dead.items()}
    total_dead = sum(int(s.always_zero.sum()) for s in stats.layers.values())
    total = sum(removed.values())
    if peer is None:
        note = (
            f"codec opt's default {OPT_DEFAULT_DNA} removes a dead neuron only where it is dead at the same "
            f"position in every member: alone, this model loses all {total} it can (of {total_dead} dead); "
            "beside a peer usually far fewer (see --peer). dna{scope=member} removes each member's own."
        )
    elif scope == "member":
        note = (
            f"the peer has another architecture ({difference}): codec opt's default {OPT_DEFAULT_DNA} "
            f"refuses the pair; dna{{scope=member}} removes this model's own {total} dead neurons"
        )
    else:
        own = sum(min(int(s.always_zero.sum()), s.num_neurons - 1) for s in stats.layers.values())
        note = (
            f"codec opt's default {OPT_DEFAULT_DNA} removes {total} of this model's {total_dead} dead "
            f"neurons (those dead at the same position in the peer); dna{{scope=member}} removes {own}"
        )
    return removed, note
