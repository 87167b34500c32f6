"""Training backend: learning on real MNIST, ONNX export parity, exact resume, early stopping, bad data."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
import torch

from codec.errors import ConfigError, DataError, ModelLoadError
from codec.models import build_model, get_recipe
from codec.pipelines.train import train_recipe
from codec.runtime.data import load_dataset
from codec.runtime.evaluation.metrics import accuracy
from codec.runtime.execution.session import create_session, predict
from codec.runtime.training.train import (
    TrainConfig,
    export_onnx,
    load_checkpoint,
    predict_torch,
    resolve_device,
    train_member,
)


@pytest.fixture(scope="module")
def mnist():
    """2,000 train / 200 validation / 1,000 test real MNIST examples from the bundled mnist_small."""
    dataset = load_dataset("mnist_small").subset(2200, None, seed=0)
    train, (x_val, y_val) = dataset.split_validation(200 / 2200, seed=0)
    return train.x_train, train.y_train, x_val, y_val, dataset.x_test, dataset.y_test


def small_classifier(seed=0, **kwargs):
    recipe = get_recipe("classifier_s")
    options = {**recipe.arch_kwargs, **kwargs}
    return build_model(recipe.arch, (1, 28, 28), 10, seed=seed, **options)


def fast_config(**overrides):
    config = TrainConfig.from_recipe(get_recipe("classifier_s"), quiet=True, device="cpu")
    return dataclasses.replace(config, **overrides)


def weights(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trains_to_useful_accuracy_and_onnx_matches_torch(mnist, tmp_path):
    x, y, xv, yv, xt, yt = mnist
    config = fast_config(max_epochs=4, batch_size=64, lr=1e-3, optimizer="adam", seed=0)
    result = train_member(small_classifier(), x, y, xv, yv, config)
    assert result.epochs_run == len(result.history) >= 1
    assert [h["epoch"] for h in result.history] == list(range(1, result.epochs_run + 1))
    logits = predict_torch(result.module, xt)
    assert accuracy(logits, yt) > 0.8
    assert result.history[-1]["val_metric"] > 0.75

    path = export_onnx(result.module, tmp_path / "member.onnx", (1, 28, 28))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["member.onnx"]  # one file, no temp or external data
    model = onnx.load(str(path))
    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["output"]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 18
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch dimension
    probs = predict(path, xt)
    expected = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    session = create_session(path)
    for batch in (1, 7):  # the batch dimension really is dynamic
        assert session.run(None, {"input": xt[:batch]})[0].shape == (batch, 10)


@pytest.mark.parametrize(
    "options, arch_options",
    [
        ({"optimizer": "adam", "lr_decay": 0.8}, {"dropout": 0.3}),  # dropout draws from the global RNG
        ({"optimizer": "sgd", "lr": 0.05, "momentum": 0.9}, {}),
    ],
)
def test_killed_and_resumed_run_ends_with_identical_weights(mnist, tmp_path, options, arch_options):
    x, y, xv, yv, _, _ = mnist
    x, y = x[:800], y[:800]
    config = fast_config(max_epochs=4, patience=10, batch_size=50, seed=5, **options)
    uninterrupted = train_member(small_classifier(1, **arch_options), x, y, xv, yv, config)

    checkpoint = tmp_path / "member.ckpt"

    def kill_after_epoch_2(epoch, entry):
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_member(
            small_classifier(1, **arch_options),
            x,
            y,
            xv,
            yv,
            config,
            checkpoint_path=checkpoint,
            on_epoch_end=kill_after_epoch_2,
        )
    assert load_checkpoint(checkpoint)["epoch"] == 2
    resumed_epochs = []
    resumed = train_member(
        small_classifier(1, **arch_options),
        x,
        y,
        xv,
        yv,
        config,
        checkpoint_path=checkpoint,
        resume=True,
        on_epoch_end=lambda epoch, entry: resumed_epochs.append(epoch),
    )
    assert resumed_epochs == [3, 4]  # it continued, it did not start over
    assert same_weights(weights(resumed.module), weights(uninterrupted.module))
    assert resumed.best_epoch == uninterrupted.best_epoch
    drop_time = [{k: v for k, v in h.items() if k != "seconds"} for h in uninterrupted.history]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in resumed.history] == drop_time


def test_checkpoint_loads_safely_and_refuses_other_options(mnist, tmp_path):
    x, y, xv, yv, _, _ = mnist
    x, y = x[:300], y[:300]
    checkpoint = tmp_path / "member.ckpt"
    config = fast_config(max_epochs=1, batch_size=100)
    train_member(small_classifier(), x, y, xv, yv, config, checkpoint_path=checkpoint)
    state = torch.load(checkpoint, weights_only=True)  # no pickled objects inside
    assert state["epoch"] == 1 and state["finished"]
    assert not list(tmp_path.glob(".*.tmp"))

    with pytest.raises(ConfigError, match="lr"):
        train_member(
            small_classifier(),
            x,
            y,
            xv,
            yv,
            dataclasses.replace(config, lr=0.5),
            checkpoint_path=checkpoint,
            resume=True,
        )
    # A longer run may continue a finished one: max_epochs decides only when to stop.
    longer = train_member(
        small_classifier(),
        x,
        y,
        xv,
        yv,
        dataclasses.replace(config, max_epochs=2),
        checkpoint_path=checkpoint,
        resume=True,
    )
    assert longer.epochs_run == 2
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelLoadError, match="checkpoint"):
        train_member(small_classifier(), x, y, xv, yv, config, checkpoint_path=checkpoint, resume=True)


def test_early_stopping_restores_the_best_epochs_weights(mnist, tmp_path):
    x, y, xv, yv, _, _ = mnist
    x, y = x[:600], y[:600]
    # Validation labels that disagree with the training labels: the better the network fits the training
    # set, the worse its validation loss, so patience runs out long before max_epochs.
    wrong_val = (yv + 1) % 10
    config = fast_config(max_epochs=15, patience=2, batch_size=50, lr=3e-3, seed=2)
    module = small_classifier(2)
    snapshots = {}
    checkpoint = tmp_path / "member.ckpt"
    result = train_member(
        module,
        x,
        y,
        xv,
        wrong_val,
        config,
        checkpoint_path=checkpoint,
        on_epoch_end=lambda epoch, entry: snapshots.__setitem__(epoch, weights(module)),
    )
    losses = [h["val_loss"] for h in result.history]
    assert result.stopped_early
    assert result.epochs_run < config.max_epochs
    assert result.best_epoch == int(np.argmin(losses)) + 1
    assert result.epochs_run == result.best_epoch + config.patience
    assert same_weights(weights(result.module), snapshots[result.best_epoch])
    assert not same_weights(weights(result.module), snapshots[result.epochs_run])

    # Resuming a finished run trains nothing and hands back the same best weights.
    again = train_member(
        small_classifier(2), x, y, xv, wrong_val, config, checkpoint_path=checkpoint, resume=True
    )
    assert again.epochs_run == result.epochs_run and again.stopped_early
    assert same_weights(weights(again.module), snapshots[result.best_epoch])


def test_nan_data_and_nan_loss_are_one_line_errors(mnist):
    x, y, xv, yv, _, _ = mnist
    x = x[:200].copy()
    y = y[:200]
    x[3, 0, 5, 5] = np.nan
    with pytest.raises(DataError, match="NaN") as info:
        train_member(small_classifier(), x, y, xv, yv, fast_config(max_epochs=1))
    assert "\n" not in str(info.value)

    x[3, 0, 5, 5] = 0.0
    with pytest.raises(DataError, match=r"epoch 1, batch 1") as info:
        train_member(
            small_classifier(),
            x,
            y,
            xv,
            yv,
            fast_config(max_epochs=1),
            loss_fn=lambda out, target: out.sum() * float("nan"),
        )
    assert "\n" not in str(info.value)

    with pytest.raises(DataError, match="labels go up to"):
        train_member(small_classifier(), x, y + 10, None, None, fast_config(max_epochs=1))


def test_training_without_validation_monitors_training_loss(mnist):
    x, y, _, _, _, _ = mnist
    result = train_member(small_classifier(), x[:300], y[:300], None, None, fast_config(max_epochs=2))
    assert result.epochs_run == 2
    assert all(h["val_loss"] is None for h in result.history)
    train_losses = [h["train_loss"] for h in result.history]
    assert result.best_epoch == int(np.argmin(train_losses)) + 1


def test_reconstruction_recipe_end_to_end(tmp_path):
    summary = train_recipe(
        "autoenc_s",
        0,
        out_path=tmp_path / "ae.onnx",
        overrides={"n_train": 600, "n_test": 200, "max_epochs": 3, "device": "cpu"},
        quiet=True,
    )
    assert summary["task"] == "reconstruction" and summary["metric"] == "mse"
    assert summary["n_train"] + summary["n_val"] == 600 and summary["n_test"] == 200

    dataset = load_dataset("mnist_small").subset(600, 200, seed=0)
    target = dataset.x_test.reshape(len(dataset.x_test), -1)
    recipe = get_recipe("autoenc_s")
    untrained = build_model(recipe.arch, dataset.input_shape, 0, seed=0, **recipe.arch_kwargs)
    untrained_mse = float(np.mean((predict_torch(untrained, dataset.x_test) - target) ** 2))
    assert summary["test_metric"] < 0.8 * untrained_mse

    recon = predict(tmp_path / "ae.onnx", dataset.x_test)
    assert recon.shape == target.shape
    assert recon.min() >= 0.0 and recon.max() <= 1.0  # sigmoid reconstructions, no softmax appended
    assert float(np.mean((recon - target) ** 2)) == pytest.approx(summary["test_metric"], rel=1e-6)


def test_config_from_recipe_and_devices():
    recipe = get_recipe("classifier_s")
    config = TrainConfig.from_recipe(recipe, lr=0.02, batch_size=None)
    assert config.lr == 0.02
    assert config.batch_size == recipe.train["batch_size"]  # None keeps the recipe's value
    with pytest.raises(ConfigError, match="unknown training option 'epochz'"):
        TrainConfig.from_recipe(recipe, epochz=3)
    with pytest.raises(ConfigError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda").type == "cuda"
    else:
        with pytest.raises(ConfigError, match="CUDA"):
            resolve_device("cuda")
    with pytest.raises(ConfigError):
        resolve_device("tpu")
