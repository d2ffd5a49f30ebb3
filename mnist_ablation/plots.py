"""The seed's two figures (training curves, confusion-matrix heatmap), as matplotlib figures.

Figures are built with matplotlib's object API (``Figure``), never pyplot: nothing here selects a backend or
keeps figures alive in global state, so the library changes nothing in the caller's matplotlib set-up.
"""

from __future__ import annotations

import numpy as np
import seaborn as sns
from matplotlib.figure import Figure


def new_figure(**kwargs) -> Figure:
    """A figure that belongs to no pyplot window (saved or logged, never shown)."""
    return Figure(**kwargs)


def training_curves_figure(history: dict[str, list[float]], title: str = "") -> Figure:
    """Accuracy and loss per epoch, training and validation, side by side (the seed's figure)."""
    fig = new_figure(figsize=(14, 6))
    ax_acc, ax_loss = fig.subplots(1, 2)
    epochs = np.arange(1, len(history.get("loss", [])) + 1)
    for ax, metric, label in ((ax_acc, "accuracy", "Accuracy"), (ax_loss, "loss", "Loss")):
        ax.plot(epochs, history.get(metric, []), marker="o", label=f"Train {label}")
        ax.plot(epochs, history.get(f"val_{metric}", []), marker="o", label=f"Validation {label}")
        ax.set_title(f"Model {label}")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int = 10) -> np.ndarray:
    """Counts[true, predicted]."""
    counts = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(counts, (labels, predictions), 1)
    return counts


def confusion_matrix_figure(labels: np.ndarray, predictions: np.ndarray, title: str = "Confusion Matrix") -> Figure:
    """Heatmap of the test confusion matrix with counts in every cell (the seed's figure)."""
    counts = confusion_matrix(labels, predictions)
    fig = new_figure(figsize=(10, 8))
    ax = fig.subplots()
    sns.heatmap(counts, annot=True, fmt="d", cmap="Blues", ax=ax, cbar_kws={"label": "test images"})
    ax.set_xlabel("Predicted labels")
    ax.set_ylabel("True labels")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"{title} (accuracy {accuracy:.2%}, {counts.sum() - np.trace(counts)} errors)")
    fig.tight_layout()
    return fig
