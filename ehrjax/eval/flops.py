"""Analytic training FLOPs of a BEHRT step and device peak FLOP/s, for MFU.

Matmul FLOPs only (a multiply-add is 2 FLOPs); embedding lookups are gathers, and LayerNorm, softmax, GELU,
dropout and the optimiser are not counted. Training = 3 x forward (the backward pass is 2 x forward: one
matmul for the input gradient, one for the weight gradient). With E = embed_dim, H = hidden_dim,
Y = num_layers, F = mlp_dim, V = vocabulary size, the forward FLOPs are

- per token:  2 x P with P = [E H if E != H] + Y (4 H^2 + 2 H F) matmul parameters touched per token
  (projection, q/k/v/o, MLP in/out; biases are not FLOPs worth counting);
- attention:  4 H Y per (query, key) pair: QK^T scores 2 H and probabilities x V 2 H, summed over heads;
  bidirectional, so no causal halving. A row of length R computes R^2 pairs (the mask is applied, not
  skipped), a patient of length l needs only l^2;
- MLM head:   2 (H W + W V) per gathered MLM slot, W = H untied (dense H -> H, decoder H -> V) or E tied
  (dense H -> E, logits against the E-wide code table). Only the M gathered slots per row are projected.
- copy head (`model.mlm_copy`): a key projection 2 H^2 per token, a query 2 H^2 and a gate 2 H per slot, and
  2 H per (slot, position) pair for the pointer scores; its scatter onto the vocabulary is no matmul.

Two counts per step:

- **hardware FLOPs** (`hardware_flops`): what the step computes: every token slot of every row (padding
  included), R^2 attention pairs per row, all M MLM slots per row;
- **model FLOPs** (`model_flops`): the useful work a padding-free, segment-aware implementation would do:
  real tokens only, l^2 attention pairs per patient, one head projection per real MLM target.

MFU uses model FLOPs (PaLM's definition, MaxText's and levanter's MFU), so padding, whole-row attention and
empty MLM slots count as waste rather than as work; HFU (hardware FLOPs) says how busy the device was.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Dense (no 2:4 sparsity) datasheet peaks, FLOP/s. `bfloat16`: tensor cores; `float32`: what XLA uses for an
# f32 matmul at the default precision, which on Ampere and later GPUs is TF32 tensor cores (`float32_simt`:
# plain FP32 cores, for reference, e.g. under jax_default_matmul_precision='highest').
# Matched against `jax.devices()[0].device_kind` in order: the first regular expression found (ignoring case)
# wins, e.g. 'NVIDIA H100 80GB HBM3' (SXM), 'NVIDIA H100 PCIe', 'NVIDIA A100-SXM4-80GB', 'NVIDIA L4'.
PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"\bH100\b.*\bPCIe\b", {"bfloat16": 756e12, "float32": 378e12, "float32_simt": 51e12}),
    (r"\bH100\b.*\bNVL\b", {"bfloat16": 835.5e12, "float32": 417.5e12, "float32_simt": 60e12}),
    (r"\bH100\b", {"bfloat16": 989e12, "float32": 494.5e12, "float32_simt": 67e12}),  # SXM
    (r"\bG?H200\b", {"bfloat16": 989e12, "float32": 494.5e12, "float32_simt": 67e12}),
    (r"\bA100\b", {"bfloat16": 312e12, "float32": 156e12, "float32_simt": 19.5e12}),
    (r"\bA40\b", {"bfloat16": 149.7e12, "float32": 74.8e12, "float32_simt": 37.4e12}),
    (r"\bL4\b", {"bfloat16": 121e12, "float32": 60e12, "float32_simt": 30.3e12}),  # not L40 / L40S
)


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """BEHRT's matmul shapes. `tied`: the MLM decoder is the code table (`model.tie_mlm`)."""

    embed_dim: int
    hidden_dim: int
    num_layers: int
    mlp_dim: int
    vocab_size: int
    tied: bool = False
    copy: bool = False  # the MLM copy head (`model.mlm_copy`)

    @classmethod
    def from_config(cls, model_cfg: Any, vocab_size: int) -> FlopModel:
        """From a `model_config(...)` section and the vocabulary size."""
        return cls(
            embed_dim=model_cfg.embed_dim,
            hidden_dim=model_cfg.hidden_dim,
            num_layers=model_cfg.num_layers,
            mlp_dim=model_cfg.mlp_dim,
            vocab_size=vocab_size,
            tied=bool(model_cfg.tie_mlm),
            copy=bool(model_cfg.mlm_copy),
        )

    @property
    def matmul_params_per_token(self) -> int:
        """P: projection (if E != H) + per layer q, k, v, o (4 H^2) and MLP in/out (2 H F)."""
        e, h, f = self.embed_dim, self.hidden_dim, self.mlp_dim
        proj = e * h if e != h else 0
        return proj + self.num_layers * (4 * h * h + 2 * h * f)

    @property
    def attention_per_pair(self) -> int:
        """Forward FLOPs per (query, key) pair over all layers: 2 H (scores) + 2 H (context), x Y."""
        return 4 * self.hidden_dim * self.num_layers

    @property
    def head_per_slot(self) -> int:
        """Forward FLOPs of the MLM head per projected slot: 2 (H W + W V)."""
        w = self.embed_dim if self.tied else self.hidden_dim
        return 2 * (self.hidden_dim * w + w * self.vocab_size)

    @property
    def copy_per_token(self) -> int:
        """Forward FLOPs of the copy head per token: its key projection 2 H^2 (0 without the head)."""
        return 2 * self.hidden_dim**2 if self.copy else 0

    @property
    def copy_per_slot(self) -> int:
        """Forward FLOPs of the copy head per projected slot: query 2 H^2 and gate 2 H."""
        return 2 * self.hidden_dim**2 + 2 * self.hidden_dim if self.copy else 0

    @property
    def copy_per_pair(self) -> int:
        """Forward FLOPs of the copy head per (slot, position) pair: the pointer score 2 H."""
        return 2 * self.hidden_dim if self.copy else 0

    def train_flops(self, tokens: float, attention_pairs: float, head_slots: float, copy_pairs: float = 0) -> float:
        """3 x forward: 2 P per token, 4 H Y per attention pair, the head per projected slot, and the copy
        head's terms (per token, per slot, per (slot, position) pair) when it is on."""
        forward = (2 * self.matmul_params_per_token + self.copy_per_token) * tokens
        forward += self.attention_per_pair * attention_pairs + (self.head_per_slot + self.copy_per_slot) * head_slots
        forward += self.copy_per_pair * copy_pairs
        return 3 * forward

    def hardware_flops(self, rows: int, row_len: int, mlm_slots: int) -> int:
        """Training FLOPs computed by one step of `rows` x `row_len` with `mlm_slots` MLM slots per row (the copy
        head scores every slot against every position of its row)."""
        tokens = rows * row_len
        return int(self.train_flops(tokens, tokens * row_len, rows * mlm_slots, rows * mlm_slots * row_len))

    def model_flops(self, real_tokens: int, sum_sq_lengths: int, mlm_targets: float) -> float:
        """Useful training FLOPs: `real_tokens` = sum l, `sum_sq_lengths` = sum l^2 over the patients, and
        `mlm_targets` real masked positions (may be an expectation, hence float). The copy head needs each target
        scored against its own patient's l positions; targets fall on patients in proportion to l, so that is
        mlm_targets x sum l^2 / sum l pairs."""
        copy_pairs = mlm_targets * sum_sq_lengths / real_tokens if self.copy and real_tokens else 0.0
        return self.train_flops(real_tokens, sum_sq_lengths, mlm_targets, copy_pairs)


