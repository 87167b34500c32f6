"""Constant Neuron Folding: a worked example of a third-party codec pass.

The pass reads the cached activation profile (`ActivationAnalysis`), finds hidden neurons whose output is
constant over the calibration inputs, folds that constant into the next layer's bias, and removes the
neurons with codec's own neuron surgery (`codec.ir.surgery.select_neurons`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from codec.errors import ConfigError
from codec.ir.network import Conv
from codec.ir.surgery import consumer_columns, select_neurons
from codec.passes.activations import ActivationAnalysis
from codec.passes.base import EnsembleModule, PassResult, Transform


@dataclass(frozen=True)
class ConstantNeuronFolding(Transform):
    """Fold hidden neurons whose output is constant (std <= tolerance) on the calibration data into the
    consumer's bias and remove them (Dense consumers; conv channels are left alone)."""

    name = "cnf"
    tolerance: float = 1e-7

    requires = (ActivationAnalysis,)
    preserves = ()
    verify_function = True

    def check_options(self) -> None:
        if self.tolerance < 0:
            raise ConfigError(f"cnf: tolerance={self.tolerance} must not be negative")

    def run(self, module: EnsembleModule, am) -> PassResult:
        acts = am.get(ActivationAnalysis, module)
        members, folded, modified = {}, {}, False
        for name, net in module.members.items():
            new = net.copy()
            folded[name] = {}
            for layer in net.hidden_layers():
                stats = acts.members[name].layers[layer.name]
                nxt = new.next_compute(layer.name)
                if isinstance(layer, Conv) or isinstance(nxt, Conv):
                    continue
                constant = np.flatnonzero(stats.std <= self.tolerance)
                if len(constant) == 0 or len(constant) == layer.num_neurons:
                    continue
                columns = consumer_columns(new, layer.name, constant)
                nxt.bias = nxt.bias + nxt.weight[:, columns] @ stats.mean[constant].astype(np.float32)
                select_neurons(new, layer.name, np.setdiff1d(np.arange(layer.num_neurons), constant))
                folded[name][layer.name] = int(len(constant))
                modified = True
            members[name] = new
        return PassResult(module.replace(members=members), modified, {"folded_per_layer": folded})
