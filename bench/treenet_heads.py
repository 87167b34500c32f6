"""Benchmark: a TreeNet's heads stacked (one batched computation) against the loop over branches.

Trains `classifier_s` TreeNets (784-128-96-64-32-10 MLP, trunk = the first Linear layer, `--split fc1`)
on the bundled `mnist_small` training images (4,500; the last 500 validate) with
`codec.runtime.training.coupled.train_coupled`, once with ``stack_heads=True`` (the branches as stacked
leaves, runtime/training/coupled.py `_StackedHeads`) and once with ``stack_heads=False`` (the loop), the
two arms interleaved within each repeat so load changes hit both. Epoch time is each run's median epoch
("seconds" in its history: training plus validation), on 1 torch thread. The load average is recorded
before and after: the machine is shared, so the figures are rough (the paired ratio, loop over stacked
within each repeat, is the steadier one). The two arms also end with the same weights (checked and
recorded: exact for MLP heads).

Usage (from the repository root):
    python bench/treenet_heads.py --repeats 5 -o bench/treenet_heads.json   # M = 4 and 8
    python bench/treenet_heads.py --members 4 --repeats 1 --epochs 1        # quicker look
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

from codec.io import write_json_atomic
from codec.models import build_model, get_recipe
from codec.pipelines.bench.machine import command_line, machine_facts
from codec.runtime.data import load_dataset
from codec.runtime.training.coupled import EnsembleOptions, build_treenet, train_coupled
from codec.runtime.training.train import TrainConfig


def run(members: int, stack: bool, x, y, xv, yv, recipe, shape, classes, epochs: int, loss: str) -> dict:
    def build(seed: int):
        return build_model(recipe.arch, shape, classes, seed=seed, **dict(recipe.arch_kwargs or {}))

    config = TrainConfig.from_recipe(
        recipe, max_epochs=epochs, patience=None, quiet=True, device="cpu", num_threads=1, lr_decay=1.0
    )
    options = EnsembleOptions(members=members, split="fc1", loss=loss)
    tree = build_treenet(build, members, "fc1", config.seed, stack_heads=stack)
    result = train_coupled(tree, x, y, xv, yv, config, options)
    return {
        "heads_stacked": result.heads_stacked,
        "epoch_seconds": [e["seconds"] for e in result.history],
        "median_epoch_seconds": statistics.median(e["seconds"] for e in result.history),
        "state": [t.clone() for t in result.module.state_dict().values()],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--loss", default="independent")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("-o", "--output", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    recipe = get_recipe("classifier_s")
    dataset = load_dataset(recipe.dataset, data_dir=args.data_dir)
    # the last 500 training images validate (the test set is not touched)
    x, y = dataset.x_train[:-500], dataset.y_train[:-500]
    xv, yv = dataset.x_train[-500:], dataset.y_train[-500:]
    shape, classes = tuple(dataset.input_shape), dataset.num_classes
    load_before = [round(v, 2) for v in os.getloadavg()]
    results = {}
    for m in args.members:
        rows = {"stacked": [], "loop": []}
        same = True
        for _ in range(args.repeats):
            outs = {}
            for arm, stack in (("stacked", True), ("loop", False)):
                outs[arm] = run(m, stack, x, y, xv, yv, recipe, shape, classes, args.epochs, args.loss)
                rows[arm].append(outs[arm]["median_epoch_seconds"])
            assert outs["stacked"]["heads_stacked"] and not outs["loop"]["heads_stacked"]
            same = same and all(
                torch.equal(a, b) for a, b in zip(outs["stacked"]["state"], outs["loop"]["state"])
            )
        stacked, loop = statistics.median(rows["stacked"]), statistics.median(rows["loop"])
        results[str(m)] = {
            "stacked_epoch_seconds": rows["stacked"],
            "loop_epoch_seconds": rows["loop"],
            "median_stacked": stacked,
            "median_loop": loop,
            "speedup": loop / stacked,
            # each repeat's two runs ran back to back: their ratio is less exposed to load changes
            "paired_speedups": [a / b for a, b in zip(rows["loop"], rows["stacked"])],
            "median_paired_speedup": statistics.median(a / b for a, b in zip(rows["loop"], rows["stacked"])),
            "same_weights": same,
        }
        print(
            f"M={m}: stacked {stacked:.3f} s/epoch, loop {loop:.3f} s/epoch, {loop / stacked:.2f}x "
            f"(median paired {results[str(m)]['median_paired_speedup']:.2f}x), same weights: {same}"
        )
    record = {
        "command": command_line(),
        "recipe": recipe.name,
        "split": "fc1",
        "loss": args.loss,
        "n_train": int(len(x)),
        "n_val": int(len(xv)),
        "epochs": args.epochs,
        "repeats": args.repeats,
        "load_average_before": load_before,
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
        "machine": machine_facts(1),
        "results": results,
    }
    print(f"load average before {load_before}, after {record['load_average_after']}")
    if args.output:
        write_json_atomic(args.output, record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
