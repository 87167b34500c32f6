"""How data is fed to a model: the one input-adaptation rule every command uses.

`codec eval`, `profile`, `opt` (calibration and verification), `export` (parity) and `compile` (scoring)
all go through `fit_examples` and, for onnxruntime, `codec.runtime.execution.session.run_batches`. For a
model input with per-example shape S, element type T and batch dimension B:

1. examples of shape S are used as they are; examples with as many values as S in another layout (flat
   `[784]` data for a `[1, 28, 28]` model, or images for a flat MLP) are reshaped to S (C order, the layout
   torch's Flatten and codec's datasets share);
2. they are cast to T: a float16 or float64 model gets float16 or float64 inputs (onnxruntime refuses any
   other type); the cast is per batch, so a large calibration set is never copied whole;
3. a fixed B (what `torch.onnx.export` writes without dynamic axes) is run in chunks of exactly B examples,
   the last chunk padded with zeros whose outputs are dropped; a dynamic B takes the caller's batch size;

anything else is a `ShapeError` naming the model, the shape it expects and the shape it was given.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from codec.errors import ShapeError

# onnxruntime's names for the element types a model input can have that data can be cast to
_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(bfloat16)": None,  # numpy has no bfloat16: refused by name below
}


@dataclass(frozen=True)
class InputSpec:
    """What a model's (first) input takes.

    Attributes:
        name: the input's name in the graph.
        shape: the per-example shape; None for a symbolic dimension.
        dtype: the numpy type the examples are cast to.
        batch: the fixed batch size, or None when the batch dimension is dynamic.
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype
    batch: int | None = None

    @classmethod
    def of_session(cls, session, model: str = "the model") -> InputSpec:
        """The spec of an onnxruntime session's first input.

        Raises:
            ShapeError: an input type no data can be cast to (integers, strings, bfloat16), or no batch axis.
        """
        inp = session.get_inputs()[0]
        dtype = _ORT_TYPES.get(inp.type)
        if dtype is None:
            raise ShapeError(
                f"{model}: input {inp.name!r} has type {inp.type}; codec feeds float32, float16 or double"
            )
        dims = list(inp.shape)
        if not dims:
            raise ShapeError(f"{model}: input {inp.name!r} is a scalar; codec feeds batches of examples")
        batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else None
        shape = tuple(d if isinstance(d, int) and d > 0 else None for d in dims[1:])
        return cls(inp.name, shape, np.dtype(dtype), batch)


def _describe(shape) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def fit_shape(x: np.ndarray, shape: tuple[int | None, ...], model: str = "the model") -> np.ndarray:
    """`x` with its examples in `shape` (rule 1 of the module docstring); a view when only the layout changes.

    Raises:
        ShapeError: the examples cannot take `shape`; the message names `model` and both shapes.
    """
    given = tuple(x.shape[1:])
    if len(given) == len(shape) and all(s is None or s == g for s, g in zip(shape, given)):
        return x
    if all(s is not None for s in shape) and int(np.prod(given)) == int(np.prod(shape, dtype=np.int64)):
        return x.reshape((len(x), *shape))
    raise ShapeError(
        f"{model} expects {_describe(shape)} per example, but the data's examples are {_describe(given)} "
        "(and cannot be reshaped: the sizes differ)"
    )


def fit_examples(
    x: np.ndarray, shape: tuple[int | None, ...], dtype=np.float32, model: str = "the model"
) -> np.ndarray:
    """`x` reshaped (rule 1) and cast (rule 2) for a model input of per-example `shape` and type `dtype`.

    Use `batches` instead for data that should not be copied whole.
    """
    return np.ascontiguousarray(fit_shape(x, shape, model), dtype=dtype)


def batches(
    x: np.ndarray, spec: InputSpec, batch_size: int, model: str = "the model"
) -> Iterator[tuple[np.ndarray, int]]:
    """The batches to run `x` in under `spec`: (batch, how many of its examples are real), rules 1-3.

    A fixed-batch input gets exactly `spec.batch` examples per batch, the last one padded with zeros; the
    caller keeps the first `real` rows of each output.
    """
    x = fit_shape(x, spec.shape, model)
    step = spec.batch or batch_size
    if step < 1:
        raise ShapeError(f"batch size must be positive, got {step}")
    for start in range(0, len(x), step):
        batch = np.ascontiguousarray(x[start : start + step], dtype=spec.dtype)
        real = len(batch)
        if spec.batch is not None and real < spec.batch:
            batch = np.concatenate([batch, np.zeros((spec.batch - real, *batch.shape[1:]), spec.dtype)])
        yield batch, real


__all__ = ["InputSpec", "batches", "fit_examples", "fit_shape"]
