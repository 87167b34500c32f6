"""codec.runtime.data: real MNIST/CIFAR files, the bundled subset, user npz, downloads over loopback,
validation."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import re
import socket
import struct
import subprocess
import sys
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from codec.errors import ConfigError, DataError
from codec.runtime import data
from codec.runtime.data import Dataset, iter_batches, load_dataset, read_idx, validate_arrays

REPO = Path(__file__).resolve().parents[1]
BUNDLED = REPO / "codec" / "data" / "mnist_small.npz"
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
IDX_NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


# --- helpers -----------------------------------------------------------------------------------------


def idx_bytes(array: np.ndarray) -> bytes:
    """An unsigned-byte IDX file: magic 0x0000 08 <ndim>, big-endian dims, then the data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


@pytest.fixture(scope="module")
def small_mnist_arrays() -> dict[str, np.ndarray]:
    """A few hundred real MNIST images (from the bundled file) to build IDX/npz fixtures from."""
    with np.load(BUNDLED) as npz:
        return {
            "x_train": npz["x_train"][:300],
            "y_train": npz["y_train"][:300],
            "x_test": npz["x_test"][:100],
            "y_test": npz["y_test"][:100],
        }


def write_idx_set(directory: Path, arrays: dict[str, np.ndarray], gz: bool = True) -> dict[str, bytes]:
    """Write the four MNIST IDX files into `directory`; returns file name -> bytes written."""
    directory.mkdir(parents=True, exist_ok=True)
    content = dict(
        zip(
            IDX_NAMES, (arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"]), strict=True
        )
    )
    written = {}
    for name, array in content.items():
        raw = idx_bytes(array)
        fname, payload = (f"{name}.gz", gzip.compress(raw, mtime=0)) if gz else (name, raw)
        (directory / fname).write_bytes(payload)
        written[fname] = payload
    return written


def sha256_table(files: dict[str, bytes]) -> dict[str, str]:
    return {name: "sha256:" + hashlib.sha256(payload).hexdigest() for name, payload in files.items()}


class _Handler(http.server.SimpleHTTPRequestHandler):
    requested: list[str]

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        self.requested.append(self.path)
        if self.path.startswith("/broken/"):
            # Promise more bytes than are sent, then hang up: an interrupted download.
            self.send_response(200)
            self.send_header("Content-Length", "100000")
            self.end_headers()
            self.wfile.write(b"\x1f\x8b partial")
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()


@pytest.fixture
def http_mirror(tmp_path):
    """A loopback HTTP server on an ephemeral port serving tmp_path/'served'; yields (base_url, dir, log)."""
    served = tmp_path / "served"
    served.mkdir()
    requested: list[str] = []
    handler = type("Handler", (_Handler,), {"requested": requested})
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", served, requested
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy_no_env(monkeypatch):
    """Loopback downloads must not go through a proxy, and no test may see the user's data settings."""
    for var in (
        "http_proxy",
        "https_proxy",
        "HTTP_PROXY",
        "HTTPS_PROXY",
        "CODEC_DATA_MIRROR",
        "CODEC_DATA_DIR",
    ):
        monkeypatch.delenv(var, raising=False)


def leftover_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.rglob("*") if p.is_file()) if directory.exists() else []


# --- real data in ../shared/data ---------------------------------------------------------------------


