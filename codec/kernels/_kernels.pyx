# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""nogil OpenMP kernels for the neuron passes (bit-packed firing, co-firing counts, matching, NDG edges).

These functions trust their arguments: shapes, dtypes and contiguity are checked by the Python wrappers in
`codec.passes.kernels`, which is the module the passes import. Every kernel is exact (integer arithmetic,
or the same float64 division numpy performs), so results do not depend on the number of threads.
"""

from cython.parallel cimport prange
from libc.stdint cimport int64_t, uint8_t, uint64_t
from libc.stdlib cimport calloc, free

# Following scikit-learn's sklearn/utils/_openmp_helpers.pxd, the OpenMP calls go through an indirection so
# the extension still builds (and runs serially) with a compiler that has no OpenMP: Cython already turns
# `prange` into a plain loop when _OPENMP is undefined, and the stubs below stand in for omp.h. They live
# here, not in a .pxd: under the package-dir mapping cythonize would look for codec/passes/_kernels.pxd.

cdef extern from *:
    """
    #ifdef _OPENMP
        #include <omp.h>
        #define CODEC_OPENMP 1
    #else
        #define CODEC_OPENMP 0
        static inline int omp_get_max_threads(void) { return 1; }
        static inline void omp_set_num_threads(int n) { (void)n; }
    #endif

    /* One hardware POPCNT per word when built with -mpopcnt (setup.py adds it on x86_64);
       otherwise the compiler's software fallback, which is exact but about 10x slower. */
    #if defined(_MSC_VER)
        #include <intrin.h>
        #define codec_popcount64(x) ((long long)__popcnt64(x))
    #else
        #define codec_popcount64(x) ((long long)__builtin_popcountll(x))
    #endif
    """
    bint CODEC_OPENMP
    int omp_get_max_threads() noexcept nogil
    void omp_set_num_threads(int n) noexcept nogil
    long long codec_popcount64(unsigned long long x) noexcept nogil

# Packing reads a 64-input x 64-neuron block of byte flags, turns each input row into one 64-bit mask over
# the neurons (eight bytes at a time), and transposes the 64 x 64 bit matrix so each word holds one
# neuron's 64 inputs: about 3x faster than testing flags one by one down a column.
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>

    /* Bit k of the result is whether byte k of x is nonzero (byte 0 = lowest address on little endian). */
    static inline uint64_t codec_nonzero_bytes_to_bits(uint64_t x) {
        x |= x >> 4;  /* fold every byte onto its own lowest bit; bits never cross into bit 0 of */
        x |= x >> 2;  /* the byte below, because each step only ORs bits 1..7 of the same byte */
        x |= x >> 1;
        x &= 0x0101010101010101ULL;
        return (x * 0x0102040810204080ULL) >> 56;  /* gathers the eight low bits into the top byte */
    }

    /* In-place transpose of a 64 x 64 bit matrix (row r = a[r], column c = bit c): Hacker's Delight 7-3,
       swapping ever smaller off-diagonal blocks, six rounds of 32 word pairs. */
    static inline void codec_transpose64(uint64_t* a) {
        uint64_t m = 0x00000000FFFFFFFFULL, t;
        int j, k;
        for (j = 32; j != 0; j >>= 1, m ^= m << j) {
            for (k = 0; k < 64; k = ((k | j) + 1) & ~j) {
                t = ((a[k] >> j) ^ a[k | j]) & m;
                a[k] ^= t << j;
                a[k | j] ^= t;
            }
        }
    }

    /* out[i, w] for neurons i0 <= i < i1 (at most 64) and every word w; fires is (n_inputs, n) bytes. */
    static void codec_pack_block(const uint8_t* fires, Py_ssize_t n_inputs, Py_ssize_t n,
                                 uint64_t* out, Py_ssize_t n_words, Py_ssize_t i0, Py_ssize_t i1) {
        uint64_t rows[64];
        Py_ssize_t width = i1 - i0, w, b, k, rows_here;
        for (w = 0; w < n_words; w++) {
            rows_here = n_inputs - w * 64 < 64 ? n_inputs - w * 64 : 64;
            for (b = 0; b < 64; b++) {
                uint64_t mask = 0, chunk;
                const uint8_t* row = fires + (w * 64 + b) * n + i0;
                if (b < rows_here && width == 64) {
                    int q;  /* a constant trip count, so the compiler unrolls it (3x faster) */
                    for (q = 0; q < 8; q++) {
                        memcpy(&chunk, row + 8 * q, 8);  /* unaligned load */
                        mask |= codec_nonzero_bytes_to_bits(chunk) << (8 * q);
                    }
                } else if (b < rows_here) {
                    for (k = 0; k < width; k++) {
                        mask |= (uint64_t)(row[k] != 0) << k;
                    }
                }
                rows[b] = mask;  /* rows past the last input stay zero: the padding bits */
            }
            codec_transpose64(rows);
            for (k = 0; k < width; k++) {
                out[(i0 + k) * n_words + w] = rows[k];
            }
        }
    }
    """
    void codec_pack_block(const uint8_t* fires, Py_ssize_t n_inputs, Py_ssize_t n, uint64_t* out,
                          Py_ssize_t n_words, Py_ssize_t i0, Py_ssize_t i1) noexcept nogil

