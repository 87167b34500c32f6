"""Inference throughput of the fused ensemble: packed graph vs per-member graph vs N separate sessions.

N = 10 members of one MLP architecture (by default, one after the other, `classifier_m`'s
784-512-256-128-64-10 and `classifier_s`'s 784-128-96-64-32-10 on a (1, 28, 28) input; random weights:
inference cost does not depend on training), three arms and a bound, each arm onnxruntime with the same
intra-op threads (the providers `codec.runtime.execution.session` picks, recorded):
  * ``fused_packed``: `emit_ensemble(..., packed=True)`: the first layer of all members one Gemm over
    concatenated rows, deeper layers one grouped 1x1 Conv each (see ir/ensemble.py);
  * ``fused_unpacked``: `emit_ensemble(..., packed=False)`: each member's own nodes in one graph;
  * ``separate``: N sessions of the members lowered alone, their outputs combined with
    `codec.runtime.evaluation.metrics.combine` (what a user without codec would run);
  * the FLOP bound: per layer, the ensemble's FLOPs (2 x `codec.pipelines.bench.layer_macs`) at the best GEMM
    rate this machine sustains for that layer's shapes: numpy's BLAS and torch on one member's GEMM
    (`codec.pipelines.bench.gemm_rates`) and onnxruntime alone on one GEMM of the same size (the first layer
    as one Gemm [batch, in] x [in, N*out], a deeper one as one batched MatMul [N, batch, in] x [N, in, out]).
Also recorded: the weights' bytes (every weight is read once per batch: at batch 1 that, not the FLOPs,
bounds the time once the weights outgrow the caches) and numpy's streaming read rate.

Arms are interleaved: each repeat times every arm once (a block of calls lasting at least `--block-seconds`,
per-call time = block time / calls) in an order rotated per repeat, so load from other processes spreads over
all arms; the result is the median over `--repeats` (>= 5), in wall time and in the process's CPU time (which
moves less with other processes' load). The load average is recorded before and after.
Targets (issue 14): packed >= 2x the throughput of the separate sessions at batch 1, and within 1.5x of the
FLOP bound at batch 256. `--profile` adds onnxruntime's per-node profile of both fused graphs at batch 1
(kernel time vs the run's wall time: what is per-node overhead).

    python bench/inference.py --profile -o bench/inference.json           # the full config
    python bench/inference.py --smoke --profile -o bench/inference.json   # small config, labelled smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# the recipes' MLP widths (models/recipes.py): classifier_m's weights (23 MB for 10 members) outgrow the
# caches, classifier_s's (4.8 MB) do not, so batch 1 is bound by memory for one and by overheads for the other
ARCHS = {"classifier_m": [512, 256, 128, 64], "classifier_s": [128, 96, 64, 32]}
FULL = {
    "members": 10,
    "archs": ["classifier_m", "classifier_s"],
    "input_shape": [1, 28, 28],
    "classes": 10,
    "batches": [1, 256],
    "repeats": 7,
    "block_seconds": 0.5,
}
SMOKE = {
    "members": 4,
    "archs": ["classifier_s"],
    "input_shape": [1, 28, 28],
    "classes": 10,
    "batches": [1, 64],
    "repeats": 5,
    "block_seconds": 0.1,
}


def make_members(count: int, input_shape, hidden, classes: int, seed: int):
    """`count` MLP members (Flatten, ReLU hidden layers, softmax output) with He-scaled random weights."""
    from codec.ir import Activation, Dense, Flatten, NetworkIR

    rng = np.random.default_rng(seed)
    widths = [int(np.prod(input_shape)), *hidden, classes]
    members = []
    for m in range(count):
        layers = [Flatten("flatten")]
        for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
            last = i == len(widths) - 2
            weight = (rng.standard_normal((n_out, n_in)) * np.sqrt(2.0 / n_in)).astype(np.float32)
            bias = (rng.standard_normal(n_out) * 0.01).astype(np.float32)
            layers.append(
                Dense(
                    "out" if last else f"fc{i + 1}", weight, bias, Activation("softmax" if last else "relu")
                )
            )
        members.append(NetworkIR(f"member{m}", "input", "output", tuple(input_shape), layers))
    return members


def _ort_gemm_seconds(
    batch: int, n_in: int, n_out: int, stack: int, threads: int, min_seconds: float
) -> float:
    """Seconds of onnxruntime's own GEMM for one packed layer: a Gemm [batch, in] x [in, out] (stack 1) or a
    batched MatMul [stack, batch, in] x [stack, in, out], alone in a graph, median of 5 blocks."""
    from onnx import TensorProto, helper, numpy_helper

    from codec.runtime.execution.session import create_session

    rng = np.random.default_rng(0)
    if stack == 1:
        x = rng.standard_normal((batch, n_in), dtype=np.float32)
        w = numpy_helper.from_array(rng.standard_normal((n_out, n_in), dtype=np.float32), "w")
        node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
        out_shape = [batch, n_out]
    else:
        x = rng.standard_normal((stack, batch, n_in), dtype=np.float32)
        w = numpy_helper.from_array(rng.standard_normal((stack, n_in, n_out), dtype=np.float32), "w")
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        out_shape = [stack, batch, n_out]
    graph = helper.make_graph(
        [node],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=[w],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    session = create_session(model.SerializeToString(), threads)
    session.run(None, {"x": x})
    return statistics.median(_block(lambda: session.run(None, {"x": x}), min_seconds) for _ in range(5))


def flop_bound(members, batch: int, threads: int, min_seconds: float) -> dict:
    """Seconds per batch if every layer ran at the best GEMM rate measured for its shape (the FLOP bound):
    numpy's BLAS and torch per member GEMM (`gemm_rates`), and onnxruntime alone on GEMMs of the same sizes
    (the first layer of all members as one Gemm, deeper ones as one batched MatMul)."""
    from codec.pipelines.bench import gemm_rates, layer_macs

    macs = [layer_macs(net) for net in members]
    count = len(members)
    layers = members[0].compute_layers()
    rates = gemm_rates(threads, sizes=[(batch, layer.in_features, layer.num_neurons) for layer in layers])
    seconds = 0.0
    for l, (layer, rate) in enumerate(zip(layers, rates)):
        layer_flops = 2.0 * batch * sum(m[l]["own"] + m[l]["frozen"] for m in macs)
        if l == 0:
            ort_seconds = _ort_gemm_seconds(
                batch, layer.in_features, count * layer.num_neurons, 1, threads, min_seconds
            )
        else:
            ort_seconds = _ort_gemm_seconds(
                batch, layer.in_features, layer.num_neurons, count, threads, min_seconds
            )
        rate["ort_packed_gflops"] = layer_flops / ort_seconds / 1e9
        rate["best_gflops"] = max(rate["numpy_gflops"], rate["torch_gflops"], rate["ort_packed_gflops"])
        seconds += layer_flops / (rate["best_gflops"] * 1e9)
    flops = 2.0 * sum(m["own"] + m["frozen"] for net in macs for m in net)
    return {
        "flops_per_example": flops,
        "gemm": rates,
        "bound_seconds_per_batch": seconds,
        "bound_examples_per_second": batch / seconds,
    }


def stream_bandwidth(min_seconds: float) -> float:
    """GB/s numpy reads a 256 MB float32 array at (a sum: one pass over memory, far more than the caches)."""
    a = np.ones(64 * 2**20, np.float32)
    a.sum()
    return a.nbytes / statistics.median(_block(a.sum, min_seconds) for _ in range(5)) / 1e9


def _block(fn, min_seconds: float, cpu: list | None = None) -> float:
    """Seconds per call of `fn`, over a block of calls lasting at least `min_seconds`; appends the process's
    CPU seconds per call to `cpu` (with one thread, the time a call took while it was on a core)."""
    calls, started, cpu_started = 0, time.perf_counter(), time.process_time()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            if cpu is not None:
                cpu.append((time.process_time() - cpu_started) / calls)
            return elapsed / calls


def node_profile(model_bytes: bytes, x: np.ndarray, threads: int, runs: int = 200) -> dict:
    """onnxruntime's profile of `runs` calls at this batch: kernel time per op type against wall time."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = threads
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "profile")
        session = ort.InferenceSession(model_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        for _ in range(20):
            session.run(None, {name: x})
        started = time.perf_counter()
        for _ in range(runs):
            session.run(None, {name: x})
        wall = (time.perf_counter() - started) / runs
        events = json.loads(Path(session.end_profiling()).read_text())
    kernels = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    # the last `runs` runs' nodes (the first 20 were warm-up)
    nodes_per_run = len(kernels) // (runs + 20) if kernels else 0
    kernels = kernels[-nodes_per_run * runs :] if nodes_per_run else []
    by_op: dict[str, float] = {}
    for event in kernels:
        op = event.get("args", {}).get("op_name", "?")
        by_op[op] = by_op.get(op, 0.0) + event["dur"] * 1e-6 / runs
    kernel = sum(by_op.values())
    return {
        "nodes_per_run": nodes_per_run,
        "wall_seconds_per_run": wall,
        "kernel_seconds_per_run": kernel,
        "outside_kernels_seconds_per_run": wall - kernel,
        "kernel_seconds_by_op": dict(sorted(by_op.items(), key=lambda kv: -kv[1])),
    }


def run(config: dict, hidden: list[int], threads: int, criterion: str, seed: int, profile: bool) -> dict:
    """One architecture: every arm at every batch size, the FLOP bound, the targets, the optional profile."""
    from codec.ir import lower, to_bytes
    from codec.ir.ensemble import emit_ensemble, ensemble_description
    from codec.runtime.evaluation.metrics import combine
    from codec.runtime.execution.session import create_session

    members = make_members(config["members"], config["input_shape"], hidden, config["classes"], seed)
    packed = to_bytes(emit_ensemble(members, criterion=criterion, packed=True))
    unpacked = to_bytes(emit_ensemble(members, criterion=criterion, packed=False))
    fused = {
        "fused_packed": create_session(packed, threads),
        "fused_unpacked": create_session(unpacked, threads),
    }
    separate = [create_session(to_bytes(lower(net)), threads) for net in members]
    rng = np.random.default_rng(seed + 1)
    weight_bytes = 4 * sum(net.num_parameters for net in members)
    rows = []
    for batch in config["batches"]:
        x = rng.random((batch, *config["input_shape"]), dtype=np.float32)
        arms = {label: (lambda s=s, x=x: s.run(None, {"input": x})[0]) for label, s in fused.items()}
        arms["separate"] = lambda x=x: combine(
            np.stack([s.run(None, {"input": x})[0] for s in separate]), criterion
        )
        outputs = {label: fn() for label, fn in arms.items()}
        times = {label: [] for label in arms}
        cpu_times = {label: [] for label in arms}
        labels = list(arms)
        for repeat in range(config["repeats"]):
            for label in labels[repeat % len(labels) :] + labels[: repeat % len(labels)]:
                times[label].append(_block(arms[label], config["block_seconds"], cpu_times[label]))
        row = {
            "batch": batch,
            "max_abs_diff_packed_vs_unpacked": float(
                np.abs(outputs["fused_packed"] - outputs["fused_unpacked"]).max()
            ),
            "max_abs_diff_packed_vs_separate": float(
                np.abs(outputs["fused_packed"] - outputs["separate"]).max()
            ),
        }
        for label, values in times.items():
            median = statistics.median(values)
            row[label] = {
                "seconds_per_batch": median,
                "examples_per_second": batch / median,
                "seconds_per_batch_min": min(values),
                "repeats": values,
                "cpu_seconds_per_batch": statistics.median(cpu_times[label]),
                "cpu_repeats": cpu_times[label],
            }
        row["packed_speedup_vs_separate"] = (
            row["separate"]["seconds_per_batch"] / row["fused_packed"]["seconds_per_batch"]
        )
        row["packed_speedup_vs_unpacked"] = (
            row["fused_unpacked"]["seconds_per_batch"] / row["fused_packed"]["seconds_per_batch"]
        )
        # CPU time moves less with other processes' load than wall time (the same ratios, measured so)
        row["cpu_packed_speedup_vs_separate"] = (
            row["separate"]["cpu_seconds_per_batch"] / row["fused_packed"]["cpu_seconds_per_batch"]
        )
        row["cpu_packed_speedup_vs_unpacked"] = (
            row["fused_unpacked"]["cpu_seconds_per_batch"] / row["fused_packed"]["cpu_seconds_per_batch"]
        )
        row["flop_bound"] = flop_bound(members, batch, threads, config["block_seconds"])
        # every weight is read once per batch: at batch 1 that, not the FLOPs, bounds the time
        row["weights_gb_per_second_packed"] = weight_bytes / row["fused_packed"]["seconds_per_batch"] / 1e9
        row["packed_over_bound"] = (
            row["fused_packed"]["seconds_per_batch"] / row["flop_bound"]["bound_seconds_per_batch"]
        )
        row["load_average_after"] = list(os.getloadavg())
        rows.append(row)
        fastest = {label: batch / row[label]["seconds_per_batch_min"] for label in arms}
        print(
            f"batch {batch}: median (fastest repeat) examples/s: packed "
            f"{row['fused_packed']['examples_per_second']:.0f} "
            f"({fastest['fused_packed']:.0f}), unpacked {row['fused_unpacked']['examples_per_second']:.0f} "
            f"({fastest['fused_unpacked']:.0f}), separate {row['separate']['examples_per_second']:.0f} "
            f"({fastest['separate']:.0f}); "
            f"packed/separate {row['packed_speedup_vs_separate']:.2f}x (CPU time "
            f"{row['cpu_packed_speedup_vs_separate']:.2f}x), "
            f"packed/unpacked {row['packed_speedup_vs_unpacked']:.2f}x (CPU time "
            f"{row['cpu_packed_speedup_vs_unpacked']:.2f}x), "
            f"packed time / FLOP bound {row['packed_over_bound']:.2f}",
            file=sys.stderr,
        )
    result = {
        "description": ensemble_description(emit_ensemble(members, criterion=criterion)),
        "providers": fused["fused_packed"].get_providers(),
        "weight_bytes": weight_bytes,
        "stream_read_gb_per_second": stream_bandwidth(config["block_seconds"]),
        "batches": rows,
    }
    first, last = config["batches"][0], config["batches"][-1]
    result["targets"] = {
        f"packed_vs_separate_at_batch_{first}": {
            "target": ">= 2x",
            "measured": rows[0]["packed_speedup_vs_separate"],
            "met": rows[0]["packed_speedup_vs_separate"] >= 2.0,
        },
        f"packed_over_flop_bound_at_batch_{last}": {
            "target": "<= 1.5",
            "measured": rows[-1]["packed_over_bound"],
            "met": rows[-1]["packed_over_bound"] <= 1.5,
        },
    }
    if profile:
        x = rng.random((first, *config["input_shape"]), dtype=np.float32)
        result["profile_batch"] = first
        result["profile"] = {
            "fused_packed": node_profile(packed, x, threads),
            "fused_unpacked": node_profile(unpacked, x, threads),
        }
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__,
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=Path("bench/inference.json"),
        help="result JSON (written atomically)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=(
            f"the small config {SMOKE} (to validate the script on a busy machine); the result is labelled "
            "smoke"
        ),
    )
    parser.add_argument("--members", type=int, help=f"members N (default {FULL['members']})")
    parser.add_argument(
        "--archs",
        nargs="+",
        choices=sorted(ARCHS),
        help=f"recipe MLPs to run (default {FULL['archs']}: "
        + ", ".join(f"{name} {widths}" for name, widths in ARCHS.items())
        + ")",
    )
    parser.add_argument(
        "--hidden", type=int, nargs="+", help="hidden widths of one other MLP, instead of --archs"
    )
    parser.add_argument(
        "--batches",
        type=int,
        nargs="+",
        help=f"batch sizes; the first is the latency target's, the last the FLOP "
        f"bound's (default {FULL['batches']})",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        help=f"interleaved repeats, median reported, at least 5 (default {FULL['repeats']})",
    )
    parser.add_argument(
        "--block-seconds", type=float, help=f"seconds per timed block (default {FULL['block_seconds']})"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="onnxruntime intra-op threads and BLAS threads (default 1)"
    )
    parser.add_argument(
        "--criterion", default="prod", help="ensemble criterion (default prod, codec's default)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random members and inputs (default 0)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="add onnxruntime's per-node profile at the first batch size"
    )
    args = parser.parse_args(argv)
    config = dict(SMOKE if args.smoke else FULL)
    for key in ("members", "archs", "batches", "repeats", "block_seconds"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    if config["repeats"] < 5:
        parser.error("--repeats must be at least 5 (the median of fewer is not reported)")
    if config["members"] < 1 or min(config["batches"]) < 1 or args.threads < 1:
        parser.error("--members, --batches and --threads must be positive")

    from codec.io import write_json_atomic
    from codec.pipelines.bench import command_line, machine_facts

    load_before = list(os.getloadavg())
    result = {
        "label": "smoke" if args.smoke else "full",
        "command": "python " + command_line(),
        "config": config,
        "threads": args.threads,
        "criterion": args.criterion,
        "seed": args.seed,
        "load_average_before": load_before,
    }
    archs = {"custom": args.hidden} if args.hidden else {name: ARCHS[name] for name in config["archs"]}
    result["runs"] = []
    for name, hidden in archs.items():
        print(f"{name}: {config['members']} members, hidden {hidden}", file=sys.stderr)
        result["runs"].append(
            {
                "arch": name,
                "hidden": hidden,
                **run(config, hidden, args.threads, args.criterion, args.seed, args.profile),
            }
        )
    result["load_average_after"] = list(os.getloadavg())
    result["machine"] = machine_facts(args.threads)
    write_json_atomic(args.output, result)
    print(
        json.dumps({"label": result["label"], "targets": {r["arch"]: r["targets"] for r in result["runs"]}})
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
