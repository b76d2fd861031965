"""Batching modes side by side: padding efficiency, compiled shapes, planning time and MLM train-step throughput.

    python benchmarks/batching.py                       # 100k synthetic patients, max_len 512, small preset
    python benchmarks/batching.py --max-len 256 --steps 0
    python benchmarks/batching.py --max-len 256 --steps 0 --time-tokens   # gap tokens between visits

Every mode sees the same tokenised cohort (`ehrjax.data.synthetic.generate_cohort`, stream `pretrain`; a
lognormal-length stand-in with `--stand-in`) and the same token-slot budget per step (`--tokens-per-batch`):
`pack` rows of `max_len`, `bucket` power-of-two rows, `pad_max` one patient per `max_len` row. The train step
is one full MLM step (on-device gather, masking, forward, backward, AdamW) jitted with the batch index
traced; after compiling every shape, modes take turns for `--rounds` rounds of `--steps` steps, with the device
synchronised after each step. Throughput counts real (non-padding) tokens; `slots/s` counts padding too.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ehrjax.config import base_config, model_config
from ehrjax.data.batching import MODES, DeviceBatcher, batch_at, format_padding_report, padding_report, to_device
from ehrjax.data.masking import mask_tokens, num_mlm_slots
from ehrjax.data.tokenize import TokenizedCorpus, tokenize
from ehrjax.data.vocab import CLS, NUM_SPECIAL, Vocab


def synthetic_corpus(num_patients: int, max_len: int, seed: int,
                     time_tokens: bool = False) -> tuple[TokenizedCorpus, int, str]:  # fmt: skip
    """The generator's cohort, tokenised (with gap tokens between visits if `time_tokens`); returns the corpus,
    the vocabulary size and a description."""
    from ehrjax.data.synthetic import generate_cohort

    cohort = generate_cohort(num_patients, seed, "pretrain")
    vocab = Vocab.build(cohort.code_names, cohort.code_counts(), time_tokens=time_tokens)
    corpus = tokenize(cohort, vocab, max_len, time_tokens=time_tokens)
    gaps = ", time tokens" if time_tokens else ""
    return corpus, len(vocab), f"generate_cohort({num_patients}, seed={seed}, stream='pretrain'){gaps}"


def stand_in_corpus(num_patients: int, max_len: int, seed: int) -> tuple[TokenizedCorpus, int, str]:
    """Lognormal lengths (mean about 25 tokens, p99 about 150) with random codes."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(2.744, 0.975, num_patients).round(), 3, max_len).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    vocab_size = 1000
    codes = rng.integers(NUM_SPECIAL, vocab_size, offsets[-1]).astype(np.int32)
    codes[offsets[:-1]] = CLS
    zeros = np.zeros(offsets[-1], np.int32)
    corpus = TokenizedCorpus(codes=codes, ages=zeros + 600, visits=zeros, offsets=offsets, max_len=max_len)
    return corpus, vocab_size, f"lognormal stand-in, {num_patients} patients"


def data_config(args: argparse.Namespace) -> Any:
    data = base_config().data
    data.max_len = data.row_len = args.max_len
    data.rows_per_batch = args.tokens_per_batch // args.max_len
    data.batch_size = args.tokens_per_batch // args.max_len
    data.tokens_per_batch = args.tokens_per_batch
    data.slots_per_row = args.slots_per_row
    data.bucket_min_len = args.bucket_min_len
    return data


