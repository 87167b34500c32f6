"""Property-based fuzzing (hypothesis) of the IR and the passes on random networks and random data.

- lower -> lift -> lower round trips of random MLPs and CNNs (widths, activations, convolutions with
  strides/pads/dilations, max/avg/global pools with and without padding and ceil_mode, flatten) compute
  the same function under onnxruntime, and lift gives back exactly the IR that was lowered;
- DNE preserves function on the calibration inputs (checked independently of the manager's verification);
- DNA's dead set equals a brute-force numpy computation over the raw activation maps;
- CSNE's matching is one-to-one, every matched pair meets its thresholds (agreement >= fire, correlation
  >= corr), the predecessor rule and the sub-network rule hold, and the matching is maximal.

The number of cases tried per property is written to `fuzz_counts.json` (in pytest's base temporary folder,
or `$CODEC_FUZZ_COUNTS`) and shown in the terminal summary. `CODEC_FUZZ_EXAMPLES=N` runs N per property.
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from codec.ir import Activation, Conv, Dense, Flatten, NetworkIR, Pool, lift, lower, tap_names, to_bytes
from codec.passes.base import Calibration, EnsembleModule
from codec.passes.manager import PassManager
from codec.passes.registry import parse_pipeline

EXAMPLES = int(os.environ.get("CODEC_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # the same cases on every run: CI stays reproducible; raise CODEC_FUZZ_EXAMPLES to explore
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CASES: collections.Counter = collections.Counter()


@pytest.fixture(autouse=True, scope="module")
def _report_counts(request, tmp_path_factory):
    yield
    target = Path(os.environ.get("CODEC_FUZZ_COUNTS") or tmp_path_factory.getbasetemp() / "fuzz_counts.json")
    target.write_text(json.dumps(dict(sorted(CASES.items())), indent=2) + "\n")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\nfuzz cases tried: {dict(sorted(CASES.items()))} (written to {target})")


def _run(model: bytes, x: np.ndarray, outputs: list[str] | None = None) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    session = ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])
    return session.run(outputs, {session.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})


# ---------------------------------------------------------------------------------------------------
# Random networks
# ---------------------------------------------------------------------------------------------------

HIDDEN_ACTS = ("identity", "relu", "leaky_relu", "sigmoid", "tanh")


@st.composite
def activations(draw, kinds=HIDDEN_ACTS) -> Activation:
    kind = draw(st.sampled_from(kinds))
    alpha = draw(st.sampled_from([0.01, 0.1, 0.3])) if kind == "leaky_relu" else 0.01
    return Activation(kind, alpha)


def _dense(rng, name, n_out, n_in, act) -> Dense:
    # 1/sqrt(fan_in) keeps activations O(1), so float32 tolerances mean the same at every depth
    return Dense(
        name,
        (rng.standard_normal((n_out, n_in)) / np.sqrt(n_in)).astype(np.float32),
        rng.normal(0, 0.3, n_out).astype(np.float32),
        act,
    )


@st.composite
def mlps(draw, hidden_kinds=HIDDEN_ACTS, min_hidden=0, max_width=12) -> NetworkIR:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_in = draw(st.integers(1, 12))
    widths = draw(st.lists(st.integers(1, max_width), min_size=min_hidden, max_size=3))
    layers, prev = [], n_in
    for i, width in enumerate(widths):
        layers.append(_dense(rng, f"fc{i}", width, prev, draw(activations(hidden_kinds))))
        prev = width
    out_act = draw(st.sampled_from([Activation("identity"), Activation("softmax"), Activation("sigmoid")]))
    layers.append(_dense(rng, "out", draw(st.integers(1, 6)), prev, out_act))
    return NetworkIR("mlp", "input", "output", (n_in,), layers)


@st.composite
def cnns(draw, hidden_kinds=HIDDEN_ACTS) -> NetworkIR:
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shape = (draw(st.integers(1, 3)), draw(st.integers(3, 10)), draw(st.integers(3, 10)))
    input_shape, layers = shape, []
    for i in range(draw(st.integers(1, 2))):
        c_out = draw(st.integers(1, 4))
        kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        conv = Conv(
            f"conv{i}",
            (
                rng.standard_normal((c_out, shape[0], *kernel)) / np.sqrt(shape[0] * kernel[0] * kernel[1])
            ).astype(np.float32),
            rng.normal(0, 0.3, c_out).astype(np.float32),
            draw(activations(hidden_kinds)),
            strides=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
            pads=tuple(draw(st.integers(0, 2)) for _ in range(4)),
            dilations=(draw(st.integers(1, 2)), draw(st.integers(1, 2))),
        )
        out = conv.output_shape(shape)
        if min(out[1:]) < 1:
            continue  # too small for this kernel: leave the conv out rather than reject the case
        layers.append(conv)
        shape = out
        pool_kind = draw(st.sampled_from(["none", "max", "avg", "global"]))
        if pool_kind == "global":
            layers.append(Pool(f"pool{i}", "avg", shape[1:], (1, 1), is_global=True))
            shape = (shape[0], 1, 1)
        elif pool_kind != "none":
            k = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
            pool = Pool(
                f"pool{i}",
                pool_kind,
                k,
                (draw(st.integers(1, 3)), draw(st.integers(1, 3))),
                pads=tuple(draw(st.integers(0, k[j % 2] - 1)) for j in range(4)),
                ceil_mode=draw(st.booleans()),
                count_include_pad=draw(st.booleans()) if pool_kind == "avg" else False,
            )
            pooled = pool.output_shape(shape)
            if min(pooled[1:]) >= 1 and _shape_inference_agrees(pool, shape, pooled):
                layers.append(pool)
                shape = pooled
    if not layers:  # every conv was too large: one 1x1 conv always fits
        layers.append(
            Conv(
                "conv0",
                rng.standard_normal((2, shape[0], 1, 1)).astype(np.float32),
                np.zeros(2, np.float32),
                Activation("relu"),
            )
        )
        shape = (2, *shape[1:])
    layers.append(Flatten("flatten"))
    prev = int(np.prod(shape))
    for i in range(draw(st.integers(0, 2))):
        width = draw(st.integers(1, 8))
        layers.append(_dense(rng, f"fc{i}", width, prev, draw(activations(hidden_kinds))))
        prev = width
    layers.append(
        _dense(
            rng,
            "out",
            draw(st.integers(1, 5)),
            prev,
            draw(st.sampled_from([Activation("identity"), Activation("softmax")])),
        )
    )
    return NetworkIR("cnn", "input", "output", input_shape, layers)


def _shape_inference_agrees(pool: Pool, shape, pooled) -> bool:
    """ceil_mode pools whose last window starts past the input have no agreed size (ONNX shape inference
    keeps the window, onnxruntime and torch drop it): lift refuses them, so they are not generated here."""
    if not pool.ceil_mode:
        return True
    inferred = [
        -(-(shape[i + 1] + pool.pads[i] + pool.pads[i + 2] - pool.kernel_shape[i]) // pool.strides[i]) + 1
        for i in range(2)
    ]
    return list(pooled[1:]) == inferred


networks = st.one_of(mlps(), cnns())


def _inputs(net: NetworkIR, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *net.input_shape)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# lower -> lift -> lower
# ---------------------------------------------------------------------------------------------------


def _numpy_mlp(net: NetworkIR, x: np.ndarray) -> np.ndarray:
    h = x.astype(np.float64)
    for layer in net.layers:
        h = layer.activation.apply(h @ layer.weight.T.astype(np.float64) + layer.bias)
    return h


@FUZZ
@given(net=networks, seed=st.integers(0, 1000))
def test_lower_lift_lower_round_trip(net, seed):
    CASES["round_trip_" + net.name] += 1
    first = to_bytes(lower(net))
    lifted = lift(first)
    assert [type(l) for l in lifted.layers] == [type(l) for l in net.layers]
    for a, b in zip(net.layers, lifted.layers):
        if isinstance(a, (Dense, Conv)):
            np.testing.assert_array_equal(a.weight, b.weight)
            np.testing.assert_array_equal(a.bias, b.bias)
            assert a.activation == b.activation
        elif isinstance(a, Pool):
            assert (a.mode, a.kernel_shape, a.strides, a.pads, a.ceil_mode, a.is_global) == (
                b.mode,
                b.kernel_shape,
                b.strides,
                b.pads,
                b.ceil_mode,
                b.is_global,
            )
    second = to_bytes(lower(lifted))
    x = _inputs(net, 6, seed)
    y1, y2 = _run(first, x)[0], _run(second, x)[0]
    assert y1.shape == (6, *net.output_shape), "the IR's shape arithmetic matches onnxruntime"
    assert float(np.abs(y1 - y2).max()) < 1e-5
    if net.name == "mlp":  # and the lowered graph computes what the IR says
        np.testing.assert_allclose(y1, _numpy_mlp(net, x), atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# DNA and DNE
# ---------------------------------------------------------------------------------------------------


def _plant_dead(net: NetworkIR, rng: np.random.Generator, fraction: float) -> None:
    """Kill some hidden neurons: a zero filter and bias (dead for activations with f(0) = 0), or a very
    negative bias on ReLU layers."""
    for layer in net.hidden_layers():
        chosen = np.flatnonzero(rng.random(layer.num_neurons) < fraction)
        for i in chosen:
            if layer.activation.kind == "relu" and rng.random() < 0.5:
                layer.bias[i] = -1e3
            else:
                layer.weight[i] = 0.0
                layer.bias[i] = 0.0


def _raw_taps(net: NetworkIR, x: np.ndarray) -> dict[str, np.ndarray]:
    """Every hidden layer's raw post-activation output, (N, neurons[, H, W]), straight from onnxruntime."""
    hidden = net.hidden_layers()
    outs = _run(to_bytes(lower(net, taps=True)), x, [tap_names(net)[l.name] for l in hidden])
    return {l.name: o for l, o in zip(hidden, outs)}


