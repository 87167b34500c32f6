"""Model-parallel coupled training (gloo, 2 ranks on loopback): the same final weights, history and trunk
gradients as single-process `train_coupled`, for independent, MCL, averaged losses, uneven ownership,
bagging without a trunk, full sharing and the replicated trunk.

One torchrun job runs every case (starting ranks costs more than training these tiny TreeNets); each test
compares one case with a single-process run of the same seeds."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from codec.errors import ConfigError
from codec.models import build_model
from codec.runtime.training.coupled import EnsembleOptions, build_treenet, train_coupled
from codec.runtime.training.coupled_dist import (
    CoupledPlan,
    communication_per_step,
    plan_coupled,
    train_coupled_distributed,
)
from codec.runtime.training.losses import EnsembleLoss
from codec.runtime.training.train import TrainConfig

# Floating-point sums in another order (the trunk's gradient is summed over ranks, not over branches in
# one autograd pass) may move weights by a few ulps per step; nothing else may differ.
ATOL = 1e-5

CONFIG = {
    "batch_size": 32,
    "max_epochs": 4,
    "patience": 2,
    "lr": 0.01,
    "seed": 3,
    "device": "cpu",
    "quiet": True,
    "num_threads": 1,
}
CASES = {
    "independent": {"options": {"members": 2, "loss": "independent", "split": "relu1"}},
    "mcl_k1": {
        "options": {"members": 4, "loss": "mcl", "k": 1, "split": "relu1", "accumulate": 2},
        "config": {"optimizer": "sgd", "lr": 0.05},
    },
    "prob_avg": {"options": {"members": 2, "loss": "prob_avg", "split": "fc2"}},
    # stops early (epoch 5, best 3): the best weights are rank 0's copy, broadcast to every rank at the end
    "uneven_mcl": {
        "options": {
            "members": 3,
            "loss": "mcl",
            "k": 2,
            "alpha": 0.25,
            "pretrain_epochs": 1,
            "split": "relu1",
        },
        "config": {"lr": 0.05, "max_epochs": 8},
        "stops_early": True,
    },
    "uneven_score_avg": {
        "options": {"members": 3, "loss": "score_avg", "split": "relu1", "lr_scale_by_members": True},
        "config": {"optimizer": "sgd", "lr": 0.02, "lr_decay": 0.9},
    },
    "bagging_no_trunk": {
        "options": {"members": 3, "loss": "independent", "split": "none", "variation": "both"}
    },
    "fully_shared": {"options": {"members": 2, "loss": "independent", "split": "all"}},
    "replicated_trunk": {
        "options": {"members": 3, "loss": "mcl", "k": 1, "split": "relu1"},
        "trunk": "replicate",
    },
    # Dropout in the trunk runs on rank 0 only, drawing from the stream a single process draws from
    "dropout_trunk": {"options": {"members": 3, "loss": "prob_avg", "split": "dropout1"}, "net": "dropout"},
}

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    import numpy as np
    import torch
    from codec.runtime.training import distributed
    from codec.models import build_model
    from codec.runtime.training.coupled import EnsembleOptions, build_treenet
    from codec.runtime.training.coupled_dist import coupled_backward, plan_coupled, train_coupled_distributed
    from codec.runtime.training.losses import EnsembleLoss
    from codec.runtime.training.train import TrainConfig

    world = distributed.init(threads=1)
    out = Path(sys.argv[1])
    spec = json.loads((out / "cases.json").read_text())
    data = np.load(out / "data.npz")

    def mlp(seed):
        return build_model("classifier", (1, 6, 6), 4, hidden=(12, 8), seed=seed)

    def dropout(seed):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, 12), torch.nn.ReLU(),
                                   torch.nn.Dropout(0.3), torch.nn.Linear(12, 8), torch.nn.ReLU(),
                                   torch.nn.Linear(8, 4))

    for name, case in spec["cases"].items():
        options = EnsembleOptions(**case["options"])
        config = TrainConfig(**{**spec["config"], **case.get("config", {})})
        # Rank 1 builds from another seed: the run must start from rank 0's weights anyway.
        build = dropout if case.get("net") == "dropout" else mlp
        tree = build_treenet(build, options.members, options.split, config.seed + 100 * world.rank,
                             random_init=options.random_init)
        result = train_coupled_distributed(tree, data["x"], data["y"], data["xv"], data["yv"], config,
                                           options, trunk=case.get("trunk", "broadcast"))
        torch.save({"state": result.module.state_dict(), "history": json.dumps(result.history),
                    "best_epoch": result.best_epoch, "stopped_early": result.stopped_early},
                   out / f"{name}_rank{world.rank}.pt")

    # One backward of one batch: every rank saves the gradients it holds.
    tree = build_treenet(mlp, 3, "relu1", 3)
    x, y = torch.from_numpy(data["x"][:40]), torch.from_numpy(data["y"][:40])
    grads = {}
    for loss_name in ("prob_avg", "mcl"):
        plan = plan_coupled(tree, x)
        tree.zero_grad(set_to_none=True)
        ties = torch.Generator().manual_seed(7)
        value = coupled_backward(tree, plan, x, y, None, EnsembleLoss(loss_name, 3), ties, scale=0.5)
        grads[loss_name] = {"value": torch.tensor(value),
                             **{k: p.grad.clone() for k, p in tree.named_parameters() if p.grad is not None}}
    torch.save(grads, out / f"grads_rank{world.rank}.pt")

    # Failures reach every rank as the same one-line error (none may hang waiting for the others).
    errors = {}
    options = EnsembleOptions(members=3, loss="independent", split="relu1")
    config = TrainConfig(**spec["config"])
    tries = {
        "other_data": (data["x"][: 150 + 10 * world.rank], data["y"][: 150 + 10 * world.rank], config),
        "diverges": (data["x"] * 1e4, data["y"],
                     TrainConfig(**{**spec["config"], "optimizer": "sgd", "lr": 1e6})),
    }
    for name, (x, y, cfg) in tries.items():
        try:
            train_coupled_distributed(build_treenet(mlp, 3, "relu1", 3), x, y, None, None, cfg, options)
            errors[name] = None
        except Exception as exc:
            errors[name] = f"{type(exc).__name__}: {exc}"
    (out / f"errors_rank{world.rank}.json").write_text(json.dumps(errors))
    distributed.exit_process(0)
    """
)


