"""codec report: a self-contained HTML page (tables and inline SVG, no scripts, no network) from a tiny real
benchmark, a compile run directory and a coupled-ensemble run; rendered by headless Chromium when it is
installed."""

from __future__ import annotations

import html.parser
import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from codec.errors import CodecError, DataError
from codec.pipelines.report import Series, bar_chart, heatmap, line_plot, nice_ticks, render, write_report

TINY = {"max_epochs": 1, "n_train": 400, "n_test": 150}


class _Page(html.parser.HTMLParser):
    """Counts tags, keeps table rows as text, the raw SVG blocks and every URL-bearing attribute."""

    def __init__(self):
        super().__init__()
        self.tags: dict[str, int] = {}
        self.urls: list[str] = []
        self.ids: list[str] = []
        self.tables: list[list[list[str]]] = []
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for name, value in attrs:
            if name in ("href", "src", "xlink:href", "action") and value:
                self.urls.append(value)
            if name == "id":
                self.ids.append(value)
        if tag == "table":
            self.tables.append([])
        elif tag == "tr" and self.tables:
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self.tables and self.tables[-1]:
            self.tables[-1][-1].append(" ".join("".join(self._cell).split()))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    return parser


def _svgs(page: str) -> list[ET.Element]:
    """Every inline SVG, parsed as XML (so each is well-formed)."""
    out, start = [], 0
    while (i := page.find("<svg", start)) >= 0:
        j = page.index("</svg>", i) + len("</svg>")
        out.append(ET.fromstring(page[i:j]))
        start = j
    return out


QUICK = Path(__file__).resolve().parents[1] / "bench" / "quick"


@pytest.fixture(scope="module")
def bench_dir() -> Path:
    """The committed quick-profile results (`codec bench --profile quick`; tests/test_bench.py checks that a
    fresh
    tiny run renders too)."""
    if not (QUICK / "bench.json").is_file():
        pytest.fail(f"{QUICK}/bench.json is missing: run the command in bench/README.md")
    return QUICK


@pytest.fixture(scope="module")
def compile_dir(tmp_path_factory) -> Path:
    from codec.pipelines.compile import CompileOptions, compile_ensemble

    run = tmp_path_factory.mktemp("compile") / "run"
    compile_ensemble(
        CompileOptions("classifier_s", members=3, train_overrides={**TINY, "num_threads": 1}), run, quiet=True
    )
    return run


def test_bench_report_structure(bench_dir, tmp_path):
    out = write_report([bench_dir], tmp_path / "report.html")
    page = out.read_text()
    parsed = _parse(page)
    index = json.loads((bench_dir / "bench.json").read_text())
    result = json.loads((bench_dir / "classifier_s.json").read_text())
    # self-contained: no scripts, style sheets, images or links to anything
    assert "script" not in parsed.tags and "link" not in parsed.tags and "img" not in parsed.tags
    assert parsed.urls == []
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "") and "https://" not in page
    assert {"headline", *(f"recipe-{name}" for name in index["recipes"])} <= set(parsed.ids)
    headers = [t[0] for t in parsed.tables]
    assert any("N baseline" in h and "time to reach" in h for h in headers)  # headline
    assert any("CODE s to reach" in h for h in headers)  # Table 1
    assert any("CODE size in budget" in h for h in headers)  # Table 2
    assert any("grown epochs" in h for h in headers)  # sweep
    assert any("parameters stored" in h for h in headers)  # side by side
    assert any("fused ONNX (ex/s)" in h for h in headers)  # inference
    # Table 1's row holds the JSON's numbers
    table1 = next(t for t in parsed.tables if "CODE s to reach" in t[0])
    for row, seed in zip(table1[1:], result["per_seed"]):
        assert row[0] == str(seed["seed"]) and row[1] == str(seed["table1"]["n_baseline"])
        assert row[-1] == str(seed["code"]["csn"]["total"])
    assert any(row[0] == "paper" and "43.51 %" in row for row in table1)
    sweep = next(t for t in parsed.tables if "grown epochs" in t[0])
    assert [row[0] for row in sweep[1:]] == [row["point"]["name"] for row in result["sweep"]]
    # plots: quality vs time, memory, CSN per layer, sweep, inference (+ the TreeNet heatmap when it ran)
    svgs = _svgs(page)
    titles = [svg.attrib["aria-label"] for svg in svgs]
    assert any("vs cumulative training time" in t for t in titles)
    assert any("parameters stored" in t for t in titles)
    assert any("CSN size per layer" in t for t in titles)
    assert any(t.startswith("sweep") for t in titles)
    assert "inference throughput" in titles
    ns = "{http://www.w3.org/2000/svg}"
    curve = svgs[next(i for i, t in enumerate(titles) if "vs cumulative training time" in t)]
    assert len(curve.findall(f"{ns}polyline")) == 2 * len(result["seeds"])  # baseline and CODE per seed
    if result["comparisons"][0]["treenet"]["available"]:
        heat = svgs[next(i for i, t in enumerate(titles) if t.startswith("test examples won per class"))]
        members = result["comparisons"][0]["members"]
        assert len([r for r in heat.findall(f"{ns}rect") if r.find(f"{ns}title") is not None]) == members * 10


