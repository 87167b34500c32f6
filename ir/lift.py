"""Lift an ONNX graph into NetworkIR.

Accepted: what torch's dynamo and legacy exporters (and skl2onnx, for MLPs) emit for MLPs, CNNs and
residual networks — Gemm (either transB, any alpha/beta), MatMul + Add, Conv (any stride, padding,
dilation and groups), Flatten or Reshape to (batch, features), the activations Relu, LeakyRelu, Sigmoid,
Tanh, Softmax (last axis), Elu, Softplus, HardSwish, Gelu — and GELU, SiLU, HardSwish written out as
element-wise nodes (`_Lifter._match_activation`), MaxPool, AveragePool, GlobalAveragePool,
BatchNormalization (folded into the layer before it), Add of two layers (a residual connection), Concat
on the neuron axis, Dropout, Identity and a float-to-float Cast (dropped: inference semantics).
Everything else is refused with a `LiftError` naming the node, its op type and the reason.

The walk visits the nodes in graph (topological) order, tracking which layer computes each value, so a
value may feed several branches; activations and BatchNormalization are folded into the layer before
them only when nothing else reads that layer's output. A graph with a label output beside its
probabilities (skl2onnx's classifiers) is lifted on the probabilities, the label's tail dropped and
listed in the network's `codec.lift.dropped` metadata.
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
from codec.io import regular_file
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
    erf,
    is_compute,
)

_ACTIVATION_OPS = {
    "Relu": "relu",
    "LeakyRelu": "leaky_relu",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Softmax": "softmax",
    "Elu": "elu",
    "Softplus": "softplus",
    "HardSwish": "hardswish",
    "Gelu": "gelu",
}
_DROPPED_OPS = ("Dropout", "Identity")
# Ops an activation written out node by node is made of (see `_Lifter._match_activation`).
_ELEMENTWISE_OPS = frozenset(
    {
        "Add",
        "Sub",
        "Mul",
        "Div",
        "Pow",
        "Erf",
        "Tanh",
        "Sigmoid",
        "Exp",
        "Log",
        "Neg",
        "Sqrt",
        "Relu",
        "Clip",
        "HardSigmoid",
        "Softplus",
        "Min",
        "Max",
        "Greater",
        "Less",
        "Where",
    }
)
_MAX_PATTERN_NODES = 12
SUPPORTED_OPS = frozenset(
    {
        "Gemm",
        "MatMul",
        "Add",
        "Conv",
        "BatchNormalization",
        "Flatten",
        "Reshape",
        "MaxPool",
        "AveragePool",
        "GlobalAveragePool",
        "ReduceMean",
        "Concat",
        "Cast",
        "Constant",
        *_ACTIVATION_OPS,
        *_DROPPED_OPS,
    }
)
# Ops lifted only as part of an activation written out node by node (Erf in GELU's Div/Erf/Add/Mul, ...):
# not in SUPPORTED_OPS, which lists what lifts on its own (`codec inspect` reports it per op).
PATTERN_OPS = _ELEMENTWISE_OPS - SUPPORTED_OPS
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
        _check_model(source, "")
        return source
    if isinstance(source, (bytes, bytearray)):
        try:
            import onnx

            proto = onnx.load_model_from_string(bytes(source))
            with _quiet_onnx_ir():
                model = ir.serde.deserialize_model(proto)
        except Exception as exc:
            raise ModelLoadError(f"not a readable ONNX model: {_first_line(exc)}") from exc
        if any(not tensor.name for tensor in proto.graph.initializer):
            # onnxruntime binds an input named "" to it, onnx_ir drops it (an absent input): the two would
            # compute different functions. (Files: onnx_ir drops it before codec sees it; the parity
            # check refuses those.)
            raise ModelLoadError("the model has an initializer with an empty name (ONNX requires a name)")
        # Serialized bytes have no directory for external data to live in: onnx_ir would resolve the
        # location against the working directory (or take it as absolute) and read any file there.
        for owner, _ in _external_tensors(model):
            raise ModelLoadError(
                f"{owner} of an in-memory model points at external data; refusing to read it"
            )
        _check_text(model, "")
        _check_model(model, "")
        return model
    path = regular_file(source, "model file", ModelLoadError)  # a FIFO would block the read below
    try:
        with _quiet_onnx_ir():
            model = ir.load(path)
    except Exception as exc:
        raise ModelLoadError(
            f"{path}: not a readable ONNX model (truncated or corrupt?): {_first_line(exc)}"
        ) from exc
    _check_external_data(model, path.resolve().parent, path)
    _check_text(model, f"{path.name}: ")
    _check_model(model, f"{path.name}: ")
    return model


# The default-domain opsets onnxruntime loads: it refuses models without one, below 7 ("only guarantees
# support for opset 7 or above"; Gemm, pooling and others have no kernel there) and past the newest opset
# it knows, which is the onnx package's (1.23: opset 28, as onnxruntime 1.32).
MIN_OPSET = 7


def max_opset() -> int:
    import onnx

    return int(onnx.defs.onnx_opset_version())


def _check_model(model: ir.Model, where: str) -> None:
    """Refuse what onnxruntime refuses to load, so codec never writes a valid-looking model from it:
    no default-domain opset, one outside [7, the newest known], duplicate node names."""
    opsets = model.opset_imports
    version = opsets.get("", opsets.get("ai.onnx"))
    if version is None:
        raise ModelLoadError(
            f"{where}the model imports no opset of the default ONNX domain (onnxruntime refuses it)"
        )
    if isinstance(version, bool) or not isinstance(version, int) or not MIN_OPSET <= version <= max_opset():
        raise ModelLoadError(
            f"{where}the model's ONNX opset is {version}; codec (like onnxruntime) reads opsets "
            f"{MIN_OPSET} to {max_opset()}"
        )
    seen: set[str] = set()
    for node in model.graph:
        if node.name and node.name in seen:
            raise ModelLoadError(f"{where}two nodes are named {node.name!r}; ONNX requires unique node names")
        seen.add(node.name)
        _check_attributes(node, version, where)


def _check_attributes(node: ir.Node, version: int, where: str) -> None:
    """An attribute the operator does not define at the model's opset (MaxPool's ceil_mode before opset
    10, say) makes onnxruntime refuse the model; codec would otherwise read it and write an opset-18 model
    where it means something. Operators onnx does not know are left to lift, which names them."""
    import onnx.defs

    if node.domain not in ("", "ai.onnx"):
        return
    try:
        schema = onnx.defs.get_schema(node.op_type, version, "")
    except onnx.defs.SchemaError:
        return
    unknown = sorted(set(node.attributes) - set(schema.attributes))
    if unknown:
        raise ModelLoadError(
            f"{where}node {node.name!r} ({node.op_type}) has attribute(s) {', '.join(map(repr, unknown))} "
            f"that {node.op_type} does not define at opset {version} (onnxruntime refuses it)"
        )


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
        raise ModelLoadError(
            f"{where}the model holds a name or metadata entry that is not valid UTF-8: {bad!r}"
        )


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
                f"{path.name}: external data {tensor.location!r} is truncated ({target.stat().st_size} "
                "bytes, "
                f"{owner} needs {needed})"
            )


def _declared_nbytes(tensor: ir.ExternalTensor) -> int:
    """Bytes the tensor's declared dims and type need (0 when they are not a fixed, known size)."""
    try:
        return int(tensor.nbytes)
    except Exception:  # odd dtypes (4-bit, strings) or malformed dims: the read itself will fail cleanly
        return 0


