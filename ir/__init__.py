"""codec.ir: the neuron-granular IR, lifting from ONNX and lowering back to it."""

from codec.ir.lift import lift, load_model
from codec.ir.lower import lower, save_model, tap_names, to_bytes
from codec.ir.network import (
    INPUT,
    Activation,
    Add,
    Concat,
    Conv,
    Dense,
    Flatten,
    Layer,
    NetworkIR,
    Pool,
    Role,
    is_compute,
)

__all__ = [
    "INPUT",
    "Activation",
    "Add",
    "Concat",
    "Conv",
    "Dense",
    "Flatten",
    "Layer",
    "NetworkIR",
    "Pool",
    "Role",
    "is_compute",
    "lift",
    "load_model",
    "lower",
    "save_model",
    "tap_names",
    "to_bytes",
]
