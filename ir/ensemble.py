"""The Ensembler: emit M members and their shared CSN as ONE fused ONNX graph.

The fused graph has four stages:

1. **dispatch**: one graph input, read by every member (and by the CSN);
2. **CSN**: the common sub-network (`codec.ir.csn.csn_network`) computed once, its weights stored once;
3. **members**: member i under the name prefix ``m{i}/``. In a layer l the member shares with the CSN
   (its first k_l neurons are `Role.FROZEN_SHARED` copies of CSN layer l), only the member's own neurons
   are computed, from the member's full previous layer h_{l-1}, and h_l = Concat(csn_l, own_l) on the
   neuron axis; the member's structural layers (Pool, Flatten) then run on h_l as usual. Concat commutes
   with both (Pool is per channel, Flatten is channel-major), so this is exactly the member's function;
4. **collect**: the members' outputs combined per criterion, matching
   `codec.runtime.evaluation.metrics.combine`:
   - ``prod``: Sum of Log(Max(p_i, eps)), minus the row maximum, Exp, divided by the row sum;
   - ``mean``: Mean of the p_i;
   - ``vote``: Mean of OneHot(ArgMax(p_i)) (ArgMax with select_last_index=0: a member's own ties go to
     the lowest class index, numpy's rule);
   - ``max``: Max of the p_i divided by its row sum (an all-zero row becomes uniform, as in combine).

Packed inference (`packed=True`, the default): members with the same architecture, activations and sharing
(`_pack_signature`) form a pack of K members computed together, so a layer costs a few nodes for all K
instead of a few per member (at batch 1 a graph's cost is mostly per-node overhead):
- a layer reading a value every member has (the input, or a whole CSN layer) is ONE Gemm (Conv) over the
  members' rows (filters) concatenated, [K*out, in]: every member reads the same input;
- a layer reading the members' own values is ONE Conv with group=K on the members' features side by side:
  for Dense a 1x1 Conv on [1, K*in, batch, 1] (the batch on a spatial axis: W_i @ h_i for every member,
  bias and activation in the same kernel), for Conv the members' channels [batch, K*c, h, w];
  Pool and Flatten run once on the packed value (per channel and channel-major, so per member);
- a sharing member's layer reads [CSN part, own part] of the layer below: its own rows are the sum of both
  terms above, with the weights' columns split between the parts; the CSN part is the CSN's value,
  computed once, and [CSN, own] is never concatenated;
- the packs' outputs [K, batch, ...] and the other members' outputs are stacked [M, batch, ...] and the
  collect stage reduces over the member axis (`_collect_stacked`: one node per step, not one per member;
  the same arithmetic summed in another order); the ``member_i`` outputs are split from it only when asked.
Every weight is stored once either way (the split columns add up to the per-member rows), so
`ensemble_parameter_count` is the same. The packed graph agrees with the per-member one to float32
rounding (the same dot products, another blocking order; tests/test_ensemble.py records the
differences). Not packed: members of a unique architecture (e.g. of different widths: the first layers of
members of different widths are not concatenated), DAG members (residual Adds, Concats: packing walks a
chain), and a Conv with a softmax (it normalises over channels,
which a packed Conv holds for K members); those members get their own nodes as with `packed=False`.
Why packed is the default, and when it is not the faster graph (`python bench/inference.py`, bench/README.md):
at batch 1 it saves per-node overhead (10 members: 31 nodes instead of 112; 1.18x the per-member graph's
throughput with `classifier_m`'s widths, 1.60x with `classifier_s`'s, in bench/inference_full_busy.json); at
batch 256 the per-member graph can be faster (there 0.80x wall, 0.90x CPU time for `classifier_m`, even for
`classifier_s`), because onnxruntime prepacks a Gemm's 2-D constant weights (GemmPackBFp32) into a FusedGemm
with bias and activation, which a grouped Conv does not get. For throughput with wide members at large
batches use `packed=False`.

Precision: the graph computes in float32, `combine` in float64. For prod this matters twice:
- the clipping constant: combine clips to the smallest normal float64 (PROD_EPS ~2.2e-308), so an exact
  0 costs log(PROD_EPS) ~ -708 while a non-zero float32 probability costs at least log(1.4e-45) ~ -103:
  a zero is a veto. PROD_EPS is 0 in float32, and clipping to float32's smallest normal instead would
  make a zero cost only -87 and change which class wins when members veto each other's favourites
  (measured: 87 of 1500 scores differed by up to 1.0 on confident members). So the float32 graph counts
  the zeros instead of clipping them (`_prod_log_scores`): the same scores as combine up to a per-row
  constant, which the row-maximum subtraction removes.
- rounding: float32 logs of tiny probabilities (|log p| up to ~100) carry errors of ~6e-6 each, so when
  members disagree strongly the renormalised probabilities differ from combine by ~1e-6 (measured on
  random MLP members: 5e-7 for 4 mild members, 4.9e-6 for 12 confident, disagreeing ones; mean, max and
  vote agree to ~1e-7). `precision="float64"` runs the prod stage in double with combine's own clip
  (agreement ~3e-8: the final cast to float32).

Members may be chains or DAGs (residual Adds, Concats: `_emit_dag_member`), with the same input shape and the
same output shape; classifiers must output
probabilities (a softmax or sigmoid output layer), because every criterion combines probabilities.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from codec.errors import ConfigError, ModelLoadError, ShapeError
from codec.ir.criteria import CRITERIA, PROD_EPS, TASKS, default_criterion
from codec.ir.lower import OPSET, GraphBuilder, input_value, make_model
from codec.ir.network import (
    INPUT,
    Add,
    Concat,
    Conv,
    Dense,
    Flatten,
    NetworkIR,
    Pool,
    Role,
    is_compute,
    replace,
)

__all__ = [
    "CRITERIA",
    "check_shares_csn",
    "emit_ensemble",
    "ensemble_description",
    "ensemble_parameter_count",
    "member_files",
    "members_metadata",
]
ENSEMBLE_KEY = "codec.ensemble"  # model metadata: JSON describing the fused ensemble
# Model metadata a pipeline may set (through `metadata=`): a JSON list of the member model files, relative to
# the ensemble file's folder, in member order. `codec export` checks parity against them. Written only by
# `members_metadata` and read only by `member_files`.
MEMBERS_KEY = "codec.members"
OUTPUT_NAME = "output"
_PROBABILITY_ACTIVATIONS = ("softmax", "sigmoid")
PRECISIONS = ("float32", "float64")


def member_output_name(index: int) -> str:
    """The graph output carrying member `index`'s own output (with `member_outputs=True`)."""
    return f"member_{index}"


