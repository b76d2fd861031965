"""Statistics, plots and the markdown report of a benchmark output directory.

Reads what the stages wrote under the output directory: the summary dict (cohort manifest, stage timings,
pre-training results, arms and their parameter counts, one entry per fine-tuning run) and each run's
`runs/<arm>/n<size>/seed<s>/predictions.npz` (per val/test patient, in the same order in every run:
patient_id, split, label, probability, logit, outcome_p = the generator's true probability or NaN). It answers
the study's questions with bootstrap intervals over test patients and training seeds (`ehrjax.eval.stats`):

1. does MLM pre-training + LoRA with frozen learned embeddings beat training from scratch;
2. do learned code embeddings beat third-party (Med2Vec) ones;
3. do runs stay comparable when the cohort size changes.

Every arm is scored on the same test patients, so arms are compared by paired differences; `scratch` is the
reference arm. A difference is only called where its 95% interval excludes 0; otherwise the report says
"not resolved at this size". Arms of kind `logreg` and `oracle` are reference lines (a non-neural baseline and
the generator's true risk, the ceiling); the arm list itself comes from the summary.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ehrjax.atomic import atomic_write
from ehrjax.eval.metrics import binary_metrics
from ehrjax.eval.stats import Replicates, brier_score, difference, interval, replicates

REFERENCE_ARM = "scratch"
UNRESOLVED = "not resolved at this size"
BOOTSTRAP_SEED = 0
_PREDICTION_KEYS = ("patient_id", "split", "label", "probability", "logit", "outcome_p")
_REFERENCE_KINDS = ("logreg", "oracle")


@dataclass(frozen=True)
class _Loaded:
    """Test-split predictions of every run: labels/patient_id [n]; scores[(arm, size)] float[S, n] by seed."""

    patient_id: np.ndarray
    labels: np.ndarray
    outcome_p: np.ndarray | None
    scores: dict[tuple[str, int], np.ndarray]
    seeds: dict[tuple[str, int], list[int]]
    runs: dict[tuple[str, int], list[dict[str, Any]]]


# ------------------------------------------------------------------------------------------------ loading


def _read_predictions(out_dir: Path, rel: str) -> dict[str, np.ndarray]:
    """The test rows of one predictions.npz; ValueError naming the file if it is missing or malformed."""
    path = out_dir / rel
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: np.asarray(npz[key]) for key in _PREDICTION_KEYS}
    except (OSError, ValueError, KeyError, EOFError) as err:
        raise ValueError(f"predictions {rel}: cannot read it as the expected .npz ({err})") from err
    n = len(arrays["patient_id"])
    if any(a.shape != (n,) for a in arrays.values()):
        shapes = {k: a.shape for k, a in arrays.items()}
        raise ValueError(f"predictions {rel}: expected equal 1-D arrays {', '.join(_PREDICTION_KEYS)}, got {shapes}")
    test = arrays["split"] == "test"
    if not test.any():
        raise ValueError(f"predictions {rel}: no row has split 'test'")
    out = {k: a[test] for k, a in arrays.items()}
    if not np.isin(out["label"], (0, 1)).all():
        raise ValueError(f"predictions {rel}: test labels must be 0 or 1, got {np.unique(out['label'])[:5].tolist()}")
    probability = out["probability"].astype(np.float64)
    if not (np.isfinite(probability).all() and (probability >= 0).all() and (probability <= 1).all()):
        raise ValueError(f"predictions {rel}: probability must be finite and in [0, 1] on every test row")
    return out


def _load(summary: dict[str, Any], out_dir: Path) -> _Loaded:
    runs = summary.get("runs") or []
    if not runs:
        raise ValueError("summary: 'runs' is empty; there is nothing to report")
    grouped: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault((run["arm"], int(run["size"])), []).append(run)
    first: dict[str, np.ndarray] | None = None
    first_rel = ""
    outcome_p = None
    scores, seeds = {}, {}
    for key, group in grouped.items():
        group.sort(key=lambda r: int(r["seed"]))
        rows = []
        for run in group:
            pred = _read_predictions(out_dir, run["predictions"])
            if first is None:
                first, first_rel = pred, run["predictions"]
            elif not np.array_equal(pred["patient_id"], first["patient_id"]):
                raise ValueError(
                    f"predictions {run['predictions']}: test patient ids differ from {first_rel}; "
                    "every run must score the same test patients in the same order"
                )
            elif not np.array_equal(pred["label"], first["label"]):
                raise ValueError(f"predictions {run['predictions']}: test labels differ from {first_rel}")
            if outcome_p is None and np.isfinite(pred["outcome_p"]).all():
                outcome_p = pred["outcome_p"].astype(np.float64)
            rows.append(pred["probability"].astype(np.float64))
        seed_list = [int(r["seed"]) for r in group]
        if len(set(seed_list)) != len(seed_list):
            raise ValueError(f"summary: arm {key[0]} size {key[1]} lists seed(s) more than once: {seed_list}")
        scores[key], seeds[key] = np.stack(rows), seed_list
    assert first is not None
    labels = first["label"].astype(int)
    if len(np.unique(labels)) < 2:
        raise ValueError(f"predictions {first_rel}: the test labels hold a single class; AUROC is undefined")
    return _Loaded(first["patient_id"], labels, outcome_p, scores, seeds, grouped)


# ------------------------------------------------------------------------------------------------ statistics


def verdict(lo: float, hi: float, other: str) -> str:
    """'better than <other>' / 'worse than <other>' where the 95% interval excludes 0, else not resolved."""
    if lo > 0:
        return f"better than {other}"
    if hi < 0:
        return f"worse than {other}"
    return UNRESOLVED


def _arm_order(summary: dict[str, Any], loaded: _Loaded) -> list[str]:
    """Arms in summary order (then any only in runs), neural arms before the reference lines."""
    names = list(summary.get("arms", {}))
    names += sorted({arm for arm, _ in loaded.scores} - set(names))
    names = [a for a in names if any(arm == a for arm, _ in loaded.scores)]
    kinds = {a: summary.get("arms", {}).get(a, {}).get("kind", "neural") for a in names}
    return sorted(names, key=lambda a: (kinds[a] in _REFERENCE_KINDS, kinds[a] == "oracle"))


def _median(values: Iterable[float]) -> float | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(statistics.median(values)) if values else None


def _mean(values: Iterable[float]) -> float | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return float(np.mean(values)) if values else None


def _best_epoch_median(runs: list[dict[str, Any]]) -> float | None:
    """Median best epoch over neural runs (others record -1)."""
    epochs = [r.get("best_epoch") for r in runs]
    return _median(e for e in epochs if isinstance(e, int | float) and e >= 0)


def _paired(a: Replicates, seeds_a: list[int], b: Replicates, seeds_b: list[int]) -> tuple[tuple, list[int]] | None:
    """Paired difference A - B on the seeds both ran (a one-seed arm is broadcast); None if none match."""
    if len(seeds_a) > 1 and len(seeds_b) > 1:
        common = sorted(set(seeds_a) & set(seeds_b))
        if not common:
            return None
        ia, ib = [seeds_a.index(s) for s in common], [seeds_b.index(s) for s in common]
        a = Replicates(a.metric, a.point[ia], a.values[:, ia], a.seed)
        b = Replicates(b.metric, b.point[ib], b.values[:, ib], b.seed)
        paired_seeds = common
    else:
        paired_seeds = seeds_a if len(seeds_a) > 1 else seeds_b
    return difference(a, b), paired_seeds


def _delta(result: tuple | None, other: str) -> dict[str, Any] | None:
    if result is None:
        return None
    (mean, lo, hi), paired_seeds = result
    return {"vs": other, "mean": mean, "ci": [lo, hi], "verdict": verdict(lo, hi, other), "seeds": paired_seeds}


def _embedding_pairs(arms: list[str]) -> list[tuple[str, str]]:
    """(mlm_<x>, med2vec_<x>) pairs of arms that both ran: learned vs third-party code table, same recipe."""
    return [(a, "med2vec_" + a[4:]) for a in arms if a.startswith("mlm_") and "med2vec_" + a[4:] in arms]


def _compute(summary: dict[str, Any], loaded: _Loaded, n_boot: int) -> dict[str, Any]:
    labels = loaded.labels
    arms_meta = summary.get("arms", {})
    order = _arm_order(summary, loaded)
    sizes = sorted({size for _, size in loaded.scores})
    reps = {key: replicates(labels, s, "auroc", n_boot, BOOTSTRAP_SEED) for key, s in loaded.scores.items()}
    oracle = None
    if loaded.outcome_p is not None:
        mean, lo, hi = interval(replicates(labels, loaded.outcome_p, "auroc", n_boot, BOOTSTRAP_SEED))
        oracle = {"auroc": mean, "ci": [lo, hi]}
    reference = REFERENCE_ARM if any(arm == REFERENCE_ARM for arm, _ in loaded.scores) else None

    rows = []
    for arm in order:
        for size in sizes:
            key = (arm, size)
            if key not in loaded.scores:
                continue
            per_seed = [binary_metrics(labels, s) for s in loaded.scores[key]]
            mean, lo, hi = interval(reps[key])
            ref_key = (reference, size)
            delta = None
            if reference is not None and arm != reference and ref_key in reps:
                delta = _delta(_paired(reps[key], loaded.seeds[key], reps[ref_key], loaded.seeds[ref_key]), reference)
            runs = loaded.runs[key]
            rows.append({
                "arm": arm, "size": size, "kind": arms_meta.get(arm, {}).get("kind", "neural"),
                "seeds": loaded.seeds[key], "n_seeds": len(loaded.seeds[key]),
                "auroc": mean, "auroc_ci": [lo, hi], "auroc_per_seed": reps[key].point.tolist(),
                "ap": float(np.mean([m["ap"] for m in per_seed])),
                "pr_auc": float(np.mean([m["pr_auc"] for m in per_seed])),
                "brier": float(np.mean([brier_score(labels, s) for s in loaded.scores[key]])),
                "oracle_auroc": None if oracle is None else oracle["auroc"],
                "delta_vs_reference": delta,
                "best_epoch_median": _best_epoch_median(runs),
                "wall_s": _mean(r.get("wall_s") for r in runs),
                "train_s": _mean(r.get("train_s") for r in runs),
                "compile_s": _mean(r.get("compile_s") for r in runs),
            })  # fmt: skip

    comparisons = []
    for a, b in _embedding_pairs(order):
        for size in sizes:
            if (a, size) in reps and (b, size) in reps:
                result = _paired(reps[(a, size)], loaded.seeds[(a, size)], reps[(b, size)], loaded.seeds[(b, size)])
                if result is not None:
                    comparisons.append({"a": a, "b": b, "size": size, **_delta(result, b)})

    arms = {}
    for arm in order:
        meta = arms_meta.get(arm, {})
        runs = [r for (name, _), group in loaded.runs.items() if name == arm for r in group]
        total, trainable = meta.get("params_total"), meta.get("params_trainable")
        share = 100.0 * trainable / total if total and trainable is not None else meta.get("trainable_pct")
        arms[arm] = {
            "kind": meta.get("kind", "neural"), "description": meta.get("description", ""),
            "embed_dim": meta.get("embed_dim"), "params_total": total, "params_trainable": trainable,
            "trainable_pct": share, "runs": len(runs),
            "best_epoch_median": _best_epoch_median(runs),
            "wall_s_mean": _mean(r.get("wall_s") for r in runs),
            "train_s_mean": _mean(r.get("train_s") for r in runs),
            "compile_s_mean": _mean(r.get("compile_s") for r in runs),
            "real_tokens_per_s_mean": _mean(r.get("real_tokens_per_s") for r in runs if r.get("real_tokens_per_s")),
        }  # fmt: skip

    return {
        "reference": reference, "n_boot": n_boot, "bootstrap_seed": BOOTSTRAP_SEED,
        "n_test": len(labels), "test_prevalence": float(labels.mean()), "sizes": sizes, "arm_order": order,
        "oracle": oracle, "rows": rows, "comparisons": comparisons, "arms": arms,
        "runs_checked": sum(len(g) for g in loaded.runs.values()),
    }  # fmt: skip


def compute_stats(summary: dict[str, Any], out_dir: Path, n_boot: int = 1000) -> dict[str, Any]:
    """Per arm and size: AUROC with its patient-and-seed bootstrap CI, AP, PR-AUC, Brier (means over seeds),
    the oracle AUROC on the same test patients, and the paired AUROC difference to `scratch` with a verdict;
    per arm: parameters, median epochs to best, mean run times and real tokens/s; and learned-vs-Med2Vec
    paired differences for every (mlm_x, med2vec_x) pair of arms. JSON-ready (lists and floats).

    Raises ValueError naming the file when a predictions file is unreadable or disagrees with the others.
    """
    return _compute(summary, _load(summary, Path(out_dir)), n_boot)


# ------------------------------------------------------------------------------------------------ formatting


def _f(value: float | None, digits: int = 3, signed: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "—"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _ci(mean: float | None, ci: list[float] | None, signed: bool = False) -> str:
    if mean is None:
        return "—"
    return f"{_f(mean, signed=signed)} [{_f(ci[0], signed=signed)}, {_f(ci[1], signed=signed)}]"


def _count(value: float | None) -> str:
    return "—" if value is None else f"{int(value):,}"


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}%"


def _row(stats: dict[str, Any], arm: str, size: int) -> dict[str, Any] | None:
    return next((r for r in stats["rows"] if r["arm"] == arm and r["size"] == size), None)


def format_results_table(stats: dict[str, Any]) -> str:
    """Compact text table for the terminal: per size and arm, AUROC [95% CI] and the difference to scratch."""
    ref = stats["reference"] or "reference"
    width = max([len(a) for a in stats["arm_order"]] + [4])
    head = f"{'size':>7}  {'arm':<{width}}  {'AUROC [95% CI]':<22}  {f'Δ vs {ref} [95% CI]':<25}  verdict"
    lines = [head]
    for size in stats["sizes"]:
        for arm in stats["arm_order"]:
            row = _row(stats, arm, size)
            if row is None:
                continue
            delta = row["delta_vs_reference"]
            d = _ci(delta["mean"], delta["ci"], signed=True) if delta else "—"
            v = delta["verdict"] if delta else ("reference" if arm == stats["reference"] else "")
            lines.append(f"{size:>7}  {arm:<{width}}  {_ci(row['auroc'], row['auroc_ci']):<22}  {d:<25}  {v}")
    if stats["oracle"]:
        lines.append(f"oracle AUROC (true risk, same {stats['n_test']} test patients): "
                     f"{_ci(stats['oracle']['auroc'], stats['oracle']['ci'])}")  # fmt: skip
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _sizes_text(sizes: list[int]) -> str:
    return ", ".join(f"{s:,}" for s in sizes)


def _verdict_summary(items: list[tuple[int, str]], better_text: str, worse_text: str) -> str:
    """One sentence: at which sizes A is better / worse than B / not resolved, from (size, verdict) pairs."""
    better = [s for s, v in items if v.startswith("better")]
    worse = [s for s, v in items if v.startswith("worse")]
    unresolved = [s for s, v in items if v == UNRESOLVED]
    parts = []
    if better:
        parts.append(f"{better_text} at n = {_sizes_text(better)}")
    if worse:
        parts.append(f"{worse_text} at n = {_sizes_text(worse)}")
    if unresolved:
        parts.append(f"not resolved at n = {_sizes_text(unresolved)} (the 95% interval of the difference covers 0)")
    return "; ".join(parts) + "." if parts else "no size has both arms."


def _delta_text(row: dict[str, Any]) -> str:
    delta = row["delta_vs_reference"]
    if delta is None:
        return f"{row['arm']} could not be paired with the reference"
    return f"Δ {_ci(delta['mean'], delta['ci'], signed=True)} → **{delta['verdict']}**"


def _params_text(arm: dict[str, Any], name: str) -> str:
    return f"{name}: {_count(arm['params_trainable'])} of {_count(arm['params_total'])} ({_pct(arm['trainable_pct'])})"


def _answer_pretraining(stats: dict[str, Any]) -> list[str]:
    arm, ref = "mlm_lora", stats["reference"]
    out = ["### 1. Does pre-training + LoRA with frozen learned embeddings beat training from scratch?", ""]
    if ref is None or arm not in stats["arms"]:
        missing = " and ".join(a for a in (arm, REFERENCE_ARM) if a not in stats["arms"])
        return [*out, f"Not answered: arm {missing} did not run in this benchmark.", ""]
    pairs = [(s, _row(stats, arm, s)) for s in stats["sizes"]]
    pairs = [(s, r) for s, r in pairs if r is not None and r["delta_vs_reference"] is not None]
    lead = _verdict_summary(
        [(s, r["delta_vs_reference"]["verdict"]) for s, r in pairs],
        "**Yes**, mlm_lora beats scratch", "**No**, mlm_lora is worse than scratch",
    )
    out += [f"Test AUROC, mlm_lora minus scratch, paired on patients and seeds: {lead}", ""]
    for size, row in pairs:
        scratch = _row(stats, ref, size)
        out.append(f"- n = {size:,}: mlm_lora {_ci(row['auroc'], row['auroc_ci'])} vs scratch "
                   f"{_ci(scratch['auroc'], scratch['auroc_ci'])}; {_delta_text(row)}.")  # fmt: skip
    a, r = stats["arms"][arm], stats["arms"][ref]
    out += [
        f"- Convergence: median epochs to the best validation AUROC {_f(a['best_epoch_median'], 1)} (mlm_lora) vs "
        f"{_f(r['best_epoch_median'], 1)} (scratch); mean wall time per run {_seconds(a['wall_s_mean'])} s vs "
        f"{_seconds(r['wall_s_mean'])} s (of which compile {_seconds(a['compile_s_mean'])} s vs "
        f"{_seconds(r['compile_s_mean'])} s).",
        f"- Trainable parameters: {_params_text(a, 'mlm_lora')}; {_params_text(r, 'scratch')}.",
    ]
    if "mlm_full" in stats["arms"]:
        full = [(s, _row(stats, "mlm_full", s)) for s in stats["sizes"]]
        text = "; ".join(f"n = {s:,}: {_delta_text(x)}" for s, x in full if x and x["delta_vs_reference"])
        out.append(f"- For comparison, full fine-tuning of the pre-trained model (mlm_full) vs scratch: {text}.")
    return [*out, ""]


def _answer_embeddings(stats: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    out = ["### 2. Do learned code embeddings beat third-party (Med2Vec) embeddings?", ""]
    named = (("mlm_emb", "med2vec_emb"), ("mlm_lora", "med2vec_lora"))
    pairs = [p for p in named if all(a in stats["arms"] for a in p)]
    pairs += [p for p in _embedding_pairs(stats["arm_order"]) if p not in pairs]
    if not pairs:
        return [*out, "Not answered: no pair of arms mlm_x / med2vec_x ran in this benchmark.", ""]
    for a, b in pairs:
        items = [(c["size"], c) for c in stats["comparisons"] if c["a"] == a and c["b"] == b]
        lead = _verdict_summary([(s, c["verdict"]) for s, c in items], f"{a} (learned) is better than {b} (Med2Vec)",
                                f"{b} (Med2Vec) is better than {a} (learned)")  # fmt: skip
        out += [f"**{a} vs {b}**: {lead}", ""]
        for size, comp in items:
            ra, rb = _row(stats, a, size), _row(stats, b, size)
            vs_ref = ""
            if ra["delta_vs_reference"] and rb["delta_vs_reference"]:
                vs_ref = f"; vs scratch: {a} {_delta_text(ra)}, {b} {_delta_text(rb)}"
            diff = _ci(comp["mean"], comp["ci"], signed=True)
            auroc_a, auroc_b = _ci(ra["auroc"], ra["auroc_ci"]), _ci(rb["auroc"], rb["auroc_ci"])
            out.append(f"- n = {size:,}: {a} {auroc_a}, {b} {auroc_b}; "
                       f"{a} minus {b} Δ {diff} → **{comp['verdict']}**{vs_ref}.")  # fmt: skip
        ma, mb = stats["arms"][a], stats["arms"][b]
        if ma["embed_dim"] is not None and mb["embed_dim"] is not None and ma["embed_dim"] != mb["embed_dim"]:
            out.append(f"- Caution: the arms differ in width: {a} has embed_dim {ma['embed_dim']} "
                       f"({_count(ma['params_total'])} parameters, {_count(ma['params_trainable'])} trainable), "
                       f"{b} embed_dim {mb['embed_dim']} ({_count(mb['params_total'])} parameters, "
                       f"{_count(mb['params_trainable'])} trainable); a difference may be a width effect, not only an "
                       "embedding effect.")  # fmt: skip
        out.append("")
    coverage = (summary.get("med2vec") or {}).get("coverage") or {}
    if coverage:
        token = coverage.get("token_share")
        out += [f"The Med2Vec table covers {_pct(100 * coverage['vocab_share'])} of the vocabulary"
                + (f" and {_pct(100 * token)} of code occurrences" if token is not None else "")
                + " (coverage report in the Med2Vec section).", ""]  # fmt: skip
    return out


def _answer_cohorts(stats: dict[str, Any], summary: dict[str, Any]) -> list[str]:
    out = ["### 3. Do runs stay comparable when the cohort size changes?", ""]
    cohorts = summary.get("cohorts") or {}
    checked = (
        f"In this benchmark all {stats['runs_checked']} runs scored the same {stats['n_test']:,} test patients in "
        f"the same order with the same labels (checked on every predictions file; test prevalence "
        f"{_pct(100 * stats['test_prevalence'])}), so every arm and labelled-set size is compared on one test set."
    )
    if cohorts and all(c.get("source") == "synthetic" for c in cohorts.values()):
        out += [
            "Yes, by construction: patient *i* of a synthetic stream depends only on (seed, stream, *i*), so a "
            "cohort of 4,718 patients is exactly the first 4,718 patients of a cohort of 5,000 with the same seed, "
            "and a patient's train/val/test split is a hash of (seed, patient id), so it does not move when the "
            "cohort grows. Growing a cohort adds patients without changing the ones already there.",
            "",
            checked,
            "",
        ]
    else:
        out += [
            "Not by construction here: at least one cohort is not synthetic, so a smaller cohort is not "
            "guaranteed to be a prefix of a larger one; compare the hashes below before comparing runs.",
            "",
            checked,
            "",
        ]
    if not cohorts:
        return [*out, "The summary holds no cohort manifest.", ""]
    out += [
        "The manifest fingerprints each cohort: a SHA-256 per stored array and a prefix hash over the per-patient "
        "record hashes in patient order. Two cohorts of one stream and seed hold the same patients exactly when "
        "their hashes agree; a larger cohort's first *k* patients reproduce a *k*-patient cohort's prefix hash.",
        "",
    ]
    names = list(cohorts)
    rows = []
    for name in names:
        c = cohorts[name]
        splits = c.get("splits")
        rows.append([
            name, _count(c.get("num_patients")), str(c.get("source", "—")), str(c.get("seed", "—")),
            _count(c.get("tokens")), " / ".join(f"{splits[k]:,}" for k in splits) if splits else "—",
            _pct(100 * c["prevalence"]) if c.get("prevalence") is not None else "—",
            f"`{c.get('prefix_hash', '—')[:16]}`",
        ])  # fmt: skip
    out += [_md_table(["cohort", "patients", "source", "seed", "tokens", "splits (train / val / test)",
                       "prevalence", "prefix hash"], rows), ""]  # fmt: skip
    arrays = sorted({k for name in names for k in (cohorts[name].get("hashes") or {})})
    if arrays:
        rows = [[f"`{a}`", *(f"`{(cohorts[n].get('hashes') or {}).get(a, '—')[:16]}`" for n in names)] for a in arrays]
        out += [_md_table(["array (sha256, first 16 hex)", *names], rows), ""]
    return out


_HOW_TO_READ = """## How to read this report

