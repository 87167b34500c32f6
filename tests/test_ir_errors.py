"""Malformed and unsupported graphs are refused with one readable line naming the node and op."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from codec.errors import LiftError, ModelLoadError
from codec.ir import lift


def _model(nodes, inits, in_shape=("n", 4), out_shape=("n", 3), inputs=None) -> bytes:
    graph = helper.make_graph(
        nodes,
        "g",
        inputs or [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


W = np.ones((3, 4), np.float32)
B = np.zeros(3, np.float32)


def test_unsupported_op_names_node_and_op():
    model = _model(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
            helper.make_node("Cos", ["h"], ["y"], name="weird"),
        ],
        {"w": W, "b": B},
    )
    with pytest.raises(LiftError) as err:
        lift(model)
    assert err.value.node == "weird" and err.value.op_type == "Cos"
    assert "'weird'" in str(err.value) and "Cos" in str(err.value) and "\n" not in str(err.value)


def test_missing_initializer():
    model = _model([helper.make_node("Gemm", ["x", "w_missing", "b"], ["y"], name="fc", transB=1)], {"b": B})
    with pytest.raises((LiftError, ModelLoadError)) as err:
        lift(model)
    assert "w_missing" in str(err.value)


def test_truncated_file(tmp_path):
    good = _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], {"w": W, "b": B})
    path = tmp_path / "cut.onnx"
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelLoadError) as err:
        lift(path)
    assert "cut.onnx" in str(err.value)


def test_not_onnx_and_missing_file(tmp_path):
    path = tmp_path / "notes.onnx"
    path.write_text("this is not a model")
    with pytest.raises(ModelLoadError):
        lift(path)
    with pytest.raises(ModelLoadError, match="no such model file"):
        lift(tmp_path / "absent.onnx")


@pytest.mark.parametrize("shape", [("n",), ("n", 2, 2, 2, 4)], ids=["rank1", "rank5"])
def test_wrong_input_rank(shape):
    model = _model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        {"w": W, "b": B},
        in_shape=shape,
    )
    with pytest.raises(LiftError, match="rank"):
        lift(model)


def test_dynamic_feature_dimension_refused():
    model = _model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        {"w": W, "b": B},
        in_shape=("n", "f"),
    )
    with pytest.raises(LiftError, match="batch dimension"):
        lift(model)


def test_weight_shape_mismatch_names_node():
    model = _model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        {"w": np.ones((3, 5), np.float32), "b": B},
    )
    with pytest.raises(LiftError, match="5 input features but receives 4") as err:
        lift(model)
    assert err.value.node == "fc"


def test_activation_of_a_branched_value_refused():
    # relu(h) + h: folding the ReLU into fc would change what the Add reads
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Add", ["h", "r"], ["y"], name="skip"),
    ]
    with pytest.raises(LiftError, match="skip \\(Add\\) reads that value too") as err:
        lift(_model(nodes, {"w": W, "b": B}))
    assert err.value.node == "relu"


def test_nan_weights_refused():
    model = _model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        {"w": np.full((3, 4), np.nan, np.float32), "b": B},
    )
    with pytest.raises(LiftError, match="NaN"):
        lift(model)


def test_integer_input_refused():
    model = _model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        {"w": W, "b": B},
        inputs=[helper.make_tensor_value_info("x", TensorProto.INT64, ["n", 4])],
    )
    with pytest.raises(LiftError, match="float32"):
        lift(model)


def test_activation_without_layer_refused():
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="early"),
        helper.make_node("Gemm", ["r", "w", "b"], ["y"], name="fc", transB=1),
    ]
    with pytest.raises(LiftError) as err:
        lift(_model(nodes, {"w": W, "b": B}))
    assert err.value.node == "early"


def test_grouped_conv_that_does_not_split_refused():
    # 4 filters cannot be split into 3 groups (grouped convolutions themselves lift: test_ir_roundtrip)
    w = np.ones((4, 1, 3, 3), np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="dw", group=3)]
    with pytest.raises(LiftError, match="in 3 groups does not fit") as err:
        lift(_model(nodes, {"w": w}, in_shape=("n", 3, 5, 5), out_shape=("n", 4, 3, 3)))
    assert err.value.op_type == "Conv"


def test_external_data_outside_model_dir_refused(tmp_path):
    import onnx
    from onnx import external_data_helper

    proto = onnx.load_from_string(
        _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], {"w": W, "b": B})
    )
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.ones(12, np.float32).tobytes())
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    tensor = proto.graph.initializer[0]
    external_data_helper.set_external_data(tensor, location="../secret.bin", offset=0, length=48)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    path = model_dir / "evil.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelLoadError, match="outside the model's directory"):
        lift(path)


def test_cyclic_graph_refused():
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
        helper.make_node("Add", ["h", "loop"], ["a"], name="add_loop"),
        helper.make_node("Relu", ["a"], ["loop"], name="back"),
    ]
    # the output 'y' is produced by nothing and add_loop <-> back form a cycle: refused, naming a node
    with pytest.raises(LiftError) as err:
        lift(_model(nodes, {"w": W, "b": B}))
    assert err.value.node in ("add_loop", "back")


# ---------------------------------------------------------------------------------------------------
# Second round (issue 17): every rewrite lift makes commutes for the attributes at hand, or is refused;
# every lift is checked against onnxruntime; models onnxruntime refuses are refused.
# ---------------------------------------------------------------------------------------------------

RNG = np.random.default_rng(17)
CONV_W = RNG.standard_normal((2, 1, 2, 2)).astype(np.float32)
CONV_B = RNG.standard_normal(2).astype(np.float32)


def _free_model(nodes, inits, in_shape, opset: int | None = 18) -> bytes:
    """A model whose output shape is left to inference (so no declared shape can hide a difference)."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    opsets = [] if opset is None else [helper.make_opsetid("", opset)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def _conv_pool_act(pool: str, act: str, **act_attrs) -> bytes:
    pool_attrs = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[2, 2]),
        helper.make_node(pool, ["c"], ["p"], name="pool", **pool_attrs),
        helper.make_node(act, ["p"], ["y"], name="act", **act_attrs),
    ]
    return _free_model(nodes, {"w": CONV_W, "b": CONV_B}, ("n", 1, 7, 7))


