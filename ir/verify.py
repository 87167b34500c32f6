"""The IR verifier: the invariants every NetworkIR must keep, checked after every transform.

Like xDSL's `verify()` after each pass and MLIR's verify-each: a pass that breaks the IR is caught where
it happened, not later when onnxruntime refuses the lowered model. `verify_network(net)` checks

- the input shape: positive sizes, one dimension (features) or three (C, H, W);
- names: every layer has one, and no two layers share it;
- shapes chain: each layer accepts what the one before (or, in a graph, its sources) produces (a Dense
  layer's inputs are the flattened size, a Conv's input channels the channel count, Conv/Pool see a
  (C, H, W) map, no spatial size shrinks to zero, an Add's sources agree, a Concat's agree but for the
  neuron axis);
- compute layers: weight and bias agree on the neuron count, one role per neuron, every role a `Role`,
  weights and biases finite;
- at least one compute layer (the output layer).

`fingerprint(net)` is a digest of everything a NetworkIR holds (weights included): the pass manager
compares fingerprints to catch a transform that edits the members it was given.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import numpy as np

from codec.errors import CodecError
from codec.ir.network import Conv, Dense, Flatten, NetworkIR, Pool, Role, is_compute


class IRVerificationError(CodecError):
    """A NetworkIR breaks an invariant of the IR; the message names the network and the layer."""


def problems(net: NetworkIR) -> list[str]:
    """Every broken invariant of `net`, as phrases naming the layer (empty when `net` is valid)."""
    found: list[str] = []
    shape = tuple(net.input_shape)
    if len(shape) not in (1, 3) or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape):
        found.append(
            f"input shape {list(shape)} is not (features,) or (channels, height, width) of positive sizes"
        )
        return found
    seen: set[str] = set()
    shapes: dict[str, tuple[int, ...]] = {}
    chain_ok = True  # once a link is broken, the shapes after it say nothing more
    for index, layer in enumerate(net.layers):
        label = f"layer {index} ({getattr(layer, 'name', '?')!r})"
        name = getattr(layer, "name", "")
        if not name:
            found.append(f"layer {index} has no name")
        elif name in seen:
            found.append(f"{label}: the name is used by an earlier layer")
        seen.add(name)
        if is_compute(layer):
            found.extend(f"{label}: {p}" for p in _compute_problems(layer))
        if not chain_ok:
            continue
        ins, problem = _input_shapes(net, index, shapes, shape)
        if problem is None:
            out, problem = _next_shape(layer, ins)
        if problem is not None:
            found.append(f"{label}: {problem}")
            chain_ok = False
        else:
            shapes[name] = out
    if not net.compute_layers():
        found.append("no compute layer: a network needs at least its output layer")
    return found


def verify_network(net: NetworkIR) -> None:
    """Raise IRVerificationError (one line, every problem found) if `net` breaks an IR invariant."""
    found = problems(net)
    if found:
        raise IRVerificationError(f"network {net.name!r} is invalid IR: {'; '.join(found)}")


def _compute_problems(layer: Dense | Conv) -> list[str]:
    found = []
    expected_ndim = 2 if isinstance(layer, Dense) else 4
    if layer.weight.ndim != expected_ndim:
        found.append(f"weight has {layer.weight.ndim} dimensions, not {expected_ndim}")
        return found
    neurons = layer.weight.shape[0]
    if neurons == 0:
        found.append("no neurons")
    if layer.bias.shape != (neurons,):
        found.append(f"bias shape {list(layer.bias.shape)} for {neurons} neurons")
    if layer.roles is None or layer.roles.shape != (neurons,):
        found.append(f"{0 if layer.roles is None else len(layer.roles)} roles for {neurons} neurons")
    elif not np.isin(layer.roles, [int(r) for r in Role]).all():
        found.append(f"roles outside {', '.join(r.name for r in Role)}")
    for what, array in (("weight", layer.weight), ("bias", layer.bias)):
        if not np.isfinite(array).all():
            found.append(f"{int((~np.isfinite(array)).sum())} non-finite {what} values")
    return found


def _input_shapes(
    net: NetworkIR, index: int, shapes: dict[str, tuple[int, ...]], input_shape: tuple[int, ...]
) -> tuple[list[tuple[int, ...]], str | None]:
    """The shapes layer `index` reads: the layer before it in a chain, its sources in a graph (a
    NetworkIR with `inputs_of`; a source that is no earlier layer is the network input)."""
    layer = net.layers[index]
    if not hasattr(net, "inputs_of"):
        return [shapes[net.layers[index - 1].name] if index else input_shape], None
    ins = []
    for source in net.inputs_of(layer.name):
        if source in shapes:
            ins.append(shapes[source])
        elif any(other.name == source for other in net.layers):
            return [], f"reads {source!r}, which comes after it"
        else:
            ins.append(input_shape)
    if not ins:
        return [], "reads nothing"
    return ins, None


def _next_shape(layer: Any, ins: list[tuple[int, ...]]) -> tuple[tuple[int, ...], str | None]:
    """The shape `layer` produces from its input shapes `ins`, or the reason it cannot take them."""
    shape = ins[0]
    kind = type(layer).__name__
    if kind == "Add":  # a residual sum (graph IR): sources of one shape, `num_neurons` wide
        if any(s != shape for s in ins):
            return shape, f"adds sources of different shapes {[list(s) for s in ins]}"
        if int(getattr(layer, "num_neurons", shape[0])) != shape[0]:
            return shape, f"is {layer.num_neurons} neurons wide, its sources {shape[0]}"
        return shape, None
    if kind == "Concat":  # sources joined on the neuron axis (graph IR)
        if any(len(s) != len(shape) or s[1:] != shape[1:] for s in ins):
            return shape, f"concatenates sources of shapes {[list(s) for s in ins]}"
        return (sum(int(s[0]) for s in ins), *shape[1:]), None
    if isinstance(layer, Dense):
        features = int(np.prod(shape))
        if len(shape) != 1:
            return shape, f"a Dense layer reads features, but receives a {list(shape)} map (Flatten first)"
        if layer.weight.ndim == 2 and layer.in_features != features:
            return shape, f"weight reads {layer.in_features} features, the layer before gives {features}"
        return (layer.num_neurons,), None
    if isinstance(layer, (Conv, Pool)):
        if len(shape) != 3:
            return shape, f"a {type(layer).__name__} reads a (C, H, W) map, but receives {list(shape)}"
        if isinstance(layer, Conv) and layer.weight.ndim == 4 and layer.in_channels != shape[0]:
            return shape, f"weight reads {layer.in_channels} channels, the layer before gives {shape[0]}"
        out = layer.output_shape(shape)
        if min(out[1:]) < 1:
            return shape, f"output map {list(out)} is empty"
        return tuple(int(d) for d in out), None
    if isinstance(layer, Flatten):
        return (int(np.prod(shape)),), None
    return shape, f"unknown layer type {kind}"


def fingerprint(net: NetworkIR) -> str:
    """A digest of `net`: names, shapes, options, and the bytes of every array (weights, biases, roles)."""
    digest = hashlib.blake2b(digest_size=16)
    _feed(digest, net)
    return digest.hexdigest()


def _feed(digest: hashlib._Hash, value: Any) -> None:
    # Walks the IR generically (dataclasses, containers, arrays) so that it stays right when layer kinds
    # or their fields change.
    if isinstance(value, np.ndarray):
        digest.update(f"array{value.dtype}{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        digest.update(type(value).__name__.encode())
        for f in dataclasses.fields(value):
            digest.update(f.name.encode())
            _feed(digest, getattr(value, f.name))
    elif isinstance(value, dict):
        digest.update(b"{")
        for key in value:
            _feed(digest, key)
            _feed(digest, value[key])
        digest.update(b"}")
    elif isinstance(value, (list, tuple)):
        digest.update(b"[")
        for item in value:
            _feed(digest, item)
        digest.update(b"]")
    else:
        digest.update(repr(value).encode())
