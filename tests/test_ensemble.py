"""The fused ensemble graph against its members run one by one and combined by runtime.metrics.combine."""

from __future__ import annotations

import hashlib
import itertools
import json

import numpy as np
import onnx
import pytest

from codec.errors import ConfigError, ShapeError
from codec.ir import Activation, Conv, Dense, Flatten, NetworkIR, Pool, Role, lower, to_bytes
from codec.ir.ensemble import (
    CRITERIA,
    ENSEMBLE_KEY,
    check_shares_csn,
    emit_ensemble,
    ensemble_description,
    ensemble_parameter_count,
)
from codec.runtime.evaluation.metrics import combine

RELU = Activation("relu")
SOFTMAX = Activation("softmax")
SIGMOID = Activation("sigmoid")


def _normal(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def run_all(model, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(to_bytes(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: x})))


def member_probs(members, x) -> np.ndarray:
    """Each member lowered on its own and run with onnxruntime: (M, N, K)."""
    return np.stack([run_all(lower(m), x)["output"] for m in members])


# Packed vs per-member graph: a packed layer computes each output element as the same dot product over
# the same inputs (a concatenated Gemm is per row, a grouped Conv per member), so the results differ by
# float32 rounding of another blocking order at most, and a layer reading [CSN part, own part] sums the
# two parts' dot products separately (one more rounding). Measured on these tests: independent MLPs
# exact (0.0), CSN-sharing members up to 5.1e-7 on member probabilities, so 1e-6. prod's collect sums
# logs of probabilities down to ~1e-22, whose logits carry float32 errors of ~4e-6 (the ulp at |z| ~ 50),
# so the same rounding moves its output by up to 2.7e-6 (measured): 1e-5 there, as for prod vs combine.
PACKED_ATOL = 1e-6
PACKED_PROD_ATOL = 1e-5


def assert_fused_matches(members, csn, x, criteria=CRITERIA, atol=1e-5, **kw) -> dict:
    """For every criterion, packed and per-member: the fused graph passes the full ONNX check, its member
    outputs equal the members run alone, its output equals combine() of those, and the packed graph's
    outputs equal the per-member graph's within PACKED_ATOL. Returns the per-member models by criterion."""
    reference = member_probs(members, x)
    models = {}
    for criterion in criteria:
        arms = {}
        for packed in (False, True):
            model = emit_ensemble(members, csn, criterion=criterion, member_outputs=True, packed=packed, **kw)
            onnx.checker.check_model(onnx.load_from_string(to_bytes(model)), full_check=True)
            outs = run_all(model, x)
            assert list(outs) == ["output"] + [f"member_{i}" for i in range(len(members))]
            for i in range(len(members)):
                np.testing.assert_allclose(
                    outs[f"member_{i}"], reference[i], atol=1e-5, err_msg=f"member {i}"
                )
            np.testing.assert_allclose(
                outs["output"],
                combine(outs_stack(outs, len(members)), criterion),
                atol=atol,
                err_msg=criterion,
            )
            np.testing.assert_allclose(
                outs["output"], combine(reference, criterion), atol=atol, err_msg=criterion
            )
            assert stored_parameters(model) == ensemble_parameter_count(members, csn)["total_stored"]
            arms[packed] = (model, outs)
        for name in arms[False][1]:
            tolerance = PACKED_PROD_ATOL if criterion == "prod" and name == "output" else PACKED_ATOL
            np.testing.assert_allclose(
                arms[True][1][name],
                arms[False][1][name],
                rtol=0,
                atol=tolerance,
                err_msg=f"{criterion} {name}: packed vs per-member",
            )
        models[criterion] = arms[False][0]
    return models


def outs_stack(outs, m):
    return np.stack([outs[f"member_{i}"] for i in range(m)])


def initializer_hashes(model) -> list[str]:
    return [_digest(v.const_value.numpy()) for v in model.graph.initializers.values()]


def _digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    return hashlib.sha256(str(array.shape).encode() + str(array.dtype).encode() + array.tobytes()).hexdigest()


def stored_parameters(model) -> int:
    return sum(
        v.const_value.numpy().size
        for v in model.graph.initializers.values()
        if not v.name.startswith("collect/")
    )


def op_count(model, op_type: str) -> int:
    return sum(node.op_type == op_type for node in model.graph)


