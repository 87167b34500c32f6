"""Datasets: the standard image sets and user `.npz` files, loaded as float32 arrays in [0, 1].

`load_dataset(spec)` is the one entry point. Specs:

- `mnist`, `fashion_mnist`: the IDX `.gz` files, looked up under the data directory in torchvision's
  layout (`MNIST/raw/`, `FashionMNIST/raw/`) or plainly (`mnist/`, `fashion_mnist/`, and for MNIST the
  data directory itself); MNIST also accepts a keras-style `mnist.npz`. Downloaded when missing.
- `cifar10`: the *binary* CIFAR-10 release (`cifar-10-batches-bin/*.bin`), downloaded as
  `cifar-10-binary.tar.gz` when missing. The python (pickle) release is never read: codec does not
  unpickle downloaded files.
- `cifar10_jpeg`: a local JPEG-q75 copy of CIFAR-10 (`cifar10_jpeg_train8k.npz`, `cifar10_jpeg_test.npz`).
- `mnist_small`: 5,000 + 1,000 MNIST images bundled inside the package; needs no data directory.
- `npz:PATH`: user data (PATH as given, relative to the working directory) with arrays
  `x_train, y_train, x_test, y_test` and optionally `class_names`.

Images come out NCHW (`(N, 1, 28, 28)`, `(N, 3, 32, 32)`); tabular user data stays `(N, D)`.

Downloads are verified against the canonical files' checksums (`CHECKSUMS`), written atomically (a
failed or mismatching download leaves nothing behind), and tar archives are extracted member by member
after refusing absolute paths, `..` and links. `mirrors=` or the `CODEC_DATA_MIRROR` environment variable
replace the canonical URLs, e.g. for an offline mirror or a test server.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.client
import importlib.resources
import logging
import os
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from codec.errors import ConfigError, DataError
from codec.io import atomic_path

log = logging.getLogger(__name__)

DATA_DIR_ENV = "CODEC_DATA_DIR"
MIRROR_ENV = "CODEC_DATA_MIRROR"
DEFAULT_DATA_DIR = Path("~/.cache/codec/data")

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The four IDX files of MNIST and Fashion-MNIST (same names for both), by role.
_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

_CIFAR_ARCHIVE = "cifar-10-binary.tar.gz"
_CIFAR_DIR = "cifar-10-batches-bin"
_CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST_BATCH = "test_batch.bin"
_CIFAR_RECORD = 1 + 3 * 32 * 32  # one label byte, then the R, G and B planes

_JPEG_TRAIN = "cifar10_jpeg_train8k.npz"
_JPEG_TEST = "cifar10_jpeg_test.npz"


@dataclass(frozen=True)
class DatasetInfo:
    """What codec knows about a named dataset: for `--help`, error messages and downloads.

    Attributes:
        spec: How to name it on the command line (`mnist`, `npz:PATH`).
        description: One line for `--help`.
        class_names: The class names, empty when they come from the data (user npz).
        urls: Canonical base URLs, tried in order; empty when codec never downloads it.
        files: The files fetched from each base URL.
        download_subdir: Where under the data directory downloads go.
    """

    spec: str
    description: str
    class_names: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    files: tuple[str, ...] = ()
    download_subdir: str = ""


DATASETS: dict[str, DatasetInfo] = {
    "mnist": DatasetInfo(
        spec="mnist",
        description="MNIST digits, 60,000 + 10,000 grey 28x28 images, 10 classes (LeCun, Cortes, Burges)",
        class_names=MNIST_CLASSES,
        urls=("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        files=tuple(f"{name}.gz" for name in _IDX_FILES.values()),
        download_subdir="MNIST/raw",
    ),
    "fashion_mnist": DatasetInfo(
        spec="fashion_mnist",
        description="Fashion-MNIST, 60,000 + 10,000 grey 28x28 images of clothes, 10 classes (Zalando)",
        class_names=FASHION_MNIST_CLASSES,
        urls=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files=tuple(f"{name}.gz" for name in _IDX_FILES.values()),
        download_subdir="FashionMNIST/raw",
    ),
    "cifar10": DatasetInfo(
        spec="cifar10",
        description="CIFAR-10, 50,000 + 10,000 colour 32x32 images, 10 classes (binary release)",
        class_names=CIFAR10_CLASSES,
        urls=("https://www.cs.toronto.edu/~kriz/",),
        files=(_CIFAR_ARCHIVE,),
    ),
    "cifar10_jpeg": DatasetInfo(
        spec="cifar10_jpeg",
        description=(
            f"CIFAR-10 (JPEG q75 copy), local files {_JPEG_TRAIN} (8,000) and {_JPEG_TEST} (10,000); "
            "never downloaded"
        ),
        class_names=CIFAR10_CLASSES,
    ),
    "mnist_small": DatasetInfo(
        spec="mnist_small",
        description="5,000 + 1,000 MNIST images bundled with codec (stratified, seed 0); no download",
        class_names=MNIST_CLASSES,
    ),
    "npz": DatasetInfo(
        spec="npz:PATH",
        description=(
            "your own data: an .npz with x_train, y_train, x_test, y_test (optional class_names); "
            "uint8 images are scaled by 1/255, NHWC images become NCHW"
        ),
    ),
}

# Checksums of the canonical files ("algorithm:hexdigest"), the same values torchvision checks.
# Only downloads are verified: files a user put in place by hand may be re-gzipped copies.
CHECKSUMS: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "md5:d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "md5:9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "md5:ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte.gz": "md5:8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "md5:25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "md5:bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "md5:bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {
        _CIFAR_ARCHIVE: "md5:c32a1d4ab5d03f1284b67883e8d87530",
    },
}


# ---------------------------------------------------------------------------------------------------
# The dataset container
# ---------------------------------------------------------------------------------------------------


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
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]

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
            f"{name}: label {int(np.argmax(y))} is {high}, out of range for {num_classes} classes (0..{num_classes - 1})"
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


def default_data_dir() -> Path:
    """`$CODEC_DATA_DIR`, else `~/.cache/codec/data`."""
    return Path(os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR).expanduser()


def known_specs() -> str:
    """The dataset specs, comma-separated, for messages."""
    return ", ".join(info.spec for info in DATASETS.values())


def load_dataset(
    spec: str,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    mirrors: Mapping[str, Sequence[str] | str] | None = None,
) -> Dataset:
    """Load a dataset by spec (see the module docstring for the specs and file layouts).

    Args:
        spec: `mnist`, `fashion_mnist`, `cifar10`, `cifar10_jpeg`, `mnist_small` or `npz:PATH`.
        data_dir: Where the standard datasets live; default `$CODEC_DATA_DIR` or `~/.cache/codec/data`.
        download: Fetch missing files from the canonical sources (checksum-verified).
        mirrors: Dataset name -> base URLs that replace the canonical ones (files are fetched from
            `<base>/<file name>`). Without it, `$CODEC_DATA_MIRROR` (a base URL) replaces them with
            `<base>/<dataset name>/<file name>`.

    Returns:
        The `Dataset`.

    Raises:
        ConfigError: An unknown spec.
        DataError: Missing, unreadable or malformed files, a failed download or a checksum mismatch.
    """
    spec = str(spec).strip()
    if spec.startswith("npz:"):
        path = spec[len("npz:") :]
        if not path:
            raise ConfigError("npz: needs a path, e.g. npz:data/my_set.npz")
        return _load_user_npz(Path(path).expanduser(), name=spec)
    name = spec.lower().replace("-", "_")
    if name not in DATASETS or name == "npz":
        raise ConfigError(f"unknown dataset {spec!r}; known: {known_specs()}")
    if name == "mnist_small":
        return _load_bundled_mnist_small()
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name in ("mnist", "fashion_mnist"):
        return _load_idx_dataset(name, root, download, mirrors)
    if name == "cifar10":
        return _load_cifar10(root, download, mirrors)
    return _load_cifar10_jpeg(root)


def _load_user_npz(path: Path, name: str) -> Dataset:
    arrays = _read_npz(path, ("x_train", "y_train", "x_test", "y_test"), optional=("class_names",))
    return _dataset_from_arrays(name, arrays, class_names=None, source=path)


def _dataset_from_arrays(
    name: str, arrays: Mapping[str, np.ndarray], class_names: Sequence[str] | None, source: Path | str
) -> Dataset:
    """Build a `Dataset` from raw arrays: scale uint8, make images NCHW, infer the classes."""
    x_train = _to_float_nchw(arrays["x_train"], f"{source}: x_train")
    x_test = _to_float_nchw(arrays["x_test"], f"{source}: x_test")
    y_train, y_test = arrays["y_train"], arrays["y_test"]
    # Validate the labels before taking their maximum, so bad labels get the precise message.
    validate_arrays(x_train, y_train, name=f"{source}: train")
    validate_arrays(x_test, y_test, name=f"{source}: test")
    if class_names is None and "class_names" in arrays:
        stored = arrays["class_names"]
        if stored.ndim != 1 or stored.dtype.kind not in "US":
            raise DataError(
                f"{source}: class_names must be a 1-D array of strings, got {stored.dtype} {stored.shape}"
            )
        class_names = [str(c) for c in stored]
    if class_names is None:
        num_classes = int(max(np.max(y_train), np.max(y_test))) + 1
        class_names = [str(c) for c in range(num_classes)]
    return Dataset(
        name=name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=len(class_names),
        class_names=tuple(class_names),
    )


def _to_float_nchw(x: np.ndarray, what: str) -> np.ndarray:
    """uint8 pixels -> [0, 1]; `(N, H, W)` -> `(N, 1, H, W)`; `(N, H, W, C)` with C in {1, 3} -> NCHW."""
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{what}: must be numeric, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim == 4 and x.shape[-1] in (1, 3) and x.shape[1] not in (1, 3):
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    if x.dtype == np.uint8:
        out = x.astype(np.float32)
        out /= 255.0
        return out
    return x.astype(np.float32, copy=False)


def _read_npz(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Read named arrays from an .npz without ever unpickling; every failure is a one-line DataError."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: is a single .npy array, not an .npz archive of named arrays")
        with loaded as npz:
            missing = [k for k in required if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path}: missing array(s) {', '.join(missing)}; it has {', '.join(npz.files) or 'none'} "
                    f"(expected {', '.join(required)})"
                )
            return {k: npz[k] for k in (*required, *optional) if k in npz.files}
    except DataError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"{path}: cannot read as .npz: {_one_line(exc)}") from exc


def _load_bundled_mnist_small() -> Dataset:
    resource = importlib.resources.files("codec") / "data" / "mnist_small.npz"
    with importlib.resources.as_file(resource) as path:
        if not Path(path).is_file():
            raise DataError(
                "the bundled mnist_small.npz is missing from this codec installation; reinstall codec"
            )
        arrays = _read_npz(Path(path), ("x_train", "y_train", "x_test", "y_test"))
    return _dataset_from_arrays("mnist_small", arrays, class_names=MNIST_CLASSES, source="mnist_small.npz")


# --- MNIST and Fashion-MNIST (IDX) -----------------------------------------------------------------


def _idx_search_dirs(name: str, root: Path) -> list[Path]:
    if name == "mnist":
        return [root / "MNIST" / "raw", root / "mnist", root]
    # The data directory itself is MNIST's; accepting it for Fashion-MNIST too would load one as the other.
    return [root / "FashionMNIST" / "raw", root / "fashion_mnist", root / "fashion-mnist"]


def _find_idx_set(directory: Path) -> dict[str, Path] | None:
    """The four IDX files in `directory` (gzipped or not), or None unless all four are there."""
    found = {}
    for role, base in _IDX_FILES.items():
        for candidate in (directory / f"{base}.gz", directory / base):
            if candidate.is_file():
                found[role] = candidate
                break
        else:
            return None
    return found


def read_idx(path: str | os.PathLike, expect_magic: int | None = None) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped or not), checking its header strictly.

    Args:
        path: The file.
        expect_magic: 2051 for images (3 dimensions), 2049 for labels (1 dimension); None accepts any
            unsigned-byte IDX file.

    Returns:
        A read-only uint8 array shaped by the header's dimensions.

    Raises:
        DataError: Naming the file, when it is not IDX, has the wrong magic, or is truncated or too long.
    """
    path = Path(path)
    raw = _read_maybe_gzip(path)
    if len(raw) < 4:
        raise DataError(f"{path}: truncated IDX file: {len(raw)} bytes, shorter than the 4-byte magic")
    magic = int.from_bytes(raw[:4], "big")
    if raw[0:2] != b"\x00\x00" or raw[2] != 0x08 or raw[3] == 0:
        raise DataError(f"{path}: not an unsigned-byte IDX file (magic {magic:#010x})")
    if expect_magic is not None and magic != expect_magic:
        raise DataError(f"{path}: IDX magic is {magic}, expected {expect_magic}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"{path}: truncated IDX file: {len(raw)} bytes, shorter than its {header}-byte header"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    found = len(raw) - header
    if found != expected:
        problem = "truncated IDX file" if found < expected else "IDX file has trailing bytes"
        raise DataError(f"{path}: {problem}: header says {dims} = {expected} bytes of data, found {found}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _read_maybe_gzip(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {_one_line(exc)}") from exc
    if data[:2] != b"\x1f\x8b":
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: corrupt or truncated gzip file: {_one_line(exc)}") from exc


def _load_idx_dataset(
    name: str, root: Path, download: bool, mirrors: Mapping[str, Sequence[str] | str] | None
) -> Dataset:
    info = DATASETS[name]
    search = _idx_search_dirs(name, root)
    files = next((found for d in search if (found := _find_idx_set(d)) is not None), None)
    if files is None and name == "mnist" and (root / "mnist.npz").is_file():
        arrays = _read_npz(root / "mnist.npz", ("x_train", "y_train", "x_test", "y_test"))
        return _dataset_from_arrays(name, arrays, class_names=info.class_names, source=root / "mnist.npz")
    if files is None:
        target = root / info.download_subdir
        if not download:
            looked = ", ".join(str(d) for d in search) + (
                f", {root / 'mnist.npz'}" if name == "mnist" else ""
            )
            raise DataError(
                f"{name} not found (looked in {looked}); put {', '.join(info.files)} in {target} "
                "or allow downloading"
            )
        for fname in info.files:
            if not (target / fname).is_file():
                fetch_file(name, fname, target, mirrors)
        files = _find_idx_set(target)
        assert files is not None  # all four were just written
    for path in files.values():
        _refuse_other_dataset(name, path)

    arrays = {}
    for split in ("train", "test"):
        images = read_idx(files[f"{split}_images"], expect_magic=_IDX_IMAGES_MAGIC)
        labels = read_idx(files[f"{split}_labels"], expect_magic=_IDX_LABELS_MAGIC)
        if images.shape[1:] != (28, 28):
            raise DataError(f"{files[f'{split}_images']}: images are {images.shape[1:]}, expected 28x28")
        if len(images) != len(labels):
            raise DataError(
                f"{files[f'{split}_images']}: {len(images)} images but {files[f'{split}_labels'].name} "
                f"has {len(labels)} labels"
            )
        arrays[f"x_{split}"], arrays[f"y_{split}"] = images, labels
    return _dataset_from_arrays(
        name, arrays, class_names=info.class_names, source=files["train_images"].parent
    )


def _refuse_other_dataset(name: str, path: Path) -> None:
    """Refuse a canonical file of the *other* IDX dataset (MNIST and Fashion-MNIST share file names)."""
    if path.suffix != ".gz":
        return
    digest = f"md5:{_file_digest(path, 'md5')}"
    for other, table in CHECKSUMS.items():
        if other != name and digest in table.values():
            raise DataError(
                f"{path}: this is the canonical {other} file, not {name}; move it to its own folder"
            )


# --- CIFAR-10 (binary release) ---------------------------------------------------------------------


def _load_cifar10(root: Path, download: bool, mirrors: Mapping[str, Sequence[str] | str] | None) -> Dataset:
    batch_dir = root / _CIFAR_DIR
    needed = (*_CIFAR_TRAIN_BATCHES, _CIFAR_TEST_BATCH)
    if not all((batch_dir / f).is_file() for f in needed):
        archive = root / _CIFAR_ARCHIVE
        if not archive.is_file():
            if not download:
                raise DataError(
                    f"cifar10 not found: no {batch_dir} and no {archive}; put {_CIFAR_ARCHIVE} (the binary "
                    "version) in that folder or allow downloading"
                )
            fetch_file("cifar10", _CIFAR_ARCHIVE, root, mirrors)
        extract_tar_safely(archive, root, only=_CIFAR_DIR)
        missing = [f for f in needed if not (batch_dir / f).is_file()]
        if missing:
            raise DataError(
                f"{archive}: has no {', '.join(missing)} under {_CIFAR_DIR}/; is it the binary version?"
            )
    train = [_read_cifar_batch(batch_dir / f) for f in _CIFAR_TRAIN_BATCHES]
    x_test, y_test = _read_cifar_batch(batch_dir / _CIFAR_TEST_BATCH)
    arrays = {
        "x_train": np.concatenate([x for x, _ in train]),
        "y_train": np.concatenate([y for _, y in train]),
        "x_test": x_test,
        "y_test": y_test,
    }
    return _dataset_from_arrays("cifar10", arrays, class_names=CIFAR10_CLASSES, source=batch_dir)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes, row-major)."""
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        raise DataError(f"{path}: cannot read: {_one_line(exc)}") from exc
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DataError(
            f"{path}: not a CIFAR-10 binary batch: {raw.size} bytes is not a whole number of "
            f"{_CIFAR_RECORD}-byte records (truncated?)"
        )
    records = raw.reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    if labels.max() >= 10:
        raise DataError(f"{path}: label {int(labels.max())} in record {int(labels.argmax())}, expected 0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _load_cifar10_jpeg(root: Path) -> Dataset:
    for directory in (root, root / "cifar10_jpeg"):
        if (directory / _JPEG_TRAIN).is_file() and (directory / _JPEG_TEST).is_file():
            train = _read_npz(directory / _JPEG_TRAIN, ("x", "y"))
            test = _read_npz(directory / _JPEG_TEST, ("x", "y"))
            arrays = {"x_train": train["x"], "y_train": train["y"], "x_test": test["x"], "y_test": test["y"]}
            return _dataset_from_arrays("cifar10_jpeg", arrays, class_names=CIFAR10_CLASSES, source=directory)
    raise DataError(
        f"cifar10_jpeg needs {_JPEG_TRAIN} and {_JPEG_TEST} in {root}; it is a local copy and is never "
        "downloaded (use cifar10 for the original)"
    )


# ---------------------------------------------------------------------------------------------------
# Downloading and extracting
# ---------------------------------------------------------------------------------------------------


def dataset_urls(
    name: str, filename: str, mirrors: Mapping[str, Sequence[str] | str] | None = None
) -> list[str]:
    """The URLs `filename` of dataset `name` is fetched from, in order.

    `mirrors[name]` (base URLs) wins, then `$CODEC_DATA_MIRROR` (`<base>/<name>/<filename>`), then the
    canonical sources.
    """
    if mirrors and name in mirrors:
        bases = mirrors[name]
        bases = [bases] if isinstance(bases, str) else list(bases)
    elif os.environ.get(MIRROR_ENV):
        bases = [os.environ[MIRROR_ENV].rstrip("/") + f"/{name}/"]
    else:
        bases = list(DATASETS[name].urls)
    if not bases:
        raise ConfigError(f"no URLs to download {name} from")
    return [base.rstrip("/") + "/" + filename for base in bases]


def fetch_file(
    name: str, filename: str, directory: Path, mirrors: Mapping[str, Sequence[str] | str] | None = None
) -> Path:
    """Download one file of dataset `name` into `directory`, verified against `CHECKSUMS`.

    Each URL from `dataset_urls` is tried in turn. The file appears only complete and verified; a
    failed, interrupted or mismatching download leaves nothing behind.

    Returns:
        The downloaded file's path.

    Raises:
        DataError: Every URL failed (the message names each URL, why, and where to put the file by hand).
        ConfigError: No checksum is known for the file.
    """
    expected = CHECKSUMS.get(name, {}).get(filename)
    if expected is None:
        raise ConfigError(f"no checksum known for {name} file {filename}; refusing to download it unverified")
    dest = Path(directory) / filename
    failures = []
    for url in dataset_urls(name, filename, mirrors):
        try:
            _download(url, dest, expected)
            return dest
        except _DownloadFailed as exc:
            log.warning("download of %s failed: %s", url, exc)
            failures.append(f"{url} failed ({exc})")
    raise DataError(
        f"cannot download {name}: {'; '.join(failures)}; download {filename} by hand and put it in {dest.parent}"
    )


class _DownloadFailed(Exception):
    """One URL did not give the expected file; the next URL may."""


def _download(url: str, dest: Path, expected: str) -> None:
    from tqdm import tqdm

    algorithm, _, want = expected.partition(":")
    scheme = urllib.parse.urlsplit(url).scheme
    if scheme not in ("http", "https", "file"):
        raise _DownloadFailed(f"unsupported URL scheme {scheme!r}")
    log.info("downloading %s -> %s", url, dest)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(dest) as tmp:
            digest = hashlib.new(algorithm)
            size = response.headers.get("Content-Length")
            total = int(size) if size and size.isdigit() else None
            received = 0
            with (
                open(tmp, "wb") as out,
                tqdm(
                    total=total,
                    unit="B",
                    unit_scale=True,
                    desc=dest.name,
                    leave=False,
                    disable=None,  # only on a terminal
                ) as bar,
            ):
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                    received += len(chunk)
            # read(n) returns b"" when the server hangs up early rather than raising, so count.
            if total is not None and received != total:
                raise _DownloadFailed(f"connection closed after {received} of {total} bytes")
            got = digest.hexdigest()
            if got != want:
                # Raised inside atomic_path, so the bad file is removed rather than renamed into place.
                raise _DownloadFailed(f"checksum mismatch: {algorithm} {got}, expected {want}")
    except _DownloadFailed:
        raise
    except urllib.error.HTTPError as exc:
        raise _DownloadFailed(f"HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise _DownloadFailed(_one_line(exc.reason)) from exc
    except (OSError, http.client.HTTPException, ValueError) as exc:
        raise _DownloadFailed(f"{type(exc).__name__}: {_one_line(exc)}") from exc


def extract_tar_safely(
    archive: str | os.PathLike, dest: str | os.PathLike, only: str | None = None
) -> list[Path]:
    """Extract a tar archive, refusing it whole if any member could escape `dest`.

    Refused: absolute paths, `..` components, and anything but regular files and directories (links,
    devices, fifos). Files are written into a temporary folder inside `dest` and then renamed into place
    one by one, so a failed extraction leaves no partial files.

    Args:
        archive: The tar file (any compression tarfile reads).
        dest: The folder to extract into.
        only: When given, only members under this top-level folder are extracted.

    Returns:
        The extracted files.

    Raises:
        DataError: An unsafe member, or an unreadable archive (naming the archive).
    """
    archive, dest = Path(archive), Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            wanted = []
            for member in members:
                parts = _safe_member_parts(member, archive)
                if member.isfile() and (only is None or (parts and parts[0] == only)):
                    wanted.append((member, parts))
            with tempfile.TemporaryDirectory(prefix=".extract-", dir=dest) as tmp:
                staged = []
                for member, parts in wanted:
                    out = Path(tmp).joinpath(*parts)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    source = tar.extractfile(member)
                    assert source is not None  # regular files always have data
                    with source, open(out, "wb") as f:
                        shutil.copyfileobj(source, f)
                    staged.append((out, dest.joinpath(*parts)))
                for out, final in staged:
                    final.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(out, final)
                    written.append(final)
    except DataError:
        raise
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{archive}: cannot extract: {_one_line(exc)}") from exc
    return written


def _safe_member_parts(member: tarfile.TarInfo, archive: Path) -> tuple[str, ...]:
    name = member.name
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DataError(f"{archive}: unsafe member {name!r} (absolute path); refusing to extract")
    parts = tuple(p for p in PurePosixPath(name.replace("\\", "/")).parts if p not in ("", "."))
    if ".." in parts:
        raise DataError(f"{archive}: unsafe member {name!r} (goes up with '..'); refusing to extract")
    if not (member.isfile() or member.isdir()):
        raise DataError(f"{archive}: unsafe member {name!r} (a link or special file); refusing to extract")
    return parts


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _one_line(exc: object) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
