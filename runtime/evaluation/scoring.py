"""Scoring members on data: run them with onnxruntime, then compute the ensemble's metrics.

The one implementation behind `codec eval`, the compile report, `codec train`'s test score, the coupled
ensemble's report and the benchmark's arms: `model_outputs` runs one member, `member_outputs` runs
several and checks they agree in shape, and `score_members` turns their stacked outputs into the metrics
of `codec.runtime.evaluation.metrics` (classification) or reconstruction errors (autoencoders).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from codec.errors import ShapeError
from codec.runtime.evaluation import metrics

BATCH_SIZE = 1024


def _session(model, threads: int | None = None):
    from codec.runtime.execution.session import create_session

    return model if hasattr(model, "run") else create_session(model, intra_op_threads=threads)


def _static_dims(shape) -> list:
    """An onnxruntime shape without its batch dimension, symbolic dims as None."""
    return [d if isinstance(d, int) else None for d in list(shape)[1:]]


def _same_dims(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is None or y is None or x == y for x, y in zip(a, b))


def _describe(dims: list) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in dims) + ")"


def model_outputs(
    model, x: np.ndarray, *, batch_size: int = BATCH_SIZE, threads: int | None = None, name: str | None = None
) -> np.ndarray:
    """A single-output ONNX model's outputs on `x`, (N, ...).

    Args:
        model: a path, serialized bytes or an onnxruntime session.
        x: the examples.
        batch_size: examples per onnxruntime call.
        threads: onnxruntime's intra-op threads (None: its default).
        name: the model's name in messages (default its file name).

    `x` is adapted to the model by the one input rule (`codec.runtime.execution.inputs`: flat <-> image
    layouts, the input's dtype, a fixed batch size).
    """
    from codec.runtime.execution.session import predict

    return predict(_session(model, threads), x, batch_size=batch_size, name=name)


def member_outputs(
    models: Sequence,
    x: np.ndarray,
    *,
    names: Sequence[str] | None = None,
    batch_size: int = BATCH_SIZE,
    threads: int | None = None,
) -> np.ndarray:
    """Every member's outputs on `x`, stacked (M, N, ...) as float64.

    The members' declared output shapes are checked against the first member's before any runs; each
    member gets `x` by the one input rule (see `model_outputs`), so members may differ in input layout.

    Raises:
        ModelLoadError: a member onnxruntime cannot load.
        ShapeError: members whose input or output shapes differ, or data that does not fit them.
    """
    names = [str(m) for m in models] if names is None else list(names)
    sessions = [_session(m, threads) for m in models]
    first_out = _static_dims(sessions[0].get_outputs()[0].shape)
    for name, session in zip(names[1:], sessions[1:]):
        dims_out = _static_dims(session.get_outputs()[0].shape)
        if not _same_dims(dims_out, first_out):
            raise ShapeError(
                f"member {name} outputs {_describe(dims_out)} but {names[0]} outputs {_describe(first_out)}"
            )
    outputs = []
    for name, session in zip(names, sessions):
        out = model_outputs(session, x, batch_size=batch_size, name=name)
        if outputs and out.shape != outputs[0].shape:
            raise ShapeError(
                f"member {name} outputs {out.shape[1:]} per example but {names[0]} outputs "
                f"{outputs[0].shape[1:]}"
            )
        outputs.append(out)
    return np.stack(outputs).astype(np.float64)


def softmax_scores(stack: np.ndarray, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Members that output scores (logits) rather than probabilities, softmaxed: the criteria combine
    probabilities. Returns the (M, N, K) probabilities and the names of the members that were softmaxed."""
    stack = np.array(stack, dtype=np.float64)
    softmaxed = []
    for index, name in enumerate(names):
        member = stack[index]
        if np.any(member < 0) or not np.allclose(member.sum(axis=1), 1.0, atol=1e-3):
            shifted = np.exp(member - member.max(axis=1, keepdims=True))
            stack[index] = shifted / shifted.sum(axis=1, keepdims=True)
            softmaxed.append(name)
    return stack, softmaxed


def score_members(outputs: np.ndarray, task: str, target: np.ndarray, criterion: str) -> dict:
    """The ensemble's metrics from its members' stacked outputs.

    Args:
        outputs: (M, N, K) member probabilities for a classifier; (M, N, ...) reconstructions otherwise.
        task: "classification" or "reconstruction".
        target: the labels (N,), or the inputs being reconstructed (N, ...) (flattened like the outputs).
        criterion: how a classifier's members combine (reconstructions are averaged).

    Returns:
        For a classifier `metrics.evaluate_classifier`'s dict; for an autoencoder member_mse (list),
        cumulative_mse (list, the mean reconstruction of the first m members) and mse (that of all).
    """
    if task == "classification":
        return metrics.evaluate_classifier(outputs, target, criterion)
    target = np.asarray(target).reshape(len(target), -1)
    flat = np.asarray(outputs).reshape(len(outputs), len(target), -1)
    return {
        "member_mse": [metrics.mse(recon, target) for recon in flat],
        "cumulative_mse": [float(v) for v in metrics.cumulative_mse(flat, target)],
        "mse": metrics.mse(flat.mean(axis=0), target),
    }


__all__ = ["member_outputs", "model_outputs", "score_members", "softmax_scores"]