def assert_csn_stored_once(model, csn: NetworkIR, depth: int | None = None) -> None:
    hashes = initializer_hashes(model)
    for layer in csn.compute_layers()[:depth]:
        for tensor in (layer.weight, layer.bias):
            assert hashes.count(_digest(tensor)) == 1, (
                f"CSN tensor of {layer.name} stored {hashes.count(_digest(tensor))} times"
            )


# ----------------------------------------------------------------------------------------------------
# (a) independent members
# ----------------------------------------------------------------------------------------------------


def _mlp(rng, name, widths=(20, 16, 12, 5), out=SOFTMAX, scale=0.5) -> NetworkIR:
    layers = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        last = i == len(widths) - 2
        layers.append(
            Dense(
                "out" if last else f"fc{i + 1}",
                _normal(rng, n_out, n_in, scale=scale),
                _normal(rng, n_out, scale=0.3),
                out if last else RELU,
            )
        )
    return NetworkIR(name, "input", "output", (widths[0],), layers)


def test_independent_members_all_criteria():
    rng = np.random.default_rng(0)
    members = [_mlp(rng, f"m{i}", widths=(20, 16 + i, 12, 5)) for i in range(4)]
    x = _normal(rng, 200, 20)
    models = assert_fused_matches(members, None, x)
    model = models["prod"]
    assert model.opset_imports[""] == 18
    assert stored_parameters(model) == sum(m.num_parameters for m in members)
    assert op_count(model, "Concat") == 0
    description = ensemble_description(model)
    assert description["members"] == ["m0", "m1", "m2", "m3"] and description["criterion"] == "prod"
    assert description["csn"] == [] and description["shared_layers"] == [0, 0, 0, 0]
    assert "codec.version" in model.metadata_props


def test_prod_with_vetoes_between_confident_members_in_both_precisions():
    rng = np.random.default_rng(1)
    # large weights: confident members that disagree, whose softmax gives exact zeros (vetoes) to each
    # other's favourite classes; a float32 clip instead of counting zeros picks other winners here
    members = [_mlp(rng, f"m{i}", scale=2.0) for i in range(6)]
    x = _normal(rng, 300, 20)
    probs = member_probs(members, x)
    assert (probs == 0).mean() > 0.3
    reference = combine(probs, "prod")
    for packed in (True, False):  # the stacked collect stage (one pack) and the per-member one
        out64 = run_all(emit_ensemble(members, criterion="prod", precision="float64", packed=packed), x)[
            "output"
        ]
        out32 = run_all(emit_ensemble(members, criterion="prod", packed=packed), x)["output"]
        np.testing.assert_allclose(out64, reference, atol=1e-7)
        np.testing.assert_allclose(out32, reference, atol=1e-5)
        np.testing.assert_array_equal(out32.argmax(axis=1), reference.argmax(axis=1))
    assert ensemble_description(emit_ensemble(members, precision="float64"))["precision"] == "float64"


def test_image_input_flattened_once_for_all_members():
    rng = np.random.default_rng(14)
    members = []
    for i in range(3):
        mlp = _mlp(rng, f"m{i}", widths=(20, 6 + i, 3))
        members.append(NetworkIR(mlp.name, "input", "output", (1, 4, 5), [Flatten("flat"), *mlp.layers]))
    x = rng.random((16, 1, 4, 5), dtype=np.float32)
    models = assert_fused_matches(members, None, x, criteria=("mean",))
    assert op_count(models["mean"], "Flatten") == 1  # the same op on the same (shared) input


def test_only_requested_output_without_member_outputs():
    rng = np.random.default_rng(2)
    members = [_mlp(rng, "a"), _mlp(rng, "b")]
    outs = run_all(emit_ensemble(members, criterion="mean", names=["first", "second"]), _normal(rng, 10, 20))
    assert list(outs) == ["output"]
    assert ensemble_description(emit_ensemble(members, names=["first", "second"]))["members"] == [
        "first",
        "second",
    ]


# ----------------------------------------------------------------------------------------------------
# (b) members sharing a CSN found by the real CSNE path
# ----------------------------------------------------------------------------------------------------


def _regrow(rewritten: NetworkIR, rng, name: str) -> NetworkIR:
    """A 'grown' member: the rewritten main with every non-frozen row and the output layer re-randomised."""
    net = rewritten.copy()
    net.name = name
    for layer in net.compute_layers():
        own = layer.roles != Role.FROZEN_SHARED
        layer.weight[own] = _normal(rng, int(own.sum()), layer.weight.shape[1], scale=0.5)
        layer.bias[own] = _normal(rng, int(own.sum()), scale=0.3)
    return net


