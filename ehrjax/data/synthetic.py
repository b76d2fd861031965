"""Seeded, vectorised synthetic EHR cohorts whose ground truth is known.

Eight chronic diseases (diagnosis, treatment and monitoring code groups, prevalence, onset age range,
follow-up visits), comorbidity links, routine-care codes and a Zipf long tail of background codes with
patient-specific preferences. Visits are dated; disease onsets come from a latent frailty, age ranges and
parent diseases, and treatment starts some time after onset (or never), so order and recency carry signal.

Patient `i` of a stream depends only on `(seed, stream, i)`: patients are generated in blocks of
`BLOCK_SIZE`, each from its own generator seeded by `(seed, stream, block)`, and a cohort of `n` patients is
the first `n` patients of its blocks. Split membership is a hash of `(seed, patient_id)`.

The `finetune` stream also carries the downstream tasks: an index visit per patient, the
history cut at it, two binary outcomes within 365 days of the index date, each drawn from a known
probability, and the next visit's diagnosis codes. Heart failure (`outcome`, prevalent cases excluded) is
driven mostly by disease presence, age and sex; renal decline (`renal_decline`) mostly by the order and
timing of what the record shows. Each comes with two ceilings: the true risk (`outcome_p`,
`renal_decline_p`), which includes the hidden frailty, and the visible risk (`outcome_p_visible`,
`renal_decline_p_visible`), the same hazard with the frailty integrated out over its prior
(docs/tasks.md).

    python -m ehrjax.data.synthetic --num-patients 10000 --seed 0 --stream pretrain --out cohort.npz
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from numpy.polynomial.hermite_e import hermegauss

from ehrjax.atomic import check_output_path
from ehrjax.data.cohort import SPLITS, Cohort

BLOCK_SIZE = 4096
STREAMS: dict[str, int] = {"pretrain": 1, "finetune": 2}
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train, val, test
DAYS_PER_YEAR = 365.25
DAYS_PER_MONTH = DAYS_PER_YEAR / 12
EXTRACT_YEAR = 2025  # the calendar year the records end in; gives birth years
OUTCOME_WINDOW_DAYS = 365.0
OUTCOME_DISEASE = "heart_failure"
RISK_CAP = 0.95  # every outcome probability is capped below 1, so that every label stays uncertain
FRAILTY_QUADRATURE_NODES = 32  # Gauss-Hermite nodes of the visible risks (the frailty integrated out)
RENAL_RNG_TAG = 0x52454E41  # the renal-decline label's own random stream: (seed, stream, block, tag)


@dataclasses.dataclass(frozen=True)
class Disease:
    name: str
    prevalence: float  # target share of age-eligible patients with the disease by the end of their record
    age_range: tuple[int, int]  # onset ages in years
    followup_visits: int  # extra visits in the three years after onset
    diagnosis: tuple[str, ...]
    treatment: tuple[str, ...]
    monitoring: tuple[str, ...]
    base_risk: float  # calibrated so that, with the comorbidity links, prevalence matches the table


DISEASES: tuple[Disease, ...] = (
    Disease("type2_diabetes", 0.10, (40, 80), 8,
            ("ICD10:E11.9", "ICD10:E11.65", "ICD10:E11.22"),
            ("RX:metformin", "RX:insulin_glargine", "RX:sitagliptin", "RX:empagliflozin"),
            ("LOINC:4548-4", "LOINC:2345-7"), 0.0880),
    Disease("hypertension", 0.15, (35, 85), 6,
            ("ICD10:I10", "ICD10:I11.9"),
            ("RX:lisinopril", "RX:amlodipine", "RX:hydrochlorothiazide", "RX:losartan"),
            ("LOINC:8480-6", "LOINC:8462-4"), 0.1180),
    Disease("asthma", 0.08, (5, 70), 5,
            ("ICD10:J45.909", "ICD10:J45.20", "ICD10:J45.40"),
            ("RX:albuterol", "RX:fluticasone", "RX:montelukast"),
            ("LOINC:20150-9",), 0.0800),
    Disease("depression", 0.12, (18, 75), 7,
            ("ICD10:F32.9", "ICD10:F33.1", "ICD10:F32.1"),
            ("RX:sertraline", "RX:escitalopram", "RX:fluoxetine", "RX:bupropion"),
            ("LOINC:44249-1",), 0.1200),
    Disease("copd", 0.06, (50, 85), 6,
            ("ICD10:J44.9", "ICD10:J44.1"),
            ("RX:tiotropium", "RX:salmeterol", "RX:budesonide_formoterol"),
            ("LOINC:19926-5",), 0.0600),
    Disease("heart_failure", 0.05, (55, 90), 8,
            ("ICD10:I50.9", "ICD10:I50.22", "ICD10:I50.32"),
            ("RX:furosemide", "RX:carvedilol", "RX:sacubitril_valsartan", "RX:spironolactone"),
            ("LOINC:33762-6", "LOINC:30934-4"), 0.0120),
    Disease("chronic_kidney_disease", 0.07, (50, 85), 7,
            ("ICD10:N18.3", "ICD10:N18.4", "ICD10:N18.9"),
            ("RX:sevelamer", "RX:epoetin_alfa", "RX:calcitriol"),
            ("LOINC:33914-3", "LOINC:2160-0"), 0.0450),
    Disease("rheumatoid_arthritis", 0.09, (30, 75), 6,
            ("ICD10:M06.9", "ICD10:M05.79"),
            ("RX:methotrexate", "RX:adalimumab", "RX:hydroxychloroquine"),
            ("LOINC:1988-5", "LOINC:4537-7"), 0.0900),
)  # fmt: skip
DISEASE_INDEX = {d.name: k for k, d in enumerate(DISEASES)}

# (parent, child, probability that the child follows the parent)
LINKS: tuple[tuple[str, str, float], ...] = (
    ("type2_diabetes", "hypertension", 0.40),
    ("type2_diabetes", "chronic_kidney_disease", 0.30),
    ("hypertension", "heart_failure", 0.25),
    ("copd", "heart_failure", 0.20),
    ("depression", "type2_diabetes", 0.15),
)
# Parents are simulated before children.
ONSET_ORDER = ("asthma", "rheumatoid_arthritis", "copd", "depression", "type2_diabetes", "hypertension",
               "chronic_kidney_disease", "heart_failure")  # fmt: skip

# (code, probability per visit)
ROUTINE: tuple[tuple[str, float], ...] = (
    ("ICD10:Z00.00", 0.30),  # annual check-up
    ("LOINC:85354-9", 0.20),  # blood-pressure panel
    ("LOINC:2093-3", 0.15),  # cholesterol screening
    ("CVX:141", 0.10),  # influenza vaccine
)

# Emission probabilities per visit for an active disease: (new diagnosis, follow-up visit for it, other visit)
P_DIAGNOSIS = (0.95, 0.85, 0.40)
P_TREATMENT = (0.90, 0.90, 0.75)  # only while treated
P_MONITORING = (0.50, 0.75, 0.25)
P_NEVER_TREATED = 0.15
TREATMENT_DELAY_DAYS = 90.0
NOISE_ZIPF_EXPONENT = 1.1
NOISE_PREFERRED = 6  # background codes a patient keeps coming back with
P_NOISE_PREFERRED = 0.45

# Log-hazard of the outcome within the window after the index date.
OUTCOME_COEF = dict(
    intercept=-3.05,
    age_per_decade=0.35,  # centred at 60
    male=0.25,
    frailty=0.35,
    hypertension=0.70,
    type2_diabetes=0.60,
    chronic_kidney_disease=0.80,
    copd=0.80,
    untreated_hypertension_6m=1.20,  # hypertension not treated at some time in the 6 months before index
    recent_onset_1y=0.90,  # diabetes or CKD diagnosed in the year before index
    ckd_after_diabetes=0.60,  # order: CKD that followed diabetes
    frequent_visits_6m=0.35,  # 3+ visits in the 6 months before index
)

# Log-hazard of renal decline (acute kidney injury or an accelerated loss of kidney function) within the
# window after the index date. Mostly order and timing; presence terms are small. Rationale: docs/tasks.md.
RENAL_COEF = dict(
    intercept=-2.65,  # set once, after the other terms were fixed, for a prevalence of about 10%
    age_per_decade=0.30,  # centred at 60
    male=0.15,
    frailty=0.25,  # the same latent frailty as heart failure, a smaller weight
    chronic_kidney_disease=0.40,
    type2_diabetes=0.20,
    hypertension=0.20,
    heart_failure=0.40,
    ckd_after_diabetes=0.90,  # order: CKD diagnosed after type 2 diabetes (diabetic nephropathy)
    new_raas_or_diuretic_90d=1.00,  # recency: hypertension or heart-failure treatment first started <= 90 days ago
    diabetes_untreated_180d=0.80,  # gap: diabetes untreated for more than 180 days after its diagnosis
    visit_acceleration=0.90,  # pattern: 3+ visits in the last 90 days, at most 1 in the 275 days before
    ckd_unmonitored_1y=0.70,  # gap: CKD for a year or more and no kidney-monitoring code in the last 365 days
)


def code_catalogue(num_noise_codes: int) -> np.ndarray:
    """All code strings a generator with `num_noise_codes` background codes can emit: str[n_codes].

    Order: diagnosis, treatment and monitoring codes of each disease, routine codes, then `NOISE:xxxx`.
    """
    names: list[str] = []
    for group in ("diagnosis", "treatment", "monitoring"):
        for d in DISEASES:
            names.extend(c for c in getattr(d, group) if c not in names)
    names.extend(code for code, _ in ROUTINE if code not in names)
    width = max(4, len(str(max(num_noise_codes - 1, 0))))
    names.extend(f"NOISE:{k:0{width}d}" for k in range(num_noise_codes))
    return np.asarray(names)


@dataclasses.dataclass(frozen=True)
class _Tables:
    """Catalogue indices of each disease's code groups, padded to a rectangle (-1)."""

    diagnosis: np.ndarray  # int64[n_diseases, max_group]
    treatment: np.ndarray
    monitoring: np.ndarray
    group_sizes: np.ndarray  # int64[3, n_diseases]
    routine: np.ndarray  # int64[n_routine]
    routine_p: np.ndarray
    noise_start: int
    noise_cdf: CdfSampler  # the Zipf law of the background codes
    num_codes: int
    is_diagnosis: np.ndarray  # bool[n_codes]: ICD10 codes, the next-visit label space