# ----------------------------------------------------------------------------------------------------
# Sharing: which leading layers of a member are the CSN's
# ----------------------------------------------------------------------------------------------------


def _frozen_prefix(member: NetworkIR) -> list[int]:
    """k_l per hidden layer: how many leading neurons are FROZEN_SHARED; refuses frozen neurons elsewhere."""
    sizes = []
    for layer in member.compute_layers():
        frozen = layer.roles == Role.FROZEN_SHARED
        k = int(frozen.sum())
        if k and not frozen[:k].all():
            raise ShapeError(
                f"member {member.name!r}: the frozen-shared neurons of layer {layer.name!r} are not "
                "its leading "
                "neurons (a sharing layer is [CSN neurons] ++ [own neurons])"
            )
        sizes.append(k)
    if sizes and sizes[-1]:
        raise ShapeError(
            f"member {member.name!r}: its output layer {member.compute_layers()[-1].name!r} has "
            "frozen-shared neurons"
        )
    hidden = sizes[:-1]
    depth = next((i for i, k in enumerate(hidden) if k == 0), len(hidden))
    if any(hidden[depth:]):
        later = member.hidden_layers()[depth + next(i for i, k in enumerate(hidden[depth:]) if k)]
        raise ShapeError(
            f"member {member.name!r}: layer {later.name!r} has frozen-shared neurons but an earlier "
            "layer has none "
            "(the CSN shares leading layers only)"
        )
    return hidden[:depth]


def _structure(layer) -> tuple:
    """What must agree between a member's layer and the CSN's beside the weights."""
    if isinstance(layer, Dense):
        return ("dense", layer.activation)
    if isinstance(layer, Conv):
        return (
            "conv",
            layer.activation,
            layer.kernel_shape,
            tuple(layer.strides),
            tuple(layer.pads),
            tuple(layer.dilations),
        )
    if isinstance(layer, Pool):
        return (
            "pool",
            layer.mode,
            tuple(layer.kernel_shape),
            tuple(layer.strides),
            tuple(layer.pads),
            layer.ceil_mode,
            layer.count_include_pad,
            layer.is_global,
        )
    if isinstance(layer, Flatten):
        return ("flatten",)
    raise TypeError(f"unknown layer type {type(layer).__name__}")


def check_shares_csn(member: NetworkIR, csn: NetworkIR) -> int:
    """How many leading hidden layers `member` shares with `csn`, after checking that it really does.

    A sharing member's hidden layer l starts with k_l FROZEN_SHARED neurons, k_l being the width of CSN
    layer l; their weights on the CSN neurons of the layer below (all inputs for l = 0) must equal the CSN
    layer's exactly, their weights on the member's other inputs must be exactly 0, and biases, activations
    and the structural layers in between must be the same. A member without frozen-shared neurons shares
    0 layers.

    Raises:
        ShapeError: the member's frozen rows are not the CSN's (one line naming the layer and what differs).
    """
    sizes = _frozen_prefix(member)
    depth = len(sizes)
    if depth == 0:
        return 0
    csn_compute = csn.compute_layers()
    if depth > len(csn_compute):
        raise ShapeError(
            f"member {member.name!r} has frozen-shared neurons in {depth} layers but the CSN has "
            f"{len(csn_compute)}"
        )
    if tuple(member.input_shape) != tuple(csn.input_shape):
        raise ShapeError(
            f"member {member.name!r} takes input {list(member.input_shape)} but the CSN takes "
            f"{list(csn.input_shape)}"
        )
    member_span = member.layers[: member.index(member.hidden_layers()[depth - 1].name) + 1]
    csn_span = csn.layers[: csn.index(csn_compute[depth - 1].name) + 1]
    if len(member_span) != len(csn_span):
        raise ShapeError(
            f"member {member.name!r}: its first {depth} shared layers and the CSN's have different "
            "structural layers between them"
        )
    for mine, theirs in zip(member_span, csn_span):
        if _structure(mine) != _structure(theirs):
            raise ShapeError(
                f"member {member.name!r}: layer {mine.name!r} differs from CSN layer {theirs.name!r} "
                "in kind or settings"
            )
    previous_k = None
    for l, (k, layer, shared) in enumerate(zip(sizes, member.hidden_layers(), csn_compute)):
        if k != shared.num_neurons:
            raise ShapeError(
                f"member {member.name!r}: layer {layer.name!r} has {k} frozen-shared neurons but CSN "
                f"layer {l} has {shared.num_neurons}"
            )
        rows = layer.weight[:k]
        if previous_k is None:
            csn_columns = np.arange(layer.weight.shape[1])
        else:
            csn_columns = np.flatnonzero(member.input_neuron_map(layer.name) < previous_k)
        other = np.setdiff1d(np.arange(layer.weight.shape[1]), csn_columns)
        if rows[:, csn_columns].shape != shared.weight.shape or not np.array_equal(
            rows[:, csn_columns], shared.weight
        ):
            raise ShapeError(
                f"member {member.name!r}: the frozen-shared rows of layer {layer.name!r} differ from "
                "the CSN's weights"
            )
        if np.any(rows[:, other] != 0):
            raise ShapeError(
                f"member {member.name!r}: frozen-shared neurons of layer {layer.name!r} read non-CSN "
                "inputs (non-zero weights)"
            )
        if not np.array_equal(layer.bias[:k], shared.bias):
            raise ShapeError(
                f"member {member.name!r}: the frozen-shared biases of layer {layer.name!r} differ from "
                "the CSN's"
            )
        if layer.activation.kind == "softmax" and k < layer.num_neurons:
            # softmax normalises over all neurons of the layer, so CSN and own parts cannot be computed apart
            raise ShapeError(
                f"member {member.name!r}: layer {layer.name!r} is a softmax layer only partly shared "
                "with the CSN"
            )
        previous_k = k
    return depth