def lift(
    source: str | os.PathLike | bytes | ir.Model, name: str | None = None, check: bool | None = None
) -> NetworkIR:
    """Lift an ONNX model into NetworkIR.

    Every lifted network is then lowered and compared with the original under onnxruntime on random
    inputs (`check_lift`), so that no pass ever trusts a lift that changed what the model computes, and
    a model onnxruntime itself refuses is refused here too. The check costs two onnxruntime sessions;
    `check=False` (or CODEC_LIFT_CHECK=0 in the environment) skips it, which is recorded in the
    network's metadata as `codec.lift_check = skipped` and so travels into every model written from it.

    Args:
        source: a path to an .onnx file (external data beside it), serialized bytes, or an onnx_ir Model.
        name: the network's label; defaults to the file's stem or the graph's name.
        check: run the post-lift parity check; None reads CODEC_LIFT_CHECK (default on).

    Raises:
        ModelLoadError: the file cannot be read, or onnxruntime refuses the model.
        LiftError: the graph is not a network codec can lift (names the node, op and reason), or the
            lifted network does not compute what the model computes.
    """
    notes: list[str] = []
    try:
        model = load_model(source)
    except ModelLoadError as exc:
        model = _load_without_zipmap(source, exc, notes)
    if name is None:
        name = (
            Path(source).stem if isinstance(source, (str, os.PathLike)) else (model.graph.name or "network")
        )
    lifter = _Lifter(model.graph, name)
    lifter.notes.extend(notes)
    net = lifter.run()
    _restore_roles(net, model)
    if check is None:
        check = lift_check_enabled()
    if check:
        check_lift(net, source if isinstance(source, (str, os.PathLike, bytes, bytearray)) else model)
        net.metadata.pop(LIFT_CHECK_KEY, None)
    else:
        net.metadata[LIFT_CHECK_KEY] = "skipped"
    return net


LIFT_CHECK_KEY = "codec.lift_check"
LIFT_CHECK_ENV = "CODEC_LIFT_CHECK"
# The check runs a few examples through both models; past this many activation values per batch it
# would itself need a lot of memory, so it is skipped (and recorded as skipped) instead.
LIFT_CHECK_MAX_VALUES = 1 << 26


def lift_check_enabled() -> bool:
    """Whether `lift` checks parity by default: CODEC_LIFT_CHECK unset, 1, true, yes or on (0/false/no/off
    skip)."""
    from codec.errors import ConfigError

    text = os.environ.get(LIFT_CHECK_ENV, "1").strip().lower()
    if text in ("1", "true", "yes", "on", ""):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{LIFT_CHECK_ENV}={text!r} is not one of 1/0, true/false, yes/no, on/off")