def _tables(num_noise_codes: int) -> _Tables:
    names = code_catalogue(num_noise_codes)
    index = {n: i for i, n in enumerate(names.tolist())}

    def rect(group: str) -> np.ndarray:
        width = max(len(getattr(d, group)) for d in DISEASES)
        out = np.full((len(DISEASES), width), -1, dtype=np.int64)
        for k, d in enumerate(DISEASES):
            out[k, : len(getattr(d, group))] = [index[c] for c in getattr(d, group)]
        return out

    sizes = np.array([[len(getattr(d, g)) for d in DISEASES] for g in ("diagnosis", "treatment", "monitoring")])
    weights = 1.0 / np.arange(1, num_noise_codes + 1) ** NOISE_ZIPF_EXPONENT
    noise_start = len(names) - num_noise_codes
    return _Tables(
        diagnosis=rect("diagnosis"),
        treatment=rect("treatment"),
        monitoring=rect("monitoring"),
        group_sizes=sizes,
        routine=np.array([index[c] for c, _ in ROUTINE]),
        routine_p=np.array([p for _, p in ROUTINE]),
        noise_start=noise_start,
        noise_cdf=CdfSampler(np.cumsum(weights) / weights.sum()),
        num_codes=len(names),
        is_diagnosis=np.char.startswith(names, "ICD10:"),
    )


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised over uint64."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def assign_splits(patient_id: np.ndarray, seed: int) -> np.ndarray:
    """int8 split (0 train, 1 val, 2 test) from a hash of (seed, patient id): independent of position."""
    with np.errstate(over="ignore"):
        h = _splitmix64(patient_id.astype(np.uint64) ^ _splitmix64(np.full(1, seed, dtype=np.uint64)))
    u = (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)
    edges = np.cumsum(SPLIT_FRACTIONS)[:-1]
    return np.searchsorted(edges, u, side="right").astype(np.int8)


