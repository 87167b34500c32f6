"""DNE, Dead Neuron Elimination: remove the neurons DNA found dead by reshaping the tensors of their layer
and of its consumer. Function-preserving on the calibration inputs (the manager verifies it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from codec.ir.surgery import removal_blocker, select_neurons
from codec.passes.activations import ActivationAnalysis, MemberActivations
from codec.passes.base import AnalysisManagerProtocol, EnsembleModule, PassResult, Transform
from codec.passes.dna import DeadNeuronAnalysis
from codec.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class DeadNeuronElimination(Transform):
    """Remove dead neurons (per DNA) from every member. A layer whose neurons are all dead keeps one, so
    no layer becomes empty (its output is then the constant the dead layer produced anyway). Neurons tied
    by residual Adds are removed from every tied layer together; grouped convolutions (and layers feeding
    one) are left alone, with the reason under `left_alone` in the report."""

    name = "dne"
    requires = (DeadNeuronAnalysis,)
    # Removing neurons whose output is zero on every calibration input changes no other neuron's
    # statistics, so the activation profile is edited in place instead of recomputed.
    preserves = (ActivationAnalysis,)
    verify_function = True

    def run(self, module: EnsembleModule, am: AnalysisManagerProtocol) -> PassResult:
        dead = am.get(DeadNeuronAnalysis, module)
        acts = _copy_activations(am.get(ActivationAnalysis, module))
        pair_members = {module.main_name: "main", module.peer_name: "peer"} if acts.pair is not None else {}
        members = {}
        removed: dict[str, dict[str, int]] = {}
        left_alone: dict[str, dict[str, str]] = {}
        modified = False
        for name, net in module.members.items():
            new = net.copy()
            removed[name] = {}
            done: set[str] = set()
            for layer in net.profiled_layers():
                if layer.name in done:
                    continue
                group = net.tied_group(layer.name)  # [layer] unless residual Adds tie it to others
                done.update(group)
                idx = dead.get(name, {}).get(layer.name, np.zeros(0, np.int64))
                if len(idx) == layer.num_neurons:
                    idx = idx[1:]  # keep one neuron: an empty layer cannot be lowered
                blocker = removal_blocker(net, layer.name) if len(idx) else None
                if blocker is not None:
                    left_alone.setdefault(name, {}).update(
                        {g: f"{len(idx)} dead neurons kept: {blocker}" for g in group}
                    )
                    idx = idx[:0]
                for g in group:
                    removed[name][g] = int(len(idx))
                if len(idx):
                    keep = np.setdiff1d(np.arange(layer.num_neurons), idx)
                    select_neurons(new, layer.name, keep)  # the whole tied group at once
                    for g in group:
                        _select_stats(acts, pair_members, name, g, keep)
                    modified = True
            members[name] = new
        params = {
            name: {"before": module.members[name].num_parameters, "after": net.num_parameters}
            for name, net in members.items()
        }
        am.update(ActivationAnalysis, acts)
        details = {"removed_per_layer": removed, "parameters": params}
        if left_alone:
            details["left_alone"] = left_alone
        return PassResult(module.replace(members=members), modified, details)


def _copy_activations(acts: MemberActivations) -> MemberActivations:
    import copy

    return copy.deepcopy(acts)


def _select_stats(
    acts: MemberActivations, pair_members: dict[str, str], member: str, layer: str, keep: np.ndarray
) -> None:
    if member in pair_members:
        acts.pair.select(pair_members[member], layer, keep)  # edits the shared member stats too
    else:
        acts.members[member].select(layer, keep)
