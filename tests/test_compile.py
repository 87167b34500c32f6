"""`codec compile` end to end on the bundled MNIST: fused graph = members combined outside it, the CSN
stored once, M matches the graph's parameter count, and an interrupted run resumes without retraining."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import run_onnx
from onnx import numpy_helper

from codec.cli import main
from codec.runtime.data import load_dataset
from codec.runtime.evaluation.metrics import combine

SMALL = [
    "--recipe",
    "classifier_s",
    "--epochs",
    "3",
    "--n-train",
    "1500",
    "--n-test",
    "400",
    "--threads",
    "1",
    "--calibration",
    "1000",
    "--quiet",
]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("compile") / "run"
    assert (
        main(
            [
                "compile",
                *SMALL,
                "--members",
                "4",
                "-o",
                str(run_dir),
                "--passes",
                "dna,dne,nda,csne{fire=0.7,corr=0.7}",
            ]
        )
        == 0
    )
    return run_dir, json.loads((run_dir / "report.json").read_text())


def test_fused_graph_equals_members_combined(compiled):
    run_dir, report = compiled
    data = load_dataset("mnist_small").subset(None, 400, seed=0)
    x = data.x_test[:200]
    members = ["opt/main.onnx", "opt/peer.onnx", "members/grown_1.onnx", "members/grown_2.onnx"]
    probs = np.stack([run_onnx(run_dir / m, x) for m in members])
    fused = run_onnx(run_dir / "ensemble.onnx", x)
    np.testing.assert_allclose(fused, combine(probs, "prod"), atol=1e-5)
    assert report["quality"]["accuracy"] > 0.8
    assert len(report["quality"]["members"]) == 4


def test_compile_then_export_checks_parity_against_the_run_members(compiled, tmp_path, capsys):
    # the README's step 5: the members named in the ensemble's metadata are the ones its graph computes
    run_dir, _ = compiled
    assert (
        main(
            [
                "export",
                str(run_dir / "ensemble.onnx"),
                "-o",
                str(tmp_path / "deploy.onnx"),
                "--data",
                "mnist_small",
                "--limit",
                "200",
                "--json",
            ]
        )
        == 0
    ), capsys.readouterr().err
    parity = json.loads(capsys.readouterr().out)["parity"]
    assert parity["members_from"] == "codec.members metadata" and parity["max_abs_error"] <= 1e-5
    named = [Path(p).relative_to(run_dir.resolve()).as_posix() for p in parity["member_files"]]
    assert named == ["opt/main.onnx", "opt/peer.onnx", "members/grown_1.onnx", "members/grown_2.onnx"]


def test_csn_stored_once_and_footprint_matches_graph(compiled):
    run_dir, report = compiled
    assert report["csn"]["total"] > 0, "a CSN was found on real data with these thresholds"
    model = onnx.load(str(run_dir / "ensemble.onnx"))
    # the collect stage's constants (collect/*) are not parameters
    arrays = [numpy_helper.to_array(t) for t in model.graph.initializer if not t.name.startswith("collect/")]
    stored = sum(a.size for a in arrays)
    assert stored == report["parameters"]["fused_graph_stored"]
    assert report["memory_footprint_M"] == pytest.approx(
        stored / (4 * report["parameters"]["conventional_member"])
    )
    assert report["memory_footprint_M"] < 1.0
    digests = [hashlib.sha256(a.tobytes()).hexdigest() for a in arrays if a.size > 16]
    assert len(digests) == len(set(digests)), "no weight tensor is stored twice"


def test_report_fields(compiled):
    _, report = compiled
    t = report["time"]
    assert len(t["grow"]) == 2 and t["passes"] > 0 and t["train_main"] > 0
    assert 0 <= report["quality"]["redundancy"] <= 1
    assert set(report["options"]["grow"]) == {"init", "lr_scale", "cache", "cache_limit_mb"}
    # the two grown members trained as one stacked unit around the frozen CSN
    grown = [report["training"][name] for name in ("grown_1", "grown_2")]
    assert all(g["stacked"] and g["unstacked_reason"] is None for g in grown)
    assert grown[0]["trained_with"] == ["grown_1", "grown_2"]


def test_member_outputs_in_compile_and_export(compiled, tmp_path):
    """--member-outputs on a resumed copy of the run (only the emit step reruns): each member_i output is that
    member's own model's output, report.json names them, and `codec export` keeps them."""
    import shutil

    source, _ = compiled
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    passes = ["--passes", "dna,dne,nda,csne{fire=0.7,corr=0.7}"]
    assert (
        main(
            ["compile", *SMALL, "--members", "4", "-o", str(run_dir), *passes, "--resume", "--member-outputs"]
        )
        == 0
    )
    report = json.loads((run_dir / "report.json").read_text())
    names = ["main", "peer", "grown_1", "grown_2"]
    assert report["outputs"] == {
        "ensemble": "output",
        "members": {n: f"member_{i}" for i, n in enumerate(names)},
    }
    files = [
        run_dir / f
        for f in ("opt/main.onnx", "opt/peer.onnx", "members/grown_1.onnx", "members/grown_2.onnx")
    ]
    x = load_dataset("mnist_small").subset(None, 400, seed=0).x_test[:100]
    deploy = tmp_path / "deploy.onnx"
    assert (
        main(["export", str(run_dir / "ensemble.onnx"), "-o", str(deploy), "--members", *map(str, files)])
        == 0
    )
    import onnxruntime as ort

    for model in (run_dir / "ensemble.onnx", deploy):
        session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
        assert [o.name for o in session.get_outputs()] == ["output", *report["outputs"]["members"].values()]
        fused, *own = session.run(None, {session.get_inputs()[0].name: x})
        for path, value in zip(files, own):
            np.testing.assert_allclose(value, run_onnx(path, x), rtol=0, atol=1e-6, err_msg=path.name)
        np.testing.assert_allclose(fused, combine(np.stack(own), "prod"), atol=1e-5)
    # without the flag the fused graph has the ensemble's output only
    assert [o.name for o in onnx.load(str(source / "ensemble.onnx")).graph.output] == ["output"]


def test_existing_run_needs_resume(compiled, capsys):
    run_dir, _ = compiled
    assert main(["compile", *SMALL, "--members", "4", "-o", str(run_dir)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_with_other_options_refused(compiled, capsys):
    run_dir, _ = compiled
    assert main(["compile", *SMALL, "--members", "5", "-o", str(run_dir), "--resume"]) == 2
    assert "options differ" in capsys.readouterr().err


def test_killed_compile_resumes_without_retraining(tmp_path):
    run_dir = tmp_path / "run"
    # 5 members: the steps after main take long enough that the signal lands before the end even when
    # this test process is slow to notice main (how far the compile got before it is a matter of timing)
    cmd = [sys.executable, "-m", "codec", "compile", *SMALL, "--members", "5", "-o", str(run_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    state = run_dir / "state.json"
    deadline = time.time() + 240
    while time.time() < deadline:
        if state.exists() and "train:main" in json.loads(state.read_text())["steps"]:
            break
        if proc.poll() is not None:
            pytest.fail(f"compile ended before it could be interrupted: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    steps = json.loads(state.read_text())["steps"]
    assert "train:main" in steps and not (run_dir / "ensemble.onnx").exists(), "stopped before the end"
    main_file = run_dir / "members" / "main.onnx"
    before = (main_file.stat().st_mtime_ns, steps["train:main"])
    assert not list(run_dir.rglob("*.tmp")), "no half-written artifact left behind"
    done = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    after = json.loads(state.read_text())["steps"]
    assert (main_file.stat().st_mtime_ns, after["train:main"]) == before, "main was not trained again"
    assert {"train:peer", "passes", "train:grown_1", "train:grown_3"} <= set(after)
    assert (run_dir / "ensemble.onnx").is_file()
