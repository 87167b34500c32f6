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
        assert facts.pop("stacked") and not alone_facts.pop("stacked")  # together: one stacked unit
        assert facts == alone_facts
        assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in alone_result.history]
        for a, b in zip(net.compute_layers(), alone.compute_layers()):
            np.testing.assert_array_equal(a.weight, b.weight)


# --------------------------------------------------------------------------------------------------------
# Grown members stacked (engine._GrownStackedUnit) against the module-unit path (stack=False)
# --------------------------------------------------------------------------------------------------------


def _train_both(template, data, config, seeds, options, **kwargs):
    """The same grown members trained stacked and as module units."""
    from codec.runtime.training.grow import train_grown_members

    x, y, xv, yv = data
    return [
        train_grown_members(
            template, x, y, xv, yv, config, seeds=seeds, options=options, stack=stack, **kwargs
        )
        for stack in (True, False)
    ]


def _assert_same_members(stacked, units, atol=0.0):
    for (net, result, facts), (ref_net, ref_result, ref_facts) in zip(stacked, units):
        assert facts["stacked"] and not ref_facts["stacked"]
        assert ref_facts["unstacked_reason"] == "stacking switched off (stack=False)"
        assert result.epochs_run == ref_result.epochs_run and result.best_epoch == ref_result.best_epoch
        assert result.stopped_early == ref_result.stopped_early
        losses = [h["train_loss"] for h in result.history]
        ref_losses = [h["train_loss"] for h in ref_result.history]
        np.testing.assert_allclose(losses, ref_losses, atol=atol, rtol=0)
        for a, b in zip(net.compute_layers(), ref_net.compute_layers()):
            np.testing.assert_allclose(a.weight, b.weight, atol=atol, rtol=0)
            np.testing.assert_allclose(a.bias, b.bias, atol=atol, rtol=0)
            assert (a.weight != 0).any()


@pytest.mark.parametrize("cache", ["on", "off"])
def test_stacked_grown_members_equal_module_units_with_early_stopping(
    template, data, cache, tmp_path, monkeypatch
):
    """Exact on CPU: the stacked dense layers are nn.Linear's operations; one member stops early and is
    frozen (its stacked rows and optimizer steps no longer move) while the others go on."""
    import torch

    from codec.runtime.training import engine

    rewritten, _ = template
    config = dataclasses.replace(_config(), lr=5e-2, max_epochs=10, patience=1)
    saved = {}
    save = engine._save_checkpoint

    def save_and_keep(where, state):
        save(where, state)
        if where.name == "stacked.ckpt":
            saved[state["epoch"]] = state["units"][0]

    monkeypatch.setattr(engine, "_save_checkpoint", save_and_keep)
    seeds, options = [5, 6, 7, 8], GrowOptions(cache=cache)
    stacked, units = [
        _train_with_checkpoint(rewritten, data, config, seeds, options, stack, tmp_path / name)
        for stack, name in ((True, "stacked.ckpt"), (False, "units.ckpt"))
    ]
    assert all(facts["csn_cache"] == (cache == "on") for _, _, facts in stacked)
    epochs = [result.epochs_run for _, result, _ in stacked]
    assert min(epochs) < max(epochs)  # someone stopped early while another went on
    _assert_same_members(stacked, units)
    early = epochs.index(min(epochs))
    at_stop, last = saved[min(epochs)], saved[max(epochs)]
    assert last["optimizer"]["steps"][early] == at_stop["optimizer"]["steps"][early]
    for before, after in zip(at_stop["params"], last["params"]):
        assert torch.equal(before[early], after[early])
        assert not torch.equal(before[epochs.index(max(epochs))], after[epochs.index(max(epochs))])


def _train_with_checkpoint(template, data, config, seeds, options, stack, checkpoint_path):
    from codec.runtime.training.grow import train_grown_members

    x, y, xv, yv = data
    return train_grown_members(
        template,
        x,
        y,
        xv,
        yv,
        config,
        seeds=seeds,
        options=options,
        stack=stack,
        checkpoint_path=checkpoint_path,
    )


@pytest.mark.parametrize("cache", ["on", "off"])
def test_stacked_grown_members_resume_exactly(template, data, cache, tmp_path, monkeypatch):
    from codec.runtime.training import engine
    from codec.runtime.training.grow import train_grown_members

    rewritten, _ = template
    x, y, xv, yv = data
    config = dataclasses.replace(_config(), max_epochs=4)
    options = GrowOptions(cache=cache)
    straight = train_grown_members(rewritten, x, y, xv, yv, config, seeds=[5, 6, 7], options=options)
    path = tmp_path / "grown.ckpt"

    class Stop(Exception):
        pass

    save = engine._save_checkpoint

    def save_then_stop(where, state):
        save(where, state)
        if state["epoch"] == 2:
            raise Stop

    monkeypatch.setattr(engine, "_save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        train_grown_members(
            rewritten, x, y, xv, yv, config, seeds=[5, 6, 7], options=options, checkpoint_path=path
        )
    monkeypatch.setattr(engine, "_save_checkpoint", save)
    resumed = train_grown_members(
        rewritten, x, y, xv, yv, config, seeds=[5, 6, 7], options=options, checkpoint_path=path, resume=True
    )
    for (net, result, facts), (ref, ref_result, _) in zip(resumed, straight):
        assert facts["stacked"] and result.epochs_run == 4
        assert [h["train_loss"] for h in result.history] == [h["train_loss"] for h in ref_result.history]
        for a, b in zip(net.compute_layers(), ref.compute_layers()):
            np.testing.assert_array_equal(a.weight, b.weight)
            np.testing.assert_array_equal(a.bias, b.bias)