def check_lift(net: NetworkIR, original: str | os.PathLike | bytes | ir.Model, examples: int = 4) -> None:
    """Check that `net` computes what `original` computes under onnxruntime, on random inputs.

    Raises:
        ModelLoadError: onnxruntime refuses the original model (so it has no defined function).
        LiftError: the outputs differ in shape or value (max error past 1e-3 relative, 1e-4 of the
            output's scale absolute).
    """
    import onnxruntime as ort

    from codec.ir.lower import lower, to_bytes

    if isinstance(original, ir.Model):
        original = to_bytes(ir.external_data.load_to_model(original))
    elif isinstance(original, (str, os.PathLike)):
        original = os.fspath(original)
    else:
        original = bytes(original)
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        reference = ort.InferenceSession(original, options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime refuses the model: {_ort_reason(exc)}") from exc
    declared = reference.get_inputs()[0].shape[0] if reference.get_inputs() else None
    batch = declared if isinstance(declared, int) and declared > 0 else examples
    widest = max(math.prod(shape) for shape in [net.input_shape, *net.shapes()])
    if batch > examples and batch * widest > LIFT_CHECK_MAX_VALUES:
        # a large fixed batch (declared, or planted to dodge this check): check the same per-example
        # function with the batch dimension made symbolic (codec lowers it symbolic anyway)
        relaxed = _symbolic_batch(original)
        if relaxed is not None:
            try:
                reference = ort.InferenceSession(relaxed, options, providers=["CPUExecutionProvider"])
                batch = examples
            except Exception as exc:
                raise ModelLoadError(f"onnxruntime refuses the model: {_ort_reason(exc)}") from exc
    if batch * widest > LIFT_CHECK_MAX_VALUES:
        import warnings

        warnings.warn(
            f"{net.name}: post-lift parity check skipped ({batch} x {widest} activation values)", stacklevel=3
        )
        net.metadata[LIFT_CHECK_KEY] = "skipped"
        return
    x = np.random.default_rng(0).standard_normal((batch, *net.input_shape)).astype(np.float32)
    if net.output_name not in [o.name for o in reference.get_outputs()]:
        # the lifted output is not the model's first output (a dropped label tail, a ZipMap taken off):
        # compare with the value codec lifted, made a graph output of the original
        exposed = _with_output(original, net.output_name)
        try:
            reference = ort.InferenceSession(exposed, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime refuses the model: {_ort_reason(exc)}") from exc
    try:
        expected = reference.run(
            [net.output_name] if net.output_name in [o.name for o in reference.get_outputs()] else None,
            {net.input_name: x},
        )[0]
    except Exception as exc:
        raise ModelLoadError(f"onnxruntime cannot run the model: {_ort_reason(exc)}") from exc
    try:
        lowered = ort.InferenceSession(to_bytes(lower(net)), options, providers=["CPUExecutionProvider"])
        got = lowered.run(None, {net.input_name: x})[0]
    except Exception as exc:
        raise LiftError(f"the lifted network cannot be run by onnxruntime: {_ort_reason(exc)}") from exc
    if got.shape != expected.shape:
        raise LiftError(
            f"the lifted network's output has shape {list(got.shape)} but the model's is "
            f"{list(expected.shape)} "
            "under onnxruntime; codec would change what the model computes"
        )
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(1.0, float(finite.max()) if finite.size else 1.0)
    if not np.allclose(got, expected, rtol=1e-3, atol=1e-4 * scale, equal_nan=True):
        with np.errstate(invalid="ignore"):
            error = float(np.nanmax(np.abs(got.astype(np.float64) - expected)))
        raise LiftError(
            f"the lifted network differs from the model under onnxruntime (max abs error {error:.3g} on "
            f"{batch} random inputs); codec would change what the model computes"
        )


def _with_output(original: str | bytes, name: str) -> bytes:
    """`original` with the intermediate value `name` added to its graph outputs (type left to onnxruntime)."""
    import onnx

    proto = onnx.load(original) if isinstance(original, str) else onnx.load_model_from_string(original)
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    return proto.SerializeToString()


def _symbolic_batch(original: str | bytes) -> bytes | None:
    """`original` with its data input's first dimension symbolic; None when it cannot be re-serialized
    (past protobuf's 2 GB)."""
    import onnx

    try:
        proto = onnx.load(original) if isinstance(original, str) else onnx.load_model_from_string(original)
        initializers = {t.name for t in proto.graph.initializer}
        for value in proto.graph.input:
            if value.name not in initializers and value.type.tensor_type.shape.dim:
                value.type.tensor_type.shape.dim[0].dim_param = "batch"
        return proto.SerializeToString()
    except (ValueError, OSError, onnx.onnx_cpp2py_export.checker.ValidationError):
        return None
    except Exception:  # noqa: BLE001 - protobuf's size errors have no stable type; the check is then skipped
        return None


def _ort_reason(exc: BaseException) -> str:
    """onnxruntime's message without its status prefix and source location."""
    import re

    text = _first_line(exc)
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^/\S+:\d+ \S+ ", "", text)
    return text[:300]


def _load_without_zipmap(source, error: ModelLoadError, notes: list[str]) -> ir.Model:
    """skl2onnx's classifiers end in a ZipMap, whose output is a sequence of maps, a type onnx_ir cannot
    read. Such a model is read with onnx instead, the ZipMap removed and the probabilities tensor it reads
    made a graph output (and noted), then loaded as usual. Any other load error is raised as it was."""
    cause = error.__cause__
    while cause is not None and "Map types are not supported" not in str(cause):
        cause = cause.__cause__ or cause.__context__
    if cause is None or isinstance(source, ir.Model):
        raise error
    import onnx
    from onnx import helper

    try:
        proto = (
            onnx.load_model_from_string(bytes(source))
            if isinstance(source, (bytes, bytearray))
            else onnx.load(os.fspath(source), load_external_data=False)
        )
    except Exception:  # noqa: BLE001 - the first error is the one to report
        raise error from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer):
        raise error
    graph = proto.graph
    outputs = {o.name: o for o in graph.output}
    for node in [n for n in graph.node if n.op_type == "ZipMap" and n.output[0] in outputs]:
        graph.node.remove(node)
        graph.output.remove(outputs[node.output[0]])
        graph.output.append(helper.make_tensor_value_info(node.input[0], onnx.TensorProto.FLOAT, None))
        notes.append(
            f"dropped output {node.output[0]!r} (ZipMap: a sequence of maps); lifted the tensor "
            f"{node.input[0]!r} it reads"
        )
    return load_model(proto.SerializeToString())


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
    net.metadata.update(
        {k: v for k, v in model.metadata_props.items() if k.startswith("codec.") and k != "codec.roles"}
    )


class _Lifter:
    def __init__(self, graph: ir.Graph, name: str):
        self.graph = graph
        self.name = name
        self.layers: list[Layer] = []
        self.shape: tuple[int, ...] = ()
        self.visited: set[int] = set()
        self.used_names: set[str] = set()
        # the walk: which layer (or INPUT) computes each value, with its shape, and each layer's latest value
        self.refs: dict[int, tuple[str, tuple[int, ...]]] = {}
        self.current: dict[str, ir.Value] = {}
        self.sources: dict[str, tuple[str, ...]] = {}
        self.source = INPUT  # the layer the node being visited reads
        self.needed: set[int] = set()  # nodes the kept output depends on
        self.notes: list[str] = []

    # -- the walk ---------------------------------------------------------------------------------------
    def run(self) -> NetworkIR:
        graph_inputs = [v for v in self.graph.inputs if v.name not in self.graph.initializers]
        if len(graph_inputs) != 1:
            raise LiftError(
                f"the graph has {len(graph_inputs)} data inputs; codec lifts single-input networks"
            )
        output = self._kept_output()
        x = graph_inputs[0]
        self.input_shape = self._input_shape(x)
        self.refs[id(x)] = (INPUT, self.input_shape)
        if not self._consumers(x):
            raise LiftError(f"value {x.name!r} is consumed by no node but is not the graph output")
        for node in self.graph:
            if id(node) in self.visited or node.op_type == "Constant":
                continue
            if id(node) not in self.needed:
                if self.notes:
                    continue  # part of a dropped output's tail (listed in the notes)
                raise LiftError(
                    "node is not on the path from the input to the output", node.name, node.op_type
                )
            self._visit(node)
        if id(output) not in self.refs:
            raise LiftError(f"output {output.name!r} is not computed from the input {x.name!r}")
        if not any(is_compute(layer) for layer in self.layers):
            raise LiftError("the graph has no Gemm, MatMul or Conv layer to lift")
        if self.refs[id(output)][0] != self.layers[-1].name:
            raise LiftError(f"output {output.name!r} is not computed by the graph's last layer")
        for layer in self.layers[:-1]:
            if not any(layer.name in srcs for srcs in self._all_sources().values()):
                raise LiftError(f"layer {layer.name!r} does not lead to the output {output.name!r}")
        metadata = {"codec.lift.dropped": "\n".join(self.notes)} if self.notes else {}
        return NetworkIR(
            name=self.name,
            input_name=x.name,
            output_name=output.name,
            input_shape=self.input_shape,
            layers=self.layers,
            metadata=metadata,
            sources=self.sources,
        )

    def _all_sources(self) -> dict[str, tuple[str, ...]]:
        out, previous = {}, INPUT
        for layer in self.layers:
            out[layer.name] = self.sources.get(layer.name, (previous,))
            previous = layer.name
        return out

    def _kept_output(self) -> ir.Value:
        """The graph output to lift, and the nodes it needs (`self.needed`).

        One output is lifted as is. A classifier exported by skl2onnx has two, a label and the class
        probabilities (a float tensor, or a ZipMap of it): the probabilities are lifted and the label's
        tail (ArgMax, ArrayFeatureExtractor, Cast, ...) is dropped, with a note saying so (a ZipMap was
        already taken off by `_load_without_zipmap`)."""
        outputs = list(self.graph.outputs)
        kept = outputs[0] if len(outputs) == 1 else None
        if kept is None:
            candidates = []
            for value in outputs:
                if isinstance(value.type, ir.TensorType) and value.dtype == ir.DataType.FLOAT:
                    candidates.append(value)
            if len({id(c) for c in candidates}) != 1:
                names = ", ".join(repr(v.name) for v in outputs)
                raise LiftError(
                    f"the graph has {len(outputs)} outputs ({names}); codec lifts single-output "
                    "networks, or a "
                    "classifier with a label output and one float probabilities output"
                )
            kept = candidates[0]
        # an output no node computes: walk every node, so that a broken graph is refused at its first bad node
        stack = [kept.producer()] if kept.producer() is not None else list(self.graph)
        while stack:
            node = stack.pop()
            if id(node) in self.needed:
                continue
            self.needed.add(id(node))
            stack.extend(v.producer() for v in node.inputs if v is not None and v.producer() is not None)
        if len(outputs) > 1:
            for value in outputs:
                if value is not kept:
                    self.notes.append(
                        f"dropped output {value.name!r} ({' -> '.join(self._tail(value)) or 'no node'})"
                    )
        return kept

    def _tail(self, value: ir.Value) -> list[str]:
        """Op types of the nodes computing `value` that the kept output does not need, in graph order."""
        seen, stack = set(), [value.producer()]
        while stack:
            node = stack.pop()
            if node is None or id(node) in seen or id(node) in self.needed:
                continue
            seen.add(id(node))
            stack.extend(v.producer() for v in node.inputs if v is not None)
        return [n.op_type for n in self.graph if id(n) in seen and n.op_type != "Constant"]

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
            raise LiftError(
                f"input {x.name!r} has shape {x.shape}; all but the batch dimension must be fixed"
            )
        if math.prod(rest) > MAX_TENSOR_ELEMENTS:
            raise LiftError(
                f"input {x.name!r} has shape {x.shape}: {math.prod(rest)} values per example, beyond "
                "codec's limit"
            )
        return tuple(int(d) for d in rest)

    def _consumers(self, value: ir.Value) -> list[ir.Node]:
        """The nodes the kept output needs that read `value` (a dropped label tail does not count)."""
        users = {id(use.node): use.node for use in value.uses() if id(use.node) in self.needed}
        return list(users.values())

    def _data_inputs(self, node: ir.Node) -> list[ir.Value]:
        return [v for v in node.inputs if v is not None and ir.convenience.get_const_tensor(v) is None]

    def _visit(self, node: ir.Node) -> None:
        if id(node) in self.visited:
            raise LiftError("the graph has a cycle through this node", node.name, node.op_type)
        self.visited.add(id(node))
        if node.domain not in ("", "ai.onnx"):
            raise LiftError(f"custom-domain op ({node.domain}) is not supported", node.name, node.op_type)
        if not node.outputs or node.outputs[0] is None:
            raise LiftError("node has no output", node.name, node.op_type)
        try:
            out, count = self._dispatch(node)
        except (
            TypeError,
            ValueError,
            KeyError,
            IndexError,
            ArithmeticError,
            AttributeError,
            AssertionError,
        ) as exc:
            # A hostile or corrupt file can put anything in a node (attributes of the wrong type, missing
            # inputs, inconsistent shapes; onnx_ir asserts on tensor data stored in the wrong field): whatever
            # the specific checks miss is still a refusal of this node.
            raise LiftError(
                f"malformed node ({type(exc).__name__}: {_first_line(exc)})", node.name, node.op_type
            ) from exc
        if len(self.layers) > count:
            first = self.layers[count]
            default = self.layers[count - 1].name if count else INPUT
            if first.name not in self.sources and self.source != default:
                self.sources[first.name] = (self.source,)
            owner = self.layers[-1].name
        else:
            owner = self.source  # fused into its source (activation, BatchNormalization) or dropped
        self.refs[id(out)] = (owner, self.shape)
        self.current[owner] = out
        if not self._consumers(out) and out not in self.graph.outputs:
            raise LiftError(
                f"its output {out.name!r} is used by no node and is not the graph output",
                node.name,
                node.op_type,
            )

    def _dispatch(self, node: ir.Node) -> tuple[ir.Value, int]:
        """Run the node's handler on its data inputs; returns its output and the layer count before it."""
        data = self._data_inputs(node)
        if not data:
            raise LiftError("node reads no value computed from the network input", node.name, node.op_type)
        for value in data:
            if id(value) not in self.refs:
                raise LiftError(
                    f"it reads {value.name!r}, which is not computed from the network input by a node "
                    "before it",
                    node.name,
                    node.op_type,
                )
        self.source, self.shape = self.refs[id(data[0])]
        count = len(self.layers)
        return self._handler(node, data)(node), count

    def _handler(self, node: ir.Node, data: list[ir.Value]):
        if node.op_type in _ELEMENTWISE_OPS and len({id(v) for v in data}) == 1:
            match = self._match_activation(node, data[0])
            if match is not None:
                return lambda node: self._fuse_pattern(node, *match)
        handler = getattr(self, f"_op_{node.op_type}", None)
        if handler is None:
            if node.op_type in _ACTIVATION_OPS:
                handler = self._activation
            elif node.op_type in _DROPPED_OPS:
                handler = self._dropped
            else:
                raise LiftError("unsupported op", node.name, node.op_type)
        return handler

    # -- helpers ----------------------------------------------------------------------------------------
    def _const(self, node: ir.Node, index: int, what: str, required: bool = False) -> np.ndarray | None:
        # an empty name is ONNX's "optional input absent" (onnxruntime reads nothing there)
        if index >= len(node.inputs) or node.inputs[index] is None or not node.inputs[index].name:
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
            raise LiftError(
                f"its {what} {value.name!r} has {tensor.size} elements, beyond codec's limit",
                node.name,
                node.op_type,
            )
        proto = getattr(tensor, "raw", None)
        if hasattr(proto, "ByteSize") and _declared_nbytes(tensor) > 8 * proto.ByteSize() + 64:
            # Well-formed inline data takes at least 1 byte per 8 bytes of tensor (int64 zeros as varints);
            # a tiny tensor declaring huge dims would make onnx_ir allocate them (4-bit unpacking does).
            raise LiftError(
                f"its {what} {value.name!r} declares {tensor.size} elements but carries far less data "
                "(corrupt file?)",
                node.name,
                node.op_type,
            )
        try:
            array = tensor.numpy()
        except Exception as exc:
            raise LiftError(
                f"cannot read {what} {value.name!r}: {_first_line(exc)}", node.name, node.op_type
            ) from exc
        if what in ("weight", "bias", "scale", "mean", "variance", "shift"):
            if array.dtype.kind != "f":
                raise LiftError(
                    f"its {what} {value.name!r} has dtype {array.dtype}; expected floating point",
                    node.name,
                    node.op_type,
                )
            if not np.all(np.isfinite(array)):
                raise LiftError(
                    f"its {what} {value.name!r} contains NaN or infinite values", node.name, node.op_type
                )
            if array.dtype != np.float32:
                with np.errstate(over="ignore"):
                    narrowed = array.astype(np.float32)
                if not np.all(np.isfinite(narrowed)):
                    raise LiftError(
                        f"its {what} {value.name!r} ({array.dtype}) holds values beyond float32's range",
                        node.name,
                        node.op_type,
                    )
                array = narrowed
        return array

    def _attrs(self, node: ir.Node) -> dict:
        return {k: a.value for k, a in node.attributes.items()}

    def _ints(
        self, node: ir.Node, key: str, default: tuple[int, ...] | None, length: int, minimum: int
    ) -> tuple[int, ...]:
        """A list-of-ints attribute, checked: `length` integers, each >= `minimum` (zero strides, negative
        pads and the like would otherwise become IR that divides by zero or cannot be lowered)."""
        value = self._attrs(node).get(key, default)
        if value is None:
            raise LiftError(f"attribute {key} is required", node.name, node.op_type)
        values = tuple(value) if isinstance(value, (list, tuple)) else (value,)
        if len(values) != length or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in values
        ):
            raise LiftError(
                f"attribute {key}={value!r} is invalid: expected {length} integers >= {minimum}",
                node.name,
                node.op_type,
            )
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
        if min(shape) < 1:
            raise LiftError(
                f"output would be empty for an input of shape {list(self.shape)}", node.name, node.op_type
            )
        if math.prod(shape) > MAX_TENSOR_ELEMENTS:
            raise LiftError(f"output shape {list(shape)} is beyond codec's limit", node.name, node.op_type)
        return shape

    def _out(self, node: ir.Node) -> ir.Value:
        used = [o for o in node.outputs[1:] if o is not None and (o.uses() or o in self.graph.outputs)]
        if used:
            raise LiftError(
                f"its extra output {used[0].name!r} is used; codec supports its first output only",
                node.name,
                node.op_type,
            )
        return node.outputs[0]

    def _layer_name(self, node: ir.Node, fallback: str) -> str:
        """A readable unique layer name: the weight's module path ("net.1" for "net.1.weight"), else the
        node's."""
        weight = (
            node.inputs[1] if len(node.inputs) > 1 and node.op_type in ("Gemm", "MatMul", "Conv") else None
        )
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

    def _layer(self, name: str) -> Layer | None:
        return next((layer for layer in self.layers if layer.name == name), None)

    def _fusion_target(self, node: ir.Node, pattern: list[ir.Node] | None = None) -> Layer | None:
        """The compute or Add layer the node (with the rest of its `pattern`) can be folded into: the
        layer its input comes from, provided nothing else reads that value (another branch would see
        the value before the fold). None when the input is not such a layer's."""
        layer = self._layer(self.source)
        if not (is_compute(layer) or isinstance(layer, Add)):
            return None
        self._check_unbranched(node, self.current[layer.name], pattern or [node])
        return layer

    def _check_unbranched(self, node: ir.Node, value: ir.Value, pattern: list[ir.Node]) -> None:
        inside = {id(n) for n in pattern}
        others = [n for n in self._consumers(value) if id(n) not in inside]
        if others or value in self.graph.outputs:
            what = f"{others[0].name} ({others[0].op_type})" if others else "the graph output"
            raise LiftError(
                f"it would be folded into the layer computing {value.name!r}, but {what} reads that "
                "value too; "
                "codec folds activations and BatchNormalization only into a layer nothing else reads",
                node.name,
                node.op_type,
            )

    # -- compute layers ---------------------------------------------------------------------------------
    def _add_dense(self, node: ir.Node, weight: np.ndarray, bias: np.ndarray | None) -> None:
        if len(self.shape) != 1:
            raise LiftError(
                f"dense layer reads a tensor of shape {list(self.shape)}; flatten it to (batch, "
                "features) first",
                node.name,
                node.op_type,
            )
        if weight.shape[1] != self.shape[0]:
            raise LiftError(
                f"weight expects {weight.shape[1]} input features but receives {self.shape[0]}",
                node.name,
                node.op_type,
            )
        out = weight.shape[0]
        if out < 1:
            raise LiftError("layer has zero output features (an empty layer)", node.name, node.op_type)
        bias = np.zeros(out, np.float32) if bias is None else bias
        if bias.size == 1 and out != 1:
            bias = np.full(out, float(bias.reshape(-1)[0]), np.float32)
        if bias.size != out:
            raise LiftError(
                f"bias has {bias.size} entries for {out} output features", node.name, node.op_type
            )
        self.layers.append(
            Dense(self._layer_name(node, "dense"), weight.astype(np.float32), bias.reshape(-1))
        )
        self.shape = (out,)

    def _per_output_bias(self, node: ir.Node, bias: np.ndarray, out: int) -> np.ndarray:
        """`bias` as one value per output feature, when adding it to a (batch, out) tensor keeps that shape
        and adds the same value to every example: shape (), (1,), (out,), (1, 1) or (1, out). Anything
        else broadcasts differently (a rank-3 bias makes the output rank 3; (batch, out) varies per
        example), so lifting it as a per-feature bias would change the function: refused."""
        shape = tuple(bias.shape)
        if len(shape) > 2 or (len(shape) == 2 and shape[0] != 1) or (shape and shape[-1] not in (1, out)):
            raise LiftError(
                f"bias of shape {list(shape)} is not one value per output feature of a (batch, {out}) output",
                node.name,
                node.op_type,
            )
        return bias.reshape(-1)

    def _op_Gemm(self, node: ir.Node) -> ir.Value:
        attrs = self._attrs(node)
        if attrs.get("transA", 0):
            raise LiftError("transA=1 is not supported", node.name, node.op_type)
        weight = self._const(node, 1, "weight", required=True)
        if weight.ndim != 2:
            raise LiftError(f"weight has rank {weight.ndim}; expected 2", node.name, node.op_type)
        weight = weight if attrs.get("transB", 0) else weight.T
        alpha = np.float32(self._float(node, "alpha", 1.0))
        if alpha != 1 and weight.size:
            # onnxruntime computes alpha * (A @ B); codec folds alpha into B. The two commute (up to
            # rounding) unless A @ B leaves float32's range before alpha scales it (weights near its
            # limit), or alpha * B does: then one side is inf/NaN where the other is not.
            limit = np.finfo(np.float32).max / 2.0**32 / weight.shape[1]
            largest = float(np.abs(weight).max())
            with np.errstate(over="ignore"):
                folded = weight * alpha
            if largest > limit or not np.all(np.isfinite(folded)):
                raise LiftError(
                    f"alpha={float(alpha):g} with weights up to {largest:.3g}: A @ B or alpha * B leaves "
                    "float32's range, so folding alpha into the weights would change where the model "
                    "overflows",
                    node.name,
                    node.op_type,
                )
            weight = folded
        bias = self._const(node, 2, "bias")
        if bias is not None:
            bias = self._per_output_bias(
                node, np.asarray(bias * np.float32(self._float(node, "beta", 1.0))), weight.shape[0]
            )
        self._add_dense(node, weight, bias)
        return self._out(node)

    def _op_MatMul(self, node: ir.Node) -> ir.Value:
        weight = self._const(node, 1, "weight", required=True)
        if weight.ndim != 2:
            raise LiftError(f"weight has rank {weight.ndim}; expected 2", node.name, node.op_type)
        out = node.outputs[0]
        bias = None
        users = self._consumers(out)
        if len(users) == 1 and users[0].op_type == "Add" and out not in self.graph.outputs:
            add = users[0]
            other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
            if ir.convenience.get_const_tensor(other) is not None:
                self.visited.add(id(add))
                index = 1 if add.inputs[0] is out else 0
                bias = self._per_output_bias(add, self._const(add, index, "bias"), weight.shape[1])
                node, out = add, add.outputs[0]
        self._add_dense(node, weight.T, bias)
        return out

    def _op_Conv(self, node: ir.Node) -> ir.Value:
        attrs = self._attrs(node)
        if len(self.shape) != 3:
            raise LiftError(
                f"convolution reads a tensor of shape {list(self.shape)}; expected (channels, height, width)",
                node.name,
                node.op_type,
            )
        groups = attrs.get("group", 1)
        if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
            raise LiftError(f"group={groups!r} is not a positive integer", node.name, node.op_type)
        if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise LiftError(
                f"auto_pad={attrs['auto_pad']} is not supported; export with explicit pads",
                node.name,
                node.op_type,
            )
        weight = self._const(node, 1, "weight", required=True)
        if weight.ndim != 4:
            raise LiftError(
                f"weight has rank {weight.ndim}; codec supports 2-D convolutions", node.name, node.op_type
            )
        if weight.shape[1] * groups != self.shape[0] or weight.shape[0] % groups:
            raise LiftError(
                f"weight of shape {list(weight.shape)} in {groups} groups does not fit {self.shape[0]} "
                "input channels",
                node.name,
                node.op_type,
            )
        bias = self._const(node, 2, "bias")
        bias = np.zeros(weight.shape[0], np.float32) if bias is None else bias
        conv = Conv(
            self._layer_name(node, "conv"),
            weight,
            bias,
            strides=self._ints(node, "strides", (1, 1), 2, 1),
            pads=self._valid_pads(node),
            dilations=self._ints(node, "dilations", (1, 1), 2, 1),
            groups=groups,
        )
        shape = self._check_size(node, conv.output_shape(self.shape))
        self.layers.append(conv)
        self.shape = shape
        return self._out(node)

    def _valid_pads(self, node: ir.Node) -> tuple[int, ...]:
        """A convolution's pads; with auto_pad=VALID onnxruntime ignores them (ONNX shape inference does
        not), so explicit non-zero pads there are refused rather than read one way or the other."""
        pads = self._ints(node, "pads", (0, 0, 0, 0), 4, 0)
        if self._attrs(node).get("auto_pad", "NOTSET") == "VALID" and any(pads):
            raise LiftError(
                f"auto_pad=VALID with explicit pads {list(pads)}: onnxruntime ignores the pads but "
                "ONNX shape "
                "inference applies them; export with one or the other",
                node.name,
                node.op_type,
            )
        return pads

    def _op_BatchNormalization(self, node: ir.Node) -> ir.Value:
        """Fold inference-mode BN into the layer before it: y = scale (z - mean) / sqrt(var + eps) + shift
        for z = W x + b is W' x + b' with W' = W * f (row-wise), b' = (b - mean) * f + shift, f = scale /
        sqrt(var + eps) (onnxscript's fuse_batchnorm rule computes the same, in float32)."""
        layer = self._fusion_target(node)
        if not is_compute(layer) or layer.activation.kind != "identity":
            raise LiftError(
                "BatchNormalization is supported only right after a Gemm/MatMul/Conv (it is folded into it)",
                node.name,
                node.op_type,
            )
        attrs = self._attrs(node)
        if attrs.get("training_mode", 0):
            raise LiftError(
                "training-mode BatchNormalization cannot be folded; export in eval mode",
                node.name,
                node.op_type,
            )
        params = [
            self._const(node, i, w, required=True)
            for i, w in ((1, "scale"), (2, "shift"), (3, "mean"), (4, "variance"))
        ]
        if any(p.shape != (layer.num_neurons,) for p in params):
            shapes = ", ".join(str(list(p.shape)) for p in params)
            raise LiftError(
                f"scale, shift, mean and variance have shapes {shapes} for {layer.num_neurons} neurons",
                node.name,
                node.op_type,
            )
        scale, shift, mean, var = params
        var = var + self._float(node, "epsilon", 1e-5)
        if not np.all(var > 0):
            raise LiftError("variance + epsilon is not positive for every channel", node.name, node.op_type)
        factor = (scale / np.sqrt(var)).astype(np.float32)
        layer.weight = (layer.weight * factor.reshape((-1,) + (1,) * (layer.weight.ndim - 1))).astype(
            np.float32
        )
        layer.bias = ((layer.bias - mean) * factor + shift).astype(np.float32)
        return self._out(node)

    # -- activations and structural ops -----------------------------------------------------------------
    def _activation(self, node: ir.Node) -> ir.Value:
        kind = _ACTIVATION_OPS[node.op_type]
        attrs = self._attrs(node)
        alpha = 0.01
        if kind == "leaky_relu":
            alpha = self._float(node, "alpha", 0.01)
        elif kind == "elu":
            alpha = self._float(node, "alpha", 1.0)
        elif node.op_type == "Gelu":
            approximate = attrs.get("approximate", "none")
            if approximate not in ("none", "tanh"):
                raise LiftError(
                    f"approximate={approximate!r} is not a GELU form codec knows", node.name, node.op_type
                )
            kind = "gelu" if approximate == "none" else "gelu_tanh"
        elif node.op_type == "HardSigmoid":
            raise LiftError(
                "HardSigmoid is not supported (only as part of HardSwish)", node.name, node.op_type
            )
        if kind == "softmax":
            rank = len(self.shape) + 1
            axis = attrs.get("axis", -1)
            if axis not in (-1, rank - 1) or rank != 2:
                raise LiftError(
                    f"softmax over axis {axis} of a rank-{rank} tensor; codec supports the feature "
                    "axis of (batch, features)",
                    node.name,
                    node.op_type,
                )
        self._set_activation(node, Activation(kind, alpha), [node])
        return self._out(node)

    def _set_activation(self, node: ir.Node, activation: Activation, pattern: list[ir.Node]) -> None:
        target = self._fusion_target(node, pattern)
        pool = self._layer(self.source)
        if target is None and isinstance(pool, Pool) and pool.mode == "max":
            # act(maxpool(z)) == maxpool(act(z)) for monotone non-decreasing act: move it onto the conv.
            self._check_unbranched(node, self.current[pool.name], pattern)
            sources = self._all_sources()[pool.name]
            before = self._layer(sources[0])
            if activation.monotone and before is not None and is_compute(before):
                pool_node = self.current[pool.name].producer()
                self._check_unbranched(pool_node, self.current[before.name], [pool_node])
                target = before
            elif not activation.monotone:
                raise LiftError(
                    f"{activation.kind} after a max pool: it is not monotone, so it cannot be moved "
                    "onto the layer "
                    "before the pool (max and the activation do not commute)",
                    node.name,
                    node.op_type,
                )
        if target is None:
            raise LiftError(
                "activation must follow a Gemm/MatMul/Conv layer, an Add (or a max pool right after a layer)",
                node.name,
                node.op_type,
            )
        if target.activation.kind != "identity":
            raise LiftError(
                f"a second activation after {target.activation.kind} on layer {target.name!r} is not "
                "supported",
                node.name,
                node.op_type,
            )
        if activation.kind == "softmax" and isinstance(target, Add):
            raise LiftError("softmax after an Add is not supported", node.name, node.op_type)
        target.activation = activation

    # -- element-wise activation patterns ---------------------------------------------------------------
    def _match_activation(
        self, node: ir.Node, v: ir.Value
    ) -> tuple[Activation, list[ir.Node], ir.Value] | None:
        """Recognise an activation written as several element-wise nodes of one value `v` (the GELU
        Div/Erf/Add/Mul of the exporters, SiLU's Sigmoid*x, HardSwish's x*HardSigmoid(x), ...).

        The region grows from `v` node by node (graph order) over element-wise nodes whose inputs are `v`,
        region values or scalar constants. Once nothing outside the region reads `v` or any region value
        but the last, the region is evaluated on a grid of pre-activations and compared with each known
        activation: a match within float32 rounding is that activation."""
        if self.refs[id(v)][0] == INPUT:
            return None
        order = {id(n): i for i, n in enumerate(self.graph)}
        region: list[ir.Node] = []
        values = {id(v)}
        for _ in range(_MAX_PATTERN_NODES):
            candidates = []
            for value in [v, *(n.outputs[0] for n in region)]:
                for user in self._consumers(value):
                    if id(user) in {id(n) for n in region} or id(user) in self.visited and user is not node:
                        continue
                    if self._elementwise_of(user, values):
                        candidates.append(user)
            if not candidates:
                return None
            nxt = min(candidates, key=lambda n: order[id(n)])
            region.append(nxt)
            values.add(id(nxt.outputs[0]))
            if len(region) < 2 or not self._closed(v, region):
                continue
            activation = _identify(region, v, self)
            if activation is not None:
                return activation, region, region[-1].outputs[0]
        return None

    def _elementwise_of(self, node: ir.Node, values: set[int]) -> bool:
        if node.op_type not in _ELEMENTWISE_OPS or node.domain not in ("", "ai.onnx") or not node.outputs:
            return False
        for value in node.inputs:
            if value is None or id(value) in values:
                continue
            tensor = ir.convenience.get_const_tensor(value)
            if tensor is None or tensor.size != 1:
                return False
        return True

    def _closed(self, v: ir.Value, region: list[ir.Node]) -> bool:
        inside = {id(n) for n in region}
        for value in [v, *(n.outputs[0] for n in region[:-1])]:
            if value in self.graph.outputs or any(id(n) not in inside for n in self._consumers(value)):
                return False
        return True

    def _fuse_pattern(
        self, node: ir.Node, activation: Activation, region: list[ir.Node], out: ir.Value
    ) -> ir.Value:
        self._set_activation(node, activation, region)
        self.visited.update(id(n) for n in region)
        return out

    def _dropped(self, node: ir.Node) -> ir.Value:
        if node.op_type == "Dropout":
            training = node.inputs[2] if len(node.inputs) > 2 else None
            if training is not None:
                mode = ir.convenience.get_const_tensor(training)
                if mode is None or mode.size != 1 or bool(mode.numpy().reshape(-1)[0]):
                    raise LiftError(
                        "training-mode Dropout is not supported; export in eval mode", node.name, node.op_type
                    )
        return self._out(node)

    def _op_Add(self, node: ir.Node) -> ir.Value:
        """A residual connection: the sum of two layers' outputs (a bias Add is folded by `_op_MatMul`)."""
        data = self._data_inputs(node)
        if len(data) != 2 or len(node.inputs) != 2:
            raise LiftError("Add of a constant is supported only as a MatMul's bias", node.name, node.op_type)
        refs = [self.refs[id(v)] for v in data]
        for (source, _), value in zip(refs, data):
            layer = self._layer(source)
            if not (is_compute(layer) or isinstance(layer, Add)):
                what = "the network input" if source == INPUT else f"{type(layer).__name__} layer {source!r}"
                raise LiftError(
                    f"it adds {value.name!r}, the output of {what}; codec adds outputs of "
                    "Gemm/MatMul/Conv layers "
                    "and of other Adds only (their neurons are tied)",
                    node.name,
                    node.op_type,
                )
        if refs[0][1] != refs[1][1]:
            raise LiftError(
                f"it adds shapes {list(refs[0][1])} and {list(refs[1][1])}; codec adds equal shapes only",
                node.name,
                node.op_type,
            )
        add = Add(self._layer_name(node, "add"), int(self.shape[0]))
        self.sources[add.name] = (refs[0][0], refs[1][0])
        self.layers.append(add)
        return self._out(node)

    def _op_Concat(self, node: ir.Node) -> ir.Value:
        data = self._data_inputs(node)
        if len(data) != len(node.inputs) or len(data) < 2:
            raise LiftError("Concat of constants is not supported", node.name, node.op_type)
        refs = [self.refs[id(v)] for v in data]
        rank = len(self.shape) + 1
        axis = self._attrs(node).get("axis")
        if axis not in (1, 1 - rank):
            raise LiftError(
                f"Concat on axis {axis}; codec concatenates on the neuron axis (1)", node.name, node.op_type
            )
        if any(len(shape) != len(self.shape) or shape[1:] != self.shape[1:] for _, shape in refs):
            shapes = ", ".join(str(list(shape)) for _, shape in refs)
            raise LiftError(
                f"it concatenates shapes {shapes}, which differ beyond the neuron axis",
                node.name,
                node.op_type,
            )
        concat = Concat(self._layer_name(node, "concat"))
        self.sources[concat.name] = tuple(source for source, _ in refs)
        self.layers.append(concat)
        self.shape = (sum(shape[0] for _, shape in refs), *self.shape[1:])
        return self._out(node)

    def _op_Cast(self, node: ir.Node) -> ir.Value:
        """A Cast to float32 of a float32 value (skl2onnx starts with one) changes nothing: dropped."""
        if self._attrs(node).get("to") != ir.DataType.FLOAT:
            raise LiftError("only a Cast to float32 of a float32 value is supported", node.name, node.op_type)
        return self._out(node)

    def _op_Flatten(self, node: ir.Node) -> ir.Value:
        axis = self._attrs(node).get("axis", 1)
        if axis != 1:
            raise LiftError(
                f"Flatten with axis={axis}; codec supports axis=1 (batch, features)", node.name, node.op_type
            )
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
            raise LiftError(
                f"target shape has dtype {target.dtype}; ONNX requires int64", node.name, node.op_type
            )
        target = [int(d) for d in np.asarray(target).reshape(-1)]
        features = int(np.prod(self.shape))
        copies_batch = not self._attrs(node).get(
            "allowzero", 0
        )  # 0 means "copy the input's dim" unless allowzero
        flat = target == [-1, features] or (copies_batch and target in ([0, -1], [0, features]))
        if not flat:
            raise LiftError(
                f"Reshape to {target} from {['batch', *self.shape]}; codec supports only flattening to "
                f"(batch, {features})",
                node.name,
                node.op_type,
            )
        return self._flatten(node)

    def _pool(self, node: ir.Node, mode: str) -> ir.Value:
        attrs = self._attrs(node)
        if len(self.shape) != 3:
            raise LiftError(
                f"pooling reads a tensor of shape {list(self.shape)}; expected (channels, height, width)",
                node.name,
                node.op_type,
            )
        if self._ints(node, "dilations", (1, 1), 2, 1) != (1, 1):
            raise LiftError("dilated pooling is not supported", node.name, node.op_type)
        kernel = self._ints(node, "kernel_shape", None, 2, 1)
        strides = self._ints(node, "strides", (1, 1), 2, 1)
        pads = self._auto_pads(node, kernel, strides, self._ints(node, "pads", (0, 0, 0, 0), 4, 0))
        if any(pad >= kernel[i % 2] for i, pad in enumerate(pads)):
            raise LiftError(
                f"pads {list(pads)} must be smaller than the kernel {list(kernel)}", node.name, node.op_type
            )
        pool = Pool(
            self._layer_name(node, f"{mode}pool"),
            mode,
            kernel,
            strides,
            pads,
            bool(attrs.get("ceil_mode", 0)),
            bool(attrs.get("count_include_pad", 0)),
        )
        shape = self._check_size(node, pool.output_shape(self.shape))
        if pool.ceil_mode:
            # Both round up, but torch and onnxruntime then drop a last window that would start past the
            # input, while ONNX shape inference keeps it: where they differ, onnxruntime cannot load the
            # model once a later layer fixes the size, so codec refuses it.
            inferred = [
                -(-(self.shape[i + 1] + pads[i] + pads[i + 2] - kernel[i]) // pool.strides[i]) + 1
                for i in range(2)
            ]
            if list(shape[1:]) != inferred:
                raise LiftError(
                    f"ceil_mode pooling of a {list(self.shape[1:])} map gives {list(shape[1:])} in "
                    "onnxruntime but "
                    f"{inferred} by ONNX shape inference (its last window starts outside the input); "
                    "export with "
                    "ceil_mode=0 or other pads",
                    node.name,
                    node.op_type,
                )
        self.layers.append(pool)
        self.shape = shape
        return self._out(node)

    def _auto_pads(self, node: ir.Node, kernel, strides, pads: tuple[int, ...]) -> tuple[int, ...]:
        """The explicit pads a pooling node's `auto_pad` means, read as onnxruntime reads them.

        onnxruntime ignores the `pads` attribute whenever auto_pad is not NOTSET (VALID: no padding;
        SAME_UPPER/SAME_LOWER: pad to ceil(size / stride) outputs, the odd pad at the end / the start),
        while ONNX shape inference applies them: a model with both declares a shape onnxruntime does not
        compute, so it is refused.
        """
        mode = self._attrs(node).get("auto_pad", "NOTSET")
        if mode == "NOTSET":
            return pads
        if mode not in ("VALID", "SAME_UPPER", "SAME_LOWER"):
            raise LiftError(f"auto_pad={mode!r} is not an ONNX padding mode", node.name, node.op_type)
        # SAME_*: a `pads` attribute at all, even all zeros, is applied by ONNX shape inference where
        # onnxruntime's kernel pads to SAME (found by the extended hypothesis run: onnxruntime then
        # refuses the model at load); VALID with zero pads means the same either way.
        if any(pads) or (mode != "VALID" and "pads" in node.attributes):
            raise LiftError(
                f"auto_pad={mode} with explicit pads {list(pads)}: onnxruntime ignores the pads but "
                "ONNX shape "
                "inference applies them; export with one or the other",
                node.name,
                node.op_type,
            )
        if mode == "VALID":
            return (0, 0, 0, 0)
        head, tail = [0, 0], [0, 0]
        for i in range(2):
            size = self.shape[i + 1]
            needed = (-(-size // strides[i]) - 1) * strides[i] + kernel[i] - size
            if needed < 0:
                raise LiftError(
                    f"auto_pad={mode} with a stride larger than the kernel needs negative padding",
                    node.name,
                    node.op_type,
                )
            head[i] = (needed + 1) // 2 if mode == "SAME_LOWER" else needed // 2
            tail[i] = needed - head[i]
        return (head[0], head[1], tail[0], tail[1])

    def _op_MaxPool(self, node: ir.Node) -> ir.Value:
        return self._pool(node, "max")

    def _op_AveragePool(self, node: ir.Node) -> ir.Value:
        return self._pool(node, "avg")

    def _op_ReduceMean(self, node: ir.Node) -> ir.Value:
        """The mean over the spatial axes (what dynamo exports for AdaptiveAvgPool2d(1)): a global average
        pool, followed by a flatten when keepdims=0."""
        attrs = self._attrs(node)
        axes = self._const(node, 1, "axes") if len(node.inputs) > 1 else attrs.get("axes")
        axes = sorted(int(a) % 4 for a in np.asarray(axes).reshape(-1)) if axes is not None else None
        if len(self.shape) != 3 or axes != [2, 3]:
            raise LiftError(
                f"ReduceMean over axes {axes} of shape {['batch', *self.shape]}; codec supports the "
                "mean over the "
                "spatial axes (2, 3) of (batch, channels, height, width)",
                node.name,
                node.op_type,
            )
        self._global_pool(node)
        if not attrs.get("keepdims", 1):
            self.layers.append(Flatten(self._layer_name(node, "flatten")))
            self.shape = (self.shape[0],)
        return self._out(node)

    def _op_GlobalAveragePool(self, node: ir.Node) -> ir.Value:
        if len(self.shape) != 3:
            raise LiftError(
                f"pooling reads a tensor of shape {list(self.shape)}; expected (channels, height, width)",
                node.name,
                node.op_type,
            )
        self._global_pool(node)
        return self._out(node)

    def _global_pool(self, node: ir.Node) -> None:
        c, h, w = self.shape
        self.layers.append(Pool(self._layer_name(node, "gap"), "avg", (h, w), (1, 1), is_global=True))
        self.shape = (c, 1, 1)


# Pre-activations on which an element-wise pattern is compared with the known activations: dense around 0,
# where they differ most, and out to where exp() saturates.
_GRID = np.concatenate([np.linspace(-12.0, 12.0, 961), np.linspace(-3.0, 3.0, 601)])
_CANDIDATES = (
    Activation("gelu"),
    Activation("gelu_tanh"),
    Activation("silu"),
    Activation("hardswish"),
    Activation("softplus"),
    Activation("elu", 1.0),
    Activation("sigmoid"),
    Activation("tanh"),
    Activation("relu"),
)


def _identify(region: list[ir.Node], v: ir.Value, lifter: _Lifter) -> Activation | None:
    """The known activation the element-wise `region` computes of `v`, or None (see `_match_activation`)."""
    values = {id(v): _GRID}
    with np.errstate(all="ignore"):
        try:
            for node in region:
                args = []
                for value in node.inputs:
                    if value is None:
                        args.append(None)
                    elif id(value) in values:
                        args.append(values[id(value)])
                    else:
                        args.append(float(ir.convenience.get_const_tensor(value).numpy().reshape(-1)[0]))
                values[id(node.outputs[0])] = _evaluate(node, args, lifter)
        except (KeyError, ValueError, TypeError, IndexError):
            return None
    result = values[id(region[-1].outputs[0])]
    if np.asarray(result).dtype == bool:
        return None
    result = np.asarray(result, np.float64)
    if result.shape != _GRID.shape or not np.all(np.isfinite(result)):
        return None
    for candidate in _CANDIDATES:
        expected = candidate.apply(_GRID)
        if np.all(np.abs(result - expected) <= 1e-5 * (1.0 + np.abs(expected))):
            return candidate
    return None


def _evaluate(node: ir.Node, args: list, lifter: _Lifter):
    op, attrs = node.op_type, lifter._attrs(node)
    a = args[0]
    b = args[1] if len(args) > 1 else None
    if op == "Add":
        return a + b
    if op == "Sub":
        return a - b
    if op == "Mul":
        return a * b
    if op == "Div":
        return a / b
    if op == "Pow":
        return np.power(a, b)
    if op == "Greater":
        return np.broadcast_to(a > b, _GRID.shape)
    if op == "Less":
        return np.broadcast_to(a < b, _GRID.shape)
    if op == "Where":
        return np.where(a, b, args[2])
    if op == "Min":
        return np.minimum.reduce([np.broadcast_to(x, _GRID.shape) for x in args])
    if op == "Max":
        return np.maximum.reduce([np.broadcast_to(x, _GRID.shape) for x in args])
    if op == "Clip":
        low = b if b is not None else -np.inf
        high = args[2] if len(args) > 2 and args[2] is not None else np.inf
        return np.clip(a, low, high)
    if op == "HardSigmoid":
        return np.clip(float(attrs.get("alpha", 0.2)) * a + float(attrs.get("beta", 0.5)), 0.0, 1.0)
    if op == "Erf":
        return erf(a)
    if op in ("Sigmoid", "Relu", "Softplus", "Tanh"):
        return Activation(op.lower()).apply(a)
    unary = {"Exp": np.exp, "Log": np.log, "Neg": np.negative, "Sqrt": np.sqrt}
    return unary[op](a)
