"""The per-task sections of report.md: sizing, ceilings, the two questions, the seed study's expectations,
verdicts, results per size, tuning and convergence; every result sentence is built from the statistics."""

from __future__ import annotations

from typing import Any

from ehrjax.benchmark.report.analysis import ABOUT, UNRESOLVED
from ehrjax.benchmark.report.text import (
    NA,
    ci,
    count,
    delta,
    f,
    hparam,
    md_table,
    num,
    pct,
    row,
    seconds,
    sizes_text,
)

_WORDING = {
    "outcome_p": "the true risk, including a hidden frailty that no record shows: no model is expected to reach it",
    "outcome_p_visible": "the risk given what the record shows: the realistic ceiling for a model of the record",
}


def _called(c: dict[str, Any]) -> str:
    """'Δ +0.10 [+0.02, +0.19], Holm p 0.012 (family of 6): better than scratch'."""
    v = c["verdict"] if c["verdict"] == UNRESOLVED else f"{c['verdict']} than {c['b']}"
    return f"Δ {delta(c)}, Holm p {f(c['p_holm'])} (family of {c['m']}): **{v}**"


def _lead(items: list[dict[str, Any]], better: str, worse: str) -> str:
    parts = []
    for word, text in (("better", better), ("worse", worse), (UNRESOLVED, "not resolved")):
        sizes = [c["size"] for c in items if c["verdict"] == word]
        if sizes:
            parts.append(f"{text} at n = {sizes_text(sizes)}")
    return "; ".join(parts) + "." if parts else "no size has both arms."


def _missing(roles: dict[str, Any]) -> str:
    """Why Q1 and the expectations cannot be answered: the notes on roles.reference and roles.pretrained_lora."""
    notes = [n for n in roles["notes"] if n.startswith(("roles.reference ", "roles.pretrained_lora "))]
    return "; ".join(notes) + "."


def _ceiling_cell(task: dict[str, Any]) -> str:
    present = [c for c in task["ceilings"].values() if c["present"]]
    return " / ".join(f(c["auroc"]) for c in present) if present else "absent (real data)"


def _ceiling_names(task: dict[str, Any]) -> str:
    return " / ".join(c["name"] for c in task["ceilings"].values() if c["present"]) or "ceilings"


def ceilings_section(task: dict[str, Any]) -> list[str]:
    out = ["### Ceilings on the same test patients", ""]
    present = [c for c in task["ceilings"].values() if c["present"]]
    absent = [c for c in task["ceilings"].values() if not c["present"]]
    if present:
        rows = [[c["name"], c["label"], _WORDING[c["column"]], ci(c["auroc"], c["auroc_ci"]), ci(c["ap"], c["ap_ci"]),
                 ci(c["pr_auc"], c["pr_auc_ci"]), ci(c["brier"], c["brier_ci"], 4)] for c in present]  # fmt: skip
        out += [md_table(["ceiling", "label", "what it is", "AUROC [95% CI]", "AP [95% CI]", "PR-AUC [95% CI]",
                          "Brier [95% CI]"], rows), ""]  # fmt: skip
    if any(c["column"] == "outcome_p" for c in present):
        above = task["above_true_risk"]
        out += [("**Leakage check failed**: " + ", ".join(f"{a} at n = {s:,}" for a, s in above) + " score above the "
                 "true risk's 95% interval; a model of the record cannot beat the true risk, so look for a leak.")
                if above else "Leakage check: no arm's AUROC lies above the true risk's 95% interval.", ""]
    for c in absent:
        out.append(f"- {c['name']} ({c['label']}): absent: column `{c['column']}` is NaN, as on real (MEDS) data, "
                   "where no true risk is known.")  # fmt: skip
    return [*out, ""] if absent else out


