"""IR coverage beyond chains: the new activations, grouped/strided/dilated convolutions, BatchNorm folding,
residual Adds and Concats (a DAG), and skl2onnx's classifier tail — each lifted, profiled, passed over and
lowered with the function preserved (max abs error < 1e-5 against onnxruntime on random inputs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import export_torch, run_onnx
from torch import nn

from codec.errors import LiftError
from codec.ir import Activation, Add, Concat, Conv, lift, lower, to_bytes
from codec.ir.network import ACTIVATION_KINDS
from codec.ir.surgery import removal_blocker, select_neurons
from codec.passes.base import Calibration, EnsembleModule
from codec.passes.manager import PassManager
from codec.passes.registry import parse_pipeline
from codec.runtime.execution.profile import profile
from codec.runtime.training.torch_ir import IRModule

EXPORTERS = [True, False]
EXPORTER_IDS = ["dynamo", "legacy"]
NEW_ACTIVATIONS = {
    "gelu": lambda: nn.GELU(),
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": lambda: nn.SiLU(),
    "elu": lambda: nn.ELU(0.7),
    "softplus": lambda: nn.Softplus(),
    "hardswish": lambda: nn.Hardswish(),
}


def _lift_export(module, shape, tmp_path, dynamo, name="model"):
    path = export_torch(module, torch.randn(2, *shape), tmp_path / f"{name}.onnx", dynamo)
    return path, lift(path)


def _round_trip_error(path, net, shape, scale=3.0, seed=0):
    x = (np.random.default_rng(seed).standard_normal((32, *shape)) * scale).astype(np.float32)
    return float(np.abs(run_onnx(path, x) - run_onnx(to_bytes(lower(net)), x)).max())


# -- activations ----------------------------------------------------------------------------------------


def test_fire_threshold_is_the_value_at_zero_and_monotone_is_true():
    grid = np.linspace(-8, 8, 4001)
    for kind in ACTIVATION_KINDS:
        if kind == "softmax":
            continue
        for alpha in (0.01, 1.0, -0.5):
            act = Activation(kind, alpha)
            assert act.fire_threshold(4) == pytest.approx(float(act.apply(np.zeros(1))[0]), abs=1e-12), kind
            values = act.apply(grid)
            if alpha >= 0:  # firing (value above the threshold) is exactly a positive pre-activation
                assert np.array_equal(values > act.fire_threshold(4) + 1e-12, grid > 1e-9), kind
            assert act.monotone == bool(np.all(np.diff(values) >= -1e-12)), (kind, alpha)
    assert (
        not Activation("gelu").monotone
        and not Activation("silu").monotone
        and not Activation("hardswish").monotone
    )
    assert (
        Activation("elu", 1.0).monotone
        and not Activation("elu", -0.5).monotone
        and Activation("softplus").monotone
    )


@pytest.mark.parametrize("dynamo", EXPORTERS, ids=EXPORTER_IDS)
@pytest.mark.parametrize("kind", sorted(NEW_ACTIVATIONS))
def test_new_activation_round_trip(kind, dynamo, tmp_path):
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(6, 8), NEW_ACTIVATIONS[kind](), nn.Dropout(0.3), nn.Linear(8, 3), nn.Softmax(-1)
    )
    path, net = _lift_export(module, (6,), tmp_path, dynamo)
    assert [layer.activation.kind for layer in net.layers] == [kind, "softmax"]
    if kind == "elu":
        assert net.layers[0].activation.alpha == pytest.approx(0.7)
    assert _round_trip_error(path, net, (6,)) < 1e-5
    # the profile reads the firing condition: a neuron fires exactly where its pre-activation is positive
    x = np.random.default_rng(1).standard_normal((64, 6)).astype(np.float32)
    stats = profile(net, x).layers[net.layers[0].name]
    z = x @ net.layers[0].weight.T + net.layers[0].bias
    np.testing.assert_array_equal(stats.fire, (z > 0).sum(axis=0))


def test_torch_ir_computes_every_activation():
    rng = np.random.default_rng(0)
    from codec.ir import Dense, NetworkIR

    for kind in sorted(NEW_ACTIVATIONS):
        act = Activation(kind, 0.7 if kind == "elu" else 0.01)
        net = NetworkIR(
            "a",
            "x",
            "y",
            (5,),
            [
                Dense("h", rng.standard_normal((4, 5)), rng.standard_normal(4), act),
                Dense("o", rng.standard_normal((2, 4)), np.zeros(2)),
            ],
        )
        x = (rng.standard_normal((16, 5)) * 3).astype(np.float32)
        with torch.no_grad():
            got = IRModule(net)(torch.from_numpy(x)).numpy()
        assert np.abs(got - run_onnx(to_bytes(lower(net)), x)).max() < 1e-5, kind


def _gelu_graph(mul_form: bool, scale_after: float | None = None) -> bytes:
    """A Gemm and GELU written out as nodes: Div by sqrt(2) (the legacy exporter) or Mul by 1/sqrt(2)."""
    from onnx import TensorProto, helper, numpy_helper

    def c(name, v):
        return numpy_helper.from_array(np.array(v, np.float32), name)

    first = (
        helper.make_node("Mul", ["h", "k"], ["s"], name="scale")
        if mul_form
        else helper.make_node("Div", ["h", "k"], ["s"], name="scale")
    )
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], name="fc", transB=1),
        first,
        helper.make_node("Erf", ["s"], ["e"], name="erf"),
        helper.make_node("Add", ["e", "one"], ["g"], name="gate"),
        helper.make_node("Mul", ["h", "g"], ["m"], name="times"),
        helper.make_node("Mul", ["m", "half"], ["y" if scale_after is None else "u"], name="half"),
    ]
    inits = [c("k", 1 / np.sqrt(2) if mul_form else np.sqrt(2)), c("one", 1.0), c("half", 0.5)]
    if scale_after is not None:
        nodes.append(helper.make_node("Mul", ["u", "two"], ["y"], name="rescale"))
        inits.append(c("two", scale_after))
    rng = np.random.default_rng(0)
    inits += [
        numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w"),
        numpy_helper.from_array(np.zeros(3, np.float32), "b"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


@pytest.mark.parametrize("mul_form", [False, True], ids=["div", "mul"])
def test_decomposed_gelu_is_recognised(mul_form):
    model = _gelu_graph(mul_form)
    net = lift(model)
    assert [layer.activation.kind for layer in net.layers] == ["gelu"]
    x = (np.random.default_rng(2).standard_normal((32, 4)) * 3).astype(np.float32)
    assert np.abs(run_onnx(model, x) - run_onnx(to_bytes(lower(net)), x)).max() < 1e-5


def test_element_wise_pattern_that_is_no_known_activation_is_refused():
    # 2 * gelu(h) is not an activation codec knows: the region never matches, and the rescale Mul is refused
    with pytest.raises(LiftError, match="unsupported op|Gemm/MatMul/Conv") as err:
        lift(_gelu_graph(False, scale_after=2.0))
    assert err.value.op_type in ("Div", "Mul", "Erf")


class _PoolThen(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(2, 3, 3), act, nn.Linear(3 * 3 * 3, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.act(torch.max_pool2d(self.conv(x), 2)), 1))


def test_only_monotone_activations_move_across_max_pooling(tmp_path):
    torch.manual_seed(0)
    path, net = _lift_export(_PoolThen(nn.ELU()), (2, 8, 8), tmp_path, False, "elu")
    assert net.layers[0].activation.kind == "elu"  # moved onto the conv: ELU(alpha=1) is monotone
    assert _round_trip_error(path, net, (2, 8, 8)) < 1e-5
    path = export_torch(_PoolThen(nn.GELU()), torch.randn(2, 2, 8, 8), tmp_path / "gelu.onnx", False)
    with pytest.raises(LiftError, match="not monotone"):
        lift(path)


# -- convolutions, BatchNorm, Concat ---------------------------------------------------------------------


class _Branches(nn.Module):
    """Two branches concatenated, then a strided, dilated, padded grouped conv, ELU after a max pool."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 6, 1)
        self.g = nn.Conv2d(10, 10, 3, stride=2, padding=2, dilation=2, groups=2)
        self.fc = nn.Linear(10 * 2 * 2, 3)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), torch.sigmoid(self.b(x))], 1)
        return self.fc(torch.flatten(nn.functional.elu(nn.functional.max_pool2d(self.g(h), 2)), 1))


