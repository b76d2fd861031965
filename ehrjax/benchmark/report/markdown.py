"""report.md as a whole, and the terminal table: the study header, how to read it, one part per task (from
`sections`), then the arms and their trainable parameters, pre-training, the probe, Med2Vec and stage timing."""

from __future__ import annotations

import math
from typing import Any

from ehrjax.benchmark.report import sections
from ehrjax.benchmark.report.analysis import ALPHA, EXPECTED_PCT
from ehrjax.benchmark.report.text import NA, ci, count, delta, f, md_table, pct, row, seconds, sizes_text

_PLOT_TITLES = {"data_efficiency": "Data efficiency", "roc_pr": "ROC and precision-recall at the largest size",
                "training_curves": "Training curves"}  # fmt: skip


def _how_to_read(stats: dict[str, Any]) -> list[str]:
    roles = stats["roles"]
    ref, a = roles["reference"] or "roles.reference", roles["pretrained_lora"] or "roles.pretrained_lora"
    lines = [
        "## How to read this report",
        "",
        "- **Intervals.** Every metric is the mean over replicates with a 95% percentile bootstrap interval. A "
        "replicate is one whole run with its own draw of the labelled set, its own initialisation and data order; "
        "each bootstrap replicate resamples the test patients *and* the replicates, so an interval covers "
        "test-patient noise, run-to-run noise and the labelled-set draw together.",
        "- **Paired differences.** Every arm scores the same test patients and runs pair on the replicate index "
        "(same labelled set), so a difference applies one draw of patients and replicates to both arms and the "
        "shared noise cancels.",
        f"- **Verdicts.** A comparison is called better or worse where its Holm-adjusted bootstrap p-value is "
        f"below {ALPHA:g}, else *not resolved* (the data cannot tell the arms apart; that is not evidence that "
        "they are equal). Holm families, one set per task: every other neural arm against "
        f"{ref} at every size; {a} against the best baseline at every size (Q1's second half, its own family); "
        "the learned-vs-third-party table pairs at every size (Q2). The 95% CI shown beside is unadjusted.",
        "- **Ceilings.** The true risk (`outcome_p`) includes a hidden frailty that no record shows: no model is "
        "expected to reach it. The risk given the visible record (`outcome_p_visible`) is the realistic ceiling. "
        "Both are scored like a model on the same test patients; on real (MEDS) data neither exists.",
        "- **Baselines.** The best non-neural baseline is chosen per size by mean validation AUROC (ties by "
        "validation log loss), never on the test split.",
        "- AP is the step-wise average precision, PR-AUC the trapezoidal area under the precision-recall curve, "
        "Brier the mean squared error of the predicted probability (lower is better).",
    ]
    largest = max([len(fam) for task in stats["tasks"] for fam in task["families"].values()] + [0])
    if largest:
        floor = 1 / (stats["n_boot"] + 1)
        can = largest * floor < ALPHA
        lines.append(f"- **Resolution.** With {stats['n_boot']} bootstrap replicates the smallest p-value is "
                     f"{floor:.4f}, so a Holm family of m comparisons can call a difference only where m x {floor:.4f} "
                     f"< {ALPHA:g}; the largest family here has m = {largest}: "
                     + ("every family can call one." if can else "**it cannot call anything: rerun the report "
                        f"with n_boot of at least {math.ceil(largest / ALPHA)}**."))  # fmt: skip
    if roles["notes"]:
        lines.append("- Roles skipped: " + "; ".join(roles["notes"]) + ".")
    if stats["ceiling_arms"]:
        lines.append(f"- Arms of kind oracle ({', '.join(stats['ceiling_arms'])}) are reported as the ceilings.")
    return [*lines, ""]


def _task_part(task: dict[str, Any], stats: dict[str, Any], plots: dict[str, str]) -> list[str]:
    roles = stats["roles"]
    lines = [f"## Task: {task['title']} (`{task['name']}`)", ""]
    if task["description"]:
        lines += [task["description"], ""]
    lines += sections.sizing_section(task, roles)
    lines += sections.ceilings_section(task)
    lines += sections.q1_section(task, roles)
    lines += sections.q2_section(task, roles, stats["arms"])
    lines += sections.expectations_section(task, roles)
    lines += sections.verdict_table(task, roles)
    lines += sections.results_tables(task, roles)
    lines += sections.tuning_table(task)
    lines += sections.convergence_table(task)
    for key, title in _PLOT_TITLES.items():
        if key in plots:
            lines += [f"### {title}", "", f"![{title}: {task['name']}]({plots[key]})", ""]
    return lines