def mlp(seed: int):
    return build_model("classifier", (1, 6, 6), 4, hidden=(12, 8), seed=seed)


def dropout(seed: int):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Flatten(),
        torch.nn.Linear(36, 12),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.3),
        torch.nn.Linear(12, 8),
        torch.nn.ReLU(),
        torch.nn.Linear(8, 4),
    )


def toy_data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Four classes of 1x6x6 'images' (a bright quadrant per class) with label noise, so members disagree."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.random((n, 1, 6, 6)).astype(np.float32) * 0.8
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, 0, 3 * r : 3 * r + 3, 3 * c : 3 * c + 3] += 0.6
    flip = rng.random(n) < 0.15
    y[flip] = rng.integers(0, 4, int(flip.sum()))
    return x, y


def _case_config(case: dict) -> TrainConfig:
    return TrainConfig(**{**CONFIG, **case.get("config", {})})


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """Runs SCRIPT on 2 gloo ranks once; returns its output folder and the data."""
    out = tmp_path_factory.mktemp("coupled_dist")
    x, y = toy_data(200, 0)
    xv, yv = toy_data(64, 1)
    np.savez(out / "data.npz", x=x, y=y, xv=xv, yv=yv)
    (out / "cases.json").write_text(json.dumps({"config": CONFIG, "cases": CASES}))
    script = out / "job.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            str(out),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, (x, y, xv, yv)


def _load(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_end_with_the_single_process_weights(job, name):
    out, (x, y, xv, yv) = job
    case = CASES[name]
    options = EnsembleOptions(**case["options"])
    config = _case_config(case)
    build = dropout if case.get("net") == "dropout" else mlp
    tree = build_treenet(build, options.members, options.split, config.seed, random_init=options.random_init)
    initial = {k: v.clone() for k, v in tree.state_dict().items()}
    reference = train_coupled(tree, x, y, xv, yv, config, options)
    expected = reference.module.state_dict()

    ranks = [_load(out / f"{name}_rank{r}.pt") for r in (0, 1)]
    for key in expected:  # every rank returns the same TreeNet, bit for bit
        assert torch.equal(ranks[0]["state"][key], ranks[1]["state"][key]), key
    got = ranks[0]["state"]
    assert set(got) == set(expected)
    moved = max(float((expected[k] - initial[k]).abs().max()) for k in expected)
    assert moved > 1e-2  # training changed the weights, so equality below is not equality of initial weights
    diff = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    assert diff < ATOL, f"max abs weight difference {diff:.3g}"
    history = json.loads(ranks[0]["history"])
    if case.get("stops_early"):
        assert reference.stopped_early and reference.best_epoch < reference.epochs_run
    assert ranks[0]["best_epoch"] == reference.best_epoch
    assert ranks[0]["stopped_early"] == reference.stopped_early
    assert [e["epoch"] for e in history] == [e["epoch"] for e in reference.history]
    assert [e["phase"] for e in history] == [e["phase"] for e in reference.history]
    for ours, theirs in zip(history, reference.history):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], abs=1e-5)
        assert ours["val_loss"] == pytest.approx(theirs["val_loss"], abs=1e-5)
        assert ours["lr"] == pytest.approx(theirs["lr"])
    assert json.loads(ranks[1]["history"]) == history


