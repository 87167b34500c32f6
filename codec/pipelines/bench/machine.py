"""Machine probes: GEMM rates, fused-inference throughput, and the facts recorded about the machine."""

from __future__ import annotations

import contextlib
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from codec.pipelines.bench.flops import layer_macs
from codec.version import __version__

# --------------------------------------------------------------------------------------------------------
# Fused inference
# --------------------------------------------------------------------------------------------------------


def _time_call(
    fn: Callable[[], object], min_seconds: float = 0.3, min_reps: int = 5, max_reps: int = 2000
) -> float:
    """Median seconds per call (after one warm-up call), repeating for at least `min_seconds`."""
    fn()
    times = []
    started = time.perf_counter()
    while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - started < min_seconds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def gemm_rates(
    threads: int | None, sizes: Sequence[tuple[int, int, int]] = ((256, 784, 128), (1024, 1024, 1024))
) -> list[dict]:
    """Measured float32 GEMM GFLOP/s of numpy (BLAS) and torch at the given (m, k, n) shapes."""
    import torch

    rng = np.random.default_rng(0)
    out = []
    limit = _blas_threads(threads)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with limit:
            for m, k, n in sizes:
                a = rng.standard_normal((m, k), dtype=np.float32)
                b = rng.standard_normal((k, n), dtype=np.float32)
                ta, tb = torch.from_numpy(a), torch.from_numpy(b)
                flop = 2.0 * m * k * n
                out.append(
                    {
                        "m": m,
                        "k": k,
                        "n": n,
                        "numpy_gflops": flop / _time_call(lambda a=a, b=b: a @ b) / 1e9,
                        "torch_gflops": flop / _time_call(lambda ta=ta, tb=tb: torch.mm(ta, tb)) / 1e9,
                    }
                )
    finally:
        torch.set_num_threads(previous)
    return out


def _blas_threads(threads: int | None):
    if not threads:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads)


def measure_inference(
    ensemble: Path,
    member_files: Sequence[Path],
    x: np.ndarray,
    criterion: str,
    batches: Sequence[int],
    threads: int | None,
) -> dict:
    """Throughput (examples/s) of the fused graph, the members as separate onnxruntime sessions (outputs
    combined with numpy), and a torch loop over the members (same combine), with the FLOP bound."""
    import torch

    from codec.ir import lift
    from codec.ir.ensemble import ensemble_description
    from codec.runtime.evaluation.metrics import combine
    from codec.runtime.execution.session import create_session
    from codec.runtime.training.torch_ir import IRModule

    fused = create_session(ensemble, intra_op_threads=threads)
    sessions = [create_session(f, intra_op_threads=threads) for f in member_files]
    nets = [lift(f, name=f.stem) for f in member_files]
    modules = [IRModule(net, probabilities=True).eval() for net in nets]
    shape = tuple(fused.get_inputs()[0].shape[1:])
    x = np.ascontiguousarray(x.reshape((len(x), *shape)), dtype=np.float32)
    fused_name = fused.get_inputs()[0].name
    names = [s.get_inputs()[0].name for s in sessions]

    # FLOPs per example: the CSN once, each member's own neurons (from the fused graph's sharing).
    import onnx_ir as ir

    description = ensemble_description(ir.load(str(ensemble))) or {}
    csn_neurons = {c["layer"]: c["neurons"] for c in description.get("csn", [])}
    macs = 0
    for net in nets:
        macs += sum(m["own"] for m in layer_macs(net))
    csn_macs = 0
    if csn_neurons:
        main_macs = layer_macs(nets[0])
        csn_macs = sum(m["frozen"] for m in main_macs)
    flops = 2.0 * (macs + csn_macs)
    separate_flops = 2.0 * sum(sum(m["own"] + m["frozen"] for m in layer_macs(net)) for net in nets)

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    results = []
    try:
        with _blas_threads(threads):
            for batch in batches:
                xb = x[:batch] if batch <= len(x) else np.resize(x, (batch, *shape)).astype(np.float32)
                tb = torch.from_numpy(xb)

                def run_fused(xb=xb):
                    return fused.run(None, {fused_name: xb})[0]

                def run_separate(xb=xb):
                    return combine(
                        np.stack([s.run(None, {n: xb})[0] for s, n in zip(sessions, names)]), criterion
                    )

                def run_torch(tb=tb):
                    with torch.no_grad():
                        return combine(np.stack([m(tb).numpy() for m in modules]), criterion)

                agreement = float(np.max(np.abs(run_fused() - run_separate())))
                row = {"batch": batch, "max_abs_diff_fused_vs_separate": agreement}
                for label, fn in (
                    ("fused_onnx", run_fused),
                    ("separate_onnx", run_separate),
                    ("torch_loop", run_torch),
                ):
                    seconds = _time_call(fn)
                    row[label] = {"seconds_per_batch": seconds, "examples_per_second": batch / seconds}
                results.append(row)
    finally:
        torch.set_num_threads(previous)
    gemm = gemm_rates(threads)
    best = max(max(g["numpy_gflops"], g["torch_gflops"]) for g in gemm)
    for row in results:
        row["bound_examples_per_second"] = best * 1e9 / flops
        row["fused_fraction_of_bound"] = (
            row["fused_onnx"]["examples_per_second"] / row["bound_examples_per_second"]
        )
    return {
        "members": len(member_files),
        "criterion": criterion,
        "flops_per_example_fused": flops,
        "flops_per_example_separate": separate_flops,
        "gemm": gemm,
        "gemm_best_gflops": best,
        "threads": threads,
        "batches": results,
    }


# --------------------------------------------------------------------------------------------------------
# Machine facts
# --------------------------------------------------------------------------------------------------------


def machine_facts(threads: int | None) -> dict:
    """What the numbers were measured on: CPU, cores, memory, load, library versions, codec's git commit."""
    import importlib.metadata as md
    import subprocess

    facts = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
    }
    with contextlib.suppress(AttributeError):
        facts["cpus_available"] = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                facts["cpu"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                facts["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    with contextlib.suppress(OSError, AttributeError):
        facts["load_average"] = [round(v, 2) for v in os.getloadavg()]
    versions = {"codec": __version__}
    for name in ("torch", "onnxruntime", "onnx", "onnx-ir", "numpy", "torchensemble"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[name] = md.version(name)
    facts["versions"] = versions
    repo = Path(__file__).resolve().parents[1]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
        if commit.returncode == 0:
            facts["git_commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
            facts["git_dirty"] = bool(dirty.stdout.strip())
    return facts


def command_line(argv: Sequence[str] | None = None) -> str:
    """The command as typed: `codec ...` for the console script and `python -m codec`."""
    argv = list(sys.argv if argv is None else argv)
    if argv and Path(argv[0]).name in ("codec", "__main__.py"):
        return shlex.join(["codec", *argv[1:]])
    return shlex.join(argv)
