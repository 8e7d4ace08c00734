"""PNG plots for `selfspec route --eval`: the confusion matrix and the threshold sweep."""

from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib
    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt
    return plt


def confusion_png(metrics: dict, path: Path) -> Path:
    import numpy as np
    plt = _plt()
    labels, cm = metrics["labels"], np.array(metrics["confusion"])
    rows = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)  # colour = share of the true class
    fig, ax = plt.subplots(figsize=(1.3 * len(labels) + 2, 1.1 * len(labels) + 1.5), dpi=120)
    ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("routed to")
    ax.set_ylabel("true domain")
    for i in range(len(labels)):
        for j in range(len(labels)):
            if cm[i, j]:
                ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                        color="white" if rows[i, j] > 0.5 else "black", fontsize=10)
    ax.set_title(f"routing confusion (n={cm.sum()}; 'none' = base model)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def sweep_png(rows: list[dict], path: Path) -> Path:
    plt = _plt()
    x = [r["offset"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    for key, label in [("routed_accuracy", "in-domain routed to the right expert"),
                       ("none_recall", "no-expert queries sent to base"),
                       ("overall_accuracy", "overall accuracy")]:
        ax.plot(x, [100 * (r[key] or 0) for r in rows], marker=".", label=label)
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.text(0.002, 2, "calibrated", color="grey", fontsize=8)
    for y, colour in ((95, "tab:blue"), (90, "tab:orange")):  # the targets
        ax.axhline(y, color=colour, linestyle=":", linewidth=0.8)
        ax.text(x[-1], y + 0.8, f"target {y}%", color=colour, fontsize=7, ha="right")
    ax.set_xlabel("offset added to every per-expert threshold")
    ax.set_ylabel("%")
    ax.set_ylim(0, 102)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    ax.set_title("threshold sweep", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