def make_train_step(preset: str, vocab_size: int, seed: int, mask_prob: float, slot_factor: float) -> tuple:
    """A jitted MLM train step `step(params, opt_state, plan_or_group, i, key)`; None if the model is missing."""
    try:
        from flax import nnx

        from ehrjax.models import Behrt, mlm_apply
    except ImportError as err:
        print(f"model not available ({err}); skipping the train-step measurement")
        return None
    model = Behrt(model_config(preset), vocab_size, rngs=nnx.Rngs(seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tx = optax.adamw(1e-4, weight_decay=0.01)
    opt_state = tx.init(params)

    def step(params, opt_state, plan, i, key):
        batch = batch_at(plan, i)
        k_mask, k_drop = jax.random.split(key)
        num_slots = num_mlm_slots(batch["codes"].shape[1], mask_prob, slot_factor)
        masked, positions, labels, weights, overflow = mask_tokens(
            k_mask, batch["codes"], vocab_size=vocab_size, mask_prob=mask_prob, num_slots=num_slots
        )
        inputs = {**batch, "codes": masked}

        def loss_fn(params):
            logits = mlm_apply(graphdef, params, rest, inputs, positions, key=k_drop)
            ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
            return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, loss, batch["num_real_tokens"], overflow

    return jax.jit(step, donate_argnums=(0, 1)), params, opt_state


def compile_mode(batcher: DeviceBatcher, train: tuple, seed: int) -> tuple[Any, float, tuple]:
    """Plan epoch 0 and compile the step for each of its shapes; returns (plan, seconds, train)."""
    step, params, opt_state = train
    plan = batcher.plan_epoch(0)
    t0 = time.perf_counter()
    for group in plan.groups:
        params, opt_state, loss, *_ = step(params, opt_state, group, 0, jax.random.key(seed))
    jax.block_until_ready(loss)
    return plan, time.perf_counter() - t0, (step, params, opt_state)


def run_steps(plan: Any, train: tuple, first: int, count: int, seed: int) -> tuple[dict[str, float], tuple]:
    """Time `count` steps from batch `first` of the plan, synchronising after each."""
    step, params, opt_state = train
    seconds, real, slots, overflow = 0.0, 0, 0, 0
    for k in range(first, first + count):
        g, j = (int(x) for x in plan.order[k % plan.num_batches])
        group = plan.groups[g]
        t0 = time.perf_counter()
        params, opt_state, loss, tokens, over = step(params, opt_state, group, j, jax.random.key(seed + k))
        jax.block_until_ready(loss)
        seconds += time.perf_counter() - t0
        real += int(tokens)
        slots += group.shape[0] * group.shape[1]
        overflow += int(over)
    return {"seconds": seconds, "real": real, "slots": slots, "overflow": overflow}, (step, params, opt_state)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-patients", type=int, default=100_000)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--tokens-per-batch", type=int, default=8192)
    parser.add_argument("--slots-per-row", type=int, default=16)
    parser.add_argument("--bucket-min-len", type=int, default=16)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per mode and round (0: padding only)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stand-in", action="store_true", help="lognormal lengths instead of the generator")
    parser.add_argument("--time-tokens", action="store_true", help="a gap token before every visit but the first")
    args = parser.parse_args()

    if args.stand_in and args.time_tokens:
        parser.error("--time-tokens: the stand-in has no visit days; use the generator's cohort")
    if args.stand_in:
        corpus, vocab_size, what = stand_in_corpus(args.num_patients, args.max_len, args.seed)
    else:
        corpus, vocab_size, what = synthetic_corpus(args.num_patients, args.max_len, args.seed, args.time_tokens)
    data = data_config(args)
    lengths = corpus.lengths
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}, ")
    print(f"devices: {jax.devices()}")
    print(f"cohort: {what}; {len(corpus):,} patients, {corpus.num_tokens:,} tokens after truncation to {args.max_len}")
    print(
        f"tokens/patient mean {lengths.mean():.1f} p50 {np.percentile(lengths, 50):.0f} "
        f"p99 {np.percentile(lengths, 99):.0f}; truncated {corpus.num_truncated:,}"
    )
    print(
        f"per step: {args.tokens_per_batch} token slots (pack {data.rows_per_batch} x {args.max_len}, "
        f"{data.slots_per_row} slots/row; bucket from {args.bucket_min_len}; "
        f"pad_max {data.batch_size} x {args.max_len})"
    )
    report = padding_report(corpus, data, seed=args.seed)
    print(format_padding_report(report))
    if args.steps <= 0:
        return
    train = make_train_step(args.preset, vocab_size, args.seed, data.mask_prob, data.mlm_slot_factor)
    if train is None:
        return
    device_corpus = to_device(corpus)
    plans, compile_s = {}, {}
    for mode in MODES:
        batcher = DeviceBatcher.from_config(data, corpus, seed=args.seed, mode=mode, device_corpus=device_corpus)
        plans[mode], compile_s[mode], train = compile_mode(batcher, train, args.seed)
    # Modes take turns, `--steps` steps each per round, so drifting machine load hits them alike.
    totals = {mode: {"seconds": 0.0, "real": 0, "slots": 0, "overflow": 0} for mode in MODES}
    ratios = []
    for r in range(args.rounds):
        rates = {}
        for mode in MODES:
            got, train = run_steps(plans[mode], train, r * args.steps, args.steps, args.seed)
            rates[mode] = got["real"] / got["seconds"]
            for k, v in got.items():
                totals[mode][k] += v
        ratios.append(rates["pack"] / rates["pad_max"])
    print(
        f"\nMLM train step, preset {args.preset} (gather + masking + forward + backward + AdamW), "
        f"{args.rounds} rounds x {args.steps} steps per mode"
    )
    print(f"{'mode':<8} {'real tok/s':>11} {'slots/s':>9} {'step s':>7} {'compile s':>9} {'overflow':>8}")
    for mode, t in totals.items():
        steps = args.rounds * args.steps
        print(
            f"{mode:<8} {t['real'] / t['seconds']:>11,.0f} {t['slots'] / t['seconds']:>9,.0f} "
            f"{t['seconds'] / steps:>7.3f} {compile_s[mode]:>9.1f} {t['overflow'] / max(t['real'], 1):>8.4f}"
        )
    overall = (totals["pack"]["real"] / totals["pack"]["seconds"]) / (
        totals["pad_max"]["real"] / totals["pad_max"]["seconds"]
    )
    print(f"pack / pad_max real tokens/s: {overall:.1f}x (per round: {', '.join(f'{x:.1f}' for x in ratios)})")


if __name__ == "__main__":
    main()
