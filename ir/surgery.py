"""Neuron surgery on NetworkIR: keep (and reorder) a subset of a layer's neurons, reshaping the tensors of
the layer and of the compute layers that consume it. This is where DNE removes a neuron.

On a DAG a layer's neurons may be tied to other layers' by residual Adds (`NetworkIR.tied_group`): the
selection then applies to every layer of the group at once (rows of each compute layer, the width of
each Add), and to the input columns of every compute layer reading any of them, through Pools, Flattens
and Concats (`NetworkIR.neuron_owners` says which input column is which neuron).
"""

from __future__ import annotations

import numpy as np

from codec.ir.network import Add, Conv, NetworkIR, is_compute


def removal_blocker(net: NetworkIR, layer_name: str) -> str | None:
    """Why `layer_name`'s neurons (with those tied to them) cannot be removed or reordered, or None.

    The output layer's neurons are the network's outputs. A grouped convolution's filters (and its input
    channels) are split into equal groups: removing one would leave unequal groups, which ONNX cannot
    express, so neither the neurons of a grouped convolution nor those feeding one are touched."""
    group = net.tied_group(layer_name)
    output = net.neuron_layers()[-1].name
    if output in group:
        return (
            "it is the output layer"
            if output == layer_name
            else f"it is tied to the output layer {output!r} by an Add"
        )
    members = set(group)
    for name in group:
        layer = net.layer(name)
        if isinstance(layer, Conv) and layer.groups > 1:
            return (
                f"{name!r} is a grouped convolution (groups={layer.groups}): removing a channel would "
                "leave unequal groups"
            )
    for layer in net.compute_layers():
        if isinstance(layer, Conv) and layer.groups > 1:
            owners, _ = net.neuron_owners(net.inputs_of(layer.name)[0])
            if members & set(owners.tolist()):
                return (
                    f"its neurons feed the grouped convolution {layer.name!r} (groups={layer.groups}), "
                    "whose groups would become unequal"
                )
    return None


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
    width = layer.num_neurons
    if len(keep) == width and np.array_equal(keep, np.arange(width)):
        return  # the identity: nothing moves (CSNE's rewrite asks for it on layers without CSN neurons)
    blocker = removal_blocker(net, layer_name)
    if blocker is not None:
        raise ValueError(f"cannot select neurons of layer {layer_name!r}: {blocker}")
    if not net.is_chain:
        _select_tied(net, layer_name, keep)
        return
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


def _select_tied(net: NetworkIR, layer_name: str, keep: np.ndarray) -> None:
    """`select_neurons` on a DAG: the whole tied group, and every compute layer reading any of it."""
    group = net.tied_group(layer_name)
    width = net.layer(layer_name).num_neurons
    if len(keep) == 0:
        raise ValueError(f"cannot remove every neuron of layer {layer_name!r}")
    if len(np.unique(keep)) != len(keep) or keep.min() < 0 or keep.max() >= width:
        raise ValueError(f"invalid neuron selection for layer {layer_name!r}")
    shapes = net.shape_map()
    owners = {c.name: net.neuron_owners(net.inputs_of(c.name)[0], shapes) for c in net.compute_layers()}
    members = set(group)
    for name in group:
        layer = net.layer(name)
        if is_compute(layer):
            layer.weight = np.ascontiguousarray(layer.weight[keep])
            layer.bias = np.ascontiguousarray(layer.bias[keep])
            layer.roles = np.ascontiguousarray(layer.roles[keep])
        elif isinstance(layer, Add):
            layer.num_neurons = len(keep)
    for consumer in net.compute_layers():
        layers, index = owners[consumer.name]
        if members & set(layers.tolist()):
            # Dense (out, in) and Conv (out, in, kh, kw) both index their inputs on axis 1
            consumer.weight = np.ascontiguousarray(
                consumer.weight[:, _kept_columns(layers, index, members, keep)]
            )


def _kept_columns(layers: np.ndarray, index: np.ndarray, members: set[str], keep: np.ndarray) -> np.ndarray:
    """Input columns after the selection: each run of columns owned by one tied layer keeps its neurons
    `keep`, in that order (a neuron's H*W columns stay together); other columns are untouched."""
    parts, start = [], 0
    while start < len(layers):
        end = start
        while end < len(layers) and layers[end] == layers[start]:
            end += 1
        run = np.arange(start, end)
        if layers[start] in members:
            owner = index[start:end]
            parts.extend(run[owner == n] for n in keep)
        else:
            parts.append(run)
        start = end
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)
