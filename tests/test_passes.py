"""DNA/DNE/NDA/CSNE on constructed networks with known dead and known equivalent neurons."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
from conftest import run_onnx

from codec.errors import CodecError, ConfigError
from codec.ir import Activation, Conv, Dense, Flatten, NetworkIR, Pool, Role, lower, to_bytes
from codec.passes.base import Calibration, EnsembleModule
from codec.passes.manager import PassManager
from codec.passes.registry import parse_pipeline

RELU = Activation("relu")


def _mlp(name, w1, b1, w2, b2, w3, b3) -> NetworkIR:
    return NetworkIR(
        name,
        "input",
        "output",
        (w1.shape[1],),
        [Dense("fc1", w1, b1, RELU), Dense("fc2", w2, b2, RELU), Dense("out", w3, b3, Activation("softmax"))],
    )


def planted_pair(rng, tiny_link: bool = True):
    """main and peer (20 -> 16 -> 12 -> 3) with planted equivalences.

    Layer fc1: peer neuron perm1[i] is an exact copy of main neuron i for i < 10; main neuron 10's twin in
    peer (at perm1[10]) has its bias raised, so it fires more often (agreement < 1). Neurons 11..15 are
    unrelated. Layer fc2: main neurons 0..7 read only main's fc1 neurons 0..9 and have exact copies in
    peer at perm2[i]; main neuron 8 also reads main's fc1 neuron 10 through a tiny weight (an NDG edge to
    a non-CSN neuron, with almost no effect on its activation).
    """
    w1 = rng.standard_normal((16, 20)).astype(np.float32)
    b1 = rng.normal(0, 0.3, 16).astype(np.float32)
    w2 = rng.standard_normal((12, 16)).astype(np.float32)
    w2[:9, 10:] = 0.0
    if tiny_link:
        w2[8, 10] = 1e-4
    b2 = rng.normal(0, 0.3, 12).astype(np.float32)
    w3 = rng.standard_normal((3, 12)).astype(np.float32)
    b3 = np.zeros(3, np.float32)
    perm1 = rng.permutation(16)
    perm2 = rng.permutation(12)
    pw1 = rng.standard_normal((16, 20)).astype(np.float32)
    pb1 = rng.normal(0, 0.3, 16).astype(np.float32)
    pw1[perm1[:11]] = w1[:11]
    pb1[perm1[:11]] = b1[:11]
    pb1[perm1[10]] += 1.5  # the near twin: correlated, but fires on more inputs
    pw2 = rng.standard_normal((12, 16)).astype(np.float32)
    pb2 = rng.normal(0, 0.3, 12).astype(np.float32)
    for i in range(9):
        row = np.zeros(16, np.float32)
        row[perm1[:11]] = w2[i, :11]
        pw2[perm2[i]] = row
        pb2[perm2[i]] = b2[i]
    pw3 = rng.standard_normal((3, 12)).astype(np.float32)
    main = _mlp("main", w1, b1, w2, b2, w3, b3)
    peer = _mlp("peer", pw1, pb1, pw2, pb2, pw3, b3.copy())
    return main, peer, perm1, perm2


@pytest.fixture
def calibration():
    return Calibration(
        np.random.default_rng(7).standard_normal((3000, 20)).astype(np.float32), batch_size=512
    )


def run(pipeline, members, calibration, **kw):
    module = EnsembleModule(members, calibration)
    return PassManager(parse_pipeline(pipeline), **kw).run(module)


def test_csne_recovers_exactly_the_planted_pairs(calibration):
    main, peer, perm1, perm2 = planted_pair(np.random.default_rng(0))
    out, report = run("nda{fire=0.0},csne{fire=0.99,corr=0.99}", {"main": main, "peer": peer}, calibration)
    csn = out.csn
    fc1, fc2 = csn.layers
    assert dict(zip(fc1.main.tolist(), fc1.peer.tolist())) == {i: int(perm1[i]) for i in range(10)}
    # fc2 neuron 8 is equivalent in activation but its NDG predecessor fc1/10 is not in the CSN
    assert dict(zip(fc2.main.tolist(), fc2.peer.tolist())) == {i: int(perm2[i]) for i in range(8)}
    assert report["passes"][-1]["details"]["csn_per_layer"] == {"fc1": 10, "fc2": 8}
    assert report["passes"][-1]["details"]["iterations"] == 2


def test_csne_without_predecessor_rule_takes_the_near_equivalent(calibration):
    main, peer, perm1, perm2 = planted_pair(np.random.default_rng(0))
    out, _ = run("csne{fire=0.99,corr=0.99,preds=false}", {"main": main, "peer": peer}, calibration)
    assert dict(zip(out.csn.layers[1].main.tolist(), out.csn.layers[1].peer.tolist())) == {
        i: int(perm2[i]) for i in range(9)
    }


def test_csn_rewrite_is_a_reordering_when_csn_inputs_are_closed(calibration):
    main, peer, *_ = planted_pair(np.random.default_rng(0), tiny_link=False)
    out, _ = run("nda{fire=0.0},csne{fire=0.99,corr=0.99}", {"main": main, "peer": peer}, calibration)
    rewritten = out.members["main"]
    fc1, fc2 = rewritten.layer("fc1"), rewritten.layer("fc2")
    assert (fc1.roles[:10] == Role.FROZEN_SHARED).all() and (fc1.roles[10:] == Role.TRAINABLE).all()
    assert (fc2.roles[:9] == Role.FROZEN_SHARED).all()
    x = calibration.x[:500]
    np.testing.assert_allclose(
        run_onnx(to_bytes(lower(rewritten)), x), run_onnx(to_bytes(lower(main)), x), atol=1e-5
    )
    # the CSN network computes exactly the CSN neurons of the rewritten main
    net = out.csn.network
    assert [l.num_neurons for l in net.compute_layers()] == [10, 9]
    from codec.runtime.execution.profile import activations

    full = activations(rewritten, x)
    csn_out = run_onnx(to_bytes(lower(net)), x)
    np.testing.assert_allclose(csn_out, full["fc2"][:, :9], atol=1e-5)


def test_fold_mean_vs_drop(calibration):
    main, peer, *_ = planted_pair(np.random.default_rng(0))
    outs = {}
    for mode in ("fold_mean", "drop"):
        out, _ = run(
            f"csne{{fire=0.99,corr=0.99,preds=false,inputs={mode}}}",
            {"main": main, "peer": peer},
            calibration,
        )
        outs[mode] = out
        # neuron 8 of fc2 had a 1e-4 weight from a non-CSN neuron: folded or dropped, it is now CSN-only
        w = out.members["main"].layer("fc2").weight
        assert np.all(w[:9, 10:] == 0)
    b_fold = outs["fold_mean"].members["main"].layer("fc2").bias[8]
    b_drop = outs["drop"].members["main"].layer("fc2").bias[8]
    assert b_fold != b_drop  # the mean contribution went into the bias


def test_dna_dne_remove_planted_dead_neurons(calibration):
    rng = np.random.default_rng(1)
    main, peer, *_ = planted_pair(rng)
    for net, dead in ((main, [2, 5, 7]), (peer, [5, 7, 9])):
        net.layer("fc1").bias[dead] = -1e4
    net_dead2 = [3]
    main.layer("fc2").bias[net_dead2] = -1e4
    peer.layer("fc2").bias[net_dead2] = -1e4
    members = {"main": main, "peer": peer}
    _, report = run("dna", members, calibration)
    assert report["passes"][0]["details"]["dead_per_layer"]["main"] == {"fc1": 2, "fc2": 1}
    out, report = run("dna{scope=member},dne", members, calibration)
    assert report["passes"][0]["details"]["dead_per_layer"] == {
        "main": {"fc1": 3, "fc2": 1},
        "peer": {"fc1": 3, "fc2": 1},
    }
    dne = report["passes"][1]
    assert dne["verified_max_abs_error"]["main"] <= 1e-6
    assert out.members["main"].layer("fc1").num_neurons == 13
    assert out.members["main"].layer("fc2").weight.shape == (11, 13)
    assert out.members["peer"].layer("fc1").num_neurons == 13
    out2, _ = run("dna,dne", members, calibration)  # intersect: only positions dead in both
    assert out2.members["main"].layer("fc1").num_neurons == 14


def test_dne_on_conv_channels_feeding_a_dense_layer():
    rng = np.random.default_rng(2)
    conv = Conv(
        "c1",
        rng.standard_normal((6, 1, 3, 3)).astype(np.float32),
        np.zeros(6, np.float32),
        RELU,
        pads=(1, 1, 1, 1),
    )
    conv.bias[[1, 4]] = -1e4  # dead channels
    net = NetworkIR(
        "cnn",
        "input",
        "output",
        (1, 6, 6),
        [
            conv,
            Pool("p", "max", (2, 2), (2, 2)),
            Flatten("f"),
            Dense("fc", rng.standard_normal((5, 54)).astype(np.float32), np.zeros(5, np.float32), RELU),
            Dense("out", rng.standard_normal((2, 5)).astype(np.float32), np.zeros(2, np.float32)),
        ],
    )
    cal = Calibration(rng.standard_normal((400, 1, 6, 6)).astype(np.float32))
    out, report = run("dna{scope=member},dne", {"main": net}, cal)
    new = out.members["main"]
    assert new.layer("c1").num_neurons == 4 and new.layer("fc").weight.shape == (5, 36)
    assert report["passes"][1]["verified_max_abs_error"]["main"] <= 1e-6


def test_ndg_is_a_networkx_digraph_of_connected_cofiring_neurons(calibration):
    main, peer, *_ = planted_pair(np.random.default_rng(0), tiny_link=False)
    module = EnsembleModule({"main": main, "peer": peer}, calibration)
    pm = PassManager(parse_pipeline("nda{fire=0.6}"))
    pm.run(module)
    from codec.passes.nda import NeuronDependenceAnalysis

    ndg = pm.analyses.get(NeuronDependenceAnalysis, module)["main"]
    graph = ndg.to_networkx()
    assert isinstance(graph, nx.DiGraph)
    assert graph.number_of_nodes() == 16 + 12
    # main's fc2 neurons 0..8 have zero weights from fc1 neurons 10..15: never an edge
    for i in range(9):
        assert not any(u[1] >= 10 for u in graph.predecessors(("fc2", i)))
    from codec.runtime.execution.profile import activations

    acts = activations(main, calibration.x)
    f1, f2 = acts["fc1"] > 0, acts["fc2"] > 0
    for u, v, w in graph.edges(data="weight"):
        j, i = u[1], v[1]
        expected = (f1[:, j] & f2[:, i]).sum() / f1[:, j].sum()
        assert w == pytest.approx(expected) and expected >= 0.6


def test_verification_failure_names_the_pass(calibration):
    main, peer, *_ = planted_pair(np.random.default_rng(0))
    # a neuron that never fires but is not exactly zero output: leaky relu; criterion=never_fires removes it
    main.layer("fc1").activation = Activation("leaky_relu", 0.5)
    main.layer("fc1").bias[0] = -1e4
    with pytest.raises(CodecError, match="verification failed after pass 'dne'.*main"):
        run("dna{scope=member,criterion=never_fires},dne", {"main": main}, calibration)


@pytest.mark.parametrize(
    "pipeline, message",
    [
        ("dna,nope", "unknown pass 'nope'"),
        ("csne{corr=2}", "impossible"),
        ("nda{fire=-0.1}", "impossible"),
        ("nda{fire=abc}", "not a valid float"),
        ("nda{thresh=0.5}", "has no option 'thresh'"),
        ("dna{scope=everything}", "choose one of"),
        ("csne{fire=0.8", "unclosed"),
        ("", "empty"),
    ],
)
def test_bad_pipelines(pipeline, message):
    with pytest.raises(ConfigError, match=message):
        parse_pipeline(pipeline)


def test_csne_needs_a_peer_and_matching_architectures(calibration):
    main, peer, *_ = planted_pair(np.random.default_rng(0))
    with pytest.raises(CodecError, match="peer"):
        run("csne", {"main": main}, calibration)
    small = _mlp("small", *(np.ones(s, np.float32) for s in [(4, 20), 4, (3, 4), 3, (3, 3), 3]))
    small.layers.insert(1, Dense("extra", np.ones((4, 4), np.float32), np.zeros(4, np.float32), RELU))
    with pytest.raises(CodecError, match="architecture"):
        run("csne", {"main": main, "peer": small}, calibration)


def test_empty_calibration_refused():
    with pytest.raises(CodecError, match="empty"):
        Calibration(np.zeros((0, 20), np.float32))


def test_dne_keeps_activation_stats_exact(calibration):
    """DNE edits the cached profile instead of re-profiling; the edit must equal a fresh profile."""
    rng = np.random.default_rng(3)
    main, peer, *_ = planted_pair(rng)
    main.layer("fc1").bias[[1, 12]] = -1e4
    peer.layer("fc2").bias[[0, 4]] = -1e4
    module = EnsembleModule({"main": main, "peer": peer}, calibration)
    pm = PassManager(parse_pipeline("dna{scope=member},dne"))
    out, report = pm.run(module)
    assert "activations" not in report["passes"][1]["invalidated"]
    from codec.passes.activations import ActivationAnalysis

    edited = pm.analyses.get(ActivationAnalysis, out)
    fresh = ActivationAnalysis().compute(out, None)
    for member in ("main", "peer"):
        for name, s in fresh.members[member].layers.items():
            e = edited.members[member].layers[name]
            np.testing.assert_array_equal(e.fire, s.fire)
            np.testing.assert_allclose(e.sum, s.sum, rtol=1e-9)
            if s.cofire is not None:
                np.testing.assert_array_equal(e.cofire, s.cofire)
    for name, c in fresh.pair.cross.items():
        np.testing.assert_array_equal(edited.pair.cross[name].cofire, c.cofire)
        np.testing.assert_allclose(edited.pair.cross[name].sum_products, c.sum_products, rtol=1e-9)
