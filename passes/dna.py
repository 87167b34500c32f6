"""DNA, Dead Neuron Analysis: neurons whose output is zero on every calibration input.

On a DAG, neurons tied by a residual Add (same index in the Add and in each layer it adds) count as one:
dead only if dead in every tied layer, so that DNE can remove them from all of them together.

By default (`scope=intersect`) a neuron position is dead only if it is dead in every member, which keeps
the members' layer widths aligned; `scope=member` is the conventional single-model analysis (each
member's own dead neurons), which removes more and is equally function-preserving. With one member the
two agree. Two independently trained members rarely share a dead position, so on a main/peer pair the
default removes few of the dead neurons `codec profile` reports for each model (profile says so, and
counts what the default removes when given `--peer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from codec.passes.activations import ActivationAnalysis
from codec.passes.base import Analysis, AnalysisManagerProtocol, EnsembleModule, PassError
from codec.passes.registry import register_pass

DeadNeurons = dict[str, dict[str, np.ndarray]]  # member -> hidden layer -> dead neuron indices


def removable(dead: dict[str, dict[str, np.ndarray]], scope: str) -> dict[str, dict[str, np.ndarray]]:
    """Per member and hidden layer (in order), the dead-neuron mask DNA reports under `scope`: each
    member's own (`member`), or the positions dead in every member (`intersect`; members of one
    architecture). `codec profile` uses this too, to say what the default `codec opt` removes."""
    if scope != "intersect" or len(dead) < 2:
        return {member: dict(layers) for member, layers in dead.items()}
    masks = [list(m.values()) for m in dead.values()]
    common = [np.logical_and.reduce([m[i] for m in masks]) for i in range(len(masks[0]))]
    return {member: dict(zip(layers, common)) for member, layers in dead.items()}


@register_pass
@dataclass(frozen=True)
class DeadNeuronAnalysis(Analysis):
    """Find dead neurons: output exactly zero on every calibration input (`criterion=zero`, the one DNE
    can remove without changing any output), or never meeting the firing condition (`criterion=never_fires`,
    identical for ReLU). `scope=intersect` keeps only positions dead in every member; `scope=member`
    analyses each member alone."""

    name = "dna"
    scope: Literal["intersect", "member"] = "intersect"
    criterion: Literal["zero", "never_fires"] = "zero"

    def requires_module(self, module: EnsembleModule) -> None:
        if self.scope == "intersect" and len(module.members) > 1:
            nets = list(module.members.values())
            for other in nets[1:]:
                difference = nets[0].same_architecture(other)
                if difference is not None:
                    raise PassError(
                        f"dna{{scope=intersect}} needs members of the same architecture ({difference}); "
                        "use dna{scope=member}"
                    )

    def compute(self, module: EnsembleModule, am: AnalysisManagerProtocol) -> DeadNeurons:
        self.requires_module(module)
        acts = am.get(ActivationAnalysis, module)
        dead: dict[str, dict[str, np.ndarray]] = {}
        for member, stats in acts.members.items():
            dead[member] = {
                layer: (s.always_zero if self.criterion == "zero" else s.never_fires).copy()
                for layer, s in stats.layers.items()
            }
            _tie(module.members[member], dead[member])
        dead = removable(dead, self.scope)
        return {
            member: {layer: np.flatnonzero(mask) for layer, mask in layers.items()}
            for member, layers in dead.items()
        }

    def summarize(self, result) -> dict:
        return {
            "dead_per_layer": {
                m: {l: int(len(idx)) for l, idx in layers.items()} for m, layers in result.items()
            },
            "dead_total": {m: int(sum(len(idx) for idx in layers.values())) for m, layers in result.items()},
        }


def _tie(net, masks: dict[str, np.ndarray]) -> None:
    """Neurons tied by residual Adds are one unit: dead only where dead in every tied layer (the Add's
    post-activation output included), and never when the group reaches the output layer."""
    for group in net.tied_groups():
        present = [masks[name] for name in group if name in masks]
        common = np.logical_and.reduce(present) if len(present) == len(group) else np.zeros_like(present[0])
        for name in group:
            if name in masks:
                masks[name] = common.copy()