@pytest.fixture(scope="module")
def csne_members():
    from test_passes import planted_pair

    from codec.passes.base import Calibration, EnsembleModule
    from codec.passes.manager import PassManager
    from codec.passes.registry import parse_pipeline

    main, peer, *_ = planted_pair(np.random.default_rng(0))
    calibration = Calibration(
        np.random.default_rng(7).standard_normal((3000, 20)).astype(np.float32), batch_size=512
    )
    module = EnsembleModule({"main": main, "peer": peer}, calibration)
    out, _ = PassManager(parse_pipeline("nda{fire=0.0},csne{fire=0.99,corr=0.99}")).run(module)
    rewritten, csn = out.members["main"], out.csn.network
    rng = np.random.default_rng(3)
    grown = [_regrow(rewritten, rng, f"grown{i}") for i in range(2)]
    return rewritten, csn, grown, peer


def test_csne_shared_members_all_criteria(csne_members):
    rewritten, csn, grown, peer = csne_members
    members = [rewritten, *grown, peer]
    assert [check_shares_csn(m, csn) for m in members] == [2, 2, 2, 0]
    x = np.random.default_rng(4).standard_normal((256, 20)).astype(np.float32)
    models = assert_fused_matches(members, csn, x)
    for model in models.values():
        assert_csn_stored_once(model, csn)
    model = models["prod"]
    counts = ensemble_parameter_count(members, csn)
    assert stored_parameters(model) == counts["total_stored"]
    assert counts["csn"] == csn.num_parameters
    assert counts["total_stored"] < counts["unshared"]
    assert counts["members"][3] == peer.num_parameters
    # each sharing member computes only its own rows: fc1 has 16 neurons of which the CSN holds 10
    k1 = csn.compute_layers()[0].num_neurons
    own_fc1 = model.graph.initializers["m1/fc1.own.weight"].const_value.numpy()
    np.testing.assert_array_equal(own_fc1, grown[0].layer("fc1").weight[k1:])
    assert op_count(model, "Concat") == 2 * 3
    description = ensemble_description(model)
    assert [c["neurons"] for c in description["csn"]] == [layer.num_neurons for layer in csn.compute_layers()]
    assert description["shared_layers"] == [2, 2, 2, 0]


def test_check_shares_csn_catches_modified_frozen_rows(csne_members):
    rewritten, csn, grown, _ = csne_members
    tampered = grown[0].copy()
    tampered.layer("fc2").weight[1, 0] += 1e-3
    with pytest.raises(ShapeError, match="frozen-shared rows of layer 'fc2' differ"):
        check_shares_csn(tampered, csn)
    with pytest.raises(ShapeError, match="differ"):
        emit_ensemble([rewritten, tampered], csn)
    leaky = grown[0].copy()
    leaky.layer("fc2").weight[0, -1] = 0.5  # a CSN neuron reading a non-CSN neuron of fc1
    with pytest.raises(ShapeError, match="read non-CSN inputs"):
        check_shares_csn(leaky, csn)
    biased = grown[0].copy()
    biased.layer("fc1").bias[0] += 1.0
    with pytest.raises(ShapeError, match="biases of layer 'fc1'"):
        check_shares_csn(biased, csn)
    fewer = grown[0].copy()
    fewer.layer("fc1").roles[3] = Role.TRAINABLE
    with pytest.raises(ShapeError, match="not its leading"):
        check_shares_csn(fewer, csn)
    short = grown[0].copy()
    short.layer("fc1").roles[-1 + csn.compute_layers()[0].num_neurons] = Role.TRAINABLE
    with pytest.raises(ShapeError, match="frozen-shared neurons but CSN layer 0 has"):
        check_shares_csn(short, csn)
    other_activation = grown[0].copy()
    other_activation.layer("fc1").activation = Activation("tanh")
    with pytest.raises(ShapeError, match="differs from CSN layer"):
        check_shares_csn(other_activation, csn)


