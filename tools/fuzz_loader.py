"""Fuzz codec's ONNX loader: mutate valid small models and feed them to `codec.ir.lift`.

    python tools/fuzz_loader.py --runs 20000                 # atheris (libFuzzer) when installed
    python tools/fuzz_loader.py --engine random --runs 20000 --seed 1
    python tools/fuzz_loader.py --replay findings/           # re-run saved findings (regression check)

The target lifts the mutated bytes, then lowers the result and serializes it again (whatever lift accepts
must be lowerable). A `CodecError` (ModelLoadError, LiftError, ...) is the expected answer to a bad file;
any other exception, a `MemoryError` under the address-space limit included, is a *finding*: it is
recorded once per (exception type, innermost codec frame), its input saved under `--findings`, and fuzzing
goes on. The summary (iterations, outcomes, findings) is printed as JSON and written to `--summary`.

Two mutation strategies, mixed (`--structure` is the share of the second):
- byte level: bit flips, interesting bytes, insertions, deletions, duplicated and spliced chunks;
- structure aware: parse the protobuf and change one field (an attribute's value or type, an op type,
  a node's inputs or outputs, an initializer's dims, type, data or external-data location, the input's
  element type or shape, codec's roles metadata), optionally followed by byte mutations.
With atheris the structure-aware step is a custom mutator around libFuzzer's own `atheris.Mutate`, and
codec.ir and onnx_ir are instrumented for coverage feedback.

Exit status: 0 when there were no findings, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

# ---------------------------------------------------------------------------------------------------
# Seeds: small valid models in the shapes torch's exporters emit (every op lift supports appears)
# ---------------------------------------------------------------------------------------------------


def _graph_model(nodes, inits, in_shape, out_shape, metadata=None) -> bytes:
    graph = helper.make_graph(
        nodes,
        "seed",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *in_shape])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", *out_shape])],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    for key, value in (metadata or {}).items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def seed_models() -> list[bytes]:
    """A handful of small valid models, each lifted cleanly by codec (checked by the tests)."""
    rng = np.random.default_rng(0)

    def f32(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    node = helper.make_node
    seeds = [
        # legacy exporter MLP: Gemm(transB) + activations + softmax, with codec roles metadata
        _graph_model(
            [
                node("Gemm", ["input", "fc1.weight", "fc1.bias"], ["h1"], name="/fc1/Gemm", transB=1),
                node("Relu", ["h1"], ["a1"], name="/relu1/Relu"),
                node(
                    "Gemm",
                    ["a1", "fc2.weight", "fc2.bias"],
                    ["h2"],
                    name="/fc2/Gemm",
                    transB=1,
                    alpha=1.0,
                    beta=1.0,
                ),
                node("LeakyRelu", ["h2"], ["a2"], name="/act2/LeakyRelu", alpha=0.1),
                node("Gemm", ["a2", "out.weight", "out.bias"], ["h3"], name="/out/Gemm", transB=1),
                node("Softmax", ["h3"], ["output"], name="/softmax/Softmax", axis=-1),
            ],
            {
                "fc1.weight": f32(6, 8),
                "fc1.bias": f32(6),
                "fc2.weight": f32(5, 6),
                "fc2.bias": f32(5),
                "out.weight": f32(3, 5),
                "out.bias": f32(3),
            },
            [8],
            [3],
            metadata={"codec.roles": json.dumps({"fc1": {"frozen_shared": [0, 1]}, "fc2": {"dead": [4]}})},
        ),
        # dynamo-style MLP: MatMul + Add, Sigmoid, Tanh, Dropout (eval) and Identity
        _graph_model(
            [
                node("MatMul", ["input", "w1"], ["m1"], name="matmul_1"),
                node("Add", ["m1", "b1"], ["z1"], name="add_1"),
                node("Sigmoid", ["z1"], ["s1"], name="sigmoid_1"),
                node("Dropout", ["s1", "ratio", "training"], ["d1"], name="dropout_1"),
                node("MatMul", ["d1", "w2"], ["m2"], name="matmul_2"),
                node("Add", ["b2", "m2"], ["z2"], name="add_2"),
                node("Tanh", ["z2"], ["t2"], name="tanh_2"),
                node("Identity", ["t2"], ["output"], name="identity"),
            ],
            {
                "w1": f32(10, 7),
                "b1": f32(7),
                "w2": f32(7, 4),
                "b2": f32(4),
                "ratio": np.array(0.5, np.float32),
                "training": np.array(False),
            },
            [10],
            [4],
        ),
        # CNN: Conv + BatchNorm + Relu + MaxPool (padded, ceil) + Conv + AveragePool + Flatten + Gemm
        _graph_model(
            [
                node(
                    "Conv",
                    ["input", "c1.weight", "c1.bias"],
                    ["c1"],
                    name="/c1/Conv",
                    kernel_shape=[3, 3],
                    pads=[1, 1, 1, 1],
                    strides=[1, 1],
                    dilations=[1, 1],
                ),
                node(
                    "BatchNormalization",
                    ["c1", "bn.scale", "bn.shift", "bn.mean", "bn.var"],
                    ["n1"],
                    name="/bn/BN",
                    epsilon=1e-5,
                ),
                node("Relu", ["n1"], ["r1"], name="/relu/Relu"),
                node(
                    "MaxPool",
                    ["r1"],
                    ["p1"],
                    name="/pool/MaxPool",
                    kernel_shape=[2, 2],
                    strides=[2, 2],
                    pads=[0, 0, 1, 1],
                    ceil_mode=1,
                ),
                node(
                    "Conv", ["p1", "c2.weight"], ["c2"], name="/c2/Conv", kernel_shape=[2, 2], strides=[1, 1]
                ),
                node(
                    "AveragePool",
                    [
                        "c2",
                    ],
                    ["p2"],
                    name="/pool2/AveragePool",
                    kernel_shape=[2, 2],
                    strides=[1, 1],
                    count_include_pad=0,
                ),
                node("Flatten", ["p2"], ["f"], name="/flatten/Flatten", axis=1),
                node("Gemm", ["f", "fc.weight", "fc.bias"], ["output"], name="/fc/Gemm", transB=1),
            ],
            {
                "c1.weight": f32(4, 2, 3, 3),
                "c1.bias": f32(4),
                "bn.scale": f32(4),
                "bn.shift": f32(4),
                "bn.mean": f32(4),
                "bn.var": np.abs(f32(4)) + 0.5,
                "c2.weight": f32(3, 4, 2, 2),
                "fc.weight": f32(5, 3 * 2 * 2),
                "fc.bias": f32(5),
            },
            [2, 7, 7],
            [5],
        ),
        # CNN with a Constant-fed Reshape, GlobalAveragePool and a MatMul head
        _graph_model(
            [
                node("Conv", ["input", "conv.weight", "conv.bias"], ["c"], name="conv", kernel_shape=[3, 3]),
                node("Relu", ["c"], ["r"], name="relu"),
                node("GlobalAveragePool", ["r"], ["g"], name="gap"),
                node(
                    "Constant",
                    [],
                    ["shape"],
                    name="shape_const",
                    value=numpy_helper.from_array(np.array([-1, 6], np.int64), "shape_value"),
                ),
                node("Reshape", ["g", "shape"], ["flat"], name="reshape"),
                node("MatMul", ["flat", "head"], ["output"], name="head_matmul"),
            ],
            {"conv.weight": f32(6, 1, 3, 3), "conv.bias": f32(6), "head": f32(6, 2)},
            [1, 6, 6],
            [2],
        ),
    ]
    return seeds


# ---------------------------------------------------------------------------------------------------
# The target
# ---------------------------------------------------------------------------------------------------


class SilentWrongResult(Exception):
    """A lift that codec accepted but that does not compute what the model computes (or an accepted model
    onnxruntime refuses, or a lowered model onnxruntime cannot load): the worst kind of finding."""


def _ort(model: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def check_one(data: bytes) -> tuple[str, BaseException | None]:
    """Lift (its parity check off), lower and re-serialize `data`, then judge the lift independently.

    Returns (outcome, exception): outcome is "ok", the CodecError subclass name, or "finding" (then
    `exception` is what escaped, or a SilentWrongResult). The oracle, for every accepted input: the
    lowered model loads in onnxruntime; where onnxruntime runs the original too, both agree on random
    inputs (shape and values); where it refuses the original, `lift` with its default check refuses it.
    """
    from codec.errors import CodecError
    from codec.ir import lift, lower, tap_names, to_bytes

    try:
        net = lift(data, check=False)
        net.shapes()
        # Lowered with the profiler's taps, so a tap named like the model's own input or output (or
        # another tap) is a model onnxruntime refuses: a finding below.
        lowered = to_bytes(lower(net, taps=True))
        taps = list(tap_names(net).values())
    except CodecError as exc:
        return type(exc).__name__, None
    except (Exception, MemoryError, RecursionError) as exc:  # everything else is a bug in codec
        return "finding", exc
    try:
        values = max([int(np.prod(s)) for s in [net.input_shape, *net.shapes()]])
    except Exception:  # noqa: BLE001 - sizes were checked by lift; this only bounds the oracle's cost
        values = 1 << 40
    if values > 1 << 20:
        return "ok-unjudged", None  # too large to run cheaply: lift's own limits were the test
    try:
        got_session = _ort(lowered)
    except Exception as exc:  # noqa: BLE001
        return "finding", SilentWrongResult(
            f"the lowered model does not load in onnxruntime: {str(exc)[:200]}"
        )
    try:
        reference = _ort(data)
        batch = reference.get_inputs()[0].shape[0]
        if isinstance(batch, int) and batch > 64:  # as lift's check does: the same function, batch symbolic
            from codec.ir.lift import _symbolic_batch

            reference = _ort(_symbolic_batch(data))
        batch = batch if isinstance(batch, int) and 0 < batch <= 64 else 3
        x = np.random.default_rng(0).standard_normal((batch, *net.input_shape)).astype(np.float32)
        expected = reference.run(None, {reference.get_inputs()[0].name: x})[0]
    except Exception:  # noqa: BLE001 - onnxruntime refuses the original: so must the default lift
        try:
            lift(data)
        except CodecError as exc:
            return f"{type(exc).__name__} (by the parity check)", None
        except (Exception, MemoryError, RecursionError) as exc:
            return "finding", exc
        return "finding", SilentWrongResult(
            "onnxruntime refuses the model but lift (with its check) accepts it"
        )
    names = [o.name for o in got_session.get_outputs()]
    if names != [net.output_name, *taps]:
        return "finding", SilentWrongResult(f"the lowered model's outputs are {names[:4]}, not the net's")
    got = got_session.run(None, {got_session.get_inputs()[0].name: x})[0]
    finite = np.abs(expected[np.isfinite(expected)])
    scale = max(1.0, float(finite.max()) if finite.size else 1.0)
    if got.shape != expected.shape or not np.allclose(
        got, expected, rtol=1e-3, atol=1e-4 * scale, equal_nan=True
    ):
        return "finding", SilentWrongResult(
            f"lifted network differs from the model: shapes {got.shape} vs {expected.shape}"
            + ("" if got.shape != expected.shape else f", max error {np.nanmax(np.abs(got - expected)):.3g}")
        )
    return "ok", None


def signature(exc: BaseException) -> str:
    """One finding per exception type and innermost frame inside codec (else the innermost frame)."""
    if isinstance(exc, SilentWrongResult):
        return f"SilentWrongResult: {str(exc).split(':')[0]}"
    frames = traceback.extract_tb(exc.__traceback__)
    ours = [f for f in frames if "/ir/" in f.filename or "/codec/" in f.filename or "/runtime/" in f.filename]
    frame = (ours or frames or [None])[-1]
    where = f"{Path(frame.filename).name}:{frame.lineno}" if frame is not None else "?"
    return f"{type(exc).__name__} at {where}"


class Recorder:
    """Counts outcomes, keeps one saved input and traceback per finding signature."""

    def __init__(
        self, findings_dir: Path | None, slow_seconds: float = 2.0, check=None, suffix: str = ".onnx"
    ):
        """`check(data) -> (outcome, exception)` judges one input (default: `check_one`, the ONNX
        target); findings are saved as `<sha1>{suffix}` (tools/fuzz_data.py passes its own)."""
        self.findings_dir = findings_dir
        self.check = check or check_one
        self.suffix = suffix
        self.slow_seconds = slow_seconds
        self.iterations = 0
        self.outcomes: dict[str, int] = {}
        self.findings: dict[str, dict] = {}
        self.start = time.time()

    def run(self, data: bytes) -> None:
        t0 = time.perf_counter()
        outcome, exc = self.check(data)
        elapsed = time.perf_counter() - t0
        self.iterations += 1
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if exc is not None:
            self._record(signature(exc), data, "".join(traceback.format_exception(exc)))
        elif elapsed > self.slow_seconds:
            self._record(f"slow input ({elapsed:.1f}s)", data, f"took {elapsed:.2f}s; outcome {outcome}")

    def _record(self, sig: str, data: bytes, text: str) -> None:
        entry = self.findings.setdefault(
            sig, {"count": 0, "input": None, "traceback": text.strip().splitlines()[-1]}
        )
        entry["count"] += 1
        if entry["input"] is None and self.findings_dir is not None:
            self.findings_dir.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha1(data).hexdigest()[:16]
            (self.findings_dir / f"{name}{self.suffix}").write_bytes(data)
            (self.findings_dir / f"{name}.txt").write_text(f"{sig}\n\n{text}")
            entry["input"] = str(self.findings_dir / f"{name}{self.suffix}")
        print(f"finding: {sig}: {entry['traceback']}", file=sys.stderr, flush=True)

    def summary(self, engine: str, **extra) -> dict:
        return {
            "engine": engine,
            "iterations": self.iterations,
            "seconds": round(time.time() - self.start, 1),
            "outcomes": dict(sorted(self.outcomes.items())),
            "findings": len(self.findings),
            "finding_details": self.findings,
            **extra,
        }


# ---------------------------------------------------------------------------------------------------
# Mutators
# ---------------------------------------------------------------------------------------------------

_INTERESTING_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x08, 0x10, 0x12, 0x1A, 0x22)
_INTERESTING_INTS = (0, 1, -1, 2, 3, -(2**31), 2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1, -(2**63), 7, 1000)
_OPS = (
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
    "Constant",
    "Relu",
    "LeakyRelu",
    "Sigmoid",
    "Tanh",
    "Softmax",
    "Dropout",
    "Identity",
    "Cos",
    "If",
    "Loop",
    "Concat",
    "",
)


def mutate_bytes(data: bytes, rng: random.Random, seeds: list[bytes], max_size: int = 1 << 16) -> bytes:
    """Stack 1-8 byte-level mutations."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        choice = rng.randrange(7)
        if not buf:
            buf += bytes([rng.randrange(256)])
            continue
        i = rng.randrange(len(buf))
        if choice == 0:  # flip a bit
            buf[i] ^= 1 << rng.randrange(8)
        elif choice == 1:  # an interesting byte
            buf[i] = rng.choice(_INTERESTING_BYTES)
        elif choice == 2:  # a random byte
            buf[i] = rng.randrange(256)
        elif choice == 3:  # insert random bytes
            buf[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif choice == 4:  # delete a chunk
            del buf[i : i + rng.randint(1, 16)]
        elif choice == 5:  # duplicate a chunk
            j = rng.randrange(len(buf))
            buf[j:j] = buf[i : i + rng.randint(1, 32)]
        else:  # splice in a chunk of another seed
            other = rng.choice(seeds)
            k = rng.randrange(len(other))
            buf[i : i + rng.randint(1, 32)] = other[k : k + rng.randint(1, 64)]
    return bytes(buf[:max_size])


def mutate_structure(data: bytes, rng: random.Random) -> bytes | None:
    """Change one field of the parsed model; None when `data` does not parse."""
    import onnx

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception:
        return None
    graph = model.graph
    kind = rng.randrange(13)
    try:
        if kind >= 9:  # the second round's classes (issue 17)
            _mutate_round2(model, kind - 9, rng)
        elif kind == 0 and graph.node:  # an attribute's value or type
            node = rng.choice(graph.node)
            if node.attribute and rng.random() < 0.8:
                attr = rng.choice(node.attribute)
                what = rng.randrange(5)
                if what == 0:
                    attr.type = onnx.AttributeProto.INTS
                    del attr.ints[:]
                    attr.ints.extend(rng.choice(_INTERESTING_INTS) for _ in range(rng.randint(0, 5)))
                elif what == 1:
                    attr.type = onnx.AttributeProto.INT
                    attr.i = rng.choice(_INTERESTING_INTS)
                elif what == 2:
                    attr.type = onnx.AttributeProto.FLOAT
                    attr.f = rng.choice((0.0, -1.0, float("nan"), float("inf"), 1e30, 0.5))
                elif what == 3:
                    attr.type = onnx.AttributeProto.STRING
                    attr.s = rng.choice((b"", b"SAME_UPPER", b"NOTSET", b"\xff\xfe"))
                else:
                    node.attribute.remove(attr)
            else:
                name = rng.choice(
                    (
                        "strides",
                        "pads",
                        "kernel_shape",
                        "dilations",
                        "axis",
                        "transA",
                        "transB",
                        "alpha",
                        "group",
                        "ceil_mode",
                        "auto_pad",
                        "training_mode",
                        "epsilon",
                        "allowzero",
                    )
                )
                node.attribute.append(
                    helper.make_attribute(name, rng.choice(([0, 0], [1], 2**40, -1, 0.0, "SAME_LOWER")))
                )
        elif kind == 1 and graph.node:  # the op type or domain
            node = rng.choice(graph.node)
            if rng.random() < 0.8:
                node.op_type = rng.choice(_OPS)
            else:
                node.domain = rng.choice(("com.microsoft", "ai.onnx.ml", "x"))
        elif kind == 2 and graph.node:  # a node's inputs or outputs
            node = rng.choice(graph.node)
            names = (
                [v for n in graph.node for v in n.output]
                + [i.name for i in graph.initializer]
                + ["input", "", "nope"]
            )
            what = rng.randrange(4)
            if what == 0 and node.input:
                node.input[rng.randrange(len(node.input))] = rng.choice(names)
            elif what == 1 and node.input:
                del node.input[rng.randrange(len(node.input))]
            elif what == 2:
                node.input.append(rng.choice(names))
            elif node.output:
                node.output[rng.randrange(len(node.output))] = rng.choice(names)
        elif kind == 3 and graph.node:  # delete, duplicate or swap nodes
            what = rng.randrange(3)
            i = rng.randrange(len(graph.node))
            if what == 0:
                del graph.node[i]
            elif what == 1:
                graph.node.append(graph.node[i])
            else:
                j = rng.randrange(len(graph.node))
                a, b = onnx.NodeProto(), onnx.NodeProto()
                a.CopyFrom(graph.node[i])
                b.CopyFrom(graph.node[j])
                graph.node[i].CopyFrom(b)
                graph.node[j].CopyFrom(a)
        elif kind == 4 and graph.initializer:  # an initializer's dims, type or data
            t = rng.choice(graph.initializer)
            what = rng.randrange(5)
            if what == 0:
                del t.dims[:]
                t.dims.extend(
                    rng.choice((0, 1, 3, 2**20, 2**31, 2**40, -1)) for _ in range(rng.randint(0, 4))
                )
            elif what == 1:
                t.data_type = rng.choice((0, 1, 2, 3, 5, 6, 7, 9, 10, 11, 16, 8, 17, 21, 25, 99))
            elif what == 2:
                t.raw_data = t.raw_data[: rng.randrange(len(t.raw_data) + 1)]
            elif what == 3:
                t.raw_data = b""
                t.float_data.extend([float("nan")] * rng.randint(0, 3))
            else:
                t.data_location = TensorProto.EXTERNAL
                del t.external_data[:]
                for key, value in (
                    ("location", rng.choice(("../../etc/passwd", "/etc/passwd", "", "w.bin", "a\x00b"))),
                    ("offset", str(rng.choice((0, -1, 2**40)))),
                    ("length", str(rng.choice((0, 4, 2**40)))),
                ):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
                t.raw_data = b""
        elif kind == 5:  # the input's element type or shape
            vi = rng.choice(list(graph.input) or [None])
            if vi is not None:
                tt = vi.type.tensor_type
                if rng.random() < 0.3:
                    tt.elem_type = rng.choice((0, 2, 6, 7, 10, 11, 16))
                else:
                    dims = tt.shape.dim
                    if dims and rng.random() < 0.7:
                        d = dims[rng.randrange(len(dims))]
                        if rng.random() < 0.5:
                            d.dim_value = rng.choice((0, 1, 2**31, 2**62, 5))
                        else:
                            d.dim_param = "dyn"
                    else:
                        tt.shape.dim.add().dim_value = rng.choice((1, 2, 3))
        elif kind == 6:  # graph inputs and outputs
            what = rng.randrange(3)
            if what == 0:
                graph.output.append(
                    helper.make_tensor_value_info(
                        rng.choice(["h1", "c1", "input", "z"]), TensorProto.FLOAT, None
                    )
                )
            elif what == 1 and graph.output:
                graph.output[0].name = rng.choice(["input", "h1", "c", "a1", ""])
            else:
                graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, [1]))
        elif kind == 7:  # codec's metadata
            entry = model.metadata_props.add()
            entry.key = "codec.roles"
            entry.value = rng.choice(
                (
                    "[]",
                    '{"fc1": {"dead": [-1]}}',
                    '{"fc1": {"dead": [99]}}',
                    '{"fc1": {"nope": [0]}}',
                    '{"fc1": {"dead": "x"}}',
                    '{"fc1": {"dead": [1e30]}}',
                    "{",
                    '{"fc1": []}',
                    "null",
                )
            )
        else:  # a Constant node with an odd value feeding somewhere
            value = rng.choice(
                (
                    np.array([0, -1], np.int64),
                    np.array([1e30], np.float32),
                    np.zeros((0,), np.int64),
                    np.array([[1, 2]], np.int64),
                )
            )
            graph.node.insert(
                0,
                helper.make_node(
                    "Constant",
                    [],
                    [rng.choice(["shape", "w1", "fc1.weight", "ratio"])],
                    value=numpy_helper.from_array(value),
                ),
            )
        return model.SerializeToString()
    except Exception:  # protobuf refuses the edit (e.g. a value out of range): no mutation this time
        return data


