"""The shared library pieces issue 15 introduced: recipe data (pipelines.data), scoring members
(runtime.evaluation.scoring) and the one-line error helpers (codec.errors)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from codec.errors import ConfigError, ShapeError, first_line, positive_int
from codec.models import get_recipe
from codec.pipelines.data import load_recipe_data
from codec.runtime.evaluation import metrics
from codec.runtime.evaluation.scoring import member_outputs, model_outputs, score_members, softmax_scores
from codec.runtime.training.train import TrainConfig

RNG = np.random.default_rng(0)


def _linear(path, input_dims, num_outputs, seed=0):
    """A tiny linear ONNX model: Flatten -> MatMul."""
    weight = (
        np.random.default_rng(seed).normal(size=(int(np.prod(input_dims)), num_outputs)).astype(np.float32)
    )
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["output"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *input_dims])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", num_outputs])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return path


def test_score_members_classification_is_evaluate_classifier():
    probs = RNG.dirichlet(np.ones(4), size=(3, 50))
    y = RNG.integers(0, 4, size=50)
    assert score_members(probs, "classification", y, "mean") == metrics.evaluate_classifier(probs, y, "mean")


def test_score_members_reconstruction_by_hand():
    x = RNG.random((20, 1, 2, 3))
    recons = RNG.random((3, 20, 6))
    scores = score_members(recons, "reconstruction", x, "mean")
    flat = x.reshape(20, -1)
    assert scores["member_mse"] == pytest.approx([np.mean((r - flat) ** 2) for r in recons])
    assert scores["cumulative_mse"] == pytest.approx(metrics.cumulative_mse(recons, flat))
    assert scores["mse"] == pytest.approx(np.mean((recons.mean(axis=0) - flat) ** 2))


def test_softmax_scores_only_touches_members_that_output_scores():
    probs = RNG.dirichlet(np.ones(3), size=10)
    logits = RNG.normal(size=(10, 3))
    stack, softmaxed = softmax_scores(np.stack([probs, logits]), ["p", "s"])
    assert softmaxed == ["s"]
    np.testing.assert_allclose(stack[0], probs)
    np.testing.assert_allclose(stack[1].sum(axis=1), 1.0)


def test_model_outputs_reshapes_by_the_input_rule(tmp_path):
    # the one rule of runtime/execution/inputs.py: layouts with the same number of values are reshaped
    flat = _linear(tmp_path / "flat.onnx", [12], 2)
    images = RNG.random((5, 1, 3, 4)).astype(np.float32)
    out = model_outputs(flat, images)
    np.testing.assert_allclose(out, model_outputs(flat, images.reshape(5, 12)), rtol=1e-6)
    wide = _linear(tmp_path / "wide.onnx", [13], 2)
    with pytest.raises(ShapeError, match=r"wide.onnx expects \[13\] per example"):
        model_outputs(wide, images)


def test_member_outputs_stacks_and_refuses_members_that_disagree(tmp_path):
    a, b = _linear(tmp_path / "a.onnx", [12], 2, seed=1), _linear(tmp_path / "b.onnx", [12], 2, seed=2)
    x = RNG.random((7, 12)).astype(np.float32)
    stack = member_outputs([a, b], x)
    assert stack.shape == (2, 7, 2) and stack.dtype == np.float64
    three = _linear(tmp_path / "three.onnx", [12], 3)
    with pytest.raises(ShapeError, match=r"outputs \(3\) but .* outputs \(2\)"):
        member_outputs([a, three], x, names=["a", "three"])
    wide = _linear(tmp_path / "wide.onnx", [13], 2)
    with pytest.raises(ShapeError, match=r"wide.onnx expects \[13\] per example, but the data's .* \[12\]"):
        member_outputs([a, wide], x)


def test_recipe_data_reconstruction_has_no_labels_and_scores_the_inputs():
    recipe = get_recipe("autoenc_s")
    config = TrainConfig.from_recipe(recipe, n_train=300, n_test=100)
    data = load_recipe_data(recipe, config)
    assert not data.classify and data.y_train is None and data.y_val is None and data.y_test is None
    assert data.num_outputs == int(np.prod(data.input_shape))
    assert len(data.x_train) + data.n_val == 300 and len(data.x_test) == 100
    np.testing.assert_array_equal(data.target("test"), data.x_test.reshape(100, -1))
    # the same cut every time: every member, arm and rerun sees the same examples
    np.testing.assert_array_equal(load_recipe_data(recipe, config).x_train, data.x_train)


def test_recipe_data_validation_split_required_by_the_benchmark():
    recipe = get_recipe("classifier_s")
    config = TrainConfig.from_recipe(recipe, n_train=200, n_test=50, val_fraction=0.0)
    data = load_recipe_data(recipe, config)
    assert data.x_val is None and data.n_val == 0 and data.classify and len(data.y_train) == 200
    with pytest.raises(ConfigError, match="needs a validation split"):
        load_recipe_data(recipe, config, need_validation=True)


@pytest.mark.parametrize("value", [True, np.bool_(True), 0, -3, 1.0, "2", None])
def test_positive_int_refuses(value):
    with pytest.raises(ConfigError, match="n must be a positive integer"):
        positive_int(value, "n")
    with pytest.raises(ValueError):
        positive_int(value, "n", error=ValueError)


def test_positive_int_accepts_numpy_integers():
    assert positive_int(np.int64(3), "n") == 3 and type(positive_int(np.int64(3), "n")) is int


def test_first_line():
    assert first_line(ValueError("bad thing\n  at line 3\n  more")) == "bad thing"
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("   ")) == "RuntimeError"