def test_idx_t10k_files_parse_to_the_official_test_set(shared_data):
    images = read_idx(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz", expect_magic=2051)
    labels = read_idx(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz", expect_magic=2049)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10000,)
    assert np.bincount(labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    # Labels given to the images loader (and vice versa) are refused by their magic.
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*magic is 2049, expected 2051"):
        read_idx(shared_data / "mnist" / "t10k-labels-idx1-ubyte.gz", expect_magic=2051)


@pytest.fixture(scope="module")
def full_mnist(shared_data) -> Dataset:
    return load_dataset("mnist", data_dir=shared_data, download=False)


def test_mnist_npz_loads_the_full_official_mnist(full_mnist, shared_data):
    ds = full_mnist
    assert (len(ds.x_train), len(ds.x_test)) == (60000, 10000)
    assert ds.input_shape == (1, 28, 28) and ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    assert 0.0 == ds.x_train.min() and ds.x_train.max() == 1.0
    assert abs(float(ds.x_train.mean()) - 0.1306605) < 1e-5  # the published MNIST mean
    assert np.bincount(ds.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(ds.y_test).tolist() == MNIST_TEST_COUNTS
    assert ds.class_names == tuple("0123456789") and ds.num_classes == 10
    # Its test half is the IDX test set.
    idx_images = read_idx(shared_data / "mnist" / "t10k-images-idx3-ubyte.gz")
    np.testing.assert_array_equal(np.round(ds.x_test[:, 0] * 255).astype(np.uint8), idx_images)


def test_cifar10_jpeg_loads_nchw(shared_data):
    ds = load_dataset("cifar10_jpeg", data_dir=shared_data, download=False)
    assert ds.x_train.shape == (8000, 3, 32, 32) and ds.x_test.shape == (10000, 3, 32, 32)
    assert ds.class_names[0] == "airplane" and ds.class_names[9] == "truck"
    assert np.bincount(ds.y_train).tolist() == [800] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert 0.0 <= ds.x_test.min() and ds.x_test.max() <= 1.0
    # Channel means of CIFAR-10 (R > G > B) show the NHWC -> NCHW transpose went the right way.
    means = ds.x_train.mean(axis=(0, 2, 3))
    np.testing.assert_allclose(means, [0.491, 0.482, 0.447], atol=0.01)


def test_cifar10_jpeg_missing_files_say_where(tmp_path):
    with pytest.raises(DataError, match="cifar10_jpeg_train8k.npz.*never downloaded"):
        load_dataset("cifar10_jpeg", data_dir=tmp_path)


def test_mnist_small_is_the_documented_subset_of_mnist(full_mnist):
    small = load_dataset("mnist_small")
    expected = full_mnist.subset(n_train=5000, n_test=1000, seed=0)
    np.testing.assert_array_equal(small.x_train, expected.x_train)
    np.testing.assert_array_equal(small.y_train, expected.y_train)
    np.testing.assert_array_equal(small.x_test, expected.x_test)
    np.testing.assert_array_equal(small.y_test, expected.y_test)


def test_make_bundled_data_regenerates_the_bundled_arrays(shared_data, tmp_path):
    out = tmp_path / "regenerated.npz"
    result = subprocess.run(
        [sys.executable, str(REPO / "tools" / "make_bundled_data.py"), "--source",
         str(shared_data / "mnist.npz"), "--out", str(out)],
        capture_output=True, text=True, check=True, timeout=120,
    )  # fmt: skip
    assert "sha256" in result.stdout
    with np.load(out) as new, np.load(BUNDLED) as old:
        assert sorted(new.files) == sorted(old.files)
        for key in old.files:
            np.testing.assert_array_equal(new[key], old[key])


# --- bundled data ------------------------------------------------------------------------------------


def test_mnist_small_loads_without_any_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CODEC_DATA_DIR", str(tmp_path / "does-not-exist"))
    ds = load_dataset("mnist_small", download=False)
    assert ds.name == "mnist_small"
    assert ds.x_train.shape == (5000, 1, 28, 28) and ds.x_test.shape == (1000, 1, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [494, 562, 496, 511, 487, 452, 493, 522, 487, 496]
    assert np.bincount(ds.y_test).tolist() == [98, 114, 103, 101, 98, 89, 96, 103, 97, 101]
    assert ds.x_train.dtype == np.float32 and 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert not (tmp_path / "does-not-exist").exists()


def test_bundled_file_matches_its_provenance_note():
    readme = (REPO / "codec" / "data" / "README.md").read_text()
    documented = re.search(r"\*\*sha256\*\*: `([0-9a-f]{64})`", readme).group(1)
    assert hashlib.sha256(BUNDLED.read_bytes()).hexdigest() == documented
    assert BUNDLED.stat().st_size < 3_000_000
    assert "CC BY-SA 3.0" in readme and "tools/make_bundled_data.py" in readme


# --- standard layouts and strict IDX parsing ---------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "subdir", "gz"),
    [("mnist", "MNIST/raw", True), ("mnist", "mnist", True), ("mnist", "", True), ("mnist", "mnist", False),
     ("fashion_mnist", "FashionMNIST/raw", True), ("fashion_mnist", "fashion_mnist", True)],
)  # fmt: skip
def test_idx_layouts_are_found(tmp_path, small_mnist_arrays, spec, subdir, gz):
    write_idx_set(tmp_path / subdir, small_mnist_arrays, gz=gz)
    ds = load_dataset(spec, data_dir=tmp_path, download=False)
    assert ds.x_train.shape == (300, 1, 28, 28) and ds.x_test.shape == (100, 1, 28, 28)
    np.testing.assert_array_equal(ds.x_train[:, 0], small_mnist_arrays["x_train"] / np.float32(255))
    np.testing.assert_array_equal(ds.y_test, small_mnist_arrays["y_test"])
    assert ds.class_names[0] == ("0" if spec == "mnist" else "T-shirt/top")


def test_fashion_mnist_does_not_pick_up_files_in_the_data_dir_root(tmp_path, small_mnist_arrays):
    write_idx_set(tmp_path, small_mnist_arrays)  # root files are MNIST's
    with pytest.raises(DataError, match=r"fashion_mnist not found .*FashionMNIST/raw"):
        load_dataset("fashion_mnist", data_dir=tmp_path, download=False)


def test_canonical_file_of_the_other_dataset_is_refused(tmp_path, small_mnist_arrays, monkeypatch):
    files = write_idx_set(tmp_path / "MNIST" / "raw", small_mnist_arrays)
    md5 = hashlib.md5(files["train-images-idx3-ubyte.gz"]).hexdigest()
    monkeypatch.setitem(data.CHECKSUMS, "fashion_mnist", {"train-images-idx3-ubyte.gz": f"md5:{md5}"})
    with pytest.raises(DataError, match="canonical fashion_mnist file, not mnist"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_truncated_idx_file_names_the_file(tmp_path, small_mnist_arrays):
    directory = tmp_path / "MNIST" / "raw"
    write_idx_set(directory, small_mnist_arrays)
    raw = idx_bytes(small_mnist_arrays["x_train"])
    (directory / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-500]))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz: truncated IDX file"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (lambda raw: gzip.compress(raw)[:-40], "corrupt or truncated gzip"),
        (lambda raw: raw[:10], "shorter than its 16-byte header"),
        (lambda raw: raw[:2], "shorter than the 4-byte magic"),
        (lambda raw: raw + b"\x00", "trailing bytes"),
        (lambda raw: b"\x00\x00\x0d\x03" + raw[4:], "not an unsigned-byte IDX file"),
        (lambda raw: b"PK\x03\x04" + raw[4:], "not an unsigned-byte IDX file"),
    ],
)
def test_malformed_idx_files_are_refused_by_name(tmp_path, small_mnist_arrays, payload, message):
    path = tmp_path / "bad-images-idx3-ubyte.gz"
    path.write_bytes(payload(idx_bytes(small_mnist_arrays["x_test"])))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*" + message):
        read_idx(path, expect_magic=2051)


def test_image_and_label_counts_must_agree(tmp_path, small_mnist_arrays):
    arrays = dict(small_mnist_arrays, y_test=small_mnist_arrays["y_test"][:-1])
    write_idx_set(tmp_path / "mnist", arrays)
    with pytest.raises(DataError, match="100 images but t10k-labels-idx1-ubyte.gz has 99 labels"):
        load_dataset("mnist", data_dir=tmp_path, download=False)


def test_missing_files_without_download_say_where_to_put_them(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tmp_path, download=False)
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path / "MNIST" / "raw") in message and "train-images-idx3-ubyte.gz" in message