def jaxpr_matmul_flops(jaxpr: Any) -> int:
    """FLOPs of every `dot_general` in a (closed) jaxpr, sub-jaxprs included (a `scan` body x its length).

    2 x prod(output shape) x prod(contracted sizes) per product: the count `FlopModel` predicts, e.g. of
    `jax.make_jaxpr(train_step)(state, group, index, key)`.
    """
    from jax.extend import core as jcore

    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contract)
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else (param,):
                if isinstance(sub, jcore.ClosedJaxpr | jcore.Jaxpr):
                    total += repeat * jaxpr_matmul_flops(sub)
    return total


def mfu(flops_per_step: float, step_seconds: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: flops_per_step / step_seconds / peak_flops."""
    return flops_per_step / step_seconds / peak_flops


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
    """The dense peak FLOP/s of `device_kind` for compute `dtype` ('bfloat16' | 'float32'), or None."""
    for pattern, peaks in PEAKS:
        if re.search(pattern, device_kind, flags=re.IGNORECASE):
            return peaks.get(dtype)
    return None


@functools.cache
def measured_matmul_peak(dtype: str = "float32", n: int = 2048, repeats: int = 7) -> float:
    """FLOP/s of a jitted n x n x n `jnp.dot` on the default device, median of `repeats` (cached per process).

    The achievable peak for a device without a datasheet entry (the CPU): 2 n^3 FLOPs per product.
    """
    dt = jnp.dtype(dtype)
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((n, n)), dt)
    b = jnp.asarray(rng.standard_normal((n, n)), dt)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2.0 * n**3 / statistics.median(times)


def device_peak(dtype: str, device: Any = None, matmul_size: int = 2048) -> tuple[float, str]:
    """(peak FLOP/s, source) for `device` (default the first): the datasheet table for known accelerators,
    else a measured `jnp.dot` of `matmul_size`^2 (source 'measured')."""
    device = device or jax.devices()[0]
    if device.platform != "cpu":
        peak = datasheet_peak(device.device_kind, dtype)
        if peak is not None:
            return peak, f"datasheet {device.device_kind} {'TF32' if dtype == 'float32' else dtype}"
    return measured_matmul_peak(dtype, matmul_size), f"measured {matmul_size}^3 {dtype} jnp.dot"