def ensemble_parameter_count(members: list[NetworkIR], csn: NetworkIR | None = None) -> dict:
    """Parameters the fused ensemble stores, shared ones counted once.

    Returns:
        {"members": [own parameters of each member], "csn": CSN parameters stored (the CSN layers some member
        uses), "total_stored": their sum, "unshared": the members' parameters as separate models,
        "shared_layers": [layers each member shares]}. A member's own parameters are its non-shared rows
        (whole width) plus its non-shared layers; the zero weights of its frozen rows on non-CSN inputs
        are stored nowhere.
    """
    depths = [check_shares_csn(m, csn) if csn is not None else 0 for m in members]
    own = [_own_parameters(m, d) for m, d in zip(members, depths)]
    used = max(depths, default=0)
    csn_params = sum(layer.num_parameters for layer in csn.compute_layers()[:used]) if csn is not None else 0
    return {
        "members": own,
        "csn": int(csn_params),
        "total_stored": int(sum(own) + csn_params),
        "unshared": int(sum(m.num_parameters for m in members)),
        "shared_layers": depths,
    }


def _own_parameters(member: NetworkIR, depth: int) -> int:
    total = 0
    for l, layer in enumerate(member.compute_layers()):
        k = int((layer.roles == Role.FROZEN_SHARED).sum()) if l < depth else 0
        total += (layer.num_neurons - k) * (int(layer.weight[0].size) + 1)
    return total


# ----------------------------------------------------------------------------------------------------
# Emission
# ----------------------------------------------------------------------------------------------------


class _FusedBuilder(GraphBuilder):
    """A GraphBuilder whose value names are unique across the whole fused graph, and that computes a
    structural layer on a given value only once (a TreeNet trunk's Pool/Flatten is shared by members)."""

    def __init__(self):
        super().__init__()
        self._used: set[str] = set()
        self._structural: dict[tuple, ir.Value] = {}

    def unique(self, name: str) -> str:
        candidate, n = name, 1
        while candidate in self._used:
            candidate = f"{name}.{n}"
            n += 1
        self._used.add(candidate)
        return candidate

    def initializer(self, name: str, array: np.ndarray) -> ir.Value:
        return super().initializer(self.unique(name), array)

    def node(self, op_type: str, inputs: list, name: str, attributes: dict | None = None) -> ir.Value:
        return super().node(op_type, inputs, self.unique(name), attributes)

    def structural(self, layer, x: ir.Value, shared_prefix: str | None = None) -> ir.Value:
        """Emit Pool/Flatten `layer` on `x`, reusing an identical earlier one; `shared_prefix` names a new
        node that other members may reuse (a value of the CSN)."""
        key = (x.name, _structure(layer))
        if key not in self._structural:
            prefix = self.prefix
            if shared_prefix is not None:
                self.prefix = shared_prefix
            try:
                self._structural[key] = self.layer(layer, x)
            finally:
                self.prefix = prefix
        return self._structural[key]

    def shape_const(self, name: str, array: np.ndarray) -> ir.Value:
        """An int64 shape or axes constant as a Constant node, so that initializers stay the parameters."""
        return self.node("Constant", [], name, {"value": ir.tensor(np.asarray(array, np.int64), name=name)})

    def const(self, name: str, array) -> ir.Value:
        # at least 1-D: GraphBuilder.initializer's np.ascontiguousarray turns a 0-d array into shape (1,)
        return self.initializer(name, np.atleast_1d(np.asarray(array)))


@dataclass
class _Plan:
    """What is emitted for one member."""

    net: NetworkIR
    depth: int  # leading hidden layers shared with the CSN


def _validate(members, csn, criterion, names, task) -> tuple[str, list[str]]:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if criterion is None:
        criterion = default_criterion(task)
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown ensemble criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    if task == "reconstruction" and criterion != "mean":
        raise ConfigError(
            f"a reconstruction ensemble averages its members: criterion must be mean, not {criterion!r}"
        )
    if not members:
        raise ConfigError("an ensemble needs at least one member")
    names = list(names) if names is not None else [m.name for m in members]
    if len(names) != len(members):
        raise ConfigError(f"{len(names)} names for {len(members)} members")
    first = members[0]
    for name, member in zip(names, members):
        if not member.compute_layers():
            raise ShapeError(f"member {name!r} has no compute layer")
        if tuple(member.input_shape) != tuple(first.input_shape):
            raise ShapeError(
                f"member {name!r} takes input {list(member.input_shape)} but member {names[0]!r} takes "
                f"{list(first.input_shape)}"
            )
        if tuple(member.output_shape) != tuple(first.output_shape):
            raise ShapeError(
                f"member {name!r} outputs {list(member.output_shape)} but member {names[0]!r} outputs "
                f"{list(first.output_shape)}"
            )
        if task == "classification":
            if len(member.output_shape) != 1:
                raise ShapeError(
                    f"member {name!r} outputs shape {list(member.output_shape)}, not one score per class"
                )
            kind = member.compute_layers()[-1].activation.kind
            if kind not in _PROBABILITY_ACTIVATIONS or not is_compute(member.layers[-1]):
                raise ConfigError(
                    f"member {name!r} does not output probabilities (its output layer's activation is "
                    f"{kind}); "
                    "the ensemble criteria combine probabilities: end classifiers with a softmax"
                )
    if csn is not None and tuple(csn.input_shape) != tuple(first.input_shape):
        raise ShapeError(
            f"the CSN takes input {list(csn.input_shape)} but the members take {list(first.input_shape)}"
        )
    return criterion, names


def _emit_csn(builder: _FusedBuilder, csn: NetworkIR, depth: int, x: ir.Value) -> list[ir.Value]:
    """The CSN's first `depth` compute layers, once; returns each one's post-activation value."""
    builder.prefix = "csn/"
    values, value = [], x
    for layer in csn.layers:
        if len(values) == depth:
            break
        if is_compute(layer):
            value = builder.layer(layer, value)
            values.append(value)
        else:
            value = builder.structural(layer, value, shared_prefix="csn/")
    return values


def _emit_member(
    builder: _FusedBuilder, plan: _Plan, index: int, x: ir.Value, csn_values: list[ir.Value]
) -> ir.Value:
    """Member `index` on input `x`; its shared layers take the CSN's values. Returns its output value."""
    if not plan.net.is_chain:
        return _emit_dag_member(builder, plan, index, x, csn_values)
    prefix = f"m{index}/"
    builder.prefix = prefix
    # from_csn: the value is the same for every member (the input, or a whole CSN layer)
    value, l, from_csn = x, 0, True
    for layer in plan.net.layers:
        if not is_compute(layer):
            # a structural layer on a shared value (e.g. a whole-layer trunk) is the same for every member:
            # compute once
            value = builder.structural(layer, value, shared_prefix="csn/" if from_csn else None)
            continue
        if l < plan.depth:
            value, from_csn = _emit_shared_layer(builder, layer, value, csn_values[l], prefix)
        else:
            value, from_csn = builder.layer(layer, value), False
        l += 1
    return value


