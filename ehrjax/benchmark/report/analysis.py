"""The statistics of a benchmark: per task, arm and size, every metric with its bootstrap interval; paired
differences in Holm families; the best baseline chosen on validation; convergence; the seed study's checks.

Intervals come from `ehrjax.eval.stats`: each bootstrap replicate resamples the test patients and the
replicates (with replacement). A replicate is one whole run: its own draw of the labelled set, its own init
and data order, so an interval covers test patients, replicates and labelled-set draws together. A paired
difference applies one draw to both arms (runs pair on the replicate index). Its two-sided bootstrap p-value
is Holm-adjusted within its family, one family per task and question:

- `reference`: every other neural arm against roles.reference at every size;
- `q1_baseline`: roles.pretrained_lora against the best baseline of roles.baselines at every size (the best
  is chosen per size by mean validation AUROC, ties by validation log loss, never on the test split);
- `q2`: each pair of roles.table_pairs (learned minus third-party table) at every size.

A comparison is "better"/"worse" where its Holm-adjusted p is below ALPHA, else "not resolved". Roles name the
arms; a role whose arm did not run is skipped with a note. Everything returned is JSON-ready.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

import numpy as np

from ehrjax.benchmark.report.load import CEILING_COLUMNS, TaskData
from ehrjax.eval.stats import (
    METRICS,
    Replicates,
    bootstrap_p_value,
    difference_replicates,
    holm,
    interval,
    replicates,
    weighted_auroc,
)

ALPHA = 0.05
BOOTSTRAP_SEED = 0
UNRESOLVED = "not resolved"
CEILING_KIND = "oracle"
ABOUT = 1.5  # "about x%" holds within a factor of 1.5 either way
EXPECTED_PCT = (2.0, 7.0)  # the seed study: fine-tuning trains about 2% of the parameters, against about 7%


def verdict(mean: float, p_adjusted: float, alpha: float = ALPHA) -> str:
    """'better' / 'worse' (the sign of the paired mean) where the adjusted p is below alpha, else not resolved."""
    if math.isfinite(p_adjusted) and p_adjusted < alpha and mean != 0:
        return "better" if mean > 0 else "worse"
    return UNRESOLVED


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def _median(values) -> float | None:
    values = _finite(values)
    return float(statistics.median(values)) if values else None


def _mean(values) -> float | None:
    values = _finite(values)
    return float(np.mean(values)) if values else None


def _about(measured: float | None, expected: float) -> bool | None:
    return None if measured is None else expected / ABOUT <= measured <= expected * ABOUT


def _ceiling_roles(roles: dict[str, Any]) -> dict[str, dict[str, str]]:
    """{column: {"name", "label"}}: roles.ceilings maps a name to a label (the column is the visible-record one
    when "visible" is in the name or label) or to {"column", "label"}; absent: both columns, named by column."""
    given = roles.get("ceilings")
    if not given:
        return {c: {"name": c, "label": c} for c in CEILING_COLUMNS}
    out = {}
    for name, value in given.items():
        if isinstance(value, dict):
            column, label = value.get("column"), str(value.get("label", name))
        else:
            label = str(value)
            column = "outcome_p_visible" if "visible" in f"{name} {label}" else "outcome_p"
        if column in CEILING_COLUMNS and column not in out:
            out[column] = {"name": str(name), "label": label}
    return out


def resolve_roles(summary: dict[str, Any], ran: set[str]) -> dict[str, Any]:
    """The roles of summary["roles"] restricted to arms that ran, with one note per role that is skipped."""
    roles = summary.get("roles") or {}
    notes: list[str] = []

    def arm(role: str) -> str | None:
        name = roles.get(role)
        if name is None:
            notes.append(f"roles.{role} is not set")
        elif name not in ran:
            notes.append(f"roles.{role} names arm {name}, which did not run")
        return name if name in ran else None

    reference, pretrained_lora = arm("reference"), arm("pretrained_lora")
    baselines = [name for name in roles.get("baselines") or [] if name in ran]
    notes += [f"roles.baselines names arm {name}, which did not run" for name in roles.get("baselines") or []
              if name not in ran]  # fmt: skip
    pairs = []
    for a, b in roles.get("table_pairs") or []:
        missing = [x for x in (a, b) if x not in ran]
        if missing:
            notes.append(f"table pair {a} / {b} skipped: {', '.join(missing)} did not run")
        else:
            pairs.append([a, b])
    return {"reference": reference, "pretrained_lora": pretrained_lora, "baselines": baselines,
            "table_pairs": pairs, "trainable_contrast": roles.get("trainable_contrast") if
            roles.get("trainable_contrast") in ran else None, "ceilings": _ceiling_roles(roles),
            "notes": notes}  # fmt: skip


def _kind(arms_meta: dict[str, Any], arm: str) -> str:
    return (arms_meta.get(arm) or {}).get("kind", "neural")


def arm_order(summary: dict[str, Any], ran: set[str]) -> list[str]:
    """Arms that ran, in summary order (then any only in runs): neural first, then baselines; no ceilings."""
    arms_meta = summary.get("arms") or {}
    names = [a for a in arms_meta if a in ran] + sorted(ran - set(arms_meta))
    names = [a for a in names if _kind(arms_meta, a) != CEILING_KIND]
    return sorted(names, key=lambda a: _kind(arms_meta, a) != "neural")


def _val_metrics(labels: np.ndarray, scores: np.ndarray) -> tuple[float | None, float | None]:
    """Mean over replicates of the validation AUROC and log loss (nats)."""
    aurocs = [weighted_auroc(labels, row)[0] for row in scores] if len(np.unique(labels)) == 2 else []
    p = np.clip(scores, 1e-7, 1 - 1e-7)
    losses = -(labels * np.log(p) + (1 - labels) * np.log1p(-p)).mean(axis=1)
    return _mean(aurocs), _mean(losses)


def _convergence(runs: list[dict[str, Any]]) -> dict[str, Any]:
    reached = [r.get("steps_to_95") for r in runs if r.get("steps_to_95") is not None]
    return {
        "best_epoch_median": _median(r.get("best_epoch") for r in runs),
        "epochs_run_median": _median(r.get("epochs_run") for r in runs),
        "steps_median": _median(r.get("steps") for r in runs),
        "steps_to_95_median": _median(reached),
        "seconds_to_95_median": _median(r.get("seconds_to_95") for r in runs),
        "steps_to_95_reached": len(reached),
        "wall_s_mean": _mean(r.get("wall_s") for r in runs),
        "train_s_mean": _mean(r.get("train_s") for r in runs),
        "compile_s_mean": _mean(r.get("compile_s") for r in runs),
        "real_tokens_per_s_mean": _mean(r.get("real_tokens_per_s") for r in runs),
    }


class _Task:
    """The bootstrap replicates of one task, computed once, and the paired comparisons drawn from them."""

    def __init__(self, data: TaskData, order: list[str], n_boot: int):
        self.data, self.order, self.n_boot = data, order, n_boot
        self.sizes = sorted({size for arm, size in data.cells if arm in order})
        self.reps: dict[tuple[str, int], dict[str, Replicates]] = {
            key: {m: replicates(data.labels, cell.test, m, n_boot, BOOTSTRAP_SEED) for m in METRICS}
            for key, cell in data.cells.items() if key[0] in order
        }  # fmt: skip

    def compare(self, a: str, b: str, size: int) -> dict[str, Any] | None:
        """Paired test AUROC difference a - b on the replicates both ran (a one-run arm is broadcast)."""
        if (a, size) not in self.reps or (b, size) not in self.reps:
            return None
        cells = self.data.cells
        pair = paired_comparison(self.reps[(a, size)]["auroc"], self.reps[(b, size)]["auroc"],
                                 cells[(a, size)].replicates, cells[(b, size)].replicates)  # fmt: skip
        return None if pair is None else {"a": a, "b": b, "size": size, **pair}


def paired_comparison(ra: Replicates, rb: Replicates, sa: list[int], sb: list[int]) -> dict[str, Any] | None:
    """{'mean', 'ci', 'half_width', 'p', 'replicates'}: the paired difference A - B of two arms' bootstrap
    replicates `ra`, `rb` (same patients, n_boot and seed), whose runs are the replicate indices `sa`, `sb`.
    Runs pair on the index, over the replicates both ran; an arm with one run is broadcast. None if none pair."""
    paired = sa if len(sb) == 1 else sb
    if len(sa) > 1 and len(sb) > 1:
        paired = sorted(set(sa) & set(sb))
        if not paired:
            return None
        ia, ib = [sa.index(s) for s in paired], [sb.index(s) for s in paired]
        ra = Replicates(ra.metric, ra.point[ia], ra.values[:, ia], ra.seed)
        rb = Replicates(rb.metric, rb.point[ib], rb.values[:, ib], rb.seed)
    mean, values = difference_replicates(ra, rb)
    finite = values[np.isfinite(values)]
    lo, hi = (float(x) for x in np.percentile(finite, [2.5, 97.5])) if len(finite) else (math.nan, math.nan)
    return {"mean": mean, "ci": [lo, hi], "half_width": (hi - lo) / 2, "p": bootstrap_p_value(values),
            "replicates": paired}  # fmt: skip


def holm_family(name: str, comparisons: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The comparisons that could be made, Holm-adjusted together, each with its verdict."""
    kept = [c for c in comparisons if c is not None]
    for c, q in zip(kept, holm([c["p"] for c in kept]), strict=True):
        c.update(family=name, m=len(kept), p_holm=float(q), verdict=verdict(c["mean"], float(q)))
    return kept


