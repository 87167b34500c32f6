"""Micro-benchmark of codec's Cython kernels against the numpy ways of counting co-firing.

Co-firing counts for n = m neurons over B inputs, three ways, each giving the same int64 (n, m) matrix:
  * codec: pack_fires (bit rows) + cofire_counts (popcount of ANDed words), OpenMP;
  * numpy float32 GEMM, the expression runtime/profile.py used: rint(f.T.astype(f32) @ f.astype(f32));
  * numpy int64 matmul f.T.astype(i64) @ f.astype(i64) (numpy has no BLAS for integers: one thread).
Each runs with 1 and 2 threads (OpenMP threads for codec, OpenBLAS threads for the GEMM). All variants
run in the same process, interleaved repeat by repeat so that load from other processes spreads over all
of them; the script reports the median and the minimum. Also greedy_match on an n x n score matrix with
10 % eligible pairs (against the same sort followed by a Python loop) and ndg_edges.

    python bench/kernels.py -o bench/kernels.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from codec import kernels as K


class BlasThreads:
    """Set OpenBLAS's thread count through the library numpy loaded (what threadpoolctl does)."""

    _SYMBOLS = (
        "openblas_set_num_threads",
        "scipy_openblas_set_num_threads64_",
        "scipy_openblas_set_num_threads_64_",
        "openblas_set_num_threads64_",
    )

    def __init__(self) -> None:
        np.ones((2, 2), np.float32) @ np.ones((2, 2), np.float32)  # make sure BLAS is loaded
        self.library, self._set = None, None
        with open("/proc/self/maps") as maps:
            paths = {line.split()[-1] for line in maps if "openblas" in line.lower() and ".so" in line}
        for path in sorted(paths):
            lib = ctypes.CDLL(path)
            for symbol in self._SYMBOLS:
                if hasattr(lib, symbol):
                    self.library, self._set = os.path.basename(path), getattr(lib, symbol)
                    return

    @property
    def controllable(self) -> bool:
        return self._set is not None

    def set(self, n: int) -> None:
        if self._set is not None:
            self._set(ctypes.c_int(n))


def cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def cpu_flags() -> list[str]:
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("flags"):
                wanted = {"popcnt", "avx2", "avx512f", "avx512_vpopcntdq"}
                return sorted(wanted & set(line.split(":", 1)[1].split()))
    return []


def summary(seconds: list[float]) -> dict:
    return {
        "median_s": statistics.median(seconds),
        "min_s": min(seconds),
        "repeats": len(seconds),
        "all_s": [round(s, 6) for s in seconds],
    }