def _agrees_with_onnxruntime(model: bytes, net, shape) -> None:
    from conftest import run_onnx

    from codec.ir import lower, to_bytes

    x = RNG.standard_normal((3, *shape)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(to_bytes(lower(net)), x), run_onnx(model, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "act, attrs, moves",
    [
        ("Relu", {}, True),
        ("Sigmoid", {}, True),
        ("Tanh", {}, True),
        ("LeakyRelu", {"alpha": 0.1}, True),
        ("LeakyRelu", {"alpha": 0.0}, True),
        ("LeakyRelu", {"alpha": 3.0}, True),
        ("LeakyRelu", {"alpha": -0.5}, False),
        ("LeakyRelu", {"alpha": -2.0}, False),
    ],
    ids=lambda v: str(v),
)
@pytest.mark.parametrize("pool", ["MaxPool", "AveragePool"])
def test_activation_moves_across_a_pool_only_where_they_commute(pool, act, attrs, moves):
    """Only max pooling with a monotone non-decreasing activation commutes; average pooling with none
    of codec's (non-identity) activations. The rest is refused, never rewritten."""
    model = _conv_pool_act(pool, act, **attrs)
    if pool == "MaxPool" and moves:
        net = lift(model, check=False)
        _agrees_with_onnxruntime(model, net, (1, 7, 7))
    else:
        # after an average pool: refused as an activation with no layer to fuse into (nothing is moved)
        with pytest.raises(
            LiftError, match="do not commute" if pool == "MaxPool" else "activation must follow"
        ) as err:
            lift(model, check=False)
        assert err.value.node == "act" and "\n" not in str(err.value)


POOL_CASES = [
    (mode, pads, ceil, op)
    for mode in ("VALID", "SAME_UPPER", "SAME_LOWER")
    for pads in (None, [1, 1, 1, 1], [0, 1, 0, 1])
    for ceil in (0, 1)
    for op in ("MaxPool", "AveragePool")
]


@pytest.mark.parametrize("mode, pads, ceil, op", POOL_CASES, ids=lambda v: str(v))
@pytest.mark.parametrize("size", [7, 8])
def test_auto_pad_pooling_is_read_as_onnxruntime_reads_it(mode, pads, ceil, op, size):
    """onnxruntime ignores `pads` under any auto_pad (ONNX shape inference does not): such models are
    refused; without explicit pads VALID and SAME_* lift to the pads onnxruntime uses."""
    attrs = {"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": mode, "ceil_mode": ceil}
    if pads:
        attrs["pads"] = pads
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[2, 2]),
        helper.make_node(op, ["c"], ["y"], name="pool", **attrs),
    ]
    model = _free_model(nodes, {"w": CONV_W, "b": CONV_B}, ("n", 1, size, size))
    if pads:
        with pytest.raises(LiftError, match="onnxruntime ignores the pads"):
            lift(model, check=False)
        return
    net = lift(model, check=False)
    _agrees_with_onnxruntime(model, net, (1, size, size))


