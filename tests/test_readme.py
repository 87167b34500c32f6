"""The README works as written: its ```bash blocks run in order, command by command, in one temporary folder,
and its ```python blocks run as written (one whose first line is `# name.py` is saved as that file first:
the README has the reader create it, and later blocks use it).

Sizes: every command runs with CODEC_SMALL=1, which the training commands read (train, compile,
train-ensemble; `codec/commands/_common.py` `small_overrides`: one epoch, 600 training and 300 test
examples), so the commands are exactly the README's and the whole file takes about 40 s of CPU time.

Skipped, on purpose: the set-up block's `pip install ...` commands (this test runs in the environment they
install; installing packages is not what it checks) and its `python -m pytest -q` (the suite this test is a
part of). The `codec compile` after `pip install -e . &&` does run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def readme_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.M | re.S)]


def shell_commands(body: str) -> list[str]:
    """The commands of a bash block: comments dropped, continuation lines joined, `a && b` split."""
    joined = re.sub(r"\s*\\\n\s*", " ", body)
    commands = []
    for line in joined.splitlines():
        line = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        commands += [part.strip() for part in line.split(" && ") if part.strip()]
    return commands


def skipped(command: str) -> bool:
    """Installing packages and running this very suite are not part of what the README test checks."""
    return command.startswith("pip install") or command.startswith("python -m pytest")


def _cases() -> list:
    cases = []
    for index, (language, body) in enumerate(readme_blocks(README.read_text())):
        if language == "bash":
            for command in shell_commands(body):
                if not skipped(command):
                    cases.append(pytest.param("bash", command, id=f"block{index}: {command[:60]}"))
        elif language == "python":
            cases.append(pytest.param("python", body, id=f"block{index}: python"))
    return cases


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme")


@pytest.fixture(scope="module")
def env() -> dict:
    # this interpreter's `python` and the `codec` script pip installed for it come first (a system python's
    # scripts folder need not be beside the interpreter: sysconfig knows where it is)
    dirs = [str(Path(sys.executable).parent), sysconfig.get_path("scripts")]
    path = os.pathsep.join([*dirs, os.environ.get("PATH", "")])
    assert shutil.which("codec", path=path), f"no codec script for {sys.executable}: pip install -e ."
    return dict(os.environ, PATH=path, CODEC_SMALL="1", OMP_NUM_THREADS="1")


@pytest.mark.parametrize("language, source", _cases())
def test_readme_runs_as_written(workdir, env, language, source):
    if language == "bash":
        argv = ["bash", "-e", "-o", "pipefail", "-c", source]
    else:
        # a block that starts with "# name.py" is a file the README has the reader create (later blocks use
        # it): it is written under that name, and run like every other block
        named = re.match(r"# (\w+\.py)\n", source)
        script = workdir / (named.group(1) if named else "readme_block.py")
        script.write_text(source)
        argv = [sys.executable, str(script)]
    done = subprocess.run(argv, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{source}\nexit {done.returncode}\n{done.stderr[-3000:]}"


def test_the_readme_test_runs_the_worked_example_and_the_main_job():
    commands = [c.values[1] for c in _cases() if c.values[0] == "bash"]
    assert any(c.startswith("codec compile") for c in commands)
    assert any(c.startswith("codec export") for c in commands)


def test_shell_commands_parsing():
    body = "# a comment\npip install -e . && codec compile -o x  # trailing\ncodec a \\\n  --b c\n"
    assert shell_commands(body) == ["pip install -e .", "codec compile -o x", "codec a --b c"]


def test_install_says_how_to_get_the_cpu_build_of_torch():
    setup = next(body for language, body in readme_blocks(README.read_text()) if language == "bash")
    assert f"pip install torch --index-url {CPU_INDEX}" in setup


def test_torch_is_not_capped_below_a_newer_release():
    # decided in docs/decisions.md#packaging: a lower bound only
    # (a regex, not tomllib: Python 3.10 is supported and has none)
    torch = re.search(r'^\s*"(torch[^"]*)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert "<" not in torch and "==" not in torch, torch


def test_ci_runs_the_readme_install_and_test_lines():
    setup = next(
        body for language, body in readme_blocks(README.read_text()) if language == "bash"
    ).splitlines()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    for line in (setup[0], setup[-1]):
        assert line in ci, f"CI does not run the README's {line!r}"


def test_codec_small_caps_training_and_says_so(monkeypatch, capsys):
    from codec.commands._common import SMALL_CAPS, small_overrides

    given = {"max_epochs": None, "n_train": 100, "n_test": None, "lr": 0.1}
    monkeypatch.delenv("CODEC_SMALL", raising=False)
    assert small_overrides(given, "train") == given and capsys.readouterr().err == ""
    monkeypatch.setenv("CODEC_SMALL", "1")
    capped = small_overrides(given, "train")
    assert capped == {
        "max_epochs": SMALL_CAPS["max_epochs"],
        "n_train": 100,
        "n_test": SMALL_CAPS["n_test"],
        "lr": 0.1,
    }
    assert "CODEC_SMALL is set" in capsys.readouterr().err