def test_member_sharing_fewer_layers_than_the_csn(csne_members):
    _, csn, grown, _ = csne_members
    partial = grown[1].copy()
    partial.layer("fc2").roles[:] = Role.TRAINABLE  # keeps fc2's CSN rows as ordinary own neurons
    assert check_shares_csn(partial, csn) == 1
    x = np.random.default_rng(5).standard_normal((64, 20)).astype(np.float32)
    assert_fused_matches([partial, grown[0]], csn, x, criteria=("mean",))
    # only the partial member: the CSN's second layer is not needed, so not emitted
    model = emit_ensemble([partial], csn)
    assert_csn_stored_once(model, csn, depth=1)
    assert _digest(csn.compute_layers()[1].weight) not in initializer_hashes(model)
    assert ensemble_parameter_count([partial], csn)["csn"] == csn.compute_layers()[0].num_parameters


# ----------------------------------------------------------------------------------------------------
# (c) a CNN whose CSN covers some conv channels, then Flatten + Dense
# ----------------------------------------------------------------------------------------------------


def _cnn_member(rng, name, csn_parts, widths=(6, 5, 12), share=3) -> NetworkIR:
    """input (2, 8, 8) -> conv c1 -> maxpool -> conv c2 -> flatten -> dense fc -> dense out (4, softmax);
    the first `share` compute layers start with the CSN's neurons (zero weights on non-CSN inputs)."""
    c1w, c1b, c2w, c2b, fcw, fcb = csn_parts
    n1, n2, n3 = widths
    w1, b1 = _normal(rng, n1, 2, 3, 3, scale=0.5), _normal(rng, n1, scale=0.2)
    w2, b2 = _normal(rng, n2, n1, 3, 3, scale=0.3), _normal(rng, n2, scale=0.2)
    w3, b3 = _normal(rng, n3, n2 * 16, scale=0.2), _normal(rng, n3, scale=0.2)
    roles = [np.zeros(n, np.int8) for n in widths]
    k1, k2, k3 = len(c1b), len(c2b), len(fcb)
    if share >= 1:
        w1[:k1], b1[:k1] = c1w, c1b
        roles[0][:k1] = Role.FROZEN_SHARED
    if share >= 2:
        w2[:k2] = 0.0
        w2[:k2, :k1], b2[:k2] = c2w, c2b
        roles[1][:k2] = Role.FROZEN_SHARED
    if share >= 3:
        w3[:k3] = 0.0
        w3[:k3, : k2 * 16], b3[:k3] = fcw, fcb  # channel-major: CSN channels' features come first
        roles[2][:k3] = Role.FROZEN_SHARED
    return NetworkIR(
        name,
        "input",
        "output",
        (2, 8, 8),
        [
            Conv("c1", w1, b1, RELU, roles=roles[0], pads=(1, 1, 1, 1)),
            Pool("p1", "max", (2, 2), (2, 2)),
            Conv("c2", w2, b2, RELU, roles=roles[1], pads=(1, 1, 1, 1)),
            Flatten("flat"),
            Dense("fc", w3, b3, RELU, roles=roles[2]),
            Dense("out", _normal(rng, 4, n3, scale=0.5), _normal(rng, 4, scale=0.1), SOFTMAX),
        ],
    )


def test_cnn_with_partly_shared_conv_channels():
    rng = np.random.default_rng(6)
    parts = (
        _normal(rng, 3, 2, 3, 3, scale=0.5),
        _normal(rng, 3, scale=0.2),
        _normal(rng, 2, 3, 3, 3, scale=0.3),
        _normal(rng, 2, scale=0.2),
        _normal(rng, 4, 32, scale=0.2),
        _normal(rng, 4, scale=0.2),
    )
    csn = NetworkIR(
        "csn",
        "input",
        "csn",
        (2, 8, 8),
        [
            Conv("c1", parts[0], parts[1], RELU, pads=(1, 1, 1, 1)),
            Pool("p1", "max", (2, 2), (2, 2)),
            Conv("c2", parts[2], parts[3], RELU, pads=(1, 1, 1, 1)),
            Flatten("flat"),
            Dense("fc", parts[4], parts[5], RELU),
        ],
    )
    members = [
        _cnn_member(rng, "a", parts),
        _cnn_member(rng, "b", parts, widths=(8, 4, 10)),  # wider and narrower own parts
        _cnn_member(rng, "c", parts, share=2),  # shares the convolutions only
        _cnn_member(rng, "d", parts, share=0),  # independent
    ]
    assert [check_shares_csn(m, csn) for m in members] == [3, 3, 2, 0]
    x = rng.random((64, 2, 8, 8), dtype=np.float32)
    models = assert_fused_matches(members, csn, x)
    model = models["vote"]
    assert_csn_stored_once(model, csn)
    assert stored_parameters(model) == ensemble_parameter_count(members, csn)["total_stored"]
    assert op_count(model, "Concat") == 3 + 3 + 2
    # a frozen row whose weights on non-CSN channels are not zero does not share the CSN
    bad = members[0].copy()
    bad.layer("c2").weight[0, 4] = 0.1
    with pytest.raises(ShapeError, match="read non-CSN inputs"):
        check_shares_csn(bad, csn)
    # Dense after Flatten: the CSN's fc rows may read only the CSN channels' features (the first 2*16)
    bad = members[0].copy()
    bad.layer("fc").weight[0, 40] = 0.1
    with pytest.raises(ShapeError, match="layer 'fc' read non-CSN inputs"):
        check_shares_csn(bad, csn)
    # the CSN's structural layers must be the members'
    other_pool = csn.copy()
    other_pool.layers[1] = Pool("p1", "avg", (2, 2), (2, 2))
    with pytest.raises(ShapeError, match="differs from CSN layer 'p1'"):
        check_shares_csn(members[0], other_pool)