@pytest.mark.parametrize("dynamo", EXPORTERS, ids=EXPORTER_IDS)
def test_concat_and_grouped_strided_dilated_conv_round_trip(dynamo, tmp_path):
    torch.manual_seed(0)
    path, net = _lift_export(_Branches(), (3, 8, 8), tmp_path, dynamo)
    concat = next(layer for layer in net.layers if isinstance(layer, Concat))
    grouped = next(layer for layer in net.layers if isinstance(layer, Conv) and layer.groups == 2)
    assert len(net.inputs_of(concat.name)) == 2 and net.shape_map()[concat.name] == (10, 8, 8)
    assert grouped.strides == (2, 2) and grouped.dilations == (2, 2) and grouped.pads == (2, 2, 2, 2)
    owners, index = net.neuron_owners(concat.name)  # Concat neuron 4 + j is neuron j of the second branch
    assert list(index) == [0, 1, 2, 3, 0, 1, 2, 3, 4, 5] and len(set(owners[:4])) == len(set(owners[4:])) == 1
    assert _round_trip_error(path, net, (3, 8, 8)) < 1e-5
    with torch.no_grad():
        x = np.random.default_rng(0).standard_normal((8, 3, 8, 8)).astype(np.float32)
        assert np.abs(IRModule(net)(torch.from_numpy(x)).numpy() - run_onnx(path, x)).max() < 1e-5


