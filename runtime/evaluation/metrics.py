"""The one implementation of every ensemble metric in codec (pure numpy).

Conventions used throughout:

- Member outputs are stacked as ``member_probs`` of shape ``(M, N, K)``: M members, N examples, K classes.
  They are probabilities (non-negative; rows normally sum to 1) unless a function says it takes scores.
  A list or tuple of ``(N, K)`` arrays is accepted too, and members that differ in N or K are refused
  with a `ShapeError` naming the first member that differs.
- Labels ``y`` are a 1-D array of N integer class indices in ``[0, K)``.
- Every ``argmax`` breaks ties by the lowest class index (numpy's rule). This matters for ``vote``, whose
  scores tie often, and for members that output exactly equal probabilities.
- Computation happens in float64 whatever the input dtype, so results do not depend on how members were
  exported.
- Bad input (wrong shapes, empty arrays, NaN/inf, labels out of range) raises `ShapeError` or `DataError`;
  a bad option (unknown criterion, ``n_bins < 1``, ``alpha`` outside (0, 1), ...) raises `ConfigError`.
  Every message is one readable line.

Scalar metrics return python ``float`` and per-member metrics return 1-D float64 arrays, so
`evaluate_classifier` can hand back plain JSON-serialisable python values.
"""

import numpy as np

from codec.errors import ConfigError, DataError, ShapeError
from codec.errors import positive_int as _positive_int
from codec.ir.criteria import CRITERIA, PROD_EPS

# the statistics live in stats.py; bootstrap_ci is re-exported where it was first defined
from codec.runtime.evaluation.stats import bootstrap_ci  # noqa: F401

# ----------------------------------------------------------------------------------------------------
# Validation helpers: turn whatever the caller passed into float64/int64 arrays or raise one-line errors.
# ----------------------------------------------------------------------------------------------------


