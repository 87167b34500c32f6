"""Exact, OpenMP-parallel kernels for the neuron passes: bit-packed firing, co-firing, matching, NDG edges.

This is the module the passes and the profiler import. Each function checks its inputs and then calls a
nogil kernel of the compiled extension `codec.kernels._kernels`.

Input policy (the same for every function):
    * dtypes are never converted silently: a wrong dtype raises ValueError naming the argument and the
      expected dtype (the only exception: bool arrays are accepted where uint8 flags are, and are viewed,
      not copied, as uint8);
    * inputs (arrays the kernels only read) that are not C-contiguous are copied to C-contiguous arrays
      (np.ascontiguousarray), so strided views work at the price of a copy; read-only arrays are fine;
    * an output array passed in (`out=` of `cofire_counts`) is written in place, so it must already be
      C-contiguous, writeable and of the right dtype and shape, or ValueError is raised.

Threads: every parallel kernel takes `n_threads` (greedy_match does not: its sweep is sequential by nature);
None means OpenMP's current default for the calling thread (`num_threads()`, which `set_num_threads` and
OMP_NUM_THREADS change). Results never depend on the number of threads.

Bit layout of packed firing (`pack_fires`): one row per neuron, W = ceil(B / 64) uint64 words per row;
bit b (least significant first) of word w of row i says whether neuron i fired on input w * 64 + b; the
padding bits of the last word are zero, so popcounts of ANDed rows count inputs on which both fired.
"""

from __future__ import annotations

import numpy as np

from codec.errors import positive_int
from codec.kernels import _kernels

__all__ = [
    "cofire_counts",
    "count_fires",
    "greedy_match",
    "ndg_edges",
    "num_threads",
    "openmp_enabled",
    "pack_fires",
    "packed_words",
    "popcount_isa",
    "set_num_threads",
]


def openmp_enabled() -> bool:
    """Whether the kernels were compiled with OpenMP (otherwise every kernel runs on one thread)."""
    return _kernels.openmp_enabled()


def num_threads() -> int:
    """OpenMP's current maximum number of threads for kernels called from this thread (1 without OpenMP)."""
    return int(_kernels.max_threads())


def set_num_threads(n: int) -> None:
    """Set the number of OpenMP threads later kernel calls from this thread use by default.

    Args:
        n: Number of threads, at least 1. Has no effect when compiled without OpenMP.

    Raises:
        ValueError: If `n` is not a positive integer.
    """
    _kernels.set_max_threads(_positive_int(n, "n"))


def popcount_isa() -> str:
    """Popcount path `cofire_counts` takes by default: "avx512-vpopcntdq" where available, else "scalar"."""
    return "avx512-vpopcntdq" if _kernels.avx512_popcount_available() else "scalar"


def packed_words(n_inputs: int) -> int:
    """Number of uint64 words that hold one bit per input: ceil(n_inputs / 64)."""
    return (int(n_inputs) + 63) // 64


def pack_fires(fires: np.ndarray, n_threads: int | None = None) -> np.ndarray:
    """Pack a batch of firing flags into neuron-major bit rows.

    Args:
        fires: (B, n) bool or uint8 array, inputs by neurons; any nonzero value means "fired".
        n_threads: OpenMP threads; None for `num_threads()`.

    Returns:
        (n, ceil(B / 64)) uint64 array: bit b of word w of row i is fires[w * 64 + b, i]; padding bits zero.

    Raises:
        ValueError: If `fires` is not a 2-D bool/uint8 array.
    """
    fires = _flags(fires, "fires", ndim=2)
    n_inputs, n = fires.shape
    packed = np.empty((n, packed_words(n_inputs)), dtype=np.uint64)
    _kernels.pack_fires_into(fires, packed, _threads(n_threads))
    return packed