def test_unknown_spec_lists_the_known_ones():
    with pytest.raises(
        ConfigError, match="unknown dataset 'imagenet'.*mnist, fashion_mnist, cifar10.*npz:PATH"
    ):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="npz: needs a path"):
        load_dataset("npz:")
    assert {"mnist", "fashion_mnist", "cifar10", "cifar10_jpeg", "mnist_small", "npz"} <= set(data.DATASETS)


# --- user npz ----------------------------------------------------------------------------------------


def test_user_npz_uint8_hwc_images_become_scaled_nchw(tmp_path):
    rng = np.random.default_rng(0)
    x_train = rng.integers(0, 256, size=(20, 8, 6, 3), dtype=np.uint8)
    x_test = rng.integers(0, 256, size=(5, 8, 6, 3), dtype=np.uint8)
    path = tmp_path / "user.npz"
    np.savez(path, x_train=x_train, y_train=np.arange(20) % 3, x_test=x_test,
             y_test=np.array([0, 1, 2, 0, 1]), class_names=np.array(["cat", "dog", "owl"]))  # fmt: skip
    ds = load_dataset(f"npz:{path}")
    assert ds.name == f"npz:{path}" and ds.input_shape == (3, 8, 6)
    assert ds.class_names == ("cat", "dog", "owl") and ds.num_classes == 3
    np.testing.assert_array_equal(ds.x_train[4, 2], x_train[4, :, :, 2] / np.float32(255))


