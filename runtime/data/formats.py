"""Readers: `load_dataset` and the file formats behind each spec (npz, IDX, CIFAR binary, JPEG copy)."""

from __future__ import annotations

import gzip
import importlib.resources
import logging
import lzma
import os
import struct
import tokenize
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from codec.errors import ConfigError, DataError
from codec.io import regular_file
from codec.runtime.data.catalog import (
    _CIFAR_ARCHIVE,
    _CIFAR_DIR,
    _CIFAR_RECORD,
    _CIFAR_TEST_BATCH,
    _CIFAR_TRAIN_BATCHES,
    _IDX_FILES,
    _IDX_IMAGES_MAGIC,
    _IDX_LABELS_MAGIC,
    _JPEG_TEST,
    _JPEG_TRAIN,
    CHECKSUMS,
    CIFAR10_CLASSES,
    DATA_DIR_ENV,
    DATASETS,
    DEFAULT_DATA_DIR,
    MNIST_CLASSES,
)
from codec.runtime.data.dataset import Dataset, validate_arrays
from codec.runtime.data.fetch import _file_digest, _one_line, extract_tar_safely, fetch_file

log = logging.getLogger(__name__)


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
        spec: `mnist`, `fashion_mnist`, `cifar10`, `cifar10_jpeg`, `mnist_small`, or the user's own data
            `npz:PATH`, `npy:DIR`, `folder:DIR` (see `codec.runtime.data.user`).
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
    from codec.runtime.data.user import is_user_spec, load_user_dataset

    spec = str(spec).strip()
    if is_user_spec(spec):
        return load_user_dataset(spec)
    name = spec.lower().replace("-", "_")
    if name not in DATASETS or name in ("npz", "npy", "folder"):
        raise ConfigError(f"unknown dataset {spec!r}; known: {known_specs()}")
    if name == "mnist_small":
        return _load_bundled_mnist_small()
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name in ("mnist", "fashion_mnist"):
        return _load_idx_dataset(name, root, download, mirrors)
    if name == "cifar10":
        return _load_cifar10(root, download, mirrors)
    return _load_cifar10_jpeg(root)


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
        if num_classes > MAX_INFERRED_CLASSES:
            # class names are made for every integer below the largest label: 2**33 would allocate ~100 GB
            raise DataError(
                f"{source}: the largest label is {num_classes - 1}, so {num_classes} classes would be "
                "inferred, "
                f"past the limit of {MAX_INFERRED_CLASSES}; store a class_names array or relabel 0..K-1"
            )
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


# Classes inferred from labels (0..max label) when a file names none: far more than any dataset codec
# trains on has, and small enough that their names take a few MB.
MAX_INFERRED_CLASSES = 1 << 16
MAX_DATA_BYTES_ENV = "CODEC_MAX_DATA_BYTES"
# What one data file may decode to (as float32, which is what codec keeps): CIFAR-10's training set is
# 0.6 GB. Checked from the sizes the file declares (zip member sizes, npy and IDX headers) before anything
# is decompressed or allocated, so a few-MB file declaring many GB is one line, not an out-of-memory kill.
DEFAULT_MAX_DATA_BYTES = 4 << 30


def data_budget() -> int:
    """`$CODEC_MAX_DATA_BYTES`, else 4 GiB: the most one data file may decode to."""
    text = os.environ.get(MAX_DATA_BYTES_ENV) or str(DEFAULT_MAX_DATA_BYTES)
    try:
        limit = int(text)
    except ValueError:
        raise ConfigError(f"{MAX_DATA_BYTES_ENV}={text!r} is not a whole number of bytes") from None
    if limit < 1:
        raise ConfigError(f"{MAX_DATA_BYTES_ENV}={text!r} must be a positive number of bytes")
    return limit


def _over_budget(path: Path, what: str, nbytes: int) -> DataError:
    return DataError(
        f"{path}: {what} declares {nbytes} bytes of data, past the limit of {data_budget()} bytes "
        f"(set {MAX_DATA_BYTES_ENV}=BYTES to raise it)"
    )


