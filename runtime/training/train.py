"""Training one ensemble member with torch: its configuration, data checks, checkpoint format, export to ONNX.

`train_member` trains one member: it is the K = 1 call of the one training loop, `train_members` in
runtime/training/engine.py (independent, grown and coupled members all train there). Adam or SGD, optional
per-epoch LR decay, early stopping on validation loss with the best weights restored, and a checkpoint
written atomically at every epoch end. A run killed at any point and resumed from its checkpoint ends with
exactly the weights an uninterrupted run would have (same seed, CPU), because the checkpoint holds every
piece of state the next epoch reads: weights, optimizer and scheduler state, the best weights so far, the
patience counter, the global torch RNG (dropout) and the shuffling generator. What this module keeps for
the engine: `TrainConfig`, the data checks, `EarlyStopping`, and the checkpoint format
(`CHECKPOINT_FORMAT`; `tensor_checksum`, a sha256 of the tensor bytes, is written into every checkpoint
and verified by `load_checkpoint`, so a corrupted copy is refused instead of loaded).

Checkpoints are read with ``torch.load(weights_only=True)`` only: they hold tensors and plain python
values (the history is stored as a JSON string), never pickled objects, so a checkpoint from elsewhere
cannot run code when loaded.

`export_onnx` writes a member as a single-file ONNX model with a dynamic batch dimension; classifiers get
a Softmax appended so every codec member outputs probabilities. `codec.pipelines.train.train_recipe`
ties data, model zoo, training and export together for one named recipe.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from codec.errors import ConfigError, DataError, ModelLoadError, ShapeError, first_line
from codec.io import atomic_path, regular_file

log = logging.getLogger(__name__)

OPTIMIZERS = ("adam", "sgd")
LOSSES = ("ce", "mse")
DEVICES = ("auto", "cpu", "cuda")

# Bump when the checkpoint layout changes, so an old checkpoint is refused with a clear message instead of
# failing on a missing key halfway through loading. Format 2 adds the sha256 of the tensor bytes
# (`CHECKSUM_KEY`) and the multi-member layout of runtime/training/engine.py.
CHECKPOINT_FORMAT = 2
CHECKSUM_KEY = "tensor_sha256"

# The data subset and validation split of a recipe do not depend on the member's seed: every member of an
# ensemble must see the same training data and be scored on the same validation and test examples, so
# members differ only by their initialisation and shuffling.
DATA_SEED = 0

# Examples per forward pass when evaluating (no gradients, so larger than a training batch is cheap).
EVAL_BATCH_SIZE = 1024

# The configuration fields that decide the trajectory of training. A checkpoint written under different
# values cannot be continued (max_epochs and patience may change: they only decide when to stop).
_TRAJECTORY_FIELDS = ("optimizer", "lr", "momentum", "weight_decay", "batch_size", "lr_decay", "loss", "seed")


@dataclass
class TrainConfig:
    """How to train one member. The first group of fields are a recipe's ``train`` dict keys.

    Attributes:
        optimizer: "adam" or "sgd" (SGD uses `momentum`).
        lr: learning rate, > 0.
        momentum: SGD momentum in [0, 1); ignored by Adam.
        weight_decay: L2 penalty, >= 0 (the optimizer's own weight_decay).
        batch_size: training examples per step, >= 1.
        max_epochs: upper bound on epochs, >= 1.
        patience: epochs without a validation-loss improvement before stopping; None never stops early.
        ensemble_patience: when members train together (runtime/training/engine.py), stop them all once the
            ensemble's validation loss (NLL of the averaged probabilities, or MSE of the averaged output)
            has not improved for this many epochs; None (the default) never stops the ensemble as a whole.
        lr_decay: per-epoch multiplicative LR factor in (0, 1]; None (or 1.0) keeps the LR constant.
        val_fraction: share of the training set held out for validation, in [0, 1).
        loss: "ce" (cross-entropy on logits, targets are labels) or "mse" (targets are the flattened
            inputs: autoencoders).
        n_train: train on a subset of this many examples (None = all).
        n_test: evaluate on a subset of this many test examples (None = all).
        seed: seeds the global RNGs (dropout) and the batch-shuffling generator.
        device: "auto" (CUDA when available, else CPU), "cpu" or "cuda".
        quiet: no progress bar.
        num_threads: torch intra-op threads while training; None keeps torch's default.
        verbose: log one line per epoch (at INFO level).
    """

    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    weight_decay: float = 0.0
    batch_size: int = 128
    max_epochs: int = 20
    patience: int | None = 5
    ensemble_patience: int | None = None
    lr_decay: float | None = None
    val_fraction: float = 0.1
    loss: str = "ce"
    n_train: int | None = None
    n_test: int | None = None
    seed: int = 0
    device: str = "auto"
    quiet: bool = False
    num_threads: int | None = None
    verbose: bool = False

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_recipe(cls, recipe, **overrides) -> TrainConfig:
        """The configuration of a recipe's ``train`` dict, with `overrides` applied on top.

        Overrides whose value is None are ignored, so CLI options left unset keep the recipe's values.

        Raises:
            ConfigError: an override or recipe key that is not a TrainConfig field, or a bad value.
        """
        names = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        recipe_name = getattr(recipe, "name", "?")
        for key, value in dict(getattr(recipe, "train", {}) or {}).items():
            if key not in names:
                raise ConfigError(f"recipe {recipe_name!r} has an unknown train option {key!r}")
            values[key] = value
        for key, value in overrides.items():
            if key not in names:
                known = ", ".join(sorted(names))
                raise ConfigError(f"unknown training option {key!r}; known options: {known}")
            if value is not None:
                values[key] = value
        return cls(**values)

    def validate(self) -> None:
        """Raise ConfigError (one line) for any value training cannot use."""
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        if self.device not in DEVICES:
            raise ConfigError(f"unknown device {self.device!r}; choose one of {', '.join(DEVICES)}")
        if not _is_number(self.lr) or not self.lr > 0 or not math.isfinite(self.lr):
            raise ConfigError(f"lr must be a positive number, got {self.lr!r}")
        if not _is_number(self.momentum) or not 0 <= self.momentum < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not _is_number(self.weight_decay) or not self.weight_decay >= 0:
            raise ConfigError(f"weight_decay must be >= 0, got {self.weight_decay!r}")
        if self.lr_decay is not None and (not _is_number(self.lr_decay) or not 0 < self.lr_decay <= 1):
            raise ConfigError(f"lr_decay must be in (0, 1] (or None), got {self.lr_decay!r}")
        if not _is_number(self.val_fraction) or not 0 <= self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction!r}")
        for name in ("batch_size", "max_epochs"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("patience", "ensemble_patience", "n_train", "n_test", "num_threads"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ConfigError(f"{name} must be a positive integer (or None), got {value!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, got {self.seed!r}")

    def to_dict(self) -> dict:
        """The configuration as a plain (JSON-serialisable) dict."""
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What `train_member` returns.

    Attributes:
        module: the trained module, holding the best epoch's weights (or the last epoch's without
            validation data).
        history: one dict per epoch run: epoch (1-based), train_loss, val_loss, val_metric (accuracy for
            "ce", MSE for "mse"; None without validation data), lr (used during the epoch), seconds.
        best_epoch: the epoch whose weights `module` holds.
        epochs_run: epochs completed, including those of an interrupted run this one resumed.
        train_seconds: training wall-clock time, summed over the interrupted and resumed runs.
        stopped_early: True when patience ran out before max_epochs.
    """

    module: nn.Module
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    epochs_run: int = 0
    train_seconds: float = 0.0
    stopped_early: bool = False

    @property
    def best(self) -> dict | None:
        """The history entry of the best epoch (None before any epoch ran)."""
        for entry in self.history:
            if entry["epoch"] == self.best_epoch:
                return entry
        return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for `name`: "auto" is CUDA when available, else CPU.

    Raises:
        ConfigError: an unknown name, or "cuda" on a machine without a usable GPU.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                "device 'cuda' was asked for but torch sees no CUDA GPU; use --device cpu or auto"
            )
        return torch.device("cuda")
    raise ConfigError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), python's `random` and numpy's global RNG, and ask for deterministic
    algorithms so that the same seed gives bit-identical training on CPU.

    Deterministic mode warns rather than fails for the few CUDA ops without a deterministic version:
    exact reproducibility is promised on CPU only.
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