def _row(task: _Task, arm: str, size: int, kind: str) -> dict[str, Any]:
    cell = task.data.cells[(arm, size)]
    row: dict[str, Any] = {"arm": arm, "size": size, "kind": kind, "replicates": cell.replicates,
                           "n_replicates": len(cell.replicates), "hparam": cell.runs[0].get("hparam")}  # fmt: skip
    for metric, reps in task.reps[(arm, size)].items():
        mean, lo, hi = interval(reps)
        row[metric], row[f"{metric}_ci"] = mean, [lo, hi]
    row["auroc_per_replicate"] = task.reps[(arm, size)]["auroc"].point.tolist()
    row["val_auroc"], row["val_log_loss"] = _val_metrics(task.data.val_labels, cell.val)
    return {**row, **_convergence(cell.runs)}


def _best_baselines(rows: list[dict[str, Any]], baselines: list[str], sizes: list[int]) -> list[dict[str, Any]]:
    """Per size, the baseline with the highest mean validation AUROC (ties: lower validation log loss)."""
    out = []
    for size in sizes:
        cands = [r for r in rows if r["size"] == size and r["arm"] in baselines]
        cands = [r for r in cands if r["val_auroc"] is not None or r["val_log_loss"] is not None]
        if cands:
            best = min(cands, key=lambda r: (-(r["val_auroc"] or -math.inf), r["val_log_loss"] or math.inf))
            out.append({"size": size, "arm": best["arm"], "val_auroc": best["val_auroc"],
                        "val_log_loss": best["val_log_loss"]})  # fmt: skip
    return out


