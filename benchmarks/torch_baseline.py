"""BEHRT's MLM training step in PyTorch, padded the way the reference study (and common PyTorch practice) does.

    python benchmarks/torch_baseline.py --preset small --max-len 512 --variants pad_max,pad_longest,sorted

The model has ehrjax's architecture (`ehrjax.models.Behrt`): code embedding
(+ projection when `embed_dim != hidden_dim`) + bucketed age + segment (visit % 2) + frozen sinusoidal
position of the visit index, LayerNorm, dropout; a pre-LN `nn.TransformerEncoder` (GELU) with a final
LayerNorm and a key-padding mask; an untied MLM head (dense, GELU, LayerNorm, decoder to the vocabulary).
Differences of torch's stock `nn.TransformerEncoderLayer`, kept (it is what a PyTorch BEHRT uses): a key bias
(softmax-invariant; ehrjax drops it, `num_layers x hidden` parameters) and it applies dropout after the
MLP's GELU too. LayerNorm epsilon is flax's 1e-6.
AdamW (lr 1e-4, weight decay 0.01) as in the reference study.

Data: ehrjax's synthetic `pretrain` cohort, vocabulary and token layout (`tokenize`, truncated to
`--max-len`), train split only, so both frameworks see identical tokens. Padding variants (patients per
batch fixed at `--batch-size`):

- `pad_max`: every patient padded to `--max-len` (the reference study: 512 or `max_position`), random batches;
- `pad_longest`: random batches padded to their longest patient;
- `sorted`: patients sorted by length (random ties) and chunked, batch order shuffled, padded to the longest.

MLM masking (15% of clinical tokens, ids >= 5; 80% `[MASK]` / 10% random clinical code / 10% kept) is drawn
with torch on the host per batch, like the reference's DataLoader; collation and masking are inside the
timed step (reported separately as `data ms`). `--mlm-logits all` (the reference) projects every position to
the vocabulary, padding included, and the loss ignores unlabelled ones (`ignore_index=-100`); `masked`
gathers the labelled positions first. A step is collate + mask + forward + backward + optimizer step;
throughput is summed over the timed steps (shapes vary per batch), the step time is the median.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np
import torch
from torch import nn

from ehrjax.config import MODEL_PRESETS, model_config
from ehrjax.data.synthetic import generate_cohort
from ehrjax.data.tasks import build_vocab
from ehrjax.data.tokenize import TokenizedCorpus, tokenize
from ehrjax.data.vocab import MASK, NUM_SPECIAL, PAD
from ehrjax.models.embeddings import num_age_buckets, sinusoidal_table

VARIANTS: tuple[str, ...] = ("pad_max", "pad_longest", "sorted")
MLM_LOGITS: tuple[str, ...] = ("all", "masked")
IGNORE_INDEX = -100
LAYER_NORM_EPS = 1e-6  # flax's LayerNorm default, which ehrjax uses


# --------------------------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True, eq=False)
class BaselineData:
    """The tokenised cohort, the train-split patient indices into it, and the vocabulary size."""

    corpus: TokenizedCorpus
    patients: np.ndarray
    vocab_size: int

    @property
    def max_len(self) -> int:
        return self.corpus.max_len

    @property
    def lengths(self) -> np.ndarray:
        """int32[len(patients)] tokens per train patient, [CLS] and [SEP]s included."""
        return self.corpus.lengths[self.patients]


def load_data(num_patients: int, max_len: int, *, seed: int = 0, num_noise_codes: int = 1000) -> BaselineData:
    """ehrjax's synthetic pretrain cohort -> vocabulary (train split) -> BEHRT layout; keep train patients."""
    cohort = generate_cohort(num_patients, seed, "pretrain", num_noise_codes)
    vocab = build_vocab(cohort)
    corpus = tokenize(cohort, vocab, max_len)
    patients = np.flatnonzero(cohort.split_mask("train"))
    if len(patients) == 0:
        raise ValueError(f"no train-split patients in a cohort of {num_patients}")
    return BaselineData(corpus=corpus, patients=patients, vocab_size=len(vocab))