def _emit_shared_layer(
    builder: _FusedBuilder, layer, value: ir.Value, csn_value: ir.Value, prefix: str
) -> tuple[ir.Value, bool]:
    """A member's layer that shares its leading (frozen) neurons with the CSN layer `csn_value`: the
    member computes only its own neurons and concatenates them after the CSN's. Returns the layer's value
    and whether it is the whole CSN layer (the same value for every member)."""
    k = int((layer.roles == Role.FROZEN_SHARED).sum())
    if k == layer.num_neurons:
        return csn_value, True
    own = replace(
        layer, name=f"{layer.name}.own", weight=layer.weight[k:], bias=layer.bias[k:], roles=layer.roles[k:]
    )
    own_value = builder.layer(own, value)
    return builder.node("Concat", [csn_value, own_value], f"{prefix}{layer.name}.concat", {"axis": 1}), False


def _emit_dag_member(
    builder: _FusedBuilder, plan: _Plan, index: int, x: ir.Value, csn_values: list[ir.Value]
) -> ir.Value:
    """`_emit_member` for a DAG member (residual Adds, Concats): each layer reads its sources' values.

    The CSN covers only a DAG's leading chain (`codec.passes.csne.shareable_prefix`), so the shared
    layers come first, exactly as in a chain; the rest is emitted layer by layer from a value table."""
    prefix = f"m{index}/"
    builder.prefix = prefix
    net = plan.net
    values: dict[str, ir.Value] = {INPUT: x}
    shared_value = {INPUT}  # values that are the same for every member (the input, whole CSN layers)
    l = 0
    for layer in net.layers:
        ins = [values[source] for source in net.inputs_of(layer.name)]
        from_csn = all(source in shared_value for source in net.inputs_of(layer.name))
        if isinstance(layer, (Add, Concat)):
            value = builder.merge(layer, ins)
        elif not is_compute(layer):
            value = builder.structural(layer, ins[0], shared_prefix="csn/" if from_csn else None)
            if from_csn:
                shared_value.add(layer.name)
        elif l < plan.depth:
            value, whole = _emit_shared_layer(builder, layer, ins[0], csn_values[l], prefix)
            if whole:
                shared_value.add(layer.name)
        else:
            value = builder.layer(layer, ins[0])
        if is_compute(layer):
            l += 1
        values[layer.name] = value
    return values[net.layers[-1].name]


# ----------------------------------------------------------------------------------------------------
# Packed emission: members of the same architecture computed together
# ----------------------------------------------------------------------------------------------------


@dataclass
class _PackValue:
    """A pack's running value between two layers of its K members.

    `common` is the part every member has (the input, or a CSN layer), `own` the members' own parts
    stored together, in one of two layouts:
    - ``channels``: [batch, K*f, ...], member i's f features (channels) the i-th block (Conv and its
      Pool/Flatten: a grouped Conv keeps the members apart);
    - ``rows``: [1, K*f, batch, 1] (Dense: the batch on a spatial axis, see `_emit_packed_dense`).
    Either part may be None (no CSN part after the shared layers; no own part in a whole-layer trunk).
    """

    common: ir.Value | None
    common_from_csn: bool
    own: ir.Value | None
    layout: str | None


def _shared_counts(plan: _Plan) -> list[int]:
    """k_l per compute layer: the FROZEN_SHARED neurons the member takes from the CSN (0 past its depth)."""
    return [
        int((layer.roles == Role.FROZEN_SHARED).sum()) if l < plan.depth else 0
        for l, layer in enumerate(plan.net.compute_layers())
    ]


def _common_columns(plan: _Plan, layer, l: int, shared: list[int]) -> int | None:
    """How many leading input columns (features, or channels for a Conv) of compute layer `l` the CSN
    supplies: all for the first layer, those of the CSN neurons below for a layer above a shared one,
    none otherwise; None when the CSN's columns are not the leading ones (not packable)."""
    if l == 0:
        return int(layer.weight.shape[1])
    if not shared[l - 1]:
        return 0
    columns = plan.net.input_neuron_map(layer.name) < shared[l - 1]
    n = int(columns.sum())
    return n if columns[:n].all() else None


def _pack_signature(plan: _Plan) -> tuple | None:
    """What members must have in common to be packed (layer kinds, settings, weight shapes, sharing), or
    None when the member cannot be packed (a softmax Conv: its softmax runs over the channel axis, which
    a packed Conv shares between members, or a DAG: packing walks a chain)."""
    if not plan.net.is_chain:
        return None
    shared = _shared_counts(plan)
    signature, l = [plan.depth], 0
    for layer in plan.net.layers:
        if not is_compute(layer):
            signature.append(_structure(layer))
            continue
        if isinstance(layer, Conv) and layer.activation.kind == "softmax":
            return None
        common = _common_columns(plan, layer, l, shared)
        if common is None:
            return None
        signature.append((_structure(layer), layer.activation.alpha, layer.weight.shape, shared[l], common))
        l += 1
    return tuple(signature)


def _packs(plans: list[_Plan]) -> list[list[int]]:
    """Member indices grouped into packs of the same signature (first-seen order); unpackable members and
    members of a unique architecture form packs of one."""
    groups: dict[tuple, list[int]] = {}
    singles = []
    for i, plan in enumerate(plans):
        signature = _pack_signature(plan)
        if signature is None:
            singles.append([i])
        else:
            groups.setdefault(signature, []).append(i)
    return [*groups.values(), *singles]


def _to_rows(
    builder: _FusedBuilder, value: ir.Value, layout: str, k: int, features: int, name: str
) -> ir.Value:
    """A channels-layout [batch, K*f] value in the rows layout [1, K*f, batch, 1]; a rows one as it is."""
    if layout == "rows":
        return value
    columns = builder.node("Transpose", [value], f"{name}.transposed", {"perm": [1, 0]})
    shape = builder.shape_const(f"{name}.shape", np.array([1, k * features, -1, 1]))  # -1: the batch size
    return builder.node("Reshape", [columns, shape], f"{name}.rows")


