"""CSNE, Common Sub-Network Extraction.

Main neuron m and peer neuron p (same layer) are equivalent when
- they fire together often enough: firing agreement >= `fire` (`cofire=agreement`: both fire or both stay
  silent; `cofire=jaccard`: both fire / either fires),
- their activations are correlated: Pearson correlation >= `corr`,
- and (`preds=true`) every NDG predecessor of m is already in the CSN.
Matching is one-to-one, greedy by decreasing correlation (ties: lowest indices). Layers are swept bottom-up
and the sweep repeats until nothing changes (a fixed point; with the predecessor rule only looking one
layer down, the second sweep confirms the first). A layer can hold CSN neurons only if the layer below
does (the CSN is a sub-network; the input counts as fully shared).

On a DAG only the leading chain is shared (`shareable_prefix`); the layers after it are left alone and
listed with the reason under `left_alone` in the report.

The pass sets `module.csn` (the CSN, its matches, and the CSN as a NetworkIR) and replaces main by its
rewrite: each hidden layer ordered [CSN neurons, frozen and shared] ++ [the rest].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from codec.errors import ConfigError
from codec.ir.csn import CSN, CSNLayer, csn_network, rewrite_main
from codec.ir.network import NetworkIR
from codec.passes.activations import ActivationAnalysis
from codec.passes.base import (
    AnalysisManagerProtocol,
    EnsembleModule,
    PassError,
    PassResult,
    Transform,
    check_fraction,
)
from codec.passes.nda import NeuronDependenceAnalysis
from codec.passes.registry import register_pass


def shareable_prefix(net: NetworkIR) -> tuple[list[str], dict[str, str]]:
    """The hidden layers CSNE may share (the leading chain of the network) and, for the others, why not.

    The CSN is a chain of leading layers. On a DAG, CSNE stops at the first layer that branches, adds or
    concatenates, or is tied to others by a residual Add: sharing tied neurons would need the CSN and each
    member to agree on every tied layer at once, which the predecessor rule does not establish, so CSNE
    leaves those layers (and everything after them) alone. A grouped convolution stops it too (its
    channels cannot be reordered into [CSN] ++ [own])."""
    from codec.ir.network import Add, Concat, Conv

    shareable: list[str] = []
    left_alone: dict[str, str] = {}
    reason = None
    hidden = {id(layer) for layer in net.hidden_layers()}
    tied = {name for group in net.tied_groups() for name in group}
    for layer in net.layers:
        if reason is None:
            if isinstance(layer, (Add, Concat)) or layer.name in net.sources:
                reason = (
                    f"it is in or after the {type(layer).__name__.lower()} {layer.name!r}, where the "
                    "network stops being a chain"
                )
            elif layer.name in tied:
                reason = (
                    "its neurons are tied by a residual Add; CSNE shares leading chain layers only (from "
                    f"{layer.name!r} on)"
                )
            elif isinstance(layer, Conv) and layer.groups > 1:
                reason = f"{layer.name!r} is a grouped convolution, whose channels cannot be reordered"
        if id(layer) in hidden:
            if reason is None:
                shareable.append(layer.name)
            else:
                left_alone[layer.name] = reason
        if reason is None and len(net.consumers(layer.name)) > 1:
            reason = f"it is after {layer.name!r}, whose output feeds several layers"
    return shareable, left_alone


def greedy_match(score: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """One-to-one matching: take eligible pairs by decreasing score (ties: lowest row, then column)."""
    from codec import kernels

    return kernels.greedy_match(
        np.ascontiguousarray(score, np.float64), np.ascontiguousarray(eligible, np.uint8)
    )


@register_pass
@dataclass(frozen=True)
class CommonSubNetworkExtraction(Transform):
    """Find main's neurons equivalent to peer's (same layer; firing agreement >= fire; correlation >= corr;
    all NDG predecessors already in the CSN), one-to-one, to a fixed point; extract them as the frozen
    common sub-network and rewrite main as [CSN neurons] ++ [the rest] per layer. `inputs` says what
    happens to a CSN neuron's weights from non-CSN neurons: fold_mean (into the bias) or drop."""

    name = "csne"
    fire: float = 0.8
    corr: float = 0.8
    cofire: Literal["agreement", "jaccard"] = "agreement"
    inputs: Literal["fold_mean", "drop"] = "fold_mean"
    preds: bool = True
    max_iter: int = 20

    requires = (ActivationAnalysis, NeuronDependenceAnalysis)
    preserves = ()

    def check_options(self) -> None:
        check_fraction(self.name, "fire", self.fire)
        if not -1.0 <= self.corr <= 1.0:
            raise ConfigError(f"csne: option corr={self.corr} is impossible; a correlation lies in [-1, 1]")
        if self.max_iter < 1:
            raise ConfigError(f"csne: option max_iter={self.max_iter} must be at least 1")

    def requires_module(self, module: EnsembleModule) -> None:
        if not module.has_peer:
            raise PassError("csne needs two members: main and a peer (codec opt ... --peer peer.onnx)")

    def find(self, module: EnsembleModule, am: AnalysisManagerProtocol) -> tuple[CSN, int]:
        self.requires_module(module)
        acts = am.get(ActivationAnalysis, module)
        main, pair = module.main, acts.pair
        for member in (main, module.peer):
            empty = [l.name for l in member.hidden_layers() if l.num_neurons == 0]
            if empty:
                # nothing to match and nothing to share above it; lift refuses such layers, but a
                # network built in Python can hold one
                raise PassError(
                    f"csne: {member.name}'s hidden layer {empty[0]!r} has no neurons; remove it first"
                )
        ndg = am.get(NeuronDependenceAnalysis, module)[module.main_name] if self.preds else None
        hidden = main.hidden_layers()
        left_alone = shareable_prefix(main)[1]
        criteria = {}
        for layer in hidden:
            if self.cofire == "agreement":
                together = pair.agreement(layer.name)
            else:
                m, p = pair.main.layers[layer.name], pair.peer.layers[pair.peer_layer[layer.name]]
                both = pair.cross[layer.name].cofire
                with np.errstate(divide="ignore", invalid="ignore"):
                    together = np.nan_to_num(both / (m.fire[:, None] + p.fire[None, :] - both))
            correlation = pair.correlation(layer.name)
            criteria[layer.name] = (
                together,
                correlation,
                (together >= self.fire) & (correlation >= self.corr),
            )
        matches: dict[str, np.ndarray] = {l.name: np.full(l.num_neurons, -1, np.int64) for l in hidden}
        # `iteration` is read after the loop (the number of iterations run): hence the noqa
        for iteration in range(1, self.max_iter + 1):  # noqa: B007
            changed = False
            below: np.ndarray | None = None  # CSN membership of the layer below (None: the network input)
            for layer in hidden:
                together, correlation, eligible = criteria[layer.name]
                eligible = eligible.copy()
                if layer.name in left_alone:
                    eligible[:] = False
                if below is not None:
                    if not below.any():
                        eligible[:] = False
                    elif ndg is not None:
                        preds = ndg.predecessors(layer.name)
                        ok = np.array([bool(below[p].all()) for p in preds], dtype=bool)
                        eligible &= ok[:, None]
                match = greedy_match(correlation, eligible)
                if not np.array_equal(match, matches[layer.name]):
                    matches[layer.name] = match
                    changed = True
                below = match >= 0
            if not changed:
                break
        layers = []
        for layer in hidden:
            together, correlation, _ = criteria[layer.name]
            match = matches[layer.name]
            rows = np.flatnonzero(match >= 0)
            cols = match[rows]
            layers.append(CSNLayer(layer.name, rows, cols, together[rows, cols], correlation[rows, cols]))
        options = {
            "fire": self.fire,
            "corr": self.corr,
            "cofire": self.cofire,
            "inputs": self.inputs,
            "preds": self.preds,
        }
        return CSN(layers, self.inputs, options), iteration

    def run(self, module: EnsembleModule, am: AnalysisManagerProtocol) -> PassResult:
        csn, iterations = self.find(module, am)
        acts = am.get(ActivationAnalysis, module)
        main = module.main
        details = {
            "iterations": iterations,
            "csn_per_layer": csn.sizes,
            "csn_total": csn.total,
            "csn_fraction_per_layer": {
                # a zero-width layer (possible in a network built in Python) has no CSN share, not a
                # ZeroDivisionError
                l.name: round(l.size / max(main.layer(l.name).num_neurons, 1), 4)
                for l in csn.layers
            },
            "main_hidden_neurons": sum(l.num_neurons for l in main.hidden_layers()),
        }
        left_alone = shareable_prefix(main)[1]
        if left_alone:
            details["left_alone"] = left_alone
        if csn.total == 0:
            details["note"] = "no equivalent neurons: the CSN is empty and main is unchanged"
            # the members are unchanged, but the module now holds a (empty) CSN: that is a modification
            return PassResult(module.replace(csn=csn), True, details)
        means = {name: s.mean for name, s in acts.members[module.main_name].layers.items()}
        rewritten = rewrite_main(main, csn, means)
        csn.network = csn_network(rewritten, csn)
        details["csn_parameters"] = csn.network.num_parameters
        members = dict(module.members)
        members[module.main_name] = rewritten
        return PassResult(module.replace(members=members, csn=csn), True, details)