# AVX-512 VPOPCNTDQ (Ice Lake and later, Zen 4 and later) counts eight words per instruction, about 3x
# faster than one POPCNT per word. The build must run on any x86_64, so the code is compiled for that
# instruction set through a function attribute and chosen at run time from CPUID (via the compiler's
# __builtin_cpu_supports, which also checks that the OS saves the AVX-512 registers).
cdef extern from *:
    """
    #include <stdint.h>
    #if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(CODEC_NO_AVX512)
        #define CODEC_HAVE_AVX512_POPCOUNT 1
        #include <immintrin.h>
        #define CODEC_AVX512 __attribute__((target("avx512f,avx512vpopcntdq")))
        #define CODEC_ACC(s, x, y) s = _mm512_add_epi64(s, _mm512_popcnt_epi64(_mm512_and_si512(x, y)))

        static int codec_cpu_has_avx512_popcount(void) {
            __builtin_cpu_init();
            return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vpopcntdq");
        }

        /* sum over w in [w0, w1) of popcount(x[w] & y[w]); the last partial vector is a masked load. */
        CODEC_AVX512 static inline int64_t codec_dot_avx512(const uint64_t* x, const uint64_t* y,
                                                             Py_ssize_t w0, Py_ssize_t w1) {
            __m512i s = _mm512_setzero_si512();
            Py_ssize_t w = w0;
            for (; w + 8 <= w1; w += 8) {
                CODEC_ACC(s, _mm512_loadu_si512(x + w), _mm512_loadu_si512(y + w));
            }
            if (w < w1) {
                __mmask8 k = (__mmask8)((1u << (w1 - w)) - 1u);
                CODEC_ACC(s, _mm512_maskz_loadu_epi64(k, x + w), _mm512_maskz_loadu_epi64(k, y + w));
            }
            return _mm512_reduce_add_epi64(s);
        }

        /* Same contract as _cofire_tile in the .pyx: a 2 x 2 register block (four vector loads feed four
           vector popcounts), single rows / columns at the edges. */
        CODEC_AVX512 static void codec_cofire_tile_avx512(
                const uint64_t* a, const uint64_t* b, int64_t* out, Py_ssize_t m, Py_ssize_t n_words,
                Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t j0, Py_ssize_t j1, Py_ssize_t w0, Py_ssize_t w1) {
            Py_ssize_t i = i0, j, w;
            for (; i + 1 < i1; i += 2) {
                const uint64_t* a0 = a + i * n_words;
                const uint64_t* a1 = a0 + n_words;
                for (j = j0; j + 1 < j1; j += 2) {
                    const uint64_t* b0 = b + j * n_words;
                    const uint64_t* b1 = b0 + n_words;
                    __m512i s00 = _mm512_setzero_si512(), s01 = s00, s10 = s00, s11 = s00;
                    __m512i x0, x1, y0, y1;
                    for (w = w0; w + 8 <= w1; w += 8) {
                        x0 = _mm512_loadu_si512(a0 + w);
                        x1 = _mm512_loadu_si512(a1 + w);
                        y0 = _mm512_loadu_si512(b0 + w);
                        y1 = _mm512_loadu_si512(b1 + w);
                        CODEC_ACC(s00, x0, y0); CODEC_ACC(s01, x0, y1);
                        CODEC_ACC(s10, x1, y0); CODEC_ACC(s11, x1, y1);
                    }
                    if (w < w1) {
                        __mmask8 k = (__mmask8)((1u << (w1 - w)) - 1u);
                        x0 = _mm512_maskz_loadu_epi64(k, a0 + w);
                        x1 = _mm512_maskz_loadu_epi64(k, a1 + w);
                        y0 = _mm512_maskz_loadu_epi64(k, b0 + w);
                        y1 = _mm512_maskz_loadu_epi64(k, b1 + w);
                        CODEC_ACC(s00, x0, y0); CODEC_ACC(s01, x0, y1);
                        CODEC_ACC(s10, x1, y0); CODEC_ACC(s11, x1, y1);
                    }
                    out[i * m + j] += _mm512_reduce_add_epi64(s00);
                    out[i * m + j + 1] += _mm512_reduce_add_epi64(s01);
                    out[(i + 1) * m + j] += _mm512_reduce_add_epi64(s10);
                    out[(i + 1) * m + j + 1] += _mm512_reduce_add_epi64(s11);
                }
                if (j < j1) {
                    out[i * m + j] += codec_dot_avx512(a0, b + j * n_words, w0, w1);
                    out[(i + 1) * m + j] += codec_dot_avx512(a1, b + j * n_words, w0, w1);
                }
            }
            if (i < i1) {
                for (j = j0; j < j1; j++) {
                    out[i * m + j] += codec_dot_avx512(a + i * n_words, b + j * n_words, w0, w1);
                }
            }
        }
    #else
        #define CODEC_HAVE_AVX512_POPCOUNT 0
        static int codec_cpu_has_avx512_popcount(void) { return 0; }
        /* Never called: the wrapper only selects it when codec_cpu_has_avx512_popcount() is true. */
        static void codec_cofire_tile_avx512(
                const uint64_t* a, const uint64_t* b, int64_t* out, Py_ssize_t m, Py_ssize_t n_words,
                Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t j0, Py_ssize_t j1, Py_ssize_t w0, Py_ssize_t w1) {
            (void)a; (void)b; (void)out; (void)m; (void)n_words;
            (void)i0; (void)i1; (void)j0; (void)j1; (void)w0; (void)w1;
        }
    #endif
    """
    bint CODEC_HAVE_AVX512_POPCOUNT
    int codec_cpu_has_avx512_popcount() noexcept nogil
    void codec_cofire_tile_avx512(const uint64_t* a, const uint64_t* b, int64_t* out, Py_ssize_t m,
                                  Py_ssize_t n_words, Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t j0,
                                  Py_ssize_t j1, Py_ssize_t w0, Py_ssize_t w1) noexcept nogil


