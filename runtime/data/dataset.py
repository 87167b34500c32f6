"""The `Dataset` container: arrays in [0, 1], splits, subsets, batches and validation."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from codec.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A train/test split held in memory.

    Construction converts `x_*` to float32 and `y_*` to int64 and validates everything (no NaN/inf,
    labels in `[0, num_classes)`, matching lengths and example shapes), so a `Dataset` is always usable.

    Attributes:
        name: The spec it was loaded from (`mnist`, `npz:data.npz`).
        x_train: float32, `(N, C, H, W)` for images or `(N, D)`; loaders scale pixels to [0, 1].
        y_train: int64 class indices, `(N,)`.
        x_test: Like `x_train`.
        y_test: Like `y_train`.
        num_classes: Number of classes; every label is below it.
        class_names: One name per class.
        x_val: A validation split the user gave (user data only), or None: then training holds one out
            of `x_train`.
        y_val: Its labels (given exactly when `x_val` is).
        notes: How the splits were assembled when that is not plain (a held-out test split, one array
            pair serving every split), one line each, for the run's output and report.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = tuple(str(c) for c in self.class_names)
        if int(self.num_classes) < 1 or len(names) != int(self.num_classes):
            raise DataError(
                f"{self.name}: {len(names)} class name(s) for num_classes={self.num_classes}; they must match"
            )
        object.__setattr__(self, "num_classes", int(self.num_classes))
        object.__setattr__(self, "class_names", names)
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            validate_arrays(x, y, self.num_classes, name=f"{self.name} {split}")
            object.__setattr__(self, f"x_{split}", np.asarray(x, dtype=np.float32))
            object.__setattr__(self, f"y_{split}", np.asarray(y).astype(np.int64, copy=False))
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise DataError(
                f"{self.name}: train examples have shape {self.x_train.shape[1:]} but test examples "
                f"{self.x_test.shape[1:]}"
            )
        if (self.x_val is None) != (self.y_val is None):
            raise DataError(f"{self.name}: a validation split needs both x_val and y_val")
        if self.x_val is not None:
            validate_arrays(self.x_val, self.y_val, self.num_classes, name=f"{self.name} val")
            object.__setattr__(self, "x_val", np.asarray(self.x_val, dtype=np.float32))
            object.__setattr__(self, "y_val", np.asarray(self.y_val).astype(np.int64, copy=False))
            if self.x_val.shape[1:] != self.x_train.shape[1:]:
                raise DataError(
                    f"{self.name}: train examples have shape {self.x_train.shape[1:]} but validation "
                    "examples "
                    f"{self.x_val.shape[1:]}"
                )
        object.__setattr__(self, "notes", tuple(str(n) for n in self.notes))

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. `(1, 28, 28)`."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def subset(self, n_train: int | None = None, n_test: int | None = None, seed: int = 0) -> Dataset:
        """A class-stratified random subset, reproducible from `seed`.

        Each class keeps its share of the examples (largest-remainder rounding); the chosen examples
        stay in their original order. Train and test are drawn from independent streams of `seed`, so
        changing `n_test` does not change the training examples.

        Args:
            n_train: Training examples to keep; None (or more than there are) keeps all of them.
            n_test: Test examples to keep; None (or more than there are) keeps all of them.
            seed: Seed of the selection.

        Returns:
            A new `Dataset` with the same name and classes.

        Raises:
            ConfigError: A count below 1.
        """
        train_idx = _subset_indices(self.y_train, n_train, seed, _STREAM_TRAIN, "n_train")
        test_idx = _subset_indices(self.y_test, n_test, seed, _STREAM_TEST, "n_test")
        return dataclasses.replace(
            self,
            x_train=self.x_train if train_idx is None else self.x_train[train_idx],
            y_train=self.y_train if train_idx is None else self.y_train[train_idx],
            x_test=self.x_test if test_idx is None else self.x_test[test_idx],
            y_test=self.y_test if test_idx is None else self.y_test[test_idx],
        )

    def split_validation(
        self, fraction: float = 0.1, seed: int = 0
    ) -> tuple[Dataset, tuple[np.ndarray, np.ndarray]]:
        """Hold out a class-stratified validation set from the training examples.

        Args:
            fraction: Share of the training examples to hold out, in (0, 1); rounded, at least one.
            seed: Seed of the selection; the same seed gives the same split.

        Returns:
            `(dataset, (x_val, y_val))`: the dataset keeps the remaining training examples in their
            original order, and the same test set.

        Raises:
            ConfigError: `fraction` outside (0, 1), or too few training examples to split.
        """
        if not 0.0 < float(fraction) < 1.0:
            raise ConfigError(f"validation fraction must be between 0 and 1 (exclusive), got {fraction}")
        n = len(self.y_train)
        if n < 2:
            raise ConfigError(
                f"{self.name}: {n} training example(s) cannot be split into train and validation"
            )
        n_val = min(max(round(fraction * n), 1), n - 1)
        val_idx = stratified_indices(self.y_train, n_val, seed=seed, stream=_STREAM_VALIDATION)
        keep = np.ones(n, dtype=bool)
        keep[val_idx] = False
        rest = dataclasses.replace(self, x_train=self.x_train[keep], y_train=self.y_train[keep])
        return rest, (self.x_train[val_idx], self.y_train[val_idx])


# Independent random streams of one seed, so each selection is reproducible on its own.
_STREAM_TRAIN, _STREAM_TEST, _STREAM_VALIDATION = 0, 1, 2


def stratified_indices(labels: np.ndarray, n: int, seed: int = 0, stream: int = 0) -> np.ndarray:
    """Pick `n` indices so that each class keeps its share of `labels`.

    Class k gets `floor(n * count_k / N)` picks, and the remaining picks go to the classes with the
    largest remainders (ties to the lower class). Within a class, the picks are
    `rng.choice(indices of class k, picks, replace=False)` with `rng = np.random.default_rng([seed, stream])`,
    classes in ascending order. `Dataset.subset` uses stream 0 for train and 1 for test.

    Args:
        labels: 1-D class labels.
        n: How many indices, 0 <= n <= len(labels).
        seed: Seed of the selection.
        stream: Which independent stream of `seed` to draw from.

    Returns:
        The chosen indices, sorted ascending (int64).
    """
    labels = np.asarray(labels)
    total = len(labels)
    if not 0 <= n <= total:
        raise ConfigError(f"cannot pick {n} of {total} examples")
    classes, counts = np.unique(labels, return_counts=True)
    # Integer arithmetic, so the split does not depend on floating-point rounding.
    picks = (n * counts) // total
    remainders = (n * counts) % total
    short = n - int(picks.sum())
    picks[np.argsort(-remainders, kind="stable")[:short]] += 1
    rng = np.random.default_rng([int(seed), int(stream)])
    chosen = [
        rng.choice(np.flatnonzero(labels == cls), size=int(k), replace=False)
        for cls, k in zip(classes, picks)
    ]
    return np.sort(np.concatenate(chosen).astype(np.int64))


def _subset_indices(
    labels: np.ndarray, n: int | None, seed: int, stream: int, what: str
) -> np.ndarray | None:
    if n is None:
        return None
    n = int(n)
    if n < 1:
        raise ConfigError(f"{what} must be at least 1, got {n}")
    if n >= len(labels):
        if n > len(labels):
            log.info("%s=%d is more than the %d examples there are; keeping all", what, n, len(labels))
        return None
    return stratified_indices(labels, n, seed=seed, stream=stream)


# ---------------------------------------------------------------------------------------------------
# Validation and streaming
# ---------------------------------------------------------------------------------------------------


def iter_batches(x: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Yield consecutive slices of `x` of `batch_size` examples (the last may be shorter).

    The slices are views, so streaming a large (or memory-mapped) array copies nothing.

    Raises:
        ConfigError: `batch_size` below 1.
    """
    if int(batch_size) < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    batch_size = int(batch_size)
    for start in range(0, len(x), batch_size):
        yield x[start : start + batch_size]


