"""`codec.optimize`: run a pass pipeline over members from Python, as `codec opt` does from the shell."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from codec.errors import ConfigError, ShapeError
from codec.ir.network import NetworkIR
from codec.passes.base import Calibration, EnsembleModule, Pass
from codec.passes.manager import PassManager

DEFAULT_PIPELINE = "dna,dne,nda,csne"
Member = NetworkIR | str | os.PathLike


def optimize(
    main: Member,
    peer: Member | None = None,
    *,
    passes: str | Sequence[Pass] = DEFAULT_PIPELINE,
    data: str | np.ndarray = "mnist_small",
    split: str = "train",
    limit: int | None = None,
    data_dir: str | os.PathLike | None = None,
    members: dict[str, Member] | None = None,
    plugins: Sequence[str | os.PathLike] = (),
    batch_size: int = 256,
    verify: bool = True,
    verify_inputs: int | None = 2048,
    atol: float = 1e-5,
) -> tuple[EnsembleModule, dict]:
    """Lift the members, profile them on calibration data and run a pass pipeline over them.

    Args:
        main: the main member: a NetworkIR or an ONNX file (lifted with `codec.lift`).
        peer: the peer member (needed by csne), likewise.
        passes: pipeline text (`"dna,dne,nda{fire=0.7},csne"`, plugins and `module:Class` references
            included) or pass instances.
        data: calibration inputs: a dataset name as `--data` takes it (`mnist_small`, `npz:PATH`, ...) or
            an array of examples (N, *input shape); image-shaped data is flattened for an MLP.
        split: the dataset split to calibrate on, "train" (default) or "test" (dataset names only).
        limit: use only the first `limit` examples.
        data_dir: where datasets live (default $CODEC_DATA_DIR or ~/.cache/codec/data).
        members: further members by name (neither main nor peer).
        plugins: Python files defining passes with `@register_pass`, loaded before `passes` is read.
        batch_size: calibration batch size.
        verify: check function-preserving transforms' outputs (see `PassManager`).
        verify_inputs: calibration inputs verification runs on (None: all).
        atol: the largest output change verification accepts.

    Returns:
        (module, report): the optimised module (`module.members`, `module.csn`) and the report `codec opt`
        writes (the pipeline, what each pass did, timings, the calibration data).

    Raises:
        CodecError: a bad pipeline, model, data set or pass failure, as one readable line.
    """
    from codec.passes.registry import load_plugin_file, parse_pipeline

    for path in plugins:
        load_plugin_file(path)
    pipeline = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
    if not all(isinstance(p, Pass) for p in pipeline):
        raise ConfigError("passes must be pipeline text or a list of codec Pass instances")
    named = {"main": main}
    if peer is not None:
        named["peer"] = peer
    for name, member in (members or {}).items():
        if name in named:
            raise ConfigError(f"member name {name!r} is taken by main or peer")
        named[name] = member
    networks = {name: _as_network(member, name) for name, member in named.items()}
    x, source = _calibration_inputs(data, split, limit, data_dir)
    x = _fit(x, networks["main"].input_shape, source)
    module = EnsembleModule(
        networks, Calibration(x, batch_size), main_name="main", peer_name="peer" if peer is not None else None
    )
    manager = PassManager(pipeline, verify=verify, verify_inputs=verify_inputs, atol=atol)
    module, report = manager.run(module)
    report["calibration"] = {
        "data": source,
        "split": split if isinstance(data, str) else None,
        "inputs": len(x),
    }
    return module, report


def _as_network(member: Member, name: str) -> NetworkIR:
    if isinstance(member, NetworkIR):
        return member
    if isinstance(member, (str, os.PathLike)):
        from codec.ir.lift import lift

        return lift(Path(member), name=name)
    raise ConfigError(
        f"member {name!r} must be a NetworkIR or an ONNX file path, not {type(member).__name__}"
    )


def _calibration_inputs(data, split: str, limit: int | None, data_dir) -> tuple[np.ndarray, str]:
    if isinstance(data, str):
        from codec.runtime.data import load_dataset

        if split not in ("train", "test"):
            raise ConfigError(f"split={split!r}; choose train or test")
        dataset = load_dataset(data, data_dir=data_dir)
        x, source = (dataset.x_train if split == "train" else dataset.x_test), dataset.name
    else:
        x, source = np.asarray(data, dtype=np.float32), "array"
    if limit is not None:
        if limit < 1:
            raise ShapeError(f"limit must be positive, got {limit}")
        x = x[:limit]
    return x, source


def _fit(x: np.ndarray, input_shape: tuple[int, ...], what: str) -> np.ndarray:
    """Reshape examples to the members' input when only the layout differs (`codec opt`'s rule)."""
    if x.ndim < 2:
        raise ShapeError(f"{what}: calibration inputs need a batch axis, got shape {list(x.shape)}")
    if tuple(x.shape[1:]) == tuple(input_shape):
        return x
    if int(np.prod(x.shape[1:])) == int(np.prod(input_shape)):
        return x.reshape((len(x), *input_shape))
    raise ShapeError(
        f"{what} examples have shape {list(x.shape[1:])} but the model expects {list(input_shape)}"
    )
