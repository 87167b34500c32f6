"""Lift an ONNX graph into NetworkIR.

Accepted: what torch's dynamo and legacy exporters emit for MLPs and CNNs — Gemm (either transB, any
alpha/beta), MatMul + Add, Conv (groups = 1), Flatten or Reshape to (batch, features), Relu, LeakyRelu,
Sigmoid, Tanh, Softmax (last axis), MaxPool, AveragePool, GlobalAveragePool, BatchNormalization (folded
into the layer before it), Dropout and Identity (dropped: inference semantics). Everything else is refused
with a `LiftError` naming the node, its op type and the reason.

The walk follows the chain from the graph's one input to its one output; a value consumed by more than
one node (a branch) is refused, as is any node left off that chain.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir

from codec.errors import LiftError, ModelLoadError
from codec.errors import first_line as _first_line
from codec.ir.network import (
    MONOTONE_ACTIVATIONS,
    Activation,
    Conv,
    Dense,
    Flatten,
    Layer,
    NetworkIR,
    Pool,
    is_compute,
)

_ACTIVATION_OPS = {"Relu": "relu", "LeakyRelu": "leaky_relu", "Sigmoid": "sigmoid", "Tanh": "tanh", "Softmax": "softmax"}
_DROPPED_OPS = ("Dropout", "Identity")
SUPPORTED_OPS = frozenset(
    {"Gemm", "MatMul", "Add", "Conv", "BatchNormalization", "Flatten", "Reshape", "MaxPool", "AveragePool",
     "GlobalAveragePool", "Constant", *_ACTIVATION_OPS, *_DROPPED_OPS}
)
# A tensor larger than this is refused before it is read: no MLP/CNN codec targets comes near it, and a
# hostile file could otherwise make codec allocate arbitrary memory.
MAX_TENSOR_ELEMENTS = 1 << 31


@contextlib.contextmanager
def _quiet_onnx_ir():
    """onnx_ir logs a warning per undeclared value; lift reports those itself, as one clear error."""
    logger = logging.getLogger("onnx_ir")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def load_model(source: str | os.PathLike | bytes | ir.Model) -> ir.Model:
    """Read an ONNX model (path, serialized bytes or an onnx_ir Model) with its external data, safely.

    External data must live inside the model's directory: absolute locations and `..` escapes are refused.

    Raises:
        ModelLoadError: missing or unreadable file, truncated or non-ONNX content, unsafe external data.
    """
    if isinstance(source, ir.Model):
        return source
    if isinstance(source, (bytes, bytearray)):
        try:
            import onnx

            with _quiet_onnx_ir():
                model = ir.serde.deserialize_model(onnx.load_model_from_string(bytes(source)))
        except Exception as exc:
            raise ModelLoadError(f"not a readable ONNX model: {_first_line(exc)}") from exc
        # Serialized bytes have no directory for external data to live in: onnx_ir would resolve the
        # location against the working directory (or take it as absolute) and read any file there.
        for owner, _ in _external_tensors(model):
            raise ModelLoadError(f"{owner} of an in-memory model points at external data; refusing to read it")
        _check_text(model, "")
        return model
    path = Path(source)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    try:
        with _quiet_onnx_ir():
            model = ir.load(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable ONNX model (truncated or corrupt?): {_first_line(exc)}") from exc
    _check_external_data(model, path.resolve().parent, path)
    _check_text(model, f"{path.name}: ")
    return model


def _check_text(model: ir.Model, where: str) -> None:
    """Names and metadata must be text: protobuf hands invalid UTF-8 over as bytes, which would break
    every later step (layer names, lowering, reports) with a TypeError or a serializer error."""
    graph = model.graph
    texts = [graph.name, *model.metadata_props.keys(), *model.metadata_props.values()]
    texts += [v.name for v in (*graph.inputs, *graph.outputs, *graph.initializers.values())]
    for node in graph:
        texts += [node.name, node.op_type, node.domain, *(v.name for v in node.outputs if v is not None)]
    bad = next((t for t in texts if t is not None and not isinstance(t, str)), None)
    if bad is not None:
        raise ModelLoadError(f"{where}the model holds a name or metadata entry that is not valid UTF-8: {bad!r}")


def _external_tensors(model: ir.Model):
    """(description, tensor) for every tensor of the main graph stored as external data: initializers and
    tensor attributes (a Constant's value), which lift reads too."""
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            yield f"initializer {value.name!r}", value.const_value
    for node in model.graph:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR:
                tensors = [attr.value]
            elif attr.type == ir.AttributeType.TENSORS:
                tensors = list(attr.value)
            else:
                continue
            for tensor in tensors:
                if isinstance(tensor, ir.ExternalTensor):
                    yield f"attribute {attr.name!r} of node {node.name!r}", tensor


def _check_external_data(model: ir.Model, base_dir: Path, path: Path) -> None:
    for owner, tensor in _external_tensors(model):
        if "\0" in tensor.location:
            raise ModelLoadError(f"{path.name}: {owner} has an external data location containing a NUL byte")
        location = Path(tensor.location)
        target = (base_dir / location).resolve()
        if location.is_absolute() or not target.is_relative_to(base_dir):
            raise ModelLoadError(
                f"{path.name}: {owner} points at external data {tensor.location!r} outside "
                "the model's directory; refusing to read it"
            )
        if not target.is_file():
            raise ModelLoadError(f"{path.name}: external data file {tensor.location!r} of {owner} is missing")
        # The declared length may understate what the dims need; onnx_ir reads what the dims need.
        needed = (tensor.offset or 0) + max(tensor.length or 0, _declared_nbytes(tensor))
        if needed > target.stat().st_size:
            raise ModelLoadError(
                f"{path.name}: external data {tensor.location!r} is truncated ({target.stat().st_size} bytes, "
                f"{owner} needs {needed})"
            )


def _declared_nbytes(tensor: ir.ExternalTensor) -> int:
    """Bytes the tensor's declared dims and type need (0 when they are not a fixed, known size)."""
    try:
        return int(tensor.nbytes)
    except Exception:  # odd dtypes (4-bit, strings) or malformed dims: the read itself will fail cleanly
        return 0


def lift(source: str | os.PathLike | bytes | ir.Model, name: str | None = None) -> NetworkIR:
    """Lift an ONNX model into NetworkIR.

    Args:
        source: a path to an .onnx file (external data beside it), serialized bytes, or an onnx_ir Model.
        name: the network's label; defaults to the file's stem or the graph's name.

    Raises:
        ModelLoadError: the file cannot be read.
        LiftError: the graph is not a network codec can lift; names the node, op and reason.
    """
    model = load_model(source)
    if name is None:
        name = Path(source).stem if isinstance(source, (str, os.PathLike)) else (model.graph.name or "network")
    net = _Lifter(model.graph, name).run()
    _restore_roles(net, model)
    return net


def _restore_roles(net: NetworkIR, model: ir.Model) -> None:
    """Neuron roles that codec wrote into the model's metadata (see codec.ir.lower.roles_metadata)."""
    import json

    from codec.ir.network import Role

    text = (model.metadata_props or {}).get("codec.roles")
    if not text:
        return
    try:
        roles = json.loads(text)
        for layer in net.compute_layers():
            for role, indices in roles.get(layer.name, {}).items():
                indices = np.asarray(indices, dtype=np.int64).reshape(-1)
                if indices.size and (indices.min() < 0 or indices.max() >= layer.num_neurons):
                    raise IndexError(f"neuron index out of range for layer {layer.name!r}")
                layer.roles[indices] = Role[role.upper()]
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError) as exc:
        raise ModelLoadError(f"the model's codec.roles metadata is malformed: {exc}") from exc
    net.metadata.update({k: v for k, v in model.metadata_props.items() if k.startswith("codec.") and k != "codec.roles"})


