"""Check codec's import layering with import-linter (the contract is in pyproject.toml).

import-linter finds a package's modules by walking its folder, and codec's subpackages live in top-level
folders mapped into the package (`codec.ir` = `ir/`, ...). So the sources are mirrored first, `.py` files
only, into a temporary folder laid out as the installed package is, and the contract is checked there.

Usage: python tools/check_layers.py  (exit 0 when every contract is kept; import-linter's report otherwise)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def package_dirs(root: Path = ROOT) -> dict[str, Path]:
    """The import package -> source folder map of pyproject.toml's `[tool.setuptools.package-dir]`."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    return {name: root / folder for name, folder in config["tool"]["setuptools"]["package-dir"].items()}


def mirror(dest: Path, root: Path = ROOT) -> None:
    """Copy every package's `.py` files under `dest` at the path its import name gives."""
    for name, folder in sorted(package_dirs(root).items()):
        target = dest.joinpath(*name.split("."))
        for src in folder.rglob("*.py"):
            rel = src.relative_to(folder)
            out = target / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, out)


def main(root: Path = ROOT) -> int:
    """Check the contract of `root`'s pyproject.toml over `root`'s sources; the exit status."""
    with tempfile.TemporaryDirectory(prefix="codec-layers-") as tmp:
        mirror(Path(tmp), root)
        env = {**os.environ, "PYTHONPATH": tmp}
        lint = shutil.which("lint-imports")
        if lint is None:
            print(
                "lint-imports not found: pip install import-linter (it is in codec's test extra)",
                file=sys.stderr,
            )
            return 2
        return subprocess.run([lint, "--no-cache", str(root / "pyproject.toml")], cwd=tmp, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