# --------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------


def _as_tensor(array, name: str, dtype: torch.dtype) -> torch.Tensor:
    try:
        arr = np.asarray(array)
    except ValueError as exc:
        raise DataError(f"{name} is not a rectangular array: {exc}") from None
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_):
        raise DataError(f"{name} must be numeric, got dtype {arr.dtype}")
    return torch.from_numpy(np.ascontiguousarray(arr)).to(dtype)


def _check_training_data(x, y, x_val, y_val, loss: str) -> tuple:
    """Validate the arrays and turn them into CPU tensors (x float32, y int64 or None)."""
    pairs = {"training": (x, y), "validation": (x_val, y_val)}
    tensors = {}
    for split, (xs, ys) in pairs.items():
        if xs is None:
            tensors[split] = (None, None)
            continue
        x_t = _as_tensor(xs, f"{split} inputs", torch.float32)
        if x_t.ndim < 2:
            raise ShapeError(f"{split} inputs must have shape (examples, ...), got {tuple(x_t.shape)}")
        if x_t.shape[0] == 0:
            if split == "training":
                raise DataError("the training set is empty")
            tensors[split] = (None, None)
            continue
        if not torch.isfinite(x_t).all():
            bad = int((~torch.isfinite(x_t)).sum())
            raise DataError(f"{split} inputs contain {bad} NaN or infinite value(s)")
        y_t = None
        if loss == "ce":
            if ys is None:
                raise DataError(f"{split} labels are missing (the 'ce' loss needs labels)")
            y_arr = np.asarray(ys)
            if y_arr.ndim != 1 or len(y_arr) != len(x_t):
                raise ShapeError(
                    f"{split} labels have shape {y_arr.shape} but there are {len(x_t)} examples"
                    f" (want ({len(x_t)},))"
                )
            integral = np.issubdtype(y_arr.dtype, np.integer) or (
                np.issubdtype(y_arr.dtype, np.floating) and np.all(y_arr == np.round(y_arr))
            )
            if not integral:
                raise DataError(f"{split} labels must be integer class indices, got dtype {y_arr.dtype}")
            y_t = torch.from_numpy(y_arr.astype(np.int64))
            if int(y_t.min()) < 0:
                raise DataError(f"{split} labels must be >= 0, got min {int(y_t.min())}")
        tensors[split] = (x_t, y_t)
    train_shape = tuple(tensors["training"][0].shape[1:])
    if tensors["validation"][0] is not None and tuple(tensors["validation"][0].shape[1:]) != train_shape:
        raise ShapeError(
            f"validation examples have shape {tuple(tensors['validation'][0].shape[1:])}"
            f" but training examples have {train_shape}"
        )
    return (*tensors["training"], *tensors["validation"])


