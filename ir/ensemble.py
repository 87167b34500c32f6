"""The Ensembler: emit M members and their shared CSN as ONE fused ONNX graph.

The fused graph has four stages:

1. **dispatch**: one graph input, read by every member (and by the CSN);
2. **CSN**: the common sub-network (`codec.ir.csn.csn_network`) computed once, its weights stored once;
3. **members**: member i under the name prefix ``m{i}/``. In a layer l the member shares with the CSN
   (its first k_l neurons are `Role.FROZEN_SHARED` copies of CSN layer l), only the member's own neurons
   are computed, from the member's full previous layer h_{l-1}, and h_l = Concat(csn_l, own_l) on the
   neuron axis; the member's structural layers (Pool, Flatten) then run on h_l as usual. Concat commutes
   with both (Pool is per channel, Flatten is channel-major), so this is exactly the member's function;
4. **collect**: the members' outputs combined per criterion, matching `codec.runtime.evaluation.metrics.combine`:
   - ``prod``: Sum of Log(Max(p_i, eps)), minus the row maximum, Exp, divided by the row sum;
   - ``mean``: Mean of the p_i;
   - ``vote``: Mean of OneHot(ArgMax(p_i)) (ArgMax with select_last_index=0: a member's own ties go to
     the lowest class index, numpy's rule);
   - ``max``: Max of the p_i divided by its row sum (an all-zero row becomes uniform, as in combine).

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

Members may be chains or DAGs (residual Adds, Concats: `_emit_dag_member`), with the same input shape and the same output shape; classifiers must output
probabilities (a softmax or sigmoid output layer), because every criterion combines probabilities.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from codec.errors import ConfigError, ShapeError
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

__all__ = ["CRITERIA", "check_shares_csn", "emit_ensemble", "ensemble_description", "ensemble_parameter_count"]
ENSEMBLE_KEY = "codec.ensemble"  # model metadata: JSON describing the fused ensemble
# Model metadata a pipeline may set (through `metadata=`): a JSON list of the member model files, relative to
# the ensemble file's folder, in member order. `codec export` checks parity against them.
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
                f"member {member.name!r}: the frozen-shared neurons of layer {layer.name!r} are not its leading "
                "neurons (a sharing layer is [CSN neurons] ++ [own neurons])"
            )
        sizes.append(k)
    if sizes and sizes[-1]:
        raise ShapeError(f"member {member.name!r}: its output layer {member.compute_layers()[-1].name!r} has frozen-shared neurons")
    hidden = sizes[:-1]
    depth = next((i for i, k in enumerate(hidden) if k == 0), len(hidden))
    if any(hidden[depth:]):
        later = member.hidden_layers()[depth + next(i for i, k in enumerate(hidden[depth:]) if k)]
        raise ShapeError(
            f"member {member.name!r}: layer {later.name!r} has frozen-shared neurons but an earlier layer has none "
            "(the CSN shares leading layers only)"
        )
    return hidden[:depth]


def _structure(layer) -> tuple:
    """What must agree between a member's layer and the CSN's beside the weights."""
    if isinstance(layer, Dense):
        return ("dense", layer.activation)
    if isinstance(layer, Conv):
        return ("conv", layer.activation, layer.kernel_shape, tuple(layer.strides), tuple(layer.pads), tuple(layer.dilations))
    if isinstance(layer, Pool):
        return ("pool", layer.mode, tuple(layer.kernel_shape), tuple(layer.strides), tuple(layer.pads), layer.ceil_mode,
                layer.count_include_pad, layer.is_global)
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
            f"member {member.name!r} has frozen-shared neurons in {depth} layers but the CSN has {len(csn_compute)}"
        )
    if tuple(member.input_shape) != tuple(csn.input_shape):
        raise ShapeError(f"member {member.name!r} takes input {list(member.input_shape)} but the CSN takes {list(csn.input_shape)}")
    member_span = member.layers[: member.index(member.hidden_layers()[depth - 1].name) + 1]
    csn_span = csn.layers[: csn.index(csn_compute[depth - 1].name) + 1]
    if len(member_span) != len(csn_span):
        raise ShapeError(f"member {member.name!r}: its first {depth} shared layers and the CSN's have different structural layers between them")
    for mine, theirs in zip(member_span, csn_span):
        if _structure(mine) != _structure(theirs):
            raise ShapeError(f"member {member.name!r}: layer {mine.name!r} differs from CSN layer {theirs.name!r} in kind or settings")
    previous_k = None
    for l, (k, layer, shared) in enumerate(zip(sizes, member.hidden_layers(), csn_compute)):
        if k != shared.num_neurons:
            raise ShapeError(
                f"member {member.name!r}: layer {layer.name!r} has {k} frozen-shared neurons but CSN layer {l} has {shared.num_neurons}"
            )
        rows = layer.weight[:k]
        if previous_k is None:
            csn_columns = np.arange(layer.weight.shape[1])
        else:
            csn_columns = np.flatnonzero(member.input_neuron_map(layer.name) < previous_k)
        other = np.setdiff1d(np.arange(layer.weight.shape[1]), csn_columns)
        if rows[:, csn_columns].shape != shared.weight.shape or not np.array_equal(rows[:, csn_columns], shared.weight):
            raise ShapeError(f"member {member.name!r}: the frozen-shared rows of layer {layer.name!r} differ from the CSN's weights")
        if np.any(rows[:, other] != 0):
            raise ShapeError(
                f"member {member.name!r}: frozen-shared neurons of layer {layer.name!r} read non-CSN inputs (non-zero weights)"
            )
        if not np.array_equal(layer.bias[:k], shared.bias):
            raise ShapeError(f"member {member.name!r}: the frozen-shared biases of layer {layer.name!r} differ from the CSN's")
        if layer.activation.kind == "softmax" and k < layer.num_neurons:
            # softmax normalises over all neurons of the layer, so CSN and own parts cannot be computed apart
            raise ShapeError(f"member {member.name!r}: layer {layer.name!r} is a softmax layer only partly shared with the CSN")
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
        raise ConfigError(f"a reconstruction ensemble averages its members: criterion must be mean, not {criterion!r}")
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
            raise ShapeError(f"member {name!r} takes input {list(member.input_shape)} but member {names[0]!r} takes {list(first.input_shape)}")
        if tuple(member.output_shape) != tuple(first.output_shape):
            raise ShapeError(f"member {name!r} outputs {list(member.output_shape)} but member {names[0]!r} outputs {list(first.output_shape)}")
        if task == "classification":
            if len(member.output_shape) != 1:
                raise ShapeError(f"member {name!r} outputs shape {list(member.output_shape)}, not one score per class")
            kind = member.compute_layers()[-1].activation.kind
            if kind not in _PROBABILITY_ACTIVATIONS or not is_compute(member.layers[-1]):
                raise ConfigError(
                    f"member {name!r} does not output probabilities (its output layer's activation is {kind}); "
                    "the ensemble criteria combine probabilities: end classifiers with a softmax"
                )
    if csn is not None and tuple(csn.input_shape) != tuple(first.input_shape):
        raise ShapeError(f"the CSN takes input {list(csn.input_shape)} but the members take {list(first.input_shape)}")
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


def _emit_member(builder: _FusedBuilder, plan: _Plan, index: int, x: ir.Value, csn_values: list[ir.Value]) -> ir.Value:
    """Member `index` on input `x`; its shared layers take the CSN's values. Returns its output value."""
    if not plan.net.is_chain:
        return _emit_dag_member(builder, plan, index, x, csn_values)
    prefix = f"m{index}/"
    builder.prefix = prefix
    # from_csn: the value is the same for every member (the input, or a whole CSN layer)
    value, l, from_csn = x, 0, True
    for layer in plan.net.layers:
        if not is_compute(layer):
            # a structural layer on a shared value (e.g. a whole-layer trunk) is the same for every member: compute once
            value = builder.structural(layer, value, shared_prefix="csn/" if from_csn else None)
            continue
        if l < plan.depth:
            k = int((layer.roles == Role.FROZEN_SHARED).sum())
            if k < layer.num_neurons:
                own = replace(
                    layer,
                    name=f"{layer.name}.own",
                    weight=layer.weight[k:],
                    bias=layer.bias[k:],
                    roles=layer.roles[k:],
                )
                own_value = builder.layer(own, value)
                value = builder.node("Concat", [csn_values[l], own_value], f"{prefix}{layer.name}.concat", {"axis": 1})
                from_csn = False
            else:
                value, from_csn = csn_values[l], True
        else:
            value, from_csn = builder.layer(layer, value), False
        l += 1
    return value


