"""Bad data, interrupted runs, killed writes, full disks and memory limits: codec answers with one line
(exit 2) or resumes, and never leaves a truncated artifact behind."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from codec.cli import main
from codec.errors import CodecError, ConfigError, ShapeError
from codec.io import WriteError, write_bytes_atomic, write_json_atomic
from codec.ir import Activation, Dense, NetworkIR, lift, lower, save_model

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
RELU = Activation("relu")


def _mlp(name: str, n_in: int = 784, hidden: int = 16, n_out: int = 10, seed: int = 0) -> NetworkIR:
    rng = np.random.default_rng(seed)
    return NetworkIR(
        name,
        "input",
        "output",
        (n_in,),
        [
            Dense(
                "fc1",
                rng.standard_normal((hidden, n_in)).astype(np.float32) * 0.1,
                np.zeros(hidden, np.float32),
                RELU,
            ),
            Dense(
                "out",
                rng.standard_normal((n_out, hidden)).astype(np.float32),
                np.zeros(n_out, np.float32),
                Activation("softmax"),
            ),
        ],
    )


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    paths = {}
    for name, net in {"a": _mlp("a"), "b": _mlp("b", seed=1), "small": _mlp("small", n_in=20)}.items():
        paths[name] = str(save_model(lower(net), folder / f"{name}.onnx"))
    return paths


def _npz(folder: Path, name: str = "data.npz", n: int = 40, dim: int = 784, **changes) -> str:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.random((n, dim), dtype=np.float32),
        "y_train": np.arange(n) % 10,
        "x_test": rng.random((n, dim), dtype=np.float32),
        "y_test": np.arange(n) % 10,
    }
    arrays.update(changes)
    path = folder / name
    np.savez(path, **arrays)
    return f"npz:{path}"


def _nan(shape):
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    x[3, 5] = np.nan
    return x


def _inf(shape):
    x = np.random.default_rng(1).random(shape, dtype=np.float32)
    x[7, 0] = -np.inf
    return x


def _assert_one_line_error(code: int, err: str, command: str, fragment: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"codec {command}: error:"), err
    assert fragment in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------
# Data faults through the CLI
# ---------------------------------------------------------------------------------------------------

# (command, arguments, data changes, expected fragment); {a}, {b}, {small} are model paths, {data} the npz
DATA_FAULTS = {
    "profile-nan": (
        "profile",
        ["{a}", "--data", "{data}"],
        {"x_test": _nan((40, 784))},
        "non-finite values (1 NaN)",
    ),
    "profile-inf": (
        "profile",
        ["{a}", "--data", "{data}"],
        {"x_test": _inf((40, 784))},
        "non-finite values (1 inf)",
    ),
    "profile-empty": (
        "profile",
        ["{a}", "--data", "{data}"],
        {"x_test": np.zeros((0, 784), np.float32), "y_test": np.zeros(0, np.int64)},
        "is empty",
    ),
    "profile-shape": (
        "profile",
        ["{a}", "--data", "{data}"],
        {"x_train": np.zeros((40, 5), np.float32), "x_test": np.zeros((40, 5), np.float32)},
        "expects [784]",
    ),
    "profile-batch-size": (
        "profile",
        ["{a}", "--data", "{data}", "--batch-size", "0"],
        {},
        "--batch-size: expected a positive integer",
    ),
    "opt-nan": (
        "opt",
        ["{a}", "--peer", "{b}", "--data", "{data}"],
        {"x_train": _nan((40, 784))},
        "non-finite values",
    ),
    "opt-shape": (
        "opt",
        ["{a}", "--peer", "{b}", "--data", "{data}"],
        {"x_train": np.zeros((40, 6), np.float32), "x_test": np.zeros((40, 6), np.float32)},
        "expects [784]",
    ),
    "opt-members-differ": (
        "opt",
        ["{a}", "--peer", "{small}", "--data", "{data}"],
        {},
        "take different inputs",
    ),
    "opt-empty": (
        "opt",
        ["{a}", "--peer", "{b}", "--data", "{data}"],
        {"x_train": np.zeros((0, 784), np.float32), "y_train": np.zeros(0, np.int64)},
        "is empty",
    ),
    "eval-nan": ("eval", ["{a}", "--data", "{data}"], {"x_test": _nan((40, 784))}, "non-finite values"),
    "eval-label-range": (
        "eval",
        ["{a}", "--data", "{data}"],
        {"y_test": np.full(40, 7), "class_names": np.array(["x", "y", "z"])},
        "out of range for 3 classes",
    ),
    "eval-negative-label": (
        "eval",
        ["{a}", "--data", "{data}"],
        {"y_test": np.full(40, -1)},
        "labels must be >= 0",
    ),
    "eval-fractional-label": (
        "eval",
        ["{a}", "--data", "{data}"],
        {"y_test": np.full(40, 0.5)},
        "whole numbers",
    ),
    "eval-one-hot-labels": (
        "eval",
        ["{a}", "--data", "{data}"],
        {"y_test": np.eye(10)[np.arange(40) % 10]},
        "1-D array of class indices",
    ),
    "eval-length-mismatch": (
        "eval",
        ["{a}", "--data", "{data}"],
        {"y_test": np.arange(30) % 10},
        "40 examples but 30 labels",
    ),
    "eval-fewer-classes": (
        "eval",
        ["{a}", "--data", "{data}"],
        {"y_train": np.arange(40) % 3, "y_test": np.arange(40) % 3},
        "neither one per class",
    ),
    "eval-members-differ": (
        "eval",
        ["{a}", "{small}", "--data", "{data}"],
        {},
        "small.onnx expects [20] per example",
    ),
    "eval-shape": (
        "eval",
        ["{a}", "--data", "{data}"],
        {"x_train": np.zeros((40, 9), np.float32), "x_test": np.zeros((40, 9), np.float32)},
        "expects",
    ),
}


def _args(args: list[str], models: dict, data: str) -> list[str]:
    return [a.format(data=data, **models) for a in args]


@pytest.mark.parametrize("case", DATA_FAULTS, ids=list(DATA_FAULTS))
def test_bad_data_is_a_one_line_error(case, models, tmp_path, capsys):
    command, args, changes, fragment = DATA_FAULTS[case]
    data = _npz(tmp_path, **changes)
    code = main(
        [command, *_args(args, models, data), "--quiet"]
        if command in ("profile", "opt")
        else [command, *_args(args, models, data)]
    )
    captured = capsys.readouterr()
    _assert_one_line_error(code, captured.err, command, fragment)
    assert captured.out == ""


def _write_idx(
    folder: Path, images: np.ndarray, labels: np.ndarray, test_images=None, test_labels=None, cut: int = 0
) -> None:
    """MNIST's four IDX files (uncompressed) in torchvision's layout; `cut` bytes dropped from train
    images."""
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    test_images = images if test_images is None else test_images
    test_labels = labels if test_labels is None else test_labels
    for prefix, x, y in (("train", images, labels), ("t10k", test_images, test_labels)):
        blob = struct.pack(">IIII", 2051, len(x), *x.shape[1:]) + x.astype(np.uint8).tobytes()
        if prefix == "train" and cut:
            blob = blob[:-cut]
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(blob)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, len(y)) + y.astype(np.uint8).tobytes()
        )


IMAGES = np.random.default_rng(0).integers(0, 255, (30, 28, 28))
LABELS = np.arange(30) % 10
COMPILE_FAULTS = {
    "label-out-of-range": (
        dict(images=IMAGES, labels=np.where(LABELS == 3, 12, LABELS)),
        "out of range for 10 classes",
    ),
    "truncated-images": (dict(images=IMAGES, labels=LABELS, cut=100), "truncated IDX file"),
    "empty-test-set": (
        dict(images=IMAGES, labels=LABELS, test_images=np.zeros((0, 28, 28)), test_labels=np.zeros(0)),
        "is empty",
    ),
    "wrong-image-size": (dict(images=IMAGES[:, :20, :20], labels=LABELS), "expected 28x28"),
}


@pytest.mark.parametrize("case", COMPILE_FAULTS, ids=list(COMPILE_FAULTS))
def test_compile_on_bad_data_is_a_one_line_error(case, tmp_path, capsys):
    """The recipe's dataset (MNIST, classifier_m) read from crafted files: refused before any training."""
    files, fragment = COMPILE_FAULTS[case]
    _write_idx(tmp_path / "data", **files)
    code = main(
        [
            "compile",
            "--recipe",
            "classifier_m",
            "--members",
            "2",
            "--epochs",
            "1",
            "--quiet",
            "--data-dir",
            str(tmp_path / "data"),
            "-o",
            str(tmp_path / "run"),
        ]
    )
    captured = capsys.readouterr()
    _assert_one_line_error(code, captured.err, "compile", fragment)
    assert not list((tmp_path / "run").rglob("*.onnx"))


