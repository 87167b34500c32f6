"""`codec train`'s pipeline: one member of a named recipe, trained, exported to ONNX and scored.

The training loop itself is `codec.runtime.training.train.train_member`; this module only ties the recipe,
its data, the model zoo, the loop, the export and the test score together.
"""

from __future__ import annotations

import os
from pathlib import Path

from codec.errors import ConfigError
from codec.runtime.training.train import TrainConfig, export_onnx, resolve_device, train_member


def train_recipe(
    recipe_name: str,
    seed: int,
    *,
    out_path: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    overrides: dict | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    quiet: bool = False,
) -> dict:
    """Train one member of a named recipe and export it to ONNX.

    Loads the recipe's dataset, takes its n_train/n_test subsets and validation split (with `DATA_SEED`,
    so all members of an ensemble share the data: `codec.pipelines.data.load_recipe_data`), builds the network
    with `seed`, trains it, exports it
    to `out_path`, and scores the exported ONNX model with onnxruntime on the test set.

    Args:
        recipe_name: a name from `codec.models.RECIPES`.
        seed: the member's seed (initialisation, shuffling, dropout).
        out_path: the .onnx file to write.
        data_dir: where datasets live (None: the loader's default).
        overrides: TrainConfig fields replacing the recipe's (None values are ignored).
        checkpoint_dir: write the checkpoint as ``<checkpoint_dir>/<out name>.ckpt``.
        checkpoint_path: the checkpoint file itself (wins over `checkpoint_dir`); neither: no checkpoint.
        resume: continue from the checkpoint when it exists.
        quiet: no progress bar.

    Returns:
        A JSON-serialisable summary: recipe, arch, dataset, task, seed, output, checkpoint, device,
        n_train/n_val/n_test, epochs_run, best_epoch, stopped_early, train_seconds, val_loss, val_metric,
        metric ("accuracy" or "mse"), test_metric, config and history.
    """
    from codec.models import get_recipe
    from codec.pipelines.data import load_recipe_data
    from codec.runtime.evaluation.scoring import model_outputs, score_members

    recipe = get_recipe(recipe_name)
    overrides = dict(overrides or {})
    overrides.update(seed=seed, quiet=quiet or overrides.get("quiet", False))
    config = TrainConfig.from_recipe(recipe, **overrides)
    task = recipe.task
    if task == "reconstruction" and config.loss != "mse":
        raise ConfigError(
            f"recipe {recipe.name!r} reconstructs its input, so its loss must be 'mse', not {config.loss!r}"
        )
    if task == "classification" and config.loss != "ce":
        raise ConfigError(
            f"recipe {recipe.name!r} is a classifier, so its loss must be 'ce', not {config.loss!r}"
        )

    data = load_recipe_data(recipe, config, data_dir)
    input_shape = data.input_shape
    module = recipe.build(input_shape, data.num_outputs, seed=seed)

    out_path = Path(out_path)
    if checkpoint_path is None and checkpoint_dir is not None:
        checkpoint_path = Path(checkpoint_dir) / f"{out_path.name}.ckpt"
    result = train_member(
        module,
        data.x_train,
        data.y_train,
        data.x_val,
        data.y_val,
        config,
        checkpoint_path=checkpoint_path,
        resume=resume,
        desc=f"{recipe.name} seed {seed}",
    )
    export_onnx(result.module, out_path, input_shape, task=task)

    # Score the exported file, not the torch module: the ONNX model is what gets deployed and ensembled.
    outputs = model_outputs(out_path, data.x_test)
    scores = score_members(outputs[None], task, data.target("test"), "mean")
    if task == "classification":
        metric_name, test_metric = "accuracy", scores["member_accuracies"][0]
    else:
        metric_name, test_metric = "mse", scores["member_mse"][0]
    best = result.best or {}
    return {
        "recipe": recipe.name,
        "arch": recipe.arch,
        "dataset": data.name,
        "task": task,
        "seed": seed,
        "output": str(out_path),
        "checkpoint": str(checkpoint_path) if checkpoint_path is not None else None,
        "device": str(resolve_device(config.device)),
        "n_train": len(data.x_train),
        "n_val": data.n_val,
        "n_test": len(data.x_test),
        "epochs_run": result.epochs_run,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "train_seconds": result.train_seconds,
        "val_loss": best.get("val_loss"),
        "val_metric": best.get("val_metric"),
        "metric": metric_name,
        "test_metric": float(test_metric),
        "config": config.to_dict(),
        "history": result.history,
    }


def member_facts(result, seed: int, *, parameters: bool = False) -> dict:
    """What a pipeline records about a trained member: its seed, epochs, best epoch and training time.

    Args:
        result: the member's `TrainResult`.
        seed: the seed it was trained with.
        parameters: also count its parameters, all and trainable (a grown member reports its own).
    """
    facts = {
        "seed": seed,
        "epochs": result.epochs_run,
        "best_epoch": result.best_epoch,
        "train_seconds": result.train_seconds,
    }
    if parameters:
        facts["parameters"] = int(sum(p.numel() for p in result.module.parameters()))
        facts["trainable_parameters"] = int(
            sum(p.numel() for p in result.module.parameters() if p.requires_grad)
        )
    return facts


__all__ = ["member_facts", "train_recipe"]
