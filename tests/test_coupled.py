"""TreeNets, bagging and coupled training: split naming, shared-trunk gradients, fused ONNX = torch, exact
resume."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from codec.errors import ConfigError, ModelLoadError
from codec.ir import Role, to_bytes
from codec.ir.ensemble import check_shares_csn
from codec.models import build_model
from codec.runtime.evaluation.metrics import combine
from codec.runtime.training.coupled import (
    EnsembleOptions,
    TreeNet,
    bootstrap_weights,
    build_treenet,
    emit_treenet,
    ensemble_logits,
    member_seed,
    module_names,
    resolve_split,
    sequential_to_network,
    train_coupled,
    treenet_networks,
)
from codec.runtime.training.losses import independent_ce, member_losses
from codec.runtime.training.train import TrainConfig, load_checkpoint

QUICK_SHAPE = (3, 16, 16)


def quick(seed: int) -> nn.Sequential:
    return build_model("cifar10_quick", QUICK_SHAPE, 5, width=0.25, seed=seed)


def mlp(seed: int) -> nn.Sequential:
    return build_model("classifier", (1, 6, 6), 4, hidden=(12, 8), seed=seed)


def run_onnx(model, x: np.ndarray) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(to_bytes(model), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {session.get_inputs()[0].name: x})))


def toy_data(n: int = 96, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Four separable classes of 1x6x6 'images': a bright quadrant per class plus noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.random((n, 1, 6, 6)).astype(np.float32) * 0.5
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, 0, 3 * r : 3 * r + 3, 3 * c : 3 * c + 3] += 1.0
    return x, y


def config(**changes) -> TrainConfig:
    values = {
        "batch_size": 16,
        "max_epochs": 3,
        "patience": None,
        "lr": 0.01,
        "seed": 0,
        "device": "cpu",
        "quiet": True,
        "num_threads": 1,
    }
    values.update(changes)
    return TrainConfig(**values)


# --------------------------------------------------------------------------------------------------------
# Split points
# --------------------------------------------------------------------------------------------------------


def test_module_names_follow_type_and_count():
    names = module_names(quick(0))
    assert names == [
        "conv1",
        "pool1",
        "relu1",
        "conv2",
        "relu2",
        "pool2",
        "conv3",
        "relu3",
        "pool3",
        "flatten1",
        "fc1",
        "fc2",
    ]
    assert module_names(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.1), nn.BatchNorm1d(2))) == [
        "fc1",
        "dropout1",
        "batchnorm1d1",
    ]


def test_resolve_split_names_integers_none_and_all():
    model = quick(0)
    assert resolve_split(model, "conv1") == 1
    assert resolve_split(model, "CONV2") == 4
    assert resolve_split(model, "pool3") == 9
    assert (
        resolve_split(model, "none")
        == resolve_split(model, 0)
        == resolve_split(model, "0")
        == resolve_split(model, None)
        == 0
    )
    assert resolve_split(model, "all") == 12
    assert resolve_split(model, 5) == 5
    assert resolve_split(model, "fc2") == 12  # sharing the last weighted layer shares everything
    assert resolve_split(model, "fc1") == 11
    with pytest.raises(ConfigError, match="unknown split 'conv9'.*conv1, pool1, relu1, conv2"):
        resolve_split(model, "conv9")
    with pytest.raises(ConfigError, match="0..12"):
        resolve_split(model, 13)
    with pytest.raises(ConfigError, match="0..12"):
        resolve_split(model, "-1")


# --------------------------------------------------------------------------------------------------------
# TreeNet construction and gradients
# --------------------------------------------------------------------------------------------------------


def test_treenet_shares_the_trunk_and_seeds_each_branch():
    tree = build_treenet(quick, 3, "conv2", seed=5)
    assert tree.split == 4 and tree.members == 3 and not tree.fully_shared
    assert tree.describe()["trunk"] == ["conv1", "pool1", "relu1", "conv2"]
    # the trunk modules are the same objects in every member
    assert all(tree.member(i)[0] is tree.trunk[0] for i in range(3))
    # branch m is member m's own network from member_seed(seed, m); the trunk is member 0's
    for m in range(3):
        reference = quick(member_seed(5, m))
        torch.testing.assert_close(tree.branches[m][2].weight, reference[6].weight)  # conv3
    torch.testing.assert_close(tree.trunk[3].weight, quick(member_seed(5, 0))[3].weight)
    assert not torch.equal(tree.branches[0][2].weight, tree.branches[1][2].weight)
    counts = tree.parameter_counts()
    assert counts["stored"] == sum(p.numel() for p in tree.parameters())
    assert counts["unshared"] == 3 * sum(p.numel() for p in quick(0).parameters())
    # bagging alone: every member starts from the same weights
    same = build_treenet(quick, 3, "conv2", seed=5, random_init=False)
    assert torch.equal(same.branches[0][2].weight, same.branches[2][2].weight)


def test_treenet_forward_is_each_member_run_alone():
    tree = build_treenet(quick, 3, "conv1", seed=1).eval()
    x = torch.rand(5, *QUICK_SHAPE)
    out = tree(x)
    assert out.shape == (3, 5, 5)
    for m in range(3):
        torch.testing.assert_close(out[m], tree.member(m)(x))


def test_trunk_gradient_is_the_sum_of_the_branches_gradients():
    tree = build_treenet(quick, 3, "conv2", seed=2)
    x, y = torch.rand(6, *QUICK_SHAPE), torch.tensor([0, 1, 2, 3, 4, 0])
    tree.zero_grad()
    independent_ce(tree(x), y).backward()
    together = [p.grad.clone() for p in tree.trunk.parameters()]
    separately = [torch.zeros_like(p) for p in tree.trunk.parameters()]
    for m in range(3):
        tree.zero_grad()
        nn.functional.cross_entropy(tree.member(m)(x), y).backward()  # branch m's loss alone
        for total, p in zip(separately, tree.trunk.parameters()):
            total += p.grad
        assert all(p.grad.abs().sum() > 0 for p in tree.trunk.parameters())
    for a, b in zip(together, separately):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# --------------------------------------------------------------------------------------------------------
# Export: fused ONNX = torch
# --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["none", "conv1", "relu1", "conv2", "pool3", "fc1", "all"])
def test_fused_onnx_equals_torch_members_combined(split):
    tree = build_treenet(quick, 3, split, seed=3).eval()
    x = np.random.default_rng(0).random((7, *QUICK_SHAPE), dtype=np.float32)
    probs = torch.softmax(ensemble_logits(tree, x).double(), dim=2).numpy()
    for criterion in ("mean", "prod"):
        model = emit_treenet(tree, QUICK_SHAPE, criterion=criterion, member_outputs=True)
        onnx.checker.check_model(onnx.load_from_string(to_bytes(model)), full_check=True)
        outs = run_onnx(model, x)
        np.testing.assert_allclose(outs["output"], combine(probs, criterion), atol=2e-6)
        for m in range(3):
            np.testing.assert_allclose(outs[f"member_{m}"], probs[m], atol=2e-6)
    # (the packed graph computes a Dense layer on the members' own values as a grouped 1x1 Conv:
    # count by layer)
    convs = sum(node.op_type == "Conv" and "/conv" in node.name for node in model.graph)
    trunk_convs = {"none": 0, "conv1": 1, "relu1": 1, "conv2": 2, "pool3": 3, "fc1": 3, "all": 3}[split]
    # the trunk once, the rest once for the three members (packed: one Conv over all members'
    # filters per layer)
    assert convs == trunk_convs + (3 - trunk_convs)
    if split == "all":
        assert (
            sum(node.op_type == "Gemm" for node in model.graph) == 1 + 1
        )  # fc1 once, the output layers as one


def test_member_networks_share_whole_trunk_layers():
    tree = build_treenet(mlp, 4, "fc2", seed=0)
    members, trunk = treenet_networks(tree, (1, 6, 6))
    assert [layer.name for layer in trunk.layers] == ["flatten1", "fc1", "fc2"]
    assert trunk.compute_layers()[0].activation.kind == "relu"  # relu1 folded onto fc1
    for member in members:
        assert check_shares_csn(member, trunk) == 2
        assert [bool((layer.roles == Role.FROZEN_SHARED).all()) for layer in member.compute_layers()] == [
            True,
            True,
            False,
        ]
        assert member.compute_layers()[-1].activation.kind == "softmax"
    independent, none = treenet_networks(build_treenet(mlp, 2, "none", seed=0), (1, 6, 6))
    assert none is None and len(independent) == 2
    shared, everything = treenet_networks(build_treenet(mlp, 3, "all", seed=0), (1, 6, 6))
    assert len(shared) == 3 and [layer.name for layer in everything.compute_layers()] == ["fc1", "fc2"]
    assert all(check_shares_csn(member, everything) == 2 for member in shared)


def test_export_refuses_what_the_ir_cannot_express():
    with pytest.raises(ConfigError, match=r"batchnorm2d1 \(BatchNorm2d\)"):
        sequential_to_network(
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 2)),
            (1, 6, 6),
            ["conv1", "batchnorm2d1", "flatten1", "fc1"],
        )
    with pytest.raises(ConfigError, match="does not commute"):
        sequential_to_network(
            nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2)),
            (1, 6, 6),
            ["conv1", "pool1", "relu1", "flatten1", "fc1"],
        )
    nin = build_model("nin", (3, 8, 8), 3, width=0.05)
    with pytest.raises(ConfigError, match="ending in a Linear or Conv2d"):
        sequential_to_network(nin, (3, 8, 8), module_names(nin))


# --------------------------------------------------------------------------------------------------------
# Bagging
# --------------------------------------------------------------------------------------------------------


def test_bootstrap_samples_differ_per_member_and_are_reproducible():
    weights = bootstrap_weights(1000, 4, seed=3)
    assert weights.shape == (4, 1000) and weights.dtype == np.float32
    assert np.all(weights.sum(axis=1) == 1000)  # n draws with replacement
    assert np.all(weights == np.round(weights)) and weights.max() > 1  # counts: some examples drawn twice
    unique = (weights > 0).mean(axis=1)
    assert np.all(np.abs(unique - (1 - np.exp(-1))) < 0.05)  # ~63.2 % distinct examples
    assert all(not np.array_equal(weights[a], weights[b]) for a in range(4) for b in range(a + 1, 4))
    np.testing.assert_array_equal(weights, bootstrap_weights(1000, 4, seed=3))
    assert not np.array_equal(weights, bootstrap_weights(1000, 4, seed=4))
    np.testing.assert_array_equal(
        weights[:2], bootstrap_weights(1000, 2, seed=3)
    )  # member m's sample depends on m only


def test_bagging_members_from_one_initialisation_drift_apart():
    x, y = toy_data()
    options = EnsembleOptions(members=3, variation="bagging")
    tree = build_treenet(mlp, 3, "none", seed=0, random_init=options.random_init)
    start = [b[1].weight.detach().clone() for b in tree.branches]
    assert torch.equal(start[0], start[1])
    result = train_coupled(tree, x, y, None, None, config(max_epochs=2), options)
    after = [b[1].weight.detach() for b in result.module.branches]
    assert not torch.equal(after[0], after[1]) and not torch.equal(after[1], after[2])
    assert all(0.55 < u < 0.72 for u in result.bag_unique)


# --------------------------------------------------------------------------------------------------------
# Coupled training
# --------------------------------------------------------------------------------------------------------


def _state(tree: TreeNet) -> list[torch.Tensor]:
    return [v.detach().clone() for v in tree.state_dict().values()]


def _assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, rtol=0, atol=0)


def test_training_learns_and_is_reproducible():
    x, y = toy_data()
    xv, yv = toy_data(48, seed=1)
    options = EnsembleOptions(members=3, split="fc1", loss="mcl", k=1, pretrain_epochs=1)
    runs = [
        train_coupled(build_treenet(mlp, 3, "fc1", seed=0), x, y, xv, yv, config(max_epochs=4), options)
        for _ in range(2)
    ]
    _assert_same(_state(runs[0].module), _state(runs[1].module))
    history = runs[0].history
    assert [e["phase"] for e in history] == ["pretrain", "mcl", "mcl", "mcl"]
    assert history[-1]["val_oracle_accuracy"] > 0.6  # from 0.25 chance on four classes
    assert runs[0].best_epoch >= 2  # the best restarts after pretraining: the weights are MCL's


def test_resume_after_an_interruption_gives_the_uninterrupted_weights(tmp_path):
    x, y = toy_data()
    xv, yv = toy_data(48, seed=1)
    options = EnsembleOptions(members=3, split="fc1", loss="mcl", k=2, variation="both")
    straight = train_coupled(
        build_treenet(mlp, 3, "fc1", seed=1), x, y, xv, yv, config(max_epochs=4), options
    )

    class Stop(Exception):
        pass

    def stop_after_two(epoch, entry):
        if epoch == 2:
            raise Stop

    path = tmp_path / "ens.ckpt"
    with pytest.raises(Stop):
        train_coupled(
            build_treenet(mlp, 3, "fc1", seed=1),
            x,
            y,
            xv,
            yv,
            config(max_epochs=4),
            options,
            checkpoint_path=path,
            on_epoch_end=stop_after_two,
        )
    assert load_checkpoint(path)["epoch"] == 2
    resumed = train_coupled(
        build_treenet(mlp, 3, "fc1", seed=1),
        x,
        y,
        xv,
        yv,
        config(max_epochs=4),
        options,
        checkpoint_path=path,
        resume=True,
    )
    _assert_same(_state(straight.module), _state(resumed.module))
    assert [e["train_loss"] for e in resumed.history] == [e["train_loss"] for e in straight.history]
    assert resumed.epochs_run == 4

    # other ensemble options cannot continue this checkpoint; nor can a single-member checkpoint be read here
    with pytest.raises(ConfigError, match="other ensemble options"):
        train_coupled(
            build_treenet(mlp, 3, "fc1", seed=1),
            x,
            y,
            xv,
            yv,
            config(max_epochs=4),
            EnsembleOptions(members=3, split="fc1", loss="mcl", k=1, variation="both"),
            checkpoint_path=path,
            resume=True,
        )
    state = load_checkpoint(path)
    state.pop("kind")
    torch.save(state, path)
    with pytest.raises(ModelLoadError, match="not a coupled ensemble"):
        train_coupled(
            build_treenet(mlp, 3, "fc1", seed=1),
            x,
            y,
            xv,
            yv,
            config(max_epochs=4),
            options,
            checkpoint_path=path,
            resume=True,
        )


def test_accumulating_two_batches_equals_one_batch_of_twice_the_size():
    x, y = toy_data(96)
    options_1 = EnsembleOptions(members=2, split="fc1")
    options_2 = EnsembleOptions(members=2, split="fc1", accumulate=2)
    big = train_coupled(
        build_treenet(mlp, 2, "fc1", seed=4),
        x,
        y,
        None,
        None,
        config(batch_size=32, optimizer="sgd", momentum=0.0),
        options_1,
    )
    small = train_coupled(
        build_treenet(mlp, 2, "fc1", seed=4),
        x,
        y,
        None,
        None,
        config(batch_size=16, optimizer="sgd", momentum=0.0),
        options_2,
    )
    for a, b in zip(_state(big.module), _state(small.module)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    unaccumulated = train_coupled(
        build_treenet(mlp, 2, "fc1", seed=4),
        x,
        y,
        None,
        None,
        config(batch_size=16, optimizer="sgd", momentum=0.0),
        options_1,
    )
    assert not torch.allclose(_state(unaccumulated.module)[0], _state(small.module)[0])


def test_learning_rate_scaled_by_members_and_option_errors():
    x, y = toy_data(32)
    options = EnsembleOptions(members=3, loss="score_avg", lr_scale_by_members=True)
    result = train_coupled(
        build_treenet(mlp, 3, "none", seed=0), x, y, None, None, config(max_epochs=1, lr=0.002), options
    )
    assert result.history[0]["lr"] == pytest.approx(0.006)
    with pytest.raises(ConfigError, match="bagging gives each member its own sample"):
        EnsembleOptions(members=3, loss="prob_avg", variation="bagging")
    with pytest.raises(ConfigError, match="unknown variation"):
        EnsembleOptions(variation="boosting")
    with pytest.raises(ConfigError, match="accumulate"):
        EnsembleOptions(accumulate=0)
    with pytest.raises(ConfigError, match="unknown monitor"):
        EnsembleOptions(monitor="accuracy")
    with pytest.raises(ConfigError, match="has 3 members but the options ask for 2"):
        train_coupled(
            build_treenet(mlp, 3, "none", seed=0), x, y, None, None, config(), EnsembleOptions(members=2)
        )


def test_monitors_watch_different_validation_losses():
    x, y = toy_data()
    xv, yv = toy_data(48, seed=1)
    values = {}
    for monitor in ("objective", "ensemble_nll", "member_ce"):
        options = EnsembleOptions(members=2, loss="mcl", k=1, monitor=monitor)
        result = train_coupled(
            build_treenet(mlp, 2, "none", seed=0), x, y, xv, yv, config(max_epochs=1), options
        )
        values[monitor] = result.history[0]["val_loss"]
    tree = build_treenet(mlp, 2, "none", seed=0)
    train_coupled(tree, x, y, xv, yv, config(max_epochs=1), EnsembleOptions(members=2, loss="mcl", k=1))
    losses = member_losses(ensemble_logits(tree, xv), torch.from_numpy(yv))
    assert values["objective"] == pytest.approx(float(losses.min(dim=0).values.mean()), rel=1e-5)
    assert values["member_ce"] == pytest.approx(float(losses.mean()), rel=1e-5)
    assert values["objective"] < values["ensemble_nll"] and values["objective"] < values["member_ce"]


# --------------------------------------------------------------------------------------------------------
# Stacked heads: the branches as one stacked computation give the loop's weights
# --------------------------------------------------------------------------------------------------------


def _train_both(build, split, options, cfg, *, x=None, y=None, xv=None, yv=None, seed=0):
    """The same run with the heads stacked and with the loop over branches."""
    if x is None:
        (x, y), (xv, yv) = toy_data(), toy_data(48, seed=1)
    return [
        train_coupled(
            build_treenet(build, options.members, split, seed=seed, stack_heads=stack),
            x,
            y,
            xv,
            yv,
            cfg,
            options,
        )
        for stack in (True, False)
    ]


@pytest.mark.parametrize(
    ("split", "options", "changes"),
    [
        ("fc1", {"loss": "score_avg"}, {"lr_decay": 0.8}),
        ("fc1", {"loss": "prob_avg"}, {}),
        ("fc1", {"loss": "mcl", "k": 1, "pretrain_epochs": 1}, {}),
        ("relu1", {"loss": "mcl", "k": 2, "alpha": 0.3}, {"weight_decay": 1e-3}),
        ("fc1", {"loss": "independent", "variation": "both"}, {"optimizer": "sgd", "momentum": 0.9}),
        ("none", {"loss": "independent", "variation": "bagging"}, {}),
    ],
)
def test_stacked_mlp_heads_give_exactly_the_loops_weights_and_logits(split, options, changes):
    options = EnsembleOptions(members=3, split=split, **options)
    stacked, loop = _train_both(mlp, split, options, config(max_epochs=3, **changes))
    assert stacked.heads_stacked and not loop.heads_stacked
    _assert_same(_state(stacked.module), _state(loop.module))
    assert [e["train_loss"] for e in stacked.history] == [e["train_loss"] for e in loop.history]
    assert [e["val_loss"] for e in stacked.history] == [e["val_loss"] for e in loop.history]
    xv, _ = toy_data(48, seed=1)
    stacked_logits = ensemble_logits(stacked.module, xv)  # TreeNet.forward, stacked
    assert stacked.module.stacks_on(stacked.module.trunk(torch.from_numpy(xv)))
    stacked.module.stack_heads = False
    torch.testing.assert_close(stacked_logits, ensemble_logits(stacked.module, xv), rtol=0, atol=0)
    torch.testing.assert_close(stacked_logits, ensemble_logits(loop.module, xv), rtol=0, atol=0)


def test_stacked_convolutional_heads_are_float_close_to_the_loop():
    rng = np.random.default_rng(0)
    x, y = rng.random((48, *QUICK_SHAPE), dtype=np.float32), rng.integers(0, 5, 48)
    options = EnsembleOptions(members=3, split="conv2", loss="mcl", k=1)
    # SGD: Adam divides by the root of tiny second moments, which magnifies the grouped convolution's
    # float-level differences in the gradients (measured: 6e-5 in the weights after 2 epochs).
    cfg = config(max_epochs=2, optimizer="sgd", momentum=0.9, lr=0.05)
    stacked, loop = _train_both(quick, "conv2", options, cfg, x=x, y=y, xv=x[:16], yv=y[:16])
    assert stacked.heads_stacked and not loop.heads_stacked
    for a, b in zip(_state(stacked.module), _state(loop.module)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        ensemble_logits(stacked.module, x), ensemble_logits(loop.module, x), rtol=0, atol=1e-5
    )


def test_stacked_heads_resume_exactly_from_either_paths_checkpoint(tmp_path):
    x, y = toy_data()
    xv, yv = toy_data(48, seed=1)
    options = EnsembleOptions(members=3, split="fc1", loss="mcl", k=2, variation="both")

    def run(stack, **kwargs):
        tree = build_treenet(mlp, 3, "fc1", seed=1, stack_heads=stack)
        return train_coupled(tree, x, y, xv, yv, config(max_epochs=4), options, **kwargs)

    class Stop(Exception):
        pass

    def stop_after_two(epoch, entry):
        if epoch == 2:
            raise Stop

    straight = run(True)
    paths = {stack: tmp_path / f"stacked_{stack}.ckpt" for stack in (True, False)}
    for stack, path in paths.items():
        with pytest.raises(Stop):
            run(stack, checkpoint_path=path, on_epoch_end=stop_after_two)
    # One checkpoint format: the stacked path writes the loop's model and optimizer layout, same values.
    written = {stack: load_checkpoint(path)["units"][0] for stack, path in paths.items()}
    _assert_same(list(written[True]["model"].values()), list(written[False]["model"].values()))
    opt_stacked, opt_loop = written[True]["optimizer"], written[False]["optimizer"]
    assert opt_stacked["param_groups"] == opt_loop["param_groups"]
    assert opt_stacked["state"].keys() == opt_loop["state"].keys()
    for i, entry in opt_loop["state"].items():
        assert entry.keys() == opt_stacked["state"][i].keys()
        _assert_same(list(opt_stacked["state"][i].values()), list(entry.values()))
    # Each path resumes from each checkpoint to the uninterrupted weights.
    for path in paths.values():
        for stack in (True, False):
            copy = tmp_path / "resume.ckpt"
            copy.write_bytes(path.read_bytes())
            resumed = run(stack, checkpoint_path=copy, resume=True)
            assert resumed.heads_stacked is stack and resumed.epochs_run == 4
            _assert_same(_state(straight.module), _state(resumed.module))
            assert [e["train_loss"] for e in resumed.history] == [e["train_loss"] for e in straight.history]


def test_unstackable_heads_keep_the_loop():
    def dropout_mlp(seed):
        return build_model("classifier", (1, 6, 6), 4, hidden=(12, 8), dropout=0.3, seed=seed)

    x, y = toy_data(32)
    tree = build_treenet(dropout_mlp, 2, "fc1", seed=0)
    assert not tree.heads_stacked  # dropout masks come from the global RNG, drawn per branch
    result = train_coupled(
        tree, x, y, None, None, config(max_epochs=1), EnsembleOptions(members=2, split="fc1")
    )
    assert not result.heads_stacked
    assert not build_treenet(mlp, 2, "all", seed=0).heads_stacked  # no branch weights
    assert not build_treenet(mlp, 2, "fc1", seed=0, stack_heads=False).heads_stacked
    assert not build_treenet(mlp, 1, "fc1", seed=0).heads_stacked  # one member: nothing to stack
    assert build_treenet(mlp, 2, "fc1", seed=0).heads_stacked
    trunk = nn.Sequential(nn.Flatten(), nn.Linear(36, 8))
    batch_norm = TreeNet(trunk, [nn.Sequential(nn.BatchNorm1d(8), nn.Linear(8, 4)) for _ in range(2)], [])
    widths = TreeNet(trunk, [nn.Sequential(nn.Linear(8, w), nn.ReLU(), nn.Linear(w, 4)) for w in (5, 6)], [])
    assert not batch_norm.heads_stacked and not widths.heads_stacked
    # equal shapes, other settings: the stacked computation would follow branch 0's
    slopes = TreeNet(trunk, [nn.Sequential(nn.LeakyReLU(a), nn.Linear(8, 4)) for a in (0.1, 0.2)], [])
    assert not slopes.heads_stacked
    # a Linear head on a spatial trunk output acts on the last axis: left to the loop
    spatial = TreeNet(nn.Sequential(), [nn.Sequential(nn.Linear(6, 4), nn.Flatten()) for _ in range(2)], [])
    assert spatial.heads_stacked and not spatial.stacks_on(torch.zeros(2, 1, 6, 6))
    assert spatial(torch.zeros(2, 1, 6, 6)).shape == (2, 2, 24)


def test_stacked_forward_gives_a_callers_backward_the_loops_gradients():
    x, y = (torch.from_numpy(a) for a in toy_data(24))
    grads = []
    for stack in (True, False):
        tree = build_treenet(mlp, 3, "fc1", seed=2, stack_heads=stack)
        independent_ce(tree(x), y).backward()  # the caller's own step: gradients land on the branch modules
        grads.append([p.grad.clone() for p in tree.parameters()])
    assert all(g.abs().sum() > 0 for g in grads[0])
    _assert_same(grads[0], grads[1])