def test_dne_leaves_grouped_convolutions_alone_with_a_reason(tmp_path):
    torch.manual_seed(0)
    module = _Branches()
    with torch.no_grad():
        module.a.bias[1] = -1e4  # a dead ReLU channel feeding the grouped conv
    _, net = _lift_export(module, (3, 8, 8), tmp_path, False)
    grouped = next(layer for layer in net.layers if isinstance(layer, Conv) and layer.groups == 2)
    assert "grouped convolution" in removal_blocker(net, grouped.name)
    with pytest.raises(ValueError, match="grouped convolution"):
        select_neurons(net.copy(), grouped.name, np.arange(9))
    cal = Calibration(np.random.default_rng(0).standard_normal((64, 3, 8, 8)).astype(np.float32))
    out, report = PassManager(parse_pipeline("dna{scope=member},dne")).run(EnsembleModule({"main": net}, cal))
    details = report["passes"][1]["details"]
    reasons = details["left_alone"]["main"]
    assert list(reasons) == ["a"] and "feed the grouped convolution" in reasons["a"]
    assert sum(details["removed_per_layer"]["main"].values()) == 0
    assert out.members["main"].num_parameters == net.num_parameters


class _ResidualNet(nn.Module):
    """A user's network: a BN stem, an identity residual block and a downsampling one (1x1 shortcut)."""

    def __init__(self, c=6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.d1, self.e1 = nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c)
        self.d2, self.e2 = nn.Conv2d(2 * c, 2 * c, 3, padding=1, bias=False), nn.BatchNorm2d(2 * c)
        self.short = nn.Sequential(nn.Conv2d(c, 2 * c, 1, stride=2, bias=False), nn.BatchNorm2d(2 * c))
        self.fc = nn.Linear(2 * c, 4)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(self.b2(self.c2(torch.relu(self.b1(self.c1(h))))) + h)
        h = torch.relu(self.e2(self.d2(torch.relu(self.e1(self.d1(h))))) + self.short(h))
        return torch.softmax(self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(h, 1), 1)), -1)


def residual_net(seed: int, dead_stem_channel: int | None = None) -> nn.Module:
    torch.manual_seed(seed)
    module = _ResidualNet()
    with torch.no_grad():
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):
            # non-trivial running statistics, so that folding BatchNorm is really exercised
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.3, 0.3)
        if dead_stem_channel is not None:
            k = dead_stem_channel
            module.stem[1].bias[k] = -1e4  # the stem's ReLU output is 0 on channel k ...
            module.b2.weight[k] = 0.0  # ... and so is the residual branch's (BN scale and shift 0)
            module.b2.bias[k] = 0.0
    return module.eval()