def _brute_dead(net: NetworkIR, x: np.ndarray, criterion: str) -> dict[str, np.ndarray]:
    dead = {}
    taps = _raw_taps(net, x)
    for layer in net.hidden_layers():
        out = taps[layer.name].reshape(len(x), layer.num_neurons, -1)
        if criterion == "zero":
            mask = np.all(out == 0, axis=(0, 2))
        else:
            mask = ~np.any(out > layer.activation.fire_threshold(layer.num_neurons), axis=(0, 2))
        dead[layer.name] = np.flatnonzero(mask)
    return dead


@FUZZ
@given(
    net=networks,
    seed=st.integers(0, 2**32 - 1),
    fraction=st.sampled_from([0.0, 0.3, 0.7, 1.0]),
    criterion=st.sampled_from(["zero", "never_fires"]),
    intersect=st.booleans(),
)
def test_dna_dead_set_equals_brute_force(net, seed, fraction, criterion, intersect):
    CASES["dna_" + net.name] += 1
    rng = np.random.default_rng(seed)
    _plant_dead(net, rng, fraction)
    members = {"main": net}
    if intersect:
        twin = net.copy()
        _plant_dead(twin, rng, fraction)  # a same-architecture member with its own dead neurons
        members["peer"] = twin
    x = _inputs(net, 150, seed % 1000)
    scope = "intersect" if intersect else "member"
    module = EnsembleModule(members, Calibration(x, batch_size=64))
    manager = PassManager(parse_pipeline(f"dna{{scope={scope},criterion={criterion}}}"))
    manager.run(module)
    found = manager.results["dna"]
    expected = {name: _brute_dead(m, x, criterion) for name, m in members.items()}
    if intersect:
        common = {l: np.intersect1d(expected["main"][l], expected["peer"][l]) for l in expected["main"]}
        expected = {name: common for name in members}
    for name in members:
        assert set(found[name]) == set(expected[name])
        for layer, idx in expected[name].items():
            np.testing.assert_array_equal(found[name][layer], idx)