class CdfSampler:
    """Inverse-CDF lookup `min(searchsorted(cdf, u, 'right'), len(cdf) - 1)` through a guide table.

    u in [0, 1) falls in bucket b = floor(u * 2**bits) (exact: a power-of-two scale); every cdf entry below
    the bucket counts, every entry at or above its upper edge does not, and only the few entries inside the
    bucket (`span`, 1 for the generator's Zipf law at 14 bits) are compared. Equal to `np.searchsorted` for
    every u, about 4x faster than its binary search over 1,000 entries.
    """

    def __init__(self, cdf: np.ndarray, bits: int = 14) -> None:
        self.cdf = np.asarray(cdf, dtype=np.float64)
        self.scale = float(1 << bits)
        edges = np.arange((1 << bits) + 1, dtype=np.float64) / self.scale
        self.first = np.searchsorted(self.cdf, edges[:-1], side="right").astype(np.int32)  # entries <= b / G
        self.span = int(np.max(np.searchsorted(self.cdf, edges[1:], side="left") - self.first))
        self.padded = np.concatenate([self.cdf, np.full(self.span, np.inf)])

    def __call__(self, u: np.ndarray) -> np.ndarray:
        """u: float64[...] in [0, 1) -> int[...] indices."""
        base = self.first[(u * self.scale).astype(np.int32)]
        index = base.astype(np.int64)
        for j in range(self.span):
            index += self.padded[base + j] <= u
        return np.minimum(index, len(self.cdf) - 1)


def _zipf(rng: np.random.Generator, sampler: CdfSampler, size: int) -> np.ndarray:
    return sampler(rng.random(size))


@dataclasses.dataclass
class _Block:
    """One block of patients, every array indexed by patient within the block (or by visit / token)."""

    records: dict[str, np.ndarray]
    offsets: np.ndarray
    patients: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]


