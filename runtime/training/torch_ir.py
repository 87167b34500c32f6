"""NetworkIR <-> torch: train any lifted member, with frozen shared neurons.

`IRModule(net)` is an `nn.Module` computing `net`. In every compute layer the neurons whose role is
FROZEN_SHARED come first (that is how CSNE and grow lay layers out) and are held as buffers: they get no
gradient and no optimizer state. The remaining rows are trainable parameters. `to_network()` writes the
current weights back into a NetworkIR with the same roles, ready to lower to ONNX.

For classifiers the module returns logits (the output layer's softmax is left to the loss) unless
`probabilities=True`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from codec.errors import ConfigError, ShapeError
from codec.ir.network import (
    INPUT,
    Activation,
    Add,
    Concat,
    Conv,
    Dense,
    Flatten,
    NetworkIR,
    Pool,
    Role,
    is_compute,
)


def activation(kind: str, alpha: float, z: torch.Tensor) -> torch.Tensor:
    if kind == "identity":
        return z
    if kind == "relu":
        return F.relu(z)
    if kind == "leaky_relu":
        return F.leaky_relu(z, alpha)
    if kind == "sigmoid":
        return torch.sigmoid(z)
    if kind == "tanh":
        return torch.tanh(z)
    if kind == "gelu":
        return F.gelu(z)
    if kind == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if kind == "silu":
        return F.silu(z)
    if kind == "elu":
        return F.elu(z, alpha)
    if kind == "softplus":
        return F.softplus(z)
    if kind == "hardswish":
        return F.hardswish(z)
    if kind == "softmax":
        return F.softmax(z, dim=1)
    raise ValueError(f"unknown activation {kind!r}")


def frozen_count(layer: Dense | Conv) -> int:
    """Number of leading FROZEN_SHARED neurons; they must form a prefix of the layer."""
    frozen = layer.roles == Role.FROZEN_SHARED
    k = int(frozen.sum())
    if k and not frozen[:k].all():
        raise ShapeError(f"layer {layer.name!r}: frozen shared neurons must come first (run CSNE's rewrite)")
    return k


class IRLayer(nn.Module):
    """One compute layer: frozen rows as buffers, trainable rows as parameters."""

    def __init__(self, layer: Dense | Conv):
        super().__init__()
        self.kind = "conv" if isinstance(layer, Conv) else "dense"
        self.activation = layer.activation.kind
        self.alpha = layer.activation.alpha
        self.k = frozen_count(layer)
        weight = torch.from_numpy(np.array(layer.weight, dtype=np.float32))
        bias = torch.from_numpy(np.array(layer.bias, dtype=np.float32))
        self.register_buffer("frozen_weight", weight[: self.k].clone())
        self.register_buffer("frozen_bias", bias[: self.k].clone())
        self.weight = nn.Parameter(weight[self.k :].clone())
        self.bias = nn.Parameter(bias[self.k :].clone())
        self.groups = 1
        if isinstance(layer, Conv):
            self.groups = layer.groups
            if self.groups > 1 and self.k:
                raise ShapeError(
                    f"layer {layer.name!r}: a grouped convolution cannot hold frozen shared neurons"
                )
            self.stride = tuple(layer.strides)
            self.dilation = tuple(layer.dilations)
            top, left, bottom, right = layer.pads
            self.symmetric = top == bottom and left == right
            self.padding = (top, left) if self.symmetric else 0
            self.pad4 = (left, right, top, bottom)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        if self.kind == "dense":
            return F.linear(x, weight, bias)
        if not self.symmetric:
            x = F.pad(x, self.pad4)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    def pre_activation(self, x: torch.Tensor, frozen_out: torch.Tensor | None = None) -> torch.Tensor:
        parts = []
        if self.k:
            if frozen_out is None:
                with torch.no_grad():
                    frozen_out = self.linear(x, self.frozen_weight, self.frozen_bias)
            parts.append(frozen_out)
        if self.weight.shape[0]:
            parts.append(self.linear(x, self.weight, self.bias))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def forward(self, x: torch.Tensor, apply_softmax: bool = True) -> torch.Tensor:
        z = self.pre_activation(x)
        if self.activation == "softmax" and not apply_softmax:
            return z
        return activation(self.activation, self.alpha, z)


class IRPool(nn.Module):
    def __init__(self, layer: Pool):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.layer
        if p.is_global:
            return x.mean(dim=(2, 3), keepdim=True) if p.mode == "avg" else x.amax(dim=(2, 3), keepdim=True)
        top, left, bottom, right = p.pads
        if top != bottom or left != right:
            value = float("-inf") if p.mode == "max" else 0.0
            x = F.pad(x, (left, right, top, bottom), value=value)
            padding = (0, 0)
        else:
            padding = (top, left)
        if p.mode == "max":
            return F.max_pool2d(x, p.kernel_shape, p.strides, padding, ceil_mode=p.ceil_mode)
        return F.avg_pool2d(
            x,
            p.kernel_shape,
            p.strides,
            padding,
            ceil_mode=p.ceil_mode,
            count_include_pad=p.count_include_pad,
        )


class IRAdd(nn.Module):
    """A residual Add: the sum of its two sources, then its activation."""

    def __init__(self, layer: Add):
        super().__init__()
        self.activation = layer.activation.kind
        self.alpha = layer.activation.alpha

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return activation(self.activation, self.alpha, a + b)


class IRConcat(nn.Module):
    def forward(self, *parts: torch.Tensor) -> torch.Tensor:
        return torch.cat(parts, dim=1)


class IRModule(nn.Module):
    """An nn.Module computing a NetworkIR (a chain or a DAG); frozen shared neurons are buffers, the rest
    parameters."""

    def __init__(self, net: NetworkIR, probabilities: bool = False):
        super().__init__()
        self.template = net.copy()
        self.probabilities = probabilities
        self.blocks = nn.ModuleList()
        for layer in net.layers:
            if is_compute(layer):
                self.blocks.append(IRLayer(layer))
            elif isinstance(layer, Pool):
                self.blocks.append(IRPool(layer))
            elif isinstance(layer, Flatten):
                self.blocks.append(nn.Flatten())
            elif isinstance(layer, Add):
                self.blocks.append(IRAdd(layer))
            elif isinstance(layer, Concat):
                self.blocks.append(IRConcat())
            else:  # pragma: no cover - NetworkIR has no other layer kinds
                raise TypeError(type(layer).__name__)
        self.input_shape = tuple(net.input_shape)
        self.is_chain = net.is_chain
        self.names = [layer.name for layer in net.layers]
        self.sources = [net.inputs_of(layer.name) for layer in net.layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_chain:
            return self._forward_dag(x)
        h = x
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            h = (
                block(h, apply_softmax=self.probabilities)
                if isinstance(block, IRLayer) and i == last
                else block(h)
            )
        return h

    def _forward_dag(self, x: torch.Tensor) -> torch.Tensor:
        values = {INPUT: x}
        last = len(self.blocks) - 1
        for i, (block, name, sources) in enumerate(zip(self.blocks, self.names, self.sources)):
            ins = [values[source] for source in sources]
            if isinstance(block, IRLayer):
                h = block(ins[0], apply_softmax=self.probabilities or i != last)
            elif isinstance(block, (IRAdd, IRConcat)):
                h = block(*ins)
            else:
                h = block(ins[0])
            values[name] = h
        return h

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def to_network(self, name: str | None = None) -> NetworkIR:
        """The current weights as a NetworkIR (frozen rows first, roles kept)."""
        net = self.template.copy()
        if name:
            net.name = name
        compute = [l for l in net.layers if is_compute(l)]
        blocks = [b for b in self.blocks if isinstance(b, IRLayer)]
        for layer, block in zip(compute, blocks):
            layer.weight = torch.cat([block.frozen_weight, block.weight.detach()]).cpu().numpy().copy()
            layer.bias = torch.cat([block.frozen_bias, block.bias.detach()]).cpu().numpy().copy()
        return net


def reinitialise_trainable(module: IRModule, seed: int) -> None:
    """Fresh random init of every trainable row, as torch initialises nn.Linear / nn.Conv2d.

    Kaiming-uniform with a = sqrt(5): U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases, where
    fan_in counts every input of the row (shared and own), so fresh neurons start at the usual scale.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in module.blocks:
            if isinstance(block, IRLayer) and block.weight.shape[0]:
                fan_in = int(np.prod(block.weight.shape[1:]))
                bound = 1.0 / math.sqrt(fan_in)
                block.weight.copy_(torch.rand(block.weight.shape, generator=generator) * 2 * bound - bound)
                block.bias.copy_(torch.rand(block.bias.shape, generator=generator) * 2 * bound - bound)


