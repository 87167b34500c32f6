"""`codec.optimize`: run a pass pipeline over members from Python, as `codec opt` does from the shell.

It takes what a Python user has (networks or ONNX paths, a dataset name or an array, plugin files) and
hands them to `codec.pipelines.opt.optimize`, the library call behind `codec opt`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from codec.errors import ConfigError, ShapeError
from codec.ir.network import NetworkIR
from codec.passes.base import EnsembleModule, Pass

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
    from codec.pipelines.data import fit_to_model, load_split
    from codec.pipelines.opt import optimize as run_passes

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
    if isinstance(data, str):
        if split not in ("train", "test"):
            raise ConfigError(f"split={split!r}; choose train or test")
        x, _, dataset = load_split(data, data_dir=data_dir, split=split, limit=limit)
        source = dataset.name
    else:
        x, source = np.asarray(data, dtype=np.float32), "array"
        if x.ndim < 2:
            raise ShapeError(f"calibration inputs need a batch axis, got shape {list(x.shape)}")
        if limit is not None:
            if limit < 1:
                raise ShapeError(f"limit must be positive, got {limit}")
            x = x[:limit]
    x = fit_to_model(x, networks["main"].input_shape, model=f"main member {networks['main'].name!r}")
    module, _, report = run_passes(
        networks, pipeline, x, batch_size=batch_size, verify=verify, atol=atol, verify_inputs=verify_inputs
    )
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
