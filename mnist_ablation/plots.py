"""The seed's two figures (training curves, confusion-matrix heatmap), as matplotlib figures."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # headless: figures are saved, never shown

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402


def training_curves_figure(history: dict[str, list[float]], title: str = "") -> plt.Figure:
    """Accuracy and loss per epoch, training and validation, side by side (the seed's figure)."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(14, 6))
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


def confusion_matrix_figure(labels: np.ndarray, predictions: np.ndarray, title: str = "Confusion Matrix") -> plt.Figure:
    """Heatmap of the test confusion matrix with counts in every cell (the seed's figure)."""
    counts = confusion_matrix(labels, predictions)
    fig, ax = plt.subplots(figsize=(10, 8))
    sns.heatmap(counts, annot=True, fmt="d", cmap="Blues", ax=ax, cbar_kws={"label": "test images"})
    ax.set_xlabel("Predicted labels")
    ax.set_ylabel("True labels")
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    ax.set_title(f"{title} (accuracy {accuracy:.2%}, {counts.sum() - np.trace(counts)} errors)")
    fig.tight_layout()
    return fig