def _generate_block(seed: int, stream: str, block: int, tables: _Tables, hidden_frailty: bool = True) -> _Block:
    rng = np.random.default_rng([seed, STREAMS[stream], block])
    n = BLOCK_SIZE
    n_dis = len(DISEASES)

    # Patients: sex, latent frailty, age at the first visit and follow-up length (days).
    sex = (rng.random(n) < 0.5).astype(np.int8)
    frailty = rng.standard_normal(n)
    child = rng.random(n) < 0.12
    start_years = np.where(child, rng.uniform(2, 18, n), 18 + 70 * rng.beta(1.6, 1.4, n))
    follow_years = np.minimum(0.25 + rng.exponential(4.0, n), 20.0)
    start = start_years * DAYS_PER_YEAR
    end = start + follow_years * DAYS_PER_YEAR

    # Disease onsets (age in days, inf = never by the end of the record) and treatment starts.
    risk_mult = np.exp(0.6 * frailty - 0.18)
    onset = np.full((n, n_dis), np.inf)
    for name in ONSET_ORDER:
        k = DISEASE_INDEX[name]
        d = DISEASES[k]
        lo, hi = d.age_range[0] * DAYS_PER_YEAR, d.age_range[1] * DAYS_PER_YEAR
        eligible = end >= lo
        has = eligible & (rng.random(n) < np.minimum(d.base_risk * risk_mult, 0.95))
        onset_age = lo + rng.random(n) * (np.minimum(hi, end) - lo)
        cand = np.where(has, onset_age, np.inf)
        for parent, child_name, p in LINKS:
            if child_name != name:
                continue
            follows = rng.random(n) < p
            lag = rng.exponential(2.0 * DAYS_PER_YEAR, n)
            cand = np.minimum(cand, np.where(follows, onset[:, DISEASE_INDEX[parent]] + lag, np.inf))
        onset[:, k] = np.where(cand <= end, cand, np.inf)
    never_treated = rng.random((n, n_dis)) < P_NEVER_TREATED
    treat_start = np.where(never_treated, np.inf, onset + rng.exponential(TREATMENT_DELAY_DAYS, (n, n_dis)))

    # Visits: a first visit, background visits (rate varies by patient), follow-up visits after onsets.
    rate = np.exp(rng.normal(0.0, 0.5, n) + 0.3 * frailty) * (1.0 + start_years / 80.0)
    n_background = rng.poisson(rate * follow_years)
    fu_start = np.maximum(onset, start[:, None])
    fu_span = np.clip(np.minimum(onset + 3 * DAYS_PER_YEAR, end[:, None]) - fu_start, 0.0, None)
    fu_mean = np.array([d.followup_visits for d in DISEASES]) * fu_span / (3 * DAYS_PER_YEAR)
    n_followup = rng.poisson(np.where(np.isfinite(onset), fu_mean, 0.0))  # [n, n_dis]
    bg_patient = np.repeat(np.arange(n), n_background)
    bg_age = start[bg_patient] + rng.random(len(bg_patient)) * (end - start)[bg_patient]
    fu_flat = n_followup.ravel()
    fu_patient = np.repeat(np.repeat(np.arange(n), n_dis), fu_flat)
    fu_disease = np.repeat(np.tile(np.arange(n_dis), n), fu_flat)
    fu_age = fu_start.ravel().repeat(fu_flat) + rng.random(len(fu_patient)) * fu_span.ravel().repeat(fu_flat)
    v_patient = np.concatenate([np.arange(n), bg_patient, fu_patient])
    v_age = np.concatenate([start, bg_age, fu_age])
    v_reason = np.concatenate([np.full(n + len(bg_patient), -1), fu_disease])
    order = np.argsort(v_patient * 1e5 + v_age)  # by patient, then age (ages < 1e5 days: exact in float64)
    v_patient, v_age, v_reason = v_patient[order], v_age[order], v_reason[order]
    v_count = np.bincount(v_patient, minlength=n)
    v_first = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(v_count, out=v_first[1:])
    v_index = np.arange(len(v_patient)) - v_first[v_patient]  # visit number within patient

    labels: dict[str, np.ndarray] = {}
    if stream == "finetune":
        onset_before_index = onset  # the renal task reads these; the outcome task redraws later HF onsets
        onset, index_visit, t_index, labels = _outcome_task(
            rng, onset, treat_start, frailty, sex, v_age, v_first, v_count, hidden_frailty
        )

    # Emissions per (visit, disease): diagnosis, treatment, monitoring codes.
    active = onset[v_patient] <= v_age[:, None]  # [V, n_dis]
    same_prev = np.zeros(len(v_patient), dtype=bool)
    same_prev[1:] = v_patient[1:] == v_patient[:-1]
    was_active = np.zeros_like(active)
    was_active[1:] = active[:-1] & same_prev[1:, None]
    kind = np.where(active & ~was_active, 0, np.where(v_reason[:, None] == np.arange(n_dis), 1, 2))
    treated = active & (treat_start[v_patient] <= v_age[:, None])
    u = rng.random((3,) + active.shape, dtype=np.float32)
    emit = (
        active & (u[0] < np.take(P_DIAGNOSIS, kind)),
        treated & (u[1] < np.take(P_TREATMENT, kind)),
        active & (u[2] < np.take(P_MONITORING, kind)),
    )
    # A patient keeps a preferred code within each group (first listed most often); 20% of events vary.
    event_visit, event_code = [], []
    for g, table in enumerate((tables.diagnosis, tables.treatment, tables.monitoring)):
        sizes = tables.group_sizes[g]
        preferred = np.minimum(rng.geometric(0.6, (n, n_dis)) - 1, sizes - 1)
        vv, dd = np.nonzero(emit[g])
        choice = np.where(rng.random(len(vv)) < 0.8, preferred[v_patient[vv], dd], rng.integers(0, sizes[dd], len(vv)))
        event_visit.append(vv)
        event_code.append(table[dd, choice])
    vv, rr = np.nonzero(rng.random((len(v_patient), len(tables.routine)), dtype=np.float32) < tables.routine_p)
    event_visit.append(vv)
    event_code.append(tables.routine[rr])

    # Background codes: a patient-specific rate and a few preferred codes, the rest from a global Zipf law.
    noise_rate = rng.gamma(2.0, 0.75, n)
    n_noise = rng.poisson(noise_rate[v_patient])
    coded = np.bincount(np.concatenate(event_visit), minlength=len(v_patient)) > 0
    n_noise = np.where(~coded & (n_noise == 0), 1, n_noise)  # every visit records at least one code
    nv = np.repeat(np.arange(len(v_patient)), n_noise)
    favourite = _zipf(rng, tables.noise_cdf, n * NOISE_PREFERRED).reshape(n, NOISE_PREFERRED)
    pick_fav = rng.random(len(nv)) < P_NOISE_PREFERRED
    noise = np.where(
        pick_fav,
        favourite[v_patient[nv], rng.integers(0, NOISE_PREFERRED, len(nv))],
        _zipf(rng, tables.noise_cdf, len(nv)),
    )
    event_visit.append(nv)
    event_code.append(tables.noise_start + noise)

    # Tokens: unique (visit, code) pairs, sorted by visit then catalogue order (diagnoses first).
    key = np.concatenate(event_visit) * tables.num_codes + np.concatenate(event_code)
    key = np.sort(key.astype(np.int32) if len(v_patient) * tables.num_codes < 2**31 else key)
    key = key[np.concatenate([[True], key[1:] != key[:-1]])]
    t_visit, t_code = np.divmod(key.astype(np.int64), tables.num_codes)
    t_patient = v_patient[t_visit]

    if stream == "finetune":
        # Next-visit diagnoses are the label; the record keeps the history up to the index visit.
        has_index = index_visit >= 0
        is_next = has_index[t_patient] & (v_index[t_visit] == index_visit[t_patient] + 1)
        nxt = np.flatnonzero(is_next & tables.is_diagnosis[t_code])
        labels["next_visit"] = t_code[nxt].astype(np.int32)
        labels["next_visit_offsets"] = np.concatenate([[0], np.cumsum(np.bincount(t_patient[nxt], minlength=n))])
        keep = ~has_index[t_patient] | (v_index[t_visit] <= index_visit[t_patient])
        t_visit, t_code, t_patient = t_visit[keep], t_code[keep], t_patient[keep]
        # Its own random stream: the draws above, and so every other array, do not depend on this task.
        renal_rng = np.random.default_rng([seed, STREAMS[stream], block, RENAL_RNG_TAG])
        labels.update(_renal_task(
            renal_rng, onset_before_index, treat_start, frailty, sex, v_age, v_first, v_count, t_index,
            t_visit, t_code, tables, hidden_frailty,
        ))  # fmt: skip

    t_age = v_age[t_visit]
    first_age = v_age[v_first[:-1]]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(t_patient, minlength=n))]).astype(np.int64)
    records = dict(
        codes=t_code.astype(np.int32),
        visit=v_index[t_visit].astype(np.int32),
        age=(t_age / DAYS_PER_MONTH).astype(np.int32),
        time=(t_age - first_age[t_patient]).astype(np.int32),
    )
    patients = dict(
        sex=sex,
        birth_year=np.floor(EXTRACT_YEAR - end / DAYS_PER_YEAR).astype(np.int16),
        onset_age_months=np.where(np.isfinite(onset), onset / DAYS_PER_MONTH, -1).astype(np.int32),
    )
    return _Block(records, offsets, patients, labels)