@FUZZ
@given(net=networks, seed=st.integers(0, 2**32 - 1), fraction=st.sampled_from([0.2, 0.5, 1.0]))
def test_dne_preserves_function(net, seed, fraction):
    CASES["dne_" + net.name] += 1
    rng = np.random.default_rng(seed)
    _plant_dead(net, rng, fraction)
    x = _inputs(net, 150, seed % 1000)
    module = EnsembleModule({"main": net}, Calibration(x, batch_size=64))
    out, report = PassManager(parse_pipeline("dna{scope=member},dne"), verify=True).run(module)
    after = out.members["main"]
    dead = _brute_dead(net, x, "zero")
    CASES["dne_dead_neurons_found"] += sum(len(d) for d in dead.values())
    for layer in net.hidden_layers():
        removed = len(dead[layer.name]) - (len(dead[layer.name]) == layer.num_neurons)  # one is always kept
        assert after.layer(layer.name).num_neurons == layer.num_neurons - removed
    # independently of the manager's own verification: same outputs on the calibration inputs
    y_before = _run(to_bytes(lower(net)), x)[0]
    y_after = _run(to_bytes(lower(after)), x)[0]
    assert float(np.abs(y_before - y_after).max()) <= 1e-5
    assert after.num_parameters <= net.num_parameters


