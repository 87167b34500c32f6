"""The data a pipeline runs on: a recipe's train/validation/test split, and a named dataset split.

`load_recipe_data` is the one place where a recipe's data is prepared: the dataset, its n_train/n_test
subsets and its validation split, both drawn with `DATA_SEED` so that every member of an ensemble, every
arm of a benchmark and every rerun sees the same examples. (torch is imported only when a recipe's data is
loaded.) `codec train`, `codec train-ensemble`,
`codec compile` and `codec bench` all use it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from codec.errors import ConfigError, ShapeError


@dataclass(frozen=True)
class RecipeData:
    """A recipe's data, split for training.

    Labels (`y_*`) are None when the recipe reconstructs its input: its target is the input itself (see
    `target`). `x_val`/`y_val` are None when the recipe has no validation split (`val_fraction` 0).
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray | None
    x_val: np.ndarray | None
    y_val: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    input_shape: tuple[int, ...]
    num_outputs: int  # classes for a classifier, flattened input values for an autoencoder
    class_names: tuple[str, ...]
    classify: bool
    notes: tuple[str, ...] = ()  # how the splits were assembled when not plain (a held-out test split, ...)
    normalization: dict | None = (
        None  # the per-channel normalisation applied to every split (Normalization.to_dict)
    )

    @property
    def n_val(self) -> int:
        return 0 if self.x_val is None else len(self.x_val)

    def target(self, split: str) -> np.ndarray:
        """What a member's output is scored against on `split` ("val" or "test"): labels or the inputs."""
        x, y = (self.x_val, self.y_val) if split == "val" else (self.x_test, self.y_test)
        return y if self.classify else x.reshape(len(x), -1)


def load_recipe_data(
    recipe, config, data_dir: str | os.PathLike | None = None, *, need_validation: bool = False
) -> RecipeData:
    """Load `recipe`'s dataset and cut it as `config` (a TrainConfig) says.

    Args:
        recipe: a `codec.models.Recipe`.
        config: the TrainConfig giving n_train, n_test and val_fraction.
        data_dir: where datasets live (None: the loader's default).
        need_validation: refuse a config without a validation split (the benchmark selects on it).

    Raises:
        ConfigError: `need_validation` and no validation split.
    """
    from codec.runtime.data import load_dataset

    dataset = load_dataset(recipe.dataset, data_dir=data_dir)
    if config.val_fraction <= 0 and need_validation:
        raise ConfigError(
            f"recipe {recipe.name!r}: the benchmark needs a validation split (val_fraction > 0)"
        )
    return split_for_training(dataset, recipe.task, config)


def split_for_training(dataset, task: str, config, *, normalize=None) -> RecipeData:
    """Cut a loaded `Dataset` for training as `config` says, optionally normalised.

    The n_train/n_test subsets and the validation split are drawn with `DATA_SEED`; a validation split the
    data brings (`dataset.x_val`, user data) is used as it is instead. `normalize` is None, "mean-std"
    (per channel, fitted on the training examples after subsetting and without the validation split) or
    a `codec.runtime.data.Normalization`; it is applied to every split and recorded in the result.
    """
    from codec.runtime.data import Normalization
    from codec.runtime.training.train import DATA_SEED  # imported here: it pulls in torch

    if config.n_train is not None or config.n_test is not None:
        dataset = dataset.subset(config.n_train, config.n_test, seed=DATA_SEED)
    if dataset.x_val is not None:
        train, x_val, y_val = dataset, dataset.x_val, dataset.y_val
    elif config.val_fraction > 0:
        train, (x_val, y_val) = dataset.split_validation(config.val_fraction, seed=DATA_SEED)
    else:
        train, x_val, y_val = dataset, None, None
    x_train, x_test = train.x_train, dataset.x_test
    if normalize is not None:
        normalize = Normalization.fit(x_train) if normalize == "mean-std" else normalize
        x_train, x_val, x_test = normalize.apply(x_train), normalize.apply(x_val), normalize.apply(x_test)
    classify = task == "classification"
    shape = tuple(dataset.input_shape)
    return RecipeData(
        name=dataset.name,
        x_train=x_train,
        y_train=train.y_train if classify else None,
        x_val=x_val,
        y_val=y_val if classify else None,
        x_test=x_test,
        y_test=dataset.y_test if classify else None,
        input_shape=shape,
        num_outputs=dataset.num_classes if classify else int(np.prod(shape)),
        class_names=tuple(dataset.class_names),
        classify=classify,
        notes=tuple(dataset.notes),
        normalization=None if normalize is None else normalize.to_dict(),
    )


def fit_data_to(data: RecipeData, input_shape: tuple[int, ...], what: str) -> RecipeData:
    """`data` with every split reshaped to a model's input shape when only the layout differs.

    Raises:
        ShapeError: the example sizes differ (names both shapes).
    """
    import dataclasses

    if tuple(data.input_shape) == tuple(input_shape):
        return data
    if int(np.prod(data.input_shape)) != int(np.prod(input_shape)):
        raise ShapeError(
            f"{data.name} examples have shape {list(data.input_shape)} but {what} expects {list(input_shape)}"
        )
    reshaped = {
        split: None if getattr(data, split) is None else getattr(data, split).reshape((-1, *input_shape))
        for split in ("x_train", "x_val", "x_test")
    }
    return dataclasses.replace(data, input_shape=tuple(input_shape), **reshaped)


def load_split(
    data: str, *, data_dir: str | os.PathLike | None = None, split: str = "test", limit: int | None = None
) -> tuple[np.ndarray, np.ndarray, object]:
    """(x, y, dataset) for one split of a named dataset, its first `limit` examples when given.

    Raises:
        ShapeError: a `limit` below 1.
    """
    from codec.runtime.data import load_dataset

    dataset = load_dataset(data, data_dir=data_dir)
    x, y = (dataset.x_train, dataset.y_train) if split == "train" else (dataset.x_test, dataset.y_test)
    if limit is not None:
        if limit < 1:
            raise ShapeError(f"--limit must be positive, got {limit}")
        x, y = x[:limit], y[:limit]
    return x, y, dataset


def fit_to_model(x: np.ndarray, input_shape: tuple[int, ...], model: str = "the model") -> np.ndarray:
    """Examples reshaped to a model's per-example input shape by the one input-adaptation rule
    (`codec.runtime.execution.inputs`): (N, 1, 28, 28) data becomes (N, 784) for a model whose input is
    (784,), and the reverse.

    Raises:
        ShapeError: examples that cannot take that shape; the message names `model` and both shapes.
    """
    from codec.runtime.execution.inputs import fit_shape

    return fit_shape(x, tuple(input_shape), model)
