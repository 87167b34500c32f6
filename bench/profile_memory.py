"""Peak memory of streamed activation profiling as the calibration set grows 10x.

Each size runs in a fresh subprocess (peak RSS is per process). The calibration inputs are generated
batch by batch, so any growth would come from profiling itself.

    python bench/profile_memory.py --sizes 10000 100000 -o bench/profile_memory.json
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time


def child(n: int, width: int, batch: int) -> dict:
    import numpy as np

    from codec.ir import Activation, Dense, NetworkIR
    from codec.runtime.execution.profile import profile

    rng = np.random.default_rng(0)
    dims = [784, width, width, width, width, 10]
    layers = [
        Dense(
            f"fc{i}",
            (rng.standard_normal((dims[i + 1], dims[i])) / np.sqrt(dims[i])).astype(np.float32),
            np.zeros(dims[i + 1], np.float32),
            Activation("relu" if i < 4 else "softmax"),
        )
        for i in range(5)
    ]
    net = NetworkIR("mlp", "input", "output", (784,), layers)

    def batches():
        gen = np.random.default_rng(1)
        for start in range(0, n, batch):
            yield gen.random((min(batch, n - start), 784), dtype=np.float32)

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    stats = profile(net, batches(), batch_size=batch)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "inputs": stats.count,
        "width": width,
        "batch": batch,
        "stats_bytes": stats.nbytes,
        "peak_rss_mib_before": before / 1024,
        "peak_rss_mib": peak / 1024,
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("-o", "--output", default=None)
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.width, args.batch)))
        return
    runs = []
    for n in args.sizes:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                str(n),
                "--width",
                str(args.width),
                "--batch",
                str(args.batch),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(runs[-1]))
    result = {
        "command": " ".join(["python", "bench/profile_memory.py", *sys.argv[1:]]),
        "machine": platform.platform(),
        "runs": runs,
        "peak_rss_ratio_largest_vs_smallest": runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"],
    }
    if args.output:
        from codec.io import write_json_atomic

        write_json_atomic(args.output, result)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}))


if __name__ == "__main__":
    main()