def test_user_npz_float_features_are_kept_and_classes_inferred(tmp_path):
    path = tmp_path / "tab.npz"
    x = np.linspace(-3, 3, 40, dtype=np.float64).reshape(10, 4)
    np.savez(
        path, x_train=x, y_train=np.array([0, 1, 4] * 3 + [0]), x_test=x[:2], y_test=np.array([1.0, 0.0])
    )
    ds = load_dataset(f"npz:{path}")
    assert ds.input_shape == (4,) and ds.num_classes == 5 and ds.class_names == ("0", "1", "2", "3", "4")
    np.testing.assert_allclose(ds.x_train, x.astype(np.float32))
    assert ds.y_test.dtype == np.int64 and ds.y_test.tolist() == [1, 0]


def _bad_npz(tmp_path, **overrides):
    arrays = {"x_train": np.zeros((4, 3), np.float32), "y_train": np.array([0, 1, 0, 1]),
                  "x_test": np.zeros((2, 3), np.float32), "y_test": np.array([0, 1])}  # fmt: skip
    arrays.update(overrides)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"y_test": None}, "missing array.*y_test.*it has x_train, y_train, x_test"),
        (
            {"x_train": np.array([[0.0, np.nan, 1.0]] * 4)},
            "train: x has non-finite values \\(4 NaN\\), first in example 0",
        ),
        ({"y_train": np.array([0, 1, 0])}, "4 examples but 3 labels"),
        ({"y_train": np.eye(2)[[0, 1, 0, 1]]}, "1-D array of class indices.*one-hot"),
        ({"y_test": np.array([0, -1])}, "label 1 is -1"),
        ({"y_train": np.array([0, 0.5, 1, 1])}, "whole numbers"),
        (
            {"x_test": np.zeros((2, 5), np.float32)},
            r"train examples have shape \(3,\) but test examples \(5,\)",
        ),
        ({"class_names": np.array(["a"])}, "label 1 is 1, out of range for 1 classes"),
        ({"x_train": np.array([object()] * 4, dtype=object)}, "cannot read as .npz.*pickle"),
    ],
)
def test_user_npz_errors_are_one_line(tmp_path, overrides, message):
    spec = _bad_npz(tmp_path, **overrides)
    with pytest.raises(DataError, match=message) as info:
        load_dataset(spec)
    assert "\n" not in str(info.value)


def test_user_npz_unreadable_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_dataset(f"npz:{tmp_path / 'nope.npz'}")
    (tmp_path / "junk.npz").write_bytes(b"this is not a zip archive at all")
    with pytest.raises(DataError, match="junk.npz: cannot read as .npz"):
        load_dataset(f"npz:{tmp_path / 'junk.npz'}")
    np.save(tmp_path / "single.npy", np.zeros(3))
    with pytest.raises(DataError, match="single .npy array"):
        load_dataset(f"npz:{tmp_path / 'single.npy'}")


# --- downloads over loopback -------------------------------------------------------------------------


def test_download_parses_and_writes_atomically(tmp_path, http_mirror, small_mnist_arrays, monkeypatch):
    base, served, requested = http_mirror
    files = write_idx_set(served, small_mnist_arrays)
    monkeypatch.setitem(data.CHECKSUMS, "mnist", sha256_table(files))
    cache = tmp_path / "cache"

    ds = load_dataset("mnist", data_dir=cache, mirrors={"mnist": [base]})

    assert sorted(requested) == sorted(f"/{name}" for name in files)
    raw_dir = cache / "MNIST" / "raw"
    assert leftover_files(cache) == sorted(files)  # exactly the four files: no temporaries left behind
    for name, payload in files.items():
        assert (raw_dir / name).read_bytes() == payload
    np.testing.assert_array_equal(ds.x_test[:, 0], small_mnist_arrays["x_test"] / np.float32(255))
    np.testing.assert_array_equal(ds.y_train, small_mnist_arrays["y_train"])
    # Second load: from the cache, no network.
    requested.clear()
    again = load_dataset("mnist", data_dir=cache, download=False)
    assert requested == [] and np.array_equal(again.x_train, ds.x_train)