def _emit_dag_member(builder: _FusedBuilder, plan: _Plan, index: int, x: ir.Value, csn_values: list[ir.Value]) -> ir.Value:
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
            k = int((layer.roles == Role.FROZEN_SHARED).sum())
            if k < layer.num_neurons:
                own = replace(layer, name=f"{layer.name}.own", weight=layer.weight[k:], bias=layer.bias[k:], roles=layer.roles[k:])
                own_value = builder.layer(own, ins[0])
                value = builder.node("Concat", [csn_values[l], own_value], f"{prefix}{layer.name}.concat", {"axis": 1})
            else:
                value = csn_values[l]
                shared_value.add(layer.name)
        else:
            value = builder.layer(layer, ins[0])
        if is_compute(layer):
            l += 1
        values[layer.name] = value
    return values[net.layers[-1].name]


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
        logs.append(builder.node("Log", [builder.node("Max", [p64, eps], f"collect/m{i}.clip")], f"collect/m{i}.log"))
    return builder.node("Sum", logs, "collect/log_scores")


def _collect(builder: _FusedBuilder, outputs: list[ir.Value], criterion: str, num_classes: int, precision: str) -> ir.Value:
    """The collect stage: combine member outputs per `criterion` into the value named OUTPUT_NAME."""
    builder.prefix = "collect/"
    if criterion == "mean":
        return builder.node("Mean", outputs, OUTPUT_NAME)
    if criterion == "vote":
        depth = builder.const("collect/classes", np.array([num_classes], np.int64))
        on_off = builder.const("collect/one_hot_values", np.array([0.0, 1.0], np.float32))
        votes = []
        for i, p in enumerate(outputs):
            choice = builder.node("ArgMax", [p], f"collect/m{i}.argmax", {"axis": 1, "keepdims": 0, "select_last_index": 0})
            votes.append(builder.node("OneHot", [choice, depth, on_off], f"collect/m{i}.vote", {"axis": -1}))
        return builder.node("Mean", votes, OUTPUT_NAME)
    axes = builder.const("collect/axes", np.array([1], np.int64))
    if criterion == "prod":
        log_scores = _prod_log_scores_float64(builder, outputs) if precision == "float64" else _prod_log_scores(builder, outputs)
        # subtract the row maximum so the best class is exp(0) = 1 and the row sum never underflows to 0
        log_max = builder.node("ReduceMax", [log_scores, axes], "collect/log_max", {"keepdims": 1})
        scores = builder.node("Exp", [builder.node("Sub", [log_scores, log_max], "collect/log_shifted")], "collect/scores")
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
        metadata: extra model metadata (e.g. `MEMBERS_KEY`); `ENSEMBLE_KEY` is always codec's own.
        precision: "float32" (default: every runtime runs it) or "float64": the prod collect stage in
            double precision with combine's own clipping constant, for bit-level agreement with `combine`
            when many members disagree strongly (float32 sums of large logs lose ~1e-6 there).

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
    outputs = [_emit_member(builder, plan, i, x, csn_values) for i, plan in enumerate(plans)]
    out_shape = tuple(members[0].output_shape)
    graph_outputs = [_collect(builder, outputs, criterion, int(out_shape[0]) if task == "classification" else 0, precision)]
    if member_outputs:
        builder.prefix = ""
        graph_outputs += [builder.node("Identity", [v], member_output_name(i)) for i, v in enumerate(outputs)]
    for value in graph_outputs:
        value.shape = ir.Shape(["batch", *out_shape])
        value.type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph(
        [x], graph_outputs, nodes=builder.nodes, initializers=builder.initializers, opset_imports={"": OPSET}, name="ensemble"
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
        "prod_eps": PROD_EPS if criterion == "prod" else None,
    }
    props = dict(metadata or {})
    props[ENSEMBLE_KEY] = json.dumps(description, separators=(",", ":"))
    return make_model(graph, props)


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
