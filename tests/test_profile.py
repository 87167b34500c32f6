"""Streamed activation statistics equal a direct numpy computation over all inputs at once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import export_torch
from torch import nn

from codec.errors import DataError, ShapeError
from codec.ir import lift
from codec.runtime.execution.profile import activations, merge, profile, profile_pair


def _mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    m = nn.Sequential(
        nn.Linear(10, 12),
        nn.ReLU(),
        nn.Linear(12, 8),
        nn.Sigmoid(),
        nn.Linear(8, 6),
        nn.Tanh(),
        nn.Linear(6, 3),
    )
    with torch.no_grad():
        m[0].bias[:3] = -100.0  # three ReLU neurons that can never fire: dead on every input
    return m


def _cnn(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(2, 5, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(5, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 6),
        nn.ReLU(),
        nn.Linear(6, 2),
    )


def _hidden_outputs(module: nn.Sequential, x: np.ndarray) -> list[np.ndarray]:
    """Post-activation outputs of each hidden compute layer, computed by torch directly."""
    outs, h = [], torch.from_numpy(x)
    layers = list(module)
    with torch.no_grad():
        for layer in layers:
            h = layer(h)
            is_act = isinstance(layer, (nn.ReLU, nn.Sigmoid, nn.Tanh))
            if is_act:
                outs.append(h.numpy().copy())
    return outs


@pytest.fixture(scope="module")
def mlp_pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlp")
    nets = []
    for seed in (0, 1):
        path = export_torch(_mlp(seed), torch.randn(2, 10), d / f"m{seed}.onnx", dynamo=False)
        nets.append((lift(path), _mlp(seed)))
    return nets


def test_single_member_stats_match_numpy(mlp_pair):
    (net, module), _ = mlp_pair
    x = np.random.default_rng(0).standard_normal((1000, 10)).astype(np.float32)
    stats = profile(net, x, batch_size=97)  # a batch size that does not divide the set
    outs = _hidden_outputs(module, x)
    thresholds = [0.0, 0.5, 0.0]
    assert stats.count == 1000
    fires_prev = None
    for s, out, thr in zip(stats.layers.values(), outs, thresholds):
        fires = out > thr
        np.testing.assert_array_equal(s.fire, fires.sum(0))
        np.testing.assert_array_equal(s.nonzero, (out != 0).sum(0))
        np.testing.assert_allclose(s.sum, out.astype(np.float64).sum(0), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(s.sumsq, (out.astype(np.float64) ** 2).sum(0), rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(s.std, out.astype(np.float64).std(0), rtol=1e-4, atol=1e-5)
        if fires_prev is None:
            assert s.cofire is None
        else:
            np.testing.assert_array_equal(s.cofire, fires.T.astype(np.int64) @ fires_prev.astype(np.int64))
        fires_prev = fires
    first = next(iter(stats.layers.values()))
    assert set(np.flatnonzero(first.always_zero)) >= {0, 1, 2}
    report = stats.to_dict()
    assert report["layers"][0]["dead_neurons"][:3] == [0, 1, 2]


def test_pair_stats_match_numpy(mlp_pair):
    (main, main_mod), (peer, peer_mod) = mlp_pair
    x = np.random.default_rng(1).standard_normal((600, 10)).astype(np.float32)
    pair = profile_pair(main, peer, x, batch_size=64)
    thresholds = [0.0, 0.5, 0.0]
    for name, a, b, thr in zip(
        pair.cross, _hidden_outputs(main_mod, x), _hidden_outputs(peer_mod, x), thresholds
    ):
        fa, fb = a > thr, b > thr
        np.testing.assert_array_equal(pair.cross[name].cofire, fa.T.astype(np.int64) @ fb.astype(np.int64))
        agree = (fa[:, :, None] == fb[:, None, :]).mean(0)
        np.testing.assert_allclose(pair.agreement(name), agree, atol=1e-12)
        with np.errstate(divide="ignore", invalid="ignore"):
            full = np.corrcoef(a.T.astype(np.float64), b.T.astype(np.float64))[: a.shape[1], a.shape[1] :]
        constant = (a.std(0)[:, None] < 1e-12) | (b.std(0)[None, :] < 1e-12)
        expected = np.where(constant, 0.0, np.nan_to_num(full))
        np.testing.assert_allclose(pair.correlation(name), expected, atol=1e-4)


def test_conv_channels_are_neurons(tmp_path):
    module = _cnn(0)
    net = lift(export_torch(module, torch.randn(2, 2, 8, 8), tmp_path / "cnn.onnx", dynamo=True))
    x = np.random.default_rng(2).standard_normal((300, 2, 8, 8)).astype(np.float32)
    stats = profile(net, x, batch_size=50)
    outs = _hidden_outputs(module, x)
    conv1, conv2, fc = outs
    s1, s2, s3 = stats.layers.values()
    # channel activation = spatial mean; a channel fires when positive anywhere
    np.testing.assert_allclose(s1.sum, conv1.reshape(300, 5, -1).mean(2).astype(np.float64).sum(0), rtol=1e-4)
    f1 = (conv1.reshape(300, 5, -1) > 0).any(2)
    f2 = (conv2.reshape(300, 4, -1) > 0).any(2)
    f3 = fc > 0
    np.testing.assert_array_equal(s1.fire, f1.sum(0))
    np.testing.assert_array_equal(s2.cofire, f2.T.astype(int) @ f1.astype(int))
    np.testing.assert_array_equal(s3.cofire, f3.T.astype(int) @ f2.astype(int))
    acts = activations(net, x)
    np.testing.assert_allclose(acts[s2.name], conv2.reshape(300, 4, -1).mean(2), atol=1e-5)


def test_streaming_iterable_and_merge_equal_one_pass(mlp_pair):
    (net, _), _ = mlp_pair
    x = np.random.default_rng(3).standard_normal((500, 10)).astype(np.float32)
    whole = profile(net, x, batch_size=500)
    streamed = profile(net, (x[i : i + 33] for i in range(0, 500, 33)))
    merged = merge(profile(net, x[:200]), profile(net, x[200:]))
    for other in (streamed, merged):
        assert other.count == 500
        for a, b in zip(whole.layers.values(), other.layers.values()):
            np.testing.assert_array_equal(a.fire, b.fire)
            np.testing.assert_allclose(a.sum, b.sum, rtol=1e-9)
            if a.cofire is not None:
                np.testing.assert_array_equal(a.cofire, b.cofire)


def test_memory_independent_of_calibration_size(mlp_pair):
    (net, _), _ = mlp_pair
    rng = np.random.default_rng(4)
    small = profile(net, rng.standard_normal((100, 10)).astype(np.float32))
    large = profile(net, (rng.standard_normal((100, 10)).astype(np.float32) for _ in range(10)))
    assert large.count == 10 * small.count
    assert large.nbytes == small.nbytes


def test_bad_calibration_data(mlp_pair):
    (net, _), (peer, _) = mlp_pair
    with pytest.raises(DataError, match="empty"):
        profile(net, np.zeros((0, 10), np.float32))
    bad = np.zeros((20, 10), np.float32)
    bad[13, 4] = np.nan
    with pytest.raises(DataError, match="input 13"):
        profile(net, bad, batch_size=8)
    with pytest.raises(ShapeError, match="expects"):
        profile(net, np.zeros((5, 11), np.float32))


def test_pair_refuses_different_architectures(mlp_pair, tmp_path):
    (net, _), _ = mlp_pair
    other = lift(
        export_torch(
            nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 3)),
            torch.randn(2, 10),
            tmp_path / "o.onnx",
            dynamo=False,
        )
    )
    with pytest.raises(ShapeError, match="same architecture"):
        profile_pair(net, other, np.zeros((4, 10), np.float32))
