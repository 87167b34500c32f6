"""Regenerate codec/data/mnist_small.npz, the MNIST subset bundled with codec.

    python tools/make_bundled_data.py --source /path/to/mnist.npz

The source is a keras-layout `mnist.npz` of the full official MNIST (x_train (60000, 28, 28) uint8, ...).
The selection is `codec.runtime.data.stratified_indices`, the same procedure as
`load_dataset("mnist").subset(5000, 1000, seed=0)`: per class, its share of the examples (largest-remainder
rounding), drawn with `numpy.random.default_rng([seed, 0])` for train and `[seed, 1]` for test, kept in
the official order. The arrays stay uint8.

The file is written like `np.savez_compressed` but with fixed zip timestamps, so regenerating it gives the
same bytes (for a given zlib) and the sha256 in codec/data/README.md stays meaningful.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from codec.io import atomic_path
from codec.runtime.data import MNIST_CLASSES, stratified_indices

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "codec" / "data" / "mnist_small.npz"
# The full MNIST kept beside the repository (see shared/data/README.md).
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "mnist.npz"
# sha256 of that full MNIST npz; a different source still works but is reported.
KNOWN_SOURCE_SHA256 = "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"


def select(source: dict[str, np.ndarray], n_train: int, n_test: int, seed: int) -> dict[str, np.ndarray]:
    """The bundled arrays: a class-stratified, seeded subset of `source`, uint8, in the original order."""
    train = stratified_indices(source["y_train"], n_train, seed=seed, stream=0)
    test = stratified_indices(source["y_test"], n_test, seed=seed, stream=1)
    return {
        "x_train": np.ascontiguousarray(source["x_train"][train], dtype=np.uint8),
        "y_train": np.ascontiguousarray(source["y_train"][train], dtype=np.uint8),
        "x_test": np.ascontiguousarray(source["x_test"][test], dtype=np.uint8),
        "y_test": np.ascontiguousarray(source["y_test"][test], dtype=np.uint8),
    }


def write_npz_reproducibly(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write `arrays` as a deflate-compressed .npz whose bytes depend only on the arrays."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
        for key, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, array, allow_pickle=False)
            # A fixed date instead of "now", which np.savez_compressed would store.
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            archive.writestr(info, buffer.getvalue(), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=Path(os.environ["CODEC_DATA_DIR"]) / "mnist.npz"
        if os.environ.get("CODEC_DATA_DIR")
        else DEFAULT_SOURCE,
        help=(
            "keras-layout mnist.npz of the full MNIST (default: $CODEC_DATA_DIR/mnist.npz or "
            "../shared/data/mnist.npz)"
        ),
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"where to write (default: {DEFAULT_OUT})"
    )
    parser.add_argument("--n-train", type=int, default=5000, help="training images to keep (default 5000)")
    parser.add_argument("--n-test", type=int, default=1000, help="test images to keep (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="selection seed (default 0)")
    args = parser.parse_args(argv)

    if not args.source.is_file():
        print(
            f"error: {args.source} not found; pass --source PATH to a full-MNIST mnist.npz", file=sys.stderr
        )
        return 2
    source_sha = sha256_of(args.source)
    if source_sha != KNOWN_SOURCE_SHA256:
        print(
            f"note: {args.source} sha256 {source_sha} is not the documented full-MNIST file", file=sys.stderr
        )
    with np.load(args.source, allow_pickle=False) as npz:
        source = {k: npz[k] for k in ("x_train", "y_train", "x_test", "y_test")}
    arrays = select(source, args.n_train, args.n_test, args.seed)
    write_npz_reproducibly(args.out, arrays)

    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes)")
    print(f"sha256 {sha256_of(args.out)}")
    for split in ("train", "test"):
        counts = np.bincount(arrays[f"y_{split}"], minlength=len(MNIST_CLASSES))
        print(f"{split}: {len(arrays[f'y_{split}'])} images, per class {' '.join(map(str, counts))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