# ----------------------------------------------------------------------------------------------------
# (d) TreeNet: the CSN is whole layers (a trunk)
# ----------------------------------------------------------------------------------------------------


def test_treenet_trunk_of_whole_conv_layer():
    rng = np.random.default_rng(8)
    trunk_w, trunk_b = _normal(rng, 4, 1, 3, 3, scale=0.5), _normal(rng, 4, scale=0.2)
    csn = NetworkIR("trunk", "input", "csn", (1, 8, 8), [Conv("c1", trunk_w, trunk_b, RELU)])

    def branch(name):
        return NetworkIR(
            name,
            "input",
            "output",
            (1, 8, 8),
            [
                Conv(
                    "c1", trunk_w.copy(), trunk_b.copy(), RELU, roles=np.full(4, Role.FROZEN_SHARED, np.int8)
                ),
                Pool("p1", "max", (2, 2), (2, 2)),
                Conv("c2", _normal(rng, 3, 4, 2, 2, scale=0.5), _normal(rng, 3, scale=0.2), RELU),
                Flatten("flat"),
                Dense("out", _normal(rng, 3, 3 * 2 * 2, scale=0.5), _normal(rng, 3, scale=0.1), SOFTMAX),
            ],
        )

    members = [branch(f"b{i}") for i in range(3)]
    assert [check_shares_csn(m, csn) for m in members] == [1, 1, 1]
    x = rng.random((32, 1, 8, 8), dtype=np.float32)
    models = assert_fused_matches(members, csn, x)
    for model in models.values():
        assert op_count(model, "Concat") == 0
        assert op_count(model, "Conv") == 1 + 3  # the trunk once, one branch conv per member
        assert op_count(model, "MaxPool") == 1  # the pool on the trunk's output is the same for all
        assert_csn_stored_once(model, csn)
    counts = ensemble_parameter_count(members, csn)
    assert counts["csn"] == trunk_w.size + trunk_b.size
    assert counts["members"] == [m.num_parameters - counts["csn"] for m in members]


def test_treenet_trunk_of_two_whole_dense_layers():
    rng = np.random.default_rng(9)
    trunk = _mlp(rng, "trunk", widths=(20, 16, 12), out=RELU)
    trunk.layers[-1].name = "fc2"
    csn = NetworkIR("trunk", "input", "csn", (20,), trunk.layers)
    members = []
    for i in range(3):
        layers = [
            Dense(
                l.name,
                l.weight.copy(),
                l.bias.copy(),
                RELU,
                roles=np.full(l.num_neurons, Role.FROZEN_SHARED, np.int8),
            )
            for l in csn.layers
        ]
        layers.append(Dense("out", _normal(rng, 5, 12), _normal(rng, 5), SOFTMAX))
        members.append(NetworkIR(f"m{i}", "input", "output", (20,), layers))
    members.append(_mlp(rng, "independent", widths=(20, 9, 5)))
    x = _normal(rng, 64, 20)
    models = assert_fused_matches(members, csn, x)
    assert op_count(models["max"], "Gemm") == 2 + 3 + 2
    assert op_count(models["max"], "Concat") == 0


