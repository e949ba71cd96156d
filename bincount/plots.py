"""PNG plots of the data report, training curves, tuning trials and confusion matrices (matplotlib, no display)."""

from __future__ import annotations

import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from bincount.contracts.tuning import TrialResult
from bincount.data_report import DataReport


def _png(figure: plt.Figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def data_report_png(report: DataReport) -> bytes:
    """Class balance per split beside the most common image sizes (a sentence when there is one size)."""
    figure, (balance, sizes) = plt.subplots(1, 2, figsize=(11, 4))
    table = pd.DataFrame(report.class_counts).fillna(0).sort_index()
    table.plot.bar(ax=balance, rot=0)
    balance.set(title="Images per count and split", xlabel="items in bin", ylabel="images")
    balance.set_ylim(top=table.to_numpy().max() * 1.25)  # headroom, so the legend hides no bar
    balance.legend(title="split", loc="upper center", ncol=len(table.columns), frameon=False)
    top = list(report.image_sizes.items())[:8]
    if len(top) == 1:
        ((name, count),) = top
        sizes.axis("off")
        sizes.text(0.5, 0.5, f"Every image is {name}\n({count} images)", ha="center", va="center", fontsize=14)
    else:
        sizes.barh([name for name, _ in top][::-1], [n for _, n in top][::-1], color="tab:gray")
        sizes.set(title="Most common image sizes", xlabel="images")
    return _png(figure)


def training_curves(history: list[dict[str, float]], title: str) -> bytes:
    """Loss and accuracy per epoch, training and evaluation, from a job's metric history.

    The loss axis turns logarithmic when the losses span more than 10x (an untrained first epoch's
    evaluation loss of 35 would otherwise flatten every later epoch)."""
    figure, (loss_axes, acc_axes) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [row["epoch"] for row in history]
    for axes, metric in ((loss_axes, "loss"), (acc_axes, "accuracy")):
        for split in ("train", "eval"):
            axes.plot(epochs, [row.get(f"{split}:{metric}", float("nan")) for row in history], marker="o", label=split)
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.legend()
        axes.grid(alpha=0.3)
    losses = [v for row in history for k, v in row.items() if k.endswith(":loss") and math.isfinite(v) and v > 0]
    if losses and max(losses) > 10 * min(losses):
        loss_axes.set_yscale("log")
        loss_axes.set_ylabel("loss (log scale)")
    figure.suptitle(title)
    return _png(figure)


def tuning_trials(results: list[TrialResult], objective_metric: str) -> bytes:
    """Each trial's objective against its number and its learning rate, coloured by status."""
    figure, (by_number, by_lr) = plt.subplots(1, 2, figsize=(10, 4))
    colours = {"Completed": "tab:blue", "Stopped": "tab:orange", "Failed": "tab:red"}
    for status, colour in colours.items():
        chosen = [r for r in results if r.status == status]
        values = [r.objective if r.objective is not None else 0.0 for r in chosen]
        by_number.scatter([r.number for r in chosen], values, c=colour, label=status)
        by_lr.scatter([r.hyperparameters.get("lr", 0.0) for r in chosen], values, c=colour, label=status)
    by_number.set_xlabel("trial")
    by_number.xaxis.set_major_locator(MaxNLocator(integer=True))
    by_lr.set_xlabel("learning rate")
    by_lr.set_xscale("log")
    for axes in (by_number, by_lr):
        axes.set_ylabel(objective_metric)
        axes.grid(alpha=0.3)
    by_number.legend()
    figure.suptitle("tuning trials (failed trials drawn at 0)")
    return _png(figure)


def confusion_matrix_plot(confusion: list[list[int]], classes: list[int], title: str) -> bytes:
    figure, axes = plt.subplots(figsize=(5, 4.5))
    image = axes.imshow(confusion, cmap="Blues")
    axes.set_xticks(range(len(classes)), [str(c) for c in classes])
    axes.set_yticks(range(len(classes)), [str(c) for c in classes])
    axes.set_xlabel("predicted count")
    axes.set_ylabel("true count")
    peak = max((max(row) for row in confusion), default=0)
    for i, row in enumerate(confusion):
        for j, value in enumerate(row):
            axes.text(j, i, str(value), ha="center", va="center", color="white" if value > peak / 2 else "black")
    figure.colorbar(image, ax=axes)
    axes.set_title(title)
    return _png(figure)


def monitor_plot(predicted: dict[str, float], baseline: dict[str, float], features: list[dict], title: str) -> bytes:
    """Predicted-count shares against the training baseline, and each input statistic's live vs baseline mean."""
    figure, (counts, stats) = plt.subplots(1, 2, figsize=(11, 4))
    table = pd.DataFrame({"model on its training side": baseline, "live predictions": predicted}).fillna(0).sort_index()
    table.plot.bar(ax=counts, rot=0)
    counts.set(title="Count distribution", xlabel="items in bin", ylabel="share")
    if features:
        names = [row["feature"] for row in features]
        ratio = [row["live mean"] / row["baseline mean"] if row["baseline mean"] else 0.0 for row in features]
        stats.barh(names, ratio, color=["tab:red" if row["drift"] else "tab:gray" for row in features])
        stats.axvline(1.0, color="black", linewidth=1)
        stats.set(title="Input statistics: live mean / baseline mean (red: KS drift)", xlabel="ratio")
    else:
        stats.text(0.5, 0.5, "no input statistics in this window", ha="center", va="center")
        stats.set_axis_off()
    figure.suptitle(title)
    return _png(figure)
