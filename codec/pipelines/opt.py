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

    manager = PassManager(passes, verify=verify, atol=atol, after_pass=after_pass, verify_inputs=verify_inputs)
    # only a member called "peer" is the peer: `codec opt main.onnx --member x.onnx` has none
    module = EnsembleModule(members, Calibration(x, batch_size), peer_name="peer" if "peer" in members else None)
    module, report = manager.run(module)
    return module, manager, report


def write_outputs(out: Path, module, manager, report: dict) -> dict:
    """Write the members, the CSN (csn.json, csn.onnx), NDGs (GraphML) and report.json into `out`.

    Returns:
        {artifact: path written}.
    """
    from codec.io import write_json_atomic
    from codec.ir.lower import lower, save_model
    from codec.passes.nda import NeuronDependenceAnalysis

    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, net in module.members.items():
        written[name] = str(save_model(lower(net), out / f"{name}.onnx"))
    if module.csn is not None:
        write_json_atomic(out / "csn.json", module.csn.to_dict())
        written["csn.json"] = str(out / "csn.json")
        if module.csn.network is not None:
            csn_model = lower(module.csn.network, taps=True)
            csn_model.metadata_props["codec.csn"] = "true"
            written["csn"] = str(save_model(csn_model, out / "csn.onnx"))
    if NeuronDependenceAnalysis.name in manager.results:
        import networkx as nx

        from codec.io import atomic_path

        for member, ndg in manager.results[NeuronDependenceAnalysis.name].items():
            graph = ndg.to_networkx()
            # GraphML wants string node ids: "layer/index"
            graph = nx.relabel_nodes(graph, {n: f"{n[0]}/{n[1]}" for n in graph.nodes})
            path = out / f"ndg_{member}.graphml"
            with atomic_path(path) as tmp:
                nx.write_graphml(graph, tmp)
            written[f"ndg_{member}"] = str(path)
    write_json_atomic(out / "report.json", report)
    written["report"] = str(out / "report.json")
    return written
