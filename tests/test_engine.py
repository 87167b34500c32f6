"""The training engine: stacked members equal separate runs, per-member and ensemble stopping, exact resume,
corrupted checkpoints refused."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from codec.errors import ModelLoadError
from codec.models import build_model, get_recipe
from codec.runtime.data import load_dataset
from codec.runtime.training.engine import _StackedUnit, stackable, train_members
from codec.runtime.training.train import TrainConfig, load_checkpoint, train_member

# Exact, not close: on CPU the stacked forward (baddbmm), its written-out backward and the per-member Adam/SGD
# arithmetic are the operations of K separate nn.Linear runs (runtime/training/engine.py's docstring).
ATOL = 0.0


@pytest.fixture(scope="module")
def data():
    dataset = load_dataset("mnist_small").subset(700, 100, seed=0)
    train, (x_val, y_val) = dataset.split_validation(100 / 700, seed=0)
    return train.x_train, train.y_train, x_val, y_val


def mlp(seed, hidden=(32, 16), **kwargs):
    return build_model("classifier", (1, 28, 28), 10, seed=seed, hidden=hidden, **kwargs)


def config(**overrides):
    base = TrainConfig.from_recipe(get_recipe("classifier_s"), quiet=True, device="cpu")
    return dataclasses.replace(base, **{"max_epochs": 3, "batch_size": 50, "patience": None, **overrides})


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_close(a, b, atol=ATOL):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0)


def separate(seeds, cfg, data, lrs=None, **kwargs):
    x, y, xv, yv = data
    results = []
    for i, seed in enumerate(seeds):
        member_cfg = dataclasses.replace(cfg, seed=seed, lr=cfg.lr if lrs is None else lrs[i])
        results.append(train_member(mlp(seed, **kwargs), x, y, xv, yv, member_cfg))
    return results


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_stacked_members_equal_separate_runs(data, optimizer):
    x, y, xv, yv = data
    seeds = [3, 4, 5]
    cfg = config(
        optimizer=optimizer, lr=3e-3 if optimizer == "adam" else 0.05, weight_decay=1e-4, lr_decay=0.9
    )
    modules = [mlp(s) for s in seeds]
    initial = [weights(m) for m in modules]
    stacked = train_members(modules, x, y, xv, yv, cfg, seeds=seeds)
    assert stacked.stacked == [0, 1, 2]
    for k, (result, reference) in enumerate(zip(stacked.members, separate(seeds, cfg, data))):
        assert not all(torch.equal(initial[k][n], v) for n, v in weights(result.module).items())
        assert_close(weights(result.module), weights(reference.module))
        assert result.best_epoch == reference.best_epoch
        for mine, theirs in zip(result.history, reference.history):
            assert mine["lr"] == theirs["lr"]
            assert mine["val_loss"] == theirs["val_loss"] and mine["train_loss"] == theirs["train_loss"]


def test_stacked_forward_is_exactly_nn_linear():
    modules = [mlp(s) for s in (0, 1)]
    unit = _StackedUnit([0, 1], modules, config(), [1e-3, 1e-3], torch.device("cpu"))
    x = torch.rand(2, 5, 1, 28, 28)
    out = unit.forward(x)
    for k, module in enumerate(modules):
        assert torch.equal(out[k], module(x[k]))


def test_per_member_learning_rates_and_early_stopping(data):
    x, y, xv, yv = data
    seeds = [0, 1, 2]
    # Member 1's LR is so large that its validation loss soon stops improving: it stops early, keeps its
    # best weights, and the others go on with their own LRs.
    lrs = [2e-3, 0.5, 1e-3]
    cfg = config(max_epochs=8, patience=1, lr=1e-3)
    modules = [mlp(s) for s in seeds]
    stacked = train_members(modules, x, y, xv, yv, cfg, seeds=seeds, lrs=lrs)
    reference = separate(seeds, cfg, data, lrs=lrs)
    epochs = [r.epochs_run for r in stacked.members]
    assert epochs == [r.epochs_run for r in reference]
    assert stacked.members[1].stopped_early and epochs[1] < max(epochs)
    for result, ref in zip(stacked.members, reference):
        assert result.best_epoch == ref.best_epoch
        assert_close(weights(result.module), weights(ref.module))


def test_a_stopped_member_is_frozen(data, tmp_path):
    x, y, xv, yv = data
    cfg = config(max_epochs=8, patience=1)
    path = tmp_path / "members.ckpt"
    states = {}
    result = train_members(
        [mlp(s) for s in (0, 1, 2)],
        x,
        y,
        xv,
        yv,
        cfg,
        seeds=[0, 1, 2],
        lrs=[2e-3, 0.5, 1e-3],
        checkpoint_path=path,
        on_epoch_end=lambda epoch, record: states.__setitem__(epoch, load_checkpoint(path)),
    )
    stopped_at = result.members[1].epochs_run
    assert result.members[1].stopped_early and stopped_at < len(states)
    frozen = states[stopped_at]["units"][0]
    for epoch in range(stopped_at + 1, len(states) + 1):
        later = states[epoch]["units"][0]
        assert later["optimizer"]["steps"][1] == frozen["optimizer"]["steps"][1]
        assert later["optimizer"]["steps"][0] > frozen["optimizer"]["steps"][0]  # the others go on
        for name in ("params",):
            for before, after in zip(frozen[name], later[name]):
                assert torch.equal(before[1], after[1]) and not torch.equal(before[0], after[0])
        for name in ("exp_avg", "exp_avg_sq"):
            for before, after in zip(frozen["optimizer"][name], later["optimizer"][name]):
                assert torch.equal(before[1], after[1])


def test_bagging_weights_equal_separate_weighted_runs(data):
    x, y, xv, yv = data
    rng = np.random.default_rng(0)
    weights_kn = np.stack([np.bincount(rng.integers(0, len(x), len(x)), minlength=len(x)) for _ in range(2)])
    cfg = config(max_epochs=2)
    stacked = train_members([mlp(0), mlp(1)], x, y, xv, yv, cfg, seeds=[0, 1], sample_weights=weights_kn)
    single = [
        train_members(
            [mlp(s)],
            x,
            y,
            xv,
            yv,
            dataclasses.replace(cfg, seed=s),
            seeds=[s],
            sample_weights=weights_kn[k : k + 1],
        )
        for k, s in enumerate((0, 1))
    ]
    for result, ref in zip(stacked.members, single):
        assert_close(weights(result.module), weights(ref.members[0].module))
    plain = train_members([mlp(0)], x, y, xv, yv, cfg, seeds=[0])
    assert not torch.allclose(
        weights(plain.members[0].module)["1.weight"], weights(stacked.members[0].module)["1.weight"]
    )


def test_ensemble_level_stopping(data):
    x, y, xv, yv = data
    cfg = config(max_epochs=10, patience=None)
    result = train_members([mlp(0), mlp(1)], x, y, xv, (yv + 1) % 10, cfg, seeds=[0, 1], ensemble_patience=2)
    record = result.ensemble
    assert record["patience"] == 2 and record["stopped_early"]
    assert len(record["history"]) == record["best_epoch"] + 2 < cfg.max_epochs
    assert all(r.epochs_run == len(record["history"]) for r in result.members)
    assert not any(r.stopped_early for r in result.members)  # their own patience (None) never ran out
    # the same through the training configuration (what recipes and train_overrides set)
    via_config = train_members(
        [mlp(0), mlp(1)], x, y, xv, (yv + 1) % 10, dataclasses.replace(cfg, ensemble_patience=2), seeds=[0, 1]
    )
    assert via_config.ensemble["history"] == record["history"]
    off = train_members(
        [mlp(0), mlp(1)], x, y, xv, (yv + 1) % 10, dataclasses.replace(cfg, max_epochs=4), seeds=[0, 1]
    )
    assert not off.ensemble["stopped_early"] and len(off.ensemble["history"]) == 4


@pytest.mark.parametrize("stack", [True, False])
def test_resume_mid_run_is_bit_identical(data, tmp_path, stack):
    x, y, xv, yv = data
    cfg = config(max_epochs=4, patience=2)
    straight = train_members([mlp(0), mlp(1)], x, y, xv, yv, cfg, seeds=[0, 1], stack=stack)
    path = tmp_path / "members.ckpt"

    class Stop(Exception):
        pass

    def stop_after_two(epoch, record):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        train_members(
            [mlp(0), mlp(1)],
            x,
            y,
            xv,
            yv,
            cfg,
            seeds=[0, 1],
            stack=stack,
            checkpoint_path=path,
            on_epoch_end=stop_after_two,
        )
    assert load_checkpoint(path)["epoch"] == 2
    resumed = train_members(
        [mlp(0), mlp(1)], x, y, xv, yv, cfg, seeds=[0, 1], stack=stack, checkpoint_path=path, resume=True
    )
    for a, b in zip(straight.members, resumed.members):
        wa, wb = weights(a.module), weights(b.module)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)
        assert [e["train_loss"] for e in a.history] == [e["train_loss"] for e in b.history]


def test_corrupted_checkpoint_is_refused(data, tmp_path):
    x, y, xv, yv = data
    path = tmp_path / "members.ckpt"
    train_members([mlp(0), mlp(1)], x, y, xv, yv, config(max_epochs=1), seeds=[0, 1], checkpoint_path=path)
    state = torch.load(path, weights_only=True)
    state["units"][0]["params"][0][0, 0, 0] += 1.0  # one weight changed, format number intact
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="corrupted") as err:
        train_members(
            [mlp(0), mlp(1)],
            x,
            y,
            xv,
            yv,
            config(max_epochs=2),
            seeds=[0, 1],
            checkpoint_path=path,
            resume=True,
        )
    assert "\n" not in str(err.value)
    # flipped bytes inside the file: refused the same way (or as unreadable), never loaded silently
    train_members([mlp(0), mlp(1)], x, y, xv, yv, config(max_epochs=1), seeds=[0, 1], checkpoint_path=path)
    raw = bytearray(path.read_bytes())
    state = torch.load(path, weights_only=True)
    needle = state["units"][0]["params"][0].numpy().tobytes()[:64]
    at = bytes(raw).find(needle)
    assert at > 0
    raw[at + 3] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(ModelLoadError):
        load_checkpoint(path)


def test_what_is_stacked():
    assert stackable(mlp(0))
    assert not stackable(mlp(0, dropout=0.2))  # dropout masks come from the global RNG
    assert stackable(build_model("cifar10_quick", (3, 32, 32), 10, seed=0, width=0.25))  # grouped convolution
    assert not stackable(build_model("alexnet", (3, 32, 32), 10, seed=0, width=0.25))  # it has dropout


def test_stacked_convolutional_members_match_separate_runs():
    # Not exact: one grouped convolution sums in another order than K separate ones (about 1e-8 per step,
    # runtime/training/engine.py's `stackable`), so the comparison is within float tolerance.
    rng = np.random.default_rng(0)
    x = rng.random((120, 3, 16, 16), dtype=np.float32)
    y = rng.integers(0, 10, 120)
    cfg = config(max_epochs=2, batch_size=40, lr=1e-3)

    def conv(seed):
        return build_model("cifar10_quick", (3, 16, 16), 10, seed=seed, width=0.25)

    stacked = train_members([conv(0), conv(1)], x, y, x[:40], y[:40], cfg, seeds=[0, 1])
    assert stacked.stacked == [0, 1]
    for seed, result in enumerate(stacked.members):
        alone = train_member(conv(seed), x, y, x[:40], y[:40], dataclasses.replace(cfg, seed=seed))
        assert result.best_epoch == alone.best_epoch
        assert_close(weights(result.module), weights(alone.module), atol=1e-4)


def test_unstackable_members_equal_separate_runs(data):
    x, y, xv, yv = data
    cfg = config(max_epochs=2)
    modules = [mlp(s, dropout=0.3) for s in (0, 1)]
    result = train_members(modules, x, y, xv, yv, cfg, seeds=[0, 1])
    assert result.stacked == []
    for res, ref in zip(result.members, separate([0, 1], cfg, data, dropout=0.3)):
        wa, wb = weights(res.module), weights(ref.module)
        assert all(torch.equal(wa[k], wb[k]) for k in wa)  # the separate run itself, dropout masks included


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_stacked_training_on_cuda(data):
    x, y, xv, yv = data
    cfg = config(device="cuda")
    result = train_members([mlp(0), mlp(1)], x, y, xv, yv, cfg, seeds=[0, 1])
    cpu = train_members([mlp(0), mlp(1)], x, y, xv, yv, dataclasses.replace(cfg, device="cpu"), seeds=[0, 1])
    assert result.stacked == [0, 1]
    for a, b in zip(result.members, cpu.members):
        assert_close({k: v.cpu() for k, v in weights(a.module).items()}, weights(b.module), atol=1e-3)


@pytest.mark.parametrize("members", [1, 3])
def test_a_non_finite_batch_is_named(data, members):
    from codec.errors import DataError

    x, y, xv, yv = data
    calls = []

    def loss_fn(out, target):
        calls.append(1)
        value = torch.nn.functional.cross_entropy(out, target)
        # the third batch's loss of the last member is NaN (calls run member by member within a batch)
        return value * float("nan") if len(calls) == 3 * members else value

    with pytest.raises(
        DataError, match=rf"member {members - 1}: non-finite training loss \(nan\) at epoch 1, batch 3"
    ):
        train_members([mlp(s) for s in range(members)], x, y, xv, yv, config(), loss_fn=loss_fn)
