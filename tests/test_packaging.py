"""The built wheel holds every subpackage and the bundled data (an unlisted subpackage imports under an
editable install but is missing from the wheel, so this test imports from the wheel itself)."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_contains_and_imports_everything(tmp_path):
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "dist"),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    wheel = next((tmp_path / "dist").glob("codec-*.whl"))
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(site)
    assert "codec/data/mnist_small.npz" in names
    for package in ("codec", "codec/commands", "codec/ir", "codec/passes", "codec/runtime", "codec/models"):
        assert f"{package}/__init__.py" in names, package
    script = (
        "import codec, codec.ir, codec.passes, codec.runtime.execution.profile, codec.runtime.data, "
        "codec.models, codec.cli;"
        "from codec.runtime.data import load_dataset;"
        f"assert codec.__file__.startswith({str(site)!r}), codec.__file__;"
        "print(load_dataset('mnist_small').x_train.shape)"
    )
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONSAFEPATH="1")
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "(5000, 1, 28, 28)" in run.stdout
