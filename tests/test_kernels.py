"""codec.kernels against plain numpy / Python references: every kernel must be exact.

Shapes are chosen to cross the kernels' internal boundaries: inputs not a multiple of 64 (padding bits),
more than 64 neurons with odd remainders (2 x 2 register blocks, 64-neuron pack blocks, 16-row and 64-column
tiles) and more than 256 words (the word blocking of cofire_counts).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from codec import kernels as K

SIMD_CHOICES = [False, None]  # forced scalar, and the default (AVX-512 where the CPU has it)


def reference_pack(fires: np.ndarray) -> np.ndarray:
    """Bit b of word w of row i = fires[w * 64 + b, i], via numpy's little-endian packbits."""
    n_inputs, n = fires.shape
    words = K.packed_words(n_inputs)
    bits = np.zeros((n, words * 64), dtype=np.uint8)
    bits[:, :n_inputs] = fires.T != 0
    return np.packbits(bits, axis=1, bitorder="little").view("<u8").astype(np.uint64).reshape(n, words)


def reference_greedy(score: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """The definition, literally: take the best free eligible pair (ties: lowest i, then j) until none."""
    n, m = score.shape
    match = [-1] * n
    taken = set()
    while True:
        best = None
        for i in range(n):
            for j in range(m):
                free = eligible[i, j] and match[i] < 0 and j not in taken
                if free and (best is None or score[i, j] > score[best]):  # strict: the first of equals wins
                    best = (i, j)
        if best is None:
            return np.array(match, dtype=np.int64)
        match[best[0]] = best[1]
        taken.add(best[1])


def reference_ndg(cofire, fire_prev, threshold, connected):
    with np.errstate(divide="ignore", invalid="ignore"):
        fraction = cofire / fire_prev[None, :]
    keep = (connected != 0) & (fire_prev[None, :] > 0) & (fraction >= threshold)
    rows, cols = np.nonzero(keep)
    return rows.astype(np.int64), cols.astype(np.int64), fraction[rows, cols]


def random_fires(rng, n_inputs, n, rate=0.3, dead=0):
    """Random firing flags; the first `dead` neurons never fire."""
    fires = rng.random((n_inputs, n)) < rate
    fires[:, :dead] = False
    return fires


@pytest.mark.parametrize("n_inputs", [1, 63, 64, 65, 1000])
def test_pack_fires_matches_reference_and_zeroes_padding(n_inputs):
    rng = np.random.default_rng(n_inputs)
    fires = random_fires(rng, n_inputs, 131)
    packed = K.pack_fires(fires)
    assert packed.dtype == np.uint64 and packed.shape == (131, K.packed_words(n_inputs))
    np.testing.assert_array_equal(packed, reference_pack(fires))
    assert K.pack_fires(fires.astype(np.uint8) * 7).tolist() == packed.tolist()  # any nonzero byte fires
    if n_inputs % 64:
        assert not (packed[:, -1] >> np.uint64(n_inputs % 64)).any()  # padding bits stay zero


@pytest.mark.parametrize("n_inputs", [1, 63, 64, 65, 1000])
@pytest.mark.parametrize("simd", SIMD_CHOICES)
def test_cofire_counts_equal_integer_matmul(n_inputs, simd):
    rng = np.random.default_rng(n_inputs + 7)
    f = random_fires(rng, n_inputs, 37, dead=2)
    g = random_fires(rng, n_inputs, 67, rate=0.6)
    counts = K.cofire_counts(K.pack_fires(f), K.pack_fires(g), simd=simd)
    assert counts.dtype == np.int64 and counts.shape == (37, 67)
    np.testing.assert_array_equal(counts, f.T.astype(np.int64) @ g.astype(np.int64))
    np.testing.assert_array_equal(K.count_fires(K.pack_fires(f)), f.sum(axis=0))


@pytest.mark.parametrize("simd", SIMD_CHOICES)
def test_cofire_counts_exact_across_word_blocks_and_threads(simd):
    # 16,500 inputs = 258 words: more than one 256-word block; all-ones rows give the largest counts.
    rng = np.random.default_rng(3)
    f = random_fires(rng, 16_500, 19, rate=0.5)
    f[:, 0] = True
    a = K.pack_fires(f)
    expected = f.T.astype(np.int64) @ f.astype(np.int64)
    assert expected[0, 0] == 16_500
    for threads in (1, 2, 3):
        np.testing.assert_array_equal(K.cofire_counts(a, a, n_threads=threads, simd=simd), expected)


def test_simd_and_scalar_paths_agree_and_simd_true_needs_the_cpu():
    rng = np.random.default_rng(4)
    a = K.pack_fires(random_fires(rng, 777, 33))
    b = K.pack_fires(random_fires(rng, 777, 18))
    scalar = K.cofire_counts(a, b, simd=False)
    if K.popcount_isa() == "avx512-vpopcntdq":
        np.testing.assert_array_equal(K.cofire_counts(a, b, simd=True), scalar)
    else:
        assert K.popcount_isa() == "scalar"
        with pytest.raises(ValueError, match="AVX-512"):
            K.cofire_counts(a, b, simd=True)


def test_cofire_counts_accumulates_batch_after_batch():
    rng = np.random.default_rng(5)
    f = random_fires(rng, 300, 21)
    g = random_fires(rng, 300, 12)
    total = np.zeros((21, 12), dtype=np.int64)
    for start, stop in [(0, 1), (1, 64), (64, 200), (200, 300)]:  # uneven batches, padding in each
        returned = K.cofire_counts(K.pack_fires(f[start:stop]), K.pack_fires(g[start:stop]), out=total)
        assert returned is total
    np.testing.assert_array_equal(total, f.T.astype(np.int64) @ g.astype(np.int64))


def test_empty_shapes():
    assert K.pack_fires(np.zeros((0, 5), bool)).shape == (5, 0)
    assert K.pack_fires(np.zeros((10, 0), bool)).shape == (0, 1)
    np.testing.assert_array_equal(
        K.cofire_counts(np.zeros((3, 0), np.uint64), np.zeros((2, 0), np.uint64)), np.zeros((3, 2), np.int64)
    )
    assert K.greedy_match(np.zeros((0, 4)), np.zeros((0, 4), bool)).shape == (0,)
    np.testing.assert_array_equal(K.greedy_match(np.ones((2, 0)), np.ones((2, 0), bool)), [-1, -1])


def test_greedy_match_takes_best_pairs_first_not_row_order():
    score = np.array([[0.9, 0.8], [0.95, 0.1]])
    # Row 0 would take column 0 in row order; the global best (1, 0) is taken first instead.
    np.testing.assert_array_equal(K.greedy_match(score, np.ones((2, 2), bool)), [1, 0])
    # Ineligible pairs are never matched, even with the best score.
    np.testing.assert_array_equal(K.greedy_match(score, np.array([[1, 1], [0, 1]], np.uint8)), [0, 1])


def test_greedy_match_ties_lowest_row_then_lowest_column():
    np.testing.assert_array_equal(K.greedy_match(np.ones((3, 3)), np.ones((3, 3), bool)), [0, 1, 2])
    score = np.array([[1.0, 2.0, 2.0], [2.0, 0.0, 0.0]])
    np.testing.assert_array_equal(K.greedy_match(score, np.ones((2, 3), bool)), [1, 0])


# Few distinct values, so ties are common; infinities included.
SCORES = st.sampled_from([-np.inf, -1.0, 0.0, 0.5, 1.0, 2.0, np.inf])


@settings(max_examples=150, deadline=None)
@given(
    st.tuples(st.integers(0, 6), st.integers(0, 6)).flatmap(
        lambda shape: st.tuples(
            st.lists(SCORES, min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]),
            st.lists(st.booleans(), min_size=shape[0] * shape[1], max_size=shape[0] * shape[1]),
            st.just(shape),
        )
    )
)
def test_greedy_match_equals_the_definition(case):
    values, flags, shape = case
    score = np.array(values, dtype=np.float64).reshape(shape)
    eligible = np.array(flags, dtype=bool).reshape(shape)
    match = K.greedy_match(score, eligible)
    np.testing.assert_array_equal(match, reference_greedy(score, eligible))
    matched = match[match >= 0]
    assert len(set(matched.tolist())) == len(matched)  # one-to-one
    assert all(eligible[i, j] for i, j in enumerate(match) if j >= 0)


