"""Pictures of runs and of evaluations, drawn with matplotlib (the ``plot`` extra).

- ``plot_runs``: the curves of one or more run folders from their ``metrics.jsonl`` (the record
  of a run: TensorBoard, when enabled, only mirrors it), one panel per metric, runs overlaid;
- ``confusion_figure``: a classifier's confusion matrix with named axes and counts.

matplotlib is imported inside the functions and only with the non-interactive Agg backend, so
the package imports without it and a machine without a display draws the same PNG.
"""

from __future__ import annotations

import json
import math
from io import BytesIO
from pathlib import Path
from typing import Sequence

from cvformers.errors import UserError
from cvformers.utils import atomic_write_bytes, write_target

# written by the trainer (train/checkpoint.py); eval/ sits beside train/ and reads the file by name
METRICS_FILE = "metrics.jsonl"
# bookkeeping in every train line, not quantities to plot unless asked for by name
_NOT_CURVES = ("items_per_s", "elapsed", "grad_norm")
PANEL_INCHES = (4.0, 3.0)  # size of one panel
DPI = 100
MAX_COLUMNS = 3  # panels per row of the figure


def _pyplot():
    """matplotlib's pyplot on the Agg backend, or a one-line ``UserError`` saying what to install."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install 'cvformers[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.jsonl`` of a run folder -> {metric: [(step, value), ...]} in step order.

    Train lines give their keys as they are (``loss``, ``lr``, a model's own metrics), eval lines
    theirs prefixed ``eval_`` (``eval_loss``, ``eval_acc``), as ``Trainer.fit`` returns them. A
    line a crash cut short is skipped, as ``--resume`` does.
    """
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        raise UserError(f"{run}: no {METRICS_FILE} (not a run folder, or a run that has not logged yet)")
    curves: dict[str, dict[int, float]] = {}
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if not isinstance(record, dict) or not isinstance(record.get("step"), (int, float)):
            continue
        prefix = "eval_" if record.get("split") == "eval" else ""
        for key, value in record.items():
            if key in ("step", "split") or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            # a resumed run logs the steps after its checkpoint again: the last line of a step wins
            curves.setdefault(prefix + key, {})[int(record["step"])] = float(value)
    if not curves:
        raise UserError(f"{path}: no metrics logged")
    return {k: sorted(v.items()) for k, v in curves.items()}


def default_metrics(names: Sequence[str]) -> list[str]:
    """What ``cvformers plot`` draws unless told: loss, lr, then every eval metric."""
    first = [m for m in ("loss", "lr") if m in names]
    return first + sorted(m for m in names if m.startswith("eval_") and m.removeprefix("eval_") not in _NOT_CURVES)


def plot_runs(runs: Sequence[str | Path], out: str | Path, metrics: Sequence[str] | None = None) -> list[str]:
    """Draw the curves of ``runs`` into the PNG ``out``: one panel per metric, x = step, one line per
    run labelled with its folder name. ``metrics`` chooses the panels (default: ``default_metrics``).

    Returns the metrics drawn. A run without ``metrics.jsonl``, a metric no run logged, or runs that
    share none of the chosen metrics is a ``UserError``.
    """
    if not runs:
        raise UserError("give at least one run folder")
    check_plot_target(out)
    logs = {Path(r): read_metrics(r) for r in runs}
    logged = sorted({m for log in logs.values() for m in log})
    if metrics is None:
        chosen = default_metrics(logged)
        if not chosen:
            raise UserError(f"no loss, lr or eval metric logged; choose with --metrics from: {', '.join(logged)}")
    else:
        chosen = list(dict.fromkeys(m.strip() for m in metrics if m.strip()))
        missing = [m for m in chosen if m not in logged]
        if not chosen or missing:
            raise UserError(f"no run logged {', '.join(missing) or 'a metric named'}; logged: {', '.join(logged)}")
    if len(logs) > 1:
        common = [m for m in chosen if all(m in log for log in logs.values())]
        if not common:
            raise UserError(f"the runs share none of {', '.join(chosen)}: nothing to compare")

    plt = _pyplot()
    ncol = min(MAX_COLUMNS, len(chosen))
    nrow = math.ceil(len(chosen) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(PANEL_INCHES[0] * ncol, PANEL_INCHES[1] * nrow), dpi=DPI,
                             squeeze=False)
    try:
        for ax, metric in zip(axes.flat, chosen):
            for run, log in logs.items():
                if metric in log:
                    steps, values = zip(*log[metric])
                    # a single evaluation is a point, not an invisible line of length zero
                    ax.plot(steps, values, marker="o" if len(steps) == 1 else None, label=run.name or str(run))
            ax.set_title(metric)
            ax.set_xlabel("step")
            ax.grid(True, alpha=0.3)
            if metric == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        for ax in list(axes.flat)[len(chosen):]:
            ax.set_visible(False)
        if len(logs) > 1:
            axes.flat[0].legend(fontsize="small")
        fig.tight_layout()
        _save(fig, out)
    finally:
        plt.close(fig)
    return chosen


def confusion_figure(matrix: Sequence[Sequence[int]], names: Sequence[str], out: str | Path,
                     title: str = "") -> Path:
    """A confusion matrix as a PNG: rows the true class, columns the predicted one, each cell its count,
    shaded by the share of its row (so a rare class reads as clearly as a common one)."""
    n = len(names)
    if len(matrix) != n or any(len(row) != n for row in matrix):
        raise ValueError(f"confusion matrix must be {n}x{n} for {n} names")
    check_plot_target(out)
    plt = _pyplot()
    import numpy as np

    counts = np.asarray(matrix, dtype=np.int64)
    share = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    side = max(4.0, 0.55 * n + 2.0)
    fig, ax = plt.subplots(figsize=(side, side), dpi=DPI)
    try:
        ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(n), labels=names, rotation=45, ha="right")
        ax.set_yticks(range(n), labels=names)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if title:
            ax.set_title(title)
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize="small",
                            color="white" if share[i, j] > 0.5 else "black")
        fig.tight_layout()
        return _save(fig, out)
    finally:
        plt.close(fig)


def check_plot_target(out: str | Path) -> None:
    """Refuse a bad target, or a machine without matplotlib, before anything is read or drawn."""
    _pyplot()
    write_target(out)  # a folder or a device is refused as such, whatever its name
    if Path(out).suffix.lower() != ".png":
        raise UserError(f"cannot write {out}: plots are written as .png")


def _save(fig, out: str | Path) -> Path:
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(Path(out), buf.getvalue())
    return Path(out)
