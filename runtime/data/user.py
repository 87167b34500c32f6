"""The user's own data: `npz:PATH`, `npy:DIR` and `folder:DIR` (ImageFolder layout), and normalisation.

Array layouts (the same names in an `.npz`, or as `<name>.npy` files in a folder for `npy:DIR`):

- `x_train, y_train` (+ optional `x_val, y_val`, `x_test, y_test`, `class_names`): a training set.
  `codec compile` needs this; without `x_test, y_test` it holds out 10 % of the training examples
  (class-stratified, seed 0) as the test split and says so.
- `x, y`: one split, what calibration needs (`codec opt`, `codec profile`, `codec eval`); it serves as
  both the train and the test split.

`folder:DIR` is torchvision's ImageFolder layout: `DIR/<class>/<image>` (one split, like `x, y`), or
`DIR/train/<class>/...` with optional `DIR/val/` and `DIR/test/` beside it. Images are PNG or JPEG (read
with Pillow), all of one size (no resizing: a different size is refused, naming the file); classes are
the subfolder names in sorted order, as ImageFolder numbers them. Grey images stay one channel unless
any image (of any split) has colour, then all are read as RGB.

Values: uint8 pixels are scaled by 1/255 (so images are in [0, 1]); NHWC images become NCHW.
`Normalization` then optionally standardises per channel (axis 1: an image's colour channel, a tabular
example's feature), with statistics from the training split or given by the user.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from codec.errors import ConfigError, DataError, first_line
from codec.io import regular_file
from codec.runtime.data.dataset import Dataset, stratified_indices

log = logging.getLogger(__name__)

USER_PREFIXES = ("npz:", "npy:", "folder:")
SPLIT_KEYS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
SINGLE_KEYS = ("x", "y")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
HELD_OUT_TEST_FRACTION = 0.1
# The selection stream of the held-out test split (Dataset uses 0..2 for its subsets and validation).
_STREAM_HELD_OUT_TEST = 3

_UNREAD = None  # the value of an array named in a file but not read (not one of the layout names)

TRAINING_LAYOUT = "x_train, y_train (optional x_val, y_val, x_test, y_test)"


def is_user_spec(spec: str) -> bool:
    """Whether `spec` names the user's own data (`npz:`, `npy:` or `folder:`)."""
    return str(spec).strip().startswith(USER_PREFIXES)


def read_user_arrays(spec: str) -> tuple[dict[str, np.ndarray], str]:
    """The raw arrays behind a user spec, by layout name, and the source for messages.

    Raises:
        ConfigError: A spec without a path.
        DataError: A missing or unreadable file or folder.
    """
    from codec.runtime.data.formats import _read_npz

    spec = str(spec).strip()
    prefix, _, rest = spec.partition(":")
    if not rest:
        raise ConfigError(
            f"{prefix}: needs a path, e.g. {prefix}:data/my_set{'.npz' if prefix == 'npz' else ''}"
        )
    path = Path(rest).expanduser()
    if prefix == "npz":
        arrays = _read_npz(path, (), optional=(*SPLIT_KEYS, *SINGLE_KEYS, "class_names"))
        # Arrays codec does not read are still named in messages ("it has inputs, labels"), never loaded.
        with np.load(path, allow_pickle=False) as npz:
            names = list(npz.files)
        return {k: arrays.get(k, _UNREAD) for k in names}, str(path)
    if prefix == "npy":
        return _read_npy_dir(path), str(path)
    return _read_image_folder(path), str(path)


def _read_npy_dir(path: Path) -> dict[str, np.ndarray]:
    from codec.runtime.data.formats import _read_npy_files

    if not path.is_dir():
        raise DataError(f"{path}: no such folder (npy:DIR names a folder of x_train.npy, y_train.npy, ...)")
    keys = [k for k in (*SPLIT_KEYS, *SINGLE_KEYS, "class_names") if (path / f"{k}.npy").is_file()]
    return dict(zip(keys, _read_npy_files([path / f"{k}.npy" for k in keys])))