cdef enum:
    # Neurons per task in pack_fires: one 64 x 64 bit block wide (codec_pack_block handles at most 64).
    PACK_BLOCK = 64
    # Tile of cofire_counts: I_BLOCK rows of `a` against J_BLOCK rows of `b` over W_BLOCK words, so the
    # `a` tile (16 x 2 KiB) stays in L1 and the `b` tile (64 x 2 KiB) in L2 while it is reused I_BLOCK times.
    I_BLOCK = 16
    J_BLOCK = 64
    W_BLOCK = 256


def openmp_enabled():
    """Whether this extension was compiled with OpenMP."""
    return bool(CODEC_OPENMP)


def avx512_popcount_available():
    """Whether this CPU (and build) can run the AVX-512 VPOPCNTDQ path of cofire_counts_into."""
    return bool(CODEC_HAVE_AVX512_POPCOUNT and codec_cpu_has_avx512_popcount())


def max_threads():
    """OpenMP's current maximum team size for the calling thread (1 without OpenMP)."""
    return omp_get_max_threads()


def set_max_threads(int n):
    """Set OpenMP's default team size for later parallel regions started by the calling thread."""
    omp_set_num_threads(n)


def pack_fires_into(const uint8_t[:, ::1] fires, uint64_t[:, ::1] out, int n_threads):
    """out[i, w] bit b = fires[w * 64 + b, i] != 0; `out` is (n, ceil(B / 64)) and fully overwritten."""
    cdef Py_ssize_t n_inputs = fires.shape[0]
    cdef Py_ssize_t n = fires.shape[1]
    cdef Py_ssize_t n_words = out.shape[1]
    cdef Py_ssize_t n_blocks = (n + PACK_BLOCK - 1) // PACK_BLOCK
    cdef Py_ssize_t block
    if n == 0 or n_words == 0:
        return
    cdef const uint8_t* pf = &fires[0, 0]
    cdef uint64_t* po = &out[0, 0]
    for block in prange(n_blocks, nogil=True, schedule="static", num_threads=n_threads):
        codec_pack_block(pf, n_inputs, n, po, n_words, block * PACK_BLOCK, min((block + 1) * PACK_BLOCK, n))


