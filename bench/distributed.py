"""Speed-up of 2 ranks over 1 (torchrun, gloo) for compiling a 4-member ensemble, measured side by side.

Runs `codec compile` with --nproc 1 and --nproc 2 alternately (same options, fresh run directories) and
reports wall times and their ratio. torch threads: 2 for the single process, 1 per rank for 2 ranks
(both use the machine's 2 cores).

    python bench/distributed.py --repeats 2 -o bench/distributed.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time


def run(nproc: int, threads: int, out: str, extra: list[str]) -> float:
    cmd = [
        sys.executable,
        "-m",
        "codec",
        "compile",
        "--recipe",
        "classifier_s",
        "--members",
        "4",
        "--quiet",
        "--json",
        "-o",
        out,
        "--nproc",
        str(nproc),
        "--threads",
        str(threads),
        *extra,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-3000:])
    report = json.loads(proc.stdout)
    return seconds, report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more codec compile options")
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args()
    rows = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for nproc, threads in ((1, 2), (2, 1)):
                seconds, report = run(nproc, threads, os.path.join(tmp, f"n{nproc}_{r}"), args.extra)
                rows[nproc].append(
                    {
                        "wall_seconds": seconds,
                        "training_seconds": report["time"]["training_total"],
                        "accuracy": report["quality"]["accuracy"],
                        "world_size": report["world_size"],
                    }
                )
                print(nproc, json.dumps(rows[nproc][-1]), file=sys.stderr)
    med = {n: statistics.median(r["wall_seconds"] for r in rows[n]) for n in rows}
    result = {
        "command": "python bench/distributed.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
        # the compile command as run (options in --extra override the defaults before them)
        "workload": " ".join(
            ["codec compile --recipe classifier_s --members 4 --nproc N --threads T", *args.extra]
        ),
        "runs": rows,
        "median_wall_seconds": med,
        "speedup_2_ranks_over_1": med[1] / med[2],
    }
    print(json.dumps({"median_wall_seconds": med, "speedup": result["speedup_2_ranks_over_1"]}))
    if args.output:
        from codec.io import write_json_atomic

        write_json_atomic(args.output, result)


if __name__ == "__main__":
    main()
