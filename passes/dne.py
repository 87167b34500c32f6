"""DNE, Dead Neuron Elimination: remove the neurons DNA found dead by reshaping the tensors of their layer
and of its consumer. Function-preserving on the calibration inputs (the manager verifies it)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from codec.ir.surgery import select_neurons
from codec.passes.base import EnsembleModule, PassResult, Transform
from codec.passes.dna import DeadNeuronAnalysis
from codec.passes.registry import register_pass


@register_pass
@dataclass(frozen=True)
class DeadNeuronElimination(Transform):
    """Remove dead neurons (per DNA) from every member. A layer whose neurons are all dead keeps one, so
    no layer becomes empty (its output is then the constant the dead layer produced anyway)."""

    name = "dne"
    requires = (DeadNeuronAnalysis,)
    preserves = ()
    verify_function = True

    def run(self, module: EnsembleModule, am) -> PassResult:
        dead = am.get(DeadNeuronAnalysis, module)
        members = {}
        removed: dict[str, dict[str, int]] = {}
        modified = False
        for name, net in module.members.items():
            new = net.copy()
            removed[name] = {}
            for layer in net.hidden_layers():
                idx = dead.get(name, {}).get(layer.name, np.zeros(0, np.int64))
                if len(idx) == layer.num_neurons:
                    idx = idx[1:]  # keep one neuron: an empty layer cannot be lowered
                removed[name][layer.name] = int(len(idx))
                if len(idx):
                    keep = np.setdiff1d(np.arange(layer.num_neurons), idx)
                    select_neurons(new, layer.name, keep)
                    modified = True
            members[name] = new
        params = {
            name: {"before": module.members[name].num_parameters, "after": net.num_parameters}
            for name, net in members.items()
        }
        return PassResult(module.replace(members=members), modified, {"removed_per_layer": removed, "parameters": params})