_NAMES = (
    "input",
    "output",
    "fc1",
    "fc1.relu",
    "fc1.weight",
    "fc1.bias",
    "h1",
    "a1",
    "c1",
    "/fc1/Gemm",
    "conv",
    "codec.tap.fc1",
    "fc2",
    "a",
    "a.relu",
    "",
)


def _mutate_round2(model, kind: int, rng: random.Random) -> None:
    """Mutations for the classes of issue 17: structural attributes whose rewrite may not commute,
    names that collide with the ones codec generates, opsets, biases that broadcast."""
    import onnx

    graph = model.graph
    node = rng.choice(graph.node) if graph.node else None
    if kind == 0 and node is not None:  # structural attributes
        what = rng.randrange(5)
        if what == 0 and node.op_type in ("MaxPool", "AveragePool", "Conv"):
            node.attribute.append(
                helper.make_attribute("auto_pad", rng.choice(("VALID", "SAME_UPPER", "SAME_LOWER", "NOTSET")))
            )
        elif what == 1 and node.op_type in ("MaxPool", "AveragePool", "Conv"):
            for attr in list(node.attribute):
                if attr.name == "pads":
                    node.attribute.remove(attr)
            node.attribute.append(helper.make_attribute("pads", [rng.randint(0, 2) for _ in range(4)]))
        elif what == 2:  # an activation right after a pool (moved across it, when that commutes)
            pools = [n for n in graph.node if n.op_type in ("MaxPool", "AveragePool")]
            if pools:
                pool = rng.choice(pools)
                old, new = pool.output[0], pool.output[0] + "_act"
                for n in graph.node:
                    n.input[:] = [new if v == old else v for v in n.input]
                op = rng.choice(("LeakyRelu", "Relu", "Sigmoid", "Tanh"))
                attrs = {"alpha": rng.choice((-2.0, -0.5, -0.01, 0.0, 0.1, 3.0))} if op == "LeakyRelu" else {}
                index = list(graph.node).index(pool)
                graph.node.insert(
                    index + 1, helper.make_node(op, [old], [new], name=f"act_after_{pool.name}", **attrs)
                )
        elif what == 3:  # LeakyRelu alphas of either sign, ceil_mode and count_include_pad flips
            for n in graph.node:
                for attr in n.attribute:
                    if attr.name == "alpha" and n.op_type == "LeakyRelu":
                        attr.f = rng.choice((-3.0, -1.0, -0.1, 0.0, 0.2, 5.0))
                    elif attr.name in ("ceil_mode", "count_include_pad"):
                        attr.i = 1 - attr.i
        else:  # a bias of another rank or shape (MatMul + Add, Gemm's C)
            biases = [i for i in graph.initializer if i.name.endswith(".bias") or i.name == "head"]
            if biases:
                tensor = rng.choice(biases)
                size = int(np.prod(tensor.dims)) if tensor.dims else 1
                tensor.dims[:] = rng.choice(([1, 1, size], [1, size], [size, 1], [size], [1, size, 1]))
    elif kind == 1:  # names: inputs, outputs, initializers and nodes renamed to collide
        what = rng.randrange(4)
        new = rng.choice(
            _NAMES
            + tuple(n.name for n in graph.node)
            + tuple(v for n in graph.node for v in n.output)
            + tuple(f"codec.tap.{n.name}" for n in graph.node)  # the profiler's tap names
        )
        if what == 0 and graph.input:
            old = graph.input[0].name
            graph.input[0].name = new
            for n in graph.node:
                n.input[:] = [new if v == old else v for v in n.input]
        elif what == 1 and graph.output:
            old = graph.output[0].name
            graph.output[0].name = new
            for n in graph.node:
                n.output[:] = [new if v == old else v for v in n.output]
                n.input[:] = [new if v == old else v for v in n.input]
        elif what == 2 and node is not None:
            node.name = new  # possibly a duplicate node name
        elif graph.initializer:
            tensor = rng.choice(graph.initializer)
            old = tensor.name
            tensor.name = new
            for n in graph.node:
                n.input[:] = [new if v == old else v for v in n.input]
    elif kind == 2:  # opsets: none, ancient, current, future; ir_version
        what = rng.randrange(3)
        if what == 0:
            del model.opset_import[:]
        elif what == 1:
            for entry in model.opset_import:
                entry.version = rng.choice((1, 5, 6, 7, 9, 11, 13, 17, 18, 21, 28, 29, 100, -1, 2**40))
        else:
            model.ir_version = rng.choice((1, 3, 7, 9, 10, 11, 12, 13, 99))
    else:  # float64 weights, some past float32's range
        floats = [i for i in graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
        if floats:
            tensor = rng.choice(floats)
            array = numpy_helper.to_array(tensor).astype(np.float64)
            if rng.random() < 0.5 and array.size:
                array.flat[rng.randrange(array.size)] = rng.choice((1e39, -1e300, 3.5e38))
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


def mutate(data: bytes, rng: random.Random, seeds: list[bytes], structure: float) -> bytes:
    if rng.random() < structure:
        out = mutate_structure(data, rng)
        if out is not None:
            return mutate_bytes(out, rng, seeds) if rng.random() < 0.2 else out
    return mutate_bytes(data, rng, seeds)


# ---------------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------------


def run_random(
    recorder: Recorder, seeds: list[bytes], runs: int, seconds: float, seed: int, structure: float
) -> None:
    """A plain mutational fuzzer: each input is a seed or an earlier accepted input, mutated."""
    rng = random.Random(seed)
    pool = list(seeds)
    deadline = time.time() + seconds if seconds else None
    for _ in range(runs):
        if deadline is not None and time.time() > deadline:
            break
        data = mutate(rng.choice(pool), rng, seeds, structure)
        before = recorder.outcomes.get("ok", 0) + recorder.outcomes.get("ok-unjudged", 0)
        recorder.run(data)
        if (
            recorder.outcomes.get("ok", 0) + recorder.outcomes.get("ok-unjudged", 0) > before
            and len(pool) < 500
        ):
            pool.append(data)  # lifted: a new valid variant to mutate further


def run_atheris(
    recorder: Recorder,
    seeds: list[bytes],
    runs: int,
    seconds: float,
    seed: int,
    structure: float,
    corpus: Path,
    on_report,
) -> None:
    import atheris

    with atheris.instrument_imports(include=["codec", "onnx_ir"]):
        import codec.ir.lift  # noqa: F401  (instrumented for coverage feedback)
        import codec.ir.lower  # noqa: F401

    corpus.mkdir(parents=True, exist_ok=True)
    for i, s in enumerate(seeds):
        (corpus / f"seed_{i}.onnx").write_bytes(s)
    rng = random.Random(seed)

    def custom_mutator(data: bytes, max_size: int, mutation_seed: int) -> bytes:
        rng.seed(mutation_seed)
        if rng.random() < structure:
            out = mutate_structure(data, rng)
            if out is not None and len(out) <= max_size:
                return out
        return atheris.Mutate(data, max_size)

    def one_input(data: bytes) -> None:
        recorder.run(data)
        # libFuzzer ends the process without running Python's exit handlers: report as the runs finish
        # (and now and then, for a run stopped by -max_total_time).
        if recorder.iterations == runs or recorder.iterations % 1000 == 0:
            on_report()

    args = [sys.argv[0], f"-runs={runs}", f"-seed={seed}", "-max_len=65536", "-rss_limit_mb=0", str(corpus)]
    if seconds:
        args.append(f"-max_total_time={int(seconds)}")
    atheris.Setup(args, one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


def replay(recorder: Recorder, folder: Path) -> None:
    for path in sorted(folder.glob(f"*{recorder.suffix}")):
        recorder.run(path.read_bytes())


def _limit_memory(megabytes: int) -> None:
    """Cap the address space, so an allocation codec should have refused is a MemoryError, not an OOM kill."""
    if megabytes:
        resource.setrlimit(resource.RLIMIT_AS, (megabytes << 20, megabytes << 20))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--engine",
        choices=("auto", "atheris", "random"),
        default="auto",
        help="atheris (libFuzzer, coverage-guided) or random (plain mutation); auto: atheris when installed",
    )
    parser.add_argument("--runs", type=int, default=20000, help="inputs to try (default 20000)")
    parser.add_argument("--seconds", type=float, default=0, help="stop after this long (default: no limit)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--structure", type=float, default=0.5, help="share of structure-aware mutations (default 0.5)"
    )
    parser.add_argument(
        "--findings", type=Path, default=Path("fuzz-findings"), help="where finding inputs are saved"
    )
    parser.add_argument("--corpus", type=Path, default=Path("fuzz-corpus"), help="atheris corpus folder")
    parser.add_argument("--summary", type=Path, default=None, help="also write the JSON summary here")
    parser.add_argument(
        "--max-memory-mb", type=int, default=4096, help="address-space limit (default 4096; 0: none)"
    )
    parser.add_argument(
        "--replay", type=Path, default=None, help="only re-run the .onnx inputs in this folder"
    )
    args = parser.parse_args(argv)

    import logging
    import warnings

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    _limit_memory(args.max_memory_mb)
    recorder = Recorder(args.findings)
    seeds = seed_models()
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401

            engine = "atheris"
        except ImportError:
            engine = "random"
    if args.replay is not None:
        engine = "replay"

    def report(final: bool = True) -> None:
        summary = recorder.summary(engine, seed=args.seed, structure=args.structure, seeds=len(seeds))
        text = json.dumps(summary, indent=2)
        if final:
            print(text, flush=True)
        if args.summary is not None:
            args.summary.write_text(text + "\n")

    if engine == "atheris":
        run_atheris(
            recorder,
            seeds,
            args.runs,
            args.seconds,
            args.seed,
            args.structure,
            args.corpus,
            lambda: report(final=recorder.iterations == args.runs),
        )
        return 0
    if engine == "replay":
        replay(recorder, args.replay)
    else:
        run_random(recorder, seeds, args.runs, args.seconds, args.seed, args.structure)
    report()
    return 1 if recorder.findings else 0


if __name__ == "__main__":
    sys.exit(main())
