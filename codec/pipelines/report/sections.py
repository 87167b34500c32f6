"""The report's sections: reading bench results and runs (`load_source`), and the HTML of each section."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from codec.errors import ConfigError, DataError
from codec.pipelines.report.svg import (
    COLORS,
    PALETTE,
    Series,
    bar_chart,
    esc,
    figure,
    heatmap,
    line_plot,
    num,
    pct,
)

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; color: #222; line-height: 1.4; padding: 0 1em; }
h1 { font-size: 1.7em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.6em 0 1em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; vertical-align: top; }
th { background: #f2f2f2; }
td.l, th.l { text-align: left; }
tr.paper td { background: #fff8e1; font-style: italic; }
tr.summary td { background: #eef5ff; font-weight: 600; }
.meta { color: #555; font-size: 0.88em; }
.meta code, p code { background: #f4f4f4; padding: 1px 4px; border-radius: 3px; }
.note { background: #f7f7f7; border-left: 4px solid #999; padding: 0.5em 0.8em; font-size: 0.92em; }
.better { color: #1a7f37; font-weight: 600; }
.worse { color: #b42318; font-weight: 600; }
.ns { color: #666; }
figure { display: inline-block; margin: 0.5em 1em 0.5em 0; vertical-align: top; }
figcaption { font-size: 0.85em; color: #444; max-width: 540px; }
svg text { font-family: system-ui, Helvetica, Arial, sans-serif; }
details { margin: 0.8em 0; }
"""


def quality(value, metric: str) -> str:
    """Accuracy as a percentage, MSE with 4 significant digits."""
    if value is None:
        return "–"
    return f"{100 * value:.2f} %" if metric == "accuracy" else f"{value:.4g}"


def quality_ci(q: dict | None, metric: str) -> str:
    if not q:
        return "–"
    low, high = q["ci95"]
    if metric == "accuracy":
        return f"{100 * q['value']:.2f} % [{100 * low:.2f}, {100 * high:.2f}]"
    return f"{q['value']:.4g} [{low:.4g}, {high:.4g}]"


def diff_cell(comparison: dict | None, metric: str) -> str:
    """A paired difference with its CI and verdict, coloured."""
    if not comparison:
        return "–"
    low, high = comparison["ci95"]
    scale, unit = (100, " pt") if metric == "accuracy" else (1, "")
    text = (
        f"{scale * comparison['diff']:+.2f}{unit} [{scale * low:+.2f}, {scale * high:+.2f}]"
        if metric == "accuracy"
        else f"{comparison['diff']:+.3g} [{low:+.3g}, {high:+.3g}]"
    )
    verdict = comparison.get("verdict", "")
    css = {"better": "better", "worse": "worse"}.get(verdict, "ns")
    extra = f", McNemar p = {comparison['mcnemar_p']:.3g}" if "mcnemar_p" in comparison else ""
    return f'{esc(text)}<br><span class="{css}">{esc(verdict)}</span><span class="ns">{esc(extra)}</span>'


def spread(summary: dict | None, fmt=pct) -> str:
    """median [min, max] (n) of a summary over seeds."""
    if not summary or summary.get("median") is None:
        missing = summary.get("missing") if summary else None
        return f"– ({missing} not reached)" if missing else "–"
    text = f"{fmt(summary['median'])} [{fmt(summary['min'])}, {fmt(summary['max'])}]"
    if summary.get("missing"):
        text += f", {summary['missing']} not reached"
    return text


