"""onnxruntime sessions for codec: one place that picks execution providers and runs models in batches."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np

from codec.errors import ModelLoadError, ShapeError, first_line


def providers() -> list[str]:
    """The execution providers to use: CUDA first when this onnxruntime build has it, then CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    chosen = [p for p in ("CUDAExecutionProvider",) if p in available]
    return chosen + ["CPUExecutionProvider"]


def create_session(model: str | os.PathLike | bytes, intra_op_threads: int | None = None):
    """Create an onnxruntime InferenceSession for a model path or serialized model bytes.

    Raises:
        ModelLoadError: onnxruntime refuses the model (the message says why).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if intra_op_threads:
        opts.intra_op_num_threads = intra_op_threads
    source = model if isinstance(model, bytes) else str(model)
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=providers())
    except Exception as exc:  # onnxruntime raises its own exception types for every refusal
        name = "<in-memory model>" if isinstance(model, bytes) else Path(model).name
        raise ModelLoadError(f"onnxruntime cannot run {name}: {first_line(exc)}") from exc


def _check_batch(session, x: np.ndarray) -> None:
    inp = session.get_inputs()[0]
    expected = inp.shape[1:]
    got = x.shape[1:]
    ok = len(expected) == len(got) and all(not isinstance(e, int) or e == g for e, g in zip(expected, got))
    if not ok:
        want = "x".join(str(e) if isinstance(e, int) else "?" for e in expected)
        raise ShapeError(
            f"data examples have shape {'x'.join(map(str, got))} but the model input {inp.name!r} expects {want}"
        )


def run_batches(session, x: np.ndarray, batch_size: int = 256, outputs: list[str] | None = None) -> Iterator[list]:
    """Run `session` over `x` in batches, yielding each batch's list of outputs."""
    if len(x) == 0:
        return
    _check_batch(session, x)
    name = session.get_inputs()[0].name
    for start in range(0, len(x), batch_size):
        batch = np.ascontiguousarray(x[start : start + batch_size], dtype=np.float32)
        yield session.run(outputs, {name: batch})


def predict(model, x: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """Run a single-output model over `x` and return its outputs stacked, (N, ...)."""
    session = model if hasattr(model, "run") else create_session(model)
    parts = [outs[0] for outs in run_batches(session, x, batch_size)]
    if not parts:
        raise ShapeError("no inputs to run the model on (empty data)")
    return np.concatenate(parts, axis=0)
