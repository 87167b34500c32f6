"""NetworkIR -> nn.Module -> NetworkIR: same function as the ONNX model; frozen neurons do not train."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import export_torch, run_onnx
from test_ir_roundtrip import MODELS

from codec.ir import Role, lift, lower, to_bytes
from codec.runtime.training.torch_ir import IRModule, reinitialise_trainable


@pytest.mark.parametrize("name", list(MODELS))
def test_module_matches_onnx_and_round_trips(name, tmp_path):
    torch.manual_seed(0)
    module, shape = MODELS[name]()
    net = lift(export_torch(module, torch.randn(2, *shape), tmp_path / "m.onnx", dynamo=False))
    x = np.random.default_rng(0).standard_normal((9, *shape)).astype(np.float32)
    expected = run_onnx(to_bytes(lower(net)), x)
    ir_module = IRModule(net, probabilities=True).eval()
    with torch.no_grad():
        got = ir_module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    back = ir_module.to_network()
    np.testing.assert_allclose(run_onnx(to_bytes(lower(back)), x), expected, atol=1e-6)


def test_frozen_rows_are_buffers_and_stay_fixed(tmp_path):
    torch.manual_seed(0)
    module, shape = MODELS["mlp"]()
    net = lift(export_torch(module, torch.randn(2, *shape), tmp_path / "m.onnx", dynamo=False))
    first = net.compute_layers()[0]
    first.roles[:7] = Role.FROZEN_SHARED
    ir_module = IRModule(net)
    frozen_before = ir_module.blocks[1].frozen_weight.clone()
    assert ir_module.blocks[1].weight.shape[0] == first.num_neurons - 7
    reinitialise_trainable(ir_module, seed=3)
    opt = torch.optim.SGD(ir_module.parameters(), lr=0.5)
    x = torch.randn(32, *shape)
    for _ in range(3):
        opt.zero_grad()
        ir_module(x).logsumexp(1).mean().backward()
        opt.step()
    assert torch.equal(ir_module.blocks[1].frozen_weight, frozen_before)
    back = ir_module.to_network()
    assert (back.compute_layers()[0].roles[:7] == Role.FROZEN_SHARED).all()
    np.testing.assert_array_equal(back.compute_layers()[0].weight[:7], first.weight[:7])
    assert not np.allclose(back.compute_layers()[0].weight[7:], first.weight[7:])


def test_frozen_neurons_must_be_a_prefix(tmp_path):
    torch.manual_seed(0)
    module, shape = MODELS["mlp"]()
    net = lift(export_torch(module, torch.randn(2, *shape), tmp_path / "m.onnx", dynamo=False))
    net.compute_layers()[0].roles[3] = Role.FROZEN_SHARED
    from codec.errors import ShapeError

    with pytest.raises(ShapeError, match="must come first"):
        IRModule(net)
