"""Fuzz codec's data readers: mutate small valid npz / npy:DIR / IDX(.gz) / folder: inputs and load them.

    python tools/fuzz_data.py --runs 100000 --seed 1
    python tools/fuzz_data.py --replay fuzz-data-findings/      # re-run saved findings

One input is a set of files of one kind (an .npz; a folder of .npy arrays; the four MNIST IDX files,
gzipped or not; an ImageFolder of PNG/JPEG images), packed as an uncompressed zip whose first path
component names the kind (`npz/`, `npy/`, `idx/`, `folder/`); saved findings are such .zip files. Each
iteration picks a seed or an earlier accepted input, mutates one of its files and loads the set through
codec's reader for that kind (`load_dataset("npz:..." / "npy:..." / "folder:..." / "mnist")`).

Mutations: sizes in headers (npy shapes up to 2**62 and negative, IDX dimensions, PNG/JPEG width and
height), dtypes (npy descr, IDX type code, PNG bit depth and colour type), label values (2**33,
negatives, 2**63 - 1, NaN, one-hot), class names, deflate ratios (zip members of zeros inflating
1000x, zip sizes that lie, gzip bombs behind a small header), truncation and trailing bytes, and the
byte-level mutations of tools/fuzz_loader.py.

A `CodecError` is the expected answer to a bad input. A *finding* is any other exception, a
`MemoryError` under the address-space cap (`--max-memory-mb`, default 4096) included, or an input that
takes longer than 2 s. The data budget is lowered to `--budget-mb` (default 256) so that everything
codec accepts fits well inside the cap: a MemoryError is then an allocation the budget does not cover.
The engine, the recorder and the summary are tools/fuzz_loader.py's. Exit status: 0 when there were no
findings, 1 otherwise.
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import random
import shutil
import struct
import sys
import tempfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fuzz_loader import Recorder, _limit_memory, mutate_bytes  # noqa: E402

KINDS = ("npz", "npy", "idx", "folder")
_LABELS = (0, 1, 9, 255, 2**16, 2**33, 2**40, 2**63 - 1, -1, -(2**31), -(2**63))
_DESCRS = ("<f4", "<f8", "<f2", "|u1", "|i1", "<i8", ">f4", "|b1", "<c8", "<U8", "|S4", "|O", "|V8", "<M8[s]")
_DIMS = (0, 1, 2, 3, 4, 28, 255, 2**16, 2**31 - 1, 2**32 - 1, 2**33, 2**62, -1)


# ---------------------------------------------------------------------------------------------------
# Inputs: a kind and its files, packed as a stored zip
# ---------------------------------------------------------------------------------------------------


def pack(kind: str, files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        for name, data in sorted(files.items()):
            archive.writestr(f"{kind}/{name}", data)
    return buf.getvalue()


def unpack(data: bytes) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    kind = next(iter(entries)).split("/", 1)[0]
    return kind, {name.split("/", 1)[1]: value for name, value in entries.items()}


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _npy_lying(shape, descr: str, data: bytes, fortran: bool = False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue() + data


def _npz(arrays: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as archive:
        for name, data in arrays.items():
            archive.writestr(f"{name}.npy", data)
    return buf.getvalue()


def _idx(magic: int, dims: tuple[int, ...], data: bytes) -> bytes:
    return struct.pack(f">I{len(dims)}I", magic, *dims) + data


def _image(size=(4, 4), mode="L", fmt="PNG", seed=0) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], *channels), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode).save(buf, fmt)
    return buf.getvalue()


def seed_inputs() -> list[bytes]:
    """Small valid inputs of every kind, each loaded cleanly by codec (checked by the tests)."""
    rng = np.random.default_rng(0)
    x = rng.random((6, 4), dtype=np.float32)
    y = np.arange(6) % 3
    npz_arrays = {"x_train": _npy(x), "y_train": _npy(y), "x_test": _npy(x[:3]), "y_test": _npy(y[:3])}
    images = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    idx = {
        "train-images-idx3-ubyte": _idx(2051, (4, 28, 28), images.tobytes()),
        "train-labels-idx1-ubyte": _idx(2049, (4,), bytes([0, 1, 2, 9])),
        "t10k-images-idx3-ubyte": _idx(2051, (2, 28, 28), images[:2].tobytes()),
        "t10k-labels-idx1-ubyte": _idx(2049, (2,), bytes([3, 4])),
    }
    return [
        pack("npz", {"data.npz": _npz(npz_arrays)}),
        pack(
            "npz",
            {"data.npz": _npz({"x": _npy(x), "y": _npy(y), "class_names": _npy(np.array(list("abc")))})},
        ),
        pack("npy", {"x.npy": _npy((x * 255).astype(np.uint8)), "y.npy": _npy(y)}),
        pack("npy", {f"{name}.npy": data for name, data in npz_arrays.items()}),
        pack("idx", idx),
        pack("idx", {f"{name}.gz": gzip.compress(data) for name, data in idx.items()}),
        pack(
            "folder", {f"{c}/{i}.png": _image(seed=2 * j + i) for j, c in enumerate("ab") for i in range(2)}
        ),
        pack(
            "folder",
            {
                "train/a/0.png": _image(mode="RGB"),
                "train/a/1.jpg": _image(fmt="JPEG", seed=1),
                "train/b/0.png": _image(mode="RGBA", seed=2),
                "test/a/0.png": _image(seed=3),
                "test/b/0.png": _image(seed=4),
            },
        ),
    ]


# ---------------------------------------------------------------------------------------------------
# The target
# ---------------------------------------------------------------------------------------------------

_WORK: Path | None = None  # where inputs are written; a temporary folder made on first use


def check_data(data: bytes) -> tuple[str, BaseException | None]:
    """Write the input's files to a fresh folder and load them with codec's reader for their kind.

    Returns (outcome, exception) as `fuzz_loader.check_one` does: "ok", the CodecError subclass name,
    or "finding" with the exception that escaped (a MemoryError under the cap included).
    """
    from codec.errors import CodecError
    from codec.runtime.data import load_dataset

    try:
        kind, files = unpack(data)
    except Exception:  # noqa: BLE001 - a container the mutators never make (a hand-edited finding)
        return "unreadable input", None
    global _WORK
    if _WORK is None:
        _WORK = Path(tempfile.mkdtemp(prefix="codec-fuzz-data-"))
    root = _WORK / "in"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for name, value in files.items():
        target = (root / name).resolve()
        if root.resolve() not in target.parents:
            continue  # names are the fuzzer's own, but a replayed file could hold anything
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(value)
    try:
        if kind == "npz":
            dataset = load_dataset(f"npz:{root / 'data.npz'}")
        elif kind == "npy":
            dataset = load_dataset(f"npy:{root}")
        elif kind == "idx":
            dataset = load_dataset("mnist", data_dir=root, download=False)
        else:
            dataset = load_dataset(f"folder:{root}")
        dataset.x_train.sum(), dataset.x_test.sum()  # touch every value codec holds
    except CodecError as exc:
        return type(exc).__name__, None
    except (Exception, MemoryError, RecursionError) as exc:  # everything else is a bug in codec
        return "finding", exc
    return "ok", None


# ---------------------------------------------------------------------------------------------------
# Mutators
# ---------------------------------------------------------------------------------------------------


def _mutate_npy(data: bytes, rng: random.Random, name: str) -> bytes:
    what = rng.randrange(6)
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception:  # noqa: BLE001 - already mutated past parsing: mutate its bytes instead
        return mutate_bytes(data, rng, [data])
    body = array.tobytes()
    if what == 0:  # a header whose shape lies about the data
        shape = tuple(rng.choice(_DIMS) for _ in range(rng.randint(0, 4)))
        return _npy_lying(shape, array.dtype.str, body)
    if what == 1:  # another dtype over the same bytes
        return _npy_lying(array.shape, rng.choice(_DESCRS), body, fortran=rng.random() < 0.2)
    if what == 2 or name.startswith("y"):  # label values
        labels = np.array(array, dtype=object).ravel().tolist() or [0]
        labels[rng.randrange(len(labels))] = rng.choice(_LABELS)
        if rng.random() < 0.2:
            return _npy(np.array(labels, dtype=np.float64) * rng.choice((1.0, 0.5, float("nan"))))
        if rng.random() < 0.2:
            return _npy(np.eye(3, dtype=np.int64)[np.arange(len(labels)) % 3])  # one-hot
        try:
            return _npy(np.array(labels, dtype=np.int64))
        except OverflowError:
            return _npy(np.array(labels, dtype=np.uint64))
    if what == 3:  # truncated or with trailing bytes
        cut = rng.randrange(len(data) + 1)
        return data[:cut] if rng.random() < 0.7 else data + bytes(rng.randint(1, 64))
    if what == 4:  # a version-2 header, a huge header, a header that is not a dict
        return rng.choice(
            (
                b"\x93NUMPY\x02\x00" + struct.pack("<I", 2**31) + data[10:],
                b"\x93NUMPY\x01\x00" + struct.pack("<H", 65535) + data[10:],
                b"\x93NUMPY\x01\x00\x10\x00[1, 2, 3]      \n",
                b"\x93NUMPY\x03\x00" + data[8:],
            )
        )
    return mutate_bytes(data, rng, [data], max_size=1 << 20)


def _mutate_zip(data: bytes, rng: random.Random, name: str = "") -> bytes:
    """Members that inflate far (honestly, or by sizes that lie), other methods, odd members."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            members = {info.filename: archive.read(info) for info in archive.infolist()}
    except Exception:  # noqa: BLE001
        return mutate_bytes(data, rng, [data], max_size=1 << 20)
    what = rng.randrange(5)
    if what == 0 and members:  # mutate one member as an npy file
        name = rng.choice(sorted(members))
        members[name] = _mutate_npy(members[name], rng, name)
        return _npz({n[:-4]: d for n, d in members.items()})
    if what == 1:  # a member of zeros: deflate's ratio is ~1000x
        count = rng.choice((1 << 16, 1 << 20, 4 << 20))
        name = rng.choice(("x_train", "x", "x_test"))
        members[f"{name}.npy"] = _npy_lying((count // 4 // 4, 4), "<f4", bytes(count))
        return _npz({n[:-4]: d for n, d in members.items()})
    if what == 2:  # lie about sizes in the zip headers (local and central)
        buf = bytearray(data)
        for signature, offset in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
            start = buf.find(signature)
            if start >= 0 and rng.random() < 0.7:
                buf[start + offset : start + offset + 4] = struct.pack(
                    "<I", rng.choice((0, 1, 2**31, 2**32 - 1))
                )
        return bytes(buf)
    if what == 3:  # stored, bzip2 or lzma members
        method = rng.choice((zipfile.ZIP_STORED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA))
        return _npz({n[:-4]: d for n, d in members.items()}, method)
    return mutate_bytes(data, rng, [data], max_size=1 << 20)


def _mutate_idx(data: bytes, rng: random.Random, name: str) -> bytes:
    gz = name.endswith(".gz")
    try:
        raw = gzip.decompress(data) if gz else data
    except Exception:  # noqa: BLE001
        return mutate_bytes(data, rng, [data])
    what = rng.randrange(6)
    if what == 0 and len(raw) >= 4 + 4 * raw[3]:  # dimensions
        dims = struct.unpack(f">{raw[3]}I", raw[4 : 4 + 4 * raw[3]])
        dims = [rng.choice(_DIMS) % 2**32 if rng.random() < 0.5 else d for d in dims]
        raw = raw[:4] + struct.pack(f">{len(dims)}I", *dims) + raw[4 + 4 * len(dims) :]
    elif what == 1 and len(raw) >= 4:  # type code and number of dimensions
        raw = (
            raw[:2]
            + bytes([rng.choice((0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E)), rng.choice((0, 1, 3, 4, 255))])
            + raw[4:]
        )
    elif what == 2 and "labels" in name and len(raw) > 8:  # label values (one byte each)
        i = rng.randrange(8, len(raw))
        raw = raw[:i] + bytes([rng.choice((10, 11, 127, 255))]) + raw[i + 1 :]
    elif what == 3:  # truncated or trailing data
        raw = raw[: rng.randrange(len(raw) + 1)] if rng.random() < 0.6 else raw + bytes(rng.randint(1, 4096))
    elif what == 4 and gz:  # a gzip bomb behind the real header, truncated or concatenated streams
        choice = rng.randrange(3)
        if choice == 0:
            return gzip.compress(raw + bytes(rng.choice((1 << 20, 8 << 20))))
        if choice == 1:
            return data[: rng.randrange(len(data) + 1)]
        return data + gzip.compress(bytes(rng.randint(1, 1 << 16)))
    else:
        raw = mutate_bytes(raw, rng, [raw], max_size=1 << 20)
    return gzip.compress(raw) if gz else raw


def _mutate_image(data: bytes, rng: random.Random, name: str = "") -> bytes:
    what = rng.randrange(5)
    buf = bytearray(data)
    if what == 0 and data[:8] == b"\x89PNG\r\n\x1a\n":  # PNG IHDR: width, height, depth, colour type
        field = rng.randrange(4)
        if field < 2:
            buf[16 + 4 * field : 20 + 4 * field] = struct.pack(
                ">I", rng.choice((0, 1, 5, 10000, 20000, 2**16, 2**31 - 1))
            )
        elif field == 2:
            buf[24] = rng.choice((1, 2, 4, 8, 16, 3))
        else:
            buf[25] = rng.choice((0, 2, 3, 4, 6, 1, 7))
        if rng.random() < 0.7:  # a valid CRC, so the decoder gets past the header
            buf[29:33] = struct.pack(">I", zlib.crc32(bytes(buf[12:29])))
        return bytes(buf)
    if what == 1 and data[:2] == b"\xff\xd8":  # JPEG SOF: height and width
        sof = next((i for i in range(2, len(buf) - 9) if buf[i] == 0xFF and buf[i + 1] in (0xC0, 0xC2)), None)
        if sof is not None:
            buf[sof + 5 : sof + 9] = struct.pack(
                ">HH", rng.choice((0, 1, 65535, 10000)), rng.choice((0, 1, 65535, 10000))
            )
            return bytes(buf)
    if what == 2:  # another mode or size, honestly encoded
        mode = rng.choice(("L", "RGB", "RGBA"))
        return _image(
            size=rng.choice(((4, 4), (5, 4), (1, 1), (4, 64))),
            mode=mode,
            fmt="PNG" if mode == "RGBA" else rng.choice(("PNG", "JPEG")),
            seed=rng.randrange(100),
        )
    if what == 3:
        return data[: rng.randrange(len(data) + 1)]
    return mutate_bytes(data, rng, [data])


def mutate(data: bytes, rng: random.Random, seeds: list[bytes]) -> bytes:
    """Mutate one file of the input (sometimes add, remove or rename one)."""
    kind, files = unpack(data)
    names = sorted(files)
    name = rng.choice(names)
    roll = rng.random()
    if roll < 0.05 and len(files) > 1:
        del files[name]
    elif roll < 0.1:
        if kind == "folder":
            files[rng.choice(("c/0.png", "a/9.jpeg", "train/c/0.png", "val/a/0.png", ".hidden/0.png"))] = (
                files[name]
            )
        elif kind == "npy":
            files[rng.choice(("class_names.npy", "x_val.npy", "y_val.npy", "y_test.npy"))] = rng.choice(
                (_npy(np.array(["a", "b"])), _npy(np.arange(3)), _npy(np.zeros((2, 2))), files[name])
            )
    else:
        mutator = {"npz": _mutate_zip, "npy": _mutate_npy, "idx": _mutate_idx, "folder": _mutate_image}[kind]
        try:
            files[name] = mutator(files[name], rng, name)
        except Exception:  # noqa: BLE001 - the structured edit does not apply to this file: mutate bytes
            files[name] = mutate_bytes(files[name], rng, [files[name]], max_size=1 << 20)
    return pack(kind, files)


def run_random(recorder: Recorder, seeds: list[bytes], runs: int, seconds: float, seed: int) -> None:
    """The plain mutational engine of fuzz_loader.run_random, over data inputs."""
    rng = random.Random(seed)
    pool = list(seeds)
    deadline = time.time() + seconds if seconds else None
    for _ in range(runs):
        if deadline is not None and time.time() > deadline:
            break
        data = mutate(rng.choice(pool), rng, seeds)
        before = recorder.outcomes.get("ok", 0)
        recorder.run(data)
        if recorder.outcomes.get("ok", 0) > before and len(pool) < 500:
            pool.append(data)  # loaded: a new valid variant to mutate further


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20000, help="inputs to try (default 20000)")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (default: no limit)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--findings", type=Path, default=Path("fuzz-data-findings"), help="where finding inputs are saved"
    )
    parser.add_argument("--summary", type=Path, default=None, help="also write the JSON summary here")
    parser.add_argument(
        "--max-memory-mb", type=int, default=4096, help="address-space limit (default 4096; 0: none)"
    )
    parser.add_argument(
        "--budget-mb", type=int, default=256, help="CODEC_MAX_DATA_BYTES for the run, in MiB (default 256)"
    )
    parser.add_argument(
        "--replay", type=Path, default=None, help="only re-run the .zip inputs in this folder"
    )
    args = parser.parse_args(argv)

    import logging
    import warnings

    from fuzz_loader import replay

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    os.environ["CODEC_MAX_DATA_BYTES"] = str(args.budget_mb << 20)
    _limit_memory(args.max_memory_mb)
    recorder = Recorder(args.findings, check=check_data, suffix=".zip")
    seeds = seed_inputs()
    if args.replay is not None:
        replay(recorder, args.replay)
        engine = "replay"
    else:
        engine = "random"
        try:
            run_random(recorder, seeds, args.runs, args.seconds, args.seed)
        except KeyboardInterrupt:  # stopped by hand: the summary of what ran is still worth having
            engine = "random (interrupted)"
    summary = recorder.summary(
        engine, target="data", seed=args.seed, budget_mb=args.budget_mb, seeds=len(seeds)
    )
    text = json.dumps(summary, indent=2)
    print(text, flush=True)
    if args.summary is not None:
        args.summary.write_text(text + "\n")
    if _WORK is not None:
        shutil.rmtree(_WORK, ignore_errors=True)
    return 1 if recorder.findings else 0


if __name__ == "__main__":
    sys.exit(main())
