"""Untrusted models and files: external data stays inside the model's folder, absurd sizes fail fast,
malformed graphs and wrong dtypes are one-line LiftErrors, and nothing a user hands codec is unpickled."""

from __future__ import annotations

import ast
import pickle
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

from codec.errors import DataError, LiftError, ModelLoadError
from codec.ir import lift, lower, to_bytes

REPO = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = ("codec", "ir", "passes", "runtime", "models")
sys.path.insert(0, str(REPO / "tools"))

W = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
B = np.array([0.1, -0.2, 0.3], np.float32)


def _proto(nodes, inits, in_shape=("n", 4), out_shape=("n", 3), in_type=TensorProto.FLOAT) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", in_type, list(in_shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(out_shape))],
        [numpy_helper.from_array(np.asarray(a), n) for n, a in inits.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def _gemm(**inits) -> onnx.ModelProto:
    return _proto(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)], {"w": W, "b": B, **inits}
    )


def _externalize(tensor: onnx.TensorProto, location: str, length: int | None = 48, offset: int = 0) -> None:
    kwargs = {"location": location, "offset": offset}
    if length is not None:
        kwargs["length"] = length
    external_data_helper.set_external_data(tensor, **kwargs)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL


def _one_line(exc: BaseException) -> None:
    assert "\n" not in str(exc) and str(exc), repr(exc)


