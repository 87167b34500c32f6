"""Shared test helpers: tiny torch models exported by both torch exporters, and the shared data folder."""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest

# The repo is cloned with the project's shared/ folder beside it (CI and developers alike).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def export_torch(module, example, path: Path, dynamo: bool) -> Path:
    """Export `module` in eval mode with a dynamic batch, quietly; dynamo writes `path.data` beside it."""
    import torch

    module = module.eval()
    kwargs = dict(input_names=["input"], output_names=["output"])
    if dynamo:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1)},)
    else:
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (example,), str(path), dynamo=dynamo, **kwargs)
    return path


def run_onnx(model, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    source = model if isinstance(model, bytes) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"the shared data folder is missing: {SHARED_DATA} (clone the repo beside shared/)")
    return SHARED_DATA


@pytest.fixture(autouse=True, scope="session")
def _quiet_threads():
    """Two shared cores: keep torch from oversubscribing them in tests."""
    import torch

    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    yield
