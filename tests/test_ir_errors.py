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
        [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1), helper.make_node("Cos", ["h"], ["y"], name="weird")],
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
    model = _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], {"w": W, "b": B}, in_shape=shape)
    with pytest.raises(LiftError, match="rank"):
        lift(model)


def test_dynamic_feature_dimension_refused():
    model = _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], {"w": W, "b": B}, in_shape=("n", "f"))
    with pytest.raises(LiftError, match="batch dimension"):
        lift(model)


def test_weight_shape_mismatch_names_node():
    model = _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], {"w": np.ones((3, 5), np.float32), "b": B})
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
    model = _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], {"w": np.full((3, 4), np.nan, np.float32), "b": B})
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
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="early"), helper.make_node("Gemm", ["r", "w", "b"], ["y"], name="fc", transB=1)]
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

    proto = onnx.load_from_string(_model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], {"w": W, "b": B}))
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


def test_residual_add_of_the_network_input_refused():
    # x + fc(x): the input's features cannot be tied to (or removed with) a layer's neurons
    w = np.ones((4, 4), np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1), helper.make_node("Add", ["x", "h"], ["y"], name="skip")]
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