def _emit_packed_dense(
    builder, layers, rows, common_n, value: _PackValue, own_features: int, name: str
) -> ir.Value:
    """K members' Dense rows `rows` (slice of each weight): one Gemm on the common part (weights concatenated,
    [K*out, n]) plus one grouped 1x1 Conv (group=K, filters [K*out, in, 1, 1]) on the own part; returns the
    rows layout [1, K*out, batch, 1].

    Why a Conv: the rows layout keeps the batch on a spatial axis, so a grouped 1x1 Conv is member i's
    W_i @ h_i for all K members in one node, with the bias and (fused by onnxruntime) the activation in
    the same kernel, and the activations are never transposed between two packed layers. The first version,
    a batched MatMul over [K, in, out] weights on [K, batch, in], used more CPU time at batch 1 and 256 (in
    comparisons during development, not committed): onnxruntime prepacks only 2-D constant weights, and its
    bias, activation and the transposes between layers were separate passes.
    """
    k = len(layers)
    out = rows.stop - rows.start
    terms = []
    b = builder.initializer(f"{name}.bias", np.concatenate([layer.bias[rows] for layer in layers]))
    if value.common is not None and common_n:
        w = np.concatenate([layer.weight[rows, :common_n] for layer in layers])
        z = builder.node(
            "Gemm",
            [value.common, builder.initializer(f"{name}.common.weight", w), b],
            f"{name}.common",
            {"transB": 1},
        )
        terms.append(_to_rows(builder, z, "channels", k, out, f"{name}.common"))
    if value.own is not None:
        own = _to_rows(builder, value.own, value.layout, k, own_features, f"{name}.in")
        w = np.concatenate([layer.weight[rows, common_n:] for layer in layers])[:, :, None, None]
        inputs = [own, builder.initializer(f"{name}.own.weight", w)] + ([] if terms else [b])
        terms.append(builder.node("Conv", inputs, f"{name}.own", {"kernel_shape": [1, 1], "group": k}))
    return terms[0] if len(terms) == 1 else builder.node("Add", terms, name)


def _rows_softmax(builder: _FusedBuilder, z: ir.Value, k: int, out: int, name: str) -> ir.Value:
    """Softmax over each member's neurons of a rows-layout value [1, K*out, batch, 1]."""
    grouped = builder.node(
        "Reshape", [z, builder.shape_const(f"{name}.softmax_in", np.array([k, out, -1]))], f"{name}.grouped"
    )
    p = builder.node("Softmax", [grouped], f"{name}.softmax", {"axis": 1})
    return builder.node(
        "Reshape",
        [p, builder.shape_const(f"{name}.softmax_out", np.array([1, k * out, -1, 1]))],
        f"{name}.softmax_rows",
    )


def _emit_packed_conv(builder, layers, rows, common_n, value: _PackValue, name: str) -> ir.Value:
    """K members' Conv filters `rows` as one Conv on the common part (filters concatenated) plus one
    grouped Conv (group=K) on the own part; returns [batch, K*out, H, W]."""
    first = layers[0]
    attrs = {
        "kernel_shape": list(first.kernel_shape),
        "strides": list(first.strides),
        "pads": list(first.pads),
        "dilations": list(first.dilations),
    }
    b = builder.initializer(f"{name}.bias", np.concatenate([layer.bias[rows] for layer in layers]))
    terms = []
    if value.common is not None and common_n:
        w = np.concatenate([layer.weight[rows, :common_n] for layer in layers])
        terms.append(
            builder.node(
                "Conv",
                [value.common, builder.initializer(f"{name}.common.weight", w), b],
                f"{name}.common",
                attrs,
            )
        )
    if value.own is not None:
        w = np.concatenate([layer.weight[rows, common_n:] for layer in layers])
        inputs = [value.own, builder.initializer(f"{name}.own.weight", w)] + ([] if terms else [b])
        terms.append(builder.node("Conv", inputs, f"{name}.own", {**attrs, "group": len(layers)}))
    return terms[0] if len(terms) == 1 else builder.node("Add", terms, name)


def _emit_pack(
    builder: _FusedBuilder, plans: list[_Plan], first: int, x: ir.Value, csn_values: list[ir.Value]
) -> ir.Value:
    """Members `plans` (same `_pack_signature`) computed together; returns their outputs [K, batch, ...].

    Layer by layer, a member's layer reads [CSN part, own part] of the layer below; its own rows are
    computed from both parts at once for all K members (`_emit_packed_dense`, `_emit_packed_conv`) and its
    CSN rows are the CSN's value, which is computed once. Structural layers run on the common part once
    (shared with every member and the CSN) and on the packed own part as one node.
    """
    k = len(plans)
    prefix = f"pack{first}/"
    builder.prefix = prefix
    nets = [plan.net for plan in plans]
    shared = _shared_counts(plans[0])
    value = _PackValue(common=x, common_from_csn=True, own=None, layout=None)
    l = 0
    for index, layer in enumerate(nets[0].layers):
        if not is_compute(layer):
            common = own = None
            if value.common is not None:
                common = builder.structural(
                    layer, value.common, shared_prefix="csn/" if value.common_from_csn else None
                )
            if value.own is not None and not (isinstance(layer, Flatten) and value.layout == "rows"):
                own = builder.layer(
                    layer, value.own
                )  # per channel (Pool) or channel-major (Flatten): per member
            elif value.own is not None:
                own = value.own  # a Flatten of a [batch, f] member value changes nothing
            value = _PackValue(common, value.common_from_csn, own, value.layout)
            continue
        layers = [net.layers[index] for net in nets]
        common_n = _common_columns(plans[0], layer, l, shared)
        own_in = layer.weight.shape[1] - common_n
        k_l = shared[l]
        rows = slice(k_l, layer.num_neurons)
        name = f"{prefix}{layer.name}"
        own = None
        if rows.stop > rows.start:
            if isinstance(layer, Dense):
                z = _emit_packed_dense(builder, layers, rows, common_n, value, own_in, name)
                layout = "rows"
            else:
                z = _emit_packed_conv(builder, layers, rows, common_n, value, name)
                layout = "channels"
            if layout == "rows" and layer.activation.kind == "softmax":
                own = _rows_softmax(builder, z, len(layers), rows.stop - rows.start, name)
            else:
                own = builder.activation(layer, z)
        else:
            layout = None
        if k_l:
            value = _PackValue(csn_values[l], True, own, layout)
        else:
            value = _PackValue(None, False, own, layout)
        l += 1
    if value.layout == "rows":
        shape = builder.shape_const(f"{prefix}output.shape", np.array([k, plans[0].net.output_shape[0], -1]))
        grouped = builder.node("Reshape", [value.own, shape], f"{prefix}output.grouped")
        return builder.node(
            "Transpose", [grouped], f"{prefix}output.stacked", {"perm": [0, 2, 1]}
        )  # [K, batch, out]
    # a Conv output [batch, K*c, h, w]: member i's channels are the i-th block
    c, *spatial = plans[0].net.output_shape
    shape = builder.shape_const(f"{prefix}output.shape", np.array([0, k, c, *spatial]))
    grouped = builder.node("Reshape", [value.own, shape], f"{prefix}output.grouped")
    return builder.node(
        "Transpose", [grouped], f"{prefix}output.stacked", {"perm": [1, 0, *range(2, 3 + len(spatial))]}
    )