def _targets(loss: str, xb: torch.Tensor, yb: torch.Tensor | None) -> torch.Tensor:
    # Autoencoders reconstruct their own input, flattened to match the (N, D) reconstruction.
    return yb if loss == "ce" else xb.reshape(xb.shape[0], -1)


def _default_loss(loss: str) -> Callable:
    return nn.CrossEntropyLoss() if loss == "ce" else nn.MSELoss()


def _make_optimizer(module: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the module has no trainable parameters")
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _make_scheduler(optimizer, config: TrainConfig):
    if config.lr_decay is None or config.lr_decay == 1.0:
        return None
    return torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=float(config.lr_decay))


def _state_copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _fingerprint(config: TrainConfig, module: nn.Module, n_train: int) -> dict:
    shapes = {k: list(v.shape) for k, v in module.state_dict().items()}
    return {
        "config": {name: getattr(config, name) for name in _TRAJECTORY_FIELDS},
        "n_train": n_train,
        "shapes": json.dumps(shapes, sort_keys=True),
    }


def tensor_checksum(state) -> str:
    """sha256 over every tensor in `state` (nested dicts, lists and tuples): its key path, dtype, shape and
    bytes, in sorted-key order.

    Only tensors are hashed: they are what a flipped bit or a truncated copy silently changes (weights,
    optimizer moments, RNG states), while a damaged plain value (an epoch, a JSON history) already fails
    loudly where it is read.
    """
    digest = hashlib.sha256()

    def visit(prefix: str, value) -> None:
        if isinstance(value, torch.Tensor):
            data = value.detach().to("cpu").contiguous()
            if data.dtype == torch.bool:
                data = data.to(torch.uint8)
            digest.update(f"{prefix}|{data.dtype}|{tuple(data.shape)}|".encode())
            digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                if prefix or key != CHECKSUM_KEY:
                    visit(f"{prefix}/{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                visit(f"{prefix}[{i}]", item)

    visit("", state)
    return digest.hexdigest()


def _save_checkpoint(path: Path, state: dict) -> None:
    state = {**state, CHECKSUM_KEY: tensor_checksum(state)}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a training checkpoint safely (``weights_only=True``: tensors and plain values only) and verify
    the sha256 of its tensor bytes.

    Raises:
        ModelLoadError: the file is unreadable, not a codec checkpoint, of another format version, or its
            tensors do not match the checksum written with them (a corrupted copy).
    """
    path = Path(path)
    if path.exists():
        regular_file(path, "checkpoint", ModelLoadError)  # a FIFO would block torch.load
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelLoadError(f"checkpoint {path} does not exist") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt or unsafe files
        raise ModelLoadError(f"cannot read checkpoint {path}: {first_line(exc)}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ModelLoadError(f"{path} is not a codec training checkpoint (format {CHECKPOINT_FORMAT})")
    if state.get(CHECKSUM_KEY) != tensor_checksum(state):
        raise ModelLoadError(
            f"checkpoint {path} is corrupted: its tensors do not match the sha256 written with them;"
            " delete it or do not resume"
        )
    return state


@dataclass
class EarlyStopping:
    """Where a training run stands between epochs, and what a checkpoint keeps of it.

    Tracks the history, the best epoch's loss and weights, and the patience counter; an epoch is better
    only if its monitored loss is strictly lower. `state` and `restore` are the checkpoint's fields for
    this part of the run, so a resumed run continues exactly where the interrupted one stopped.
    """

    best_state: dict | None
    max_epochs: int
    patience: int | None
    history: list[dict] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    epoch: int = 0
    prior_seconds: float = 0.0
    stopped_early: bool = False
    finished: bool = False

    def new_objective(self) -> None:
        """The monitored loss changes meaning (e.g. after pretraining): its old values do not compare."""
        self.best_loss, self.bad_epochs = math.inf, 0

    def observe(
        self, entry: dict, monitored: float, module: nn.Module, *, patience_applies: bool = True
    ) -> None:
        """Record the epoch `entry["epoch"]` whose monitored loss is `monitored` (weights in `module`)."""
        self.observe_state(entry, monitored, lambda: _state_copy(module), patience_applies=patience_applies)

    def observe_state(
        self, entry: dict, monitored: float, weights: Callable[[], dict], *, patience_applies: bool = True
    ) -> None:
        """`observe` for weights that are not one module's: `weights()` returns a CPU copy of them (called
        only when the epoch is the best so far)."""
        if monitored < self.best_loss:
            self.best_loss, self.best_epoch, self.bad_epochs = monitored, entry["epoch"], 0
            self.best_state = weights()
        else:
            self.bad_epochs += 1
        stop = patience_applies and self.patience is not None and self.bad_epochs >= self.patience
        self.follow(entry, self.best_epoch, stop)

    def follow(self, entry: dict, best_epoch: int, stopped_early: bool) -> None:
        """Record an epoch whose outcome was decided elsewhere (by rank 0, in a distributed run)."""
        self.epoch, self.best_epoch, self.stopped_early = entry["epoch"], best_epoch, stopped_early
        self.history.append(entry)
        self.finished = stopped_early or self.epoch >= self.max_epochs

    def state(self, train_seconds: float) -> dict:
        return {
            "best_model": self.best_state,
            "best_loss": self.best_loss,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "epoch": self.epoch,
            "history": json.dumps(self.history),
            "train_seconds": train_seconds,
            "stopped_early": self.stopped_early,
            "finished": self.finished,
        }

    def restore(self, state: dict) -> None:
        self.best_state = state["best_model"]
        self.best_loss, self.best_epoch = float(state["best_loss"]), int(state["best_epoch"])
        self.bad_epochs, self.epoch = int(state["bad_epochs"]), int(state["epoch"])
        self.history = json.loads(state["history"])
        self.prior_seconds = float(state["train_seconds"])
        self.stopped_early = bool(state["stopped_early"])
        # a run that finished under fewer max_epochs continues when resumed with more
        self.finished = bool(state["finished"]) and (self.stopped_early or self.epoch >= self.max_epochs)


def train_member(
    module: nn.Module,
    x_train,
    y_train,
    x_val,
    y_val,
    config: TrainConfig,
    *,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    loss_fn: Callable | None = None,
    desc: str = "member",
    on_epoch_end: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train `module` in place and return it with the best validation epoch's weights.

    Each epoch shuffles the training set with a CPU `torch.Generator` seeded from ``config.seed`` and
    steps through it in batches of ``config.batch_size``; then the validation loss decides early stopping
    (an epoch is better only if its loss is strictly lower). Without validation data (``x_val`` None or
    empty) the training loss is monitored instead.

    Args:
        module: the network; outputs logits (loss "ce") or (N, D) reconstructions (loss "mse").
        x_train: (N, ...) float inputs.
        y_train: (N,) integer labels; may be None for "mse".
        x_val: validation inputs, or None.
        y_val: validation labels, or None.
        config: the training configuration.
        checkpoint_path: where to write the checkpoint at every epoch end (atomically); None for none.
        resume: continue from `checkpoint_path` when it exists (start afresh when it does not).
        loss_fn: ``loss_fn(outputs, targets) -> scalar tensor`` replacing the default of ``config.loss``
            (targets are still labels for "ce" and flattened inputs for "mse").
        desc: label of the progress bar and log lines.
        on_epoch_end: called as ``on_epoch_end(epoch, history_entry)`` after each epoch's checkpoint is
            written; an exception raised there stops training (the checkpoint stays resumable).

    Returns:
        The TrainResult.

    Raises:
        DataError: bad arrays (NaN/inf, empty, wrong labels) or a non-finite loss (names epoch and batch).
        ConfigError: a checkpoint written under a different trajectory-deciding configuration.
    """
    # The K = 1 case of the engine: one loop, one checkpoint format, one progress bar for every member.
    from codec.runtime.training.engine import train_members

    callback = None
    if on_epoch_end is not None:

        def callback(epoch: int, record: dict) -> None:
            on_epoch_end(epoch, record["members"][0])

    result = train_members(
        [module],
        x_train,
        y_train,
        x_val,
        y_val,
        config,
        seeds=[config.seed],
        checkpoint_path=checkpoint_path,
        resume=resume,
        loss_fn=loss_fn,
        names=[desc],
        desc=desc,
        on_epoch_end=callback,
    )
    return result.members[0]


