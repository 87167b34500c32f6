"""The import layering of pyproject.toml's `[tool.importlinter]` contract holds (tools/check_layers.py), and
the tree is ruff-clean (pyproject.toml's `[tool.ruff]`: lint rules and the formatter)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

needs_importlinter = pytest.mark.skipif(
    importlib.util.find_spec("importlinter") is None, reason="import-linter is in codec's test extra"
)


def _check_layers():
    spec = importlib.util.spec_from_file_location("check_layers", ROOT / "tools" / "check_layers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("check_layers", module)
    spec.loader.exec_module(module)
    return module


def _copy_sources(dest: Path) -> None:
    """pyproject.toml and every package folder it maps, `.py` files only (what the checker reads)."""
    shutil.copyfile(ROOT / "pyproject.toml", dest / "pyproject.toml")
    for folder in {p.relative_to(ROOT).parts[0] for p in _check_layers().package_dirs().values()}:
        shutil.copytree(ROOT / folder, dest / folder, ignore=_not_python)


def _not_python(folder: str, names: list[str]) -> list[str]:
    return [n for n in names if not n.endswith(".py") and not (Path(folder) / n).is_dir()]


@needs_importlinter
def test_layers_kept(capfd):
    assert _check_layers().main() == 0, capfd.readouterr().out[-3000:]


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("ir/network.py", "codec.runtime.evaluation.metrics"),  # the IR reaching up into evaluation
        ("runtime/training/coupled.py", "codec.pipelines.report"),  # training reaching up into a driver
        ("codec/pipelines/compile.py", "codec.commands.opt"),  # a pipeline reaching up into the CLI
    ],
)
@needs_importlinter
def test_an_upward_import_breaks_the_contract(tmp_path, capfd, module, upward):
    _copy_sources(tmp_path)
    source = tmp_path / module
    source.write_text(source.read_text() + f"\n\nimport {upward}  # noqa\n")
    assert _check_layers().main(tmp_path) != 0
    assert f"{upward}" in capfd.readouterr().out


def test_ruff_clean():
    """`ruff check` (the rules pyproject.toml selects) and `ruff format --check` pass on the whole tree."""
    ruff_main = pytest.importorskip("ruff.__main__", reason="ruff is in codec's test extra")
    ruff = ruff_main.find_ruff_bin()
    # --no-cache: a test does not write into the source tree
    for command in (["check", "--no-cache", "."], ["format", "--check", "--no-cache", "."]):
        result = subprocess.run([ruff, *command], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"ruff {' '.join(command)}:\n{(result.stdout + result.stderr)[-3000:]}"