# ---------------------------------------------------------------------------------------------------
# CSNE
# ---------------------------------------------------------------------------------------------------


@st.composite
def pairs(draw):
    """main and peer MLPs where peer holds permuted copies (some perturbed) of some of main's neurons.

    Layer l's copied neurons read only copied neurons of layer l-1 (in main and in peer), so a copy
    computes exactly its original (before perturbation) -- except that one of main's copies may keep a
    tiny weight from a non-copied neuron: equivalent in activation, but with an NDG predecessor outside
    the CSN (the case the predecessor rule exists for)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    n_in = draw(st.integers(2, 10))
    widths = draw(st.lists(st.integers(2, 10), min_size=1, max_size=3))
    act = draw(activations(("relu", "tanh", "sigmoid", "leaky_relu")))
    main_layers, peer_layers, prev, prev_copies, prev_perm = [], [], n_in, np.arange(n_in), np.arange(n_in)
    for i, width in enumerate(widths):
        m = _dense(rng, f"fc{i}", width, prev, act)
        p = _dense(rng, f"fc{i}", width, prev, act)
        k = int(draw(st.integers(0, width)))
        perm = rng.permutation(width)
        outside = np.setdiff1d(np.arange(prev), prev_copies)
        m.weight[:k][:, outside] = 0.0  # copies read copies only ...
        if k and len(outside) and draw(st.booleans()):
            m.weight[rng.integers(k), outside[0]] = 1e-4  # ... but one may keep a tiny link to a non-copy
        for j in range(k):
            row = np.zeros(prev, np.float32)
            row[prev_perm[prev_copies]] = m.weight[j, prev_copies]
            p.weight[perm[j]] = row
            p.bias[perm[j]] = m.bias[j]
        noisy = draw(st.sampled_from([0.0, 0.05, 0.5]))
        if noisy and k:
            p.bias[perm[:k]] += rng.normal(0, noisy, k).astype(np.float32)  # near twins: fire on other inputs
        main_layers.append(m)
        peer_layers.append(p)
        prev, prev_copies, prev_perm = width, np.arange(k), perm
    for layers in (main_layers, peer_layers):
        layers.append(_dense(rng, "out", 3, prev, Activation("softmax")))
    return (
        NetworkIR("main", "input", "output", (n_in,), main_layers),
        NetworkIR("peer", "input", "output", (n_in,), peer_layers),
    )


def _brute_csn_facts(main, peer, x):
    """Per hidden layer, from raw activations: firing masks, agreement, jaccard, correlation, NDG."""
    am, ap = _raw_taps(main, x), _raw_taps(peer, x)
    facts = {}
    prev_fire = None
    for lm, lp in zip(main.hidden_layers(), peer.hidden_layers()):
        a, b = am[lm.name].astype(np.float64), ap[lp.name].astype(np.float64)
        fa, fb = (
            a > lm.activation.fire_threshold(lm.num_neurons),
            b > lp.activation.fire_threshold(lp.num_neurons),
        )
        n = len(x)
        both = fa.T.astype(np.int64) @ fb.astype(np.int64)
        agreement = (n - fa.sum(0)[:, None] - fb.sum(0)[None, :] + 2 * both) / n
        with np.errstate(divide="ignore", invalid="ignore"):
            jaccard = np.nan_to_num(both / (fa.sum(0)[:, None] + fb.sum(0)[None, :] - both))
        sa, sb = a.std(0), b.std(0)
        cov = (a - a.mean(0)).T @ (b - b.mean(0)) / n
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = np.where(np.outer(sa, sb) > 1e-12, cov / np.outer(sa, sb), 0.0)
        cofire_prev = None
        if prev_fire is not None:
            with np.errstate(divide="ignore", invalid="ignore"):
                cofire_prev = np.nan_to_num(
                    (fa.T.astype(np.int64) @ prev_fire.astype(np.int64)) / prev_fire.sum(0)[None, :],
                    nan=0.0,
                    posinf=0.0,
                )
        facts[lm.name] = dict(
            agreement=agreement,
            jaccard=jaccard,
            corr=np.clip(corr, -1, 1),
            cofire_prev=cofire_prev,
            connected=np.abs(lm.weight) > 0,
            std=(sa, sb),
        )
        prev_fire = fa
    return facts


# Firing counts are exact integers on both sides; correlations come from streamed sums (main x peer products
# in float32 GEMMs per batch, accumulated in float64), so they agree with a direct computation to ~1e-5.
CORR_TOL = 1e-4


@FUZZ
@given(
    pair=pairs(),
    seed=st.integers(0, 1000),
    fire_k=st.integers(100, 199),
    corr=st.sampled_from([0.5, 0.8, 0.95, 0.99]),
    nda_fire=st.sampled_from([0.0, 0.3, 0.6, 0.9]),
    preds=st.booleans(),
    cofire=st.sampled_from(["agreement", "jaccard"]),
)
def test_csne_matching_invariants(pair, seed, fire_k, corr, nda_fire, preds, cofire):
    CASES["csne"] += 1
    main, peer = pair
    n = 200
    fire = (fire_k + 0.5) / n  # never exactly a count / n: no ties at the threshold
    x = _inputs(main, n, seed)
    module = EnsembleModule({"main": main, "peer": peer}, Calibration(x, batch_size=64))
    spec = (
        f"nda{{fire={nda_fire}}},csne{{fire={fire},corr={corr},preds={str(preds).lower()},cofire={cofire}}}"
    )
    out, report = PassManager(parse_pipeline(spec)).run(module)
    csn = out.csn
    CASES["csne_matched_pairs_checked"] += csn.total
    CASES["csne_cases_with_a_csn"] += csn.total > 0
    facts = _brute_csn_facts(main, peer, x)
    below = None  # CSN main neurons of the layer below (None: the network input, fully shared)
    for spec_layer, layer in zip(csn.layers, main.hidden_layers()):
        f = facts[layer.name]
        together = f[cofire]
        m, p = spec_layer.main, spec_layer.peer
        # one-to-one, in range
        assert len(set(m.tolist())) == len(m) and len(set(p.tolist())) == len(p)
        assert all(0 <= i < layer.num_neurons for i in m) and all(
            0 <= j < peer.layer(layer.name).num_neurons for j in p
        )
        # every pair meets its thresholds, recomputed from raw activations
        assert np.all(together[m, p] >= fire), (together[m, p], fire)
        assert np.all(f["corr"][m, p] >= corr - CORR_TOL), (f["corr"][m, p], corr)
        np.testing.assert_allclose(spec_layer.agreement, together[m, p], atol=1e-12)
        np.testing.assert_allclose(spec_layer.correlation, f["corr"][m, p], atol=CORR_TOL)
        # the sub-network rule and the predecessor rule
        eligible_rows = np.ones(layer.num_neurons, bool)
        if below is not None:
            if len(below) == 0:
                assert len(m) == 0, "a layer holds CSN neurons only if the layer below does"
                eligible_rows[:] = False
            elif preds:
                owner = main.input_neuron_map(layer.name)
                prev_n = main.previous_compute(layer.name).num_neurons
                connected = np.zeros((layer.num_neurons, prev_n), bool)
                for j in range(prev_n):
                    connected[:, j] = f["connected"][:, owner == j].any(axis=1)
                ndg = connected & (f["cofire_prev"] >= nda_fire)
                outside = np.setdiff1d(np.arange(prev_n), below)
                eligible_rows = ~ndg[:, outside].any(axis=1)
                assert eligible_rows[m].all(), "every NDG predecessor of a CSN neuron is in the CSN"
                CASES["csne_layers_where_the_predecessor_rule_excluded_neurons"] += int(
                    (~eligible_rows).any()
                )
        # maximal: no clearly eligible pair is left with both neurons unmatched
        clear = (together >= fire) & (f["corr"] >= corr + CORR_TOL) & eligible_rows[:, None]
        free_m = np.setdiff1d(np.arange(layer.num_neurons), m)
        free_p = np.setdiff1d(np.arange(together.shape[1]), p)
        if report["passes"][-1]["details"]["iterations"] < 20:
            assert not clear[np.ix_(free_m, free_p)].any(), "the greedy matching is maximal"
        below = m


# ---------------------------------------------------------------------------------------------------
# Second round (issue 17): hand-built ONNX graphs with the structures lift rewrites, names that collide
# with codec's own, opsets; and data files whose declared sizes and labels are hostile.
# ---------------------------------------------------------------------------------------------------

_NAME_POOL = (
    "x",
    "y",
    "c",
    "p",
    "a",
    "a.relu",
    "fc",
    "fc.relu",
    "fc.weight",
    "conv",
    "conv.relu",
    "pool",
    "f",
    "out",
)


@st.composite
def onnx_graphs(draw):
    """(model bytes, input shape, facts): Conv -> [pool (max/avg, auto_pad, pads, ceil)] -> [activation
    (any alpha sign)] -> Flatten -> MatMul + Add (bias of any broadcastable shape), under drawn names and
    a drawn opset."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    size = draw(st.integers(4, 9))
    names = iter(draw(st.permutations(_NAME_POOL)))
    input_name, output_name = next(names), next(names)
    values = [next(names) for _ in range(6)]
    nodes, inits = [], {}
    w = rng.standard_normal((2, 1, 2, 2)).astype(np.float32)
    inits["cw"] = w
    nodes.append(
        helper.make_node(
            "Conv",
            [input_name, "cw"],
            [values[0]],
            name=draw(st.sampled_from(("conv", "fc", "a"))),
            kernel_shape=[2, 2],
        )
    )
    current, channels, spatial = values[0], 2, size - 1
    facts = {"pool": None, "act": None}
    if draw(st.booleans()):
        op = draw(st.sampled_from(("MaxPool", "AveragePool")))
        attrs = {
            "kernel_shape": [2, 2],
            "strides": [draw(st.integers(1, 2))] * 2,
            "ceil_mode": draw(st.integers(0, 1)),
        }
        mode = draw(st.sampled_from(("NOTSET", "VALID", "SAME_UPPER", "SAME_LOWER")))
        if mode != "NOTSET":
            attrs["auto_pad"] = mode
        if draw(st.booleans()):
            attrs["pads"] = draw(st.sampled_from(([0, 0, 0, 0], [1, 1, 1, 1], [0, 1, 0, 1], [1, 0, 0, 0])))
        if op == "AveragePool":
            attrs["count_include_pad"] = draw(st.integers(0, 1))
        nodes.append(
            helper.make_node(
                op, [current], [values[1]], name=draw(st.sampled_from(("pool", "p", "a.relu"))), **attrs
            )
        )
        current = values[1]
        facts["pool"] = (op, mode, tuple(attrs.get("pads", ())))
    if draw(st.booleans()):
        act = draw(st.sampled_from(("Relu", "LeakyRelu", "Sigmoid", "Tanh")))
        attrs = (
            {"alpha": draw(st.sampled_from((-2.0, -0.5, 0.0, 0.01, 0.5, 3.0)))} if act == "LeakyRelu" else {}
        )
        nodes.append(helper.make_node(act, [current], [values[2]], name="act", **attrs))
        current = values[2]
        facts["act"] = (act, attrs.get("alpha"))
    nodes.append(helper.make_node("Flatten", [current], [values[3]], name="flatten", axis=1))
    features = draw(st.integers(1, 4))
    inits["mw"] = rng.standard_normal((1, features)).astype(np.float32)  # replaced below once F is known
    nodes.append(helper.make_node("MatMul", [values[3], "mw"], [values[4]], name="mm"))
    bias_shape = draw(
        st.sampled_from(
            ((features,), (1, features), (1,), (), (1, 1, features), (2, features), (features, 1))
        )
    )
    inits["mb"] = rng.standard_normal(bias_shape).astype(np.float32)
    nodes.append(helper.make_node("Add", [values[4], "mb"], [output_name], name="add"))
    opset = draw(st.sampled_from((18, 18, 18, 13, 7, 6, None, 29)))
    facts.update(bias=bias_shape, opset=opset, names=(input_name, output_name))

    def model(flat: int) -> bytes:
        inits["mw"] = rng.standard_normal((flat, features)).astype(np.float32)
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, ["n", 1, size, size])],
            [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, None)],
            [numpy_helper.from_array(a, n) for n, a in inits.items()],
        )
        opsets = [] if opset is None else [helper.make_opsetid("", opset)]
        return helper.make_model(graph, opset_imports=opsets).SerializeToString()

    # the flattened width depends on the pool as onnxruntime computes it: ask onnxruntime (with a
    # throwaway head), so the drawn model is valid whenever its structure is
    import onnx
    import onnxruntime as ort

    probe = onnx.load_model_from_string(model(1))
    del probe.graph.node[-2:]
    probe.graph.output[0].name = values[3]
    try:
        probe.opset_import[0].version = 18 if probe.opset_import else 18
        if not probe.opset_import:
            probe.opset_import.append(onnx.helper.make_opsetid("", 18))
        session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
        flat = session.run(None, {input_name: np.zeros((1, 1, size, size), np.float32)})[0].shape[1]
    except Exception:  # noqa: BLE001 - a structure onnxruntime refuses: any head will do, lift must refuse
        flat = channels * spatial * spatial
    return model(int(flat)), (1, size, size), facts