@pytest.fixture
def layout(tmp_path):
    """A model folder with a 'secret' file beside it (outside the folder) holding recognisable floats."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(np.full(12, 7.0, np.float32).tobytes())
    models = tmp_path / "models"
    models.mkdir()
    return models, secret


# ---------------------------------------------------------------------------------------------------
# External data
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["absolute", "dotdot", "symlink", "nul", "device"])
def test_external_data_outside_the_model_folder_is_refused(layout, kind):
    models, secret = layout
    if kind == "symlink":
        (models / "inside.bin").symlink_to(secret)  # a link inside the folder pointing out of it
    location = {
        "absolute": str(secret),
        "dotdot": "../secret.bin",
        "symlink": "inside.bin",
        "nul": "w\0.bin",
        "device": "/dev/zero",
    }[kind]
    proto = _gemm()
    _externalize(proto.graph.initializer[0], location)
    path = models / "evil.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelLoadError) as err:
        lift(path)
    _one_line(err.value)
    assert "evil.onnx" in str(err.value) and "'w'" in str(err.value)


def test_external_data_inside_the_folder_is_read(layout):
    models, _ = layout
    (models / "weights.bin").write_bytes(W.tobytes())
    (models / "link.bin").symlink_to(models / "weights.bin")  # links that stay inside are fine
    proto = _gemm()
    _externalize(proto.graph.initializer[0], "link.bin")
    path = models / "good.onnx"
    path.write_bytes(proto.SerializeToString())
    np.testing.assert_array_equal(lift(path).layers[0].weight, W)


def test_in_memory_model_with_external_data_never_reads_the_file(layout, monkeypatch):
    """Bytes have no folder to be relative to: onnx_ir would read any path (it skips its checks there)."""
    models, secret = layout
    proto = _gemm()
    _externalize(proto.graph.initializer[0], str(secret))
    with pytest.raises(ModelLoadError, match="in-memory model points at external data"):
        lift(proto.SerializeToString())
    monkeypatch.chdir(secret.parent)  # a relative location is no better
    proto = _gemm()
    _externalize(proto.graph.initializer[0], "secret.bin")
    with pytest.raises(ModelLoadError, match="external data"):
        lift(proto.SerializeToString())


def test_external_constant_tensor_outside_the_folder_is_refused(layout):
    """A Constant node's value is a tensor too (e.g. a Reshape's target shape)."""
    models, secret = layout
    shape = numpy_helper.from_array(np.array([-1, 18], np.int64), "shape_value")
    _externalize(shape, "../secret.bin", length=16)
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["h"], name="conv"),
        helper.make_node("Constant", [], ["s"], name="const", value=shape),
        helper.make_node("Reshape", ["h", "s"], ["r"], name="reshape"),
        helper.make_node("Gemm", ["r", "w2"], ["y"], name="fc", transB=1),
    ]
    proto = _proto(
        nodes, {"w": np.ones((2, 1, 3, 3), np.float32), "w2": np.ones((3, 18), np.float32)}, ("n", 1, 5, 5)
    )
    path = models / "const.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelLoadError, match="node 'const' points at external data '../secret.bin' outside"):
        lift(path)


@pytest.mark.parametrize("declared_length", [48, None], ids=["length-declared", "length-absent"])
def test_truncated_external_data_is_refused(layout, declared_length):
    models, _ = layout
    (models / "short.bin").write_bytes(W.tobytes()[:20])
    proto = _gemm()
    _externalize(proto.graph.initializer[0], "short.bin", length=declared_length)
    path = models / "cut.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(ModelLoadError, match=r"truncated \(20 bytes, initializer 'w' needs 48\)"):
        lift(path)
    (models / "short.bin").unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        lift(path)


# ---------------------------------------------------------------------------------------------------
# Absurd sizes: refused before anything is allocated
# ---------------------------------------------------------------------------------------------------


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def test_inline_tensor_with_huge_declared_dims_fails_fast():
    proto = _gemm()
    w = proto.graph.initializer[0]
    del w.dims[:]
    w.dims.extend([3, 2**40])  # 3.3e12 floats declared, 48 bytes present
    data = proto.SerializeToString()

    def attempt():
        with pytest.raises(LiftError, match="beyond codec's limit") as err:
            lift(data)
        _one_line(err.value)

    assert _peak_bytes(attempt) < 32 << 20  # a refusal, not a 13 TB allocation


def test_tiny_tensor_declaring_many_elements_is_refused_before_reading():
    """Found by the fuzzer (atheris): a 4-bit weight declaring 2**27 elements in a 600-byte file made onnx_ir
    unpack (allocate) all of them, taking seconds per input, before the dtype was refused."""
    proto = _gemm()
    w = proto.graph.initializer[0]
    w.ClearField("raw_data")
    w.data_type = TensorProto.UINT4
    del w.dims[:]
    w.dims.extend([2**27])
    w.int32_data.extend([0x12] * 4)
    data = proto.SerializeToString()
    assert len(data) < 1000

    def attempt():
        with pytest.raises(LiftError, match="declares 134217728 elements but carries far less data"):
            lift(data)

    assert _peak_bytes(attempt) < 8 << 20


def test_external_tensor_past_the_element_limit_is_refused_before_reading(tmp_path):
    """The data really is there (a sparse 8 GiB file): lift must refuse it by its size, not read it."""
    from codec.ir.lift import MAX_TENSOR_ELEMENTS

    rows = MAX_TENSOR_ELEMENTS // 4 + 1
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(rows * 4 * 4)  # sparse: no disk space used
    w = numpy_helper.from_array(np.zeros((1, 4), np.float32), "w")
    del w.dims[:]
    w.dims.extend([rows, 4])
    _externalize(w, "big.bin", length=rows * 4 * 4)
    proto = _proto([helper.make_node("Gemm", ["x", "w"], ["y"], name="fc")], {}, out_shape=("n", rows))
    proto.graph.initializer.append(w)
    path = tmp_path / "big.onnx"
    path.write_bytes(proto.SerializeToString())

    def attempt():
        with pytest.raises(LiftError, match=f"{rows * 4} elements, beyond codec's limit"):
            lift(path)

    assert _peak_bytes(attempt) < 32 << 20


def test_element_limit_applies_to_every_weight(monkeypatch):
    monkeypatch.setattr(sys.modules["codec.ir.lift"], "MAX_TENSOR_ELEMENTS", 11)
    with pytest.raises(LiftError, match="'w' has 12 elements, beyond codec's limit"):
        lift(_gemm().SerializeToString())


@pytest.mark.parametrize(
    "in_shape, nodes, inits, message",
    [
        (
            ("n", 2**62),
            [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
            {"w": W, "b": B},
            "values per example, beyond codec's limit",
        ),
        (
            ("n", 2**21, 2**21, 2**21),
            [helper.make_node("Flatten", ["x"], ["y"], name="f")],
            {},
            "values per example, beyond codec's limit",
        ),
        (
            ("n", 1, 5, 5),
            [helper.make_node("Conv", ["x", "w"], ["y"], name="c", pads=[2**40] * 4)],
            {"w": np.ones((2, 1, 3, 3), np.float32)},
            "beyond codec's limit",
        ),
    ],
    ids=["input-dim", "input-volume", "conv-output"],
)
def test_absurd_declared_shapes_are_refused(in_shape, nodes, inits, message):
    with pytest.raises(LiftError, match=message):
        lift(_proto(nodes, inits, in_shape).SerializeToString())


# ---------------------------------------------------------------------------------------------------
# Cyclic and malformed graphs (regression tests for what tools/fuzz_loader.py and probing found)
# ---------------------------------------------------------------------------------------------------

CONV_W = np.ones((2, 1, 3, 3), np.float32)
IMG = ("n", 1, 5, 5)


def _conv_then(node, **extra):
    return [helper.make_node("Conv", ["x", "w"], ["h"], name="conv"), node], {"w": CONV_W, **extra}


def _bn(**params):
    base = {
        "s": np.ones(3, np.float32),
        "sh": np.zeros(3, np.float32),
        "m": np.zeros(3, np.float32),
        "v": np.ones(3, np.float32),
    }
    base.update(params)
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
        helper.make_node("BatchNormalization", ["h", "s", "sh", "m", "v"], ["y"], name="bn"),
    ]
    return nodes, {"w": W, "b": B, **base}, ("n", 4)


MALFORMED = {
    "gemm-without-weight": (
        [helper.make_node("Gemm", ["x"], ["y"], name="fc")],
        {},
        ("n", 4),
        "fc",
        "weight input is missing",
    ),
    "matmul-without-weight": (
        [helper.make_node("MatMul", ["x"], ["y"], name="mm")],
        {},
        ("n", 4),
        "mm",
        "weight input is missing",
    ),
    "conv-without-weight": (
        [helper.make_node("Conv", ["x"], ["y"], name="c")],
        {},
        IMG,
        "c",
        "weight input is missing",
    ),
    "node-without-output": (
        [helper.make_node("Gemm", ["x", "w", "b"], [], name="fc", transB=1)],
        {"w": W, "b": B},
        ("n", 4),
        "fc",
        "no output",
    ),
    "conv-zero-stride": (
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c", strides=[0, 0])],
        {"w": CONV_W},
        IMG,
        "c",
        "strides",
    ),
    "conv-zero-dilation": (
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c", dilations=[0, 1])],
        {"w": CONV_W},
        IMG,
        "c",
        "dilations",
    ),
    "conv-negative-pads": (
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c", pads=[-1, 0, 0, 0])],
        {"w": CONV_W},
        IMG,
        "c",
        "pads",
    ),
    "conv-two-pads": (
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c", pads=[1, 1])],
        {"w": CONV_W},
        IMG,
        "c",
        "pads",
    ),
    "conv-scalar-strides": (
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c", strides=1)],
        {"w": CONV_W},
        IMG,
        "c",
        "strides",
    ),
    "conv-float-strides": (
        [helper.make_node("Conv", ["x", "w"], ["y"], name="c", strides=[1.0, 1.0])],
        {"w": CONV_W},
        IMG,
        "c",
        "strides",
    ),
    "pool-without-kernel": (
        *_conv_then(helper.make_node("MaxPool", ["h"], ["y"], name="p")),
        IMG,
        "p",
        "kernel_shape is required",
    ),
    "pool-zero-stride": (
        *_conv_then(helper.make_node("MaxPool", ["h"], ["y"], name="p", kernel_shape=[2, 2], strides=[0, 0])),
        IMG,
        "p",
        "strides",
    ),
    "pool-zero-kernel": (
        *_conv_then(helper.make_node("AveragePool", ["h"], ["y"], name="p", kernel_shape=[0, 0])),
        IMG,
        "p",
        "kernel_shape",
    ),
    "pool-pads-past-kernel": (
        *_conv_then(
            helper.make_node("MaxPool", ["h"], ["y"], name="p", kernel_shape=[2, 2], pads=[9, 9, 9, 9])
        ),
        IMG,
        "p",
        "smaller than the kernel",
    ),
    "pool-ceil-window-outside": (
        *_conv_then(
            helper.make_node(
                "MaxPool", ["h"], ["y"], name="p", kernel_shape=[1, 1], strides=[2, 2], ceil_mode=1
            ),
            w=np.ones((2, 1, 2, 2), np.float32),
        ),
        IMG,
        "p",
        "ONNX shape inference",
    ),
    "pool-string-kernel": (
        *_conv_then(helper.make_node("MaxPool", ["h"], ["y"], name="p", kernel_shape="ab")),
        IMG,
        "p",
        "kernel_shape",
    ),
    "gemm-string-alpha": (
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1, alpha="x")],
        {"w": W, "b": B},
        ("n", 4),
        "fc",
        "alpha",
    ),
    "gemm-nan-alpha": (
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1, alpha=float("nan"))],
        {"w": W, "b": B},
        ("n", 4),
        "fc",
        "alpha",
    ),
    "leaky-string-alpha": (
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
            helper.make_node("LeakyRelu", ["h"], ["y"], name="act", alpha="x"),
        ],
        {"w": W, "b": B},
        ("n", 4),
        "act",
        "alpha",
    ),
    "reshape-float-shape": (
        *_conv_then(
            helper.make_node("Reshape", ["h", "s"], ["y"], name="r"), s=np.array([np.nan, 18], np.float32)
        ),
        IMG,
        "r",
        "dtype float32",
    ),
    "dropout-vector-mode": (
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
            helper.make_node("Dropout", ["h", "r", "t"], ["y"], name="drop"),
        ],
        {"w": W, "b": B, "r": np.array([0.5, 0.5], np.float32), "t": np.array([False, True])},
        ("n", 4),
        "drop",
        "Dropout",
    ),
    "bn-missing-inputs": (
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
            helper.make_node("BatchNormalization", ["h"], ["y"], name="bn"),
        ],
        {"w": W, "b": B},
        ("n", 4),
        "bn",
        "scale input is missing",
    ),
    "bn-negative-variance": (*_bn(v=-np.ones(3, np.float32)), "bn", "variance + epsilon is not positive"),
    "bn-wrong-shapes": (*_bn(sh=np.zeros(2, np.float32)), "bn", "shapes"),
    "bn-2d-scale": (*_bn(s=np.ones((3, 1), np.float32)), "bn", "shapes"),
    "gemm-weight-is-the-input": (
        [helper.make_node("Gemm", ["x", "x"], ["y"], name="fc", transB=1)],
        {},
        ("n", 4),
        "fc",
        "not an initializer",
    ),
    "cycle": (
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
            helper.make_node("Add", ["h", "loop"], ["a"], name="add_loop"),
            helper.make_node("Relu", ["a"], ["loop"], name="back"),
        ],
        {"w": W, "b": B},
        ("n", 4),
        None,
        "",
    ),
    "dangling-input": (
        [helper.make_node("Gemm", ["nowhere", "w", "b"], ["y"], name="fc", transB=1)],
        {"w": W, "b": B},
        ("n", 4),
        None,
        "consumed by no node",
    ),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_malformed_graph_is_a_one_line_lift_error(case):
    nodes, inits, in_shape, node, message = MALFORMED[case]
    with pytest.raises(LiftError) as err:
        lift(_proto(nodes, inits, in_shape).SerializeToString())
    _one_line(err.value)
    assert message in str(err.value)
    if node is not None:
        assert err.value.node == node


def test_invalid_utf8_names_are_refused():
    """Found by the fuzzer: protobuf hands invalid UTF-8 over as bytes, which broke lowering."""
    proto = _gemm()
    proto.graph.name = "graphname"
    data = proto.SerializeToString().replace(b"graphname", b"graph\xfcame")
    with pytest.raises(ModelLoadError, match="not valid UTF-8"):
        lift(data)
    proto = _gemm()
    entry = proto.metadata_props.add()
    entry.key, entry.value = "codec.note", "ok"
    data = proto.SerializeToString().replace(b"codec.note", b"codec.\xffote")
    with pytest.raises(ModelLoadError, match="not valid UTF-8"):
        lift(data)


def test_float_attributes_lift_as_the_decimal_they_were_written_as():
    """Found by the round-trip fuzzer: a leaky ReLU's alpha=0.01 came back as 0.009999999776 (float32), so a
    lifted member and the network it was lowered from compared as different architectures."""
    from codec.ir import Activation, Dense, NetworkIR

    net = NetworkIR(
        "n",
        "x",
        "y",
        (4,),
        [
            Dense("fc", W, B, Activation("leaky_relu", 0.01)),
            Dense("out", np.ones((2, 3), np.float32), np.zeros(2, np.float32)),
        ],
    )
    lifted = lift(to_bytes(lower(net)))
    assert lifted.layers[0].activation == Activation("leaky_relu", 0.01)
    assert net.same_architecture(lifted) is None


def test_tensor_data_in_the_wrong_field_is_refused():
    """Found by the fuzzer: a BOOL tensor carried in uint64_data made onnx_ir assert inside lift."""
    flag = onnx.TensorProto(name="t", data_type=TensorProto.BOOL, uint64_data=[1])
    proto = _proto(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
            helper.make_node("Dropout", ["h", "r", "t"], ["y"], name="drop"),
        ],
        {"w": W, "b": B, "r": np.array(0.5, np.float32)},
    )
    proto.graph.initializer.append(flag)
    with pytest.raises(LiftError) as err:
        lift(proto.SerializeToString())
    assert err.value.node == "drop"
    _one_line(err.value)


@pytest.mark.parametrize(
    "roles", ["[]", '{"fc": {"dead": [-1]}}', '{"fc": {"dead": [3]}}', '{"fc": {"nope": [0]}}', '{"fc": []}']
)
def test_malformed_roles_metadata_is_refused(roles):
    proto = _gemm()
    entry = proto.metadata_props.add()
    entry.key, entry.value = "codec.roles", roles
    with pytest.raises(ModelLoadError, match="codec.roles metadata is malformed"):
        lift(proto.SerializeToString())


# ---------------------------------------------------------------------------------------------------
# Wrong dtypes
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint8, bool])
@pytest.mark.parametrize("which", ["w", "b"])
def test_non_float_weights_are_refused(dtype, which):
    with pytest.raises(LiftError, match=f"has dtype {np.dtype(dtype)}; expected floating point"):
        lift(_gemm(**{which: (W if which == "w" else B).astype(dtype)}).SerializeToString())


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_float16_and_float64_weights_become_float32(dtype):
    """Documented: onnxruntime refuses a float32 Gemm with other-width weights, so the parity check does
    too; with the check skipped, other float widths are converted (float16 -> float32 is exact)."""
    with pytest.raises(ModelLoadError, match="onnxruntime refuses the model: Type Error"):
        lift(_gemm(w=W.astype(dtype), b=B.astype(dtype)).SerializeToString())
    net = lift(_gemm(w=W.astype(dtype), b=B.astype(dtype)).SerializeToString(), check=False)
    assert net.metadata["codec.lift_check"] == "skipped"
    dense = net.layers[0]
    assert dense.weight.dtype == np.float32 and dense.bias.dtype == np.float32
    np.testing.assert_array_equal(dense.weight, W.astype(dtype).astype(np.float32))
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    expected = x @ W.astype(dtype).astype(np.float32).T + B.astype(dtype).astype(np.float32)
    np.testing.assert_allclose(run_onnx(to_bytes(lower(net)), x), expected, atol=1e-5)


@pytest.mark.parametrize(
    "elem_type",
    [TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.INT64, TensorProto.UINT8],
)
def test_non_float32_inputs_are_refused(elem_type):
    proto = _proto(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="fc", transB=1)],
        {"w": W, "b": B},
        in_type=elem_type,
    )
    with pytest.raises(LiftError, match="codec expects float32 inputs"):
        lift(proto.SerializeToString())


# ---------------------------------------------------------------------------------------------------
# The fuzz target's saved findings stay fixed (tools/fuzz_loader.py)
# ---------------------------------------------------------------------------------------------------


def test_fuzz_target_seeds_lift_and_short_fuzz_run_finds_nothing():
    """A short deterministic run of the loader fuzz target (the long runs are in docs/guarantees.md)."""
    from fuzz_loader import Recorder, run_random, seed_models

    seeds = seed_models()
    for seed in seeds:
        lift(seed)
    recorder = Recorder(findings_dir=None)
    run_random(recorder, seeds, runs=1500, seconds=0, seed=2024, structure=0.5)
    assert recorder.iterations == 1500
    assert recorder.findings == {}, recorder.findings
    assert recorder.outcomes.get("ok", 0) > 0 and recorder.outcomes.get("LiftError", 0) > 0


def test_data_fuzz_target_seeds_load_and_short_fuzz_run_finds_nothing(tmp_path, monkeypatch):
    """A short deterministic run of the data fuzz target (tools/fuzz_data.py; campaigns in
    docs/guarantees.md): every seed kind loads, and mutated npz/npy/IDX/folder inputs are loaded or
    refused with a CodecError, never anything else."""
    import fuzz_data
    from fuzz_data import Recorder, check_data, run_random, seed_inputs, unpack

    monkeypatch.setenv("CODEC_MAX_DATA_BYTES", str(256 << 20))
    monkeypatch.setattr(fuzz_data, "_WORK", tmp_path)
    seeds = seed_inputs()
    assert {unpack(s)[0] for s in seeds} == {"npz", "npy", "idx", "folder"}
    assert [check_data(s)[0] for s in seeds] == ["ok"] * len(seeds)
    recorder = Recorder(findings_dir=None, check=check_data, suffix=".zip")
    run_random(recorder, seeds, runs=1000, seconds=0, seed=2024)
    assert recorder.iterations == 1000
    assert recorder.findings == {}, recorder.findings
    assert recorder.outcomes.get("ok", 0) > 0 and recorder.outcomes.get("DataError", 0) > 0


# ---------------------------------------------------------------------------------------------------
# Never unpickle
# ---------------------------------------------------------------------------------------------------

_PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_loads(source: str, filename: str = "<source>") -> list[str]:
    """Every place in `source` that could unpickle: pickle-family imports, torch.load without
    weights_only=True, np.load without allow_pickle=False, pandas.read_pickle, yaml.load/unsafe_load."""
    problems = []
    tree = ast.parse(source, filename)

    def keyword(call: ast.Call, name: str):
        for kw in call.keywords:
            if kw.arg == name:
                return kw.value.value if isinstance(kw.value, ast.Constant) else "<expr>"
        return None

    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in _PICKLE_MODULES:
                    problems.append(f"{where}: import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            names = {a.name for a in node.names}
            if (
                root in _PICKLE_MODULES
                or (root == "torch" and "load" in names)
                or (root == "numpy" and "load" in names)
            ):
                problems.append(f"{where}: from {node.module} import {', '.join(sorted(names))}")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            owner_name = (
                owner.id
                if isinstance(owner, ast.Name)
                else (owner.attr if isinstance(owner, ast.Attribute) else "")
            )
            attr = node.func.attr
            if owner_name == "torch" and attr == "load" and keyword(node, "weights_only") is not True:
                problems.append(f"{where}: torch.load without weights_only=True")
            elif (
                owner_name in ("np", "numpy")
                and attr == "load"
                and keyword(node, "allow_pickle") is not False
            ):
                problems.append(f"{where}: np.load without allow_pickle=False")
            elif attr == "read_pickle" or (
                owner_name == "yaml" and attr in ("load", "unsafe_load", "full_load")
            ):
                problems.append(f"{where}: {owner_name}.{attr}")
    return problems


def test_the_scanner_catches_every_unsafe_form():
    bad = [
        "import pickle",
        "import dill as d",
        "from joblib import load",
        "from torch import load",
        "import torch\ntorch.load(p)",
        "import torch\ntorch.load(p, weights_only=False)",
        "import torch\ntorch.load(p, weights_only=flag)",
        "import numpy as np\nnp.load(p)",
        "import numpy as np\nnp.load(p, allow_pickle=True)",
        "import pandas as pd\npd.read_pickle(p)",
        "import yaml\nyaml.load(s)",
    ]
    for source in bad:
        assert unsafe_loads(source), source
    good = (
        "import torch, numpy as np\ntorch.load(p, map_location='cpu', weights_only=True)\nnp.load(p, "
        "allow_pickle=False)\n"
    )
    assert unsafe_loads(good) == []


def test_no_module_of_codec_can_unpickle():
    files = [f for d in PACKAGE_DIRS for f in sorted((REPO / d).rglob("*.py"))]
    assert len(files) > 20
    problems = [p for f in files for p in unsafe_loads(f.read_text(), str(f.relative_to(REPO)))]
    assert problems == []
    # and the two readers of user files do what the scan says they do
    loaders = (REPO / "runtime" / "training" / "train.py").read_text() + (
        REPO / "runtime" / "data" / "formats.py"
    ).read_text()
    assert "weights_only=True" in loaders and "allow_pickle=False" in loaders


class _Boom:
    """Unpickling this creates a marker file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).write_text, ("pwned",))


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path):
    import torch

    from codec.runtime.training.train import load_checkpoint

    marker = tmp_path / "marker"
    ckpt = tmp_path / "evil.ckpt"
    torch.save(
        {"format": 1, "payload": _Boom(str(marker))}, ckpt
    )  # a full pickle, as an attacker would write
    with pytest.raises(ModelLoadError) as err:
        load_checkpoint(ckpt)
    _one_line(err.value)
    assert not marker.exists()
    # plain pickle bytes under a .ckpt name: the same
    ckpt.write_bytes(pickle.dumps(_Boom(str(marker))))
    with pytest.raises(ModelLoadError):
        load_checkpoint(ckpt)
    assert not marker.exists()


