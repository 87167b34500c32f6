"""`codec export`: checks, parity against the members, the deployable model (single file or external data)
and its model card; one-line errors with exit status 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import run_onnx

from codec import cli
from codec.ir import Activation, Dense, NetworkIR, Role, lower, save_model
from codec.ir.ensemble import MEMBERS_KEY, emit_ensemble
from codec.runtime.evaluation.metrics import combine

RELU = Activation("relu")


@pytest.fixture(autouse=True)
def export_registered(monkeypatch):
    """The lead lists commands in codec.cli.COMMAND_MODULES; make sure `export` is there for these tests."""
    if "export" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", [*cli.COMMAND_MODULES, "export"])


def _normal(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _members(rng, n_inputs: int, csn_neurons: int = 5, count: int = 3):
    """`count` MLPs (n_inputs -> 12 -> 8 -> 4, softmax) whose fc1 starts with the same CSN neurons, the
    CSN as a network, and one independent member."""
    csn_w, csn_b = _normal(rng, csn_neurons, n_inputs, scale=0.1), _normal(rng, csn_neurons, scale=0.1)
    csn = NetworkIR("csn", "input", "csn", (n_inputs,), [Dense("fc1", csn_w, csn_b, RELU)])
    members = []
    for i in range(count):
        w1, b1 = _normal(rng, 12, n_inputs, scale=0.1), _normal(rng, 12, scale=0.1)
        w1[:csn_neurons], b1[:csn_neurons] = csn_w, csn_b
        roles = np.zeros(12, np.int8)
        roles[:csn_neurons] = Role.FROZEN_SHARED
        members.append(
            NetworkIR(
                f"m{i}",
                "input",
                "output",
                (n_inputs,),
                [
                    Dense("fc1", w1, b1, RELU, roles=roles),
                    Dense("fc2", _normal(rng, 8, 12, scale=0.5), _normal(rng, 8, scale=0.1), RELU),
                    Dense("out", _normal(rng, 4, 8), _normal(rng, 4, scale=0.1), Activation("softmax")),
                ],
            )
        )
    independent = NetworkIR(
        "peer",
        "input",
        "output",
        (n_inputs,),
        [
            Dense("fc1", _normal(rng, 7, n_inputs, scale=0.1), _normal(rng, 7, scale=0.1), RELU),
            Dense("out", _normal(rng, 4, 7), _normal(rng, 4, scale=0.1), Activation("softmax")),
        ],
    )
    return [*members, independent], csn


@pytest.fixture
def ensemble(tmp_path):
    """ensemble.onnx (prod, with member outputs) and its members under members/, listed in its metadata."""
    members, csn = _members(np.random.default_rng(0), 20)
    paths = [save_model(lower(m), tmp_path / "members" / f"{m.name}.onnx") for m in members]
    metadata = {MEMBERS_KEY: json.dumps([f"members/{p.name}" for p in paths])}
    model = emit_ensemble(members, csn, criterion="prod", member_outputs=True, metadata=metadata)
    return save_model(model, tmp_path / "ensemble.onnx"), paths, members


def export(args, capsys) -> tuple[int, str, str]:
    code = cli.main(["export", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_export_checks_parity_and_writes_model_and_card(ensemble, tmp_path, capsys):
    path, member_files, _ = ensemble
    deploy = tmp_path / "deploy" / "model.onnx"
    code, out, err = export([path, "-o", deploy, "--json"], capsys)
    assert code == 0, err
    card = json.loads(out)
    assert deploy.is_file() and not (deploy.parent / "model.onnx.data").exists()
    on_disk = json.loads((deploy.parent / "model.card.json").read_text())
    assert on_disk == {k: v for k, v in card.items() if k != "card"}
    # parity: against the member files from the metadata, random inputs by default
    parity = card["parity"]
    assert parity["reference"] == "member models" and parity["members_from"] == "codec.members metadata"
    assert [p.split("/")[-1] for p in parity["member_files"]] == [p.name for p in member_files]
    assert 0 <= parity["max_abs_error"] <= 1e-5 and parity["atol"] == 1e-5
    assert parity["data"] == {"source": "uniform [0, 1)", "seed": 0, "examples": 256}
    assert max(parity["member_max_abs_error"]) <= 1e-5
    assert parity["written_max_abs_error"] == 0.0  # the written file computes what was checked
    # the card describes the model
    assert card["criterion"] == "prod" and card["task"] == "classification"
    assert card["members"] == ["m0", "m1", "m2", "peer"]
    assert card["shared_layers"] == [1, 1, 1, 0] and card["csn"] == [{"layer": "fc1", "neurons": 5}]
    assert card["file_size_bytes"] == deploy.stat().st_size
    assert card["opset"] == {"ai.onnx": 18}
    assert card["inputs"] == [{"name": "input", "shape": ["batch", 20], "dtype": "float32"}]
    assert [o["name"] for o in card["outputs"]] == ["output", "member_0", "member_1", "member_2", "member_3"]
    assert card["outputs"][0]["shape"] == ["batch", 4]
    params = card["parameters"]
    assert (
        params["total_stored"] == params["initializer_elements"] - 5
    )  # prod's collect-stage constants aside
    assert params["total_stored"] < params["unshared"]
    from codec.version import __version__

    assert card["codec_version"] == __version__
    # the deployable model computes the ensemble, and records the parity it passed
    x = np.random.default_rng(3).random((30, 20), dtype=np.float32)
    expected = combine(np.stack([run_onnx(p, x) for p in member_files]), "prod")
    np.testing.assert_allclose(run_onnx(deploy, x), expected, atol=1e-5)
    from codec.ir.lift import load_model

    deployed = load_model(deploy)
    assert (
        json.loads(deployed.metadata_props["codec.deploy"])["parity_max_abs_error"] == parity["max_abs_error"]
    )


def test_tampered_member_fails_parity_with_exit_2(ensemble, tmp_path, capsys):
    path, member_files, members = ensemble
    tampered = members[1].copy()
    tampered.layer("fc2").weight[0, 0] += 0.5
    save_model(lower(tampered), member_files[1])
    deploy = tmp_path / "deploy.onnx"
    code, _, err = export([path, "-o", deploy], capsys)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("codec export: error: parity failed")
    assert "member 1 (m1.onnx)" in err
    assert not deploy.exists() and not (tmp_path / "deploy.card.json").exists()


def test_external_data_and_reexport_of_an_external_data_model(ensemble, tmp_path, capsys):
    path, member_files, _ = ensemble
    deploy = tmp_path / "ext" / "deploy.onnx"
    card_path = tmp_path / "card.json"
    code, _, err = export(
        [path, "-o", deploy, "--external-data", "--card", card_path, "--samples", 32, "--seed", 7], capsys
    )
    assert code == 0, err
    data = deploy.parent / "deploy.onnx.data"
    assert data.is_file() and data.stat().st_size > 0
    card = json.loads(card_path.read_text())
    assert card["external_data"] == "deploy.onnx.data"
    assert card["file_size_bytes"] == deploy.stat().st_size + data.stat().st_size
    assert card["parity"]["data"] == {"source": "uniform [0, 1)", "seed": 7, "examples": 32}
    x = np.random.default_rng(4).random((16, 20), dtype=np.float32)
    np.testing.assert_allclose(run_onnx(deploy, x), run_onnx(path, x), atol=0)
    # a model with external data is a valid source too (members given explicitly: its folder has none)
    single = tmp_path / "single.onnx"
    code, _, err = export([deploy, "-o", single, "--members", *member_files], capsys)
    assert code == 0, err
    assert not (tmp_path / "single.onnx.data").exists()
    np.testing.assert_allclose(run_onnx(single, x), run_onnx(path, x), atol=0)


def test_explicit_members_and_dataset_inputs(tmp_path, capsys):
    members, csn = _members(np.random.default_rng(1), 784, count=2)
    paths = [save_model(lower(m), tmp_path / f"{m.name}.onnx") for m in members]
    path = save_model(emit_ensemble(members, csn, criterion="vote"), tmp_path / "ens.onnx")
    code, out, err = export(
        [
            path,
            "-o",
            tmp_path / "d.onnx",
            "--members",
            *paths,
            "--data",
            "mnist_small",
            "--limit",
            64,
            "--json",
        ],
        capsys,
    )
    assert code == 0, err
    card = json.loads(out)
    assert card["criterion"] == "vote"
    assert card["parity"]["data"] == {"source": "mnist_small", "split": "test", "examples": 64}
    assert card["parity"]["members_from"] == "--members" and "member_max_abs_error" not in card["parity"]
    assert card["parity"]["max_abs_error"] < 1e-7  # vote fractions: float32 vs float64 thirds only


def test_parity_on_in_graph_member_outputs_and_missing_members(tmp_path, capsys):
    members, csn = _members(np.random.default_rng(2), 20, count=2)
    with_outputs = save_model(
        emit_ensemble(members, csn, criterion="max", member_outputs=True), tmp_path / "a.onnx"
    )
    code, out, err = export([with_outputs, "-o", tmp_path / "a_deploy.onnx", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["parity"]["reference"].startswith("member outputs inside the fused graph")
    bare = save_model(emit_ensemble(members, csn, criterion="max"), tmp_path / "b.onnx")
    code, out, err = export([bare, "-o", tmp_path / "b_deploy.onnx"], capsys)
    assert code == 2 and "no members to check b.onnx against" in err and err.count("\n") == 1


def test_errors_are_one_line(ensemble, tmp_path, capsys):
    path, member_files, members = ensemble
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(path.read_bytes()[:100])
    code, _, err = export([broken, "-o", tmp_path / "x.onnx"], capsys)
    assert code == 2 and err.count("\n") == 1 and "broken.onnx" in err
    plain = save_model(lower(members[0]), tmp_path / "plain.onnx")  # not a codec ensemble: no criterion known
    code, _, err = export([plain, "-o", tmp_path / "x.onnx", "--members", member_files[0]], capsys)
    assert code == 2 and "give --criterion" in err
    code, _, err = export(
        [plain, "-o", tmp_path / "x.onnx", "--members", member_files[0], "--criterion", "mean"], capsys
    )
    assert code == 0, err  # one member "combined" by mean is itself
    code, _, err = export([path, "-o", tmp_path / "x.onnx", "--members", member_files[0]], capsys)
    assert code == 2 and "has 4 members but 1 member files" in err
    code, _, err = export([path, "-o", tmp_path / "x.onnx", "--data", "mnist_small", "--limit", 8], capsys)
    assert code == 2 and "expects [20]" in err
    code, _, err = export(
        [path, "-o", tmp_path / "x.onnx", "--members", *member_files[:3], tmp_path / "missing.onnx"], capsys
    )
    assert code == 2 and "missing.onnx" in err and err.count("\n") == 1


def test_members_metadata_round_trips_relative_to_the_ensemble(tmp_path):
    # members_metadata writes what member_files reads, wherever the ensemble sits relative to its members
    from codec.ir.ensemble import member_files, members_metadata

    members, csn = _members(np.random.default_rng(0), 20)
    files = [tmp_path / "run" / "opt" / "main.onnx", tmp_path / "run" / "members" / "grown_1.onnx"]
    for ensemble_file in (tmp_path / "run" / "ensemble.onnx", tmp_path / "elsewhere" / "deep" / "e.onnx"):
        model = emit_ensemble(
            members[:2], csn, criterion="mean", metadata=members_metadata(files, ensemble_file)
        )
        assert [p.resolve() for p in member_files(model, ensemble_file)] == [f.resolve() for f in files]
        assert all(not p.startswith("/") for p in json.loads(model.metadata_props[MEMBERS_KEY]))
    assert member_files(emit_ensemble(members[:2], csn, criterion="mean"), tmp_path / "e.onnx") is None


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"main": "members/main.onnx"}', "not a list of paths"),
        ('["/etc/m.onnx"]', "absolute path"),
        ("[", "not JSON"),
    ],
)
def test_malformed_members_metadata_is_one_line(tmp_path, text, message):
    from codec.errors import ModelLoadError
    from codec.ir.ensemble import member_files

    members, csn = _members(np.random.default_rng(0), 20)
    model = emit_ensemble(members[:2], csn, criterion="mean", metadata={MEMBERS_KEY: text})
    with pytest.raises(ModelLoadError, match=message):
        member_files(model, tmp_path / "e.onnx")