def _conv_template():
    """A CSNE-shaped conv member: (1, 8, 8) -> conv 6 (2 frozen) -> max pool -> conv 4 with asymmetric
    pads (1 frozen, reading only the frozen channels) -> flatten -> dense 3 (softmax)."""
    from codec.ir.network import Activation, Conv, Dense, Flatten, NetworkIR, Pool

    rng = np.random.default_rng(3)
    relu = Activation("relu")

    def roles(n, k):
        r = np.full(n, Role.TRAINABLE, np.int8)
        r[:k] = Role.FROZEN_SHARED
        return r

    w2 = rng.normal(0, 0.3, (4, 6, 3, 3)).astype(np.float32)
    w2[:1, 2:] = 0.0  # a CSN neuron reads only CSN neurons
    layers = [
        Conv(
            "c1",
            rng.normal(0, 0.3, (6, 1, 3, 3)).astype(np.float32),
            np.zeros(6, np.float32),
            relu,
            roles(6, 2),
            pads=(1, 1, 1, 1),
        ),
        Pool("p1", "max", (2, 2), (2, 2)),
        Conv("c2", w2, rng.normal(0, 0.1, 4).astype(np.float32), relu, roles(4, 1), pads=(0, 0, 1, 1)),
        Flatten("f"),
        Dense(
            "fc",
            rng.normal(0, 0.3, (3, 4 * 3 * 3)).astype(np.float32),
            np.zeros(3, np.float32),
            Activation("softmax"),
        ),
    ]
    return NetworkIR("conv", "input", "output", (1, 8, 8), layers)


@pytest.mark.parametrize("cache", ["on", "off"])
def test_stacked_conv_grown_members_match_module_units(cache):
    """Conv IRLayers are stacked as grouped convolutions: float-close (1e-5), not bit-identical."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((240, 1, 8, 8)).astype(np.float32)
    y = (x[:, 0, :4].mean(axis=(1, 2)) > 0).astype(np.int64) + (x[:, 0, 4:, :4].mean(axis=(1, 2)) > 0.1)
    data = (x[:200], y[:200], x[200:], y[200:])
    config = dataclasses.replace(_config(), max_epochs=2, batch_size=40)
    stacked, units = _train_both(_conv_template(), data, config, [1, 2, 3], GrowOptions(cache=cache))
    assert all(facts["csn_cache"] == (cache == "on") for _, _, facts in stacked)
    _assert_same_members(stacked, units, atol=1e-5)
    for net, _, _ in stacked:  # the CSN rows stay the template's
        np.testing.assert_array_equal(net.layer("c1").weight[:2], _conv_template().layer("c1").weight[:2])


def test_unstackable_grown_members_are_module_units_and_say_why(template, data):
    """A member the stacked layout cannot compute (here: a softmax inside the network) falls back to
    module units, and its facts record why."""
    from codec.runtime.training.grow import train_grown_members

    rewritten, _ = template
    odd = rewritten.copy()
    odd.layer("fc1").activation = type(odd.layer("fc1").activation)("softmax")
    x, y, xv, yv = data
    grown = train_grown_members(odd, x, y, xv, yv, dataclasses.replace(_config(), max_epochs=1), seeds=[5, 6])
    for _, _, facts in grown:
        assert not facts["stacked"]
        assert facts["unstacked_reason"] == "a softmax that is not the last layer's logits"


def test_lifted_members_without_a_csn_are_stacked_too(data):
    """`--model` members (IRModules with no frozen rows) take the same stacked unit, exactly."""
    import torch

    from codec.runtime.training.engine import train_members
    from codec.runtime.training.torch_ir import IRModule, reinitialise_trainable

    main, *_ = planted_pair(np.random.default_rng(0))
    x, y, xv, yv = data

    def members():
        modules = [IRModule(main) for _ in range(3)]
        for seed, module in enumerate(modules):
            reinitialise_trainable(module, seed)
        return modules

    runs = [
        train_members(members(), x, y, xv, yv, _config(), seeds=[0, 1, 2], stack=stack)
        for stack in (True, False)
    ]
    assert runs[0].stacked == [0, 1, 2] and runs[1].stacked == []
    for a, b in zip(runs[0].members, runs[1].members):
        sa, sb = a.module.state_dict(), b.module.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_a_module_unit_checkpoint_is_refused_by_the_stacked_run(template, data, tmp_path):
    """A grow checkpoint written with module units is not reinterpreted as a stacked one: one line."""
    from codec.errors import ConfigError
    from codec.runtime.training.grow import train_grown_members

    rewritten, _ = template
    x, y, xv, yv = data
    path = tmp_path / "grown.ckpt"
    config = dataclasses.replace(_config(), max_epochs=1)
    train_grown_members(rewritten, x, y, xv, yv, config, seeds=[5, 6], checkpoint_path=path, stack=False)
    with pytest.raises(ConfigError, match="stacked otherwise"):
        train_grown_members(
            rewritten,
            x,
            y,
            xv,
            yv,
            dataclasses.replace(config, max_epochs=2),
            seeds=[5, 6],
            checkpoint_path=path,
            resume=True,
        )