# ----------------------------------------------------------------------------------------------------
# (e) packed inference: members of one architecture computed together
# ----------------------------------------------------------------------------------------------------


def test_packed_mlps_first_layer_is_one_gemm_and_deeper_layers_one_grouped_conv():
    rng = np.random.default_rng(14)
    members = [_mlp(rng, f"m{i}") for i in range(10)]
    x = _normal(rng, 50, 20)
    assert_fused_matches(members, None, x)
    model = emit_ensemble(members)  # packed is the default
    assert ensemble_description(model)["packed"] == [list(range(10))]
    assert op_count(model, "Gemm") == 1  # fc1 of all ten members: weights [10*16, 20]
    assert model.graph.initializers["pack0/fc1.common.weight"].const_value.numpy().shape == (10 * 16, 20)
    # fc2 and out: one 1x1 Conv each over the ten members' rows side by side, group=10
    convs = [node for node in model.graph if node.op_type == "Conv"]
    assert [node.attributes.get_int("group") for node in convs] == [10, 10]
    assert model.graph.initializers["pack0/out.own.weight"].const_value.numpy().shape == (10 * 5, 12, 1, 1)
    assert op_count(model, "Softmax") == 1 and op_count(model, "Relu") == 2
    unpacked = emit_ensemble(members, packed=False)
    assert op_count(unpacked, "Gemm") == 30 and ensemble_description(unpacked)["packed"] == []
    assert (
        stored_parameters(model)
        == stored_parameters(unpacked)
        == ensemble_parameter_count(members)["total_stored"]
    )


def test_packs_keep_member_order_and_leave_unique_architectures_alone():
    rng = np.random.default_rng(15)
    wide, narrow = (20, 16, 12, 5), (20, 9, 5)
    members = [
        _mlp(rng, "a0", wide),
        _mlp(rng, "b0", narrow),
        _mlp(rng, "single", (20, 7, 7, 5)),
        _mlp(rng, "a1", wide),
        _mlp(rng, "b1", narrow),
        _mlp(rng, "a2", wide, out=SIGMOID),
    ]  # another output activation: its own
    x = _normal(rng, 40, 20)
    assert_fused_matches(members, None, x)
    model = emit_ensemble(members)
    assert ensemble_description(model)["packed"] == [[0, 3], [1, 4]]
    assert (
        op_count(model, "Gemm") == 2 + 3 + 3
    )  # one per pack (first layers) + the two single members' layers


def test_packed_cnn_members_with_partly_shared_channels():
    rng = np.random.default_rng(16)
    parts = (
        _normal(rng, 3, 2, 3, 3, scale=0.5),
        _normal(rng, 3, scale=0.2),
        _normal(rng, 2, 3, 3, 3, scale=0.3),
        _normal(rng, 2, scale=0.2),
        _normal(rng, 4, 32, scale=0.2),
        _normal(rng, 4, scale=0.2),
    )
    csn = NetworkIR(
        "csn",
        "input",
        "csn",
        (2, 8, 8),
        [
            Conv("c1", parts[0], parts[1], RELU, pads=(1, 1, 1, 1)),
            Pool("p1", "max", (2, 2), (2, 2)),
            Conv("c2", parts[2], parts[3], RELU, pads=(1, 1, 1, 1)),
            Flatten("flat"),
            Dense("fc", parts[4], parts[5], RELU),
        ],
    )
    members = [
        _cnn_member(rng, f"{kind}{i}", parts, share=share)
        for i in range(2)
        for kind, share in (("a", 3), ("c", 2), ("d", 0))
    ]
    assert [check_shares_csn(m, csn) for m in members] == [3, 2, 0] * 2
    x = rng.random((48, 2, 8, 8), dtype=np.float32)
    assert_fused_matches(members, csn, x)
    model = emit_ensemble(members, csn, criterion="mean")
    assert ensemble_description(model)["packed"] == [[0, 3], [1, 4], [2, 5]]
    assert_csn_stored_once(model, csn)
    grouped = [
        node.name
        for node in model.graph
        if node.op_type == "Conv" and node.attributes.get_int("group", 1) == 2
    ]
    # each pack's c2 reads its members' own c1 channels (grouped), as do its Dense layers past the Flatten
    # (1x1 Conv): fc (not in the CSN for pack 2) and out
    assert sorted(grouped) == sorted(
        [
            *(f"pack{i}/{name}.own" for i in range(3) for name in ("c2", "out")),
            "pack2/fc.own",
            "pack0/fc.own",
            "pack1/fc.own",
        ]
    )
    # c1 reads the input only: one Conv over concatenated filters per pack (and the CSN's), no per-member Conv
    convs = (
        2 + 3 + 3 + 2
    )  # CSN c1, c2; each pack's c1; grouped c2s; the common part of c2 in the two sharing packs
    assert op_count(model, "Conv") == convs + 3 + 3  # + grouped 1x1 fc and out
    # [CSN part, own part] is never materialised: the one Concat stacks the three packs for the collect stage
    assert [node.name for node in model.graph if node.op_type == "Concat"] == ["collect/members"]