- **AUROC [95% CI]**: the mean over training seeds of the test AUROC, and a 95% percentile bootstrap interval
  whose replicates resample both the test patients and the seeds (with replacement), so it covers the
  test-set noise and the seed-to-seed noise together.
- **Δ vs scratch**: the AUROC of the arm minus that of `scratch`, *paired*: each bootstrap replicate draws one
  set of patients and one set of seed indices and applies it to both arms, so noise they share cancels. A
  difference is called ("better/worse than scratch") only where its 95% interval excludes 0; otherwise the
  report says "not resolved at this size": the data cannot tell the arms apart, which is not evidence that
  they are equal.
- **oracle**: the generator's true probability of the outcome scored like a model: the ceiling any model can
  reach on these test patients. The distance to it is the room left.
- **logreg**: a bag-of-codes logistic regression: a non-neural baseline, deterministic (one "seed"). A
  sequence model that does not beat it has not used order or timing.
- AP is the step-wise average precision, PR-AUC the trapezoidal area under the precision-recall curve, Brier
  the mean squared error of the predicted probability (lower is better); these are means over seeds.
"""


def _results_table(stats: dict[str, Any], size: int) -> str:
    rows = []
    for arm in stats["arm_order"]:
        row = _row(stats, arm, size)
        if row is None:
            continue
        delta = row["delta_vs_reference"]
        meta = stats["arms"][arm]
        rows.append([
            arm, str(row["n_seeds"]), _ci(row["auroc"], row["auroc_ci"]), _f(row["oracle_auroc"]), _f(row["ap"]),
            _f(row["pr_auc"]), _f(row["brier"], 4), _ci(delta["mean"], delta["ci"], signed=True) if delta else "—",
            delta["verdict"] if delta else ("reference" if arm == stats["reference"] else "—"),
            _pct(meta["trainable_pct"]), _f(row["best_epoch_median"], 1), _seconds(row["wall_s"]),
        ])  # fmt: skip
    ref = stats["reference"] or "reference"
    return _md_table(["arm", "seeds", "AUROC [95% CI]", "oracle AUROC", "AP", "PR-AUC", "Brier",
                      f"Δ AUROC vs {ref} [95% CI]", "verdict", "trainable %", "epochs to best", "wall s / run"],
                     rows)  # fmt: skip


def _pretraining_table(pretraining: dict[str, Any]) -> str:
    keys = ("loss", "top1", "top10", "macro_auroc", "macro_ap", "macro_pr_auc")
    rows = []
    for name, p in pretraining.items():
        test = p.get("test") or {}
        rows.append([f"{name} ({p.get('label', '')})", *(_f(test.get(k), 4) for k in keys), _count(p.get("steps")),
                     _seconds(p.get("wall_s"))])  # fmt: skip
        for base, b in (p.get("baselines") or {}).items():
            lam = f", λ = {_f(b['lambda'], 2)}" if b.get("lambda") is not None else ""
            rows.append([f"&nbsp;&nbsp;{base} baseline{lam}", *(_f(b.get(k), 4) for k in keys), "—", "—"])
    return _md_table(["pre-training (test split)", "loss", "top-1", "top-10", "macro AUROC", "macro AP",
                      "macro PR-AUC", "steps", "wall s"], rows)  # fmt: skip


def _probe_table(probe: dict[str, Any]) -> str:
    rows = [[name, _ci(v.get("auroc"), v.get("ci"))] for name, v in probe.items() if isinstance(v, dict)]
    return _md_table(["probe features", "test AUROC [95% CI]"], rows)


def _stage_table(stages: dict[str, Any]) -> str:
    rows = []
    for name, s in stages.items():
        wall, comp, train = s.get("wall_s"), s.get("compile_s"), s.get("train_s")
        other = wall - (comp or 0) - (train or 0) if wall is not None else None
        rows.append([name, _seconds(wall), _seconds(comp), _seconds(train), _seconds(other),
                     "yes" if s.get("skipped") else "no"])  # fmt: skip
    return _md_table(["stage", "wall s", "compile s", "train s", "other s", "skipped"], rows)


def _arms_table(stats: dict[str, Any]) -> str:
    rows = []
    for arm in stats["arm_order"]:
        a = stats["arms"][arm]
        tps = a["real_tokens_per_s_mean"]
        rows.append([arm, a["kind"], a["description"], str(a["embed_dim"] if a["embed_dim"] is not None else "—"),
                     _count(a["params_total"]), _count(a["params_trainable"]), _pct(a["trainable_pct"]),
                     _f(a["best_epoch_median"], 1), _seconds(a["wall_s_mean"]), _seconds(a["train_s_mean"]),
                     _seconds(a["compile_s_mean"]), "—" if tps is None else f"{tps:,.0f}"])  # fmt: skip
    return _md_table(["arm", "kind", "description", "embed_dim", "params", "trainable", "trainable %",
                      "median epochs to best", "wall s / run", "train s / run", "compile s / run",
                      "real tokens/s"], rows)  # fmt: skip


def _markdown(summary: dict[str, Any], stats: dict[str, Any], plots: dict[str, str]) -> str:
    wall = summary.get("wall_s")
    lines = [
        f"# ehrjax benchmark: {summary.get('name', '?')}",
        "",
        f"Started {summary.get('started', '?')} on {summary.get('device', '?')}; wall time "
        f"{_seconds(wall)} s{f' ({wall / 60:.1f} min)' if wall else ''}. Task: {summary.get('task', '?')}; "
        f"labelled-set sizes {_sizes_text(stats['sizes'])}; seeds {summary.get('seeds', '?')}; "
        f"{stats['n_test']:,} test patients; {stats['n_boot']} bootstrap replicates.",
        "",
        "## What was cut",
        "",
        *([f"- {c}" for c in summary.get("cuts") or []] or ["- Nothing: the full grid ran."]),
        "",
        "## The answers",
        "",
        *_answer_pretraining(stats),
        *_answer_embeddings(stats, summary),
        *_answer_cohorts(stats, summary),
        _HOW_TO_READ,
        "## Results per labelled-set size",
        "",
        "Test AUROC with its 95% CI over patients and seeds; AP, PR-AUC and Brier are means over seeds; Δ is "
        "paired on patients and seeds; epochs to best and wall time are medians / means over the seeds' runs.",
        "",
    ]
    for size in stats["sizes"]:
        lines += [f"### n = {size:,} labelled patients", "", _results_table(stats, size), ""]
    for key, title in (("data_efficiency", "Data efficiency"), ("roc_pr", "ROC and precision-recall curves"),
                       ("training_curves", "Training curves")):  # fmt: skip
        if key in plots:
            lines += [f"### {title}", "", f"![{title}]({plots[key]})", ""]
    lines += ["## Arms", "", _arms_table(stats), ""]
    if summary.get("pretraining"):
        lines += ["## MLM pre-training", "",
                  "Masked-code prediction on the pre-training cohort's test split, against the unigram baseline "
                  "(predict every masked code by its frequency) and the copy baseline (mix in the codes already in "
                  "the patient's record with weight λ).", "",
                  _pretraining_table(summary["pretraining"]), ""]  # fmt: skip
        if "mlm_curves" in plots:
            lines += [f"![MLM curves]({plots['mlm_curves']})", ""]
    if summary.get("probe"):
        probe = summary["probe"]
        lines += ["## Linear probe", "", f"{_count(probe.get('n_test'))} test patients.", "", _probe_table(probe), ""]
    med2vec = summary.get("med2vec")
    if med2vec:
        coverage = med2vec.get("coverage") or {}
        lines += ["## Med2Vec", "",
                  f"Source: {med2vec.get('source', '?')} (`{med2vec.get('path', '')}`), dim {med2vec.get('dim', '?')}, "
                  f"{_seconds(med2vec.get('wall_s'))} s.", ""]  # fmt: skip
        if coverage.get("text"):
            lines += ["```", coverage["text"].rstrip(), "```", ""]
    if summary.get("stages"):
        lines += ["## Stage timing", "", _stage_table(summary["stages"]), ""]
        if "stage_times" in plots:
            lines += [f"![Stage timing]({plots['stage_times']})", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))
    finally:
        plt.close(fig)


def _plot_data_efficiency(stats: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for arm in stats["arm_order"]:
        kind = stats["arms"][arm]["kind"]
        if kind == "oracle":
            continue
        rows = [r for r in stats["rows"] if r["arm"] == arm]
        x = [r["size"] for r in rows]
        y = [r["auroc"] for r in rows]
        lo, hi = [r["auroc_ci"][0] for r in rows], [r["auroc_ci"][1] for r in rows]
        style = dict(linestyle="--", marker="s", color="black") if kind == "logreg" else dict(marker="o")
        (line,) = ax.plot(x, y, label=arm, **style)
        ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.12 if kind != "logreg" else 0.06)
    if stats["oracle"]:
        ax.axhline(stats["oracle"]["auroc"], color="grey", linestyle=":", label="oracle (true risk)")
    ax.set_xscale("log")
    ax.set_xticks(stats["sizes"], [f"{s:,}" for s in stats["sizes"]])
    ax.minorticks_off()
    ax.set_xlabel("labelled patients (log scale)")
    ax.set_ylabel("test AUROC (mean over seeds, 95% CI)")
    ax.set_title("Data efficiency")
    ax.legend(fontsize=8)
    _save(fig, path)


def _plot_roc_pr(loaded: _Loaded, stats: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    size = stats["sizes"][0]
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(11, 4.8))
    curves = [(arm, loaded.scores[(arm, size)][0], loaded.seeds[(arm, size)][0])
              for arm in stats["arm_order"] if (arm, size) in loaded.scores]  # fmt: skip
    if loaded.outcome_p is not None and not any(stats["arms"][a]["kind"] == "oracle" for a, _, _ in curves):
        curves.append(("oracle", loaded.outcome_p, None))
    for arm, scores, seed in curves:
        fpr, tpr, _ = roc_curve(loaded.labels, scores)
        precision, recall, _ = precision_recall_curve(loaded.labels, scores)
        label = arm if seed is None else f"{arm} (seed {seed})"
        roc_ax.plot(fpr, tpr, label=label, linewidth=1.2)
        pr_ax.plot(recall, precision, label=label, linewidth=1.2)
    roc_ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    pr_ax.axhline(loaded.labels.mean(), color="grey", linestyle=":", linewidth=0.8, label="prevalence")
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"ROC, n = {size:,} labelled")
    pr_ax.set(xlabel="recall", ylabel="precision", title=f"Precision-recall, n = {size:,} labelled")
    roc_ax.legend(fontsize=7, loc="lower right")
    pr_ax.legend(fontsize=7, loc="upper right")
    _save(fig, path)


def _plot_training_curves(loaded: _Loaded, stats: dict[str, Any], path: Path) -> bool:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    sizes = sorted({stats["sizes"][0], stats["sizes"][-1]})
    picked = {(arm, size): loaded.runs[(arm, size)][0] for arm in stats["arm_order"] for size in sizes
              if (arm, size) in loaded.runs and loaded.runs[(arm, size)][0].get("curve")}  # fmt: skip
    if not picked:
        return False
    fig, axes = plt.subplots(2, len(sizes), figsize=(5.5 * len(sizes), 7), squeeze=False)
    for col, size in enumerate(sizes):
        for arm in stats["arm_order"]:
            run = picked.get((arm, size))
            if run is None:
                continue
            epochs = [p["epoch"] for p in run["curve"]]
            for row, key in enumerate(("val_auroc", "val_loss")):
                values = [p.get(key) for p in run["curve"]]
                values = [np.nan if v is None else v for v in values]
                axes[row, col].plot(epochs, values, marker=".", label=f"{arm} (seed {run['seed']})")
        axes[0, col].set(title=f"n = {size:,} labelled", ylabel="validation AUROC")
        axes[1, col].set(xlabel="epoch", ylabel="validation loss")
        axes[0, col].legend(fontsize=7)
        for ax in axes[:, col]:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _save(fig, path)
    return True


def _plot_mlm_curves(pretraining: dict[str, Any], path: Path) -> None:
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
    for base, style in (("unigram", "--"), ("copy", ":")):
        losses = {name: ((p.get("baselines") or {}).get(base) or {}).get("loss") for name, p in pretraining.items()}
        losses = {name: loss for name, loss in losses.items() if loss is not None}
        if len(set(losses.values())) == 1 and len(losses) == len(pretraining):  # one test split: draw it once
            ax.axhline(next(iter(losses.values())), color="grey", linestyle=style, label=f"{base} baseline")
            continue
        for name, loss in losses.items():
            ax.axhline(loss, color=colours[name], linestyle=style, linewidth=1, label=f"{name}: {base} baseline")
    ax.set(xlabel="step", ylabel="MLM loss (cross-entropy, nats)", title="MLM pre-training: learned vs Med2Vec table")
    ax.legend(fontsize=7)
    _save(fig, path)


def _plot_stage_times(stages: dict[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    names = list(stages)
    compile_s = np.array([stages[n].get("compile_s") or 0.0 for n in names])
    train_s = np.array([stages[n].get("train_s") or 0.0 for n in names])
    wall = np.array([stages[n].get("wall_s") or 0.0 for n in names])
    other = np.maximum(wall - compile_s - train_s, 0.0)
    fig, ax = plt.subplots(figsize=(1.5 + 1.1 * len(names), 4.5))
    x = np.arange(len(names))
    ax.bar(x, compile_s, label="compile")
    ax.bar(x, train_s, bottom=compile_s, label="train")
    ax.bar(x, other, bottom=compile_s + train_s, label="other (data, eval, I/O)")
    ax.set_xticks(x, names, rotation=30, ha="right")
    ax.set(ylabel="seconds", title="Time per stage")
    ax.legend(fontsize=8)
    _save(fig, path)


def _write_plots(summary: dict[str, Any], loaded: _Loaded, stats: dict[str, Any], plot_dir: Path) -> dict[str, str]:
    """Every plot the summary has data for; returns {key: path relative to the output directory}."""
    import matplotlib

    matplotlib.use("Agg")
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    _plot_data_efficiency(stats, plot_dir / "data_efficiency.png")
    written["data_efficiency"] = "plots/data_efficiency.png"
    _plot_roc_pr(loaded, stats, plot_dir / "roc_pr.png")
    written["roc_pr"] = "plots/roc_pr.png"
    if _plot_training_curves(loaded, stats, plot_dir / "training_curves.png"):
        written["training_curves"] = "plots/training_curves.png"
    if summary.get("pretraining"):
        _plot_mlm_curves(summary["pretraining"], plot_dir / "mlm_curves.png")
        written["mlm_curves"] = "plots/mlm_curves.png"
    if summary.get("stages"):
        _plot_stage_times(summary["stages"], plot_dir / "stage_times.png")
        written["stage_times"] = "plots/stage_times.png"
    return written


# ------------------------------------------------------------------------------------------------ writing


def _jsonable(value: Any) -> Any:
    """Plain JSON: numpy scalars and arrays to Python, non-finite floats to null, tuples to lists."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_report(summary: dict[str, Any], out_dir: Path, n_boot: int = 1000) -> dict[str, Any]:
    """Compute the statistics (stored as summary["stats"]) and write plots/*.png, summary.json and report.md.

    Each file is written atomically, report.md last, and a stale report.md is removed first: if anything
    fails (an unreadable predictions file, a plot) the error propagates and no report claims success.
    Adds summary["stages"]["report"] (statistics and plots, before the two text files) unless the caller set
    it. Returns the stats dict (see `compute_stats`).
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / "report.md").unlink(missing_ok=True)
    loaded = _load(summary, out_dir)
    stats = _compute(summary, loaded, n_boot)
    summary["stats"] = stats
    plots = _write_plots(summary, loaded, stats, out_dir / "plots")
    if "report" not in summary.setdefault("stages", {}):
        wall = time.perf_counter() - start
        summary["stages"]["report"] = {"wall_s": wall, "compile_s": 0.0, "train_s": 0.0, "skipped": False}
    text = json.dumps(_jsonable(summary), indent=2, allow_nan=False)
    atomic_write(out_dir / "summary.json", lambda p: p.write_text(text))
    markdown = _markdown(summary, stats, plots)
    atomic_write(out_dir / "report.md", lambda p: p.write_text(markdown))
    return stats
