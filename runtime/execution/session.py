"""onnxruntime sessions for codec: one place that picks execution providers and runs models in batches."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from codec.errors import ModelLoadError, ShapeError, first_line
from codec.io import regular_file
from codec.runtime.execution.inputs import InputSpec, batches


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
    source = model if isinstance(model, bytes) else str(regular_file(model, "model file", ModelLoadError))
    try:
        return ort.InferenceSession(source, sess_options=opts, providers=providers())
    except Exception as exc:  # onnxruntime raises its own exception types for every refusal
        name = "<in-memory model>" if isinstance(model, bytes) else Path(model).name
        raise ModelLoadError(f"onnxruntime cannot run {name}: {first_line(exc)}") from exc


def model_name(session) -> str:
    """The file name of the model a session runs, for messages ("the model" for one built from bytes)."""
    path = getattr(session, "_model_path", None)  # onnxruntime keeps the path it was given
    return Path(path).name if path else "the model"


def run_batches(
    session,
    x: np.ndarray,
    batch_size: int = 256,
    outputs: list[str] | None = None,
    *,
    model: str | None = None,
) -> Iterator[list]:
    """Run `session` over `x` in batches, yielding each batch's list of outputs.

    The examples are adapted to the model by the one rule of `codec.runtime.execution.inputs` (reshaped
    flat <-> image, cast to the input's type, a fixed batch run in chunks of its size with the padding's
    outputs dropped).

    Raises:
        ShapeError: data that does not fit the model, naming `model` (default: the session's file name).
    """
    if len(x) == 0:
        return
    model = model or model_name(session)
    spec = InputSpec.of_session(session, model)
    for batch, real in batches(x, spec, batch_size, model):
        values = session.run(outputs, {spec.name: batch})
        yield values if real == len(batch) else [v[:real] for v in values]


def predict(model, x: np.ndarray, batch_size: int = 256, *, name: str | None = None) -> np.ndarray:
    """Run a single-output model (a path, bytes or a session) over `x`; its outputs stacked, (N, ...).

    `x` is adapted to the model as in `run_batches`; `name` is the model's name in messages.
    """
    session = model if hasattr(model, "run") else create_session(model)
    parts = [outs[0] for outs in run_batches(session, x, batch_size, model=name)]
    if not parts:
        raise ShapeError("no inputs to run the model on (empty data)")
    return np.concatenate(parts, axis=0)