def _ceilings(data: TaskData, roles: dict[str, Any], n_boot: int) -> dict[str, dict[str, Any]]:
    out = {}
    for column, role in roles["ceilings"].items():
        values = data.ceilings.get(column)
        entry: dict[str, Any] = {**role, "column": column, "present": values is not None}
        for metric in METRICS if values is not None else ():
            mean, lo, hi = interval(replicates(data.labels, values, metric, n_boot, BOOTSTRAP_SEED))
            entry[metric], entry[f"{metric}_ci"] = mean, [lo, hi]
        out[column] = entry
    return out


def _expectations(task: _Task, rows, reference_family, roles, arms) -> dict[str, Any]:
    """The seed study's three expectations, as numbers; markdown words each as one sentence of verdict."""
    a, ref = roles["pretrained_lora"], roles["reference"]
    by_key = {(r["arm"], r["size"]): r for r in rows}
    faster = []
    for size in task.sizes:
        if (a, size) in by_key and (ref, size) in by_key:
            steps = {arm: {int(r["replicate"]): r.get("steps_to_95") for r in task.data.cells[(arm, size)].runs}
                     for arm in (a, ref)}  # fmt: skip
            both = [k for k in steps[a] if steps[a][k] is not None and steps[ref].get(k) is not None]
            faster.append({"size": size, "median": by_key[(a, size)]["steps_to_95_median"],
                           "reference_median": by_key[(ref, size)]["steps_to_95_median"],
                           "seconds": by_key[(a, size)]["seconds_to_95_median"],
                           "reference_seconds": by_key[(ref, size)]["seconds_to_95_median"],
                           "faster_replicates": sum(steps[a][k] < steps[ref][k] for k in both),
                           "paired_replicates": len(both)})  # fmt: skip
    largest = next((c for c in sorted(reference_family, key=lambda c: -c["size"]) if c["a"] == a), None)
    shares = {name: arms.get(name, {}).get("trainable_pct") for name in (a, ref, roles["trainable_contrast"])}
    return {"faster": faster, "largest": largest, "shares": shares,
            "share_about": [_about(shares.get(a), EXPECTED_PCT[0]),
                            _about(shares.get(roles["trainable_contrast"]), EXPECTED_PCT[1])]}  # fmt: skip