def test_bad_data_through_python_m_codec(models, tmp_path):
    """The same refusals from a real `python -m codec` process: exit status 2, one line, no traceback."""
    nan_data = _npz(tmp_path, "nan.npz", x_train=_nan((40, 784)), x_test=_nan((40, 784)))
    clean = _npz(tmp_path, "clean.npz")
    bad_labels = _npz(tmp_path, "labels.npz", y_test=np.full(40, 7), class_names=np.array(["x", "y", "z"]))
    _write_idx(tmp_path / "idx", images=IMAGES, labels=np.where(LABELS == 3, 12, LABELS))
    runs = [
        ("profile", [models["a"], "--data", nan_data, "--quiet"], "non-finite values"),
        (
            "opt",
            [models["a"], "--peer", models["small"], "--data", clean, "--quiet"],
            "take different inputs",
        ),
        ("eval", [models["a"], "--data", bad_labels], "out of range for 3 classes"),
        (
            "compile",
            [
                "--recipe",
                "classifier_m",
                "--data-dir",
                str(tmp_path / "idx"),
                "-o",
                str(tmp_path / "run"),
                "--quiet",
            ],
            "out of range for 10 classes",
        ),
    ]
    for command, args, fragment in runs:
        proc = subprocess.run(
            [sys.executable, "-m", "codec", command, *args],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=120,
        )
        _assert_one_line_error(proc.returncode, proc.stderr, command, fragment)


# ---------------------------------------------------------------------------------------------------
# Interruption
# ---------------------------------------------------------------------------------------------------

TRAIN = [
    "--recipe",
    "classifier_s",
    "--seed",
    "3",
    "--epochs",
    "25",
    "--patience",
    "100",
    "--n-train",
    "600",
    "--n-test",
    "100",
    "--batch-size",
    "50",
    "--device",
    "cpu",
    "--threads",
    "1",
    "--quiet",
]


