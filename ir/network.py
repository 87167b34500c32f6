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
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np


class Role(enum.IntEnum):
    """What a neuron is for codec; stored per neuron in `ComputeLayer.roles`."""

    TRAINABLE = 0
    FROZEN_SHARED = 1  # part of the common sub-network: frozen, its weights shared between members
    # Reserved; no pass sets it. DNA is an analysis: it reports dead neurons without editing the IR, and
    # DNE removes them, so no network holds a dead neuron. The value stays so stored roles keep their codes.
    DEAD = 2


ACTIVATION_KINDS = (
    "identity",
    "relu",
    "leaky_relu",
    "sigmoid",
    "tanh",
    "softmax",
    "gelu",
    "gelu_tanh",
    "silu",
    "elu",
    "softplus",
    "hardswish",
)
# Activations that are monotone non-decreasing element-wise: they commute with max pooling, which lets
# lift accept torch's common `relu(max_pool(conv(x)))` by moving the activation onto the conv. ELU is
# monotone only for alpha >= 0 (see `Activation.monotone`), so it is not listed here.
MONOTONE_ACTIVATIONS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh", "softplus")
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def erf(z: np.ndarray) -> np.ndarray:
    """The error function, element-wise (float64)."""
    try:
        from scipy.special import erf
    except ImportError:  # scipy comes with scikit-learn, but the IR does not require it
        return np.vectorize(math.erf, otypes=[np.float64])(z)
    return erf(z)


@dataclass(frozen=True)
class Activation:
    """An element-wise activation (softmax over the neuron axis) and its firing condition.

    A neuron *fires* on an input when its post-activation value exceeds `fire_threshold`, the activation's
    value at a pre-activation of 0 (except softmax, which has no element-wise zero and fires above the
    uniform value 1/K). For every kind here (leaky ReLU and ELU with alpha >= 0), value > threshold holds
    exactly when the pre-activation is positive, so "fires" means "its pre-activation was positive"
    whatever the activation:

    ==========  ===============================  ==============  ========================================
    kind        f(z)                             f(0), threshold monotone (may cross a max pool)?
    ==========  ===============================  ==============  ========================================
    identity    z                                0               yes
    relu        max(z, 0)                        0               yes
    leaky_relu  z if z >= 0 else alpha z         0               yes for alpha >= 0 (torch's default 0.01)
    sigmoid     1 / (1 + e^-z)                   0.5             yes
    tanh        tanh z                           0               yes
    softmax     e^z_i / sum_j e^z_j              1/K             (not element-wise; output layer only)
    gelu        z Phi(z) = z (1 + erf(z/√2)) / 2 0               no: minimum -0.17 at z = -0.75
    gelu_tanh   z (1 + tanh(√(2/π)(z+0.044715z³)))/2  0          no: GELU's tanh approximation
    silu        z sigmoid(z) (Swish)             0               no: minimum -0.28 at z = -1.28
    elu         z if z > 0 else alpha (e^z - 1)  0               yes iff alpha >= 0 (slope alpha e^z < 0
                                                                 for z < 0 when alpha < 0)
    softplus    ln(1 + e^z)                      ln 2 = 0.693    yes (never exactly 0: DNA's zero
                                                                 criterion never finds it dead)
    hardswish   z relu6(z + 3) / 6               0               no: negative on (-3, 0), 0 for z <= -3
    ==========  ===============================  ==============  ========================================

    The non-monotone ones are never moved across max pooling (max then f differs from f then max when
    the window's values straddle the minimum). DNA's `zero` criterion reads post-activation values, so it
    is exact for every kind: a GELU/SiLU neuron is exactly 0 only where its pre-activation is 0 (or, in
    float32, very negative), a hardswish one wherever it is <= -3.
    """

    kind: str = "identity"
    alpha: float = 0.01  # leaky_relu's negative slope; elu's alpha (lift sets it; torch's default is 1.0)

    def __post_init__(self) -> None:
        if self.kind not in ACTIVATION_KINDS:
            raise ValueError(f"unknown activation {self.kind!r}; known: {', '.join(ACTIVATION_KINDS)}")

    @property
    def monotone(self) -> bool:
        """Monotone non-decreasing element-wise, so it commutes with max pooling."""
        if self.kind in ("elu", "leaky_relu"):
            return self.alpha >= 0
        return self.kind in MONOTONE_ACTIVATIONS

    def fire_threshold(self, num_neurons: int) -> float:
        if self.kind == "sigmoid":
            return 0.5
        if self.kind == "softplus":
            return math.log(2.0)
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
        if self.kind == "gelu":
            return 0.5 * z * (1.0 + erf(z / math.sqrt(2.0)))
        if self.kind == "gelu_tanh":
            return 0.5 * z * (1.0 + np.tanh(_SQRT_2_OVER_PI * (z + 0.044715 * z**3)))
        if self.kind == "silu":
            return z / (1.0 + np.exp(-z))
        if self.kind == "elu":
            return np.where(z > 0, z, self.alpha * (np.exp(np.minimum(z, 0)) - 1.0))
        if self.kind == "softplus":
            return np.logaddexp(0.0, z)
        if self.kind == "hardswish":
            return z * np.clip(z + 3.0, 0.0, 6.0) / 6.0
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
    """A 2-D convolution; neuron i is output channel i (filter weight[i]).

    With `groups` g > 1 the input channels and the filters are split into g groups: filter i reads only
    input channels of group i // (out_channels / g), and `weight` has in_channels / g columns (ONNX's
    layout). Removing one channel would leave groups of unequal size, which neither ONNX nor torch can
    express, so neuron surgery refuses grouped convolutions (see `codec.ir.surgery.removal_blocker`).
    """

    name: str
    weight: np.ndarray  # (out_channels, in_channels, kh, kw), float32
    bias: np.ndarray  # (out_channels,), float32
    activation: Activation = field(default_factory=Activation)
    roles: np.ndarray | None = None
    strides: tuple[int, int] = (1, 1)
    pads: tuple[int, int, int, int] = (0, 0, 0, 0)  # ONNX order: top, left, bottom, right
    dilations: tuple[int, int] = (1, 1)
    groups: int = 1

    def __post_init__(self) -> None:
        _init_compute(self)
        if self.groups < 1 or self.weight.shape[0] % self.groups:
            raise ValueError(
                f"layer {self.name!r}: {self.weight.shape[0]} filters do not split into {self.groups} groups"
            )

    @property
    def num_neurons(self) -> int:
        return int(self.weight.shape[0])

    @property
    def in_channels(self) -> int:
        return int(self.weight.shape[1]) * self.groups

    def full_weight(self) -> np.ndarray:
        """The weight as (out_channels, in_channels, kh, kw), zero between groups (the dense equivalent)."""
        if self.groups == 1:
            return self.weight
        out, per_group = self.weight.shape[0], self.weight.shape[1]
        full = np.zeros((out, self.in_channels, *self.weight.shape[2:]), np.float32)
        filters = out // self.groups
        for g in range(self.groups):
            full[g * filters : (g + 1) * filters, g * per_group : (g + 1) * per_group] = self.weight[
                g * filters : (g + 1) * filters
            ]
        return full

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