def test_compile_run_directory(compile_dir, tmp_path):
    page = write_report([compile_dir], tmp_path / "r.html").read_text()
    report = json.loads((compile_dir / "report.json").read_text())
    parsed = _parse(page)
    members = next(t for t in parsed.tables if t[0] == ["member", "test accuracy"])
    assert [row[0] for row in members[1:-1]] == list(report["quality"]["members"])
    assert members[-1][1] == f"{100 * report['quality']['accuracy']:.2f} %"
    titles = [svg.attrib["aria-label"] for svg in _svgs(page)]
    assert titles == [
        "time per phase",
        "quality as members are added",
        "parameters stored",
        "CSN size per layer",
    ]
    # the same run through report.json itself
    assert render([compile_dir / "report.json"]) == render([compile_dir])


def test_coupled_ensemble_heatmap(tmp_path):
    coupled = pytest.importorskip("codec.runtime.training.coupled")
    from codec.pipelines.train_ensemble import train_ensemble_recipe

    report = train_ensemble_recipe(
        "classifier_s",
        coupled.EnsembleOptions(members=2, loss="mcl"),
        tmp_path / "mcl",
        overrides={**TINY, "num_threads": 1},
        quiet=True,
        plot=False,
    )
    page = render([tmp_path / "mcl"])
    heat = next(svg for svg in _svgs(page) if svg.attrib["aria-label"].startswith("test examples won"))
    ns = "{http://www.w3.org/2000/svg}"
    cells = [r for r in heat.findall(f"{ns}rect") if r.find(f"{ns}title") is not None]
    table = report["assignment"]["table"]
    assert len(cells) == len(table) * len(table[0])
    counts = sorted(
        int(t.text)
        for t in heat.findall(f"{ns}text")
        if t.attrib.get("text-anchor") == "middle" and t.text.isdigit()
    )
    assert counts == sorted(v for row in table for v in row)


def test_inputs_that_are_not_results_are_one_line_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        render([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no bench.json"):
        render([tmp_path / "empty"])
    (tmp_path / "x.json").write_text('{"hello": 1}')
    with pytest.raises(DataError, match="is not a codec bench result"):
        render([tmp_path / "x.json"])
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(DataError, match="not valid JSON"):
        render([tmp_path / "bad.json"])
    with pytest.raises(CodecError):
        render([])


def test_cli(bench_dir, tmp_path, monkeypatch, capsys):
    from codec import cli

    monkeypatch.setattr(
        cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, *({"bench", "report"} - set(cli.COMMAND_MODULES))]
    )
    out = tmp_path / "page.html"
    assert cli.main(["report", str(bench_dir), "-o", str(out), "--title", "My <title>"]) == 0
    assert "<title>My &lt;title&gt;</title>" in out.read_text()
    assert cli.main(["report", str(tmp_path / "nowhere"), "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("codec report: error:")


def test_svg_helpers_are_well_formed():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    ticks = nice_ticks(0.913, 0.957)
    assert ticks[0] <= 0.913 and ticks[-1] >= 0.957 and len(ticks) <= 8
    plot = ET.fromstring(
        line_plot(
            [Series("a<b", [(0, 1), (1, 2)]), Series("c", [(0.5, 1.5)], dashed=True)],
            title="t & u",
            x_label="x",
            y_label="y",
            hlines=[(1.2, "ref", "#000")],
        )
    )
    assert plot.attrib["aria-label"] == "t & u"
    bars = ET.fromstring(
        bar_chart(
            ["p", "q"], [("g1", [1, 2], "#f00"), ("g2", [3, 0], "#0f0")], title="b", y_label="v", stacked=True
        )
    )
    ns = "{http://www.w3.org/2000/svg}"
    assert len([r for r in bars.findall(f"{ns}rect") if r.find(f"{ns}title") is not None]) == 4
    ET.fromstring(bar_chart(["p"], [("g", [1000.0], "#00f")], title="log", y_label="v", log=True))
    cells = ET.fromstring(heatmap([[1, 2, 3], [4, 5, 6]], ["m0", "m1"], ["a", "b", "c"], title="h"))
    assert len([r for r in cells.findall(f"{ns}rect") if r.find(f"{ns}title") is not None]) == 6
    assert line_plot([], title="t", x_label="x", y_label="y") == ""


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="chromium is not installed (apt-get install chromium)"
)
def test_renders_in_headless_chromium(bench_dir, tmp_path):
    image = pytest.importorskip("PIL.Image")
    page = write_report([bench_dir], tmp_path / "report.html")
    png = tmp_path / "shot.png"
    profile = tmp_path / "chromium-profile"
    subprocess.run(
        [
            "chromium",
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            f"--screenshot={png}",
            "--window-size=1200,2000",
            page.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    shot = image.open(png).convert("RGB")
    assert shot.size == (1200, 2000)
    colors = shot.getcolors(maxcolors=1 << 20)
    assert len(colors) > 50  # text, table shading and plot colours, not a blank page
    white = (
        max(count for count, rgb in colors if rgb == (255, 255, 255))
        if any(rgb == (255, 255, 255) for _, rgb in colors)
        else 0
    )
    assert white < 0.97 * shot.size[0] * shot.size[1]
    # the plots' colours are on the page: the baseline's blue and the headline table's shading
    assert any(count > 20 and rgb == (31, 119, 180) for count, rgb in colors)