# torch nn.Sequential (the zoo's modules, a TreeNet's trunk and branches) -> NetworkIR, without an ONNX
# round trip: the coupled pipeline builds each member's IR from its trained modules this way.
_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.Sigmoid: "sigmoid", nn.Tanh: "tanh"}


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def sequential_to_network(
    model: nn.Sequential,
    input_shape: Sequence[int],
    names: Sequence[str],
    *,
    frozen_modules: int = 0,
    name: str = "member",
) -> NetworkIR:
    """A classifier Sequential (logits out) as a NetworkIR outputting probabilities (softmax appended).

    Activations become the activation of the compute layer before them (across max pools and flattens,
    which commute with monotone activations); Dropout is dropped (inference). Compute layers made from
    the first `frozen_modules` modules get Role.FROZEN_SHARED on every neuron.

    Raises:
        ConfigError: a module codec cannot express (named), or a network that does not end in a weighted
            layer.
    """
    layers: list = []
    frozen = np.int8(Role.FROZEN_SHARED)

    def roles(index: int, count: int):
        return np.full(count, frozen, np.int8) if index < frozen_modules else None

    for index, (module, label) in enumerate(zip(model, names)):
        kind = type(module)
        if kind is nn.Conv2d:
            if module.groups != 1 or isinstance(module.padding, str) or module.padding_mode != "zeros":
                raise ConfigError(
                    f"cannot export {label}: only zero-padded Conv2d with groups=1 and numeric padding"
                )
            weight = module.weight.detach().cpu().numpy()
            bias = (
                module.bias.detach().cpu().numpy()
                if module.bias is not None
                else np.zeros(weight.shape[0], np.float32)
            )
            ph, pw = _pair(module.padding)
            layers.append(
                Conv(
                    label,
                    weight,
                    bias,
                    Activation(),
                    roles(index, weight.shape[0]),
                    strides=_pair(module.stride),
                    pads=(ph, pw, ph, pw),
                    dilations=_pair(module.dilation),
                )
            )
        elif kind is nn.Linear:
            weight = module.weight.detach().cpu().numpy()
            bias = (
                module.bias.detach().cpu().numpy()
                if module.bias is not None
                else np.zeros(weight.shape[0], np.float32)
            )
            layers.append(Dense(label, weight, bias, Activation(), roles(index, weight.shape[0])))
        elif kind in (nn.MaxPool2d, nn.AvgPool2d):
            kernel = _pair(module.kernel_size)
            stride = _pair(module.stride if module.stride is not None else module.kernel_size)
            ph, pw = _pair(module.padding)
            if kind is nn.MaxPool2d:
                if _pair(module.dilation) != (1, 1) or module.return_indices:
                    raise ConfigError(f"cannot export {label}: dilated max pooling or pooling indices")
                layers.append(
                    Pool(label, "max", kernel, stride, (ph, pw, ph, pw), ceil_mode=bool(module.ceil_mode))
                )
            else:
                if module.divisor_override is not None:
                    raise ConfigError(f"cannot export {label}: average pooling with divisor_override")
                layers.append(
                    Pool(
                        label,
                        "avg",
                        kernel,
                        stride,
                        (ph, pw, ph, pw),
                        ceil_mode=bool(module.ceil_mode),
                        count_include_pad=bool(module.count_include_pad),
                    )
                )
        elif kind is nn.Flatten:
            if module.start_dim != 1 or module.end_dim != -1:
                raise ConfigError(f"cannot export {label}: Flatten must flatten dims 1..-1")
            layers.append(Flatten(label))
        elif kind in _ACTIVATION_MODULES:
            alpha = float(module.negative_slope) if kind is nn.LeakyReLU else 0.01
            _fold_activation(layers, Activation(_ACTIVATION_MODULES[kind], alpha), label)
        elif kind in (nn.Dropout, nn.Identity):
            continue
        else:
            raise ConfigError(f"cannot export {label} ({kind.__name__}) to codec's IR")
    if not layers or not is_compute(layers[-1]) or layers[-1].activation.kind != "identity":
        raise ConfigError(
            "a fused classifier ensemble needs members ending in a Linear or Conv2d layer that outputs logits"
        )
    layers[-1].activation = Activation("softmax")
    return NetworkIR(name, "input", "output", tuple(int(d) for d in input_shape), layers)


def _fold_activation(layers: list, act: Activation, label: str) -> None:
    """Put `act` on the last compute layer, past the max pools and flattens after it (they commute)."""
    for layer in reversed(layers):
        if is_compute(layer):
            if layer.activation.kind != "identity":
                raise ConfigError(
                    f"cannot export {label}: {layer.name} already has the activation {layer.activation.kind}"
                )
            layer.activation = act
            return
        if isinstance(layer, Pool) and layer.mode == "max" or isinstance(layer, Flatten):
            continue
        raise ConfigError(
            f"cannot export {label}: an activation after {layer.name} ({layer.mode} pool) does not "
            "commute into the layer before it"
        )
    raise ConfigError(f"cannot export {label}: an activation with no weighted layer before it")