def _default_sigint() -> None:
    """A job started in the background by a non-interactive shell inherits SIGINT ignored (as `nohup` or
    `cmd &` users expect, and codec respects that); these tests press Ctrl-C, so their child must not."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(predicate, proc, seconds: float = 120) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the process ended before it could be interrupted: {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("timed out waiting for the process")


def test_sigint_during_train_leaves_a_resumable_checkpoint(tmp_path, capsys):
    from codec.runtime.training.train import load_checkpoint

    out = tmp_path / "member.onnx"
    ckpt = Path(f"{out}.ckpt")
    cmd = [sys.executable, "-m", "codec", "train", *TRAIN, "-o", str(out)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=_default_sigint
    )
    _wait_for(ckpt.exists, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert not out.exists(), "no model is written before training finishes"
    assert not list(tmp_path.glob(".*.tmp")), "no half-written file left behind"
    state = load_checkpoint(ckpt)
    stopped_at = int(state["epoch"])
    assert 1 <= stopped_at < 25 and not state["finished"]

    capsys.readouterr()
    assert main(["train", *TRAIN, "-o", str(out), "--resume", "--json"]) == 0  # in-process: torch is loaded
    summary = json.loads(capsys.readouterr().out)
    assert summary["epochs_run"] == 25
    assert [h["epoch"] for h in summary["history"]] == list(range(1, 26))
    assert out.is_file() and lift(out).input_shape
    assert load_checkpoint(ckpt)["finished"]


def test_sigint_during_compile_stops_cleanly_between_artifacts(tmp_path):
    """compile's SIGTERM-and-resume path is tested in test_compile.py; Ctrl-C leaves the same state."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "codec",
        "compile",
        "--recipe",
        "classifier_s",
        "--members",
        "3",
        "--epochs",
        "2",
        "--n-train",
        "600",
        "--n-test",
        "100",
        "--calibration",
        "200",
        "--threads",
        "1",
        "--quiet",
        "-o",
        str(run_dir),
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, preexec_fn=_default_sigint
    )
    state = run_dir / "state.json"

    def main_trained():
        try:
            return "train:main" in json.loads(state.read_text())["steps"]
        except (FileNotFoundError, json.JSONDecodeError):
            return False

    _wait_for(main_trained, proc, seconds=240)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err and "Traceback" not in err
    steps = json.loads(state.read_text())["steps"]
    assert "train:main" in steps and not (run_dir / "ensemble.onnx").exists(), "stopped before the end"
    assert lift(run_dir / "members" / "main.onnx").input_shape  # the finished member is complete
    assert not list(run_dir.rglob("*.tmp")), "no half-written artifact left behind"


# ---------------------------------------------------------------------------------------------------
# Killed writes: atomic_path under SIGKILL
# ---------------------------------------------------------------------------------------------------

# A child that rewrites DEST forever, each version a 4 MiB record (header, payload, checksum) written in
# slow chunks, so a SIGKILL lands mid-write, mid-fsync or mid-rename.
WRITER = textwrap.dedent(
    """
    import hashlib, sys, time
    from pathlib import Path
    from codec.io import atomic_path
    dest, mode = Path(sys.argv[1]), sys.argv[2]
    chunk = 1 << 18
    version = int(sys.argv[3])
    Path(str(dest) + ".started").write_text("1")
    while True:
        version += 1
        payload = bytes([version % 251]) * (16 * chunk)
        record = b"v%08d" % version + payload + hashlib.sha256(payload).digest()
        if mode == "atomic":
            with atomic_path(dest) as tmp, open(tmp, "wb") as f:
                for i in range(0, len(record), chunk):
                    f.write(record[i : i + chunk]); f.flush(); time.sleep(0.002)
        else:  # the control: writing the destination in place
            with open(dest, "wb") as f:
                for i in range(0, len(record), chunk):
                    f.write(record[i : i + chunk]); f.flush(); time.sleep(0.002)
    """
)


def _complete(path: Path) -> bool:
    import hashlib

    data = path.read_bytes()
    payload, digest = data[9:-32], data[-32:]
    return data[:1] == b"v" and len(payload) == 16 << 18 and hashlib.sha256(payload).digest() == digest


def _kill_writer(tmp_path: Path, mode: str, kills: int, rng: random.Random) -> dict:
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    dest = tmp_path / "artifact.bin"
    outcomes = {"absent": 0, "complete": 0, "truncated_or_corrupt": 0}
    for k in range(kills):
        if k % 2 == 0 and dest.exists():
            dest.unlink()  # half the kills with no previous version, half with one
        started = Path(str(dest) + ".started")
        started.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, str(script), str(dest), mode, str(k * 1000)], env=ENV)
        deadline = time.time() + 60
        while not started.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if not dest.exists():
            outcomes["absent"] += 1
        elif _complete(dest):
            outcomes["complete"] += 1
        else:
            outcomes["truncated_or_corrupt"] += 1
    return outcomes


KILLS = 16


def test_sigkill_mid_write_never_leaves_a_truncated_artifact(tmp_path):
    outcomes = _kill_writer(tmp_path, "atomic", KILLS, random.Random(7))
    assert outcomes["truncated_or_corrupt"] == 0, outcomes
    assert sum(outcomes.values()) == KILLS
    # leftovers are hidden temporary files only, and a later write still succeeds
    assert all(p.name.startswith(".artifact.bin.") for p in tmp_path.glob(".*.tmp"))
    write_bytes_atomic(tmp_path / "artifact.bin", b"after")
    assert (tmp_path / "artifact.bin").read_bytes() == b"after"
    (tmp_path / "kills.json").write_text(json.dumps(outcomes))


def test_the_kill_harness_detects_truncation_of_a_plain_write(tmp_path):
    """Control: the same kills against in-place writes do leave truncated files, so the check above bites."""
    outcomes = _kill_writer(tmp_path, "plain", 6, random.Random(7))
    assert outcomes["truncated_or_corrupt"] > 0, outcomes


