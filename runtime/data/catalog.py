"""The datasets codec knows: names, descriptions, canonical URLs and checksums."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

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
            "your own data: an .npz with x_train, y_train (optional x_val, y_val, x_test, y_test, "
            "class_names), "
            "or x, y alone (one split, for calibration); uint8 images are scaled by 1/255, NHWC images "
            "become NCHW"
        ),
    ),
    "npy": DatasetInfo(
        spec="npy:DIR",
        description=(
            "your own data as .npy files in DIR, named like the npz arrays (x_train.npy, y_train.npy, ...)"
        ),
    ),
    "folder": DatasetInfo(
        spec="folder:DIR",
        description=(
            "your own images in torchvision's ImageFolder layout: DIR/<class>/*.png|jpg (one split), or "
            "DIR/train/<class>/... with optional DIR/val/, DIR/test/; one image size, no resizing"
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