def test_conv_with_valid_and_explicit_pads_is_refused():
    nodes = [
        helper.make_node(
            "Conv",
            ["x", "w", "b"],
            ["y"],
            name="conv",
            kernel_shape=[2, 2],
            auto_pad="VALID",
            pads=[1, 1, 1, 1],
        )
    ]
    with pytest.raises(LiftError, match="onnxruntime ignores the pads"):
        lift(_free_model(nodes, {"w": CONV_W, "b": CONV_B}, ("n", 1, 7, 7)), check=False)


@pytest.mark.parametrize(
    "shape, ok",
    [
        ((3,), True),
        ((1, 3), True),
        ((1,), True),
        ((), True),
        ((1, 1), True),
        ((1, 1, 3), False),
        ((2, 3), False),
        ((3, 1), False),
    ],
    ids=str,
)
def test_matmul_add_bias_must_be_one_value_per_output(shape, ok):
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
        helper.make_node("Add", ["h", "b"], ["y"], name="add"),
    ]
    bias = RNG.standard_normal(shape).astype(np.float32)
    model = _free_model(nodes, {"w": W.T.copy(), "b": bias}, ("n", 4))
    if ok:
        _agrees_with_onnxruntime(model, lift(model, check=False), (4,))
    else:
        with pytest.raises(LiftError, match="not one value per output feature") as err:
            lift(model, check=False)
        assert err.value.node == "add"


def test_the_parity_check_catches_a_lift_that_changes_the_function():
    """The post-lift check itself: a network that differs from its model (here: a weight changed after
    lifting, standing for any wrong rewrite) or has a different output shape is refused."""
    from codec.ir.lift import check_lift

    model = _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], {"w": W, "b": B})
    net = lift(model)
    check_lift(net, model)
    net.layers[0].weight = net.layers[0].weight * 1.01
    with pytest.raises(LiftError, match="differs from the model under onnxruntime"):
        check_lift(net, model)


def test_the_parity_check_is_on_by_default_and_skipping_it_is_recorded(monkeypatch):
    from codec.errors import ConfigError

    model = _free_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], {"w": W, "b": B}, ("n", 4)
    )
    assert "codec.lift_check" not in lift(model).metadata
    monkeypatch.setenv("CODEC_LIFT_CHECK", "0")
    assert lift(model).metadata["codec.lift_check"] == "skipped"
    monkeypatch.setenv("CODEC_LIFT_CHECK", "maybe")
    with pytest.raises(ConfigError, match="CODEC_LIFT_CHECK"):
        lift(model)


@pytest.mark.parametrize(
    "opset, ok",
    [(None, False), (1, False), (6, False), (7, True), (13, True), (18, True), (999, False)],
    ids=str,
)
def test_opsets_onnxruntime_refuses_are_refused(opset, ok):
    model = _free_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        {"w": W, "b": B},
        ("n", 4),
        opset,
    )
    if ok:
        lift(model)
        lift(model, check=False)
    else:
        with pytest.raises(ModelLoadError, match="opset") as err:
            lift(model, check=False)
        assert "\n" not in str(err.value)


def test_duplicate_node_names_are_refused():
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
        helper.make_node("Relu", ["h"], ["y"], name="fc"),
    ]
    with pytest.raises(ModelLoadError, match="two nodes are named 'fc'"):
        lift(_free_model(nodes, {"w": W, "b": B}, ("n", 4)), check=False)


def test_float64_weights_beyond_float32_are_refused_not_made_inf():
    big = np.full((3, 4), 1e300, np.float64)
    model = _free_model(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        {"w": big, "b": B.astype(np.float64)},
        ("n", 4),
    )
    for check in (False, True):
        with pytest.raises(LiftError, match="beyond float32's range"):
            lift(model, check=check)


def _w(layer: str) -> str:
    return layer if layer.startswith("W") else f"{layer}.weight"


def _b(layer: str) -> str:
    return layer.replace("W", "B") if layer.startswith("W") else f"{layer}.bias"