# ---------------------------------------------------------------------------------------------------
# Full disk
# ---------------------------------------------------------------------------------------------------


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def disk_full_after_half(monkeypatch):
    """Path.write_bytes writes half of the data, then the disk is full."""
    real = pathlib.Path.write_bytes

    def write_half(self, data):
        real(self, bytes(data)[: len(data) // 2])
        _enospc()

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_half)


@pytest.mark.parametrize("writer", ["bytes", "json"])
def test_disk_full_keeps_the_previous_file(tmp_path, disk_full_after_half, writer):
    path = tmp_path / "report.json"
    path.write_text('{"old": true}')
    with pytest.raises(WriteError) as err:
        if writer == "bytes":
            write_bytes_atomic(path, b'{"new": true, "padding": "' + b"x" * 1000 + b'"}')
        else:
            write_json_atomic(path, {"new": True, "padding": "x" * 1000})
    assert (
        isinstance(err.value, CodecError)
        and isinstance(err.value, OSError)
        and err.value.errno == errno.ENOSPC
    )
    assert "previous version is untouched" in str(err.value) and "\n" not in str(err.value)
    assert path.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"], "the partial temporary file is removed"


def test_disk_full_at_fsync_keeps_the_previous_file(tmp_path, monkeypatch):
    """Delayed allocation: the write 'succeeds' and the error surfaces at fsync."""
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    monkeypatch.setattr(os, "fsync", _enospc)
    with pytest.raises(WriteError, match="No space left on device"):
        write_bytes_atomic(path, b"new")
    assert path.read_bytes() == b"old" and len(list(tmp_path.iterdir())) == 1


def test_disk_full_while_saving_a_model_keeps_the_previous_model(tmp_path, monkeypatch):
    import onnx_ir

    path = tmp_path / "member.onnx"
    save_model(lower(_mlp("old")), path)
    before = path.read_bytes()
    real = onnx_ir.save

    def save_then_fail(model, target, **kwargs):
        real(model, target, **kwargs)
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 3)
        _enospc()

    monkeypatch.setattr(onnx_ir, "save", save_then_fail)
    with pytest.raises(WriteError):
        save_model(lower(_mlp("new", seed=5)), path)
    assert path.read_bytes() == before and lift(path).name == "member"
    assert len(list(tmp_path.iterdir())) == 1


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import torch

    from codec.runtime.training import train

    ckpt = tmp_path / "member.ckpt"
    train._save_checkpoint(ckpt, {"format": train.CHECKPOINT_FORMAT, "epoch": 3})
    before = ckpt.read_bytes()
    real = torch.save

    def save_half(obj, target, *args, **kwargs):
        real(obj, target, *args, **kwargs)
        with open(target, "r+b") as f:
            f.truncate(10)
        _enospc()

    monkeypatch.setattr(torch, "save", save_half)
    with pytest.raises(WriteError):
        train._save_checkpoint(ckpt, {"format": train.CHECKPOINT_FORMAT, "epoch": 4})
    assert ckpt.read_bytes() == before
    assert torch.load(ckpt, weights_only=True)["epoch"] == 3


def test_disk_full_through_the_cli_is_a_one_line_error(models, tmp_path, disk_full_after_half, capsys):
    report = tmp_path / "report.json"
    report.write_text("{}")
    code = main(["profile", models["a"], "--data", _npz(tmp_path), "--quiet", "-o", str(report)])
    _assert_one_line_error(
        code, capsys.readouterr().err, "profile", "No space left on device; the previous version is untouched"
    )
    assert report.read_text() == "{}"


def test_unwritable_output_folder_is_a_one_line_error(models, tmp_path, capsys):
    (tmp_path / "taken").write_text("a file where a folder should be")
    code = main(
        [
            "profile",
            models["a"],
            "--data",
            _npz(tmp_path),
            "--quiet",
            "-o",
            str(tmp_path / "taken" / "report.json"),
        ]
    )
    _assert_one_line_error(code, capsys.readouterr().err, "profile", "cannot be created or written to")
    assert (tmp_path / "taken").read_text() == "a file where a folder should be"


# ---------------------------------------------------------------------------------------------------
# Memory limits
# ---------------------------------------------------------------------------------------------------

STREAMER = textwrap.dedent(
    """
    import json, os, resource, sys
    import numpy as np
    from codec.ir import Activation, Dense, NetworkIR
    from codec.runtime.execution.profile import profile

    path, dim = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    # small integers and multiples of 1/8: every product and sum is exact in float32, so onnxruntime and
    # numpy agree bit for bit on which neurons fire
    w = rng.integers(-1, 2, (8, dim)).astype(np.float32)
    b = np.full(8, -0.5, np.float32)
    net = NetworkIR("stream", "input", "output", (dim,),
                    [Dense("h", w, b, Activation("relu")),
                     Dense("out", np.ones((2, 8), np.float32), np.zeros(2, np.float32))])
    profile(net, np.zeros((64, dim), np.float32), batch_size=64)  # sessions, thread pools, kernels: warmed up

    def vm_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024

    size = os.path.getsize(path)
    limit = vm_bytes() + size // 4  # the whole file cannot be loaded under this cap
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    expected = np.zeros(8, np.int64)

    def batches():
        with open(path, "rb") as f:
            while True:
                chunk = np.fromfile(f, dtype=np.float32, count=1024 * dim)
                if chunk.size == 0:
                    return
                chunk = chunk.reshape(-1, dim)
                expected[:] += ((chunk @ w.T + b) > 0).sum(axis=0)  # an independent count, streamed too
                yield chunk

    stats = profile(net, batches(), batch_size=1024)
    try:
        np.fromfile(path, dtype=np.float32)
        whole = "loaded"
    except MemoryError:
        whole = "MemoryError"
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before
    print(json.dumps({"count": stats.count, "fire": stats.layers["h"].fire.tolist(),
                      "expected": expected.tolist(), "whole": whole, "file_mib": size >> 20,
                      "cap_headroom_mib": (size // 4) >> 20, "rss_growth_mib": rss_growth >> 10}))
    """
)