def _class_folders(path: Path) -> list[Path]:
    return sorted(
        (d for d in path.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name
    )


def _read_image_folder(path: Path) -> dict[str, np.ndarray]:
    if not path.is_dir():
        raise DataError(
            f"{path}: no such folder (folder:DIR names an ImageFolder layout: DIR/<class>/<image>)"
        )
    splits = {s: path / s for s in ("train", "val", "test") if (path / s).is_dir()}
    if "train" in splits:
        classes = [d.name for d in _class_folders(splits["train"])]
        found = {split: _image_files(folder, classes) for split, folder in splits.items()}
    else:
        classes = [d.name for d in _class_folders(path)]
        found = {"": _image_files(path, classes)}
    # Every image's size is read from its header before any is decoded, and the whole set is budgeted
    # together, as an .npz's members are: a folder of small files declaring many GB is one line.
    headers = {split: _image_headers(files) for split, (files, _) in found.items()}
    _check_image_budget(path, headers)
    # one colour rule for every split (a grey test set beside a colour training set is read as RGB too)
    colour = any(_colour(split) for split in headers.values())
    arrays = {"class_names": np.array(classes)}
    for split, (files, labels) in found.items():
        suffix = f"_{split}" if split else ""
        arrays[f"x{suffix}"] = _decode_images(files, headers[split], colour)
        arrays[f"y{suffix}"] = np.asarray(labels, dtype=np.int64)
    return arrays


def _image_files(folder: Path, classes: Sequence[str]) -> tuple[list[Path], list[int]]:
    """Every PNG or JPEG under folder/<class>/ and its label (the class's index in `classes`)."""
    if not classes:
        raise DataError(f"{folder}: no class subfolders (expected {folder}/<class>/<image>.png)")
    found = [d.name for d in _class_folders(folder)]
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise DataError(
            f"{folder}: class folder(s) {', '.join(unknown)} are not in train/ ({', '.join(classes)})"
        )
    files, labels = [], []
    for label, name in enumerate(classes):
        directory = folder / name
        if directory.is_dir():
            for file in sorted(directory.iterdir()):
                if file.suffix.lower() in IMAGE_SUFFIXES and file.is_file():
                    files.append(file)
                    labels.append(label)
    if not files:
        raise DataError(f"{folder}: no PNG or JPEG images in its class folders")
    return files, labels


def _pillow():
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is installed where codec's tests run
        raise DataError(
            "folder: data needs Pillow to read images: pip install 'codec[images]' (or Pillow)"
        ) from None
    return Image


# What Pillow raises on a malformed image besides OSError (its plugins use these for bad headers and
# streams); every one of them is a file that cannot be read, said in one line.
_IMAGE_ERRORS = (OSError, ValueError, EOFError, SyntaxError, struct.error, IndexError, TypeError)


def _image_headers(files: Sequence[Path]) -> list[tuple[tuple[int, int], str]]:
    """(width, height) and mode of every image, read from its header (Pillow decodes lazily).

    Raises:
        DataError: An unreadable image, one past Pillow's decompression-bomb limit (`MAX_IMAGE_PIXELS`,
            about 89 million pixels, a 300 MB grey or 1 GB float32 RGB image), or images of two sizes.
    """
    Image = _pillow()
    limit = Image.MAX_IMAGE_PIXELS
    headers = []
    for file in files:
        regular_file(file, "image", DataError)
        try:
            with warnings.catch_warnings():
                # between 1x and 2x the limit Pillow only warns: codec refuses it below, in one line
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(file) as img:
                    size, mode = img.size, img.mode
        except Image.DecompressionBombError as exc:
            raise DataError(f"{file}: refused as a decompression bomb: {first_line(exc)}") from exc
        except _IMAGE_ERRORS as exc:
            raise DataError(f"{file}: cannot read as an image: {first_line(exc)}") from exc
        if limit is not None and size[0] * size[1] > limit:
            raise DataError(
                f"{file}: declares {size[0]}x{size[1]} = {size[0] * size[1]} pixels, past the limit of "
                f"{limit} pixels for one image (Pillow's MAX_IMAGE_PIXELS): a decompression bomb?"
            )
        if headers and size != headers[0][0]:
            first = headers[0][0]
            raise DataError(
                f"{file}: is {size[0]}x{size[1]} but {files[0].name} is {first[0]}x{first[1]}; "
                "all images must have one size (resize them first)"
            )
        headers.append((size, mode))
    return headers


def _colour(headers: Sequence[tuple[tuple[int, int], str]]) -> bool:
    """Whether the images are read as RGB: any image that is not grey makes them all RGB."""
    return any(mode != "L" for _, mode in headers)


def _check_image_budget(path: Path, headers: Mapping[str, Sequence[tuple[tuple[int, int], str]]]) -> None:
    """Refuse, before decoding, a folder whose images decode past `CODEC_MAX_DATA_BYTES` as float32."""
    from codec.runtime.data.formats import _over_budget, data_budget

    channels = 3 if any(_colour(split) for split in headers.values()) else 1
    total = sum(4 * len(split) * split[0][0][0] * split[0][0][1] * channels for split in headers.values())
    if total > data_budget():
        count = sum(len(split) for split in headers.values())
        raise _over_budget(path, f"the image folder ({count} images)", total)


def _decode_images(
    files: Sequence[Path], headers: Sequence[tuple[tuple[int, int], str]], colour: bool
) -> np.ndarray:
    """The images, decoded one at a time into one uint8 array: NHW for grey, NHWC for colour."""
    Image = _pillow()
    (width, height), mode = headers[0][0], "RGB" if colour else "L"
    x = np.empty((len(files), height, width, 3) if mode == "RGB" else (len(files), height, width), np.uint8)
    for i, file in enumerate(files):
        try:
            with Image.open(file) as img:
                if img.size != (width, height):  # the file changed since its header was read
                    raise DataError(f"{file}: changed while it was read ({img.size[0]}x{img.size[1]} now)")
                x[i] = np.asarray(img.convert(mode), dtype=np.uint8)
        except DataError:
            raise
        except (*_IMAGE_ERRORS, Image.DecompressionBombError) as exc:
            raise DataError(f"{file}: cannot read as an image: {first_line(exc)}") from exc
    return x


def _found(arrays: Mapping[str, np.ndarray]) -> str:
    return ", ".join(k for k in arrays if k != "class_names") or "no arrays"


def _pair(arrays: Mapping[str, np.ndarray], x: str, y: str, source: str) -> bool:
    if (x in arrays) != (y in arrays):
        have, lack = (x, y) if x in arrays else (y, x)
        raise DataError(f"{source}: missing array {lack}; it has {_found(arrays)} ({have} needs {lack})")
    return x in arrays


def _build(name: str, arrays: Mapping[str, np.ndarray], source: str, notes: Sequence[str] = ()) -> Dataset:
    """A Dataset from split arrays (x_train, y_train, x_test, y_test, optional x_val, y_val)."""
    from codec.runtime.data.formats import _dataset_from_arrays

    arrays = {k: v for k, v in arrays.items() if v is not _UNREAD}
    dataset = _dataset_from_arrays(name, arrays, class_names=None, source=source)
    changes: dict = {"notes": tuple(notes)}
    if "x_val" in arrays:
        from codec.runtime.data.formats import _to_float_nchw

        changes["x_val"] = _to_float_nchw(arrays["x_val"], f"{source}: x_val")
        changes["y_val"] = arrays["y_val"]
        top = int(np.max(arrays["y_val"])) if len(arrays["y_val"]) else -1
        if top >= dataset.num_classes:
            raise DataError(
                f"{source}: y_val has label {top} but train and test have only {dataset.num_classes} classes"
            )
    return dataclasses.replace(dataset, **changes)


def load_user_dataset(spec: str) -> Dataset:
    """A user spec as a train/test `Dataset` (what evaluation and calibration read).

    `x_train, y_train, x_test, y_test` (+ `x_val, y_val`) are the splits; `x, y` alone serve as both.

    Raises:
        DataError: Neither layout is complete (the message lists the arrays found and those needed).
    """
    arrays, source = read_user_arrays(spec)
    if _pair(arrays, "x_train", "y_train", source) and _pair(arrays, "x_test", "y_test", source):
        _pair(arrays, "x_val", "y_val", source)
        return _build(spec, arrays, source)
    if _pair(arrays, "x", "y", source):
        single = {
            "x_train": arrays["x"],
            "y_train": arrays["y"],
            "x_test": arrays["x"],
            "y_test": arrays["y"],
        }
        if "class_names" in arrays:
            single["class_names"] = arrays["class_names"]
        return _build(spec, single, source, notes=[f"{spec}: one split (x, y), used for both train and test"])
    raise DataError(
        f"{source}: has {_found(arrays)}; needs x, y (one split, for calibration) or "
        "x_train, y_train, x_test, y_test (optional x_val, y_val)"
    )


def load_training_set(spec: str, data_dir=None) -> Dataset:
    """The data `codec compile` trains on: a named dataset, or a user spec with a training split.

    A user spec needs `x_train, y_train`; `x_val, y_val` are used for early stopping when given, and
    without `x_test, y_test` a stratified 10 % of the training examples is held out as the test split.

    Raises:
        DataError: No training split (the message lists the arrays found and those needed).
    """
    from codec.runtime.data.formats import load_dataset

    if not is_user_spec(spec):
        return load_dataset(spec, data_dir=data_dir)
    arrays, source = read_user_arrays(spec)
    if not _pair(arrays, "x_train", "y_train", source):
        raise DataError(f"{source}: has {_found(arrays)}; compile needs {TRAINING_LAYOUT}")
    _pair(arrays, "x_val", "y_val", source)
    if _pair(arrays, "x_test", "y_test", source):
        return _build(spec, arrays, source)
    arrays = dict(arrays)
    y = np.asarray(arrays["y_train"])
    if y.ndim != 1 or len(y) < 2:
        return _build(
            spec, {**arrays, "x_test": arrays["x_train"], "y_test": y}, source
        )  # let validation say why
    n_test = max(1, round(HELD_OUT_TEST_FRACTION * len(y)))
    test = stratified_indices(y, n_test, seed=0, stream=_STREAM_HELD_OUT_TEST)
    keep = np.ones(len(y), dtype=bool)
    keep[test] = False
    x = np.asarray(arrays["x_train"])
    arrays.update(x_train=x[keep], y_train=y[keep], x_test=x[test], y_test=y[test])
    note = (
        f"{spec}: no x_test, y_test; held out {n_test} of the {len(y)} training examples "
        f"(stratified, seed 0) as the test split"
    )
    return _build(spec, arrays, source, notes=[note])


# ---------------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Normalization:
    """Per-channel standardisation `(x - mean[c]) / std[c]` over axis 1 of the examples.

    Attributes:
        mean: One value per channel (or one for all).
        std: Like `mean`; every value positive.
        source: "train" (computed on the training split) or "given".
    """

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = "given"

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or not self.mean:
            raise ConfigError(
                f"normalisation needs as many means as stds, got {len(self.mean)} and {len(self.std)}"
            )
        if not all(math.isfinite(s) and s > 0 for s in self.std) or not all(
            math.isfinite(m) for m in self.mean
        ):
            raise ConfigError(f"normalisation stds must be positive and finite, got {list(self.std)}")

    @classmethod
    def fit(cls, x: np.ndarray) -> Normalization:
        """Mean and std per channel (axis 1) of the training inputs; a constant channel gets std 1."""
        x = np.asarray(x, dtype=np.float64)
        axes = tuple(i for i in range(x.ndim) if i != 1)
        mean = x.mean(axis=axes)
        std = x.std(axis=axes)
        std[std < 1e-8] = 1.0  # a constant channel (e.g. an always-black border) is left unscaled
        return cls(tuple(float(v) for v in mean), tuple(float(v) for v in std), source="train")

    def check(self, x: np.ndarray, what: str = "data") -> None:
        channels = x.shape[1]
        if len(self.mean) not in (1, channels):
            raise ConfigError(
                f"normalisation has {len(self.mean)} mean/std value(s) but {what} has {channels} channels "
                f"(axis 1 of shape {list(x.shape[1:])}); give 1 or {channels}"
            )

    def apply(self, x: np.ndarray | None) -> np.ndarray | None:
        """The normalised copy of `x` (float32); None stays None."""
        if x is None:
            return None
        self.check(x)
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = np.asarray(self.mean, dtype=np.float32).reshape(shape)
        std = np.asarray(self.std, dtype=np.float32).reshape(shape)
        return ((np.asarray(x, dtype=np.float32) - mean) / std).astype(np.float32, copy=False)

    def to_dict(self) -> dict:
        return {
            "mode": "mean-std",
            "axis": 1,
            "mean": list(self.mean),
            "std": list(self.std),
            "source": self.source,
        }


def parse_normalize(text: str | None) -> str | Normalization | None:
    """`--normalize`: None/"none" (inputs as loaded), "mean-std" (fit on the training split later), or
    explicit "MEAN/STD" with comma-separated values per channel, e.g. "0.1307/0.3081" or
    "0.49,0.48,0.45/0.25,0.24,0.26"."""
    if text is None or str(text).strip().lower() in ("", "none"):
        return None
    text = str(text).strip()
    if text.lower() == "mean-std":
        return "mean-std"
    mean_text, slash, std_text = text.partition("/")
    try:
        if not slash:
            raise ValueError
        mean = tuple(float(v) for v in mean_text.split(","))
        std = tuple(float(v) for v in std_text.split(","))
    except ValueError:
        raise ConfigError(
            f"--normalize {text!r}: use none, mean-std, or MEAN/STD with comma-separated values per channel "
            "(e.g. 0.1307/0.3081)"
        ) from None
    return Normalization(mean, std)
