"""`codec train` and `codec eval` end to end: files written, reports consistent, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from codec.cli import main
from codec.runtime.data import load_dataset
from codec.runtime.evaluation.metrics import accuracy
from codec.runtime.execution.session import predict

# Tiny runs: 900 training examples, 3 epochs.
# fmt: off
TINY = ["--epochs", "3", "--lr", "0.003", "--batch-size", "32", "--n-train", "1000", "--n-test", "300",
        "--device", "cpu", "--quiet"]
# fmt: on


@pytest.fixture(scope="module")
def members(tmp_path_factory):
    """Two classifier_s members: one trained in-process, one through `python -m codec`."""
    folder = tmp_path_factory.mktemp("members")
    a, b = folder / "a.onnx", folder / "b.onnx"
    assert main(["train", "--recipe", "classifier_s", "--seed", "0", "-o", str(a), *TINY]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["--recipe", "classifier_s", "--seed", "1", "-o", str(b), "--threads", "1", "--json", *TINY]
    proc = subprocess.run(
        [sys.executable, "-m", "codec", "train", *args],
        capture_output=True,
        check=False,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    return a, b, summary


def test_train_writes_member_checkpoint_and_summary(members):
    a, b, summary = members
    assert a.is_file() and b.is_file()
    assert (a.parent / "a.onnx.ckpt").is_file()  # default checkpoint beside the output
    assert summary["recipe"] == "classifier_s" and summary["seed"] == 1
    assert summary["epochs_run"] == 3 and 1 <= summary["best_epoch"] <= 3
    assert summary["n_test"] == 300 and summary["metric"] == "accuracy"
    assert (
        summary["config"]["lr"] == 0.003 and summary["config"]["batch_size"] == 32
    )  # options reach training
    dataset = load_dataset("mnist_small").subset(1000, 300, seed=0)
    assert summary["test_metric"] == pytest.approx(accuracy(predict(b, dataset.x_test), dataset.y_test))
    assert summary["test_metric"] > 0.3  # well above chance (0.1)
    assert len(summary["history"]) == 3


def test_train_human_summary_and_resume(members, capsys):
    a, _, _ = members
    before = a.read_bytes()
    # The checkpoint says training finished: --resume trains nothing and re-exports the same weights.
    assert main(["train", "--recipe", "classifier_s", "--seed", "0", "-o", str(a), "--resume", *TINY]) == 0
    out = capsys.readouterr().out
    assert "trained classifier_s seed 0" in out and "test accuracy" in out and "best epoch" in out
    dataset = load_dataset("mnist_small").subset(1000, 300, seed=0)
    np.testing.assert_array_equal(predict(a, dataset.x_test), predict(before, dataset.x_test))


def test_eval_reports_ensemble_metrics(members, capsys):
    a, b, _ = members
    assert main(["eval", str(a), str(b), "--data", "mnist_small", "--criterion", "mean", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    dataset = load_dataset("mnist_small")
    probs = [predict(m, dataset.x_test) for m in (a, b)]
    assert report["task"] == "classification" and report["n_members"] == 2
    assert report["n_examples"] == len(dataset.x_test) == 1000
    assert report["member_accuracies"] == pytest.approx([accuracy(p, dataset.y_test) for p in probs])
    assert report["accuracy"] == pytest.approx(accuracy((probs[0] + probs[1]) / 2, dataset.y_test))
    assert report["oracle_accuracy"] >= max(report["member_accuracies"])
    assert report["ensemble_effect"] == pytest.approx(report["accuracy"] - max(report["member_accuracies"]))
    assert 0.0 <= report["redundancy"] <= 0.5 and report["softmax_applied"] == []

    assert main(["eval", str(a), str(b), "--data", "mnist_small"]) == 0
    text = capsys.readouterr().out
    for label in ("accuracy", "oracle accuracy", "NLL", "ECE", "ensemble effect", "redundancy", "a.onnx"):
        assert label in text


def test_train_and_eval_autoencoder(tmp_path, capsys):
    ae = tmp_path / "ae.onnx"
    args = ["train", "--recipe", "autoenc_s", "--seed", "0", "-o", str(ae), "--no-checkpoint", *TINY]
    assert main(args) == 0
    assert "test mse" in capsys.readouterr().out
    assert not (tmp_path / "ae.onnx.ckpt").exists()
    assert main(["eval", str(ae), str(ae), "--data", "mnist_small", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "reconstruction"
    assert len(report["member_mse"]) == 2 and report["member_mse"][0] == pytest.approx(
        report["member_mse"][1]
    )
    assert report["cumulative_mse"][-1] == pytest.approx(report["mse"])
    assert 0.0 < report["mse"] < 0.2


def _onnx_model(path, input_dims, num_outputs, softmax=True):
    """A tiny linear ONNX classifier: Flatten -> MatMul -> (Softmax)."""
    rng = np.random.default_rng(0)
    flat = int(np.prod(input_dims))
    weight = numpy_helper.from_array(rng.normal(size=(flat, num_outputs)).astype(np.float32), "w")
    nodes = [helper.make_node("Flatten", ["input"], ["flat"], axis=1)]
    nodes.append(helper.make_node("MatMul", ["flat", "w"], ["scores" if softmax else "output"]))
    if softmax:
        nodes.append(helper.make_node("Softmax", ["scores"], ["output"], axis=-1))
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_dims])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", num_outputs])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.save(model, str(path))
    return path


def test_eval_softmaxes_score_outputs(tmp_path, capsys):
    logits = _onnx_model(tmp_path / "logits.onnx", [1, 28, 28], 10, softmax=False)
    assert main(["eval", str(logits), "--data", "mnist_small", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["softmax_applied"] == [str(logits)]
    assert 0.0 <= report["nll"] and 0.0 <= report["ece"] <= 1.0


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda m, t: [m, m, "--data", "mnist_small", "--criterion", "median"], "unknown criterion 'median'"),
        (
            lambda m, t: [m, str(_onnx_model(t / "five.onnx", [1, 28, 28], 5)), "--data", "mnist_small"],
            "outputs (5)",
        ),
        (
            lambda m, t: [str(_onnx_model(t / "flat.onnx", [780], 10)), "--data", "mnist_small"],
            "flat.onnx expects [780]",
        ),
        (lambda m, t: [str(t / "missing.onnx"), "--data", "mnist_small"], "missing.onnx"),
        (
            lambda m, t: [m, "--data", "mnist_small", "--limit", "0"],
            "argument --limit: expected a positive integer",
        ),
    ],
)
def test_eval_errors_are_one_line_exit_2(tmp_path, capsys, make_args, message):
    member = str(_onnx_model(tmp_path / "ten.onnx", [1, 28, 28], 10))
    assert main(["eval", *make_args(member, tmp_path)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("codec eval: error:"), captured.err
    assert message in lines[0]
    assert "Traceback" not in captured.err and captured.out == ""


def test_eval_split_choices_are_the_shared_ones(tmp_path, capsys):
    # --split comes from commands/_common.py as in profile/opt/export: argparse refuses other names
    member = str(_onnx_model(tmp_path / "ten.onnx", [1, 28, 28], 10))
    assert main(["eval", member, "--data", "mnist_small", "--split", "validation"]) == 2
    assert "invalid choice: 'validation'" in capsys.readouterr().err


def test_eval_limit_scores_the_first_n_examples(tmp_path, capsys):
    member = str(_onnx_model(tmp_path / "ten.onnx", [1, 28, 28], 10))
    assert main(["eval", member, "--data", "mnist_small", "--limit", "37", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_examples"] == 37


@pytest.mark.parametrize(
    "args, message",
    [
        (["--recipe", "no_such_recipe", "-o", "x.onnx"], "no_such_recipe"),
        (["--recipe", "classifier_s"], "--output"),
        (["--recipe", "classifier_s", "-o", "x.onnx", "--lr", "-1"], "lr"),
    ],
)
def test_train_errors_are_one_line_exit_2(tmp_path, capsys, args, message):
    args = [a if a != "x.onnx" else str(tmp_path / "x.onnx") for a in args]
    assert main(["train", *args, "--quiet"]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("codec train: error:"), captured.err
    assert message in lines[0]
    assert not (tmp_path / "x.onnx").exists()


def test_train_lists_recipes(capsys):
    assert main(["train", "--list-recipes", "--json"]) == 0
    names = {row["name"] for row in json.loads(capsys.readouterr().out)}
    assert {"classifier_s", "autoenc_s"} <= names