def _emit_members_stacked(
    builder: _FusedBuilder,
    plans: list[_Plan],
    packs: list[list[int]],
    x: ir.Value,
    csn_values: list[ir.Value],
) -> tuple[ir.Value, list[int]]:
    """Every member's output stacked [M, batch, ...]: each pack's as one value, the other members'
    unsqueezed; returns it and the member index of each row (pack by pack, not member order)."""
    parts, order = [], []
    for pack in packs:
        if len(pack) == 1:
            axes = builder.shape_const(f"m{pack[0]}/stack_axes", np.array([0]))
            own = _emit_member(builder, plans[pack[0]], pack[0], x, csn_values)
            parts.append(builder.node("Unsqueeze", [own, axes], f"m{pack[0]}/stacked"))
        else:
            parts.append(_emit_pack(builder, [plans[i] for i in pack], pack[0], x, csn_values))
        order += pack
    stacked = parts[0] if len(parts) == 1 else builder.node("Concat", parts, "collect/members", {"axis": 0})
    return stacked, order


def _unstack(builder: _FusedBuilder, stacked: ir.Value, order: list[int]) -> list[ir.Value]:
    """The member outputs of a stacked [M, batch, ...] value, in member order."""
    builder.prefix = ""
    axes = builder.shape_const("collect/unstack_axes", np.array([0]))
    if len(order) == 1:
        parts = [stacked]
    else:
        node = ir.node(
            "Split",
            [stacked],
            {"axis": 0, "num_outputs": len(order)},
            num_outputs=len(order),
            name=builder.unique("collect/unstack"),
        )
        for i, out in enumerate(node.outputs):
            out.name = builder.unique(f"collect/unstack.{i}")
        builder.nodes.append(node)
        parts = list(node.outputs)
    outputs = [None] * len(order)
    for member, part in zip(order, parts):
        outputs[member] = builder.node("Squeeze", [part, axes], member_output_name(member))
    return outputs


def _collect_stacked(
    builder: _FusedBuilder, stacked: ir.Value, criterion: str, num_classes: int, precision: str
) -> ir.Value:
    """`_collect` on members stacked [M, batch, classes]: each step one node for all members, reducing
    over axis 0 where `_collect` sums a list (the same arithmetic in another summation order)."""
    builder.prefix = "collect/"
    members = builder.const("collect/member_axis", np.array([0], np.int64))
    if criterion == "mean":
        return builder.node("ReduceMean", [stacked, members], OUTPUT_NAME, {"keepdims": 0})
    if criterion == "vote":
        depth = builder.const("collect/classes", np.array([num_classes], np.int64))
        on_off = builder.const("collect/one_hot_values", np.array([0.0, 1.0], np.float32))
        choice = builder.node(
            "ArgMax", [stacked], "collect/argmax", {"axis": -1, "keepdims": 0, "select_last_index": 0}
        )
        votes = builder.node("OneHot", [choice, depth, on_off], "collect/votes", {"axis": -1})
        return builder.node("ReduceMean", [votes, members], OUTPUT_NAME, {"keepdims": 0})
    axes = builder.const("collect/axes", np.array([1], np.int64))
    if criterion == "prod":
        if precision == "float64":
            eps = builder.const("collect/prod_eps", np.array([PROD_EPS], np.float64))
            p64 = builder.node("Cast", [stacked], "collect/float64", {"to": ir.DataType.DOUBLE})
            logs = builder.node("Log", [builder.node("Max", [p64, eps], "collect/clip")], "collect/logs")
            log_scores = builder.node("ReduceSum", [logs, members], "collect/log_scores", {"keepdims": 0})
        else:  # as `_prod_log_scores`: count the zeros instead of clipping them
            one = builder.const("collect/one", np.array([1.0], np.float32))
            zero = builder.const("collect/zero", np.array([0.0], np.float32))
            is_zero = builder.node("Equal", [stacked, zero], "collect/is_zero")
            logs = builder.node(
                "Log", [builder.node("Where", [is_zero, one, stacked], "collect/nonzero")], "collect/logs"
            )
            zeros = builder.node("Cast", [is_zero], "collect/zeros", {"to": ir.DataType.FLOAT})
            log_sum = builder.node("ReduceSum", [logs, members], "collect/log_sum", {"keepdims": 0})
            zero_count = builder.node("ReduceSum", [zeros, members], "collect/zero_count", {"keepdims": 0})
            fewest = builder.node("ReduceMin", [zero_count, axes], "collect/fewest_zeros", {"keepdims": 1})
            extra = builder.node("Sub", [zero_count, fewest], "collect/extra_zeros")
            log_eps = builder.const("collect/log_prod_eps", np.array([np.log(PROD_EPS)], np.float32))
            penalty = builder.node("Mul", [extra, log_eps], "collect/veto_penalty")
            log_scores = builder.node("Add", [log_sum, penalty], "collect/log_scores")
        log_max = builder.node("ReduceMax", [log_scores, axes], "collect/log_max", {"keepdims": 1})
        scores = builder.node(
            "Exp", [builder.node("Sub", [log_scores, log_max], "collect/log_shifted")], "collect/scores"
        )
        total = builder.node("ReduceSum", [scores, axes], "collect/total", {"keepdims": 1})
        if precision == "float32":
            return builder.node("Div", [scores, total], OUTPUT_NAME)
        probs = builder.node("Div", [scores, total], "collect/probs")
        return builder.node("Cast", [probs], OUTPUT_NAME, {"to": ir.DataType.FLOAT})
    scores = builder.node("ReduceMax", [stacked, members], "collect/max", {"keepdims": 0})
    total = builder.node("ReduceSum", [scores, axes], "collect/total", {"keepdims": 1})
    zero = builder.const("collect/zero", np.array([0.0], np.float32))
    one = builder.const("collect/one", np.array([1.0], np.float32))
    classes = builder.const("collect/classes_float", np.array([float(num_classes)], np.float32))
    empty = builder.node("Equal", [total, zero], "collect/empty_row")
    scores = builder.node("Where", [empty, one, scores], "collect/max_safe")
    total = builder.node("Where", [empty, classes, total], "collect/total_safe")
    return builder.node("Div", [scores, total], OUTPUT_NAME)


