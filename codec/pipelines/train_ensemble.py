"""`codec train-ensemble`'s pipeline: a coupled ensemble (TreeNet, MCL, ensemble-aware losses) of a
named recipe, trained, exported as one fused ONNX graph, scored and reported.

The model and the loop are `codec.runtime.training.coupled` (and `coupled_dist` over torchrun's ranks);
this module ties the recipe, its data, the loop, the export and the test metrics together.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from codec.errors import ConfigError
from codec.runtime.training.coupled import (
    EnsembleOptions,
    build_treenet,
    ensemble_logits,
    member_seed,
    train_coupled,
    treenet_networks,
)
from codec.runtime.training.losses import member_losses
from codec.runtime.training.train import EVAL_BATCH_SIZE, TrainConfig, resolve_device


def train_ensemble_recipe(
    recipe_name: str,
    options: EnsembleOptions,
    out_dir: str | os.PathLike,
    *,
    overrides: dict | None = None,
    width: float = 1.0,
    data_dir: str | os.PathLike | None = None,
    resume: bool = False,
    quiet: bool = False,
    export_members: bool = False,
    plot: bool = True,
    trunk_exchange: str = "auto",
) -> dict:
    """Train a coupled ensemble of a named recipe, export it fused, score it, and write its report.

    Writes into `out_dir`: ``ensemble.onnx`` (fused: trunk once, branches, collect per
    ``options.criterion``), ``ensemble.ckpt`` (the checkpoint), ``report.json``, ``assignment.svg``
    (with `plot`) and ``members/member_<i>.onnx`` (with `export_members`).

    Args:
        recipe_name: a classification recipe of `codec.models.RECIPES`.
        options: the ensemble options.
        out_dir: the output folder (created).
        overrides: TrainConfig fields replacing the recipe's (None values ignored), e.g. seed, max_epochs.
        width: the network's width multiplier (1.0 = the recipe's network).
        data_dir: where datasets live (None: the loader's default).
        resume: continue from ``ensemble.ckpt`` when it exists.
        quiet: no progress bar.
        export_members: also write each member as its own ONNX model.
        plot: write the assignment heatmap (SVG).

    Returns:
        The report (also written as report.json): recipe, dataset, options, config, treenet (trunk/branch
        modules, parameters), data sizes, training facts and history, test metrics (ensemble accuracy of
        the fused ONNX, member and oracle accuracies, NLL, ECE, accuracy of the mean logits), the assignment
        table (members x classes),
        parity of the fused ONNX with torch, files written and times.
    """
    from codec.io import write_json_atomic
    from codec.ir.ensemble import emit_ensemble, ensemble_parameter_count
    from codec.ir.lower import lower, save_model, to_bytes
    from codec.models import get_recipe
    from codec.pipelines.data import load_recipe_data
    from codec.runtime.evaluation.metrics import assignment_table, combine
    from codec.runtime.evaluation.scoring import score_members
    from codec.runtime.execution.session import create_session, run_batches

    started = time.perf_counter()
    recipe = get_recipe(recipe_name)
    if recipe.task != "classification":
        raise ConfigError(
            f"recipe {recipe.name!r} is not a classifier; coupled ensembles (MCL, TreeNets) train classifiers"
        )
    overrides = dict(overrides or {})
    overrides["quiet"] = quiet or overrides.get("quiet", False)
    config = TrainConfig.from_recipe(recipe, **overrides)
    out_dir = Path(out_dir)

    data = load_recipe_data(recipe, config, data_dir)
    input_shape = data.input_shape
    num_classes = data.num_outputs

    def build(seed: int) -> nn.Sequential:
        return recipe.build(input_shape, num_classes, width=width, seed=seed)

    treenet = build_treenet(
        build, options.members, options.split, config.seed, random_init=options.random_init
    )
    treenet_networks(treenet, input_shape)  # refuse a network the fused export cannot express before training

    from codec.runtime.training import distributed

    world = distributed.init(threads=config.num_threads)
    if world.distributed:
        # model-parallel over torchrun's ranks (codec.runtime.training.coupled_dist); it keeps no checkpoint
        from codec.runtime.training.coupled_dist import train_coupled_distributed

        if resume:
            raise ConfigError(
                "--resume is not supported for coupled training over several processes (--nproc > 1)"
            )
        result = train_coupled_distributed(
            treenet,
            data.x_train,
            data.y_train,
            data.x_val,
            data.y_val,
            dataclasses.replace(config, quiet=quiet or not world.is_main),
            options,
            desc=f"{recipe.name} x{options.members} {options.loss}",
            trunk=trunk_exchange,
        )
        if not world.is_main:
            return {}
    else:
        result = train_coupled(
            treenet,
            data.x_train,
            data.y_train,
            data.x_val,
            data.y_val,
            config,
            options,
            checkpoint_path=out_dir / "ensemble.ckpt",
            resume=resume,
            desc=f"{recipe.name} x{options.members} {options.loss}",
        )
    treenet = result.module.to("cpu").eval()

    export_start = time.perf_counter()
    members_ir, trunk_ir = treenet_networks(treenet, input_shape)
    ensemble_path = save_model(
        emit_ensemble(members_ir, trunk_ir, criterion=options.criterion), out_dir / "ensemble.onnx"
    )
    member_files = []
    if export_members:
        for i, net in enumerate(members_ir):
            member_files.append(str(save_model(lower(net), out_dir / "members" / f"member_{i}.onnx")))
    export_seconds = time.perf_counter() - export_start

    eval_start = time.perf_counter()
    # Score the fused graph: it is what is deployed. Its member outputs give the oracle and member metrics.
    scoring = emit_ensemble(members_ir, trunk_ir, criterion=options.criterion, member_outputs=True)
    session = create_session(to_bytes(scoring))
    batches = list(run_batches(session, data.x_test, batch_size=EVAL_BATCH_SIZE))
    fused = np.concatenate([b[0] for b in batches])
    onnx_members = np.stack([np.concatenate([b[1 + i] for b in batches]) for i in range(len(members_ir))])
    logits = ensemble_logits(treenet, data.x_test)
    torch_probs = torch.softmax(logits.double(), dim=2).numpy()
    metrics = score_members(onnx_members, "classification", data.y_test, options.criterion)
    metrics["fused_accuracy"] = float(np.mean(fused.argmax(axis=1) == data.y_test))
    # The score-averaged loss trains the mean of the logits; the ONNX criteria combine probabilities, so
    # the accuracy of the mean logits (torch) is reported beside them.
    metrics["logit_mean_accuracy"] = float(np.mean(logits.mean(dim=0).argmax(dim=1).numpy() == data.y_test))
    losses = member_losses(logits, torch.from_numpy(data.y_test)).numpy()
    table = assignment_table(losses, data.y_test, num_classes)
    parity = {
        "members_max_abs_diff": float(np.abs(onnx_members - torch_probs).max()),
        "ensemble_max_abs_diff": float(np.abs(fused - combine(torch_probs, options.criterion)).max()),
    }
    eval_seconds = time.perf_counter() - eval_start

    plot_path = None
    if plot:
        from codec.pipelines.report import assignment_svg

        title = f"{recipe.name}: {options.members} members, {options.loss}" + (
            f" k={options.k}" if options.loss == "mcl" else ""
        )
        plot_path = str(
            assignment_svg(table, out_dir / "assignment.svg", class_names=data.class_names, title=title)
        )

    best = next((e for e in result.history if e["epoch"] == result.best_epoch), {})
    report = {
        "recipe": recipe.name,
        "arch": recipe.arch,
        "dataset": data.name,
        "width": width,
        "options": options.to_dict(),
        "loss": options.ensemble_loss().to_dict(),
        "config": config.to_dict(),
        "effective_lr": config.lr * (options.members if options.lr_scale_by_members else 1),
        "member_seeds": [
            member_seed(config.seed, m if options.random_init else 0) for m in range(options.members)
        ],
        "treenet": {
            **treenet.describe(),
            "parameters": treenet.parameter_counts(),
            "fused_parameters": ensemble_parameter_count(members_ir, trunk_ir),
        },
        "bag_unique_fraction": result.bag_unique,
        # which training path ran: the branches as one stacked computation, or a loop over them
        "heads_stacked": result.heads_stacked,
        "n_train": len(data.x_train),
        "n_val": data.n_val,
        "n_test": len(data.x_test),
        "device": str(resolve_device(config.device)),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "val_loss": best.get("val_loss"),
        "metrics": metrics,
        "mean_member_accuracy": float(np.mean(metrics["member_accuracies"])),
        "assignment": {
            "table": table.tolist(),
            "classes": list(data.class_names),
            "rule": "each test example to the member with the lowest cross-entropy (ties: lowest index)",
        },
        "parity": parity,
        "files": {
            "ensemble": str(ensemble_path),
            "checkpoint": str(out_dir / "ensemble.ckpt"),
            "report": str(out_dir / "report.json"),
            "assignment_svg": plot_path,
            "members": member_files,
        },
        "times": {
            "train_seconds": result.train_seconds,
            "export_seconds": export_seconds,
            "eval_seconds": eval_seconds,
            "total_seconds": time.perf_counter() - started,
        },
        "history": result.history,
    }
    report["world_size"] = world.size
    write_json_atomic(out_dir / "report.json", report)
    return report


__all__ = ["train_ensemble_recipe"]
