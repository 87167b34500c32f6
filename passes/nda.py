"""NDA, Neuron Dependence Analysis: the Neuron Dependence Graph (NDG) of each member.

An edge runs from neuron j of layer l-1 to neuron i of layer l when they are connected (some weight
between them is non-zero) and fire together often enough. How "together" is counted is an option:
- `conditional` (default): of the inputs on which j fires, the fraction on which i fires too;
- `joint`: the fraction of all inputs on which both fire;
- `jaccard`: both fire / either fires.
The first hidden layer has no NDG predecessors: the network input counts as fully shared (CODE).

The result keeps each layer's edges as arrays (what CSNE reads); `to_networkx()` builds the networkx
DiGraph (nodes `(layer, index)`, edge attribute `weight` = the co-firing fraction), e.g. for GraphML.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from codec.ir.network import Conv, NetworkIR
from codec.passes.activations import ActivationAnalysis
from codec.passes.base import Analysis, AnalysisManagerProtocol, EnsembleModule, check_fraction
from codec.passes.registry import register_pass
from codec.runtime.execution.profile import ActivationStats


@dataclass
class LayerEdges:
    layer: str
    previous: str
    rows: np.ndarray  # neuron index in `layer`
    cols: np.ndarray  # neuron index in `previous`
    weights: np.ndarray  # co-firing fraction


@dataclass
class NeuronDependenceGraph:
    member: str
    layers: dict[str, LayerEdges] = field(default_factory=dict)  # by the later layer's name
    sizes: dict[str, int] = field(default_factory=dict)  # neurons per hidden layer, in order

    @property
    def num_edges(self) -> int:
        return sum(len(e.rows) for e in self.layers.values())

    def predecessors(self, layer: str) -> list[np.ndarray]:
        """For each neuron of `layer`, the indices of its NDG predecessors in the previous layer."""
        n = self.sizes[layer]
        edges = self.layers.get(layer)
        if edges is None:
            return [np.zeros(0, np.int64) for _ in range(n)]
        order = np.argsort(edges.rows, kind="stable")
        rows, cols = edges.rows[order], edges.cols[order]
        bounds = np.searchsorted(rows, np.arange(n + 1))
        return [cols[bounds[i] : bounds[i + 1]] for i in range(n)]

    # Upper bounds of a node's and an edge's GraphML text (ids are "layer/index"), for the output budget.
    _NODE_BYTES, _EDGE_BYTES = 48, 96

    def graphml_bytes(self) -> int:
        """An upper estimate of `write_graphml`'s file size, known before writing anything."""
        name = max((len(n) for n in self.sizes), default=0)
        nodes = sum(self.sizes.values())
        return nodes * (self._NODE_BYTES + 2 * name) + self.num_edges * (self._EDGE_BYTES + 2 * name) + 1024

    def write_graphml(self, path) -> None:
        """Write the graph as GraphML (what `networkx.write_graphml(to_networkx())` writes, node ids
        "layer/index"), streamed: memory stays O(one layer's edge arrays) however many edges there are,
        where building the networkx graph first took gigabytes for two 2000-wide layers."""
        from xml.sax.saxutils import escape, quoteattr

        with open(path, "w", encoding="utf-8") as f:
            f.write(
                "<?xml version='1.0' encoding='utf-8'?>\n"
                '<graphml xmlns="http://graphml.graphdrawing.org/xmlns" '
                'xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
                'xsi:schemaLocation="http://graphml.graphdrawing.org/xmlns '
                'http://graphml.graphdrawing.org/xmlns/1.0/graphml.xsd">\n'
                '  <key id="d2" for="edge" attr.name="weight" attr.type="double" />\n'
                '  <key id="d1" for="node" attr.name="layer" attr.type="string" />\n'
                '  <key id="d0" for="graph" attr.name="member" attr.type="string" />\n'
                '  <graph edgedefault="directed">\n'
                f'    <data key="d0">{escape(self.member)}</data>\n'
            )
            for layer, n in self.sizes.items():
                text = escape(layer)
                f.writelines(
                    f'    <node id={quoteattr(f"{layer}/{i}")}>\n      <data key="d1">{text}</data>\n  '
                    "  </node>\n"
                    for i in range(n)
                )
            for e in self.layers.values():
                f.writelines(
                    f"    <edge source={quoteattr(f'{e.previous}/{j}')} "
                    f"target={quoteattr(f'{e.layer}/{i}')}>\n"
                    f'      <data key="d2">{float(w)!r}</data>\n    </edge>\n'
                    for i, j, w in zip(e.rows.tolist(), e.cols.tolist(), e.weights.tolist())
                )
            f.write("  </graph>\n</graphml>\n")

    def to_networkx(self):
        import networkx as nx

        graph = nx.DiGraph(member=self.member)
        for layer, n in self.sizes.items():
            graph.add_nodes_from(((layer, i) for i in range(n)), layer=layer)
        for e in self.layers.values():
            graph.add_weighted_edges_from(
                ((e.previous, int(j)), (e.layer, int(i)), float(w))
                for i, j, w in zip(e.rows, e.cols, e.weights)
            )
        return graph