@pytest.mark.parametrize("dynamo", EXPORTERS, ids=EXPORTER_IDS)
def test_residual_network_with_batchnorm_round_trip(dynamo, tmp_path):
    path, net = _lift_export(residual_net(0), (3, 8, 8), tmp_path, dynamo)
    assert not net.is_chain and sum(isinstance(layer, Add) for layer in net.layers) == 2
    assert [len(g) for g in net.tied_groups()] == [3, 3]  # {stem, c2, add}, {d2, short, add}
    assert not any(type(layer).__name__ == "BatchNormalization" for layer in net.layers)
    assert _round_trip_error(path, net, (3, 8, 8)) < 1e-5
    x = np.random.default_rng(3).standard_normal((8, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        assert (
            np.abs(IRModule(net, probabilities=True)(torch.from_numpy(x)).numpy() - run_onnx(path, x)).max()
            < 1e-5
        )


def test_dne_removes_a_tied_channel_from_every_tied_layer_and_keeps_outputs(tmp_path):
    path, net = _lift_export(residual_net(0, dead_stem_channel=2), (3, 8, 8), tmp_path, False)
    stem, block = net.tied_groups()[0][0], net.tied_groups()[0]
    cal = Calibration(np.random.default_rng(0).standard_normal((200, 3, 8, 8)).astype(np.float32))
    out, report = PassManager(parse_pipeline("dna{scope=member},dne")).run(EnsembleModule({"main": net}, cal))
    new = out.members["main"]
    removed = report["passes"][1]["details"]["removed_per_layer"]["main"]
    assert all(removed[name] == 1 for name in block)
    widths = {name: new.layer(name).num_neurons for name in block}
    assert set(widths.values()) == {5}, widths
    assert report["passes"][1]["verified_max_abs_error"]["main"] <= 1e-6
    x = np.random.default_rng(5).standard_normal((32, 3, 8, 8)).astype(np.float32)
    assert np.abs(run_onnx(to_bytes(lower(new)), x) - run_onnx(path, x)).max() < 1e-6
    # a channel dead in the stem but alive in the residual branch is not dead for the tied group
    module = residual_net(0, dead_stem_channel=2)
    with torch.no_grad():
        module.b2.bias[2] = 0.5
    _, alive = _lift_export(module, (3, 8, 8), tmp_path, False, "alive")
    stats = profile(alive, cal.x)
    assert stats.layers[stem].always_zero[2]
    out, report = PassManager(parse_pipeline("dna{scope=member},dne")).run(
        EnsembleModule({"main": alive}, cal)
    )
    assert report["passes"][1]["details"]["removed_per_layer"]["main"][stem] == 0
    assert out.members["main"].layer(stem).num_neurons == 6


def test_user_residual_network_opt_and_fused_ensemble(tmp_path):
    from codec.ir.ensemble import emit_ensemble

    nets = {}
    for name, seed in (("main", 0), ("peer", 1)):
        _, nets[name] = _lift_export(residual_net(seed, dead_stem_channel=2), (3, 8, 8), tmp_path, True, name)
    cal = Calibration(np.random.default_rng(0).standard_normal((200, 3, 8, 8)).astype(np.float32))
    out, report = PassManager(parse_pipeline("dna,dne,nda,csne")).run(EnsembleModule(nets, cal))
    by_name = {r["pass"] if "pass" in r else r["name"]: r for r in report["passes"]}
    assert by_name["dne"]["verified_max_abs_error"]["main"] <= 1e-6
    assert by_name["nda"]["details"]["main"]["edges"] > 0
    csne = by_name["csne"]["details"]
    # CSNE shares only a leading chain; this network's stem already feeds a residual Add
    assert csne["csn_total"] == 0 and set(csne["left_alone"]) == {
        l.name for l in nets["main"].hidden_layers()
    }
    members = [out.members["main"], out.members["peer"]]
    ensemble = to_bytes(emit_ensemble(members, None, criterion="mean", member_outputs=True))
    x = np.random.default_rng(7).standard_normal((16, 3, 8, 8)).astype(np.float32)
    import onnxruntime as ort

    fused, m0, m1 = ort.InferenceSession(ensemble, providers=["CPUExecutionProvider"]).run(None, {"input": x})
    assert np.abs(m0 - run_onnx(to_bytes(lower(members[0])), x)).max() < 1e-6
    assert np.abs(fused - (m0 + m1) / 2).max() < 1e-6


def test_irmodule_trains_a_dag_and_writes_it_back(tmp_path):
    _, net = _lift_export(residual_net(0), (3, 8, 8), tmp_path, False)
    module = IRModule(net)
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 4, (8,))
    nn.functional.cross_entropy(module(x), y).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters() if p.numel())
    back = module.to_network()
    xs = x.numpy()
    assert np.abs(run_onnx(to_bytes(lower(back)), xs) - run_onnx(to_bytes(lower(net)), xs)).max() == 0


def test_zoo_resnet_lifts_as_a_dag_with_folded_batchnorm(tmp_path):
    from codec.models import build_model, get_recipe
    from codec.runtime.training.train import export_onnx

    recipe = get_recipe("resnet_s")
    module = recipe.build((1, 28, 28), 10, seed=0)
    path = export_onnx(module, tmp_path / "resnet.onnx", (1, 28, 28))
    net = lift(path)
    assert len(net.tied_groups()) == 3 and net.layers[-1].activation.kind == "softmax"
    assert _round_trip_error(path, net, (1, 28, 28), scale=1.0) < 1e-5
    full = build_model("resnet", (3, 32, 32), 10, seed=0)
    assert sum(p.numel() for p in full.parameters()) == 78042