def _task_stats(summary, meta, data: TaskData, order, roles, arms, n_boot) -> dict[str, Any]:
    present = [a for a in order if any(arm == a for arm, _ in data.cells)]
    task = _Task(data, present, n_boot)
    arms_meta = summary.get("arms") or {}
    rows = [_row(task, arm, size, _kind(arms_meta, arm)) for arm in present for size in task.sizes
            if (arm, size) in data.cells]  # fmt: skip
    ref, plora = roles["reference"], roles["pretrained_lora"]
    neural = [a for a in present if _kind(arms_meta, a) == "neural"]
    reference = holm_family("reference", [task.compare(arm, ref, s) for arm in neural if ref and arm != ref
                                      for s in task.sizes])  # fmt: skip
    best = _best_baselines(rows, roles["baselines"], task.sizes)
    q1 = holm_family("q1_baseline", [task.compare(plora, b["arm"], b["size"]) for b in best if plora])
    q2 = holm_family("q2", [task.compare(x, y, s) for x, y in roles["table_pairs"] for s in task.sizes])
    family = {(c["a"], c["size"]): c for c in reference}
    best_at = {b["size"]: b["arm"] for b in best}
    for row in rows:
        arm, size = row["arm"], row["size"]
        row["vs_reference"] = family.get((arm, size)) or (task.compare(arm, ref, size) if ref and arm != ref else None)
        other = best_at.get(size)
        row["vs_best_baseline"] = task.compare(arm, other, size) if other and row["kind"] == "neural" else None
    ceilings = _ceilings(data, roles, n_boot)
    true = ceilings.get("outcome_p") or {}
    above = [[r["arm"], r["size"]] for r in rows if true.get("present") and r["auroc"] > true["auroc_ci"][1]]
    sizing = meta.get("sizing") or {}
    measured = [{"size": c["size"], "half_width": c["half_width"]} for c in reference if c["a"] == plora]
    positives = int(data.labels.sum())
    tuning = [dict(t) for t in summary.get("tuning") or [] if t.get("task") == data.name]
    for t in tuning:
        losses = np.array([math.nan if v is None else float(v) for v in t.get("val_loss") or []])
        lowest = t["candidates"][int(np.nanargmin(losses))] if np.isfinite(losses).any() else None
        t["lowest"], t["chosen_is_lowest"] = lowest, lowest is not None and lowest == t.get("chosen")
    tuning.sort(key=lambda t: (present.index(t["arm"]) if t["arm"] in present else len(present), t["size"]))
    return {
        "name": data.name, "title": meta.get("title") or data.name, "description": meta.get("description", ""),
        "splits": meta.get("splits"), "prevalence": meta.get("prevalence"),
        "n_val": len(data.val_labels), "n_test": len(data.labels), "n_test_positive": positives,
        "test_prevalence": positives / len(data.labels), "runs_checked": data.runs_checked,
        "sizing": {**sizing, "measured": measured},
        "sizes": task.sizes, "arm_order": present, "ceilings": ceilings, "above_true_risk": above, "rows": rows,
        "best_baseline": best, "families": {"reference": reference, "q1_baseline": q1, "q2": q2},
        "tuning": tuning, "expectations": _expectations(task, rows, reference, roles, arms),
    }  # fmt: skip


def _arms(summary: dict[str, Any], order: list[str]) -> dict[str, dict[str, Any]]:
    out = {}
    for arm in order:
        meta = (summary.get("arms") or {}).get(arm) or {}
        total, trainable = meta.get("params_total"), meta.get("params_trainable")
        share = 100.0 * trainable / total if total and trainable is not None else meta.get("trainable_pct")
        out[arm] = {"kind": meta.get("kind", "neural"), "description": meta.get("description", ""),
                    "code_table": meta.get("code_table"), "encoder": meta.get("encoder"), "lora": meta.get("lora"),
                    "embed_dim": meta.get("embed_dim"), "params_total": total, "params_trainable": trainable,
                    "trainable_pct": share, "params_split": meta.get("params_split"),
                    "tuning": meta.get("tuning")}  # fmt: skip
    return out


def compute(summary: dict[str, Any], data: dict[str, TaskData], n_boot: int) -> dict[str, Any]:
    """The statistics of every task (see the module docstring); `data` from `load.load`."""
    ran = {arm for task in data.values() for arm, _ in task.cells}
    roles = resolve_roles(summary, ran)
    order = arm_order(summary, ran)
    arms = _arms(summary, order)
    metas = {t["name"]: t for t in summary["tasks"]}
    ceiling_arms = sorted(a for a in ran if _kind(summary.get("arms") or {}, a) == CEILING_KIND)
    return {
        "n_boot": n_boot, "bootstrap_seed": BOOTSTRAP_SEED, "alpha": ALPHA,
        "sizes": sorted({s for t in data.values() for _, s in t.cells}),
        "replicates": summary.get("replicates"), "roles": roles, "arm_order": order, "arms": arms,
        "ceiling_arms": ceiling_arms, "runs_checked": sum(t.runs_checked for t in data.values()),
        "tasks": [_task_stats(summary, metas[name], t, order, roles, arms, n_boot) for name, t in data.items()],
    }  # fmt: skip
