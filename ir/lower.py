"""Lower NetworkIR back to ONNX (opset 18) with onnx-ir, and save models atomically.

`lower(net)` builds a graph that computes the same function as the model `net` was lifted from:
Dense -> Gemm(transB=1), Conv -> Conv, Pool -> MaxPool/AveragePool/GlobalAveragePool, Flatten -> Flatten,
Add -> Add, Concat -> Concat (axis 1), each compute layer and Add followed by its activation node(s)
(GELU and SiLU as element-wise opset-18 nodes). With `taps=True` every profiled layer's (hidden compute
layers, and hidden Adds of a DAG) post-activation output is also a graph output named by `tap_names(net)`,
which is how profiling observes neurons with onnxruntime.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from codec.io import atomic_path
from codec.ir.network import INPUT, Add, Concat, Conv, Dense, Flatten, NetworkIR, Pool
from codec.version import __version__

OPSET = 18
IR_VERSION = 9
TAP_PREFIX = "codec.tap."
_ACTIVATION_OPS = {
    "relu": "Relu",
    "leaky_relu": "LeakyRelu",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
    "softmax": "Softmax",
    "elu": "Elu",
    "softplus": "Softplus",
    "hardswish": "HardSwish",
}
_DECOMPOSED_ACTIVATIONS = ("gelu", "gelu_tanh", "silu")


def tap_names(net: NetworkIR) -> dict[str, str]:
    """The graph-output names under which `lower(net, taps=True)` exposes each profiled layer's activations.

    `codec.tap.<layer>`, unless the model's own input or output, or an earlier layer's tap, already has that
    name (a model may name anything anything): then `codec.tap.<layer>.1`, `.2`, ... by the builder's one
    naming rule, so the tap outputs never collide with the graph's own names. Deterministic in `net`, so the
    profiler reads back exactly the names `lower` wrote.
    """
    builder = GraphBuilder()
    builder.reserve(net.input_name, net.output_name)
    return {layer.name: builder.fresh_name(TAP_PREFIX + layer.name) for layer in net.profiled_layers()}


class GraphBuilder:
    """Appends codec layers as ONNX nodes to a node list; shared by `lower` and the ensemble emitter."""

    def __init__(self, prefix: str = ""):
        self.prefix = prefix
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        # Every name handed out or reserved (values, nodes and initializers share it): codec derives
        # names from layer names, and a user's layers, input and output can be named anything (an
        # output called like its layer, layers `a` and `a.relu`), so every name goes through
        # `fresh_name` and none can collide.
        self._names: set[str] = set()

    def reserve(self, *names: str) -> None:
        """Keep `names` (graph inputs, outputs, tap names) from being handed out by `fresh_name`."""
        self._names.update(names)

    def fresh_name(self, name: str) -> str:
        """`name`, or `name.1`, `name.2`, ... : the first not yet used or reserved (the one naming rule)."""
        candidate, n = name, 1
        while candidate in self._names:
            candidate = f"{name}.{n}"
            n += 1
        self._names.add(candidate)
        return candidate

    def initializer(self, name: str, array: np.ndarray) -> ir.Value:
        name = self.fresh_name(name)
        tensor = ir.tensor(np.ascontiguousarray(array), name=name)
        value = ir.Value(name=name, const_value=tensor)
        value.shape = ir.Shape(tensor.shape)  # a 0-d array becomes shape (1,): take the stored tensor's shape
        value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        self.initializers.append(value)
        return value

    def node(
        self, op_type: str, inputs: list, name: str, attributes: dict | None = None, exact: bool = False
    ) -> ir.Value:
        """Append a node whose output value has its name; `exact` takes a name reserved for it as is."""
        name = name if exact else self.fresh_name(name)
        node = ir.node(op_type, inputs, attributes or {}, name=name)
        node.outputs[0].name = name
        self.nodes.append(node)
        return node.outputs[0]

    def layer(self, layer, x: ir.Value, weights: dict[str, ir.Value] | None = None) -> ir.Value:
        """Emit `layer` reading `x`; `weights` may supply already-emitted weight/bias values to reuse."""
        name = self.prefix + layer.name
        if isinstance(layer, (Dense, Conv)):
            weights = weights or {}
            w = weights.get("weight") or self.initializer(f"{name}.weight", layer.weight)
            b = weights.get("bias") or self.initializer(f"{name}.bias", layer.bias)
            if isinstance(layer, Dense):
                z = self.node("Gemm", [x, w, b], name, {"transB": 1})
            else:
                z = self.node(
                    "Conv",
                    [x, w, b],
                    name,
                    {
                        "kernel_shape": list(layer.kernel_shape),
                        "strides": list(layer.strides),
                        "pads": list(layer.pads),
                        "dilations": list(layer.dilations),
                        **({"group": int(layer.groups)} if layer.groups != 1 else {}),
                    },
                )
            return self.activation(layer, z)
        if isinstance(layer, Pool):
            if layer.is_global:
                op = "GlobalAveragePool" if layer.mode == "avg" else "GlobalMaxPool"
                return self.node(op, [x], name)
            attrs = {
                "kernel_shape": list(layer.kernel_shape),
                "strides": list(layer.strides),
                "pads": list(layer.pads),
                "ceil_mode": int(layer.ceil_mode),
            }
            if layer.mode == "avg":
                attrs["count_include_pad"] = int(layer.count_include_pad)
                return self.node("AveragePool", [x], name, attrs)
            return self.node("MaxPool", [x], name, attrs)
        if isinstance(layer, Flatten):
            return self.node("Flatten", [x], name, {"axis": 1})
        raise TypeError(f"cannot lower layer of type {type(layer).__name__}")

    def merge(self, layer: Add | Concat, inputs: list[ir.Value]) -> ir.Value:
        """Emit a layer with several sources: Add (then its activation) or Concat on the neuron axis."""
        name = self.prefix + layer.name
        if isinstance(layer, Add):
            return self.activation(layer, self.node("Add", inputs, name))
        return self.node("Concat", inputs, name, {"axis": 1})

    def network(
        self, net: NetworkIR, x: ir.Value, taps: set[int] | None = None
    ) -> tuple[ir.Value, list[ir.Value]]:
        """Emit all of `net`'s layers (a chain or a DAG) reading `x`; returns the output value and, for
        the layers whose ids are in `taps`, their values in layer order."""
        values = {INPUT: x}
        tapped = []
        value = x
        for layer in net.layers:
            ins = [values[source] for source in net.inputs_of(layer.name)] if not net.is_chain else [value]
            value = self.merge(layer, ins) if isinstance(layer, (Add, Concat)) else self.layer(layer, ins[0])
            values[layer.name] = value
            if taps is not None and id(layer) in taps:
                tapped.append((layer, value))
        return (values[net.layers[-1].name] if net.layers else x), tapped

    def activation(self, layer, z: ir.Value) -> ir.Value:
        kind = layer.activation.kind
        if kind == "identity":
            return z
        name = f"{self.prefix}{layer.name}.{kind}"
        if kind in _DECOMPOSED_ACTIVATIONS:
            return self._decomposed_activation(kind, z, name)
        attrs = {"alpha": float(layer.activation.alpha)} if kind in ("leaky_relu", "elu") else {}
        if kind == "softmax":
            attrs = {"axis": -1}
        return self.node(_ACTIVATION_OPS[kind], [z], name, attrs)

    def _decomposed_activation(self, kind: str, z: ir.Value, name: str) -> ir.Value:
        """GELU and SiLU as opset-18 element-wise nodes (ONNX's Gelu op needs opset 20)."""

        def const(suffix: str, value: float) -> ir.Value:
            return self.initializer(f"{name}.const_{suffix}", np.array(value, np.float32))

        if kind == "silu":
            s = self.node("Sigmoid", [z], f"{name}.sigmoid")
            return self.node("Mul", [z, s], name)
        if kind == "gelu":  # z * (1 + erf(z / sqrt 2)) / 2
            inner = self.node("Mul", [z, const("inv_sqrt2", 1.0 / math.sqrt(2.0))], f"{name}.scaled")
            inner = self.node("Erf", [inner], f"{name}.erf")
        else:  # gelu_tanh: z * (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))) / 2
            cube = self.node("Mul", [self.node("Mul", [z, z], f"{name}.square"), z], f"{name}.cube")
            poly = self.node(
                "Add", [z, self.node("Mul", [cube, const("c", 0.044715)], f"{name}.cubic")], f"{name}.poly"
            )
            inner = self.node(
                "Tanh",
                [self.node("Mul", [poly, const("k", math.sqrt(2.0 / math.pi))], f"{name}.arg")],
                f"{name}.tanh",
            )
        gate = self.node("Add", [inner, const("one", 1.0)], f"{name}.gate")
        half = self.node("Mul", [z, const("half", 0.5)], f"{name}.half")
        return self.node("Mul", [half, gate], name)


def input_value(net: NetworkIR, name: str | None = None) -> ir.Value:
    return ir.Value(
        name=name or net.input_name,
        shape=ir.Shape(["batch", *net.input_shape]),
        type=ir.TensorType(ir.DataType.FLOAT),
    )


def make_model(graph: ir.Graph, metadata: dict[str, str] | None = None) -> ir.Model:
    props = {"codec.version": __version__}
    props.update(metadata or {})
    return ir.Model(
        graph,
        ir_version=IR_VERSION,
        producer_name="codec",
        producer_version=__version__,
        metadata_props=props,
    )


def lower(net: NetworkIR, taps: bool = False) -> ir.Model:
    """Build an ONNX model (onnx_ir) computing `net`; with `taps`, hidden activations are extra outputs."""
    builder = GraphBuilder()
    x = input_value(net)
    names = tap_names(net) if taps else {}
    builder.reserve(net.input_name, net.output_name, *names.values())
    value, tapped = builder.network(net, x, {id(layer) for layer in net.profiled_layers()} if taps else None)
    tap_outputs = [builder.node("Identity", [v], names[layer.name], exact=True) for layer, v in tapped]
    if value is x:
        value = builder.node("Identity", [x], net.output_name, exact=True)
    value.name = net.output_name
    value.shape = ir.Shape(["batch", *net.output_shape])
    value.type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph(
        [x],
        [value, *tap_outputs],
        nodes=builder.nodes,
        initializers=builder.initializers,
        opset_imports={"": OPSET},
        name=net.name,
    )
    metadata = dict(net.metadata)
    roles = roles_metadata(net)
    if roles:
        metadata[ROLES_KEY] = roles
    return make_model(graph, metadata)


ROLES_KEY = "codec.roles"


def roles_metadata(net: NetworkIR) -> str | None:
    """JSON of every non-trainable neuron per layer ({layer: {role: [indices]}}), or None if all trainable."""
    import json

    from codec.ir.network import Role

    out = {}
    for layer in net.compute_layers():
        special = {
            r.name.lower(): np.flatnonzero(layer.roles == r).tolist() for r in Role if r != Role.TRAINABLE
        }
        special = {k: v for k, v in special.items() if v}
        if special:
            out[layer.name] = special
    return json.dumps(out, separators=(",", ":")) if out else None


def to_bytes(model: ir.Model) -> bytes:
    """Serialize an onnx_ir model (all tensors inline) to ONNX bytes."""
    return ir.serde.serialize_model(model).SerializeToString()


def save_model(model: ir.Model, path: str | os.PathLike, external_data: bool = False) -> Path:
    """Save atomically: a crash or a full disk never leaves a truncated model at `path`.

    With `external_data`, tensors go to a data file beside the model (needed past protobuf's 2 GB limit):
    `<name>.data`, or `<name>.<random>.data` when a file of that name already exists, so that a model
    being replaced is never separated from its data: the new data file is written under its own name,
    the model is renamed over the old one (atomic), and only then are the data files the old model
    referred to removed. A crash at any point leaves either the old model with its data or the new one
    with its data. `external_data_files(path)` tells which data file a saved model uses.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Tensors still backed by another file's external data are read in first, so the saved model is
    # self-contained (and never points at data that may move or be overwritten).
    model = ir.external_data.load_to_model(model)
    previous = _own_data_files(path)
    if not external_data:
        with atomic_path(path) as tmp:
            ir.save(model, tmp)
        _remove_data_files(path, previous)
        return path
    data_name = path.name + ".data"
    if (path.parent / data_name).exists():
        data_name = f"{path.name}.{secrets.token_hex(4)}.data"
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        ir.save(model, tmp_dir / path.name, external_data=data_name)
        for name in (data_name, path.name):
            with open(tmp_dir / name, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp_dir / data_name, path.parent / data_name)
        os.replace(tmp_dir / path.name, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    _remove_data_files(path, [name for name in previous if name != data_name])
    return path


def external_data_files(path: str | os.PathLike) -> list[str]:
    """The external data files (names relative to the model's folder) a saved model refers to."""
    import onnx

    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - unreadable or absent: it refers to nothing we can name
        return []
    names = []
    tensors = list(proto.graph.initializer)
    tensors += [a.t for node in proto.graph.node for a in node.attribute if a.HasField("t")]
    for tensor in tensors:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value not in names:
                    names.append(entry.value)
    return names


def _own_data_files(path: Path) -> list[str]:
    """Data files of the model now at `path` that codec may delete when replacing it: plain names
    beside the model that start with the model's name and end in `.data` (what save_model writes)."""
    if not path.is_file():
        return []
    return [
        name
        for name in external_data_files(path)
        if os.path.basename(name) == name and name.startswith(path.name + ".") and name.endswith(".data")
    ]


def _remove_data_files(path: Path, names: list[str]) -> None:
    for name in names:
        try:
            (path.parent / name).unlink(missing_ok=True)
        except OSError:  # a stale data file left behind is harmless; the model no longer refers to it
            pass