cdef inline void _cofire_tile(const uint64_t* a, const uint64_t* b, int64_t* out,
                              Py_ssize_t m, Py_ssize_t n_words,
                              Py_ssize_t i0, Py_ssize_t i1, Py_ssize_t j0, Py_ssize_t j1,
                              Py_ssize_t w0, Py_ssize_t w1) noexcept nogil:
    """out[i, j] += sum over w in [w0, w1) of popcount(a[i, w] & b[j, w]) for the tile i0:i1 x j0:j1."""
    cdef Py_ssize_t i = i0, j, w
    cdef const uint64_t* a0
    cdef const uint64_t* a1
    cdef const uint64_t* b0
    cdef const uint64_t* b1
    cdef uint64_t x0, x1, y0, y1
    cdef long long s00, s01, s10, s11
    # 2 x 2 register block: four loads feed four popcounts, instead of two loads per popcount.
    while i + 1 < i1:
        a0 = a + i * n_words
        a1 = a0 + n_words
        j = j0
        while j + 1 < j1:
            b0 = b + j * n_words
            b1 = b0 + n_words
            s00 = 0
            s01 = 0
            s10 = 0
            s11 = 0
            for w in range(w0, w1):
                x0 = a0[w]
                x1 = a1[w]
                y0 = b0[w]
                y1 = b1[w]
                s00 = s00 + codec_popcount64(x0 & y0)
                s01 = s01 + codec_popcount64(x0 & y1)
                s10 = s10 + codec_popcount64(x1 & y0)
                s11 = s11 + codec_popcount64(x1 & y1)
            out[i * m + j] += s00
            out[i * m + j + 1] += s01
            out[(i + 1) * m + j] += s10
            out[(i + 1) * m + j + 1] += s11
            j = j + 2
        if j < j1:
            b0 = b + j * n_words
            s00 = 0
            s10 = 0
            for w in range(w0, w1):
                y0 = b0[w]
                s00 = s00 + codec_popcount64(a0[w] & y0)
                s10 = s10 + codec_popcount64(a1[w] & y0)
            out[i * m + j] += s00
            out[(i + 1) * m + j] += s10
        i = i + 2
    if i < i1:
        a0 = a + i * n_words
        for j in range(j0, j1):
            b0 = b + j * n_words
            s00 = 0
            for w in range(w0, w1):
                s00 = s00 + codec_popcount64(a0[w] & b0[w])
            out[i * m + j] += s00


def cofire_counts_into(const uint64_t[:, ::1] a, const uint64_t[:, ::1] b, int64_t[:, ::1] out,
                       int n_threads, bint avx512):
    """out[i, j] += popcount(a[i] & b[j]) summed over words; each thread owns whole rows of `out`.

    `avx512` selects the AVX-512 VPOPCNTDQ tile; the caller must have checked avx512_popcount_available().
    """
    cdef Py_ssize_t n = a.shape[0]
    cdef Py_ssize_t m = b.shape[0]
    cdef Py_ssize_t n_words = a.shape[1]
    cdef Py_ssize_t n_blocks = (n + I_BLOCK - 1) // I_BLOCK
    cdef Py_ssize_t j_blocks = (m + J_BLOCK - 1) // J_BLOCK
    cdef Py_ssize_t w_blocks = (n_words + W_BLOCK - 1) // W_BLOCK
    cdef Py_ssize_t block, i0, i1, jb, wb
    if n == 0 or m == 0 or n_words == 0:
        return
    cdef const uint64_t* pa = &a[0, 0]
    cdef const uint64_t* pb = &b[0, 0]
    cdef int64_t* po = &out[0, 0]
    # Dynamic schedule: the last row block may be short, and the machine's cores are shared.
    for block in prange(n_blocks, nogil=True, schedule="dynamic", num_threads=n_threads):
        i0 = block * I_BLOCK
        i1 = min(i0 + I_BLOCK, n)
        for wb in range(w_blocks):
            for jb in range(j_blocks):
                if avx512:
                    codec_cofire_tile_avx512(pa, pb, po, m, n_words, i0, i1, jb * J_BLOCK,
                                             min((jb + 1) * J_BLOCK, m), wb * W_BLOCK,
                                             min((wb + 1) * W_BLOCK, n_words))
                else:
                    _cofire_tile(pa, pb, po, m, n_words, i0, i1, jb * J_BLOCK, min((jb + 1) * J_BLOCK, m),
                                 wb * W_BLOCK, min((wb + 1) * W_BLOCK, n_words))


