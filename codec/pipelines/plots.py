"""Figures for reports, drawn with matplotlib's Agg renderer (no display needed).

matplotlib is an optional extra (``pip install 'codec[plot]'``) and is imported only when a figure is
drawn; without it `require_matplotlib` raises a one-line `ConfigError` that says how to install it.
Figures are built on a `matplotlib.figure.Figure` with an Agg canvas rather than through pyplot, so
drawing one never switches the backend or touches the global figure state of the calling program.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from codec.errors import ConfigError, ShapeError
from codec.io import atomic_path

INSTALL_HINT = "pip install 'codec[plot]'"


def require_matplotlib():
    """Import matplotlib, or raise ConfigError saying how to install it. Returns the module."""
    try:
        import matplotlib
    except ImportError:
        raise ConfigError(f"drawing figures needs matplotlib, which is not installed: {INSTALL_HINT}") from None
    return matplotlib


def assignment_heatmap(
    table,
    path: str | os.PathLike,
    *,
    class_names: Sequence[str] | None = None,
    member_names: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 120,
) -> Path:
    """Draw an MCL assignment table (members x classes, `codec.runtime.evaluation.metrics.assignment_table`) as a
    heatmap PNG, written atomically; each cell shows its count.

    Args:
        table: (M, K) non-negative counts: how many test examples of class k member m wins.
        path: the .png file to write.
        class_names: K column labels (default 0..K-1).
        member_names: M row labels (default "member 0".."member M-1").
        title: the figure title.
        dpi: resolution.

    Returns:
        The path written.

    Raises:
        ShapeError: a table that is not 2-D, or labels that do not match its shape.
        ConfigError: matplotlib is missing.
    """
    counts = np.asarray(table)
    if counts.ndim != 2 or 0 in counts.shape:
        raise ShapeError(f"an assignment table is (members, classes), got shape {counts.shape}")
    members, classes = counts.shape
    class_names = [str(c) for c in (class_names if class_names is not None else range(classes))]
    member_names = [str(m) for m in (member_names if member_names is not None else (f"member {i}" for i in range(members)))]
    if len(class_names) != classes or len(member_names) != members:
        raise ShapeError(
            f"{len(member_names)} member and {len(class_names)} class labels for a {members} x {classes} table"
        )
    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(1.0 + 0.7 * classes, 1.2 + 0.5 * members))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    image = axes.imshow(counts, cmap="viridis", aspect="auto")
    axes.set_xticks(range(classes), class_names, rotation=45, ha="right")
    axes.set_yticks(range(members), member_names)
    axes.set_xlabel("class")
    axes.set_ylabel("member with the lowest loss")
    if title:
        axes.set_title(title, fontsize=10)
    threshold = counts.max() / 2 if counts.size else 0
    for m in range(members):
        for k in range(classes):
            axes.text(k, m, f"{counts[m, k]:g}", ha="center", va="center", fontsize=7,
                      color="black" if counts[m, k] > threshold else "white")
    figure.colorbar(image, ax=axes, label="test examples")
    figure.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=dpi)
    return path


__all__ = ["INSTALL_HINT", "assignment_heatmap", "require_matplotlib"]