def batch_order(lengths: np.ndarray, variant: str, batch_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    """One epoch of batches (positions into `lengths`); `n % batch_size` random patients sit the epoch out.

    `pad_max` / `pad_longest`: a random permutation chunked; `sorted`: patients sorted by length (ties in
    random order), chunked, batch order shuffled.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} unknown; expected one of {VARIANTS}")
    n = len(lengths)
    if batch_size < 1 or batch_size > n:
        raise ValueError(f"batch_size must be in [1, {n}], got {batch_size}")
    num_batches = n // batch_size
    order = rng.permutation(n)[: num_batches * batch_size]  # the dropped remainder is random in every variant
    if variant == "sorted":
        order = order[np.argsort(lengths[order], kind="stable")]
    batches = list(order.reshape(num_batches, batch_size))
    if variant == "sorted":
        batches = [batches[i] for i in rng.permutation(num_batches)]
    return batches


def epochs_of_batches(
    lengths: np.ndarray, variant: str, batch_size: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Batches forever, a fresh `batch_order` each epoch."""
    while True:
        yield from batch_order(lengths, variant, batch_size, rng)


def collate(corpus: TokenizedCorpus, patients: np.ndarray, pad_to: int) -> dict[str, torch.Tensor]:
    """Right-pad the given corpus patients to `pad_to` tokens.

    Returns codes, ages, visits: int64[B, pad_to] (0 at padding) and padding: bool[B, pad_to] (True at
    padding, torch's `src_key_padding_mask` convention).
    """
    starts = corpus.offsets[patients]
    lens = corpus.offsets[patients + 1] - starts
    if len(lens) and int(lens.max()) > pad_to:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest patient ({int(lens.max())} tokens)")
    pos = np.arange(pad_to)
    valid = pos[None, :] < lens[:, None]
    index = np.where(valid, starts[:, None] + pos[None, :], 0)
    out = {name: np.where(valid, getattr(corpus, name)[index], 0) for name in ("codes", "ages", "visits")}
    out["codes"][~valid] = PAD
    tensors = {k: torch.from_numpy(v.astype(np.int64)) for k, v in out.items()}
    tensors["padding"] = torch.from_numpy(~valid)
    return tensors


def mask_mlm(
    codes: torch.Tensor, vocab_size: int, *, mask_prob: float = 0.15, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of clinical tokens (ids >= NUM_SPECIAL): returns (input codes, labels with -100 elsewhere).

    Of the selected tokens 80% become `[MASK]`, 10% a random clinical code, 10% stay. A batch where nothing
    was drawn gets its first clinical token selected, so the loss is never an empty mean.
    """
    clinical = codes >= NUM_SPECIAL
    selected = clinical & (torch.rand(codes.shape, generator=generator) < mask_prob)
    if not bool(selected.any()) and bool(clinical.any()):
        selected.view(-1)[int(torch.nonzero(clinical.view(-1))[0])] = True
    action = torch.rand(codes.shape, generator=generator)
    random_codes = torch.randint(NUM_SPECIAL, vocab_size, codes.shape, generator=generator, dtype=codes.dtype)
    corrupted = torch.where(action < 0.8, torch.full_like(codes, MASK), torch.where(action < 0.9, random_codes, codes))
    inputs = torch.where(selected, corrupted, codes)
    labels = torch.where(selected, codes, torch.full_like(codes, IGNORE_INDEX))
    return inputs, labels


def make_batch(
    data: BaselineData,
    batch: np.ndarray,
    pad_to: int,
    *,
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Collate train patients `data.patients[batch]` to `pad_to` tokens and mask them for MLM."""
    tensors = collate(data.corpus, data.patients[batch], pad_to)
    tensors["codes"], tensors["labels"] = mask_mlm(
        tensors["codes"], data.vocab_size, mask_prob=mask_prob, generator=generator
    )
    return tensors


# -------------------------------------------------------------------------------------------------- model


class TorchBehrtEmbeddings(nn.Module):
    """code (+ projection) + age bucket + segment (visit % 2) + sinusoidal visit position, LayerNorm, dropout."""

    def __init__(self, cfg: ml_collections.ConfigDict, vocab_size: int):
        super().__init__()
        embed, hidden = cfg.embed_dim, cfg.hidden_dim
        self.age_bucket_months = cfg.age_bucket_months
        self.max_visits = cfg.max_visits
        self.code = nn.Embedding(vocab_size, embed)
        self.proj = nn.Linear(embed, hidden) if embed != hidden else nn.Identity()
        self.age = nn.Embedding(num_age_buckets(cfg), hidden)
        self.segment = nn.Embedding(2, hidden)
        table = torch.from_numpy(np.array(sinusoidal_table(self.max_visits, hidden)))
        self.register_buffer("position", table, persistent=False)  # frozen: a buffer, not a parameter
        self.norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.dropout = nn.Dropout(cfg.dropout)
        for table_module in (self.code, self.age, self.segment):
            nn.init.normal_(table_module.weight, std=0.02)

    def forward(self, codes: torch.Tensor, ages: torch.Tensor, visits: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.code(codes))
        x = x + self.age(torch.clamp(ages // self.age_bucket_months, 0, self.age.num_embeddings - 1))
        x = x + self.segment(visits % 2)
        x = x + self.position[torch.clamp(visits, 0, self.max_visits - 1)]
        return self.dropout(self.norm(x))


class TorchMlmHead(nn.Module):
    """Dense + GELU + LayerNorm + decoder to the vocabulary (untied). h: [..., hidden] -> [..., vocab]."""

    def __init__(self, hidden: int, vocab_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.norm = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.decoder = nn.Linear(hidden, vocab_size)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.norm(nn.functional.gelu(self.dense(h))))


class TorchBehrt(nn.Module):
    """BEHRT for MLM; `forward` returns the mean cross-entropy over the labelled positions.

    cfg: `ehrjax.config.model_config(preset)`; mlm_logits: `all` projects
    every position (padding included) as the reference study did, `masked` only the labelled ones.
    """

    def __init__(self, cfg: ml_collections.ConfigDict, vocab_size: int, *, mlm_logits: str = "all"):
        super().__init__()
        if mlm_logits not in MLM_LOGITS:
            raise ValueError(f"mlm_logits {mlm_logits!r} unknown; expected one of {MLM_LOGITS}")
        hidden = cfg.hidden_dim
        self.vocab_size = vocab_size
        self.mlm_logits = mlm_logits
        self.embeddings = TorchBehrtEmbeddings(cfg, vocab_size)
        layer = nn.TransformerEncoderLayer(
            d_model=hidden,
            nhead=cfg.num_heads,
            dim_feedforward=cfg.mlp_dim,
            dropout=cfg.dropout,
            activation="gelu",
            layer_norm_eps=LAYER_NORM_EPS,
            batch_first=True,
            norm_first=True,
        )
        self.encoder = nn.TransformerEncoder(
            layer,
            cfg.num_layers,
            norm=nn.LayerNorm(hidden, eps=LAYER_NORM_EPS),
            enable_nested_tensor=False,  # the nested-tensor fast path is inference-only and refuses norm_first
        )
        for block in self.encoder.layers:  # the stock layer uses `dropout` for attention too; ehrjax separates them
            block.self_attn.dropout = cfg.attention_dropout
        self.mlm_head = TorchMlmHead(hidden, vocab_size)

    def encode(
        self, codes: torch.Tensor, ages: torch.Tensor, visits: torch.Tensor, padding: torch.Tensor
    ) -> torch.Tensor:
        """int64[B, L] inputs, padding: bool[B, L] (True = padding) -> float32[B, L, hidden]."""
        x = self.embeddings(codes, ages, visits)
        return self.encoder(x, src_key_padding_mask=padding)

    def forward(
        self,
        codes: torch.Tensor,
        ages: torch.Tensor,
        visits: torch.Tensor,
        padding: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        hidden = self.encode(codes, ages, visits, padding)
        if self.mlm_logits == "all":
            logits = self.mlm_head(hidden)  # [B, L, vocab]: every slot, padding included
            return nn.functional.cross_entropy(
                logits.reshape(-1, self.vocab_size), labels.reshape(-1), ignore_index=IGNORE_INDEX
            )
        selected = labels != IGNORE_INDEX
        return nn.functional.cross_entropy(self.mlm_head(hidden[selected]), labels[selected])


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters (the frozen sinusoidal table is a buffer, not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_optimizer(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """The reference study's optimiser: AdamW, lr 1e-4, weight decay 0.01 (on every parameter)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)


def train_step(model: TorchBehrt, optimizer: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor]) -> float:
    """Forward + backward + optimiser step on one collated, masked batch; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(batch["codes"], batch["ages"], batch["visits"], batch["padding"], batch["labels"])
    loss.backward()
    optimizer.step()
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------- benchmark


def run_baseline(
    variant: str,
    *,
    preset: str = "small",
    max_len: int = 512,
    batch_size: int = 32,
    num_patients: int = 20_000,
    steps: int = 30,
    warmup: int = 3,
    seed: int = 0,
    mlm_logits: str = "all",
    mask_prob: float = 0.15,
    lr: float = 1e-4,
    weight_decay: float = 0.01,
    dropout: float | None = None,
    attention_dropout: float | None = None,
    threads: int | None = None,
    data: BaselineData | None = None,
) -> dict[str, Any]:
    """Time `steps` training steps of one padding variant after `warmup` untimed ones.

    The timed batches are the first `steps` of `epochs_of_batches(..., np.random.default_rng(seed))`;
    `steps=0` times exactly one epoch (the fair figure for `sorted`, whose few long batches dominate).
    `data` (from `load_data`, tokenised at `max_len`) skips regenerating the cohort. `threads` defaults to
    `os.cpu_count()`. Returns the settings and: params, step_ms (median), data_ms (median collate + mask),
    cpu_ms (median process CPU time per step: with 1 thread, close to the step time of an idle core),
    real/padded tokens per second and patients per second (totals over the timed steps), padding_efficiency
    (real / computed token slots), real/padded token totals, losses (per timed step), cpu_util (process CPU
    seconds / wall seconds over the timed steps: below `threads` when other jobs share the cores).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} unknown; expected one of {VARIANTS}")
    if preset not in MODEL_PRESETS:
        raise ValueError(f"preset {preset!r} unknown; expected one of {sorted(MODEL_PRESETS)}")
    if steps < 0 or warmup < 0:
        raise ValueError(f"steps and warmup must be >= 0, got {steps} and {warmup}")
    if data is None:
        data = load_data(num_patients, max_len, seed=seed)
    elif data.max_len != max_len:
        raise ValueError(f"data was tokenised at max_len={data.max_len}, not {max_len}")
    threads = threads or os.cpu_count() or 1
    torch.set_num_threads(threads)
    torch.manual_seed(seed)

    cfg = model_config(preset)
    if dropout is not None:
        cfg.dropout = cfg.attention_dropout = dropout
    if attention_dropout is not None:
        cfg.attention_dropout = attention_dropout
    model = TorchBehrt(cfg, data.vocab_size, mlm_logits=mlm_logits)
    model.train()
    optimizer = make_optimizer(model, lr, weight_decay)
    generator = torch.Generator().manual_seed(seed)
    lengths = data.lengths
    steps = steps or len(lengths) // batch_size
    # Warm-up batches come from their own stream, so the timed steps start an epoch: `steps=0` is one epoch.
    warm = epochs_of_batches(lengths, variant, batch_size, np.random.default_rng([seed, 1]))
    timed = epochs_of_batches(lengths, variant, batch_size, np.random.default_rng(seed))

    step_s: list[float] = []
    data_s: list[float] = []
    cpu_s: list[float] = []
    losses: list[float] = []
    real = padded = 0
    wall0 = cpu0 = 0.0
    for i in range(warmup + steps):
        if i == warmup:
            wall0, cpu0 = time.perf_counter(), time.process_time()
        t0, c0 = time.perf_counter(), time.process_time()
        index = next(warm if i < warmup else timed)
        pad_to = max_len if variant == "pad_max" else int(lengths[index].max())
        batch = make_batch(data, index, pad_to, mask_prob=mask_prob, generator=generator)
        t1 = time.perf_counter()
        loss = train_step(model, optimizer, batch)
        t2, c2 = time.perf_counter(), time.process_time()
        if i >= warmup:
            step_s.append(t2 - t0)
            cpu_s.append(c2 - c0)
            data_s.append(t1 - t0)
            losses.append(loss)
            real += int(lengths[index].sum())
            padded += batch_size * pad_to
    wall = time.perf_counter() - wall0
    cpu = time.process_time() - cpu0
    return {
        "variant": variant,
        "preset": preset,
        "max_len": max_len,
        "batch_size": batch_size,
        "mlm_logits": mlm_logits,
        "num_train_patients": len(data.patients),
        "vocab_size": data.vocab_size,
        "params": count_parameters(model),
        "threads": threads,
        "steps": steps,
        "warmup": warmup,
        "step_ms": 1e3 * statistics.median(step_s),
        "data_ms": 1e3 * statistics.median(data_s),
        "cpu_ms": 1e3 * statistics.median(cpu_s),
        "real_tokens": real,
        "padded_tokens": padded,
        "padding_efficiency": real / padded,
        "real_tokens_per_s": real / wall,
        "padded_tokens_per_s": padded / wall,
        "patients_per_s": steps * batch_size / wall,
        "wall_s": wall,
        "cpu_util": cpu / wall,
        "losses": losses,
    }


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table of `run_baseline` results."""
    lines = [
        "| variant | max_len | MLM logits | batch | steps | step ms (median) | data ms | real tok/s | padded tok/s "
        "| padding eff. | patients/s | threads | CPU ms/step | CPU util | last loss |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']} | {r['max_len']} | {r['mlm_logits']} | {r['batch_size']} | {r['steps']} "
            f"| {r['step_ms']:.1f} | {r['data_ms']:.1f} | {r['real_tokens_per_s']:,.0f} "
            f"| {r['padded_tokens_per_s']:,.0f} | {r['padding_efficiency']:.1%} | {r['patients_per_s']:,.1f} "
            f"| {r['threads']} | {r['cpu_ms']:.1f} | {r['cpu_util']:.2f} | {r['losses'][-1]:.3f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(MODEL_PRESETS), help="model size preset")
    parser.add_argument("--max-len", type=int, default=512, help="truncation length; pad_max pads to it")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--batch-size", type=int, default=32, help="patients per batch")
    parser.add_argument("--num-patients", type=int, default=20_000, help="cohort size (the train split is used)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant; 0 -> one epoch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--mlm-logits", default="all", choices=MLM_LOGITS, help="all: the reference's way")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0 -> os.cpu_count()")
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        parser.error(f"--variants: unknown or empty {unknown}; expected some of {VARIANTS}")

    data = load_data(args.num_patients, args.max_len, seed=args.seed)
    lengths = data.lengths
    print(
        f"torch={torch.__version__} threads={args.threads or os.cpu_count()} load={os.getloadavg()[0]:.2f} "
        f"preset={args.preset} train_patients={len(data.patients)} vocab={data.vocab_size} "
        f"tokens/patient mean={lengths.mean():.1f} median={np.median(lengths):.0f} max={lengths.max()} "
        f"(truncated at {args.max_len}: {data.corpus.num_truncated} of the cohort)",
        flush=True,
    )
    rows = []
    for variant in variants:
        row = run_baseline(
            variant,
            preset=args.preset,
            max_len=args.max_len,
            batch_size=args.batch_size,
            steps=args.steps,
            warmup=args.warmup,
            seed=args.seed,
            mlm_logits=args.mlm_logits,
            threads=args.threads or None,
            data=data,
        )
        rows.append(row)
        print(f"{variant}: {row['step_ms']:.1f} ms/step, {row['real_tokens_per_s']:,.0f} real tok/s", flush=True)
    print(f"params={rows[0]['params']:,} load after={os.getloadavg()[0]:.2f}")
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