def _outcome_task(
    rng: np.random.Generator,
    onset: np.ndarray,
    treat_start: np.ndarray,
    frailty: np.ndarray,
    sex: np.ndarray,
    v_age: np.ndarray,
    v_first: np.ndarray,
    v_count: np.ndarray,
    hidden_frailty: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Index visit, outcome probability and label; heart-failure onsets after the index follow the label.

    Patients with at least 4 visits get an index visit uniformly among visits 3 .. n-1 (1-based), so the
    history has >= 3 visits and a next visit exists. Prevalent cases (onset at or before the index date)
    are not eligible (`outcome = -1`). Returns the onsets, the index visit, the index date (age in days,
    NaN without an index visit) and the labels: `outcome`, `outcome_p` (the true risk),
    `outcome_p_visible` (`visible_risk`) and `index_visit`. `hidden_frailty=False` drops the frailty term.
    """
    n = len(frailty)
    c = OUTCOME_COEF
    c_frailty = c["frailty"] if hidden_frailty else 0.0
    hf = DISEASE_INDEX[OUTCOME_DISEASE]
    has_index = v_count >= 4
    index_visit = np.where(has_index, 2 + np.floor(rng.random(n) * np.maximum(v_count - 3, 1)), -1).astype(np.int64)
    t_index = np.where(has_index, v_age[v_first[:-1] + np.maximum(index_visit, 0)], np.nan)
    eligible = has_index & ~(onset[:, hf] <= t_index)

    def active(name: str) -> np.ndarray:
        return onset[:, DISEASE_INDEX[name]] <= t_index

    htn = DISEASE_INDEX["hypertension"]
    dm, ckd = DISEASE_INDEX["type2_diabetes"], DISEASE_INDEX["chronic_kidney_disease"]
    untreated = active("hypertension") & (treat_start[:, htn] > t_index - 182.0)
    recent = ((onset[:, dm] > t_index - 365.0) & active("type2_diabetes")) | (
        (onset[:, ckd] > t_index - 365.0) & active("chronic_kidney_disease")
    )
    ckd_after_dm = active("chronic_kidney_disease") & active("type2_diabetes") & (onset[:, ckd] > onset[:, dm])
    # Visits in the 6 months up to the index visit (the index visit included).
    v_patient = np.repeat(np.arange(n), v_count)
    in_window = (v_age >= (t_index - 182.0)[v_patient]) & (v_age <= t_index[v_patient])
    recent_visits = np.bincount(v_patient[in_window], minlength=n)
    # The frailty term sits between the head and the tail of the sum, as it always has: the same float
    # operations in the same order keep `outcome_p` bitwise what it was, and with `c_frailty = 0` the sum
    # is bitwise the one without it (x + 0.0 == x), so the visible risk then equals the true one exactly.
    head = c["intercept"] + c["age_per_decade"] * (t_index / DAYS_PER_YEAR - 60.0) / 10.0 + c["male"] * sex
    presence = sum(
        c[name] * active(name) for name in ("hypertension", "type2_diabetes", "chronic_kidney_disease", "copd")
    )

    def with_frailty(term: np.ndarray | float) -> np.ndarray:
        return (
            head
            + term
            + presence
            + c["untreated_hypertension_6m"] * untreated
            + c["recent_onset_1y"] * recent
            + c["ckd_after_diabetes"] * ckd_after_dm
            + c["frequent_visits_6m"] * (recent_visits >= 3)
        )

    log_hazard = with_frailty(c_frailty * frailty)
    # Capped below 1 so that every label stays uncertain and the conditional onset below is defined.
    p = window_risk(log_hazard)
    p_visible = np.full(n, np.nan)
    p_visible[eligible] = visible_risk(with_frailty(0.0)[eligible], c_frailty)
    label = rng.random(n) < p
    # Onset after the index date consistent with the label (exponential hazard, conditioned on the window).
    u = rng.random(n)
    rate = -np.log1p(-np.where(eligible, p, 0.5)) / OUTCOME_WINDOW_DAYS
    in_window_onset = t_index - np.log1p(-u * p) / rate
    later_onset = t_index + OUTCOME_WINDOW_DAYS + rng.exponential(1.0, n) / rate
    onset = onset.copy()
    onset[:, hf] = np.where(eligible, np.where(label, in_window_onset, later_onset), onset[:, hf])
    labels = dict(
        outcome=np.where(eligible, label, -1).astype(np.int8),
        outcome_p=np.where(eligible, p, np.nan).astype(np.float32),
        outcome_p_visible=np.where(eligible, p_visible, np.nan).astype(np.float32),
        index_visit=index_visit.astype(np.int32),
    )
    return onset, index_visit, t_index, labels


def window_risk(log_hazard: np.ndarray) -> np.ndarray:
    """P(event within the outcome window) for a constant hazard `exp(log_hazard)` per year, capped at RISK_CAP."""
    return _risk_of_hazard(np.exp(log_hazard))


def _risk_of_hazard(hazard: np.ndarray) -> np.ndarray:
    return np.minimum(1.0 - np.exp(-hazard * OUTCOME_WINDOW_DAYS / DAYS_PER_YEAR), RISK_CAP)


_NODES, _WEIGHTS = hermegauss(FRAILTY_QUADRATURE_NODES)
_WEIGHTS = _WEIGHTS / _WEIGHTS.sum()


def visible_risk(log_hazard_without_frailty: np.ndarray, c_frailty: float) -> np.ndarray:
    """`E_f[window_risk(lh + c_frailty * f)]` over the frailty's prior f ~ N(0, 1): float64[n].

    The risk given what the record shows, with the hidden frailty integrated out over its prior. It is not
    the posterior given the record: frailty also raises disease onsets and visit rates, which the record
    shows, so a model could in principle edge slightly past it. Gauss-Hermite quadrature (probabilists'
    weight exp(-f^2 / 2), FRAILTY_QUADRATURE_NODES nodes, weights normalised to sum to 1), written as the
    frailty-free risk plus weighted differences from it: with `c_frailty = 0` every node's hazard is the
    frailty-free one times exp(0) = 1, every difference is exactly 0 and the result is bitwise
    `window_risk(lh)`. Accuracy: ~1e-12 where the risk stays well below the cap; within ~1e-4 near it,
    where the cap puts a kink into the integrand (a handful of patients; immaterial to any AUROC).
    """
    hazard = np.exp(np.asarray(log_hazard_without_frailty, dtype=np.float64))
    centre = _risk_of_hazard(hazard)
    at_nodes = _risk_of_hazard(hazard[:, None] * np.exp(c_frailty * _NODES)[None, :])
    return centre + (at_nodes - centre[:, None]) @ _WEIGHTS


def _renal_task(
    rng: np.random.Generator,
    onset: np.ndarray,
    treat_start: np.ndarray,
    frailty: np.ndarray,
    sex: np.ndarray,
    v_age: np.ndarray,
    v_first: np.ndarray,
    v_count: np.ndarray,
    t_index: np.ndarray,
    t_visit: np.ndarray,
    t_code: np.ndarray,
    tables: _Tables,
    hidden_frailty: bool = True,
) -> dict[str, np.ndarray]:
    """Renal decline within the outcome window after the index date: probability and label.

    Same index visit and history cut as the heart-failure outcome; every patient with an index visit is
    eligible (an acute kidney injury can recur; there is no prevalent-case exclusion). `onset` holds the
    onsets as simulated before the index (not the heart-failure onsets the outcome task redraws after it);
    `t_visit`, `t_code`: the tokens of the cut record (visits at or before the index visit). The label comes
    from `rng`, the task's own stream; nothing else in the cohort depends on it, and renal decline leaves
    no trace in the record (the record ends at the index visit). Terms: RENAL_COEF, docs/tasks.md.
    """
    n = len(frailty)
    c = RENAL_COEF
    c_frailty = c["frailty"] if hidden_frailty else 0.0
    eligible = np.isfinite(t_index)
    t = np.where(eligible, t_index, 0.0)  # defined arithmetic for the patients without an index visit
    idx = DISEASE_INDEX

    def active(name: str) -> np.ndarray:
        return eligible & (onset[:, idx[name]] <= t)

    dm, ckd = idx["type2_diabetes"], idx["chronic_kidney_disease"]
    ckd_after_dm = active("chronic_kidney_disease") & active("type2_diabetes") & (onset[:, ckd] > onset[:, dm])
    new_start = np.zeros(n, dtype=bool)
    for name in ("hypertension", "heart_failure"):
        start = treat_start[:, idx[name]]
        new_start |= eligible & (start > t - 90.0) & (start <= t)
    dm_untreated = active("type2_diabetes") & (onset[:, dm] <= t - 180.0) & (treat_start[:, dm] > onset[:, dm] + 180.0)
    # Visits (the index visit included) in the last 90 days and in the 275 days before those.
    v_patient = np.repeat(np.arange(n), v_count)
    before = t[v_patient] - v_age
    recent = np.bincount(v_patient[(before >= 0.0) & (before < 90.0)], minlength=n)
    earlier = np.bincount(v_patient[(before >= 90.0) & (before < 365.0)], minlength=n)
    covers_year = v_age[v_first[:-1]] <= t - 365.0  # the record reaches back a full year
    acceleration = eligible & covers_year & (recent >= 3) & (earlier <= 1)
    # Kidney-monitoring codes (eGFR, creatinine) in the record's last 365 days.
    is_monitor = np.zeros(tables.num_codes, dtype=bool)
    is_monitor[tables.monitoring[ckd][tables.monitoring[ckd] >= 0]] = True
    visits = t_visit[is_monitor[t_code]]
    monitored = np.zeros(n, dtype=bool)
    monitored[v_patient[visits][before[visits] < 365.0]] = True
    unmonitored = active("chronic_kidney_disease") & (onset[:, ckd] <= t - 365.0) & ~monitored

    head = c["intercept"] + c["age_per_decade"] * (t / DAYS_PER_YEAR - 60.0) / 10.0 + c["male"] * sex
    presence = sum(c[name] * active(name) for name in ("chronic_kidney_disease", "type2_diabetes", "hypertension",
                                                       "heart_failure"))  # fmt: skip

    def with_frailty(term: np.ndarray | float) -> np.ndarray:
        return (
            head
            + term
            + presence
            + c["ckd_after_diabetes"] * ckd_after_dm
            + c["new_raas_or_diuretic_90d"] * new_start
            + c["diabetes_untreated_180d"] * dm_untreated
            + c["visit_acceleration"] * acceleration
            + c["ckd_unmonitored_1y"] * unmonitored
        )

    p = window_risk(with_frailty(c_frailty * frailty))
    p_visible = np.full(n, np.nan)
    p_visible[eligible] = visible_risk(with_frailty(0.0)[eligible], c_frailty)
    label = rng.random(n) < p
    return dict(
        renal_decline=np.where(eligible, label, -1).astype(np.int8),
        renal_decline_p=np.where(eligible, p, np.nan).astype(np.float32),
        renal_decline_p_visible=np.where(eligible, p_visible, np.nan).astype(np.float32),
    )


def default_workers() -> int:
    """Threads `generate_cohort` uses by default: the CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_T = TypeVar("_T")
_R = TypeVar("_R")


def _map(pool: ThreadPoolExecutor | None, fn: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
    """`fn` over `items` in order, on the pool's threads if there is one."""
    return list(pool.map(fn, items)) if pool is not None else [fn(x) for x in items]


def generate_cohort(
    num_patients: int,
    seed: int = 0,
    stream: str = "pretrain",
    num_noise_codes: int = 1000,
    workers: int | None = None,
    *,
    hidden_frailty: bool = True,
) -> Cohort:
    """The first `num_patients` patients of stream `stream` (`pretrain` | `finetune`) for `seed`.

    Blocks are independent (each has its own generator), so `workers` threads generate them concurrently
    (numpy's sorts, random fills and element-wise kernels run without the GIL); the result is bitwise the
    same for any `workers`. `workers=None`: `default_workers()`; `1`: serial, no threads.

    Labels (finetune stream): `outcome` int8 (heart failure within 365 days; 1/0, -1 not eligible),
    `outcome_p` float32 (the true probability; NaN if not eligible), `outcome_p_visible` float32 (the
    probability with the hidden frailty integrated out over its prior), the same three for renal decline
    (`renal_decline`, `renal_decline_p`, `renal_decline_p_visible`), `index_visit` int32, ragged
    `next_visit` (diagnosis code indices of the visit after the index). Both streams carry
    `onset_age_months` int32[n, 8] (-1 = no onset), the generator's ground truth for checks.

    `hidden_frailty=False` drops the frailty term from both outcome hazards (the visible risks then equal
    the true ones exactly); the frailty still shapes onsets and visits. A different cohort: its labels
    differ, and so do the draws after them (post-index emissions), so only the default is the benchmark's.
    """
    if not isinstance(num_patients, int | np.integer) or num_patients <= 0:
        raise ValueError(f"num_patients must be a positive integer, got {num_patients!r}")
    if stream not in STREAMS:
        raise ValueError(f"stream {stream!r} unknown; expected one of {sorted(STREAMS)}")
    if num_noise_codes < 1:
        raise ValueError(f"num_noise_codes must be >= 1, got {num_noise_codes}")
    if workers is None:
        workers = default_workers()
    if not isinstance(workers, int | np.integer) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    tables = _tables(num_noise_codes)
    n_blocks = -(-num_patients // BLOCK_SIZE)
    workers = min(int(workers), n_blocks)
    pool = ThreadPoolExecutor(workers, thread_name_prefix="synthetic") if workers > 1 else None
    try:
        blocks = _map(pool, lambda b: _generate_block(seed, stream, b, tables, hidden_frailty), range(n_blocks))
        last = num_patients - (n_blocks - 1) * BLOCK_SIZE
        blocks[-1] = _truncate_block(blocks[-1], last)
        cohort = _assemble(blocks, num_patients, seed, stream, num_noise_codes, pool)
        if not hidden_frailty:
            cohort.meta["hidden_frailty"] = False
        return cohort
    finally:
        if pool is not None:
            pool.shutdown()


def _truncate_block(block: _Block, n: int) -> _Block:
    end = block.offsets[n]
    labels = {}
    for name, value in block.labels.items():
        if name.endswith("_offsets"):
            continue
        if name + "_offsets" in block.labels:
            off = block.labels[name + "_offsets"]
            labels[name], labels[name + "_offsets"] = value[: off[n]], off[: n + 1]
        else:
            labels[name] = value[:n]
    return _Block(
        records={k: v[:end] for k, v in block.records.items()},
        offsets=block.offsets[: n + 1],
        patients={k: v[:n] for k, v in block.patients.items()},
        labels=labels,
    )


def _concat_offsets(parts: list[np.ndarray]) -> np.ndarray:
    shifted, base = [np.zeros(1, dtype=np.int64)], 0
    for off in parts:
        shifted.append(off[1:] + base)
        base += int(off[-1])
    return np.concatenate(shifted).astype(np.int64)


def _assemble(
    blocks: list[_Block], n: int, seed: int, stream: str, num_noise_codes: int, pool: ThreadPoolExecutor | None = None
) -> Cohort:
    """One cohort from its blocks; the per-field concatenations (memory copies) run on `pool` if given."""
    record_keys, patient_keys = list(blocks[0].records), list(blocks[0].patients)
    joined = _map(
        pool,
        np.concatenate,
        [[b.records[k] for b in blocks] for k in record_keys] + [[b.patients[k] for b in blocks] for k in patient_keys],
    )
    records = dict(zip(record_keys, joined[: len(record_keys)], strict=True))
    patients = dict(zip(patient_keys, joined[len(record_keys) :], strict=True))
    labels: dict[str, np.ndarray] = {"onset_age_months": patients.pop("onset_age_months")}
    for name in blocks[0].labels:
        if name.endswith("_offsets"):
            labels[name] = _concat_offsets([b.labels[name] for b in blocks])
        else:
            labels[name] = np.concatenate([b.labels[name] for b in blocks])
    patient_id = STREAMS[stream] * 10**12 + np.arange(n, dtype=np.int64)
    return Cohort(
        **records,
        offsets=_concat_offsets([b.offsets for b in blocks]),
        patient_id=patient_id,
        split=assign_splits(patient_id, seed),
        **patients,
        code_names=code_catalogue(num_noise_codes),
        labels=labels,
        meta=dict(generator="ehrjax.synthetic", seed=seed, stream=stream, num_noise_codes=num_noise_codes),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ehrjax.data.synthetic", description=__doc__.split("\n")[0])
    parser.add_argument("--num-patients", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stream", default="pretrain", help=f"one of {sorted(STREAMS)}")
    parser.add_argument("--num-noise-codes", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=None, help="threads (default: the usable CPU cores; 1: serial)")
    parser.add_argument("--out", type=Path, required=True, help="output .npz path")
    args = parser.parse_args(argv)
    try:
        out = check_output_path(args.out, ".npz", "--out")
        cohort = generate_cohort(args.num_patients, args.seed, args.stream, args.num_noise_codes, args.workers)
        # The summary is computed while the file is written (the write is mostly system calls, without the GIL).
        with ThreadPoolExecutor(1, thread_name_prefix="summary") as pool:
            summary = pool.submit(cohort.format_summary)
            cohort.save(out)
            summary_text = summary.result()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.stream} stream, seed {args.seed}, splits {', '.join(SPLITS)})")
    print(summary_text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
