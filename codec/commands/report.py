"""`codec report bench/quick -o report.html`: a static, self-contained HTML page (inline SVG, no scripts)."""

from __future__ import annotations

import argparse
from pathlib import Path

from codec.commands._common import emit


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report",
        help=(
            "render benchmark results or runs as one self-contained HTML page (inline SVG plots, no scripts)"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Each input becomes a section of the page:\n"
            "  a `codec bench` output folder (bench.json) or one <recipe>.json: Table 1/2 analogues, memory\n"
            "    footprint, pass-time share, quality vs training time, CSN per layer, sweep, "
            "torchensemble and\n"
            "    TreeNet side by side, fused inference throughput;\n"
            "  a `codec compile` run directory: members, time per phase, memory, CSN per layer;\n"
            "  a `codec train-ensemble` run (report.json with an assignment table): the specialisation "
            "heatmap.\n"
            "The page needs no network and no JavaScript."
        ),
    )
    parser.add_argument(
        "inputs",
        nargs="+",
        type=Path,
        metavar="RUN_OR_BENCH_DIR",
        help="bench folder, compile run dir, or report.json",
    )
    parser.add_argument("-o", "--output", type=Path, required=True, help="the HTML file to write")
    parser.add_argument("--title", default=None, help="page title (default: codec benchmark report)")
    parser.add_argument("--json", action="store_true", help="print what was written as JSON")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from codec.commands._common import refuse_aliased_outputs
    from codec.pipelines.report import write_report

    refuse_aliased_outputs([args.output], args.inputs)
    out = write_report(args.inputs, args.output, args.title)
    size = out.stat().st_size
    emit(
        args,
        {"output": str(out), "bytes": size, "inputs": [str(p) for p in args.inputs]},
        f"wrote {out} ({size:,} bytes)",
    )
    return 0