def _mlp(input_name: str, output_name: str, first: str, second: str, last_act: str | None) -> bytes:
    w1, b1 = RNG.standard_normal((5, 4)).astype(np.float32), RNG.standard_normal(5).astype(np.float32)
    w2, b2 = RNG.standard_normal((3, 5)).astype(np.float32), RNG.standard_normal(3).astype(np.float32)
    z2 = output_name if last_act is None else "z2"
    # weights named W1/W2 (no ".weight") give layers the node names g1/g2
    nodes = [
        helper.make_node("Gemm", [input_name, _w(first), _b(first)], ["z1"], name="g1", transB=1),
        helper.make_node("Relu", ["z1"], ["h1"], name="r1"),
        helper.make_node("Gemm", ["h1", _w(second), _b(second)], [z2], name="g2", transB=1),
    ]
    if last_act is not None:
        nodes.append(helper.make_node(last_act, ["z2"], [output_name], name="act2"))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, ["n", 3])],
        [
            numpy_helper.from_array(a, n)
            for n, a in {_w(first): w1, _b(first): b1, _w(second): w2, _b(second): b2}.items()
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


@pytest.mark.parametrize(
    "input_name, output_name, first, second, last_act",
    [
        ("x", "fc1", "fc1", "fc2", None),  # output named like the first layer
        ("x", "fc2", "fc1", "fc2", "Softmax"),  # output named like its own layer, below its activation
        ("x", "fc1.relu", "fc1", "fc2", None),  # output named like the first layer's activation
        ("fc1", "y", "fc1", "fc2", None),  # input named like the first layer
        ("g1.weight", "y", "W1", "W2", None),  # input named like the weight codec generates (layer g1)
        ("x", "y", "a", "a.relu", None),  # layers `a` and `a.relu`
        ("x", "g2.bias", "W1", "W2", "Sigmoid"),  # output named like a generated bias
        ("codec.tap.g1", "y", "W1", "W2", None),  # input named like the first layer's profiling tap
        ("x", "codec.tap.g1", "W1", "W2", None),  # output named like the first layer's profiling tap
        ("x", "y", "a", "a.1", None),  # tap `codec.tap.a` moved aside must not take `a.1`'s tap
    ],
    ids=[
        "out=first",
        "out=own-layer",
        "out=activation",
        "in=first",
        "in=weight",
        "a+a.relu",
        "out=weight",
        "in=tap",
        "out=tap",
        "a+a.1",
    ],
)
def test_names_codec_generates_never_collide_with_the_models_names(
    input_name, output_name, first, second, last_act
):
    """lower names every value, node and initializer through one uniquifying rule, so a valid model is
    never refused (or written out invalid) for names codec made up."""
    from conftest import run_onnx

    from codec.ir import lower, to_bytes

    model = _mlp(input_name, output_name, first, second, last_act)
    net = lift(model)  # the parity check runs the lowered model in onnxruntime
    x = RNG.standard_normal((3, 4)).astype(np.float32)
    for taps in (False, True):
        lowered = to_bytes(lower(net, taps=taps))
        np.testing.assert_allclose(run_onnx(lowered, x), run_onnx(model, x), rtol=1e-5, atol=1e-6)
    again = lift(to_bytes(lower(net)))
    assert again.input_name == input_name and again.output_name == output_name
    # The profiler reads the taps back by name: each must be the hidden layer's activation, never the
    # model's own input or output that happens to share the name.
    from codec.runtime.execution.profile import activations

    hidden = activations(net, x)
    first = net.compute_layers()[0]
    expected = np.maximum(x @ first.weight.T + first.bias, 0)
    np.testing.assert_allclose(hidden[first.name], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["dense", "conv"])
def test_a_zero_width_layer_is_refused_at_lift(kind):
    if kind == "dense":
        nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)]
        model = _free_model(
            nodes, {"w": np.zeros((0, 4), np.float32), "b": np.zeros(0, np.float32)}, ("n", 4)
        )
    else:
        nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv", kernel_shape=[2, 2])]
        model = _free_model(nodes, {"w": np.zeros((0, 1, 2, 2), np.float32)}, ("n", 1, 5, 5))
    with pytest.raises(LiftError, match="zero output features|output would be empty"):
        lift(model, check=False)


def test_an_initializer_with_an_empty_name_is_refused(tmp_path):
    """Found by the extended loader fuzzer: onnxruntime binds a Conv's empty bias input to an initializer
    named "" while onnx_ir drops it, so the lift computed another function. Bytes: refused on load;
    a file (onnx_ir drops the tensor before codec sees it): refused by the parity check (onnxruntime
    refuses this one, or computes another function)."""
    nodes = [helper.make_node("Conv", ["x", "w", ""], ["y"], name="conv", kernel_shape=[2, 2])]
    model = _free_model(nodes, {"w": CONV_W, "": CONV_B}, ("n", 1, 5, 5))
    for check in (False, True):
        with pytest.raises(ModelLoadError, match="empty name"):
            lift(model, check=check)
    path = tmp_path / "m.onnx"
    path.write_bytes(model)
    with pytest.raises(
        (ModelLoadError, LiftError), match="onnxruntime refuses the model|differs from the model"
    ):
        lift(path)


