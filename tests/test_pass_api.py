"""The pass API's contracts: abstract methods, explicit roles, option checking and types, the in-place /
functional contract, module preconditions, the IR verifier, transitive invalidation, instrumentation,
passes from files and module references, and the `import codec` API."""

from __future__ import annotations

import enum
import json
import subprocess
import sys
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pytest
from test_passes import planted_pair

from codec.errors import CodecError, ConfigError
from codec.ir import NetworkIR, Role
from codec.ir.verify import IRVerificationError, fingerprint, verify_network
from codec.passes import registry
from codec.passes.activations import ActivationAnalysis
from codec.passes.base import (
    Analysis,
    AnalysisManagerProtocol,
    Calibration,
    EnsembleModule,
    PassError,
    PassResult,
    Transform,
)
from codec.passes.csne import CommonSubNetworkExtraction
from codec.passes.dna import DeadNeuronAnalysis
from codec.passes.manager import AnalysisManager, Instrumentation, PassManager
from codec.passes.nda import NeuronDependenceAnalysis
from codec.passes.registry import parse_pipeline, register_pass


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Passes registered by a test are forgotten after it."""
    monkeypatch.setattr(registry, "_USER", dict(registry._USER))
    monkeypatch.setattr(registry, "_plugin_files", dict(registry._plugin_files))


@pytest.fixture
def pair():
    main, peer, *_ = planted_pair(np.random.default_rng(0))
    return main, peer


@pytest.fixture
def calibration():
    return Calibration(np.random.default_rng(7).standard_normal((600, 20)).astype(np.float32), batch_size=256)


# --- 1. abstract methods, a Protocol, explicit roles, options checked when built -------------------------


def test_missing_run_or_compute_fails_at_definition_use():
    @dataclass(frozen=True)
    class NoRun(Transform):
        name = "norun"

    @dataclass(frozen=True)
    class NoCompute(Analysis):
        name = "nocompute"

    with pytest.raises(TypeError, match="abstract"):
        NoRun()
    with pytest.raises(TypeError, match="abstract"):
        NoCompute()


def test_analysis_manager_satisfies_the_protocol():
    assert getattr(AnalysisManagerProtocol, "_is_protocol", False)
    assert isinstance(AnalysisManager(), AnalysisManagerProtocol)


def test_main_and_peer_are_named_not_ordered(pair, calibration):
    main, peer = pair
    module = EnsembleModule({"peer": peer, "main": main}, calibration)  # peer first in dict order
    assert module.main is main and module.peer is peer
    out, _ = PassManager(parse_pipeline("nda{fire=0.0},csne{fire=0.99,corr=0.99}")).run(module)
    assert out.members["peer"] is peer  # csne rewrote main, not the first member
    assert (out.members["main"].layer("fc1").roles[:10] == Role.FROZEN_SHARED).all()
    explicit = EnsembleModule({"a": peer, "b": main}, calibration, main_name="b", peer_name="a")
    assert explicit.main is main and explicit.replace(csn=None).peer_name == "a"
    of = EnsembleModule.of(main, calibration.x, peer=peer)
    assert (of.main_name, of.peer_name) == ("main", "peer")
    alone = EnsembleModule.of(main, calibration.x, others={"extra": peer})
    assert alone.peer_name is None and not alone.has_peer  # an extra member is not a peer
    with pytest.raises(ConfigError, match="not among the members"):
        EnsembleModule({"main": main}, calibration, peer_name="peer")


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: CommonSubNetworkExtraction(fire=2), "csne: option fire=2 is impossible"),
        (lambda: CommonSubNetworkExtraction(max_iter=0), "at least 1"),
        (
            lambda: DeadNeuronAnalysis(scope="everything"),
            "scope='everything' is not a valid intersect|member",
        ),
        (lambda: NeuronDependenceAnalysis(fire="0.5"), "is not a valid float"),
        (lambda: CommonSubNetworkExtraction(preds=1), "is not a valid bool"),
    ],
)
def test_options_are_checked_when_a_pass_is_built_in_python(build, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|")):
        build()


# --- 6. option types ---------------------------------------------------------------------------------------


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


@dataclass(frozen=True)
class Typed(Analysis):
    name = "typed"
    limit: int | None = None
    sizes: tuple[int, ...] = ()
    span: tuple[float, float] = (0.0, 1.0)
    colour: Colour = Colour.RED
    mode: Literal["a", "b"] | None = None

    def compute(self, module, am):
        return None


@pytest.fixture
def typed():
    return register_pass(Typed)


def test_option_types_are_parsed(typed):
    (p,) = parse_pipeline("typed{limit=5,sizes=(64,32),span=[0.25,0.5],colour=green,mode=b}")
    assert p == Typed(limit=5, sizes=(64, 32), span=(0.25, 0.5), colour=Colour.GREEN, mode="b")
    assert isinstance(p.limit, int) and isinstance(p.sizes[0], int)
    (q,) = parse_pipeline("typed{limit=none,sizes=(),mode=none}")
    assert q == Typed()
    for instance in (p, q):
        assert parse_pipeline(instance.spec()) == [instance]  # spec() round-trips


@pytest.mark.parametrize(
    "text, message",
    [
        ("typed{limit=five}", "limit='five' is not a valid int or none"),
        ("typed{sizes=64}", "write a tuple in parentheses"),
        ("typed{sizes=(1,x)}", "element 'x' is not a valid int"),
        ("typed{span=(1,2,3)}", "has 3 elements"),
        ("typed{colour=blue}", "choose one of RED, GREEN"),
        ("typed{mode=c}", "is not a valid a|b or none"),
    ],
)
def test_bad_option_values_are_one_line(typed, text, message):
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("(", r"\(")):
        parse_pipeline(text)


def test_an_option_type_text_cannot_spell_is_refused():
    @register_pass
    @dataclass(frozen=True)
    class Odd(Analysis):
        name = "odd"
        table: frozenset = frozenset()

        def compute(self, module, am):
            return None

    with pytest.raises(ConfigError, match="pipeline text cannot spell"):
        parse_pipeline("odd{table=x}")


# --- 2. the in-place / functional contract; `modified` ------------------------------------------------------


def _zero_first_neuron(net: NetworkIR) -> None:
    net.layer("fc1").weight[0] = 0.0
    net.layer("fc1").bias[0] = 0.0


@dataclass(frozen=True)
class EditsItsInput(Transform):
    """Claims to be functional and function-preserving, but edits its input members (and their function)."""

    name = "edits_input"
    verify_function = True

    def run(self, module, am):
        _zero_first_neuron(module.members["main"])
        return PassResult(module, True)


@dataclass(frozen=True)
class EditsInPlace(EditsItsInput):
    name = "edits_in_place"
    in_place = True


def test_a_functional_transform_that_edits_its_input_is_caught(pair, calibration):
    main, _ = pair
    module = EnsembleModule({"main": main}, calibration)
    with pytest.raises(PassError, match="'edits_input' changed its input member.*'main'.*in_place = False"):
        PassManager([EditsItsInput()]).run(module)


def test_an_in_place_transform_is_verified_against_the_members_before_it(pair, calibration):
    main, _ = pair
    module = EnsembleModule({"main": main}, calibration)
    with pytest.raises(PassError, match="verification failed after pass 'edits_in_place'"):
        PassManager([EditsInPlace()]).run(module)


@dataclass(frozen=True)
class QuietChange(Transform):
    name = "quiet_change"

    def run(self, module, am):
        new = module.members["main"].copy()
        _zero_first_neuron(new)
        return PassResult(module.replace(members={**module.members, "main": new}), False)


def test_modified_false_with_a_changed_module_is_refused(pair, calibration):
    module = EnsembleModule({"main": pair[0]}, calibration)
    with pytest.raises(PassError, match="returned modified=False but changed main"):
        PassManager([QuietChange()]).run(module)


def test_csne_with_an_empty_csn_reports_a_modification(calibration):
    rng = np.random.default_rng(5)
    main, _, *_ = planted_pair(rng)
    unrelated, _, *_ = planted_pair(np.random.default_rng(6))
    unrelated.name = "peer"
    out, report = PassManager(parse_pipeline("csne{fire=0.99,corr=0.99}")).run(
        EnsembleModule({"main": main, "peer": unrelated}, calibration)
    )
    record = report["passes"][0]
    assert out.csn is not None and out.csn.total == 0
    assert record["modified"] is True and "invalidated" in record


# --- 3. module preconditions --------------------------------------------------------------------------------


def test_csne_without_a_peer_refuses_before_profiling(pair, calibration, monkeypatch):
    profiled = []
    real = ActivationAnalysis.compute
    monkeypatch.setattr(
        ActivationAnalysis, "compute", lambda self, m, am: profiled.append(1) or real(self, m, am)
    )
    with pytest.raises(PassError, match="^csne needs two members"):
        PassManager(parse_pipeline("dna,dne,nda,csne")).run(EnsembleModule({"main": pair[0]}, calibration))
    assert profiled == []


# --- 4. the IR verifier -------------------------------------------------------------------------------------


def test_verify_network_names_each_broken_invariant(pair):
    main, _ = pair
    verify_network(main)
    main.verify()
    broken = main.copy()
    broken.layer("fc2").weight = broken.layer("fc2").weight[:, :15]  # reads 15 features of fc1's 16
    with pytest.raises(IRVerificationError, match="'fc2'.*reads 15 features, the layer before gives 16"):
        verify_network(broken)
    broken = main.copy()
    broken.layer("fc1").roles = broken.layer("fc1").roles[:3]
    broken.layer("out").weight[0, 0] = np.nan
    broken.layers[1].name = "fc1"
    with pytest.raises(IRVerificationError) as info:
        verify_network(broken)
    message = str(info.value)
    assert "3 roles for 16 neurons" in message and "1 non-finite weight" in message
    assert "the name is used by an earlier layer" in message and "\n" not in message


@dataclass(frozen=True)
class BreaksShapes(Transform):
    name = "breaks_shapes"

    def run(self, module, am):
        new = module.members["main"].copy()
        new.layer("fc1").weight = new.layer("fc1").weight[:, :-1]
        return PassResult(module.replace(members={**module.members, "main": new}), True)


def test_a_transform_that_leaves_invalid_ir_is_caught(pair, calibration):
    module = EnsembleModule({"main": pair[0]}, calibration)
    with pytest.raises(PassError, match="pass 'breaks_shapes' left invalid IR: network 'main'.*'fc1'"):
        PassManager([BreaksShapes()]).run(module)


def test_fingerprint_sees_weights_and_roles(pair):
    main, _ = pair
    copy = main.copy()
    assert fingerprint(copy) == fingerprint(main)
    copy.layer("fc2").roles[0] = Role.FROZEN_SHARED
    assert fingerprint(copy) != fingerprint(main)


# --- 5. transitive invalidation, instrumentation ------------------------------------------------------------

computed: list[str] = []


@dataclass(frozen=True)
class Base(Analysis):
    name = "base_count"

    def compute(self, module, am):
        computed.append(self.name)
        return len(computed)


@dataclass(frozen=True)
class Derived(Analysis):
    name = "derived_count"

    def compute(self, module, am):
        computed.append(self.name)
        return am.get(Base, module) * 10


@dataclass(frozen=True)
class KeepsDerivedOnly(Transform):
    """Modifies the module and claims Derived still holds, but not Base, which Derived read."""

    name = "keeps_derived"
    preserves = (Derived,)

    def run(self, module, am):
        return PassResult(module.replace(members={k: v.copy() for k, v in module.members.items()}), True)


def test_invalidation_follows_what_an_analysis_read(pair, calibration):
    computed.clear()
    module = EnsembleModule({"main": pair[0]}, calibration)
    pm = PassManager([Derived(), KeepsDerivedOnly(), Derived()])
    _, report = pm.run(module)
    assert pm.analyses.reads(Derived) == {Base}
    assert sorted(report["passes"][1]["invalidated"]) == ["base_count", "derived_count"]
    assert computed == ["derived_count", "base_count", "derived_count", "base_count"]
    assert pm.results["derived_count"] == 40  # Base recomputed (4 computations so far) after the transform


def test_update_drops_the_results_computed_from_the_old_one(pair, calibration):
    computed.clear()
    module = EnsembleModule({"main": pair[0]}, calibration)
    am = AnalysisManager()
    am.get(Derived, module)
    am.update(Base, 100)
    assert not am.cached(Derived) and am.get(Derived, module) == 1000


def test_instrumentation_hooks_see_passes_and_analyses(pair, calibration):
    events = []

    class Recorder(Instrumentation):
        def before_pass(self, p, module):
            events.append(("before", p.name))

        def after_pass(self, p, module, record):
            events.append(("after", p.name))

        def after_analysis(self, analysis, module):
            events.append(("computed", analysis.name))

    computed.clear()
    module = EnsembleModule({"main": pair[0]}, calibration)
    _, report = PassManager([Derived()], instrumentations=[Recorder()]).run(module)
    assert events == [
        ("before", "derived_count"),
        ("computed", "base_count"),
        ("computed", "derived_count"),
        ("after", "derived_count"),
    ]
    assert [t["analysis"] for t in report["passes"][0]["analyses_computed"]] == [
        "base_count",
        "derived_count",
    ]


# --- 7. passes from a file and from a module reference ------------------------------------------------------

PLUGIN = '''
from dataclasses import dataclass
from codec.passes.base import Analysis
from codec.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class CountLayers(Analysis):
    """How many hidden layers each member has."""
    name = "count_layers"
    scale: int = 1

    def compute(self, module, am):
        return {m: self.scale * len(n.hidden_layers()) for m, n in module.members.items()}

    def summarize(self, result):
        return result
'''


def test_plugin_file_registers_its_passes(tmp_path, pair, calibration):
    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN)
    assert registry.load_plugin_file(path) == ["count_layers"]
    assert registry.load_plugin_file(path) == ["count_layers"]  # loading again is harmless
    (p,) = parse_pipeline("count_layers{scale=3}")
    _, report = PassManager([p]).run(EnsembleModule({"main": pair[0]}, calibration))
    assert report["passes"][0]["details"] == {"main": 6}


@pytest.mark.parametrize(
    "source, message",
    [
        ("raise RuntimeError('boom')", "line 1: RuntimeError: boom"),
        ("x = 1", "registers no pass"),
        (PLUGIN.replace('"count_layers"', '"dna"'), "'dna', which is a built-in pass name"),
        (PLUGIN.replace("@register_pass\n", ""), r"registers no pass \(CountLayers not decorated\)"),
    ],
)
def test_bad_plugin_files_are_one_line(tmp_path, source, message):
    path = tmp_path / "bad.py"
    path.write_text(source)
    with pytest.raises(ConfigError, match=message):
        registry.load_plugin_file(path)


def test_two_plugin_files_cannot_share_a_pass_name(tmp_path):
    (tmp_path / "a.py").write_text(PLUGIN)
    (tmp_path / "b.py").write_text(PLUGIN)
    registry.load_plugin_file(tmp_path / "a.py")
    with pytest.raises(ConfigError, match="two passes are named 'count_layers'"):
        registry.load_plugin_file(tmp_path / "b.py")


def test_module_reference_in_a_pipeline(tmp_path, monkeypatch):
    (tmp_path / "ref_passes.py").write_text(PLUGIN.replace("@register_pass\n", "") + "\nNOT_A_PASS = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    (p,) = parse_pipeline("ref_passes:CountLayers{scale=2}")
    assert p.name == "count_layers" and p.scale == 2
    assert parse_pipeline("count_layers")[0] == p.__class__()  # registered under its name from now on
    for text, message in [
        ("no_such_module_xyz:Pass", "cannot import module 'no_such_module_xyz'"),
        ("ref_passes:Missing", "has no 'Missing'; its passes: CountLayers"),
        ("ref_passes:NOT_A_PASS", "is not a codec Pass subclass"),
        ("codec.passes.base:Transform", "is abstract"),
        (":X", "must be written module.path:ClassName"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_pipeline(text)


def test_codec_opt_plugin_flag(tmp_path):
    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN)
    listed = subprocess.run(
        [sys.executable, "-m", "codec", "opt", "--plugin", str(path), "--list-passes", "--json"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert listed.returncode == 0, listed.stderr
    entry = next(p for p in json.loads(listed.stdout)["passes"] if p["name"] == "count_layers")
    assert entry["kind"] == "analysis" and entry["options"] == [
        {"name": "scale", "default": 1, "type": "int"}
    ]
    assert entry["origin"] == str(path.resolve())
    bad = subprocess.run(
        [sys.executable, "-m", "codec", "opt", "--plugin", str(tmp_path / "nope.py"), "x.onnx"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr and "Traceback" not in bad.stderr


# --- 8. the Python API --------------------------------------------------------------------------------------


def test_import_codec_is_light_and_exposes_the_api():
    probe = (
        "import sys, codec, codec.errors;"
        "heavy = [m for m in ('numpy', 'onnx', 'onnxruntime', 'torch') if m in sys.modules]; print(heavy);"
        "from codec import lift, lower, save_model, PassManager, parse_pipeline, optimize, emit_ensemble;"
        "print(sorted(set(codec.__all__) - set(dir(codec))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=False, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "[]"]


def test_optimize_runs_a_pipeline_on_members(pair, calibration):
    import codec

    main, peer = pair
    module, report = codec.optimize(
        main, peer, passes="nda{fire=0.0},csne{fire=0.99,corr=0.99}", data=calibration.x
    )
    assert module.csn.sizes == {"fc1": 10, "fc2": 8}
    assert report["calibration"] == {"data": "array", "split": None, "inputs": 600}
    with pytest.raises(CodecError, match="csne needs two members"):
        codec.optimize(main, passes="csne", data=calibration.x)
    with pytest.raises(CodecError, match="must be a NetworkIR or an ONNX file path"):
        codec.optimize(3, data=calibration.x)


def test_codec_compile_loads_plugins_before_anything_runs(tmp_path, capsys):
    from codec.cli import main

    path = tmp_path / "my_plugin.py"
    path.write_text(PLUGIN)
    out = tmp_path / "run"
    args = ["compile", "--recipe", "classifier_s", "--members", "3", "-o", str(out), "--quiet"]
    assert main([*args, "--plugin", str(tmp_path / "missing.py")]) == 2
    assert "plugin file" in capsys.readouterr().err
    # the plugin's pass is known to the pipeline check; the misspelt one fails it, before any training
    assert main([*args, "--plugin", str(path), "--passes", "dna,count_layers,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown pass 'nope'" in err and "count_layers" in err
    assert not (out / "members").exists()
