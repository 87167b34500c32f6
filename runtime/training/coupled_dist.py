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
import math
import time
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
    _check_labels,
    _phase_loss,
    _stream_seed,
    _validation,
    bootstrap_weights,
    ensemble_logits,
    train_coupled,
)
from codec.runtime.training.losses import EnsembleLoss
from codec.runtime.training.train import (
    _TRAJECTORY_FIELDS,
    EarlyStopping,
    _check_training_data,
    _make_optimizer,
    _make_scheduler,
    _progress,
    _state_copy,
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


def communication_per_step(*, trunk_params: int, trunk_features: int, batch_size: int, accumulate: int,
                           members: int, classes: int, world_size: int) -> dict:
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


def plan_coupled(treenet: TreeNet, example: torch.Tensor, *, trunk: str = "broadcast", batch_size: int = 128,
                 accumulate: int = 1, rank: int | None = None, size: int | None = None) -> CoupledPlan:
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
        volume = communication_per_step(trunk_params=trunk_params, trunk_features=int(h[0].numel()),
                                        batch_size=batch_size, accumulate=accumulate, members=treenet.members,
                                        classes=int(logits.shape[2]), world_size=size)
        cheaper = "broadcast" if volume["broadcast"] <= volume["replicate"] else "replicate"
        mode = "broadcast" if _trunk_has_dropout(treenet) else cheaper
    else:
        mode = trunk
    if mode == "replicate" and _trunk_has_dropout(treenet):
        raise ConfigError("the trunk has Dropout: replicated on every rank it would draw a different mask per rank; "
                          "use trunk='broadcast'")
    return CoupledPlan(rank=rank, size=size, members=treenet.members, trunk=mode, trunk_trainable=trunk_params > 0,
                       trunk_shape=tuple(h.shape[1:]), trunk_dtype=h.dtype, classes=int(logits.shape[2]),
                       logit_dtype=logits.dtype)


# --------------------------------------------------------------------------------------------------------
# One batch
# --------------------------------------------------------------------------------------------------------


def coupled_backward(treenet: TreeNet, plan: CoupledPlan, xb: torch.Tensor, yb: torch.Tensor,
                     weights: torch.Tensor | None, loss: EnsembleLoss, ties: torch.Generator | None, *,
                     scale: float = 1.0, context: str = "") -> float:
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
    logits = torch.stack([own[m] if m in own else parts[plan.owner(m)][m // plan.size] for m in range(plan.members)])
    value = loss(logits, yb, weights, ties)
    if not torch.isfinite(value):
        raise DataError(f"non-finite training loss ({float(value.detach())}){context}; check the data or lower "
                        "the learning rate")
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
    """Overwrite every rank's state_dict entries with their owner's (one flat broadcast per owner and dtype)."""
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


def _epoch(treenet, plan, x_t, y_t, weights, loss, optimizer, config, options, shuffle, ties, device, epoch,
           lr) -> float:
    """One pass over the shuffled training set (the batches of `runtime.coupled._coupled_epoch`)."""
    treenet.train()
    n = x_t.shape[0]
    order = torch.randperm(n, generator=shuffle)
    starts = list(range(0, n, config.batch_size))
    total = 0.0
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    for batch, start in enumerate(starts, start=1):
        index = order[start : start + config.batch_size]
        xb, yb = x_t[index].to(device), y_t[index].to(device)
        wb = weights[:, index].to(device) if weights is not None and loss.memberwise else None
        value = coupled_backward(treenet, plan, xb, yb, wb, loss, ties, scale=1.0 / options.accumulate,
                                 context=f" at epoch {epoch}, batch {batch} (lr {lr:g})")
        if batch % options.accumulate == 0 or batch == len(starts):
            if plan.trunk == "replicate":
                allreduce_trunk_gradients(treenet)
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        total += value * len(index)
    return total / n


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------


def _resolve_device(config) -> torch.device:
    """The device the process group can communicate on: the rank's GPU with NCCL, the CPU with gloo."""
    if dist.get_backend() == "nccl":
        if config.device == "cpu":
            raise ConfigError("the process group uses NCCL (GPUs), which cannot train on the CPU; use device auto or "
                              "cuda, or launch without GPUs")
        return torch.device("cuda", torch.cuda.current_device())
    if config.device == "cuda":
        raise ConfigError("device 'cuda' needs an NCCL process group (one GPU per local rank); this job runs gloo "
                          "on the CPU: use device auto or cpu")
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
        "training options": {name: getattr(config, name) for name in (*_TRAJECTORY_FIELDS, "max_epochs", "patience")},
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
                raise ConfigError(f"rank {other} was given other {key} than rank 0; every rank of a coupled run "
                                  "needs the same data, options and TreeNet")


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

    Call it on every rank, after `codec.runtime.training.distributed.init()`, with the same arguments. Without a process
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

    config.validate()
    if config.loss != "ce":
        raise ConfigError(f"coupled ensembles train classifiers (loss 'ce'), not {config.loss!r}")
    if treenet.members != options.members:
        raise ConfigError(f"the TreeNet has {treenet.members} members but the options ask for {options.members}")
    x_t, y_t, xv_t, yv_t = _check_training_data(x_train, y_train, x_val, y_val, "ce")
    rank, size = dist.get_rank(), dist.get_world_size()
    device = _resolve_device(config)
    n = x_t.shape[0]
    weights = torch.from_numpy(bootstrap_weights(n, options.members, config.seed)) if options.bagging else None
    bag_unique = [float((w > 0).float().mean()) for w in weights] if weights is not None else [1.0] * options.members
    step_config = config
    if options.lr_scale_by_members:
        step_config = dataclasses.replace(config, lr=config.lr * options.members)

    previous_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        treenet.to(device)
        _check_agreement(_summary(x_t, y_t, xv_t, yv_t, config, options, treenet, trunk))
        broadcast_state(treenet, lambda key: 0)
        _check_labels(treenet, x_t, y_t, device)  # the same data everywhere: every rank raises or none does
        plan = plan_coupled(treenet, x_t[:2].to(device), trunk=trunk, batch_size=config.batch_size,
                            accumulate=options.accumulate, rank=rank, size=size)
        if not plan.owned:
            log.warning("%s: rank %d owns no member (%d members on %d ranks); it only relays", desc, rank,
                        options.members, size)
        log.info("%s: rank %d trains members %s, trunk %s", desc, rank, plan.owned, plan.trunk)

        owned_modules = nn.ModuleList([treenet.branches[m] for m in plan.owned])
        if plan.owns_trunk:
            owned_modules.append(treenet.trunk)
        has_params = any(p.requires_grad for p in owned_modules.parameters())
        optimizer = _make_optimizer(owned_modules, step_config) if has_params else None
        scheduler = _make_scheduler(optimizer, step_config) if optimizer is not None else None
        shuffle = torch.Generator().manual_seed(config.seed)
        ties = torch.Generator().manual_seed(_stream_seed(config.seed, _TIE_STREAM))
        seed_everything(config.seed)
        if rank:
            torch.manual_seed(int(np.random.SeedSequence([config.seed, _RANK_STREAM, rank]).generate_state(1)[0]))

        run = EarlyStopping(_state_copy(treenet) if rank == 0 else None, config.max_epochs, config.patience)
        run_start = time.perf_counter()
        progress = _progress(config, desc, 0) if rank == 0 else None
        try:
            epoch = 0
            while not run.finished and epoch < config.max_epochs:
                epoch += 1
                epoch_start = time.perf_counter()
                phase, loss = _phase_loss(options, epoch)
                if epoch == options.pretrain_epochs + 1 and options.pretrain_epochs:
                    run.new_objective()
                # Every optimizer follows the same schedule; a rank without one (it owns no weights) reads the
                # schedule's closed form, for its error messages only (the history holds rank 0's value).
                if optimizer is not None:
                    lr = float(optimizer.param_groups[0]["lr"])
                else:
                    lr = step_config.lr * (config.lr_decay or 1.0) ** (epoch - 1)
                train_loss = _epoch(treenet, plan, x_t, y_t, weights, loss, optimizer, config, options, shuffle,
                                    ties, device, epoch, lr)
                if scheduler is not None:
                    scheduler.step()
                broadcast_state(treenet, plan.state_owner)
                decision = None
                failure = None
                if rank == 0:
                    try:
                        entry = {"epoch": epoch, "phase": phase, "train_loss": train_loss, "val_loss": None,
                                 "val_accuracy": None, "val_oracle_accuracy": None, "val_member_accuracy": None}
                        if xv_t is not None:
                            entry.update(_validation(ensemble_logits(treenet, xv_t), yv_t, loss, options.monitor))
                            monitored = entry["val_loss"]
                        else:
                            monitored = train_loss
                        if not math.isfinite(monitored):
                            raise DataError(f"{desc}: non-finite loss at epoch {epoch} (lr {lr:g}); check the data or "
                                            "lower the learning rate")
                        entry.update(lr=lr, seconds=time.perf_counter() - epoch_start)
                        run.observe(entry, monitored, treenet, patience_applies=phase != "pretrain")
                        decision = {"entry": entry, "best_epoch": run.best_epoch, "stopped_early": run.stopped_early,
                                    "error": None}
                    except Exception as exc:  # noqa: BLE001 - the other ranks wait for a decision: send them any failure
                        failure = exc
                        decision = {"error": [isinstance(exc, DataError), f"{type(exc).__name__}: {exc}"]}
                decision = distributed.broadcast(decision)
                if failure is not None:
                    raise failure
                if decision["error"] is not None:
                    data_error, message = decision["error"]
                    raise (DataError if data_error else CodecError)(f"rank 0 failed at epoch {epoch}: {message}")
                if rank != 0:
                    run.follow(decision["entry"], decision["best_epoch"], decision["stopped_early"])
                if progress is not None:
                    entry = decision["entry"]
                    postfix = {"loss": f"{train_loss:.4f}"}
                    if entry["val_loss"] is not None:
                        postfix.update(val=f"{entry['val_loss']:.4f}", acc=f"{entry['val_accuracy']:.3f}")
                    progress.set_postfix(postfix, refresh=False)
                    progress.update(1)
                if config.verbose and rank == 0:
                    log.info("%s: epoch %d (%s) train_loss %.4f val %s (%.1fs)", desc, epoch, phase, train_loss,
                             decision["entry"]["val_loss"], decision["entry"]["seconds"])
        finally:
            if progress is not None:
                progress.close()
        if rank == 0:
            treenet.load_state_dict(run.best_state)
        broadcast_state(treenet, lambda key: 0)
        return CoupledResult(
            module=treenet,
            history=run.history,
            best_epoch=run.best_epoch,
            epochs_run=len(run.history),
            train_seconds=time.perf_counter() - run_start,
            stopped_early=run.stopped_early,
            bag_unique=bag_unique,
        )
    finally:
        torch.set_num_threads(previous_threads)


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