def count_fires_into(const uint64_t[:, ::1] a, int64_t[::1] out, int n_threads):
    """out[i] = popcount of row i of `a` (overwritten)."""
    cdef Py_ssize_t n = a.shape[0]
    cdef Py_ssize_t n_words = a.shape[1]
    cdef Py_ssize_t i, w
    cdef long long total
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads):
        total = 0
        for w in range(n_words):
            total = total + codec_popcount64(a[i, w])
        out[i] = total


def greedy_sweep(const int64_t[::1] rows, const int64_t[::1] cols, int64_t[::1] match, Py_ssize_t m):
    """Walk pairs in the given (best-first) order, keeping each whose row and column are both still free.

    `match` must be filled with -1 on entry; on return match[i] is the column given to row i, or -1.
    Returns the number of matched rows.
    """
    cdef Py_ssize_t n = match.shape[0]
    cdef Py_ssize_t n_pairs = rows.shape[0]
    cdef Py_ssize_t p, limit = min(n, m), matched = 0
    cdef int64_t i, j
    if limit == 0 or n_pairs == 0:
        return 0
    cdef uint8_t* column_taken = <uint8_t*> calloc(m, sizeof(uint8_t))
    if column_taken == NULL:
        raise MemoryError()
    with nogil:
        for p in range(n_pairs):
            i = rows[p]
            j = cols[p]
            if match[i] < 0 and not column_taken[j]:
                match[i] = j
                column_taken[j] = 1
                matched = matched + 1
                # Once every row or every column is used, no later pair can be kept.
                if matched == limit:
                    break
    free(column_taken)
    return matched


cdef inline bint _is_edge(int64_t cofire, int64_t fired, uint8_t connected, double threshold) noexcept nogil:
    # Same float64 division as numpy's `cofire / fire_prev`, so the comparison agrees bit for bit.
    return connected != 0 and fired > 0 and (<double>cofire) / (<double>fired) >= threshold


def ndg_edge_counts(const int64_t[:, ::1] cofire, const int64_t[::1] fire_prev,
                    const uint8_t[:, ::1] connected, double threshold, int64_t[::1] per_row, int n_threads):
    """First pass of ndg_edges: per_row[i] = number of edges leaving row i."""
    cdef Py_ssize_t n = cofire.shape[0]
    cdef Py_ssize_t m = cofire.shape[1]
    cdef Py_ssize_t i, j
    cdef int64_t found
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads):
        found = 0
        for j in range(m):
            if _is_edge(cofire[i, j], fire_prev[j], connected[i, j], threshold):
                found = found + 1
        per_row[i] = found


def ndg_edge_fill(const int64_t[:, ::1] cofire, const int64_t[::1] fire_prev,
                  const uint8_t[:, ::1] connected, double threshold, const int64_t[::1] row_start,
                  int64_t[::1] rows, int64_t[::1] cols, double[::1] weights, int n_threads):
    """Second pass of ndg_edges: write row i's edges, in column order, from offset row_start[i]."""
    cdef Py_ssize_t n = cofire.shape[0]
    cdef Py_ssize_t m = cofire.shape[1]
    cdef Py_ssize_t i, j, k
    for i in prange(n, nogil=True, schedule="static", num_threads=n_threads):
        k = row_start[i]
        for j in range(m):
            if _is_edge(cofire[i, j], fire_prev[j], connected[i, j], threshold):
                rows[k] = i
                cols[k] = j
                weights[k] = (<double>cofire[i, j]) / (<double>fire_prev[j])
                k = k + 1