# -- scikit-learn -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("zipmap", [True, False], ids=["zipmap", "no-zipmap"])
def test_skl2onnx_mlp_classifier_lifts_its_probabilities(zipmap, tmp_path, capsys):
    pytest.importorskip("skl2onnx")
    import warnings

    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.5).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf = MLPClassifier((7, 6), max_iter=200, random_state=0).fit(x, y)
        onx = to_onnx(clf, x[:1], options=None if zipmap else {id(clf): {"zipmap": False}})
    net = lift(onx.SerializeToString())
    assert [layer.num_neurons for layer in net.layers] == [7, 6, 3]
    assert net.layers[-1].activation.kind == "softmax"
    dropped = net.metadata["codec.lift.dropped"]
    assert "ArgMax" in dropped and "label" in dropped
    probabilities = run_onnx(to_bytes(lower(net)), x)
    assert np.abs(probabilities - clf.predict_proba(x)).max() < 1e-5
    import json

    from codec.cli import main

    path = tmp_path / "mlp.onnx"
    path.write_bytes(onx.SerializeToString())
    assert main(["inspect", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert any("label" in line and "ArgMax" in line for line in report["dropped"])
    assert any("ZipMap" in line for line in report["dropped"]) == zipmap


def test_compile_residual_recipe_end_to_end(tmp_path):
    """`codec compile` on the tiny residual recipe: members train, lift as DAGs, pass, grow, fuse; the fused
    graph equals the members combined outside it."""
    import json

    from codec.cli import main
    from codec.runtime.data import load_dataset
    from codec.runtime.evaluation.metrics import combine

    run_dir = tmp_path / "run"
    args = [
        "compile",
        "--recipe",
        "resnet_s",
        "--members",
        "3",
        "--epochs",
        "1",
        "--n-train",
        "300",
        "--n-test",
        "100",
        "--calibration",
        "200",
        "--threads",
        "1",
        "--quiet",
        "-o",
        str(run_dir),
    ]
    assert main(args) == 0
    report = json.loads((run_dir / "report.json").read_text())
    assert report["csn"]["total"] == 0  # CSNE leaves a ResNet's tied layers alone (docs/decisions.md)
    x = load_dataset("mnist_small").subset(None, 100, seed=0).x_test[:50]
    probs = np.stack(
        [run_onnx(run_dir / m, x) for m in ("opt/main.onnx", "opt/peer.onnx", "members/grown_1.onnx")]
    )
    assert not lift(run_dir / "members" / "grown_1.onnx").is_chain
    np.testing.assert_allclose(run_onnx(run_dir / "ensemble.onnx", x), combine(probs, "prod"), atol=1e-5)


def test_gelu_dropout_mlp_from_dynamo_through_the_passes_and_ensemble(tmp_path):
    """An MLP with GELU and Dropout, exported by the dynamo exporter: opt (dna,dne,nda,csne) and the fused
    ensemble, with a planted shared neuron so that CSNE has something to share."""
    from codec.ir.ensemble import emit_ensemble

    nets, modules = {}, {}
    for name, seed in (("main", 0), ("peer", 1)):
        torch.manual_seed(seed)
        module = nn.Sequential(
            nn.Linear(6, 10),
            nn.GELU(),
            nn.Dropout(0.2),
            nn.Linear(10, 8),
            nn.GELU(),
            nn.Linear(8, 3),
            nn.Softmax(-1),
        )
        if name == "peer":  # peer's first 4 hidden neurons are main's
            with torch.no_grad():
                module[0].weight[:4] = modules["main"][0].weight[:4]
                module[0].bias[:4] = modules["main"][0].bias[:4]
        modules[name] = module
        path = export_torch(module, torch.randn(2, 6), tmp_path / f"{name}.onnx", True)
        nets[name] = lift(path, name=name)
    assert [layer.activation.kind for layer in nets["main"].layers] == ["gelu", "gelu", "softmax"]
    cal = Calibration(np.random.default_rng(0).standard_normal((500, 6)).astype(np.float32))
    out, _ = PassManager(parse_pipeline("dna,dne,nda,csne{fire=0.95,corr=0.99}")).run(
        EnsembleModule(nets, cal)
    )
    assert out.csn.sizes[nets["main"].layers[0].name] >= 4
    members = [out.members["main"], out.members["peer"]]
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((32, 6)).astype(np.float32)
    session = ort.InferenceSession(
        to_bytes(emit_ensemble(members, out.csn.network, criterion="mean", member_outputs=True)),
        providers=["CPUExecutionProvider"],
    )
    fused, m0, m1 = session.run(None, {session.get_inputs()[0].name: x})
    assert np.abs(m1 - run_onnx(to_bytes(lower(nets["peer"])), x)).max() < 1e-5
    assert np.abs(fused - (m0 + m1) / 2).max() < 1e-6