def cofire_counts(
    a: np.ndarray,
    b: np.ndarray,
    out: np.ndarray | None = None,
    n_threads: int | None = None,
    simd: bool | None = None,
) -> np.ndarray:
    """Count, for every pair of packed rows, the inputs on which both fired, accumulating into `out`.

    With `a = pack_fires(f)` and `b = pack_fires(g)` for the same inputs, the result equals
    `f.T.astype(int64) @ g.astype(int64)` exactly, for any number of inputs.

    Args:
        a: (n, W) uint64 packed rows (see `pack_fires`).
        b: (m, W) uint64 packed rows over the same W words.
        out: Optional (n, m) int64 C-contiguous array; counts are ADDED to it, so successive batches can be
            accumulated into one array. A new zero-filled array is used when None.
        n_threads: OpenMP threads; None for `num_threads()`.
        simd: None uses the AVX-512 VPOPCNTDQ path when `popcount_isa()` says it is available (the
            results are identical either way); False forces one POPCNT per word; True requires AVX-512.

    Returns:
        `out` (or the new array): out[i, j] += popcount(a[i] & b[j]) summed over the W words.

    Raises:
        ValueError: On a wrong dtype or rank, a different number of words in `a` and `b`, or an `out` of
            the wrong dtype/shape, or one that is not C-contiguous or not writeable; or `simd=True` on a
            CPU or build without AVX-512 VPOPCNTDQ.
    """
    a = _array(a, "a", np.uint64, ndim=2)
    b = _array(b, "b", np.uint64, ndim=2)
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"a and b must have the same number of 64-bit words per row (the same inputs), "
            f"got a {a.shape} and b {b.shape}"
        )
    shape = (a.shape[0], b.shape[0])
    if out is None:
        out = np.zeros(shape, dtype=np.int64)
    else:
        _check_out(out, "out", np.int64, shape)
    available = _kernels.avx512_popcount_available()
    if simd and not available:
        raise ValueError("simd=True needs AVX-512 VPOPCNTDQ, which this CPU or build does not have")
    _kernels.cofire_counts_into(a, b, out, _threads(n_threads), available if simd is None else bool(simd))
    return out


def count_fires(a: np.ndarray, n_threads: int | None = None) -> np.ndarray:
    """Number of set bits (inputs on which the neuron fired) in each packed row.

    Args:
        a: (n, W) uint64 packed rows (see `pack_fires`).
        n_threads: OpenMP threads; None for `num_threads()`.

    Returns:
        (n,) int64 array of popcounts.

    Raises:
        ValueError: If `a` is not a 2-D uint64 array.
    """
    a = _array(a, "a", np.uint64, ndim=2)
    counts = np.empty(a.shape[0], dtype=np.int64)
    _kernels.count_fires_into(a, counts, _threads(n_threads))
    return counts