def _check_fingerprint(saved: dict, current: dict, path: Path) -> None:
    if saved.get("shapes") != current["shapes"]:
        raise ConfigError(
            f"checkpoint {path} was written for a different network; delete it or do not resume"
        )
    if saved.get("n_train") != current["n_train"]:
        raise ConfigError(
            f"checkpoint {path} was written for {saved.get('n_train')} training examples,"
            f" not {current['n_train']}; delete it or do not resume"
        )
    changed = [
        f"{name} {saved['config'].get(name)!r} -> {value!r}"
        for name, value in current["config"].items()
        if saved["config"].get(name) != value
    ]
    if changed:
        raise ConfigError(
            f"checkpoint {path} was written with other training options ({'; '.join(changed)});"
            " delete it or do not resume"
        )


@torch.no_grad()
def _check_outputs(module, x_t, y_t, loss: str, device) -> None:
    """Refuse, before training, a network whose outputs cannot meet the targets (one clear line instead
    of a broadcasting warning or an index error deep inside the loss)."""
    was_training = module.training
    module.eval()  # eval mode: dropout draws no random numbers and batch norm keeps its statistics
    try:
        xb = x_t[:2].to(device)
        out = module(xb)
    finally:
        module.train(was_training)
    target = _targets(loss, xb, None if y_t is None else y_t[:2])
    if loss == "mse":
        if tuple(out.shape) != tuple(target.shape):
            raise ShapeError(
                f"the network outputs shape {tuple(out.shape[1:])} per example but reconstructing the input "
                f"needs {tuple(target.shape[1:])}"
            )
        return
    if out.ndim != 2:
        raise ShapeError(f"a classifier must output (examples, classes) logits, got shape {tuple(out.shape)}")
    top = int(y_t.max())
    if top >= out.shape[1]:
        raise DataError(f"labels go up to {top} but the network has only {out.shape[1]} outputs (classes)")


