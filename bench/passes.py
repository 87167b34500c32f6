"""Pass time vs training time: DNA, DNE, NDA, CSNE on two 4-layer 1024-wide MLPs over 10,000 calibration
inputs, next to the time one member takes to train, measured side by side in one run.

    python bench/passes.py --data-dir ../shared/data -o bench/passes.json

The members are trained here (MNIST, Adam, early stopping) so the passes see real activations.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--calibration", type=int, default=10_000)
    parser.add_argument(
        "--epochs", type=int, default=20, help="max epochs per member (early stopping, patience 5)"
    )
    parser.add_argument("--n-train", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3, help="pass pipeline repeats (median reported)")
    parser.add_argument("--passes", default="dna,dne,nda,csne")
    parser.add_argument("-o", "--output", default=None)
    parser.add_argument("--work", default="/tmp/codec-bench-passes")
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="reuse the members and training times a previous run left in --work (the ratio then "
        "compares times from two runs: say so when reporting it)",
    )
    args = parser.parse_args()

    import numpy as np
    import torch

    from codec.ir import lift
    from codec.models import build_model
    from codec.passes.base import Calibration, EnsembleModule
    from codec.passes.manager import PassManager
    from codec.passes.registry import parse_pipeline
    from codec.runtime.data import load_dataset
    from codec.runtime.training.train import TrainConfig, export_onnx, train_member

    dataset = load_dataset(args.data, data_dir=args.data_dir)
    if args.n_train:
        dataset = dataset.subset(args.n_train, None, seed=0)
    train, (x_val, y_val) = dataset.split_validation(0.1, seed=0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    hidden = (args.width,) * 4
    members, training = {}, {}
    saved = work / "training.json"
    if args.reuse and saved.exists():
        training = json.loads(saved.read_text())
        members = {name: lift(work / f"{name}.onnx", name=name) for name in ("main", "peer")}
    for name, seed in (("main", 0), ("peer", 1)):
        if name in members:
            continue
        config = TrainConfig(
            max_epochs=args.epochs,
            patience=5,
            batch_size=128,
            lr=1e-3,
            seed=seed,
            quiet=True,
            num_threads=args.threads,
            device="cpu",
        )
        module = build_model("classifier", dataset.input_shape, dataset.num_classes, seed=seed, hidden=hidden)
        result = train_member(module, train.x_train, train.y_train, x_val, y_val, config, desc=name)
        training[name] = {
            "seconds": result.train_seconds,
            "epochs": result.epochs_run,
            "best_epoch": result.best_epoch,
            "val_accuracy": (result.best or {}).get("val_metric"),
        }
        print(name, json.dumps(training[name]), file=sys.stderr)
        members[name] = lift(
            export_onnx(result.module, work / f"{name}.onnx", dataset.input_shape), name=name
        )

    saved.write_text(json.dumps(training))
    x_cal = train.x_train[: args.calibration]
    runs = []
    for _ in range(args.repeats):
        module = EnsembleModule({k: v.copy() for k, v in members.items()}, Calibration(x_cal, 512))
        start = time.perf_counter()
        _, report = PassManager(parse_pipeline(args.passes)).run(module)
        runs.append(
            {
                "seconds": time.perf_counter() - start,
                "per_pass": {r["pass"]: r["seconds"] for r in report["passes"]},
                "csn_per_layer": report["passes"][-1]["details"].get("csn_per_layer"),
            }
        )
        print("passes", json.dumps(runs[-1]), file=sys.stderr)
    pass_seconds = float(np.median([r["seconds"] for r in runs]))
    one_member = training["main"]["seconds"]
    result = {
        "command": "python bench/passes.py " + " ".join(sys.argv[1:]),
        "machine": {
            "platform": platform.platform(),
            "cpus": __import__("os").cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "network": f"MLP 784-{'-'.join(map(str, hidden))}-10",
        "calibration_inputs": len(x_cal),
        "training": training,
        "training_reused_from_previous_run": bool(args.reuse and saved.exists()),
        "pass_runs": runs,
        "pass_seconds_median": pass_seconds,
        "ratio_passes_to_one_member_training": pass_seconds / one_member,
        "ratio_percent": 100 * pass_seconds / one_member,
        "paper_claim_percent": 0.05,
    }
    print(json.dumps({k: result[k] for k in ("pass_seconds_median", "ratio_percent")}))
    if args.output:
        from codec.io import write_json_atomic

        write_json_atomic(args.output, result)


if __name__ == "__main__":
    main()