@pytest.mark.parametrize("loss_name", ["prob_avg", "mcl"])
def test_one_backward_gives_the_single_process_gradients(job, loss_name):
    out, (x, y, _, _) = job
    tree = build_treenet(mlp, 3, "relu1", 3)
    tree.zero_grad(set_to_none=True)
    ties = torch.Generator().manual_seed(7)
    value = EnsembleLoss(loss_name, 3)(tree(torch.from_numpy(x[:40])), torch.from_numpy(y[:40]), None, ties)
    (value * 0.5).backward()
    rank0, rank1 = (_load(out / f"grads_rank{r}.pt")[loss_name] for r in (0, 1))
    assert float(rank0["value"]) == pytest.approx(float(value.detach()), abs=1e-6)
    assert float(rank1["value"]) == float(rank0["value"])  # both ranks compute the same loss
    # rank 0: the trunk and members 0 and 2; rank 1: member 1 only (no trunk graph there)
    assert {k.split(".")[0] + (k.split(".")[1] if k.startswith("branches") else "") for k in rank0} == {
        "value",
        "trunk",
        "branches0",
        "branches2",
    }
    assert {k.split(".")[0] + k.split(".")[1] for k in rank1 if k != "value"} == {"branches1"}
    for key, param in tree.named_parameters():
        got = rank1[key] if key.startswith("branches.1.") else rank0[key]
        assert param.grad.abs().max() > 0, key
        torch.testing.assert_close(got, param.grad, rtol=1e-5, atol=1e-7, msg=key)


def test_failures_reach_every_rank_as_one_line(job):
    out, _ = job
    errors = [json.loads((out / f"errors_rank{r}.json").read_text()) for r in (0, 1)]
    for rank_errors in errors:
        assert rank_errors["other_data"].startswith(
            "ConfigError: rank 1 was given other training data than rank 0"
        )
        assert rank_errors["diverges"].startswith("DataError: non-finite training loss")
        assert all("\n" not in message for message in rank_errors.values())


# --------------------------------------------------------------------------------------------------------
# In one process
# --------------------------------------------------------------------------------------------------------


def test_one_process_is_train_coupled():
    x, y = toy_data(64, 2)
    options = EnsembleOptions(members=2, loss="mcl", split="relu1")
    config = TrainConfig(**{**CONFIG, "max_epochs": 2, "patience": None})
    a = train_coupled_distributed(build_treenet(mlp, 2, "relu1", 3), x, y, None, None, config, options)
    b = train_coupled(build_treenet(mlp, 2, "relu1", 3), x, y, None, None, config, options)
    for key, value in b.module.state_dict().items():
        assert torch.equal(a.module.state_dict()[key], value)

    def drop(history):
        return [{k: v for k, v in e.items() if k != "seconds"} for e in history]

    assert drop(a.history) == drop(b.history) and len(a.history) == 2
    with pytest.raises(ConfigError, match="unknown trunk mode 'sideways'"):
        train_coupled_distributed(
            build_treenet(mlp, 2, "relu1", 3), x, y, None, None, config, options, trunk="sideways"
        )


def test_plan_assigns_members_round_robin_and_picks_the_cheaper_trunk_exchange():
    tree = build_treenet(mlp, 5, "relu1", 0)
    x = torch.rand(4, 1, 6, 6)
    plans = [plan_coupled(tree, x, rank=r, size=2) for r in (0, 1)]
    assert [p.owned for p in plans] == [[0, 2, 4], [1, 3]]
    assert [p.owns_trunk for p in plans] == [True, False]
    assert plans[0].slots == 3 and plans[0].trunk_shape == (12,) and plans[0].classes == 4
    assert plans[1].state_owner("trunk.1.weight") == 0 and plans[1].state_owner("branches.3.0.weight") == 1
    # the trunk (36 -> 12) holds 444 weights and 12 features per example: activations win up to 37 examples
    assert plan_coupled(tree, x, trunk="auto", batch_size=32, rank=0, size=2).trunk == "broadcast"
    assert plan_coupled(tree, x, trunk="auto", batch_size=64, rank=0, size=2).trunk == "replicate"
    assert (
        plan_coupled(tree, x, trunk="auto", batch_size=16, accumulate=4, rank=0, size=2).trunk == "replicate"
    )
    assert (
        plan_coupled(build_treenet(mlp, 2, "none", 0), x, trunk="replicate", rank=0, size=2).trunk == "none"
    )
    volume = communication_per_step(
        trunk_params=444, trunk_features=12, batch_size=32, accumulate=1, members=5, classes=4, world_size=2
    )
    assert volume == {"broadcast": 2 * 32 * 12, "replicate": 2 * 444, "logits": 2 * 3 * 32 * 4}


def test_replicating_a_trunk_with_dropout_is_refused():
    tree = build_treenet(dropout, 2, "dropout1", 0)
    x = torch.rand(2, 1, 6, 6)
    with pytest.raises(ConfigError, match="Dropout.*trunk='broadcast'"):
        plan_coupled(tree, x, trunk="replicate", rank=0, size=2)
    # replicating would move 60x fewer elements at this batch size, but the masks would differ per rank
    assert plan_coupled(tree, x, trunk="auto", batch_size=1000, rank=0, size=2).trunk == "broadcast"
    assert isinstance(plan_coupled(tree, x, rank=1, size=2), CoupledPlan)