def test_conv_output_members_packed_and_a_softmax_conv_left_unpacked():
    rng = np.random.default_rng(17)

    def conv_net(
        name, activation
    ):  # outputs the conv's (3, 2, 2) map: the pack's output is split on channels
        return NetworkIR(
            name,
            "input",
            "output",
            (1, 4, 4),
            [
                Conv("c1", _normal(rng, 4, 1, 2, 2), _normal(rng, 4), RELU),
                Conv("c2", _normal(rng, 3, 4, 2, 2), _normal(rng, 3), activation, pads=(0, 0, 1, 1)),
            ],
        )

    x = rng.random((16, 1, 4, 4), dtype=np.float32)
    # a softmax over channels cannot run on the channels of several members
    for activation, packs in ((SIGMOID, [[0, 1, 2]]), (SOFTMAX, [])):
        members = [conv_net(f"m{i}", activation) for i in range(3)]
        reference = member_probs(members, x)
        model = emit_ensemble(members, task="reconstruction", member_outputs=True)
        onnx.checker.check_model(onnx.load_from_string(to_bytes(model)), full_check=True)
        assert ensemble_description(model)["packed"] == packs
        outs = run_all(model, x)
        for i in range(3):
            np.testing.assert_allclose(outs[f"member_{i}"], reference[i], rtol=0, atol=PACKED_ATOL)
        np.testing.assert_allclose(outs["output"], reference.mean(axis=0), rtol=0, atol=PACKED_ATOL)


# ----------------------------------------------------------------------------------------------------
# collect-stage edge cases, reconstruction, errors
# ----------------------------------------------------------------------------------------------------


def _constant_member(name, bias, num_inputs=6, activation=SIGMOID) -> NetworkIR:
    """A member whose output ignores its input: out = activation(bias)."""
    bias = np.asarray(bias, np.float32)
    return NetworkIR(
        name,
        "input",
        "output",
        (num_inputs,),
        [Dense("out", np.zeros((len(bias), num_inputs), np.float32), bias, activation)],
    )


def test_collect_edge_cases_ties_vetoes_and_all_zero_rows():
    rng = np.random.default_rng(10)
    x = _normal(rng, 8, 6)
    veto = _constant_member("veto", [-1e4, 0.0, 3.0])  # class 0 exactly 0
    zeros = _constant_member("zeros", [-1e4, -1e4, -1e4])  # every class exactly 0
    uniform = _constant_member("uniform", [0.0, 0.0, 0.0], activation=SOFTMAX)  # a three-way tie
    varying = NetworkIR(
        "varying", "input", "output", (6,), [Dense("out", _normal(rng, 3, 6), _normal(rng, 3), SIGMOID)]
    )
    assert member_probs([veto], x)[0, 0, 0] == 0.0 and not member_probs([zeros], x).any()
    assert_fused_matches([veto, zeros, varying], None, x)
    assert_fused_matches([zeros, zeros], None, x)  # max and prod: an all-zero row is uniform
    for packed in (True, False):
        outs = run_all(emit_ensemble([zeros, uniform], criterion="vote", packed=packed), x)
        np.testing.assert_array_equal(outs["output"], np.tile([1.0, 0.0, 0.0], (8, 1)))  # ties: lowest index
        np.testing.assert_allclose(
            run_all(emit_ensemble([zeros, zeros], criterion="max", packed=packed), x)["output"], 1 / 3
        )


