"""Named recipes: an architecture, a data set and the training settings of one benchmark, under one name.

A recipe is what `codec train --recipe NAME` and the benchmarks start from. Recipes are frozen (their
option mappings are read-only and hashable) so a recipe can key caches and be written into reports;
`Recipe.with_train(...)` derives a changed copy, `Recipe.to_dict()` gives plain JSON-able data.

Where the hyper-parameters come from. "Checked here" means a short run on the local data
(/work/shared/data: CIFAR-10 JPEG q75 copy, inputs scaled to [0, 1], 1 CPU thread, torch's default
initialisation unless the architecture says otherwise); none of the full-size recipes was trained to
convergence here, so their published optimisers were replaced only where they did not start at all.

- CODE (Trainiti et al., MLSys 2021) names its benchmarks (fully connected classifier and autoencoder on
  MNIST, Fashion-MNIST and CIFAR-10; AlexNet) and the layer structure (four hidden layers of different
  widths; encode1, encode2, code, decode1, decode2 with mirrored widths and input dropout as noise;
  MSE; sigmoid output), but not the widths or optimiser settings. The widths and the Adam settings below
  are choices made here: Adam 1e-3, batch 128, early stopping with patience 5 on a 10 % validation split.
  For the CIFAR-10 MLP, Adam 1e-3 and 5e-4 were checked here (6 epochs, 7,200 images, dropout 0.2): both
  reached 31 % test accuracy; the recipe takes the lower rate.
- AlexNet (Krizhevsky et al. 2012: SGD 1e-2, momentum 0.9, weight decay 5e-4, batch 128). Checked here
  on 4,000 images: that SGD left the loss at 2.30 for 2 epochs; Adam 3e-4 brought it from 2.27 to 1.92
  in 4 epochs (27 % test accuracy). The recipes use Adam 3e-4.
- CIFAR10-Quick (Lee et al. 2015, after Caffe's examples/cifar10: SGD 1e-3, momentum 0.9, weight decay
  4e-3, batch 100, 5,000 iterations, tuned for 0-255 mean-subtracted pixels and Gaussian initialisation).
  Checked here on 8,000 images: that solver left the loss at 2.30 for 4 epochs; SGD 1e-2 reached 35 %
  test accuracy after 5 epochs and Adam 1e-3 46 % (53 % with standardised inputs). The recipes use
  Caffe's batch 100 with Adam 1e-3.
- Network-in-Network (Lin et al. 2014, Caffe model zoo: SGD 0.1, momentum 0.9, weight decay 1e-4, batch
  128). Checked here at width 0.5 on 3,000 images: that SGD left the loss at 2.303 for 3 epochs; with
  Adam 1e-3 (batch 64, 6 epochs) the original network (ReLU after the last 1x1 convolution) reached a
  loss of 2.17 and 21 % test accuracy, and without that last ReLU 1.94 and 25 %. `nin_c` uses Adam 1e-3
  and leaves the last ReLU out (`final_relu=False`; the original layout stays the architecture default).
- VGG-16 without batch normalisation (Simonyan & Zisserman 2015: SGD 1e-2, momentum 0.9, weight decay
  5e-4). Checked here at width 0.25 on 3,000 images, batch 64, 8 epochs: that SGD stayed at 2.302
  throughout; Adam 1e-4 reached 2.03 and Adam 3e-4 1.89. `vgg16_c` uses Adam 3e-4. One full-width
  CIFAR-10 epoch costs ~0.3 GMAC x 3 x 50,000 images: hours on 2 CPU cores, minutes on a GPU.
- The small recipes (`classifier_s`, `autoenc_s`) run in seconds on the bundled `mnist_small` data and
  are what the tests and the README's worked example use; `classifier_cj`, `autoenc_cj` and
  `cifar10_quick_j` are the CIFAR-10 benchmarks that fit this machine (8,000 training images).

`train` keys: optimizer ("adam" | "sgd"), lr, momentum (SGD only), weight_decay (L2, coupled),
batch_size, max_epochs, patience (epochs without validation improvement before stopping), lr_decay
(multiplicative learning-rate factor per epoch, 1.0 = constant), val_fraction (share of the training
set held out for early stopping), loss ("ce" | "mse"), n_train / n_test (use the first N examples;
None = all).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from codec.errors import ConfigError
from codec.ir.criteria import TASKS
from codec.models.zoo import ARCHITECTURES, architecture_options, build_model

TRAIN_KEYS = (
    "optimizer",
    "lr",
    "momentum",
    "weight_decay",
    "batch_size",
    "max_epochs",
    "patience",
    "lr_decay",
    "val_fraction",
    "loss",
    "n_train",
    "n_test",
)
_LOSS_OF_TASK = {"classification": "ce", "reconstruction": "mse"}


def _freeze(value: Any) -> Any:
    """Lists become tuples and mappings FrozenDicts, so a frozen recipe holds no mutable state."""
    if isinstance(value, Mapping):
        return FrozenDict(value)
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


class FrozenDict(dict):
    """A read-only, hashable dict.

    A dict subclass rather than a MappingProxyType so recipes still pass `json.dumps`,
    `dataclasses.asdict`, `copy.deepcopy` and pickling, and `**recipe.train` works as usual.
    """

    __slots__ = ()

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__((key, _freeze(value)) for key, value in dict(*args, **kwargs).items())

    def _read_only(self, *args: Any, **kwargs: Any):
        raise TypeError(f"{type(self).__name__} is read-only; derive a changed copy instead")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _read_only

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(frozenset(self.items()))

    def __reduce__(self):
        return (type(self), (dict(self),))

    def __copy__(self) -> FrozenDict:
        return self

    def __deepcopy__(self, memo: dict) -> FrozenDict:
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict.__repr__(self)})"


def _check_number(
    recipe: str,
    key: str,
    value: Any,
    low: float,
    high: float,
    *,
    integer: bool = False,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    ok = not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
    if ok:
        ok = math.isfinite(value) and (value > low if low_open else value >= low)
        ok = ok and (value < high if high_open else value <= high)
    if not ok:
        kind = "an integer" if integer else "a number"
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ConfigError(f"recipe {recipe!r}: train[{key!r}] must be {kind} in {interval}, got {value!r}")


def _check_train(recipe: str, task: str, train: Mapping[str, Any]) -> None:
    missing = [k for k in TRAIN_KEYS if k not in train]
    extra = sorted(set(train) - set(TRAIN_KEYS))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + (
            [f"unknown {', '.join(extra)}"] if extra else []
        )
        raise ConfigError(
            f"recipe {recipe!r}: train settings {'; '.join(parts)} (keys: {', '.join(TRAIN_KEYS)})"
        )
    if train["optimizer"] not in ("adam", "sgd"):
        raise ConfigError(f"recipe {recipe!r}: optimizer must be 'adam' or 'sgd', got {train['optimizer']!r}")
    if train["loss"] != _LOSS_OF_TASK[task]:
        raise ConfigError(
            f"recipe {recipe!r}: a {task} recipe trains with loss {_LOSS_OF_TASK[task]!r}, got "
            f"{train['loss']!r}"
        )
    inf = math.inf
    _check_number(recipe, "lr", train["lr"], 0, inf, low_open=True)
    _check_number(recipe, "momentum", train["momentum"], 0, 1, high_open=True)
    _check_number(recipe, "weight_decay", train["weight_decay"], 0, inf)
    _check_number(recipe, "batch_size", train["batch_size"], 1, inf, integer=True)
    _check_number(recipe, "max_epochs", train["max_epochs"], 1, inf, integer=True)
    _check_number(recipe, "patience", train["patience"], 1, inf, integer=True)
    _check_number(recipe, "lr_decay", train["lr_decay"], 0, 1, low_open=True)
    _check_number(recipe, "val_fraction", train["val_fraction"], 0, 1, high_open=True)
    for key in ("n_train", "n_test"):
        if train[key] is not None:
            _check_number(recipe, key, train[key], 1, inf, integer=True)


@dataclass(frozen=True)
class Recipe:
    """One benchmark: which network, on which data, trained how.

    Attributes:
        name: the recipe's name, e.g. "classifier_m".
        arch: a key of `codec.models.ARCHITECTURES`.
        dataset: a `codec.runtime.data` spec: "mnist", "fashion_mnist", "cifar10", "cifar10_jpeg",
            "mnist_small".
        task: "classification" (logits, cross-entropy) or "reconstruction" (autoencoder, MSE).
        arch_kwargs: options passed to `build_model` (read-only).
        train: training settings, exactly the keys of `TRAIN_KEYS` (read-only; see the module docstring).
        description: what the recipe is and where its settings come from.
    """

    name: str
    arch: str
    dataset: str
    task: str
    arch_kwargs: Mapping[str, Any]
    train: Mapping[str, Any]
    description: str

    def __post_init__(self):
        object.__setattr__(self, "arch_kwargs", FrozenDict(self.arch_kwargs))
        object.__setattr__(self, "train", FrozenDict(self.train))
        if self.arch not in ARCHITECTURES:
            raise ConfigError(
                f"recipe {self.name!r}: unknown architecture {self.arch!r}; known: {', '.join(ARCHITECTURES)}"
            )
        unknown = sorted(set(self.arch_kwargs) - set(architecture_options(self.arch)))
        if unknown:
            raise ConfigError(
                f"recipe {self.name!r}: {self.arch} has no option {', '.join(map(repr, unknown))}"
            )
        if self.task not in TASKS:
            raise ConfigError(
                f"recipe {self.name!r}: task must be one of {', '.join(TASKS)}, got {self.task!r}"
            )
        if (self.arch == "autoencoder") != (self.task == "reconstruction"):
            raise ConfigError(
                f"recipe {self.name!r}: only the autoencoder does reconstruction (arch {self.arch!r})"
            )
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ConfigError(f"recipe {self.name!r}: dataset must be a non-empty data spec")
        _check_train(self.name, self.task, self.train)

    def build(
        self, input_shape: tuple[int, ...], num_outputs: int, *, width: float = 1.0, seed: int | None = None
    ):
        """`build_model(self.arch, input_shape, num_outputs, width=width, seed=seed, **self.arch_kwargs)`."""
        return build_model(self.arch, input_shape, num_outputs, width=width, seed=seed, **self.arch_kwargs)

    def with_train(self, **changes: Any) -> Recipe:
        """A copy with some training settings changed, e.g. `recipe.with_train(max_epochs=2)`.

        Raises:
            ConfigError: a key that is not a training setting, or a bad value.
        """
        unknown = sorted(set(changes) - set(TRAIN_KEYS))
        if unknown:
            raise ConfigError(
                f"no training setting {', '.join(map(repr, unknown))}; settings: {', '.join(TRAIN_KEYS)}"
            )
        return dataclasses.replace(self, train={**self.train, **changes})

    def to_dict(self) -> dict[str, Any]:
        """Plain dicts, lists and scalars (for JSON reports)."""

        def plain(value: Any) -> Any:
            if isinstance(value, Mapping):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            return value

        return {field.name: plain(getattr(self, field.name)) for field in dataclasses.fields(self)}


def _train(**overrides: Any) -> dict[str, Any]:
    """CODE-style defaults (Adam 1e-3, batch 128, patience 5, 10 % validation) with overrides."""
    settings = {
        "optimizer": "adam",
        "lr": 1e-3,
        "momentum": 0.0,
        "weight_decay": 0.0,
        "batch_size": 128,
        "max_epochs": 50,
        "patience": 5,
        "lr_decay": 1.0,
        "val_fraction": 0.1,
        "loss": "ce",
        "n_train": None,
        "n_test": None,
    }
    settings.update(overrides)
    return settings


_CLASSIFIER_28 = {"hidden": (512, 256, 128, 64)}
_CLASSIFIER_32 = {"hidden": (1024, 512, 256, 128), "dropout": 0.2}
_AUTOENC_28 = {"hidden": (256, 128, 32), "noise": 0.2}
_AUTOENC_32 = {"hidden": (1024, 512, 128), "noise": 0.2}
_ALEXNET_TRAIN = _train(lr=3e-4, max_epochs=40)
_QUICK_TRAIN = _train(batch_size=100, max_epochs=40, lr_decay=0.95)

_ALL = (
    Recipe(
        name="classifier_m",
        arch="classifier",
        dataset="mnist",
        task="classification",
        arch_kwargs=_CLASSIFIER_28,
        train=_train(),
        description="CODE's 4-hidden-layer MLP classifier (784-512-256-128-64-10) on MNIST; widths and Adam "
        "settings chosen here (the paper gives the layer count only).",
    ),
    Recipe(
        name="classifier_f",
        arch="classifier",
        dataset="fashion_mnist",
        task="classification",
        arch_kwargs=_CLASSIFIER_28,
        train=_train(),
        description="CODE's 4-hidden-layer MLP classifier (784-512-256-128-64-10) on Fashion-MNIST.",
    ),
    Recipe(
        name="classifier_c",
        arch="classifier",
        dataset="cifar10",
        task="classification",
        arch_kwargs=_CLASSIFIER_32,
        train=_train(lr=5e-4),
        description="CODE's 4-hidden-layer MLP classifier (3072-1024-512-256-128-10, dropout 0.2) on "
        "CIFAR-10; Adam 5e-4.",
    ),
    Recipe(
        name="classifier_cj",
        arch="classifier",
        dataset="cifar10_jpeg",
        task="classification",
        arch_kwargs=_CLASSIFIER_32,
        train=_train(lr=5e-4),
        description="classifier_c on the local CIFAR-10 (JPEG q75 copy: 8,000 training images, the 10,000 "
        "test images); for benchmarks on this machine.",
    ),
    Recipe(
        name="autoenc_m",
        arch="autoencoder",
        dataset="mnist",
        task="reconstruction",
        arch_kwargs=_AUTOENC_28,
        train=_train(loss="mse"),
        description="CODE's denoising autoencoder (input dropout 0.2; 256-128-32-128-256; sigmoid output; "
        "MSE) on MNIST.",
    ),
    Recipe(
        name="autoenc_f",
        arch="autoencoder",
        dataset="fashion_mnist",
        task="reconstruction",
        arch_kwargs=_AUTOENC_28,
        train=_train(loss="mse"),
        description="CODE's denoising autoencoder (input dropout 0.2; 256-128-32-128-256; sigmoid output; "
        "MSE) on Fashion-MNIST.",
    ),
    Recipe(
        name="autoenc_c",
        arch="autoencoder",
        dataset="cifar10",
        task="reconstruction",
        arch_kwargs=_AUTOENC_32,
        train=_train(loss="mse"),
        description="CODE's denoising autoencoder (input dropout 0.2; 1024-512-128-512-1024; sigmoid output; "
        "MSE) on CIFAR-10.",
    ),
    Recipe(
        name="autoenc_cj",
        arch="autoencoder",
        dataset="cifar10_jpeg",
        task="reconstruction",
        arch_kwargs=_AUTOENC_32,
        train=_train(loss="mse"),
        description="autoenc_c on the local CIFAR-10 (JPEG q75 copy: 8,000 training images, the 10,000 test "
        "images); for benchmarks on this machine.",
    ),
    Recipe(
        name="alexnet_m",
        arch="alexnet",
        dataset="mnist",
        task="classification",
        arch_kwargs={},
        train=_ALEXNET_TRAIN,
        description="CODE's AlexNet, small-input variant (5 convolutions, 3 overlapping max pools, "
        "1024-1024 head with dropout 0.5) on MNIST; Adam 3e-4 (AlexNet's SGD 1e-2 did not start here).",
    ),
    Recipe(
        name="alexnet_c",
        arch="alexnet",
        dataset="cifar10",
        task="classification",
        arch_kwargs={},
        train=_ALEXNET_TRAIN,
        description="CODE's AlexNet, small-input variant on CIFAR-10; Adam 3e-4 (AlexNet's SGD 1e-2 did not "
        "start here).",
    ),
    Recipe(
        name="vgg16_c",
        arch="vgg16",
        dataset="cifar10",
        task="classification",
        arch_kwargs={},
        train=_train(lr=3e-4, max_epochs=60, lr_decay=0.97),
        description="Lee et al.'s VGG-16 (configuration D, no batch norm, He initialisation, 512-512 head "
        "with dropout 0.5) on CIFAR-10; Adam 3e-4 with a 0.97 per-epoch decay (SGD 1e-2 did not start "
        "here). ~0.3 GMAC per image: meant for a GPU.",
    ),
    Recipe(
        name="cifar10_quick",
        arch="cifar10_quick",
        dataset="cifar10",
        task="classification",
        arch_kwargs={},
        train=_QUICK_TRAIN,
        description="Caffe's CIFAR10-Quick as used by Lee et al., on CIFAR-10; Caffe's batch 100 with Adam "
        "1e-3 and a 0.95 per-epoch decay (Caffe's SGD 1e-3 did not start here).",
    ),
    Recipe(
        name="cifar10_quick_j",
        arch="cifar10_quick",
        dataset="cifar10_jpeg",
        task="classification",
        arch_kwargs={},
        train=_QUICK_TRAIN,
        description="cifar10_quick on the local CIFAR-10 (JPEG q75 copy: 8,000 training images, the 10,000 "
        "test images); for benchmarks on this machine.",
    ),
    Recipe(
        name="nin_c",
        arch="nin",
        dataset="cifar10",
        task="classification",
        arch_kwargs={"final_relu": False},
        train=_train(lr=1e-3, max_epochs=60, lr_decay=0.97),
        description="Lee et al.'s Network-in-Network (CIFAR-10 version: 3 mlpconv blocks, dropout 0.5, "
        "global average pooling; no ReLU after the last 1x1 convolution, which trained faster here) on "
        "CIFAR-10; Adam 1e-3 with a 0.97 per-epoch decay (Caffe's SGD 0.1 did not start here). "
        "~0.22 GMAC per image: meant for a GPU.",
    ),
    Recipe(
        name="resnet_cj",
        arch="resnet",
        dataset="cifar10_jpeg",
        task="classification",
        arch_kwargs={"channels": (16, 32, 64), "blocks_per_stage": 1},
        train=_train(max_epochs=30, lr_decay=0.95),
        description="A small ResNet with BatchNorm (stem + 3 stages of one basic block, 16/32/64 channels, "
        "78,042 parameters) on the local CIFAR-10 JPEG copy; Adam 1e-3 with a 0.95 per-epoch decay (chosen "
        "here, not tuned). Its residual blocks are lifted as a DAG; CSNE shares only a leading chain, so "
        "its CSN is empty (see docs/decisions.md).",
    ),
    Recipe(
        name="classifier_s",
        arch="classifier",
        dataset="mnist_small",
        task="classification",
        arch_kwargs={"hidden": (128, 96, 64, 32)},
        train=_train(batch_size=64, max_epochs=15),
        description="Small MLP classifier (784-128-96-64-32-10) on the bundled mnist_small data; trains in "
        "seconds (tests, README example).",
    ),
    Recipe(
        name="resnet_s",
        arch="resnet",
        dataset="mnist_small",
        task="classification",
        arch_kwargs={"channels": (4, 8, 8), "blocks_per_stage": 1},
        train=_train(batch_size=64, max_epochs=3),
        description="A tiny ResNet with BatchNorm (4/8/8 channels) on the bundled mnist_small data: the "
        "residual recipe for tests.",
    ),
    Recipe(
        name="autoenc_s",
        arch="autoencoder",
        dataset="mnist_small",
        task="reconstruction",
        arch_kwargs={"hidden": (64, 32, 16), "noise": 0.2},
        train=_train(batch_size=64, max_epochs=15, loss="mse"),
        description="Small denoising autoencoder (784-64-32-16-32-64-784, input dropout 0.2) on the bundled "
        "mnist_small data; trains in seconds (tests).",
    ),
)

RECIPES: dict[str, Recipe] = {recipe.name: recipe for recipe in _ALL}


def get_recipe(name: str) -> Recipe:
    """The recipe called `name` (case-insensitive; "-" and "_" are the same).

    Raises:
        ConfigError: no recipe has that name (the message lists the known ones).
    """
    key = str(name).strip().lower().replace("-", "_")
    try:
        return RECIPES[key]
    except KeyError:
        raise ConfigError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None


def list_recipes() -> list[Recipe]:
    """Every recipe, in definition order (full-size benchmarks first, then the small ones)."""
    return list(RECIPES.values())