def test_npz_with_pickled_objects_is_refused_without_running_code(tmp_path):
    from codec.runtime.data import load_dataset

    marker = tmp_path / "marker"
    path = tmp_path / "evil.npz"
    objects = np.empty(4, dtype=object)
    objects[:] = [_Boom(str(marker))] * 4
    np.savez(
        path, x_train=objects, y_train=np.zeros(4, np.int64), x_test=objects, y_test=np.zeros(4, np.int64)
    )
    with pytest.raises(DataError, match="pickle") as err:
        load_dataset(f"npz:{path}")
    _one_line(err.value)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Second round (issue 17): allocations that input sizes decide are budgeted before allocating
# ---------------------------------------------------------------------------------------------------


def _npz_bytes(tmp_path, name="data.npz", **arrays) -> Path:
    rng = np.random.default_rng(0)
    base = {
        "x_train": rng.random((8, 4), dtype=np.float32),
        "y_train": np.arange(8) % 2,
        "x_test": rng.random((4, 4), dtype=np.float32),
        "y_test": np.arange(4) % 2,
    }
    base.update(arrays)
    path = tmp_path / name
    np.savez_compressed(path, **base)
    return path


def test_a_huge_label_value_is_refused_before_inferring_classes(tmp_path):
    from codec.runtime.data import load_dataset

    path = _npz_bytes(tmp_path, y_train=np.array([0, 1, 2**33, 1, 0, 1, 0, 1]))
    assert path.stat().st_size < 4096
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="largest label is 8589934592.*limit of 65536") as err:
            load_dataset(f"npz:{path}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(path) in str(err.value) and peak < 16 << 20


def _bomb_npz(path: Path, declared_elements: int) -> None:
    """A valid-looking .npz whose x_train member's npy header declares `declared_elements` float32s and
    whose deflate stream really inflates to that many zero bytes would be the honest bomb; a few MB of
    zeros is enough to declare GBs only by lying, so the member's header lies (what a hostile file does)."""
    import io
    import zipfile

    def npy(shape, data: bytes) -> bytes:
        buf = io.BytesIO()
        np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
        return buf.getvalue() + data

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x_train.npy", npy((declared_elements // 4, 4), bytes(4 << 20)))
        for name, array in (
            ("y_train", np.arange(8) % 2),
            ("x_test", np.zeros((4, 4), np.float32)),
            ("y_test", np.arange(4) % 2),
        ):
            buf = io.BytesIO()
            np.save(buf, array)
            archive.writestr(f"{name}.npy", buf.getvalue())


def test_npz_decompression_bomb_is_refused_from_its_declared_sizes(tmp_path, monkeypatch):
    from codec.runtime.data import load_dataset

    path = tmp_path / "bomb.npz"
    _bomb_npz(path, 4 << 30)  # declares 16 GiB of float32 in a few KB
    assert path.stat().st_size < 64 << 10
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="truncated or corrupt|past the limit") as err:
            load_dataset(f"npz:{path}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "bomb.npz" in str(err.value) and peak < 64 << 20
    # an honest file past the budget is refused by the budget, naming it
    honest = _npz_bytes(
        tmp_path,
        "big.npz",
        x_train=np.zeros((4096, 256), np.float32),
        y_train=np.arange(4096) % 2,
        x_test=np.zeros((4, 256), np.float32),
    )
    monkeypatch.setenv("CODEC_MAX_DATA_BYTES", str(1 << 20))
    with pytest.raises(DataError, match=r"past the limit of 1048576 bytes \(set CODEC_MAX_DATA_BYTES"):
        load_dataset(f"npz:{honest}")
    monkeypatch.setenv("CODEC_MAX_DATA_BYTES", str(64 << 20))
    assert load_dataset(f"npz:{honest}").x_train.shape == (4096, 256)


def test_idx_gz_bomb_is_refused_before_inflating(tmp_path, monkeypatch):
    import gzip
    import struct

    from codec.runtime.data.formats import read_idx

    path = tmp_path / "train-images-idx3-ubyte.gz"
    header = struct.pack(">I3I", 2051, 60000 * 1000, 28, 28)  # 47 GB of pixels declared
    with gzip.open(path, "wb") as f:
        f.write(header)
        f.write(bytes(8 << 20))  # inflates to 8 MB from a few KB
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="past the limit") as err:
            read_idx(path, expect_magic=2051)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert path.name in str(err.value) and peak < 4 << 20
    # a gzip stream longer than its header says is read only up to the header's size (+1) and refused
    honest = tmp_path / "small.gz"
    with gzip.open(honest, "wb") as f:
        f.write(struct.pack(">I3I", 2051, 2, 28, 28) + bytes(2 * 784) + bytes(32 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="trailing bytes"):
            read_idx(honest, expect_magic=2051)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    # a header declaring 60 MB (inside the budget) over a 2-image stream: memory follows the bytes that
    # are there, not the header (read(declared) allocated it all; found by the extended hypothesis run)
    short = tmp_path / "short.gz"
    with gzip.open(short, "wb") as f:
        f.write(struct.pack(">I3I", 2051, 80000, 28, 28) + bytes(2 * 784))
    tracemalloc.start()
    try:
        with pytest.raises(DataError):
            read_idx(short, expect_magic=2051)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak


def test_ndg_graphml_is_streamed_and_budgeted(tmp_path, monkeypatch):
    """Two 2000-wide layers gave 4M edges; networkx held them in gigabytes before writing. Now the file
    is streamed (memory independent of the edge count) and a file past the budget is skipped, recorded."""
    import networkx as nx

    from codec.passes.nda import LayerEdges, NeuronDependenceGraph

    n = 200
    rows, cols = np.divmod(np.arange(n * n), n)
    ndg = NeuronDependenceGraph("main", sizes={"fc1": n, "fc2": n})
    ndg.layers["fc2"] = LayerEdges("fc2", "fc1", rows, cols, np.full(n * n, 0.5))
    path = tmp_path / "ndg.graphml"
    tracemalloc.start()
    try:
        ndg.write_graphml(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20, peak  # 40,000 edges: the networkx graph grew with them
    assert path.stat().st_size <= ndg.graphml_bytes()
    small = NeuronDependenceGraph("main", sizes={"a": 2, "b": 2})
    small.layers["b"] = LayerEdges("b", "a", np.array([0, 1]), np.array([1, 1]), np.array([0.25, 1.0]))
    small.write_graphml(tmp_path / "small.graphml")
    read = nx.read_graphml(tmp_path / "small.graphml")
    assert sorted(read.edges(data="weight")) == [("a/1", "b/0", 0.25), ("a/1", "b/1", 1.0)]


def _npy_with_header(path: Path, shape, descr: str = "<f4", data: bytes = b"") -> None:
    """An .npy file whose header declares `shape` whatever `data` it really holds (a hostile file)."""
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    path.write_bytes(buf.getvalue() + data)


def _npy_dir(folder: Path, **arrays) -> Path:
    folder.mkdir()
    base = {"x": np.zeros((8, 4), np.float32), "y": np.arange(8) % 2}
    base.update(arrays)
    for name, value in base.items():
        np.save(folder / f"{name}.npy", value)
    return folder


def test_npy_headers_are_budgeted_before_numpy_allocates(tmp_path, monkeypatch):
    """npy:DIR reads every header first: a file declaring 4 GiB in 200 bytes made numpy allocate the
    4 GiB before finding the data missing; a negative dimension, an honest set past the budget (summed
    over the folder's files, as float32) and a label of 2**33 are one line too."""
    from codec.runtime.data import load_dataset

    bomb = _npy_dir(tmp_path / "bomb")
    _npy_with_header(bomb / "x.npy", (1 << 28, 4), data=bytes(64))  # 4 GiB of float32 declared
    assert (bomb / "x.npy").stat().st_size < 256
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"declares shape \(268435456, 4\).*truncated or corrupt") as err:
            load_dataset(f"npy:{bomb}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _one_line(err.value)
    assert str(bomb / "x.npy") in str(err.value) and peak < 16 << 20, peak
    _npy_with_header(bomb / "x.npy", (8, -4), data=bytes(128))
    with pytest.raises(DataError, match="negative dimension"):
        load_dataset(f"npy:{bomb}")

    # 1 MiB of uint8 is 4 MiB as float32: the budget counts what codec holds, over all files together
    honest = _npy_dir(
        tmp_path / "honest",
        x=np.zeros((4096, 256), np.uint8),
        y=np.arange(4096) % 2,
        x_test=np.zeros((4, 256), np.uint8),
        y_test=np.arange(4) % 2,
    )
    monkeypatch.setenv("CODEC_MAX_DATA_BYTES", str(1 << 20))
    with pytest.raises(DataError, match=r"past the limit of 1048576 bytes \(set CODEC_MAX_DATA_BYTES"):
        load_dataset(f"npy:{honest}")
    monkeypatch.setenv("CODEC_MAX_DATA_BYTES", str(64 << 20))
    assert load_dataset(f"npy:{honest}").x_train.shape == (4096, 256)

    huge_label = _npy_dir(tmp_path / "label", y=np.array([0, 1, 2**33, 1, 0, 1, 0, 1]))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match="largest label is 8589934592.*limit of 65536"):
            load_dataset(f"npy:{huge_label}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, peak


def _png(path: Path, width: int, height: int, rows: int | None = None) -> None:
    """A grey PNG declaring width x height, holding only its first `rows` rows of (zero) pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = height if rows is None else rows
    pixels = zlib.compress(bytes((width + 1) * rows), 9)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )


@pytest.fixture
def decoded_images(monkeypatch):
    """Counts the images Pillow decodes (ImageFile.load), to prove a refusal came before any decoding."""
    from PIL import ImageFile

    count = {"n": 0}
    load = ImageFile.ImageFile.load

    def counting_load(self):
        count["n"] += 1
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting_load)
    return count


@pytest.mark.parametrize(
    "width, height, fragment",
    [
        (10000, 10000, r"declares 10000x10000 = 100000000 pixels, past the limit of 89478485"),
        (20000, 20000, "refused as a decompression bomb"),  # past 2x the limit Pillow raises itself
    ],
)
def test_a_decompression_bomb_image_is_refused_from_its_header(
    width, height, fragment, tmp_path, decoded_images
):
    """A 10000x10000 PNG is a few hundred bytes here (its rows are missing); decoding it allocates
    100 MB in Pillow. Pillow only warns below 2x its limit (and raises a non-OSError above it, which was a
    traceback): refused in one line from the header, before any image is decoded."""
    from codec.runtime.data import load_dataset

    _png(tmp_path / "imgs" / "b" / "bomb.png", width, height, rows=1)
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=fragment) as err:
            load_dataset(f"folder:{tmp_path / 'imgs'}")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _one_line(err.value)
    assert "bomb.png" in str(err.value) and decoded_images["n"] == 0 and peak < 16 << 20


def test_an_image_folder_is_budgeted_before_decoding(tmp_path, monkeypatch, decoded_images):
    """Image count x decoded size (float32, RGB when any image has colour), summed over train/ and test/,
    is checked against CODEC_MAX_DATA_BYTES from the headers alone; within the budget the set loads
    (a grey test/ beside a colour train/ is read as RGB: it was refused for its channel count)."""
    from PIL import Image

    from codec.runtime.data import load_dataset

    for split, count in (("train", 10), ("test", 2)):
        for label in ("a", "b"):
            (tmp_path / "imgs" / split / label).mkdir(parents=True)
            for i in range(count):
                mode = "RGB" if i == 0 and split == "train" else "L"  # test/ all grey: read as RGB too
                Image.new(mode, (64, 64)).save(tmp_path / "imgs" / split / label / f"{i}.png")
    # 24 images of 64x64x3 as float32: 1,179,648 bytes
    monkeypatch.setenv("CODEC_MAX_DATA_BYTES", str(1 << 20))
    with pytest.raises(
        DataError, match=r"the image folder \(24 images\) declares 1179648 bytes.*1048576"
    ) as err:
        load_dataset(f"folder:{tmp_path / 'imgs'}")
    _one_line(err.value)
    assert decoded_images["n"] == 0
    monkeypatch.setenv("CODEC_MAX_DATA_BYTES", str(1179648))
    dataset = load_dataset(f"folder:{tmp_path / 'imgs'}")
    assert dataset.x_train.shape == (20, 3, 64, 64) and dataset.x_test.shape == (4, 3, 64, 64)
    assert decoded_images["n"] >= 24  # the spy sees decoding (Pillow may load an image twice to convert it)


def _unclosed_npy_header() -> bytes:
    """An npy header with an unclosed bracket: numpy's tokenizer raised tokenize.TokenError (found by
    tools/fuzz_data.py, seed 1)."""
    import struct

    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4"
    header += b" " * (118 - len(header)) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + bytes(48)


def test_data_fuzz_findings_are_one_line(tmp_path):
    """The data fuzzer's findings (tools/fuzz_data.py, seeds 1-3 and 11): a corrupt lzma-compressed npz
    member escaped as lzma.LZMAError, an unsupported zip version as NotImplementedError, an unclosed npy
    header as tokenize.TokenError, an empty shape with a 2**62 dimension as ValueError: all tracebacks."""
    import io
    import zipfile

    from codec.runtime.data import load_dataset

    path = tmp_path / "lzma.npz"
    buf = io.BytesIO()
    np.save(buf, np.zeros((8, 4), np.float32))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_LZMA) as archive:
        archive.writestr("x.npy", buf.getvalue())
        archive.writestr("y.npy", _npy_bytes_of(np.arange(8) % 2))
    raw = bytearray(path.read_bytes())
    start = raw.index(b"PK\x03\x04") + 30 + len("x.npy")
    raw[start + 8 : start + 40] = bytes(range(32))  # corrupt the lzma stream, keep the zip headers
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="lzma.npz: cannot read as .npz") as err:
        load_dataset(f"npz:{path}")
    _one_line(err.value)

    # seeds 2 and 3: a member needing "zip version 8.7" raised NotImplementedError
    path = tmp_path / "version.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", _npy_bytes_of(np.zeros((8, 4), np.float32)))
        archive.writestr("y.npy", _npy_bytes_of(np.arange(8) % 2))
    raw = bytearray(path.read_bytes())
    central = raw.index(b"PK\x01\x02")
    raw[central + 6 : central + 8] = (87).to_bytes(2, "little")  # version needed to extract
    path.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="version.npz: cannot read as .npz: zip file version 8.7") as err:
        load_dataset(f"npz:{path}")
    _one_line(err.value)

    # the first campaign (seed 11): shape (0, 0, 2**62) holds no data, but its float32 copy raised
    # numpy's "array is too big" ValueError; refused from the header, in npy:DIR and in an npz
    folder = _npy_dir(tmp_path / "empty")
    _npy_with_header(folder / "x.npy", (0, 0, 2**62), descr="|u1")
    with pytest.raises(
        DataError, match=r"x.npy declares shape \(0, 0, 4611686018427387904\), larger than any"
    ):
        load_dataset(f"npy:{folder}")
    with zipfile.ZipFile(tmp_path / "empty.npz", "w") as archive:
        archive.writestr("x.npy", (folder / "x.npy").read_bytes())
        archive.writestr("y.npy", _npy_bytes_of(np.arange(8) % 2))
    with pytest.raises(DataError, match=r"member x.npy declares shape \(0, 0, 4611686018427387904\)"):
        load_dataset(f"npz:{tmp_path / 'empty.npz'}")

    folder = _npy_dir(tmp_path / "npy")
    (folder / "x.npy").write_bytes(_unclosed_npy_header())
    with pytest.raises(DataError, match=r"x.npy: not a valid .npy header") as err:
        load_dataset(f"npy:{folder}")
    _one_line(err.value)
    with zipfile.ZipFile(tmp_path / "header.npz", "w") as archive:
        archive.writestr("x.npy", _unclosed_npy_header())
        archive.writestr("y.npy", _npy_bytes_of(np.arange(8) % 2))
    with pytest.raises(DataError, match=r"member x.npy: not a valid .npy header") as err:
        load_dataset(f"npz:{tmp_path / 'header.npz'}")
    _one_line(err.value)


def _npy_bytes_of(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()