@dataclass(eq=False)
class Add:
    """The element-wise sum of two layers' outputs, then an activation: a residual connection.

    Its sources (see `NetworkIR.inputs_of`) are compute or Add layers of the same shape. Neuron i of an
    Add is the sum of neuron i of each source, so the Add and its sources are *tied*: a neuron index
    means the same channel in all of them, and neuron surgery keeps or removes it in all of them together
    (`NetworkIR.tied_group`). `num_neurons` is the shared width, kept up to date by surgery.
    """

    name: str
    num_neurons: int
    activation: Activation = field(default_factory=Activation)


@dataclass(eq=False)
class Concat:
    """Its sources' outputs concatenated on the neuron axis (channels, or features of a flat tensor), in
    source order: neuron j of source s is neuron offset_s + j of the Concat."""

    name: str


ComputeLayer = Dense | Conv
Layer = Dense | Conv | Pool | Flatten | Add | Concat
# The name under which a layer lists the network's input among its sources.
INPUT = "<input>"


def _init_compute(layer: Dense | Conv) -> None:
    layer.weight = np.ascontiguousarray(layer.weight, dtype=np.float32)
    layer.bias = np.ascontiguousarray(layer.bias, dtype=np.float32).reshape(-1)
    if layer.bias.shape[0] != layer.weight.shape[0]:
        raise ValueError(
            f"layer {layer.name!r}: bias has {layer.bias.shape[0]} entries for {layer.weight.shape[0]} "
            "neurons"
        )
    if layer.roles is None:
        layer.roles = np.full(layer.weight.shape[0], Role.TRAINABLE, dtype=np.int8)
    else:
        layer.roles = np.asarray(layer.roles, dtype=np.int8).reshape(-1)
        if layer.roles.shape[0] != layer.weight.shape[0]:
            raise ValueError(
                f"layer {layer.name!r}: {layer.roles.shape[0]} roles for {layer.weight.shape[0]} neurons"
            )


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
        layers: the layers in execution (topological) order; the last one computes the output.
        metadata: free-form string metadata carried into the lowered model.
        sources: the input layers of every layer that does not simply read the layer before it (the
            first layer reads `INPUT`), by layer name: Add and Concat layers, and a layer reading a value
            that also feeds another branch. Empty for a chain, which is what most networks are.
    """

    name: str
    input_name: str
    output_name: str
    input_shape: tuple[int, ...]
    layers: list[Layer]
    metadata: dict[str, str] = field(default_factory=dict)
    sources: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def copy(self) -> NetworkIR:
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

    # -- the graph -------------------------------------------------------------------------------------
    @property
    def is_chain(self) -> bool:
        """True when every layer reads the layer before it (no branches, Add or Concat)."""
        return not self.sources

    def inputs_of(self, name: str) -> tuple[str, ...]:
        """The layers `name` reads, in order (`INPUT` for the network's input)."""
        if name in self.sources:
            return tuple(self.sources[name])
        i = self.index(name)
        return (self.layers[i - 1].name,) if i else (INPUT,)

    def consumers(self, name: str) -> list[str]:
        """The layers reading `name`'s output (or the network input, for `INPUT`), in order."""
        return [layer.name for layer in self.layers if name in self.inputs_of(layer.name)]

    def shape_map(self) -> dict[str, tuple[int, ...]]:
        """The output shape (without batch) of every layer by name, and the input's under `INPUT`."""
        shapes: dict[str, tuple[int, ...]] = {INPUT: tuple(self.input_shape)}
        for layer in self.layers:
            ins = [shapes[source] for source in self.inputs_of(layer.name)]
            shape = ins[0]
            if isinstance(layer, Dense):
                shape = (layer.num_neurons,)
            elif isinstance(layer, (Conv, Pool)):
                shape = layer.output_shape(shape)
            elif isinstance(layer, Flatten):
                shape = (int(np.prod(shape)),)
            elif isinstance(layer, Concat):
                shape = (sum(int(s[0]) for s in ins), *shape[1:])
            shapes[layer.name] = shape
        return shapes

    def shapes(self) -> list[tuple[int, ...]]:
        """The output shape (without batch) of every layer, in order."""
        shapes = self.shape_map()
        return [shapes[layer.name] for layer in self.layers]

    def neuron_owners(self, name: str, shapes: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """For each channel (or flat feature) of `name`'s output: the neuron layer (Dense, Conv, Add, or
        `INPUT`) it belongs to and the neuron's index there, as two arrays. Pools keep channels, Flatten
        repeats each channel H*W times, Concat joins its sources' owners."""
        shapes = shapes if shapes is not None else self.shape_map()
        if name == INPUT or isinstance(self.layer(name), (Dense, Conv, Add)):
            n = int(shapes[name][0])
            return np.full(n, name, dtype=object), np.arange(n)
        layer, ins = self.layer(name), self.inputs_of(name)
        parts = [self.neuron_owners(source, shapes) for source in ins]
        if isinstance(layer, Concat):
            return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
        owners, index = parts[0]
        before = shapes[ins[0]]
        if isinstance(layer, Flatten) and len(before) == 3:
            per_channel = int(before[1] * before[2])
            return np.repeat(owners, per_channel), np.repeat(index, per_channel)
        return owners, index

    def neuron_layers(self) -> list[Layer]:
        """The layers whose outputs are neurons: compute layers and Adds, in order."""
        return [layer for layer in self.layers if is_compute(layer) or isinstance(layer, Add)]

    def profiled_layers(self) -> list[Layer]:
        """The neuron layers profiling observes: every one but the output layer (for a chain, the hidden
        compute layers; a DAG adds its hidden Adds, whose post-activation outputs tied neurons feed)."""
        if self.is_chain:
            return self.hidden_layers()
        return self.neuron_layers()[:-1]

    def tied_groups(self) -> list[list[str]]:
        """Groups of neuron layers whose neurons are tied by Adds (see `Add`), each in layer order; only
        groups of two or more layers."""
        parent: dict[str, str] = {}

        def root(name: str) -> str:
            while parent.get(name, name) != name:
                name = parent[name]
            return name

        for layer in self.layers:
            if isinstance(layer, Add):
                for source in self.inputs_of(layer.name):
                    a, b = root(layer.name), root(source)
                    if a != b:
                        parent[a] = b
        groups: dict[str, list[str]] = {}
        for layer in self.neuron_layers():
            groups.setdefault(root(layer.name), []).append(layer.name)
        return [g for g in groups.values() if len(g) > 1]

    def tied_group(self, name: str) -> list[str]:
        """The neuron layers tied to `name` (itself included), in layer order."""
        return next((g for g in self.tied_groups() if name in g), [name])

    def previous_neuron_layer(self, name: str) -> Layer | None:
        """The neuron layer (compute or Add) whose neurons are all of `name`'s inputs, or None when the
        inputs are the network's or come from several layers (through a Concat)."""
        if self.is_chain:
            return self.previous_compute(name)
        owners, _ = self.neuron_owners(self.inputs_of(name)[0])
        names = set(owners.tolist())
        if len(names) != 1 or INPUT in names:
            return None
        return self.layer(names.pop())

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
        """The compute layer that consumes `name`'s neurons, or None for the output layer (chains; on a
        DAG use `consumers`, as `codec.ir.surgery` does)."""
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
        if not self.is_chain:
            owners, index = self.neuron_owners(self.inputs_of(name)[0])
            if INPUT in set(owners.tolist()):
                return np.arange(len(index) if isinstance(layer, Dense) else layer.in_channels)
            return index
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
            elif isinstance(layer, Add):
                row.update(neurons=layer.num_neurons, activation=layer.activation.kind)
            if not self.is_chain:
                row["inputs"] = list(self.inputs_of(layer.name))
            rows.append(row)
        return rows

    def to_text(self) -> str:
        """A readable listing of the IR (for --print-ir-after-all): one line per layer."""
        lines = [f"network {self.name} ({self.input_name}: {list(self.input_shape)} -> {self.output_name})"]
        for layer, shape in zip(self.layers, self.shapes()):
            kind = type(layer).__name__
            if is_compute(layer):
                roles = ", ".join(
                    f"{r.name.lower()} {int((layer.roles == r).sum())}"
                    for r in Role
                    if (layer.roles == r).any()
                )
                act = layer.activation.kind + (
                    f"({layer.activation.alpha:g})" if layer.activation.kind in ("leaky_relu", "elu") else ""
                )
                lines.append(
                    f"  {kind:<7} {layer.name}: {layer.num_neurons} neurons, {act}, weight "
                    f"{list(layer.weight.shape)} -> {list(shape)} [{roles}]"
                )
            elif isinstance(layer, Pool):
                lines.append(
                    f"  {kind:<7} {layer.name}: {layer.mode} {list(layer.kernel_shape)} stride "
                    f"{list(layer.strides)} -> {list(shape)}"
                )
            elif isinstance(layer, Add):
                lines.append(
                    f"  {kind:<7} {layer.name}: {layer.num_neurons} neurons, {layer.activation.kind} "
                    f"-> {list(shape)}"
                )
            else:
                lines.append(f"  {kind:<7} {layer.name} -> {list(shape)}")
            if not self.is_chain:
                lines[-1] += f" <- {', '.join(self.inputs_of(layer.name))}"
        return "\n".join(lines)

    def same_architecture(self, other: NetworkIR, widths: bool = True) -> str | None:
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
            if (is_compute(a) or isinstance(a, Add)) and a.activation != b.activation:
                return f"layer {i}: activation {a.activation.kind} vs {b.activation.kind}"
            if self._input_positions(a.name) != other._input_positions(b.name):
                return f"layer {i} ({a.name} / {b.name}): reads different layers"
        return None

    def _input_positions(self, name: str) -> tuple[int, ...]:
        return tuple(-1 if source == INPUT else self.index(source) for source in self.inputs_of(name))

    def verify(self) -> None:
        """Raise IRVerificationError if the network breaks an IR invariant (see `codec.ir.verify`)."""
        from codec.ir.verify import verify_network  # verify.py imports this module

        verify_network(self)


def replace(layer: Layer, **changes) -> Layer:
    """A copy of `layer` with some fields changed (dataclasses.replace, re-validating compute layers)."""
    return dataclasses.replace(layer, **changes)
