"""`codec.compile(model, data, ...)`: the CODE pipeline from a notebook, on the user's network and data.

The model is a `torch.nn.Module` (exported to ONNX with torch.onnx, in eval mode, as is) or the path of an
ONNX file; the data is numpy arrays, torch Datasets, or a dataset spec. Both are written into the run
directory (`model.onnx`, `data.npz`) and the run is exactly `codec compile --model RUN/model.onnx
--data npz:RUN/data.npz -o RUN`: the same checks before training, the same report, resumable with
`resume=True`. With `peer=`, model and peer are two trained members (`--main RUN/main.onnx --peer
RUN/peer.onnx`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codec.errors import ConfigError, DataError
from codec.pipelines.compile import CompileOptions, compile_ensemble
from codec.runtime.training.grow import GrowOptions

log = logging.getLogger("codec.pipelines.api")

_TUPLE_LAYOUT = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")


@dataclass(frozen=True)
class CompileResult:
    """What `codec.compile` returns.

    Attributes:
        report: The run's report (also in `run_dir/report.json`): quality of every member and of the
            ensemble, CSN sizes, memory footprint M, times, loss and notes.
        ensemble: The fused ensemble ONNX file.
        run_dir: The run directory (members, passes' outputs, config, state).
    """

    report: dict
    ensemble: Path
    run_dir: Path

    @property
    def accuracy(self) -> float | None:
        """The ensemble's test accuracy (None for an autoencoder)."""
        return self.report["quality"].get("accuracy")

    def __repr__(self) -> str:
        q = self.report["quality"]
        score = f"accuracy {q['accuracy']:.4f}" if "accuracy" in q else f"mse {q['mse']:.6f}"
        return f"CompileResult({self.report['members']} members, ensemble {score}, {self.ensemble})"


def compile(
    model,
    data,
    members: int = 4,
    out: str | Path = "codec_run",
    *,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    patience: int | None = None,
    optimizer: str | None = None,
    val_fraction: float | None = None,
    loss: str | None = None,
    init: str = "onnx",
    normalize: str | None = None,
    passes: str = "dna,dne,nda,csne",
    calibration: int | None = 10_000,
    criterion: str | None = None,
    keep_main: str = "rewritten",
    grow_init: str = "random",
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    threads: int | None = None,
    device: str | None = None,
    resume: bool = False,
    quiet: bool = True,
    peer=None,
    member_outputs: bool = False,
) -> CompileResult:
    """Compile an ensemble of `members` networks like `model`, trained on `data`.

    Args:
        model: A `torch.nn.Module` (exported with torch.onnx in eval mode; its current weights are main's
            starting point unless `init="random"`) or the path of an ONNX file. It may end in a softmax or
            output logits (then a softmax is appended, with a note); one whose output is as wide as its
            input is trained as an autoencoder (MSE).
        data: One of: a dict of arrays named like an npz (`x_train`, `y_train`, optional `x_val`, `y_val`,
            `x_test`, `y_test`); a tuple `(x_train, y_train[, x_val, y_val[, x_test, y_test]])` (None for
            a pair that is absent); a torch Dataset of `(x, y)` pairs (the training split) or a tuple of
            them `(train[, val[, test]])`; or a dataset spec string (`"mnist_small"`, `"npz:PATH"`, ...).
            Without a test split, 10 % of the training examples are held out as one.
        members: Ensemble size N (at least 2).
        out: The run directory; the ensemble is `out/ensemble.onnx`.
        epochs, lr, batch_size, patience, optimizer, val_fraction: Training settings (defaults: 20
            epochs, Adam 1e-3, batch 128, patience 5, 10 % of the training split for early stopping).
        loss: "ce" or "mse" to override the inference from the output layer.
        init: "onnx" (main starts from the model's weights) or "random".
        normalize: None, "mean-std" (per channel, from the training split) or "MEAN/STD" values.
        passes, calibration, criterion, keep_main, grow_init, seed: As `codec compile`'s options.
        n_train, n_test: Use class-stratified subsets of this many examples.
        threads, device: Torch threads and device for training.
        resume: Continue an interrupted run in `out` (finished members are not trained again).
        quiet: No progress bars.
        peer: A second trained network (module or ONNX path): then `model` and `peer` are main and peer
            as they are (`codec compile --main --peer`: no training of either, straight to the passes).
        member_outputs: The fused graph also outputs each member's own output (`--member-outputs`).

    Returns:
        The `CompileResult`.

    Raises:
        ConfigError, DataError, ShapeError, LiftError: Bad options, data or model, before any training.
    """
    run_dir = Path(out)
    if (run_dir / "config.json").exists() and not resume:
        raise ConfigError(
            f"{run_dir} already holds a run; pass resume=True to continue it, or choose another out"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = _data_spec(data, run_dir, keep=resume)
    if peer is None:
        sources = {"model": str(_model_path(model, run_dir / "model.onnx", spec, keep=resume))}
    else:
        sources = {
            "main": str(_model_path(model, run_dir / "main.onnx", spec, keep=resume)),
            "peer": str(_model_path(peer, run_dir / "peer.onnx", spec, keep=resume)),
        }
    overrides = {
        "max_epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "patience": patience,
        "optimizer": optimizer,
        "val_fraction": val_fraction,
        "n_train": n_train,
        "n_test": n_test,
        "num_threads": threads,
        "device": device,
    }
    options = CompileOptions(
        **sources,
        data=spec,
        members=members,
        seed=seed,
        passes=passes,
        calibration=calibration,
        grow=GrowOptions(init=grow_init),
        keep_main=keep_main,
        criterion=criterion,
        train_overrides={k: v for k, v in overrides.items() if v is not None},
        init=init,
        loss=loss,
        normalize=normalize,
    )
    report = compile_ensemble(options, run_dir, resume=resume, quiet=quiet, member_outputs=member_outputs)
    return CompileResult(report=report, ensemble=Path(report["ensemble"]), run_dir=run_dir)


def _data_spec(data, run_dir: Path, keep: bool) -> str:
    """A dataset spec for `data`: strings pass through, arrays are written to run_dir/data.npz."""
    if isinstance(data, (str, Path)) and not isinstance(data, Path):
        return data
    if isinstance(data, Path):
        return f"npz:{data}"
    arrays = _arrays(data)
    path = (run_dir / "data.npz").resolve()
    if not (keep and path.exists()):
        from codec.io import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return f"npz:{path}"


def _arrays(data) -> dict[str, np.ndarray]:
    if isinstance(data, Mapping):
        unknown = sorted(set(data) - set(_TUPLE_LAYOUT) - {"x", "y", "class_names"})
        if unknown:
            raise DataError(
                f"data has unknown array name(s) {', '.join(unknown)}; use {', '.join(_TUPLE_LAYOUT)}"
            )
        return {k: _numpy(v, k) for k, v in data.items() if v is not None}
    if _is_torch_dataset(data):
        data = (data,)
    if isinstance(data, Sequence) and data and all(d is None or _is_torch_dataset(d) for d in data):
        if len(data) > 3:
            raise DataError(f"data: at most 3 torch Datasets (train, val, test), got {len(data)}")
        arrays = {}
        for split, dataset in zip(("train", "val", "test"), data):
            if dataset is not None:
                arrays[f"x_{split}"], arrays[f"y_{split}"] = _from_torch(dataset, split)
        return arrays
    if isinstance(data, Sequence) and len(data) in (2, 4, 6):
        return {k: _numpy(v, k) for k, v in zip(_TUPLE_LAYOUT, data) if v is not None}
    raise DataError(
        "data must be a dict of arrays, a tuple (x_train, y_train[, x_val, y_val[, x_test, y_test]]), "
        f"a torch Dataset (or a tuple of them) or a dataset spec string; got {type(data).__name__}"
    )


def _numpy(value, name: str) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == object:
        raise DataError(f"data {name}: must be a numeric array, got dtype object")
    return array


def _is_torch_dataset(obj) -> bool:
    try:
        from torch.utils.data import Dataset
    except ImportError:  # pragma: no cover - torch is a dependency
        return False
    return isinstance(obj, Dataset)


def _from_torch(dataset, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Every `(x, y)` item of a map-style torch Dataset, stacked."""
    try:
        n = len(dataset)
    except TypeError:
        raise DataError(f"data ({split}): the torch Dataset has no len(); give a map-style Dataset") from None
    if n == 0:
        raise DataError(f"data ({split}): the torch Dataset is empty")
    xs, ys = [], []
    for i in range(n):
        item = dataset[i]
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise DataError(f"data ({split}): item {i} of the torch Dataset is not an (x, y) pair")
        xs.append(_numpy(item[0], f"x_{split}[{i}]"))
        ys.append(int(_numpy(item[1], f"y_{split}[{i}]")))
    shapes = {x.shape for x in xs}
    if len(shapes) != 1:
        raise DataError(
            f"data ({split}): the torch Dataset's examples have different shapes {sorted(shapes)[:3]}"
        )
    return np.stack(xs), np.asarray(ys, dtype=np.int64)


def _model_path(model, path: Path, spec: str, keep: bool) -> Path:
    """An ONNX path for `model`: paths pass through, modules are exported to `path`."""
    if isinstance(model, (str, Path)):
        return Path(model)
    try:
        from torch import nn
    except ImportError:  # pragma: no cover - torch is a dependency
        nn = None
    if nn is None or not isinstance(model, nn.Module):
        raise ConfigError(f"model must be a torch.nn.Module or an ONNX path, got {type(model).__name__}")
    if keep and path.exists():
        return path
    from codec.runtime.data import load_training_set
    from codec.runtime.training.train import export_onnx

    shape = load_training_set(spec).input_shape
    candidates = [shape] + ([(int(np.prod(shape)),)] if len(shape) > 1 else [])
    failures = []
    for candidate in candidates:
        try:
            # "reconstruction": exported as is (no softmax appended); compile's output rule decides.
            return export_onnx(model, path, candidate, task="reconstruction")
        except Exception as exc:  # noqa: BLE001 - torch.onnx raises many kinds; the message below names them
            failures.append(
                f"{list(candidate)}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            )
    raise ConfigError(
        f"could not export the model with torch.onnx for inputs shaped like the data ({'; '.join(failures)})"
    )