def greedy_python(score: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """The same algorithm as greedy_match with the sweep in Python: the baseline the kernel replaces."""
    n, m = score.shape
    flat = np.flatnonzero(eligible)
    flat = flat[np.argsort(-score.ravel()[flat], kind="stable")]
    match = np.full(n, -1, np.int64)
    taken = np.zeros(m, bool)
    for i, j in zip((flat // m).tolist(), (flat % m).tolist()):
        if match[i] < 0 and not taken[j]:
            match[i] = j
            taken[j] = True
    return match


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--neurons", type=int, default=1024, help="n = m (default 1024)")
    parser.add_argument("--inputs", type=int, default=10_000, help="B (default 10000)")
    parser.add_argument("--rate", type=float, default=0.4, help="firing rate of the random flags")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--int64-repeats",
        type=int,
        default=3,
        help="runs of the int64 matmul, ~90 s each at the default size (0 skips it)",
    )
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    n, n_inputs = args.neurons, args.inputs
    fires = rng.random((n_inputs, n)) < args.rate
    blas = BlasThreads()
    load_before = os.getloadavg()

    def codec_counts(threads: int, simd: bool | None) -> tuple[np.ndarray, float, float]:
        t0 = time.perf_counter()
        packed = K.pack_fires(fires, n_threads=threads)
        t1 = time.perf_counter()
        counts = K.cofire_counts(packed, packed, n_threads=threads, simd=simd)
        return counts, t1 - t0, time.perf_counter() - t1

    def gemm_counts() -> np.ndarray:
        return np.rint(fires.T.astype(np.float32) @ fires.astype(np.float32)).astype(np.int64)

    isa = K.popcount_isa()
    variants = [("codec", isa), ("codec", "scalar"), ("numpy_float32_gemm", "openblas")]
    if isa == "scalar":
        variants = variants[1:]
    times: dict[str, dict[str, list[float]]] = {}
    reference = None
    codec_counts(1, None)  # warm up: OpenMP thread pool, page faults
    gemm_counts()
    for _ in range(args.repeats):
        for method, flavour in variants:
            for threads in args.threads:
                key = f"{method}[{flavour}] threads={threads}"
                slot = times.setdefault(key, {"total": [], "pack": [], "cofire": []})
                if method == "codec":
                    counts, pack_s, cofire_s = codec_counts(threads, None if flavour != "scalar" else False)
                    slot["pack"].append(pack_s)
                    slot["cofire"].append(cofire_s)
                    slot["total"].append(pack_s + cofire_s)
                else:
                    blas.set(threads)
                    t0 = time.perf_counter()
                    counts = gemm_counts()
                    slot["total"].append(time.perf_counter() - t0)
                if reference is None:
                    reference = counts
                assert np.array_equal(counts, reference), f"{key} disagrees"
    int64_times = []
    for _ in range(args.int64_repeats):
        t0 = time.perf_counter()
        counts = fires.T.astype(np.int64) @ fires.astype(np.int64)
        int64_times.append(time.perf_counter() - t0)
        assert np.array_equal(counts, reference), "int64 matmul disagrees"
        print(f"int64 matmul: {int64_times[-1]:.2f} s", file=sys.stderr)

    cofire = {
        key: {part: summary(values) for part, values in slot.items() if values} for key, slot in times.items()
    }
    if int64_times:
        # numpy's integer matmul does not use BLAS and runs on one thread whatever the settings.
        cofire["numpy_int64_matmul threads=1"] = {"total": summary(int64_times)}

    # greedy_match on an n x n score matrix, 10 % of pairs eligible.
    score = rng.random((n, n))
    eligible = rng.random((n, n)) < 0.1
    match = K.greedy_match(score, eligible)
    assert np.array_equal(match, greedy_python(score, eligible))
    greedy = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        K.greedy_match(score, eligible)
        greedy.append(time.perf_counter() - t0)
    greedy_py = []
    for _ in range(3):
        t0 = time.perf_counter()
        greedy_python(score, eligible)
        greedy_py.append(time.perf_counter() - t0)

    # ndg_edges on the co-firing matrix just computed (layer against itself, fully connected); with
    # independent flags at rate 0.4 the fractions straddle 0.4, so about half the pairs become edges.
    fire_counts = fires.sum(axis=0).astype(np.int64)
    connected = np.ones((n, n), np.uint8)
    ndg = {}
    for threads in args.threads:
        seconds = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            rows, _, _ = K.ndg_edges(reference, fire_counts, n_inputs, 0.4, connected, n_threads=threads)
            seconds.append(time.perf_counter() - t0)
        ndg[f"threads={threads}"] = summary(seconds) | {"edges": len(rows)}

    gemm1 = cofire[f"numpy_float32_gemm[openblas] threads={args.threads[0]}"]["total"]["median_s"]
    codec1 = cofire[f"codec[{isa}] threads={args.threads[0]}"]["total"]["median_s"]
    result = {
        "command": " ".join(["python", "bench/kernels.py", *sys.argv[1:]]),
        "machine": {
            "nproc": os.cpu_count(),
            "cpu_model": cpu_model(),
            "cpu_flags": cpu_flags(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "load_average_before": load_before,
            "load_average_after": os.getloadavg(),
            "note": "cores shared with other processes; load averages show how busy the machine was",
        },
        "kernels": {
            "openmp_enabled": K.openmp_enabled(),
            "omp_max_threads": K.num_threads(),
            "popcount_isa": isa,
            "blas_library": blas.library,
            "blas_threads_controlled": blas.controllable,
        },
        "problem": {
            "neurons": n,
            "inputs": n_inputs,
            "firing_rate": args.rate,
            "words_per_row": K.packed_words(n_inputs),
        },
        "cofire_counts": cofire,
        "speedup_codec_vs_float32_gemm_1_thread_median": gemm1 / codec1,
        "speedup_codec_vs_int64_matmul_median": statistics.median(int64_times) / codec1
        if int64_times
        else None,
        "greedy_match": {
            "shape": [n, n],
            "eligible_pairs": int(eligible.sum()),
            "codec": summary(greedy),
            "numpy_sort_python_sweep": summary(greedy_py),
        },
        "ndg_edges": {"shape": [n, n], "threshold": 0.4, **ndg},
    }
    if args.output:
        from codec.io import write_json_atomic

        write_json_atomic(args.output, result)
    for key, parts in cofire.items():
        figures = (
            f"{part} median {v['median_s'] * 1e3:9.2f} ms min {v['min_s'] * 1e3:9.2f} ms"
            for part, v in parts.items()
        )
        print(f"{key:40s} " + "  ".join(figures))
    shown = (
        "speedup_codec_vs_float32_gemm_1_thread_median",
        "speedup_codec_vs_int64_matmul_median",
        "greedy_match",
        "ndg_edges",
    )
    print(json.dumps({key: result[key] for key in shown}))


if __name__ == "__main__":
    main()