def _npy_header(stream, where: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """The shape, dtype and data size an npy stream's header declares (read from the header alone:
    numpy allocates that many bytes before it reads any). Leaves `stream` at the start of the data."""
    version = np.lib.format.read_magic(stream)
    try:
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(stream, max_header_size=10000)
        else:
            shape, _, dtype = np.lib.format.read_array_header_2_0(stream, max_header_size=10000)
    except tokenize.TokenError as exc:  # numpy tokenizes the header: an unclosed bracket escapes as this
        raise DataError(f"{where}: not a valid .npy header: {_one_line(exc)}") from exc
    if any(d < 0 for d in shape):
        raise DataError(f"{where} declares shape {shape}, with a negative dimension: corrupt")
    # numpy multiplies the non-zero dimensions when it makes an array of this shape (a float32 copy
    # too), even with a zero among them: past 2**62 bytes that is "array is too big", a ValueError
    # far from the file (found by tools/fuzz_data.py: shape (0, 0, 2**62) of uint8, holding no data)
    if int(np.prod([d for d in shape if d], dtype=object)) * max(dtype.itemsize, 8) >= 1 << 62:
        raise DataError(f"{where} declares shape {shape}, larger than any array can be: corrupt")
    return shape, dtype, int(np.prod(shape, dtype=object)) * dtype.itemsize


def _decoded_bytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    """What codec holds for an array: numeric data is converted to float32, so budget that, not only
    what is stored (a uint8 image set grows four times)."""
    count = int(np.prod(shape, dtype=object))
    return max(count * dtype.itemsize, count * 4 if dtype.kind in "biuf" else 0)


def _check_npz_sizes(path: Path, names: Sequence[str]) -> None:
    """Budget an .npz from what it declares, before numpy decompresses or allocates anything: each
    member's npy header (shape x dtype, which numpy allocates), its zip size (what it inflates to), and
    the deflate ratio (no deflate stream inflates more than ~1032x: a larger declared size is a lie)."""
    budget, total = data_budget(), 0
    with zipfile.ZipFile(path) as archive:
        for name in names:
            try:
                info = archive.getinfo(f"{name}.npy")
            except KeyError:
                continue
            if (
                info.compress_type == zipfile.ZIP_DEFLATED
                and info.file_size > 1100 * info.compress_size + 4096
            ):
                raise DataError(
                    f"{path}: member {info.filename} declares {info.file_size} bytes from "
                    f"{info.compress_size} "
                    "compressed (more than deflate can produce): corrupt or a decompression bomb"
                )
            with archive.open(info) as member:
                shape, dtype, data_bytes = _npy_header(member, f"{path}: member {info.filename}")
            if data_bytes > info.file_size:
                raise DataError(
                    f"{path}: member {info.filename} declares shape {shape} ({data_bytes} bytes) but holds "
                    f"{info.file_size}: truncated or corrupt"
                )
            total += _decoded_bytes(shape, dtype)
            if total > budget:
                raise _over_budget(path, f"member {info.filename} (shape {shape})", total)


def _read_npy_files(files: Sequence[Path]) -> list[np.ndarray]:
    """Read .npy files (one data set: their sizes are budgeted together) without ever unpickling.

    Every header is read and budgeted first (shape x dtype against the bytes the file holds, the
    float32 total against `CODEC_MAX_DATA_BYTES`), so a small file declaring many GB is one line and
    nothing is allocated; every failure is a one-line DataError naming the file.
    """
    budget, total = data_budget(), 0
    for file in files:
        regular_file(file, "file", DataError)  # never open a FIFO (it blocks) or a device
        try:
            with open(file, "rb") as stream:
                shape, dtype, data_bytes = _npy_header(stream, str(file))
                held = os.fstat(stream.fileno()).st_size - stream.tell()
        except DataError:
            raise
        except (ValueError, OSError, EOFError, SyntaxError) as exc:
            raise DataError(f"{file}: cannot read as .npy: {_one_line(exc)}") from exc
        if data_bytes > held:
            raise DataError(
                f"{file}: declares shape {shape} ({data_bytes} bytes) but holds {held}: truncated or corrupt"
            )
        total += _decoded_bytes(shape, dtype)
        if total > budget:
            raise _over_budget(file, f"its header (shape {shape}, {dtype})", total)
    arrays = []
    for file in files:
        try:
            arrays.append(np.load(file, allow_pickle=False))
        except (ValueError, OSError, EOFError) as exc:
            raise DataError(f"{file}: cannot read as .npy: {_one_line(exc)}") from exc
    return arrays


def _read_npz(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Read named arrays from an .npz without ever unpickling; every failure is a one-line DataError."""
    regular_file(path, "file", DataError)  # never open a FIFO (it blocks) or a device
    try:
        if zipfile.is_zipfile(path):
            _check_npz_sizes(path, (*required, *optional))
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
    except (
        ValueError,
        OSError,
        EOFError,
        KeyError,
        zipfile.BadZipFile,
        zlib.error,
        lzma.LZMAError,
        NotImplementedError,
    ) as exc:
        # zip members may be lzma- or bzip2-compressed (a corrupt lzma stream raises its own error), and
        # zipfile raises NotImplementedError for a version or compression method it does not know
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
    raw = _read_maybe_gzip(path, _idx_size)
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


def _idx_size(head: bytes) -> int | None:
    """The total bytes an IDX file declares (header + data), from its first bytes; None if unknown yet."""
    if len(head) < 4 or head[:2] != b"\x00\x00":
        return None
    header = 4 + 4 * head[3]
    if len(head) < header:
        return None
    return header + int(np.prod(struct.unpack(f">{head[3]}I", head[4:header]), dtype=object))


def _read_maybe_gzip(path: Path, declared_size=None) -> bytes:
    """The file's bytes, gunzipped when it is gzip. `declared_size(first bytes)` gives the size the
    content says it has: that is budgeted before reading on, and gzip is inflated streamed, never past
    it (plus one byte, to see trailing data), so a small .gz cannot inflate to gigabytes."""
    regular_file(path, "file", DataError)
    budget = data_budget()
    try:
        with open(path, "rb") as f:
            magic = f.read(2)
            f.seek(0)
            if magic != b"\x1f\x8b":
                size = os.fstat(f.fileno()).st_size
                # an IDX file is kept as uint8 and converted to float32 (4 bytes a value)
                if 4 * size > budget:
                    raise _over_budget(path, "the file", 4 * size)
                return f.read()
            with gzip.GzipFile(fileobj=f) as stream:
                head = stream.read(1024)
                limit = declared_size(head) if declared_size is not None else None
                if limit is not None and 4 * limit > budget:
                    raise _over_budget(path, "its header", 4 * limit)
                cap = (limit if limit is not None else budget // 4) + 1 - len(head)
                # In chunks: read(cap) would allocate the header's declared size up front, so a 4 KB
                # file declaring 60 MB of images took 60 MB (found by the extended hypothesis run).
                chunks, got = [], 0
                while got < cap:
                    chunk = stream.read(min(1 << 20, cap - got))
                    if not chunk:
                        break
                    chunks.append(chunk)
                    got += len(chunk)
                rest = b"".join(chunks)
                if limit is None and len(head) + len(rest) > budget // 4:
                    raise _over_budget(path, "the gzip stream", len(head) + len(rest))
                return head + rest
    except DataError:
        raise
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
