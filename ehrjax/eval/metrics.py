"""Evaluation metrics on host arrays, computed with scikit-learn.

Binary outcome: AUROC, average precision (AP) and PR-AUC (trapezoidal area under the PR curve).
Multi-label next visit: APS and AUROC with `average='samples'` as in the BEHRT paper; rows with no positive
(or no negative) label have no defined per-sample score and are left out (their number is reported).
MLM: the reference study's macro one-vs-rest ROC-AUC, AP and PR-AUC over the codes that appear among the
masked labels, from per-code score histograms accumulated on device (loss and top-k accuracy are counted there).
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import auc, average_precision_score, precision_recall_curve, roc_auc_score


def binary_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """labels: {0,1}[n]; scores: float[n] (probabilities or logits). NaN metrics if one class is absent."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64)
    out = {"n": float(len(labels)), "prevalence": float(labels.mean()) if len(labels) else float("nan")}
    if len(np.unique(labels)) < 2:
        return {**out, "auroc": float("nan"), "ap": float("nan"), "pr_auc": float("nan")}
    precision, recall, _ = precision_recall_curve(labels, scores)
    return {
        **out,
        "auroc": float(roc_auc_score(labels, scores)),
        "ap": float(average_precision_score(labels, scores)),
        "pr_auc": float(auc(recall, precision)),
    }


def multilabel_metrics(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """labels: {0,1}[n, C]; scores: float[n, C]. Sample-averaged APS and AUROC over rows where defined."""
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64)
    positives = labels.sum(axis=1)
    aps_rows = positives > 0
    auc_rows = aps_rows & (positives < labels.shape[1])
    out = {"n": float(len(labels)), "rows_without_positive": float((~aps_rows).sum())}
    out["aps"] = (
        float(average_precision_score(labels[aps_rows], scores[aps_rows], average="samples"))
        if aps_rows.any()
        else float("nan")
    )
    out["auroc"] = (
        float(roc_auc_score(labels[auc_rows], scores[auc_rows], average="samples")) if auc_rows.any() else float("nan")
    )
    return out


def histogram_metrics(hist_pos: np.ndarray, hist_neg: np.ndarray) -> dict[str, float]:
    """Macro one-vs-rest AUROC, AP and PR-AUC from per-code score histograms f[K, bins] (bins in increasing
    score order) of the positives and negatives of each code; codes without a positive or a negative are left
    out. Scores in one bin count as ties (half a pair for AUROC, one threshold for AP), so with fine bins this
    equals the exact metrics up to ties the binning creates."""
    pos, neg = np.asarray(hist_pos, dtype=np.float64), np.asarray(hist_neg, dtype=np.float64)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    keep = (n_pos > 0) & (n_neg > 0)
    pos, neg, n_pos, n_neg = pos[keep], neg[keep], n_pos[keep, None], n_neg[keep, None]
    if len(pos) == 0:
        return {"macro_auroc": float("nan"), "macro_ap": float("nan"), "macro_pr_auc": float("nan"), "codes": 0.0}
    neg_below = np.cumsum(neg, axis=1) - neg
    auroc = ((pos * (neg_below + 0.5 * neg)).sum(axis=1, keepdims=True) / (n_pos * n_neg))[:, 0]
    tp = np.cumsum(pos[:, ::-1], axis=1)  # thresholds from the highest bin down
    fp = np.cumsum(neg[:, ::-1], axis=1)
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1e-300), 1.0)
    recall = tp / n_pos
    ap = (np.diff(np.concatenate([np.zeros((len(pos), 1)), recall], axis=1), axis=1) * precision).sum(axis=1)
    recall0 = np.concatenate([np.zeros((len(pos), 1)), recall], axis=1)
    precision0 = np.concatenate([precision[:, :1], precision], axis=1)
    pr_auc = np.trapezoid(precision0, recall0, axis=1)
    return {
        "macro_auroc": float(auroc.mean()),
        "macro_ap": float(ap.mean()),
        "macro_pr_auc": float(pr_auc.mean()),
        "codes": float(len(pos)),
    }