def sizing_section(task: dict[str, Any], roles: dict[str, Any]) -> list[str]:
    sizing, splits = task["sizing"], task.get("splits") or {}
    out = ["### Test set and sizing", "",
           f"{task['n_val']:,} validation and {task['n_test']:,} test patients ({task['n_test_positive']:,} test "
           f"positives, prevalence {pct(100 * task['test_prevalence'])}); eligible per split: "
           + (", ".join(f"{k} {count(v)}" for k, v in splits.items()) or "not recorded")
           + f". All {task['runs_checked']} runs scored the same patients in the same order (checked on every "
           "predictions file).", ""]  # fmt: skip
    if sizing.get("n_test") is not None and (sizing["n_test"], sizing.get("n_test_positive")) != (
        task["n_test"], task["n_test_positive"]):  # fmt: skip
        out += [f"Note: the sizing assumed {count(sizing['n_test'])} test patients "
                f"({count(sizing.get('n_test_positive'))} positives); the predictions hold the numbers above.", ""]
    a, ref = roles["pretrained_lora"], roles["reference"]
    target, expected = sizing.get("target_half_width"), sizing.get("expected_half_width")
    out.append(f"Target 95% CI half-width of the paired AUROC difference: {f(target)}; expected at this test size: "
               f"{f(expected)}.")  # fmt: skip
    if sizing["measured"]:
        rows = [[f"{m['size']:,}", f(m["half_width"]), f(target), f(expected),
                 NA if target is None else ("yes" if m["half_width"] <= target else "no")]
                for m in sizing["measured"]]  # fmt: skip
        out += ["", md_table(["size", f"measured half-width ({a} - {ref})", "target", "expected", "within target"],
                             rows)]  # fmt: skip
    else:
        out.append(f" The measured half-width needs both roles.pretrained_lora and roles.reference ({a}, {ref}).")
    return [*out, ""]


def q1_section(task: dict[str, Any], roles: dict[str, Any]) -> list[str]:
    a, ref = roles["pretrained_lora"], roles["reference"]
    out = [f"### Q1. Does pre-training + LoRA ({a or 'roles.pretrained_lora'}) beat training from scratch "
           f"({ref or 'roles.reference'})?", ""]  # fmt: skip
    if a is None or ref is None:
        return [*out, f"Not answered: {_missing(roles)}", ""]
    vs_ref = [c for c in task["families"]["reference"] if c["a"] == a]
    vs_base = task["families"]["q1_baseline"]
    out += [f"Against {ref} (the reference family: every neural arm against {ref}, Holm-adjusted together): "
            + _lead(vs_ref, f"**yes**, {a} beats {ref}", f"**no**, {a} is worse than {ref}"), ""]  # fmt: skip
    if vs_base:
        out += ["Against the best non-neural baseline (its own Holm family, one comparison per size; the baseline "
                "is chosen per size on validation AUROC): "
                + _lead(vs_base, f"{a} beats it", f"{a} is worse than it"), ""]  # fmt: skip
    best = {b["size"]: b for b in task["best_baseline"]}
    for c in vs_ref:
        r, rr = row(task, a, c["size"]), row(task, ref, c["size"])
        line = (f"- n = {c['size']:,}: {a} {ci(r['auroc'], r['auroc_ci'])} vs {ref} {ci(rr['auroc'], rr['auroc_ci'])}"
                f" (ceilings {_ceiling_names(task)}: {_ceiling_cell(task)}); {_called(c)}")
        base = next((x for x in vs_base if x["size"] == c["size"]), None)
        if base:
            b = best[c["size"]]
            line += f"; vs {b['arm']} (validation AUROC {f(b['val_auroc'])}): {_called(base)}"
        out.append(line + ".")
    if not roles["baselines"]:
        out.append("- No baseline of roles.baselines ran, so the baseline half of Q1 is not answered.")
    return [*out, ""]


def q2_section(task: dict[str, Any], roles: dict[str, Any], arms: dict[str, Any]) -> list[str]:
    out = ["### Q2. Do learned code embeddings beat third-party ones?", ""]
    if not roles["table_pairs"]:
        return [*out, "Not answered: no pair of roles.table_pairs ran.", ""]
    out += ["Each pair of roles.table_pairs (learned minus third-party table, same recipe), all pairs and sizes in "
            "one Holm family per task.", ""]  # fmt: skip
    for a, b in roles["table_pairs"]:
        items = [c for c in task["families"]["q2"] if c["a"] == a and c["b"] == b]
        out += [f"**{a} vs {b}**: " + _lead(items, f"{a} (learned) is better", f"{b} (third-party) is better"), ""]
        for c in items:
            ra, rb = row(task, a, c["size"]), row(task, b, c["size"])
            out.append(f"- n = {c['size']:,}: {a} {ci(ra['auroc'], ra['auroc_ci'])}, {b} "
                       f"{ci(rb['auroc'], rb['auroc_ci'])}; {_called(c)}.")  # fmt: skip
        da, db = arms[a]["embed_dim"], arms[b]["embed_dim"]
        if da is not None and db is not None and da != db:
            out.append(f"- Caution: {a} has embed_dim {da}, {b} embed_dim {db}: a difference may be a width effect.")
        out.append("")
    return out


