"""Model-parallel training of coupled ensembles (TreeNets, MCL, averaged losses) on torch.distributed.

The members of a TreeNet are spread over the ranks of a torchrun job: member m belongs to rank
``m % world_size`` and rank 0 also owns the trunk. Every batch follows the broadcast/gather design of Lee
et al.'s distributed TreeNet training:

1. every rank draws the same batch (the shuffling generator of `train_coupled`, seeded with
   ``config.seed``);
2. rank 0 runs the trunk (with autograd) and broadcasts its activations h;
3. each rank runs its own branches on a leaf copy of h; the members' logits are all-gathered, so every
   rank holds all M members' logits and computes the same ensemble loss (averaged, MCL with the same
   seeded tie-breaking generator);
4. each rank backpropagates that loss into its own branches and into its copy of h; the copies'
   gradients are summed onto rank 0 (``dist.reduce``), which backpropagates them through the trunk;
5. each rank's optimizer steps the parameters it owns (Adam and SGD are per-parameter, so M optimizers
   over disjoint parameters are one optimizer over all of them).

At every epoch end the owners broadcast their weights, rank 0 scores the whole TreeNet on the validation
set and broadcasts the early-stopping decision; at the end rank 0's best weights are broadcast, so every
rank returns the same `CoupledResult`. With one process `train_coupled_distributed` is `train_coupled`.

The gathered logits of other ranks' members enter the loss detached. That gives each rank the exact
gradient of the loss with respect to its own members: the loss is the same function of the same numbers
on every rank, and its derivative with respect to member m's logits needs member m's graph only. A
differentiable all-gather (``torch.distributed.nn.functional.all_gather``) would compute the same thing
with one more collective per batch: every rank would send back its own copy of the same gradient and the
loss would have to be divided by the world size so the W copies sum to one.

``trunk="replicate"`` is the alternative for trunks whose activations are larger than their weights
(convolutions early in a network): every rank runs the trunk itself, and the trunk's gradients are
all-reduced once per optimizer step instead of exchanging activations every batch (see
`communication_per_step`; ``trunk="auto"`` picks the cheaper). docs/coupled_distributed.md has the
formulas, what is not supported (resume, checkpoints) and how to launch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from codec.errors import CodecError, ConfigError, DataError
from codec.runtime.training import distributed
from codec.runtime.training.coupled import (
    _TIE_STREAM,
    CoupledResult,
    EnsembleOptions,
    TreeNet,
    _CoupledUnit,
    _stream_seed,
    coupled_result,
    coupled_setup,
    train_coupled,
)
from codec.runtime.training.engine import train_members
from codec.runtime.training.losses import EnsembleLoss
from codec.runtime.training.train import (
    _TRAJECTORY_FIELDS,
    _make_optimizer,
    _make_scheduler,
    seed_everything,
)

log = logging.getLogger(__name__)

TRUNK_MODES = ("broadcast", "replicate", "auto")
# runtime.coupled draws member initialisations, bootstrap samples and MCL ties from streams 0, 1 and 2 of
# the run's seed; each rank's global torch RNG (dropout masks in its branches) comes from stream 3, so
# ranks never draw the same masks. Rank 0 keeps the seed itself, as a single process would.
_RANK_STREAM = 3


# --------------------------------------------------------------------------------------------------------
# Who owns what
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoupledPlan:
    """How one rank takes part in training a TreeNet.

    Attributes:
        rank: this process's rank.
        size: the world size W.
        members: M.
        trunk: "none" (the TreeNet has no trunk modules: every rank feeds its branches the input),
            "broadcast" (rank 0 runs the trunk and sends its activations) or "replicate" (every rank runs
            the trunk; its gradients are all-reduced).
        trunk_trainable: the trunk has parameters to train (otherwise no gradient goes back to it).
        trunk_shape: the trunk's output shape per example.
        trunk_dtype: the trunk's output dtype.
        classes: K, the members' outputs.
        logit_dtype: the members' output dtype.
    """

    rank: int
    size: int
    members: int
    trunk: str
    trunk_trainable: bool
    trunk_shape: tuple[int, ...]
    trunk_dtype: torch.dtype
    classes: int
    logit_dtype: torch.dtype

    def owner(self, member: int) -> int:
        """The rank that trains member `member`."""
        return member % self.size

    @property
    def owned(self) -> list[int]:
        """The members this rank trains, in order."""
        return list(range(self.rank, self.members, self.size))

    @property
    def slots(self) -> int:
        """Members per rank at most (ceil(M / W)): the gathered logits are padded to this many."""
        return -(-self.members // self.size)

    @property
    def owns_trunk(self) -> bool:
        """This rank's optimizer steps the trunk (rank 0; every rank when the trunk is replicated)."""
        return self.trunk == "replicate" or (self.trunk != "none" and self.rank == 0)

    def state_owner(self, key: str) -> int:
        """The rank whose copy of state_dict entry `key` is authoritative (trunk: rank 0)."""
        parts = key.split(".")
        return self.owner(int(parts[1])) if parts[0] == "branches" else 0


