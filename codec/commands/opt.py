"""`codec opt --passes dna,dne,nda,csne main.onnx --peer peer.onnx --data ... -o out/`: run neuron passes."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from codec.commands._common import (
    add_data_arguments,
    emit,
    finite_non_negative_float,
    fit_to_model,
    load_split,
    non_negative_int,
    positive_int,
    table,
)

DEFAULT_PIPELINE = "dna,dne,nda,csne"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "opt",
        help="run neuron analyses and transformations (DNA, DNE, NDA, CSNE, plugins) over members",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Lift the members, profile them on calibration data, and run a pipeline of passes.\n\n"
            "  dna   Dead Neuron Analysis: neurons whose output is zero on every calibration input\n"
            "  dne   Dead Neuron Elimination: remove them (verified: outputs unchanged)\n"
            "  nda   Neuron Dependence Analysis: the NDG of connected neurons that fire together\n"
            "  csne  Common Sub-Network Extraction: main's neurons equivalent to peer's, as a frozen CSN\n\n"
            "Options go in braces: --passes 'dna,dne,nda{fire=0.7},csne{corr=0.85,fire=0.8}'.\n"
            "`codec opt --list-passes` shows every pass (plugins included) with its options.\n"
            "Your own passes: --plugin my_passes.py (passes decorated with @register_pass), or name a class\n"
            "directly: --passes 'dna,dne,my_package.passes:MyPass{threshold=0.3}'.\n\n"
            "Writes to OUT: main.onnx (rewritten), peer.onnx, csn.onnx (the CSN; each CSN layer an output),\n"
            "csn.json (matched neuron pairs), ndg_<member>.graphml (when nda ran), report.json."
        ),
    )
    parser.add_argument("main", type=Path, nargs="?", help="the main member (ONNX)")
    parser.add_argument("--peer", type=Path, default=None, help="the peer member (needed by csne)")
    parser.add_argument(
        "--member", type=Path, action="append", default=[], help="a further member (repeatable)"
    )
    parser.add_argument(
        "--passes",
        default=DEFAULT_PIPELINE,
        help=f"the pass pipeline (default {DEFAULT_PIPELINE}); a pass may be named by module.path:ClassName",
    )
    parser.add_argument(
        "--plugin",
        type=Path,
        action="append",
        default=[],
        metavar="FILE.py",
        help="a Python file defining passes with @register_pass, loaded before the pipeline (repeatable)",
    )
    add_data_arguments(parser, split="train")  # calibration data: the members' training split
    parser.add_argument(
        "--batch-size", type=positive_int, default=256, help="calibration batch size (default 256)"
    )
    parser.add_argument(
        "-o", "--output", type=Path, default=None, help="output folder (default: print the report only)"
    )
    parser.add_argument(
        "--no-verify", dest="verify", action="store_false", help="skip checking that DNE preserves outputs"
    )
    parser.add_argument(
        "--verify-inputs",
        type=non_negative_int,
        default=2048,
        help="calibration inputs verification runs on (default 2048; 0 = all)",
    )
    parser.add_argument(
        "--atol",
        type=finite_non_negative_float,
        default=1e-5,
        help="largest output change verification accepts (default 1e-5)",
    )
    parser.add_argument(
        "--print-ir-after-all", action="store_true", help="print every member's IR after each pass (stderr)"
    )
    parser.add_argument(
        "--list-passes", action="store_true", help="list every available pass with its options and exit"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.set_defaults(func=run)


def load_plugins(args) -> None:
    from codec.passes.registry import load_plugin_file

    for path in args.plugin:
        load_plugin_file(path)


def list_passes(args) -> int:
    from codec.passes.base import Analysis
    from codec.passes.options import format_value, option_types, type_name
    from codec.passes.registry import available_passes, get_pass

    entries = []
    for name, origin in available_passes().items():
        cls = get_pass(name)
        options = []
        for f, kind in zip(dataclasses.fields(cls), option_types(cls).values()):
            default = f.default
            if default is dataclasses.MISSING:
                default = "required" if f.default_factory is dataclasses.MISSING else f.default_factory()
            if not isinstance(default, (bool, int, float, str)):
                default = format_value(default)
            options.append({"name": f.name, "default": default, "type": type_name(kind)})
        doc = " ".join((cls.__doc__ or "").split())
        kind = "analysis" if issubclass(cls, Analysis) else "transform"
        entries.append({"name": name, "kind": kind, "origin": origin, "options": options, "doc": doc})
    lines = []
    for e in entries:
        opts = ", ".join(f"{o['name']}={o['default']} ({o['type']})" for o in e["options"]) or "no options"
        lines.append(f"{e['name']:<12} {e['kind']:<9} [{e['origin']}]\n    {e['doc']}\n    options: {opts}")
    emit(args, {"passes": entries}, "\n".join(lines))
    return 0


def run(args: argparse.Namespace) -> int:
    load_plugins(args)
    if args.list_passes:
        return list_passes(args)
    if args.main is None:
        from codec.errors import ConfigError

        raise ConfigError(
            "give the main member: codec opt [--passes ...] main.onnx --peer peer.onnx --data ..."
        )
    from codec.passes.registry import parse_pipeline
    from codec.pipelines.opt import lift_members, optimize

    passes = parse_pipeline(args.passes)  # bad pipelines fail before any model or data is read
    paths = {"main": args.main}
    if args.peer is not None:
        paths["peer"] = args.peer
    for i, path in enumerate(args.member, start=1):
        paths[f"member{i}"] = path
    from codec.commands._common import data_path, refuse_aliased_outputs

    refuse_aliased_outputs([args.output], [*paths.values(), data_path(args.data)])
    members = lift_members(paths)
    x, _, dataset = load_split(args)
    x = fit_to_model(x, members["main"].input_shape, model=args.main.name)

    def after_pass(p, mod, record):
        if not args.quiet:
            print(
                f"codec opt: {p.name} done in "
                f"{record['seconds']:.2f}s{' (modified)' if record['modified'] else ''}",
                file=sys.stderr,
            )
        if args.print_ir_after_all:
            print(f"// IR after {p.spec()}", file=sys.stderr)
            for net in mod.members.values():
                print(net.to_text(), file=sys.stderr)

    module, manager, report = optimize(
        members,
        passes,
        x,
        batch_size=args.batch_size,
        verify=args.verify,
        atol=args.atol,
        verify_inputs=args.verify_inputs or None,
        after_pass=after_pass,
    )
    report.update(
        members={name: str(path) for name, path in paths.items()},
        calibration={"data": dataset.name, "split": args.split, "inputs": len(x)},
    )
    if args.output is not None:
        from codec.pipelines.opt import write_outputs

        report["outputs"] = write_outputs(args.output, module, manager, report)
    emit(args, report, summary(report))
    return 0


def summary(report: dict) -> str:
    rows = []
    for r in report["passes"]:
        d = r.get("details", {})
        if r["pass"] == "dna":
            what = "dead: " + ", ".join(f"{m} {n}" for m, n in d.get("dead_total", {}).items())
        elif r["pass"] == "dne":
            what = "params: " + ", ".join(
                f"{m} {p['before']:,}->{p['after']:,}" for m, p in d.get("parameters", {}).items()
            )
            if "verified_max_abs_error" in r:
                what += f"; verified (max err {max(r['verified_max_abs_error'].values()):.1e})"
        elif r["pass"] == "nda":
            what = "NDG edges: " + ", ".join(f"{m} {g['edges']}" for m, g in d.items())
        elif r["pass"] == "csne":
            what = (
                f"CSN {d.get('csn_total', 0)} of {d.get('main_hidden_neurons', '?')} hidden neurons: "
                + ", ".join(f"{l} {n}" for l, n in d.get("csn_per_layer", {}).items())
            )
        else:
            what = ", ".join(f"{k}={v}" for k, v in d.items() if not isinstance(v, (dict, list)))[:80]
        rows.append([r["spec"], f"{r['seconds']:.2f}s", what])
    text = table(rows, ["pass", "time", "result"])
    text += f"\n\ntotal {report['seconds']:.2f}s on {report['calibration']['inputs']} calibration inputs"
    if "outputs" in report:
        text += f"; wrote {', '.join(Path(p).name for p in report['outputs'].values())}"
    return text
