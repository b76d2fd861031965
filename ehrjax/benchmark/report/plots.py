"""The report's figures (matplotlib, Agg backend), each written atomically under plots/.

Per task: data efficiency (test AUROC vs labelled-set size with CI bands, baselines dashed, both ceilings as
lines), ROC and precision-recall curves per arm at the largest size, training curves. For the study: MLM
pre-training curves and time per stage.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from ehrjax.atomic import atomic_write
from ehrjax.benchmark.report.load import TaskData

_CEILING_STYLE = {"outcome_p": ":", "outcome_p_visible": "-."}


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    finally:
        plt.close(fig)


def _ceiling_label(c: dict[str, Any]) -> str:
    return f"{c['name']} ({c['label']})"


def plot_data_efficiency(task: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for arm in task["arm_order"]:
        rows = [r for r in task["rows"] if r["arm"] == arm]
        x, y = [r["size"] for r in rows], [r["auroc"] for r in rows]
        lo, hi = [r["auroc_ci"][0] for r in rows], [r["auroc_ci"][1] for r in rows]
        neural = rows[0]["kind"] == "neural"
        (line,) = ax.plot(x, y, label=arm, marker="o" if neural else "s", linestyle="-" if neural else "--")
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12 if neural else 0.06)
    for c in task["ceilings"].values():
        if c["present"]:
            ax.axhline(c["auroc"], color="grey", linestyle=_CEILING_STYLE[c["column"]], label=_ceiling_label(c))
            ax.axhspan(*c["auroc_ci"], color="grey", alpha=0.06)
    sizes = task["sizes"]
    if len(sizes) > 1:
        ax.set_xscale("log")
    ax.set_xticks(sizes, [f"{s:,}" for s in sizes])
    ax.minorticks_off()
    ax.set(xlabel="labelled patients", ylabel="test AUROC (mean over replicates, 95% CI)",
           title=f"Data efficiency: {task['title']}")  # fmt: skip
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_roc_pr(data: TaskData, task: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    size = task["sizes"][-1]
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(11, 4.8))
    curves = [(f"{arm} (replicate {data.cells[(arm, size)].replicates[0]})", data.cells[(arm, size)].test[0], "-")
              for arm in task["arm_order"] if (arm, size) in data.cells]  # fmt: skip
    curves += [(_ceiling_label(c), data.ceilings[col], _CEILING_STYLE[col]) for col, c in task["ceilings"].items()
               if c["present"]]  # fmt: skip
    for label, scores, style in curves:
        fpr, tpr, _ = roc_curve(data.labels, scores)
        precision, recall, _ = precision_recall_curve(data.labels, scores)
        roc_ax.plot(fpr, tpr, label=label, linewidth=1.2, linestyle=style)
        pr_ax.plot(recall, precision, label=label, linewidth=1.2, linestyle=style)
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    pr_ax.axhline(data.labels.mean(), color="grey", linestyle=":", linewidth=0.8, label="prevalence")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, n = {size:,} labelled")
    pr_ax.set(xlabel="recall", ylabel="precision", title=f"Precision-recall, n = {size:,} labelled")
    roc_ax.legend(fontsize=7, loc="lower right")
    pr_ax.legend(fontsize=7, loc="upper right")
    _save(fig, path)


def plot_training_curves(data: TaskData, task: dict[str, Any], path: Path) -> bool:
    """Validation AUROC and loss per optimizer step, the first replicate of each neural arm at the smallest and
    largest sizes; False (nothing written) when no run has a curve."""
    import matplotlib.pyplot as plt

    sizes = sorted({task["sizes"][0], task["sizes"][-1]})
    picked = {(arm, s): data.cells[(arm, s)].runs[0] for arm in task["arm_order"] for s in sizes
              if (arm, s) in data.cells and data.cells[(arm, s)].runs[0].get("curve")}  # fmt: skip
    if not picked:
        return False
    fig, axes = plt.subplots(2, len(sizes), figsize=(5.5 * len(sizes), 7), squeeze=False)
    for col, size in enumerate(sizes):
        for arm in task["arm_order"]:
            run = picked.get((arm, size))
            if run is None:
                continue
            x = [p.get("step", p.get("epoch")) for p in run["curve"]]
            for r, key in enumerate(("val_auroc", "val_loss")):
                values = [np.nan if p.get(key) is None else p[key] for p in run["curve"]]
                axes[r, col].plot(x, values, marker=".", label=f"{arm} (replicate {run['replicate']})")
        axes[0, col].set(title=f"n = {size:,} labelled", ylabel="validation AUROC")
        axes[1, col].set(xlabel="optimizer step", ylabel="validation loss")
        axes[0, col].legend(fontsize=7)
    _save(fig, path)
    return True


def plot_mlm_curves(pretraining: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colours: dict[str, str] = {}
    for name, p in pretraining.items():
        curve = p.get("curve") or []
        val = [(c["step"], c["loss"]) for c in curve if c.get("split") == "val"]
        train = [(c["step"], c["loss"]) for c in curve if c.get("split") == "train"]
        label = f"{name} ({p.get('label', '')})"
        (line,) = ax.plot(*np.array(val).T, marker="o", label=f"{label}, val") if val else ax.plot([], [], label=label)
        colours[name] = line.get_color()
        if train:
            ax.plot(*np.array(train).T, color=colours[name], alpha=0.35, linewidth=0.8, label=f"{name}, train")
    for base, style in (("unigram", "--"), ("copy", ":"), ("bigram", "-.")):
        losses = {name: ((p.get("baselines") or {}).get(base) or {}).get("loss") for name, p in pretraining.items()}
        losses = {name: loss for name, loss in losses.items() if loss is not None}
        if len(set(losses.values())) == 1 and len(losses) == len(pretraining):  # one test split: draw it once
            ax.axhline(next(iter(losses.values())), color="grey", linestyle=style, label=f"{base} baseline")
            continue
        for name, loss in losses.items():
            ax.axhline(loss, color=colours[name], linestyle=style, linewidth=1, label=f"{name}: {base} baseline")
    ax.set(xlabel="step", ylabel="MLM loss (cross-entropy, nats)", title="MLM pre-training")
    ax.legend(fontsize=7)
    _save(fig, path)


def plot_stage_times(rows: list[tuple[str, float, float, float, float, bool]], path: Path) -> None:
    """rows: (name, wall, compile, train, other, skipped) from `markdown.stage_rows`; the bars add up to wall."""
    import matplotlib.pyplot as plt

    names = [r[0] for r in rows]
    compile_s, train_s, other = (np.array([r[i] for r in rows]) for i in (2, 3, 4))
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(names), 4.5))
    x = np.arange(len(names))
    ax.bar(x, compile_s, label="compile")
    ax.bar(x, train_s, bottom=compile_s, label="train")
    ax.bar(x, other, bottom=compile_s + train_s, label="other (data, eval, I/O)")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="seconds", title="Time per stage")
    ax.legend(fontsize=8)
    _save(fig, path)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "task"


def write_plots(summary: dict[str, Any], data: dict[str, TaskData], stats: dict[str, Any], out_dir: Path,
                stage_rows: list | None) -> dict[str, dict[str, str]]:  # fmt: skip
    """Every plot the summary has data for: {task name, or "" for the study: {key: path relative to out_dir}}."""
    import matplotlib

    matplotlib.use("Agg")
    written: dict[str, dict[str, str]] = {"": {}}
    for task in stats["tasks"]:
        rel = f"plots/{_slug(task['name'])}"
        (out_dir / rel).mkdir(parents=True, exist_ok=True)
        mine = written.setdefault(task["name"], {})
        plot_data_efficiency(task, out_dir / rel / "data_efficiency.png")
        mine["data_efficiency"] = f"{rel}/data_efficiency.png"
        plot_roc_pr(data[task["name"]], task, out_dir / rel / "roc_pr.png")
        mine["roc_pr"] = f"{rel}/roc_pr.png"
        if plot_training_curves(data[task["name"]], task, out_dir / rel / "training_curves.png"):
            mine["training_curves"] = f"{rel}/training_curves.png"
    if summary.get("pretraining"):
        plot_mlm_curves(summary["pretraining"], out_dir / "plots" / "mlm_curves.png")
        written[""]["mlm_curves"] = "plots/mlm_curves.png"
    if stage_rows:
        plot_stage_times(stage_rows, out_dir / "plots" / "stage_times.png")
        written[""]["stage_times"] = "plots/stage_times.png"
    return written