def validate_arrays(
    x: np.ndarray, y: np.ndarray | None = None, num_classes: int | None = None, name: str = "data"
) -> None:
    """Check that `x` (and `y`) are usable training or evaluation data.

    Args:
        x: Examples, `(N, ...)` with at least two dimensions, numeric.
        y: Optional 1-D integer class labels, one per example.
        num_classes: When given, every label must be below it.
        name: What to call the data in the error message.

    Raises:
        DataError: Empty data, non-numeric or NaN/inf values, labels that are not whole numbers,
            negative or at least `num_classes`, or `x` and `y` of different lengths.
    """
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{name}: x must be numeric, got dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(f"{name}: x must have shape (N, ...) with at least 2 dimensions, got {x.shape}")
    if x.size == 0:
        raise DataError(f"{name}: x is empty (shape {x.shape})")
    if x.dtype.kind == "f":
        _check_finite(x, name)
    if y is None:
        return
    y = np.asarray(y)
    if y.ndim != 1:
        hint = " (one-hot? pass the class indices, e.g. y.argmax(1))" if y.ndim == 2 else ""
        raise DataError(f"{name}: labels must be a 1-D array of class indices, got shape {y.shape}{hint}")
    if len(y) != len(x):
        raise DataError(f"{name}: {len(x)} examples but {len(y)} labels")
    if y.dtype.kind not in "biuf":
        raise DataError(f"{name}: labels must be integers, got dtype {y.dtype}")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(f"{name}: labels must be whole numbers, label {i} is {y[i]}")
    low, high = y.min(), y.max()
    if low < 0:
        raise DataError(f"{name}: label {int(np.argmin(y))} is {low}; labels must be >= 0")
    if num_classes is not None and high >= num_classes:
        raise DataError(
            f"{name}: label {int(np.argmax(y))} is {high}, out of range for {num_classes} classes "
            f"(0..{num_classes - 1})"
        )


def _check_finite(x: np.ndarray, name: str) -> None:
    # Chunked, so checking a large set does not allocate a boolean array as big as the data.
    offset = 0
    for batch in iter_batches(x, 8192):
        finite = np.isfinite(batch)
        if not finite.all():
            bad_rows = ~finite.reshape(len(batch), -1).all(axis=1)
            first = offset + int(np.flatnonzero(bad_rows)[0])
            n_nan = int(np.isnan(x).sum())
            n_inf = int(np.isinf(x).sum())
            kinds = ", ".join(f"{n} {k}" for n, k in ((n_nan, "NaN"), (n_inf, "inf")) if n)
            raise DataError(f"{name}: x has non-finite values ({kinds}), first in example {first}")
        offset += len(batch)


# ---------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------