def _prod_log_scores(builder: _FusedBuilder, outputs: list[ir.Value]) -> ir.Value:
    """float32 prod scores equal to combine's sum of log(max(p, PROD_EPS)) up to a per-row constant.

    combine's clip makes each exact 0 cost log(PROD_EPS) ~ -708.4, while any non-zero float32 probability
    costs at least log(1.4e-45) ~ -103.3. Clipping in float32 cannot reproduce that (PROD_EPS is 0 there),
    so the zeros are counted instead: score = sum of logs of the non-zero probabilities + (zeros -
    fewest zeros in the row) * log(PROD_EPS). Subtracting the row's fewest zeros removes only a per-row
    constant, which the row-maximum subtraction removes anyway, but it keeps the -708 terms from
    swamping the float32 precision of the other terms when a member vetoes every class of a row.
    """
    one = builder.const("collect/one", np.array([1.0], np.float32))
    zero = builder.const("collect/zero", np.array([0.0], np.float32))
    logs, zeros = [], []
    for i, p in enumerate(outputs):
        is_zero = builder.node("Equal", [p, zero], f"collect/m{i}.is_zero")
        safe = builder.node("Where", [is_zero, one, p], f"collect/m{i}.nonzero")  # log(1) = 0 for the zeros
        logs.append(builder.node("Log", [safe], f"collect/m{i}.log"))
        zeros.append(builder.node("Cast", [is_zero], f"collect/m{i}.zero_count", {"to": ir.DataType.FLOAT}))
    axes = builder.const("collect/axes_min", np.array([1], np.int64))
    log_sum = builder.node("Sum", logs, "collect/log_sum")
    zero_count = builder.node("Sum", zeros, "collect/zero_count")
    fewest = builder.node("ReduceMin", [zero_count, axes], "collect/fewest_zeros", {"keepdims": 1})
    extra = builder.node("Sub", [zero_count, fewest], "collect/extra_zeros")
    log_eps = builder.const("collect/log_prod_eps", np.array([np.log(PROD_EPS)], np.float32))
    penalty = builder.node("Mul", [extra, log_eps], "collect/veto_penalty")
    return builder.node("Add", [log_sum, penalty], "collect/log_scores")


def _prod_log_scores_float64(builder: _FusedBuilder, outputs: list[ir.Value]) -> ir.Value:
    """combine's own arithmetic in double: sum of log(max(p, PROD_EPS))."""
    eps = builder.const("collect/prod_eps", np.array([PROD_EPS], np.float64))
    logs = []
    for i, p in enumerate(outputs):
        p64 = builder.node("Cast", [p], f"collect/m{i}.float64", {"to": ir.DataType.DOUBLE})
        logs.append(
            builder.node("Log", [builder.node("Max", [p64, eps], f"collect/m{i}.clip")], f"collect/m{i}.log")
        )
    return builder.node("Sum", logs, "collect/log_scores")


def _collect(
    builder: _FusedBuilder, outputs: list[ir.Value], criterion: str, num_classes: int, precision: str
) -> ir.Value:
    """The collect stage: combine member outputs per `criterion` into the value named OUTPUT_NAME."""
    builder.prefix = "collect/"
    if criterion == "mean":
        return builder.node("Mean", outputs, OUTPUT_NAME)
    if criterion == "vote":
        depth = builder.const("collect/classes", np.array([num_classes], np.int64))
        on_off = builder.const("collect/one_hot_values", np.array([0.0, 1.0], np.float32))
        votes = []
        for i, p in enumerate(outputs):
            choice = builder.node(
                "ArgMax", [p], f"collect/m{i}.argmax", {"axis": 1, "keepdims": 0, "select_last_index": 0}
            )
            votes.append(builder.node("OneHot", [choice, depth, on_off], f"collect/m{i}.vote", {"axis": -1}))
        return builder.node("Mean", votes, OUTPUT_NAME)
    axes = builder.const("collect/axes", np.array([1], np.int64))
    if criterion == "prod":
        log_scores = (
            _prod_log_scores_float64(builder, outputs)
            if precision == "float64"
            else _prod_log_scores(builder, outputs)
        )
        # subtract the row maximum so the best class is exp(0) = 1 and the row sum never underflows to 0
        log_max = builder.node("ReduceMax", [log_scores, axes], "collect/log_max", {"keepdims": 1})
        scores = builder.node(
            "Exp", [builder.node("Sub", [log_scores, log_max], "collect/log_shifted")], "collect/scores"
        )
        total = builder.node("ReduceSum", [scores, axes], "collect/total", {"keepdims": 1})
        if precision == "float32":
            return builder.node("Div", [scores, total], OUTPUT_NAME)
        probs = builder.node("Div", [scores, total], "collect/probs")
        return builder.node("Cast", [probs], OUTPUT_NAME, {"to": ir.DataType.FLOAT})
    # max: renormalised; an all-zero row (every member gave every class 0) becomes uniform, as in combine
    scores = builder.node("Max", outputs, "collect/max")
    total = builder.node("ReduceSum", [scores, axes], "collect/total", {"keepdims": 1})
    zero = builder.const("collect/zero", np.array([0.0], np.float32))
    one = builder.const("collect/one", np.array([1.0], np.float32))
    classes = builder.const("collect/classes_float", np.array([float(num_classes)], np.float32))
    empty = builder.node("Equal", [total, zero], "collect/empty_row")
    scores = builder.node("Where", [empty, one, scores], "collect/max_safe")
    total = builder.node("Where", [empty, classes, total], "collect/total_safe")
    return builder.node("Div", [scores, total], OUTPUT_NAME)


