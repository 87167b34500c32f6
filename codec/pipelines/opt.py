"""The `codec opt` pipeline: run a pass pipeline over lifted members and write what it produced.

`optimize` is the library call behind `codec opt`; `write_outputs` is shared with `codec compile`, which
runs the same passes over its freshly trained main and peer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def lift_members(paths: dict[str, Path]) -> dict:
    """{role: NetworkIR} for {role: ONNX path}; the first entry is the main member, the second the peer.

    Raises:
        LiftError: a member codec cannot lift, naming its role and file (main or peer?) first.
    """
    from codec.errors import LiftError
    from codec.ir import lift

    members = {}
    for name, path in paths.items():
        try:
            members[name] = lift(path, name=name)
        except LiftError as exc:
            raise LiftError(exc.reason, exc.node, exc.op_type, source=f"{name} member {path}") from exc
    return members


def optimize(
    members: dict,
    passes: list,
    x: np.ndarray,
    *,
    batch_size: int = 256,
    verify: bool = True,
    atol: float = 1e-5,
    verify_inputs: int | None = 2048,
    after_pass: Callable | None = None,
) -> tuple:
    """Run `passes` (from `parse_pipeline`) over `members` on calibration inputs `x`.

    Args:
        members: {role: NetworkIR}, as `lift_members` returns.
        passes: the parsed pipeline.
        x: calibration inputs, already in the main member's input shape.
        batch_size: calibration batch size.
        verify: check that every transform preserves the members' outputs.
        atol: the largest output change verification accepts.
        verify_inputs: how many calibration inputs verification runs on (None = all).
        after_pass: called as `after_pass(pass, module, record)` after each pass.

    Returns:
        (module, manager, report): the transformed EnsembleModule, the PassManager (its `results` hold
        the analyses `write_outputs` needs) and the report dict.
    """
    from codec.passes.base import Calibration, EnsembleModule
    from codec.passes.manager import PassManager

    manager = PassManager(
        passes, verify=verify, atol=atol, after_pass=after_pass, verify_inputs=verify_inputs
    )
    # only a member called "peer" is the peer: `codec opt main.onnx --member x.onnx` has none
    module = EnsembleModule(
        members, Calibration(x, batch_size), peer_name="peer" if "peer" in members else None
    )
    module, report = manager.run(module)
    return module, manager, report


def write_outputs(out: Path, module, manager, report: dict) -> dict:
    """Write the members, the CSN (csn.json, csn.onnx), NDGs (GraphML) and report.json into `out`, as a unit.

    Everything is written into a staging folder beside `out` that then replaces it (`codec.io.staged_dir`):
    an interrupted run leaves the previous outputs as they were, and a finished one leaves exactly its
    own files (none of an earlier run's).

    Returns:
        {artifact: path written} (paths inside `out`).
    """
    from codec.io import staged_dir, write_json_atomic
    from codec.ir.lower import lower, save_model
    from codec.passes.nda import NeuronDependenceAnalysis

    out = Path(out)
    written = {}
    with staged_dir(out) as stage:
        for name, net in module.members.items():
            save_model(lower(net), stage / f"{name}.onnx")
            written[name] = str(out / f"{name}.onnx")
        if module.csn is not None:
            write_json_atomic(stage / "csn.json", module.csn.to_dict())
            written["csn.json"] = str(out / "csn.json")
            if module.csn.network is not None:
                csn_model = lower(module.csn.network, taps=True)
                csn_model.metadata_props["codec.csn"] = "true"
                save_model(csn_model, stage / "csn.onnx")
                written["csn"] = str(out / "csn.onnx")
        if NeuronDependenceAnalysis.name in manager.results:
            from codec.io import atomic_path
            from codec.runtime.execution.profile import stats_budget

            budget = stats_budget()
            for member, ndg in manager.results[NeuronDependenceAnalysis.name].items():
                name = f"ndg_{member}.graphml"
                if ndg.graphml_bytes() > budget:
                    # streamed, so memory stays small, but the file itself is sized by the model
                    skipped = report.setdefault("skipped_outputs", {})
                    skipped[name] = (
                        f"{ndg.num_edges} edges need about {ndg.graphml_bytes()} bytes of GraphML, past the "
                        f"budget of {budget} bytes (CODEC_MAX_STATS_BYTES)"
                    )
                    continue
                with atomic_path(stage / name) as tmp:
                    ndg.write_graphml(tmp)
                written[f"ndg_{member}"] = str(out / name)
        written["report"] = str(out / "report.json")
        write_json_atomic(stage / "report.json", report)
    return written
