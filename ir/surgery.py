"""Neuron surgery on NetworkIR: keep (and reorder) a subset of a layer's neurons, reshaping the tensors of
the layer and of the compute layer that consumes it. This is where DNE removes a neuron."""

from __future__ import annotations

import numpy as np

from codec.ir.network import NetworkIR


def consumer_columns(net: NetworkIR, layer_name: str, neurons: np.ndarray) -> np.ndarray:
    """Input-feature indices of the next compute layer that carry `neurons` of `layer_name`, in that order.

    A Dense reading a flattened (C, H, W) map has H*W features per channel neuron; otherwise one each.
    """
    nxt = net.next_compute(layer_name)
    if nxt is None:
        raise ValueError(f"layer {layer_name!r} is the output layer")
    feature_owner = net.input_neuron_map(nxt.name)
    by_neuron = {int(n): np.flatnonzero(feature_owner == n) for n in np.unique(neurons)}
    parts = [by_neuron[int(n)] for n in neurons]
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def select_neurons(net: NetworkIR, layer_name: str, keep: np.ndarray) -> None:
    """Keep only neurons `keep` of hidden layer `layer_name`, in the order given (in place).

    The layer's weight rows, bias and roles are selected, and the consumer's input columns (Dense) or
    input channels (Conv) follow. Removing a neuron whose output is zero on an input leaves the network's
    output on that input unchanged; reordering never changes it.
    """
    keep = np.asarray(keep, dtype=np.int64)
    layer = net.layer(layer_name)
    nxt = net.next_compute(layer_name)
    if nxt is None:
        raise ValueError(f"cannot select neurons of the output layer {layer_name!r}")
    if len(keep) == 0:
        raise ValueError(f"cannot remove every neuron of layer {layer_name!r}")
    if len(np.unique(keep)) != len(keep) or keep.min() < 0 or keep.max() >= layer.num_neurons:
        raise ValueError(f"invalid neuron selection for layer {layer_name!r}")
    columns = consumer_columns(net, layer_name, keep)
    layer.weight = np.ascontiguousarray(layer.weight[keep])
    layer.bias = np.ascontiguousarray(layer.bias[keep])
    layer.roles = np.ascontiguousarray(layer.roles[keep])
    # Dense (out, in) and Conv (out, in, kh, kw) both index their inputs on axis 1
    nxt.weight = np.ascontiguousarray(nxt.weight[:, columns])