def test_greedy_match_large_is_one_to_one_and_maximal():
    rng = np.random.default_rng(6)
    score = rng.random((300, 250))
    eligible = rng.random((300, 250)) < 0.1
    match = K.greedy_match(score, eligible)
    rows = np.flatnonzero(match >= 0)
    assert len(np.unique(match[rows])) == len(rows) and eligible[rows, match[rows]].all()
    # Maximal: no eligible pair is left with both its row and its column free.
    free_cols = np.setdiff1d(np.arange(250), match[rows])
    assert not eligible[np.ix_(np.flatnonzero(match < 0), free_cols)].any()


@pytest.mark.parametrize("threshold", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_ndg_edges_equal_numpy_reference(threshold):
    rng = np.random.default_rng(int(threshold * 100))
    prev = random_fires(rng, 200, 70, rate=0.4, dead=3)
    layer = random_fires(rng, 200, 45, rate=0.5)
    layer[:, 1] = prev[:, 5]  # exact fraction 1.0 against neuron 5
    cofire = layer.T.astype(np.int64) @ prev.astype(np.int64)
    fire_prev = prev.sum(axis=0).astype(np.int64)
    connected = rng.random((45, 70)) < 0.7
    connected[1, 5] = True
    for threads in (1, 2):
        rows, cols, weights = K.ndg_edges(cofire, fire_prev, 200, threshold, connected, n_threads=threads)
        ref_rows, ref_cols, ref_weights = reference_ndg(cofire, fire_prev, threshold, connected)
        np.testing.assert_array_equal(rows, ref_rows)
        np.testing.assert_array_equal(cols, ref_cols)
        np.testing.assert_array_equal(weights, ref_weights)  # bit-identical, same float64 division
    assert not np.isin(cols, [0, 1, 2]).any()  # predecessors that never fired have no edges
    assert ((rows == 1) & (cols == 5)).any()


def test_ndg_edges_threshold_is_inclusive():
    cofire = np.array([[1, 2], [2, 4]], np.int64)
    rows, cols, weights = K.ndg_edges(cofire, np.array([2, 4], np.int64), 4, 0.5, np.ones((2, 2), np.uint8))
    assert rows.tolist() == [0, 0, 1, 1] and cols.tolist() == [0, 1, 0, 1]
    assert weights.tolist() == [0.5, 0.5, 1.0, 1.0]


def test_non_contiguous_inputs_are_copied_and_give_the_same_results():
    rng = np.random.default_rng(8)
    fires = random_fires(rng, 130, 40)
    strided = fires[::2, ::2]
    assert not strided.flags.c_contiguous
    np.testing.assert_array_equal(K.pack_fires(strided), reference_pack(np.ascontiguousarray(strided)))
    a = K.pack_fires(fires)
    np.testing.assert_array_equal(K.cofire_counts(a[::3], a.T.copy().T), K.cofire_counts(a[::3].copy(), a))
    np.testing.assert_array_equal(K.count_fires(a[:, ::-1]), K.count_fires(a[:, ::-1].copy()))
    score = rng.random((20, 30))
    np.testing.assert_array_equal(
        K.greedy_match(score.T, (score > 0.5).T), K.greedy_match(score.T.copy(), (score > 0.5).T.copy())
    )


def words(rows: int, n_words: int) -> np.ndarray:
    return np.zeros((rows, n_words), np.uint64)


def ndg(cofire=None, fire_prev=None, count=1, threshold=0.5, connected=None):
    """ndg_edges on a valid 2 x 3 problem with one argument replaced."""
    return K.ndg_edges(
        np.zeros((2, 3), np.int64) if cofire is None else cofire,
        np.zeros(3, np.int64) if fire_prev is None else fire_prev,
        count,
        threshold,
        np.ones((2, 3), bool) if connected is None else connected,
    )


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: K.pack_fires(np.zeros((4, 3), np.float32)), "fires must have dtype bool or uint8"),
        (lambda: K.pack_fires(np.zeros(4, bool)), "fires must be 2-D"),
        (lambda: K.pack_fires([[True]]), "fires must be a numpy array"),
        (lambda: K.cofire_counts(np.zeros((2, 3), np.int64), words(2, 3)), "a must have dtype uint64"),
        (lambda: K.cofire_counts(words(2, 3), words(2, 4)), "same number of 64-bit words"),
        (
            lambda: K.cofire_counts(words(2, 3), words(5, 3), out=np.zeros((5, 2), np.int64)),
            r"out must have shape \(2, 5\)",
        ),
        (
            lambda: K.cofire_counts(words(2, 3), words(5, 3), out=np.zeros((2, 5), np.int32)),
            "out must have dtype int64",
        ),
        (
            lambda: K.cofire_counts(words(2, 3), words(5, 3), out=np.zeros((5, 2), np.int64).T),
            "out must be C-contiguous",
        ),
        (
            lambda: K.cofire_counts(words(2, 3), words(2, 3), n_threads=0),
            "n_threads must be a positive integer",
        ),
        (lambda: K.count_fires(np.zeros((2, 3, 1), np.uint64)), "a must be 2-D"),
        (
            lambda: K.greedy_match(np.zeros((2, 2), np.float32), np.ones((2, 2), bool)),
            "score must have dtype float64",
        ),
        (lambda: K.greedy_match(np.zeros((2, 2)), np.ones((2, 3), bool)), "must have the same shape"),
        (lambda: K.greedy_match(np.array([[np.nan]]), np.ones((1, 1), bool)), "NaN"),
        (
            lambda: K.greedy_match(np.zeros((2, 2)), np.ones((2, 2), np.int64)),
            "eligible must have dtype bool or uint8",
        ),
        (lambda: ndg(fire_prev=np.zeros(2, np.int64)), r"fire_prev must have shape \(3,\)"),
        (lambda: ndg(threshold=1.5), r"threshold must be in \[0, 1\]"),
        (lambda: ndg(threshold=float("nan")), r"threshold must be in \[0, 1\]"),
        (lambda: ndg(cofire=np.ones((2, 3), np.int64)), "inconsistent statistics"),
        (lambda: ndg(fire_prev=np.full(3, 5, np.int64), count=4), r"fire_prev must lie in \[0, count=4\]"),
        (lambda: ndg(count=-1), "count must be a non-negative integer"),
        (lambda: ndg(connected=np.ones((3, 2), bool)), "connected must have the shape of cofire"),
        (lambda: ndg(cofire=np.zeros((2, 3), np.int32)), "cofire must have dtype int64"),
        (lambda: K.set_num_threads(0), "n must be a positive integer"),
    ],
)
def test_invalid_inputs_raise_clear_value_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_read_only_out_is_refused():
    out = np.zeros((2, 2), np.int64)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        K.cofire_counts(np.zeros((2, 1), np.uint64), np.zeros((2, 1), np.uint64), out=out)


def test_read_only_inputs_are_accepted():
    fires = random_fires(np.random.default_rng(9), 100, 10)
    fires.flags.writeable = False
    a = K.pack_fires(fires)
    a.flags.writeable = False
    np.testing.assert_array_equal(K.cofire_counts(a, a), fires.T.astype(np.int64) @ fires.astype(np.int64))


def test_thread_controls():
    assert isinstance(K.openmp_enabled(), bool)
    before = K.num_threads()
    assert before >= 1
    try:
        K.set_num_threads(1)
        assert K.num_threads() == 1
        K.set_num_threads(2)
        assert K.num_threads() == (2 if K.openmp_enabled() else 1)
    finally:
        K.set_num_threads(before)