def test_profiling_streams_a_calibration_set_larger_than_the_memory_cap(tmp_path):
    """512 MiB of calibration data profiled under an address-space cap of (what is mapped) + 128 MiB."""
    dim = 1024
    path = tmp_path / "calibration.f32"
    size = 512 << 20
    rng = np.random.default_rng(3)
    with open(path, "wb") as f:
        f.truncate(size)  # sparse, so the test costs no disk: zeros, with real data written in blocks
        for offset in range(0, size, 32 << 20):
            f.seek(offset)
            f.write((rng.integers(-8, 8, 256 * dim) / 8).astype(np.float32).tobytes())
    script = tmp_path / "streamer.py"
    script.write_text(STREAMER)
    proc = subprocess.run(
        [sys.executable, str(script), str(path), str(dim)],
        capture_output=True,
        text=True,
        env={**ENV, "MALLOC_ARENA_MAX": "2"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["count"] == size // (4 * dim)
    assert result["fire"] == result["expected"] and 0 < sum(result["fire"])
    assert result["whole"] == "MemoryError", (
        "the cap must be too small for the whole set, or the test proves nothing"
    )
    (tmp_path / "stream.json").write_text(json.dumps(result))


class _Layer:
    def __init__(self, name: str, n: int):
        self.name, self.num_neurons = name, n


class _Wide:
    """Stands in for a NetworkIR with huge layers (only what the budget check reads), so that nothing
    of that size has to be allocated to test the refusal."""

    name = "wide"

    def __init__(self, *widths: int):
        self.layers = [_Layer(f"fc{i}", n) for i, n in enumerate(widths)]

    def hidden_layers(self):
        return self.layers


def test_statistics_past_the_memory_budget_are_refused_before_allocating(monkeypatch):
    from codec.runtime.execution import profile as prof

    monkeypatch.delenv(prof.MAX_STATS_BYTES_ENV, raising=False)
    wide = _Wide(20_000, 30_000, 10)  # co-firing 30k x 20k int64 = 4.5 GiB > the 4 GiB default
    tracemalloc.start()
    try:
        with pytest.raises(ShapeError, match=r"budget of 4,096.0 MiB.*layer wide/fc1 \(4,578") as err:
            prof._check_stats_budget([wide], False, None)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20 and "\n" not in str(err.value) and prof.MAX_STATS_BYTES_ENV in str(err.value)
    monkeypatch.setenv(prof.MAX_STATS_BYTES_ENV, str(8 << 30))
    prof._check_stats_budget([wide], False, None)  # raised: accepted
    # main x peer cross statistics count too
    sizes = prof.stats_bytes([_Wide(100, 50), _Wide(100, 50)], pair=True)
    assert sizes["wide/fc0"] == 4 * 8 * 100 + 2 * 8 * 100 * 100  # per-neuron sums, main x peer cross
    assert sizes["wide/fc1"] == 4 * 8 * 50 + 8 * 50 * 100 + 2 * 8 * 50 * 50  # ... and co-firing with fc0


def test_memory_budget_through_profile_env_and_cli(models, tmp_path, monkeypatch, capsys):
    from codec.runtime.execution.profile import MAX_STATS_BYTES_ENV, profile, profile_pair

    net = _mlp("net")
    x = np.random.default_rng(0).random((64, 784), dtype=np.float32)
    with pytest.raises(ShapeError, match="layer net/fc1"):
        profile(net, x, max_stats_bytes=100)
    with pytest.raises(ShapeError, match="budget"):
        profile_pair(net, _mlp("peer", seed=1), x, max_stats_bytes=500)
    assert profile(net, x, max_stats_bytes=10_000).count == 64
    monkeypatch.setenv(MAX_STATS_BYTES_ENV, "lots")
    with pytest.raises(ConfigError, match="not a whole number"):
        profile(net, x)
    monkeypatch.setenv(MAX_STATS_BYTES_ENV, "100")
    code = main(["profile", models["a"], "--data", _npz(tmp_path), "--quiet"])
    _assert_one_line_error(code, capsys.readouterr().err, "profile", MAX_STATS_BYTES_ENV)
    code = main(["opt", models["a"], "--peer", models["b"], "--data", _npz(tmp_path), "--quiet"])
    _assert_one_line_error(code, capsys.readouterr().err, "opt", MAX_STATS_BYTES_ENV)


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """mkstemp creates 0600 files; artifacts must be readable like any other file the user writes."""
    import os

    from codec.io import write_json_atomic

    path = tmp_path / "report.json"
    write_json_atomic(path, {"ok": True})
    mask = os.umask(0)
    os.umask(mask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~mask


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from /proc (Linux)")
def test_atomic_writes_never_change_the_process_umask(tmp_path, monkeypatch):
    """Setting the umask to read it would let another thread create a world-writable file meanwhile."""
    from codec.io import write_json_atomic

    old = os.umask(0o027)
    try:
        calls = []
        real = os.umask
        monkeypatch.setattr(os, "umask", lambda mask: calls.append(mask) or real(mask))
        write_json_atomic(tmp_path / "report.json", {"ok": True})
        monkeypatch.undo()
        assert calls == []
        assert os.stat(tmp_path / "report.json").st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


# --- replacing a model saved with external data --------------------------------------------------------


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_replacing_an_external_data_model_keeps_each_model_with_its_own_data(tmp_path):
    from codec.ir.lower import external_data_files

    x = np.random.default_rng(0).random((4, 784), dtype=np.float32)
    path = tmp_path / "model.onnx"
    save_model(lower(_mlp("old", seed=0)), path, external_data=True)
    old_out = _run(path, x)
    assert external_data_files(path) == ["model.onnx.data"]
    save_model(lower(_mlp("new", seed=1)), path, external_data=True)
    new_out = _run(path, x)
    assert not np.allclose(old_out, new_out)
    names = external_data_files(path)
    assert len(names) == 1 and names[0] != "model.onnx.data", "the old data file was not written over"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.onnx", names[0]]), "old data removed"
    # a third save goes back to the plain name; a single-file save removes the data file it replaced
    save_model(lower(_mlp("third", seed=2)), path, external_data=True)
    assert external_data_files(path) == ["model.onnx.data"] and not (tmp_path / names[0]).exists()
    save_model(lower(_mlp("single", seed=3)), path)
    assert external_data_files(path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_crash_between_the_data_and_the_model_rename_leaves_the_old_model_whole(tmp_path, monkeypatch):
    x = np.random.default_rng(0).random((4, 784), dtype=np.float32)
    path = tmp_path / "model.onnx"
    save_model(lower(_mlp("old", seed=0)), path, external_data=True)
    old_out = _run(path, x)
    real_replace = os.replace

    def crash_on_model_rename(src, dst):
        if Path(dst) == path:
            raise KeyboardInterrupt("killed between the renames")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_model_rename)
    with pytest.raises(KeyboardInterrupt):
        save_model(lower(_mlp("new", seed=1)), path, external_data=True)
    monkeypatch.undo()
    np.testing.assert_array_equal(_run(path, x), old_out)


@pytest.mark.parametrize(
    "command", [["compile", "--recipe", "classifier_s", "--members", "3"], ["bench", "--profile", "quick"]]
)
def test_an_os_error_outside_codecs_checks_is_one_line(command, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = main([*command, "-o", str(blocker / "run")])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"codec {command[0]}: error: Not a directory")
    assert str(blocker / "run") in err


# --- an interrupt that lands inside an import -------------------------------------------------------------
# Raised while a C extension initialises, KeyboardInterrupt becomes "ImportError: initialization failed"
# (seen in a clean-clone CI run: SIGTERM during the passes' first imports ended compile with exit 2, and a
# SIGINT swallowed that way let compile run to the end). The CLI's handler records the request, so both
# shapes still end as an interruption with a resumable run directory.

_COMPILE = [
    "compile",
    "--recipe",
    "classifier_s",
    "--members",
    "3",
    "--epochs",
    "2",
    "--n-train",
    "600",
    "--n-test",
    "100",
    "--calibration",
    "200",
    "--threads",
    "1",
    "--quiet",
]


def _steps(run_dir: Path) -> list[str]:
    return list(json.loads((run_dir / "state.json").read_text())["steps"])


@pytest.mark.parametrize("shape", ["became_an_error", "was_swallowed"])
def test_an_interrupt_inside_an_import_still_stops_compile_resumably(shape, tmp_path, monkeypatch, capsys):
    from codec.errors import request_interrupt
    from codec.passes.manager import PassManager

    real_run = PassManager.run

    def interrupted_run(self, module):
        request_interrupt()  # what the CLI's signal handler does before raising KeyboardInterrupt
        if shape == "became_an_error":
            raise CodecError("pass 'dna' failed (first pass): ImportError: initialization failed")
        return real_run(self, module)  # the KeyboardInterrupt was lost on the way

    monkeypatch.setattr(PassManager, "run", interrupted_run)
    run_dir = tmp_path / "run"
    code = main([*_COMPILE, "-o", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 130, err
    assert err.strip() == "codec compile: interrupted; run the same command with --resume to continue"
    steps = _steps(run_dir)
    assert "train:main" in steps and "train:peer" in steps and not any(s.startswith("grow") for s in steps)
    assert ("passes" in steps) == (shape == "was_swallowed")  # stopped at the next artifact boundary
    monkeypatch.setattr(PassManager, "run", real_run)
    assert main([*_COMPILE, "-o", str(run_dir), "--resume"]) == 0
    assert (run_dir / "ensemble.onnx").is_file()


# ---------------------------------------------------------------------------------------------------
# Second round (issue 17): hangs and tracebacks instead of one line
# ---------------------------------------------------------------------------------------------------

_FIFO_READERS = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from codec.errors import CodecError
    fifo = Path(sys.argv[1])
    def model():
        from codec.ir import lift
        lift(fifo)
    def session():
        from codec.runtime.execution.session import create_session
        create_session(fifo)
    def npz():
        from codec.runtime.data import load_dataset
        load_dataset(f"npz:{fifo}")
    def idx():
        from codec.runtime.data.formats import read_idx
        read_idx(fifo)
    def checkpoint():
        from codec.runtime.training.train import load_checkpoint
        load_checkpoint(fifo)
    def cli_eval():
        from codec.cli import main
        assert main(["eval", str(fifo), "--data", "mnist_small"]) == 2
        raise CodecError("the CLI refused it with exit 2")
    for reader in (model, session, npz, idx, checkpoint, cli_eval):
        try:
            reader()
        except CodecError as exc:
            print(reader.__name__, "|", exc, flush=True)
        else:
            print(reader.__name__, "| ACCEPTED", flush=True)
    """
)


def test_a_fifo_is_refused_before_it_is_opened_everywhere_a_user_path_is_read(tmp_path):
    """Opening a FIFO blocks until a writer comes: models, data, checkpoints and the CLI refuse one with
    one line from a stat (the child would hang without the check; the timeout is the finding)."""
    fifo = tmp_path / "model.onnx"
    os.mkfifo(fifo)
    script = tmp_path / "readers.py"
    script.write_text(_FIFO_READERS)
    proc = subprocess.run(
        [sys.executable, str(script), str(fifo)],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=REPO,
    )
    lines = dict(line.split(" | ", 1) for line in proc.stdout.strip().splitlines())
    assert set(lines) == {"model", "session", "npz", "idx", "checkpoint", "cli_eval"}, (
        proc.stdout + proc.stderr
    )
    for reader in ("model", "session", "npz", "idx", "checkpoint"):
        assert "is a FIFO, not a regular file" in lines[reader], (reader, lines[reader])
    assert "is a FIFO" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "damage",
    ["config-not-json", "config-list", "state-not-json", "state-no-steps", "state-binary", "state-fifo"],
)
def test_resume_with_damaged_run_json_is_one_line_naming_the_file(damage, tmp_path):
    from codec.pipelines.compile import CompileOptions, Run

    options = CompileOptions(recipe="mnist_mlp")
    run = Run(tmp_path / "run")
    run.prepare(options, resume=False)
    write_json_atomic(run.state_path, {"steps": {"train:main": {"seconds": 1.0}}})
    target = run.path / ("config.json" if damage.startswith("config") else "state.json")
    if damage.endswith("not-json"):
        target.write_text('{"steps": {"train:main": ')
    elif damage == "config-list":
        target.write_text("[1, 2]")
    elif damage == "state-no-steps":
        target.write_text('{"steps": [1]}')
    elif damage == "state-binary":
        target.write_bytes(b"\xff\xfe\x00garbage")
    else:
        target.unlink()
        os.mkfifo(target)
    with pytest.raises(ConfigError) as err:
        Run(tmp_path / "run").prepare(options, resume=True)
    message = str(err.value)
    assert target.name in message and "\n" not in message
    assert "restart the run" in message or "not a regular file" in message


def test_a_zero_width_hidden_layer_is_one_line_in_csne():
    from codec.passes.base import Calibration, EnsembleModule, PassError
    from codec.passes.manager import PassManager
    from codec.passes.registry import parse_pipeline

    def net(name):
        rng = np.random.default_rng(0)
        return NetworkIR(
            name,
            "x",
            "y",
            (6,),
            [
                Dense("fc1", rng.standard_normal((4, 6)).astype(np.float32), np.zeros(4, np.float32), RELU),
                Dense("fc2", np.zeros((0, 4), np.float32), np.zeros(0, np.float32), RELU),
                Dense("out", np.zeros((3, 0), np.float32), np.ones(3, np.float32), Activation("softmax")),
            ],
        )

    calibration = Calibration(
        np.random.default_rng(1).standard_normal((50, 6)).astype(np.float32), batch_size=16
    )
    with pytest.raises(PassError, match="hidden layer 'fc2' has no neurons"):
        PassManager(parse_pipeline("csne{fire=0.0,corr=-1.0}")).run(
            EnsembleModule({"main": net("main"), "peer": net("peer")}, calibration)
        )


# ---------------------------------------------------------------------------------------------------
# Second round (issue 17): outputs written as a unit; outputs never alias inputs; options validated
# ---------------------------------------------------------------------------------------------------


def _opt_members(tmp_path):
    rng = np.random.default_rng(0)
    main_path = save_model(lower(_mlp("main", n_in=20)), tmp_path / "in" / "main.onnx")
    peer_path = save_model(lower(_mlp("peer", n_in=20, seed=1)), tmp_path / "in" / "peer.onnx")
    data = tmp_path / "in" / "cal.npz"
    np.savez(
        data,
        x_train=rng.standard_normal((200, 20)).astype(np.float32),
        y_train=np.arange(200) % 10,
        x_test=rng.standard_normal((50, 20)).astype(np.float32),
        y_test=np.arange(50) % 10,
    )
    return main_path, peer_path, f"npz:{data}"


def test_opt_output_folder_is_replaced_as_a_unit(tmp_path, monkeypatch, capsys):
    """A second run leaves exactly its own files; a run interrupted after main.onnx leaves the previous
    outputs as they were (no new main beside the old report)."""
    main_path, peer_path, data = _opt_members(tmp_path)
    out = tmp_path / "out"
    base = ["opt", str(main_path), "--peer", str(peer_path), "--data", data, "-o", str(out), "--quiet"]
    assert main([*base, "--passes", "dna,nda"]) == 0, capsys.readouterr().err
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert "ndg_main.graphml" in first
    assert main([*base, "--passes", "dna"]) == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["main.onnx", "peer.onnx", "report.json"]  # no stale NDGs

    lower_module = sys.modules["codec.ir.lower"]  # (codec.ir.lower the attribute is the function)
    real = lower_module.save_model
    calls = []

    def interrupted_after_main(model, path, **kw):
        calls.append(Path(path).name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, path, **kw)

    before = {p.name: p.read_bytes() for p in out.iterdir()}
    monkeypatch.setattr(lower_module, "save_model", interrupted_after_main)
    assert main([*base, "--passes", "dna,nda"]) == 130
    assert calls[0] == "main.onnx"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []  # staging removed


@pytest.mark.parametrize("card", ["output", "input", "member"])
def test_export_card_onto_a_model_is_refused_and_nothing_is_overwritten(card, tmp_path, capsys):
    from codec.ir.ensemble import MEMBERS_KEY, emit_ensemble

    members = [_mlp(f"m{i}", n_in=20, seed=i) for i in range(2)]
    paths = [save_model(lower(m), tmp_path / f"m{i}.onnx") for i, m in enumerate(members)]
    ensemble = save_model(
        emit_ensemble(
            members, None, criterion="mean", metadata={MEMBERS_KEY: json.dumps([p.name for p in paths])}
        ),
        tmp_path / "ensemble.onnx",
    )
    output = tmp_path / "deploy.onnx"
    target = {"output": output, "input": ensemble, "member": paths[0]}[card]
    before = {p: p.read_bytes() for p in (ensemble, *paths)}
    code = main(["export", str(ensemble), "-o", str(output), "--card", str(target)])
    err = capsys.readouterr().err
    _assert_one_line_error(code, err, "export", "overlaps")
    assert {p: p.read_bytes() for p in before} == before and not output.exists()


@pytest.mark.parametrize(
    "description, fragment",
    [
        ({"members": ["m0", "m1"], "criterion": "mean", "parameters": "lots"}, "'parameters'"),
        ({"members": 2, "criterion": "mean"}, "'members'"),
        ({"members": ["m0", "m1"], "criterion": "mean", "task": ["x"]}, "'task'"),
        ({"members": ["m0", "m1"], "criterion": "mean", "csn": [{"layer": 3}]}, "'csn'"),
        ({"members": ["m0", "m1"], "criterion": "mean", "shared_layers": "1"}, "'shared_layers'"),
        ({"members": ["m0", "m1"], "criterion": "bogus"}, "'criterion'"),
    ],
    ids=["parameters", "members", "task", "csn", "shared_layers", "criterion"],
)
def test_malformed_ensemble_metadata_is_refused_before_anything_is_written(
    description, fragment, tmp_path, capsys
):
    from codec.ir.ensemble import ENSEMBLE_KEY, MEMBERS_KEY, emit_ensemble

    members = [_mlp(f"m{i}", n_in=20, seed=i) for i in range(2)]
    paths = [save_model(lower(m), tmp_path / f"m{i}.onnx") for i, m in enumerate(members)]
    model = emit_ensemble(
        members, None, criterion="mean", metadata={MEMBERS_KEY: json.dumps([p.name for p in paths])}
    )
    model.metadata_props[ENSEMBLE_KEY] = json.dumps(description)
    ensemble = save_model(model, tmp_path / "ensemble.onnx")
    output = tmp_path / "deploy" / "model.onnx"
    code = main(["export", str(ensemble), "-o", str(output)])
    _assert_one_line_error(code, capsys.readouterr().err, "export", fragment)
    assert not output.exists() and not (output.parent / "model.card.json").exists()


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["opt", "M", "--verify-inputs", "-1"], "--verify-inputs: expected an integer >= 0"),
        (["opt", "M", "--atol", "nan"], "--atol: expected a finite number >= 0"),
        (["opt", "M", "--atol", "inf"], "--atol: expected a finite number >= 0"),
        (["opt", "M", "--atol=-1e-5"], "--atol: expected a finite number >= 0"),
        (["opt", "M", "--batch-size", "0"], "--batch-size: expected a positive integer"),
        (["export", "M", "-o", "x.onnx", "--atol", "nan"], "--atol: expected a finite number >= 0"),
        (["export", "M", "-o", "x.onnx", "--samples", "-3"], "--samples: expected a positive integer"),
        (["eval", "M", "--batch-size", "-1"], "--batch-size: expected a positive integer"),
        (["profile", "M", "--batch-size", "1.5"], "--batch-size: expected a positive integer"),
        (["train", "--lr", "nan"], "--lr: expected a finite number > 0"),
        (["train", "--epochs", "0"], "--epochs: expected a positive integer"),
        (["train", "--seed", "-2"], "--seed: expected an integer >= 0"),
        (["train_ensemble", "--alpha", "1.5"], "--alpha: expected a fraction in [0, 1]"),
        (["train_ensemble", "--width", "0"], "--width: expected a finite number > 0"),
        (
            ["compile", "--recipe", "r", "-o", "x", "--grow-lr-scale", "inf"],
            "--grow-lr-scale: expected a finite number > 0",
        ),
        (
            ["compile", "--recipe", "r", "-o", "x", "--calibration", "-5"],
            "--calibration: expected a positive integer",
        ),
        (["bench", "-o", "x", "--n-boot", "0"], "--n-boot: expected a positive integer"),
        (["bench", "-o", "x", "--min-gain", "nan"], "--min-gain: expected a fraction in [0, 1]"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_numeric_options_cannot_switch_a_check_off(argv, fragment, capsys):
    command = argv[0].replace("_", "-") if argv[0] == "train_ensemble" else argv[0]
    argv = [command if i == 0 else a for i, a in enumerate(argv)]
    code = main(argv)
    _assert_one_line_error(code, capsys.readouterr().err, command, fragment)


def test_the_pass_manager_refuses_tolerances_that_disable_verification():
    from codec.passes.manager import PassManager

    for bad in (
        {"atol": float("nan")},
        {"atol": -1.0},
        {"atol": float("inf")},
        {"verify_inputs": -1},
        {"verify_inputs": 0},
    ):
        with pytest.raises(ConfigError):
            PassManager([], **bad)
