"""`codec inspect` and `codec profile` from the command line: output, JSON, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import export_torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from codec.cli import main


@pytest.fixture(scope="module")
def mnist_mlp(tmp_path_factory):
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10)
    )
    with torch.no_grad():
        module[1].bias[:4] = -1e3  # four neurons dead on every input
    return export_torch(
        module, torch.randn(2, 1, 28, 28), tmp_path_factory.mktemp("m") / "mlp.onnx", dynamo=True
    )


def test_inspect_json(mnist_mlp, capsys):
    assert main(["inspect", str(mnist_mlp), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["lifted"] and out["input"]["shape"] == [1, 28, 28]
    assert [l["neurons"] for l in out["layers"] if l["kind"] == "dense"] == [32, 16, 10]
    assert out["parameters"] == 784 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10


def test_inspect_unliftable_lists_ops_and_fails(tmp_path, capsys):
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
        helper.make_node("Erf", ["h"], ["y"], name="gelu_part"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [
            numpy_helper.from_array(np.ones((3, 4), np.float32), "w"),
            numpy_helper.from_array(np.zeros(3, np.float32), "b"),
        ],
    )
    path = tmp_path / "erf.onnx"
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()
    )
    assert main(["inspect", str(path), "--json"]) == 2
    out = json.loads(capsys.readouterr().out)
    assert not out["lifted"] and "gelu_part" in out["error"]
    assert {"op": "Erf", "count": 1, "supported": False} in out["ops"]


def test_profile_reports_dead_neurons(mnist_mlp, tmp_path, capsys):
    report = tmp_path / "stats.json"
    assert (
        main(
            [
                "profile",
                str(mnist_mlp),
                "--data",
                "mnist_small",
                "--limit",
                "300",
                "--quiet",
                "--json",
                "-o",
                str(report),
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["inputs"] == 300
    assert out["layers"][0]["dead_neurons"][:4] == [0, 1, 2, 3]
    assert json.loads(report.read_text()) == out


def test_errors_are_one_line_without_traceback(mnist_mlp, tmp_path):
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(mnist_mlp.read_bytes()[:300])
    cases = [
        ["inspect", str(tmp_path / "absent.onnx")],
        ["profile", str(cut), "--data", "mnist_small"],
        ["profile", str(mnist_mlp), "--data", "no_such_dataset"],
        ["profile", str(mnist_mlp), "--data", "cifar10_jpeg", "--data-dir", str(tmp_path), "--limit", "3"],
    ]
    for argv in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "codec", *argv], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
        lines = [l for l in proc.stderr.splitlines() if l.strip() and "%|" not in l]
        assert len(lines) == 1 and lines[0].startswith(f"codec {argv[0]}: error:"), proc.stderr


def test_shape_mismatch_between_data_and_model(tmp_path, capsys):
    module = nn.Sequential(nn.Linear(10, 4), nn.ReLU(), nn.Linear(4, 2))
    path = export_torch(module, torch.randn(2, 10), tmp_path / "small.onnx", dynamo=False)
    assert main(["profile", str(path), "--data", "mnist_small", "--limit", "10", "--quiet"]) == 2
    assert "expects [10]" in capsys.readouterr().err


def test_help_mentions_every_command():
    proc = subprocess.run(
        [sys.executable, "-m", "codec", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    for command in ("inspect", "profile"):
        assert command in proc.stdout