def _as_numeric(values, name: str) -> np.ndarray:
    """Return `values` as a float64 array, refusing non-numeric data and NaN/inf."""
    try:
        array = np.asarray(values)
    except ValueError as exc:  # ragged nested lists
        raise ShapeError(f"{name} is ragged (its rows have different lengths): {exc}") from None
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.bool_)
    ):
        raise DataError(f"{name} must be numeric, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if array.size and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise DataError(f"{name} contains {bad} NaN or infinite value(s)")
    return array


def _member_stack(member_outputs, name: str = "member_probs", *, probabilities: bool = True) -> np.ndarray:
    """Validate an (M, N, K) stack (or a sequence of (N, K) arrays) and return it as float64.

    Args:
        member_outputs: the members' outputs.
        name: how the argument is called in error messages.
        probabilities: refuse negative values (scores such as logits are allowed when False).
    """
    if isinstance(member_outputs, (list, tuple)):
        if len(member_outputs) == 0:
            raise DataError(f"{name} is empty: no members")
        try:
            shapes = [np.shape(member) for member in member_outputs]
        except ValueError:  # a member that is itself a ragged nested list
            raise ShapeError(f"{name}: a member is ragged (its rows have different lengths)") from None
        for index, shape in enumerate(shapes):
            if shape != shapes[0]:
                raise ShapeError(
                    f"{name}: member {index} has shape {shape} but member 0 has {shapes[0]}"
                    " (members must share the number of examples and classes)"
                )
    array = _as_numeric(member_outputs, name)
    if array.ndim != 3:
        raise ShapeError(f"{name} must have shape (members, examples, classes), got shape {array.shape}")
    if 0 in array.shape:
        raise DataError(f"{name} is empty: shape {array.shape} (members, examples, classes)")
    if probabilities and np.any(array < 0):
        raise DataError(f"{name} must be probabilities but has negative values (min {array.min():.4g})")
    return array


def _probs_2d(probs, name: str = "probs", *, probabilities: bool = True) -> np.ndarray:
    """Validate an (N, K) array of probabilities (or scores) and return it as float64."""
    array = _as_numeric(probs, name)
    if array.ndim != 2:
        raise ShapeError(f"{name} must have shape (examples, classes), got shape {array.shape}")
    if 0 in array.shape:
        raise DataError(f"{name} is empty: shape {array.shape} (examples, classes)")
    if probabilities and np.any(array < 0):
        raise DataError(f"{name} must be probabilities but has negative values (min {array.min():.4g})")
    return array


def _labels(y, n_examples: int, num_classes: int | None, name: str = "y") -> np.ndarray:
    """Validate 1-D integer labels of length `n_examples` (in range when `num_classes` is known)."""
    array = _as_numeric(y, name)
    if array.ndim != 1:
        raise ShapeError(f"{name} must be 1-D (one label per example), got shape {array.shape}")
    if array.shape[0] == 0:
        raise DataError(f"{name} is empty")
    if array.shape[0] != n_examples:
        raise ShapeError(f"{name} has {array.shape[0]} labels but there are {n_examples} examples")
    if not np.all(array == np.round(array)):
        raise DataError(f"{name} must hold integer class indices, got non-integer values")
    labels = array.astype(np.int64)
    if labels.min() < 0 or (num_classes is not None and labels.max() >= num_classes):
        bound = f"[0, {num_classes})" if num_classes is not None else "[0, inf)"
        raise DataError(f"{name} has labels out of range {bound}: min {labels.min()}, max {labels.max()}")
    return labels


def _criterion(criterion: str) -> str:
    if criterion not in CRITERIA:
        raise ConfigError(f"unknown ensemble criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    return criterion


# ----------------------------------------------------------------------------------------------------
# Combining members and classification accuracy
# ----------------------------------------------------------------------------------------------------


def _combine_valid(stack: np.ndarray, criterion: str) -> np.ndarray:
    """`combine` on an already validated float64 (M, N, K) stack."""
    num_classes = stack.shape[2]
    if criterion == "prod":
        # Sum of logs instead of a product: 0.5 ** 2000 underflows to 0 for every class and the
        # normalisation would divide 0 by 0. Subtracting the row maximum before exp keeps the best class
        # at exp(0) = 1, so the row sum is >= 1 and never 0.
        log_scores = np.log(np.maximum(stack, PROD_EPS)).sum(axis=0)
        log_scores -= log_scores.max(axis=1, keepdims=True)
        scores = np.exp(log_scores)
    elif criterion == "mean":
        return stack.mean(axis=0)
    elif criterion == "vote":
        votes = stack.argmax(axis=2)  # (M, N); a member's own ties go to the lowest class index
        counts = np.zeros(stack.shape[1:], dtype=np.float64)
        np.add.at(counts, (np.broadcast_to(np.arange(stack.shape[1]), votes.shape), votes), 1.0)
        return counts / stack.shape[0]
    else:  # "max"
        scores = stack.max(axis=0)
    totals = scores.sum(axis=1, keepdims=True)
    # Only "max" can meet an all-zero row (every member gave every class 0): call it uniform rather
    # than divide by zero.
    zero_rows = totals[:, 0] == 0
    if np.any(zero_rows):
        scores[zero_rows] = 1.0
        totals[zero_rows] = num_classes
    return scores / totals


def combine(member_probs: np.ndarray, criterion: str = "prod") -> np.ndarray:
    """Combine member probabilities into ensemble scores, one probability-like row per example.

    Criteria:
        - ``prod``: the product of the members' probabilities per class, renormalised to sum to 1 (the
          geometric-mean rule up to normalisation). Computed as a sum of logs after clipping every
          probability to at least `PROD_EPS` (the smallest normal float64, ~2.2e-308), so an exact 0
          from one member vetoes the class against any class no member rules out, and rows where every
          class is vetoed stay finite instead of becoming 0/0.
        - ``mean``: the arithmetic mean of the probabilities (not renormalised; rows sum to 1 when the
          members' rows do).
        - ``vote``: the fraction of members whose argmax is each class (a member's own ties go to its
          lowest class index). Ties between classes are broken by the lowest class index when an
          argmax is taken downstream (e.g. by `accuracy`).
        - ``max``: the per-class maximum over members, renormalised to sum to 1 (an all-zero row
          becomes uniform).

    Args:
        member_probs: (M, N, K) member probabilities, or a sequence of M (N, K) arrays.
        criterion: one of `CRITERIA`.

    Returns:
        (N, K) float64 ensemble scores.

    Raises:
        ConfigError: unknown criterion.
        ShapeError: not (M, N, K), or members with different shapes.
        DataError: empty, NaN/inf, or negative probabilities.
    """
    criterion = _criterion(criterion)
    return _combine_valid(_member_stack(member_probs), criterion)


def accuracy(scores_or_labels: np.ndarray, y: np.ndarray) -> float:
    """Fraction of examples predicted correctly.

    Args:
        scores_or_labels: (N, K) scores of any kind (probabilities, logits, votes), whose argmax is the
            prediction with ties going to the lowest class index; or (N,) predicted labels.
        y: (N,) true labels.

    Returns:
        Accuracy in [0, 1].
    """
    predictions, num_classes = _predictions(scores_or_labels, "scores_or_labels")
    labels = _labels(y, predictions.shape[0], num_classes)
    return float(np.mean(predictions == labels))


def _predictions(scores_or_labels, name: str) -> tuple[np.ndarray, int | None]:
    """Predicted labels from (N, K) scores (argmax) or (N,) labels, and K when scores give it."""
    array = _as_numeric(scores_or_labels, name)
    if array.ndim == 2:
        if 0 in array.shape:
            raise DataError(f"{name} is empty: shape {array.shape} (examples, classes)")
        return array.argmax(axis=1), array.shape[1]
    if array.ndim == 1:
        if array.shape[0] == 0:
            raise DataError(f"{name} is empty")
        if not np.all(array == np.round(array)):
            raise DataError(f"{name} given as 1-D labels must hold integers")
        return array.astype(np.int64), None
    raise ShapeError(f"{name} must be (examples, classes) scores or (examples,) labels, got {array.shape}")


def member_accuracies(member_probs: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Accuracy of each member on its own.

    Args:
        member_probs: (M, N, K) member scores (probabilities or logits; only the argmax is used).
        y: (N,) true labels.

    Returns:
        (M,) float64 accuracies.
    """
    stack = _member_stack(member_probs, probabilities=False)
    labels = _labels(y, stack.shape[1], stack.shape[2])
    return np.mean(stack.argmax(axis=2) == labels[None, :], axis=1)


def oracle_accuracy(member_probs: np.ndarray, y: np.ndarray) -> float:
    """Fraction of examples that at least one member classifies correctly (an upper bound for any
    rule that picks one member's answer per example).

    Args:
        member_probs: (M, N, K) member scores (only the argmax is used).
        y: (N,) true labels.
    """
    stack = _member_stack(member_probs, probabilities=False)
    labels = _labels(y, stack.shape[1], stack.shape[2])
    return float(np.mean(np.any(stack.argmax(axis=2) == labels[None, :], axis=0)))


def cumulative_accuracy(member_probs: np.ndarray, y: np.ndarray, criterion: str = "prod") -> np.ndarray:
    """Accuracy of the ensemble made of the first m members, for m = 1..M (in the stack's order).

    Entry 0 is member 0 alone (with ``vote`` and ``prod``/``max``/``mean`` that is its own argmax).

    Returns:
        (M,) float64 accuracies.
    """
    criterion = _criterion(criterion)
    stack = _member_stack(member_probs)
    labels = _labels(y, stack.shape[1], stack.shape[2])
    # M is small (tens of members), so recombining each prefix keeps one code path for all criteria.
    return np.array(
        [
            np.mean(_combine_valid(stack[:m], criterion).argmax(axis=1) == labels)
            for m in range(1, stack.shape[0] + 1)
        ],
        dtype=np.float64,
    )


def ensemble_effect(member_probs: np.ndarray, y: np.ndarray, criterion: str = "prod") -> float:
    """Ensemble accuracy minus the best single member's accuracy.

    This is the gain an ensemble brings over simply deploying its best member (CODE's notion of the
    ensemble effect): positive when combining helps, zero or negative when the members are too alike
    or the criterion hurts. The best member is chosen on the same data, so the baseline is optimistic.
    """
    criterion = _criterion(criterion)
    stack = _member_stack(member_probs)
    labels = _labels(y, stack.shape[1], stack.shape[2])
    ensemble = np.mean(_combine_valid(stack, criterion).argmax(axis=1) == labels)
    best_member = np.max(np.mean(stack.argmax(axis=2) == labels[None, :], axis=1))
    return float(ensemble - best_member)


# ----------------------------------------------------------------------------------------------------
# Probabilistic quality
# ----------------------------------------------------------------------------------------------------


def nll(probs: np.ndarray, y: np.ndarray, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true labels, ``-mean(log(max(p[i, y_i], eps)))``.

    Probabilities are used as given (not renormalised). `eps` bounds the penalty of a zero probability
    (which ``vote`` and ``prod`` with vetoes produce) at ``-log(eps)`` (~27.6 for 1e-12).

    Args:
        probs: (N, K) probabilities.
        y: (N,) true labels.
        eps: floor applied to the true-class probability, in (0, 1).
    """
    if not (isinstance(eps, (int, float, np.floating)) and 0.0 < float(eps) < 1.0):
        raise ConfigError(f"eps must be in (0, 1), got {eps!r}")
    array = _probs_2d(probs)
    labels = _labels(y, array.shape[0], array.shape[1])
    true_class = array[np.arange(array.shape[0]), labels]
    return float(-np.mean(np.log(np.maximum(true_class, eps))))


def ece(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Expected calibration error with equal-width confidence bins.

    The confidence of an example is its largest probability and its prediction the argmax (ties to the
    lowest class index). Bins split [0, 1] into `n_bins` equal intervals, right-closed: bin b holds
    confidences in ``(edges[b], edges[b + 1]]`` with ``edges = np.linspace(0, 1, n_bins + 1)`` (a
    confidence of exactly 0.5 with 2 bins falls in the first bin). The first bin also takes a
    confidence of exactly 0, and confidences above 1 from rounding go to the last bin. Then

        ECE = sum_b (n_b / N) * |accuracy_b - mean confidence_b|

    over non-empty bins.

    Args:
        probs: (N, K) probabilities.
        y: (N,) true labels.
        n_bins: number of bins, >= 1.
    """
    n_bins = _positive_int(n_bins, "n_bins")
    array = _probs_2d(probs)
    labels = _labels(y, array.shape[0], array.shape[1])
    confidence = array.max(axis=1)
    correct = (array.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # side="left" returns k for a value equal to edges[k], so k - 1 is the bin whose right edge it is.
    bins = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    counts = np.bincount(bins, minlength=n_bins).astype(np.float64)
    correct_sums = np.bincount(bins, weights=correct, minlength=n_bins)
    confidence_sums = np.bincount(bins, weights=confidence, minlength=n_bins)
    occupied = counts > 0
    gaps = np.abs(correct_sums[occupied] - confidence_sums[occupied])  # = n_b * |acc_b - conf_b|
    return float(gaps.sum() / array.shape[0])


# ----------------------------------------------------------------------------------------------------
# Autoencoders
# ----------------------------------------------------------------------------------------------------


def mse(reconstructions: np.ndarray, x: np.ndarray) -> float:
    """Mean squared error over all elements; `reconstructions` and `x` must have the same shape."""
    recon = _as_numeric(reconstructions, "reconstructions")
    target = _as_numeric(x, "x")
    if recon.shape != target.shape:
        raise ShapeError(f"reconstructions have shape {recon.shape} but x has shape {target.shape}")
    if recon.size == 0:
        raise DataError("reconstructions and x are empty")
    return float(np.mean((recon - target) ** 2))


def cumulative_mse(member_recons: np.ndarray, x: np.ndarray) -> np.ndarray:
    """MSE of the mean reconstruction of the first m members, for m = 1..M.

    Args:
        member_recons: (M, N, ...) reconstructions, one slab per member.
        x: (N, ...) the inputs being reconstructed.

    Returns:
        (M,) float64 MSEs; entry 0 is member 0 alone.
    """
    recons = _as_numeric(member_recons, "member_recons")
    target = _as_numeric(x, "x")
    if recons.ndim < 2 or recons.shape[1:] != target.shape:
        raise ShapeError(
            f"member_recons must have shape (members,) + x.shape = (M,) + {target.shape}, got {recons.shape}"
        )
    if recons.size == 0:
        raise DataError(f"member_recons is empty: shape {recons.shape}")
    counts = np.arange(1, recons.shape[0] + 1, dtype=np.float64).reshape((-1,) + (1,) * target.ndim)
    running_means = np.cumsum(recons, axis=0) / counts
    errors = (running_means - target[None]) ** 2
    return errors.reshape(recons.shape[0], -1).mean(axis=1)


# ----------------------------------------------------------------------------------------------------
# CODE's redundancy and memory metrics, MCL specialisation
# ----------------------------------------------------------------------------------------------------


def redundancy(member_predictions: np.ndarray) -> float:
    """Output redundancy of an ensemble (CODE paper):

        R = sum_i (N - U_i) / (N * I)

    where, in the paper's notation, N is the number of members, I the number of inputs, and U_i the
    number of distinct labels the members predict for input i. R = 0 when the members all disagree on
    every input (possible only when N <= K), and R = (N - 1) / N, its maximum, when they always agree:
    then N - 1 of every N outputs were redundant.

    Args:
        member_predictions: (N_members, I) predicted labels (e.g. ``member_probs.argmax(axis=2)``).

    Returns:
        R as a float.
    """
    predictions = _as_numeric(member_predictions, "member_predictions")
    if predictions.ndim != 2:
        raise ShapeError(
            f"member_predictions must have shape (members, inputs) of labels, got {predictions.shape}"
        )
    if 0 in predictions.shape:
        raise DataError(f"member_predictions is empty: shape {predictions.shape}")
    n_members, n_inputs = predictions.shape
    ordered = np.sort(predictions, axis=0)
    # Distinct values per column = 1 + the number of changes between consecutive sorted values.
    distinct = 1 + np.count_nonzero(np.diff(ordered, axis=0) != 0, axis=0)
    return float(np.sum(n_members - distinct) / (n_members * n_inputs))


def memory_footprint(tp_dnn: int, n_code: int, tp_codedn: int, csn: int, n_base: int) -> float:
    """Training memory footprint of a CODE ensemble relative to a conventional one (CODE paper):

        M = (TP_dnn + (N_code - 1) * TP_codedn + CSN) / (N_base * TP_dnn)

    Args:
        tp_dnn: trainable parameters of one conventional member (the first member, trained in full).
        n_code: members in the CODE ensemble (the first one plus N_code - 1 grown ones), >= 1.
        tp_codedn: trainable parameters of one CODE-grown member (its fresh neurons and output layer;
            the frozen CSN is not counted here).
        csn: parameters of the common sub-network, stored once and shared by the grown members.
        n_base: members in the conventional (baseline) ensemble, >= 1.

    Returns:
        M; below 1 means CODE needs less memory for its trainable state than the baseline.

    Raises:
        DataError: a count that is not an integer, negative, or zero where it divides or counts members.
    """
    counts = {"tp_dnn": tp_dnn, "n_code": n_code, "tp_codedn": tp_codedn, "csn": csn, "n_base": n_base}
    for name, value in counts.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
            raise DataError(f"memory_footprint: {name} must be a non-negative integer, got {value!r}")
    for name in ("tp_dnn", "n_code", "n_base"):
        if counts[name] == 0:
            raise DataError(f"memory_footprint: {name} must be at least 1")
    return float((tp_dnn + (n_code - 1) * tp_codedn + csn) / (n_base * tp_dnn))


def assignment_table(member_losses: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """How MCL specialises: which member wins each example, counted per class (Lee et al.).

    Each example is assigned to the member with the lowest loss on it; ties go to the lowest member
    index, so the table is deterministic (unlike MCL training, which breaks ties randomly).

    Args:
        member_losses: (M, N) per-member, per-example losses.
        y: (N,) true labels.
        num_classes: number of classes K.

    Returns:
        (M, K) int64 counts; ``table[m, c]`` is the number of class-c examples member m wins, and the
        table sums to N.
    """
    num_classes = _positive_int(num_classes, "num_classes")
    losses = _as_numeric(member_losses, "member_losses")
    if losses.ndim != 2:
        raise ShapeError(f"member_losses must have shape (members, examples), got {losses.shape}")
    if 0 in losses.shape:
        raise DataError(f"member_losses is empty: shape {losses.shape}")
    labels = _labels(y, losses.shape[1], num_classes)
    winners = losses.argmin(axis=0)
    table = np.zeros((losses.shape[0], num_classes), dtype=np.int64)
    np.add.at(table, (winners, labels), 1)
    return table


# ----------------------------------------------------------------------------------------------------
# Reports and uncertainty
# ----------------------------------------------------------------------------------------------------


def evaluate_classifier(member_probs: np.ndarray, y: np.ndarray, criterion: str = "prod") -> dict:
    """Every classification metric of an ensemble, as plain python values (JSON-serialisable).

    NLL and ECE are those of the combined scores (for ``vote`` these are vote fractions, so NLL hits
    the eps floor whenever no member votes for the true class). Redundancy is computed on the members'
    argmax predictions.

    Returns:
        A dict with keys ``criterion``, ``n_members``, ``n_examples``, ``n_classes``, ``accuracy``,
        ``member_accuracies`` (list), ``best_member_accuracy``, ``oracle_accuracy``, ``nll``, ``ece``,
        ``ensemble_effect``, ``redundancy`` and ``cumulative_accuracy`` (list, first m members).
    """
    criterion = _criterion(criterion)
    stack = _member_stack(member_probs)
    labels = _labels(y, stack.shape[1], stack.shape[2])
    scores = _combine_valid(stack, criterion)
    per_member = member_accuracies(stack, labels)
    ensemble_accuracy = accuracy(scores, labels)
    return {
        "criterion": criterion,
        "n_members": int(stack.shape[0]),
        "n_examples": int(stack.shape[1]),
        "n_classes": int(stack.shape[2]),
        "accuracy": ensemble_accuracy,
        "member_accuracies": [float(value) for value in per_member],
        "best_member_accuracy": float(per_member.max()),
        "oracle_accuracy": oracle_accuracy(stack, labels),
        "nll": nll(scores, labels),
        "ece": ece(scores, labels),
        "ensemble_effect": float(ensemble_accuracy - per_member.max()),
        "redundancy": redundancy(stack.argmax(axis=2)),
        "cumulative_accuracy": [float(value) for value in cumulative_accuracy(stack, labels, criterion)],
    }