def emit_ensemble(
    members: list[NetworkIR],
    csn: NetworkIR | None = None,
    *,
    criterion: str | None = None,
    member_outputs: bool = False,
    names: list[str] | None = None,
    task: str = "classification",
    metadata: dict[str, str] | None = None,
    precision: str = "float32",
    packed: bool = True,
) -> ir.Model:
    """Build the fused ensemble: dispatch, CSN once, members, collect (see the module docstring).

    Args:
        members: the members, in order; a member sharing the CSN carries its CSN neurons as leading
            FROZEN_SHARED neurons (checked with `check_shares_csn`); other members are independent.
        csn: the CSN as a chain (`codec.ir.csn.csn_network`), or None when nothing is shared.
        criterion: one of `CRITERIA`; default prod for classification, mean for reconstruction (its only
            allowed criterion).
        member_outputs: also output each member's own output as ``member_{i}`` (for oracle metrics).
        names: member names for the metadata (default each network's name).
        task: "classification" (members output probabilities) or "reconstruction" (autoencoders).
        metadata: extra model metadata (e.g. `members_metadata(...)`); `ENSEMBLE_KEY` is always codec's own.
        precision: "float32" (default: every runtime runs it) or "float64": the prod collect stage in
            double precision with combine's own clipping constant, for bit-level agreement with `combine`
            when many members disagree strongly (float32 sums of large logs lose ~1e-6 there).
        packed: compute members of the same architecture together (one Gemm/Conv per layer for all of
            them, see "Packed inference" in the module docstring); False emits each member's own nodes.

    Returns:
        An onnx_ir Model (opset 18) with one input (members[0]'s input name) and the output "output".

    Raises:
        ConfigError: unknown criterion or task, a criterion the task does not allow, members that do not
            output probabilities for classification, names that do not match the members.
        ShapeError: members with different input or output shapes, or a member that does not share the
            CSN it claims to.
    """
    criterion, names = _validate(members, csn, criterion, names, task)
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown collect precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    plans = [_Plan(m, check_shares_csn(m, csn) if csn is not None else 0) for m in members]
    csn_depth = max(p.depth for p in plans)
    builder = _FusedBuilder()
    reserved = {OUTPUT_NAME, *(member_output_name(i) for i in range(len(members)))}
    # every other value name has a prefix (csn/, m{i}/, collect/), so only the input could take these
    x = input_value(members[0], "input" if members[0].input_name in reserved else None)
    builder.unique(x.name)
    csn_values = _emit_csn(builder, csn, csn_depth, x) if csn_depth else []
    packs = [pack for pack in _packs(plans) if len(pack) > 1] if packed else []
    out_shape = tuple(members[0].output_shape)
    num_classes = int(out_shape[0]) if task == "classification" else 0
    if packs:
        stacked, order = _emit_members_stacked(builder, plans, _packs(plans), x, csn_values)
        graph_outputs = [_collect_stacked(builder, stacked, criterion, num_classes, precision)]
        if member_outputs:
            graph_outputs += _unstack(builder, stacked, order)
    else:
        outputs = [_emit_member(builder, plan, i, x, csn_values) for i, plan in enumerate(plans)]
        graph_outputs = [_collect(builder, outputs, criterion, num_classes, precision)]
        if member_outputs:
            builder.prefix = ""
            graph_outputs += [
                builder.node("Identity", [v], member_output_name(i)) for i, v in enumerate(outputs)
            ]
    for value in graph_outputs:
        value.shape = ir.Shape(["batch", *out_shape])
        value.type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph(
        [x],
        graph_outputs,
        nodes=builder.nodes,
        initializers=builder.initializers,
        opset_imports={"": OPSET},
        name="ensemble",
    )
    params = ensemble_parameter_count(members, csn)
    csn_layers = csn.compute_layers()[:csn_depth] if csn is not None else []
    description = {
        "members": names,
        "criterion": criterion,
        "task": task,
        "member_outputs": [member_output_name(i) for i in range(len(members))] if member_outputs else [],
        "csn": [{"layer": layer.name, "neurons": layer.num_neurons} for layer in csn_layers],
        "shared_layers": params["shared_layers"],
        "parameters": {k: v for k, v in params.items() if k != "shared_layers"},
        "precision": precision,
        "packed": packs,
        "prod_eps": PROD_EPS if criterion == "prod" else None,
    }
    props = dict(metadata or {})
    props[ENSEMBLE_KEY] = json.dumps(description, separators=(",", ":"))
    return make_model(graph, props)


def members_metadata(files: list[str | os.PathLike], ensemble_file: str | os.PathLike) -> dict[str, str]:
    """The `MEMBERS_KEY` metadata naming a fused ensemble's member files, for `emit_ensemble(metadata=...)`.

    Args:
        files: the files holding exactly the members the fused graph computes, in member order.
        ensemble_file: where the fused ensemble will be written; the paths are stored relative to its folder,
            so a run folder can be moved or copied whole.
    """
    base = Path(ensemble_file).resolve().parent
    relative = [Path(os.path.relpath(Path(f).resolve(), base)).as_posix() for f in files]
    return {MEMBERS_KEY: json.dumps(relative)}


def member_files(model: ir.Model, ensemble_file: str | os.PathLike) -> list[Path] | None:
    """The member files a fused ensemble's `MEMBERS_KEY` metadata names (written by `members_metadata`).

    Returns:
        The paths, resolved against the ensemble file's folder, or None when the model names no members.

    Raises:
        ModelLoadError: the metadata is not a JSON list of relative paths.
    """
    text = (model.metadata_props or {}).get(MEMBERS_KEY)
    if not text:
        return None
    name = Path(ensemble_file).name
    try:
        listed = json.loads(text)
    except ValueError as exc:
        raise ModelLoadError(f"{name}: its {MEMBERS_KEY} metadata is not JSON: {exc}") from None
    if not isinstance(listed, list) or not all(isinstance(p, str) and p for p in listed):
        raise ModelLoadError(f"{name}: its {MEMBERS_KEY} metadata is malformed: not a list of paths")
    if any(Path(p).is_absolute() for p in listed):
        raise ModelLoadError(
            f"{name}: its {MEMBERS_KEY} metadata names an absolute path; they are relative to it"
        )
    base = Path(ensemble_file).resolve().parent
    return [base / p for p in listed]


def ensemble_description(model: ir.Model) -> dict | None:
    """The `ENSEMBLE_KEY` metadata of a fused model as a dict, or None when it has none."""
    text = (model.metadata_props or {}).get(ENSEMBLE_KEY)
    if not text:
        return None
    try:
        description = json.loads(text)
    except ValueError:
        return None
    return description if isinstance(description, dict) else None