def expectations_section(task: dict[str, Any], roles: dict[str, Any]) -> list[str]:
    a, ref = roles["pretrained_lora"], roles["reference"]
    e = task["expectations"]
    out = ["### The seed study's expectations", ""]
    if a is None or ref is None:
        return [*out, f"Not checked: {_missing(roles)}", ""]
    parts = []
    for x in e["faster"]:
        if x["median"] is None or x["reference_median"] is None:
            parts.append(f"cannot be checked at n = {x['size']:,} (a run never gained over 0.5 validation AUROC)")
            continue
        word = "holds" if x["median"] < x["reference_median"] else "does not hold"
        parts.append(f"{word} at n = {x['size']:,} (median {count(x['median'])} vs {count(x['reference_median'])} "
                     f"steps, {seconds(x['seconds'])} vs {seconds(x['reference_seconds'])} s; faster in "
                     f"{x['faster_replicates']} of {x['paired_replicates']} paired replicates)")  # fmt: skip
    out.append(f"1. Fine-tuning ({a}) converges faster than {ref} (steps to 95% of the run's best validation AUROC "
               f"gain): {'; '.join(parts) or 'no size has both arms'}.")  # fmt: skip
    c = e["largest"]
    if c is None:
        out.append(f"2. {ref} may end slightly better at the largest size: not checked, no paired comparison.")
    else:
        if c["verdict"] == "worse":
            word = f"holds: {ref} is better, resolved"
        elif c["verdict"] == "better":
            word = f"does not hold: {a} is better, resolved"
        else:
            lean = ref if c["mean"] < 0 else a
            word = f"not resolved (the point estimate favours {lean})"
        out.append(f"2. {ref} may end slightly better at the largest size: at n = {c['size']:,}, {ref} minus {a} = "
                   f"{ci(-c['mean'], [-c['ci'][1], -c['ci'][0]], signed=True)}, Holm p {f(c['p_holm'])}: {word}.")
    share, contrast = e["shares"], roles["trainable_contrast"]
    first = {True: "about 2%, as expected", False: "not about 2%", None: "not recorded"}[e["share_about"][0]]
    text = f"3. Fine-tuning trains about 2% of the parameters against about 7%: {a} trains {pct(share.get(a))} ({first}"
    if contrast:
        second = {True: "about 7%, as expected", False: "not about 7%", None: "not recorded"}[e["share_about"][1]]
        text += f"), {contrast} trains {pct(share.get(contrast))} ({second})"
    else:
        text += "); the summary names no arm for the about-7% side (roles.trainable_contrast), so it is not checked"
    out.append(text + f"; {ref} trains {pct(share.get(ref))}. (\"About\" = within a factor of {ABOUT:g}.)")
    return [*out, ""]


def verdict_table(task: dict[str, Any], roles: dict[str, Any]) -> list[str]:
    ref = roles["reference"]
    fam = task["families"]["reference"]
    out = [f"### Verdicts against {ref or 'roles.reference'} (Holm family)", ""]
    if not fam:
        why = _missing(roles) if ref is None else f"no other neural arm ran beside {ref}."
        return [*out, f"No comparison: {why}", ""]
    rows = [[f"{c['size']:,}", c["a"], delta(c), f(c["p"]), f(c["p_holm"]), c["verdict"]] for c in fam]
    out += [f"{len(fam)} comparisons (every other neural arm at every size), Holm-adjusted at alpha 0.05; the 95% "
            "CI beside is unadjusted.", "",
            md_table(["size", "arm", f"Δ AUROC vs {ref} [95% CI]", "p", "Holm p", "verdict"], rows), ""]
    return out


