"""`codec train-ensemble` end to end on tiny mnist_small runs: files, report, fused ONNX, resume, errors;
and the assignment heatmap."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from codec import cli
from codec.commands.train_ensemble import format_report
from codec.errors import ShapeError
from codec.pipelines.report import assignment_svg
from codec.runtime.data import load_dataset
from codec.runtime.evaluation.metrics import assignment_table, combine, oracle_accuracy
from codec.runtime.execution.session import predict

# fmt: off
TINY = ["--recipe", "classifier_s", "--width", "0.25", "--members", "3", "--n-train", "600",
        "--n-test", "200", "--batch-size", "32",
        "--lr", "0.005", "--device", "cpu", "--threads", "1", "--quiet"]
# fmt: on


@pytest.fixture(autouse=True)
def _command_listed(monkeypatch):
    """The lead lists the command in codec.cli; until then the tests add it themselves."""
    if "train_ensemble" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "train_ensemble"])


@pytest.fixture(scope="module")
def mcl_run(tmp_path_factory):
    """MCL k=1 with a shared fc1 trunk, 2 epochs, member models exported."""
    out = tmp_path_factory.mktemp("mcl")
    args = [
        "train-ensemble",
        *TINY,
        "--split",
        "fc1",
        "--loss",
        "mcl",
        "--k",
        "1",
        "--epochs",
        "2",
        "--export-members",
        "-o",
        str(out),
    ]
    with pytest.MonkeyPatch.context() as patch:  # module scope: the function-scoped fixture is not active yet
        if "train_ensemble" not in cli.COMMAND_MODULES:
            patch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "train_ensemble"])
        assert cli.main(args) == 0
    return out


def test_run_writes_fused_ensemble_members_report_and_heatmap(mcl_run):
    out = mcl_run
    report = json.loads((out / "report.json").read_text())
    assert (
        report["options"]["loss"] == "mcl"
        and report["options"]["k"] == 1
        and report["options"]["members"] == 3
    )
    assert report["treenet"]["trunk"] == ["flatten1", "fc1"] and report["treenet"]["fused_parameters"][
        "shared_layers"
    ] == [1, 1, 1]
    assert report["n_train"] == 540 and report["n_val"] == 60 and report["n_test"] == 200
    assert report["epochs_run"] == 2 and len(report["history"]) == 2
    assert report["heads_stacked"] is True  # MLP branches: trained as one stacked computation
    assert "s (heads stacked);" in format_report(report)
    assert (out / "assignment.svg").read_text().startswith("<svg ")
    assert (out / "ensemble.ckpt").is_file()

    # The report's numbers are those of the written files on the test subset.
    data = load_dataset("mnist_small").subset(600, 200, seed=0)
    members = np.stack([predict(out / "members" / f"member_{i}.onnx", data.x_test) for i in range(3)])
    fused = predict(out / "ensemble.onnx", data.x_test)
    np.testing.assert_allclose(fused, combine(members, "mean"), atol=2e-6)
    metrics = report["metrics"]
    assert metrics["accuracy"] == pytest.approx(float(np.mean(fused.argmax(1) == data.y_test)))
    assert metrics["oracle_accuracy"] == pytest.approx(oracle_accuracy(members, data.y_test))
    assert metrics["member_accuracies"] == pytest.approx(
        list(np.mean(members.argmax(2) == data.y_test, axis=1))
    )
    losses = -np.log(
        np.take_along_axis(members, data.y_test[None, :, None], axis=2)[..., 0].astype(np.float64)
    )
    table = np.array(report["assignment"]["table"])
    assert table.shape == (3, 10) and table.sum() == 200
    # Ties aside (float32 probabilities), the table is the lowest-loss member per example by class.
    assert np.abs(table - assignment_table(losses, data.y_test, 10)).sum() <= 4
    assert report["parity"]["members_max_abs_diff"] < 1e-5
    # MCL k=1 specialises members: the oracle is far above the average member.
    assert metrics["oracle_accuracy"] > report["mean_member_accuracy"] + 0.15


def test_resume_continues_with_more_epochs_and_keeps_the_history(mcl_run, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("ensemble.ckpt",):
        (out / name).write_bytes((mcl_run / name).read_bytes())
    before = json.loads((mcl_run / "report.json").read_text())["history"]
    args = [
        "train-ensemble",
        *TINY,
        "--split",
        "fc1",
        "--loss",
        "mcl",
        "--k",
        "1",
        "--epochs",
        "3",
        "--resume",
        "--no-plot",
        "--json",
        "-o",
        str(out),
    ]
    assert cli.main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["epochs_run"] == 3
    assert [e["train_loss"] for e in report["history"][:2]] == [e["train_loss"] for e in before]
    assert report["files"]["assignment_svg"] is None and not (out / "assignment.svg").exists()
    # a resumed run with other ensemble options is refused
    args = [
        "train-ensemble",
        *TINY,
        "--split",
        "fc1",
        "--loss",
        "independent",
        "--epochs",
        "3",
        "--resume",
        "--no-plot",
        "-o",
        str(out),
    ]
    assert cli.main(args) == 2
    assert "other ensemble options" in capsys.readouterr().err


def test_bagged_treenet_human_summary(tmp_path, capsys):
    args = [
        "train-ensemble",
        *TINY,
        "--variation",
        "both",
        "--split",
        "all",
        "--epochs",
        "1",
        "--no-plot",
        "-o",
        str(tmp_path),
    ]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "trained 3 members of classifier_s together" in out and "variation both, shared everything" in out
    assert "oracle" in out and "lowest-loss member per test example" in out
    assert "heads stacked" not in out  # everything shared: the loop (nothing to stack) ran
    report = json.loads((tmp_path / "report.json").read_text())
    assert all(0.55 < u < 0.72 for u in report["bag_unique_fraction"])
    assert report["heads_stacked"] is False  # everything shared: no branch weights to stack
    accuracies = report["metrics"]["member_accuracies"]
    assert accuracies[0] == accuracies[1] == accuracies[2]  # full sharing: the heads are one network


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--split", "conv9"],
            "unknown split 'conv9'; choose none, all, an integer 0..10, or one of: flatten1, fc1",
        ),
        (["--loss", "mcl", "--k", "4"], "MCL k=4 is more than the 3 members"),
        (["--loss", "mcl", "--k", "0"], "--k: expected a positive integer"),
        (["--loss", "hinge"], "unknown ensemble loss 'hinge'"),
        (["--loss", "score_avg", "--variation", "bagging"], "bagging gives each member its own sample"),
        (["--split", "11"], "an integer split shares the first n modules, n in 0..10"),
    ],
)
def test_bad_options_are_one_line_errors(tmp_path, capsys, extra, message):
    assert cli.main(["train-ensemble", *TINY, *extra, "-o", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()  # refused before anything was written


def test_list_splits(capsys):
    assert cli.main(["train-ensemble", "--recipe", "cifar10_quick", "--list-splits", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows][:4] == ["conv1", "pool1", "relu1", "conv2"] and rows[-1]["name"] == "fc2"
    assert cli.main(["train-ensemble", "--recipe", "classifier_s", "--list-splits"]) == 0
    assert "fc1" in capsys.readouterr().out


def test_heatmap_svg_and_errors(tmp_path):
    import xml.etree.ElementTree as ET

    path = assignment_svg(
        np.array([[3, 0, 1], [0, 5, 2]]), tmp_path / "a.svg", class_names=["a", "b", "c"], title="t"
    )
    root = ET.fromstring(path.read_text())  # a well-formed standalone SVG
    ns = "{http://www.w3.org/2000/svg}"
    cells = [r for r in root.iter(f"{ns}rect") if r.find(f"{ns}title") is not None]
    assert [c.find(f"{ns}title").text for c in cells][:2] == ["member 0 / a: 3.000", "member 0 / b: 0"]
    assert len(cells) == 6
    with pytest.raises(ShapeError, match="members, classes"):
        assignment_svg(np.zeros(3), tmp_path / "b.svg")
    with pytest.raises(ShapeError, match="2 class labels"):
        assignment_svg(np.zeros((2, 3)), tmp_path / "b.svg", class_names=["a", "b"])
    assert not (tmp_path / "b.svg").exists()


def test_heatmap_needs_no_matplotlib(tmp_path, monkeypatch):
    # The heatmap was a matplotlib PNG behind an optional extra; it is the report's SVG now.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert cli.main(["train-ensemble", *TINY, "--epochs", "1", "-o", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "assignment.svg").is_file()
