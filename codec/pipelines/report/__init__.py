"""`codec report`: one static, self-contained HTML page from benchmark results or runs.

Inputs (any number, each rendered as its own section):
- a `codec bench` output folder (``bench.json`` and one ``<recipe>.json`` per recipe), or one recipe file;
- a `codec compile` run directory (its ``report.json``; ``opt/report.json`` adds layer widths);
- a `codec train-ensemble` run (its ``report.json`` with an ``assignment`` table: the MCL/TreeNet
  specialisation heatmap).

The page has no scripts, no external style sheets, fonts or images: every plot is inline SVG drawn here from
the numbers, so the file can be archived, mailed or opened offline and shows exactly what the JSON holds.

`svg` draws (plots, heatmaps, number formats); `sections` reads the inputs and writes each section.
"""

from __future__ import annotations

from codec.pipelines.report.sections import (
    Source,
    bench_section,
    compile_section,
    ensemble_section,
    load_source,
    render,
    write_report,
)
from codec.pipelines.report.svg import (
    Series,
    assignment_svg,
    bar_chart,
    figure,
    heatmap,
    line_plot,
    nice_ticks,
)

__all__ = [
    "Series",
    "Source",
    "assignment_svg",
    "bar_chart",
    "bench_section",
    "compile_section",
    "ensemble_section",
    "figure",
    "heatmap",
    "line_plot",
    "load_source",
    "nice_ticks",
    "render",
    "write_report",
]
