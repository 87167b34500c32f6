"""The FLOP model: multiply-accumulates per layer and the training work they imply (machine independent)."""

from __future__ import annotations

import numpy as np


def layer_macs(net) -> list[dict]:
    """Multiply-accumulates per example of each compute layer of a NetworkIR, split into the layer's own
    neurons and its frozen-shared (CSN) ones."""
    from codec.ir.network import Conv, Dense, Role

    out = []
    shapes = net.shape_map()  # by layer name: a DAG's layer may read another layer than the one before it
    for layer in net.layers:
        if not isinstance(layer, (Dense, Conv)):
            continue
        frozen = int(np.sum(layer.roles == Role.FROZEN_SHARED))
        if isinstance(layer, Dense):
            per_neuron = layer.in_features
        else:
            _, oh, ow = shapes[layer.name]
            kh, kw = layer.kernel_shape
            per_neuron = (
                layer.weight.shape[1] * kh * kw * oh * ow
            )  # a grouped conv's filter reads in/groups channels
        out.append(
            {
                "layer": layer.name,
                "own": (layer.num_neurons - frozen) * per_neuron,
                "frozen": frozen * per_neuron,
                "neurons": layer.num_neurons,
                "frozen_neurons": frozen,
            }
        )
    return out


def training_work(macs: list[dict], epochs: int, n_train: int, n_val: int, cached: bool) -> float:
    """FLOP estimate of training one member: per epoch 6 FLOP per trainable MAC and training example (forward
    and backward), 2 per frozen MAC when the CSN is recomputed every step, and 2 per MAC for the validation
    pass; plus computing the CSN cache once."""
    own = sum(m["own"] for m in macs)
    frozen = sum(m["frozen"] for m in macs)
    per_epoch = n_train * (6.0 * own + (0.0 if cached else 2.0 * frozen)) + n_val * 2.0 * (own + frozen)
    return float(epochs * per_epoch + (2.0 * frozen * (n_train + n_val) if cached else 0.0))