def test_residual_add_of_the_network_input_refused():
    # x + fc(x): the input's features cannot be tied to (or removed with) a layer's neurons
    w = np.ones((4, 4), np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
        helper.make_node("Add", ["x", "h"], ["y"], name="skip"),
    ]
    with pytest.raises(LiftError, match="the network input") as err:
        lift(_model(nodes, {"w": w, "b": np.zeros(4, np.float32)}, out_shape=("n", 4)))
    assert (err.value.node, err.value.op_type) == ("skip", "Add")


def test_concat_off_the_neuron_axis_refused():
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
        helper.make_node("Gemm", ["x", "w", "b"], ["g"], name="fc2", transB=1),
        helper.make_node("Concat", ["h", "g"], ["y"], name="join", axis=0),
    ]
    with pytest.raises(LiftError, match="neuron axis") as err:
        lift(_model(nodes, {"w": W, "b": B}))
    assert err.value.node == "join"


def test_dead_branch_refused():
    # fc2 reads the input but nothing reads fc2: refused, naming the node
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1),
        helper.make_node("Gemm", ["x", "w", "b"], ["unused"], name="fc2", transB=1),
    ]
    with pytest.raises(LiftError, match="not on the path") as err:
        lift(_model(nodes, {"w": W, "b": B}))
    assert err.value.node == "fc2"


@pytest.mark.parametrize(
    "alpha, scale, refused",
    [
        (7.7e-34, 2.8e38, True),  # the fuzzer's finding: A @ B overflows in onnxruntime, folded it does not
        (1e30, 1e10, True),  # alpha * B overflows when folded
        (0.5, 3.0, False),  # an ordinary alpha folds and keeps the function
        (1e-3, 1e20, False),  # large weights well inside float32's range
    ],
)
def test_gemm_alpha_is_folded_only_where_it_cannot_change_overflow(alpha, scale, refused):
    """Gemm's alpha is folded into the weights only where A @ B and alpha * B both stay inside float32's
    range (found by tools/fuzz_loader.py, seed 83: with the check off, codec's lift was finite where the
    model gives NaN)."""
    w = (RNG.standard_normal((3, 4)) * scale / 3).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1, alpha=alpha)]
    model = _free_model(nodes, {"w": w}, ("n", 4))
    if refused:
        with pytest.raises(LiftError, match="folding alpha"):
            lift(model, check=False)
    else:
        from conftest import run_onnx

        from codec.ir import lower, to_bytes

        x = RNG.standard_normal((5, 4)).astype(np.float32)
        got = run_onnx(to_bytes(lower(lift(model, check=False))), x)
        np.testing.assert_allclose(got, run_onnx(model, x), rtol=1e-5)


def test_an_attribute_the_opset_does_not_define_is_refused():
    """MaxPool's ceil_mode exists from opset 10: onnxruntime refuses an opset-7 model carrying it, so lift
    does too, with its check off as well (found by the extended hypothesis run)."""
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[2, 2])
    nodes = [conv, helper.make_node("MaxPool", ["c"], ["y"], name="pool", kernel_shape=[2, 2], ceil_mode=0)]
    weights = {"w": CONV_W, "b": CONV_B}
    model = _free_model(nodes, weights, ("n", 1, 7, 7), opset=7)
    for check in (False, True):
        with pytest.raises(ModelLoadError, match="ceil_mode.*opset 7"):
            lift(model, check=check)
    lift(_free_model(nodes, weights, ("n", 1, 7, 7), opset=10))


def test_same_auto_pad_with_an_all_zero_pads_attribute_is_refused():
    """ONNX shape inference applies a `pads` attribute even beside auto_pad=SAME_*, onnxruntime's kernel
    does not: a model with both declares shapes onnxruntime refuses (found by the extended hypothesis run)."""
    attrs = {"kernel_shape": [2, 2], "strides": [1, 1], "auto_pad": "SAME_UPPER"}
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[2, 2])
    weights = {"w": CONV_W, "b": CONV_B}
    with_pads = [conv, helper.make_node("MaxPool", ["c"], ["y"], name="pool", pads=[0, 0, 0, 0], **attrs)]
    with pytest.raises(LiftError, match="auto_pad=SAME_UPPER"):
        lift(_free_model(with_pads, weights, ("n", 1, 7, 7)), check=False)
    without = [conv, helper.make_node("MaxPool", ["c"], ["y"], name="pool", **attrs)]
    lift(_free_model(without, weights, ("n", 1, 7, 7)))