@FUZZ
@given(case=onnx_graphs())
def test_lift_of_hand_built_graphs_is_exact_or_refused(case):
    """Whatever lift accepts computes what onnxruntime computes on the original (checked here,
    independently of lift's own parity check, with that check off and on); what onnxruntime refuses,
    lift refuses."""
    import onnxruntime as ort

    from codec.errors import CodecError

    model, shape, facts = case
    x = np.random.default_rng(1).standard_normal((3, *shape)).astype(np.float32)
    try:
        reference = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        expected = reference.run(None, {reference.get_inputs()[0].name: x})[0]
    except Exception:  # noqa: BLE001
        expected = None
    for check in (False, True):
        try:
            net = lift(model, check=check)
        except CodecError:
            CASES[f"hand-built: refused (check={check})"] += 1
            continue
        assert expected is not None, ("lift accepted what onnxruntime refuses", check, facts)
        got = _run(to_bytes(lower(net)), x)[0]
        assert got.shape == expected.shape, (facts, got.shape, expected.shape)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5, err_msg=str(facts))
        CASES[f"hand-built: lifted exactly (check={check})"] += 1


@FUZZ
@given(
    labels=st.lists(st.integers(0, 2**40), min_size=4, max_size=8),
    declared=st.integers(1, 2**40),
    lie=st.booleans(),
    gz=st.booleans(),
)
def test_data_files_with_hostile_sizes_and_labels_are_bounded(labels, declared, lie, gz, tmp_path_factory):
    """npz members whose headers declare up to 2**40 values, labels up to 2**40, IDX(.gz) headers
    declaring up to 2**40 pixels: a one-line DataError or a dataset, never an allocation past 64 MiB."""
    import gzip
    import io
    import struct
    import tracemalloc
    import zipfile

    from codec.errors import DataError
    from codec.runtime.data import load_dataset
    from codec.runtime.data.formats import read_idx

    folder = tmp_path_factory.mktemp("hostile")
    path = folder / "d.npz"
    n = len(labels)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, array in (
            ("x_train", np.zeros((n, 4), np.float32)),
            ("y_train", np.array(labels)),
            ("x_test", np.zeros((2, 4), np.float32)),
            ("y_test", np.array(labels[:2])),
        ):
            buf = io.BytesIO()
            if name == "x_train" and lie:
                np.lib.format.write_array_header_1_0(
                    buf, {"descr": "<f4", "fortran_order": False, "shape": (declared, 4)}
                )
                buf.write(array.tobytes())
            else:
                np.save(buf, array)
            archive.writestr(f"{name}.npy", buf.getvalue())
    idx = folder / ("i.idx.gz" if gz else "i.idx")
    raw = struct.pack(">I3I", 2051, min(declared, 2**32 - 1), 28, 28) + bytes(784 * 2)
    idx.write_bytes(gzip.compress(raw) if gz else raw)
    tracemalloc.start()
    try:
        for load in (lambda: load_dataset(f"npz:{path}"), lambda: read_idx(idx, expect_magic=2051)):
            try:
                load()
                CASES["hostile data: loaded"] += 1
            except DataError as exc:
                assert "\n" not in str(exc)
                CASES["hostile data: refused"] += 1
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, peak
