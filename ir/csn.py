"""The common sub-network (CSN): neurons of main matched to equivalent neurons of peer, layer by layer.

CSN neurons take input only from CSN neurons of the layer below (the network input counts as fully
shared), so the CSN is a self-contained sub-network that can be computed once and shared by every member.
A CSN neuron's weights from non-CSN neurons are handled by `inputs`:
- `fold_mean` (default): their mean contribution on the calibration data is folded into the bias (a
  channel's mean activation stands for every position of its map);
- `drop`: they are removed (the literal reading of CODE).

`csn_network` builds the CSN as a NetworkIR chain (hidden layers only, the last CSN layer as output), and
`rewrite_main` reorders main's layers as [CSN neurons (frozen, shared)] ++ [the rest], with the CSN
neurons' weights exactly those of the CSN network, so both compute identical CSN activations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from codec.ir.network import Conv, NetworkIR, Role
from codec.ir.surgery import select_neurons


@dataclass
class CSNLayer:
    name: str  # main's layer name
    main: np.ndarray  # indices of main's neurons in the CSN (in CSN order)
    peer: np.ndarray  # the peer neuron each is matched to
    agreement: np.ndarray  # firing agreement of each matched pair
    correlation: np.ndarray  # activation correlation of each matched pair

    @property
    def size(self) -> int:
        return int(len(self.main))


@dataclass
class CSN:
    layers: list[CSNLayer]  # every hidden layer of main, in order (empty ones included)
    inputs: str = "fold_mean"
    options: dict = field(default_factory=dict)
    network: NetworkIR | None = None  # the CSN as a chain (see csn_network), once extracted

    @property
    def sizes(self) -> dict[str, int]:
        return {layer.name: layer.size for layer in self.layers}

    @property
    def total(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def depth(self) -> int:
        """Number of leading hidden layers that hold CSN neurons."""
        depth = 0
        for layer in self.layers:
            if layer.size == 0:
                break
            depth += 1
        return depth

    @classmethod
    def from_dict(cls, data: dict) -> CSN:
        """Rebuild from `to_dict()` output (csn.json); the network is rebuilt with `csn_network`."""
        layers = []
        for l in data["layers"]:
            layers.append(
                CSNLayer(
                    l["name"],
                    np.asarray(l["main"], np.int64),
                    np.asarray(l["peer"], np.int64),
                    np.asarray(l.get("agreement", []), np.float64),
                    np.asarray(l.get("correlation", []), np.float64),
                )
            )
        return cls(layers, data.get("inputs", "fold_mean"), dict(data.get("options", {})))

    def to_dict(self) -> dict:
        return {
            "inputs": self.inputs,
            "options": self.options,
            "total": self.total,
            "layers": [
                {
                    "name": l.name,
                    "size": l.size,
                    "main": l.main.tolist(),
                    "peer": l.peer.tolist(),
                    "agreement": np.round(l.agreement, 6).tolist(),
                    "correlation": np.round(l.correlation, 6).tolist(),
                    "mean_agreement": float(l.agreement.mean()) if l.size else None,
                    "mean_correlation": float(l.correlation.mean()) if l.size else None,
                }
                for l in self.layers
            ],
        }


def _fold_inputs(
    net: NetworkIR, layer_name: str, keep_inputs: np.ndarray, input_means: np.ndarray | None, inputs: str
) -> None:
    """Restrict `layer_name`'s inputs to previous-layer neurons `keep_inputs` (in order), folding the rest."""
    layer = net.layer(layer_name)
    previous = net.previous_compute(layer_name)
    owner = net.input_neuron_map(layer_name)
    dropped = np.setdiff1d(np.arange(previous.num_neurons), keep_inputs)
    if inputs == "fold_mean" and len(dropped) and input_means is not None:
        if isinstance(layer, Conv):
            # each dropped channel contributes mean * sum of its kernel (positions inside the padding aside)
            layer.bias = layer.bias + layer.weight[:, dropped].sum(axis=(2, 3)) @ input_means[dropped].astype(
                np.float32
            )
        else:
            feature_means = input_means[owner].astype(np.float32)
            mask = np.isin(owner, dropped)
            layer.bias = layer.bias + layer.weight[:, mask] @ feature_means[mask]
    columns = (
        np.concatenate([np.flatnonzero(owner == n) for n in keep_inputs])
        if len(keep_inputs)
        else np.zeros(0, np.int64)
    )
    # zero, not cut: main keeps its full width; csn_network cuts the columns afterwards
    kept = np.zeros(layer.weight.shape[1], bool)
    kept[columns] = True
    layer.weight[:, ~kept] = 0.0


def rewrite_main(main: NetworkIR, csn: CSN, means: dict[str, np.ndarray] | None = None) -> NetworkIR:
    """Main with each hidden layer ordered [CSN neurons] ++ [the rest], CSN neurons marked FROZEN_SHARED and
    their weights from non-CSN neurons folded or dropped per `csn.inputs` (`means`: per-layer mean
    activations on the calibration data, needed by `fold_mean`)."""
    net = main.copy()
    means = means or {}
    reordered_means: dict[str, np.ndarray] = {}
    for spec in csn.layers:
        n = net.layer(spec.name).num_neurons
        order = np.concatenate([spec.main, np.setdiff1d(np.arange(n), spec.main)]).astype(np.int64)
        select_neurons(net, spec.name, order)  # rows of the layer and columns of its consumer follow
        net.layer(spec.name).roles[: spec.size] = Role.FROZEN_SHARED
        if spec.name in means:
            reordered_means[spec.name] = np.asarray(means[spec.name])[order]
    previous = None
    for spec in csn.layers:
        if previous is not None and spec.size:
            _restrict_rows_inputs(
                net,
                spec.name,
                np.arange(spec.size),
                np.arange(previous.size),
                reordered_means.get(previous.name),
                csn.inputs,
            )
        previous = spec
    return net


def _restrict_rows_inputs(net, layer_name, rows, keep_inputs, input_means, inputs) -> None:
    """Apply `_fold_inputs` to some rows (the CSN neurons) of a layer only."""
    layer = net.layer(layer_name)
    full_w, full_b = layer.weight.copy(), layer.bias.copy()
    _fold_inputs(net, layer_name, keep_inputs, input_means, inputs)
    new_w, new_b = layer.weight, layer.bias
    full_w[rows], full_b[rows] = new_w[rows], new_b[rows]
    layer.weight, layer.bias = full_w, full_b


def csn_network(rewritten_main: NetworkIR, csn: CSN) -> NetworkIR:
    """The CSN alone, as a chain over its first `csn.depth` layers, from a main rewritten by `rewrite_main`.

    Structural layers between them are kept; the output is the last CSN layer's activations."""
    if csn.depth == 0:
        raise ValueError("the CSN is empty")
    net = rewritten_main.copy()
    layers = net.layers[: net.index(csn.layers[csn.depth - 1].name) + 1]
    sub = NetworkIR(
        f"{rewritten_main.name}.csn",
        rewritten_main.input_name,
        "csn",
        tuple(rewritten_main.input_shape),
        layers,
        {},
    )
    for spec in csn.layers[: csn.depth]:
        layer = sub.layer(spec.name)
        k = spec.size
        if sub.next_compute(spec.name) is not None:
            select_neurons(sub, spec.name, np.arange(k))
        else:
            layer.weight, layer.bias, layer.roles = layer.weight[:k], layer.bias[:k], layer.roles[:k]
    return sub
