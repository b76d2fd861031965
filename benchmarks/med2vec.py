"""Med2Vec trainer throughput: visits/s on the pre-training cohort with the default `med2vec` config.

    python benchmarks/med2vec.py                      # base_config(): 20,000 patients, dims 200, 5 epochs
    python benchmarks/med2vec.py --epochs 3 --num-patients 5000

Compilation is excluded (the step is compiled ahead of the loop); each epoch ends with a device sync.
Seconds/epoch is the median over epochs (wall clock); visits/s = visits / median seconds; CPU-s/epoch is
the process's CPU time (user + system, all threads), a figure less at the mercy of other jobs on the machine.
A sanity figure for what was learned: the 3-nearest-neighbour same-disease precision of the code
vectors (chance about 0.11).
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import jax
import numpy as np

from ehrjax.config import base_config
from ehrjax.data.synthetic import DISEASES, generate_cohort
from ehrjax.data.vocab import NUM_SPECIAL, Vocab
from ehrjax.embeddings.med2vec import train_med2vec


def same_disease_precision(vectors: np.ndarray, vocab: Vocab, k: int = 3) -> float:
    """Share of each disease code's k nearest disease codes (cosine) that belong to the same disease."""
    pairs = [
        (vocab.id(c) - NUM_SPECIAL, n) for n, d in enumerate(DISEASES) for c in d.diagnosis + d.treatment + d.monitoring
    ]
    ids, disease = (np.asarray(x) for x in zip(*pairs, strict=True))
    x = vectors[ids] / np.maximum(np.linalg.norm(vectors[ids], axis=1, keepdims=True), 1e-12)
    sim = x @ x.T
    np.fill_diagonal(sim, -np.inf)
    nearest = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return float((disease[nearest] == disease[:, None]).mean())


def main() -> None:
    c = base_config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-patients", type=int, default=c.pretrain.num_patients)
    parser.add_argument("--epochs", type=int, default=c.med2vec.epochs)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()
    c.med2vec.epochs = args.epochs

    t0 = time.perf_counter()
    cohort = generate_cohort(args.num_patients, c.pretrain.seed, "pretrain", c.data.num_noise_codes)
    vocab = Vocab.build(cohort.code_names, cohort.code_counts(), c.data.min_count)
    setup = time.perf_counter() - t0
    m = c.med2vec
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
        f"on {jax.devices()[0].device_kind}; cohort {args.num_patients:,} patients ({setup:.1f}s to generate)"
    )
    print(
        f"med2vec: dim {m.dim}, visit_dim {m.visit_dim}, window {m.window}, batch {m.batch_visits} visits, "
        f"max_codes {m.max_codes}, {m.optimizer} lr {m.learning_rate}"
    )
    result = train_med2vec(cohort, vocab, m, progress=args.progress)
    s = result.stats
    per_epoch = float(np.median(s["epoch_seconds"]))
    cpu_per_epoch = float(np.median(s["epoch_cpu_seconds"]))
    print(
        f"{s['codes']:,} codes, {s['pairs']:,} code pairs, {s['steps_per_epoch']} steps/epoch, "
        f"{s['pairs_per_step']:,} pairs/step, {s['truncated_codes']} codes truncated; "
        f"compile {s['compile_seconds']:.1f}s"
    )
    print(
        f"{'visits':>10} {'epochs':>7} {'s/epoch':>8} {'visits/s':>10} {'CPU-s/epoch':>12} {'final loss':>11} "
        f"{'3-NN prec':>10}"
    )
    print(
        f"{s['visits']:>10,} {len(s['epoch_seconds']):>7} {per_epoch:>8.2f} {s['visits'] / per_epoch:>10,.0f} "
        f"{cpu_per_epoch:>12.2f} "
        f"{result.losses[-1]['loss']:>11.3f} {same_disease_precision(result.code_vectors(), vocab):>10.3f}"
    )


if __name__ == "__main__":
    main()