def connectivity(net: NetworkIR, layer_name: str) -> np.ndarray:
    """(neurons, previous-layer neurons) bool: True where some weight links the two."""
    layer = net.layer(layer_name)
    previous = net.previous_neuron_layer(layer_name)
    if isinstance(layer, Conv):
        return np.abs(layer.full_weight()).sum(axis=(2, 3)) > 0
    if not net.is_chain:
        owner = net.input_neuron_map(layer_name)
        linked = np.abs(layer.weight) > 0
        return np.stack([linked[:, owner == j].any(axis=1) for j in range(previous.num_neurons)], axis=1)
    # a Dense layer's inputs are channel-major: each previous neuron owns a contiguous run of features
    per_neuron = layer.in_features // previous.num_neurons
    return np.abs(layer.weight).reshape(layer.num_neurons, previous.num_neurons, per_neuron).sum(axis=2) > 0


def cofire_fraction(stats: ActivationStats, layer: str, mode: str) -> np.ndarray:
    s = stats.layers[layer]
    prev = stats.layers[s.previous]
    both = s.cofire.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        if mode == "conditional":
            frac = both / prev.fire[None, :]
        elif mode == "joint":
            frac = both / max(s.count, 1)
        else:
            frac = both / (s.fire[:, None] + prev.fire[None, :] - both)
    return np.nan_to_num(frac, nan=0.0, posinf=0.0)


@register_pass
@dataclass(frozen=True)
class NeuronDependenceAnalysis(Analysis):
    """Build each member's Neuron Dependence Graph: edges between connected neurons of consecutive layers
    whose co-firing fraction (`mode`: conditional, joint or jaccard) is at least `fire`."""

    name = "nda"
    fire: float = 0.5
    mode: Literal["conditional", "joint", "jaccard"] = "conditional"

    def check_options(self) -> None:
        check_fraction(self.name, "fire", self.fire)

    def compute(
        self, module: EnsembleModule, am: AnalysisManagerProtocol
    ) -> dict[str, NeuronDependenceGraph]:
        acts = am.get(ActivationAnalysis, module)
        graphs = {}
        for member, net in module.members.items():
            stats = acts.members[member]
            ndg = NeuronDependenceGraph(member, sizes={l.name: l.num_neurons for l in net.hidden_layers()})
            for layer in net.hidden_layers():
                s = stats.layers[layer.name]
                if s.previous is None:
                    continue
                connected = connectivity(net, layer.name)
                if self.mode == "conditional":
                    from codec import kernels

                    rows, cols, weights = kernels.ndg_edges(
                        s.cofire, stats.layers[s.previous].fire, s.count, self.fire, connected
                    )
                else:
                    fraction = cofire_fraction(stats, layer.name, self.mode)
                    rows, cols = np.nonzero(connected & (fraction >= self.fire))
                    weights = fraction[rows, cols]
                ndg.layers[layer.name] = LayerEdges(layer.name, s.previous, rows, cols, weights)
            graphs[member] = ndg
        return graphs

    def summarize(self, result: dict[str, NeuronDependenceGraph]) -> dict:
        return {
            member: {"edges": g.num_edges, "edges_per_layer": {l: len(e.rows) for l, e in g.layers.items()}}
            for member, g in result.items()
        }
