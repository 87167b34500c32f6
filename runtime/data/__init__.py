"""codec.runtime.data: the standard image sets and user `.npz` files, loaded as float32 arrays in [0, 1].

`load_dataset(spec)` is the one entry point. Specs:

- `mnist`, `fashion_mnist`: the IDX `.gz` files, looked up under the data directory in torchvision's
  layout (`MNIST/raw/`, `FashionMNIST/raw/`) or plainly (`mnist/`, `fashion_mnist/`, and for MNIST the
  data directory itself); MNIST also accepts a keras-style `mnist.npz`. Downloaded when missing.
- `cifar10`: the *binary* CIFAR-10 release (`cifar-10-batches-bin/*.bin`), downloaded as
  `cifar-10-binary.tar.gz` when missing. The python (pickle) release is never read: codec does not
  unpickle downloaded files.
- `cifar10_jpeg`: a local JPEG-q75 copy of CIFAR-10 (`cifar10_jpeg_train8k.npz`, `cifar10_jpeg_test.npz`).
- `mnist_small`: 5,000 + 1,000 MNIST images bundled inside the package; needs no data directory.
- `npz:PATH`, `npy:DIR`, `folder:DIR`: the user's own data (paths as given, relative to the working
  directory): arrays `x_train, y_train` (optional `x_val, y_val, x_test, y_test`, `class_names`) or `x, y`
  alone, or images in torchvision's ImageFolder layout; see `codec.runtime.data.user`.
  `load_training_set(spec)` is what `codec compile` reads (it needs a training split).

Images come out NCHW (`(N, 1, 28, 28)`, `(N, 3, 32, 32)`); tabular user data stays `(N, D)`.

Downloads are verified against the canonical files' checksums (`CHECKSUMS`), written atomically (a
failed or mismatching download leaves nothing behind), and tar archives are extracted member by member
after refusing absolute paths, `..` and links. `mirrors=` or the `CODEC_DATA_MIRROR` environment variable
replace the canonical URLs, e.g. for an offline mirror or a test server.
"""

from codec.runtime.data.catalog import (
    CHECKSUMS,
    CIFAR10_CLASSES,
    DATA_DIR_ENV,
    DATASETS,
    DEFAULT_DATA_DIR,
    FASHION_MNIST_CLASSES,
    MIRROR_ENV,
    MNIST_CLASSES,
    DatasetInfo,
)
from codec.runtime.data.dataset import Dataset, iter_batches, stratified_indices, validate_arrays
from codec.runtime.data.fetch import dataset_urls, extract_tar_safely, fetch_file
from codec.runtime.data.formats import default_data_dir, known_specs, load_dataset, read_idx
from codec.runtime.data.user import (
    Normalization,
    is_user_spec,
    load_training_set,
    load_user_dataset,
    parse_normalize,
)

__all__ = [
    "CHECKSUMS",
    "CIFAR10_CLASSES",
    "DATASETS",
    "DATA_DIR_ENV",
    "DEFAULT_DATA_DIR",
    "FASHION_MNIST_CLASSES",
    "MIRROR_ENV",
    "MNIST_CLASSES",
    "Dataset",
    "DatasetInfo",
    "Normalization",
    "dataset_urls",
    "default_data_dir",
    "extract_tar_safely",
    "fetch_file",
    "is_user_spec",
    "iter_batches",
    "known_specs",
    "load_dataset",
    "load_training_set",
    "load_user_dataset",
    "parse_normalize",
    "read_idx",
    "stratified_indices",
    "validate_arrays",
]