def table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    left: int = 1,
    classes: Sequence[str] | None = None,
    raw: bool = True,
) -> str:
    """An HTML table; cells are HTML (already escaped) when `raw`, else escaped here. The first `left`
    columns are left-aligned."""
    out = [
        "<table>",
        "<tr>"
        + "".join(f'<th class="{"l" if i < left else ""}">{esc(h)}</th>' for i, h in enumerate(header))
        + "</tr>",
    ]
    for r, row in enumerate(rows):
        css = f' class="{classes[r]}"' if classes and classes[r] else ""
        cells = "".join(
            f'<td class="{"l" if i < left else ""}">{c if raw else esc(c)}</td>' for i, c in enumerate(row)
        )
        out.append(f"<tr{css}>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------


@dataclass
class Source:
    """One input: kind is "bench", "recipe", "compile" or "ensemble"."""

    kind: str
    path: Path
    data: dict
    recipes: list[dict] = field(default_factory=list)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from None
    except ValueError as exc:
        raise DataError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise DataError(f"{path} does not hold a JSON object")
    return data


def load_source(path: str | os.PathLike) -> Source:
    """Recognise what `path` is (bench folder or file, compile run, train-ensemble run) and read it."""
    from codec.pipelines.bench import INDEX_FILE, INDEX_KIND, RECIPE_KIND

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist")
    if path.is_dir():
        if (path / INDEX_FILE).is_file():
            path = path / INDEX_FILE
        elif (path / "report.json").is_file():
            path = path / "report.json"
        else:
            recipes = sorted(p for p in path.glob("*.json") if _read_json(p).get("kind") == RECIPE_KIND)
            if not recipes:
                raise DataError(f"{path} holds no bench.json, report.json or benchmark results")
            return Source(
                "bench", path, {"kind": INDEX_KIND, "recipes": {}}, [_read_json(p) for p in recipes]
            )
    data = _read_json(path)
    kind = data.get("kind")
    if kind == INDEX_KIND:
        recipes = []
        for name, file in data.get("recipes", {}).items():
            recipe_path = path.parent / file
            if not recipe_path.is_file():
                raise DataError(f"{path} lists {file} for {name}, which is missing")
            recipes.append(_read_json(recipe_path))
        return Source("bench", path, data, recipes)
    if kind == RECIPE_KIND:
        return Source(
            "bench",
            path,
            {"kind": INDEX_KIND, "command": data.get("command"), "machine": data.get("machine")},
            [data],
        )
    if "assignment" in data and "metrics" in data:
        return Source("ensemble", path, data)
    if "memory_footprint_M" in data and "time" in data:
        return Source("compile", path, data)
    raise DataError(f"{path} is not a codec bench result, compile run report or train-ensemble report")


# --------------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------------


def _meta(data: dict) -> str:
    parts = []
    if data.get("command"):
        parts.append(f"command: <code>{esc(data['command'])}</code>")
    machine = data.get("machine") or {}
    if machine:
        versions = machine.get("versions", {})
        desc = ", ".join(
            x
            for x in (
                machine.get("cpu"),
                f"{machine.get('cpus_available', machine.get('logical_cpus'))} CPUs available",
                f"{machine.get('threads')} thread(s) used" if machine.get("threads") else None,
                f"{machine.get('memory_gib')} GiB" if machine.get("memory_gib") else None,
                f"load {machine.get('load_average')}" if machine.get("load_average") else None,
            )
            if x
        )
        parts.append(f"machine: {esc(desc)}")
        parts.append("versions: " + esc(", ".join(f"{k} {v}" for k, v in versions.items())))
        if machine.get("git_commit"):
            parts.append(
                "codec commit "
                f"<code>{esc(machine['git_commit'][:12])}</code>"
                f"{' (uncommitted changes)' if machine.get('git_dirty') else ''}"
            )
    if data.get("wall_seconds") is not None:
        parts.append(f"wall time {data['wall_seconds']:.0f} s")
    return '<p class="meta">' + "<br>".join(parts) + "</p>" if parts else ""


def _headline_section(recipes: list[dict], paper: dict) -> str:
    rows, classes = [], []
    for r in recipes:
        s = r["summary"]
        rows.append(
            [
                esc(r["recipe"]),
                esc(r["dataset_label"]),
                esc(str(s["seeds"])),
                spread(s["n_baseline"], lambda v: f"{v:g}"),
                f"{s['reached']}/{s['seeds']}",
                spread(s["time_fraction"]),
                spread(s["work_fraction"]),
                spread(s["memory_footprint"]),
                spread(s["passes_fraction"], lambda v: pct(v, 2)),
                spread(
                    s["code_unbounded_diff"],
                    (lambda v: f"{100 * v:+.2f} pt")
                    if r["metric"] == "accuracy"
                    else (lambda v: f"{v:+.3g}"),
                ),
                esc(", ".join(s["code_unbounded_verdicts"])),
            ]
        )
        classes.append("")
    rows.append(
        [
            "CODE paper",
            "average over its benchmarks",
            "",
            "",
            "",
            esc(pct(paper["time_fraction"]["value"], 2)),
            "",
            esc(pct(paper["memory_footprint"]["value"], 2)),
            "&lt; 0.05 %",
            "",
            "",
        ]
    )
    classes.append("paper")
    header = [
        "recipe",
        "data",
        "seeds",
        "N baseline",
        "CODE reached baseline",
        "time to reach",
        "work to reach",
        "memory M",
        "passes / training",
        "CODE − baseline (test)",
        "paired verdict per seed",
    ]
    return (
        '<h2 id="headline">Headline</h2>'
        + table(header, rows, left=2, classes=classes)
        + '<p class="note">Cells are <b>median [min, max] over seeds</b>. <i>time/work to reach</i>: '
        "training time (work: FLOP "
        "estimate) CODE needs to reach the baseline's validation quality, as a fraction of the "
        "baseline's; seeds where CODE never "
        "reaches it are counted as not reached and left out of the median. <i>memory M</i>: parameters "
        "stored by the fused CODE "
        "ensemble over N<sub>baseline</sub> conventional members. <i>CODE − baseline</i>: test quality "
        "of CODE at the size best on "
        "validation minus the baseline's, paired on the same test examples; a difference whose 95 % "
        "bootstrap CI contains 0 is "
        '<span class="ns">not significant</span>.</p>'
    )


def _recipe_section(r: dict) -> str:
    metric = r["metric"]
    name = r["recipe"]
    out = [
        f'<h2 id="recipe-{esc(name)}">{esc(name)} — {esc(r["dataset_label"])}</h2>',
        (
            f'<p class="meta">{esc(r.get("recipe_description", ""))}<br>data: {r["data"]["train"]:,} train / '
            f"{r['data']['validation']:,} validation / {r['data']['test']:,} test; quality: test "
            f"{esc(metric)} "
            f"({'higher' if r['higher_is_better'] else 'lower'} is better), members combined by "
            f"{esc(r['criterion'])}; "
            f"seeds {esc(', '.join(map(str, r['seeds'])))}; max epochs "
            f"{r['train_config'].get('max_epochs')}, "
            f"{r['train_config'].get('num_threads') or 'default'} thread(s).</p>"
        ),
    ]
    out.append(_interpretation(r))
    out.append(_table1(r))
    out.append(_table2(r))
    out.append(_curve_plot(r))
    out.append(_memory_plot(r))
    out.append(_csn_plot(r))
    if r.get("sweep"):
        out.append(_sweep_section(r))
    if r.get("comparisons"):
        out.append(_comparison_section(r))
    if r.get("inference"):
        out.append(_inference_section(r["inference"]))
    if r.get("assignment"):
        a = r["assignment"]
        out.append(
            "<h3>Specialisation</h3>"
            + _assignment(a.get("table"), a.get("classes"), a.get("source", ""), a.get("rule", ""))
        )
    out.append(_raw_section(r))
    return "\n".join(x for x in out if x)


def _interpretation(r: dict) -> str:
    """Plain sentences stating what the numbers say, including where CODE does not win."""
    s = r["summary"]
    metric = r["metric"]
    sentences = []
    sentences.append(
        f"CODE reached the baseline's validation {metric} in <b>{s['reached']} of {s['seeds']}</b> seeds"
        + (
            f" (median time to reach: {pct(s['time_fraction']['median'])} of the baseline's, "
            f"work {pct(s['work_fraction']['median'])})"
            if s["time_fraction"]["median"] is not None
            else ""
        )
        + "."
    )
    verdicts = s["code_unbounded_verdicts"]
    counts = {v: verdicts.count(v) for v in sorted(set(verdicts))}
    sentences.append(
        "On the test set, CODE at its best size (chosen on validation) against the baseline: "
        + ", ".join(f"{n} seed(s) {esc(v)}" for v, n in counts.items())
        + "."
    )
    budget = s.get("code_at_budget_verdicts", [])
    if budget:
        bc = {v: budget.count(v) for v in sorted(set(budget))}
        sentences.append(
            "Within the baseline's training-time budget: "
            + ", ".join(f"{n} seed(s) {esc(v)}" for v, n in bc.items())
            + "."
        )
    trivial = sum(1 for x in r["per_seed"] if x["table1"]["n_baseline"] == 2)
    if trivial:
        sentences.append(
            f"In {trivial} seed(s) the baseline stopped at 2 members: there CODE's main and peer are "
            "the baseline's "
            "own two members, so reaching it is trivial and CODE can only add the passes' time."
        )
    fractions = [
        (x["table1"]["time_fraction"], x["table1"]["work_fraction"])
        for x in r["per_seed"]
        if x["table1"]["reached"]
    ]
    if fractions:
        sentences.append(
            "Per seed (time / work to reach): "
            + ", ".join(f"{pct(t)} / {pct(w)}" for t, w in fractions)
            + "; wall-clock fractions move with the machine's load, the work estimate does not."
        )
    if s["passes_fraction"]["median"] is not None:
        sentences.append(
            f"The passes took a median {pct(s['passes_fraction']['median'], 2)} of CODE's training time "
            f"(the paper reports &lt; 0.05 %)."
        )
    be, ge = s["baseline_member_epochs"]["median"], s["grown_member_epochs"]["median"]
    if be is not None and ge is not None:
        sentences.append(
            f"Median epochs per member: {be:g} for independent members, {ge:g} for grown members."
        )
    return '<p class="note">' + " ".join(sentences) + "</p>"


def _table1(r: dict) -> str:
    metric = r["metric"]
    rows = []
    for s in r["per_seed"]:
        t = s["table1"]
        code = t.get("code") or {}
        rows.append(
            [
                esc(s["seed"]),
                esc(t["n_baseline"]),
                num(t["baseline_seconds"], 2),
                esc(quality(t["baseline_val"], metric)),
                quality_ci(t["baseline_test"], metric),
                esc(t["n_code"] if t["reached"] else f"not within {len(s['code']['members'])}"),
                num(code.get("seconds"), 2) if code else "–",
                esc(pct(t["time_fraction"])),
                esc(pct(t["work_fraction"])),
                esc(pct(t["memory_footprint"])) + f' <span class="ns">(at {t["memory_footprint_at"]})</span>',
                esc(pct(s["code"]["passes_fraction"], 2)),
                esc(s["code"]["csn"]["total"]),
            ]
        )
    paper = r.get("paper", {})
    classes = [""] * len(rows)
    if paper:
        rows.append(
            [
                "paper",
                "",
                "",
                "",
                "",
                "",
                "",
                esc(pct(paper["time_fraction"]["value"], 2)),
                "",
                esc(pct(paper["memory_footprint"]["value"], 2)),
                "&lt; 0.05 %",
                "",
            ]
        )
        classes.append("paper")
    header = [
        "seed",
        "N baseline",
        "baseline s",
        f"baseline val {metric}",
        f"baseline test {metric} [95 % CI]",
        "N CODE",
        "CODE s to reach",
        "time fraction",
        "work fraction",
        "M",
        "passes / training",
        "CSN neurons",
    ]
    return (
        "<h3>Table 1 analogue: cost of reaching the baseline</h3>"
        + table(header, rows, classes=classes)
        + '<p class="meta">N baseline: the size of the best ensemble on validation, growing one member '
        "at a time, where a "
        "member counts only if it adds at least the threshold (growing stops after two members in a "
        "row that do not). "
        "N CODE: smallest CODE ensemble (main, peer, grown members) whose validation quality reaches "
        "the baseline's; "
        "when N baseline is 2, CODE's main and peer <i>are</i> the baseline, so CODE can only add the "
        "passes' time. "
        "Seconds are training wall-clock (passes included for CODE) on a shared machine; work is a "
        "FLOP estimate "
        "independent of machine load. M is measured on the fused graph (shared parameters once) over "
        "N<sub>baseline</sub> members.</p>"
    )


def _table2(r: dict) -> str:
    metric = r["metric"]
    rows = []
    for s in r["per_seed"]:
        t = s["table2"]
        b = t.get("at_budget")
        u = t["unbounded"]
        rows.append(
            [
                esc(s["seed"]),
                num(t["budget_seconds"], 2),
                quality_ci(t["baseline"], metric),
                esc(b["k"]) if b else "none fits",
                quality_ci(b["test"], metric) if b else "–",
                diff_cell(b["vs_baseline"], metric) if b else "–",
                esc(u["k"]),
                quality_ci(u["test"], metric),
                diff_cell(u["vs_baseline"], metric),
            ]
        )
    header = [
        "seed",
        "budget s",
        f"baseline test {metric}",
        "CODE size in budget",
        "CODE in budget",
        "CODE − baseline",
        "CODE best size (val)",
        "CODE unbounded",
        "CODE − baseline",
    ]
    return (
        "<h3>Table 2 analogue: quality at the baseline's time budget and unbounded</h3>"
        + table(header, rows)
        + '<p class="meta">Differences are paired on the same test examples: 95 % bootstrap CI over test '
        "examples, McNemar's "
        "exact test for classifiers. On 1,000 test examples one accuracy point is about two standard "
        "errors.</p>"
    )


def _curve_plot(r: dict) -> str:
    metric = r["metric"]
    series = []
    seeds = r["per_seed"]
    for i, s in enumerate(seeds):
        first = i == 0
        base = s["baseline"]["curve"]
        n = s["table1"]["n_baseline"]
        series.append(
            Series(
                f"baseline (seed {s['seed']})" if first else "",
                [(p["seconds"], p["test"]) for p in base],
                COLORS["baseline"],
                opacity=1.0 if first else 0.45,
                legend=first,
                labels=[f"{p['k']}" + ("*" if p["k"] == n else "") for p in base],
            )
        )
        code = [p for p in s["code"]["curve"] if p["k"] >= 2]
        series.append(
            Series(
                f"CODE (seed {s['seed']})" if first else "",
                [(p["seconds"], p["test"]) for p in code],
                COLORS["code"],
                dashed=True,
                opacity=1.0 if first else 0.45,
                legend=first,
                labels=[str(p["k"]) for p in code],
            )
        )
    for c in r.get("comparisons") or []:
        for key, label in (("torchensemble", "torchensemble"), ("treenet", "TreeNet")):
            entry = c.get(key) or {}
            test = (entry.get("criterion") or {}).get("test") if key == "torchensemble" else entry.get("test")
            if entry.get("available") and test:
                series.append(
                    Series(
                        f"{label} ×{c['members']} (seed {c['seed']})",
                        [(entry["train_seconds"], test["value"])],
                        COLORS[key],
                        labels=[str(c["members"])],
                    )
                )
    if len(seeds) > 1:
        series.append(Series("other seeds: faint", [], COLORS["grey"]))
    fmt = (lambda v: f"{100 * v:.1f}") if metric == "accuracy" else None
    svg = line_plot(
        series,
        title=f"{r['recipe']}: test {metric} vs cumulative training time",
        x_label="training seconds (cumulative)",
        y_label=f"test {metric}" + (" (%)" if metric == "accuracy" else ""),
        y_fmt=fmt,
    )
    return figure(
        svg,
        "Each point is an ensemble of the first k members (k written beside it; * marks "
        "N<sub>baseline</sub>). "
        "CODE starts at k = 2 (main and peer, then the passes); its main and peer are the baseline's "
        "first two members.",
    )


def _memory_plot(r: dict) -> str:
    categories, base, own, csn = [], [], [], []
    for s in r["per_seed"]:
        t = s["table1"]
        k = t["memory_footprint_at"]
        fused = s["code"]["parameters"]["fused_graph"]
        categories += [f"seed {s['seed']}: baseline ×{t['n_baseline']}", f"seed {s['seed']}: CODE ×{k}"]
        base += [t["n_baseline"] * s["code"]["parameters"]["conventional_member"], 0]
        own += [0, sum(fused["members"][:k])]
        csn += [0, fused["csn"] if any(fused["shared_layers"][:k]) else 0]
    svg = bar_chart(
        categories,
        [
            ("baseline: N × member", base, COLORS["baseline"]),
            ("CODE: members' own", own, COLORS["code"]),
            ("CODE: CSN (once)", csn, COLORS["csn"]),
        ],
        title=f"{r['recipe']}: parameters stored",
        y_label="parameters",
        stacked=True,
    )
    return figure(
        svg,
        "Parameters stored by the baseline ensemble (N<sub>baseline</sub> members) and by the fused "
        "CODE graph "
        "(at N CODE, or all its members when it never reached the baseline): each member's own neurons "
        "plus the CSN once.",
    )


def _csn_plot(r: dict) -> str:
    s = r["per_seed"][0]
    per_layer = s["code"]["csn"]["per_layer"]
    widths = s["code"].get("csn_layer_widths") or {}
    layers = list(per_layer)
    if not layers:
        return ""
    groups = [
        ("layer width (main after DNE)", [widths.get(name, 0) for name in layers], "#c6dbef"),
        ("CSN neurons", [per_layer[name] for name in layers], COLORS["csn"]),
    ]
    svg = bar_chart(
        [f"layer {name}" for name in layers],
        groups,
        title=f"{r['recipe']}: CSN size per layer (seed {s['seed']})",
        y_label="neurons",
    )
    others = "; ".join(
        f"seed {x['seed']}: " + ", ".join(str(v) for v in x["code"]["csn"]["per_layer"].values())
        for x in r["per_seed"]
    )
    return figure(
        svg,
        f"CSN neurons per hidden layer against the layer's width. All seeds (CSN per layer): {esc(others)}.",
    )


def _sweep_section(r: dict) -> str:
    metric = r["metric"]
    rows = []
    for row in r["sweep"]:
        p = row["point"]
        options = []
        if p["passes"] != "dna,dne,nda,csne":
            options.append(p["passes"])
        if p["grow_init"] != "random":
            options.append(f"grow init={p['grow_init']}")
        if p["grow_lr_scale"] != 1.0:
            options.append(f"lr x{p['grow_lr_scale']:g}")
        if p["keep_main"] != "rewritten":
            options.append(f"keep_main={p['keep_main']}")
        rows.append(
            [
                esc(p["name"]),
                esc("; ".join(options) or "defaults"),
                esc(row["seed"]),
                esc(row["csn"]["total"]),
                esc(", ".join(str(v) for v in row["csn"]["per_layer"].values())),
                quality_ci(row["test"], metric),
                diff_cell(row["vs_baseline"], metric),
                esc(pct(row["time_fraction"])),
                esc(pct(row["work_fraction"])),
                esc(pct(row["memory_footprint"])),
                esc(", ".join(map(str, row["grown_epochs"])))
                + f' <span class="ns">(indep.: {esc(", ".join(map(str, row["baseline_epochs"])))})</span>',
            ]
        )
    k = r["sweep"][0]["members"]
    header = [
        "point",
        "options",
        "seed",
        "CSN",
        "CSN per layer",
        f"test {metric} ({k} members)",
        f"− baseline ({k} members)",
        "time",
        "work",
        "M",
        "grown epochs",
    ]
    pts = [(row["time_fraction"], row["vs_baseline"]["diff"]) for row in r["sweep"]]
    scale = 100 if metric == "accuracy" else 1
    series = [
        Series(
            row["point"]["name"],
            [(row["time_fraction"], scale * row["vs_baseline"]["diff"])],
            PALETTE[i % len(PALETTE)],
        )
        for i, row in enumerate(r["sweep"])
    ]
    svg = (
        line_plot(
            series,
            title=f"sweep at {k} members: quality vs time",
            x_label="CODE time / baseline time (same size)",
            y_label="CODE − baseline" + (" (pt)" if metric == "accuracy" else ""),
            hlines=[(0.0, "baseline", COLORS["grey"])],
        )
        if pts
        else ""
    )
    return (
        "<h3>Sweep over CODE's open choices</h3>"
        + table(header, rows, left=2)
        + '<p class="meta">Each point is a compile with the same main and peer (the baseline\'s first '
        "two members) and the "
        "options shown, compared with the baseline ensemble of the same size on the same test "
        "examples. time/work: CODE's "
        "training (passes included) over the baseline's at that size.</p>"
        + figure(
            svg, "Up and to the left is better: higher quality than the baseline for less training time."
        )
    )


def _comparison_section(r: dict) -> str:
    metric = r["metric"]
    rows = []
    for c in r["comparisons"]:
        n = c["members"]
        b = c["baseline"]
        rows.append(
            [
                "baseline (independent, early stopping)",
                esc(n),
                num(b["train_seconds"], 2),
                esc(num(b["stored_parameters"])),
                quality_ci(b["test"], metric),
                "reference",
                esc(c["seed"]),
            ]
        )
        code = c["code"]
        rows.append(
            [
                "CODE (codec compile)",
                esc(code["members"]),
                num(code["train_seconds"], 2),
                esc(num(code["stored_parameters"])),
                quality_ci(code["test"], metric),
                diff_cell(code["vs_baseline"], metric),
                esc(c["seed"]),
            ]
        )
        te = c["torchensemble"]
        if te.get("available"):
            rows.append(
                [
                    f"torchensemble {esc(te.get('version', ''))} VotingClassifier ({esc(r['criterion'])})",
                    esc(n),
                    num(te["train_seconds"], 2),
                    esc(num(te["stored_parameters"])),
                    quality_ci(te["criterion"]["test"], metric),
                    diff_cell(te["criterion"]["vs_baseline"], metric),
                    esc(c["seed"]),
                ]
            )
            rows.append(
                [
                    "torchensemble, its own soft voting (mean)",
                    esc(n),
                    "",
                    "",
                    quality_ci(te["soft_voting"]["test"], metric),
                    diff_cell(te["soft_voting"]["vs_baseline"], metric),
                    esc(c["seed"]),
                ]
            )
        else:
            rows.append(["torchensemble", esc(n), "", "", esc(te.get("why", "not run")), "", esc(c["seed"])])
        tn = c["treenet"]
        if tn.get("available"):
            rows.append(
                [
                    f"TreeNet (trunk to {esc(tn['split'])}, {esc(tn['loss'])} loss)",
                    esc(n),
                    num(tn["train_seconds"], 2),
                    esc(num(tn["stored_parameters"])),
                    quality_ci(tn["test"], metric),
                    diff_cell(tn["vs_baseline"], metric),
                    esc(c["seed"]),
                ]
            )
        else:
            rows.append(["TreeNet", esc(n), "", "", esc(tn.get("why", "not run")), "", esc(c["seed"])])
    header = [
        "method",
        "members",
        "train s",
        "parameters stored",
        f"test {metric} [95 % CI]",
        "− baseline (paired)",
        "seed",
    ]
    return (
        "<h3>Side by side: torchensemble and a TreeNet</h3>"
        + table(header, rows)
        + '<p class="meta">Same data splits and architecture. torchensemble\'s members start from the '
        "baseline members' initial "
        "weights and train in its own loop (every epoch up to the cap, keeping the epoch best on "
        "validation, no checkpoints); "
        "the TreeNet shares its trunk and trains all branches jointly in one batched pass "
        "(codec.runtime.training.coupled). "
        "Training seconds come from different training loops on a shared machine: compare them with care.</p>"
    )


def _inference_section(inf: dict) -> str:
    rows = []
    for b in inf["batches"]:

        def rate(v):
            return f"{v:,.0f}"

        rows.append(
            [
                esc(b["batch"]),
                rate(b["fused_onnx"]["examples_per_second"]),
                rate(b["separate_onnx"]["examples_per_second"]),
                rate(b["torch_loop"]["examples_per_second"]),
                rate(b["bound_examples_per_second"]),
                esc(pct(b["fused_fraction_of_bound"])),
                num(b["max_abs_diff_fused_vs_separate"], 2),
            ]
        )
    header = [
        "batch",
        "fused ONNX (ex/s)",
        "members as separate sessions",
        "torch loop over members",
        "FLOP bound",
        "fused / bound",
        "max |fused − separate|",
    ]
    gemm = ", ".join(
        f"{g['m']}×{g['k']}×{g['n']}: numpy {g['numpy_gflops']:.1f}, torch {g['torch_gflops']:.1f}"
        for g in inf["gemm"]
    )
    cats = [f"batch {b['batch']}" for b in inf["batches"]]
    svg = bar_chart(
        cats,
        [
            ("fused ONNX", [b["fused_onnx"]["examples_per_second"] for b in inf["batches"]], COLORS["code"]),
            (
                "separate sessions",
                [b["separate_onnx"]["examples_per_second"] for b in inf["batches"]],
                COLORS["baseline"],
            ),
            (
                "torch loop",
                [b["torch_loop"]["examples_per_second"] for b in inf["batches"]],
                COLORS["torchensemble"],
            ),
            ("FLOP bound", [b["bound_examples_per_second"] for b in inf["batches"]], "#cccccc"),
        ],
        title="inference throughput",
        y_label="examples / s",
        log=True,
    )
    return (
        "<h3>Fused ensemble inference</h3>"
        + table(header, rows, left=0)
        + f'<p class="meta">{inf["members"]} members, {esc(inf["criterion"])} collect, '
        f"{inf.get('threads') or 'default'} thread(s). "
        f"FLOPs per example: {num(inf['flops_per_example_fused'])} fused (CSN once) vs "
        f"{num(inf['flops_per_example_separate'])} "
        f"as separate models. Bound = best measured float32 GEMM rate ({inf['gemm_best_gflops']:.1f} "
        f"GFLOP/s; {esc(gemm)}) / "
        "fused FLOPs per example.</p>" + figure(svg, "Throughput in examples per second (log scale).")
    )


def _assignment(values, classes, source: str, rule: str) -> str:
    if not values:
        return ""
    rows = [f"member {i}" for i in range(len(values))]
    svg = heatmap(
        values,
        rows,
        list(classes or [str(j) for j in range(len(values[0]))]),
        title=f"test examples won per class {source}",
    )
    return figure(
        svg, esc(f"Which member has the lowest loss on each test example, counted per class ({rule}).")
    )


def _raw_section(r: dict) -> str:
    rows = []
    for s in r["per_seed"]:
        for arm in ("baseline", "code"):
            for m in s[arm]["members"]:
                rows.append(
                    [
                        esc(s["seed"]),
                        esc(arm),
                        esc(m.get("name")),
                        esc(m.get("seed")),
                        esc(m.get("epochs")),
                        num(m.get("train_seconds"), 2),
                        esc(num(m.get("trainable_parameters"))),
                    ]
                )
    return (
        "<details><summary>Raw per-member numbers</summary>"
        + table(
            ["seed", "arm", "member", "member seed", "epochs", "train s", "trainable parameters"],
            rows,
            left=3,
        )
        + "</details>"
    )


def bench_section(source: Source) -> str:
    out = [_meta(source.data)]
    paper = source.data.get("paper") or (source.recipes[0].get("paper") if source.recipes else None)
    if source.recipes:
        out.append(_headline_section(source.recipes, paper))
    for r in source.recipes:
        out.append(_recipe_section(r))
    return "\n".join(out)


def compile_section(source: Source) -> str:
    """A `codec compile` run: members, time per phase, memory, CSN per layer, quality as members are added."""
    r = source.data
    run_dir = source.path.parent
    metric = "accuracy" if r["task"] == "classification" else "mse"
    q = r["quality"]
    source_name = (
        r["recipe"] or r.get("model") or "the given main and peer"
    )  # --recipe, --model or --main/--peer
    out = [
        f'<h2 id="compile-{esc(run_dir.name)}">compile run {esc(run_dir)}: {esc(source_name)} on '
        f"{esc(r['dataset'])}</h2>"
    ]
    t = r["time"]
    rows = [[esc(name), esc(quality(value, metric))] for name, value in q["members"].items()]
    rows.append([f"ensemble ({esc(r['criterion'])})", esc(quality(q.get("accuracy", q.get("mse")), metric))])
    out.append(table(["member", f"test {metric}"], rows))
    facts = [
        ["members", esc(r["members"])],
        [
            "CSN neurons",
            esc(r["csn"]["total"])
            + " ("
            + esc(", ".join(f"{k}: {v}" for k, v in r["csn"]["per_layer"].items()))
            + ")",
        ],
        ["memory footprint M (fused graph)", esc(pct(r["memory_footprint_M"]))],
        ["M, paper's formula", esc(pct(r.get("memory_footprint_M_formula")))],
        ["passes / training time", esc(pct(t.get("passes_fraction_of_training"), 2))],
        ["training time (s)", num(t["training_total"], 2)],
    ]
    out.append(table(["", ""], facts))
    names = ["main", "peer", *[f"grown_{i}" for i in range(1, len(t["grow"]) + 1)]]
    seconds = [t["train_main"], t["train_peer"], *t["grow"]]
    out.append(
        figure(
            bar_chart(
                names + ["passes"],
                [("seconds", seconds + [t["passes"]], COLORS["code"])],
                title="time per phase",
                y_label="seconds",
            ),
            "Training time of each member and the time of the passes.",
        )
    )
    cumulative = q.get("cumulative_accuracy" if metric == "accuracy" else "cumulative_mse")
    if cumulative:
        times, total = [], 0.0
        for i, s in enumerate(seconds):
            total += s + (t["passes"] if i == 1 else 0.0)
            times.append(total)
        series = [
            Series(
                "CODE ensemble",
                list(zip(times, cumulative)),
                COLORS["code"],
                labels=[str(i + 1) for i in range(len(times))],
            )
        ]
        fmt = (lambda v: f"{100 * v:.1f}") if metric == "accuracy" else None
        out.append(
            figure(
                line_plot(
                    series,
                    title="quality as members are added",
                    x_label="training seconds (cumulative)",
                    y_label=f"test {metric}" + (" (%)" if metric == "accuracy" else ""),
                    y_fmt=fmt,
                ),
                "Ensemble of the first k members (main, peer, grown members in order).",
            )
        )
    fused = r["parameters"]["fused_graph"]
    out.append(
        figure(
            bar_chart(
                ["conventional", "CODE fused"],
                [
                    (
                        "members' own",
                        [r["members"] * r["parameters"]["conventional_member"], sum(fused["members"])],
                        COLORS["code"],
                    ),
                    ("CSN (once)", [0, fused["csn"]], COLORS["csn"]),
                ],
                title="parameters stored",
                y_label="parameters",
                stacked=True,
            ),
            f"{r['members']} conventional members against the fused CODE graph.",
        )
    )
    widths = _layer_widths(run_dir)
    per_layer = r["csn"]["per_layer"]
    if per_layer:
        groups = [("CSN neurons", list(per_layer.values()), COLORS["csn"])]
        if widths:
            groups.insert(0, ("layer width", [widths.get(k, 0) for k in per_layer], "#c6dbef"))
        out.append(
            figure(
                bar_chart(
                    [f"layer {k}" for k in per_layer], groups, title="CSN size per layer", y_label="neurons"
                ),
                "CSN neurons per hidden layer" + (" against the rewritten main's width." if widths else "."),
            )
        )
    return "\n".join(out)


def _layer_widths(run_dir: Path) -> dict:
    """Hidden layer widths of the rewritten main, from the passes' report (CSN count / fraction)."""
    path = run_dir / "opt" / "report.json"
    if not path.is_file():
        return {}
    try:
        report = _read_json(path)
    except DataError:
        return {}
    for entry in report.get("passes", []):
        details = entry.get("details") or {}
        counts, fractions = details.get("csn_per_layer"), details.get("csn_fraction_per_layer")
        if counts and fractions:
            return {k: round(counts[k] / fractions[k]) for k in counts if fractions.get(k)}
    return {}


def ensemble_section(source: Source) -> str:
    """A `codec train-ensemble` run: metrics, member accuracies and the MCL/TreeNet specialisation heatmap."""
    r = source.data
    m = r["metrics"]
    o = r.get("options", {})
    out = [
        (
            f'<h2 id="ensemble-{esc(source.path.parent.name)}">coupled ensemble {esc(source.path.parent)}: '
            f"{esc(r.get('recipe'))} on {esc(r.get('dataset'))}</h2>"
        )
    ]
    facts = [
        ["members", esc(o.get("members"))],
        ["loss", esc(o.get("loss")) + (f" (k = {esc(o.get('k'))})" if o.get("loss") == "mcl" else "")],
        ["trunk split", esc(o.get("split"))],
        ["ensemble accuracy", esc(pct(m.get("accuracy"), 2))],
        ["oracle accuracy", esc(pct(m.get("oracle_accuracy"), 2))],
        ["member accuracies", esc(", ".join(pct(a, 2) for a in m.get("member_accuracies", [])))],
        ["NLL / ECE", f"{num(m.get('nll'))} / {num(m.get('ece'))}"],
        ["train seconds", num((r.get("times") or {}).get("train_seconds"), 2)],
    ]
    out.append(table(["", ""], facts))
    a = r.get("assignment") or {}
    out.append(_assignment(a.get("table"), a.get("classes"), "", a.get("rule", "")))
    history = r.get("history") or []
    points = [(h["epoch"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
    if points:
        out.append(
            figure(
                line_plot(
                    [Series("validation loss", points, COLORS["treenet"])],
                    title="training",
                    x_label="epoch",
                    y_label="validation loss",
                ),
                "Validation loss per epoch.",
            )
        )
    return "\n".join(out)


def render(paths: Sequence[str | os.PathLike], title: str | None = None) -> str:
    """The HTML page for the given inputs."""
    if not paths:
        raise ConfigError(
            "nothing to report: give a bench folder, a compile run directory or a train-ensemble report"
        )
    sources = [load_source(p) for p in paths]
    body = []
    for source in sources:
        if source.kind == "bench":
            body.append(bench_section(source))
        elif source.kind == "compile":
            body.append(compile_section(source))
        else:
            body.append(ensemble_section(source))
    if title is None:
        title = "codec benchmark report" if any(s.kind == "bench" for s in sources) else "codec report"
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>{esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{esc(title)}</h1>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


def write_report(
    paths: Sequence[str | os.PathLike], out: str | os.PathLike, title: str | None = None
) -> Path:
    """Render and write the page atomically; returns its path."""
    from codec.io import write_bytes_atomic

    page = render(paths, title)
    out = Path(out)
    write_bytes_atomic(out, page.encode("utf-8"))
    return out
