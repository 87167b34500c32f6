"""`codec opt` end to end: outputs on disk, the CSN as ONNX, NDG GraphML, and one-line errors."""

from __future__ import annotations

import json

import networkx as nx
import numpy as np
import pytest
from conftest import run_onnx
from test_passes import planted_pair

from codec.cli import main
from codec.ir import Role, lift, lower, save_model
from codec.runtime.execution.profile import activations


@pytest.fixture
def members(tmp_path):
    m, p, perm1, perm2 = planted_pair(np.random.default_rng(0), tiny_link=False)
    # one position dead in both members (a main neuron outside the planted twins, a free slot in peer)
    k = next(k for k in range(11, 16) if k not in perm1[:11])
    m.layer("fc1").bias[k] = -1e4
    p.layer("fc1").bias[k] = -1e4
    rng = np.random.default_rng(1)
    data = tmp_path / "cal.npz"
    np.savez(
        data,
        x_train=rng.standard_normal((2000, 20)).astype(np.float32),
        y_train=rng.integers(0, 3, 2000),
        x_test=rng.standard_normal((100, 20)).astype(np.float32),
        y_test=rng.integers(0, 3, 100),
    )
    return (
        save_model(lower(m), tmp_path / "main.onnx"),
        save_model(lower(p), tmp_path / "peer.onnx"),
        f"npz:{data}",
    )


def test_opt_end_to_end(members, tmp_path, capsys):
    main_path, peer_path, data = members
    out = tmp_path / "out"
    code = main(
        [
            "opt",
            "--passes",
            "dna,dne,nda{fire=0.0},csne{fire=0.99,corr=0.99}",
            str(main_path),
            "--peer",
            str(peer_path),
            "--data",
            data,
            "-o",
            str(out),
            "--json",
            "--quiet",
        ]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert json.loads((out / "report.json").read_text())["pipeline"] == report["pipeline"]
    by_pass = {r["pass"]: r for r in report["passes"]}
    assert by_pass["dna"]["details"]["dead_per_layer"]["main"]["fc1"] >= 1
    assert by_pass["csne"]["details"]["csn_per_layer"]["fc1"] == 10
    assert by_pass["csne"]["details"]["csn_per_layer"]["fc2"] == 9
    rewritten = lift(out / "main.onnx")
    assert (rewritten.layer("fc1").roles[:10] == Role.FROZEN_SHARED).all()
    x = np.random.default_rng(5).standard_normal((50, 20)).astype(np.float32)
    # the CSN's outputs (last CSN layer, then a tap per earlier layer) equal the rewritten main's CSN neurons
    import onnxruntime as ort

    session = ort.InferenceSession(str(out / "csn.onnx"), providers=["CPUExecutionProvider"])
    outs = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, {session.get_inputs()[0].name: x}))
    )
    acts = activations(rewritten, x)
    np.testing.assert_allclose(outs["csn"], acts["fc2"][:, :9], atol=1e-5)
    np.testing.assert_allclose(
        next(v for k, v in outs.items() if k.endswith("fc1")), acts["fc1"][:, :10], atol=1e-5
    )
    # DNE removed the dead neuron and kept main's function; CSNE only reordered it (closed CSN inputs)
    np.testing.assert_allclose(run_onnx(out / "main.onnx", x), run_onnx(main_path, x), atol=1e-5)
    graph = nx.read_graphml(out / "ndg_main.graphml")
    assert graph.number_of_nodes() == rewritten.layer("fc1").num_neurons + rewritten.layer("fc2").num_neurons
    csn = json.loads((out / "csn.json").read_text())
    assert [l["size"] for l in csn["layers"]] == [10, 9]


def test_print_ir_after_all(members, capsys):
    main_path, peer_path, data = members
    assert (
        main(
            [
                "opt",
                "--passes",
                "dna,dne",
                str(main_path),
                "--peer",
                str(peer_path),
                "--data",
                data,
                "--print-ir-after-all",
                "--quiet",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    assert "// IR after dne" in err and "network main" in err and "fc1: 15 neurons" in err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--passes", "dna,bogus"], "unknown pass 'bogus'"),
        (["--passes", "csne{corr=1.5}"], "impossible"),
        (["--limit", "0"], "--limit: expected a positive integer"),
        (["--data", "npz:/nonexistent/file.npz"], "nonexistent"),
    ],
)
def test_opt_errors(members, capsys, extra, message):
    main_path, peer_path, data = members
    argv = ["opt", str(main_path), "--peer", str(peer_path), "--data", data, "--quiet", *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_opt_mismatched_members(members, tmp_path, capsys):
    main_path, _, data = members
    from codec.ir import Activation, Dense, NetworkIR

    other = NetworkIR(
        "o",
        "input",
        "output",
        (20,),
        [
            Dense("a", np.ones((4, 20), np.float32), np.zeros(4, np.float32), Activation("relu")),
            Dense("b", np.ones((3, 4), np.float32), np.zeros(3, np.float32)),
        ],
    )
    other_path = save_model(lower(other), tmp_path / "other.onnx")
    assert main(["opt", str(main_path), "--peer", str(other_path), "--data", data, "--quiet"]) == 2
    assert "architecture" in capsys.readouterr().err


@pytest.mark.parametrize("broken", ["main", "peer"])
def test_a_lift_failure_names_the_member_and_its_file(members, tmp_path, capsys, broken):
    import onnx
    from onnx import TensorProto, helper

    main_path, peer_path, data = members
    graph = helper.make_graph(
        [helper.make_node("Sin", ["input"], ["output"])],
        "sin",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 20])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 20])],
    )
    bad = tmp_path / "unliftable.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(bad))
    paths = {"main": main_path, "peer": peer_path, broken: bad}
    assert main(["opt", str(paths["main"]), "--peer", str(paths["peer"]), "--data", data, "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"codec opt: error: {broken} member {bad}: cannot lift"), (
        err
    )
