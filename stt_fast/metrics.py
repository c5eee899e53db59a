"""Classification metrics of DFER: WAR (plain accuracy), UAR (mean per-class recall), per-class recall,
confusion matrix, and a PNG of the matrix."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

from .config import EMOTIONS


def confusion_matrix(predictions, targets, num_classes: int = len(EMOTIONS)) -> torch.Tensor:
    """[K, K] int64 counts; row = true class, column = predicted class."""
    p = torch.as_tensor(predictions, dtype=torch.long).flatten()
    t = torch.as_tensor(targets, dtype=torch.long).flatten()
    if p.shape != t.shape:
        raise ValueError(f"predictions and targets differ in length: {p.numel()} vs {t.numel()}")
    if p.numel() and (min(p.min(), t.min()) < 0 or max(p.max(), t.max()) >= num_classes):
        raise ValueError(f"class indices must be in [0, {num_classes})")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).view(num_classes, num_classes)


def per_class_recall(cm: torch.Tensor) -> list[float]:
    """Recall of each class; NaN for a class with no sample."""
    totals = cm.sum(dim=1)
    return [(cm[k, k] / totals[k]).item() if totals[k] else math.nan for k in range(cm.shape[0])]


def war(cm: torch.Tensor) -> float:
    """Weighted average recall: plain accuracy."""
    total = cm.sum().item()
    return cm.diagonal().sum().item() / total if total else math.nan


def uar(cm: torch.Tensor) -> float:
    """Unweighted average recall: the mean of the per-class recalls over the classes present."""
    recalls = [r for r in per_class_recall(cm) if not math.isnan(r)]
    return sum(recalls) / len(recalls) if recalls else math.nan


def summarize(predictions, targets, num_classes: int = len(EMOTIONS), labels: Sequence[str] = EMOTIONS) -> dict:
    cm = confusion_matrix(predictions, targets, num_classes)
    names = list(labels) if len(labels) == num_classes else [str(k) for k in range(num_classes)]
    return {"war": war(cm), "uar": uar(cm), "samples": int(cm.sum()),
            "per_class_recall": dict(zip(names, per_class_recall(cm))), "confusion_matrix": cm.tolist()}


def plot_confusion_matrix(cm, path: str | os.PathLike, labels: Sequence[str] = EMOTIONS, title: str = "") -> None:
    """Row-normalised confusion matrix as a PNG (counts in each cell)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .files import atomic_output

    cm = torch.as_tensor(cm)
    rates = cm.double() / cm.sum(dim=1, keepdim=True).clamp(min=1)
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center",
                    color="white" if rates[i, j] > 0.5 else "black", fontsize=8)
    ax.set_title(title or f"WAR {war(cm):.3f}  UAR {uar(cm):.3f}")
    fig.colorbar(image, ax=ax, fraction=0.046).set_label("share of the true class's clips (row-normalised)")
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_training_curves(history: Sequence[dict], path: str | os.PathLike, title: str = "") -> None:
    """training.png: the training loss and the evaluation WAR / UAR per epoch (history: log.jsonl records)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from .files import atomic_output

    epochs = [r["epoch"] for r in history]
    fig, (loss_ax, metric_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    loss_ax.plot(epochs, [r["train_loss"] for r in history], marker="o", markersize=3)
    loss_ax.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key, name in (("war", "WAR"), ("uar", "UAR")):
        metric_ax.plot(epochs, [r[key] for r in history], marker="o", markersize=3, label=name)
    metric_ax.set(xlabel="epoch", ylabel="on the evaluation split", title="WAR / UAR", ylim=(0, 1))
    metric_ax.legend(fontsize=8)
    for ax in (loss_ax, metric_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