def test_reconstruction_ensemble_is_the_mean():
    rng = np.random.default_rng(11)
    members = [_mlp(rng, f"ae{i}", widths=(12, 6, 12), out=SIGMOID) for i in range(3)]
    x = rng.random((20, 12), dtype=np.float32)
    for packed in (False, True):
        model = emit_ensemble(members, task="reconstruction", member_outputs=True, packed=packed)
        onnx.checker.check_model(onnx.load_from_string(to_bytes(model)), full_check=True)
        outs = run_all(model, x)
        np.testing.assert_allclose(outs["output"], member_probs(members, x).mean(axis=0), atol=1e-6)
    assert (
        ensemble_description(model)["criterion"] == "mean"
        and ensemble_description(model)["task"] == "reconstruction"
    )
    with pytest.raises(ConfigError, match="criterion must be mean"):
        emit_ensemble(members, task="reconstruction", criterion="prod")


def test_bad_options_and_members():
    rng = np.random.default_rng(12)
    members = [_mlp(rng, "a"), _mlp(rng, "b")]
    with pytest.raises(ConfigError, match="unknown ensemble criterion 'median'"):
        emit_ensemble(members, criterion="median")
    with pytest.raises(ConfigError, match="unknown task"):
        emit_ensemble(members, task="detection")
    with pytest.raises(ConfigError, match="precision"):
        emit_ensemble(members, precision="float16")
    with pytest.raises(ConfigError, match="2 members"):
        emit_ensemble(members, names=["only-one"])
    with pytest.raises(ConfigError, match="at least one member"):
        emit_ensemble([])
    with pytest.raises(ShapeError, match="outputs \\[4\\]"):
        emit_ensemble([members[0], _mlp(rng, "c", widths=(20, 8, 4))])
    with pytest.raises(ShapeError, match="takes input \\[10\\]"):
        emit_ensemble([members[0], _mlp(rng, "c", widths=(10, 8, 5))])
    with pytest.raises(ConfigError, match="does not output probabilities"):
        emit_ensemble([members[0], _mlp(rng, "logits", out=Activation("identity"))])
    for error in (ConfigError, ShapeError):
        try:
            emit_ensemble(
                members,
                criterion="median" if error is ConfigError else "prod",
                names=None,
                csn=None if error is ConfigError else _mlp(rng, "csn", widths=(7, 3)),
            )
        except error as exc:
            assert "\n" not in str(exc)


def test_metadata_is_json_and_user_metadata_is_kept():
    rng = np.random.default_rng(13)
    members = [_mlp(rng, "a"), _mlp(rng, "b")]
    model = emit_ensemble(
        members, criterion="max", metadata={"codec.members": json.dumps(["a.onnx", "b.onnx"])}
    )
    assert json.loads(model.metadata_props["codec.members"]) == ["a.onnx", "b.onnx"]
    description = json.loads(model.metadata_props[ENSEMBLE_KEY])
    assert description["parameters"]["total_stored"] == sum(m.num_parameters for m in members)
    assert description["parameters"]["members"] == [m.num_parameters for m in members]
    assert description["prod_eps"] is None and description["member_outputs"] == []


# ----------------------------------------------------------------------------------------------------
# onnxruntime's CUDA provider
# ----------------------------------------------------------------------------------------------------


def test_sessions_put_cuda_first_when_onnxruntime_has_it(monkeypatch):
    import onnxruntime as ort

    from codec.runtime.execution.session import providers

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert providers() == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert providers() == ["CPUExecutionProvider"]


def _ort_has_cuda() -> bool:
    import onnxruntime as ort

    return "CUDAExecutionProvider" in ort.get_available_providers()


@pytest.mark.skipif(not _ort_has_cuda(), reason="this onnxruntime build has no CUDA provider")
def test_packed_ensemble_runs_on_cuda_like_on_cpu():
    from codec.runtime.execution.session import create_session

    rng = np.random.default_rng(18)
    members = [_mlp(rng, f"m{i}") for i in range(4)]
    x = _normal(rng, 64, 20)
    model = to_bytes(emit_ensemble(members, member_outputs=True))
    session = create_session(model)
    if session.get_providers()[0] != "CUDAExecutionProvider":
        pytest.skip("onnxruntime has a CUDA provider but no usable GPU")
    on_gpu = session.run(None, {"input": x})
    on_cpu = run_all(emit_ensemble(members, member_outputs=True), x)
    # GPU GEMMs sum in another order (and may use TF32 on recent GPUs): agreement to 1e-3, not bit level
    for gpu, (name, cpu) in zip(on_gpu, on_cpu.items()):
        np.testing.assert_allclose(gpu, cpu, rtol=0, atol=1e-3, err_msg=name)
