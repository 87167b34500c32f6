"""README "Writing a pass" runs as printed: its pass through `codec opt --plugin`, its Python API block."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from codec.ir import Activation, Dense, NetworkIR, lower, save_model

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_blocks(heading: str, language: str) -> list[str]:
    """The fenced `language` blocks between `heading` and the next heading (of any level)."""
    blocks, inside, fence, body = [], False, None, []
    for line in README.read_text().splitlines():
        if fence is None and line.startswith("#"):  # a heading (a `#` inside a block is code)
            if inside:
                break
            inside = line == heading
        elif line.startswith("```"):
            if fence is None:
                fence, body = line[3:].strip(), []
            else:
                if inside and fence == language:
                    blocks.append("\n".join(body) + "\n")
                fence = None
        elif fence is not None:
            body.append(line)
    return blocks


@pytest.fixture(autouse=True)
def _fresh_registry(monkeypatch):
    """Each test registers the README's pass anew, as a fresh process would."""
    from codec.passes import registry

    monkeypatch.setattr(registry, "_USER", dict(registry._USER))
    monkeypatch.setattr(registry, "_plugin_files", dict(registry._plugin_files))


def _run_block(block: str, module_name: str) -> dict:
    """Run a README block as the module `module_name` (what a user's file or notebook cell is)."""
    module = types.ModuleType(module_name)
    sys.modules[module_name] = module
    code = compile(block, "README.md", "exec", dont_inherit=True)  # not this file's __future__ flags
    exec(code, module.__dict__)  # noqa: S102 - the README's own code
    return module.__dict__


def _member(rng, name: str) -> NetworkIR:
    return NetworkIR(
        name,
        "input",
        "output",
        (784,),
        [
            Dense(
                "fc1",
                rng.standard_normal((12, 784)).astype(np.float32) * 0.05,
                rng.normal(0, 0.1, 12),
                Activation("relu"),
            ),
            Dense(
                "fc2",
                rng.standard_normal((8, 12)).astype(np.float32),
                rng.normal(0, 0.1, 8),
                Activation("relu"),
            ),
            Dense(
                "out",
                rng.standard_normal((10, 8)).astype(np.float32),
                np.zeros(10, np.float32),
                Activation("softmax"),
            ),
        ],
    )


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """The worked example's main.onnx and peer.onnx (tiny), and the README's my_passes.py, in the cwd."""
    rng = np.random.default_rng(0)
    save_model(lower(_member(rng, "main")), tmp_path / "main.onnx")
    save_model(lower(_member(rng, "peer")), tmp_path / "peer.onnx")
    (block,) = _section_blocks("## Writing a pass", "python")
    assert block.startswith("# my_passes.py\n")  # the file the commands and the API block name
    (tmp_path / "my_passes.py").write_text(block)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_readme_pass_block_defines_a_registered_pass():
    (block,) = _section_blocks("## Writing a pass", "python")
    namespace = _run_block(block, "readme_writing_a_pass")
    from codec.passes.registry import get_pass, parse_pipeline

    cls = namespace["SortByFiring"]
    assert get_pass("sort_by_firing") is cls
    (p,) = parse_pipeline("sort_by_firing{descending=false}")
    assert p == cls(descending=False)


def test_readme_plugin_command_runs(workdir):
    (command,) = [
        line
        for block in _section_blocks("## Writing a pass", "bash")
        for line in block.splitlines()
        if line.startswith("codec opt --plugin")
    ]
    args = command.split()[1:]
    args = [a.strip('"') for a in args] + ["--limit", "400", "--json", "--quiet"]
    proc = subprocess.run(
        [sys.executable, "-m", "codec", *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    sort = next(r for r in report["passes"] if r["pass"] == "sort_by_firing")
    assert sort["modified"] and sum(sort["details"]["moved"].values()) > 0
    assert max(sort["verified_max_abs_error"].values()) <= 1e-5
    assert (workdir / "opt" / "main.onnx").is_file()


def test_readme_python_api_block_runs(workdir, capsys):
    (block,) = _section_blocks("### Python API", "python")
    _run_block(block, "readme_python_api")
    printed = capsys.readouterr().out
    assert "sort_by_firing" in printed and "csne" in printed
    assert (workdir / "main_opt.onnx").is_file() and (workdir / "pair.onnx").is_file()
    from conftest import run_onnx

    x = np.random.default_rng(1).random((5, 784), dtype=np.float32)
    fused = run_onnx(workdir / "pair.onnx", x)
    assert fused.shape == (5, 10)
    np.testing.assert_allclose(fused.sum(axis=1), 1.0, atol=1e-5)
