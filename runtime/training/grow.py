"""Grow: train new ensemble members around the frozen common sub-network (CSN).

A grown member has main's architecture (after DNE). In each hidden layer the first k_l neurons are the
CSN's, frozen and shared (they read only CSN neurons of the layer below, or the input); the remaining
neurons are fresh and trainable and read all of the layer below. The output layer is trainable.

Because CSN neurons depend only on the input and never change, their pre-activations can be computed
once for the whole training set and cached (`cache`): each training step then skips the CSN's forward
pass. The cache is fed to the model as extra input columns, so the ordinary training loop (early
stopping, checkpoints, exact resume) trains grown members unchanged. `train_grown_members` trains several
grown members in one engine run (runtime/training/engine.py) with the cache computed once for all of them,
stacked (`engine._GrownStackedUnit`: one forward and backward per step for all K, the trainable rows as
[K, out - k, in] tensors, the frozen CSN pre-activations read from the cache or, uncached, computed once
per step for all K members' batches). Members the stacked layout cannot compute (DAG members, grouped
convolutions) train as module units; each member's facts say whether it was stacked ("stacked") and, if
not, why ("unstacked_reason").
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from codec.errors import ConfigError
from codec.ir.network import NetworkIR
from codec.runtime.training.torch_ir import IRLayer, IRModule, activation, reinitialise_trainable


@dataclass(frozen=True)
class GrowOptions:
    """How grown members start and train (recorded in report.json).

    Attributes:
        init: "random" (fresh neurons and output layer drawn anew, torch's default scale) or "main"
            (start from main's own non-CSN weights: faster to converge, less diverse).
        lr_scale: multiplies the recipe's learning rate for grown members.
        cache: "auto" (cache CSN activations when they fit in `cache_limit_mb`), "on", or "off".
        cache_limit_mb: the memory budget of the cache under "auto".
    """

    init: Literal["random", "main"] = "random"
    lr_scale: float = 1.0
    cache: Literal["auto", "on", "off"] = "auto"
    cache_limit_mb: int = 1024

    def __post_init__(self) -> None:
        if self.init not in ("random", "main"):
            raise ConfigError(f"grow init={self.init!r}; choose random or main")
        if self.cache not in ("auto", "on", "off"):
            raise ConfigError(f"grow cache={self.cache!r}; choose auto, on or off")
        if not self.lr_scale > 0:
            raise ConfigError(f"grow lr_scale={self.lr_scale} must be positive")

    def to_dict(self) -> dict:
        return asdict(self)


def shared_layers(module: IRModule) -> list[int]:
    """Indices (into module.blocks) of compute layers that hold frozen shared neurons."""
    return [i for i, b in enumerate(module.blocks) if isinstance(b, IRLayer) and b.k]


class CachedCSNModule(nn.Module):
    """Wraps an IRModule whose frozen pre-activations arrive as extra input columns.

    Input: (N, D + sum of cached widths); the first D columns are the flattened example.
    """

    def __init__(self, module: IRModule, cached: list[int], widths: list[int], shapes: list[tuple[int, ...]]):
        super().__init__()
        self.module = module
        self.cached = cached
        self.widths = widths
        self.shapes = shapes
        self.input_size = int(np.prod(module.input_shape))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = z[:, : self.input_size].reshape(z.shape[0], *self.module.input_shape)
        offset = self.input_size
        frozen = {}
        for index, width, shape in zip(self.cached, self.widths, self.shapes):
            frozen[index] = z[:, offset : offset + width].reshape(z.shape[0], *shape)
            offset += width
        h = x
        last = len(self.module.blocks) - 1
        for i, block in enumerate(self.module.blocks):
            if isinstance(block, IRLayer):
                pre = block.pre_activation(h, frozen.get(i))
                if i == last and block.activation == "softmax" and not self.module.probabilities:
                    h = pre
                else:
                    h = activation(block.activation, block.alpha, pre)
            else:
                h = block(h)
        return h


def frozen_preactivations(
    module: IRModule, x: np.ndarray, batch_size: int = 1024
) -> tuple[np.ndarray, list[int], list[int], list[tuple]]:
    """CSN pre-activations of every shared layer for inputs `x`, flattened and concatenated per example."""
    cached = shared_layers(module)
    outs: list[list[np.ndarray]] = [[] for _ in cached]
    shapes: list[tuple] = [()] * len(cached)
    module.eval()
    with torch.no_grad():
        for start in range(0, len(x), batch_size):
            h = torch.from_numpy(np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32))
            for i, block in enumerate(module.blocks):
                if isinstance(block, IRLayer):
                    if i in cached:
                        frozen = block.linear(h, block.frozen_weight, block.frozen_bias)
                        j = cached.index(i)
                        outs[j].append(frozen.reshape(frozen.shape[0], -1).numpy())
                        shapes[j] = tuple(frozen.shape[1:])
                        if i == cached[-1]:
                            break
                    h = block(h)
                else:
                    h = block(h)
    arrays = [np.concatenate(o) for o in outs]
    return np.concatenate(arrays, axis=1), cached, [a.shape[1] for a in arrays], shapes


def cache_bytes(module: IRModule, n: int) -> int:
    """Bytes a CSN cache for n examples would take (float32)."""
    probe = np.zeros((1, *module.input_shape), np.float32)
    flat, *_ = frozen_preactivations(module, probe)
    return int(flat.shape[1]) * 4 * n


def build_grown(template: NetworkIR, seed: int, options: GrowOptions) -> IRModule:
    """A fresh member around the CSN: `template` is main rewritten by CSNE (frozen neurons first)."""
    module = IRModule(template)
    if options.init == "random":
        reinitialise_trainable(module, seed)
    return module


def train_grown(
    template: NetworkIR,
    x_train: np.ndarray,
    y_train,
    x_val,
    y_val,
    config,
    *,
    seed: int,
    options: GrowOptions = GrowOptions(),
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    desc: str = "grown",
) -> tuple[NetworkIR, object, dict]:
    """Train one grown member; returns (its NetworkIR, the TrainResult, facts for the report)."""
    (grown,) = train_grown_members(
        template,
        x_train,
        y_train,
        x_val,
        y_val,
        config,
        seeds=[seed],
        shuffle_seeds=[config.seed],
        options=options,
        checkpoint_path=checkpoint_path,
        resume=resume,
        names=[desc],
    )
    return grown


def train_grown_members(
    template: NetworkIR,
    x_train: np.ndarray,
    y_train,
    x_val,
    y_val,
    config,
    *,
    seeds: list[int],
    shuffle_seeds: list[int] | None = None,
    options: GrowOptions = GrowOptions(),
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    names: list[str] | None = None,
    stack: bool = True,
) -> list[tuple[NetworkIR, object, dict]]:
    """Train grown members together (one engine run, one checkpoint): member k is built with ``seeds[k]``
    and shuffled with ``shuffle_seeds[k]`` (default: the same seed). The CSN cache is computed once for all
    of them (the CSN is the same in every member). With `stack` (the default) the engine trains them as one
    stacked unit when their layout allows (`engine.grown_unstackable_reason`); ``stack=False`` forces one
    module unit per member (the reference path, e.g. to measure stacking).

    Returns:
        Per member: (its NetworkIR, its TrainResult, facts for the report).
    """
    from codec.runtime.training.engine import grown_unstackable_reason, train_members

    names = [f"grown {k}" for k in range(len(seeds))] if names is None else list(names)
    modules = [build_grown(template, seed, options) for seed in seeds]
    first = modules[0]
    frozen = sum(
        int(b.frozen_weight.numel() + b.frozen_bias.numel()) for b in first.blocks if isinstance(b, IRLayer)
    )
    # Autoencoders reconstruct their input: the training loop takes the (augmented) input as the target,
    # so they train without the cache.
    # The cached forward below walks the layers as a chain: a DAG member (residual Adds) trains uncached.
    use_cache = (
        bool(shared_layers(first))
        and first.is_chain
        and config.loss != "mse"
        and (
            options.cache == "on"
            or (
                options.cache == "auto"
                and cache_bytes(first, len(x_train) + (0 if x_val is None else len(x_val)))
                <= options.cache_limit_mb * 2**20
            )
        )
    )
    facts = [
        {
            "trainable_parameters": m.trainable_parameters(),
            "frozen_parameters": frozen,
            "csn_cache": use_cache,
        }
        for m in modules
    ]
    common = {
        "seeds": seeds if shuffle_seeds is None else shuffle_seeds,
        "checkpoint_path": checkpoint_path,
        "resume": resume,
        "names": names,
        "desc": "+".join(names),
        "stack": stack,
    }
    if use_cache:
        flat, cached, widths, shapes = frozen_preactivations(first, x_train)
        z_train = np.concatenate([x_train.reshape(len(x_train), -1).astype(np.float32), flat], axis=1)
        z_val = None
        if x_val is not None and len(x_val):
            flat_val, *_ = frozen_preactivations(first, x_val)
            z_val = np.concatenate([x_val.reshape(len(x_val), -1).astype(np.float32), flat_val], axis=1)
        wrapped = [CachedCSNModule(m, cached, widths, shapes) for m in modules]
        run = train_members(wrapped, z_train, y_train, z_val, y_val, config, **common)
        for fact in facts:
            fact["csn_cache_mb"] = round(flat.nbytes / 2**20, 2)
    else:
        run = train_members(modules, x_train, y_train, x_val, y_val, config, **common)
    reason = grown_unstackable_reason(wrapped[0] if use_cache else first)
    for k, fact in enumerate(facts):
        fact["ensemble_stopping"] = {
            key: run.ensemble[key] for key in ("patience", "monitored", "best_epoch", "stopped_early")
        }
        fact["stacked"] = k in run.stacked
        if len(modules) > 1 and not fact["stacked"]:
            # why this member trained as its own module unit (engine.grown_unstackable_reason)
            fact["unstacked_reason"] = reason if stack else "stacking switched off (stack=False)"
    return [
        (m.to_network(name), result, fact)
        for m, result, name, fact in zip(modules, run.members, names, facts)
    ]