# --------------------------------------------------------------------------------------------------------
# Inference and export
# --------------------------------------------------------------------------------------------------------


@torch.no_grad()
def predict_torch(module: nn.Module, x, batch_size: int = 512) -> np.ndarray:
    """Run `module` (in eval mode) over `x` in batches and return its raw outputs as float32 numpy.

    The module's train/eval mode is restored afterwards.
    """
    x_t = _as_tensor(x, "inputs", torch.float32)
    if x_t.shape[0] == 0:
        raise DataError("no inputs to run the model on (empty data)")
    return batched_forward(module, x_t, batch_size).numpy()


@torch.no_grad()
def batched_forward(module: nn.Module, x_t: torch.Tensor, batch_size: int, dim: int = 0) -> torch.Tensor:
    """`module`'s float outputs on `x_t` in eval mode, `batch_size` rows at a time, concatenated along
    `dim` on the CPU (the batch axis: 0 for a member, 1 for a TreeNet's (M, N, K)); train mode restored."""
    try:
        device = next(module.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    was_training = module.training
    module.eval()
    try:
        parts = [
            module(x_t[s : s + batch_size].to(device)).float().cpu() for s in range(0, len(x_t), batch_size)
        ]
    finally:
        module.train(was_training)
    return torch.cat(parts, dim=dim)


def export_onnx(
    module: nn.Module, path: str | os.PathLike, input_shape, *, task: str = "classification"
) -> Path:
    """Export `module` to a single-file ONNX model (opset 18, dynamic batch), written atomically.

    The graph has one input named "input", of shape (batch, *input_shape), and one output named "output".
    A classifier's module outputs logits; the exported graph appends a Softmax so it outputs
    probabilities, which is what codec's ensemble criteria combine. A reconstruction model is exported
    as is. The module itself is not changed (a CPU copy in eval mode is exported).

    Args:
        module: the trained network.
        path: where to write the .onnx file.
        input_shape: the shape of one example, without the batch dimension (e.g. (1, 28, 28) or (784,)).
        task: "classification" or "reconstruction".

    Returns:
        The path written.
    """
    if task not in ("classification", "reconstruction"):
        raise ConfigError(f"unknown task {task!r}; choose classification or reconstruction")
    path = Path(path)
    input_shape = tuple(int(d) for d in input_shape)
    export = copy.deepcopy(module).to("cpu").eval()
    if task == "classification":
        export = nn.Sequential(export, nn.Softmax(dim=-1)).eval()
    # Batch 2, not 1: the exporter specialises a dimension of size 1 and would refuse to make it dynamic.
    example = torch.zeros((2, *input_shape), dtype=torch.float32)
    batch = torch.export.Dim("batch", min=1)
    exporter_loggers = [
        logging.getLogger(name)
        for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")
    ]
    levels = [logger.level for logger in exporter_loggers]
    try:
        # The exporter prints progress to stdout and warns about things irrelevant to codec's networks
        # (missing torchvision ops, deprecated pytree APIs); keep them out of codec's output.
        for logger in exporter_loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                export,
                (example,),
                input_names=["input"],
                output_names=["output"],
                dynamic_shapes=({0: batch},),
                dynamo=True,
                external_data=False,
                opset_version=18,
                verbose=False,
            )
            with atomic_path(path) as tmp:
                program.save(tmp, external_data=False)
    finally:
        for logger, level in zip(exporter_loggers, levels):
            logger.setLevel(level)
    return path


__all__ = [
    "DATA_SEED",
    "EarlyStopping",
    "TrainConfig",
    "TrainResult",
    "export_onnx",
    "load_checkpoint",
    "predict_torch",
    "resolve_device",
    "seed_everything",
    "train_member",
]