def test_download_falls_back_to_the_next_url_and_only_fetches_missing_files(
    tmp_path, http_mirror, small_mnist_arrays, monkeypatch
):
    base, served, requested = http_mirror
    files = write_idx_set(served / "good", small_mnist_arrays)
    monkeypatch.setitem(data.CHECKSUMS, "mnist", sha256_table(files))
    cache = tmp_path / "cache"
    (cache / "MNIST" / "raw").mkdir(parents=True)
    (cache / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz").write_bytes(files["t10k-labels-idx1-ubyte.gz"])

    load_dataset("mnist", data_dir=cache, mirrors={"mnist": [base + "missing/", base + "good/"]})

    assert "/good/t10k-labels-idx1-ubyte.gz" not in requested  # already there
    assert sum(p.startswith("/missing/") for p in requested) == 3  # each 404 was tried first
    assert leftover_files(cache) == sorted(files)


def test_mirror_environment_variable_uses_a_folder_per_dataset(
    tmp_path, http_mirror, small_mnist_arrays, monkeypatch
):
    base, served, requested = http_mirror
    files = write_idx_set(served / "fashion_mnist", small_mnist_arrays)
    monkeypatch.setitem(data.CHECKSUMS, "fashion_mnist", sha256_table(files))
    monkeypatch.setenv("CODEC_DATA_MIRROR", base.rstrip("/"))
    monkeypatch.setenv("CODEC_DATA_DIR", str(tmp_path / "cache"))
    ds = load_dataset("fashion_mnist")
    assert all(p.startswith("/fashion_mnist/") for p in requested) and len(requested) == 4
    assert (tmp_path / "cache" / "FashionMNIST" / "raw" / "train-images-idx3-ubyte.gz").is_file()
    assert ds.class_names[-1] == "Ankle boot"


def test_checksum_mismatch_leaves_no_file(tmp_path, http_mirror, small_mnist_arrays, monkeypatch):
    base, served, _ = http_mirror
    files = write_idx_set(served, small_mnist_arrays)
    table = sha256_table(files)
    table["train-images-idx3-ubyte.gz"] = "sha256:" + "0" * 64
    monkeypatch.setitem(data.CHECKSUMS, "mnist", table)
    cache = tmp_path / "cache"
    with pytest.raises(
        DataError, match="train-images-idx3-ubyte.gz failed \\(checksum mismatch: sha256"
    ) as info:
        load_dataset("mnist", data_dir=cache, mirrors={"mnist": [base]})
    assert "\n" not in str(info.value)
    assert leftover_files(cache) == []


def test_interrupted_download_leaves_no_file(tmp_path, http_mirror, small_mnist_arrays, monkeypatch):
    base, _, _ = http_mirror
    monkeypatch.setitem(data.CHECKSUMS, "mnist", {f"{n}.gz": "sha256:" + "0" * 64 for n in IDX_NAMES})
    cache = tmp_path / "cache"
    with pytest.raises(
        DataError,
        match=r"/broken/train-images-idx3-ubyte.gz failed \(connection closed after 10 of 100000 bytes",
    ):
        load_dataset("mnist", data_dir=cache, mirrors={"mnist": [base + "broken/"]})
    assert leftover_files(cache) == []


def test_network_failure_names_the_url_and_the_folder(tmp_path):
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there now
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/mnist/"
    with pytest.raises(DataError) as info:
        load_dataset("mnist", data_dir=tmp_path, mirrors={"mnist": [url]})
    message = str(info.value)
    assert "\n" not in message
    assert f"{url}train-images-idx3-ubyte.gz failed" in message
    assert f"put it in {tmp_path / 'MNIST' / 'raw'}" in message
    assert leftover_files(tmp_path) == []


def test_canonical_urls_and_checksums():
    assert data.dataset_urls("mnist", "t10k-images-idx3-ubyte.gz") == [
        "https://ossci-datasets.s3.amazonaws.com/mnist/t10k-images-idx3-ubyte.gz",
        "http://yann.lecun.com/exdb/mnist/t10k-images-idx3-ubyte.gz",
    ]
    assert data.dataset_urls("cifar10", "cifar-10-binary.tar.gz") == [
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
    ]
    assert data.CHECKSUMS["cifar10"]["cifar-10-binary.tar.gz"] == "md5:c32a1d4ab5d03f1284b67883e8d87530"
    assert data.CHECKSUMS["mnist"]["train-images-idx3-ubyte.gz"] == "md5:f68b3c2dcbeaaa9fbdd348bbdeb94873"
    for name in ("mnist", "fashion_mnist", "cifar10"):
        assert set(data.CHECKSUMS[name]) == set(data.DATASETS[name].files)


# --- CIFAR-10 binary ---------------------------------------------------------------------------------


def cifar_batch(rng, n: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    records = np.concatenate([labels[:, None], images.reshape(n, -1)], axis=1)
    return records.tobytes(), labels, images


def make_tar(path: Path, members: dict[str, bytes], extra: list[tarfile.TarInfo] = ()) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        for info in extra:
            tar.addfile(info)
    path.write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_cifar10_binary_download_extract_and_layout(tmp_path, http_mirror, monkeypatch):
    base, served, _ = http_mirror
    rng = np.random.default_rng(1)
    members, train_images, train_labels = {}, [], []
    for i in range(1, 6):
        payload, labels, images = cifar_batch(rng, 3)
        members[f"cifar-10-batches-bin/data_batch_{i}.bin"] = payload
        train_images.append(images)
        train_labels.append(labels)
    test_payload, test_labels, _test_images = cifar_batch(rng, 4)
    members["cifar-10-batches-bin/test_batch.bin"] = test_payload
    members["cifar-10-batches-bin/batches.meta.txt"] = b"airplane\nautomobile\n"
    archive = make_tar(served / "cifar-10-binary.tar.gz", members)
    monkeypatch.setitem(
        data.CHECKSUMS, "cifar10", {"cifar-10-binary.tar.gz": "md5:" + hashlib.md5(archive).hexdigest()}
    )

    ds = load_dataset("cifar10", data_dir=tmp_path / "cache", mirrors={"cifar10": base})

    assert ds.x_train.shape == (15, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(ds.x_train, np.concatenate(train_images) / np.float32(255))
    np.testing.assert_array_equal(ds.y_train, np.concatenate(train_labels))
    np.testing.assert_array_equal(ds.y_test, test_labels)
    assert ds.class_names[1] == "automobile"
    assert not any(p.name.startswith(".extract") for p in (tmp_path / "cache").iterdir())
    # A truncated batch is refused by name.
    batch = tmp_path / "cache" / "cifar-10-batches-bin" / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-7])
    with pytest.raises(DataError, match="data_batch_3.bin: not a CIFAR-10 binary batch"):
        load_dataset("cifar10", data_dir=tmp_path / "cache", download=False)


@pytest.mark.parametrize(
    ("name", "kind", "reason"),
    [("../escape.bin", tarfile.REGTYPE, "goes up"), ("/abs/escape.bin", tarfile.REGTYPE, "absolute path"),
     ("cifar-10-batches-bin/link", tarfile.SYMTYPE, "a link"),
     ("cifar-10-batches-bin/hard", tarfile.LNKTYPE, "a link")],
)  # fmt: skip
def test_unsafe_tar_members_are_refused_and_nothing_is_extracted(tmp_path, name, kind, reason):
    extra = tarfile.TarInfo(name)
    extra.type = kind
    extra.linkname = "/etc/passwd" if kind != tarfile.REGTYPE else ""
    archive = tmp_path / "cache" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir()
    make_tar(archive, {"cifar-10-batches-bin/test_batch.bin": b"\x00" * 3073}, extra=[extra])
    with pytest.raises(DataError, match=f"unsafe member .*{reason}"):
        load_dataset("cifar10", data_dir=tmp_path / "cache", download=False)
    assert leftover_files(tmp_path) == ["cifar-10-binary.tar.gz"]


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "y", "num_classes", "message"),
    [
        (np.array([[1.0, np.nan], [0.0, 0.0]]), None, None, "1 NaN"),
        (np.array([[0.0, 0.0], [np.inf, -np.inf]]), None, None, "2 inf.*first in example 1"),
        (np.zeros((0, 4)), None, None, "empty"),
        (np.zeros((3, 0)), None, None, "empty"),
        (np.zeros(5), None, None, "at least 2 dimensions"),
        (np.array([["a", "b"]]), None, None, "numeric"),
        (np.zeros((3, 2)), np.array([0, 1, 10]), 10, "label 2 is 10, out of range for 10 classes"),
        (np.zeros((3, 2)), np.array([0, -2, 1]), None, "label 1 is -2"),
        (np.zeros((3, 2)), np.array([0, 1]), None, "3 examples but 2 labels"),
        (np.zeros((2, 2)), np.array([0.0, np.nan]), None, "whole numbers"),
    ],
)
def test_validate_arrays_errors(x, y, num_classes, message):
    with pytest.raises(DataError, match=f"^mine: .*{message}"):
        validate_arrays(x, y, num_classes, name="mine")


