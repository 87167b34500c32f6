"""torch.distributed (gloo, 2 ranks on loopback): independent members spread over ranks give the same
ensemble as one process; a failed task is retried on rank 0 or reported, never silently missing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import run_onnx

ARGS = [
    "compile",
    "--recipe",
    "classifier_s",
    "--members",
    "4",
    "--epochs",
    "2",
    "--n-train",
    "1000",
    "--n-test",
    "300",
    "--threads",
    "1",
    "--calibration",
    "800",
    "--quiet",
    "--json",
]


def _codec(args, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", "codec", *args], capture_output=True, text=True, timeout=timeout
    )


def test_two_rank_compile_matches_single_process(tmp_path):
    one = _codec([*ARGS, "-o", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _codec([*ARGS, "-o", str(tmp_path / "two"), "--nproc", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert (a["world_size"], b["world_size"]) == (1, 2)
    assert a["quality"]["members"] == pytest.approx(b["quality"]["members"], abs=1e-9)
    assert a["csn"] == b["csn"]
    x = np.random.default_rng(0).random((64, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(
        run_onnx(tmp_path / "two" / "ensemble.onnx", x),
        run_onnx(tmp_path / "one" / "ensemble.onnx", x),
        atol=1e-6,
    )


SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    from codec.runtime.training import distributed
    world = distributed.init(threads=1)
    mode = sys.argv[1]
    marker = sys.argv[2]
    def task(name):
        if name == "b" and (mode == "always" or world.rank == 1):
            raise RuntimeError(f"boom on rank {world.rank}")
        return {"name": name, "rank": world.rank}
    try:
        results = distributed.run_tasks(["a", "b", "c"], task)
        if world.is_main:
            print(json.dumps(results))
    except Exception as exc:
        if world.is_main:
            print("ERROR " + str(exc))
    distributed.exit_process(0)
    """
)


@pytest.mark.parametrize("mode", ["once", "always"])
def test_failed_task_is_retried_or_reported(tmp_path, mode):
    script = tmp_path / "tasks.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(script),
            mode,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    if mode == "once":
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        assert set(results) == {"a", "b", "c"}
        assert results["b"]["rank"] == 0  # retried on rank 0 after failing on rank 1
        assert "retrying on rank 0" in proc.stderr
    else:
        assert "ERROR member b failed twice" in proc.stdout


TREENET = [
    "train-ensemble",
    "--recipe",
    "classifier_s",
    "--members",
    "3",
    "--split",
    "fc1",
    "--loss",
    "mcl",
    "--k",
    "1",
    "--epochs",
    "2",
    "--n-train",
    "600",
    "--n-test",
    "200",
    "--threads",
    "1",
    "--no-plot",
    "--quiet",
    "--json",
]


def test_two_rank_treenet_matches_single_process(tmp_path):
    one = _codec([*TREENET, "-o", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-2000:]
    two = _codec([*TREENET, "-o", str(tmp_path / "two"), "--nproc", "2"])
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)
    assert (a["world_size"], b["world_size"]) == (1, 2)
    x = np.random.default_rng(1).random((64, 1, 28, 28), dtype=np.float32)
    np.testing.assert_allclose(
        run_onnx(tmp_path / "two" / "ensemble.onnx", x),
        run_onnx(tmp_path / "one" / "ensemble.onnx", x),
        atol=1e-5,
    )


def test_torchrun_workers_keep_their_output_and_exit_status(tmp_path):
    """Workers end through exit_process (os._exit after leaving the group, to dodge an abort in torch's
    teardown): what they printed still comes out, and a failing command still fails the job."""
    from test_faults import _mlp

    from codec.ir import lower, save_model

    model = save_model(lower(_mlp("m", n_in=20)), tmp_path / "m.onnx")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "codec",
    ]
    ok = subprocess.run(
        [*torchrun, "inspect", str(model), "--json"], capture_output=True, text=True, timeout=300
    )
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert ok.stdout.count('"lifted": true') == 2, ok.stdout[-2000:]  # both ranks' reports, flushed
    bad = subprocess.run(
        [*torchrun, "inspect", str(tmp_path / "missing.onnx")], capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0
    assert bad.stderr.count("codec inspect: error:") == 2
