"""Forward + backward throughput of BEHRT's MLM step at a fixed padded shape.

    python benchmarks/model_step.py --presets small,medium,large --batch 32 --seq 128 --dtype float32

Each row of the batch is one full-length patient (no padding, so padded and real tokens coincide); ~15% of
positions are gathered for the MLM loss. The step is `jax.value_and_grad` of the loss with dropout on, jitted
over the split parameter state. Compilation is timed separately and excluded; each timed step ends with
`block_until_ready`; the figure is the median over `--repeats` steps.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from ehrjax.config import MODEL_PRESETS, model_config
from ehrjax.data.vocab import CLS, MASK, NUM_SPECIAL, SEP
from ehrjax.models import Behrt


def make_batch(batch: int, seq: int, vocab: int, mask_prob: float, seed: int = 0) -> dict[str, jax.Array]:
    """Full rows of `[CLS] codes [SEP] codes [SEP] ...` (visits of 4 codes) and gathered MLM targets."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(NUM_SPECIAL, vocab, (batch, seq)).astype(np.int32)
    pos = np.arange(seq)
    is_sep = (pos % 5 == 0) & (pos > 0)
    codes[:, is_sep] = SEP
    codes[:, 0] = CLS
    visits = np.broadcast_to(np.concatenate([[0], np.cumsum(is_sep)[:-1]]), (batch, seq)).astype(np.int32)
    ages = (rng.integers(0, 80 * 12, (batch, 1)) + 6 * visits).astype(np.int32)
    num_masked = max(1, math.ceil(mask_prob * seq))
    candidates = np.flatnonzero(codes[0] >= NUM_SPECIAL)
    positions = np.stack([rng.choice(candidates, num_masked, replace=False) for _ in range(batch)]).astype(np.int32)
    targets = np.take_along_axis(codes, positions, axis=1)
    np.put_along_axis(codes, positions, MASK, axis=1)
    arrays = {
        "codes": codes,
        "ages": ages,
        "visits": visits,
        "segment_ids": np.ones((batch, seq), np.int32),
        "mlm_positions": positions,
        "mlm_targets": targets,
    }
    return {k: jnp.asarray(v) for k, v in arrays.items()}


def train_flops_per_step(cfg, vocab: int, batch: int, seq: int, num_masked: int) -> float:
    """Analytic forward+backward FLOPs: 6 x matmul params x tokens, attention, MLM head on masked slots."""
    E, H, M, L = cfg.embed_dim, cfg.hidden_dim, cfg.mlp_dim, cfg.num_layers
    tokens = batch * seq
    dense = L * (4 * H * H + 2 * H * M) + (E * H if E != H else 0)
    attention = 12 * L * seq * H  # QK^T and PV, forward 4 x seq x H per token, x3 with backward
    head = H * H + H * vocab
    return 6.0 * dense * tokens + attention * tokens + 6.0 * head * batch * num_masked


def bench_preset(preset: str, args: argparse.Namespace) -> dict[str, float]:
    cfg = model_config(preset)
    cfg.dtype = args.dtype
    cfg.scan_layers = args.scan
    model = Behrt(cfg, args.vocab, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    batch = make_batch(args.batch, args.seq, args.vocab, args.mask_prob)
    inputs = ("codes", "ages", "visits", "segment_ids")

    def loss_fn(params, key):
        m = nnx.merge(graphdef, params, rest)
        hidden = m.encode(*(batch[k] for k in inputs), deterministic=False, rngs=key)
        logits = m.mlm_logits(hidden, batch["mlm_positions"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["mlm_targets"]).mean()

    step = jax.jit(jax.value_and_grad(loss_fn))
    key = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = step.lower(params, key).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(params, key))  # warm-up
    times = []
    for i in range(args.repeats):
        k = jax.random.fold_in(key, i)
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, k))
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    tokens = args.batch * args.seq
    flops = train_flops_per_step(cfg, args.vocab, args.batch, args.seq, batch["mlm_positions"].shape[1])
    return {
        "params": n_params,
        "compile_s": compile_s,
        "step_ms": 1e3 * step_s,
        "tokens_per_s": tokens / step_s,
        "gflops": flops / step_s / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--presets", default="small,medium,large", help="comma-separated model presets")
    parser.add_argument("--batch", type=int, default=32, help="rows per batch")
    parser.add_argument("--seq", type=int, default=128, help="tokens per row")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    parser.add_argument("--vocab", type=int, default=1200, help="vocabulary size (1k noise codes + clinical)")
    parser.add_argument("--mask-prob", type=float, default=0.15, help="share of positions with an MLM label")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps; the median is reported")
    parser.add_argument("--scan", action="store_true", help="model.scan_layers=True")
    args = parser.parse_args()
    presets = [p.strip() for p in args.presets.split(",") if p.strip()]
    unknown = [p for p in presets if p not in MODEL_PRESETS]
    if unknown:
        parser.error(f"--presets: unknown preset(s) {unknown}; expected some of {sorted(MODEL_PRESETS)}")

    print(
        f"backend={jax.default_backend()} devices={jax.devices()} batch={args.batch} seq={args.seq} "
        f"dtype={args.dtype} vocab={args.vocab} mask_prob={args.mask_prob} scan={args.scan}"
    )
    header = "| preset | params | compile s | step ms (median) | tokens/s | model GFLOP/s |"
    print(header)
    print("|---|---:|---:|---:|---:|---:|")
    for preset in presets:
        r = bench_preset(preset, args)
        print(
            f"| {preset} | {r['params']:,} | {r['compile_s']:.1f} | {r['step_ms']:.1f} | "
            f"{r['tokens_per_s']:,.0f} | {r['gflops']:.1f} |"
        )


if __name__ == "__main__":
    main()
