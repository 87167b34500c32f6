"""One input-adaptation rule for every command (runtime/execution/inputs.py): a fixed batch dimension, float16
and double inputs, flat models with image data and image models with flat data all run, with the same
results as the plain float32 dynamic-batch model; anything else is one line naming the model and both
shapes."""

from __future__ import annotations

import contextlib
import io
import json
import warnings

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from codec.cli import main
from codec.errors import ShapeError
from codec.runtime.execution.inputs import InputSpec, batches, fit_shape

_TYPES = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.float64: TensorProto.DOUBLE}


def _classifier(path, input_dims, *, dtype=np.float32, batch="batch", seed=0):
    """Flatten -> MatMul -> Softmax over 10 classes, computing in `dtype`, with batch dimension `batch`."""
    weight = np.random.default_rng(seed).normal(size=(int(np.prod(input_dims)), 10)) * 0.05
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["scores"]),
            helper.make_node("Softmax", ["scores"], ["output"], axis=-1),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", _TYPES[dtype], [batch, *input_dims])],
        [helper.make_tensor_value_info("output", _TYPES[dtype], [batch, 10])],
        initializer=[numpy_helper.from_array(weight.astype(dtype), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return str(path)


def _eval(capsys, *members, extra=()):
    code = main(["eval", *map(str, members), "--data", "mnist_small", "--limit", "203", "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


@pytest.mark.parametrize(
    "variant",
    [
        dict(batch=7),  # fixed batch: 203 examples = 29 chunks of 7, the rule pads none; see the next one too
        dict(batch=5),  # 203 = 40 chunks of 5 + 3: the last chunk is padded and the padding dropped
        dict(dtype=np.float16),
        dict(dtype=np.float64),
        dict(input_dims=(784,)),  # a flat model, image-shaped data
    ],
    ids=["fixed-batch-7", "fixed-batch-5-padded", "float16", "double", "flat-model"],
)
def test_eval_adapts_inputs_like_the_reference_model(tmp_path, capsys, variant):
    reference = _eval(capsys, _classifier(tmp_path / "ref.onnx", (1, 28, 28)))
    options = dict(variant)
    dims = options.pop("input_dims", (1, 28, 28))
    report = _eval(capsys, _classifier(tmp_path / "m.onnx", dims, **options))
    assert report["n_examples"] == 203
    tolerance = 5e-3 if options.get("dtype") is np.float16 else 1e-6
    assert report["accuracy"] == pytest.approx(reference["accuracy"], abs=tolerance)
    assert report["nll"] == pytest.approx(reference["nll"], rel=1e-2 if tolerance > 1e-6 else 1e-6)


def test_eval_mixes_flat_and_image_members(tmp_path, capsys):
    image = _classifier(tmp_path / "image.onnx", (1, 28, 28))
    flat = _classifier(tmp_path / "flat.onnx", (784,), batch=4)
    report = _eval(capsys, image, flat)
    assert report["member_accuracies"][0] == pytest.approx(report["member_accuracies"][1])


def test_image_model_takes_flat_data(tmp_path, capsys):
    from codec.runtime.data import load_dataset

    mnist = load_dataset("mnist_small")
    x, y = mnist.x_test[:203].reshape(203, -1), mnist.y_test[:203]
    data = tmp_path / "flat.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x, y_test=y)
    reference = _eval(capsys, _classifier(tmp_path / "ref.onnx", (1, 28, 28)))
    model = _classifier(tmp_path / "image.onnx", (1, 28, 28), batch=8)
    assert main(["eval", model, "--data", f"npz:{data}", "--json"]) == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["n_examples"] == 203 and report["accuracy"] == pytest.approx(reference["accuracy"])


def test_data_that_cannot_fit_is_one_line_naming_model_and_shapes(tmp_path, capsys):
    model = _classifier(tmp_path / "small.onnx", (10,))
    assert main(["eval", model, "--data", "mnist_small"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    assert "small.onnx" in err and "[10]" in err and "[1, 28, 28]" in err, err


def _torch_fixed_batch(path, batch: int):
    """What `torch.onnx.export` writes without dynamic axes: the example's batch size baked into the graph."""
    import torch

    torch.manual_seed(0)
    module = torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(784, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 10),
        torch.nn.Softmax(dim=1),
    ).eval()
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(batch, 1, 28, 28),),
            str(path),
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
        )
    return path


def test_every_command_runs_a_torch_model_exported_with_a_fixed_batch(tmp_path, capsys):
    main_path, peer_path = (
        _torch_fixed_batch(tmp_path / "main.onnx", 3),
        _torch_fixed_batch(tmp_path / "peer.onnx", 3),
    )
    assert onnx.load(str(main_path)).graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    assert main(["eval", str(main_path), str(peer_path), "--data", "mnist_small", "--limit", "100"]) == 0
    assert main(["profile", str(main_path), "--data", "mnist_small", "--limit", "100", "--quiet"]) == 0
    capsys.readouterr()
    # export's parity: a fused ensemble of the lifted members against the fixed-batch member files
    from codec.ir import lift, save_model
    from codec.ir.ensemble import emit_ensemble

    fused = emit_ensemble([lift(main_path, name="main"), lift(peer_path, name="peer")], criterion="mean")
    save_model(fused, tmp_path / "ensemble.onnx")
    assert (
        main(
            [
                "export",
                str(tmp_path / "ensemble.onnx"),
                "-o",
                str(tmp_path / "deploy.onnx"),
                "--members",
                str(main_path),
                str(peer_path),
                "--data",
                "mnist_small",
                "--limit",
                "100",
                "--json",
            ]
        )
        == 0
    ), capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["parity"]["max_abs_error"] <= 1e-5


# the rule itself


def test_fit_shape_reshapes_only_when_the_sizes_match():
    x = np.arange(2 * 12, dtype=np.float32).reshape(2, 3, 4)
    assert fit_shape(x, (12,)).shape == (2, 12)
    assert fit_shape(x.reshape(2, 12), (3, 4)).base is not None  # a view: nothing copied
    assert fit_shape(x, (3, None)) is x  # symbolic dims accept any size
    with pytest.raises(
        ShapeError, match=r"m.onnx expects \[5\] per example, but the data's examples are \[3, 4\]"
    ):
        fit_shape(x, (5,), "m.onnx")


def test_batches_pad_a_fixed_batch_and_cast():
    spec = InputSpec("input", (4,), np.dtype(np.float16), batch=3)
    x = np.arange(7 * 4, dtype=np.float64).reshape(7, 4)
    got = list(batches(x, spec, batch_size=100))
    assert [real for _, real in got] == [3, 3, 1]
    assert all(b.shape == (3, 4) and b.dtype == np.float16 for b, _ in got)
    assert np.all(got[-1][0][1:] == 0) and np.array_equal(got[-1][0][0], x[6].astype(np.float16))
    dynamic = InputSpec("input", (2, 2), np.dtype(np.float32))
    assert [b.shape for b, _ in batches(x, dynamic, batch_size=4)] == [(4, 2, 2), (3, 2, 2)]
