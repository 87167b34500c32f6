"""NetworkIR: codec's neuron-granular intermediate representation.

A network is an ordered chain of layers from one input to one output. Compute layers (`Dense`, `Conv`)
hold their weights, bias, activation and one role per neuron; a Dense neuron is one output unit (one row
of the weight matrix), a Conv neuron is one output channel (one filter). Structural layers (`Flatten`,
`Pool`) carry no weights; they keep the neuron-index mapping between the compute layers around them
(a Flatten after a Conv maps feature j to channel j // (H*W)).

The chain shape is deliberate: it is what torch's exporters emit for the MLPs and CNNs CODE works on,
and it makes "layer l and its successor" unambiguous for the passes. Branching graphs are refused at lift
time with the node that branches (see `codec.ir.lift`).
"""

from __future__ import annotations

import copy
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Iterator, Union

import numpy as np


class Role(enum.IntEnum):
    """What a neuron is for codec; stored per neuron in `ComputeLayer.roles`."""

    TRAINABLE = 0
    FROZEN_SHARED = 1  # part of the common sub-network: frozen, its weights shared between members
    # Reserved; no pass sets it. DNA is an analysis: it reports dead neurons without editing the IR, and
    # DNE removes them, so no network holds a dead neuron. The value stays so stored roles keep their codes.
    DEAD = 2


ACTIVATION_KINDS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "softmax")
# Activations that are monotone non-decreasing element-wise: they commute with max pooling, which lets
# lift accept torch's common `relu(max_pool(conv(x)))` by moving the activation onto the conv.
MONOTONE_ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh")


@dataclass(frozen=True)
class Activation:
    """An element-wise activation (softmax over the neuron axis) and its firing condition.

    A neuron *fires* on an input when its post-activation value exceeds `fire_threshold`: ReLU, leaky
    ReLU, tanh and identity fire above 0, sigmoid above 0.5 (its value at 0), softmax above 1/K (the
    uniform value). So the threshold is the activation's value at a pre-activation of 0 — except for
    softmax, which has no element-wise zero.
    """

    kind: str = "identity"
    alpha: float = 0.01  # leaky_relu's negative slope

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATION_KINDS:
            raise ValueError(f"unknown activation {self.kind!r}; known: {', '.join(ACTIVATION_KINDS)}")

    def fire_threshold(self, num_neurons: int) -> float:
        if self.kind == "sigmoid":
            return 0.5
        if self.kind == "softmax":
            return 1.0 / max(num_neurons, 1)
        return 0.0

    def apply(self, z: np.ndarray, axis: int = 1) -> np.ndarray:
        """Apply to pre-activations `z` (neurons on `axis`); a numpy reference used by tests and checks."""
        if self.kind == "identity":
            return z
        if self.kind == "relu":
            return np.maximum(z, 0)
        if self.kind == "leaky_relu":
            return np.where(z >= 0, z, self.alpha * z)
        if self.kind == "sigmoid":
            return 1.0 / (1.0 + np.exp(-z))
        if self.kind == "tanh":
            return np.tanh(z)
        e = np.exp(z - z.max(axis=axis, keepdims=True))
        return e / e.sum(axis=axis, keepdims=True)


@dataclass(eq=False)
class Dense:
    """A fully connected layer: y = act(x @ weight.T + bias); neuron i is output unit i (weight row i)."""

    name: str
    weight: np.ndarray  # (out_features, in_features), float32
    bias: np.ndarray  # (out_features,), float32
    activation: Activation = field(default_factory=Activation)
    roles: np.ndarray | None = None  # (out_features,) int8 of Role; None means all trainable

    def __post_init__(self) -> None:
        _init_compute(self)

    @property
    def num_neurons(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[1])

    @property
    def num_parameters(self) -> int:
        return int(self.weight.size + self.bias.size)


@dataclass(eq=False)
class Conv:
    """A 2-D convolution (groups = 1); neuron i is output channel i (filter weight[i])."""

    name: str
    weight: np.ndarray  # (out_channels, in_channels, kh, kw), float32
    bias: np.ndarray  # (out_channels,), float32
    activation: Activation = field(default_factory=Activation)
    roles: np.ndarray | None = None
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # ONNX order: top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        _init_compute(self)

    @property
    def num_neurons(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1])

    @property
    def kernel_shape(self) -> tuple[int, int]:
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    @property
    def num_parameters(self) -> int:
        return int(self.weight.size + self.bias.size)

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, int, int]:
        _, h, w = in_shape
        kh, kw = self.kernel_shape
        oh = (h + self.pads[0] + self.pads[2] - self.dilations[0] * (kh - 1) - 1) // self.strides[0] + 1
        ow = (w + self.pads[1] + self.pads[3] - self.dilations[1] * (kw - 1) - 1) // self.strides[1] + 1
        return self.num_neurons, oh, ow


