"""A third-party pass, installed as a real package, is found through the `codec.passes` entry point."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from codec.ir import Activation, Dense, NetworkIR, lower, save_model

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """pip-install the example plugin into its own folder (not the test environment)."""
    target = tmp_path_factory.mktemp("site")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            "-q",
            str(HERE / "plugin_example"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(target.glob("codec_plugin_example-*.dist-info/entry_points.txt"))
    return target


def _codec(args, site, cwd):
    env = dict(os.environ, PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run(
        [sys.executable, "-m", "codec", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


def test_plugin_listed_and_runs_end_to_end(plugin_site, tmp_path):
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 784)).astype(np.float32) * 0.05
    w1[[2, 5]] = 0.0  # neurons 2 and 5 ignore the input: constant outputs relu(bias)
    b1 = rng.normal(0.5, 0.1, 8).astype(np.float32)
    net = NetworkIR(
        "m",
        "input",
        "output",
        (784,),
        [
            Dense("fc1", w1, b1, Activation("relu")),
            Dense(
                "out",
                rng.standard_normal((10, 8)).astype(np.float32),
                np.zeros(10, np.float32),
                Activation("softmax"),
            ),
        ],
    )
    model = save_model(lower(net), tmp_path / "m.onnx")

    listed = _codec(["opt", "--list-passes", "--json"], plugin_site, tmp_path)
    assert listed.returncode == 0, listed.stderr
    entry = next(p for p in json.loads(listed.stdout)["passes"] if p["name"] == "cnf")
    assert entry["origin"] == "codec_plugin_example:ConstantNeuronFolding"
    assert entry["options"] == [{"name": "tolerance", "default": 1e-07, "type": "float"}]

    ran = _codec(
        [
            "opt",
            "--passes",
            "cnf",
            str(model),
            "--limit",
            "300",
            "-o",
            str(tmp_path / "out"),
            "--json",
            "--quiet",
        ],
        plugin_site,
        tmp_path,
    )
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout)
    assert report["passes"][0]["details"]["folded_per_layer"] == {"main": {"fc1": 2}}
    assert report["passes"][0]["verified_max_abs_error"]["main"] < 1e-5
    assert (tmp_path / "out" / "main.onnx").is_file()


def test_plugin_options_are_checked(plugin_site, tmp_path):
    bad = _codec(["opt", "--passes", "cnf{tolerance=-1}", "x.onnx"], plugin_site, tmp_path)
    assert bad.returncode == 2 and "must not be negative" in bad.stderr and "Traceback" not in bad.stderr


def test_unknown_pass_without_plugin(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "codec", "opt", "--passes", "cnf", "x.onnx"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown pass 'cnf'" in proc.stderr


def _fake_dist(site: Path, dist: str, entries: str) -> None:
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[codec.passes]\n{entries}\n")


def test_name_clashes_are_errors(tmp_path):
    site = tmp_path / "site"
    _fake_dist(site, "shadow", "dna = shadow_mod:Fake")
    clash = _codec(["opt", "--passes", "dna", "x.onnx"], site, tmp_path)
    assert clash.returncode == 2 and "built-in pass name" in clash.stderr
    site2 = tmp_path / "site2"
    _fake_dist(site2, "one", "twin = one_mod:A")
    _fake_dist(site2, "two", "twin = two_mod:B")
    twins = _codec(["opt", "--passes", "twin", "x.onnx"], site2, tmp_path)
    assert twins.returncode == 2 and "two installed plugins provide a pass named 'twin'" in twins.stderr
