"""Low-rank adapters (LoRA, Hu et al. 2021) with alpha/rank scaling.

`LoRADense` is an `nnx.Linear` whose kernel and bias keep the plain Linear paths (`.../q/kernel`,
`.../q/bias`), so a state saved without adapters loads into a model with them. An adapter adds
`scale * dropout(x) @ lora_a @ lora_b` with `lora_a: f32[in, r]`, `lora_b: f32[r, out]` (both
`nnx.LoRAParam`), `lora_b` zero-initialised so an adapted model equals its base at step 0, and
`scale = alpha / rank` (flax's own `nnx.LoRA` has no scaling).

Adapters are attached after construction by `add_lora`, which draws from its own key: a model built with
`lora_cfg` has the same base weights as the one built without it from the same seed. Stacked layers
(`model.scan_layers`) have a leading layer axis on every parameter; adapters follow it.
"""

from __future__ import annotations

from collections.abc import Iterable

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

LORA_TARGETS: tuple[str, ...] = ("q", "k", "v", "o", "mlp_in", "mlp_out")


class LoRADense(nnx.Linear):
    """Dense layer `x @ kernel + bias`, plus an optional low-rank adapter.

    x: f[..., in] -> f[..., out]. `target` names the layer for `lora.targets` (`q`, `k`, `v`, `o`,
    `mlp_in`, `mlp_out`); layers with `target=None` never receive an adapter.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        target: str | None = None,
        use_bias: bool = True,
        dtype: jnp.dtype | None = None,
        rngs: nnx.Rngs,
    ):
        super().__init__(in_features, out_features, use_bias=use_bias, dtype=dtype, rngs=rngs)
        self.target = target
        self.lora_rank = 0
        self.lora_scale = 0.0
        self.lora_dropout = nnx.Dropout(0.0)
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None

    def __call__(
        self, x: jax.Array, *, deterministic: bool = True, rngs: jax.Array | nnx.Rngs | None = None
    ) -> jax.Array:
        y = super().__call__(x)
        if not self.has_lora:
            return y
        xd = self.lora_dropout(x, deterministic=deterministic, rngs=rngs)
        dtype = self.dtype or x.dtype
        a = self.lora_a[...].astype(dtype)
        b = self.lora_b[...].astype(dtype)
        return y + (xd.astype(dtype) @ a @ b) * jnp.asarray(self.lora_scale, dtype)

    def attach_lora(self, rank: int, alpha: float, dropout: float, key: jax.Array) -> None:
        """Add a fresh adapter (`lora_a` Kaiming-uniform, `lora_b` zero) of the given rank."""
        lead = self.kernel.shape[:-2]  # the stacked layer axis under scan_layers, else ()
        init_a = nnx.initializers.he_uniform(batch_axis=tuple(range(len(lead))))
        self.lora_a = nnx.LoRAParam(init_a(key, (*lead, self.in_features, rank), jnp.float32))
        self.lora_b = nnx.LoRAParam(jnp.zeros((*lead, rank, self.out_features), jnp.float32))
        self.lora_rank = rank
        self.lora_scale = float(alpha) / rank
        self.lora_dropout = nnx.Dropout(dropout)

    def merge(self) -> None:
        """Fold `scale * lora_a @ lora_b` into the kernel and remove the adapter (outputs unchanged)."""
        if not self.has_lora:
            return
        delta = jnp.einsum("...ir,...ro->...io", self.lora_a[...], self.lora_b[...]) * self.lora_scale
        self.kernel[...] = self.kernel[...] + delta.astype(self.kernel.dtype)
        self.lora_a = None
        self.lora_b = None
        self.lora_rank = 0
        self.lora_scale = 0.0
        self.lora_dropout = nnx.Dropout(0.0)


def lora_layers(model: nnx.Module) -> Iterable[tuple[tuple, LoRADense]]:
    """Every `LoRADense` of `model` with its path."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, LoRADense):
            yield path, node


def validate_lora_config(lora_cfg: ml_collections.ConfigDict) -> None:
    """One-line ValueErrors naming the bad `lora.*` key (dimension checks happen in `add_lora`)."""
    rank = lora_cfg.rank
    if not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"lora.rank must be a positive integer, got {rank!r}")
    if not lora_cfg.alpha > 0:
        raise ValueError(f"lora.alpha must be > 0, got {lora_cfg.alpha!r}")
    if not 0.0 <= lora_cfg.dropout < 1.0:
        raise ValueError(f"lora.dropout must be in [0, 1), got {lora_cfg.dropout!r}")
    targets = tuple(lora_cfg.targets)
    if not targets:
        raise ValueError(f"lora.targets is empty; expected some of {LORA_TARGETS}")
    unknown = [t for t in targets if t not in LORA_TARGETS]
    if unknown:
        raise ValueError(f"lora.targets has unknown target(s) {unknown}; expected some of {LORA_TARGETS}")


def add_lora(model: nnx.Module, lora_cfg: ml_collections.ConfigDict, key: jax.Array) -> nnx.Module:
    """Attach adapters in place to every `LoRADense` whose target is in `lora_cfg.targets`.

    Works on a freshly built model or on one holding pretrained weights (their values are untouched).
    Raises ValueError if `lora.rank` exceeds `min(in, out)` of a targeted layer.
    """
    validate_lora_config(lora_cfg)
    targets = set(lora_cfg.targets)
    chosen = [(path, layer) for path, layer in lora_layers(model) if layer.target in targets]
    if not chosen:
        raise ValueError(f"lora.targets {sorted(targets)} matched no layer of {type(model).__name__}")
    for i, (_, layer) in enumerate(chosen):
        limit = min(layer.in_features, layer.out_features)
        if lora_cfg.rank > limit:
            raise ValueError(
                f"lora.rank={lora_cfg.rank} exceeds min(in, out)={limit} of target {layer.target!r} "
                f"({layer.in_features} -> {layer.out_features})"
            )
        if layer.has_lora:
            raise ValueError(f"layer {layer.target!r} already has a LoRA adapter")
        layer.attach_lora(lora_cfg.rank, lora_cfg.alpha, lora_cfg.dropout, jax.random.fold_in(key, i))
    return model


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Fold every adapter into its base kernel and remove it, in place; outputs are unchanged.

    The result has exactly the parameter paths of a model without LoRA.
    """
    for _, layer in lora_layers(model):
        layer.merge()
    return model


def lora_state(model: nnx.Module) -> nnx.State:
    """The adapter parameters alone (a few hundred KB): save them, then `load_lora` them."""
    return nnx.state(model, nnx.LoRAParam)


def load_lora(model: nnx.Module, state: nnx.State) -> nnx.Module:
    """Load adapter parameters produced by `lora_state` into `model` (same paths and shapes), in place."""
    current = nnx.to_flat_state(lora_state(model))
    incoming = nnx.to_flat_state(state)
    have = {path: var for path, var in current}
    got = {path: var for path, var in incoming}
    if set(have) != set(got):
        missing = sorted(map(_fmt, set(have) - set(got)))
        extra = sorted(map(_fmt, set(got) - set(have)))
        raise ValueError(f"LoRA state does not match the model: missing {missing}, unexpected {extra}")
    for path, var in got.items():
        if var.shape != have[path].shape:
            raise ValueError(f"LoRA param {_fmt(path)} has shape {var.shape}, expected {have[path].shape}")
    nnx.update(model, state)
    return model


def _fmt(path: tuple) -> str:
    return "/".join(map(str, path))