def _arms_table(stats: dict[str, Any]) -> list[str]:
    rows = []
    roles = stats["roles"]
    expect = {roles["pretrained_lora"]: f"about {EXPECTED_PCT[0]:g}%", roles["trainable_contrast"]: "about "
              f"{EXPECTED_PCT[1]:g}%"}  # fmt: skip
    for name in stats["arm_order"]:
        a = stats["arms"][name]
        split = a["params_split"] or {}
        rows.append([name, a["kind"], a["description"] or NA, str(a["code_table"] or NA), count(a["embed_dim"]),
                     count(a["params_total"]), count(a["params_trainable"]), pct(a["trainable_pct"]),
                     count(split.get("adapters")), count(split.get("head")), count(split.get("rest")),
                     expect.get(name, "")])  # fmt: skip
    return ["## Arms and trainable parameters", "",
            f"Trainable parameters split into adapters, head and the rest. The seed study expected about "
            f"{EXPECTED_PCT[0]:g}% (fine-tuning) vs about {EXPECTED_PCT[1]:g}%; its verdict per task is under "
            "*The seed study's expectations*.", "",
            md_table(["arm", "kind", "description", "code table", "embed_dim", "params", "trainable", "trainable %",
                      "adapters", "head", "rest", "seed study"], rows), ""]  # fmt: skip


def _pretraining(summary: dict[str, Any], plots: dict[str, str]) -> list[str]:
    keys = ("loss", "top1", "top10", "macro_auroc", "macro_ap", "macro_pr_auc")
    rows = []
    for name, p in summary["pretraining"].items():
        test = p.get("test") or {}
        rows.append([f"{name} ({p.get('label', '')})", *(f(test.get(k), 4) for k in keys), count(p.get("steps")),
                     seconds(p.get("wall_s"))])  # fmt: skip
        for base, b in (p.get("baselines") or {}).items():
            lam = f", λ = {f(b['lambda'], 2)}" if b.get("lambda") is not None else ""
            lam += f", k = {f(b['k'], 2)}" if b.get("k") is not None else ""
            rows.append([f"&nbsp;&nbsp;{base} baseline{lam}", *(f(b.get(k), 4) for k in keys), "0", "0.0"])
    clm = ""
    if "clm" in summary["pretraining"]:
        clm = (" The clm run predicts each next code (causal attention) on its own targets, against the unigram "
               "and the bigram baseline (the code given the token before it, add-k smoothed with the unigram).")
    lines = ["## MLM pre-training" if not clm else "## MLM and CLM pre-training", "",
             "Masked-code prediction on the pre-training cohort's test split, against the unigram baseline (every "
             "masked code predicted by its frequency) and the copy baseline (the codes already in the record mixed "
             f"in with weight λ); baselines take no steps.{clm}", "",
             md_table(["pre-training (test split)", "loss", "top-1", "top-10", "macro AUROC", "macro AP",
                       "macro PR-AUC", "steps", "wall s"], rows), ""]  # fmt: skip
    if "mlm_curves" in plots:
        lines += [f"![MLM curves]({plots['mlm_curves']})", ""]
    return lines


def _probe(probe: dict[str, Any]) -> list[str]:
    arms = [[name, ci(v.get("auroc"), v.get("ci"))] for name, v in (probe.get("arms") or {}).items()]
    diffs = [[name, ci(v.get("mean"), v.get("ci"), signed=True),
              "excludes 0" if v.get("ci") and (v["ci"][0] > 0 or v["ci"][1] < 0) else "covers 0"]
             for name, v in (probe.get("differences") or {}).items()]  # fmt: skip
    lines = ["## Linear probe", "",
             f"A logistic regression on frozen encoder features, trained on {count(probe.get('n_train'))} patients "
             f"and tested on {count(probe.get('n_test'))}.", "", md_table(["probe features", "test AUROC [95% CI]"],
                                                                          arms), ""]  # fmt: skip
    if diffs:
        lines += ["Paired differences on the same test patients:", "",
                  md_table(["difference", "AUROC Δ [95% CI]", "interval"], diffs), ""]  # fmt: skip
    return lines


def _med2vec(med2vec: dict[str, Any]) -> list[str]:
    coverage = med2vec.get("coverage") or {}
    wall = med2vec.get("wall_s")
    lines = ["## Med2Vec", "",
             f"Source: {med2vec.get('source', NA)} (`{med2vec.get('path', '')}`), dim {med2vec.get('dim', NA)}, "
             + (f"{seconds(wall)} s wall time." if wall is not None else "wall time not recorded in the summary."),
             ""]  # fmt: skip
    if coverage.get("vocab_share") is not None:
        token = coverage.get("token_share")
        lines += [f"The table covers {pct(100 * coverage['vocab_share'])} of the vocabulary"
                  + (f" and {pct(100 * token)} of code occurrences." if token is not None else "."), ""]
    if coverage.get("text"):
        lines += ["```", coverage["text"].rstrip(), "```", ""]
    return lines


