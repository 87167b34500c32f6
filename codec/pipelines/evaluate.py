"""`codec eval`'s pipeline: score ONNX members, alone and combined, on a dataset split."""

from __future__ import annotations

import os

import numpy as np

from codec.errors import ShapeError


def evaluate_members(
    members: list[str],
    data: str,
    *,
    data_dir: str | os.PathLike | None = None,
    criterion: str = "prod",
    split: str = "test",
    batch_size: int = 512,
    limit: int | None = None,
) -> dict:
    """Run each member on a dataset split and compute the ensemble's metrics.

    The task is read off the outputs: one value per class is a classifier (members that output scores get
    a softmax first), one per input value an autoencoder.

    Returns:
        A JSON-serialisable dict: task, dataset, split, n_examples, members (paths) and the metrics
        (`evaluate_classifier`'s keys and softmax_applied for classifiers; member_mse, cumulative_mse and
        mse for autoencoders).

    Raises:
        ModelLoadError: a member onnxruntime cannot load.
        ShapeError: members whose input or output shapes differ, or data that does not fit them.
    """
    from codec.pipelines.data import load_split
    from codec.runtime.evaluation.scoring import member_outputs, score_members, softmax_scores
    from codec.runtime.execution.session import create_session

    sessions = [create_session(path) for path in members]  # unloadable members fail before the data is read
    x, y, dataset = load_split(data, data_dir=data_dir, split=split, limit=limit)
    stack = member_outputs(sessions, x, names=members, batch_size=batch_size)

    report = {"dataset": dataset.name, "split": split, "n_examples": len(x), "members": list(members)}
    flat_inputs = int(np.prod(x.shape[1:]))
    if stack.ndim == 3 and stack.shape[2] == flat_inputs and flat_inputs != dataset.num_classes:
        report["task"] = "reconstruction"
        report.update(score_members(stack, "reconstruction", x, criterion))
        return report
    if stack.ndim != 3 or stack.shape[2] != dataset.num_classes:
        raise ShapeError(
            f"the members output {tuple(stack.shape[2:])} values per example, which is neither one per class "
            f"({dataset.num_classes} for {dataset.name})"
            f" nor a reconstruction of the {flat_inputs} input values"
        )
    stack, softmaxed = softmax_scores(stack, members)
    report["task"] = "classification"
    report.update(score_members(stack, "classification", y, criterion))
    report["softmax_applied"] = softmaxed
    return report


__all__ = ["evaluate_members"]
