"""Lift -> lower round trips compute the same function as the exported model (onnxruntime, random inputs)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from conftest import export_torch, run_onnx
from torch import nn

from codec.ir import Conv, Dense, Flatten, Pool, lift, lower, save_model, to_bytes


def mlp_classifier():
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(36, 20),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Linear(20, 16),
        nn.Tanh(),
        nn.Linear(16, 12),
        nn.Sigmoid(),
        nn.Linear(12, 8),
        nn.LeakyReLU(0.2),
        nn.Linear(8, 5),
        nn.Softmax(dim=-1),
    ), (1, 6, 6)


def autoencoder():
    return nn.Sequential(
        nn.Dropout(0.2),
        nn.Linear(36, 24),
        nn.ReLU(),
        nn.Linear(24, 12),
        nn.ReLU(),
        nn.Linear(12, 6),
        nn.ReLU(),
        nn.Linear(6, 12),
        nn.ReLU(),
        nn.Linear(12, 24),
        nn.ReLU(),
        nn.Linear(24, 36),
        nn.Sigmoid(),
    ), (36,)


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, stride=1),
        nn.ReLU(),
        nn.AvgPool2d(2, ceil_mode=True),
        nn.Conv2d(8, 8, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 2 * 2, 10),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(10, 4),
        nn.Softmax(dim=1),
    ), (3, 12, 12)


class ReluAfterPool(nn.Module):
    """The classic MNIST-example order relu(max_pool(conv(x))), and a BatchNorm to fold."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        x = torch.relu(torch.max_pool2d(self.bn(self.conv(x)), 2))
        return self.fc(torch.flatten(x, 1))


def relu_after_pool():
    torch.manual_seed(3)
    m = ReluAfterPool()
    # non-trivial running statistics, so folding BatchNorm is really tested
    m.bn.running_mean.uniform_(-0.5, 0.5)
    m.bn.running_var.uniform_(0.5, 2.0)
    m.bn.weight.data.uniform_(0.5, 1.5)
    m.bn.bias.data.uniform_(-0.2, 0.2)
    return m, (1, 8, 8)


MODELS = {
    "mlp": mlp_classifier,
    "autoencoder": autoencoder,
    "cnn": small_cnn,
    "relu_after_pool": relu_after_pool,
}


@pytest.fixture(
    scope="module",
    params=[(m, d) for m in MODELS for d in (True, False)],
    ids=lambda p: f"{p[0]}-{'dynamo' if p[1] else 'legacy'}",
)
def exported(request, tmp_path_factory):
    name, dynamo = request.param
    torch.manual_seed(0)
    module, shape = MODELS[name]()
    path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
    export_torch(module, torch.randn(2, *shape), path, dynamo)
    return name, dynamo, path, module, shape


def test_round_trip_matches_onnxruntime(exported):
    name, dynamo, path, module, shape = exported
    net = lift(path)
    assert net.input_shape == shape
    x = np.random.default_rng(1).standard_normal((17, *shape)).astype(np.float32)
    expected = run_onnx(path, x)
    got = run_onnx(to_bytes(lower(net)), x)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-5
    with torch.no_grad():
        torch_out = module.eval()(torch.from_numpy(x)).numpy()
    assert np.abs(got - torch_out).max() < 1e-4


def test_lifted_structure(exported):
    name, dynamo, path, module, shape = exported
    net = lift(path)
    kinds = [type(layer) for layer in net.layers]
    if name == "mlp":
        assert kinds == [Flatten, Dense, Dense, Dense, Dense, Dense]
        assert [l.activation.kind for l in net.compute_layers()] == [
            "relu",
            "tanh",
            "sigmoid",
            "leaky_relu",
            "softmax",
        ]
        assert net.compute_layers()[3].activation.alpha == pytest.approx(0.2)
        assert [l.num_neurons for l in net.compute_layers()] == [20, 16, 12, 8, 5]
    elif name == "autoencoder":
        assert [l.num_neurons for l in net.compute_layers()] == [24, 12, 6, 12, 24, 36]
    elif name == "cnn":
        assert kinds == [Conv, Pool, Conv, Pool, Conv, Flatten, Dense, Dense]
        assert net.shapes()[4] == (8, 2, 2)
        # the first dense layer reads 32 features from 8 channels of 2x2
        np.testing.assert_array_equal(
            net.input_neuron_map(net.compute_layers()[3].name), np.repeat(np.arange(8), 4)
        )
    else:
        # relu moved onto the conv across the max pool, BatchNorm folded into the conv
        assert kinds == [Conv, Pool, Flatten, Dense]
        assert net.layers[0].activation.kind == "relu"
    assert net.num_parameters == sum(p.numel() for n, p in module.named_parameters() if "bn" not in n)


def test_save_single_file_and_external_data(exported, tmp_path):
    name, dynamo, path, module, shape = exported
    net = lift(path)
    single = save_model(lower(net), tmp_path / "single.onnx")
    external = save_model(lower(net), tmp_path / "ext" / "model.onnx", external_data=True)
    assert (tmp_path / "ext" / "model.onnx.data").is_file()
    x = np.random.default_rng(2).standard_normal((5, *shape)).astype(np.float32)
    a, b = run_onnx(single, x), run_onnx(external, x)
    np.testing.assert_allclose(a, b, atol=0)
    onnx.checker.check_model(str(single), full_check=True)
    relifted = lift(external)
    assert [l.name for l in relifted.layers] == [l.name for l in net.layers]
    assert not list(tmp_path.glob(".*.tmp")), "no temporary files left behind"


def test_taps_expose_hidden_post_activation_outputs(exported):
    name, dynamo, path, module, shape = exported
    net = lift(path)
    model = lower(net, taps=True)
    assert len(model.graph.outputs) == 1 + len(net.hidden_layers())
    import onnxruntime as ort

    session = ort.InferenceSession(to_bytes(model), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(3).standard_normal((4, *shape)).astype(np.float32)
    outs = session.run(None, {session.get_inputs()[0].name: x})
    for layer, out, out_shape in zip(
        net.hidden_layers(), outs[1:], [net.shapes()[net.index(l.name)] for l in net.hidden_layers()]
    ):
        assert out.shape == (4, *out_shape)
        if layer.activation.kind == "relu":
            assert out.min() >= 0


def _gemm_model(trans_b: int, matmul: bool) -> bytes:
    """A hand-built graph: Gemm with transB=0 (alpha, beta) or MatMul + Add, as other exporters write them."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((5, 4)).astype(np.float32)  # (in, out) layout
    b1 = rng.standard_normal(4).astype(np.float32)
    w2 = rng.standard_normal((3, 4)).astype(np.float32)  # (out, in) layout
    b2 = rng.standard_normal((1, 3)).astype(np.float32)
    if matmul:
        first = [
            helper.make_node("MatMul", ["x", "w1"], ["mm"], name="mm"),
            helper.make_node("Add", ["b1", "mm"], ["h"], name="add"),
        ]
    else:
        first = [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="g1", transB=trans_b, alpha=0.5, beta=2.0)
        ]
    nodes = first + [
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], name="g2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


@pytest.mark.parametrize("matmul", [False, True], ids=["gemm-transB0", "matmul-add"])
def test_gemm_variants(matmul):
    model = _gemm_model(0, matmul)
    net = lift(model)
    assert [type(l) for l in net.layers] == [Dense, Dense]
    x = np.random.default_rng(5).standard_normal((6, 5)).astype(np.float32)
    np.testing.assert_allclose(run_onnx(to_bytes(lower(net)), x), run_onnx(model, x), atol=1e-5)