def stage_rows(stages: dict[str, Any]) -> list[tuple[str, float, float, float, float, bool]]:
    """(name, wall, compile, train, other, skipped) with other = wall - compile - train >= 0, as the engine
    guarantees; a ValueError naming the stage if compile + train exceed wall by more than rounding."""
    out = []
    for name, s in stages.items():
        wall, comp, train = (float(s.get(k) or 0.0) for k in ("wall_s", "compile_s", "train_s"))
        other = wall - comp - train
        if other < -0.01:
            raise ValueError(f"summary: stage {name}: compile_s + train_s = {comp + train:.3f} exceeds wall_s = "
                             f"{wall:.3f}; the stages must record train_s + compile_s <= wall_s")  # fmt: skip
        out.append((name, wall, comp, train, max(other, 0.0), bool(s.get("skipped"))))
    return out


def _stages(summary: dict[str, Any], plots: dict[str, str]) -> list[str]:
    rows = [[n, seconds(w), seconds(c), seconds(t), seconds(o), "yes" if skip else "no"]
            for n, w, c, t, o, skip in stage_rows(summary["stages"])]  # fmt: skip
    lines = ["## Stage timing", "", "Wall time per stage = compile + train + other (data, evaluation, I/O).", "",
             md_table(["stage", "wall s", "compile s", "train s", "other s", "skipped"], rows), ""]
    compiles = summary.get("compiles") or {}
    if compiles.get("finetune") is not None:
        log = compiles.get("finetune_log") or []
        total = sum(float(x[1]) for x in log if len(x) > 1 and x[1] is not None)
        lines += [f"The fine-tuning grid compiled {compiles['finetune']} programs"
                  + (f" ({seconds(total)} s in all)." if log else "."), ""]  # fmt: skip
    if "stage_times" in plots:
        lines += [f"![Stage timing]({plots['stage_times']})", ""]
    return lines


def document(summary: dict[str, Any], stats: dict[str, Any], plots: dict[str, dict[str, str]]) -> str:
    """report.md; plots: {task name or "": {plot key: path relative to the output folder}}."""
    wall = summary.get("wall_s")
    tasks = ", ".join(t["name"] for t in stats["tasks"])
    reps = summary.get("replicates") or []
    lines = [f"# ehrjax benchmark: {summary.get('name', NA)}", "",
             f"Started {summary.get('started', NA)} on {summary.get('device', NA)}; wall time {seconds(wall)} s"
             + (f" ({wall / 60:.1f} min)" if wall else "") + f". Tasks: {tasks}; labelled-set sizes "
             f"{sizes_text(stats['sizes'])}; {len(reps)} replicates per cell ({', '.join(map(str, reps))}); "
             f"{stats['runs_checked']} runs; {stats['n_boot']} bootstrap replicates.", "",
             "## What was cut", "", *([f"- {c}" for c in summary.get("cuts") or []] or ["- Nothing was cut."]), "",
             *_how_to_read(stats)]  # fmt: skip
    for task in stats["tasks"]:
        lines += _task_part(task, stats, plots.get(task["name"], {}))
    lines += _arms_table(stats)
    glob = plots.get("", {})
    if summary.get("pretraining"):
        lines += _pretraining(summary, glob)
    if summary.get("probe"):
        lines += _probe(summary["probe"])
    if summary.get("med2vec"):
        lines += _med2vec(summary["med2vec"])
    if summary.get("stages"):
        lines += _stages(summary, glob)
    return "\n".join(lines)


def format_results_table(stats: dict[str, Any]) -> str:
    """Plain text per task for the terminal: per size and arm, AUROC [95% CI], Δ vs the reference, verdict."""
    ref = stats["roles"]["reference"] or "reference"
    width = max([len(a) for a in stats["arm_order"]] + [4])
    lines = []
    for task in stats["tasks"]:
        ceilings = "; ".join(f"{c['name']} ({c['label']}) {ci(c['auroc'], c['auroc_ci'])}"
                             for c in task["ceilings"].values() if c["present"]) or "absent (real data)"  # fmt: skip
        lines += [f"task {task['name']}: {task['n_test']:,} test patients; ceilings AUROC: {ceilings}",
                  f"{'size':>7}  {'arm':<{width}}  {'AUROC [95% CI]':<22}  {f'Δ vs {ref} [95% CI]':<25}  "
                  f"{'Holm p':>7}  verdict"]  # fmt: skip
        for size in task["sizes"]:
            for arm in task["arm_order"]:
                r = row(task, arm, size)
                if r is None:
                    continue
                c = r["vs_reference"]
                v = "reference" if arm == stats["roles"]["reference"] else (c.get("verdict", "baseline") if c else "")
                p = f(c["p_holm"]) if c and "p_holm" in c else ""
                lines.append(f"{size:>7}  {arm:<{width}}  {ci(r['auroc'], r['auroc_ci']):<22}  "
                             f"{delta(c) if c else '':<25}  {p:>7}  {v}")  # fmt: skip
        lines.append("")
    return "\n".join(lines).rstrip()