def test_validate_arrays_accepts_good_data_and_large_sets_in_chunks():
    x = np.zeros((20000, 3), np.float32)
    validate_arrays(x, np.arange(20000) % 7, num_classes=7)
    x[17000, 1] = np.nan
    with pytest.raises(DataError, match="first in example 17000"):
        validate_arrays(x)


def test_dataset_checks_class_names():
    x, y = np.zeros((2, 3), np.float32), np.array([0, 1])
    with pytest.raises(DataError, match="1 class name"):
        Dataset("d", x, y, x, y, num_classes=2, class_names=("a",))


# --- subset, validation split, batches ---------------------------------------------------------------


@pytest.fixture(scope="module")
def small() -> Dataset:
    return load_dataset("mnist_small")


def test_subset_is_stratified_and_reproducible(small):
    a = small.subset(n_train=1000, n_test=100, seed=3)
    b = small.subset(n_train=1000, n_test=100, seed=3)
    c = small.subset(n_train=1000, n_test=100, seed=4)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    np.testing.assert_array_equal(a.y_test, b.y_test)
    assert not np.array_equal(a.x_train, c.x_train)
    assert (len(a.y_train), len(a.y_test)) == (1000, 100)
    # Each class keeps its share within one example.
    share = np.bincount(small.y_train, minlength=10) * 1000 / len(small.y_train)
    assert np.all(np.abs(np.bincount(a.y_train, minlength=10) - share) < 1)
    # The test draw does not disturb the train draw.
    np.testing.assert_array_equal(small.subset(n_train=1000, n_test=50, seed=3).x_train, a.x_train)
    # None or more than there are keeps everything.
    whole = small.subset(n_train=10**6)
    assert len(whole.y_train) == 5000 and len(whole.y_test) == 1000
    with pytest.raises(ConfigError, match="n_train must be at least 1"):
        small.subset(n_train=0)


