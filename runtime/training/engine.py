"""The training engine: K members of one ensemble trained by one loop, stacked when their architecture allows.

`train_members` is the one training loop of codec's independent and grown members (`train_member` is its
K = 1 call). Every member keeps what a separate run of it would have: its own initialisation (the module
passed in), its own shuffling order (a CPU `torch.Generator` seeded with its seed, one permutation per
epoch), its own bootstrap weights (bagging, optional), its own learning rate, optimizer state and LR
schedule, and its own early stopping (`EarlyStopping`: a member whose patience runs out is frozen with its
best weights loaded and its optimizer state untouched; the others go on). Optionally the whole ensemble
stops when its validation quality (the NLL of the averaged probabilities, or the MSE of the averaged
reconstruction) has not improved for `ensemble_patience` epochs; each member then keeps its best weights.
A checkpoint (`train.CHECKPOINT_FORMAT`, with the sha256 of its tensor bytes) is written atomically at
every epoch end and resumes exactly.

**Stacked members.** Members whose networks are an `nn.Sequential` of Flatten, Linear, Conv2d, pooling,
element-wise activations and Dropout(p=0) (`stackable`) with equal shapes are trained as one `_StackedUnit`:
layer i's weights are one leaf tensor [K, out, in] and the forward pass is one `torch.baddbmm` per layer
for all K members ([K, B, in] inputs: each member's own batch, gathered from its own permutation), so a
step is one forward and one backward for all K. The optimizer (`_StackedOptimizer`) is Adam or SGD written
out with exactly the element-wise operations of torch's single-tensor implementations (L2 weight decay
added to the gradient, as ``torch.optim`` does; codec clips no gradients): applied to the whole stacked
tensor while every member is at the same step with the same LR, member by member (on slices) otherwise,
so a frozen member's moments and step count stay as they were.

Why baddbmm over stacked leaves rather than ``torch.func.stack_module_state`` + ``vmap``: both lay the
weights out the same way, and the engine was not slower than vmap in bench/engine.py's runs (arms
"engine" and "vmap", bench/README.md); with the backward written out (`_StackedLinear`: the weight gradient as
g^T h, the product addmm's backward forms for nn.Linear) every forward and backward is bit-identical per
member to nn.Linear's, so on CPU a stacked run gives exactly the weights of K separate runs
(tests/test_engine.py checks equality, not closeness); and per-member freezing, LRs and checkpoints are plain
slices of the stacked tensors, with no functional optimizer.

Convolutional layers are stacked as one grouped convolution (groups = K over the members' channels,
concatenated): that is float-close to K separate convolutions, not bit-identical (tests/test_engine.py).

**Grown members** (runtime/training/grow.py: `IRModule`s built from one CSNE template, or the
`CachedCSNModule`s around them) are stacked by `_GrownStackedUnit` when `grown_unstackable_reason` finds
nothing against it (a chain of dense and ungrouped conv IRLayers, pools and Flattens) and they share one
CSN: each layer's trainable rows are stacked [K, out - k, in] as above, and its k frozen CSN rows, the same
in every member, are read from the CSN-cache columns of each member's own batch or, uncached, computed for
all K members' batches by one no-grad product. Dense grown members are bit-identical to their module-unit
runs on CPU; conv ones float-close (grouped convolution). A grown member that cannot be stacked (a DAG
member, a grouped convolution, a softmax inside the network) is a module unit, and grow.py records why.
The same unit stacks lifted members without a CSN (`codec compile --model`: IRModules, no frozen rows).

Members that cannot be stacked (dropout with p > 0, batch norm, custom modules, the grown members above)
are each a `_ModuleUnit` (one module, ``torch.optim``), trained one after another within each epoch by the
same loop, each with its own global-RNG state swapped in for its steps, so dropout draws the same masks as
a separate run would.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from codec.errors import ConfigError, DataError, ModelLoadError
from codec.runtime.training.grow import CachedCSNModule
from codec.runtime.training.torch_ir import IRLayer, IRModule, IRPool, activation
from codec.runtime.training.train import (
    CHECKPOINT_FORMAT,
    EVAL_BATCH_SIZE,
    EarlyStopping,
    TrainConfig,
    TrainResult,
    _check_fingerprint,
    _check_outputs,
    _check_training_data,
    _default_loss,
    _fingerprint,
    _make_optimizer,
    _make_scheduler,
    _save_checkpoint,
    _state_copy,
    _targets,
    load_checkpoint,
    resolve_device,
    seed_everything,
)

log = logging.getLogger(__name__)

CHECKPOINT_KIND = "members"

# Modules without parameters that act on each element alone: applying them to [K, B, F] is applying them
# to each member's [B, F].
_ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.Softplus,
    nn.Identity,
)


@dataclass
class EnsembleResult:
    """What `train_members` returns.

    Attributes:
        members: one TrainResult per member, in order (modules hold their best weights).
        ensemble: the ensemble-level record: patience (None when off), monitored ("nll" or "mse"),
            best_epoch, stopped_early, and history (epoch, val_loss, val_metric of the averaged output).
        stacked: which members were trained stacked (one forward/backward for all of them).
        train_seconds: wall-clock time of the whole run, summed over interrupted and resumed runs.
    """

    members: list[TrainResult]
    ensemble: dict = field(default_factory=dict)
    stacked: list[int] = field(default_factory=list)
    train_seconds: float = 0.0


def stackable(module: nn.Module) -> bool:
    """True when the stacked layout computes `module`: an `nn.Sequential` of Flatten, Linear, Conv2d
    (ungrouped, zero padding), MaxPool2d/AvgPool2d, element-wise activations and Dropout(p=0), with at
    least one Linear, and a Flatten between the last convolution and the first Linear after it.

    MLPs are computed exactly (bit for bit per member); convolutions run as one grouped convolution
    (groups = K over the members' channels, concatenated), which sums in another order than K separate
    convolutions (float tolerance, not exact).
    """
    if type(module) is not nn.Sequential or not any(isinstance(m, nn.Linear) for m in module):
        return False
    spatial = False  # inside the convolutional part (a Linear there would act on the width axis)
    for layer in module:
        if isinstance(layer, nn.Dropout):
            if layer.p > 0:
                return False  # its masks come from the global RNG, shared by all members of a stack
        elif isinstance(layer, nn.Flatten):
            if layer.start_dim != 1 or layer.end_dim != -1:
                return False
            spatial = False
        elif isinstance(layer, nn.Conv2d):
            if layer.groups != 1 or layer.padding_mode != "zeros":
                return False
            spatial = True
        elif isinstance(layer, nn.Linear):
            if spatial:
                return False
        elif not isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d, *_ELEMENTWISE)):
            return False
    return True


def _same_shapes(modules: Sequence[nn.Module]) -> bool:
    first = [(type(m), tuple(p.shape for p in m.parameters())) for m in modules[0]]
    return all(
        [(type(m), tuple(p.shape for p in m.parameters())) for m in other] == first for other in modules[1:]
    )


# --------------------------------------------------------------------------------------------------------
# Units: what one optimizer step trains
# --------------------------------------------------------------------------------------------------------


class _ModuleUnit:
    """One member as its own module and ``torch.optim`` optimizer: the separate run itself."""

    def __init__(self, index: int, module: nn.Module, config: TrainConfig, seed: int, device: torch.device):
        self.indices = [index]
        self.module = module.to(device)
        self.module.train()
        self.optimizer = _make_optimizer(self.module, config)
        self.scheduler = _make_scheduler(self.optimizer, config)
        self.device = device
        # The member's own global-RNG stream (dropout), swapped in for its steps: members trained one
        # after another then draw exactly the masks their separate runs draw.
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
            seed_everything(seed)
            self.rng = self._get_rng()

    def _get_rng(self) -> dict:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def lr(self, index: int) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # Hooks of an objective (`train_members(objective=...)`): a subclass replaces what it needs.
    kind = CHECKPOINT_KIND

    def check_outputs(self, x_t, y_t) -> None:
        raise NotImplementedError

    def fingerprint(self, fingerprint: dict) -> dict:
        return fingerprint

    def check_resume(self, state: dict, path: Path) -> None:
        if state.get("kind") != self.kind:
            raise ModelLoadError(f"{path} is not a checkpoint of this kind of training ({self.kind})")

    def check_resume_fingerprint(self, saved: dict, current: dict, path: Path) -> None:
        return None

    def begin_epoch(self, epoch: int, stop: EarlyStopping) -> tuple[dict, bool]:
        """Extra history fields of the epoch, and whether patience applies to it."""
        return {}, True

    def validate(self, xv_t, yv_t) -> tuple[dict, float | None]:
        raise NotImplementedError

    def agree(self, entry: dict) -> dict:
        """The history entry every process records (a distributed objective sends rank 0's)."""
        return entry

    def train_epoch(self, batches, loss_fn, loss_name: str, epoch: int, desc: Callable[[int], str]) -> dict:
        """One epoch over `batches` (an iterator of (index, xb, yb, wb) per member); the mean loss."""
        (k,) = self.indices
        saved = self._get_rng()
        self._set_rng(self.rng)
        try:
            self.module.train()
            losses, sizes = [], []
            for _, xb, yb, wb in batches(k):
                self.optimizer.zero_grad(set_to_none=True)
                out = self.module(xb)
                loss = _member_loss(loss_fn, loss_name, out, xb, yb, wb)
                loss.backward()
                self.optimizer.step()
                losses.append(loss.detach())
                sizes.append(xb.shape[0])
            (mean,) = _epoch_losses(losses, sizes, epoch, [desc(k)], [self.lr(k)])
            return {k: mean}
        finally:
            self.rng = self._get_rng()
            self._set_rng(saved)

    def end_epoch(self, active: set[int]) -> None:
        if self.scheduler is not None and self.indices[0] in active:
            self.scheduler.step()

    @torch.no_grad()
    def outputs(self, xb: torch.Tensor) -> torch.Tensor:
        """(1, B, ...) outputs in eval mode."""
        was = self.module.training
        self.module.eval()
        try:
            return self.module(xb).unsqueeze(0)
        finally:
            self.module.train(was)

    def member_state(self, index: int) -> dict:
        return _state_copy(self.module)

    def state(self) -> dict:
        return {
            "model": _state_copy(self.module),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "rng": self.rng,
        }

    def restore(self, state: dict) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.rng = state["rng"]

    def finish(self, index: int, best: dict) -> nn.Module:
        self.module.load_state_dict(best)
        return self.module


class _StackedLinear(torch.autograd.Function):
    """K linear layers at once: (K, B, in) @ (K, out, in)^T + (K, out), with nn.Linear's exact gradients.

    Autograd's own baddbmm backward computes the weight gradient as (h^T g)^T, while addmm's backward
    (nn.Linear) computes g^T h for a transposed weight; the two sum in different orders. Written out as
    g^T h here, every gradient is bit-identical to K separate nn.Linear layers (measured on CPU).
    """

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        if bias is None:
            return torch.bmm(h, weight.transpose(1, 2))
        # baddbmm adds the bias as addmm does: per member the same result as nn.Linear.
        return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        grad_h = torch.bmm(grad, weight) if ctx.needs_input_grad[0] else None
        grad_weight = torch.bmm(grad.transpose(1, 2), h) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(1) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_h, grad_weight, grad_bias


class _StackedOptimizer:
    """Per-member Adam or SGD over stacked [K, ...] parameters, with torch's single-tensor arithmetic.

    Each member has its own LR, step count and moments (slices of the stacked state); `step(active)` moves
    only the active members.
    """

    def __init__(self, params: list[torch.Tensor], config: TrainConfig, lrs: list[float]):
        self.params = params
        self.kind = config.optimizer
        self.weight_decay = float(config.weight_decay)
        self.momentum = float(config.momentum)
        self.betas, self.eps = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which train.py uses
        self.lrs = [float(lr) for lr in lrs]
        self.steps = [0] * len(lrs)
        if self.kind == "adam":
            self.exp_avg = [torch.zeros_like(p) for p in params]
            self.exp_avg_sq = [torch.zeros_like(p) for p in params]
        else:
            self.buffers = [torch.zeros_like(p) for p in params]

    @torch.no_grad()
    def step(self, active: list[int]) -> None:
        if not active:
            return
        everyone = len(active) == len(self.lrs)
        if everyone and len(set(self.lrs)) == 1 and len(set(self.steps)) == 1:
            groups = [(slice(None), active)]  # one update of the whole stacked tensors
        else:
            groups = [(k, [k]) for k in active]
        for where, members in groups:
            for k in members:
                self.steps[k] += 1
            k = members[0]
            for i, param in enumerate(self.params):
                grad = param.grad[where]
                if self.kind == "adam":
                    self._adam(param[where], grad, self.exp_avg[i][where], self.exp_avg_sq[i][where], k)
                else:
                    self._sgd(param[where], grad, i, where, k)

    def _adam(self, param, grad, exp_avg, exp_avg_sq, k: int) -> None:
        # torch.optim.adam._single_tensor_adam, non-capturable, amsgrad off: operation for operation.
        beta1, beta2 = self.betas
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step = float(self.steps[k])
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = self.lrs[k] / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2**0.5).add_(self.eps)
        param.addcdiv_(exp_avg, denom, value=-step_size)

    def _sgd(self, param, grad, i: int, where, k: int) -> None:
        # torch.optim.sgd._single_tensor_sgd, no dampening or Nesterov: the buffer starts as the first grad.
        if self.weight_decay != 0:
            grad = grad.add(param, alpha=self.weight_decay)
        if self.momentum != 0:
            buf = self.buffers[i][where]
            if self.steps[k] == 1:
                buf.copy_(grad)
            else:
                buf.mul_(self.momentum).add_(grad)
            grad = buf
        param.add_(grad, alpha=-self.lrs[k])

    def state(self) -> dict:
        moments = (
            {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
            if self.kind == "adam"
            else {"buffers": self.buffers}
        )
        return {"kind": self.kind, "lrs": list(self.lrs), "steps": list(self.steps), **moments}

    def restore(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ModelLoadError("the checkpoint's stacked optimizer state is of another optimizer")
        self.lrs = [float(v) for v in state["lrs"]]
        self.steps = [int(v) for v in state["steps"]]
        names = ("exp_avg", "exp_avg_sq") if self.kind == "adam" else ("buffers",)
        for name in names:
            for mine, saved in zip(getattr(self, name), state[name]):
                mine.copy_(saved)


def stack_layers(modules: Sequence[nn.Module], device: torch.device) -> tuple[list, list[str], list]:
    """The stacked layout of K `stackable` Sequentials of equal shapes (`_StackedUnit`'s, shared with the
    TreeNet's stacked heads in runtime/training/coupled.py).

    Returns the plan `stacked_forward` follows, the state-dict keys of the stacked parameters in the
    template's parameter order ("" for an absent bias), and the parameters: new leaf tensors [K, ...]
    that require grad, copied from the modules (None for an absent bias).
    """
    template = modules[0]
    plan: list[tuple[str, object]] = []
    names: list[str] = []  # state-dict keys of the template, in parameter order ("" for an absent bias)
    params: list[torch.Tensor | None] = []
    for position, layer in enumerate(template):
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            kind = "linear" if isinstance(layer, nn.Linear) else "conv"
            plan.append((kind, len(params) if kind == "linear" else (len(params), layer)))
            for attr in ("weight", "bias"):
                if getattr(layer, attr) is None:  # only a bias can be absent
                    params.append(None)
                    names.append("")
                    continue
                stacked = torch.stack([getattr(m[position], attr).detach() for m in modules]).to(device)
                params.append(stacked.clone().requires_grad_(True))
                names.append(f"{position}.{attr}")
        elif isinstance(layer, nn.Flatten):
            plan.append(("flatten", None))
        elif isinstance(layer, (nn.MaxPool2d, nn.AvgPool2d)):
            plan.append(("spatial", copy.deepcopy(layer).to(device)))
        elif isinstance(layer, nn.Dropout):
            continue
        else:
            plan.append(("elementwise", copy.deepcopy(layer).to(device)))
    return plan, names, params


def stacked_forward(plan: list, params: list, x: torch.Tensor) -> torch.Tensor:
    """`stack_layers`' plan on (K, B, ...) inputs, member k's batch in row k, to (K, B, outputs)."""
    members = x.shape[0]
    h = x
    grouped = False  # h is (B, K*C, H, W)

    def to_grouped(t):
        return t.transpose(0, 1).reshape(t.shape[1], members * t.shape[2], *t.shape[3:])

    for kind, what in plan:
        if kind == "linear":
            h = _StackedLinear.apply(h, params[what], params[what + 1])
        elif kind == "conv":
            index, layer = what
            if not grouped:
                h, grouped = to_grouped(h), True
            weight, bias = params[index], params[index + 1]
            h = F.conv2d(
                h,
                weight.reshape(-1, *weight.shape[2:]),
                None if bias is None else bias.reshape(-1),
                layer.stride,
                layer.padding,
                layer.dilation,
                groups=members,
            )
        elif kind == "spatial":
            if not grouped:
                h, grouped = to_grouped(h), True
            h = what(h)
        elif kind == "flatten":
            if grouped:
                h, grouped = h.reshape(h.shape[0], members, -1).transpose(0, 1), False
            else:
                h = h.reshape(h.shape[0], h.shape[1], -1)
        else:
            h = what(h)
    return h


class _StackedUnit:
    """K members with equal shapes as stacked [K, ...] weights: one forward/backward for all K.

    Two layouts: (K, B, features) for Linear layers (`_StackedLinear`), and (B, K*C, H, W) for the
    convolutional part, where each member's channels are a group of one grouped convolution and pools
    and activations act per channel. Flatten turns the second into the first.
    """

    def __init__(
        self,
        indices: list[int],
        modules: list[nn.Module],
        config: TrainConfig,
        lrs: list[float],
        device: torch.device,
    ):
        self._members(indices, modules, config, device)
        self.plan, self.names, self.params = stack_layers(modules, device)
        self.trainable = [p for p in self.params if p is not None]
        self.optimizer = _StackedOptimizer(self.trainable, config, [lrs[i] for i in self.indices])

    def _members(self, indices, modules, config: TrainConfig, device: torch.device) -> None:
        """What every stacked unit holds of its members: which they are, their modules, device, LR decay."""
        self.indices = list(indices)
        self.modules = modules
        self.device = device
        self.lr_decay = config.lr_decay if config.lr_decay not in (None, 1.0) else None

    def slot(self, index: int) -> int:
        return self.indices.index(index)

    def lr(self, index: int) -> float:
        return self.optimizer.lrs[self.slot(index)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, ...) inputs, member k's batch in row k, to (K, B, outputs)."""
        return stacked_forward(self.plan, self.params, x)

    def train_epoch(
        self, batches, loss_fn, loss_name: str, epoch: int, desc: Callable[[int], str], active: list[int]
    ) -> dict:
        slots = [self.slot(k) for k in active]
        seen, sizes = [], []
        for _, xb, yb, wb in batches(self.indices):
            for p in self.trainable:
                p.grad = None
            out = self.forward(xb)
            losses = torch.stack(
                [
                    _member_loss(
                        loss_fn,
                        loss_name,
                        out[s],
                        xb[s],
                        None if yb is None else yb[s],
                        None if wb is None else wb[s],
                    )
                    for s in slots
                ]
            )
            losses.sum().backward()
            self.optimizer.step(slots)
            seen.append(losses.detach())
            sizes.append(xb.shape[1])
        means = _epoch_losses(seen, sizes, epoch, [desc(k) for k in active], [self.lr(k) for k in active])
        return dict(zip(active, means))

    def end_epoch(self, active: set[int]) -> None:
        if self.lr_decay is not None:
            for k in self.indices:
                if k in active:
                    s = self.slot(k)
                    # ExponentialLR's chained form: the previous LR times gamma, as a python float.
                    self.optimizer.lrs[s] = self.optimizer.lrs[s] * float(self.lr_decay)

    @torch.no_grad()
    def outputs(self, xb: torch.Tensor) -> torch.Tensor:
        return self.forward(xb.unsqueeze(0).expand(len(self.indices), *xb.shape))

    def member_state(self, index: int) -> dict:
        s = self.slot(index)
        state = {}
        for name, param in zip(self.names, self.params):
            if param is not None:
                state[name] = param.detach()[s].to("cpu", copy=True)
        return state

    def state(self) -> dict:
        return {
            "params": [p.detach().to("cpu", copy=True) for p in self.trainable],
            "optimizer": self.optimizer.state(),
        }

    @torch.no_grad()
    def restore(self, state: dict) -> None:
        if len(state["params"]) != len(self.trainable):
            raise ModelLoadError("the checkpoint's stacked weights do not match these members")
        for mine, saved in zip(self.trainable, state["params"]):
            if tuple(mine.shape) != tuple(saved.shape):
                raise ModelLoadError("the checkpoint's stacked weights do not match these members")
            mine.copy_(saved)
        self.optimizer.restore(state["optimizer"])

    def finish(self, index: int, best: dict) -> nn.Module:
        module = self.modules[self.slot(index)]
        module.load_state_dict(best)
        return module


# --------------------------------------------------------------------------------------------------------
# Grown members stacked: IRModule / CachedCSNModule members around one frozen CSN
# --------------------------------------------------------------------------------------------------------


def _grown_parts(module: nn.Module) -> tuple[IRModule | None, tuple | None]:
    """The IRModule inside a grown member and its CSN-cache layout (input size, cached layer indices,
    widths, shapes), or (None, None) for any other module."""
    if type(module) is CachedCSNModule:
        layout = (module.input_size, list(module.cached), list(module.widths), list(module.shapes))
        return module.module, layout
    if type(module) is IRModule:
        return module, None
    return None, None


def grown_unstackable_reason(module: nn.Module) -> str | None:
    """Why the stacked layout cannot compute grown member `module` (an IRModule, or a CachedCSNModule
    around one), or None when it can: a chain of dense and ungrouped conv IRLayers, IRPools and Flattens,
    with a Flatten between the last spatial layer and the first dense layer after it, softmax only as the
    last layer's logits, and at least one trainable row."""
    inner, _ = _grown_parts(module)
    if inner is None:
        return "not a grown member (IRModule)"
    if not inner.is_chain:
        return "a DAG member (residual or concat layers) is not a chain"
    spatial = len(inner.input_shape) > 1
    trainable = False
    last = len(inner.blocks) - 1
    for i, block in enumerate(inner.blocks):
        if isinstance(block, IRLayer):
            if block.kind == "conv":
                if block.groups != 1:
                    return "a grouped convolution"
                spatial = True
            elif spatial:
                return "a dense layer on a spatial input without a Flatten"
            if block.activation == "softmax" and (i != last or inner.probabilities):
                return "a softmax that is not the last layer's logits"
            trainable = trainable or block.weight.shape[0] > 0
        elif isinstance(block, IRPool):
            if not spatial:
                return "a pooling layer on a flat input"
        elif isinstance(block, nn.Flatten):
            spatial = False
        else:
            return f"a {type(block).__name__} block"
    if spatial:
        return "a spatial output (no Flatten before the last layer)"
    if not trainable:
        return "no trainable rows"
    return None


def _grown_signature(module: nn.Module) -> tuple:
    """What grown members stacked together must share: parameter shapes, layer settings, cache layout."""
    inner, cache = _grown_parts(module)
    layers = []
    for block in inner.blocks:
        if isinstance(block, IRLayer):
            conv = (block.stride, block.padding, block.pad4, block.dilation) if block.kind == "conv" else ()
            layers.append((block.kind, block.activation, block.alpha, block.k, *conv))
        elif isinstance(block, IRPool):
            layers.append(("pool", repr(block.layer)))
        else:
            layers.append(("flatten",))
    shapes = tuple((name, tuple(t.shape)) for name, t in module.state_dict().items())
    return shapes, tuple(layers), repr(cache), tuple(inner.input_shape), inner.probabilities


def _same_csn(a: nn.Module, b: nn.Module) -> bool:
    """Equal signatures and the same frozen CSN rows (what the stacked unit computes once for all K)."""
    if _grown_signature(a) != _grown_signature(b):
        return False
    blocks = zip(_grown_parts(a)[0].blocks, _grown_parts(b)[0].blocks)
    return all(
        torch.equal(x.frozen_weight, y.frozen_weight) and torch.equal(x.frozen_bias, y.frozen_bias)
        for x, y in blocks
        if isinstance(x, IRLayer)
    )


class _GrownStackedUnit(_StackedUnit):
    """K grown members built from one CSNE template as stacked weights: one forward/backward for all K.

    Each IRLayer's trainable rows are one leaf tensor [K, out - k, in] (`_StackedLinear` for dense layers,
    one grouped convolution for conv layers, as `_StackedUnit`); its k frozen CSN rows are one tensor,
    the same for every member, never trained. Their pre-activations are read from the CSN-cache columns of
    each member's own batch (CachedCSNModule members) or, uncached, computed for all K members' batches
    by one no-grad product per layer. Frozen then trainable rows are concatenated per member, as
    `IRLayer.pre_activation` does, so on CPU a dense member's weights are bit-identical to its module-unit
    run (tests/test_grow.py).
    """

    def __init__(
        self,
        indices: list[int],
        modules: list[nn.Module],
        config: TrainConfig,
        lrs: list[float],
        device: torch.device,
    ):
        self._members(indices, modules, config, device)
        inners = [_grown_parts(m)[0] for m in modules]
        template, self.cache = _grown_parts(modules[0])
        self.input_shape = tuple(template.input_shape)
        prefix = "module." if self.cache is not None else ""
        last = len(template.blocks) - 1
        self.plan: list[tuple[str, object]] = []
        self.names: list[str] = []
        self.params: list[torch.Tensor] = []
        for i, block in enumerate(template.blocks):
            if isinstance(block, IRLayer):
                index = None
                if block.weight.shape[0]:
                    index = len(self.params)
                    for attr in ("weight", "bias"):
                        stacked = torch.stack([getattr(m.blocks[i], attr).detach() for m in inners])
                        self.params.append(stacked.to(device).clone().requires_grad_(True))
                        self.names.append(f"{prefix}blocks.{i}.{attr}")
                frozen = None
                if block.k:
                    frozen = (block.frozen_weight.to(device), block.frozen_bias.to(device))
                logits = i == last and block.activation == "softmax" and not template.probabilities
                self.plan.append(("layer", (i, block, index, frozen, logits)))
            elif isinstance(block, IRPool):
                self.plan.append(("spatial", copy.deepcopy(block).to(device)))
            else:
                self.plan.append(("flatten", None))
        self.trainable = list(self.params)
        # Each member's state-dict entries that the unit does not train (the CSN buffers, empty rows).
        self.fixed = [
            {k: v.detach().to("cpu", copy=True) for k, v in m.state_dict().items() if k not in self.names}
            for m in modules
        ]
        self.keys = list(modules[0].state_dict())
        self.optimizer = _StackedOptimizer(self.trainable, config, [lrs[i] for i in self.indices])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, ...) inputs, member k's batch in row k (with its cache columns), to (K, B, outputs)."""
        members, batch = x.shape[0], x.shape[1]
        cached: dict[int, torch.Tensor] = {}
        if self.cache is not None:
            input_size, indices, widths, shapes = self.cache
            offset = input_size
            for layer, width, shape in zip(indices, widths, shapes):
                cached[layer] = x[:, :, offset : offset + width].reshape(members, batch, *shape)
                offset += width
            x = x[:, :, :input_size].reshape(members, batch, *self.input_shape)
        h = x
        grouped = False  # h is (B, K*C, H, W), member k's channels in the k-th group

        def to_grouped(t):
            return t.transpose(0, 1).reshape(t.shape[1], members * t.shape[2], *t.shape[3:])

        for kind, what in self.plan:
            if kind == "layer":
                i, block, index, frozen, logits = what
                if block.kind == "dense":
                    parts = []
                    if frozen is not None:
                        part = cached.get(i)
                        if part is None:
                            with torch.no_grad():
                                weight, bias = frozen
                                part = torch.baddbmm(
                                    bias.expand(members, 1, -1),
                                    h,
                                    weight.t().expand(members, -1, -1),
                                )
                        parts.append(part)
                    if index is not None:
                        parts.append(_StackedLinear.apply(h, self.params[index], self.params[index + 1]))
                    h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
                else:
                    if not grouped:
                        h, grouped = to_grouped(h), True
                    h = self._conv(block, h, cached.get(i), frozen, index, members)
                if not logits:
                    h = activation(block.activation, block.alpha, h)
            elif kind == "spatial":
                if not grouped:
                    h, grouped = to_grouped(h), True
                h = what(h)
            elif grouped:
                h, grouped = h.reshape(h.shape[0], members, -1).transpose(0, 1), False
            else:
                h = h.reshape(members, batch, -1)
        return h

    def _conv(self, block: IRLayer, h, cached, frozen, index, members: int) -> torch.Tensor:
        """One conv IRLayer in the grouped layout: frozen and trainable channels, member by member."""
        if not block.symmetric:
            h = F.pad(h, block.pad4)
        batch = h.shape[0]
        parts = []
        if frozen is not None:
            if cached is not None:
                part = cached.transpose(0, 1)  # (B, K, k, H, W)
            else:
                weight, bias = frozen
                with torch.no_grad():
                    part = F.conv2d(
                        h,
                        weight.repeat(members, 1, 1, 1),
                        bias.repeat(members),
                        block.stride,
                        block.padding,
                        block.dilation,
                        groups=members,
                    )
                part = part.reshape(batch, members, -1, *part.shape[2:])
            parts.append(part)
        if index is not None:
            weight, bias = self.params[index], self.params[index + 1]
            part = F.conv2d(
                h,
                weight.reshape(-1, *weight.shape[2:]),
                bias.reshape(-1),
                block.stride,
                block.padding,
                block.dilation,
                groups=members,
            )
            parts.append(part.reshape(batch, members, -1, *part.shape[2:]))
        h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return h.reshape(batch, -1, *h.shape[3:])

    def member_state(self, index: int) -> dict:
        s = self.slot(index)
        trained = {name: p.detach()[s].to("cpu", copy=True) for name, p in zip(self.names, self.params)}
        return {key: trained[key] if key in trained else self.fixed[s][key] for key in self.keys}


def _member_loss(loss_fn, loss_name: str, out, xb, yb, wb) -> torch.Tensor:
    target = _targets(loss_name, xb, yb)
    if wb is None:
        return loss_fn(out, target)
    # Bagging: the member's bootstrap counts weight its examples, sum_b w_b * loss_b / B (as in losses.py).
    if loss_name == "ce":
        per_example = F.cross_entropy(out, target, reduction="none")
    else:
        per_example = ((out - target) ** 2).reshape(out.shape[0], -1).mean(dim=1)
    return (per_example * wb).sum() / out.shape[0]


def _epoch_losses(
    losses: list, sizes: list[int], epoch: int, descs: list[str], lrs: list[float]
) -> list[float]:
    """Each member's mean training loss over the epoch's batches (`losses`: one scalar or one (members,)
    tensor per batch), checked for non-finite values once, at the epoch's end.

    Checking once per epoch instead of per batch keeps the loop free of host synchronisations (one per
    step otherwise, measured at about 0.7 ms on this CPU). A non-finite batch still names its epoch and
    batch; the epoch's checkpoint is never written, so the run stays resumable from the last good epoch.
    """
    table = torch.stack(losses).reshape(len(losses), -1).to(torch.float64)
    finite = torch.isfinite(table)
    if not bool(finite.all()):
        batch, member = (int(i) for i in (~finite).nonzero()[0])
        _non_finite(descs[member], float(table[batch, member]), epoch, batch + 1, lrs[member])
    weights = torch.tensor(sizes, dtype=torch.float64, device=table.device).unsqueeze(1)
    return [float(v) for v in (table * weights).sum(dim=0) / sum(sizes)]


def _non_finite(desc: str, value: float, epoch: int, batch: int, lr: float) -> None:
    raise DataError(
        f"{desc}: non-finite training loss ({value}) at epoch {epoch}, batch {batch};"
        f" check the data or lower the learning rate (lr {lr:g})"
    )


# --------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------


def train_members(
    modules: Sequence[nn.Module],
    x_train,
    y_train,
    x_val,
    y_val,
    config: TrainConfig,
    *,
    seeds: Sequence[int] | None = None,
    lrs: Sequence[float] | None = None,
    sample_weights=None,
    ensemble_patience: int | None = None,
    stack: bool = True,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    loss_fn: Callable | None = None,
    names: Sequence[str] | None = None,
    desc: str = "ensemble",
    on_epoch_end: Callable[[int, dict], None] | None = None,
    objective: Callable | None = None,
) -> EnsembleResult:
    """Train K members (in place) on the same data, each as its own separate run would, in one loop.

    Args:
        modules: the K networks, already initialised (member k's initial weights are its module's).
        x_train, y_train, x_val, y_val: as for `train_member` (shared by all members).
        config: the training configuration; its ``seed`` is member 0's when `seeds` is None.
        seeds: member k's shuffling (and dropout) seed; default ``config.seed + k``.
        lrs: member k's learning rate; default ``config.lr`` for all.
        sample_weights: (K, N) per-member example weights (bootstrap counts), or None.
        ensemble_patience: stop every member when the ensemble's validation loss has not improved for this
            many epochs (None: ``config.ensemble_patience``, whose default is off).
        stack: train stackable members of equal shapes as one stacked model (False: one module unit each).
        checkpoint_path: one checkpoint for the whole run, written atomically at every epoch end.
        resume: continue from `checkpoint_path` when it exists.
        loss_fn: replaces the default loss of ``config.loss`` (not with `sample_weights`).
        names: member labels for the progress bar and errors (default "member k").
        desc: the run's label.
        on_epoch_end: ``on_epoch_end(epoch, record)`` after each epoch's checkpoint; record holds
            "members" (the epoch's history entry per member that trained, by index) and "ensemble".
        objective: for one module trained with its own loss (a coupled ensemble: runtime/training/
            coupled.py): ``objective(module, config, seed, device)`` builds the unit that trains it, a
            `_ModuleUnit` with the hooks `check_outputs`, `fingerprint`, `check_resume`, `begin_epoch`,
            `validate` and `agree` (see `_ModuleUnit`'s defaults); the loop, early stopping, checkpoint and
            progress
            bar stay the engine's.

    Returns:
        The EnsembleResult; every module holds its best epoch's weights.

    Raises:
        DataError, ShapeError, ConfigError, ModelLoadError: as `train_member`, naming the member.
    """
    config.validate()
    modules = list(modules)
    count = len(modules)
    if count < 1:
        raise ConfigError("train_members needs at least one member")
    if objective is not None and count != 1:
        raise ConfigError("an objective trains one module (its members live inside it)")
    seeds = [config.seed + k for k in range(count)] if seeds is None else [int(s) for s in seeds]
    lrs = [config.lr] * count if lrs is None else [float(lr) for lr in lrs]
    names = [f"member {k}" for k in range(count)] if names is None else [str(n) for n in names]
    if len(seeds) != count or len(lrs) != count or len(names) != count:
        raise ConfigError(f"{count} members need {count} seeds, learning rates and names")
    if ensemble_patience is None:
        ensemble_patience = config.ensemble_patience
    if ensemble_patience is not None and (isinstance(ensemble_patience, bool) or int(ensemble_patience) < 1):
        raise ConfigError(f"ensemble patience must be a positive integer, got {ensemble_patience!r}")
    member_configs = [
        TrainConfig(**{**config.to_dict(), "seed": seed, "lr": lr}) for seed, lr in zip(seeds, lrs)
    ]
    x_t, y_t, xv_t, yv_t = _check_training_data(x_train, y_train, x_val, y_val, config.loss)
    n = x_t.shape[0]
    weights = None
    if sample_weights is not None:
        if loss_fn is not None:
            raise ConfigError("per-member example weights need the default loss")
        weights = torch.as_tensor(np.asarray(sample_weights, dtype=np.float32))
        if tuple(weights.shape) != (count, n):
            raise ConfigError(f"sample weights have shape {tuple(weights.shape)}; want ({count}, {n})")
    device = resolve_device(config.device)
    loss_fn = loss_fn or _default_loss(config.loss)
    checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None

    previous_threads = torch.get_num_threads()
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    try:
        fingerprints = [_fingerprint(c, m, n) for c, m in zip(member_configs, modules)]
        # Seeding first also on resume: it sets the deterministic-algorithm flags; the RNG states it seeds
        # are then each unit's own.
        seed_everything(seeds[0])
        if objective is not None:
            units = [objective(modules[0], member_configs[0], seeds[0], device)]
            units[0].check_outputs(x_t, y_t)
            fingerprints[0] = units[0].fingerprint(fingerprints[0])
        else:
            for module in modules:
                module.to(device)
                _check_outputs(module, x_t, y_t, config.loss, device)
            units = _plan_units(modules, member_configs, seeds, lrs, config, device, stack)
        kind = units[0].kind if objective is not None else CHECKPOINT_KIND
        unit_of = {k: unit for unit in units for k in unit.indices}
        stacked = [k for unit in units if isinstance(unit, _StackedUnit) for k in unit.indices]
        stops = [
            EarlyStopping(unit_of[k].member_state(k), config.max_epochs, config.patience)
            for k in range(count)
        ]
        generators = []
        for seed in seeds:
            generator = torch.Generator()
            generator.manual_seed(seed)
            generators.append(generator)
        ensemble = _EnsembleStopping(ensemble_patience, "nll" if config.loss == "ce" else "mse")
        prior_seconds = 0.0
        frozen_outputs: dict[int, torch.Tensor] = {}
        if resume and checkpoint_path is not None and checkpoint_path.exists():
            state = load_checkpoint(checkpoint_path)
            if objective is not None:
                units[0].check_resume(state, checkpoint_path)
            elif state.get("kind") != CHECKPOINT_KIND or int(state.get("count", -1)) != count:
                raise ModelLoadError(
                    f"{checkpoint_path} is not a checkpoint of {count} independently trained member(s);"
                    " delete it or do not resume"
                )
            for k in range(count):
                _check_fingerprint(state["fingerprints"][k], fingerprints[k], checkpoint_path)
            if objective is not None:
                units[0].check_resume_fingerprint(state["fingerprints"][0], fingerprints[0], checkpoint_path)
            if [sorted(u.indices) for u in units] != state["units_layout"]:
                raise ConfigError(
                    f"checkpoint {checkpoint_path} was written with the members stacked otherwise;"
                    " delete it or do not resume"
                )
            for unit, unit_state in zip(units, state["units"]):
                unit.restore(unit_state)
            for k in range(count):
                stops[k].restore(state["stops"][k])
                generators[k].set_state(state["generators"][k])
            ensemble.restore(state["ensemble"])
            if xv_t is not None and ensemble.patience is not None:
                for k in range(count):
                    if stops[k].finished:
                        frozen_outputs[k] = _best_outputs(modules[k], stops[k].best_state, xv_t, device)
            prior_seconds = float(state["train_seconds"])
            log.info("%s: resuming from %s after epoch %d", desc, checkpoint_path, int(state["epoch"]))

        run_start = time.perf_counter()
        progress = _Progress(config, desc, names, max(s.epoch for s in stops))
        try:
            epoch = max(s.epoch for s in stops)
            while epoch < config.max_epochs and not ensemble.stopped:
                active = [k for k in range(count) if not stops[k].finished]
                if not active:
                    break
                epoch += 1
                epoch_start = time.perf_counter()
                phase, patience_applies = units[0].begin_epoch(epoch, stops[0]) if objective else ({}, True)
                orders = {k: torch.randperm(n, generator=generators[k]) for k in active}
                lrs_used = {k: unit_of[k].lr(k) for k in active}
                train_losses: dict[int, float] = {}
                for unit in units:
                    unit_active = [k for k in unit.indices if k in orders]
                    if not unit_active:
                        continue
                    batches = _batcher(orders, x_t, y_t, weights, config.batch_size, device)
                    desc_of = names.__getitem__
                    if isinstance(unit, _StackedUnit):
                        train_losses.update(
                            unit.train_epoch(batches, loss_fn, config.loss, epoch, desc_of, unit_active)
                        )
                    else:
                        train_losses.update(unit.train_epoch(batches, loss_fn, config.loss, epoch, desc_of))
                    unit.end_epoch(set(unit_active))
                if objective is not None:
                    val = None
                    val_fields, monitored_val = units[0].validate(xv_t, yv_t)
                else:
                    val = _evaluate_members(
                        units, count, xv_t, yv_t, config.loss, loss_fn, device, frozen_outputs
                    )
                seconds = time.perf_counter() - epoch_start
                entries = {}
                for k in active:
                    if objective is None:
                        val_loss, val_metric = val["members"][k] if val is not None else (None, None)
                        val_fields, monitored_val = {"val_loss": val_loss, "val_metric": val_metric}, val_loss
                    monitored = monitored_val if monitored_val is not None else train_losses[k]
                    if not math.isfinite(monitored):
                        which = "validation" if monitored_val is not None else "training"
                        raise DataError(
                            f"{names[k]}: non-finite {which} loss at epoch {epoch} (lr {lrs_used[k]:g});"
                            " check the data or lower the learning rate"
                        )
                    entries[k] = {
                        "epoch": epoch,
                        **phase,
                        "train_loss": train_losses[k],
                        **val_fields,
                        "lr": lrs_used[k],
                        "seconds": seconds,
                    }
                    if objective is not None:
                        entries[k] = unit_of[k].agree(entries[k])
                    stops[k].observe_state(
                        entries[k],
                        monitored,
                        lambda k=k: unit_of[k].member_state(k),
                        patience_applies=patience_applies,
                    )
                if val is not None:
                    ensemble.observe(epoch, *val["ensemble"])
                    if ensemble.stopped:
                        for k in range(count):
                            stops[k].finished = True
                # A stopped member is frozen: its unit no longer steps it (optimizer state untouched), and
                # the ensemble's validation quality counts it with its best weights from now on.
                for k in active:
                    if stops[k].finished and xv_t is not None and ensemble.patience is not None:
                        frozen_outputs[k] = _best_outputs(modules[k], stops[k].best_state, xv_t, device)
                if checkpoint_path is not None:
                    _save_checkpoint(
                        checkpoint_path,
                        {
                            "format": CHECKPOINT_FORMAT,
                            "kind": kind,
                            "count": count,
                            "fingerprints": fingerprints,
                            "units_layout": [sorted(u.indices) for u in units],
                            "units": [u.state() for u in units],
                            "stops": [s.state(0.0) for s in stops],
                            "generators": [g.get_state() for g in generators],
                            "ensemble": ensemble.state(),
                            "epoch": epoch,
                            "finished": all(s.finished for s in stops) or ensemble.stopped,
                            "train_seconds": prior_seconds + time.perf_counter() - run_start,
                        },
                    )
                progress.update(epoch, entries, stops, ensemble)
                if on_epoch_end is not None:
                    on_epoch_end(epoch, {"members": entries, "ensemble": ensemble.last})
        finally:
            progress.close()
        train_seconds = prior_seconds + time.perf_counter() - run_start
        results = []
        for k in range(count):
            module = unit_of[k].finish(k, stops[k].best_state)
            results.append(
                TrainResult(
                    module=module,
                    history=stops[k].history,
                    best_epoch=stops[k].best_epoch,
                    epochs_run=len(stops[k].history),
                    train_seconds=train_seconds,
                    stopped_early=stops[k].stopped_early,
                )
            )
        return EnsembleResult(
            members=results, ensemble=ensemble.record(), stacked=stacked, train_seconds=train_seconds
        )
    finally:
        torch.set_num_threads(previous_threads)


def _plan_units(modules, configs, seeds, lrs, config, device, stack: bool) -> list:
    """Stack every stackable member of the first stackable member's shapes (plain Sequentials first, else
    grown members around the same CSN); the rest are module units."""
    units: list = []
    group: list[int] = []
    if stack and len(modules) > 1:
        candidates = [k for k, m in enumerate(modules) if stackable(m)]
        if candidates:
            first = modules[candidates[0]]
            group = [k for k in candidates if _same_shapes([first, modules[k]])]
        unit_class = _StackedUnit
        if len(group) < 2:
            candidates = [k for k, m in enumerate(modules) if grown_unstackable_reason(m) is None]
            if candidates:
                first = modules[candidates[0]]
                group = [k for k in candidates if _same_csn(first, modules[k])]
            unit_class = _GrownStackedUnit
    if len(group) > 1:
        units.append(unit_class(group, [modules[k] for k in group], config, lrs, device))
    for k, module in enumerate(modules):
        if k not in group or len(group) == 1:
            units.append(_ModuleUnit(k, module, configs[k], seeds[k], device))
    return units


def _batcher(orders: dict, x_t, y_t, weights, batch_size: int, device):
    """``batches(indices)``: each step's batch of the given members, from each member's own permutation.

    For one index (module units) it yields (index, xb, yb, wb) of that member; for a list (stacked units) the
    tensors gain a leading member axis, row j holding member indices[j]'s batch.
    """
    n = x_t.shape[0]

    def batches(indices):
        single = isinstance(indices, int)
        members = [indices] if single else list(indices)
        if single:
            order = orders[indices]
        else:
            # A stopped member's rows still flow through the stacked forward (its loss is not used);
            # any permutation does for it.
            fallback = next(iter(orders.values()))
            order = torch.stack([orders.get(k, fallback) for k in members])
        for start in range(0, n, batch_size):
            index = order[..., start : start + batch_size]
            # index_select over the flattened index: on CPU, advanced indexing (x_t[index]) is several times
            # slower for the same rows (see the "gather" phase of bench/engine.py's breakdown).
            flat = index.reshape(-1)
            xb = x_t.index_select(0, flat).reshape(*index.shape, *x_t.shape[1:]).to(device, non_blocking=True)
            yb = (
                y_t.index_select(0, flat).reshape(index.shape).to(device, non_blocking=True)
                if y_t is not None
                else None
            )
            if weights is None:
                wb = None
            elif single:
                wb = weights[indices][index].to(device)
            else:
                wb = torch.gather(weights[members], 1, index).to(device)
            yield index, xb, yb, wb

    return batches


@torch.no_grad()
def _best_outputs(module: nn.Module, best: dict, xv_t: torch.Tensor, device) -> torch.Tensor:
    """A stopped member's validation outputs with its best weights (on a copy: its unit is left alone)."""
    probe = copy.deepcopy(module).to(device)
    probe.load_state_dict(best)
    probe.eval()
    return torch.cat(
        [probe(xv_t[s : s + EVAL_BATCH_SIZE].to(device)) for s in range(0, len(xv_t), EVAL_BATCH_SIZE)]
    )


@torch.no_grad()
def _evaluate_members(
    units, count: int, xv_t, yv_t, loss_name: str, loss_fn, device, frozen_outputs: dict
) -> dict | None:
    """Each member's mean validation loss and metric (as train._evaluate computes them), and the
    ensemble's (NLL and accuracy of the averaged probabilities, or MSE of the averaged reconstruction)."""
    if xv_t is None:
        return None
    n = xv_t.shape[0]
    totals = [[0.0, 0.0] for _ in range(count)]
    ens_loss = ens_metric = 0.0
    for start in range(0, n, EVAL_BATCH_SIZE):
        xb = xv_t[start : start + EVAL_BATCH_SIZE].to(device)
        yb = yv_t[start : start + EVAL_BATCH_SIZE].to(device) if yv_t is not None else None
        target = _targets(loss_name, xb, yb)
        batch = xb.shape[0]
        combined = None
        for unit in units:
            outs = unit.outputs(xb)
            for j, k in enumerate(unit.indices):
                out = outs[j] if k not in frozen_outputs else frozen_outputs[k][start : start + batch]
                totals[k][0] += float(loss_fn(out, target)) * batch
                if loss_name == "ce":
                    totals[k][1] += float((out.argmax(dim=1) == target).sum())
                    part = torch.softmax(out.to(torch.float64), dim=1)
                else:
                    totals[k][1] += float(((out - target) ** 2).mean()) * batch
                    part = out.to(torch.float64)
                combined = part if combined is None else combined + part
        combined = combined / count
        if loss_name == "ce":
            picked = combined.gather(1, target.unsqueeze(1)).squeeze(1)
            ens_loss += float(-torch.log(picked.clamp_min(1e-12)).sum())
            ens_metric += float((combined.argmax(dim=1) == target).sum())
        else:
            err = float(((combined - target.to(torch.float64)) ** 2).mean()) * batch
            ens_loss += err
            ens_metric += err
    return {"members": [(a / n, b / n) for a, b in totals], "ensemble": (ens_loss / n, ens_metric / n)}


class _EnsembleStopping:
    """Ensemble-level early stopping on the averaged output's validation loss (strictly lower is better)."""

    def __init__(self, patience: int | None, monitored: str):
        self.patience = patience
        self.monitored = monitored
        self.best_loss = math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.stopped = False
        self.history: list[dict] = []

    @property
    def last(self) -> dict | None:
        return self.history[-1] if self.history else None

    def observe(self, epoch: int, loss: float, metric: float) -> None:
        self.history.append({"epoch": epoch, "val_loss": loss, "val_metric": metric})
        if loss < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = loss, epoch, 0
        else:
            self.bad_epochs += 1
        if self.patience is not None and self.bad_epochs >= self.patience:
            self.stopped = True

    def state(self) -> dict:
        return {
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "stopped": self.stopped,
            "history": list(self.history),
        }

    def restore(self, state: dict) -> None:
        self.best_loss, self.best_epoch = float(state["best_loss"]), int(state["best_epoch"])
        self.bad_epochs, self.stopped = int(state["bad_epochs"]), bool(state["stopped"])
        self.history = list(state["history"])

    def record(self) -> dict:
        return {
            "patience": self.patience,
            "monitored": self.monitored,
            "best_epoch": self.best_epoch,
            "stopped_early": self.stopped,
            "history": self.history,
        }


class _Progress:
    """One progress bar per ensemble, its postfix showing each member's epoch and validation metric."""

    def __init__(self, config: TrainConfig, desc: str, names: list[str], start_epoch: int):
        self.config = config
        self.desc = desc
        self.names = names
        # short labels on the bar: the members' names when the caller gave them ("main", "peer"), else k
        self.labels = [str(k) if name == f"member {k}" else name for k, name in enumerate(names)]
        self.metric = "acc" if config.loss == "ce" else "mse"
        self.bar = None
        if not config.quiet:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=config.max_epochs,
                initial=start_epoch,
                desc=desc,
                unit="epoch",
                leave=False,
                dynamic_ncols=True,
            )

    def update(self, epoch: int, entries: dict, stops, ensemble) -> None:
        parts = []
        for k, stop in enumerate(stops):
            last = stop.history[-1] if stop.history else None
            value = last.get("val_metric", last.get("val_accuracy")) if last else None
            shown = f"{value:.3f}" if value is not None else f"loss {last['train_loss']:.3f}" if last else "-"
            parts.append(f"{self.labels[k]}:e{stop.epoch}{'*' if stop.finished else ''} {shown}")
        if ensemble.last is not None:
            parts.append(f"ens {self.metric} {ensemble.last['val_metric']:.3f}")
        if self.bar is not None:
            self.bar.set_postfix_str(" | ".join(parts), refresh=False)
            self.bar.n = epoch
            self.bar.refresh()
        if self.config.verbose:
            for k, entry in entries.items():
                val = (
                    ""
                    if entry["val_loss"] is None
                    else f" val_loss {entry['val_loss']:.4f} val_{self.metric} {entry['val_metric']:.4f}"
                )
                log.info(
                    "%s: epoch %d train_loss %.4f%s lr %.3g (%.1fs)",
                    self.names[k] if len(self.names) > 1 else self.desc,
                    entry["epoch"],
                    entry["train_loss"],
                    val,
                    entry["lr"],
                    entry["seconds"],
                )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


__all__ = ["EnsembleResult", "grown_unstackable_reason", "stackable", "train_members"]