def greedy_match(score: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Greedy one-to-one matching of rows to columns by decreasing score, among eligible pairs only.

    Repeatedly takes the eligible pair (i, j) with the highest score whose row i and column j are both
    still unmatched; equal scores are taken in order of lowest i, then lowest j. Runs in O(P log P) for
    P eligible pairs (one stable sort, then one sweep). This is the usual greedy approximation of a
    maximum-weight matching, not the optimum.

    Args:
        score: (n, m) float64 array; NaN is refused because it has no order (+-inf are fine).
        eligible: (n, m) bool or uint8 array; nonzero marks a pair that may be matched.

    Returns:
        (n,) int64 array: result[i] is the column matched to row i, or -1.

    Raises:
        ValueError: On a wrong dtype or rank, mismatched shapes, or a NaN score on an eligible pair.
    """
    score = _array(score, "score", np.float64, ndim=2)
    eligible = _flags(eligible, "eligible", ndim=2)
    if eligible.shape != score.shape:
        raise ValueError(f"score {score.shape} and eligible {eligible.shape} must have the same shape")
    n, m = score.shape
    flat = np.flatnonzero(eligible)  # row-major, so already in (i, j) order
    pair_scores = score.ravel()[flat]
    if np.isnan(pair_scores).any():
        raise ValueError("score has NaN on an eligible pair; NaN cannot be ordered")
    # A stable sort on -score keeps equal scores in (i, j) order: the tie rule.
    order = np.argsort(-pair_scores, kind="stable")
    flat = flat[order]
    rows = np.ascontiguousarray(flat // max(m, 1), dtype=np.int64)
    cols = np.ascontiguousarray(flat % max(m, 1), dtype=np.int64)
    match = np.full(n, -1, dtype=np.int64)
    _kernels.greedy_sweep(rows, cols, match, m)
    return match


def ndg_edges(
    cofire: np.ndarray,
    fire_prev: np.ndarray,
    count: int,
    threshold: float,
    connected: np.ndarray,
    n_threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Edges of the Neuron Dependence Graph between a layer and its predecessor layer.

    Neuron i of the layer depends on neuron j of the predecessor when they are connected and i fires on
    at least `threshold` of the inputs on which j fires: cofire[i, j] / fire_prev[j] >= threshold. A
    predecessor that never fired (fire_prev[j] == 0) has no edges.

    Args:
        cofire: (n, m) int64 co-firing counts (inputs on which both i and j fired).
        fire_prev: (m,) int64 firing counts of the predecessor's neurons.
        count: Number of profiled inputs the counts were taken over; used to check that the statistics
            are consistent (0 <= cofire[i, j] <= fire_prev[j] <= count).
        threshold: Minimum fraction, a finite number in [0, 1].
        connected: (n, m) bool or uint8; nonzero where the layer's weight links j to i.
        n_threads: OpenMP threads; None for `num_threads()`.

    Returns:
        (rows, cols, weights): int64, int64 and float64 arrays of equal length, sorted by (row, col);
        weights[k] = cofire[rows[k], cols[k]] / fire_prev[cols[k]].

    Raises:
        ValueError: On wrong dtypes or shapes, a threshold outside [0, 1], or inconsistent counts.
    """
    cofire = _array(cofire, "cofire", np.int64, ndim=2)
    fire_prev = _array(fire_prev, "fire_prev", np.int64, ndim=1)
    connected = _flags(connected, "connected", ndim=2)
    n, m = cofire.shape
    if fire_prev.shape != (m,):
        raise ValueError(f"fire_prev must have shape ({m},) for cofire {cofire.shape}, got {fire_prev.shape}")
    if connected.shape != cofire.shape:
        raise ValueError(f"connected must have the shape of cofire {cofire.shape}, got {connected.shape}")
    count = _non_negative_int(count, "count")
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:  # also refuses NaN
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if fire_prev.size and (fire_prev.min() < 0 or fire_prev.max() > count):
        low, high = fire_prev.min(), fire_prev.max()
        raise ValueError(f"fire_prev must lie in [0, count={count}], got values in [{low}, {high}]")
    if cofire.size and (cofire.min() < 0 or (cofire > fire_prev[None, :]).any()):
        raise ValueError("cofire must satisfy 0 <= cofire[i, j] <= fire_prev[j] (inconsistent statistics)")
    threads = _threads(n_threads)
    per_row = np.empty(n, dtype=np.int64)
    _kernels.ndg_edge_counts(cofire, fire_prev, connected, threshold, per_row, threads)
    row_start = np.zeros(n, dtype=np.int64)
    np.cumsum(per_row[:-1], out=row_start[1:])
    total = int(per_row.sum())
    rows = np.empty(total, dtype=np.int64)
    cols = np.empty(total, dtype=np.int64)
    weights = np.empty(total, dtype=np.float64)
    _kernels.ndg_edge_fill(cofire, fire_prev, connected, threshold, row_start, rows, cols, weights, threads)
    return rows, cols, weights


def _array(value, name: str, dtype, ndim: int) -> np.ndarray:
    """`value` as a C-contiguous array of exactly `dtype` and rank `ndim` (copied only if strided)."""
    if not isinstance(value, np.ndarray):  # ValueError like every other refusal here, so one except suffices
        raise ValueError(f"{name} must be a numpy array, got {type(value).__name__}")  # noqa: TRY004
    if value.dtype != dtype:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype).name}, got {value.dtype}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {value.shape}")
    return np.ascontiguousarray(value)


def _flags(value, name: str, ndim: int) -> np.ndarray:
    """A bool or uint8 array as C-contiguous uint8 (bool is viewed, not converted)."""
    if isinstance(value, np.ndarray) and value.dtype == np.bool_:
        value = value.view(np.uint8)
    elif isinstance(value, np.ndarray) and value.dtype != np.uint8:
        raise ValueError(f"{name} must have dtype bool or uint8, got {value.dtype}")
    return _array(value, name, np.uint8, ndim)


def _check_out(out, name: str, dtype, shape: tuple[int, ...]) -> None:
    if not isinstance(out, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(out).__name__}")  # noqa: TRY004
    if out.dtype != dtype:
        raise ValueError(f"{name} must have dtype {np.dtype(dtype).name}, got {out.dtype}")
    if out.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {out.shape}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (it is written in place)")
    if not out.flags.writeable:
        raise ValueError(f"{name} must be writeable (it is written in place)")


def _threads(n_threads: int | None) -> int:
    return num_threads() if n_threads is None else _positive_int(n_threads, "n_threads")


def _positive_int(value, name: str) -> int:
    return positive_int(value, name, error=ValueError)  # the input policy above: bad arguments are ValueError


def _non_negative_int(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)
