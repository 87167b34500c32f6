"""Coupled ensembles (Lee et al., "Why M Heads are Better than One", 2015): TreeNets, bagging, ensemble-aware
losses, trained together with one optimizer, and exported as one fused ONNX graph.

**TreeNet.** Any recipe's `nn.Sequential` is cut after a named module: the modules up to and including it
are the *trunk*, shared by all M members; the rest is copied into M *branches*, each initialised with its
own seed. The forward pass computes the trunk once and returns the branches' logits stacked (M, B, K);
one backward of the summed loss accumulates every branch's gradient in the trunk.

Module names (`module_names`) come from the module type and a per-type count, in order: ``conv1``,
``conv2`` (Conv2d), ``fc1`` (Linear), ``pool1`` (MaxPool2d and AvgPool2d), ``relu1``, ``leaky_relu1``,
``sigmoid1``, ``tanh1``, ``flatten1``, ``dropout1``; any other module type is its class name in lower
case. Caffe's CIFAR10-Quick reads ``conv1 pool1 relu1 conv2 relu2 pool2 conv3 relu3 pool3 flatten1 fc1
fc2``. A split is:

- a module name: the trunk is every module up to and including it;
- an integer n: the trunk is the first n modules (``0`` shares nothing);
- ``none``: no trunk, M independent networks (Lee et al.'s usual ensemble);
- ``all``: everything shared: the M heads are one network (Lee et al.'s "single model" end of the TreeNet
  range), trained with the ensemble loss of M identical members (for the independent loss that is M times
  the network's cross-entropy). A trunk that holds every weighted layer is the same case. The fused
  export stores everything but the output layer once (see `treenet_networks`).

Activations and pools are modules like any other, so ``--split conv1`` in CIFAR10-Quick leaves conv1's
pool and ReLU in the branches (they have no weights; computing them once or M times gives the same
values, except Dropout, whose masks are drawn per branch when it is in the branches).

**Member variation** (`VARIATIONS`): ``random`` gives each member its own initialisation (seed
`member_seed(seed, m)`) on the same data; ``bagging`` gives every member the same initialisation and its
own bootstrap sample (N draws with replacement, `bootstrap_weights`); ``both`` does both. Bootstrap
samples enter as per-member example weights (how often an example is in the member's sample), so all
members still see one shuffled batch per step and are trained in one coupled pass.

**Training** (`train_coupled`): one optimizer over the trunk and all branches (Adam or SGD from the
recipe), the learning rate optionally multiplied by M (`lr_scale_by_members`, what Lee et al. do for the
score- and probability-averaged losses), gradients optionally accumulated over `accumulate` batches,
`pretrain_epochs` epochs of independent cross-entropy before the chosen loss (MCL's usual warm start),
early stopping on a validation loss (`MONITORS`, see `EnsembleOptions.monitor`), a checkpoint written
atomically at every epoch end and read with ``torch.load(weights_only=True)``, and exact resume.

**Stacked heads** (`heads_stackable`, `_StackedHeads`): when the branches are stackable (more than one, of
equal shapes, each an `nn.Sequential` the engine can stack: Linear, Conv2d, pools, element-wise
activations, Flatten, Dropout(p=0)), training runs them as one stacked computation: each layer's weights
one leaf [M, out, in] (the engine's `_StackedLinear`, a grouped convolution for Conv2d), the trunk's output
fed to all M at once (`_BranchInputs`, whose backward sums the branches' gradients in autograd's order for
M separate branches). The leaves are written back into the branch modules at the end of every training
epoch, and the checkpoint keeps the loop's layout, so the branches stay what everything else reads
(export, `member`, checkpoints, the distributed rank split). MLP heads train bit for bit as the loop does
on the CPU; convolutional heads float-close. Dropout with p > 0, batch norm or branches of different
shapes keep the loop; `CoupledResult.heads_stacked` (report.json's ``heads_stacked``) says which ran.
docs/decisions.md has why and what was measured.

**Export** (`treenet_networks`, `emit_treenet`): each member becomes a NetworkIR whose trunk layers are
whole FROZEN_SHARED copies of a trunk chain (the CSN), so `codec.ir.ensemble.emit_ensemble` computes the
trunk once in the fused graph.

`codec.pipelines.train_ensemble.train_ensemble_recipe` ties it together for a named recipe: data, TreeNet,
training, fused ONNX, test metrics (ensemble, oracle and member accuracy, per-class assignment of test
examples to members) and a JSON-able report.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from codec.errors import ConfigError, DataError, ModelLoadError
from codec.ir.network import NetworkIR, Role, is_compute
from codec.runtime.training.engine import (
    _ModuleUnit,
    _same_shapes,
    stack_layers,
    stackable,
    stacked_forward,
    train_members,
)
from codec.runtime.training.losses import LOSSES, EnsembleLoss, member_losses
from codec.runtime.training.torch_ir import sequential_to_network
from codec.runtime.training.train import (
    EVAL_BATCH_SIZE,
    EarlyStopping,
    TrainConfig,
    _check_training_data,
    _make_optimizer,
    _make_scheduler,
    batched_forward,
)

log = logging.getLogger(__name__)

VARIATIONS = ("random", "bagging", "both")
MONITORS = ("objective", "ensemble_nll", "member_ce")
SPLIT_NONE, SPLIT_ALL = "none", "all"
# Marks a coupled-ensemble checkpoint apart from train_member's (both share runtime.train's format number).
CHECKPOINT_KIND = "coupled_ensemble"
# Independent random streams of one seed: member initialisation, bootstrap samples, MCL's tie-breaking.
_INIT_STREAM, _BAG_STREAM, _TIE_STREAM = 0, 1, 2

_TYPE_PREFIX = {
    nn.Conv2d: "conv",
    nn.Linear: "fc",
    nn.MaxPool2d: "pool",
    nn.AvgPool2d: "pool",
    nn.ReLU: "relu",
    nn.LeakyReLU: "leaky_relu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.Flatten: "flatten",
    nn.Dropout: "dropout",
}
_WEIGHTED = (nn.Conv2d, nn.Linear)


# --------------------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnsembleOptions:
    """How the M members are made different and coupled (recorded in report.json).

    Attributes:
        members: M, >= 1.
        loss: one of `codec.runtime.training.losses.LOSSES`.
        k: MCL's members per example (1..M).
        alpha: MCL's weight of the independent cross-entropy, in [0, 1] (0 = pure MCL).
        pretrain_epochs: epochs of independent cross-entropy before `loss` takes over (>= 0).
        lr_scale_by_members: multiply the learning rate by M.
        accumulate: batches whose gradients are summed (each loss divided by `accumulate`) per
            optimizer step, >= 1.
        variation: "random", "bagging" or "both" (see the module docstring).
        split: where the trunk ends: a module name, an integer, "none" or "all".
        monitor: the validation loss early stopping watches: "objective" (the training objective on the
            validation set, deterministically: for MCL the sum of the k lowest member losses mixed with
            alpha; during pretraining the independent cross-entropy), "ensemble_nll" (NLL of the members'
            mean probability) or "member_ce" (the members' mean cross-entropy).
        criterion: how the fused ONNX ensemble combines members (`codec.runtime.evaluation.metrics.CRITERIA`);
            "mean" is Lee et al.'s ensemble-mean. Does not affect training.
    """

    members: int = 4
    loss: str = "independent"
    k: int = 1
    alpha: float = 0.0
    pretrain_epochs: int = 0
    lr_scale_by_members: bool = False
    accumulate: int = 1
    variation: str = "random"
    split: str = SPLIT_NONE
    monitor: str = "objective"
    criterion: str = "mean"

    def __post_init__(self) -> None:
        from codec.runtime.evaluation.metrics import CRITERIA

        self.ensemble_loss()  # validates members, loss, k and alpha
        if self.variation not in VARIATIONS:
            raise ConfigError(f"unknown variation {self.variation!r}; choose one of {', '.join(VARIATIONS)}")
        if self.monitor not in MONITORS:
            raise ConfigError(f"unknown monitor {self.monitor!r}; choose one of {', '.join(MONITORS)}")
        if self.criterion not in CRITERIA:
            raise ConfigError(
                f"unknown ensemble criterion {self.criterion!r}; choose one of {', '.join(CRITERIA)}"
            )
        for name in ("pretrain_epochs", "accumulate"):
            value = getattr(self, name)
            low = 0 if name == "pretrain_epochs" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.bagging and not self.ensemble_loss().memberwise:
            raise ConfigError(
                f"bagging gives each member its own sample, but the {self.loss} loss scores the "
                "combined output; "
                "use --variation random with it"
            )

    @property
    def bagging(self) -> bool:
        return self.variation in ("bagging", "both")

    @property
    def random_init(self) -> bool:
        return self.variation in ("random", "both")

    def ensemble_loss(self) -> EnsembleLoss:
        """The loss after pretraining."""
        return EnsembleLoss(self.loss, self.members, self.k, self.alpha)

    def trajectory(self) -> dict:
        """The options that decide training (a checkpoint written under others cannot be resumed)."""
        out = dataclasses.asdict(self)
        del out["criterion"]
        return out

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def member_seed(seed: int, member: int) -> int:
    """Member `member`'s initialisation seed, drawn from ``SeedSequence([seed, 0, member])`` so that runs
    with neighbouring seeds do not share members (seed 0's member 1 is not seed 1's member 0)."""
    return int(np.random.SeedSequence([int(seed), _INIT_STREAM, int(member)]).generate_state(1)[0])


def _stream_seed(seed: int, stream: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(stream)]).generate_state(1)[0])


def bootstrap_weights(n: int, members: int, seed: int) -> np.ndarray:
    """Each member's bootstrap sample of n examples, as counts: (M, n) float32, row m sums to n.

    Member m draws n indices uniformly with replacement from ``np.random.default_rng([seed, 1, m])``;
    ``weights[m, i]`` is how often example i was drawn (about 63 % of the examples are drawn at least once).
    """
    if n < 1 or members < 1:
        raise DataError(f"cannot draw bootstrap samples of {n} examples for {members} members")
    weights = np.empty((members, n), dtype=np.float32)
    for m in range(members):
        rng = np.random.default_rng([int(seed), _BAG_STREAM, m])
        weights[m] = np.bincount(rng.integers(0, n, size=n), minlength=n)
    return weights


# --------------------------------------------------------------------------------------------------------
# TreeNet
# --------------------------------------------------------------------------------------------------------


def module_names(model: nn.Sequential) -> list[str]:
    """The split-point names of a Sequential's modules (see the module docstring), in order."""
    counts: dict[str, int] = {}
    names = []
    for module in model:
        prefix = next(
            (p for t, p in _TYPE_PREFIX.items() if type(module) is t), type(module).__name__.lower()
        )
        counts[prefix] = counts.get(prefix, 0) + 1
        names.append(f"{prefix}{counts[prefix]}")
    return names


def resolve_split(model: nn.Sequential, split: str | int | None) -> int:
    """How many leading modules of `model` form the trunk for `split` (0 = none, len(model) = all).

    A trunk that holds every weighted layer is full sharing and returns len(model).

    Raises:
        ConfigError: an unknown name or an integer out of range (the message lists the valid splits).
    """
    names = module_names(model)
    text = SPLIT_NONE if split is None else str(split).strip().lower()
    if text == SPLIT_NONE:
        count = 0
    elif text == SPLIT_ALL:
        count = len(names)
    elif text.lstrip("-").isdigit():
        count = int(text)
        if not 0 <= count <= len(names):
            raise ConfigError(
                f"split {split!r}: an integer split shares the first n modules, n in 0..{len(names)}; "
                f"or name one of: {', '.join(names)}"
            )
    elif text in names:
        count = names.index(text) + 1
    else:
        raise ConfigError(
            f"unknown split {split!r}; choose none, all, an integer 0..{len(names)}, or one of: "
            f"{', '.join(names)}"
        )
    if not any(isinstance(m, _WEIGHTED) for m in list(model)[count:]):
        count = len(names)  # no weights left for the branches: they would all be the same network
    return count


class TreeNet(nn.Module):
    """M members sharing a trunk: ``forward(x) -> (M, B, K)`` logits, the trunk computed once.

    When the branches are stackable (`heads_stacked`), ``forward`` runs them as one stacked computation
    (the engine's layout, stacking the branch modules' parameters at each call, so gradients reach them);
    otherwise it runs them one after another. Both give the same logits (bit for bit for MLP heads on the
    CPU, float-close for convolutional ones).

    Attributes:
        trunk: the shared leading modules (an empty Sequential for an independent ensemble).
        branches: one Sequential per member (empty Sequentials when everything is shared). They are the
            weights' home: state_dict, export, checkpoints and the distributed rank split read them.
        names: the split-point names of the full network's modules (`module_names`).
        split: how many leading modules are in the trunk.
        stack_heads: allow the stacked computation (False: always the loop over branches).
    """

    def __init__(
        self,
        trunk: nn.Sequential,
        branches: Sequence[nn.Sequential],
        names: Sequence[str],
        *,
        stack_heads: bool = True,
    ):
        super().__init__()
        if not branches:
            raise ConfigError("a TreeNet needs at least one branch (member)")
        self.trunk = trunk
        self.branches = nn.ModuleList(branches)
        self.names = list(names)
        self.split = len(trunk)
        self.stack_heads = bool(stack_heads)

    @property
    def members(self) -> int:
        return len(self.branches)

    @property
    def fully_shared(self) -> bool:
        """True when the branches hold no weights: the M members are one network."""
        return not any(p.numel() for b in self.branches for p in b.parameters())

    @property
    def heads_stacked(self) -> bool:
        """True when the branches run as one stacked computation: `stack_heads` is on and the branches
        are `heads_stackable` (training, `forward`)."""
        return self.stack_heads and heads_stackable(self.branches)

    def stacks_on(self, h: torch.Tensor) -> bool:
        """True when the branches run stacked on trunk output `h` (`heads_stacked`, and a first Linear
        layer sees (B, features))."""
        return self.heads_stacked and _fits_heads(self.branches[0], h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        if self.stacks_on(h):
            plan, names, _ = stack_layers([self.branches[0]], h.device)
            params = [
                torch.stack([b.get_parameter(name) for b in self.branches]) if name else None
                for name in names
            ]
            return stacked_forward(plan, params, _BranchInputs.apply(h, self.members))
        return torch.stack([branch(h) for branch in self.branches])

    def member(self, index: int) -> nn.Sequential:
        """Member `index` as one Sequential (trunk modules followed by its branch; modules are shared)."""
        return nn.Sequential(*self.trunk, *self.branches[index])

    def parameter_counts(self) -> dict:
        """Trainable parameters: trunk, each branch, stored (trunk once) and unshared (M separate
        networks)."""
        trunk = sum(p.numel() for p in self.trunk.parameters())
        branches = [sum(p.numel() for p in b.parameters()) for b in self.branches]
        return {
            "trunk": int(trunk),
            "branches": [int(b) for b in branches],
            "stored": int(trunk + sum(branches)),
            "unshared": int(self.members * trunk + sum(branches)),
        }

    def describe(self) -> dict:
        """Which modules are shared (JSON-able)."""
        return {
            "trunk": self.names[: self.split],
            "branch": self.names[self.split :],
            "fully_shared": self.fully_shared,
        }


def heads_stackable(branches: Sequence[nn.Module]) -> bool:
    """True when a TreeNet's branches can run as one stacked computation: more than one, each
    `codec.runtime.training.engine.stackable` (Linear, Conv2d, pools, element-wise activations, Flatten,
    Dropout(p=0)), all of the same shapes and settings (the stacked computation follows branch 0's
    strides, paddings, pool sizes and activation parameters), every parameter trainable. Dropout with
    p > 0, batch norm or other modules keep the loop over branches."""
    branches = list(branches)
    return (
        len(branches) > 1
        and all(stackable(b) for b in branches)
        and _same_shapes(branches)
        and all([repr(m) for m in b] == [repr(m) for m in branches[0]] for b in branches[1:])
        and all(p.requires_grad for b in branches for p in b.parameters())
    )


def _fits_heads(branch: nn.Sequential, h: torch.Tensor) -> bool:
    """The stacked layout reads a Linear's input as (B, features): a branch whose first shape-dependent
    layer is a Linear needs a 2-d trunk output (nn.Linear alone would act on the last axis of any)."""
    for layer in branch:
        if isinstance(layer, nn.Linear):
            return h.ndim == 2
        if isinstance(layer, (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            return h.ndim == 4
        if isinstance(layer, nn.Flatten):
            return True
    return True


class _BranchInputs(torch.autograd.Function):
    """The trunk's output h (B, ...) as every branch's input, (M, B, ...).

    Its backward sums the M branches' gradients of h in the order autograd sums them for M separate
    branches reading one h (the last branch's gradient arrives first, then the one before it, ...), so
    the trunk's gradients are bit-identical to the loop's where the branches' own gradients are.
    """

    @staticmethod
    def forward(ctx, h, members):
        ctx.members = members
        return h.unsqueeze(0).expand(members, *h.shape).contiguous()

    @staticmethod
    def backward(ctx, grad):
        total = grad[ctx.members - 1].clone()
        for m in range(ctx.members - 2, -1, -1):
            total = total + grad[m]
        return total, None


class _StackedHeads:
    """A TreeNet's branches held as stacked leaves [M, ...] while `train_coupled` trains it.

    The leaves (`codec.runtime.training.engine.stack_layers`) are what the optimizer steps; the branch
    modules stay the weights' home for everything outside the training loop: `write_back` copies the
    leaves into them at the end of every training epoch (before validation, early stopping's best state
    and the checkpoint read them), `reload` copies them into the leaves after a resume. The optimizer is
    one ``torch.optim`` optimizer over the trunk's parameters and the leaves (its arithmetic is
    element-wise, so one stacked tensor steps exactly as M separate ones); `loop_state` and
    `stacked_state` convert its state to and from the layout of the loop's optimizer over
    ``treenet.parameters()``, so a checkpoint is the same whichever path wrote it.
    """

    def __init__(self, treenet: TreeNet, config: TrainConfig, device: torch.device):
        self.members = treenet.members
        self.plan, names, leaves = stack_layers(list(treenet.branches), device)
        # Parameters (sharing the leaves' storage) so an nn.Module can hand them to _make_optimizer.
        self.params = [nn.Parameter(p.detach()) if p is not None else None for p in leaves]
        self.trainable = [p for p in self.params if p is not None]
        self.targets = [[b.get_parameter(name) for b in treenet.branches] for name in names if name]
        holder = nn.Module()
        holder.trunk = treenet.trunk
        holder.heads = nn.ParameterList(self.trainable)
        self.trunk_count = sum(1 for p in treenet.trunk.parameters() if p.requires_grad)
        self.optimizer = _make_optimizer(holder, config)

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        """(M, B, K) logits of the branches on trunk output h (B, ...)."""
        return stacked_forward(self.plan, self.params, _BranchInputs.apply(h, self.members))

    @torch.no_grad()
    def write_back(self) -> None:
        for leaf, targets in zip(self.trainable, self.targets):
            for m, target in enumerate(targets):
                target.copy_(leaf[m])

    @torch.no_grad()
    def reload(self) -> None:
        for leaf, targets in zip(self.trainable, self.targets):
            leaf.copy_(torch.stack([t.detach() for t in targets]))

    def _loop_index(self, member: int, j: int) -> int:
        return self.trunk_count + member * len(self.trainable) + j

    def loop_state(self, state: dict) -> dict:
        """The optimizer's state_dict as the loop's optimizer over ``treenet.parameters()`` holds it."""
        t, count = self.trunk_count, self.trunk_count + self.members * len(self.trainable)
        out = {i: entry for i, entry in state["state"].items() if i < t}
        for i, entry in state["state"].items():
            if i >= t:
                leaf = self.trainable[i - t]
                for m in range(self.members):
                    out[self._loop_index(m, i - t)] = {
                        key: value[m].clone() if _stacked_like(value, leaf) else copy.deepcopy(value)
                        for key, value in entry.items()
                    }
        groups = [{**group, "params": list(range(count))} for group in state["param_groups"]]
        return {"state": dict(sorted(out.items())), "param_groups": groups}

    def stacked_state(self, state: dict) -> dict:
        """`loop_state`'s inverse: a loop-layout optimizer state_dict for this optimizer.

        Raises:
            ModelLoadError: a state that is not of one optimizer over this TreeNet's parameters.
        """
        t = self.trunk_count
        groups = state.get("param_groups", [])
        if len(groups) != 1 or len(groups[0]["params"]) != t + self.members * len(self.trainable):
            raise ModelLoadError("the checkpoint's optimizer state does not match this TreeNet")
        saved = state["state"]
        out = {i: entry for i, entry in saved.items() if i < t}
        for j, leaf in enumerate(self.trainable):
            entries = [saved.get(self._loop_index(m, j)) for m in range(self.members)]
            if all(e is None for e in entries):
                continue
            if any(e is None for e in entries):
                raise ModelLoadError("the checkpoint's optimizer state covers only some members")
            out[t + j] = {
                key: torch.stack([e[key] for e in entries])
                if _stacked_like(value, leaf[0])
                else copy.deepcopy(value)
                for key, value in entries[0].items()
            }
        return {"state": out, "param_groups": [{**groups[0], "params": list(range(t + len(self.trainable)))}]}


def _stacked_like(value, like: torch.Tensor) -> bool:
    """A per-element optimizer state tensor (moments, momentum), not a step count or None."""
    return isinstance(value, torch.Tensor) and value.ndim > 0 and tuple(value.shape) == tuple(like.shape)


def build_treenet(
    build: Callable[[int], nn.Sequential],
    members: int,
    split: str | int | None,
    seed: int,
    *,
    random_init: bool = True,
    stack_heads: bool = True,
) -> TreeNet:
    """A TreeNet from a network builder.

    Args:
        build: ``build(seed) -> nn.Sequential`` (e.g. a recipe's network with that initialisation seed).
        members: M.
        split: where the trunk ends (see `resolve_split`).
        seed: the run's seed; member m is initialised from `member_seed(seed, m)` (the trunk from member
            0's), or every member from member 0's seed when `random_init` is False.
        random_init: different initial weights per member (False: bagging alone).
        stack_heads: let stackable branches run as one stacked computation (`TreeNet.heads_stacked`);
            False keeps the loop over branches (the reference the stacked path is tested against).
    """
    template = build(member_seed(seed, 0))
    if not isinstance(template, nn.Sequential):
        raise ConfigError(f"a TreeNet splits an nn.Sequential, got {type(template).__name__}")
    names = module_names(template)
    count = resolve_split(template, split)
    trunk = nn.Sequential(*list(template)[:count])
    branches = []
    for m in range(members):
        source = template if m == 0 else build(member_seed(seed, m) if random_init else member_seed(seed, 0))
        branches.append(nn.Sequential(*copy.deepcopy(list(source)[count:])))
    return TreeNet(trunk, branches, names, stack_heads=stack_heads)


# --------------------------------------------------------------------------------------------------------
# Export: TreeNet -> NetworkIRs (trunk = CSN of whole frozen-shared layers) -> fused ONNX
# --------------------------------------------------------------------------------------------------------


def treenet_networks(
    treenet: TreeNet, input_shape: Sequence[int]
) -> tuple[list[NetworkIR], NetworkIR | None]:
    """The members as NetworkIRs and the trunk as a chain (the CSN), for `emit_ensemble`.

    Each member is trunk + its branch; its layers made from trunk modules are whole FROZEN_SHARED copies
    of the trunk's. The trunk chain ends at its last compute layer (structural layers after it are
    emitted once by the ensembler for all members). Returns ``(members, None)`` when the trunk has no
    weights. When everything is shared, the trunk is everything before the output layer and each member
    keeps its own copy of the (identical) output layer: the ensembler cannot share an output layer, and
    M copies keep the fused graph equal to the M identical members under every criterion (``prod`` of M
    identical members is not the single network's probability).
    """
    frozen_modules = treenet.split
    if treenet.fully_shared:
        weighted = [i for i, module in enumerate(treenet.member(0)) if isinstance(module, _WEIGHTED)]
        frozen_modules = weighted[-1] if weighted else 0
    members = [
        sequential_to_network(
            treenet.member(i), input_shape, treenet.names, frozen_modules=frozen_modules, name=f"member{i}"
        )
        for i in range(treenet.members)
    ]
    first = members[0]
    frozen = [
        i
        for i, layer in enumerate(first.layers)
        if is_compute(layer) and (layer.roles == Role.FROZEN_SHARED).all()
    ]
    if not frozen:
        return members, None
    trunk_layers = copy.deepcopy(first.layers[: frozen[-1] + 1])
    for layer in trunk_layers:
        if is_compute(layer):
            layer.roles = None
            layer.__post_init__()  # trainable roles: the CSN chain itself is an ordinary network
    return members, NetworkIR("trunk", "input", "trunk", first.input_shape, trunk_layers)


def emit_treenet(
    treenet: TreeNet,
    input_shape: Sequence[int],
    *,
    criterion: str = "mean",
    member_outputs: bool = False,
    metadata: dict[str, str] | None = None,
):
    """The fused ensemble ONNX (onnx_ir Model) of a TreeNet: trunk once, branches, collect."""
    from codec.ir.ensemble import emit_ensemble

    members, trunk = treenet_networks(treenet, input_shape)
    return emit_ensemble(
        members, trunk, criterion=criterion, member_outputs=member_outputs, metadata=metadata
    )


# --------------------------------------------------------------------------------------------------------
# Coupled training
# --------------------------------------------------------------------------------------------------------


@dataclass
class CoupledResult:
    """What `train_coupled` returns.

    Attributes:
        module: the TreeNet with the best epoch's weights (of the phase after pretraining, when it ran).
        history: one dict per epoch: epoch, phase ("pretrain" or the loss name), train_loss, val_loss
            (the monitored value; None without validation data), val_accuracy (ensemble mean),
            val_oracle_accuracy, val_member_accuracy (mean over members), lr, seconds.
        best_epoch, epochs_run, train_seconds, stopped_early: as in `runtime.train.TrainResult`.
        bag_unique: per member, the share of distinct training examples in its bootstrap sample (1.0 each
            without bagging).
        heads_stacked: whether training ran the branches as one stacked computation (`_StackedHeads`)
            or looped over them.
    """

    module: TreeNet
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    epochs_run: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False
    bag_unique: list[float] = field(default_factory=list)
    heads_stacked: bool = False


@torch.no_grad()
def ensemble_logits(treenet: nn.Module, x, batch_size: int = EVAL_BATCH_SIZE) -> torch.Tensor:
    """(M, N, K) logits of every member on `x`, in eval mode, on the CPU (train/eval mode restored)."""
    x_t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    return batched_forward(treenet, x_t, batch_size, dim=1)


def _validation(logits: torch.Tensor, labels: torch.Tensor, loss: EnsembleLoss, monitor: str) -> dict:
    """The monitored loss and accuracies of held-out logits (M, N, K)."""
    if monitor == "objective":
        value = loss.validation(logits, labels)
    elif monitor == "ensemble_nll":
        value = EnsembleLoss("prob_avg", loss.members).validation(logits, labels)
    else:
        value = member_losses(logits, labels).mean()
    probs = torch.softmax(logits.double(), dim=2)
    correct = probs.argmax(dim=2) == labels[None, :]
    return {
        "val_loss": float(value),
        "val_accuracy": float((probs.mean(dim=0).argmax(dim=1) == labels).double().mean()),
        "val_oracle_accuracy": float(correct.any(dim=0).double().mean()),
        "val_member_accuracy": float(correct.double().mean()),
    }


def _phase_loss(options: EnsembleOptions, epoch: int) -> tuple[str, EnsembleLoss]:
    if epoch <= options.pretrain_epochs:
        return "pretrain", EnsembleLoss("independent", options.members)
    return options.loss, options.ensemble_loss()


def train_coupled(
    treenet: TreeNet,
    x_train,
    y_train,
    x_val,
    y_val,
    config: TrainConfig,
    options: EnsembleOptions,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    desc: str = "ensemble",
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> CoupledResult:
    """Train all members of `treenet` together, in place, with one optimizer.

    Each epoch shuffles the training set (a generator seeded with ``config.seed``) and steps through it in
    batches; every batch runs the TreeNet once and backpropagates the ensemble loss of all members
    (example weights from the bootstrap samples under bagging; MCL's ties broken by a seeded generator).
    After each epoch the monitored validation loss decides early stopping (strictly lower is better).
    Pretraining epochs never stop early, and the best-so-far restarts when the main loss takes over, so
    the returned weights are from the main phase (unless only pretraining ran). Without validation data
    the training loss is monitored.

    A checkpoint at every epoch end (atomic; ``torch.load(weights_only=True)``) holds weights, optimizer
    and scheduler state, best weights, patience counter and every RNG (global torch, shuffling, tie
    breaking), so a resumed run ends with exactly the weights of an uninterrupted one (CPU, same seed).

    Args:
        treenet: the members (`build_treenet`); its size must match ``options.members``.
        x_train, y_train: (N, ...) inputs and (N,) labels.
        x_val, y_val: validation data, or None.
        config: optimizer, learning rate, batch size, epochs, patience, seed, device (loss must be "ce").
        options: the ensemble options.
        checkpoint_path: written at every epoch end; None for none.
        resume: continue from `checkpoint_path` when it exists.
        desc: the progress bar's label.
        on_epoch_end: ``on_epoch_end(epoch, entry)`` after each checkpoint; raising there stops training
            with the checkpoint resumable.

    Raises:
        ConfigError: options that do not fit (members, loss), or a checkpoint written under other options.
        DataError: bad data or a non-finite loss (names the epoch and batch).
    """
    x_t, _, _, _, weights, bag_unique, step_config = coupled_setup(
        treenet, x_train, y_train, x_val, y_val, config, options
    )
    n = x_train.shape[0]
    units = []

    def objective(module, member_config, seed, device):
        units.append(_CoupledUnit(module, step_config, options, weights, n, device, example=x_t[:2]))
        return units[-1]

    # The engine's loop: the TreeNet is its one module, the coupled loss is this objective's.
    run = train_members(
        [treenet],
        x_train,
        y_train,
        x_val,
        y_val,
        config,
        seeds=[config.seed],
        lrs=[step_config.lr],
        checkpoint_path=checkpoint_path,
        resume=resume,
        names=[desc],
        desc=desc,
        on_epoch_end=None
        if on_epoch_end is None
        else lambda e, record: on_epoch_end(e, record["members"][0]),
        objective=objective,
    )
    return coupled_result(treenet, run, bag_unique, heads_stacked=units[0].heads is not None)


def coupled_setup(treenet, x_train, y_train, x_val, y_val, config: TrainConfig, options):
    """What a coupled run (single-process or distributed) checks and derives before training.

    Returns (x, y, x_val, y_val) as tensors, the bootstrap weights (None without bagging), each member's
    share of unique examples, and the config a step uses (lr scaled by the members if asked).
    """
    config.validate()
    if config.loss != "ce":
        raise ConfigError(f"coupled ensembles train classifiers (loss 'ce'), not {config.loss!r}")
    if treenet.members != options.members:
        raise ConfigError(
            f"the TreeNet has {treenet.members} members but the options ask for {options.members}"
        )
    x_t, y_t, xv_t, yv_t = _check_training_data(x_train, y_train, x_val, y_val, "ce")
    n = x_t.shape[0]
    weights = (
        torch.from_numpy(bootstrap_weights(n, options.members, config.seed)) if options.bagging else None
    )
    bag_unique = (
        [float((w > 0).float().mean()) for w in weights] if weights is not None else [1.0] * options.members
    )
    step_config = config
    if options.lr_scale_by_members:
        step_config = dataclasses.replace(config, lr=config.lr * options.members)
    return x_t, y_t, xv_t, yv_t, weights, bag_unique, step_config


def coupled_result(treenet, run, bag_unique, *, heads_stacked: bool = False) -> CoupledResult:
    """The engine's run of a TreeNet (its one module) as a CoupledResult."""
    result = run.members[0]
    return CoupledResult(
        module=treenet,
        history=result.history,
        best_epoch=result.best_epoch,
        epochs_run=result.epochs_run,
        train_seconds=result.train_seconds,
        stopped_early=result.stopped_early,
        bag_unique=bag_unique,
        heads_stacked=heads_stacked,
    )


class _CoupledUnit(_ModuleUnit):
    """The engine's unit for a TreeNet: one module, one optimizer, the ensemble loss of its members.

    Each batch runs the TreeNet once and backpropagates the ensemble loss of all members (example weights
    from the bootstrap samples under bagging; MCL's ties broken by a seeded generator), with gradients
    accumulated over ``options.accumulate`` batches. Pretraining epochs never stop early, and the
    best-so-far restarts when the main loss takes over.

    When the TreeNet's heads stack on the training inputs (`TreeNet.stacks_on`), the unit trains them as
    `_StackedHeads` (`heads`): stacked leaves stepped by the optimizer, written back into the branch
    modules at the end of every training epoch; the checkpoint keeps the loop's layout.
    """

    kind = CHECKPOINT_KIND
    heads: _StackedHeads | None = None  # also for subclasses that do not call this __init__

    def __init__(
        self,
        treenet,
        config: TrainConfig,
        options: EnsembleOptions,
        weights,
        n: int,
        device,
        *,
        example: torch.Tensor | None = None,
    ):
        super().__init__(0, treenet, config, config.seed, device)
        self.options = options
        self.weights = weights
        self.batches_per_epoch = len(range(0, n, config.batch_size))
        self.ties = torch.Generator().manual_seed(_stream_seed(config.seed, _TIE_STREAM))
        self.loss = None
        if (
            example is not None
            and treenet.heads_stacked
            and treenet.stacks_on(_trunk_output(treenet, example, device))
        ):
            self.heads = _StackedHeads(treenet, config, device)
            self.optimizer = self.heads.optimizer
            self.scheduler = _make_scheduler(self.optimizer, config)

    def forward(self, xb: torch.Tensor) -> torch.Tensor:
        """(M, B, K) training logits: the stacked heads' leaves, or the TreeNet's own forward."""
        if self.heads is None:
            return self.module(xb)
        return self.heads(self.module.trunk(xb))

    def check_outputs(self, x_t, y_t) -> None:
        _check_labels(self.module, x_t, y_t, self.device)

    def fingerprint(self, fingerprint: dict) -> dict:
        return {**fingerprint, "ensemble": json.dumps(self.options.trajectory(), sort_keys=True)}

    def check_resume(self, state: dict, path: Path) -> None:
        if state.get("kind") != CHECKPOINT_KIND:
            raise ModelLoadError(f"{path} is a single-member checkpoint, not a coupled ensemble's")

    def check_resume_fingerprint(self, saved: dict, current: dict, path: Path) -> None:
        if saved.get("ensemble") != current["ensemble"]:
            raise ConfigError(
                f"checkpoint {path} was written with other ensemble options "
                f"({saved.get('ensemble')}); delete it or do not resume"
            )

    def begin_epoch(self, epoch: int, stop: EarlyStopping) -> tuple[dict, bool]:
        phase, self.loss = _phase_loss(self.options, epoch)
        if epoch == self.options.pretrain_epochs + 1 and self.options.pretrain_epochs:
            stop.new_objective()
        return {"phase": phase}, phase != "pretrain"

    def train_epoch(self, batches, loss_fn, loss_name: str, epoch: int, desc) -> dict:
        saved = self._get_rng()
        self._set_rng(self.rng)
        try:
            self.module.train()
            total, count = 0.0, 0
            self.optimizer.zero_grad(set_to_none=True)
            for batch, (index, xb, yb, _) in enumerate(batches(0), start=1):
                wb = self.weights[:, index].to(self.device) if self.weights is not None else None
                value = self.loss(self.forward(xb), yb, wb if self.loss.memberwise else None, self.ties)
                if not torch.isfinite(value):
                    raise DataError(
                        f"non-finite training loss ({float(value.detach())}) at epoch {epoch}, batch "
                        f"{batch}; check "
                        f"the data or lower the learning rate (lr {self.optimizer.param_groups[0]['lr']:g})"
                    )
                (value / self.options.accumulate).backward()
                # Step after every `accumulate` batches and at the epoch's end, so each epoch ends on a step
                # and a checkpoint never holds half-accumulated gradients.
                if batch % self.options.accumulate == 0 or batch == self.batches_per_epoch:
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                total += float(value.detach()) * len(index)
                count += len(index)
            return {0: total / count}
        finally:
            if self.heads is not None:
                self.heads.write_back()  # validation, the best state and the checkpoint read the branches
            self.rng = self._get_rng()
            self._set_rng(saved)

    def validate(self, xv_t, yv_t) -> tuple[dict, float | None]:
        fields = {
            "val_loss": None,
            "val_accuracy": None,
            "val_oracle_accuracy": None,
            "val_member_accuracy": None,
        }
        if xv_t is None:
            return fields, None
        fields.update(_validation(ensemble_logits(self.module, xv_t), yv_t, self.loss, self.options.monitor))
        return fields, fields["val_loss"]

    def state(self) -> dict:
        state = {**super().state(), "tie_generator": self.ties.get_state()}
        if self.heads is not None:
            state["optimizer"] = self.heads.loop_state(state["optimizer"])
        return state

    def restore(self, state: dict) -> None:
        if self.heads is not None:
            state = {**state, "optimizer": self.heads.stacked_state(state["optimizer"])}
        super().restore(state)
        if self.heads is not None:
            self.heads.reload()
        self.ties.set_state(state["tie_generator"])


@torch.no_grad()
def _trunk_output(treenet: TreeNet, example: torch.Tensor, device) -> torch.Tensor:
    """The trunk's output on a few examples, in eval mode (no batch statistics or RNG touched)."""
    was_training = treenet.training
    treenet.eval()
    try:
        return treenet.trunk(example.to(device))
    finally:
        treenet.train(was_training)


@torch.no_grad()
def _check_labels(treenet: TreeNet, x_t: torch.Tensor, y_t: torch.Tensor, device) -> None:
    """Refuse, before training, labels the members have no output for (one line, not an index error)."""
    was_training = treenet.training
    treenet.eval()
    try:
        out = treenet(x_t[:2].to(device))
    finally:
        treenet.train(was_training)
    if out.ndim != 3:
        raise DataError(
            f"the members must output (examples, classes) logits, got shape {tuple(out.shape[1:])}"
        )
    if int(y_t.max()) >= out.shape[2]:
        raise DataError(
            f"labels go up to {int(y_t.max())} but the members have only {out.shape[2]} outputs (classes)"
        )


__all__ = [
    "LOSSES",
    "MONITORS",
    "VARIATIONS",
    "CoupledResult",
    "EnsembleOptions",
    "TreeNet",
    "bootstrap_weights",
    "build_treenet",
    "emit_treenet",
    "ensemble_logits",
    "heads_stackable",
    "member_seed",
    "module_names",
    "resolve_split",
    "sequential_to_network",
    "train_coupled",
    "treenet_networks",
]