def results_tables(task: dict[str, Any], roles: dict[str, Any]) -> list[str]:
    ref = roles["reference"] or "reference"
    out = ["### Results per labelled-set size", "",
           "Means over replicates with 95% CIs over patients and replicates; Δ is paired (the reference family's "
           "Holm verdict for neural arms; for baselines the Δ is descriptive).", ""]  # fmt: skip
    best = {b["size"]: b for b in task["best_baseline"]}
    for size in task["sizes"]:
        rows = []
        for arm in task["arm_order"]:
            r = row(task, arm, size)
            if r is None:
                continue
            c = r["vs_reference"]
            v = "reference" if arm == roles["reference"] else (c.get("verdict", "baseline") if c else NA)
            rows.append([arm, str(r["n_replicates"]), hparam(r["hparam"]), ci(r["auroc"], r["auroc_ci"]),
                         _ceiling_cell(task), ci(r["ap"], r["ap_ci"]), ci(r["pr_auc"], r["pr_auc_ci"]),
                         ci(r["brier"], r["brier_ci"], 4), f(r["val_auroc"]), delta(c), v])  # fmt: skip
        out += [f"#### n = {size:,} labelled patients", "",
                md_table(["arm", "replicates", "chosen", "AUROC [95% CI]", f"ceilings ({_ceiling_names(task)})",
                          "AP [95% CI]", "PR-AUC [95% CI]", "Brier [95% CI]", "val AUROC", f"Δ vs {ref} [95% CI]",
                          "verdict"], rows), ""]  # fmt: skip
        if size in best:
            out += [_baseline_sentence(task, size, best[size]), ""]
    return out


def _baseline_sentence(task: dict[str, Any], size: int, best: dict[str, Any]) -> str:
    """What the data show against the best baseline: which neural arms' unadjusted intervals lie above, below, on 0."""
    groups: dict[str, list[str]] = {"above": [], "below": [], "cover": []}
    for r in task["rows"]:
        c = r["vs_best_baseline"]
        if r["size"] == size and c is not None:
            groups["above" if c["ci"][0] > 0 else "below" if c["ci"][1] < 0 else "cover"].append(r["arm"])
    words = {"above": "above 0 (better)", "below": "below 0 (worse)", "cover": "covering 0 (not resolved)"}
    said = "; ".join(f"{words[k]}: {', '.join(v)}" for k, v in groups.items() if v) or "no neural arm ran"
    return (f"Best baseline at n = {size:,}: {best['arm']} (validation AUROC {f(best['val_auroc'])}, log loss "
            f"{f(best['val_log_loss'])}). Neural arms by the unadjusted 95% CI of their paired difference to it, "
            f"{said}.")  # fmt: skip


def tuning_table(task: dict[str, Any]) -> list[str]:
    out = ["### Tuning", ""]
    if not task["tuning"]:
        return [*out, "The summary records no tuning for this task.", ""]
    rows = []
    for t in task["tuning"]:
        cands = ", ".join(f"{num(c)}: {f(loss, 4)}{'*' if c == t.get('chosen') else ''}"
                          for c, loss in zip(t["candidates"], t.get("val_loss") or [], strict=False))  # fmt: skip
        rows.append([t["arm"], f"{t['size']:,}", t.get("param", NA), num(t.get("chosen")), cands,
                     "yes" if t["chosen_is_lowest"] else "no"])  # fmt: skip
    return [*out, "Candidates with their mean validation loss over replicates (* = chosen).", "",
            md_table(["arm", "size", "parameter", "chosen", "candidates: mean val loss", "lowest loss chosen"], rows),
            ""]  # fmt: skip


def convergence_table(task: dict[str, Any]) -> list[str]:
    rows = [[r["arm"], f"{r['size']:,}", f(r["best_epoch_median"], 1), f(r["epochs_run_median"], 1),
             count(r["steps_median"]), count(r["steps_to_95_median"]), seconds(r["seconds_to_95_median"]),
             f"{r['steps_to_95_reached']} of {r['n_replicates']}", seconds(r["wall_s_mean"]),
             seconds(r["train_s_mean"]), seconds(r["compile_s_mean"]), count(r["real_tokens_per_s_mean"])]
            for r in task["rows"] if r["kind"] == "neural"]  # fmt: skip
    return ["### Convergence", "",
            "Medians over replicates: best epoch (counted from 1), epochs run, optimizer steps, and the steps and "
            "seconds to the first evaluation reaching 95% of the run's own best validation AUROC gain over 0.5; "
            "means of the run times. Baselines are fitted in one go and have no curve.", "",
            md_table(["arm", "size", "best epoch", "epochs run", "steps", "steps to 95%", "seconds to 95%",
                      "reached", "wall s", "train s", "compile s", "real tokens/s"], rows), ""]  # fmt: skip
