"""The activation-statistics analysis every neuron pass reads: one streamed profiling run per member over
the calibration data, with main x peer cross statistics when there is a peer."""

from __future__ import annotations

from dataclasses import dataclass, field

from codec.passes.base import Analysis, AnalysisManagerProtocol, EnsembleModule
from codec.passes.registry import register_pass
from codec.runtime.execution.profile import ActivationStats, PairStats, profile, profile_pair


@dataclass
class MemberActivations:
    """Per-member ActivationStats (in the module's member order), and PairStats for (main, peer) when the
    module has a peer."""

    members: dict[str, ActivationStats]
    pair: PairStats | None = None
    inputs: int = 0
    notes: list[str] = field(default_factory=list)


@register_pass
@dataclass(frozen=True)
class ActivationAnalysis(Analysis):
    """Profile every member's hidden activations on the calibration data (streamed; O(neurons^2) memory).

    Counts per neuron: firings, non-zero outputs, sums and sums of squares; per pair of connected
    neurons: co-firings; between main and peer, same layer: co-firings and sums of products."""

    name = "activations"
    progress: bool = False

    def compute(self, module: EnsembleModule, am: AnalysisManagerProtocol) -> MemberActivations:
        stats: dict[str, ActivationStats] = {}
        pair = None
        batches = module.calibration.batch_size
        if module.has_peer:
            pair = profile_pair(module.main, module.peer, module.calibration.x, batches, self.progress)
            stats[module.main_name], stats[module.peer_name] = pair.main, pair.peer
        for name, net in module.members.items():
            if name not in stats:
                stats[name] = profile(net, module.calibration.x, batches, self.progress)
        ordered = {name: stats[name] for name in module.members}
        return MemberActivations(ordered, pair, len(module.calibration))

    def summarize(self, result: MemberActivations) -> dict:
        return {
            "inputs": result.inputs,
            "members": {
                name: {layer.name: round(float(layer.fire_rate.mean()), 4) for layer in stats.layers.values()}
                for name, stats in result.members.items()
            },
        }
