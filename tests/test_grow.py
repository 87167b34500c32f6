"""Grown members keep the CSN frozen, train their own neurons, and the CSN cache changes nothing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import run_onnx
from test_passes import planted_pair

from codec.ir import Role, lower, to_bytes
from codec.passes.base import Calibration, EnsembleModule
from codec.passes.manager import PassManager
from codec.passes.registry import parse_pipeline
from codec.runtime.execution.profile import activations
from codec.runtime.training.grow import GrowOptions, train_grown
from codec.runtime.training.train import TrainConfig


@pytest.fixture(scope="module")
def template():
    main, peer, *_ = planted_pair(np.random.default_rng(0))
    cal = Calibration(np.random.default_rng(7).standard_normal((2000, 20)).astype(np.float32))
    out, _ = PassManager(parse_pipeline("nda{fire=0.0},csne{fire=0.99,corr=0.99}")).run(
        EnsembleModule({"main": main, "peer": peer}, cal)
    )
    return out.members["main"], out.csn


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((600, 20)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 1).astype(np.int64)
    return x[:500], y[:500], x[500:], y[500:]


def _config(**kw):
    return TrainConfig(
        max_epochs=3, batch_size=50, lr=1e-2, patience=5, quiet=True, seed=0, device="cpu", **kw
    )


@pytest.mark.parametrize("cache", ["on", "off"])
def test_grown_member_keeps_csn_and_learns(template, data, cache):
    rewritten, csn = template
    x, y, xv, yv = data
    net, result, facts = train_grown(
        rewritten, x, y, xv, yv, _config(), seed=5, options=GrowOptions(cache=cache)
    )
    assert facts["csn_cache"] == (cache == "on")
    for layer, spec in zip(net.hidden_layers(), csn.layers):
        assert (layer.roles[: spec.size] == Role.FROZEN_SHARED).all()
        np.testing.assert_array_equal(
            layer.weight[: spec.size], rewritten.layer(layer.name).weight[: spec.size]
        )
        assert not np.allclose(layer.weight[spec.size :], rewritten.layer(layer.name).weight[spec.size :])
    # the member's CSN neurons compute exactly the CSN
    a = activations(net, xv)
    np.testing.assert_allclose(
        a["fc2"][:, : csn.layers[1].size], run_onnx(to_bytes(lower(csn.network)), xv), atol=1e-5
    )
    assert result.history[-1]["val_metric"] > 0.5
    assert facts["trainable_parameters"] < sum(l.num_parameters for l in rewritten.compute_layers())


def test_cache_gives_the_same_member(template, data):
    rewritten, _ = template
    x, y, xv, yv = data
    nets = [
        train_grown(rewritten, x, y, xv, yv, _config(), seed=5, options=GrowOptions(cache=c))[0]
        for c in ("on", "off")
    ]
    out = [run_onnx(to_bytes(lower(n)), xv) for n in nets]
    np.testing.assert_allclose(out[0], out[1], atol=1e-4)


def test_bad_grow_options():
    from codec.errors import ConfigError

    with pytest.raises(ConfigError):
        GrowOptions(init="copy")
    with pytest.raises(ConfigError):
        GrowOptions(lr_scale=0)


@pytest.mark.parametrize("cache", ["on", "off"])
def test_grown_members_trained_together_equal_separate_runs(template, data, cache, tmp_path):
    from codec.runtime.training.grow import train_grown_members
    from codec.runtime.training.train import load_checkpoint

    rewritten, _ = template
    x, y, xv, yv = data
    options = GrowOptions(cache=cache)
    path = tmp_path / "grown.ckpt"
    together = train_grown_members(
        rewritten,
        x,
        y,
        xv,
        yv,
        _config(),
        seeds=[5, 6],
        options=options,
        checkpoint_path=path,
        names=["grown_1", "grown_2"],
    )
    assert load_checkpoint(path)["count"] == 2  # one run, one checkpoint for both
    for (net, result, facts), seed in zip(together, (5, 6)):
        config = dataclasses.replace(_config(), seed=seed)
        alone, alone_result, alone_facts = train_grown(
            rewritten, x, y, xv, yv, config, seed=seed, options=options
        )
        assert facts == alone_facts
        assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in alone_result.history]
        for a, b in zip(net.compute_layers(), alone.compute_layers()):
            np.testing.assert_array_equal(a.weight, b.weight)