class _Lifter:
    def __init__(self, graph: ir.Graph, name: str):
        self.graph = graph
        self.name = name
        self.layers: list[Layer] = []
        self.shape: tuple[int, ...] = ()
        self.visited: set[int] = set()
        self.used_names: set[str] = set()

    # -- the walk ---------------------------------------------------------------------------------------
    def run(self) -> NetworkIR:
        graph_inputs = [v for v in self.graph.inputs if v.name not in self.graph.initializers]
        if len(graph_inputs) != 1:
            raise LiftError(f"the graph has {len(graph_inputs)} data inputs; codec lifts single-input networks")
        if len(self.graph.outputs) != 1:
            raise LiftError(f"the graph has {len(self.graph.outputs)} outputs; codec lifts single-output networks")
        x = graph_inputs[0]
        self.input_shape = self._input_shape(x)
        self.shape = self.input_shape
        value = x
        output = self.graph.outputs[0]
        while value is not output:
            node = self._sole_consumer(value)
            value = self._visit(node)
        for node in self.graph:
            if id(node) not in self.visited and node.op_type != "Constant":
                raise LiftError("node is not on the path from the input to the output", node.name, node.op_type)
        if not any(is_compute(layer) for layer in self.layers):
            raise LiftError("the graph has no Gemm, MatMul or Conv layer to lift")
        return NetworkIR(
            name=self.name,
            input_name=x.name,
            output_name=output.name,
            input_shape=self.input_shape,
            layers=self.layers,
            metadata={},
        )

    def _input_shape(self, x: ir.Value) -> tuple[int, ...]:
        if x.dtype != ir.DataType.FLOAT:
            raise LiftError(f"input {x.name!r} has element type {x.dtype}; codec expects float32 inputs")
        if x.shape is None:
            raise LiftError(f"input {x.name!r} has no declared shape")
        dims = list(x.shape)
        if not 2 <= len(dims) <= 4:
            raise LiftError(
                f"input {x.name!r} has rank {len(dims)} (shape {x.shape}); codec expects (batch, features) "
                "or (batch, channels, height, width)"
            )
        rest = dims[1:]
        if not all(isinstance(d, int) and d > 0 for d in rest):
            raise LiftError(f"input {x.name!r} has shape {x.shape}; all but the batch dimension must be fixed")
        if math.prod(rest) > MAX_TENSOR_ELEMENTS:
            raise LiftError(f"input {x.name!r} has shape {x.shape}: {math.prod(rest)} values per example, beyond codec's limit")
        return tuple(int(d) for d in rest)

    def _sole_consumer(self, value: ir.Value) -> ir.Node:
        users = {id(use.node): use.node for use in value.uses()}
        if value in self.graph.outputs:
            raise LiftError(f"value {value.name!r} is both a graph output and used inside the graph")
        if not users:
            raise LiftError(f"value {value.name!r} is consumed by no node but is not the graph output")
        if len(users) > 1:
            names = ", ".join(f"{n.name} ({n.op_type})" for n in users.values())
            raise LiftError(f"value {value.name!r} branches into {len(users)} nodes ({names}); codec lifts chains only")
        return next(iter(users.values()))

    def _visit(self, node: ir.Node) -> ir.Value:
        if id(node) in self.visited:
            raise LiftError("the graph has a cycle through this node", node.name, node.op_type)
        self.visited.add(id(node))
        if node.domain not in ("", "ai.onnx"):
            raise LiftError(f"custom-domain op ({node.domain}) is not supported", node.name, node.op_type)
        handler = getattr(self, f"_op_{node.op_type}", None)
        if handler is None:
            if node.op_type in _ACTIVATION_OPS:
                handler = self._activation
            elif node.op_type in _DROPPED_OPS:
                handler = self._dropped
            else:
                raise LiftError("unsupported op", node.name, node.op_type)
        if not node.outputs or node.outputs[0] is None:
            raise LiftError("node has no output", node.name, node.op_type)
        try:
            return handler(node)
        except (TypeError, ValueError, KeyError, IndexError, ArithmeticError, AttributeError, AssertionError) as exc:
            # A hostile or corrupt file can put anything in a node (attributes of the wrong type, missing
            # inputs, inconsistent shapes; onnx_ir asserts on tensor data stored in the wrong field): whatever
            # the specific checks miss is still a refusal of this node.
            raise LiftError(f"malformed node ({type(exc).__name__}: {_first_line(exc)})", node.name, node.op_type) from exc

    # -- helpers ----------------------------------------------------------------------------------------
    def _const(self, node: ir.Node, index: int, what: str, required: bool = False) -> np.ndarray | None:
        if index >= len(node.inputs) or node.inputs[index] is None:
            if required:
                raise LiftError(f"its {what} input is missing", node.name, node.op_type)
            return None
        value = node.inputs[index]
        tensor = ir.convenience.get_const_tensor(value)
        if tensor is None:
            raise LiftError(
                f"its {what} {value.name!r} is not an initializer or constant (missing initializer?)",
                node.name,
                node.op_type,
            )
        if tensor.size > MAX_TENSOR_ELEMENTS:
            raise LiftError(f"its {what} {value.name!r} has {tensor.size} elements, beyond codec's limit", node.name, node.op_type)
        proto = getattr(tensor, "raw", None)
        if hasattr(proto, "ByteSize") and _declared_nbytes(tensor) > 8 * proto.ByteSize() + 64:
            # Well-formed inline data takes at least 1 byte per 8 bytes of tensor (int64 zeros as varints);
            # a tiny tensor declaring huge dims would make onnx_ir allocate them (4-bit unpacking does).
            raise LiftError(
                f"its {what} {value.name!r} declares {tensor.size} elements but carries far less data (corrupt file?)",
                node.name,
                node.op_type,
            )
        try:
            array = tensor.numpy()
        except Exception as exc:
            raise LiftError(f"cannot read {what} {value.name!r}: {_first_line(exc)}", node.name, node.op_type) from exc
        if what in ("weight", "bias", "scale", "mean", "variance", "shift"):
            if array.dtype.kind != "f":
                raise LiftError(f"its {what} {value.name!r} has dtype {array.dtype}; expected floating point", node.name, node.op_type)
            if not np.all(np.isfinite(array)):
                raise LiftError(f"its {what} {value.name!r} contains NaN or infinite values", node.name, node.op_type)
        return array

    def _attrs(self, node: ir.Node) -> dict:
        return {k: a.value for k, a in node.attributes.items()}

    def _ints(self, node: ir.Node, key: str, default: tuple[int, ...] | None, length: int, minimum: int) -> tuple[int, ...]:
        """A list-of-ints attribute, checked: `length` integers, each >= `minimum` (zero strides, negative
        pads and the like would otherwise become IR that divides by zero or cannot be lowered)."""
        value = self._attrs(node).get(key, default)
        if value is None:
            raise LiftError(f"attribute {key} is required", node.name, node.op_type)
        values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if len(values) != length or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values):
            raise LiftError(f"attribute {key}={value!r} is invalid: expected {length} integers >= {minimum}", node.name, node.op_type)
        return values

    def _float(self, node: ir.Node, key: str, default: float) -> float:
        value = self._attrs(node).get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise LiftError(f"attribute {key}={value!r} is not a finite number", node.name, node.op_type)
        # ONNX stores float attributes as float32: take the shortest decimal that is that float32, so an
        # alpha of 0.01 lifts as 0.01 (not 0.009999999776) and compares equal to the network it came from.
        with np.errstate(over="ignore"):
            value = np.float32(value)
        if not np.isfinite(value):
            raise LiftError(f"attribute {key} overflows float32", node.name, node.op_type)
        return float(str(value))

    def _check_size(self, node: ir.Node, shape: tuple[int, ...]) -> tuple[int, ...]:
        if min(shape[1:]) < 1:
            raise LiftError(f"output would be empty for an input of shape {list(self.shape)}", node.name, node.op_type)
        if math.prod(shape) > MAX_TENSOR_ELEMENTS:
            raise LiftError(f"output shape {list(shape)} is beyond codec's limit", node.name, node.op_type)
        return shape

    def _out(self, node: ir.Node) -> ir.Value:
        used = [o for o in node.outputs[1:] if o is not None and (o.uses() or o in self.graph.outputs)]
        if used:
            raise LiftError(f"its extra output {used[0].name!r} is used; codec supports its first output only", node.name, node.op_type)
        return node.outputs[0]

    def _layer_name(self, node: ir.Node, fallback: str) -> str:
        """A readable unique layer name: the weight's module path ("net.1" for "net.1.weight"), else the node's."""
        weight = node.inputs[1] if len(node.inputs) > 1 and node.op_type in ("Gemm", "MatMul", "Conv") else None
        if weight is not None and weight.name and weight.name.endswith(".weight"):
            base = weight.name[: -len(".weight")]
        else:
            base = (node.name or fallback).strip("/").replace("/", ".") or fallback
        name, i = base, 1
        while name in self.used_names:
            i += 1
            name = f"{base}_{i}"
        self.used_names.add(name)
        return name

    def _last_compute(self) -> Dense | Conv | None:
        return self.layers[-1] if self.layers and is_compute(self.layers[-1]) else None

    # -- compute layers ---------------------------------------------------------------------------------
    def _add_dense(self, node: ir.Node, weight: np.ndarray, bias: np.ndarray | None) -> None:
        if len(self.shape) != 1:
            raise LiftError(
                f"dense layer reads a tensor of shape {list(self.shape)}; flatten it to (batch, features) first",
                node.name,
                node.op_type,
            )
        if weight.shape[1] != self.shape[0]:
            raise LiftError(
                f"weight expects {weight.shape[1]} input features but receives {self.shape[0]}", node.name, node.op_type
            )
        out = weight.shape[0]
        bias = np.zeros(out, np.float32) if bias is None else bias
        if bias.size == 1 and out != 1:
            bias = np.full(out, float(bias.reshape(-1)[0]), np.float32)
        if bias.size != out:
            raise LiftError(f"bias has {bias.size} entries for {out} output features", node.name, node.op_type)
        self.layers.append(Dense(self._layer_name(node, "dense"), weight.astype(np.float32), bias.reshape(-1)))
        self.shape = (out,)

    def _op_Gemm(self, node: ir.Node) -> ir.Value:
        attrs = self._attrs(node)
        if attrs.get("transA", 0):
            raise LiftError("transA=1 is not supported", node.name, node.op_type)
        weight = self._const(node, 1, "weight", required=True)
        if weight.ndim != 2:
            raise LiftError(f"weight has rank {weight.ndim}; expected 2", node.name, node.op_type)
        weight = weight if attrs.get("transB", 0) else weight.T
        weight = weight * np.float32(self._float(node, "alpha", 1.0))
        bias = self._const(node, 2, "bias")
        if bias is not None:
            bias = np.asarray(bias * np.float32(self._float(node, "beta", 1.0)))
            if bias.ndim == 2 and bias.shape[0] == 1:
                bias = bias[0]
            elif bias.ndim > 1:
                raise LiftError(f"bias of shape {list(bias.shape)} is not per output feature", node.name, node.op_type)
        self._add_dense(node, weight, bias)
        return self._out(node)

    def _op_MatMul(self, node: ir.Node) -> ir.Value:
        weight = self._const(node, 1, "weight", required=True)
        if weight.ndim != 2:
            raise LiftError(f"weight has rank {weight.ndim}; expected 2", node.name, node.op_type)
        out = node.outputs[0]
        bias = None
        users = [u.node for u in out.uses()]
        if len(users) == 1 and users[0].op_type == "Add" and out not in self.graph.outputs:
            add = users[0]
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            if ir.convenience.get_const_tensor(other) is not None:
                self.visited.add(id(add))
                index = 1 if add.inputs[0] is out else 0
                bias = self._const(add, index, "bias")
                node, out = add, add.outputs[0]
        self._add_dense(node, weight.T, bias)
        return out

    def _op_Conv(self, node: ir.Node) -> ir.Value:
        attrs = self._attrs(node)
        if len(self.shape) != 3:
            raise LiftError(f"convolution reads a tensor of shape {list(self.shape)}; expected (channels, height, width)", node.name, node.op_type)
        if attrs.get("group", 1) != 1:
            raise LiftError(f"group={attrs['group']} convolutions are not supported", node.name, node.op_type)
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise LiftError(f"auto_pad={attrs['auto_pad']} is not supported; export with explicit pads", node.name, node.op_type)
        weight = self._const(node, 1, "weight", required=True)
        if weight.ndim != 4:
            raise LiftError(f"weight has rank {weight.ndim}; codec supports 2-D convolutions", node.name, node.op_type)
        if weight.shape[1] != self.shape[0]:
            raise LiftError(f"weight expects {weight.shape[1]} input channels but receives {self.shape[0]}", node.name, node.op_type)
        bias = self._const(node, 2, "bias")
        bias = np.zeros(weight.shape[0], np.float32) if bias is None else bias
        conv = Conv(
            self._layer_name(node, "conv"),
            weight,
            bias,
            strides=self._ints(node, "strides", (1, 1), 2, 1),
            pads=self._ints(node, "pads", (0, 0, 0, 0), 4, 0),
            dilations=self._ints(node, "dilations", (1, 1), 2, 1),
        )
        shape = self._check_size(node, conv.output_shape(self.shape))
        self.layers.append(conv)
        self.shape = shape
        return self._out(node)

    def _op_BatchNormalization(self, node: ir.Node) -> ir.Value:
        layer = self._last_compute()
        if layer is None or layer.activation.kind != "identity":
            raise LiftError("BatchNormalization is supported only right after a Gemm/MatMul/Conv (it is folded into it)", node.name, node.op_type)
        attrs = self._attrs(node)
        if attrs.get("training_mode", 0):
            raise LiftError("training-mode BatchNormalization cannot be folded; export in eval mode", node.name, node.op_type)
        params = [self._const(node, i, w, required=True) for i, w in ((1, "scale"), (2, "shift"), (3, "mean"), (4, "variance"))]
        if any(p.shape != (layer.num_neurons,) for p in params):
            shapes = ", ".join(str(list(p.shape)) for p in params)
            raise LiftError(f"scale, shift, mean and variance have shapes {shapes} for {layer.num_neurons} neurons", node.name, node.op_type)
        scale, shift, mean, var = params
        var = var + self._float(node, "epsilon", 1e-5)
        if not np.all(var > 0):
            raise LiftError("variance + epsilon is not positive for every channel", node.name, node.op_type)
        factor = (scale / np.sqrt(var)).astype(np.float32)
        layer.weight = (layer.weight * factor.reshape((-1,) + (1,) * (layer.weight.ndim - 1))).astype(np.float32)
        layer.bias = ((layer.bias - mean) * factor + shift).astype(np.float32)
        return self._out(node)

    # -- activations and structural ops -----------------------------------------------------------------
    def _activation(self, node: ir.Node) -> ir.Value:
        kind = _ACTIVATION_OPS[node.op_type]
        attrs = self._attrs(node)
        alpha = self._float(node, "alpha", 0.01) if kind == "leaky_relu" else 0.01
        if kind == "softmax":
            rank = len(self.shape) + 1
            axis = attrs.get("axis", -1)
            if axis not in (-1, rank - 1) or rank != 2:
                raise LiftError(f"softmax over axis {axis} of a rank-{rank} tensor; codec supports the feature axis of (batch, features)", node.name, node.op_type)
        activation = Activation(kind, alpha)
        target = self._last_compute()
        if target is None and self.layers and isinstance(self.layers[-1], Pool) and self.layers[-1].mode == "max":
            # act(maxpool(z)) == maxpool(act(z)) for monotone non-decreasing act: move it onto the conv.
            before = self.layers[-2] if len(self.layers) > 1 else None
            if kind in MONOTONE_ACTIVATIONS and before is not None and is_compute(before):
                target = before
        if target is None:
            raise LiftError("activation must follow a Gemm/MatMul/Conv layer (or a max pool right after one)", node.name, node.op_type)
        if target.activation.kind != "identity":
            raise LiftError(f"a second activation after {target.activation.kind} on layer {target.name!r} is not supported", node.name, node.op_type)
        target.activation = activation
        return self._out(node)

    def _dropped(self, node: ir.Node) -> ir.Value:
        if node.op_type == "Dropout":
            training = node.inputs[2] if len(node.inputs) > 2 else None
            if training is not None:
                mode = ir.convenience.get_const_tensor(training)
                if mode is None or mode.size != 1 or bool(mode.numpy().reshape(-1)[0]):
                    raise LiftError("training-mode Dropout is not supported; export in eval mode", node.name, node.op_type)
        return self._out(node)

    def _op_Flatten(self, node: ir.Node) -> ir.Value:
        axis = self._attrs(node).get("axis", 1)
        if axis != 1:
            raise LiftError(f"Flatten with axis={axis}; codec supports axis=1 (batch, features)", node.name, node.op_type)
        return self._flatten(node)

    def _flatten(self, node: ir.Node) -> ir.Value:
        if len(self.shape) != 1:
            self.layers.append(Flatten(self._layer_name(node, "flatten")))
            self.shape = (int(np.prod(self.shape)),)
        return self._out(node)

    def _op_Reshape(self, node: ir.Node) -> ir.Value:
        target = self._const(node, 1, "target shape")
        if target is None:
            raise LiftError("Reshape without a shape input", node.name, node.op_type)
        if target.dtype.kind not in "iu":
            raise LiftError(f"target shape has dtype {target.dtype}; ONNX requires int64", node.name, node.op_type)
        target = [int(d) for d in np.asarray(target).reshape(-1)]
        features = int(np.prod(self.shape))
        copies_batch = not self._attrs(node).get("allowzero", 0)  # 0 means "copy the input's dim" unless allowzero
        flat = target == [-1, features] or (copies_batch and target in ([0, -1], [0, features]))
        if not flat:
            raise LiftError(
                f"Reshape to {target} from {['batch', *self.shape]}; codec supports only flattening to (batch, {features})",
                node.name,
                node.op_type,
            )
        return self._flatten(node)

    def _pool(self, node: ir.Node, mode: str) -> ir.Value:
        attrs = self._attrs(node)
        if len(self.shape) != 3:
            raise LiftError(f"pooling reads a tensor of shape {list(self.shape)}; expected (channels, height, width)", node.name, node.op_type)
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise LiftError(f"auto_pad={attrs['auto_pad']} is not supported; export with explicit pads", node.name, node.op_type)
        if self._ints(node, "dilations", (1, 1), 2, 1) != (1, 1):
            raise LiftError("dilated pooling is not supported", node.name, node.op_type)
        kernel = self._ints(node, "kernel_shape", None, 2, 1)
        pads = self._ints(node, "pads", (0, 0, 0, 0), 4, 0)
        if any(pad >= kernel[i % 2] for i, pad in enumerate(pads)):
            raise LiftError(f"pads {list(pads)} must be smaller than the kernel {list(kernel)}", node.name, node.op_type)
        pool = Pool(
            self._layer_name(node, f"{mode}pool"),
            mode,
            kernel,
            self._ints(node, "strides", (1, 1), 2, 1),
            pads,
            bool(attrs.get("ceil_mode", 0)),
            bool(attrs.get("count_include_pad", 0)),
        )
        shape = self._check_size(node, pool.output_shape(self.shape))
        if pool.ceil_mode:
            # Both round up, but torch and onnxruntime then drop a last window that would start past the
            # input, while ONNX shape inference keeps it: where they differ, onnxruntime cannot load the
            # model once a later layer fixes the size, so codec refuses it.
            inferred = [-(-(self.shape[i + 1] + pads[i] + pads[i + 2] - kernel[i]) // pool.strides[i]) + 1 for i in range(2)]
            if list(shape[1:]) != inferred:
                raise LiftError(
                    f"ceil_mode pooling of a {list(self.shape[1:])} map gives {list(shape[1:])} in onnxruntime but "
                    f"{inferred} by ONNX shape inference (its last window starts outside the input); export with "
                    "ceil_mode=0 or other pads",
                    node.name,
                    node.op_type,
                )
        self.layers.append(pool)
        self.shape = shape
        return self._out(node)

    def _op_MaxPool(self, node: ir.Node) -> ir.Value:
        return self._pool(node, "max")

    def _op_AveragePool(self, node: ir.Node) -> ir.Value:
        return self._pool(node, "avg")

    def _op_GlobalAveragePool(self, node: ir.Node) -> ir.Value:
        if len(self.shape) != 3:
            raise LiftError(f"pooling reads a tensor of shape {list(self.shape)}; expected (channels, height, width)", node.name, node.op_type)
        c, h, w = self.shape
        self.layers.append(Pool(self._layer_name(node, "gap"), "avg", (h, w), (1, 1), is_global=True))
        self.shape = (c, 1, 1)
        return self._out(node)