def test_split_validation_is_deterministic_disjoint_and_stratified(small):
    rest, (x_val, y_val) = small.split_validation(0.2, seed=5)
    rest2, (x_val2, _) = small.split_validation(0.2, seed=5)
    _, (x_val3, _) = small.split_validation(0.2, seed=6)
    np.testing.assert_array_equal(x_val, x_val2)
    np.testing.assert_array_equal(rest.x_train, rest2.x_train)
    assert not np.array_equal(x_val, x_val3)
    assert (len(y_val), len(rest.y_train)) == (1000, 4000)
    assert rest.x_test is small.x_test
    # Together they are exactly the original training set.
    together = np.concatenate([rest.x_train, x_val]).reshape(5000, -1)
    original = small.x_train.reshape(5000, -1)
    assert np.array_equal(np.unique(together, axis=0), np.unique(original, axis=0))
    share = np.bincount(small.y_train, minlength=10) * 0.2
    assert np.all(np.abs(np.bincount(y_val, minlength=10) - share) < 1)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="between 0 and 1"):
            small.split_validation(bad)


def test_iter_batches_yields_views(small):
    batches = list(iter_batches(small.x_test, 300))
    assert [len(b) for b in batches] == [300, 300, 300, 100]
    assert all(np.shares_memory(b, small.x_test) for b in batches)
    np.testing.assert_array_equal(np.concatenate(batches), small.x_test)
    with pytest.raises(ConfigError, match="batch size"):
        next(iter_batches(small.x_test, 0))