def communication_per_step(
    *,
    trunk_params: int,
    trunk_features: int,
    batch_size: int,
    accumulate: int,
    members: int,
    classes: int,
    world_size: int,
) -> dict:
    """Elements (not bytes) moved between ranks per optimizer step, summed over all ranks.

    - ``broadcast``: rank 0 sends h to W - 1 ranks and receives W - 1 gradients of h, every batch:
      ``2 (W - 1) a B D`` for `accumulate` a, batch B and D trunk features per example.
    - ``replicate``: an all-reduce of the T trunk gradients per step, ``2 (W - 1) T`` with a ring.
    - ``logits``: the all-gather both modes do, ``W (W - 1) ceil(M / W) a B K``.

    So broadcasting activations moves less exactly when ``a B D < T``: trunks ending in a wide dense layer
    (many weights, few outputs) favour it, convolutional trunks (few weights, large feature maps) favour
    replication.
    """
    w, a, b = world_size, accumulate, batch_size
    return {
        "broadcast": 2 * (w - 1) * a * b * trunk_features,
        "replicate": 2 * (w - 1) * trunk_params,
        "logits": w * (w - 1) * -(-members // w) * a * b * classes,
    }


def _trunk_has_dropout(treenet: TreeNet) -> bool:
    return any(isinstance(m, nn.modules.dropout._DropoutNd) for m in treenet.trunk.modules())


def plan_coupled(
    treenet: TreeNet,
    example: torch.Tensor,
    *,
    trunk: str = "broadcast",
    batch_size: int = 128,
    accumulate: int = 1,
    rank: int | None = None,
    size: int | None = None,
) -> CoupledPlan:
    """This rank's part in training `treenet` (shapes from one forward pass on `example`, a batch of >= 1).

    Args:
        treenet: the TreeNet (the same on every rank).
        example: a few training inputs, on the training device.
        trunk: one of `TRUNK_MODES`; "auto" picks by `communication_per_step`.
        batch_size, accumulate: for "auto".
        rank, size: default to the process group's.

    Raises:
        ConfigError: an unknown mode, or "replicate" with Dropout in the trunk (each rank would draw its
            own mask, so the ranks' trunks would compute different activations).
    """
    if trunk not in TRUNK_MODES:
        raise ConfigError(f"unknown trunk mode {trunk!r}; choose one of {', '.join(TRUNK_MODES)}")
    rank = dist.get_rank() if rank is None else rank
    size = dist.get_world_size() if size is None else size
    was_training = treenet.training
    treenet.eval()
    try:
        with torch.no_grad():
            h = treenet.trunk(example[:1])
            logits = torch.stack([branch(h) for branch in treenet.branches])
    finally:
        treenet.train(was_training)
    trunk_params = sum(p.numel() for p in treenet.trunk.parameters() if p.requires_grad)
    if len(treenet.trunk) == 0:
        mode = "none"
    elif trunk == "auto":
        volume = communication_per_step(
            trunk_params=trunk_params,
            trunk_features=int(h[0].numel()),
            batch_size=batch_size,
            accumulate=accumulate,
            members=treenet.members,
            classes=int(logits.shape[2]),
            world_size=size,
        )
        cheaper = "broadcast" if volume["broadcast"] <= volume["replicate"] else "replicate"
        mode = "broadcast" if _trunk_has_dropout(treenet) else cheaper
    else:
        mode = trunk
    if mode == "replicate" and _trunk_has_dropout(treenet):
        raise ConfigError(
            "the trunk has Dropout: replicated on every rank it would draw a different mask per rank; "
            "use trunk='broadcast'"
        )
    return CoupledPlan(
        rank=rank,
        size=size,
        members=treenet.members,
        trunk=mode,
        trunk_trainable=trunk_params > 0,
        trunk_shape=tuple(h.shape[1:]),
        trunk_dtype=h.dtype,
        classes=int(logits.shape[2]),
        logit_dtype=logits.dtype,
    )


# --------------------------------------------------------------------------------------------------------
# One batch
# --------------------------------------------------------------------------------------------------------


def coupled_backward(
    treenet: TreeNet,
    plan: CoupledPlan,
    xb: torch.Tensor,
    yb: torch.Tensor,
    weights: torch.Tensor | None,
    loss: EnsembleLoss,
    ties: torch.Generator | None,
    *,
    scale: float = 1.0,
    context: str = "",
) -> float:
    """The ensemble loss of one batch, backpropagated into the parameters this rank owns.

    Every rank must call it with the same batch and the same tie-breaking generator state. Afterwards the
    owned branches hold the same ``.grad`` as a single-process backward of ``scale * loss`` (summed onto
    any gradient already there), and so does the trunk on rank 0 in "broadcast" mode. In "replicate" mode
    each rank's trunk holds its own members' share; `allreduce_trunk_gradients` sums the shares.

    Args:
        treenet, plan: the TreeNet and this rank's plan (`plan_coupled`).
        xb, yb: the batch's inputs and labels.
        weights: (M, B) example weights (bagging) for a memberwise loss, or None.
        loss: the ensemble loss.
        ties: MCL's tie-breaking generator (advanced the same way on every rank).
        scale: the loss is multiplied by it before backward (1 / accumulate).
        context: appended to the non-finite-loss error (e.g. " at epoch 3, batch 7").

    Returns:
        The loss value (the same on every rank).

    Raises:
        DataError: a non-finite loss (on every rank at once: they all compute the same value).
    """
    h_leaf = None
    if plan.trunk == "broadcast":
        if plan.rank == 0:
            h = treenet.trunk(xb)
            sent = h.detach()
        else:
            sent = torch.empty((xb.shape[0], *plan.trunk_shape), dtype=plan.trunk_dtype, device=xb.device)
        dist.broadcast(sent, src=0)
        # A leaf of its own: this rank's branches deposit their gradient of h in it, without reaching back
        # into rank 0's trunk graph (which exists on rank 0 only).
        h_leaf = sent.requires_grad_(plan.trunk_trainable)
        inputs = h_leaf
    elif plan.trunk == "replicate":
        inputs = treenet.trunk(xb)
    else:
        inputs = xb
    own = {m: treenet.branches[m](inputs) for m in plan.owned}

    local = torch.zeros((plan.slots, xb.shape[0], plan.classes), dtype=plan.logit_dtype, device=xb.device)
    for slot, m in enumerate(plan.owned):
        local[slot] = own[m].detach()
    parts = [torch.empty_like(local) for _ in range(plan.size)]
    dist.all_gather(parts, local)
    # Other ranks' members enter detached: the loss is the same function of the same logits everywhere, so
    # differentiating it on this rank gives the exact gradient of this rank's members (module docstring).
    logits = torch.stack(
        [own[m] if m in own else parts[plan.owner(m)][m // plan.size] for m in range(plan.members)]
    )
    value = loss(logits, yb, weights, ties)
    if not torch.isfinite(value):
        raise DataError(
            f"non-finite training loss ({float(value.detach())}){context}; check the data or lower "
            "the learning rate"
        )
    if value.requires_grad:  # False on a rank that owns no member (more ranks than members)
        (value * scale).backward()
    if plan.trunk == "broadcast" and plan.trunk_trainable:
        grad = h_leaf.grad if h_leaf.grad is not None else torch.zeros_like(h_leaf)
        dist.reduce(grad, dst=0, op=dist.ReduceOp.SUM)
        if plan.rank == 0:
            h.backward(grad)
    return float(value.detach())


def allreduce_trunk_gradients(treenet: TreeNet) -> None:
    """Sum the trunk's gradients over ranks ("replicate" mode; one flat all-reduce)."""
    params = [p for p in treenet.trunk.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


@torch.no_grad()
def broadcast_state(treenet: nn.Module, owner: Callable[[str], int]) -> None:
    """Overwrite every rank's state_dict entries with their owner's (one flat broadcast per owner and
    dtype)."""
    groups: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
    for key, tensor in treenet.state_dict().items():  # the same keys in the same order on every rank
        groups.setdefault((owner(key), tensor.dtype), []).append(tensor)
    rank = dist.get_rank()
    for (src, _dtype), tensors in groups.items():
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.broadcast(flat, src=src)
        if rank != src:
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


class _DistributedCoupledUnit(_CoupledUnit):
    """The engine's unit for one rank's part of a TreeNet: the batches of `_CoupledUnit`, the
    broadcast/gather step of the module docstring, rank 0's validation decision sent to every rank."""

    def __init__(self, treenet, config, options, weights, n: int, device, plan: CoupledPlan, rank: int):
        # Not _ModuleUnit.__init__: the optimizer holds only the parameters this rank owns (or is None).
        self.indices = [0]
        self.module = treenet
        self.device = device
        self.options = options
        self.weights = weights
        self.batches_per_epoch = len(range(0, n, config.batch_size))
        self.ties = torch.Generator().manual_seed(_stream_seed(config.seed, _TIE_STREAM))
        self.loss = None
        self.plan, self.rank = plan, rank
        self.base_lr, self.lr_decay = config.lr, config.lr_decay
        self.epoch = 0
        owned_modules = nn.ModuleList([treenet.branches[m] for m in plan.owned])
        if plan.owns_trunk:
            owned_modules.append(treenet.trunk)
        has_params = any(p.requires_grad for p in owned_modules.parameters())
        self.optimizer = _make_optimizer(owned_modules, config) if has_params else None
        self.scheduler = _make_scheduler(self.optimizer, config) if self.optimizer is not None else None
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
            seed_everything(config.seed)
            if rank:  # each rank's branches draw their dropout masks from its own stream
                torch.manual_seed(
                    int(np.random.SeedSequence([config.seed, _RANK_STREAM, rank]).generate_state(1)[0])
                )
            self.rng = self._get_rng()
        self.train_loss = None

    def lr(self, index: int) -> float:
        # Every optimizer follows the same schedule; a rank without one (it owns no weights) reads the
        # schedule's closed form, for its error messages only (the history holds rank 0's value).
        if self.optimizer is not None:
            return float(self.optimizer.param_groups[0]["lr"])
        return self.base_lr * (self.lr_decay or 1.0) ** self.epoch

    def begin_epoch(self, epoch: int, stop) -> tuple[dict, bool]:
        self.epoch = epoch - 1
        return super().begin_epoch(epoch, stop)

    def train_epoch(self, batches, loss_fn, loss_name: str, epoch: int, desc) -> dict:
        saved = self._get_rng()
        self._set_rng(self.rng)
        try:
            self.module.train()
            lr = self.lr(0)
            total, count = 0.0, 0
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            for batch, (index, xb, yb, _) in enumerate(batches(0), start=1):
                wb = (
                    self.weights[:, index].to(self.device)
                    if self.weights is not None and self.loss.memberwise
                    else None
                )
                value = coupled_backward(
                    self.module,
                    self.plan,
                    xb,
                    yb,
                    wb,
                    self.loss,
                    self.ties,
                    scale=1.0 / self.options.accumulate,
                    context=f" at epoch {epoch}, batch {batch} (lr {lr:g})",
                )
                if batch % self.options.accumulate == 0 or batch == self.batches_per_epoch:
                    if self.plan.trunk == "replicate":
                        allreduce_trunk_gradients(self.module)
                    if self.optimizer is not None:
                        self.optimizer.step()
                        self.optimizer.zero_grad(set_to_none=True)
                total += value * len(index)
                count += len(index)
        finally:
            self.rng = self._get_rng()
            self._set_rng(saved)
        broadcast_state(self.module, self.plan.state_owner)  # every rank now holds the whole TreeNet
        self.train_loss = total / count
        return {0: self.train_loss}

    def validate(self, xv_t, yv_t) -> tuple[dict, float | None]:
        """Rank 0 scores the TreeNet and sends every rank the same numbers, so every rank's early stopping
        takes the same decision."""
        decision = failure = None
        if self.rank == 0:
            try:
                fields, monitored = super().validate(xv_t, yv_t)
                decision = {
                    "fields": {**fields, "train_loss": self.train_loss},
                    "monitored": monitored if monitored is not None else self.train_loss,
                    "error": None,
                }
            # the other ranks wait for a decision: send them any failure
            except Exception as exc:  # noqa: BLE001
                failure = exc
                decision = {"error": [isinstance(exc, DataError), f"{type(exc).__name__}: {exc}"]}
        decision = distributed.broadcast(decision)
        if failure is not None:
            raise failure
        if decision["error"] is not None:
            data_error, message = decision["error"]
            raise (DataError if data_error else CodecError)(
                f"rank 0 failed at epoch {self.epoch + 1}: {message}"
            )
        return decision["fields"], decision["monitored"]

    def agree(self, entry: dict) -> dict:
        return distributed.broadcast(entry)  # rank 0's history (its epoch time) on every rank


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------


def _resolve_device(config) -> torch.device:
    """The device the process group can communicate on: the rank's GPU with NCCL, the CPU with gloo."""
    if dist.get_backend() == "nccl":
        if config.device == "cpu":
            raise ConfigError(
                "the process group uses NCCL (GPUs), which cannot train on the CPU; use device auto or "
                "cuda, or launch without GPUs"
            )
        return torch.device("cuda", torch.cuda.current_device())
    if config.device == "cuda":
        raise ConfigError(
            "device 'cuda' needs an NCCL process group (one GPU per local rank); this job runs gloo "
            "on the CPU: use device auto or cpu"
        )
    return torch.device("cpu")


def _summary(x_t, y_t, xv_t, yv_t, config, options, treenet, trunk) -> dict:
    """What every rank must agree on (compared with rank 0's before training)."""

    def digest(x, y):
        if x is None:
            return None
        return [list(x.shape), float(x.sum(dtype=torch.float64)), int(y.sum())]

    return {
        "training data": digest(x_t, y_t),
        "validation data": digest(xv_t, yv_t),
        "training options": {
            name: getattr(config, name) for name in (*_TRAJECTORY_FIELDS, "max_epochs", "patience")
        },
        "ensemble options": options.trajectory(),
        "TreeNet": [[k, list(v.shape)] for k, v in treenet.state_dict().items()],
        "trunk mode": trunk,
    }


def _check_agreement(summary: dict) -> None:
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, summary)
    for other, theirs in enumerate(gathered[1:], start=1):
        for key, value in gathered[0].items():
            if theirs[key] != value:
                raise ConfigError(
                    f"rank {other} was given other {key} than rank 0; every rank of a coupled run "
                    "needs the same data, options and TreeNet"
                )


def train_coupled_distributed(
    treenet: TreeNet,
    x_train,
    y_train,
    x_val,
    y_val,
    config,
    options: EnsembleOptions,
    *,
    desc: str = "ensemble",
    trunk: str = "broadcast",
) -> CoupledResult:
    """Train a TreeNet's members together, spread over the ranks of a torchrun job (module docstring).

    Call it on every rank, after `codec.runtime.training.distributed.init()`, with the same arguments. Without
    a process
    group, or with one process, it is `train_coupled` (no checkpoint). Rank 0's initial weights are sent to
    every rank first, so the ranks need not have built the TreeNet from the same seed.

    Training follows `train_coupled` batch for batch: the same shuffling, bootstrap weights, MCL
    tie-breaking, pretraining phase, learning-rate scaling, accumulation and early stopping, so on the CPU
    the final weights equal a single process's up to the order of floating-point sums (tested, 2 ranks).
    Dropout masks are the exception: each rank draws its branches' masks from its own stream.

    Args:
        treenet: the members (`build_treenet`), the same architecture on every rank.
        x_train, y_train, x_val, y_val, config, options, desc: as for `train_coupled`.
        trunk: "broadcast" (rank 0 runs the trunk and sends its activations), "replicate" (every rank runs
            it; gradients all-reduced) or "auto" (the one that moves fewer elements per step).

    Returns:
        The same `CoupledResult` on every rank: the module holds the best epoch's weights (all members and
        the trunk), the history is rank 0's.

    Raises:
        ConfigError, DataError: as `train_coupled`, on every rank at once; ConfigError also when the ranks
            were given different data or options.
    """
    if trunk not in TRUNK_MODES:
        raise ConfigError(f"unknown trunk mode {trunk!r}; choose one of {', '.join(TRUNK_MODES)}")
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return train_coupled(treenet, x_train, y_train, x_val, y_val, config, options, desc=desc)

    x_t, y_t, xv_t, yv_t, weights, bag_unique, step_config = coupled_setup(
        treenet, x_train, y_train, x_val, y_val, config, options
    )
    rank, size = dist.get_rank(), dist.get_world_size()
    device = _resolve_device(config)
    n = x_t.shape[0]

    previous_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        treenet.to(device)
        _check_agreement(_summary(x_t, y_t, xv_t, yv_t, config, options, treenet, trunk))
        broadcast_state(treenet, lambda key: 0)
        plan = plan_coupled(
            treenet,
            x_t[:2].to(device),
            trunk=trunk,
            batch_size=config.batch_size,
            accumulate=options.accumulate,
            rank=rank,
            size=size,
        )
        if not plan.owned:
            log.warning(
                "%s: rank %d owns no member (%d members on %d ranks); it only relays",
                desc,
                rank,
                options.members,
                size,
            )
        log.info("%s: rank %d trains members %s, trunk %s", desc, rank, plan.owned, plan.trunk)
    finally:
        torch.set_num_threads(previous_threads)

    def objective(module, member_config, seed, unit_device):
        return _DistributedCoupledUnit(module, step_config, options, weights, n, device, plan, rank)

    # The engine's loop on every rank (no checkpoint: see the module docstring); the progress bar on rank 0.
    engine_config = dataclasses.replace(config, quiet=config.quiet or rank != 0, device=device.type)
    run = train_members(
        [treenet],
        x_t,
        y_t,
        xv_t,
        yv_t,
        engine_config,
        seeds=[config.seed],
        lrs=[step_config.lr],
        names=[desc],
        desc=desc,
        objective=objective,
    )
    return coupled_result(treenet, run, bag_unique)


__all__ = [
    "TRUNK_MODES",
    "CoupledPlan",
    "allreduce_trunk_gradients",
    "broadcast_state",
    "communication_per_step",
    "coupled_backward",
    "plan_coupled",
    "train_coupled_distributed",
]