@dataclass(eq=False)
class Pool:
    """Max or average pooling over channel neurons; keeps the neuron count and index mapping."""

    name: str
    mode: str  # "max" | "avg"
    kernel_shape: tuple[int, int]
    strides: tuple[int, int]
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)
    ceil_mode: bool = False
    count_include_pad: bool = False  # AveragePool only
    is_global: bool = False  # GlobalAveragePool / GlobalMaxPool: kernel = the whole feature map

    def output_shape(self, in_shape: tuple[int, ...]) -> tuple[int, int, int]:
        c, h, w = in_shape
        if self.is_global:
            return c, 1, 1
        dims = []
        for i, size in enumerate((h, w)):
            span = size + self.pads[i] + self.pads[i + 2] - self.kernel_shape[i]
            out = (-(-span // self.strides[i]) if self.ceil_mode else span // self.strides[i]) + 1
            if self.ceil_mode and (out - 1) * self.strides[i] >= size + self.pads[i]:
                out -= 1  # ONNX/torch: the last window must start inside the (left-padded) input
            dims.append(out)
        return c, dims[0], dims[1]


@dataclass(eq=False)
class Flatten:
    """Flatten (C, H, W) to C*H*W features (axis 1); feature j belongs to channel j // (H*W)."""

    name: str


ComputeLayer = Union[Dense, Conv]
Layer = Union[Dense, Conv, Pool, Flatten]


def _init_compute(layer: Dense | Conv) -> None:
    layer.weight = np.ascontiguousarray(layer.weight, dtype=np.float32)
    layer.bias = np.ascontiguousarray(layer.bias, dtype=np.float32).reshape(-1)
    if layer.bias.shape[0] != layer.weight.shape[0]:
        raise ValueError(
            f"layer {layer.name!r}: bias has {layer.bias.shape[0]} entries for {layer.weight.shape[0]} neurons"
        )
    if layer.roles is None:
        layer.roles = np.full(layer.weight.shape[0], Role.TRAINABLE, dtype=np.int8)
    else:
        layer.roles = np.asarray(layer.roles, dtype=np.int8).reshape(-1)
        if layer.roles.shape[0] != layer.weight.shape[0]:
            raise ValueError(f"layer {layer.name!r}: {layer.roles.shape[0]} roles for {layer.weight.shape[0]} neurons")


def is_compute(layer: Layer) -> bool:
    return isinstance(layer, (Dense, Conv))


@dataclass(eq=False)
class NetworkIR:
    """A lifted network: one input, an ordered chain of layers, one output.

    Attributes:
        name: a label (the model file's stem when lifted).
        input_name / output_name: the ONNX graph's input and output names, kept so that lowering gives a
            drop-in replacement for the original model.
        input_shape: one example's shape, without the batch dimension, e.g. (1, 28, 28) or (784,).
        layers: the chain, in execution order.
        metadata: free-form string metadata carried into the lowered model.
    """

    name: str
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]
    layers: list[Layer]
    metadata: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def copy(self) -> "NetworkIR":
        """A deep copy (weights included): passes transform copies, never the analysed original."""
        return copy.deepcopy(self)

    def compute_layers(self) -> list[ComputeLayer]:
        return [layer for layer in self.layers if is_compute(layer)]

    def hidden_layers(self) -> list[ComputeLayer]:
        """Compute layers whose neurons are internal (all but the output layer)."""
        return self.compute_layers()[:-1]

    def layer(self, name: str) -> Layer:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"no layer named {name!r} in {self.name!r}")

    def index(self, name: str) -> int:
        for i, layer in enumerate(self.layers):
            if layer.name == name:
                return i
        raise KeyError(f"no layer named {name!r} in {self.name!r}")

    def shapes(self) -> list[tuple[int, ...]]:
        """The output shape (without batch) of every layer, in order."""
        shapes = []
        shape = tuple(self.input_shape)
        for layer in self.layers:
            if isinstance(layer, Dense):
                shape = (layer.num_neurons,)
            elif isinstance(layer, (Conv, Pool)):
                shape = layer.output_shape(shape)
            elif isinstance(layer, Flatten):
                shape = (int(np.prod(shape)),)
            shapes.append(shape)
        return shapes

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.shapes()[-1] if self.layers else tuple(self.input_shape)

    @property
    def num_parameters(self) -> int:
        return sum(layer.num_parameters for layer in self.compute_layers())

    def previous_compute(self, name: str) -> ComputeLayer | None:
        """The compute layer feeding `name` (through structural layers), or None for the first one."""
        for layer in reversed(self.layers[: self.index(name)]):
            if is_compute(layer):
                return layer
        return None

    def next_compute(self, name: str) -> ComputeLayer | None:
        """The compute layer that consumes `name`'s neurons, or None for the output layer."""
        for layer in self.layers[self.index(name) + 1 :]:
            if is_compute(layer):
                return layer
        return None

    def input_neuron_map(self, name: str) -> np.ndarray:
        """For compute layer `name`, the neuron of the previous compute layer behind each input feature.

        A Dense layer reading a flattened (C, H, W) map has C*H*W input features, feature j coming from
        channel j // (H*W); a Conv reads channels directly. For the first compute layer the map is the
        identity over the network's input features (input channels for a Conv).
        """
        idx = self.index(name)
        layer = self.layers[idx]
        if not is_compute(layer):
            raise ValueError(f"layer {name!r} is not a compute layer")
        if self.previous_compute(name) is None:
            # the network input: every input feature (or channel, for a Conv) is its own "neuron"
            return np.arange(layer.in_features if isinstance(layer, Dense) else layer.in_channels)
        shapes = self.shapes()
        in_shape = shapes[idx - 1]
        if isinstance(layer, Conv) or len(in_shape) == 1 and not self._flattened_map(idx, shapes):
            return np.arange(in_shape[0])
        c, h, w = self._flattened_map(idx, shapes)
        return np.repeat(np.arange(c), h * w)

    def _flattened_map(self, idx: int, shapes: list[tuple[int, ...]]) -> tuple[int, ...] | None:
        """The (C, H, W) shape flattened on the way into layer `idx`, or None if none was."""
        for j in range(idx - 1, -1, -1):
            if is_compute(self.layers[j]):
                return None
            if isinstance(self.layers[j], Flatten):
                before = tuple(self.input_shape) if j == 0 else shapes[j - 1]
                return before if len(before) == 3 else None
        return None

    def summary(self) -> list[dict]:
        """One dict per layer: name, kind, neurons, parameters, activation, output shape, role counts."""
        rows = []
        for layer, shape in zip(self.layers, self.shapes()):
            row = {"name": layer.name, "kind": type(layer).__name__.lower(), "output_shape": list(shape)}
            if is_compute(layer):
                row.update(
                    neurons=layer.num_neurons,
                    parameters=layer.num_parameters,
                    activation=layer.activation.kind,
                    roles={role.name.lower(): int((layer.roles == role).sum()) for role in Role},
                )
            elif isinstance(layer, Pool):
                row.update(mode=layer.mode, kernel=list(layer.kernel_shape), strides=list(layer.strides))
            rows.append(row)
        return rows

    def to_text(self) -> str:
        """A readable listing of the IR (for --print-ir-after-all): one line per layer."""
        lines = [f"network {self.name} ({self.input_name}: {list(self.input_shape)} -> {self.output_name})"]
        for layer, shape in zip(self.layers, self.shapes()):
            kind = type(layer).__name__
            if is_compute(layer):
                roles = ", ".join(f"{r.name.lower()} {int((layer.roles == r).sum())}" for r in Role if (layer.roles == r).any())
                act = layer.activation.kind + (f"({layer.activation.alpha:g})" if layer.activation.kind == "leaky_relu" else "")
                lines.append(f"  {kind:<7} {layer.name}: {layer.num_neurons} neurons, {act}, weight {list(layer.weight.shape)} -> {list(shape)} [{roles}]")
            elif isinstance(layer, Pool):
                lines.append(f"  {kind:<7} {layer.name}: {layer.mode} {list(layer.kernel_shape)} stride {list(layer.strides)} -> {list(shape)}")
            else:
                lines.append(f"  {kind:<7} {layer.name} -> {list(shape)}")
        return "\n".join(lines)

    def same_architecture(self, other: "NetworkIR", widths: bool = True) -> str | None:
        """None when `other` has the same input shape, layer kinds, activations and (with `widths`) neuron
        counts; else the first difference, as a phrase for an error message."""
        if tuple(self.input_shape) != tuple(other.input_shape):
            return f"input shapes differ: {list(self.input_shape)} vs {list(other.input_shape)}"
        if len(self.layers) != len(other.layers):
            return f"{len(self.layers)} layers vs {len(other.layers)}"
        for i, (a, b) in enumerate(zip(self.layers, other.layers)):
            if type(a) is not type(b):
                return f"layer {i}: {type(a).__name__} vs {type(b).__name__}"
            if widths and is_compute(a) and a.weight.shape != b.weight.shape:
                return f"layer {i} ({a.name} / {b.name}): weight shape {a.weight.shape} vs {b.weight.shape}"
            if is_compute(a) and a.activation != b.activation:
                return f"layer {i}: activation {a.activation.kind} vs {b.activation.kind}"
        return None

    def verify(self) -> None:
        """Raise IRVerificationError if the network breaks an IR invariant (see `codec.ir.verify`)."""
        from codec.ir.verify import verify_network  # verify.py imports this module

        verify_network(self)


def replace(layer: Layer, **changes) -> Layer:
    """A copy of `layer` with some fields changed (dataclasses.replace, re-validating compute layers)."""
    return dataclasses.replace(layer, **changes)
